"""`python -m fetalstudio train segmenter`: end to end on a few shared images (CPU, tiny sizes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fetalstudio.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HC18 = DATA / "hc18_heads"
pytestmark = pytest.mark.skipif(not (HC18 / "pairs.csv").is_file(), reason="shared data not found")


def write_pairs(path: Path, count: int, start: int = 0) -> Path:
    """``count`` shared HC18 pairs (absolute paths) as a pairs CSV of its own."""
    with (HC18 / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[start : start + count]
    for row in rows:
        row["image"], row["mask"] = str(HC18 / row["image"]), str(HC18 / row["mask"])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def pairs_csv(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.csv", 8)


def train(csv_path: Path, out: Path, steps: int, *extra: str) -> int:
    return main([
        "train", "segmenter", "--csv", str(csv_path), "--out", str(out), "--image-size", "64", "--batch-size", "2",
        "--steps", str(steps), "--eval-every", "2", "--val-fraction", "0.25", "--log-every", "1", "--threads", "1", *extra,
    ])


def logged_steps(out: Path) -> list[int]:
    with (out / "train_log.csv").open(newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def test_train_resume_and_load_through_the_model_manager(pairs_csv, tmp_path, tmp_checkpoints, cpu_placement, capsys):
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    out = tmp_path / "run"
    assert train(pairs_csv, out, 2) == 0
    for name in ("segmenter.safetensors", "model_card.md", "metrics.json", "train_log.csv", "val_per_image.csv", "run.json"):
        assert (out / name).is_file(), name
    assert list((out / "cache").glob("*.npz"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["finished"]
    assert sum(metrics["data"]["train_images"].values()) + sum(metrics["data"]["val_images"].values()) == 8
    source = pairs_csv.parent.name  # images are reported per CSV folder
    assert metrics["data"]["val_images"][source] >= 1
    assert metrics["data"]["held_out_groups"][source]
    assert metrics["device"].startswith("CPU")
    jitter = metrics["validation"]["jitter"]
    assert {"dice_mean", "hc_mae_mm", "baseline_dice_mean", "baseline_hc_mae_mm"} <= set(jitter)
    assert "box-ellipse" in (out / "model_card.md").read_text() or "baseline" in (out / "model_card.md").read_text()

    # interrupted (--stop-after), then continued, then extended with more steps
    assert train(pairs_csv, out, 4, "--stop-after", "1") == 0
    assert json.loads((out / "metrics.json").read_text())["step"] == 3
    assert train(pairs_csv, out, 4) == 0
    output = capsys.readouterr().out
    assert "resuming from step 2" in output and "resuming from step 3" in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["resumed_from"] == 3 and metrics["finished"]
    assert logged_steps(out) == [1, 2, 3, 4]

    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    entry = manager.entry(out / "segmenter.safetensors")
    assert entry.kind is ModelKind.SEGMENTER
    assert json.loads(entry.details["config"])["image_size"] == 64
    model = manager.get(out / "segmenter.safetensors")
    with Image.open(HC18 / "images" / "000_HC.png") as handle:
        image = np.asarray(handle.convert("L"))
    predictor = BoxPromptPredictor(model)
    predictor.set_image(image)
    result = predictor.predict(box=(300, 150, 500, 350))
    assert result.mask.shape == image.shape and result.mask.dtype == bool
    assert isinstance(result.score, float)
    result = predictor.predict(box=(300, 150, 500, 350), points=[[400, 250]])
    assert result.mask.shape == image.shape


def test_changed_settings_are_refused_on_resume(pairs_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(pairs_csv, out, 1, "--val-fraction", "0") == 0
    assert (out / "segmenter.safetensors").is_file()  # no validation: the last step is saved
    capsys.readouterr()
    assert main(["train", "segmenter", "--csv", str(pairs_csv), "--out", str(out), "--image-size", "96", "--steps", "2",
                 "--batch-size", "2", "--val-fraction", "0", "--threads", "1"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_sam_checkpoint_trains_only_the_mask_decoder(pairs_csv, tmp_path):
    from safetensors.torch import load_file

    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.inspect import inspect_path
    from fetalstudio.models.segmenter import VIT_DEFAULTS, build_segmenter, load_segmenter_file
    from fetalstudio.segmentation.model import save_sam_pth, small_config

    config = small_config(64, "vit", 32)
    config["encoder"] = {**VIT_DEFAULTS, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": [1]}
    torch.manual_seed(0)
    fake_sam = build_segmenter(config)
    sam_path = save_sam_pth(fake_sam, tmp_path / "sam_tiny.pth")
    inspection = inspect_path(sam_path)
    assert inspection.kind is ModelKind.SAM and inspection.details["variant"] == "custom"
    assert load_segmenter_file(sam_path).fetalstudio_config == config  # rebuilt from tensor shapes alone

    out = tmp_path / "run"
    assert train(pairs_csv, out, 2, "--sam-checkpoint", str(sam_path), "--save-dtype", "fp32", "--lr", "1e-2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["trained_encoder"] is False
    decoder_parameters = sum(p.numel() for p in fake_sam.mask_decoder.parameters())
    assert metrics["model"]["trainable_parameters"] == decoder_parameters
    trained = load_file(str(out / "segmenter.safetensors"))
    original = fake_sam.state_dict()
    frozen = [k for k in original if k.startswith(("image_encoder.", "prompt_encoder."))]
    assert frozen and all(torch.equal(trained[k], original[k]) for k in frozen)
    assert any(not torch.equal(trained[k], original[k]) for k in original if k.startswith("mask_decoder."))
    assert load_segmenter_file(out / "segmenter.safetensors").image_encoder.img_size == 64


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("filename,plane\na.png,brain\n")
    assert main(["train", "segmenter", "--csv", str(wrong), "--out", str(tmp_path / "a"), "--steps", "1"]) == 2
    assert "image, mask" in capsys.readouterr().err

    missing = tmp_path / "missing.csv"
    missing.write_text("image,mask\nnot_there.png,not_there_mask.png\n")
    assert main(["train", "segmenter", "--csv", str(missing), "--out", str(tmp_path / "b"), "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert "do not exist" in error and "not_there.png" in error

    assert main(["train", "segmenter", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "c"), "--steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
