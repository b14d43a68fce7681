"""Edge conditions through controlnet_aux (pipelines/edges.py): Canny on real scans, sizes, offline weights."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.pipelines.edges import (
    ANNOTATORS_ENV, EDGE_DETECTORS, EdgeSettings, edge_map, edge_settings_record,
)
from tests.data_support import DATA, needs_data, pairs_rows

FIRST_TRIMESTER = DATA / "first_trimester_structures" / "images" / "0.png"


def _gray(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _no_download(*args, **kwargs):
    raise AssertionError("controlnet_aux tried to download annotator weights")


@pytest.fixture
def offline_aux(monkeypatch):
    """controlnet_aux's detector modules with hf_hub_download replaced by a failure."""
    import controlnet_aux.hed
    import controlnet_aux.lineart
    import controlnet_aux.pidi

    for module in (controlnet_aux.hed, controlnet_aux.pidi, controlnet_aux.lineart):
        monkeypatch.setattr(module, "hf_hub_download", _no_download)


@needs_data
def test_canny_on_a_first_trimester_scan_is_opencv_canny_at_the_image_size():
    gray = _gray(FIRST_TRIMESTER)
    assert gray.shape == (480, 697)  # not square, neither side a multiple of 64 (controlnet_aux's grid)
    edges = edge_map(Image.open(FIRST_TRIMESTER))
    assert edges.mode == "RGB" and edges.size == (697, 480)
    pixels = np.asarray(edges)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    reference = cv2.Canny(gray, 100, 200)
    assert 1000 < np.count_nonzero(reference)  # a real scan has plenty of edges
    assert np.array_equal(pixels[..., 0], reference)


@needs_data
@pytest.mark.parametrize("low, high", [(50, 150), (0, 0), (255, 255)])
def test_canny_thresholds_on_an_hc18_scan_match_opencv(low, high):
    path = DATA / "hc18_heads" / pairs_rows("hc18_heads")[0]["image"]
    gray = _gray(path)
    edges = np.asarray(edge_map(gray, "canny", low_threshold=low, high_threshold=high))
    assert edges.shape == (*gray.shape, 3)
    assert np.array_equal(edges[..., 0], cv2.Canny(gray, low, high))


@needs_data
def test_array_and_image_inputs_give_the_same_map_and_the_same_map_twice():
    image = Image.open(FIRST_TRIMESTER)
    gray = _gray(FIRST_TRIMESTER)
    first = np.asarray(edge_map(image))
    assert np.array_equal(first, np.asarray(edge_map(gray)))
    assert np.array_equal(first, np.asarray(edge_map(np.asarray(image.convert("RGB")))))
    assert np.array_equal(first, np.asarray(edge_map(gray[..., None])))
    assert np.array_equal(first, np.asarray(edge_map(image)))


def test_tiny_and_odd_sized_images_keep_their_size_and_differ_from_opencv_only_beside_the_padding():
    """Noise (edges everywhere, the worst case): OpenCV's Canny treats the magnitude outside the image
    as 0, the padded image has replicated pixels there, so only the last row / column can differ."""
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (7, 130), (65, 63), (128, 64)):
        gray = (rng.random((height, width)) * 255).astype(np.uint8)
        edges = edge_map(gray)
        assert edges.size == (width, height)
        found, reference = np.asarray(edges)[..., 0], cv2.Canny(gray, 100, 200)
        assert np.array_equal(found[:-1, :-1], reference[:-1, :-1])
        if height % 64 == 0 and width % 64 == 0:  # no padding: exactly OpenCV's
            assert np.array_equal(found, reference)


