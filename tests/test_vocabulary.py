import pytest

from fetalstudio.vocabulary import (
    PLANES, PromptChoice, head_caption, parse_plane, parse_trimester, plane_caption, prompt_for, subject_choices,
)


def test_five_planes_with_fu_lora_captions():
    assert [p.value for p in PLANES] == ["abdomen", "brain", "femur", "thorax", "other"]
    assert plane_caption("abdomen") == "a photo of fetal abdomen"
    assert plane_caption(" Femur ") == "a photo of fetal femur"


@pytest.mark.parametrize("text,expected", [("first", "first"), ("2", "second"), ("3rd", "third"), ("Second trimester", "second")])
def test_head_caption_by_trimester(text, expected):
    assert head_caption(text) == f"An ultrasound image of a fetal head, {expected} trimester"


def test_subjects_and_prompt_choice():
    assert subject_choices() == ["abdomen", "brain", "femur", "thorax", "other", "head"]
    assert prompt_for("head", "first").endswith("first trimester")
    assert PromptChoice("custom", custom_text="  fetal kidney  ").prompt() == "fetal kidney"


def test_bad_vocabulary_inputs_explain_the_choices():
    with pytest.raises(ValueError, match="abdomen, brain, femur, thorax, other"):
        parse_plane("cervix")
    with pytest.raises(ValueError, match="first, second, third"):
        parse_trimester("fourth")
    with pytest.raises(ValueError, match="needs a trimester"):
        PromptChoice("head").prompt()
    with pytest.raises(ValueError, match="custom prompt is empty"):
        PromptChoice("custom", custom_text=" ").prompt()
