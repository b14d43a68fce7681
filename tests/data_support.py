"""Where the tests find ../shared/data, and facts about it that several test modules check."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: Head outlines that run out of the frame (hole filling gives nothing; an ellipse fit must).
OUT_OF_FRAME = {
    "hc18_heads": {"186_HC", "346_HC", "628_2HC", "787_HC"},
    "es_heads": {"Patient00708_Plane3_3_of_6", "Patient00830_Plane3_3_of_3"},
}
needs_data = pytest.mark.skipif(not (DATA / "hc18_heads" / "pairs.csv").is_file(), reason="shared data not found")


def pairs_rows(dataset: str) -> list[dict]:
    """The rows of ``DATA/<dataset>/pairs.csv``."""
    with (DATA / dataset / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_pairs_csv(path: Path, rows: list[dict], columns=("image", "mask", "pixel_size_mm", "hc_mm"),
                    dataset: str = "hc18_heads") -> Path:
    """A segmentation CSV of ``rows`` of ``DATA/<dataset>/pairs.csv`` with absolute image/mask paths."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(columns))
        writer.writeheader()
        for row in rows:
            values = {**row, "image": str(DATA / dataset / row["image"]), "mask": str(DATA / dataset / row["mask"])}
            writer.writerow({column: values[column] for column in columns})
    return path
