"""Scoring an automatic (prompt-free) head mask against the ground truth: Dice of the mask, Dice of
its fitted ellipse (filled), and the head-circumference error in mm; means with their standard
errors. Shared by `train head-unet`'s validation and `eval segmenter --box auto`, which measure the
mask as the Analysis workflow does (``fetalstudio.analysis.head.measure_head``) and pass its ellipse
and HC here.
"""

from __future__ import annotations

import math

import numpy as np

from fetalstudio.imaging.ellipse import Ellipse, dice
from fetalstudio.segmentation.scoring import EvalItem


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); NaN where undefined."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def head_row(item: EvalItem, truth: np.ndarray, mask: np.ndarray, ellipse: Ellipse | None, hc_pred_mm: float | None,
             score: float) -> dict:
    """One image's figures: Dice of ``mask`` and of ``ellipse`` (filled) against the filled ``truth``, and
    the HC error against the item's ``hc_mm`` (a missing measurement counts as HC 0)."""
    ellipse_mask = ellipse.to_mask(truth.shape) if ellipse is not None else np.zeros(truth.shape, bool)
    row = {"image": item.name, "source": item.source, "dice": dice(mask, truth), "ellipse_dice": dice(ellipse_mask, truth),
           "score": score, "hc_true_mm": item.hc_mm, "hc_pred_mm": None, "hc_error_mm": None}
    if item.hc_mm is not None and item.pixel_size_mm is not None:
        predicted = hc_pred_mm if hc_pred_mm is not None else 0.0
        row.update(hc_pred_mm=predicted, hc_error_mm=predicted - item.hc_mm)
    return row


def summarize_head_rows(rows: list[dict]) -> dict:
    """Mean Dice, ellipse Dice and HC mean absolute error with their standard errors, the worst Dice and the HC bias."""
    dice_mean, dice_se = mean_and_standard_error([r["dice"] for r in rows])
    ellipse_mean, ellipse_se = mean_and_standard_error([r["ellipse_dice"] for r in rows])
    errors = [r["hc_error_mm"] for r in rows if r["hc_error_mm"] is not None]
    mae, mae_se = mean_and_standard_error([abs(e) for e in errors])
    return {"n": len(rows), "dice_mean": dice_mean, "dice_se": dice_se, "dice_min": min((r["dice"] for r in rows), default=math.nan),
            "ellipse_dice_mean": ellipse_mean, "ellipse_dice_se": ellipse_se, "hc_n": len(errors), "hc_mae_mm": mae,
            "hc_mae_se_mm": mae_se, "hc_bias_mm": mean_and_standard_error(errors)[0]}


def summarize_head_rows_by_source(rows: list[dict]) -> dict[str, dict]:
    return {source: summarize_head_rows([r for r in rows if r["source"] == source]) for source in sorted({r["source"] for r in rows})}
