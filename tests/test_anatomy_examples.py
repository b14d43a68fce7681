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


def test_the_examples_of_a_plane_become_a_structures_folder_for_pairs(tmp_path):
    from fetalstudio.anatomy.examples import write_examples_folder
    from fetalstudio.anatomy.pairs import read_pair_sources

    folder = write_examples_folder(tmp_path / "examples", "facial_sagittal")
    sources = read_pair_sources(folder)
    examples = [e for e in list_examples() if e.plane == "facial_sagittal"]
    assert [s.path.resolve() for s in sources] == [e.image.resolve() for e in examples]
    for source, example in zip(sources, examples):
        layout = example.layout()
        assert (source.annotation.width, source.annotation.height) == layout.size
        assert source.annotation.boxes == tuple((b.structure, b.x0, b.y0, b.x1, b.y1) for b in layout.boxes)
    assert len(read_pair_sources(write_examples_folder(tmp_path / "heads", "trans_thalamic"))) == 1
    with pytest.raises(FetalStudioError, match="No bundled example is a facial_sagittal scan"):
        write_examples_folder(tmp_path / "none", "facial_sagittal", examples=[])


def test_the_bundled_detector_finds_the_structures_of_an_example_with_scores():
    import torch

    from fetalstudio.anatomy.flex_cli import detect_structures, detector_for_plane
    from fetalstudio.imaging.image_input import load_image
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.paths import checkpoints_dir

    manager = ModelManager(checkpoints_dir(), placement=DevicePlacement(torch.device("cpu"), torch.float32))
    example = list_examples()[0]
    found = detect_structures(manager, load_image(example.image), "facial_sagittal")
    annotated = {box.structure: box for box in example.layout().boxes}
    assert len(found) >= 5 and all(0 < d.score <= 1 for d in found)
    thalami = next(d for d in found if d.structure == "thalami")
    truth = annotated["thalami"]
    assert abs((thalami.x0 + thalami.x1) / 2 - (truth.x0 + truth.x1) / 2) < 25
    assert detector_for_plane(manager, "trans_thalamic") is None and detector_for_plane(manager, "facial_sagittal")
    with pytest.raises(FetalStudioError, match="finds facial_sagittal structures, not trans_thalamic ones"):
        detect_structures(manager, load_image(example.image), "trans_thalamic")
