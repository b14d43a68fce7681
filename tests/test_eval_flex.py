"""``eval flex``: the metrics on known arrays, the edit-fidelity bookkeeping on a real layout, and the
command end to end on real validation images with a tiny generator, ControlNet and detector."""

import json
import math

import numpy as np
import pytest
import torch

from fetalstudio.cli import main
from fetalstudio.evaluation.flex_metrics import (
    bounding_crop, hidden_structure, ms_ssim, ms_ssim_levels, outside_max_abs_diff, psnr, reconstruction_scores,
)
from tests.anatomy_support import STRUCTURES, needs_structures, real_layout
from tests.synthesis_support import CONTROLNET_ID, MODEL_ID, build_flex_model_folder

DETECTOR_FILE = "detectors/tiny_detector.safetensors"


def smooth_image(seed: int = 0, shape=(180, 200)) -> np.ndarray:
    import cv2

    noise = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    return cv2.GaussianBlur(noise, (9, 9), 3)


# --- metrics -----------------------------------------------------------------------------------------
def test_psnr_of_identical_and_shifted_images_and_over_a_mask():
    image = smooth_image()
    assert psnr(image, image) == math.inf
    shifted = image.astype(np.int16) + 10  # every pixel 10 brighter: MSE 100
    assert psnr(image, shifted) == pytest.approx(10 * math.log10(255 ** 2 / 100))
    mask = np.zeros(image.shape, bool)
    mask[20:40, 30:70] = True
    partly = image.astype(np.int16)
    partly[mask] += 20  # only the masked pixels differ
    assert psnr(image, partly, mask) == pytest.approx(10 * math.log10(255 ** 2 / 400))
    assert psnr(image, partly) == pytest.approx(10 * math.log10(255 ** 2 / (400 * mask.mean())))


def test_ms_ssim_uses_the_librarys_five_scales_on_large_images_and_fewer_exactly_on_small_ones():
    from pytorch_msssim import ms_ssim as library_ms_ssim
    from pytorch_msssim import ssim as library_ssim

    real = smooth_image()
    noisy = np.clip(real.astype(int) + np.random.default_rng(1).integers(-25, 25, real.shape), 0, 255).astype(np.uint8)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32) / 255)[None, None]  # noqa: E731
    value, levels = ms_ssim(real, noisy)
    assert levels == 5 and value == pytest.approx(float(library_ms_ssim(as_tensor(real), as_tensor(noisy), data_range=1.0)), abs=1e-6)
    assert ms_ssim(real, real) == (pytest.approx(1.0), 5)
    # the scale rule: side > 10 * 2^(L-1) for L scales (pytorch_msssim's > 160 px for 5)
    assert [ms_ssim_levels(s, 300) for s in (10, 11, 21, 41, 81, 160, 161)] == [0, 1, 2, 3, 4, 4, 5]
    # one scale is plain SSIM of the crop as it is (no resampling)
    small_real, small_noisy = real[:18, :15], noisy[:18, :15]
    value, levels = ms_ssim(small_real, small_noisy)
    assert levels == 1 and value == pytest.approx(float(library_ssim(as_tensor(small_real), as_tensor(small_noisy), data_range=1.0)), abs=1e-6)
    assert math.isnan(ms_ssim(real[:10, :50], noisy[:10, :50])[0])


def test_roi_only_scores_are_taken_on_the_rois_bounding_crop():
    real = smooth_image(2)
    generated = real.copy()
    roi = np.zeros(real.shape, bool)
    roi[50:91, 60:130] = True
    generated[roi] = 255 - generated[roi]
    assert bounding_crop(roi) == (60, 50, 130, 91)
    scores = reconstruction_scores(real, generated, roi)
    crop = (slice(50, 91), slice(60, 130))
    assert scores["psnr_roi"] == pytest.approx(psnr(real[crop], generated[crop]))
    assert scores["psnr_roi"] < scores["psnr"]  # the unchanged background raises the whole-image figure
    assert scores["ms_ssim_roi_levels"] == 3 and scores["ms_ssim_levels"] == 5  # a 41 px high crop fits 3 scales (> 40)
    assert scores["ms_ssim_roi"] < scores["ms_ssim"]
    assert scores["roi_pixels"] == 41 * 70 and scores["roi_crop"] == "60,50,130,91"
    assert outside_max_abs_diff(real, generated, roi) == 0 and outside_max_abs_diff(real, generated, ~roi) == np.abs(255 - 2 * real[roi].astype(int)).max()


def test_hidden_structure_is_one_of_the_images_and_fixed_by_seed_and_name():
    names = ["thalami", "palate", "nasal_bone", "midbrain"]
    picks = {hidden_structure(names, seed, f"images/{i}.png") for seed in range(3) for i in range(20)}
    assert picks <= set(names) and len(picks) > 1
    assert hidden_structure(names, 4, "images/7.png") == hidden_structure(list(reversed(names)), 4, "images/7.png")


