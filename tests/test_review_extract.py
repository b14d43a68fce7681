"""The Ellipse Extractor (fetalstudio.imaging.extract) and `python -m fetalstudio extract`.

Real annotations (every hc18_heads and es_heads outline, including the ones that leave the frame),
synthetic noisy mask channels with a known ellipse, failure reasons, thresholds and the CLI.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.biometry import head_biometry
from fetalstudio.imaging.ellipse import Ellipse, fill_holes, fill_outline
from fetalstudio.imaging.extract import Extraction, as_mask_channel, extract_ellipse, extract_from_file
from fetalstudio.review.extract_cli import COMMAND, ELLIPSE_COLUMNS

REPO = Path(__file__).resolve().parents[1]
try:
    from tests.data_support import DATA, OUT_OF_FRAME, needs_data, pairs_rows as _rows
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, OUT_OF_FRAME, needs_data, pairs_rows as _rows


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


# --------------------------------------------------------------------------- real annotations


@pytest.fixture(scope="module")
def shared_results() -> dict:
    """One pass over all 825 shared masks: small per-mask numbers only."""
    results = {}
    for dataset in ("hc18_heads", "es_heads"):
        records = []
        for row in _rows(dataset):
            outline = cv2.imread(str(DATA / dataset / row["mask"]), cv2.IMREAD_GRAYSCALE)
            extraction = extract_ellipse(outline)
            closed = row["outline_closed_in_frame"] == "1"
            record = {"name": Path(row["image"]).stem, "closed": closed, "ok": extraction.ok,
                      "reason": extraction.reason, "kind": extraction.kind, "quality": extraction.quality,
                      "shape_ok": extraction.mask.shape == outline.shape and extraction.mask.dtype == bool,
                      "iou_fill_outline": _iou(extraction.mask, fill_outline(outline)),
                      "filled_fraction": float(extraction.mask.mean()), "ellipse": extraction.ellipse}
            if closed:
                record["iou_hole_fill"] = _iou(extraction.mask, fill_holes(outline))
            if row.get("hc_mm") and extraction.ok:
                hc = head_biometry(extraction.ellipse, float(row["pixel_size_mm"])).hc_mm
                record["hc_error_mm"] = hc - float(row["hc_mm"])
            records.append(record)
        results[dataset] = records
    return results


@needs_data
@pytest.mark.parametrize("dataset, count", [("hc18_heads", 805), ("es_heads", 20)])
def test_every_shared_outline_comes_out_as_its_filled_ellipse(shared_results, dataset, count):
    records = shared_results[dataset]
    assert len(records) == count
    failed = [(r["name"], r["reason"]) for r in records if not r["ok"]]
    assert not failed
    assert all(r["shape_ok"] for r in records)
    assert {r["kind"] for r in records} == {"outline"}
    ious = [r["iou_fill_outline"] for r in records]
    assert min(ious) >= 0.97, f"min IoU {min(ious):.4f} vs fill_outline"
    assert np.mean(ious) >= 0.99
    hole_ious = [r["iou_hole_fill"] for r in records if r["closed"]]
    assert min(hole_ious) >= 0.97, f"min IoU {min(hole_ious):.4f} vs the hole-filled ring"
    assert min(r["quality"] for r in records) >= 0.95


@needs_data
@pytest.mark.parametrize("dataset", ["hc18_heads", "es_heads"])
def test_outlines_leaving_the_frame_give_a_sensible_ellipse(shared_results, dataset):
    records = {r["name"]: r for r in shared_results[dataset]}
    for name in OUT_OF_FRAME[dataset]:
        record = records[name]
        assert record["ok"] and not record["closed"]
        assert record["iou_fill_outline"] >= 0.99
        assert 0.2 < record["filled_fraction"] < 0.9
        ellipse = record["ellipse"]
        assert 0.5 < min(ellipse.axis_a, ellipse.axis_b) / max(ellipse.axis_a, ellipse.axis_b) <= 1.0


@needs_data
def test_head_circumference_matches_hc18_reference(shared_results):
    errors = np.abs([r["hc_error_mm"] for r in shared_results["hc18_heads"]])
    assert len(errors) == 805
    assert errors.mean() < 1.0
    assert errors.mean() < 0.05  # outline-pixel fit: HC18's own definition of the ellipse
    assert errors.max() < 0.5


@needs_data
def test_filled_real_masks_give_the_same_ellipse():
    """A filled annotation (the usual case after review) is fitted on its contour, border points left out."""
    for dataset, name in [("hc18_heads", "000_HC"), ("hc18_heads", "186_HC"), ("es_heads", "Patient00830_Plane3_3_of_3")]:
        row = next(r for r in _rows(dataset) if Path(r["image"]).stem == name)
        filled = fill_outline(cv2.imread(str(DATA / dataset / row["mask"]), cv2.IMREAD_GRAYSCALE))
        extraction = extract_ellipse(filled.astype(np.uint8) * 255)
        assert extraction.ok and extraction.kind == "filled"
        assert _iou(extraction.mask, filled) >= 0.98
        if row.get("hc_mm"):
            hc = head_biometry(extraction.ellipse, float(row["pixel_size_mm"])).hc_mm
            assert abs(hc - float(row["hc_mm"])) < 1.0


# --------------------------------------------------------------------------- synthetic noisy masks


def _noisy_mask(seed: int, shape=(540, 800), value=200, touching_blob=False) -> tuple[np.ndarray, Ellipse]:
    """A generated-looking mask channel: a filled ellipse at ``value`` with a soft edge, holes,
    separate small blobs, salt-and-pepper speckle and Gaussian noise."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    truth = Ellipse(rng.uniform(0.4, 0.6) * cols, rng.uniform(0.4, 0.6) * rows,
                    rng.uniform(0.2, 0.3) * rows, rng.uniform(0.13, 0.2) * rows, rng.uniform(0, 180))
    inside = truth.to_mask(shape)
    channel = cv2.GaussianBlur(inside.astype(np.float32) * value, (0, 0), 3)
    for _ in range(6):  # holes inside the head
        offset = rng.uniform(-0.5, 0.5, 2) * truth.axis_b
        cv2.circle(channel, (int(truth.center_x + offset[0]), int(truth.center_y + offset[1])), int(rng.integers(3, 10)), 0, -1)
    far = ~cv2.dilate(inside.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
    ys, xs = np.nonzero(far)
    for index in rng.choice(len(xs), 5, replace=False):  # small blobs away from the head
        cv2.circle(channel, (int(xs[index]), int(ys[index])), int(rng.integers(2, 9)), value, -1)
    if touching_blob:  # a blob merged with the head's edge
        t, theta = rng.uniform(0, 2 * np.pi), np.radians(truth.angle_deg)
        u, v = truth.axis_a * np.cos(t), truth.axis_b * np.sin(t)
        edge = (truth.center_x + u * np.cos(theta) - v * np.sin(theta), truth.center_y + u * np.sin(theta) + v * np.cos(theta))
        cv2.circle(channel, (int(edge[0]), int(edge[1])), 14, value, -1)
    speckle = rng.random(shape)
    channel[speckle < 0.01] = 255
    channel[speckle > 0.99] = 0
    channel += rng.normal(0, 10, shape).astype(np.float32)
    return np.clip(channel, 0, 255).astype(np.uint8), truth


def _major_minor_angle(ellipse: Ellipse) -> tuple[float, float, float]:
    if ellipse.axis_a >= ellipse.axis_b:
        return ellipse.axis_a, ellipse.axis_b, ellipse.angle_deg % 180
    return ellipse.axis_b, ellipse.axis_a, (ellipse.angle_deg + 90) % 180


@pytest.mark.parametrize("seed, touching_blob", [(0, False), (1, False), (2, False), (3, False), (4, True), (5, True)])
def test_noisy_generated_mask_recovers_the_drawn_ellipse(seed, touching_blob):
    channel, truth = _noisy_mask(seed, touching_blob=touching_blob)
    extraction = extract_ellipse(channel)
    assert extraction.ok, extraction.reason
    found = extraction.ellipse
    assert np.hypot(found.center_x - truth.center_x, found.center_y - truth.center_y) <= 2.0
    (major, minor, angle), (true_major, true_minor, true_angle) = _major_minor_angle(found), _major_minor_angle(truth)
    assert abs(major / true_major - 1) <= 0.03 and abs(minor / true_minor - 1) <= 0.03
    if true_minor / true_major < 0.9:
        assert min(abs(angle - true_angle), 180 - abs(angle - true_angle)) <= 3.0
    assert _iou(extraction.mask, truth.to_mask(channel.shape)) >= 0.95
    assert 0.8 <= extraction.quality <= 1.0
    assert extraction.kind == "filled"


def test_colour_pair_uses_the_given_mask_channel():
    """An image+mask pair: the mask in red, a bright image in green/blue (the max would be wrong)."""
    channel, truth = _noisy_mask(7)
    image = np.full(channel.shape, 230, np.uint8)
    image[:, :40] = 20
    rgb = np.dstack([channel, image, image])
    extraction = extract_ellipse(rgb, channel=0)
    assert extraction.ok and _iou(extraction.mask, truth.to_mask(channel.shape)) >= 0.95
    assert not extract_ellipse(rgb).ok  # the max over channels is mostly the image


def test_head_cut_by_the_frame_is_fitted_without_border_points():
    truth = Ellipse(120.0, 256.0, 150.0, 110.0, 10.0)  # runs out of the left edge
    extraction = extract_ellipse(truth.to_mask((512, 512)))
    assert extraction.ok
    assert abs(extraction.ellipse.center_x - truth.center_x) < 1.5
    assert abs(max(extraction.ellipse.axis_a, extraction.ellipse.axis_b) - 150.0) < 2.0


# --------------------------------------------------------------------------- inputs and failures


@pytest.mark.parametrize("make", [
    lambda m: m,
    lambda m: m.astype(np.uint8),
    lambda m: m.astype(np.uint8) * 255,
    lambda m: m.astype(np.float32),
    lambda m: np.dstack([m.astype(np.uint8) * 255] * 3),
    lambda m: m.astype(np.uint8)[..., None] * 255,
])
def test_accepts_bool_01_uint8_float_and_colour_masks(make):
    truth = Ellipse(100.0, 90.0, 50.0, 35.0, 30.0)
    extraction = extract_ellipse(make(truth.to_mask((180, 200))))
    assert extraction.ok and _iou(extraction.mask, truth.to_mask((180, 200))) >= 0.97


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 4, 4), np.uint8), "2-D"),
    (np.zeros(10, np.uint8), "2-D"),
    (np.zeros((10, 10, 2), np.uint8), "channels"),
    (np.zeros((1, 10), np.uint8), "too small"),
    (np.full((10, 10), 300, np.int32), "0..255"),
    (np.full((10, 10), np.nan), "NaN"),
    (np.array([["a"] * 4] * 4), "numeric"),
])
def test_wrong_shapes_and_types_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        extract_ellipse(bad)


