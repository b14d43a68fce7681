"""The bundled Anatomy editor examples: every listed scan opens with a layout of its own size and plane."""

import json

import pytest
from PIL import Image

from fetalstudio.anatomy.examples import list_examples
from fetalstudio.errors import FetalStudioError


def test_every_bundled_example_has_a_layout_of_its_image():
    examples = list_examples()
    assert [e.plane for e in examples] == ["facial_sagittal"] * 3 + ["trans_thalamic"]
    for example in examples:
        layout = example.layout()
        with Image.open(example.image) as image:
            assert (layout.width, layout.height) == image.size
        assert layout.plane == example.plane and layout.boxes
        assert "CC BY 4.0" in example.dataset
    assert len(examples[0].layout().boxes) == 9


def test_a_missing_index_lists_none_and_a_broken_one_is_named(tmp_path):
    assert list_examples(tmp_path) == []
    (tmp_path / "examples.json").write_text("{not json")
    with pytest.raises(FetalStudioError, match="not readable JSON"):
        list_examples(tmp_path)
    (tmp_path / "examples.json").write_text(json.dumps({"schema": "fetalstudio.anatomy-examples", "version": 1,
                                                         "examples": [{"image": "../x.png", "layout": "a.json", "plane": "p", "title": "t"}]}))
    with pytest.raises(FetalStudioError, match="example 1: x.png is not a file of"):
        list_examples(tmp_path)
