"""``StructureDetector``: boxes of anatomical structures on a scan, in the scan's own pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fetalstudio.detection.letterbox import Letterbox, as_gray, letterbox
from fetalstudio.errors import FetalStudioError
from fetalstudio.models.detector import STRIDE, CenterNetDetector

DEFAULT_SCORE_THRESHOLD = 0.3
#: Detections scored at least this count for AP50 / mean IoU (low, so the precision-recall curve is whole).
EVALUATION_SCORE_THRESHOLD = 0.01
#: peaks per structure considered when more than one box per structure is asked for
MAX_PER_STRUCTURE = 5


@dataclass(frozen=True)
class Detection:
    structure: str
    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def as_tuple(self) -> tuple[str, float, float, float, float, float]:
        return (self.structure, self.x0, self.y0, self.x1, self.y1, self.score)


class StructureDetector:
    """Wraps a loaded detector (``ModelManager.get`` of a ``detector`` model, or ``load_detector_file``)."""

    def __init__(self, model: CenterNetDetector) -> None:
        if not isinstance(model, CenterNetDetector):
            raise FetalStudioError(f"a structure detector is needed, not a {type(model).__name__}; "
                                   "pick a model of kind 'detector' (python -m fetalstudio models).")
        self.model = model

    @property
    def structures(self) -> tuple[str, ...]:
        return self.model.config.classes

    @property
    def input_size(self) -> int:
        return self.model.config.input_size

    def detect(self, image, score_threshold: float = DEFAULT_SCORE_THRESHOLD, one_per_structure: bool = True) -> list[Detection]:
        """Detections on ``image`` (PIL image or uint8 array, gray or RGB) in its own pixels, best first;
        with ``one_per_structure`` (the default) at most one box per structure."""
        return self.detect_batch([image], score_threshold, one_per_structure)[0]

    @torch.inference_mode()
    def detect_batch(self, images, score_threshold: float = DEFAULT_SCORE_THRESHOLD, one_per_structure: bool = True
                     ) -> list[list[Detection]]:
        if not 0 <= score_threshold <= 1:
            raise FetalStudioError(f"score threshold {score_threshold} must be between 0 and 1.")
        grays = [as_gray(image) for image in images]
        squares, boxes = zip(*(letterbox(gray, self.input_size) for gray in grays)) if grays else ((), ())
        parameter = next(self.model.parameters())
        inputs = torch.from_numpy(np.stack(squares)).to(parameter.device, parameter.dtype)[:, None] / 127.5 - 1
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = self.model(inputs)
        finally:
            self.model.train(was_training)
        heat = torch.sigmoid(outputs["heatmap"].float())
        peaks = heat * (torch.nn.functional.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        return [self._decode(peaks[i], outputs["size"][i].float(), outputs["offset"][i].float(), boxes[i], gray.shape,
                             score_threshold, 1 if one_per_structure else MAX_PER_STRUCTURE)
                for i, gray in enumerate(grays)]

    def evaluate(self, images, annotations, batch_size: int = 16) -> dict:
        """AP50 and mean IoU per structure (``fetalstudio.detection.metrics.evaluate_detections``) of this
        detector's boxes (one per structure, score >= ``EVALUATION_SCORE_THRESHOLD``) on ``images``
        against ``annotations[i]`` = ``(structure, x0, y0, x1, y1)`` boxes in image i's pixels."""
        from fetalstudio.detection.metrics import evaluate_detections

        found = []
        for start in range(0, len(images), batch_size):
            batch = self.detect_batch(images[start:start + batch_size], score_threshold=EVALUATION_SCORE_THRESHOLD)
            found += [[detection.as_tuple() for detection in detections] for detections in batch]
        return evaluate_detections(annotations, found, self.structures)

    def _decode(self, peaks, size, offset, box: Letterbox, shape, threshold: float, per_structure: int) -> list[Detection]:
        height, width = shape
        cells = peaks.shape[-1]
        found = []
        for cls, structure in enumerate(self.structures):
            scores, positions = peaks[cls].flatten().topk(per_structure)
            for score, position in zip(scores.tolist(), positions.tolist()):
                if score < threshold:
                    break
                iy, ix = divmod(position, cells)
                cx = (ix + float(offset[0, iy, ix])) * STRIDE
                cy = (iy + float(offset[1, iy, ix])) * STRIDE
                half_w = float(torch.exp(size[2 * cls, iy, ix])) * STRIDE / 2
                half_h = float(torch.exp(size[2 * cls + 1, iy, ix])) * STRIDE / 2
                x0, y0, x1, y1 = box.to_image(cx - half_w, cy - half_h, cx + half_w, cy + half_h)
                x0, x1 = max(0.0, x0), min(float(width), x1)
                y0, y1 = max(0.0, y0), min(float(height), y1)
                if x1 > x0 and y1 > y0:
                    found.append(Detection(structure, x0, y0, x1, y1, score))
        return sorted(found, key=lambda d: -d.score)
