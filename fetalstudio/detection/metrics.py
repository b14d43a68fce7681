"""AP50 and mean IoU per structure, with numpy.

Only annotated structures count: on an image where a structure has no box, detections of it are
ignored (not annotated is not absent). Per structure:

- AP50: detections of all images sorted by score, each a true positive when it overlaps a not yet
  matched box of that structure on its image with IoU >= 0.5; AP = area under the precision
  envelope (all-point interpolation, as VOC 2010+ and COCO's per-threshold AP without its
  101-point sampling).
- mean IoU: each annotated box's best IoU with a detection of its structure on its image, 0 when
  there is none, averaged over the boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IOU_THRESHOLD = 0.5

Box = Sequence[float]  # x0, y0, x1, y1


def box_iou(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def average_precision(scores: list[float], hits: list[bool], positives: int) -> float:
    """All-point interpolated AP of detections (score, hit) against ``positives`` boxes."""
    if positives == 0:
        return float("nan")
    if not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hit = np.asarray(hits, dtype=np.float64)[order]
    true_positives = np.cumsum(hit)
    precision = true_positives / np.arange(1, len(hit) + 1)
    recall = true_positives / positives
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [recall[-1]]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def evaluate_detections(annotations: Sequence[Sequence[tuple]], detections: Sequence[Sequence[tuple]],
                        structures: Sequence[str]) -> dict:
    """Per-structure AP50 and mean IoU, and their means over the structures that have boxes.

    ``annotations[i]``: the boxes of image i as ``(structure, x0, y0, x1, y1)``; ``detections[i]``:
    ``(structure, x0, y0, x1, y1, score)`` (e.g. ``Detection.as_tuple()``).
    """
    if len(annotations) != len(detections):
        raise ValueError(f"{len(annotations)} annotated images but detections for {len(detections)}")
    per_structure = {}
    for structure in structures:
        scores, hits, ious, positives = [], [], [], 0
        for truth, found in zip(annotations, detections):
            boxes = [box[1:5] for box in truth if box[0] == structure]
            if not boxes:
                continue
            positives += len(boxes)
            candidates = sorted((d for d in found if d[0] == structure), key=lambda d: -d[5])
            ious += [max((box_iou(box, d[1:5]) for d in candidates), default=0.0) for box in boxes]
            matched: set[int] = set()
            for candidate in candidates:
                overlaps = [(box_iou(box, candidate[1:5]), index) for index, box in enumerate(boxes) if index not in matched]
                best, index = max(overlaps, default=(0.0, -1))
                hit = best >= IOU_THRESHOLD
                if hit:
                    matched.add(index)
                scores.append(float(candidate[5]))
                hits.append(hit)
        per_structure[structure] = {"boxes": positives, "ap50": average_precision(scores, hits, positives),
                                    "mean_iou": float(np.mean(ious)) if ious else float("nan"),
                                    "detected": int(sum(hits))}
    scored = [value for value in per_structure.values() if value["boxes"]]
    return {
        "per_structure": per_structure,
        "map50": float(np.mean([value["ap50"] for value in scored])) if scored else float("nan"),
        "mean_iou": float(np.mean([value["mean_iou"] for value in scored])) if scored else float("nan"),
    }
