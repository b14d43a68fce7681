"""One head, measured: segment it from a prompt (box, points, or the automatic mode), fit the
ellipse, and give HC/BPD/OFD in pixels and, with a pixel size, in millimetres.

The ellipse comes from the review workflow's extractor (the same threshold/contour/fit steps that
turn generated masks into annotations), so a predicted mask and a reviewed one are measured the
same way. A mask the extractor refuses (e.g. a blob that is not head-shaped) is still measured
with a plain ellipse fit, and the refusal is kept as ``reason`` so the user sees why it is doubtful.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fetalstudio.analysis.segment import CachedPredictor, auto_head, box_head
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.biometry import HeadBiometry, head_biometry
from fetalstudio.imaging.ellipse import Ellipse, fit_ellipse
from fetalstudio.imaging.extract import FAIR_FIT_QUALITY, extract_ellipse
from fetalstudio.segmentation.predictor import BoxPrediction

BOX_SOURCES = ("user", "auto", "none")
#: Classifier planes on which a head circumference means something (the trans-thalamic plane is
#: FETAL_PLANES_DB's "brain"); on the others a segmented "head" is some other round structure.
HEAD_PLANES = ("brain",)
NOT_HEAD_PLANE = "not a head plane: HC not meaningful"
#: A plane is called "not a head plane" only when the classifier gives the head planes less than
#: this probability (and does not rank brain first), so a real head is seldom flagged. Measured with the
#: bundled classifier of issue 15 (CPU, 2026-12-02): P(brain) < 0.1 flags none of the 53 African brain
#: planes (the unseen population), 3 % of 115 HC18 heads and none of the 20 es_heads (both were training
#: data as brain), and 42 % / 53 % / 17 % of the African abdomen / femur / thorax planes (0.2 would flag
#: 2 % of the African brains; 0.05 only 11 % / 32 % / 7 % of the other planes). With its hflip TTA.
NOT_HEAD_MAX_PROBABILITY = 0.1
#: Below this extractor quality the ellipse follows the mask poorly (the "poor" band of
#: imaging.extract.fit_label). Bundled segmenter, automatic mode, 104 HC18 heads (2-core EPYC, CPU):
#: every mask with Dice < 0.6 (6) had quality 0.19-0.42, while good masks (Dice >= 0.9) lie at
#: 0.24-0.97, median about 0.75, with about 6 % under 0.45: the flag catches the failed masks at the
#: cost of asking to check a few good ones.
POOR_FIT_QUALITY = FAIR_FIT_QUALITY


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


def is_head_plane(planes: Mapping[str, float] | None) -> bool | None:
    """Whether the classifier's probabilities (plane -> p) allow a head plane (None: not classified)."""
    if not planes:
        return None
    top = max(planes, key=planes.get)
    return top in HEAD_PLANES or sum(planes.get(p, 0.0) for p in HEAD_PLANES) >= NOT_HEAD_MAX_PROBABILITY


def not_head_plane_note(planes: Mapping[str, float]) -> str:
    """"classified as femur, p 0.83; brain p 0.04": why the plane is not a head plane."""
    top = max(planes, key=planes.get)
    heads = ", ".join(f"{p} p {planes.get(p, 0.0):.2f}" for p in HEAD_PLANES)
    return f"classified as {top}, p {planes[top]:.2f}; {heads}"


def measurement_warnings(planes: Mapping[str, float] | None, measurement: HeadMeasurement | None) -> list[str]:
    """Why a head measurement should not be trusted, as short phrases shown beside it (empty: none).

    ``planes`` are the classifier's probabilities (None when it was not run; see
    ``NOT_HEAD_MAX_PROBABILITY``); a poor or refused ellipse fit is flagged whatever the plane.
    """
    warnings = []
    if is_head_plane(planes) is False:
        warnings.append(f"{NOT_HEAD_PLANE} ({not_head_plane_note(planes)})")
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
    fused_with_head_unet: bool = False  # a box prompt whose mask combines the head U-Net's map (``box_head``)

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
        return HeadResult(self.box, self.box_source, self.candidates, index, measure_head(self.candidates[index].mask, pixel_size_mm),
                          self.fused_with_head_unet)

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

    ``auto``: no user prompt; box and mask come from ``auto_head`` (the head U-Net when one is
    installed, else the box search ``auto_box`` and a second pass with its box). With points or
    ``multimask`` the automatic box prompts the box-prompted segmenter together with the points.
    A box alone goes through ``box_head``: with a head U-Net installed, its map refines the box-prompted
    segmenter's mask when both see the same head (``HeadResult.fused_with_head_unet``).
    """
    predictor.set_image(image)
    source = "user" if box is not None else "none"
    if auto:
        if box is not None:
            raise FetalStudioError("Give a box or use the automatic mode, not both.")
        box, automatic = auto_head(predictor, image)
        source = "auto"
        if points is None and not multimask:
            return HeadResult(box, source, (automatic,), 0, measure_head(automatic.mask, pixel_size_mm))
    if box is None and points is None:
        raise FetalStudioError("Draw a box around the head, click a point on it, or use the automatic mode.")
    box_tuple = None if box is None else tuple(float(v) for v in np.asarray(box, np.float64).reshape(4))
    if box is not None and points is None and not multimask:
        prediction, fused = box_head(predictor, image, box)
        return HeadResult(box_tuple, source, (prediction,), 0, measure_head(prediction.mask, pixel_size_mm), fused)
    if multimask:
        candidates = predictor.predictor.predict_candidates(box=box, points=points, point_labels=point_labels)
    else:
        candidates = [predictor.predict(box=box, points=points, point_labels=point_labels)]
    return HeadResult(box_tuple, source, tuple(candidates), 0, measure_head(candidates[0].mask, pixel_size_mm))
