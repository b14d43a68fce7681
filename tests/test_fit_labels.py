"""Ellipse fit scores are shown with their meaning (issue 11, item 15): "fit 0.57 — fair (...)"."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fetalstudio.imaging.extract import extract_ellipse, fit_label

HC18 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hc18_heads"


def test_bands_and_wording():
    assert fit_label(0.57) == "fit 0.57 — fair (57% of the contour on the ellipse; good ≥ 0.6)"
    assert fit_label(0.13).startswith("fit 0.13 — poor") and fit_label(0.95).startswith("fit 0.95 — good")
    assert fit_label(0.45).startswith("fit 0.45 — fair") and fit_label(0.6).startswith("fit 0.60 — good")
    assert fit_label(0.44).startswith("fit 0.44 — poor")


@pytest.mark.skipif(not (HC18 / "pairs.csv").is_file(), reason="shared data not available")
def test_a_real_annotation_is_good_and_a_head_with_a_merged_blob_is_not():
    with (HC18 / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    outline = np.asarray(Image.open(HC18 / row["mask"]).convert("L"))
    assert "— good" in fit_label(extract_ellipse(outline).quality)
    blobbed = np.zeros((256, 256), np.uint8)
    cv2.ellipse(blobbed, ((128, 128), (120, 90), 0), 255, thickness=-1)
    cv2.rectangle(blobbed, (170, 60), (250, 200), 255, thickness=-1)  # a large blob merged with the head
    extraction = extract_ellipse(blobbed)
    assert extraction.quality is not None and "— good" not in fit_label(extraction.quality)
