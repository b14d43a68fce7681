"""`python -m fetalstudio train detector`: a few steps on a few shared first-trimester images (CPU,
tiny sizes): finite loss, weights that change, resume identical to an uninterrupted run, the
checkpoint through the model manager, and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_support import DATA
from fetalstudio.cli import main
from fetalstudio.data.structures import read_structures, split_structures

STRUCTURES = DATA / "first_trimester_structures"
pytestmark = pytest.mark.skipif(not (STRUCTURES / "boxes.csv").is_file(), reason="shared data not found")
TINY = ("--backbone", "resnet10t", "--input-size", "64", "--width", "8", "--batch-size", "2", "--val-every", "2",
        "--log-every", "1", "--threads", "1", "--save-every", "1")


def write_folder(folder: Path, items, rename: dict[str, str] | None = None) -> Path:
    """A structures folder of its own listing ``items`` by absolute path (boxes renamed by ``rename``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "images.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "width", "height"])
        writer.writerows([str(item.path), item.width, item.height] for item in items)
    with (folder / "boxes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "structure", "x_min", "y_min", "x_max", "y_max"])
        for item in items:
            writer.writerows([str(item.path), (rename or {}).get(name, name), *box] for name, *box in item.boxes)
    return folder


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """6 train-split and 2 validation-split images of the shared more/ folder."""
    items = read_structures(STRUCTURES / "more", include_more=False)
    return write_folder(tmp_path_factory.mktemp("structures"), split_structures(items, "train")[:6] + split_structures(items, "val")[:2])


def train(data: Path, out: Path, steps: int, *extra: str) -> int:
    return main(["train", "detector", "--data", str(data), "--out", str(out), "--steps", str(steps), *TINY, *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_resume_and_detect_through_the_model_manager(small_set, tmp_path, tmp_checkpoints, cpu_placement, capsys):
    from fetalstudio.detection.predict import StructureDetector
    from fetalstudio.models.detector import CenterNetDetector, DetectorConfig, build_detector
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager

    out = tmp_path / "run"
    assert train(small_set, out, 4, "--stop-after", "2") == 0  # interrupted after 2 of 4 steps
    for name in ("model.safetensors", "last.safetensors", "metrics.json", "README.md", "train_log.csv", "val_history.json", "run.json"):
        assert (out / name).is_file(), name
    with (out / "train_log.csv").open(newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and not metrics["finished"] and metrics["train_images"] == 6 and metrics["validation"]["images"] == 2
    selected = metrics["validation"]["selected"]
    assert set(selected["per_structure"]) == set(metrics["settings"]["classes"]) and len(metrics["settings"]["classes"]) == 9
    assert 0 <= selected["mean_iou"] <= 1 and "AP50" in (out / "README.md").read_text()
    after_two = weights(out / "last.safetensors")
    torch.manual_seed(1234)  # the run's --seed: the same initial weights
    initial = build_detector(DetectorConfig(tuple(metrics["settings"]["classes"]), "resnet10t", 64, 1, 8)).state_dict()
    changed = [key for key, value in after_two.items() if value.is_floating_point() and not torch.equal(value, initial[key])]
    assert any(key.startswith("heatmap.") for key in changed) and any(key.startswith("backbone.") for key in changed)

    # continued to 4 steps: the same weights as 4 steps in one go (batches and state restored)
    assert train(small_set, out, 4) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    resumed = weights(out / "last.safetensors")
    assert train(small_set, tmp_path / "straight", 4) == 0
    straight = weights(tmp_path / "straight" / "last.safetensors")
    for key, value in straight.items():
        assert torch.allclose(resumed[key].float(), value.float(), atol=1e-5), key
    assert not torch.equal(resumed["heatmap.2.weight"], after_two["heatmap.2.weight"])

    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    assert manager.entry(out / "model.safetensors").kind is ModelKind.DETECTOR
    model = manager.get(out / "model.safetensors")
    assert isinstance(model, CenterNetDetector)
    image = np.zeros((300, 500), np.uint8)
    image[100:200, 150:350] = 200
    for detection in StructureDetector(model).detect(image, score_threshold=0.0):
        assert 0 <= detection.x0 < detection.x1 <= 500 and 0 <= detection.y0 < detection.y1 <= 300


def test_bad_inputs_give_clear_errors(small_set, tmp_path, capsys):
    assert train(tmp_path / "nowhere", tmp_path / "a", 1) == 2
    assert "is not a folder" in capsys.readouterr().err

    items = read_structures(small_set)[:2]
    renamed = write_folder(tmp_path / "renamed", items, {"palate": "maxilla"})
    assert train(renamed, tmp_path / "b", 1) == 2
    error = capsys.readouterr().err
    assert "maxilla" in error and "facial_sagittal" in error

    assert train(small_set, tmp_path / "c", 1, "--input-size", "100") == 2
    assert "multiple of 32" in capsys.readouterr().err

    out = tmp_path / "d"
    assert train(small_set, out, 1) == 0
    assert train(small_set, out, 2, "--width", "16") == 2
    assert "other settings" in capsys.readouterr().err
