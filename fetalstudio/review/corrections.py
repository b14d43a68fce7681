"""The four ways a reviewer corrects a mask; each validates first and saves through the store.

(a) an ellipse typed or dragged, (b) the extractor re-run at another threshold, (c) brush strokes
from the browser editor, (d) the segmenter prompted with the ellipse's (or mask's) bounding box.
A refused correction raises ``FetalStudioError`` and leaves the item unchanged.
"""

from __future__ import annotations

from dataclasses import astuple

import numpy as np

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.ellipse import Ellipse, bounding_box, fit_ellipse
from fetalstudio.imaging.extract import extract_ellipse
from fetalstudio.imaging.masks import apply_editor_strokes
from fetalstudio.review.store import ReviewItem, ReviewSession

REVIEWER = "reviewer"


def save_ellipse(session: ReviewSession, item_id: str, ellipse: Ellipse, user: str = REVIEWER) -> ReviewItem:
    """Save the mask of a typed/dragged ellipse. The same ellipse saved again (a second press of Save)
    changes nothing and adds no revision: the item is returned as it is."""
    values = (ellipse.center_x, ellipse.center_y, ellipse.axis_a, ellipse.axis_b, ellipse.angle_deg)
    if not all(np.isfinite(v) for v in values):
        raise FetalStudioError("Fill in the centre, both semi-axes and the angle of the ellipse with numbers.")
    if min(ellipse.axis_a, ellipse.axis_b) < 1:
        raise FetalStudioError("Both semi-axes must be at least 1 pixel.")
    item = session.get(item_id)
    if item.how == "ellipse" and item.ellipse is not None and astuple(item.ellipse) == tuple(float(v) for v in values):
        return item
    mask = ellipse.to_mask((item.height, item.width))
    if not mask.any():
        raise FetalStudioError(f"That ellipse lies outside the {item.width}x{item.height} image: move its centre inside.")
    return session.set_mask(item_id, mask, ellipse=ellipse, quality=1.0, reason=None, how="ellipse", user=user)


def reextract(session: ReviewSession, item_id: str, threshold: int, user: str = REVIEWER) -> ReviewItem:
    item = session.get(item_id)
    raw = session.load_raw_mask(item)
    if raw is None:
        raise FetalStudioError("This item has no raw mask channel to re-extract from: correct the ellipse or paint instead.")
    extraction = extract_ellipse(raw, int(threshold))
    if not extraction.ok:
        raise FetalStudioError(f"Nothing saved: at threshold {int(threshold)} {extraction.reason}")
    return session.set_mask(item_id, extraction.mask, ellipse=extraction.ellipse, quality=extraction.quality, reason=None,
                            threshold=extraction.threshold, how="threshold", user=user)


def save_brush(session: ReviewSession, item_id: str, layers: list, user: str = REVIEWER) -> ReviewItem:
    """Apply the editor's stroke layers (paths or RGBA arrays) to the stored mask and save the result."""
    if not layers:
        raise FetalStudioError("Nothing painted: paint with red to add to the mask or blue to remove, then save.")
    item = session.get(item_id)
    mask = apply_editor_strokes(session.load_mask(item), layers, (item.height, item.width))
    if not mask.any():
        raise FetalStudioError("The painted mask is empty: paint the head (or use Reject for an image without one).")
    return session.set_mask(item_id, mask, ellipse=fit_ellipse(mask), quality=None, reason=None, how="brush", user=user)


def segmenter_box(session: ReviewSession, item: ReviewItem) -> tuple[int, int, int, int]:
    """The prompt box: the current ellipse's bounding box (clipped to the frame), else the mask's."""
    shape = (item.height, item.width)
    box = bounding_box(item.ellipse.to_mask(shape)) if item.ellipse is not None else None
    if box is None:
        mask = session.load_mask(item)
        box = bounding_box(mask) if mask is not None else None
    if box is None:
        raise FetalStudioError("The segmenter needs a box: set an ellipse (Ellipse tab) or paint a rough mask first.")
    return box


def ask_segmenter(predictor, session: ReviewSession, item_id: str, user: str = REVIEWER) -> tuple[ReviewItem, float]:
    """Segment the item with ``predictor`` from its box; save the filled ellipse of the result.

    ``predictor``: a BoxPromptPredictor, or an ``analysis.segment.CachedPredictor`` around one, which
    encodes each image once however often the reviewer asks. Returns the saved item and the model's
    predicted IoU score.
    """
    item = session.get(item_id)
    predictor.set_image(session.load_image(item))
    prediction = predictor.predict(box=segmenter_box(session, item))
    if not prediction.mask.any():
        raise FetalStudioError("The segmenter found no head in that box: correct the ellipse or paint the mask instead.")
    extraction = extract_ellipse(prediction.mask.astype(np.uint8) * 255)
    if extraction.ok:
        saved = session.set_mask(item_id, extraction.mask, ellipse=extraction.ellipse, quality=extraction.quality,
                                 reason=None, how="segmenter", user=user)
    else:  # an irregular prediction is kept as predicted: the reviewer sees it and decides
        saved = session.set_mask(item_id, prediction.mask, ellipse=fit_ellipse(prediction.mask), quality=None,
                                 reason=None, how="segmenter", user=user)
    return saved, float(prediction.score)
