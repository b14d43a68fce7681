"""Grad-CAM saliency: the bundled classifier on real planes, and the geometry on hand-built models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fetalstudio.analysis.classify import EnsembleClassifier
from fetalstudio.analysis.saliency import Saliency, grad_cam, saliency_overlay
from fetalstudio.classification.predict import PlaneClassifier
from fetalstudio.errors import FetalStudioError

try:
    from tests.data_support import DATA, needs_data
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, needs_data

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BrightnessModel(torch.nn.Module):
    """timm-shaped: features = 4x4 average brightness cells (16 x 16 grid of a 64 px input);
    logits = ("bright": mean brightness, "dark": -mean brightness, "constant": 1)."""

    num_classes = 3

    def __init__(self, resize: str = "letterbox", tta: str = "") -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.pretrained_cfg = {"fetalstudio": {
            "in_chans": "1", "input_size": "64", "mean": "[0.0]", "std": "[1.0]", "resize": resize, "tta": tta,
            "classes": json.dumps(["bright", "dark", "constant"]), "num_classes": "3",
        }}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x * self.scale, 4)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(1, 2, 3))
        return torch.stack([pooled, -pooled, torch.ones_like(pooled) + 0 * pooled], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TokenModel(BrightnessModel):
    """A ViT-like model: its features are tokens (N x tokens x C), not a 2-D map."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x * self.scale, 4).flatten(2).transpose(1, 2)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(1, 2))
        return torch.stack([pooled, -pooled, torch.ones_like(pooled)], dim=1)


def _patch_image(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    image = np.zeros((height, width), dtype=np.uint8)
    image[rows, cols] = 255
    return image


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("shape, rows, cols", [
    ((100, 260), slice(10, 50), slice(190, 230)),  # wide: letterbox pads above and below
    ((260, 90), slice(200, 240), slice(5, 45)),  # tall: letterbox pads left and right
])
def test_the_peak_lands_on_the_bright_region_of_the_original_image(resize, shape, rows, cols):
    image = _patch_image(*shape, rows, cols)
    saliency = grad_cam(PlaneClassifier(BrightnessModel(resize)), image, "bright")
    assert isinstance(saliency, Saliency) and saliency.plane == "bright"
    heatmap = saliency.heatmap
    assert heatmap.shape == shape and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    peak = np.unravel_index(np.argmax(heatmap), shape)
    assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop, peak
    assert heatmap[rows, cols].mean() > 0.5 > heatmap[~(image > 0)].mean()


def test_hflip_tta_flips_the_mirrored_map_back():
    image = _patch_image(100, 260, slice(10, 50), slice(190, 230))
    plain = grad_cam(PlaneClassifier(BrightnessModel(), hflip_tta=False), image, "bright").heatmap
    flipped = grad_cam(PlaneClassifier(BrightnessModel(tta="hflip")), image, "bright").heatmap
    np.testing.assert_allclose(flipped, plain, atol=1e-5)


def test_no_evidence_gives_an_all_zero_map():
    image = _patch_image(80, 120, slice(10, 40), slice(10, 40))
    classifier = PlaneClassifier(BrightnessModel())
    for plane in ("constant", "dark"):  # zero gradient; only negative evidence (removed by the ReLU)
        heatmap = grad_cam(classifier, image, plane).heatmap
        assert heatmap.shape == (80, 120) and np.all(heatmap == 0)
    black = grad_cam(classifier, np.zeros((50, 70), dtype=np.uint8), "bright").heatmap  # no activation at all
    assert np.all(black == 0) and not np.isnan(black).any()


def test_token_features_and_unknown_planes_are_refused():
    image = _patch_image(64, 64, slice(0, 10), slice(0, 10))
    with pytest.raises(FetalStudioError, match="convolutional backbone"):
        grad_cam(PlaneClassifier(TokenModel()), image)
    with pytest.raises(FetalStudioError, match="does not know the plane 'head'"):
        grad_cam(PlaneClassifier(BrightnessModel()), image, "head")
    with pytest.raises(FetalStudioError, match="uint8"):
        grad_cam(PlaneClassifier(BrightnessModel()), image.astype(np.float32))


def test_overlay_colours_hot_red_and_cold_blue_and_checks_shapes():
    gray = np.full((40, 60), 128, dtype=np.uint8)
    heatmap = np.zeros((40, 60), dtype=np.float32)
    heatmap[:, 30:] = 1.0
    overlay = saliency_overlay(gray, heatmap)
    assert overlay.shape == (40, 60, 3) and overlay.dtype == np.uint8
    hot, cold = overlay[20, 45].astype(int), overlay[20, 10].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # RGB: red where the map is 1, blue where 0
    np.testing.assert_array_equal(saliency_overlay(gray, heatmap, opacity=0.0), np.stack([gray] * 3, axis=2))
    with pytest.raises(FetalStudioError, match="heatmap is 30x40 but the image is 60x40"):
        saliency_overlay(gray, heatmap[:, :30])


# --- the bundled classifier on real planes ---------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager

    manager = ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32))
    return PlaneClassifier(manager.get(manager.default_id(ModelKind.CLASSIFIER)))


def _spanish(plane: str) -> np.ndarray:
    path = sorted((DATA / "spanish_planes" / plane).glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("L"))


@needs_data
def test_bundled_classifier_maps_real_planes(bundled):
    model = bundled.model
    flags = [p.requires_grad for p in model.parameters()]
    for plane in ("abdomen", "brain", "femur"):
        gray = _spanish(plane)
        assert gray.shape[0] != gray.shape[1]
        (predicted,) = bundled.predict([Image.fromarray(gray)])
        with torch.inference_mode():  # robust to being called from inference code
            top = grad_cam(bundled, gray)
        other = grad_cam(bundled, gray, "thorax")
        for saliency in (top, other):
            heatmap = saliency.heatmap
            assert heatmap.shape == gray.shape and heatmap.dtype == np.float32
            assert 0 <= heatmap.min() and heatmap.max() <= 1 and heatmap.std() > 0.01
            assert saliency.probability == pytest.approx(predicted[saliency.plane], abs=1e-5)
        assert top.plane == max(predicted, key=predicted.get)
        assert top.heatmap.max() == pytest.approx(1.0)
        assert saliency_overlay(gray, top.heatmap).shape == (*gray.shape, 3)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


@needs_data
def test_an_ensemble_of_one_model_twice_maps_like_the_model(bundled):
    gray = _spanish("brain")
    single = grad_cam(bundled, gray)
    double = grad_cam(EnsembleClassifier([bundled, bundled]), gray)
    assert double.plane == single.plane
    assert double.probability == pytest.approx(single.probability, abs=1e-6)
    np.testing.assert_allclose(double.heatmap, single.heatmap, atol=1e-6)
