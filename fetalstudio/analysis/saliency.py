"""Grad-CAM saliency: which parts of an image made a plane classifier choose a plane.

Grad-CAM here: timm models split into ``forward_features`` (the last convolutional feature map
A, N x C x h x w) and ``forward_head`` (pooling + linear -> logits). With y the chosen plane's
logit, the map is ``ReLU(sum_c mean_xy(dy/dA_c) * A_c)`` on the h x w feature grid. Only the head
is differentiated (the features are computed without a graph and then made a leaf), so the model's
parameters never get gradients and their ``requires_grad`` flags are not touched.

The grid covers the square the model saw, so the preprocessing geometry is undone exactly:
letterbox -> upsample the grid to the padded square canvas in original pixels (side = max(W, H)),
then crop the black padding that ``Preprocessing.square`` added (pasted at ((side-W)//2,
(side-H)//2)); stretch -> resize the grid straight to W x H. A checkpoint that predicts with
horizontal-flip TTA gets the mean of the image's map and the mirrored image's map, flipped back.
An ``EnsembleClassifier`` gets the mean of its members' maps (each normalised first, since
different backbones' activations are on different scales). The result is scaled to [0, 1] by its
maximum; a map with no positive evidence stays all zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from fetalstudio.classification.predict import PlaneClassifier, PlaneRanking
from fetalstudio.errors import FetalStudioError


@dataclass(frozen=True)
class Saliency:
    heatmap: np.ndarray  # float32, the original image's rows x columns, values in [0, 1]
    plane: str
    probability: float  # the classifier's probability for ``plane`` (as ``predict`` gives it)


def grad_cam(classifier: PlaneRanking, image: np.ndarray | Image.Image, plane: str | None = None) -> Saliency:
    """The Grad-CAM map of ``plane`` (default: the most likely plane) for one image.

    ``classifier`` is a ``PlaneClassifier`` or an ``EnsembleClassifier`` of them; ``image`` a
    grayscale (or RGB) uint8 array or a PIL image, in its original size.
    """
    picture = _as_pil(image)
    probabilities = classifier.probabilities([picture])[0]
    if plane is None:
        index = int(np.argmax(probabilities))
    elif plane in classifier.classes:
        index = classifier.classes.index(plane)
    else:
        raise FetalStudioError(f"This classifier does not know the plane {plane!r}; it knows {', '.join(classifier.classes)}.")
    members: Sequence[PlaneClassifier] = getattr(classifier, "members", None) or (classifier,)
    maps = [_normalised(_member_cam(member, picture, index)) for member in members]
    heatmap = _normalised(np.mean(maps, axis=0)) if len(maps) > 1 else maps[0]
    return Saliency(heatmap=heatmap, plane=classifier.classes[index], probability=float(probabilities[index]))


def saliency_overlay(gray: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The heatmap in the JET colour map (blue = none, red = most) blended over the image; RGB uint8."""
    gray = np.asarray(gray)
    if gray.ndim == 3 and gray.shape[2] == 3:
        base = gray.astype(np.uint8)
    elif gray.ndim == 2:
        base = np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    else:
        raise FetalStudioError(f"The overlay needs a grayscale (rows x columns) or RGB image, not one of shape {gray.shape}.")
    if heatmap.shape != base.shape[:2]:
        raise FetalStudioError(
            f"The heatmap is {heatmap.shape[1]}x{heatmap.shape[0]} but the image is {base.shape[1]}x{base.shape[0]}: "
            "compute the saliency for this same image (grad_cam returns the map in the image's own size)."
        )
    if not 0.0 <= opacity <= 1.0:
        raise FetalStudioError(f"The overlay opacity must be between 0 and 1, not {opacity}.")
    levels = np.clip(np.nan_to_num(heatmap) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(base, 1.0 - opacity, colour, opacity, 0.0)


# --- internals -------------------------------------------------------------------------------
def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise FetalStudioError(
            f"Saliency needs a uint8 grayscale or RGB image, not a {array.dtype} array of shape {array.shape} "
            "(load it with fetalstudio.imaging.image_input.load_image)."
        )
    return Image.fromarray(array)


def _member_cam(member: PlaneClassifier, picture: Image.Image, index: int) -> np.ndarray:
    """One classifier's raw (unnormalised) map for class ``index``, in the original image's pixels."""
    model = member.model
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise FetalStudioError(
            f"Saliency needs a timm classifier (forward_features/forward_head); {type(model).__name__} is not one."
        )
    batch = member.prepare([picture])
    if member.hflip_tta:
        batch = torch.cat([batch, torch.flip(batch, dims=[3])])
    was_training = model.training
    model.eval()
    try:
        # Inference tensors cannot take part in autograd: leave inference mode and clone the input.
        with torch.inference_mode(False), torch.enable_grad():
            batch = batch.clone().to(member.device, member.dtype)
            with torch.no_grad():
                features = model.forward_features(batch)
            grid = _grid_cam(model, features.detach().clone().requires_grad_(True), index)
    finally:
        model.train(was_training)
    if member.hflip_tta:
        grid = (grid[0] + grid[1][:, ::-1]) / 2
    else:
        grid = grid[0]
    return _to_original(grid, picture.size, member.preprocessing.resize)


def _grid_cam(model: torch.nn.Module, features: torch.Tensor, index: int) -> np.ndarray:
    """N x h x w Grad-CAM maps on the feature grid (float32, >= 0)."""
    if features.ndim != 4:
        raise FetalStudioError(
            f"Saliency (Grad-CAM) needs a convolutional backbone whose features are a 2-D map; "
            f"{type(model).__name__} gives features of shape {tuple(features.shape)} (e.g. a vision transformer's tokens). "
            "Use a CNN classifier such as resnet18 or efficientnet."
        )
    logits = model.forward_head(features)
    (gradients,) = torch.autograd.grad(logits[:, index].sum(), features)
    activations, gradients = features.detach().float(), gradients.float()
    channels = int(getattr(model, "num_features", 0) or 0)
    if channels and activations.shape[-1] == channels != activations.shape[1]:  # channels-last (e.g. Swin)
        activations, gradients = activations.permute(0, 3, 1, 2), gradients.permute(0, 3, 1, 2)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(dim=1)).cpu().numpy()


def _to_original(grid: np.ndarray, size: tuple[int, int], resize: str) -> np.ndarray:
    """A map on the model's square grid -> the original W x H image (undoing letterbox or stretch)."""
    width, height = size
    grid = np.ascontiguousarray(grid, dtype=np.float32)
    if resize != "letterbox":
        return cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)
    side = max(width, height)
    canvas = cv2.resize(grid, (side, side), interpolation=cv2.INTER_LINEAR)
    left, top = (side - width) // 2, (side - height) // 2
    return canvas[top:top + height, left:left + width]


def _normalised(heatmap: np.ndarray) -> np.ndarray:
    heatmap = np.maximum(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0)
    peak = float(heatmap.max()) if heatmap.size else 0.0
    return np.ascontiguousarray(heatmap / peak if peak > 0 else heatmap, dtype=np.float32)
