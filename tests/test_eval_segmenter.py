"""`python -m fetalstudio eval segmenter` and the shared report writer."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fetalstudio.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BUNDLED = ROOT / "checkpoints" / "bundled" / "fetalstudio-head-segmenter" / "segmenter.safetensors"
needs_data = pytest.mark.skipif(not (DATA / "hc18_heads" / "pairs.csv").is_file(), reason="shared data not found")


def _tiny_segmenter(path: Path) -> Path:
    import torch

    from fetalstudio.models.segmenter import build_segmenter
    from fetalstudio.segmentation.model import save_segmenter, small_config

    torch.manual_seed(0)
    return save_segmenter(build_segmenter(small_config(64)), path, extra_metadata={"note": "random weights for tests"})


def _read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@needs_data
@pytest.mark.skipif(not BUNDLED.is_file(), reason="bundled segmenter not trained yet")
def test_bundled_segmenter_segments_shared_heads(tmp_path, tmp_checkpoints):
    report, summary_json = tmp_path / "report", tmp_path / "eval.json"
    assert main(["eval", "segmenter", "--csv", str(DATA / "hc18_heads" / "pairs.csv"), "--csv", str(DATA / "es_heads" / "pairs.csv"),
                 "--limit", "3", "--model", str(BUNDLED), "--out", str(report), "--json", str(summary_json)]) == 0
    result = json.loads(summary_json.read_text())
    assert result["n"] == 6 and result["hc_n"] == 3
    assert result["dice_mean"] > 0.8
    assert result["hc_mae_mm"] < 15
    assert set(result["per_source"]) == {"hc18_heads", "es_heads"}
    assert (report / "summary.md").read_text().count("baseline") >= 1
    rows = _read_rows(report / "per_image.csv")
    assert len(rows) == 6 and all(0 <= float(r["dice"]) <= 1 for r in rows)


HEAD_UNET = ROOT / "checkpoints" / "bundled" / "fetalstudio-head-unet" / "head_unet.safetensors"


@needs_data
@pytest.mark.skipif(not (BUNDLED.is_file() and HEAD_UNET.is_file()), reason="bundled segmenter or head U-Net missing")
def test_box_prompts_are_scored_as_the_analysis_tab_runs_them_with_the_head_unet(tmp_path, tmp_checkpoints):
    """With a head U-Net, `--box jitter` scores the Analysis tab's box prompt (the two models' maps combined);
    `--head-model none` scores the box-prompted segmenter alone."""
    csv_path = str(DATA / "hc18_heads" / "pairs.csv")
    results = {}
    for head in (str(HEAD_UNET), "none"):
        out = tmp_path / ("with" if head != "none" else "alone")
        assert main(["eval", "segmenter", "--csv", csv_path, "--limit", "3", "--model", str(BUNDLED), "--head-model", head,
                     "--out", str(out), "--json", str(out.with_suffix(".json"))]) == 0
        results[head] = json.loads(out.with_suffix(".json").read_text())
    combined, alone = results[str(HEAD_UNET)], results["none"]
    assert combined["method"] == "box-prompted segmenter + head U-Net" and combined["head_unet_fused_share"] == 1.0
    assert alone["method"] == "box-prompted segmenter" and alone["head_unet_fused_share"] == 0.0
    assert combined["dice_mean"] > alone["dice_mean"] > 0.9
    assert "refined 100% of the masks" in (tmp_path / "with" / "summary.md").read_text()
    with_rows, alone_rows = _read_rows(tmp_path / "with" / "per_image.csv"), _read_rows(tmp_path / "alone" / "per_image.csv")
    assert [r["box"] for r in with_rows] == [r["box"] for r in alone_rows]  # the same prompts


@needs_data
def test_default_model_exact_and_jittered_boxes(tmp_path, tmp_checkpoints):
    _tiny_segmenter(tmp_checkpoints / "tiny-segmenter.safetensors")  # the only segmenter: the default
    csv_path = DATA / "hc18_heads" / "pairs.csv"
    outputs = {}
    for mode in ("exact", "jitter"):
        report = tmp_path / mode
        assert main(["eval", "segmenter", "--csv", str(csv_path), "--limit", "2", "--out", str(report), "--box", mode]) == 0
        outputs[mode] = _read_rows(report / "per_image.csv")
        summary = json.loads((report / "summary.json").read_text())
        assert summary["model"] == "tiny-segmenter" and summary["box"] == mode and summary["n"] == 2
        assert {"dice_mean", "dice_std", "hc_mae_mm", "n", "baseline"} <= set(summary)
    assert [r["box"] for r in outputs["exact"]] != [r["box"] for r in outputs["jitter"]]
    # exact box: the box-ellipse baseline is close to the truth on HC18 heads
    assert all(float(r["baseline_dice"]) > 0.9 for r in outputs["exact"])
    again = tmp_path / "again"
    assert main(["eval", "segmenter", "--csv", str(csv_path), "--limit", "2", "--out", str(again)]) == 0
    assert [r["box"] for r in _read_rows(again / "per_image.csv")] == [r["box"] for r in outputs["jitter"]]  # reproducible


def test_clear_errors(tmp_path, tmp_checkpoints, capsys):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("filename,plane\na.png,brain\n")
    assert main(["eval", "segmenter", "--csv", str(wrong), "--out", str(tmp_path / "r")]) == 2
    assert "image, mask" in capsys.readouterr().err

    missing = tmp_path / "missing.csv"
    missing.write_text("image,mask\nnot_there.png,not_there_mask.png\n")
    assert main(["eval", "segmenter", "--csv", str(missing), "--out", str(tmp_path / "r")]) == 2
    assert "do not exist" in capsys.readouterr().err

    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(image)
    Image.new("L", (32, 32)).save(tmp_path / "a_mask.png")
    present = tmp_path / "present.csv"
    present.write_text("image,mask\na.png,a_mask.png\n")
    assert main(["eval", "segmenter", "--csv", str(present), "--out", str(tmp_path / "r")]) == 2  # empty checkpoints folder
    assert "No segmenter is installed" in capsys.readouterr().err


def test_predictor_argument_errors():
    import numpy as np
    import torch

    from fetalstudio.errors import FetalStudioError
    from fetalstudio.models.segmenter import build_segmenter
    from fetalstudio.segmentation.model import small_config
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    torch.manual_seed(0)
    predictor = BoxPromptPredictor(build_segmenter(small_config(64)).eval())
    with pytest.raises(FetalStudioError, match="set_image"):
        predictor.predict(box=(1, 1, 10, 10))
    predictor.set_image(np.zeros((50, 70), np.uint8))
    assert predictor.original_size == (50, 70)
    with pytest.raises(FetalStudioError, match="box"):
        predictor.predict()
    with pytest.raises(FetalStudioError, match="x_max >= x_min"):
        predictor.predict(box=(10, 10, 5, 20))
    assert predictor.predict(box=(5, 5, 40, 30)).mask.shape == (50, 70)


def test_report_writer(tmp_path):
    from fetalstudio.data.reports import markdown_table, write_report

    rows = [{"image": "a|b.png", "dice": 0.91234567, "hc": None}, {"image": "c.png", "dice": math.nan, "extra": 3}]
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| image | dice | hc | extra |"
    assert "a\\|b.png" in table and "0.9123" in table and "n/a" in table
    summary = write_report(tmp_path / "rep", "Title", {"Numbers": rows, "Notes": "plain *markdown*"},
                           csv_files={"rows.csv": rows}, json_files={"s.json": {"x": math.nan, "y": [1.5, math.inf]}})
    text = summary.read_text()
    assert text.startswith("# Title") and "## Numbers" in text and "plain *markdown*" in text
    assert json.loads((tmp_path / "rep" / "s.json").read_text()) == {"x": None, "y": [1.5, None]}
    assert _read_rows(tmp_path / "rep" / "rows.csv")[1] == {"image": "c.png", "dice": "nan", "hc": "", "extra": "3"}
