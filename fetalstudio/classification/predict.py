"""Plane prediction with the preprocessing stored in the checkpoint.

A FetalStudio classifier checkpoint records how its inputs were made (``fetalstudio.*``
safetensors metadata, see ``fetalstudio.classification.model``): channels, input size, the
crop to the ultrasound sector (``fan``, ``fetalstudio.classification.fan``; checkpoints without
the key are ``none``), the letterbox resize, mean/std and the class order. The model manager's loader keeps that metadata
in ``model.pretrained_cfg["fetalstudio"]``, so ``PlaneClassifier(model)`` always prepares images
exactly as training did.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.vocabulary import PLANES

#: The class order of every FetalStudio plane classifier (``fetalstudio.vocabulary.PLANES``).
PLANE_CLASSES: tuple[str, ...] = tuple(p.value for p in PLANES)

RESIZE_MODES = ("letterbox", "stretch")
#: ``none``: the whole image; ``fan``: cropped to the ultrasound sector, outside it black.
CROP_MODES = ("none", "fan")


@dataclass(frozen=True)
class Preprocessing:
    """Image -> normalised tensor: crop (``fan``: to the ultrasound sector), then ``letterbox``
    (pad to a square with black) or ``stretch``, resize, scale to [0, 1], (x - mean) / std."""

    input_size: int = 128
    in_chans: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    resize: str = "letterbox"
    crop: str = "none"

    def __post_init__(self) -> None:
        if self.in_chans not in (1, 3):
            raise FetalStudioError(f"Classifier input channels must be 1 (grayscale) or 3 (RGB), not {self.in_chans}.")
        if self.resize not in RESIZE_MODES:
            raise FetalStudioError(f"Unknown resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}.")
        if self.crop not in CROP_MODES:
            raise FetalStudioError(f"Unknown crop mode {self.crop!r}; use one of {', '.join(CROP_MODES)} "
                                   "(a newer FetalStudio may have written this checkpoint).")
        if len(self.mean) not in (1, self.in_chans) or len(self.std) not in (1, self.in_chans):
            raise FetalStudioError(f"mean/std need 1 or {self.in_chans} values (got {self.mean}, {self.std}).")

    @property
    def mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    def metadata(self) -> dict[str, str]:
        """The ``fetalstudio.*`` safetensors metadata entries (strings) for this preprocessing."""
        return {
            "fetalstudio.in_chans": str(self.in_chans),
            "fetalstudio.input_size": str(self.input_size),
            "fetalstudio.mean": json.dumps(list(self.mean)),
            "fetalstudio.std": json.dumps(list(self.std)),
            "fetalstudio.resize": self.resize,
            "fetalstudio.crop": self.crop,
        }

    @classmethod
    def from_details(cls, details: dict[str, str], model: torch.nn.Module | None = None) -> Preprocessing:
        """From checkpoint metadata (keys without the ``fetalstudio.`` prefix); timm defaults otherwise."""
        timm_cfg = dict(getattr(model, "pretrained_cfg", {}) or {}) if model is not None else {}
        in_chans = int(details.get("in_chans") or _model_in_chans(model) or 3)
        size = details.get("input_size")
        if size:
            input_size = int(size)
        else:
            input_size = int((timm_cfg.get("input_size") or (3, 224, 224))[-1])
        default_mean = timm_cfg.get("mean", (0.485, 0.456, 0.406))
        default_std = timm_cfg.get("std", (0.229, 0.224, 0.225))
        mean = tuple(json.loads(details["mean"])) if details.get("mean") else tuple(default_mean)
        std = tuple(json.loads(details["std"])) if details.get("std") else tuple(default_std)
        if in_chans == 1 and len(mean) == 3:  # a plain timm checkpoint adapted to grayscale
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        return cls(input_size=input_size, in_chans=in_chans, mean=mean, std=std,
                   resize=details.get("resize") or ("letterbox" if details.get("input_size") else "stretch"),
                   crop=details.get("crop") or "none")

    # --- image -> tensor --------------------------------------------------------------------
    def square(self, image: Image.Image, size: int | None = None) -> Image.Image:
        """The image in the model's colour mode, cropped (``crop``), made square (letterbox or
        stretch) at ``size``."""
        size = size or self.input_size
        image = image.convert(self.mode) if image.mode != self.mode else image
        if self.crop == "fan":
            from fetalstudio.classification.fan import fan_crop

            image = fan_crop(image)
        if self.resize == "letterbox":
            width, height = image.size
            side = max(width, height)
            if width != height:
                canvas = Image.new(self.mode, (side, side), 0)
                canvas.paste(image, ((side - width) // 2, (side - height) // 2))
                image = canvas
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return image

    def to_array(self, image: Image.Image) -> np.ndarray:
        """H x W x C float32 in [0, 1]."""
        array = np.asarray(image, dtype=np.float32) / 255.0
        return array[:, :, None] if array.ndim == 2 else array

    def normalize(self, array: np.ndarray) -> torch.Tensor:
        """H x W x C array in [0, 1] -> C x H x W tensor, (x - mean) / std."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 1, -1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 1, -1)
        return torch.from_numpy(np.ascontiguousarray(((array - mean) / std).transpose(2, 0, 1)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_array(self.square(image)))


def _model_in_chans(model: torch.nn.Module | None) -> int | None:
    if model is None:
        return None
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return int(module.in_channels)
    return None


def classifier_details(model: torch.nn.Module) -> dict[str, str]:
    """The checkpoint metadata the loader attached to the model (empty for plain timm files)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    details = cfg.get("fetalstudio") if isinstance(cfg, dict) else None
    return dict(details or {})


class PlaneRanking:
    """``predict`` and ``top_k`` for anything with ``classes`` and ``probabilities(images)``."""

    classes: tuple[str, ...]

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        """One {plane: probability} per image (probabilities sum to 1)."""
        return [dict(zip(self.classes, map(float, row))) for row in self.probabilities(images)]

    def top_k(self, images: Sequence[Image.Image], k: int = 3) -> list[list[tuple[str, float]]]:
        """The k most likely planes per image, most likely first."""
        k = max(1, min(int(k), len(self.classes)))
        result = []
        for row in self.probabilities(images):
            order = np.argsort(-row, kind="stable")[:k]
            result.append([(self.classes[i], float(row[i])) for i in order])
        return result


class PlaneClassifier(PlaneRanking):
    """Predicts plane probabilities for PIL images with the checkpoint's own preprocessing.

    ``model`` is a timm classifier, e.g. ``ModelManager(...).get("bundled/fetalstudio-plane-classifier/model")``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocessing: Preprocessing | None = None,
        classes: Sequence[str] | None = None,
        batch_size: int = 32,
        hflip_tta: bool | None = None,
    ) -> None:
        details = classifier_details(model)
        self.model = model
        self.preprocessing = preprocessing or Preprocessing.from_details(details, model)
        if classes is None:
            classes = json.loads(details["classes"]) if details.get("classes") else None
        num_outputs = int(getattr(model, "num_classes", 0) or details.get("num_classes", 0) or 0)
        if classes is None:
            if num_outputs not in (0, len(PLANE_CLASSES)):
                raise FetalStudioError(
                    f"This classifier has {num_outputs} outputs but no class names in its metadata; "
                    f"a plane classifier has {len(PLANE_CLASSES)} ({', '.join(PLANE_CLASSES)}). Train it "
                    "with `python -m fetalstudio train classifier`, which records the classes."
                )
            classes = PLANE_CLASSES
        if num_outputs and num_outputs != len(classes):
            raise FetalStudioError(f"The checkpoint names {len(classes)} classes but the model has {num_outputs} outputs.")
        self.classes: tuple[str, ...] = tuple(classes)
        self.batch_size = max(1, int(batch_size))
        self.hflip_tta = (details.get("tta", "") == "hflip") if hflip_tta is None else bool(hflip_tta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(0, self.preprocessing.in_chans, self.preprocessing.input_size, self.preprocessing.input_size)
        return torch.stack([self.preprocessing(image) for image in images])

    @torch.inference_mode()
    def probabilities_from_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Softmax probabilities (N x classes) for already-preprocessed inputs."""
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = []
            for start in range(0, len(batch), self.batch_size):
                chunk = batch[start:start + self.batch_size].to(self.device, self.dtype)
                probs = torch.softmax(self.model(chunk).float(), dim=1)
                if self.hflip_tta:
                    probs = (probs + torch.softmax(self.model(torch.flip(chunk, dims=[3])).float(), dim=1)) / 2
                outputs.append(probs.cpu())
        finally:
            self.model.train(was_training)
        if not outputs:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return torch.cat(outputs).numpy()

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """N x classes array of probabilities, columns in ``self.classes`` order."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            rows.append(self.probabilities_from_tensor(self.prepare(images[start:start + self.batch_size])))
        return np.concatenate(rows) if rows else np.zeros((0, len(self.classes)), dtype=np.float32)
