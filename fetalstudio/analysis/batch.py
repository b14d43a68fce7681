"""Batch analysis: a folder or CSV of images -> a CSV report, masks, overlays and mask exports.

Layout of ``out``::

    batch.json      settings and classes of the run (a resumed run must match them)
    report.csv      one row per image, appended (and fsync'ed) as each image finishes
    masks/<name>.png, overlays/<name>.png   written before the image's row
    summary.json    counts, mean Dice and HC error (when ground truth was given), time
    exports/        mask exports (png, coco, yolo, nnunet), rebuilt at the end of a run

Re-running the same command resumes: images that already have a complete row are skipped. A
different run (other settings or models) into the same folder is refused, so a report never
mixes two runs, and so is a second run while one is writing there (the folder's lock). Every
per-image failure (an unreadable or missing file, a bad CSV cell, a decompression bomb, an
unexpected exception) becomes an error row and the run goes on; a full disk stops it, keeping the
rows written. ``warning`` says why a head measurement is doubtful (not a head plane, poor fit). The head box comes from the automatic mode (``auto_box``): ground-truth masks,
when given, are only used to score the prediction (Dice), never to make it.

Several processes (``accelerate launch``, see ``fetalstudio.distributed``): the main process
holds the lock, checks or writes batch.json and lists the images left; each process analyses every
N-th of them into its own ``report.part-<i>-of-<N>.csv``; at the end the main process merges them
into report.csv (input order, one row per image) and writes summary.json and the exports. A rerun,
with any number of processes, first merges the part tables an interrupted run left.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fetalstudio.analysis.head import HeadResult, is_head_plane, measurement_warnings, not_head_plane_note, segment_head
from fetalstudio.analysis.picture import analysis_picture
from fetalstudio.analysis.session import checked_pixel_size
from fetalstudio.data.tables import read_csv_rows
from fetalstudio.errors import DiskFullError, FetalStudioError, disk_full_error, is_disk_full
from fetalstudio.imaging.ellipse import dice, fill_outline
from fetalstudio.imaging.files import LOCK_FILE, atomic_write_bytes, folder_lock, write_png
from fetalstudio.imaging.image_input import LoadedImage, load_image, supported_suffixes
from fetalstudio.distributed import ProcessShare, complete_rows, merge_parts, part_tables, table_text

SETTINGS_FILE, REPORT_FILE, SUMMARY_FILE = "batch.json", "report.csv", "summary.json"
BASE_COLUMNS = ("name", "file", "status", "error", "warning", "width", "height", "plane", "plane_probability")
#: The start of ``warning`` on rows whose head was not measured (``measure_heads_only``).
HEAD_NOT_MEASURED = "head not measured"
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
    error: str | None = None  # a problem of its CSV row (missing file, bad cell): it becomes an error row


@dataclass(frozen=True)
class BatchSettings:
    classify: bool = True
    segment: bool = True
    pixel_size_mm: float | None = None  # for images without their own (CSV column or DICOM header)
    classifier: str = ""  # model ids, recorded so a resumed run uses the same models
    segmenter: str = ""
    overlays: bool = True
    formats: tuple[str, ...] = ()
    measure_heads_only: bool = False  # segment only images the classifier puts on a head plane

    def __post_init__(self) -> None:
        if not (self.classify or self.segment):
            raise FetalStudioError("Choose what to run: plane classification, head segmentation, or both.")
        if self.measure_heads_only and not (self.classify and self.segment):
            raise FetalStudioError("Measuring heads only on head planes needs both plane classification and head segmentation.")


@dataclass
class BatchSummary:
    out: Path
    images: int = 0
    done: int = 0
    skipped: int = 0  # finished by an earlier, interrupted run
    errors: int = 0
    warned: int = 0  # rows with a warning (HC doubtful, or head not measured)
    heads_not_measured: int = 0  # not a head plane, with measure_heads_only
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


def _is_batch_output(folder: Path) -> bool:
    return (folder / SETTINGS_FILE).is_file()


def _image_files(source: Path, exclude: Sequence[Path]) -> list[Path]:
    """Image files under ``source``, leaving out hidden files and folders, the ``exclude`` folders
    and any batch output folder (so ``--out`` inside ``--in`` never analyses its own masks)."""
    suffixes = supported_suffixes()
    excluded = {Path(folder).resolve() for folder in exclude}
    files = []
    for root, folders, names in os.walk(source):
        here = Path(root)
        folders[:] = [f for f in folders if not f.startswith(".") and (here / f).resolve() not in excluded
                      and not _is_batch_output(here / f)]
        files += [here / name for name in names if not name.startswith(".") and Path(name).suffix.lower() in suffixes]
    return sorted(files)


def _csv_pixel_size(value: str) -> tuple[float | None, str | None]:
    """A CSV's pixel size and the problem with it, checked like ``--pixel-size``. An empty cell is
    unknown; 0 is refused (typed, 0 means "unknown"; in a table it is a mistake)."""
    if value.strip() == "":
        return None, None
    try:
        size = checked_pixel_size(value)
    except FetalStudioError as error:
        return None, f"pixel_size_mm: {error}"
    if size is None:
        return None, f"pixel_size_mm {value!r} is not a pixel size; leave the cell empty if it is unknown."
    return size, None


def _csv_hc(value: str) -> tuple[float | None, str | None]:
    if value.strip() == "":
        return None, None
    try:
        hc = float(value)
    except ValueError:
        hc = float("nan")
    if not (np.isfinite(hc) and hc > 0):
        return None, f"hc_mm {value!r} must be a positive number of mm (or empty)."
    return hc, None


def _csv_input(table: Path, row: dict, name: str, number: int) -> BatchInput:
    """One CSV row; a missing file or bad cell is kept as the input's ``error`` (an error row)."""
    base = table.parent
    cell = (row.get("image") or "").strip()
    if not cell:
        return BatchInput(name, table, error=f"row {number}: the image cell is empty; name an image file (relative to the CSV's folder).")
    image = base / cell
    mask_cell = (row.get("mask") or "").strip()
    mask = base / mask_cell if mask_cell else None
    pixel_size, pixel_problem = _csv_pixel_size(row.get("pixel_size_mm") or "")
    hc, hc_problem = _csv_hc(row.get("hc_mm") or "")
    problems = [f"{what} {path} does not exist (paths are relative to the CSV's folder)"
                for what, path in (("the image", image), ("the mask", mask)) if path is not None and not path.is_file()]
    problems += [problem for problem in (pixel_problem, hc_problem) if problem]
    error = f"row {number}: " + "; ".join(problems) if problems else None
    return BatchInput(name, image, mask, pixel_size, hc, error)


