"""`train classifier` data options: PATH=PLANE sources (head sets, image folders), pooled plane
balance, the refusal of African images, the fan crop recorded in the checkpoint, and the
domain-shift augmentation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.classification.predict import PLANE_CLASSES
from fetalstudio.cli import main
from fetalstudio.training.classifier import (MixtureSampler, Source, count_draws, load_sources, read_fixed_plane,
                                             split_fixed_plane)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED_DATA / "hc18_heads" / "pairs.csv").is_file(), reason="shared data not present")


def test_plane_after_an_equals_sign_is_split_off():
    assert split_fixed_plane("a/pairs.csv=brain", PLANE_CLASSES) == ("a/pairs.csv", "brain")
    assert split_fixed_plane("a/pairs.csv=Other", PLANE_CLASSES) == ("a/pairs.csv", "other")
    assert split_fixed_plane("a/x=y/labels.csv", PLANE_CLASSES) == ("a/x=y/labels.csv", None)
    assert split_fixed_plane("a/labels.csv", PLANE_CLASSES) == ("a/labels.csv", None)


@needs_data
def test_head_sets_and_folders_are_read_with_a_fixed_plane():
    hc18 = read_fixed_plane(SHARED_DATA / "hc18_heads" / "pairs.csv", "brain")
    assert len(hc18) == 805 and {i.plane for i in hc18} == {"brain"}
    assert all(i.path.is_file() and "annotations" not in i.path.parts for i in hc18)  # images, never the masks
    assert hc18[0].group  # subject_group kept
    es_folder = read_fixed_plane(SHARED_DATA / "es_heads", "brain")  # a folder is read through its pairs.csv
    assert len(es_folder) == 20 and all(i.path.parent.name == "images" for i in es_folder)
    anomalies = read_fixed_plane(SHARED_DATA / "brain_anomalies", "brain")  # labels.csv, filename column
    assert len(anomalies) == 87 and all(i.path.suffix == ".jpg" for i in anomalies)
    first_trimester = read_fixed_plane(SHARED_DATA / "first_trimester_structures" / "images.csv", "other")
    assert len(first_trimester) == 120 and all(i.path.is_file() for i in first_trimester)


def test_plain_image_folder_with_a_fixed_plane(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.jpg"):
        Image.new("L", (20, 20), 100).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    items = read_fixed_plane(tmp_path, "femur")
    assert sorted(i.path.name for i in items) == ["a.png", "b.jpg"] and {i.plane for i in items} == {"femur"}
    sources = load_sources([f"{tmp_path}=femur:0.5", f"{tmp_path}=thorax:0.5"], PLANE_CLASSES)
    assert [s.plane for s in sources] == ["femur", "thorax"] and [s.share for s in sources] == [0.5, 0.5]
    assert sources[0].labels == [PLANE_CLASSES.index("femur")] * 2
    assert sources[1].name.endswith("=thorax:0.5")


def test_african_images_are_refused_in_training_data(tmp_path, capsys):
    african = tmp_path / "african" / "train"
    african.mkdir(parents=True)
    Image.new("L", (20, 20), 100).save(african / "x.png")
    renamed = tmp_path / "elsewhere"
    renamed.mkdir()
    Image.new("L", (20, 20), 100).save(renamed / "patient001_GHA_plane1.png")
    for value in (f"{african}=brain", f"{renamed}=brain"):
        assert main(["train", "classifier", "--data", value, "--steps", "1", "--out", str(tmp_path / "out")]) == 2
        assert "must never be trained on" in capsys.readouterr().err


def test_pooled_sources_balance_the_planes_over_the_pool():
    """Two pooled sources: 2 images per plane, and 200 brain images; every plane drawn equally often."""
    small = Source(Path("a"), None, [None] * 10, [k for k in range(5) for _ in range(2)])
    heads = Source(Path("b"), None, [None] * 200, [1] * 200, plane="brain")
    sampler = MixtureSampler([small, heads], seed=3, balance=True)
    counts = count_draws(sampler, [small, heads], steps=300, batch_size=32, classes=PLANE_CLASSES)
    per_plane = {c: counts[0]["per_plane"][c] + counts[1]["per_plane"][c] for c in PLANE_CLASSES}
    assert max(per_plane.values()) / min(per_plane.values()) < 1.1
    assert counts[1]["per_plane"]["brain"] > 0.9 * per_plane["brain"]  # brain mostly from the large set
    unbalanced = count_draws(MixtureSampler([small, heads], seed=3, balance=False), [small, heads], 100, 32, PLANE_CLASSES)
    assert unbalanced[1]["total"] > 0.9 * 3200  # without balance every image is equally likely


@needs_data
def test_training_with_a_head_set_and_the_fan_crop(tmp_path):
    """A tiny run: Spanish planes (2 per plane) + 6 HC18 heads as brain, --crop fan, --augment domain;
    the checkpoint records the crop and the summary the fixed plane."""
    with (SHARED_DATA / "spanish_planes" / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = [r for plane in PLANE_CLASSES for r in [r for r in rows if r["plane"] == plane][:2]]
    table = tmp_path / "spanish.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "plane"])
        writer.writerows([str(SHARED_DATA / "spanish_planes" / r["filename"]), r["plane"]] for r in chosen)
    heads = tmp_path / "heads.csv"
    with heads.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image"])
        writer.writerows([str(p)] for p in sorted((SHARED_DATA / "hc18_heads" / "images").glob("*.png"))[:6])
    out = tmp_path / "run"
    code = main(["train", "classifier", "--data", str(table), "--data", f"{heads}=brain", "--crop", "fan",
                 "--augment", "domain", "--input-size", "32", "--batch-size", "4", "--steps", "2", "--threads", "1",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["plane"] for s in summary["sources"]] == [None, "brain"]
    assert summary["settings"]["crop"] == "fan"
    from fetalstudio.classification.model import read_spec

    assert read_spec(out / "model.safetensors").preprocessing.crop == "fan"
    # resuming with another crop is refused: the network was trained on other inputs
    assert main(["train", "classifier", "--data", str(table), "--input-size", "32", "--batch-size", "4",
                 "--steps", "3", "--threads", "1", "--out", str(out)]) == 2


def test_domain_augmentation_is_reproducible_and_in_range():
    from fetalstudio.classification.augment import make_augmentation

    augmentation = make_augmentation("domain", 48)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60), dtype=np.uint8))
    first = augmentation(image, np.random.default_rng(5))
    assert first.shape == (48, 48, 1) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert np.array_equal(first, augmentation(image, np.random.default_rng(5)))
    every = dict(zoom_out=(0.7, 0.5, 0.5), lowres=0.4, jpeg=30, text_seed=1, sector=(0.4, 0.0))
    params = {**augmentation.sample(np.random.default_rng(1)), **every}
    result = augmentation.apply(image, params)
    assert result.shape == (48, 48, 1)
    assert result[0, 0, 0] == 0.0  # the zoomed-out image leaves a black border; the sector mask blacks corners