@needs_structures
def test_preset_rows_count_removed_kept_and_moved_structures_against_their_boxes():
    from fetalstudio.anatomy.presets import load_presets
    from fetalstudio.evaluation.flex_metrics import preset_image_row, summarise_presets

    before = real_layout()
    catalog = load_presets()
    after = catalog.get("absent_nasal_bone").apply(before)
    box = lambda b: (b.structure, b.x0, b.y0, b.x1, b.y1, 0.9)  # noqa: E731
    on_real = [box(b) for b in before.boxes]  # a perfect detector on the real image
    nasal = before.box("nasal_bone")
    # on the edited image: the nasal bone still found where it was, thalami lost, the rest found
    edited = [box(b) for b in before.boxes if b.structure != "thalami"]
    known = {b.structure for b in before.boxes}
    row = preset_image_row(before, after, on_real, edited, known)
    assert row["removed"] == ["nasal_bone"] and "nasal_bone" not in row["kept"] and len(row["kept"]) == 8
    assert row["removed_detected"] == [True] and row["removed_detected_real"] == [True]
    assert sum(row["kept_detected"]) == 7 and all(row["kept_detected_real"])
    # a nasal-bone box far from the old one does not count as the removed structure detected (IoU < 0.5)
    moved = [d for d in edited if d[0] != "nasal_bone"] + [("nasal_bone", 0, 0, nasal.width, nasal.height, 0.9)]
    assert preset_image_row(before, after, on_real, moved, known)["removed_detected"] == [False]

    scaled = catalog.get("increased_nt").apply(before)
    row_nt = preset_image_row(before, scaled, on_real, on_real, known)  # detector still sees the old NT box
    assert row_nt["removed"] == [] and row_nt["modified"] == ["nuchal_translucency"]
    assert row_nt["iou_old"] == [1.0] and row_nt["iou_new"][0] == pytest.approx(0.5)  # height doubled
    rows = [{"preset": "absent_nasal_bone", "outside_roi_max_abs_diff": 0, **row},
            {"preset": "increased_nt", "outside_roi_max_abs_diff": 0, **row_nt}]
    summary = summarise_presets(["absent_nasal_bone", "increased_nt"], rows, {})
    assert summary["absent_nasal_bone"]["removed_detected_rate"] == 1.0
    assert summary["absent_nasal_bone"]["kept_detected_rate"] == pytest.approx(7 / 8)
    assert summary["increased_nt"]["removed_detected_rate"] is None  # nothing removed: not applicable
    assert summary["increased_nt"]["kept_detected_rate"] == 1.0


# --- the command -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    from fetalstudio.models.detector import CenterNetDetector, DetectorConfig, save_detector
    from fetalstudio.vocabulary import FACIAL_SAGITTAL, structures_for

    root = build_flex_model_folder(tmp_path_factory.mktemp("models"))
    torch.manual_seed(0)
    config = DetectorConfig(classes=tuple(s.name for s in structures_for(FACIAL_SAGITTAL)), backbone="resnet10t", input_size=64, width=8)
    save_detector(CenterNetDetector(config), root / DETECTOR_FILE)
    return root


@pytest.fixture()
def tiny_models(models_root, tmp_checkpoints, monkeypatch):
    monkeypatch.setenv("FETALSTUDIO_MODELS", str(models_root))
    monkeypatch.setenv("FETALSTUDIO_DEVICE", "cpu")
    return models_root


def _eval(out, *extra):
    return ["eval", "flex", "--data", str(STRUCTURES), "--limit", "2", "--steps", "2", "--size", "64", "--roi-margin", "4",
            "--model", MODEL_ID, "--controlnet", CONTROLNET_ID, "--lora", "none", "--detector", "detectors/tiny_detector",
            "--out", str(out), *extra]