def read_batch_inputs(source: str | Path, exclude: Sequence[str | Path] = ()) -> list[BatchInput]:
    """Images from a folder (searched recursively; hidden files, ``exclude`` folders and batch
    output folders skipped) or a CSV with an ``image`` column and optional ``mask``,
    ``pixel_size_mm`` and ``hc_mm`` (paths relative to the CSV). A CSV row with a missing file or
    a bad cell is kept with its ``error``, so the run reports it as an error row and goes on."""
    source = Path(source)
    if source.is_dir():
        files = _image_files(source, [Path(p) for p in exclude])
        if not files:
            raise FetalStudioError(f"{source} holds no images ({', '.join(supported_suffixes())}). Choose the folder that holds them.")
        names = _unique([_safe_name(p.relative_to(source)) for p in files])
        return [BatchInput(name, path) for name, path in zip(names, files)]
    if not source.is_file():
        raise FetalStudioError(f"{source} does not exist. Give a folder of images or a CSV with an 'image' column.")
    if source.suffix.lower() != ".csv":
        raise FetalStudioError(f"{source.name} is neither a folder nor a .csv file. Give a folder of images or a CSV.")
    rows = read_csv_rows(source)
    if not rows or "image" not in rows[0]:
        raise FetalStudioError(f"{source.name} needs an 'image' column (optional: mask, pixel_size_mm, hc_mm) and at least one row.")
    stems = []
    for number, row in enumerate(rows, start=2):
        cell = (row.get("image") or "").strip()
        stems.append(_safe_name(Path(Path(cell).name if Path(cell).is_absolute() else cell)) if cell else f"row{number}")
    return [_csv_input(source, row, name, number) for number, (name, row) in enumerate(zip(_unique(stems), rows), start=2)]


# --- the run ----------------------------------------------------------------------------------

def report_columns(classes: Sequence[str], settings: BatchSettings) -> list[str]:
    columns = list(BASE_COLUMNS) + [f"prob_{c}" for c in classes]
    return columns + list(HEAD_COLUMNS) if settings.segment else columns


#: Settings added after a release, with the value every earlier run had: an older run's folder
#: still resumes (its rows without the newer report columns are redone).
SETTINGS_ADDED_LATER = {"measure_heads_only": False}


def _check_out(out: Path, record: dict) -> None:
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if isinstance(previous.get("settings"), dict):
            previous["settings"] = {**SETTINGS_ADDED_LATER, **previous["settings"]}
        if previous != record:
            changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
            raise FetalStudioError(f"{out} holds a batch run with other settings ({', '.join(changed)} differ). "
                                   "Choose another output folder, or delete this one to start again.")
    elif out.exists() and any(path.name != LOCK_FILE for path in out.iterdir()):
        raise FetalStudioError(f"{out} is not empty and is not a batch analysis folder. Choose a new or empty folder.")


