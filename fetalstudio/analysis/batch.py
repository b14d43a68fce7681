"""Batch analysis: a folder or CSV of images -> a CSV report, masks, overlays and mask exports.

Layout of ``out``::

    batch.json      settings and classes of the run (a resumed run must match them)
    report.csv      one row per image, appended (and fsync'ed) as each image finishes
    masks/<name>.png, overlays/<name>.png   written before the image's row
    summary.json    counts, mean Dice and HC error (when ground truth was given), time
    exports/        mask exports (png, coco, yolo, nnunet), rebuilt at the end of a run

Re-running the same command resumes: images that already have a complete row are skipped. A
different run (other settings or models) into the same folder is refused, so a report never
mixes two runs. The head box comes from the automatic mode (``auto_box``): ground-truth masks,
when given, are only used to score the prediction (Dice), never to make it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fetalstudio.analysis.head import HeadResult, segment_head
from fetalstudio.analysis.image_input import LoadedImage, load_image, supported_suffixes
from fetalstudio.analysis.picture import analysis_picture
from fetalstudio.analysis.session import checked_pixel_size
from fetalstudio.errors import FetalStudioError
from fetalstudio.review.export import write_png
from fetalstudio.review.store import atomic_write_bytes
from fetalstudio.segmentation.ellipse import dice, fill_outline

SETTINGS_FILE, REPORT_FILE, SUMMARY_FILE = "batch.json", "report.csv", "summary.json"
BASE_COLUMNS = ("name", "file", "status", "error", "width", "height", "plane", "plane_probability")
HEAD_COLUMNS = (
    "box_source", "box_x0", "box_y0", "box_x1", "box_y1", "score", "center_x", "center_y", "axis_a", "axis_b", "angle_deg",
    "quality", "fit_note", "hc_px", "bpd_px", "ofd_px", "pixel_size_mm", "pixel_size_source", "hc_mm", "bpd_mm", "ofd_mm",
    "dice", "hc_true_mm", "hc_error_mm", "mask", "overlay",
)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class BatchInput:
    name: str  # unique, file-name safe: names the mask, overlay and report row
    image: Path
    mask: Path | None = None  # ground truth (filled or outline), only for scoring
    pixel_size_mm: float | None = None
    hc_mm: float | None = None


@dataclass(frozen=True)
class BatchSettings:
    classify: bool = True
    segment: bool = True
    pixel_size_mm: float | None = None  # for images without their own (CSV column or DICOM header)
    classifier: str = ""  # model ids, recorded so a resumed run uses the same models
    segmenter: str = ""
    overlays: bool = True
    formats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.classify or self.segment):
            raise FetalStudioError("Choose what to run: plane classification, head segmentation, or both.")


@dataclass
class BatchSummary:
    out: Path
    images: int = 0
    done: int = 0
    skipped: int = 0  # finished by an earlier, interrupted run
    errors: int = 0
    cancelled: bool = False
    seconds: float = 0.0
    planes: dict[str, int] = field(default_factory=dict)
    mean_dice: float | None = None
    median_dice: float | None = None
    dice_count: int = 0
    hc_mae_mm: float | None = None
    hc_mean_error_mm: float | None = None
    hc_count: int = 0
    exports: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        values = asdict(self)
        values["out"] = str(self.out)
        return values


# --- inputs -----------------------------------------------------------------------------------

def _safe_name(relative: Path) -> str:
    stem = "__".join(relative.with_suffix("").parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}_{count + 1}")
    return result


def inputs_from_files(paths: Sequence[Path]) -> list[BatchInput]:
    """Inputs for a list of image files (e.g. uploaded), named after the files (made unique)."""
    names = _unique([_safe_name(Path(Path(p).name)) for p in paths])
    return [BatchInput(name, Path(path)) for name, path in zip(names, paths)]


def _optional_float(value: str | None, column: str, row: int, source: Path) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise FetalStudioError(f"{source.name}, row {row}: {column} must be a number, not {value!r}.") from None


def read_batch_inputs(source: str | Path) -> list[BatchInput]:
    """Images from a folder (searched recursively, hidden files skipped) or a CSV with an ``image``
    column and optional ``mask``, ``pixel_size_mm`` and ``hc_mm`` (paths relative to the CSV)."""
    source = Path(source)
    if source.is_dir():
        suffixes = supported_suffixes()
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not files:
            raise FetalStudioError(f"{source} holds no images ({', '.join(suffixes)}). Choose the folder that holds them.")
        names = _unique([_safe_name(p.relative_to(source)) for p in files])
        return [BatchInput(name, path) for name, path in zip(names, files)]
    if not source.is_file():
        raise FetalStudioError(f"{source} does not exist. Give a folder of images or a CSV with an 'image' column.")
    if source.suffix.lower() != ".csv":
        raise FetalStudioError(f"{source.name} is neither a folder nor a .csv file. Give a folder of images or a CSV.")
    with source.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise FetalStudioError(f"{source.name} needs an 'image' column (optional: mask, pixel_size_mm, hc_mm) and at least one row.")
    base = source.parent
    inputs, missing = [], []
    names = _unique([_safe_name(Path(Path(row["image"]).name if Path(row["image"]).is_absolute() else row["image"]))
                     for row in rows])
    for number, (name, row) in enumerate(zip(names, rows), start=2):
        image = base / row["image"]
        mask = base / row["mask"] if (row.get("mask") or "").strip() else None
        missing += [str(p) for p in (image, mask) if p is not None and not p.is_file()]
        inputs.append(BatchInput(name, image, mask, _optional_float(row.get("pixel_size_mm"), "pixel_size_mm", number, source),
                                 _optional_float(row.get("hc_mm"), "hc_mm", number, source)))
    if missing:
        raise FetalStudioError(f"{len(missing)} file(s) named in {source.name} do not exist, e.g. {missing[0]}. "
                               "Paths in the CSV are relative to the CSV's folder.")
    return inputs


# --- the run ----------------------------------------------------------------------------------

def report_columns(classes: Sequence[str], settings: BatchSettings) -> list[str]:
    columns = list(BASE_COLUMNS) + [f"prob_{c}" for c in classes]
    return columns + list(HEAD_COLUMNS) if settings.segment else columns


def _check_out(out: Path, record: dict) -> None:
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous != record:
            changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
            raise FetalStudioError(f"{out} holds a batch run with other settings ({', '.join(changed)} differ). "
                                   "Choose another output folder, or delete this one to start again.")
    elif out.exists() and any(out.iterdir()):
        raise FetalStudioError(f"{out} is not empty and is not a batch analysis folder. Choose a new or empty folder.")


def _finished_rows(report: Path, columns: list[str]) -> list[dict]:
    """The complete rows of an earlier run; a row cut short by a crash is dropped (and redone)."""
    if not report.is_file():
        return []
    text = report.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = [row for row in csv.DictReader(io.StringIO(text)) if None not in row and row.get("status") in ("ok", "error")]
    return [row for row in rows if list(row) == columns]


def _write_report(report: Path, columns: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(report, buffer.getvalue().encode())


def _append_row(report: Path, columns: list[str], row: dict) -> None:
    buffer = io.StringIO()
    csv.DictWriter(buffer, columns, lineterminator="\n").writerow(row)
    with report.open("a", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if np.isfinite(value) else ""
    return str(value)


def _png(path: Path, array: np.ndarray) -> None:
    """Gray or RGB ``array`` as a PNG, written atomically."""
    write_png(path, cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array)


def _ground_truth(path: Path, shape: tuple[int, int]) -> np.ndarray:
    truth = fill_outline(load_image(path).gray > 0)
    if truth.shape != shape:
        raise FetalStudioError(f"the ground-truth mask {path.name} is {truth.shape[1]}x{truth.shape[0]}, "
                               f"the image {shape[1]}x{shape[0]}")
    return truth


@dataclass
class _Models:
    classifier: object | None
    predictor: object | None
    classes: tuple[str, ...]


def _analyse(item: BatchInput, settings: BatchSettings, models: _Models, out: Path) -> dict:
    image: LoadedImage = load_image(item.image)
    row: dict = {"name": item.name, "file": str(item.image), "status": "ok", "width": image.size[0], "height": image.size[1]}
    if models.classifier is not None:
        from PIL import Image

        probabilities = models.classifier.predict([Image.fromarray(image.gray)])[0]
        plane = max(probabilities, key=probabilities.get)
        row.update(plane=plane, plane_probability=probabilities[plane], **{f"prob_{c}": probabilities[c] for c in models.classes})
    if models.predictor is None:
        return row
    pixel_size, source = item.pixel_size_mm, "csv"
    if pixel_size is None:
        pixel_size, source = image.pixel_size_mm, "dicom"
    if pixel_size is None:
        pixel_size, source = settings.pixel_size_mm, "given"
    result: HeadResult = segment_head(models.predictor, image.gray, auto=True, pixel_size_mm=pixel_size)
    measurement = result.measurement
    row.update(box_source=result.box_source, score=result.score, quality=measurement.quality, fit_note=measurement.reason,
               pixel_size_source=source if pixel_size is not None else "")
    row.update(zip(("box_x0", "box_y0", "box_x1", "box_y1"), result.box))
    if measurement.ellipse is not None:
        row.update({k: getattr(measurement.ellipse, k) for k in ("center_x", "center_y", "axis_a", "axis_b", "angle_deg")})
    if measurement.biometry is not None:
        row.update({k: v for k, v in measurement.biometry.as_dict().items() if k in HEAD_COLUMNS})
    if item.mask is not None:
        row["dice"] = dice(result.mask, _ground_truth(item.mask, image.gray.shape))
    if item.hc_mm is not None:
        row["hc_true_mm"] = item.hc_mm
        if row.get("hc_mm") is not None:
            row["hc_error_mm"] = row["hc_mm"] - item.hc_mm
    mask_path = out / "masks" / f"{item.name}.png"
    _png(mask_path, result.mask.astype(np.uint8) * 255)
    row["mask"] = mask_path.relative_to(out).as_posix()
    if settings.overlays:
        overlay_path = out / "overlays" / f"{item.name}.png"
        _png(overlay_path, analysis_picture(image.gray, result.mask, measurement.ellipse, result.box))
        row["overlay"] = overlay_path.relative_to(out).as_posix()
    return row


def run_batch(
    inputs: Sequence[BatchInput],
    out: str | Path,
    settings: BatchSettings,
    classifier=None,
    predictor=None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> BatchSummary:
    """Analyse ``inputs`` into ``out`` (see the module docstring). ``classifier`` is a PlaneRanking
    (needed when ``settings.classify``), ``predictor`` a CachedPredictor (when ``settings.segment``)."""
    if not inputs:
        raise FetalStudioError("There are no images to analyse.")
    if len({item.name for item in inputs}) != len(inputs):
        raise FetalStudioError("Two inputs share a name; names must be unique (read_batch_inputs makes them so).")
    if settings.classify and classifier is None or settings.segment and predictor is None:
        raise FetalStudioError("The batch needs a classifier for plane classification and a segmenter for heads.")
    if settings.pixel_size_mm is not None:
        checked_pixel_size(settings.pixel_size_mm)
    if settings.formats:
        from fetalstudio.analysis.mask_export import MASK_FORMATS

        unknown = [f for f in settings.formats if f not in MASK_FORMATS]
        if unknown or not settings.segment:
            raise FetalStudioError(f"Mask exports need head segmentation and formats from {', '.join(MASK_FORMATS)} (got {', '.join(settings.formats)}).")
    out = Path(out)
    classes = tuple(classifier.classes) if settings.classify else ()
    record = {"settings": {**asdict(settings), "formats": list(settings.formats)}, "classes": list(classes)}
    _check_out(out, record)
    for folder in (out, out / "masks", out / "overlays"):
        folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SETTINGS_FILE, (json.dumps(record, indent=2) + "\n").encode())
    columns = report_columns(classes, settings)
    report = out / REPORT_FILE
    finished = {row["name"]: row for row in _finished_rows(report, columns)}
    _write_report(report, columns, list(finished.values()))

    models = _Models(classifier if settings.classify else None, predictor if settings.segment else None, classes)
    summary = BatchSummary(out=out, images=len(inputs))
    started = time.perf_counter()
    for index, item in enumerate(inputs):
        if cancel is not None and cancel.is_set():
            summary.cancelled = True
            break
        if item.name in finished:
            summary.skipped += 1
        else:
            try:
                row = _analyse(item, settings, models, out)
            except FetalStudioError as error:
                row = {"name": item.name, "file": str(item.image), "status": "error", "error": str(error)}
            _append_row(report, columns, {c: _cell(row.get(c)) for c in columns})
            summary.done += 1
        if progress is not None:
            progress(index + 1, len(inputs), item.name)
    summary.seconds = time.perf_counter() - started
    rows = _finished_rows(report, columns)
    _summarise(summary, rows)
    if settings.formats and not summary.cancelled:
        summary.exports = {k: str(v) for k, v in _export(rows, inputs, out, settings.formats).items()}
    atomic_write_bytes(out / SUMMARY_FILE, (json.dumps(summary.as_dict(), indent=2) + "\n").encode())
    return summary


def _floats(rows: list[dict], column: str) -> np.ndarray:
    return np.array([float(r[column]) for r in rows if r.get(column, "") != ""], dtype=np.float64)


def _summarise(summary: BatchSummary, rows: list[dict]) -> None:
    summary.errors = sum(1 for r in rows if r["status"] == "error")
    planes: dict[str, int] = {}
    for row in rows:
        if row.get("plane"):
            planes[row["plane"]] = planes.get(row["plane"], 0) + 1
    summary.planes = planes
    dices = _floats(rows, "dice")
    if dices.size:
        summary.mean_dice, summary.median_dice, summary.dice_count = float(dices.mean()), float(np.median(dices)), int(dices.size)
    errors = _floats(rows, "hc_error_mm")
    if errors.size:
        summary.hc_mae_mm, summary.hc_mean_error_mm, summary.hc_count = float(np.abs(errors).mean()), float(errors.mean()), int(errors.size)


def _export(rows: list[dict], inputs: Sequence[BatchInput], out: Path, formats: Sequence[str]) -> dict[str, Path]:
    from fetalstudio.analysis.mask_export import MaskRecord, export_masks
    from fetalstudio.segmentation.ellipse import Ellipse

    by_name = {item.name: item for item in inputs}
    records = []
    for row in rows:
        if row["status"] != "ok" or not row.get("mask") or row["name"] not in by_name:
            continue
        ellipse = None
        if row.get("axis_a"):
            ellipse = Ellipse(*(float(row[k]) for k in ("center_x", "center_y", "axis_a", "axis_b", "angle_deg")))
        # export_masks reads every image with load_image: DICOM frames become the analysed grayscale PNG
        records.append(MaskRecord(name=row["name"], image_path=by_name[row["name"]].image, mask_path=out / row["mask"],
                                  ellipse=ellipse))
    return export_masks(records, out / "exports", formats)


def zip_folder(folder: Path, archive: Path) -> Path:
    """A zip of ``folder``'s files (e.g. the overlays) for download, written atomically."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(folder.parent).as_posix())
    archive.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(archive, buffer.getvalue())
    return archive
