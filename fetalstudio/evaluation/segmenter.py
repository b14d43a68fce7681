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
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.cli_args import Command, output_folder
from fetalstudio.errors import FetalStudioError

BOX_MODES = ("exact", "jitter")
DEFAULT_JITTER_PX = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, action="append", required=True, help="image/mask pairs CSV (image, mask, optional pixel_size_mm, hc_mm); repeatable")
    parser.add_argument("--model", help="segmenter id or path (.safetensors segmenter or SAM .pth); default: the installed segmenter")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (summary.md, per_image.csv, summary.json)")
    parser.add_argument("--json", type=Path, help="also write the summary numbers to this JSON file")
    parser.add_argument("--box", choices=BOX_MODES, default="jitter", help="box prompt: the mask's exact bounding box or a jittered one")
    parser.add_argument("--jitter-px", type=float, default=DEFAULT_JITTER_PX, help="largest move of each box coordinate, original pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs of each CSV")


@dataclass(frozen=True)
class EvalItem:
    name: str  # image path relative to its CSV
    source: str  # the CSV's folder name, e.g. hc18_heads
    image: Path
    mask: Path
    pixel_size_mm: float | None = None
    hc_mm: float | None = None
    group: str = ""


def read_items(csv_path: Path, limit: int | None = None) -> list[EvalItem]:
    """The pairs of a segmentation CSV as evaluation items; missing files are a clear error."""
    from fetalstudio.data.tables import read_segmentation

    csv_path = Path(csv_path)
    pairs = read_segmentation(csv_path)
    if limit is not None:
        pairs = pairs[: max(0, limit)]
    missing = [p for pair in pairs for p in (pair.image, pair.mask) if not p.is_file()]
    if missing:
        raise FetalStudioError(
            f"{csv_path}: {len(missing)} listed image/mask file(s) do not exist, e.g. {missing[0]}. "
            "Paths in the image and mask columns are relative to the CSV's folder."
        )
    source = csv_path.resolve().parent.name
    return [
        EvalItem(
            name=pair.extra.get("image", pair.image.name), source=source, image=pair.image, mask=pair.mask,
            pixel_size_mm=pair.pixel_size_mm, hc_mm=pair.hc_mm, group=pair.group,
        )
        for pair in pairs
    ]


def load_example(item: EvalItem):
    """(grayscale uint8 image, filled boolean ground-truth mask), both at full resolution."""
    import numpy as np
    from PIL import Image

    from fetalstudio.imaging.ellipse import fill_outline

    try:
        with Image.open(item.image) as handle:
            image = np.asarray(handle.convert("L"))
        with Image.open(item.mask) as handle:
            mask = np.asarray(handle.convert("L"))
    except OSError as error:
        raise FetalStudioError(f"{item.image} or its mask {item.mask} could not be read as an image ({error}).") from error
    if image.shape != mask.shape:
        raise FetalStudioError(f"{item.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {item.image} is {image.shape[1]}x{image.shape[0]}; they must match.")
    filled = fill_outline(mask)
    if not filled.any():
        raise FetalStudioError(f"{item.mask} is empty: there is no head to evaluate against.")
    return image, filled


def prompt_box(item: EvalItem, mask, mode: str, jitter_px: float, seed: int):
    """The box prompt for an item: exact bounding box, or jittered reproducibly per image file name
    (the same image gets the same box whichever CSV lists it)."""
    import numpy as np

    from fetalstudio.imaging.ellipse import bounding_box, jitter_box

    box = bounding_box(mask)
    if mode == "exact":
        return tuple(float(v) for v in box)
    rng = np.random.default_rng([seed, zlib.crc32(item.image.name.encode("utf-8"))])  # keyed by file name
    return jitter_box(box, mask.shape[1], mask.shape[0], jitter_px, rng)


def evaluate_items(predictor, items: list[EvalItem], modes=("jitter",), jitter_px: float = DEFAULT_JITTER_PX, seed: int = 0,
                   cache: dict | None = None, progress=None) -> list[dict]:
    """One row per (item, box mode): Dice and HC for the model and the box-ellipse baseline.

    ``cache`` (a dict) keeps loaded examples between calls (training validates repeatedly).
    """
    from fetalstudio.imaging.ellipse import box_ellipse, dice, fit_ellipse, head_circumference_mm

    rows = []
    for index, item in enumerate(items):
        example = cache.get(item.image) if cache is not None else None
        if example is None:
            example = load_example(item)
            if cache is not None:
                cache[item.image] = example
        image, truth = example
        predictor.set_image(image)
        for mode in modes:
            box = prompt_box(item, truth, mode, jitter_px, seed)
            result = predictor.predict(box=box)
            baseline = box_ellipse(box).to_mask(truth.shape)
            row = {
                "image": item.name, "source": item.source, "box_mode": mode,
                "box": " ".join(f"{v:.1f}" for v in box), "dice": dice(result.mask, truth),
                "baseline_dice": dice(baseline, truth), "score": result.score,
                "hc_true_mm": item.hc_mm, "hc_pred_mm": None, "hc_error_mm": None, "baseline_hc_error_mm": None,
            }
            if item.hc_mm is not None and item.pixel_size_mm is not None:
                fitted = fit_ellipse(result.mask)
                predicted = head_circumference_mm(fitted, item.pixel_size_mm) if fitted is not None else 0.0
                row["hc_pred_mm"] = predicted
                row["hc_error_mm"] = predicted - item.hc_mm
                baseline_fit = fit_ellipse(baseline)
                baseline_hc = head_circumference_mm(baseline_fit, item.pixel_size_mm) if baseline_fit is not None else 0.0
                row["baseline_hc_error_mm"] = baseline_hc - item.hc_mm
            rows.append(row)
        if progress is not None:
            progress(index + 1, len(items))
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize(rows: list[dict]) -> dict:
    """Mean/std Dice, HC mean absolute error (and bias) for model and baseline over ``rows``."""
    dice_mean, dice_std = _mean_std([r["dice"] for r in rows])
    base_mean, base_std = _mean_std([r["baseline_dice"] for r in rows])
    errors = [r["hc_error_mm"] for r in rows if r["hc_error_mm"] is not None]
    base_errors = [r["baseline_hc_error_mm"] for r in rows if r["baseline_hc_error_mm"] is not None]
    hc_mae, hc_mae_std = _mean_std([abs(e) for e in errors])
    return {
        "n": len(rows),
        "dice_mean": dice_mean, "dice_std": dice_std, "dice_min": min((r["dice"] for r in rows), default=math.nan),
        "hc_n": len(errors), "hc_mae_mm": hc_mae, "hc_mae_std_mm": hc_mae_std,
        "hc_bias_mm": _mean_std(errors)[0],
        "baseline_dice_mean": base_mean, "baseline_dice_std": base_std,
        "baseline_hc_mae_mm": _mean_std([abs(e) for e in base_errors])[0],
    }


def summarize_by_source(rows: list[dict]) -> dict[str, dict]:
    sources = sorted({r["source"] for r in rows})
    return {source: summarize([r for r in rows if r["source"] == source]) for source in sources}


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
    from fetalstudio.evaluation.report import write_json, write_report
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