def _is_finished(row: dict) -> bool:
    return row.get("status") in ("ok", "error")


def _finished_rows(report: Path, columns: list[str]) -> list[dict]:
    """The complete rows of an earlier run; a row cut short by a crash is dropped (and redone), and so are
    the rows of an older release's report without today's columns."""
    return [row for row in complete_rows(report, columns) if _is_finished(row)]


def _merge_reports(report: Path, columns: list[str], inputs: Sequence[BatchInput]) -> list[dict]:
    """report.csv and the part tables of several processes into report.csv, in input order, one row per image."""
    return merge_parts(report, columns, "name", [item.name for item in inputs], keep=_is_finished)


def _append_row(report: Path, columns: list[str], row: dict) -> None:
    buffer = io.StringIO()
    csv.DictWriter(buffer, columns, lineterminator="\n").writerow(row)
    with report.open("a", encoding="utf-8", newline="") as handle:
        size = handle.tell()
        try:
            handle.write(buffer.getvalue() if size else table_text(columns, []) + buffer.getvalue())  # a new part: its header first
            handle.flush()
            os.fsync(handle.fileno())
        except OSError:
            handle.truncate(size)  # no half row left behind (a full disk, an I/O error)
            raise


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if np.isfinite(value) else ""
    return " ".join(str(value).splitlines())  # one line per row: a cut-short row is then told by its missing newline


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
    if item.error is not None:
        raise FetalStudioError(item.error)
    image: LoadedImage = load_image(item.image)
    row: dict = {"name": item.name, "file": str(item.image), "status": "ok", "width": image.size[0], "height": image.size[1]}
    plane, probabilities = None, None
    if models.classifier is not None:
        from PIL import Image

        probabilities = models.classifier.predict([Image.fromarray(image.gray)])[0]
        plane = max(probabilities, key=probabilities.get)
        row.update(plane=plane, plane_probability=probabilities[plane], **{f"prob_{c}": probabilities[c] for c in models.classes})
    if models.predictor is None:
        return row
    if settings.measure_heads_only and is_head_plane(probabilities) is False:
        row["warning"] = f"{HEAD_NOT_MEASURED}: not a head plane ({not_head_plane_note(probabilities)})"
        return row
    pixel_size, source = item.pixel_size_mm, "csv"
    if pixel_size is None:
        pixel_size, source = image.pixel_size_mm, "dicom"
    if pixel_size is None:
        pixel_size, source = settings.pixel_size_mm, "given"
    result: HeadResult = segment_head(models.predictor, image.gray, auto=True, pixel_size_mm=pixel_size)
    measurement = result.measurement
    row.update(box_source=result.box_source, score=result.score, quality=measurement.quality, fit_note=measurement.reason,
               pixel_size_source=source if pixel_size is not None else "", warning="; ".join(measurement_warnings(probabilities, measurement)))
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
    share: ProcessShare | None = None,
) -> BatchSummary:
    """Analyse ``inputs`` into ``out`` (see the module docstring). ``classifier`` is a PlaneRanking
    (needed when ``settings.classify``), ``predictor`` a CachedPredictor (when ``settings.segment``).
    ``share``: this process's share of a run of several processes; the main process's summary covers
    every image, the others' their own share, and so does progress."""
    share = share or ProcessShare()
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
    if out.exists() and not out.is_dir():
        raise FetalStudioError(f"{out} is a file; give a folder for the batch report (it is created if missing).")
    classes = tuple(classifier.classes) if settings.classify else ()
    record = {"settings": {**asdict(settings), "formats": list(settings.formats)}, "classes": list(classes)}
    columns = report_columns(classes, settings)
    run = _Run(inputs, out, settings, columns, _Models(classifier if settings.classify else None,
                                                      predictor if settings.segment else None, classes), share)
    try:
        with ExitStack() as holder:
            pending = share.agree(lambda: _prepare(run, record, holder))
            if not share.is_main:
                _check_out(out, record)  # the main process wrote batch.json: every process runs the same settings
            return _run_share(run, pending, progress, cancel)
    except (OSError, DiskFullError) as error:
        if not (isinstance(error, DiskFullError) or is_disk_full(error)):
            raise
        report = out / REPORT_FILE
        kept = sum(len(_finished_rows(path, columns)) for path in [report, *part_tables(report)])
        raise disk_full_error(out, f"The {kept} image row(s) already in {REPORT_FILE} (with their masks and overlays) are kept; "
                                   "run the same command again to resume from there.") from error


