"""Evaluate a box-prompted head segmenter: Dice per image and head-circumference error in mm.

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, action="append", required=True, help="image/mask pairs CSV (image, mask, optional pixel_size_mm, hc_mm); repeatable")
    parser.add_argument("--model", help="segmenter id or path (.safetensors segmenter or SAM .pth); default: the installed segmenter")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (summary.md, per_image.csv, summary.json)")
    parser.add_argument("--json", type=Path, help="also write the summary numbers to this JSON file")
    parser.add_argument("--box", choices=BOX_MODES, default="jitter", help="box prompt: the mask's exact bounding box or a jittered one")
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


def run(args: argparse.Namespace) -> int:
    import time

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
        rows = evaluate_items(BoxPromptPredictor(model), items, (args.box,), args.jitter_px, args.seed, progress=progress)
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
    box_text = f"jittered ({args.jitter_px:g} px at most per coordinate, seed {args.seed})" if args.box == "jitter" else "exact bounding box"
    setup = (
        f"- model: `{entry.id}` ({entry.kind.value}, {entry.format.value})\n"
        f"- data: {', '.join(f'`{p}`' for p in args.csv)} ({len(items)} images)\n"
        f"- box prompt: {box_text} of the filled ground-truth mask\n"
        f"- time: {seconds:.1f} s"
    )
    notes = (
        "Dice: model mask (full resolution, largest region, holes filled) vs the filled ground truth. "
        "HC: perimeter (Ramanujan) of the ellipse fitted to the mask's contour x pixel size, vs `hc_mm`; "
        "an empty mask counts as HC 0. Baseline: the filled axis-aligned ellipse inscribed in the same box."
    )
    per_source = [{"source": s, "n": v["n"], "dice": v["dice_mean"], "baseline dice": v["baseline_dice_mean"],
                   "HC MAE mm": v["hc_mae_mm"], "baseline HC MAE mm": v["baseline_hc_mae_mm"]} for s, v in by_source.items()]
    write_report(args.out, "Segmenter evaluation", {"Setup": setup, "Results": comparison_rows(summary), "Per source": per_source, "Notes": notes},
                 csv_files={"per_image.csv": rows}, json_files={"summary.json": result})
    if args.json:
        write_json(args.json, result)
    print(f"Dice {summary['dice_mean']:.4f} +- {summary['dice_std']:.4f}, HC MAE {summary['hc_mae_mm']:.2f} mm over {summary['n']} images "
          f"(box-ellipse baseline: Dice {summary['baseline_dice_mean']:.4f}, HC MAE {summary['baseline_hc_mae_mm']:.2f} mm); report in {args.out}", flush=True)
    return 0


COMMAND = Command("segmenter", "Dice per image and HC error in mm", add_arguments, run, description=__doc__.strip())
