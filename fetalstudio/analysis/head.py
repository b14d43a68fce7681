"""One head, measured: segment it from a prompt (box, points, or the automatic mode), fit the
ellipse, and give HC/BPD/OFD in pixels and, with a pixel size, in millimetres.

The ellipse comes from the review workflow's extractor (the same threshold/contour/fit steps that
turn generated masks into annotations), so a predicted mask and a reviewed one are measured the
same way. A mask the extractor refuses (e.g. a blob that is not head-shaped) is still measured
with a plain ellipse fit, and the refusal is kept as ``reason`` so the user sees why it is doubtful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fetalstudio.analysis.segment import CachedPredictor, auto_box
from fetalstudio.errors import FetalStudioError
from fetalstudio.review.biometry import HeadBiometry, head_biometry
from fetalstudio.review.extract import extract_ellipse
from fetalstudio.segmentation.ellipse import Ellipse, fit_ellipse
from fetalstudio.segmentation.predictor import BoxPrediction

BOX_SOURCES = ("user", "auto", "none")
#: Classifier planes on which a head circumference means something (the trans-thalamic plane is
#: FETAL_PLANES_DB's "brain"); on the others a segmented "head" is some other round structure.
HEAD_PLANES = ("brain",)
NOT_HEAD_PLANE = "not a head plane: HC not meaningful"
#: Below this extractor quality (share of the contour on the fitted ellipse, see review.extract)
#: the ellipse follows the mask poorly. Measured with the bundled segmenter's automatic mode
#: (2-core EPYC, CPU): on 64 HC18 heads, the 61 good masks (Dice >= 0.9) had quality 0.24-0.97 and
#: the 3 bad ones (Dice 0.22-0.45) 0.19, 0.30 and 0.35; on FETAL_PLANES_DB images (12 per plane)
#: brain 0.39-0.85, abdomen 0.28-0.59, thorax 0.30-0.58, femur 0.18-0.42. Quality alone does not
#: tell a good head from a bad one, so the threshold sits below every good head mask seen (it
#: catches the worst masks only); the plane check is what flags abdomen, femur and thorax.
POOR_FIT_QUALITY = 0.2


@dataclass(frozen=True)
class HeadMeasurement:
    ellipse: Ellipse | None
    biometry: HeadBiometry | None
    quality: float | None  # the extractor's ellipse-fit quality, 0..1 (None for a plain fit)
    reason: str | None = None  # why the extractor refused the mask, if it did

    def as_dict(self) -> dict:
        values: dict = {"quality": self.quality, "reason": self.reason}
        values["ellipse"] = None if self.ellipse is None else {
            "center_x": self.ellipse.center_x, "center_y": self.ellipse.center_y, "axis_a": self.ellipse.axis_a,
            "axis_b": self.ellipse.axis_b, "angle_deg": self.ellipse.angle_deg,
        }
        values.update(self.biometry.as_dict() if self.biometry is not None else
                      {"hc_px": None, "bpd_px": None, "ofd_px": None, "pixel_size_mm": None, "hc_mm": None, "bpd_mm": None, "ofd_mm": None})
        return values


def measurement_warnings(plane: str | None, measurement: HeadMeasurement | None) -> list[str]:
    """Why a head measurement should not be trusted, as short phrases shown beside it (empty: none).

    ``plane`` is the classifier's top plane (None when it was not run); a poor or refused ellipse
    fit is flagged whatever the plane.
    """
    warnings = []
    if plane is not None and plane not in HEAD_PLANES:
        warnings.append(f"{NOT_HEAD_PLANE} (classified as {plane})")
    if measurement is not None and measurement.ellipse is not None:
        if measurement.quality is None:
            warnings.append(f"poor mask: {measurement.reason or 'not head-shaped'}; HC doubtful")
        elif measurement.quality < POOR_FIT_QUALITY:
            warnings.append(f"poor ellipse fit (quality {measurement.quality:.2f}); HC doubtful")
    return warnings


def measure_head(mask: np.ndarray, pixel_size_mm: float | None = None) -> HeadMeasurement:
    """Ellipse and biometry of a head mask (bool or 0/255, original pixels)."""
    binary = np.asarray(mask) > 0
    if not binary.any():
        return HeadMeasurement(None, None, None, "the mask is empty")
    extraction = extract_ellipse(binary.astype(np.uint8) * 255)
    if extraction.ok:
        ellipse, quality, reason = extraction.ellipse, extraction.quality, None
    else:
        ellipse, quality, reason = fit_ellipse(binary), None, extraction.reason
    if ellipse is None:
        return HeadMeasurement(None, None, None, reason or "no ellipse fits the mask")
    return HeadMeasurement(ellipse, head_biometry(ellipse, pixel_size_mm), quality, reason)


@dataclass(frozen=True)
class HeadResult:
    box: tuple[float, float, float, float] | None  # the box the mask came from (original pixels)
    box_source: str  # "user", "auto" (found by the automatic mode) or "none" (points only)
    candidates: tuple[BoxPrediction, ...]  # best predicted IoU first (one unless multimask)
    selected: int
    measurement: HeadMeasurement

    @property
    def prediction(self) -> BoxPrediction:
        return self.candidates[self.selected]

    @property
    def mask(self) -> np.ndarray:
        return self.prediction.mask

    @property
    def score(self) -> float:
        return self.prediction.score

    def select(self, index: int, pixel_size_mm: float | None) -> HeadResult:
        """The same prompt with another of the multimask candidates chosen (and measured)."""
        if not 0 <= index < len(self.candidates):
            raise FetalStudioError(f"There are {len(self.candidates)} candidate masks; choose 1 to {len(self.candidates)}.")
        return HeadResult(self.box, self.box_source, self.candidates, index, measure_head(self.candidates[index].mask, pixel_size_mm))

    def remeasure(self, pixel_size_mm: float | None) -> HeadResult:
        return self.select(self.selected, pixel_size_mm)


def segment_head(
    predictor: CachedPredictor,
    image: np.ndarray,
    *,
    box=None,
    points=None,
    point_labels=None,
    multimask: bool = False,
    auto: bool = False,
    pixel_size_mm: float | None = None,
) -> HeadResult:
    """Segment the head in ``image`` (grayscale, original pixels) and measure it.

    ``auto``: no user prompt; the box comes from ``auto_box`` (a coarse pass over candidate boxes)
    and the mask from a second pass with that box (points, if given, are added to it).
    """
    predictor.set_image(image)
    source = "user" if box is not None else "none"
    if auto:
        if box is not None:
            raise FetalStudioError("Give a box or use the automatic mode, not both.")
        found, _ = auto_box(predictor)
        box, source = found, "auto"
    if box is None and points is None:
        raise FetalStudioError("Draw a box around the head, click a point on it, or use the automatic mode.")
    if multimask:
        candidates = predictor.predictor.predict_candidates(box=box, points=points, point_labels=point_labels)
    else:
        candidates = [predictor.predict(box=box, points=points, point_labels=point_labels)]
    box_tuple = None if box is None else tuple(float(v) for v in np.asarray(box, np.float64).reshape(4))
    return HeadResult(box_tuple, source, tuple(candidates), 0, measure_head(candidates[0].mask, pixel_size_mm))