def test_bad_threshold_and_channel_are_value_errors():
    mask = np.zeros((20, 20), np.uint8)
    for threshold in (-1, 255, 1.5, "127", True):
        with pytest.raises(ValueError, match="threshold"):
            extract_ellipse(mask, threshold)
    with pytest.raises(ValueError, match="channel"):
        extract_ellipse(np.zeros((20, 20, 3), np.uint8), channel=3)


def _assert_failure(extraction: Extraction, *words: str) -> None:
    assert not extraction.ok and extraction.ellipse is None
    assert not extraction.mask.any() and extraction.quality == 0.0
    for word in words:
        assert word in extraction.reason, extraction.reason


def test_empty_white_tiny_and_streak_masks_say_why():
    shape = (200, 300)
    _assert_failure(extract_ellipse(np.zeros(shape, np.uint8)), "empty")
    _assert_failure(extract_ellipse(np.full(shape, 255, np.uint8)), "whole frame", "raise the threshold")
    tiny = np.zeros(shape, np.uint8)
    cv2.circle(tiny, (150, 100), 3, 255, -1)
    _assert_failure(extract_ellipse(tiny), "px", "lower the threshold")
    streak = np.zeros(shape, np.uint8)
    cv2.rectangle(streak, (10, 90), (290, 115), 255, -1)
    _assert_failure(extract_ellipse(streak), "axis ratio")
    speckle = (np.random.default_rng(0).random(shape) < 0.02).astype(np.uint8) * 255
    _assert_failure(extract_ellipse(speckle), "threshold")


