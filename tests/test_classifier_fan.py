"""The classifier's crop to the ultrasound sector (``fetalstudio.classification.fan``) on real
images of every shared source, on drawn screens (pixel-level), and through checkpoint metadata."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fetalstudio.classification.fan import fan_crop, find_fan
from fetalstudio.classification.predict import Preprocessing
from fetalstudio.errors import FetalStudioError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
needs_data = pytest.mark.skipif(not (SHARED_DATA / "spanish_planes" / "labels.csv").is_file(), reason="shared data not present")


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def _drawn_screen() -> tuple[Image.Image, np.ndarray, tuple[int, int, int, int]]:
    """A 400 x 300 black screen: a speckled fan (polygon) and white text at the top-right corner."""
    rng = np.random.default_rng(0)
    fan = Image.new("L", (400, 300), 0)
    polygon = [(150, 20), (250, 20), (330, 260), (70, 260)]
    ImageDraw.Draw(fan).polygon(polygon, fill=1)
    inside = np.asarray(fan).astype(bool)
    pixels = np.where(inside, rng.integers(30, 200, (300, 400)), 0).astype(np.uint8)
    screen = Image.fromarray(pixels)
    text_box = (340, 5, 398, 40)
    ImageDraw.Draw(screen).text((342, 8), "17/20\n15Hz", fill=255)
    return screen, inside, text_box


def test_drawn_screen_keeps_the_fan_and_blacks_out_text():
    screen, inside, (x0, y0, x1, y1) = _drawn_screen()
    original = np.asarray(screen)
    assert (original[y0:y1, x0:x1] > 200).sum() > 20  # the text is there
    region = find_fan(original)
    assert region.found
    assert region.mask[inside].all()  # every fan pixel kept
    assert not region.mask[y0:y1, x0:x1].any()  # the text is outside the sector
    left, top, right, bottom = region.box
    assert 60 <= left <= 75 and 5 <= top <= 20 and 325 <= right <= 340 and 260 <= bottom <= 275
    cropped = np.asarray(fan_crop(screen))
    assert cropped.shape == (bottom - top, right - left)
    same = original[top:bottom, left:right]
    kept = region.mask[top:bottom, left:right]
    assert np.array_equal(cropped[kept], same[kept])  # pixel for pixel inside the sector
    assert cropped[~kept].max() == 0  # black outside


def test_blank_and_tiny_images_are_returned_unchanged():
    blank = Image.new("L", (200, 100), 0)
    assert np.array_equal(np.asarray(fan_crop(blank)), np.asarray(blank))
    tiny = Image.new("L", (10, 10), 90)
    assert fan_crop(tiny).size == (10, 10)
    flat = Image.new("L", (300, 200), 120)  # no background at all: the whole image is the sector
    assert fan_crop(flat).size == (300, 200)


def test_rgb_and_other_modes_are_kept_or_converted():
    screen, _, _ = _drawn_screen()
    rgb = fan_crop(screen.convert("RGB"))
    assert rgb.mode == "RGB"
    assert np.array_equal(np.asarray(rgb)[:, :, 0], np.asarray(fan_crop(screen)))
    assert fan_crop(screen.convert("I;16")).mode == "L"


@needs_data
@pytest.mark.parametrize("name", ["abdomen/Patient00305_Plane2_1_of_2.png", "thorax/Patient00841_Plane6_2_of_2.png",
                                  "femur/Patient00680_Plane5_1_of_1.png"])
def test_spanish_screens_lose_their_corner_text(name):
    """FETAL_PLANES_DB screens: the scanner text in the top-right corner lies outside the sector."""
    gray = _gray(SHARED_DATA / "spanish_planes" / name)
    height, width = gray.shape
    corner = (slice(0, int(0.12 * height)), slice(int(0.85 * width), width))
    text = gray[corner] > 180
    assert text.sum() > 500  # burnt-in text is there
    region = find_fan(gray)
    assert not (region.mask[corner] & text).any()
    left, top, right, bottom = region.box
    cropped = np.asarray(fan_crop(Image.fromarray(gray)))
    expected = np.where(region.mask, gray, 0)[top:bottom, left:right]
    assert np.array_equal(cropped, expected)  # so none of the corner text is left


@needs_data
@pytest.mark.parametrize("folder, pattern", [
    ("spanish_planes", "*/*.png"), ("african/train", "*.png"), ("hc18_heads/images", "*.png"),
    ("es_heads/images", "*.png"), ("first_trimester_structures/images", "*.png"), ("brain_anomalies", "*/*.jpg"),
])
def test_real_images_of_every_source_keep_their_centre_and_most_tissue(folder, pattern):
    """On 12 images of each source the sector contains the image centre (where the anatomy is) and
    at least 90 % of the bright tissue pixels (the worst of every third Spanish, African and HC18
    image: 88 %, a zoomed HC18 sector whose dim lower corner is cut); the crop never keeps under a
    sixth of the image."""
    paths = sorted((SHARED_DATA / folder).glob(pattern))[::7][:12]
    assert paths
    for path in paths:
        gray = _gray(path)
        region = find_fan(gray)
        height, width = gray.shape
        assert region.mask[height // 2, width // 2], path.name
        assert region.mask.mean() >= 1 / 6, path.name
        # tissue = pixels well above the screen's background (grey in brain_anomalies), minus thin
        # text strokes (an opening removes those)
        tissue = gray > np.percentile(gray, 2) + 60
        import cv2

        tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_OPEN, np.ones((9, 9), np.uint8)).astype(bool)
        if tissue.sum():
            assert region.mask[tissue].mean() >= 0.9, path.name


@needs_data
def test_african_crops_keep_most_of_the_frame():
    """The African images are crops of the sector already: the fan crop keeps most of each."""
    with (SHARED_DATA / "african" / "train" / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[::10]
    kept = []
    for row in rows:
        region = find_fan(_gray(SHARED_DATA / "african" / "train" / row["filename"]))
        left, top, right, bottom = region.box
        kept.append((right - left) * (bottom - top) / region.mask.size)
    assert np.median(kept) > 0.9


# --- preprocessing and checkpoints --------------------------------------------------------------
def test_fan_crop_is_part_of_the_preprocessing_and_its_metadata():
    preprocessing = Preprocessing(input_size=64, in_chans=1, crop="fan")
    details = {k.removeprefix("fetalstudio."): v for k, v in preprocessing.metadata().items()}
    assert details["crop"] == "fan"
    assert Preprocessing.from_details(details) == preprocessing
    old = {k: v for k, v in details.items() if k != "crop"}  # a checkpoint from before the crop existed
    assert Preprocessing.from_details(old).crop == "none"
    with pytest.raises(FetalStudioError, match="crop mode"):
        Preprocessing(crop="sector")
    screen, _, _ = _drawn_screen()
    expected = Preprocessing(input_size=64, in_chans=1).square(fan_crop(screen))
    assert np.array_equal(np.asarray(preprocessing.square(screen)), np.asarray(expected))
    assert preprocessing(screen).shape == (1, 64, 64)


def test_saved_fan_checkpoint_predicts_with_the_crop(tmp_path, tmp_checkpoints, cpu_placement):
    import torch

    from fetalstudio.classification.model import ClassifierSpec, build_model, read_spec, save_classifier
    from fetalstudio.classification.predict import PlaneClassifier
    from fetalstudio.models.manager import ModelManager

    torch.manual_seed(0)
    spec = ClassifierSpec("resnet18", Preprocessing(input_size=32, in_chans=1, crop="fan"))
    model, _ = build_model(spec, zero_head=False)
    path = save_classifier(model, tmp_checkpoints / "fan-model.safetensors", spec)
    assert read_spec(path).preprocessing.crop == "fan"
    loaded = ModelManager(tmp_checkpoints, placement=cpu_placement).get(str(path))
    classifier = PlaneClassifier(loaded)
    assert classifier.preprocessing.crop == "fan"
    screen, _, _ = _drawn_screen()
    by_hand = PlaneClassifier(loaded, Preprocessing(input_size=32, in_chans=1)).probabilities([fan_crop(screen)])
    assert np.allclose(classifier.probabilities([screen]), by_hand, atol=1e-6)


def test_bundled_checkpoints_without_the_crop_key_still_load():
    from fetalstudio.classification.model import read_spec
    from fetalstudio.models.inspect import read_safetensors_header

    path = CHECKPOINTS / "bundled" / "fetalstudio-plane-classifier-real-only" / "model.safetensors"
    if not path.is_file():
        pytest.skip("bundled real-only classifier not present")
    _, metadata = read_safetensors_header(path)
    assert "fetalstudio.crop" not in metadata  # written before the crop existed
    spec = read_spec(path)
    assert spec.preprocessing.crop == "none" and spec.preprocessing.input_size == 128
