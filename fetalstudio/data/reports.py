"""A small report writer shared by the evaluation commands and training's validation reports: markdown, CSV and JSON.

API (everything takes plain Python data; no heavy imports):

- ``markdown_table(rows, columns=None, digits=4) -> str``: a GitHub-markdown table of row dicts.
- ``write_csv(path, rows, columns=None) -> Path``: row dicts as CSV (columns: union of keys, in order).
- ``write_json(path, data) -> Path``: indented JSON (NaN -> null), written atomically.
- ``write_report(folder, title, sections, csv_files=None, json_files=None) -> Path``: a report
  folder: ``summary.md`` (title, then one ``## heading`` per section; a section is markdown text
  or a list of row dicts shown as a table), plus the CSV and JSON files named in
  ``csv_files``/``json_files`` ({file name: rows/data}). Returns the summary path.

Example::

    write_report(out, "Segmenter evaluation", {"Summary": [{"metric": "Dice", "model": 0.97}], "Notes": "..."},
                 csv_files={"per_image.csv": rows}, json_files={"summary.json": summary})
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def _format(value, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _columns(rows: Sequence[Mapping], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """Row dicts as a markdown table; floats get ``digits`` decimals, missing cells stay empty."""
    names = _columns(rows, columns)
    if not names:
        return "_(no rows)_"
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(name), digits) for name in names) + " |")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8", newline="")
    os.replace(temporary, path)
    return path


def write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows, columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return _atomic_write(path, buffer.getvalue())


def _finite(data):
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def write_json(path: Path, data) -> Path:
    """Indented JSON; NaN/inf become null so any JSON reader accepts the file."""
    return _atomic_write(path, json.dumps(_finite(data), indent=2, default=str) + "\n")


def write_report(
    folder: Path,
    title: str,
    sections: Mapping[str, str | Sequence[Mapping]],
    csv_files: Mapping[str, Sequence[Mapping]] | None = None,
    json_files: Mapping[str, object] | None = None,
    digits: int = 4,
) -> Path:
    """Write ``folder/summary.md`` plus the named CSV/JSON files; returns the summary path."""
    folder = Path(folder)
    parts = [f"# {title}", ""]
    for heading, body in sections.items():
        parts += [f"## {heading}", "", body if isinstance(body, str) else markdown_table(list(body), digits=digits), ""]
    for name, rows in (csv_files or {}).items():
        write_csv(folder / name, list(rows))
    for name, data in (json_files or {}).items():
        write_json(folder / name, data)
    return _atomic_write(folder / "summary.md", "\n".join(parts).rstrip() + "\n")
