"""Scoring a box-prompted head segmenter on image/mask pairs: Dice and head-circumference error.

The ground truth's bounding box (exact, or each coordinate moved by up to ``jitter_px``, keyed by
file name so an image always gets the same box) prompts the predictor; the full-resolution mask
is scored against the filled ground truth, beside the baseline "ellipse inscribed in the box".
Used by ``eval segmenter`` and by ``train segmenter``'s validation.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.errors import FetalStudioError

BOX_MODES = ("exact", "jitter")
DEFAULT_JITTER_PX = 20.0


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
