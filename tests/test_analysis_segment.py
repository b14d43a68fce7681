"""The cached predictor: one image-encoder run per image, cheap prompts after it, the bundled
segmenter on real HC18 heads from a ground-truth box, and HC from the predicted mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.analysis.segment import CachedPredictor, image_key
from fetalstudio.imaging.biometry import head_biometry
from fetalstudio.imaging.ellipse import bounding_box, dice, fill_outline
from fetalstudio.imaging.extract import extract_ellipse

try:
    from tests.data_support import DATA, needs_data, pairs_rows
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, needs_data, pairs_rows

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
pytestmark = [needs_data, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def predictor():
    import torch

    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    manager = ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32))
    model = manager.get(manager.default_id(ModelKind.SEGMENTER))
    cached = CachedPredictor(BoxPromptPredictor(model), capacity=2)
    encoder = model.image_encoder
    original = encoder.forward
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    encoder.forward = counted
    yield cached, calls
    encoder.forward = original


def _example(index: int):
    row = pairs_rows("hc18_heads")[index]
    gray = np.asarray(Image.open(DATA / "hc18_heads" / row["image"]).convert("L"))
    truth = fill_outline(np.asarray(Image.open(DATA / "hc18_heads" / row["mask"]).convert("L")))
    return gray, truth, float(row["pixel_size_mm"]), float(row["hc_mm"])


def test_a_second_prompt_on_the_same_image_does_not_rerun_the_image_encoder(predictor):
    cached, calls = predictor
    gray, truth, _, _ = _example(3)
    box = bounding_box(truth)
    assert cached.set_image(gray) is True
    first = cached.predict(box=box)
    runs = len(calls)
    assert cached.set_image(gray.copy()) is False  # same pixels: cached
    shifted = cached.predict(box=(box[0] + 5, box[1], box[2] + 5, box[3]))
    points = cached.predict(box=box, points=[[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]])
    assert len(calls) == runs and cached.encoder_runs == 1
    assert shifted.mask.shape == points.mask.shape == first.mask.shape == gray.shape
    other, _, _, _ = _example(4)
    assert cached.set_image(other) is True and len(calls) == runs + 1
    assert cached.set_image(gray) is False and len(calls) == runs + 1  # back to the first image: from the LRU
    np.testing.assert_array_equal(cached.predict(box=box).mask, first.mask)  # the restored embedding is the same
    cached.set_image(_example(5)[0])
    cached.set_image(other)  # capacity 2: the oldest (gray) was evicted ...
    assert cached.set_image(gray) is True  # ... so it is encoded again
    assert cached.cached_images() == 2


@pytest.mark.parametrize("index", [0, 10, 200])
def test_the_bundled_segmenter_finds_real_heads_from_a_ground_truth_box(predictor, index):
    cached, _ = predictor
    gray, truth, pixel_size, hc_mm = _example(index)
    cached.set_image(gray)
    prediction = cached.predict(box=bounding_box(truth))
    assert dice(prediction.mask, truth) > 0.8
    extraction = extract_ellipse(prediction.mask.astype(np.uint8) * 255)
    assert extraction.ok
    hc = head_biometry(extraction.ellipse, pixel_size).hc_mm
    assert abs(hc - hc_mm) < 0.1 * hc_mm  # within 10 % of the reference HC (eval segmenter: mean error 2.0-2.5 mm)


def test_image_key_depends_on_pixels_and_shape():
    a = np.zeros((4, 6), np.uint8)
    assert image_key(a) == image_key(a.copy())
    b = a.copy()
    b[0, 0] = 1
    assert image_key(a) != image_key(b) and image_key(a) != image_key(a.reshape(6, 4))


def test_the_automatic_box_finds_heads_without_ground_truth(predictor):
    """Auto mode (coarse-to-fine candidate boxes
    over 21 HC18 images (every 40th); here every 160th of the shared images, mean above 0.6."""
    from fetalstudio.analysis.segment import auto_box

    cached, calls = predictor
    scores = []
    for index in range(0, 805, 160):
        gray, truth, _, _ = _example(index)
        cached.set_image(gray)
        runs = len(calls)
        box, first = auto_box(cached)
        assert len(calls) == runs  # only decoder runs
        scores.append(dice(cached.predict(box=box).mask, truth))
    assert np.mean(scores) > 0.6, scores


def test_a_box_on_a_head_combines_the_segmenter_with_the_head_unet(predictor):
    """With the installed head U-Net, a box prompt's mask is the mean of the two models' maps thresholded at
    0.5 (largest region); the U-Net runs once per image, and the combined mask beats the segmenter's own."""
    from fetalstudio.analysis.head import segment_head
    from fetalstudio.analysis.segment import HEAD_FUSION_SEGMENTER_WEIGHT
    from fetalstudio.imaging.ellipse import largest_component

    cached, _ = predictor
    fused_dice, own_dice = [], []
    for index in (0, 10, 200):
        gray, truth, pixel_size, _ = _example(index)
        x0, y0, x1, y1 = bounding_box(truth)
        box = (x0 - 15, y0 + 12, x1 + 10, y1 - 8)  # a rough box, as a user draws it
        runs = cached.head_runs
        result = segment_head(cached, gray, box=box, pixel_size_mm=pixel_size)
        assert result.fused_with_head_unet and result.box_source == "user"
        probability, score = cached.predictor.probability(box=box)
        weight = HEAD_FUSION_SEGMENTER_WEIGHT
        expected = largest_component(weight * probability + (1 - weight) * cached.head_probability(gray) > 0.5)
        np.testing.assert_array_equal(result.mask, expected)
        assert result.score == pytest.approx(score)
        moved = segment_head(cached, gray, box=(box[0] + 6, box[1], box[2] + 6, box[3]), pixel_size_mm=pixel_size)
        assert moved.fused_with_head_unet and cached.head_runs == runs + 1  # the U-Net's map is kept per image
        # ... at the U-Net's working resolution (384 x 259 for 800 x 540), not as a full-resolution float map
        assert max(window.shape[1] for window in cached._head_windows.values()) <= 384
        fused_dice.append(dice(result.mask, truth))
        own_dice.append(dice(cached.predict(box=box).mask, truth))
    assert np.mean(fused_dice) > np.mean(own_dice), (fused_dice, own_dice)
    assert min(fused_dice) > 0.9