def test_threshold_decides_a_faint_mask():
    faint = Ellipse(150.0, 100.0, 60.0, 45.0, 0.0).to_mask((200, 300)).astype(np.uint8) * 100
    at_default = extract_ellipse(faint)
    _assert_failure(at_default, "no pixel above threshold 127", "brightest is 100", "lower the threshold")
    assert at_default.threshold == 127
    lowered = extract_ellipse(faint, 80)
    assert lowered.ok and lowered.threshold == 80
    assert lowered.as_dict()["threshold"] == 80


def test_as_dict_is_json_ready():
    values = extract_ellipse(Ellipse(150.0, 100.0, 60.0, 45.0, 20.0).to_mask((200, 300))).as_dict()
    assert json.loads(json.dumps(values)) == values
    assert {"center_x", "center_y", "axis_a", "axis_b", "angle_deg", "quality", "reason", "threshold"} <= set(values)
    assert values["reason"] is None and abs(values["center_x"] - 150) < 1
    failed = extract_ellipse(np.zeros((20, 20), bool)).as_dict()
    assert failed["center_x"] is None and failed["reason"]


def test_extract_from_file_reads_rgb_in_rgb_order(tmp_path):
    channel, truth = _noisy_mask(8, shape=(256, 256))
    rgb = np.dstack([np.zeros_like(channel), channel, np.full_like(channel, 90)])
    path = tmp_path / "pair.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert extract_from_file(path, channel=1).ok
    assert not extract_from_file(path, channel=0).ok
    assert as_mask_channel(rgb, 2).max() == 90
    with pytest.raises(FileNotFoundError):
        extract_from_file(tmp_path / "missing.png")


# --------------------------------------------------------------------------- CLI


