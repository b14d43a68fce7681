"""Evaluate a head segmenter: Dice per image and head-circumference error in mm, from a box prompt
or in the Analysis automatic mode (no prompt).

    python -m fetalstudio eval segmenter --csv ../shared/data/hc18_heads/pairs.csv \\
        --model bundled/fetalstudio-head-segmenter/segmenter --out outputs/eval-segmenter --json eval.json

--csv: a CSV with image and mask columns (paths relative to the CSV; masks are outline rings or
filled masks) and, for HC, pixel_size_mm and hc_mm. --model: a model id (`python -m fetalstudio
models`) or a path to a segmenter .safetensors or a SAM .pth (default: the installed segmenter).

The box prompt is the ground-truth mask's bounding box, exact (--box exact) or with every
coordinate moved by a uniform random 0-20 px (--box jitter, the default; --jitter-px, --seed; the
same image always gets the same box). The model's mask is made at full resolution (largest
region, holes filled); Dice is computed against the filled ground truth at full resolution, HC
from the ellipse fitted to the mask (Ramanujan perimeter x pixel size) against hc_mm.
Beside the model, every number is also given for the trivial baseline "filled ellipse inscribed
in the same box" (an exact-box evaluation says little: that baseline reaches Dice 0.98 there).

--box auto evaluates the Analysis automatic mode (``fetalstudio.analysis.segment.auto_head``, no
ground truth used): the head U-Net when one is installed (--head-model: an id or path, or `none` for
the candidate-box search with the box-prompted segmenter --model), its mask measured as the
Analysis tab measures it (ellipse extractor). Reported with standard errors, the Dice of the fitted
ellipse, the seconds per image, and the box-ellipse baseline of a jittered ground-truth box (what a
rough 0-20 px user box alone gives). --auto-refine hands the U-Net's mask box to the box-prompted
segmenter and keeps its mask instead.

Report folder: summary.md, per_image.csv, summary.json; --json FILE also writes
{"dice_mean", "dice_std", "hc_mae_mm", "n", ...} to FILE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fetalstudio.cli_args import Command, output_folder
from fetalstudio.errors import FetalStudioError
from fetalstudio.segmentation.scoring import BOX_MODES, DEFAULT_JITTER_PX, evaluate_items, read_items, summarize, summarize_by_source

AUTO = "auto"
#: --head-model value that turns the head U-Net off (the automatic mode then searches boxes).
NO_HEAD_MODEL = "none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, action="append", required=True, help="image/mask pairs CSV (image, mask, optional pixel_size_mm, hc_mm); repeatable")
    parser.add_argument("--model", help="segmenter id or path (.safetensors segmenter or SAM .pth); default: the installed segmenter")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (summary.md, per_image.csv, summary.json)")
    parser.add_argument("--json", type=Path, help="also write the summary numbers to this JSON file")
    parser.add_argument("--box", choices=(*BOX_MODES, AUTO), default="jitter",
                        help="box prompt: the mask's exact bounding box, a jittered one, or auto (the Analysis automatic mode, no prompt)")
    parser.add_argument("--head-model", help="head U-Net id or path, or 'none' (default: the installed head U-Net, if any). "
                                             "--box auto: the U-Net finds the head ('none': the candidate-box search). "
                                             "--box jitter/exact: as in the Analysis tab, the U-Net's map refines the "
                                             "box-prompted mask ('none': the box-prompted segmenter alone)")
    parser.add_argument("--auto-refine", action="store_true",
                        help="--box auto: prompt the box-prompted segmenter with the U-Net mask's box and keep its mask")
    parser.add_argument("--jitter-px", type=float, default=DEFAULT_JITTER_PX, help="largest move of each box coordinate, original pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs of each CSV")


def comparison_rows(summary: dict) -> list[dict]:
    """Model vs baseline as rows for a markdown table."""
    return [
        {"metric": "Dice, mean", "model": summary["dice_mean"], "box-ellipse baseline": summary["baseline_dice_mean"]},
        {"metric": "Dice, std", "model": summary["dice_std"], "box-ellipse baseline": summary["baseline_dice_std"]},
        {"metric": "HC error, mean absolute (mm)", "model": summary["hc_mae_mm"], "box-ellipse baseline": summary["baseline_hc_mae_mm"]},
        {"metric": "images", "model": summary["n"], "box-ellipse baseline": summary["n"]},
    ]


def evaluate_auto_items(predictor, items, jitter_px: float, seed: int, refine: bool, progress=None) -> list[dict]:
    """One row per item for the automatic mode (``auto_head`` on a ``CachedPredictor``): Dice of the
    mask and of its fitted ellipse, HC from the Analysis measurement, the seconds it took, and the
    baseline "ellipse inscribed in the jittered ground-truth box" (``prompt_box``, ``seed``)."""
    import time

    from fetalstudio.analysis.head import measure_head
    from fetalstudio.analysis.segment import auto_head
    from fetalstudio.imaging.ellipse import box_ellipse, dice, fit_ellipse, head_circumference_mm
    from fetalstudio.segmentation.head_scoring import head_row
    from fetalstudio.segmentation.scoring import load_example, prompt_box

    method = "head U-Net" if predictor.head_predictor() is not None else "box search"
    rows = []
    for index, item in enumerate(items):
        gray, truth = load_example(item)
        started = time.perf_counter()
        predictor.set_image(gray)
        box, prediction = auto_head(predictor, gray, refine)
        measurement = measure_head(prediction.mask, item.pixel_size_mm)
        seconds = time.perf_counter() - started
        hc_mm = measurement.biometry.hc_mm if measurement.biometry is not None else None
        row = head_row(item, truth, prediction.mask, measurement.ellipse, hc_mm, prediction.score)
        baseline_box = prompt_box(item, truth, "jitter", jitter_px, seed)
        baseline = box_ellipse(baseline_box).to_mask(truth.shape)
        row.update(box_mode=AUTO, method=method + (" + box-prompted segmenter" if refine and method == "head U-Net" else ""),
                   box=" ".join(f"{v:.1f}" for v in box), seconds=seconds, baseline_dice=dice(baseline, truth), baseline_hc_error_mm=None)
        if row["hc_error_mm"] is not None:
            row["baseline_hc_error_mm"] = head_circumference_mm(fit_ellipse(baseline), item.pixel_size_mm) - item.hc_mm
        rows.append(row)
        if progress is not None:
            progress(index + 1, len(items))
    return rows


class AnalysisBoxPredictor:
    """``evaluate_items``' predictor for the Analysis tab's box prompt: ``box_head`` on a ``CachedPredictor``
    (the box-prompted segmenter, refined by the head U-Net's map when both see the same head)."""

    def __init__(self, cached) -> None:
        self.cached = cached
        self.image = None
        self.prompts = 0
        self.fused = 0

    def set_image(self, image) -> None:
        self.cached.set_image(image)
        self.image = image

    def predict(self, box):
        from fetalstudio.analysis.segment import box_head

        prediction, fused = box_head(self.cached, self.image, box)
        self.prompts += 1
        self.fused += int(fused)
        return prediction


def _head_model(manager, value: str | None):
    """The head U-Net to evaluate --box auto with: --head-model's (None for 'none'), else the installed one."""
    from fetalstudio.analysis.segment import INSTALLED
    from fetalstudio.models.entries import ModelKind

    if value is None:
        return INSTALLED
    if value.strip().lower() == NO_HEAD_MODEL:
        return None
    entry = manager.entry(value)
    if entry.kind is not ModelKind.HEAD_SEGMENTER:
        raise FetalStudioError(f"--head-model {value}: '{entry.id}' is a {entry.kind.value} model, not a head U-Net "
                               "(kind head_segmenter); give one, or 'none'.")
    return manager.get(entry.id)


def run(args: argparse.Namespace) -> int:
    import time

    from fetalstudio.analysis.segment import CachedPredictor
    from fetalstudio.app_context import build_manager
    from fetalstudio.errors import ModelNotFoundError
    from fetalstudio.data.reports import write_json, write_report
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    if args.jitter_px < 0:
        raise FetalStudioError("--jitter-px must be 0 or more.")
    items = [item for csv_path in args.csv for item in read_items(csv_path, args.limit)]
    if not items:
        raise FetalStudioError(f"{', '.join(map(str, args.csv))} list no image/mask pairs to evaluate.")
    manager = build_manager()
    try:
        model_id = args.model or manager.default_id(ModelKind.SEGMENTER)
    except ModelNotFoundError:
        raise FetalStudioError(
            "No segmenter is installed. Give --model PATH (a segmenter .safetensors or a SAM .pth), or train one "
            "with `python -m fetalstudio train segmenter --csv PAIRS.csv --out DIR`."
        ) from None
    entry = manager.entry(model_id)
    if entry.kind not in (ModelKind.SEGMENTER, ModelKind.SAM):
        raise FetalStudioError(f"Model '{entry.id}' is a {entry.kind.value} model, not a segmenter; give a segmenter or SAM checkpoint.")

    def progress(done: int, total: int) -> None:
        if done % 25 == 0 or done == total:
            print(f"[{done}/{total}]", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with manager.use(model_id) as model:
        cached = CachedPredictor(BoxPromptPredictor(model), capacity=1, head_model=_head_model(manager, args.head_model),
                                 manager=manager)
        if args.box == AUTO:
            rows = evaluate_auto_items(cached, items, args.jitter_px, args.seed, args.auto_refine, progress=progress)
        else:
            box_predictor = AnalysisBoxPredictor(cached) if cached.head_predictor() is not None else cached.predictor
            rows = evaluate_items(box_predictor, items, (args.box,), args.jitter_px, args.seed, progress=progress)
    seconds = time.perf_counter() - started
    summary = summarize(rows)
    by_source = summarize_by_source(rows)
    result = {
        "dice_mean": summary["dice_mean"], "dice_std": summary["dice_std"], "hc_mae_mm": summary["hc_mae_mm"], "n": summary["n"],
        "hc_n": summary["hc_n"], "hc_bias_mm": summary["hc_bias_mm"],
        "baseline": {"dice_mean": summary["baseline_dice_mean"], "dice_std": summary["baseline_dice_std"], "hc_mae_mm": summary["baseline_hc_mae_mm"]},
        "box": args.box, "jitter_px": args.jitter_px if args.box == "jitter" else 0, "seed": args.seed,
        "model": entry.id, "csv": [str(p) for p in args.csv], "per_source": by_source, "seconds": round(seconds, 1),
    }
    if args.box == AUTO:
        result.update(_auto_figures(rows))
    else:
        with_unet = isinstance(box_predictor, AnalysisBoxPredictor)
        result["method"] = "box-prompted segmenter + head U-Net" if with_unet else "box-prompted segmenter"
        result["head_unet_fused_share"] = box_predictor.fused / max(box_predictor.prompts, 1) if with_unet else 0.0
    if args.box == AUTO:
        box_text = f"none: the automatic mode ({result['method']}); baseline box jittered as --box jitter (seed {args.seed})"
    else:
        box_text = f"jittered ({args.jitter_px:g} px at most per coordinate, seed {args.seed})" if args.box == "jitter" else "exact bounding box"
    method_line = ""
    if args.box != AUTO:
        method_line = f"- method: {result['method']}"
        if with_unet:
            method_line += (f" (as in the Analysis tab; the U-Net's map refined {result['head_unet_fused_share']:.0%} of the masks; "
                            "`--head-model none` scores the box-prompted segmenter alone)")
        method_line += "\n"
    setup = (
        f"- model: `{entry.id}` ({entry.kind.value}, {entry.format.value})\n"
        f"- data: {', '.join(f'`{p}`' for p in args.csv)} ({len(items)} images)\n"
        f"- box prompt: {box_text} of the filled ground-truth mask\n"
        f"{method_line}"
        f"- time: {seconds:.1f} s"
    )
    notes = (
        "Dice: model mask (full resolution, largest region, holes filled) vs the filled ground truth. "
        "HC: perimeter (Ramanujan) of the ellipse fitted to the mask's contour x pixel size, vs `hc_mm`; "
        "an empty mask counts as HC 0. Baseline: the filled axis-aligned ellipse inscribed in the same box."
    ) if args.box != AUTO else (
        "Dice: the automatic mode's mask (full resolution, largest region, holes filled) vs the filled ground truth. "
        "HC: the Analysis measurement (the ellipse extractor's fit to the mask, Ramanujan perimeter x pixel size) vs "
        "`hc_mm`; no mask counts as HC 0. Baseline: the filled axis-aligned ellipse inscribed in the ground truth's "
        "bounding box with every coordinate moved by up to --jitter-px (a rough user box; --seed)."
    )
    per_source = [{"source": s, "n": v["n"], "dice": v["dice_mean"], "baseline dice": v["baseline_dice_mean"],
                   "HC MAE mm": v["hc_mae_mm"], "baseline HC MAE mm": v["baseline_hc_mae_mm"]} for s, v in by_source.items()]
    sections = {"Setup": setup, "Results": comparison_rows(summary), "Per source": per_source, "Notes": notes}
    if args.box == AUTO:
        sections["Automatic mode"] = _auto_rows(result)
    write_report(args.out, "Segmenter evaluation", sections, csv_files={"per_image.csv": rows}, json_files={"summary.json": result})
    if args.json:
        write_json(args.json, result)
    print(f"Dice {summary['dice_mean']:.4f} +- {summary['dice_std']:.4f}, HC MAE {summary['hc_mae_mm']:.2f} mm over {summary['n']} images "
          f"(box-ellipse baseline: Dice {summary['baseline_dice_mean']:.4f}, HC MAE {summary['baseline_hc_mae_mm']:.2f} mm); report in {args.out}", flush=True)
    return 0


def _auto_figures(rows: list[dict]) -> dict:
    """The automatic mode's extra figures: standard errors, ellipse Dice, the method and the time per image."""
    from fetalstudio.segmentation.head_scoring import summarize_head_rows, summarize_head_rows_by_source

    head = summarize_head_rows(rows)
    times = sorted(r["seconds"] for r in rows)
    return {"method": rows[0]["method"], "dice_se": head["dice_se"], "dice_min": head["dice_min"], "hc_mae_se_mm": head["hc_mae_se_mm"],
            "ellipse_dice_mean": head["ellipse_dice_mean"], "ellipse_dice_se": head["ellipse_dice_se"],
            "seconds_per_image_mean": sum(times) / len(times), "seconds_per_image_median": times[len(times) // 2],
            "per_source_auto": summarize_head_rows_by_source(rows)}


def _auto_rows(result: dict) -> list[dict]:
    return [{"figure": "Dice, mean ± standard error", "value": f"{result['dice_mean']:.4f} ± {result['dice_se']:.4f}"},
            {"figure": "Dice of the fitted ellipse (filled)", "value": f"{result['ellipse_dice_mean']:.4f} ± {result['ellipse_dice_se']:.4f}"},
            {"figure": "worst Dice", "value": f"{result['dice_min']:.3f}"},
            {"figure": "HC mean absolute error (mm) ± standard error", "value": f"{result['hc_mae_mm']:.2f} ± {result['hc_mae_se_mm']:.2f}"},
            {"figure": "seconds per image (mean / median; encoder, automatic mode and measurement)",
             "value": f"{result['seconds_per_image_mean']:.2f} / {result['seconds_per_image_median']:.2f}"}]


COMMAND = Command("segmenter", "Dice per image and HC error in mm", add_arguments, run, description=__doc__.strip())
