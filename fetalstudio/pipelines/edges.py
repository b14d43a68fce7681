"""Edge conditions for a ControlNet, through controlnet_aux's own detectors.

An edge map keeps a scan's structure (skull, palate, nuchal line) while the generator re-draws its
texture: the condition for structure-preserving re-synthesis of a user's scan (issue 13).

- ``canny``: controlnet_aux's ``CannyDetector`` (OpenCV's Canny, thresholds ``low``/``high`` on the
  L1 gradient); needs no weights and works offline.
- ``hed``, ``pidinet``, ``lineart``: controlnet_aux's ``HEDdetector``, ``PidiNetDetector`` and
  ``LineartDetector``, loaded with ``from_pretrained(<local folder>)`` from the annotator weights of
  the ``lllyasviel/Annotators`` repository, laid out as that repository is
  (``ControlNetHED.pth``, ``table5_pidinet.pth``, ``sk_model.pth`` + ``sk_model2.pth``) in
  ``$FETALSTUDIO_ANNOTATORS`` or ``checkpoints/annotators/``. They are only ever given an existing
  local folder, so controlnet_aux never calls ``hf_hub_download`` (it does whenever the path is not
  a folder); a missing file is a :class:`FetalStudioError` naming the file, where to get it and
  where to put it.

Sizes: controlnet_aux resizes its input so the short side is ``detect_resolution`` and both sides
are multiples of 64, then resizes the map to ``image_resolution`` the same way. Here the image is
padded (edge pixels replicated) on the bottom and right to multiples of 64 and both resolutions are
its short side, so the detector runs at the image's own scale with no resampling, and the map is
cropped back: the result has the input's size exactly. Canny's result is then ``cv2.Canny`` on the
grayscale image, pixel for pixel (replicated padding is the border OpenCV's Canny uses for its Sobel
gradients), except possibly on the last row and column where padding was added: OpenCV's
non-maximum suppression takes the magnitude outside the image as 0, the padded image has real
neighbours there. Measured equal on first-trimester and HC18 scans (their borders are dark); on noise
a few pixels of that row / column differ.

Images are read as grayscale (ultrasound is grey; a coloured overlay counts by its luminance) and
the map comes back as RGB (R = G = B), white edges on black, as ControlNets take it. Everything runs
on the CPU in eval mode under ``torch.no_grad``: the same image and settings give the same pixels.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from fetalstudio import paths
from fetalstudio.errors import FetalStudioError
from fetalstudio.models.hashing import checkpoint_hash
from fetalstudio.pipelines.inpaint import as_rgb_image

EDGE_DETECTORS = ("canny", "hed", "pidinet", "lineart")
#: Weights each network detector reads, as named in the lllyasviel/Annotators repository.
ANNOTATOR_FILES: dict[str, tuple[str, ...]] = {
    "hed": ("ControlNetHED.pth",),
    "pidinet": ("table5_pidinet.pth",),
    "lineart": ("sk_model.pth", "sk_model2.pth"),
}
ANNOTATORS_REPO = "lllyasviel/Annotators"
ANNOTATORS_ENV = "FETALSTUDIO_ANNOTATORS"
#: controlnet_aux's detectors work on sides that are multiples of this.
DETECTOR_GRID = 64

_loaded: dict[tuple[str, str, tuple[int, ...]], Any] = {}
_load_lock = threading.Lock()


def default_annotators_dir() -> Path:
    """``$FETALSTUDIO_ANNOTATORS``, else ``annotators/`` in the checkpoints folder."""
    configured = os.environ.get(ANNOTATORS_ENV)
    return Path(configured).expanduser() if configured else paths.checkpoints_dir() / "annotators"


@dataclass(frozen=True)
class EdgeSettings:
    """Which detector made a condition, and Canny's thresholds (used by ``canny`` only)."""

    detector: str = "canny"
    low_threshold: float = 100
    high_threshold: float = 200

    def __post_init__(self) -> None:
        problems = []
        if self.detector not in EDGE_DETECTORS:
            problems.append(f"unknown edge detector {self.detector!r}; pick one of {', '.join(EDGE_DETECTORS)}")
        for name in ("low_threshold", "high_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 255:
                problems.append(f"the {name.replace('_', ' ')} must be a number from 0 to 255 (got {value!r})")
        if not problems and self.low_threshold > self.high_threshold:
            problems.append(f"the low threshold ({self.low_threshold:g}) is above the high threshold "
                            f"({self.high_threshold:g}); swap them")
        if problems:
            raise FetalStudioError("Edge map: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        if self.detector == "canny":
            return {"detector": self.detector, "low_threshold": self.low_threshold, "high_threshold": self.high_threshold}
        return {"detector": self.detector}


def annotator_files(detector: str, annotators_dir: Path | None = None) -> list[Path]:
    """The local weight files ``detector`` loads (none for Canny); a clear error when one is missing."""
    EdgeSettings(detector)
    names = ANNOTATOR_FILES.get(detector, ())
    folder = Path(annotators_dir) if annotators_dir is not None else default_annotators_dir()
    files = [folder / name for name in names]
    missing = [path for path in files if not path.is_file()]
    if missing:
        sources = ", ".join(f"https://huggingface.co/{ANNOTATORS_REPO}/resolve/main/{path.name}" for path in missing)
        several = len(missing) > 1
        raise FetalStudioError(
            f"The {detector} edge detector needs {' and '.join(path.name for path in missing)}, which "
            f"{'are' if several else 'is'} not in {folder}. Download {sources} (the {ANNOTATORS_REPO} "
            f"repository on Hugging Face) on a machine with internet access and put {'them' if several else 'it'} "
            f"in {folder} (or point ${ANNOTATORS_ENV} at the folder that holds {'them' if several else 'it'}). "
            "The canny detector needs no weights and works offline."
        )
    return files


def edge_settings_record(settings: EdgeSettings, annotators_dir: Path | None = None) -> dict[str, Any]:
    """What a run records about its edge condition: detector, thresholds, controlnet_aux version and
    the weights' names and hashes (network detectors)."""
    from importlib.metadata import version

    record = {**settings.to_dict(), "controlnet_aux": version("controlnet-aux")}
    files = annotator_files(settings.detector, annotators_dir)
    if files:
        record["weights"] = {path.name: checkpoint_hash(path) for path in files}
    return record


def _as_gray(image: Image.Image | np.ndarray) -> np.ndarray:
    if not isinstance(image, (Image.Image, np.ndarray)):
        raise FetalStudioError(f"Edge map: expected an image (a PIL image or a uint8 array), got {type(image).__name__}.")
    if isinstance(image, np.ndarray) and image.size == 0:
        raise FetalStudioError(f"Edge map: the image is empty (shape {image.shape}).")
    if isinstance(image, Image.Image) and 0 in image.size:
        raise FetalStudioError(f"Edge map: the image is empty ({image.width} x {image.height}).")
    return np.asarray(as_rgb_image(image, "image to draw edges of").convert("L"))


def _load_detector(detector: str, files: list[Path]) -> Any:
    """controlnet_aux's detector from its local weights, loaded once per file version."""
    key = (detector, str(files[0].parent.resolve()), tuple(path.stat().st_mtime_ns for path in files))
    with _load_lock:
        if key in _loaded:
            return _loaded[key]
        classes = _controlnet_aux()
        folder = str(files[0].parent)
        try:  # a folder (never a repo id), so from_pretrained reads the files and never downloads
            if detector == "lineart":
                loaded = classes[detector].from_pretrained(folder, filename=files[0].name, coarse_filename=files[1].name)
            else:
                loaded = classes[detector].from_pretrained(folder, filename=files[0].name)
        except Exception as error:  # torch.load / load_state_dict: truncated, corrupt or another network's file
            raise FetalStudioError(
                f"The {detector} edge detector's weights in {folder} could not be read ({type(error).__name__}: "
                f"{str(error)[:200]}). Download {', '.join(path.name for path in files)} again from "
                f"https://huggingface.co/{ANNOTATORS_REPO}; the canny detector needs no weights."
            ) from error
        _loaded[key] = loaded
        return loaded


def _controlnet_aux() -> dict[str, Any]:
    with warnings.catch_warnings():  # its package import warns about optional extras (mediapipe, timm aliases)
        warnings.simplefilter("ignore")
        from controlnet_aux import CannyDetector, HEDdetector, LineartDetector, PidiNetDetector
    return {"canny": CannyDetector, "hed": HEDdetector, "pidinet": PidiNetDetector, "lineart": LineartDetector}


def edge_map(
    image: Image.Image | np.ndarray,
    detector: str = "canny",
    *,
    low_threshold: float = 100,
    high_threshold: float = 200,
    annotators_dir: Path | None = None,
) -> Image.Image:
    """An RGB edge map (white edges on black) of ``image``, at the image's own size.

    ``detector`` is one of :data:`EDGE_DETECTORS`; the thresholds are Canny's (0-255, low <= high);
    ``annotators_dir`` holds the network detectors' weights (default :func:`default_annotators_dir`).
    """
    settings = EdgeSettings(detector, low_threshold, high_threshold)
    gray = _as_gray(image)
    height, width = gray.shape
    padded = cv2.copyMakeBorder(gray, 0, -height % DETECTOR_GRID, 0, -width % DETECTOR_GRID, cv2.BORDER_REPLICATE)
    resolution = min(padded.shape)  # scale 1: controlnet_aux's resize keeps the padded size as it is
    rgb = np.repeat(padded[..., None], 3, axis=2)
    if detector == "canny":
        canny = _controlnet_aux()["canny"]()
        found = canny(rgb, low_threshold=settings.low_threshold, high_threshold=settings.high_threshold,
                      detect_resolution=resolution, image_resolution=resolution, output_type="np")
    else:
        model = _load_detector(detector, annotator_files(detector, annotators_dir))
        found = np.asarray(model(rgb, detect_resolution=resolution, image_resolution=resolution, output_type="np"))
    if found.shape[:2] != padded.shape:  # controlnet_aux changed its resizing: say so rather than draw a shifted map
        raise FetalStudioError(
            f"Edge map: controlnet_aux's {detector} detector returned {found.shape[1]} x {found.shape[0]} for a "
            f"{padded.shape[1]} x {padded.shape[0]} input; this controlnet-aux version is not supported (use 0.0.10)."
        )
    edges = np.ascontiguousarray(found[:height, :width, 0])  # controlnet_aux already inverts lineart to white on black
    return Image.fromarray(edges, "L").convert("RGB")
