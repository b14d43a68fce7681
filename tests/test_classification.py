"""Plane classifier library: augmentation, preprocessing, pretrained weights, prediction, bundled model."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fetalstudio.classification.augment import PaperAugmentation, StrongAugmentation, make_augmentation
from fetalstudio.classification.model import ClassifierSpec, build_model, read_spec, save_classifier
from fetalstudio.classification.predict import PLANE_CLASSES, PlaneClassifier, Preprocessing
from fetalstudio.errors import FetalStudioError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPANISH = SHARED_DATA / "spanish_planes"
BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "bundled" / "fetalstudio-plane-classifier" / "model.safetensors"


# --- augmentation ------------------------------------------------------------------------------
def test_paper_augmentation_parameters_follow_the_paper():
    augmentation = make_augmentation("paper", 64)
    assert isinstance(augmentation, PaperAugmentation)
    assert (augmentation.max_rotation, augmentation.hflip_p, augmentation.vflip_p) == (25.0, 0.5, 0.1)
    rng = np.random.default_rng(0)
    draws = [augmentation.sample(rng) for _ in range(4000)]
    angles = np.array([d["angle"] for d in draws])
    assert angles.min() >= -25 and angles.max() <= 25
    assert angles.min() < -24 and angles.max() > 24  # the whole range is used
    assert abs(np.mean([d["hflip"] for d in draws]) - 0.5) < 0.03
    assert abs(np.mean([d["vflip"] for d in draws]) - 0.1) < 0.015


def _blob_image(size: int = 64) -> Image.Image:
    """Black image with a white square in the top-left quadrant (centre at 1/4, 1/4)."""
    array = np.zeros((size, size), dtype=np.uint8)
    array[size // 4 - 4:size // 4 + 4, size // 4 - 4:size // 4 + 4] = 255
    return Image.fromarray(array)


def test_paper_augmentation_flips_and_rotates_the_image():
    """Outputs, not just parameters: where the blob ends up tells the flips; a bar tells the angle."""
    augmentation = make_augmentation("paper", 64)
    image = _blob_image()
    rng = np.random.default_rng(1)
    right, bottom, n = 0, 0, 1500
    for _ in range(n):
        out = augmentation(image, rng)[:, :, 0]
        ys, xs = np.nonzero(out > 0.5)
        right += xs.mean() > 32
        bottom += ys.mean() > 32
    assert abs(right / n - 0.5) < 0.04  # rotation by <= 25 deg keeps the blob in its quadrant
    assert abs(bottom / n - 0.1) < 0.025

    bar = np.zeros((65, 65), dtype=np.uint8)
    bar[31:34, 8:57] = 255  # horizontal bar through the centre
    angles = []
    for _ in range(300):
        out = augmentation(Image.fromarray(bar), rng)[:, :, 0]
        ys, xs = np.nonzero(out > 0.5)
        cov = np.cov(np.stack([xs, -ys]))  # y up
        angle = math.degrees(0.5 * math.atan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))
        angles.append(angle)
    angles = np.abs(angles)  # flips mirror the sign of the angle
    assert angles.max() <= 26.5 and angles.max() > 22


def test_augmented_inputs_are_scaled_to_minus_one_one():
    preprocessing = Preprocessing(input_size=32)
    assert preprocessing.mean == (0.5,) and preprocessing.std == (0.5,)
    for name in ("none", "paper", "strong"):
        augmentation = make_augmentation(name, 32)
        image = Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (40, 1)))
        tensor = preprocessing.normalize(augmentation(image, np.random.default_rng(3)))
        assert tensor.shape == (1, 32, 32)
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    white = preprocessing(Image.new("L", (10, 10), 255))
    black = preprocessing(Image.new("L", (10, 10), 0))
    assert torch.all(white == 1.0) and torch.all(black == -1.0)


def test_strong_augmentation_varies_and_is_reproducible():
    augmentation = make_augmentation("strong", 48)
    assert isinstance(augmentation, StrongAugmentation)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60), dtype=np.uint8))
    a = augmentation(image, np.random.default_rng([5, 1]))
    b = augmentation(image, np.random.default_rng([5, 1]))
    c = augmentation(image, np.random.default_rng([5, 2]))
    assert a.shape == (48, 48, 1) and np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(FetalStudioError):
        make_augmentation("wild", 48)


# --- preprocessing -----------------------------------------------------------------------------
def test_letterbox_preprocessing_and_metadata_round_trip():
    preprocessing = Preprocessing(input_size=20, in_chans=1)
    wide = Image.new("L", (40, 20), 255)
    square = preprocessing.square(wide)
    array = np.asarray(square)
    assert square.size == (20, 20)
    assert array[0].max() == 0 and array[-1].max() == 0 and array[10].min() == 255  # black bars top/bottom
    details = {k.removeprefix("fetalstudio."): v for k, v in preprocessing.metadata().items()}
    assert Preprocessing.from_details(details) == preprocessing
    rgb = Preprocessing(input_size=8, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert rgb(Image.new("L", (5, 5), 128)).shape == (3, 8, 8)


# --- pretrained weights and checkpoints ----------------------------------------------------------
def test_pretrained_file_is_adapted_to_grayscale_and_checked(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("efficientnet_b0", pretrained=False)
    file = tmp_path / "effnet.pth"
    torch.save({"state_dict": source.state_dict()}, file)  # nested, as training scripts save it
    spec = ClassifierSpec("efficientnet_b0", Preprocessing(input_size=32))
    model, report = build_model(spec, file)
    assert report["tensors_loaded"] == report["backbone_tensors"]
    stem = source.state_dict()["conv_stem.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.state_dict()["conv_stem.weight"], stem)
    assert model.get_classifier().out_features == 5

    wrong = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(wrong))
    with pytest.raises(FetalStudioError, match="do not fit efficientnet_b0"):
        build_model(spec, wrong)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a weights file")
    with pytest.raises(FetalStudioError, match="--pretrained"):
        build_model(spec, broken)


def test_vit_pretrained_position_embeddings_are_resampled(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    file = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    from fetalstudio.classification.model import size_kwargs

    spec = ClassifierSpec("vit_tiny_patch16_224", Preprocessing(input_size=64), timm_kwargs=size_kwargs("vit_tiny_patch16_224", 64))
    assert spec.timm_kwargs == {"img_size": 64}
    model, report = build_model(spec, file)
    assert model.pos_embed.shape[1] == 1 + 16 and report["tensors_loaded"] == report["backbone_tensors"]
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 5)


def test_saved_checkpoint_predicts_through_model_manager(tmp_path, tmp_checkpoints, cpu_placement):
    from fetalstudio.models.manager import ModelManager

    spec = ClassifierSpec("resnet18", Preprocessing(input_size=32), tta="hflip")
    model, _ = build_model(spec)
    path = save_classifier(model, tmp_checkpoints / "clf.safetensors", spec, {"steps": 0}, dtype=torch.float16)
    assert read_spec(path).tta == "hflip"
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    assert "clf" in manager.ids()
    loaded = manager.get("clf")
    classifier = PlaneClassifier(loaded)
    assert classifier.hflip_tta and classifier.classes == PLANE_CLASSES
    probabilities = classifier.probabilities([Image.new("L", (50, 30), 90), Image.new("RGB", (30, 50), (10, 200, 30))])
    assert probabilities.shape == (2, 5) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert PlaneClassifier(loaded).predict([]) == []


# --- the bundled model ---------------------------------------------------------------------------
@pytest.mark.skipif(not BUNDLED.is_file(), reason="bundled plane classifier not trained yet")
@pytest.mark.skipif(not (SPANISH / "labels.csv").is_file(), reason="shared data not present")
def test_bundled_classifier_beats_chance_on_spanish_planes(tmp_checkpoints, cpu_placement):
    from fetalstudio.models.manager import ModelManager

    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    classifier = PlaneClassifier(manager.get(BUNDLED))
    assert classifier.classes == PLANE_CLASSES
    with (SPANISH / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = [r for plane in PLANE_CLASSES for r in [r for r in rows if r["plane"] == plane][:3]]
    images = [Image.open(SPANISH / r["filename"]) for r in chosen]
    top = classifier.top_k(images, k=1)
    accuracy = np.mean([t[0][0] == r["plane"] for t, r in zip(top, chosen)])
    assert accuracy > 0.4  # chance is 0.2 (5 planes)
