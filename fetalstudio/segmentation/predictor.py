"""Box-prompted prediction at full resolution, for the small segmenter and real SAM alike.

Follows segment-anything's ``SamPredictor`` (and uses it): ``set_image`` resizes the longest side
to the model's ``image_size`` and computes the image embedding once; every ``predict`` then
takes a box (and optional points) in the *original* image's pixel coordinates and costs one
decoder pass. The mask logits are upsampled to the original size before thresholding, and the
mask is cleaned there (largest region, holes filled): measuring HC at the model's 256 px instead
costs about 0.45 mm (PROBES).

    predictor = BoxPromptPredictor(model)          # a Sam from the model manager
    predictor.set_image(image)                     # HxW grayscale or HxWx3 RGB, uint8
    result = predictor.predict(box=(x0, y0, x1, y1))
    result.mask, result.score                      # bool HxW, predicted IoU
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.ellipse import largest_component


@dataclass(frozen=True)
class BoxPrediction:
    mask: np.ndarray  # bool, original image size; largest region with holes filled (if postprocessed)
    score: float  # the model's predicted IoU of this mask
    raw_mask: np.ndarray  # bool, thresholded logits before cleaning


@dataclass(frozen=True)
class ImageEmbedding:
    """What segment-anything's predictor keeps per image: the encoder features and the two sizes."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def to_rgb_uint8(image) -> np.ndarray:
    """HxWx3 uint8 RGB from a path, a PIL image or an array (grayscale is replicated)."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as handle:
            image = np.asarray(handle.convert("L"))
    elif not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if array.dtype == bool or array.max() <= 1.0:
            array = array.astype(np.float32) * 255
        elif array.max() > 255:  # 16-bit
            array = array.astype(np.float32) / array.max() * 255
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise FetalStudioError(f"An image must be HxW (grayscale) or HxWx3 (RGB), not shape {array.shape}.")
    return np.ascontiguousarray(array)


def grayscale_rgb(image) -> np.ndarray:
    """Ultrasound input as the models see it in training: grayscale, replicated to 3 channels."""
    rgb = to_rgb_uint8(image)
    gray = rgb[:, :, 0] if (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all() else np.asarray(
        np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)), np.uint8
    )
    return np.repeat(gray[:, :, None], 3, axis=2)


#: A box narrower or shorter than this (pixels) is a click, not a box: refused with a clear message.
MIN_BOX_SIDE_PX = 2.0


def checked_box(box, image_size: tuple[int, int]) -> np.ndarray:
    """``(x_min, y_min, x_max, y_max)`` as float32, clipped to the image of ``image_size`` (rows, cols).

    Refused with an actionable message: not four finite numbers, corners swapped, a zero-size box,
    a box wholly outside the image."""
    rows, cols = image_size
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise FetalStudioError(f"A box is four numbers (x_min, y_min, x_max, y_max); got {np.asarray(box).tolist()}.")
    x0, y0, x1, y1 = values
    if x1 < x0 or y1 < y0:
        raise FetalStudioError(f"A box is (x_min, y_min, x_max, y_max) with x_max >= x_min and y_max >= y_min; got {values.tolist()}.")
    if x1 - x0 < MIN_BOX_SIDE_PX or y1 - y0 < MIN_BOX_SIDE_PX:
        raise FetalStudioError(f"The box {values.tolist()} has (almost) no size: drag a box around the whole head, "
                               f"at least {MIN_BOX_SIDE_PX:g} pixels wide and high.")
    if x1 <= 0 or y1 <= 0 or x0 >= cols - 1 or y0 >= rows - 1:
        raise FetalStudioError(f"The box {values.tolist()} lies outside the {cols}x{rows} image: draw it on the image.")
    clipped = np.array([max(0.0, x0), max(0.0, y0), min(cols - 1.0, x1), min(rows - 1.0, y1)], np.float32)
    if clipped[2] - clipped[0] < MIN_BOX_SIDE_PX or clipped[3] - clipped[1] < MIN_BOX_SIDE_PX:
        raise FetalStudioError(f"Only a sliver of the box {values.tolist()} lies inside the {cols}x{rows} image: draw it on the image.")
    return clipped


def checked_points(points, image_size: tuple[int, int]) -> np.ndarray:
    """N x 2 (x, y) float32 points, all inside the image of ``image_size`` (rows, cols)."""
    rows, cols = image_size
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(array).all():
        raise FetalStudioError("Points are (x, y) pairs of numbers.")
    outside = (array[:, 0] < 0) | (array[:, 1] < 0) | (array[:, 0] > cols - 1) | (array[:, 1] > rows - 1)
    if outside.any():
        raise FetalStudioError(f"The point {array[outside][0].tolist()} lies outside the {cols}x{rows} image: click on the image.")
    return array.astype(np.float32)


class BoxPromptPredictor:
    """One image embedding, many prompts. Works for any segment-anything ``Sam``."""

    def __init__(self, model, postprocess: bool = True) -> None:
        from segment_anything import SamPredictor

        self.model = model
        self.postprocess = postprocess
        self._sam = SamPredictor(model)

    @property
    def image_size(self) -> int:
        return int(self.model.image_encoder.img_size)

    @property
    def original_size(self) -> tuple[int, int] | None:
        return self._sam.original_size if self._sam.is_image_set else None

    def _autocast(self):
        dtype = next(self.model.parameters()).dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=dtype)

    def set_image(self, image) -> None:
        """Compute the embedding of ``image`` (path, PIL image or array; grayscale or RGB)."""
        rgb = grayscale_rgb(image)
        with torch.inference_mode(), self._autocast():
            self._sam.set_image(rgb, image_format=self.model.image_format)

    def embedding(self) -> ImageEmbedding:
        """The current image's embedding, to keep and restore later (see ``restore``)."""
        if not self._sam.is_image_set:
            raise FetalStudioError("No image is set: call set_image(image) first.")
        return ImageEmbedding(self._sam.features, tuple(self._sam.original_size), tuple(self._sam.input_size))

    def restore(self, embedding: ImageEmbedding) -> None:
        """Make a kept embedding current again: prompts then need no image-encoder run."""
        self._sam.features = embedding.features
        self._sam.original_size, self._sam.input_size = embedding.original_size, embedding.input_size
        self._sam.is_image_set = True

    @property
    def multimask_trained(self) -> bool:
        """Whether the model's three extra mask outputs are trained: true for SAM checkpoints; FetalStudio's
        own segmenters are trained on the single-mask output only, so they offer one candidate."""
        return bool(getattr(self.model, "fetalstudio_multimask", True))

    def predict(self, box=None, points=None, point_labels=None) -> BoxPrediction:
        """The mask for a box ``(x_min, y_min, x_max, y_max)`` and/or points, original pixel coords.

        ``points`` is N x 2 (x, y); ``point_labels`` 1 = inside, 0 = outside (default all 1).
        """
        return self._decode(box, points, point_labels, multimask=False)[0]

    def predict_candidates(self, box=None, points=None, point_labels=None) -> list[BoxPrediction]:
        """SAM's multimask output (three candidate masks for an ambiguous prompt), best predicted IoU
        first; a model without trained multimask outputs gives its single mask."""
        if not self.multimask_trained:
            return [self.predict(box=box, points=points, point_labels=point_labels)]
        candidates = self._decode(box, points, point_labels, multimask=True)
        return sorted(candidates, key=lambda candidate: -candidate.score)

    def predict_boxes_working_resolution(self, boxes) -> list[tuple[np.ndarray, float]]:
        """Many box prompts (original pixels, N x 4, not validated) in one mask-decoder call: for each,
        the mask at the model's working resolution — the image's size inside the model, e.g.
        256 x 173 px for 800 x 540; largest region, holes filled — and its predicted IoU. For searches
        over many boxes (the automatic mode), where full-resolution masks would cost more than the decoder."""
        import torch.nn.functional as F

        if not self._sam.is_image_set:
            raise FetalStudioError("Call set_image(image) before predicting.")
        if not len(boxes):
            return []
        sam, model = self._sam, self.model
        array = sam.transform.apply_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), sam.original_size)
        boxes_torch = torch.as_tensor(array, dtype=torch.float, device=sam.device)
        size, (rows, cols) = int(model.image_encoder.img_size), sam.input_size
        with torch.inference_mode(), self._autocast():
            sparse, dense = model.prompt_encoder(points=None, boxes=boxes_torch, masks=None)
            low_res, iou = model.mask_decoder(
                image_embeddings=sam.features, image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            logits = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
            masks = (logits[:, 0, :rows, :cols] > model.mask_threshold).cpu().numpy()
        scores = iou[:, 0].float().cpu().numpy()
        return [(largest_component(mask), float(score)) for mask, score in zip(masks, scores)]

    def probability(self, box=None, points=None, point_labels=None) -> tuple[np.ndarray, float]:
        """The single-mask output for a prompt as a probability map (sigmoid of the logits, float32,
        original image size) and its predicted IoU: for combining with another model's map."""
        logits, iou = self._logits(box, points, point_labels, multimask=False)
        return torch.sigmoid(logits[0, 0].float() - self.model.mask_threshold).cpu().numpy(), float(iou[0, 0].float())

    def _decode(self, box, points, point_labels, multimask: bool) -> list[BoxPrediction]:
        logits, iou = self._logits(box, points, point_labels, multimask)
        return [self.prediction_from((logits[0, index].float() > self.model.mask_threshold).cpu().numpy(), float(iou[0, index].float()))
                for index in range(logits.shape[1])]

    def prediction_from(self, raw_mask: np.ndarray, score: float) -> BoxPrediction:
        """A thresholded map as a prediction: its largest region with holes filled (when postprocessing)."""
        return BoxPrediction(mask=largest_component(raw_mask) if self.postprocess else raw_mask, score=score, raw_mask=raw_mask)

    def _logits(self, box, points, point_labels, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-resolution mask logits (1 x masks x H x W) and predicted IoUs (1 x masks) for one prompt."""
        if not self._sam.is_image_set:
            raise FetalStudioError("Call set_image(image) before predict(box=...).")
        if box is None and points is None:
            raise FetalStudioError("Give a box (x_min, y_min, x_max, y_max) or points to segment.")
        sam = self._sam
        box_torch = coords_torch = labels_torch = None
        if box is not None:
            box = checked_box(box, sam.original_size)
            box_torch = torch.as_tensor(sam.transform.apply_boxes(box[None], sam.original_size), dtype=torch.float, device=sam.device)
        if points is not None:
            points = checked_points(points, sam.original_size)
            labels = np.ones(len(points), np.int64) if point_labels is None else np.asarray(point_labels, np.int64).reshape(-1)
            if len(labels) != len(points):
                raise FetalStudioError(f"{len(points)} points but {len(labels)} point labels.")
            coords = sam.transform.apply_coords(points, sam.original_size)
            coords_torch = torch.as_tensor(coords[None], dtype=torch.float, device=sam.device)
            labels_torch = torch.as_tensor(labels[None], dtype=torch.int, device=sam.device)
        with torch.inference_mode(), self._autocast():
            logits, iou, _ = sam.predict_torch(coords_torch, labels_torch, box_torch, None, multimask_output=multimask, return_logits=True)
        return logits, iou

    def segment(self, image, box, points=None, point_labels=None) -> BoxPrediction:
        """``set_image`` + ``predict`` for a single prompt."""
        self.set_image(image)
        return self.predict(box=box, points=points, point_labels=point_labels)
