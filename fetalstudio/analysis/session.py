"""One user's interactive analysis: the loaded image, its prompts and the latest results.

The Analysis tab keeps one ``AnalysisSession`` per browser session (segment-anything's predictor
holds "the current image" and must not be shared between users); the CLI makes one per run.
Results are saved with atomic writes: a mask PNG (0/255, original pixels) and a measurements JSON.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fetalstudio
from fetalstudio.analysis.head import HeadResult, measurement_warnings, segment_head
from fetalstudio.analysis.picture import analysis_picture
from fetalstudio.analysis.segment import CachedPredictor
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import atomic_write_bytes, write_png
from fetalstudio.imaging.image_input import LoadedImage, load_image
from fetalstudio.segmentation.predictor import checked_box, checked_points


def checked_pixel_size(value) -> float | None:
    """A typed pixel size (mm per pixel): empty/0/None means unknown; otherwise a positive, plausible number."""
    if value is None or value == "":
        return None
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise FetalStudioError(f"The pixel size must be a number of mm per pixel (e.g. 0.1), not {value!r}.") from None
    if size == 0:
        return None
    if not np.isfinite(size) or size < 0 or size > 10:
        raise FetalStudioError(f"A pixel size of {size} mm per pixel is not plausible: ultrasound pixels are about 0.03-1 mm. "
                               "Leave it empty (0) if you do not know it.")
    return size


@dataclass
class AnalysisSession:
    image: LoadedImage | None = None
    pixel_size_mm: float | None = None
    pixel_size_source: str | None = None  # "dicom" or "typed"
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    planes: list[tuple[str, float]] | None = None  # every class, most likely first
    result: HeadResult | None = None
    model_ids: dict[str, str] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # --- image -----------------------------------------------------------------------------
    def load(self, path: str | Path, frame: int = 0) -> LoadedImage:
        image = load_image(path, frame)
        with self.lock:
            self.image = image
            self.pixel_size_mm = image.pixel_size_mm
            self.pixel_size_source = "dicom" if image.pixel_size_mm is not None else None
            self.clear_prompts()
            self.planes = None
        return image

    def require_image(self) -> LoadedImage:
        if self.image is None:
            raise FetalStudioError("Load an image first (upload one, or pick one from the examples).")
        return self.image

    def set_pixel_size(self, value) -> None:
        size = checked_pixel_size(value)
        with self.lock:
            if size != self.pixel_size_mm:
                self.pixel_size_mm, self.pixel_size_source = size, ("typed" if size is not None else None)
            if self.result is not None:
                self.result = self.result.remeasure(self.pixel_size_mm)

    # --- prompts ---------------------------------------------------------------------------
    def clear_prompts(self) -> None:
        with self.lock:
            self.box, self.points, self.point_labels, self.result = None, [], [], None

    def set_box(self, box) -> None:
        image = self.require_image()
        clipped = checked_box(box, image.gray.shape)
        with self.lock:
            self.box = tuple(float(v) for v in clipped)

    def add_point(self, x: float, y: float, positive: bool = True) -> None:
        image = self.require_image()
        checked_points([(x, y)], image.gray.shape)
        with self.lock:
            self.points.append((float(x), float(y)))
            self.point_labels.append(1 if positive else 0)

    # --- models ----------------------------------------------------------------------------
    def encode(self, predictor: CachedPredictor) -> bool:
        """Compute (or restore) the image embedding, and the head U-Net's map when one is installed, now,
        so the first prompt is fast. True when the image encoder ran."""
        with self.lock:
            gray = self.require_image().gray
            encoded = predictor.set_image(gray)
            predictor.head_window(gray)
            return encoded

    def classify(self, classifier, k: int = 3) -> list[tuple[str, float]]:
        from PIL import Image

        image = self.require_image()
        ranking = classifier.top_k([Image.fromarray(image.gray)], len(classifier.classes))[0]
        with self.lock:
            self.planes = ranking  # every plane: the head-plane check needs the head planes' probability
        return ranking[:k]

    def segment(self, predictor: CachedPredictor, multimask: bool = False, auto: bool = False) -> HeadResult:
        image = self.require_image()
        with self.lock:
            points = self.points or None
            labels = self.point_labels or None
            box = None if auto else self.box
            result = segment_head(predictor, image.gray, box=box, points=points, point_labels=labels, multimask=multimask,
                                  auto=auto, pixel_size_mm=self.pixel_size_mm)
            if auto:
                self.box = result.box
            self.result = result
        return result

    def choose_candidate(self, index: int) -> HeadResult:
        with self.lock:
            if self.result is None:
                raise FetalStudioError("Segment first: draw a box or click on the head.")
            self.result = self.result.select(index, self.pixel_size_mm)
            return self.result

    # --- outputs ---------------------------------------------------------------------------
    def warnings(self) -> list[str]:
        """Why the current head measurement should not be trusted (empty: no reason, or nothing
        measured): the classifier's top plane is not a head plane, or the ellipse fits poorly."""
        with self.lock:
            if self.result is None:
                return []
            return measurement_warnings(dict(self.planes) if self.planes else None, self.result.measurement)

    def picture(self, opacity: float = 0.4) -> np.ndarray:
        image = self.require_image()
        result = self.result
        return analysis_picture(
            image.gray,
            None if result is None else result.mask,
            None if result is None else result.measurement.ellipse,
            self.box, self.points, self.point_labels, opacity,
        )

    def measurements(self) -> dict:
        """JSON-ready record of this analysis (technical image facts only: nothing identifying)."""
        image = self.require_image()
        result = self.result
        record = {
            "fetalstudio_version": fetalstudio.__version__,
            "file": image.path.name,
            "kind": image.kind,
            "frame": image.frame,
            "width": image.size[0],
            "height": image.size[1],
            "pixel_size_mm": self.pixel_size_mm,
            "pixel_size_source": self.pixel_size_source,
            "models": dict(self.model_ids),
            "planes": None if self.planes is None else [{"plane": p, "probability": q} for p, q in self.planes],
            "prompt": {"box": list(self.box) if self.box else None, "points": [list(p) for p in self.points],
                       "point_labels": list(self.point_labels)},
        }
        if result is not None:
            record["segmentation"] = {
                "box_source": result.box_source,
                "head_unet_fusion": result.fused_with_head_unet,
                "score": result.score,
                "candidate_scores": [c.score for c in result.candidates],
                "selected_candidate": result.selected,
                "mask_pixels": int(result.mask.sum()),
            }
            record["head"] = result.measurement.as_dict()
            record["warnings"] = self.warnings()
        return record

    def save_outputs(self, folder: Path) -> tuple[Path, Path]:
        """Write ``<stem>_mask.png`` (0/255, original pixels) and ``<stem>_measurements.json`` atomically."""
        image = self.require_image()
        if self.result is None:
            raise FetalStudioError("There is no mask to save yet: segment the head first.")
        folder.mkdir(parents=True, exist_ok=True)
        stem = image.path.stem if image.frame_count == 1 else f"{image.path.stem}_frame{image.frame}"
        mask_path, json_path = folder / f"{stem}_mask.png", folder / f"{stem}_measurements.json"
        write_png(mask_path, self.result.mask.astype(np.uint8) * 255)
        atomic_write_bytes(json_path, (json.dumps(self.measurements(), indent=2) + "\n").encode())
        return mask_path, json_path
