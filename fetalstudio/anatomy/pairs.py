"""Counterfactual pairs: for a set of scans and an anomaly preset, matched normal / abnormal images
of the same fetus (FetalFlex's data for training anomaly detectors, METHODS section 3).

For each scan with a layout (its annotation in a structures folder, or the structure detector's
boxes) to which the preset applies: the preset edits the layout, the ROI is the edit's region
(``roi.edit_roi``: the changed boxes, old and new, grown by the margin), and the ROI is regenerated
twice, with the SAME seed, ROI, settings and options:

- **normal**: from the scan's own (unedited) layout;
- **abnormal**: from the edited layout.

Both sides are synthetic inside the ROI: a detector trained on the pairs cannot learn "synthetic
vs real" as a stand-in for "abnormal vs normal", because the only difference between the two images
is the anatomy asked for. Outside the ROI both are the scan's own pixels (``run_flex`` pastes them
back), identical pixel for pixel. Stage 2 (OSM) re-samples each side's changed organs: the edited
boxes as they are for the abnormal image, as they were for the normal one; the prompt lists each
side's structures (``vocabulary.anatomy_caption``), as the ControlNet was trained.

The output folder::

    OUT/pairs.json         the settings (preset, parameters, base seed, models, options); a rerun must match
    OUT/metadata.csv       one row per pair (METADATA_COLUMNS): paths relative to OUT, ROI box in image pixels
    OUT/normal/<i>_<name>.png, OUT/abnormal/<i>_<name>.png, OUT/roi/<i>_<name>.png (255 = regenerated)
    OUT/skipped.csv        the scans the last run skipped, with the reason (e.g. no nasal bone box)

Scan ``i`` (its place in the input list) gets seed ``seed + i``. Resumable like dataset export:
the three PNGs are written atomically, then the row is appended (fsynced), so a pair whose row is
missing was never finished and is made again; a rerun of the same command skips the pairs already
in metadata.csv (same source, preset and seed) and removes files no row names. The folder is locked
against a second run at the same time, and a different command (preset, parameters, seed, models,
options) into a non-empty folder is refused. ``limit`` counts pairs, the existing ones included.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fetalstudio.anatomy.flex import (DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, FlexOptions, FlexOutcome,
                                      flex_settings, resolve_controlnet, resolve_lora, run_flex)
from fetalstudio.anatomy.layout import Layout
from fetalstudio.anatomy.presets import Preset, load_presets
from fetalstudio.anatomy.roi import DEFAULT_MARGIN_PX, edit_roi, write_roi
from fetalstudio.data.structures import BOXES_TABLE, IMAGES_TABLE, AnnotatedImage, read_structures
from fetalstudio.data.tables import read_csv_rows
from fetalstudio.errors import FetalStudioError, ModelLoadError, ModelNotFoundError, disk_full_error, is_disk_full
from fetalstudio.imaging.files import (LOCK_FILE, TEMP_SUFFIX, append_line, atomic_write_bytes, atomic_write_json,
                                       folder_lock, read_json)
from fetalstudio.imaging.image_input import LoadedImage, load_image, supported_suffixes
from fetalstudio.models.entries import ModelKind
from fetalstudio.pipelines.metadata import png_info
from fetalstudio.vocabulary import ANATOMY_PLANES

PAIRS_SCHEMA = "fetalstudio.flex-pairs"
PAIRS_VERSION = 1
SETTINGS_FILE = "pairs.json"
METADATA_FILE = "metadata.csv"
SKIPPED_FILE = "skipped.csv"
SIDES = ("normal", "abnormal", "roi")
METADATA_COLUMNS = [
    "normal", "abnormal", "roi", "preset", "roi_x0", "roi_y0", "roi_x1", "roi_y1", "source", "plane", "width", "height",
    "edits", "parameters", "seed", "stage", "steps", "sampler", "generator", "generator_hash", "lora", "lora_hash",
    "controlnet", "controlnet_hash",
]
SKIPPED_COLUMNS = ["source", "reason"]

#: (pairs in the folder, pairs wanted or None, the row just written)
PairProgress = Callable[[int, int | None, dict[str, str]], None]


@dataclass(frozen=True)
class PairSource:
    """One scan of the input set: ``key`` names it in metadata.csv (its path relative to the data
    folder or CSV); ``annotation`` is its structures-folder annotation, or None to detect the layout."""

    key: str
    path: Path
    annotation: AnnotatedImage | None = None


def read_pair_sources(data: Path, exclude: Path | None = None) -> list[PairSource]:
    """The scans of ``data``: a structures folder (images.csv + boxes.csv, its more/ too: the
    annotated layouts), its images.csv, a folder of images (searched recursively, hidden files and
    ``exclude`` left out) or a CSV with an ``image`` column (paths relative to the CSV); the last two
    get their layouts from the structure detector."""
    data = Path(data).expanduser()
    if data.is_file() and data.name == IMAGES_TABLE and (data.parent / BOXES_TABLE).is_file():
        data = data.parent
    if data.is_dir() and (data / IMAGES_TABLE).is_file() and (data / BOXES_TABLE).is_file():
        sources = [PairSource(_relative_key(item.path, data), item.path, item) for item in read_structures(data)]
    elif data.is_dir():
        sources = [PairSource(_relative_key(path, data), path) for path in _image_files(data, exclude)]
    elif data.is_file() and data.suffix.lower() == ".csv":
        sources = _csv_sources(data)
    elif data.exists():
        raise FetalStudioError(f"--data {data} is neither a folder nor a .csv file. Give a structures folder (images.csv + "
                               "boxes.csv), a folder of images or a CSV with an 'image' column.")
    else:
        raise FetalStudioError(f"--data {data} does not exist. Give a structures folder (images.csv + boxes.csv), a folder "
                               "of images or a CSV with an 'image' column.")
    if not sources:
        raise FetalStudioError(f"--data {data} holds no images ({', '.join(supported_suffixes())}). Choose the folder (or "
                               "CSV) that lists the scans.")
    return sources


def _relative_key(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)


def _image_files(folder: Path, exclude: Path | None) -> list[Path]:
    suffixes, skip = supported_suffixes(), exclude.resolve() if exclude is not None else None
    files = []
    for path in sorted(folder.rglob("*")):
        inside = path.relative_to(folder).parts
        if any(part.startswith(".") for part in inside) or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        files.append(path)
    return files


def _csv_sources(table: Path) -> list[PairSource]:
    rows = read_csv_rows(table)
    if not rows or "image" not in rows[0]:
        raise FetalStudioError(f"{table.name} needs an 'image' column (paths relative to the CSV) and at least one row.")
    sources = []
    for number, row in enumerate(rows, start=2):
        cell = (row.get("image") or "").strip()
        if not cell:
            raise FetalStudioError(f"{table.name}, row {number}: the 'image' cell is empty; give the scan's path or remove the row.")
        path = Path(cell).expanduser()
        sources.append(PairSource(cell, path if path.is_absolute() else table.parent / path))
    return sources


@dataclass(frozen=True)
class PairsRequest:
    """What to make. ``parameters``: the preset's (defaults for the rest); ``limit``: at most that many
    pairs in the folder (None: one per scan the preset applies to); ``options.controlnet`` / ``lora`` as
    in ``FlexOptions`` (None: the catalog's default ControlNet, the plane's LoRA)."""

    data: Path
    out: Path
    preset: str
    parameters: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    seed: int = 0
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    guidance_scale: float = DEFAULT_GUIDANCE
    model: str | None = None
    roi_margin: float = DEFAULT_MARGIN_PX
    options: FlexOptions = FlexOptions()


@dataclass
class PairsReport:
    out: Path
    written: int = 0  # pairs made by this run
    existing: int = 0  # pairs found in the folder (made by an earlier run)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    cancelled: bool = False

    @property
    def pairs(self) -> int:
        return self.written + self.existing


@dataclass(frozen=True)
class _Resolved:
    """The request checked against the catalog: the preset, its parameter values, the concrete models."""

    preset: Preset
    values: dict[str, Any]
    model: str
    options: FlexOptions

    def fingerprint(self, request: PairsRequest) -> dict[str, Any]:
        return json.loads(json.dumps({
            "schema": PAIRS_SCHEMA, "version": PAIRS_VERSION, "data": str(Path(request.data).expanduser().resolve()),
            "preset": self.preset.name, "parameters": self.values, "seed": request.seed, "steps": request.steps,
            "sampler": request.sampler, "guidance_scale": request.guidance_scale, "model": self.model,
            "roi_margin": request.roi_margin, "options": self.options.to_dict()}))


def _resolve(manager, request: PairsRequest) -> _Resolved:
    preset = load_presets().get(request.preset)
    values = preset.values(request.parameters)
    if request.limit is not None and (isinstance(request.limit, bool) or request.limit < 1):
        raise FetalStudioError(f"The limit must be at least 1 pair (got {request.limit}); leave it out for one pair per scan.")
    if not (np.isfinite(request.roi_margin) and request.roi_margin >= 0):
        raise FetalStudioError(f"The ROI margin must be 0 or more pixels (got {request.roi_margin}).")
    model = manager.entry(request.model or manager.default_id(ModelKind.SD_PIPELINE)).id
    controlnet = resolve_controlnet(manager, request.options.controlnet, request.options.condition)
    lora = resolve_lora(manager, preset.plane, request.options.lora)
    return _Resolved(preset, values, model, replace(request.options, controlnet=controlnet, lora=lora or ""))


# --- the output folder ------------------------------------------------------------------------------
class _PairsFolder:
    """metadata.csv, pairs.json and the images of one output folder (held under its lock)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.csv_path = out / METADATA_FILE
        self.done: set[tuple[str, str, str]] = set()

    def open(self, fingerprint: dict[str, Any]) -> int:
        """Check (or record) the settings, keep the complete rows, sweep unrecorded files; the pairs there."""
        settings_path = self.out / SETTINGS_FILE
        if settings_path.is_file():
            recorded = read_json(settings_path, f" (delete {self.out} or choose a new --out)")
            if recorded != fingerprint:
                changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
                raise FetalStudioError(
                    f"{self.out} holds pairs made with another command ({', '.join(changed)} differ). Run the same command "
                    "to resume it, or give a new (or empty) --out for these settings.")
        else:
            if any(path.name != LOCK_FILE for path in self.out.iterdir()):
                raise _not_a_pairs_folder(self.out)
            atomic_write_json(settings_path, fingerprint)
        rows = self.rows()
        complete = [row for row in rows if self._complete(row)]
        if len(complete) != len(rows) or not self.csv_path.is_file():
            atomic_write_bytes(self.csv_path, _csv_text([dict(zip(METADATA_COLUMNS, METADATA_COLUMNS))] + complete).encode("utf-8"))
        self._sweep({row[side] for row in complete for side in SIDES})
        self.done = {_pair_key(row) for row in complete}
        return len(complete)

    def rows(self) -> list[dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def _complete(self, row: dict[str, str]) -> bool:
        """A row written whole (a crash may cut the last one short) whose three images exist."""
        if any(row.get(column) in (None, "") for column in ("normal", "abnormal", "roi", "source", "controlnet_hash")):
            return False
        return all((self.out / row[side]).is_file() for side in SIDES)

    def _sweep(self, kept: set[str]) -> None:
        """Remove what an interrupted run left: temporary files and images no row names."""
        for path in self.out.glob(f".*{TEMP_SUFFIX}"):
            path.unlink()
        for side in SIDES:
            folder = self.out / side
            for path in folder.iterdir() if folder.is_dir() else []:
                if path.name.endswith(TEMP_SUFFIX) or (path.suffix == ".png" and f"{side}/{path.name}" not in kept):
                    path.unlink()

    def record(self, row: dict[str, str]) -> None:
        append_line(self.csv_path, _csv_text([row]))
        self.done.add(_pair_key(row))


def _not_a_pairs_folder(out: Path) -> FetalStudioError:
    return FetalStudioError(f"{out} is not empty and holds no counterfactual pairs ({SETTINGS_FILE} is missing). Give a "
                            "new (or empty) --out.")


def _pair_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return str(row["source"]), str(row["preset"]), str(row["seed"])


def _csv_text(rows: list[dict[str, Any]], columns: list[str] = METADATA_COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()


def write_skipped(out: Path, skipped: list[tuple[str, str]]) -> Path:
    path = out / SKIPPED_FILE
    header = dict(zip(SKIPPED_COLUMNS, SKIPPED_COLUMNS))
    atomic_write_bytes(path, _csv_text([header] + [dict(zip(SKIPPED_COLUMNS, item)) for item in skipped], SKIPPED_COLUMNS).encode("utf-8"))
    return path


# --- one pair -----------------------------------------------------------------------------------------
def _source_layout(manager, source: PairSource, image: LoadedImage, plane: str) -> Layout:
    if source.annotation is None:
        from fetalstudio.anatomy.flex_cli import detect_layout

        layout = detect_layout(manager, image)
    else:
        if image.size != (source.annotation.width, source.annotation.height):
            raise FetalStudioError(f"the image is {image.size[0]}x{image.size[1]} but images.csv says "
                                   f"{source.annotation.width}x{source.annotation.height}")
        layout = Layout.from_annotated_image(source.annotation, plane)
    if layout.pixel_size_mm is None and image.pixel_size_mm:
        layout = replace(layout, pixel_size_mm=image.pixel_size_mm)
    return layout


def annotation_plane(sources: list[PairSource], wanted: str) -> str | None:
    """The plane of a structures folder's boxes: ``wanted`` when its structures cover them all, else the
    first plane that does (None when the sources have no annotation)."""
    names = {box[0] for source in sources if source.annotation is not None for box in source.annotation.boxes}
    if not any(source.annotation is not None for source in sources):
        return None
    planes = [name for name, plane in ANATOMY_PLANES.items() if names <= {s.name for s in plane.structures}]
    if wanted in planes:
        return wanted
    if not planes:
        raise FetalStudioError(f"The boxes of --data name structures of no single plane ({', '.join(sorted(names))}).")
    return planes[0]


def _file_name(index: int, key: str) -> str:
    name = Path(key).with_suffix("")
    name = Path(name.name) if name.is_absolute() else name  # a file listed by absolute path: its own name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "image"
    return f"{index:05d}_{stem}.png"


def _png_bytes(outcome: FlexOutcome, side: str, context: dict[str, Any]) -> bytes:
    metadata = dict(outcome.results[-1].images[0].metadata)
    metadata["flex_pair"] = {"side": side, **context, "stage": outcome.options.stage,
                             "options": outcome.options.to_dict(), "letterbox": outcome.letterbox.to_dict()}
    buffer = io.BytesIO()
    outcome.final.save(buffer, format="PNG", pnginfo=png_info(outcome.settings, outcome.seed, metadata))
    return buffer.getvalue()


def roi_box(roi: np.ndarray) -> tuple[int, int, int, int]:
    """The ROI's bounding rectangle (x0, y0, x1, y1) in image pixels, x1/y1 exclusive: ``image[y0:y1, x0:x1]``."""
    rows, columns = np.flatnonzero(roi.any(axis=1)), np.flatnonzero(roi.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def _row(names: dict[str, str], source: PairSource, before: Layout, applied: list[dict], roi: np.ndarray,
         outcome: FlexOutcome, resolved: _Resolved, request: PairsRequest) -> dict[str, str]:
    metadata = outcome.results[0].images[0].metadata
    loras = metadata.get("loras", [])
    x0, y0, x1, y1 = roi_box(roi)
    return {**names, "preset": resolved.preset.name, "roi_x0": x0, "roi_y0": y0, "roi_x1": x1, "roi_y1": y1,
            "source": source.key, "plane": before.plane, "width": before.width, "height": before.height,
            "edits": json.dumps(applied), "parameters": json.dumps(resolved.values), "seed": outcome.seed,
            "stage": outcome.options.stage, "steps": request.steps, "sampler": request.sampler,
            "generator": metadata.get("model", {}).get("id", ""), "generator_hash": metadata.get("model", {}).get("hash", ""),
            "lora": ";".join(l["name"] for l in loras), "lora_hash": ";".join(str(l["hash"]) for l in loras),
            "controlnet": outcome.controlnet["id"], "controlnet_hash": outcome.controlnet["hash"]}


def export_pairs(manager, request: PairsRequest, on_pair: PairProgress | None = None,
                 cancel: threading.Event | None = None) -> PairsReport:
    """Write the pairs of ``request`` into ``request.out`` (see the module doc); resumes a folder made by
    the same request. ``on_pair`` after each pair written; ``cancel`` stops after the current step (the
    pair being made is not written)."""
    out = Path(request.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FetalStudioError(f"--out {out} is a file, not a folder; give a folder for the pairs (it is created).")
    resolved = _resolve(manager, request)
    sources = read_pair_sources(request.data, exclude=out)
    plane = annotation_plane(sources, resolved.preset.plane)
    if plane is not None and plane != resolved.preset.plane:
        raise FetalStudioError(f"Preset {resolved.preset.name} is for the {resolved.preset.plane} plane, but the boxes of "
                               f"--data are of the {plane} plane. Choose a preset of that plane (`flex presets`).")
    if out.is_dir() and not (out / SETTINGS_FILE).is_file() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise _not_a_pairs_folder(out)  # before the lock file goes in: someone else's folder stays untouched
    out.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(out).hold(blocking=False):
            return _export_locked(manager, request, resolved, sources, plane, on_pair, cancel)
    except BlockingIOError:
        raise FetalStudioError(f"{out} is in use by another `flex pairs` run. Wait for it to finish, or give another --out.") from None
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(out, "Every pair listed in metadata.csv is complete; run the same command again to resume.") from error
        raise


def _export_locked(manager, request: PairsRequest, resolved: _Resolved, sources: list[PairSource], plane: str | None,
                   on_pair: PairProgress | None, cancel: threading.Event | None) -> PairsReport:
    out = Path(request.out).expanduser()
    folder = _PairsFolder(out)
    report = PairsReport(out, existing=folder.open(resolved.fingerprint(request)))
    for side in SIDES:
        (out / side).mkdir(exist_ok=True)
    preset = resolved.preset
    try:
        for index, source in enumerate(sources):
            if request.limit is not None and report.pairs >= request.limit:
                break
            seed = request.seed + index
            if (source.key, preset.name, str(seed)) in folder.done:
                continue
            try:
                image = load_image(source.path)
                before = _source_layout(manager, source, image, plane or preset.plane)
            except (ModelNotFoundError, ModelLoadError):  # the detector itself: every scan would fail
                raise
            except FetalStudioError as error:  # unreadable, or the detector found nothing: this scan only
                report.skipped.append((source.key, str(error)))
                continue
            if before.plane != preset.plane:
                raise FetalStudioError(f"Preset {preset.name} is for the {preset.plane} plane, but the detector finds "
                                       f"{before.plane} structures. Choose a preset of that plane (`flex presets`).")
            try:
                after = preset.apply(before, resolved.values)
                roi = edit_roi(before, after, request.roi_margin)
            except FetalStudioError as error:  # a structure not annotated (or detected), a box leaving the frame
                report.skipped.append((source.key, str(error)))
                continue
            applied = [edit.to_dict() for edit in preset.edits(resolved.values)]
            pair = _make_pair(manager, request, resolved, Image.fromarray(image.gray), before, after, roi, seed, cancel)
            if pair is None:
                report.cancelled = True
                break
            normal, abnormal = pair
            name = _file_name(index, source.key)
            names = {side: f"{side}/{name}" for side in SIDES}
            context = {"source": source.key, "preset": preset.name, "parameters": resolved.values}
            atomic_write_bytes(out / names["normal"], _png_bytes(normal, "normal", context))
            atomic_write_bytes(out / names["abnormal"], _png_bytes(abnormal, "abnormal", context))
            write_roi(out / names["roi"], roi)
            row = _row(names, source, before, applied, roi, abnormal, resolved, request)
            folder.record(row)
            report.written += 1
            if on_pair is not None:
                on_pair(report.pairs, request.limit, row)
    finally:
        write_skipped(out, report.skipped)
    return report


def _make_pair(manager, request: PairsRequest, resolved: _Resolved, source: Image.Image, before: Layout, after: Layout,
               roi: np.ndarray, seed: int, cancel: threading.Event | None) -> tuple[FlexOutcome, FlexOutcome] | None:
    """(normal, abnormal): the ROI regenerated from each layout with the same seed and options; None if cancelled."""
    made = []
    for layout, other in ((before, after), (after, before)):
        settings = flex_settings(manager, layout, steps=request.steps, seed=seed, sampler=request.sampler,
                                 guidance_scale=request.guidance_scale, model=resolved.model)
        outcome = run_flex(manager, settings, source, layout, roi, resolved.options, cancel=cancel, before=other)
        if outcome.cancelled:
            return None
        made.append(outcome)
    return made[0], made[1]
