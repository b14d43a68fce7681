"""The Ellipse Extractor (METHODS section 2): a head mask channel in, a filled head ellipse out.

``extract_ellipse`` thresholds a mask channel (default 127), finds the head contour with OpenCV,
fits an ellipse to it (``cv2.fitEllipse``) and fills the ellipse to a binary mask. It takes the
grayscale mask channel of a generated image+mask pair (``mask_injection.unpack``) as well as a real
annotation, filled or drawn as an ellipse outline (HC18, es_heads).

Head-contour rule
-----------------
1. Threshold: pixels *above* ``threshold`` are mask.
2. Lone speckle pixels (fewer than 2 mask neighbours) are dropped, then a morphological closing
   (elliptic kernel, radius 0.4 % of the shorter frame side, at least 1 px) fills pinholes and
   notches; it keeps a thin ring a ring.
3. Every external contour of that is either an **outline** (a thin ring or arc: hole filling at
   least doubles it, or its widest point is under 5 % of its extent, the test of
   ``imaging.ellipse.is_outline``) or a **filled region**.

   - Outline: the ellipse is fitted to all its thresholded pixels, i.e. to the ring's centre line
     as ``fill_outline`` does (HC error 0.009 mm on HC18), with the inlier refit below (no change
     for a clean ring). Other arcs lying on that ellipse (an outline cut in two) join the fit.
   - Filled region: a morphological opening (same kernel) removes speckle and thin bridges to
     blobs; the external contour is the region with its holes filled. The ellipse is fitted to the
     contour points that are not on the frame border (a head cut off by the frame must not be
     fitted to the frame edge, as ``fit_ellipse``), then refitted up to twice on the points within
     the tolerance (below) of the ellipse, so a blob merged with the head does not pull the fit.
4. The head is the **largest plausible** candidate (area: the filled contour, or for an outline
   the fitted ellipse inside the frame). Plausible: area at least ``min_area_fraction`` of the
   frame and at most ``max_area_fraction``, a valid fit, minor/major axis ratio at least
   ``min_axis_ratio``, at most ``max_border_fraction`` of the contour on the frame border and at
   least ``min_inside_fraction`` of the ellipse inside the frame. When none is plausible, ``reason`` says why the
   largest candidate was rejected and what to do.

Quality
-------
``quality`` is the share of the head contour's points (outline pixels for an outline, contour
points off the frame border for a filled region) that lie within a tolerance of the fitted ellipse:
max(2 px, 2 % of the semi-minor axis), measured as the Sampson distance (first-order distance to
the ellipse). 1.0 is a clean ellipse; a region with a bump or a merged blob scores the share of its
contour that is on the ellipse; a shape that is no ellipse scores low.

Only numpy and OpenCV are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fetalstudio.imaging.ellipse import Ellipse, _fit_points, _is_thin

DEFAULT_THRESHOLD = 127
#: A head must cover at least this share of the frame (0.5 %: ~2,200 px on 800x540, ~330 px on 256x256).
MIN_AREA_FRACTION = 0.005
#: A head region covering more than this share of the frame is the image, not a mask.
MAX_AREA_FRACTION = 0.9
#: Minor/major axis ratio below this is a streak, not a head (fetal heads: about 0.6-0.95).
MIN_AXIS_RATIO = 0.3
#: A filled region with more of its contour on the frame border is mostly outside the frame.
MAX_BORDER_FRACTION = 0.5
#: At least this share of the fitted ellipse must lie inside the frame.
MIN_INSIDE_FRACTION = 0.5

_KERNEL_FRACTION = 0.004  # morphology kernel radius as a share of the shorter frame side
_TOLERANCE_PX = 2.0  # quality/inlier tolerance: max(this, _TOLERANCE_FRACTION x semi-minor axis)
_TOLERANCE_FRACTION = 0.02
_REFITS = 2
_MIN_INLIER_SHARE = 0.5  # refit on inliers only when at least this share of the points are inliers
_ARC_ON_ELLIPSE_SHARE = 0.8  # another outline arc joins the fit when this share of it is on the ellipse


@dataclass(frozen=True, eq=False)
class Extraction:
    """What the extractor found in one mask channel.

    ``mask`` is the filled ellipse (bool, the input's rows x columns; all False on failure),
    ``reason`` is None on success and otherwise says what went wrong and what to do,
    ``contour_area`` is the head region's area in pixels (0 when nothing was found) and ``kind``
    tells whether the head came from an ``"outline"`` or a ``"filled"`` region ("" on failure).
    """

    ellipse: Ellipse | None
    mask: np.ndarray
    quality: float
    reason: str | None
    threshold: int
    contour_area: float
    kind: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None and self.ellipse is not None

    def as_dict(self) -> dict:
        """JSON-ready values: the ellipse parameters (None on failure), quality, reason, threshold."""
        e = self.ellipse
        return {
            "ok": self.ok,
            "center_x": None if e is None else e.center_x,
            "center_y": None if e is None else e.center_y,
            "axis_a": None if e is None else e.axis_a,
            "axis_b": None if e is None else e.axis_b,
            "angle_deg": None if e is None else e.angle_deg,
            "quality": self.quality,
            "reason": self.reason,
            "threshold": self.threshold,
            "contour_area": self.contour_area,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class HeadRules:
    """The plausibility limits of the head-contour rule (see the module docstring)."""

    min_area_fraction: float = MIN_AREA_FRACTION
    max_area_fraction: float = MAX_AREA_FRACTION
    min_axis_ratio: float = MIN_AXIS_RATIO
    max_border_fraction: float = MAX_BORDER_FRACTION
    min_inside_fraction: float = MIN_INSIDE_FRACTION


@dataclass(eq=False)
class _Candidate:
    kind: str  # "outline" or "filled"
    area: float
    points: np.ndarray  # N x 2 (x, y) points the ellipse is fitted to
    border_fraction: float = 0.0
    ellipse: Ellipse | None = None
    mask: np.ndarray | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- input


def as_mask_channel(mask: np.ndarray, channel: int | None = None) -> np.ndarray:
    """The mask channel as a 2-D uint8 array (0..255).

    Accepts rows x columns, rows x columns x 1 and rows x columns x 3/4 (RGB(A); alpha ignored).
    For a colour input ``channel`` picks one channel (0 = red); without it the maximum over the
    colour channels is taken, so a grey or single-colour annotation counts wherever it is drawn.
    For a generated image+mask pair give the mask channel (the other channels hold the image).
    ``channel`` is ignored for 2-D input. bool and 0/1 masks become 0/255; float masks in 0..1
    are scaled to 0..255, floats in 0..255 are rounded.
    """
    array = np.asarray(mask)
    if array.ndim == 3:
        array = _pick_channel(array, channel)
    if array.ndim != 2:
        raise ValueError(
            f"A mask channel must be a 2-D array (rows x columns) or rows x columns x 3, not shape {array.shape}."
        )
    if min(array.shape) < 2:
        raise ValueError(f"The mask is {array.shape[1]}x{array.shape[0]} pixels: too small to hold a head.")
    return _to_uint8(array)


def _pick_channel(array: np.ndarray, channel: int | None) -> np.ndarray:
    channels = array.shape[2]
    if channels == 1:
        return array[..., 0]
    if channels not in (3, 4):
        raise ValueError(f"A colour mask must have 1, 3 or 4 channels, not {channels} (shape {array.shape}).")
    if channel is None:
        return array[..., :3].max(axis=2)
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= channel < 3:
        raise ValueError(f"channel must be 0, 1 or 2 (red, green, blue), not {channel!r}.")
    return array[..., int(channel)]


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"Mask values must lie in 0..255 (8-bit), found {low}..{high}.")
        return array.astype(np.uint8) * (255 if high <= 1 else 1)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("The mask holds NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"A float mask must hold 0..1 or 0..255, found {low:g}..{high:g}.")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.round(array * scale).astype(np.uint8)
    raise ValueError(f"A mask must be numeric or boolean, not {array.dtype}.")


def check_threshold(threshold: int) -> int:
    """``threshold`` as an int in 0..254 (pixels above it are mask), else ValueError."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)):
        if not (isinstance(threshold, float) and threshold.is_integer()):
            raise ValueError(f"The threshold must be a whole number in 0..254, not {threshold!r}.")
    if not 0 <= threshold <= 254:
        raise ValueError(f"The threshold must be in 0..254 (pixels above it count as mask), not {threshold}.")
    return int(threshold)


# --------------------------------------------------------------------------- geometry


def ellipse_distances(ellipse: Ellipse, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sampson (first-order) distance in pixels of each point to the ellipse's curve."""
    theta = math.radians(ellipse.angle_deg)
    dx, dy = np.asarray(xs, np.float64) - ellipse.center_x, np.asarray(ys, np.float64) - ellipse.center_y
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    a2, b2 = ellipse.axis_a ** 2, ellipse.axis_b ** 2
    implicit = u * u / a2 + v * v / b2 - 1.0
    gradient = 2.0 * np.hypot(u / a2, v / b2)
    return np.abs(implicit) / np.maximum(gradient, 1e-9)


def _tolerance(ellipse: Ellipse) -> float:
    return max(_TOLERANCE_PX, _TOLERANCE_FRACTION * min(ellipse.axis_a, ellipse.axis_b))


def _inliers(ellipse: Ellipse, points: np.ndarray) -> np.ndarray:
    return ellipse_distances(ellipse, points[:, 0], points[:, 1]) <= _tolerance(ellipse)


def _robust_fit(points: np.ndarray) -> Ellipse | None:
    """Fit, then refit on the points near the ellipse (a merged blob's contour drops out)."""
    ellipse = _fit_points(points[:, 0], points[:, 1])
    for _ in range(_REFITS):
        if ellipse is None:
            return None
        keep = _inliers(ellipse, points)
        if keep.all() or keep.sum() < max(5, _MIN_INLIER_SHARE * len(points)):
            break
        refit = _fit_points(points[keep, 0], points[keep, 1])
        if refit is None:
            break
        ellipse = refit
    return ellipse


#: Quality bands for people, from the bundled segmenter's masks of 104 HC18 heads (see
#: analysis.head.POOR_FIT_QUALITY): "good" — as most correct head masks (their median is about
#: 0.75; HC18 annotations score 1.0); "fair" — part of the contour (a bump, a merged blob) is off:
#: check it; "poor" — where the failed masks lie: the ellipse, and any HC from it, is doubtful.
GOOD_FIT_QUALITY = 0.6
FAIR_FIT_QUALITY = 0.45


def fit_label(quality: float) -> str:
    """"fit 0.57 — fair (57 % of the contour on the ellipse; good ≥ 0.9)": the score with its meaning."""
    band = "good" if quality >= GOOD_FIT_QUALITY else "fair" if quality >= FAIR_FIT_QUALITY else "poor"
    return f"fit {quality:.2f} — {band} ({quality:.0%} of the contour on the ellipse; good ≥ {GOOD_FIT_QUALITY:g})"


def _quality(ellipse: Ellipse, points: np.ndarray) -> float:
    return float(_inliers(ellipse, points).mean()) if len(points) else 0.0


def _kernel(shape: tuple[int, int]) -> np.ndarray:
    radius = max(1, int(round(_KERNEL_FRACTION * min(shape))))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True, eq=False)
class _Region:
    """One external contour of the closed mask: its bounding box and, inside it, its pixels."""

    x: int
    y: int
    pixels: np.ndarray  # bool crop: the region's (closed) mask pixels
    enclosed: np.ndarray  # bool crop: the contour filled (pixels + holes)

    @property
    def window(self) -> tuple[slice, slice]:
        rows, cols = self.pixels.shape
        return slice(self.y, self.y + rows), slice(self.x, self.x + cols)

    def is_outline(self) -> bool:
        """A thin ring or arc, as ``imaging.ellipse.is_outline`` decides it."""
        count = int(self.pixels.sum())
        return count >= 5 and (int(self.enclosed.sum()) >= 2 * count or _is_thin(self.pixels))

    def points(self, binary: np.ndarray) -> np.ndarray:
        """N x 2 (x, y) of the thresholded (not closed) mask pixels of this region."""
        ys, xs = np.nonzero(binary[self.window] & self.pixels)
        return np.stack([xs + self.x, ys + self.y], axis=1)


def _regions(closed: np.ndarray, min_box_area: float) -> list[_Region]:
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    regions = []
    for contour in contours:
        x, y, width, height = cv2.boundingRect(contour)
        if width * height < min_box_area:
            continue  # too small to be a head, whatever it is
        enclosed = np.zeros((height, width), np.uint8)
        cv2.drawContours(enclosed, [contour], -1, 1, thickness=cv2.FILLED, offset=(-x, -y))
        regions.append(_Region(x, y, _component(closed[y:y + height, x:x + width], contour[0, 0] - (x, y)), enclosed.astype(bool)))
    return regions


def _component(crop: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The 8-connected pixels of ``crop`` connected to ``seed`` (x, y), without islands in its holes."""
    flooded = crop.copy()
    flood_mask = np.zeros((crop.shape[0] + 2, crop.shape[1] + 2), np.uint8)
    cv2.floodFill(flooded, flood_mask, (int(seed[0]), int(seed[1])), 2, flags=8)
    return flooded == 2


def _drop_isolated(binary: np.ndarray) -> np.ndarray:
    """``binary`` without pixels that have fewer than 2 neighbours (lone speckle; a 1-px line keeps)."""
    counts = cv2.boxFilter(binary.astype(np.uint8), -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    return binary & (counts >= 3)


def _outline_candidates(binary: np.ndarray, outlines: list[_Region]) -> list[_Candidate]:
    """One candidate per outline (largest first), with the other arcs on its ellipse joined in."""
    arcs = [points for points in (region.points(binary) for region in outlines) if len(points) >= 5]
    arcs.sort(key=len, reverse=True)
    candidates, used = [], set()
    for index, points in enumerate(arcs):
        if index in used:
            continue
        ellipse = _robust_fit(points)
        joined = [index]
        if ellipse is not None:
            joined += [other for other in range(index + 1, len(arcs))
                       if other not in used and _inliers(ellipse, arcs[other]).mean() >= _ARC_ON_ELLIPSE_SHARE]
        used.update(joined)
        if len(joined) > 1:
            points = np.concatenate([arcs[k] for k in joined])
            ellipse = _robust_fit(points)
        candidate = _Candidate("outline", 0.0, points, ellipse=ellipse)
        if ellipse is not None:
            candidate.mask = ellipse.to_mask(binary.shape)
            candidate.area = float(candidate.mask.sum())
        candidates.append(candidate)
    return candidates


def _filled_candidates(closed: np.ndarray, kernel: np.ndarray) -> list[_Candidate]:
    """One candidate per external contour of the opened regions (holes filled)."""
    opened = cv2.morphologyEx(closed, cv2.MORPH_OPEN, kernel)
    contours, _ = cv2.findContours(opened, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    rows, cols = closed.shape
    candidates = []
    for contour in contours:
        points = contour.reshape(-1, 2)
        on_border = (points[:, 0] <= 0) | (points[:, 1] <= 0) | (points[:, 0] >= cols - 1) | (points[:, 1] >= rows - 1)
        area = float(cv2.contourArea(contour)) + len(points) / 2.0  # pixel area: polygon + half the boundary pixels
        candidates.append(_Candidate("filled", area, points[~on_border], border_fraction=float(on_border.mean())))
    return candidates


def _candidates(binary: np.ndarray, min_area: float) -> list[_Candidate]:
    """Outline and filled-region candidates, largest first."""
    kernel = _kernel(binary.shape)
    closed = cv2.morphologyEx(_drop_isolated(binary).astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    outlines = [region for region in _regions(closed, min_area / 4) if region.is_outline()]
    for region in outlines:  # an outline must not also be taken for a filled region
        closed[region.window][region.pixels] = 0
    candidates = _outline_candidates(binary, outlines) + _filled_candidates(closed, kernel)
    return sorted(candidates, key=lambda c: -c.area)


def _rejection(candidate: _Candidate, shape: tuple[int, int], rules: HeadRules) -> str | None:
    """Why ``candidate`` is not a plausible head (None when it is). Fits filled candidates on the way."""
    frame = shape[0] * shape[1]
    min_area = rules.min_area_fraction * frame
    if candidate.area < min_area:
        return (f"the largest region is only {candidate.area:.0f} px (< {min_area:.0f} px, {rules.min_area_fraction:.1%} "
                "of the frame) — lower the threshold, or check that this channel holds the head mask")
    if candidate.area > rules.max_area_fraction * frame:
        return (f"the head region covers {candidate.area / frame:.0%} of the frame (> {rules.max_area_fraction:.0%}) — "
                "raise the threshold, or give the mask channel rather than the image")
    if candidate.kind == "filled":
        if candidate.border_fraction > rules.max_border_fraction:
            return (f"the contour touches the frame border on {candidate.border_fraction:.0%} of its length "
                    f"(> {rules.max_border_fraction:.0%}): the head is mostly outside the frame — check the mask")
        candidate.ellipse = _robust_fit(candidate.points)
        if candidate.ellipse is not None:
            candidate.mask = candidate.ellipse.to_mask(shape)
    ellipse = candidate.ellipse
    if ellipse is None:
        return "no ellipse could be fitted to the head contour (too few usable points) — check the mask"
    ratio = min(ellipse.axis_a, ellipse.axis_b) / max(ellipse.axis_a, ellipse.axis_b)
    if ratio < rules.min_axis_ratio:
        return (f"the fitted ellipse is {2 * max(ellipse.axis_a, ellipse.axis_b):.0f} x "
                f"{2 * min(ellipse.axis_a, ellipse.axis_b):.0f} px (axis ratio {ratio:.2f} < {rules.min_axis_ratio}): "
                "a streak, not a head — check the mask")
    inside = float(candidate.mask.sum()) / max(math.pi * ellipse.axis_a * ellipse.axis_b, 1.0)
    if inside < rules.min_inside_fraction:
        return (f"only {inside:.0%} of the fitted ellipse lies inside the frame (< {rules.min_inside_fraction:.0%}): "
                "the head is mostly outside the frame — check the mask")
    return None


# --------------------------------------------------------------------------- extractor


def extract_ellipse(
    mask_channel: np.ndarray,
    threshold: int = DEFAULT_THRESHOLD,
    *,
    channel: int | None = None,
    min_area_fraction: float = MIN_AREA_FRACTION,
    max_area_fraction: float = MAX_AREA_FRACTION,
    min_axis_ratio: float = MIN_AXIS_RATIO,
    max_border_fraction: float = MAX_BORDER_FRACTION,
    min_inside_fraction: float = MIN_INSIDE_FRACTION,
) -> Extraction:
    """The head ellipse of a mask channel, filled (see the module docstring for the rule).

    ``mask_channel``: uint8 0..255, bool or 0/1, 2-D or rows x columns x 3 (``channel`` picks one,
    default the maximum over channels; see ``as_mask_channel``). Pixels above ``threshold``
    (0..254) are mask. Raises ValueError for input it cannot read as a mask; a mask without a
    plausible head gives an Extraction with ``ok`` False and a ``reason``.
    """
    gray = as_mask_channel(mask_channel, channel)
    threshold = check_threshold(threshold)
    rules = HeadRules(min_area_fraction, max_area_fraction, min_axis_ratio, max_border_fraction, min_inside_fraction)
    binary = gray > threshold
    covered = float(binary.mean())
    if covered == 0.0:
        brightest = int(gray.max())
        if brightest == 0:
            return _failure(gray.shape, threshold, "the mask is empty (every pixel is 0) — check that this channel holds the head mask")
        return _failure(gray.shape, threshold,
                        f"no pixel above threshold {threshold} (the brightest is {brightest}) — lower the threshold below {brightest}")
    if covered > rules.max_area_fraction:
        return _failure(gray.shape, threshold,
                        f"the mask covers the whole frame ({covered:.0%} of the pixels above threshold {threshold}) — "
                        "raise the threshold, or give the mask channel rather than the image")
    candidates = _candidates(binary, rules.min_area_fraction * binary.size)
    if not candidates:
        return _failure(gray.shape, threshold,
                        f"only speckle above threshold {threshold} ({int(binary.sum())} px, no region survives the "
                        "noise filter) — lower the threshold, or check that this channel holds the head mask")
    first_reason = None
    for candidate in candidates:
        reason = _rejection(candidate, gray.shape, rules)
        if reason is None:
            return _success(candidate, threshold)
        first_reason = first_reason or reason
        if candidate.area < rules.min_area_fraction * gray.size:
            break  # the rest are smaller still
    return _failure(gray.shape, threshold, first_reason)


def _success(candidate: _Candidate, threshold: int) -> Extraction:
    return Extraction(
        ellipse=candidate.ellipse, mask=candidate.mask, quality=_quality(candidate.ellipse, candidate.points),
        reason=None, threshold=threshold, contour_area=candidate.area, kind=candidate.kind,
    )


def _failure(shape: tuple[int, int], threshold: int, reason: str) -> Extraction:
    return Extraction(None, np.zeros(shape[:2], bool), 0.0, reason, threshold, 0.0)


def read_mask_file(path: str | Path) -> np.ndarray:
    """A mask image file as an array (grayscale 2-D, or RGB(A) in R, G, B order like PIL).

    Raises FileNotFoundError when there is no such file and ValueError when it is not an image;
    FetalStudioError when it declares more pixels than the readers' limit (checked before decoding).
    """
    from fetalstudio.imaging.image_input import check_image_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    check_image_file(path)
    data = np.fromfile(str(path), np.uint8)  # imdecode also reads non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ValueError(f"{path} could not be read as an image (PNG, JPEG, BMP or TIFF).")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def extract_from_file(path: str | Path, threshold: int = DEFAULT_THRESHOLD, channel: int | None = None, **rules) -> Extraction:
    """``extract_ellipse`` on a mask image file (``channel``: 0 = red of an RGB file; see ``read_mask_file``)."""
    return extract_ellipse(read_mask_file(path), threshold, channel=channel, **rules)