@needs_structures
def test_eval_flex_writes_the_report_and_the_headline_json(tiny_models, tmp_path, capsys):
    from fetalstudio.data.structures import read_structures, split_structures
    from fetalstudio.evaluation.flex import select_items

    out, summary = tmp_path / "report", tmp_path / "flex.json"
    presets = "absent_nasal_bone,increased_nt,cleft_palate"
    assert main(_eval(out, "--presets", presets, "--json", str(summary))) == 0
    headline = json.loads(summary.read_text())
    assert headline["n_images"] == 2
    for stage in ("ddim", "ssa", "ssa_osm"):
        figures = headline[stage]
        for key in ("psnr", "ms_ssim", "psnr_roi", "ms_ssim_roi", "layout_miou"):
            assert isinstance(figures[key], float) and math.isfinite(figures[key]), (stage, key)
        assert 0 < figures["ms_ssim"] <= 1 and figures["psnr"] > figures["psnr_roi"]  # the background is exact
        assert set(figures["union_roi"]) == {"psnr", "ms_ssim", "psnr_roi", "ms_ssim_roi"}
    assert math.isfinite(headline["real"]["layout_miou"])
    assert set(headline["presets"]) == set(presets.split(","))
    for name, figures in headline["presets"].items():
        assert figures["n_images"] >= 1, name
        assert figures["outside_roi_max_abs_diff"] == 0, name  # measured on every edited image
        assert math.isfinite(figures["kept_detected_rate"])
    assert math.isfinite(headline["presets"]["absent_nasal_bone"]["removed_detected_rate"])
    assert headline["anchors"]["fetalflex_ssa"] == {"psnr": 26.27, "ms_ssim": 0.937}
    settings = headline["settings"]
    assert settings["split"] == "val" and settings["size"] == 64 and settings["stages"] == ["ddim", "ssa", "ssa+osm"]

    # only validation images, the two the seed draws
    validation = {item.path.resolve() for item in split_structures(read_structures(STRUCTURES), "val")}
    chosen = select_items(STRUCTURES, "val", 2, 0)
    assert {item.path.resolve() for item in chosen} <= validation
    import csv

    with (out / "reconstruction.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    keys = {item.path.resolve().relative_to(STRUCTURES.resolve()).as_posix() for item in chosen}
    assert {row["image"] for row in rows} == keys
    assert len(rows) == 2 * 2 * 3  # images x ROIs x stages
    assert all(row["outside_roi_max_abs_diff"] == "0" for row in rows)
    assert {row["roi"] for row in rows} == {"structure", "all_boxes"}
    for name in ("report.md", "layout_fidelity.csv", "presets.csv", "summary.json", "reconstruction_structure.png",
                 "reconstruction_all_boxes.png", "presets.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "26.27" in report and "Edit fidelity per preset" in report and "absent_nasal_bone" in report
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_images"] == 2 and set(printed) >= {"ddim", "ssa", "ssa_osm", "real"}


@needs_structures
def test_the_ssa_image_reused_from_ssa_osm_equals_a_separate_ssa_run(tiny_models):
    """eval flex takes SSA's image from the SSA+OSM run's stage 1; that is only right if they are identical."""
    from PIL import Image

    from fetalstudio.anatomy.flex import FlexOptions, flex_settings, run_flex
    from fetalstudio.anatomy.roi import structures_roi
    from fetalstudio.app_context import build_manager
    from fetalstudio.data.structures import read_structures

    item = read_structures(STRUCTURES, include_more=False)[0]
    from fetalstudio.evaluation.flex import load_image

    image = load_image(item, STRUCTURES, 64, "facial_sagittal", 0)
    manager = build_manager()
    settings = flex_settings(manager, image.layout, steps=2, seed=3, model=MODEL_ID)
    roi = structures_roi(image.layout, ["palate"], 4)
    source = Image.fromarray(image.gray, "L")
    options = {"controlnet": CONTROLNET_ID, "lora": ""}
    alone = run_flex(manager, settings, source, image.layout, roi, FlexOptions(stage="ssa", **options))
    both = run_flex(manager, settings, source, image.layout, roi, FlexOptions(stage="ssa+osm", **options))
    assert np.array_equal(np.asarray(alone.final), np.asarray(both.stage1))
    assert not np.array_equal(np.asarray(both.final), np.asarray(both.stage1))


@needs_structures
@pytest.mark.parametrize("case, message", [
    ("no_boxes", "boxes.csv does not exist"),
    ("limit_zero", "--limit: must be at least 1"),
    ("unknown_stage", "unknown stage repaint"),
    ("not_a_detector", "not a structure detector"),
    ("unknown_preset", "Unknown preset 'no_such_preset'"),
])
def test_bad_input_is_a_clear_error_with_exit_2(tiny_models, tmp_path, capsys, case, message):
    out = tmp_path / "report"
    if case == "no_boxes":
        folder = tmp_path / "structures"
        folder.mkdir()
        (folder / "images.csv").write_text("image,width,height\n")
        argv = _eval(out) + ["--data", str(folder)]
    elif case == "limit_zero":
        argv = _eval(out) + ["--limit", "0"]
    elif case == "unknown_stage":
        argv = _eval(out) + ["--stages", "ddim,repaint"]
    elif case == "not_a_detector":
        argv = _eval(out) + ["--detector", CONTROLNET_ID]
    else:
        argv = _eval(out) + ["--presets", "no_such_preset"]
    if case == "limit_zero":  # argparse refuses the value: exit 2 through SystemExit
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
    else:
        assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert not (out / "report.md").exists()
