"""Box/point-prompted segmentation with the image embedding cached per image (segment-anything's
predictor pattern): the image encoder runs once per image, every further prompt only runs the
prompt encoder and mask decoder. An LRU of embeddings keyed by the image's content hash lets a
user go back to an earlier image without re-encoding it.

One ``CachedPredictor`` belongs to one user (browser session or CLI run): segment-anything's
predictor holds "the current image" and must not be shared between users.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from fetalstudio.segmentation.predictor import BoxPrediction, BoxPromptPredictor, ImageEmbedding, grayscale_rgb


def image_key(image: np.ndarray) -> str:
    """Content hash of an image array (shape, dtype and pixels)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(array.data)
    return digest.hexdigest()


class CachedPredictor:
    def __init__(self, predictor: BoxPromptPredictor, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.predictor = predictor
        self.capacity = capacity
        self.encoder_runs = 0
        self._embeddings: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._current: str | None = None

    def set_image(self, image) -> bool:
        """Make ``image`` current; True when it had to be encoded, False when its embedding was cached."""
        rgb = grayscale_rgb(image)
        key = image_key(rgb)
        if key == self._current:
            return False
        cached = self._embeddings.get(key)
        if cached is not None:
            self._embeddings.move_to_end(key)
            self.predictor.restore(cached)
            self._current = key
            return False
        self.predictor.set_image(rgb)
        self.encoder_runs += 1
        self._embeddings[key] = self.predictor.embedding()
        self._current = key
        while len(self._embeddings) > self.capacity:
            self._embeddings.popitem(last=False)
        return True

    def predict(self, box=None, points=None, point_labels=None) -> BoxPrediction:
        return self.predictor.predict(box=box, points=points, point_labels=point_labels)

    def cached_images(self) -> int:
        return len(self._embeddings)


#: Candidate boxes of the automatic mode: side lengths as fractions of the frame, centres on a grid.
AUTO_BOX_SIZES = (0.35, 0.5, 0.65, 0.8)
AUTO_BOX_CENTRES = (0.3, 0.5, 0.7)


def auto_box(predictor: CachedPredictor) -> tuple[tuple[float, float, float, float], BoxPrediction]:
    """A head box without user input, for the current image (its embedding is reused, so this costs
    only decoder runs): prompt with candidate boxes of several sizes on a 3x3 grid of centres, keep the
    prediction the model itself scores highest (its predicted IoU), and return that mask's bounding
    box with the prediction. Segmenting again with the returned box is the second pass."""
    from fetalstudio.errors import FetalStudioError
    from fetalstudio.segmentation.ellipse import bounding_box

    rows, cols = predictor.predictor.original_size
    best: BoxPrediction | None = None
    for size in AUTO_BOX_SIZES:
        half_w, half_h = size * cols / 2, size * rows / 2
        for cy in AUTO_BOX_CENTRES:
            for cx in AUTO_BOX_CENTRES:
                x, y = cx * cols, cy * rows
                box = (max(0.0, x - half_w), max(0.0, y - half_h), min(cols - 1.0, x + half_w), min(rows - 1.0, y + half_h))
                prediction = predictor.predict(box=box)
                if prediction.mask.any() and (best is None or prediction.score > best.score):
                    best = prediction
    found = bounding_box(best.mask) if best is not None else None
    if found is None:
        raise FetalStudioError("The automatic mode found no head in this image: draw a box around the head instead.")
    return tuple(float(v) for v in found), best