@pytest.mark.parametrize("detector", ["hed", "pidinet", "lineart"])
def test_missing_annotator_weights_name_the_file_the_source_and_the_folder(detector, tmp_path, offline_aux):
    empty = tmp_path / "annotators"
    empty.mkdir()
    with pytest.raises(FetalStudioError) as caught:
        edge_map(np.zeros((64, 64), np.uint8), detector, annotators_dir=empty)
    message = str(caught.value)
    expected = {"hed": ["ControlNetHED.pth"], "pidinet": ["table5_pidinet.pth"], "lineart": ["sk_model.pth", "sk_model2.pth"]}
    for name in expected[detector]:
        assert name in message
        assert f"https://huggingface.co/lllyasviel/Annotators/resolve/main/{name}" in message
    assert str(empty) in message and ANNOTATORS_ENV in message
    assert "canny detector needs no weights and works offline" in message


def test_the_annotators_folder_comes_from_the_environment(tmp_path, monkeypatch, offline_aux):
    monkeypatch.setenv(ANNOTATORS_ENV, str(tmp_path / "mine"))
    with pytest.raises(FetalStudioError, match="not in " + str(tmp_path / "mine")):
        edge_map(np.zeros((64, 64), np.uint8), "hed")
    # a folder that does not exist at all: controlnet_aux would take the path for a hub repo id
    with pytest.raises(FetalStudioError, match="ControlNetHED.pth"):
        edge_map(np.zeros((64, 64), np.uint8), "hed", annotators_dir=tmp_path / "nowhere")


def test_unreadable_weights_are_a_clear_error_read_from_the_folder_not_the_hub(tmp_path, offline_aux):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FetalStudioError, match="could not be read.*Download ControlNetHED.pth again"):
        edge_map(np.zeros((64, 64), np.uint8), "hed", annotators_dir=tmp_path)


def test_a_network_detector_with_local_weights_keeps_the_image_size(tmp_path, offline_aux):
    """PiDiNet (0.7M parameters) with random weights in the Annotators file layout: loaded from the
    folder, run at the image's own scale, cropped back to the input's size; deterministic."""
    from controlnet_aux.pidi.model import pidinet

    torch.manual_seed(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in pidinet().state_dict().items()}}, tmp_path / "table5_pidinet.pth")
    gray = (np.random.default_rng(1).random((70, 100)) * 255).astype(np.uint8)
    edges = edge_map(gray, "pidinet", annotators_dir=tmp_path)
    assert edges.size == (100, 70) and edges.mode == "RGB"
    assert np.array_equal(np.asarray(edges), np.asarray(edge_map(gray, "pidinet", annotators_dir=tmp_path)))
    record = edge_settings_record(EdgeSettings("pidinet"), tmp_path)
    assert record["detector"] == "pidinet" and len(record["weights"]["table5_pidinet.pth"]) == 10


@pytest.mark.parametrize("image, fragment", [
    ("scan.png", "expected an image"),
    (None, "expected an image"),
    (np.zeros((0, 5), np.uint8), "empty"),
    (np.zeros((8, 8), np.float32), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), "uint8"),
])
def test_what_is_not_an_image_is_refused(image, fragment):
    with pytest.raises(FetalStudioError, match=fragment):
        edge_map(image)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"low_threshold": -1}, "low threshold must be a number from 0 to 255"),
    ({"high_threshold": 256}, "high threshold must be a number from 0 to 255"),
    ({"low_threshold": 200, "high_threshold": 100}, "above the high threshold"),
    ({"low_threshold": True}, "low threshold"),
    ({"high_threshold": "200"}, "high threshold"),
    ({"detector": "sobel"}, "unknown edge detector 'sobel'; pick one of " + ", ".join(EDGE_DETECTORS)),
])
def test_bad_settings_are_refused(kwargs, fragment):
    with pytest.raises(FetalStudioError, match=fragment):
        edge_map(np.zeros((8, 8), np.uint8), **kwargs)


def test_the_record_names_detector_thresholds_and_version():
    record = edge_settings_record(EdgeSettings("canny", 40, 120))
    assert record == {"detector": "canny", "low_threshold": 40, "high_threshold": 120, "controlnet_aux": "0.0.10"}
