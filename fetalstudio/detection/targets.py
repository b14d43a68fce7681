"""Training targets and loss of the CenterNet-style detector (``fetalstudio.models.detector``).

Per image and structure: a Gaussian peak (1 at the centre cell, sigma = box size / 6 per axis,
at least 0.7 cells) on that structure's heatmap channel, and at the centre cell the log box size
in stride units and the sub-cell offset. A structure that is not annotated on an image has its
channel left out of the loss for that image (not annotated is not absent anatomy).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fetalstudio.models.detector import STRIDE

MIN_SIGMA = 0.7
#: objects columns: class, cell x, cell y, log width, log height, offset x, offset y
OBJECT_COLUMNS = 7


def encode(boxes: list[tuple[int, float, float, float, float]], n_classes: int, input_size: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(heatmap C x H x W, objects K x 7)`` for boxes ``(class, x0, y0, x1, y1)`` in input pixels."""
    cells = input_size // STRIDE
    heatmap = np.zeros((n_classes, cells, cells), dtype=np.float32)
    objects = []
    ys, xs = np.mgrid[0:cells, 0:cells].astype(np.float32)
    for cls, x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        width, height = (x1 - x0) / STRIDE, (y1 - y0) / STRIDE
        ix, iy = int(cx), int(cy)
        if not (0 <= ix < cells and 0 <= iy < cells) or width <= 0 or height <= 0:
            continue
        sx, sy = max(MIN_SIGMA, width / 6), max(MIN_SIGMA, height / 6)
        peak = np.exp(-((xs - ix) ** 2 / (2 * sx * sx) + (ys - iy) ** 2 / (2 * sy * sy)))
        np.maximum(heatmap[cls], peak, out=heatmap[cls])
        objects.append((cls, ix, iy, math.log(width), math.log(height), cx - ix, cy - iy))
    return heatmap, np.asarray(objects, dtype=np.float32).reshape(-1, OBJECT_COLUMNS)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over the annotated channels (``channel_mask`` B x C)."""
    probability = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    mask = channel_mask[:, :, None, None].to(probability.dtype)
    positive = target.eq(1).to(probability.dtype) * mask
    negative = (1 - positive) * mask
    positive_loss = torch.log(probability) * (1 - probability) ** 2 * positive
    negative_loss = torch.log(1 - probability) * probability ** 2 * (1 - target) ** 4 * negative
    return -(positive_loss.sum() + negative_loss.sum()) / positive.sum().clamp(min=1)


def detector_loss(outputs: dict[str, torch.Tensor], heatmaps: torch.Tensor, channel_mask: torch.Tensor,
                  objects: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Focal heatmap loss + L1 on log size and offset at the centre cells.

    ``objects``: N x 8 rows ``(batch index, class, cell x, cell y, log w, log h, offset x, offset y)``.
    """
    heat = focal_loss(outputs["heatmap"], heatmaps, channel_mask)
    if len(objects):
        batch, cls, ix, iy = (objects[:, i].long() for i in range(4))
        size = outputs["size"].float()
        predicted_size = torch.stack([size[batch, 2 * cls, iy, ix], size[batch, 2 * cls + 1, iy, ix]], dim=1)
        offset = outputs["offset"].float()
        predicted_offset = torch.stack([offset[batch, 0, iy, ix], offset[batch, 1, iy, ix]], dim=1)
        size_loss = torch.nn.functional.l1_loss(predicted_size, objects[:, 4:6])
        offset_loss = torch.nn.functional.l1_loss(predicted_offset, objects[:, 6:8])
    else:
        size_loss = offset_loss = outputs["size"].sum() * 0
    total = heat + size_loss + offset_loss
    return total, {"heatmap": float(heat.detach()), "size": float(size_loss.detach()), "offset": float(offset_loss.detach())}
