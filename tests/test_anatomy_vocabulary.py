"""The anatomy vocabulary: structures per layout plane with unique labels and distinct colours."""

import csv
import itertools

import pytest

from data_support import DATA
from fetalstudio.vocabulary import (
    ANATOMY_PLANES, FACIAL_SAGITTAL, TRANS_THALAMIC, anatomy_caption, structure, structure_by_label, structures_for,
)

FACIAL_NAMES = ["thalami", "midbrain", "palate", "nasal_bone", "nasal_tip", "nasal_skin", "nuchal_translucency",
                "intracranial_translucency_4th_ventricle", "cisterna_magna"]


def test_facial_sagittal_has_the_nine_structures_of_the_data():
    assert [s.name for s in structures_for(FACIAL_SAGITTAL)] == FACIAL_NAMES
    boxes = DATA / "first_trimester_structures" / "boxes.csv"
    if boxes.is_file():
        with boxes.open(newline="") as handle:
            assert {row["structure"] for row in csv.DictReader(handle)} == set(FACIAL_NAMES)
    assert [s.name for s in structures_for(TRANS_THALAMIC)] == ["skull"]


def test_labels_unique_and_colours_distinct_and_saturated():
    every = [s for plane in ANATOMY_PLANES.values() for s in plane.structures]
    labels = [s.label for s in every]
    assert len(set(labels)) == len(labels) and min(labels) >= 1 and max(labels) <= 255
    for a, b in itertools.combinations(every, 2):
        distance = sum((x - y) ** 2 for x, y in zip(a.color_rgb, b.color_rgb)) ** 0.5
        assert distance > 75, (a.name, b.name)
    for s in every:  # far from gray: readable over a grayscale scan
        assert max(s.color_rgb) - min(s.color_rgb) >= 100, s.name
        assert s.clinical_name and s.description
    assert structure_by_label(4).name == "nasal_bone"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="Valid names: thalami, midbrain"):
        structure(FACIAL_SAGITTAL, "nose")
    with pytest.raises(ValueError, match="facial_sagittal, trans_thalamic"):
        structures_for("coronal")
    with pytest.raises(ValueError, match="nose"):
        anatomy_caption(FACIAL_SAGITTAL, ["nose"])


def test_caption_lists_plane_and_structures():
    assert anatomy_caption(FACIAL_SAGITTAL, ["thalami", "nasal_bone"]) == (
        "An ultrasound image of a fetal facial sagittal plane, first trimester, with thalami, nasal bone")


def test_every_caption_fits_the_77_tokens_clip_reads():
    """The full 9-structure caption once ran to 91 tokens of the bundled tokenizer and CLIP cut off the last
    structures; NT and IT are now named by their abbreviations."""
    from pathlib import Path

    from transformers import CLIPTokenizer

    tokenizer_folder = Path(__file__).resolve().parents[1] / "checkpoints" / "bundled" / "fetalstudio-tiny" / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    full = anatomy_caption(FACIAL_SAGITTAL)
    assert full.endswith("nasal skin, NT, IT, cisterna magna")
    for plane in (FACIAL_SAGITTAL, TRANS_THALAMIC):
        assert len(tokenizer(anatomy_caption(plane)).input_ids) <= tokenizer.model_max_length == 77
