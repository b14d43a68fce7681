#!/usr/bin/env python
"""Milliseconds per review action, server side, and Ellipse Extractor throughput.

Each action is what the Mask review tab does for one click, on a real 800x540 HC18 image in a
fresh session on local disk: the store call (atomic, fsynced writes of the mask PNG, item JSON
and log line) and then the re-render of the item exactly as the tab does it (``review.view.item_pictures``:
read the item, image and mask, draw the overlay and the brush editor's background, write both as
fast PNGs; a decision reuses the pictures of the unchanged mask). Target: under 100 ms per action on CPU.

- accept:     ``session.decide(id, "accepted")`` then ``"pending"`` again (two actions, both timed)
- ellipse:    an ellipse edit: rasterise the ellipse, ``session.set_mask(..., how="ellipse")``
- re-extract: ``extract_ellipse(raw_mask, threshold)`` + ``session.set_mask(..., how="threshold")``
- undo:       ``session.undo(id)``

Extractor throughput: ``extract_ellipse`` over the shared HC18 masks, decoded in advance
(compute only) and with the PNG read included.

    python bench/review.py [--repeats 30] [--masks 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from machine import cpu_name  # noqa: E402  (bench/ is on sys.path when a script runs)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fetalstudio.imaging.ellipse import Ellipse  # noqa: E402
from fetalstudio.imaging.extract import extract_ellipse  # noqa: E402
from fetalstudio.review.store import ReviewSession  # noqa: E402
from fetalstudio.review.view import item_pictures  # noqa: E402

HC18 = REPO_ROOT.parent / "shared" / "data" / "hc18_heads"


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, OpenCV {cv2.__version__}"


def hc18_rows() -> list[dict]:
    if not (HC18 / "pairs.csv").is_file():
        sys.exit(f"The shared HC18 data is not at {HC18}: this benchmark uses its real 800x540 images.")
    with (HC18 / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def rerender(session: ReviewSession, item_id: str) -> None:
    """What the tab does after every action: read the item back and write its pictures (new mask: new files)."""
    item_pictures(session, session.get(item_id))


def time_actions(repeats: int) -> dict[str, list[float]]:
    row = next(r for r in hc18_rows() if r["width"] == "800" and r["height"] == "540")
    gray = np.asarray(Image.open(HC18 / row["image"]).convert("L"))
    outline = np.asarray(Image.open(HC18 / row["mask"]).convert("L"))
    times: dict[str, list[float]] = {"accept": [], "ellipse": [], "re-extract": [], "undo": []}
    with tempfile.TemporaryDirectory(dir=REPO_ROOT / "outputs" if (REPO_ROOT / "outputs").is_dir() else None) as temp:
        session = ReviewSession.create(Path(temp) / "bench-session")
        first = extract_ellipse(outline)
        item = session.add_item(gray, outline, source={"origin": "bench"}, mask=first.mask, ellipse=first.ellipse,
                                quality=first.quality, reason=first.reason, threshold=first.threshold)
        rng = np.random.default_rng(0)

        def timed(name: str, action) -> None:
            started = time.perf_counter()
            action()
            rerender(session, item.id)
            times[name].append((time.perf_counter() - started) * 1000)

        for index in range(repeats):
            timed("accept", lambda: session.decide(item.id, "accepted"))
            timed("accept", lambda: session.decide(item.id, "pending"))
            e = first.ellipse
            edited = Ellipse(e.center_x + rng.uniform(-5, 5), e.center_y, e.axis_a * rng.uniform(0.9, 1.1), e.axis_b, e.angle_deg)
            timed("ellipse", lambda: session.set_mask(item.id, edited.to_mask(gray.shape), ellipse=edited, quality=1.0,
                                                      how="ellipse"))
            threshold = 100 + index % 50

            def reextract() -> None:
                result = extract_ellipse(session.load_raw_mask(session.get(item.id)), threshold)
                session.set_mask(item.id, result.mask, ellipse=result.ellipse, quality=result.quality,
                                 threshold=result.threshold, how="threshold")

            timed("re-extract", reextract)
            timed("undo", lambda: session.undo(item.id))
    return times


def extractor_throughput(count: int) -> dict[str, float]:
    paths = [HC18 / r["mask"] for r in hc18_rows()[:count]]
    started = time.perf_counter()
    masks = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ok = sum(extract_ellipse(m).ok for m in masks)
    compute_seconds = time.perf_counter() - started
    return {"masks": len(masks), "ok": ok, "images_per_s_compute": len(masks) / compute_seconds,
            "images_per_s_with_read": len(masks) / (compute_seconds + read_seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="rounds of the four actions")
    parser.add_argument("--masks", type=int, default=200, help="HC18 masks for the extractor throughput")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    args = parser.parse_args(argv)
    times = time_actions(args.repeats)
    throughput = extractor_throughput(args.masks)
    print(f"machine: {machine()}")
    print("review actions on an 800x540 image (store write + re-render), ms:")
    print(f"{'action':<12}{'median':>9}{'p95':>9}{'max':>9}{'n':>6}")
    for name, values in times.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
        flag = "" if statistics.median(values) < 100 else "  ! over the 100 ms target"
        print(f"{name:<12}{statistics.median(values):9.1f}{p95:9.1f}{max(values):9.1f}{len(values):6d}{flag}")
    print(f"extractor: {throughput['images_per_s_compute']:.0f} masks/s compute, "
          f"{throughput['images_per_s_with_read']:.0f} masks/s with PNG read ({throughput['ok']}/{throughput['masks']} ok)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "times_ms": times, "extractor": throughput}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
