"""The numbers of ``eval flex`` (no model or file access): PSNR, MS-SSIM with as many scales as an
image allows, ROI crops, which structure to hide, whether a structure is detected, and the per-preset
and per-stage summaries.

Images are 8-bit grayscale (H, W) arrays; PSNR uses a peak of 255, MS-SSIM a data range of 1.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from fetalstudio.detection.metrics import IOU_THRESHOLD, box_iou

#: pytorch_msssim's five scale weights (Wang et al. 2003) and its Gaussian window.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_WINDOW = 11


def psnr(real: np.ndarray, generated: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB (peak 255) over all pixels or those of ``mask``; inf when equal."""
    a, b = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR of images of different shapes {a.shape} and {b.shape}")
    difference = (a - b) if mask is None else (a - b)[np.asarray(mask, bool)]
    if difference.size == 0:
        return math.nan
    mse = float(np.mean(difference ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ms_ssim_levels(height: int, width: int, window: int = MS_SSIM_WINDOW) -> int:
    """How many MS-SSIM scales fit an image: scale L (1-5) needs the smaller side above
    (window - 1) * 2^(L - 1), pytorch_msssim's own rule for its 5 scales (> 160 px at window 11);
    0 when not even one fits (side 10 px or less)."""
    side = min(height, width)
    levels = 0
    while levels < len(MS_SSIM_WEIGHTS) and side > (window - 1) * 2 ** levels:
        levels += 1
    return levels


def ms_ssim(real: np.ndarray, generated: np.ndarray) -> tuple[float, int]:
    """(MS-SSIM, scales used) of two uint8 grayscale images, with ``pytorch_msssim.ms_ssim``.

    Images large enough (smaller side > 160 px) get the standard 5 scales. A smaller image gets the
    L scales that fit (:func:`ms_ssim_levels`) with the first L standard weights renormalised to sum
    1: it is enlarged 2^(5-L) times by pixel repetition and the first 5-L scales get weight 0. Each
    2x2 average pooling of pytorch_msssim undoes one repetition exactly, so its scale 5-L+1 is the
    image itself and the result is the L-scale MS-SSIM of the image as it is (no interpolation).
    NaN when not even one scale fits.
    """
    import torch
    from pytorch_msssim import ms_ssim as library_ms_ssim

    a, b = np.asarray(real), np.asarray(generated)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"MS-SSIM needs two grayscale images of one shape, got {a.shape} and {b.shape}")
    levels = ms_ssim_levels(*a.shape)
    if levels == 0:
        return math.nan, 0
    skipped = len(MS_SSIM_WEIGHTS) - levels
    kept = MS_SSIM_WEIGHTS[:levels]
    weights = list(MS_SSIM_WEIGHTS) if not skipped else [0.0] * skipped + [w / sum(kept) for w in kept]
    x = torch.from_numpy(a.astype(np.float32) / 255.0)[None, None]
    y = torch.from_numpy(b.astype(np.float32) / 255.0)[None, None]
    if skipped:
        x = torch.repeat_interleave(torch.repeat_interleave(x, 2 ** skipped, dim=2), 2 ** skipped, dim=3)
        y = torch.repeat_interleave(torch.repeat_interleave(y, 2 ** skipped, dim=2), 2 ** skipped, dim=3)
    with torch.no_grad():
        value = library_ms_ssim(x, y, data_range=1.0, win_size=MS_SSIM_WINDOW, weights=weights)
    return float(value), levels


def bounding_crop(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the smallest rectangle holding every pixel of ``mask`` (a slice box)."""
    rows, columns = np.nonzero(np.asarray(mask, bool))
    if len(rows) == 0:
        raise ValueError("the mask is empty")
    return int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1


def reconstruction_scores(real: np.ndarray, generated: np.ndarray, roi: np.ndarray) -> dict:
    """PSNR and MS-SSIM of the whole image, and of the ROI only: both on the ROI's bounding
    rectangle (a crop of both images), so MS-SSIM has a whole rectangle to slide its window over."""
    left, top, right, bottom = bounding_crop(roi)
    whole, whole_levels = ms_ssim(real, generated)
    crop_real, crop_generated = real[top:bottom, left:right], generated[top:bottom, left:right]
    inside, inside_levels = ms_ssim(crop_real, crop_generated)
    return {
        "psnr": psnr(real, generated), "ms_ssim": whole, "ms_ssim_levels": whole_levels,
        "psnr_roi": psnr(crop_real, crop_generated), "ms_ssim_roi": inside, "ms_ssim_roi_levels": inside_levels,
        "roi_crop": f"{left},{top},{right},{bottom}", "roi_pixels": int(np.count_nonzero(roi)),
    }


def hidden_structure(structures: Sequence[str], seed: int, image_key: str) -> str:
    """The structure whose box is hidden in the single-structure reconstruction of one image: drawn
    from its annotated structures with a generator seeded by (seed, CRC-32 of the image's name), so
    every run with that seed hides the same structure of the same image."""
    if not structures:
        raise ValueError("an image without annotated structures")
    names = sorted(set(structures))
    return names[int(np.random.default_rng([seed, zlib.crc32(image_key.encode())]).integers(len(names)))]


def is_detected(detections: Sequence[tuple], structure: str, box: Sequence[float], min_iou: float = IOU_THRESHOLD) -> bool:
    """Whether ``detections`` ((structure, x0, y0, x1, y1, score), already above the score threshold)
    hold ``structure`` overlapping ``box`` with IoU >= ``min_iou`` (the AP50 criterion by default)."""
    return any(d[0] == structure and box_iou(box, d[1:5]) >= min_iou for d in detections)


def is_found_anywhere(detections: Sequence[tuple], structure: str) -> bool:
    return any(d[0] == structure for d in detections)


def best_iou(detections: Sequence[tuple], structure: str, box: Sequence[float]) -> float:
    return max((box_iou(box, d[1:5]) for d in detections if d[0] == structure), default=0.0)


def outside_max_abs_diff(before: np.ndarray, after: np.ndarray, roi: np.ndarray) -> int:
    """The largest absolute difference of any channel of any pixel outside ``roi`` (uint8 units)."""
    a, b = np.asarray(before, np.int16), np.asarray(after, np.int16)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape}")
    outside = ~np.asarray(roi, bool)
    if not outside.any():
        return 0
    return int(np.abs(a - b)[outside].max())


def finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there are none)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else math.nan


def rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan


def preset_image_row(before, after, found_real: list, found_edited: list, known: set[str]) -> dict:
    """One (image, preset): which removed / kept / changed structures the detector finds before and after.

    ``found_*``: detections ``(structure, x0, y0, x1, y1, score)`` above the score threshold on the real and
    the edited image; ``known``: the detector's structures (others are not scored)."""
    from fetalstudio.anatomy.roi import changed_boxes  # evaluation sits above anatomy

    changed = changed_boxes(before, after)
    changed_names = {box.structure for box in changed}
    removed = [name for name in before.structure_names() if not after.has(name) and name in known]
    kept = [name for name in before.structure_names() if name not in changed_names and name in known]
    modified = [name for name in after.structure_names() if name in changed_names and name in known]

    def found(detections, name, layout) -> bool:
        return any(is_detected(detections, name, (b.x0, b.y0, b.x1, b.y1)) for b in layout.boxes_of(name))

    def mean_best(name, layout) -> float:
        return float(sum(best_iou(found_edited, name, (b.x0, b.y0, b.x1, b.y1)) for b in layout.boxes_of(name)) / len(layout.boxes_of(name)))

    return {
        "removed": removed, "kept": kept, "modified": modified,
        "removed_detected": [found(found_edited, name, before) for name in removed],
        "removed_detected_real": [found(found_real, name, before) for name in removed],
        "removed_found_anywhere": [is_found_anywhere(found_edited, name) for name in removed],
        "kept_detected": [found(found_edited, name, before) for name in kept],
        "kept_detected_real": [found(found_real, name, before) for name in kept],
        "iou_new": [mean_best(name, after) for name in modified],
        "iou_old": [mean_best(name, before) for name in modified if before.has(name)],
    }


def summarise_presets(names: list[str], rows: list[dict], skipped: dict) -> dict:
    """Per preset: detection rates over (image, structure) pairs, the largest outside-ROI change, counts."""
    summary = {}
    for name in names:
        mine = [row for row in rows if row["preset"] == name]
        pooled = lambda key: [flag for row in mine for flag in row[key]]  # noqa: E731
        removed = sorted({structure for row in mine for structure in row["removed"]})
        summary[name] = {
            "removed_detected_rate": rate(pooled("removed_detected")) if removed else None,
            "kept_detected_rate": rate(pooled("kept_detected")),
            "outside_roi_max_abs_diff": max((row["outside_roi_max_abs_diff"] for row in mine), default=None),
            "n_images": len(mine), "removed_structures": removed,
            "removed_detected_rate_real": rate(pooled("removed_detected_real")) if removed else None,
            "removed_found_anywhere_rate": rate(pooled("removed_found_anywhere")) if removed else None,
            "kept_detected_rate_real": rate(pooled("kept_detected_real")),
            "edited_iou_new": finite_mean(pooled("iou_new")), "edited_iou_old": finite_mean(pooled("iou_old")),
            "skipped_images": len(skipped.get(name, [])),
        }
    return summary


def stage_figures(rows: list[dict], stage: str, layout: dict) -> dict:
    def means(kind: str) -> dict:
        mine = [r for r in rows if r["stage"] == stage and r["roi"] == kind]
        return {key: finite_mean([r[key] for r in mine]) for key in ("psnr", "ms_ssim", "psnr_roi", "ms_ssim_roi")}

    return {**means("structure"), "layout_miou": layout["mean_iou"], "layout_map50": layout["map50"],
            "union_roi": means("all_boxes"), "layout_per_structure": layout["per_structure"]}
