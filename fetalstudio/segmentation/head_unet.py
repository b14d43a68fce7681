"""Prompt-free head segmentation with the head U-Net (``fetalstudio.models.head_segmenter``): no box,
no click, the whole image in and the head mask out at the image's own resolution.

Steps, in the order they run:

1. the image (grayscale; RGB is converted as the box-prompted predictor does) is letterboxed into
   the model's ``input_size`` square (OpenCV ``INTER_AREA``; the shared geometry of
   ``fetalstudio.imaging.letterbox``), pixels scaled to [-1, 1];
2. the model runs on it and on its horizontal mirror (flip test-time augmentation); the two
   probability maps (the mirror's flipped back) are averaged;
3. the image's part of the square is resized back to the image's rows x columns (bilinear) as a
   **probability map**, and only then thresholded: thresholding at 256 px and upscaling the
   mask costs about 0.45 mm of head circumference (PROBES);
4. the largest 8-connected region is kept and its holes are filled.

    predictor = HeadMaskPredictor(model)       # a HeadUNet from the model manager
    result = predictor.predict(image)          # HxW uint8 (or RGB), any size
    result.mask, result.probability, result.score
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fetalstudio.imaging.ellipse import largest_component
from fetalstudio.imaging.letterbox import Letterbox, letterbox_geometry
from fetalstudio.segmentation.predictor import grayscale_rgb

#: Probability at which a pixel counts as head.
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class HeadMaskPrediction:
    mask: np.ndarray  # bool, the image's rows x columns: the largest region of the thresholded map, holes filled
    probability: np.ndarray  # float32 in [0, 1], the image's rows x columns (flip-averaged)
    score: float  # soft IoU of the probability map with the mask: near 1 for a confident, sharp head
    raw_mask: np.ndarray  # bool, the thresholded probability map before cleaning


def as_gray(image) -> np.ndarray:
    """H x W uint8 grayscale from a path, PIL image or array (RGB by luminance, like the box-prompted predictor)."""
    return np.ascontiguousarray(grayscale_rgb(image)[:, :, 0])


def letterboxed_input(gray: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """The ``size`` x ``size`` uint8 square the model sees (image scaled with INTER_AREA, centred on black) and its geometry."""
    import cv2

    rows, cols = gray.shape
    box = letterbox_geometry(cols, rows, size)
    square = np.zeros((size, size), np.uint8)
    resized = cv2.resize(gray, (box.fitted_width, box.fitted_height), interpolation=cv2.INTER_AREA)
    square[box.pad_y:box.pad_y + box.fitted_height, box.pad_x:box.pad_x + box.fitted_width] = resized
    return square, box


def to_model_input(squares: np.ndarray) -> torch.Tensor:
    """N x S x S uint8 squares as the N x 1 x S x S float input in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(squares)).float()[:, None] / 127.5 - 1.0


def soft_iou(probability: np.ndarray, mask: np.ndarray) -> float:
    """IoU of a probability map with a binary mask, probabilities as fuzzy membership."""
    inside = mask.astype(np.float32)
    union = float(np.maximum(probability, inside).sum())
    return float(np.minimum(probability, inside).sum()) / union if union else 0.0


def upsampled(window: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A working-resolution probability map resized (bilinear) to ``shape`` (rows, columns), in [0, 1]."""
    import cv2

    rows, cols = shape[:2]
    return np.clip(cv2.resize(window, (cols, rows), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


class HeadMaskPredictor:
    """The head U-Net on whole images; ``flip_tta`` averages the prediction with the mirrored image's."""

    def __init__(self, model, flip_tta: bool = True, threshold: float = MASK_THRESHOLD) -> None:
        self.model = model
        self.flip_tta = flip_tta
        self.threshold = threshold

    @property
    def input_size(self) -> int:
        return int(self.model.config.input_size)

    def square_probability(self, square: np.ndarray) -> np.ndarray:
        """The S x S probability map of a letterboxed square (flip-averaged when ``flip_tta``)."""
        parameter = next(self.model.parameters())
        batch = to_model_input(square[None])
        if self.flip_tta:
            batch = torch.cat([batch, torch.flip(batch, dims=[3])])
        with torch.inference_mode():
            probabilities = torch.sigmoid(self.model(batch.to(parameter.device, parameter.dtype)).float())[:, 0]
        if self.flip_tta:
            probabilities = (probabilities[0] + torch.flip(probabilities[1], dims=[1])) / 2
        else:
            probabilities = probabilities[0]
        return probabilities.cpu().numpy()

    def probability(self, image) -> np.ndarray:
        """The head probability of every pixel of ``image``, at the image's own rows x columns."""
        gray = as_gray(image)
        return upsampled(self._window_of_gray(gray), gray.shape)

    def window_probability(self, image) -> np.ndarray:
        """The probability map at the model's working resolution: the letterboxed square cropped to the image
        (e.g. 384 x 259 for an 800 x 540 image); ``upsampled`` brings it to the image's size. Small enough to keep."""
        return self._window_of_gray(as_gray(image))

    def _window_of_gray(self, gray: np.ndarray) -> np.ndarray:
        square, box = letterboxed_input(gray, self.input_size)
        return self.square_probability(square)[box.pad_y:box.pad_y + box.fitted_height, box.pad_x:box.pad_x + box.fitted_width]

    def predict(self, image) -> HeadMaskPrediction:
        return self.mask_from(self.probability(image))

    def mask_from(self, probability: np.ndarray) -> HeadMaskPrediction:
        """The prediction for a probability map from ``probability`` (e.g. one kept from an earlier call)."""
        raw = probability > self.threshold
        mask = largest_component(raw)
        return HeadMaskPrediction(mask=mask, probability=probability, score=soft_iou(probability, mask), raw_mask=raw)
