"""``python -m fetalstudio extract``: the Ellipse Extractor over the masks of a segmentation CSV.

Reads a CSV with ``image`` and ``mask`` columns (paths relative to the CSV's folder; optional
``pixel_size_mm`` and ``hc_mm``, as ``../shared/data/hc18_heads/pairs.csv``), extracts the head
ellipse of every mask and writes:

- ``OUT/masks/<mask file stem>.png``: the filled ellipse, 0/255, the mask's size (only for masks
  where extraction succeeded, so ``masks/`` can be used as it is);
- ``OUT/ellipses.csv``: one row per mask with the ellipse, its quality, the reason of a failure,
  HC/BPD/OFD in pixels and, with a pixel size, in mm, and the HC error against ``hc_mm``;
- a JSON summary on stdout (and in ``--json FILE``): ``hc_mae_mm`` (mean absolute HC error in mm
  over the rows with ``hc_mm``; null without any), ``n``, ``failed`` and more.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.cli_args import Command, output_folder
from fetalstudio.errors import FetalStudioError

#: The columns of ellipses.csv, in order.
ELLIPSE_COLUMNS = (
    "file", "mask", "ok", "reason", "center_x", "center_y", "axis_a", "axis_b", "angle_deg", "quality",
    "hc_px", "bpd_px", "ofd_px", "pixel_size_mm", "hc_mm", "bpd_mm", "ofd_mm", "hc_mm_reference", "hc_error_mm",
    "kind", "contour_area", "image",
)
_FAILURES_IN_SUMMARY = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, required=True, help="segmentation CSV with image and mask columns (paths relative to its folder)")
    parser.add_argument("--out", type=output_folder, required=True, help="output folder: masks/ and ellipses.csv (created)")
    parser.add_argument("--json", type=Path, help="also write the JSON summary to this file")
    parser.add_argument("--threshold", type=int, default=127, help="mask pixels above this value (0-254) count (default: 127)")
    parser.add_argument("--channel", help="for colour masks: the mask channel, 0/1/2 or r/g/b (default: the maximum over the channels)")
    parser.add_argument("--limit", type=int, help="only the first N rows of the CSV")


@dataclass(frozen=True)
class ExtractItem:
    file: str  # the mask path as the CSV lists it
    image: str
    mask_path: Path
    pixel_size_mm: float | None
    hc_mm: float | None


def read_extract_items(csv_path: Path, limit: int | None = None) -> list[ExtractItem]:
    """The masks of a segmentation CSV; a missing CSV, column or mask file is a FetalStudioError."""
    from fetalstudio.data.tables import read_segmentation

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FetalStudioError(f"--csv {csv_path} does not exist. Give a segmentation CSV with image and mask columns "
                               "(e.g. ../shared/data/hc18_heads/pairs.csv).")
    pairs = read_segmentation(csv_path)
    if limit is not None:
        pairs = pairs[: max(0, limit)]
    missing = [pair.mask for pair in pairs if not pair.mask.is_file()]
    if missing:
        raise FetalStudioError(
            f"{csv_path}: {len(missing)} listed mask file(s) do not exist, e.g. {missing[0]}. "
            "Paths in the mask column are relative to the CSV's folder."
        )
    items = []
    for number, pair in enumerate(pairs, start=2):  # row 1 is the header
        if pair.pixel_size_mm is not None and not (math.isfinite(pair.pixel_size_mm) and pair.pixel_size_mm > 0):
            raise FetalStudioError(f"{csv_path}, row {number}: pixel_size_mm must be a positive number of mm per pixel, not {pair.pixel_size_mm}.")
        items.append(ExtractItem(pair.extra["mask"], pair.extra.get("image", ""), pair.mask, pair.pixel_size_mm, pair.hc_mm))
    return items


def _check_threshold(threshold: int) -> int:
    from fetalstudio.imaging.extract import check_threshold

    try:
        return check_threshold(threshold)
    except ValueError as error:
        raise FetalStudioError(f"--threshold: {error}") from None


def _check_channel(channel: str | None) -> int | None:
    from fetalstudio.pipelines.mask_injection import parse_channel_order

    if channel is None:
        return None
    try:
        return parse_channel_order(channel)
    except ValueError as error:
        raise FetalStudioError(f"--channel: {error}") from None


def extract_item(item: ExtractItem, threshold: int, channel: int | None):
    """The Extraction of one listed mask; an unreadable file is a FetalStudioError."""
    from fetalstudio.imaging.extract import extract_from_file

    try:
        return extract_from_file(item.mask_path, threshold, channel)
    except (OSError, ValueError) as error:
        raise FetalStudioError(f"{item.mask_path} could not be used as a mask: {error} Fix or remove its row in the CSV.") from None


def _write_mask(mask, path: Path) -> None:
    import cv2
    import numpy as np

    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise FetalStudioError(f"Could not encode the mask for {path}.")
    encoded.tofile(str(path))


def _unique_name(stem: str, used: set[str]) -> str:
    name, number = f"{stem}.png", 2
    while name in used:
        name, number = f"{stem}_{number}.png", number + 1
    used.add(name)
    return name


def result_row(item: ExtractItem, extraction, written: str) -> dict:
    """One ellipses.csv row (None for values that do not apply)."""
    from fetalstudio.imaging.biometry import head_biometry

    row = dict.fromkeys(ELLIPSE_COLUMNS)
    row.update(file=item.file, image=item.image, mask=written, ok=int(extraction.ok), reason=extraction.reason,
               quality=extraction.quality, kind=extraction.kind, contour_area=extraction.contour_area,
               pixel_size_mm=item.pixel_size_mm, hc_mm_reference=item.hc_mm)
    if extraction.ok:
        values = extraction.as_dict()
        row.update({key: values[key] for key in ("center_x", "center_y", "axis_a", "axis_b", "angle_deg")})
        row.update(head_biometry(extraction.ellipse, item.pixel_size_mm).as_dict())
        if row["hc_mm"] is not None and item.hc_mm is not None:
            row["hc_error_mm"] = row["hc_mm"] - item.hc_mm
    return row


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_rows(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=ELLIPSE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row[key]) for key in ELLIPSE_COLUMNS})


def summarize(rows: list[dict]) -> dict:
    """hc_mae_mm (None without references), n, failed, and more numbers for the report."""
    errors = [abs(row["hc_error_mm"]) for row in rows if row["hc_error_mm"] is not None]
    qualities = [row["quality"] for row in rows if row["ok"]]
    failures = [{"file": row["file"], "reason": row["reason"]} for row in rows if not row["ok"]]
    return {
        "hc_mae_mm": sum(errors) / len(errors) if errors else None,
        "hc_max_error_mm": max(errors) if errors else None,
        "hc_n": len(errors),
        "n": len(rows),
        "ok": len(rows) - len(failures),
        "failed": len(failures),
        "quality_mean": sum(qualities) / len(qualities) if qualities else None,
        "quality_min": min(qualities) if qualities else None,
        "failures": failures[:_FAILURES_IN_SUMMARY],
    }


def run_extract(args: argparse.Namespace) -> int:
    threshold = _check_threshold(args.threshold)
    channel = _check_channel(args.channel)
    items = read_extract_items(args.csv, args.limit)
    if not items:
        raise FetalStudioError(f"{args.csv} lists no masks.")
    try:
        (args.out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FetalStudioError(f"--out {args.out}: could not create the output folder ({error}); give a folder path you can write to.") from None
    started, used, rows = time.perf_counter(), set(), []
    for item in items:
        extraction = extract_item(item, threshold, channel)
        written = ""
        if extraction.ok:
            written = f"masks/{_unique_name(item.mask_path.stem, used)}"
            _write_mask(extraction.mask, args.out / written)
        rows.append(result_row(item, extraction, written))
    write_rows(rows, args.out / "ellipses.csv")
    seconds = time.perf_counter() - started
    summary = {**summarize(rows), "threshold": threshold, "csv": str(args.csv), "out": str(args.out),
               "ellipses_csv": str(args.out / "ellipses.csv"), "seconds": round(seconds, 3)}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


COMMAND = Command("extract", "extract and fill the head ellipse of every mask in a segmentation CSV", add_arguments, run_extract,
                  description=__doc__.strip())