def _small_csv(folder: Path, names=("000_HC", "001_HC", "186_HC", "002_HC", "346_HC")) -> Path:
    rows = [r for r in _rows("hc18_heads") if Path(r["image"]).stem in names]
    assert len(rows) == len(names)
    (folder / "annotations").mkdir(parents=True)
    for row in rows:
        shutil.copy(DATA / "hc18_heads" / row["mask"], folder / row["mask"])
    path = folder / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "pixel_size_mm", "hc_mm"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _run(argv: list[str]) -> int:
    """The extract handler through its own parser, with FetalStudioError as exit code 2 (as cli.main)."""
    parser = argparse.ArgumentParser()
    COMMAND.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except FetalStudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


@needs_data
def test_cli_writes_masks_table_and_summary(tmp_path, capsys):
    csv_path = _small_csv(tmp_path / "data")
    out, summary_path = tmp_path / "out", tmp_path / "summary.json"
    assert _run(["extract", "--csv", str(csv_path), "--out", str(out), "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert {"hc_mae_mm", "n", "failed"} <= set(summary)
    assert summary["n"] == 5 and summary["failed"] == 0 and summary["hc_n"] == 5
    assert summary["hc_mae_mm"] < 1.0
    with (out / "ellipses.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == ELLIPSE_COLUMNS
    assert np.mean([abs(float(r["hc_error_mm"])) for r in rows]) == pytest.approx(summary["hc_mae_mm"], rel=1e-4)
    for row in rows:
        assert row["ok"] == "1" and row["reason"] == ""
        written = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
        source = cv2.imread(str(csv_path.parent / row["file"]), cv2.IMREAD_GRAYSCALE)
        assert written.shape == source.shape and set(np.unique(written)) <= {0, 255}
        assert Path(row["mask"]).stem == Path(row["file"]).stem
        assert _iou(written > 0, fill_outline(source)) >= 0.99
        assert float(row["bpd_mm"]) < float(row["ofd_mm"])


@needs_data
def test_cli_on_all_hc18_reports_hc_mae_below_1mm(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(["extract", "--csv", str(DATA / "hc18_heads" / "pairs.csv"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 805 and summary["failed"] == 0 and summary["hc_n"] == 805
    assert summary["hc_mae_mm"] < 1.0


@needs_data
def test_cli_user_errors_exit_2_with_a_message(tmp_path, capsys):
    csv_path = _small_csv(tmp_path / "data", names=("000_HC",))
    out = str(tmp_path / "out")
    no_mask_column = tmp_path / "no_mask.csv"
    no_mask_column.write_text("image,pixel_size_mm\nimages/000_HC.png,0.07\n", encoding="utf-8")
    assert _run(["extract", "--csv", str(no_mask_column), "--out", out]) == 2
    assert "mask" in capsys.readouterr().err
    assert _run(["extract", "--csv", str(tmp_path / "none.csv"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run(["extract", "--csv", str(csv_path), "--out", out, "--threshold", "300"]) == 2
    assert "--threshold" in capsys.readouterr().err
    (csv_path.parent / "annotations" / "000_HC_Annotation.png").write_bytes(b"not a png")
    assert _run(["extract", "--csv", str(csv_path), "--out", out]) == 2
    assert "could not" in capsys.readouterr().err
    (csv_path.parent / "annotations" / "000_HC_Annotation.png").unlink()
    assert _run(["extract", "--csv", str(csv_path), "--out", out]) == 2
    assert "do not exist" in capsys.readouterr().err


@needs_data
def test_cli_failed_masks_are_listed_not_written(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    cv2.imwrite(str(folder / "blank.png"), np.zeros((100, 120), np.uint8))
    cv2.imwrite(str(folder / "head.png"), Ellipse(60.0, 50.0, 40.0, 30.0, 0.0).to_mask((100, 120)).astype(np.uint8) * 255)
    (folder / "pairs.csv").write_text("image,mask\nx.png,blank.png\ny.png,head.png\n", encoding="utf-8")
    assert _run(["extract", "--csv", str(folder / "pairs.csv"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["failed"] == 1 and summary["hc_mae_mm"] is None
    assert summary["failures"][0]["file"] == "blank.png" and "empty" in summary["failures"][0]["reason"]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["head.png"]


@needs_data
def test_cli_subprocess_once_registered(tmp_path):
    """`python -m fetalstudio extract` end to end (skipped until cli.py registers the command)."""
    csv_path = _small_csv(tmp_path / "data", names=("000_HC", "186_HC"))
    command = [sys.executable, "-m", "fetalstudio", "extract", "--csv", str(csv_path), "--out", str(tmp_path / "out"),
               "--json", str(tmp_path / "s.json")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode == 2 and "invalid choice: 'extract'" in done.stderr:
        pytest.skip("`extract` is not registered in fetalstudio/cli.py yet")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["n"] == 2 and summary["failed"] == 0 and summary["hc_mae_mm"] < 1.0
