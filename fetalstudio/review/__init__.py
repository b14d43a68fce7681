"""Mask pairs and their review (METHODS section 2): generated image+mask pairs, ellipse extraction,
head biometry, a crash-safe review session store and dataset export.

- ``biometry``: HC (Ramanujan), BPD and OFD from an ellipse, in pixels and mm.
- ``extract``: the Ellipse Extractor (threshold, contours, head contour, fit, fill) with a
  quality score and a reason when it fails.
- ``store``: one folder per review session; every decision and edit written atomically.
- ``export``: accepted/edited pairs as images/ + masks/ + metadata.csv, nnU-Net v2 and COCO.

No UI imports; torch is not needed by any of these modules.
"""