@dataclass(frozen=True)
class _Run:
    inputs: Sequence[BatchInput]
    out: Path
    settings: BatchSettings
    columns: list[str]
    models: _Models
    share: ProcessShare

    @property
    def report(self) -> Path:
        return self.out / REPORT_FILE


@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the whole run; a second run into the same folder is refused at once."""
    with ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(out).hold(blocking=False))
        except BlockingIOError:
            raise FetalStudioError(f"Another batch analysis is writing into {out} right now. Wait for it to finish (then run "
                                   "the same command again to resume), or choose another output folder.") from None
        yield


def _prepare(run: _Run, record: dict, holder: ExitStack) -> list[BatchInput]:
    """On the main process: the folder locked (until ``holder`` closes), batch.json checked and written, the rows
    of an interrupted run (report.csv and part tables) merged into report.csv; the images left."""
    _check_out(run.out, record)  # before anything is written: a foreign folder is left as it was
    run.out.mkdir(parents=True, exist_ok=True)
    holder.enter_context(_run_lock(run.out))
    _check_out(run.out, record)  # again under the lock: a run that finished meanwhile may have written its settings
    for folder in (run.out / "masks", run.out / "overlays"):
        folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run.out / SETTINGS_FILE, (json.dumps(record, indent=2) + "\n").encode())
    finished = {row["name"] for row in _merge_reports(run.report, run.columns, run.inputs)}
    return [item for item in run.inputs if item.name not in finished]


def _run_share(run: _Run, pending: list[BatchInput], progress: Progress | None, cancel: threading.Event | None) -> BatchSummary:
    """This process's images: all inputs alone (the finished ones skipped), with others its share of ``pending``
    (the main process's list), each row appended to report.csv or to this process's part; then, on the main
    process, the summary."""
    share, left = run.share, {item.name for item in pending}
    items = share.take(pending) if share.is_distributed else list(run.inputs)
    rows_path = share.part_path(run.report) if share.is_distributed else run.report
    summary = BatchSummary(out=run.out, images=len(items))
    started = time.perf_counter()
    for index, item in enumerate(items):
        if cancel is not None and cancel.is_set():
            summary.cancelled = True
            break
        if item.name not in left:
            summary.skipped += 1
        else:
            row = _analysed_row(item, run.settings, run.models, run.out)
            _append_row(rows_path, run.columns, {c: _cell(row.get(c)) for c in run.columns})
            summary.done += 1
        if progress is not None:
            progress(index + 1, len(items), item.name)
    share.wait()
    if not share.is_main:
        summary.seconds = time.perf_counter() - started
        return summary
    if share.is_distributed:
        rows = _merge_reports(run.report, run.columns, run.inputs)
        analysed = {row["name"] for row in rows} & left
        summary.images, summary.skipped, summary.done = len(run.inputs), len(run.inputs) - len(pending), len(analysed)
    else:
        rows = _finished_rows(run.report, run.columns)
    summary.seconds = time.perf_counter() - started
    _summarise(summary, rows)
    if run.settings.formats and not summary.cancelled:
        summary.exports = {k: str(v) for k, v in _export(rows, run.inputs, run.out, run.settings.formats).items()}
    atomic_write_bytes(run.out / SUMMARY_FILE, (json.dumps(summary.as_dict(), indent=2) + "\n").encode())
    return summary


def _analysed_row(item: BatchInput, settings: BatchSettings, models: _Models, out: Path) -> dict:
    """The report row of one image; any failure of this image (not a full disk) is an error row."""
    try:
        return _analyse(item, settings, models, out)
    except DiskFullError:
        raise
    except FetalStudioError as error:
        message = str(error)
    except Exception as error:  # noqa: BLE001 - a bomb, MemoryError, cv2.error...: reported, and the run goes on
        if is_disk_full(error):
            raise
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return {"name": item.name, "file": str(item.image), "status": "error", "error": message}


def _floats(rows: list[dict], column: str) -> np.ndarray:
    return np.array([float(r[column]) for r in rows if r.get(column, "") != ""], dtype=np.float64)


def _summarise(summary: BatchSummary, rows: list[dict]) -> None:
    summary.errors = sum(1 for r in rows if r["status"] == "error")
    summary.warned = sum(1 for r in rows if r.get("warning"))
    summary.heads_not_measured = sum(1 for r in rows if r.get("warning", "").startswith(HEAD_NOT_MEASURED))
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
    from fetalstudio.imaging.ellipse import Ellipse

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
    """A zip of ``folder``'s files (e.g. the overlays) for download, written atomically; hidden files
    and folders (an export being built, a temporary file) are left out."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            # hidden names are work in progress or bookkeeping: export build folders, temporary files, the lock
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
                bundle.write(path, path.relative_to(folder.parent).as_posix())
    archive.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(archive, buffer.getvalue())
    return archive
