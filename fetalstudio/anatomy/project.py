"""Project folders: everything one anatomy edit used and made, written all at once.

A project folder (default ``outputs/anatomy/projects/<YYYYmmdd-HHMMSS>-<6 hex>``) holds::

    source.png            the scan as edited (its own pixels and size)
    layout_before.json    the layout before the edit (fetalstudio.layout) and its map (filled boxes)
    layout_before.png
    layout_after.json     the layout the ROI was generated from, and its map
    layout_after.png
    condition.png         the letterboxed layout map the ControlNet saw (the generator's square)
    roi.png               the regenerated region (255 = ROI), the source's size
    osm_mask.png          stage 2's organ mask (stage ssa+osm only)
    stage1.png            stage 1's image, and result.png the final one (stage 2's for ssa+osm);
    result.png            both carry the parameters chunk (``pipelines.metadata``: A1111 text + JSON)
    edits.json            the edits and presets applied (``fetalstudio.anatomy.edits`` JSON)
    project.json          schema "fetalstudio.flex-project" version 1: parameters, seeds, model ids and
                          hashes, stage, options, letterbox, timings, FetalStudio version, file list
    ...                   the caller's extra files (``extra_files``: e.g. the editor's editor.json), listed
                          in project.json's file list too

The folder is built beside its target (``.<name>.partial-<hex>``) and renamed into place when
complete, so a crash, a cancel or a full disk leaves no half-written project. An existing folder is
used only when empty: a finished project is never overwritten (it is the record of an earlier run;
choose a new folder).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fetalstudio import __version__
from fetalstudio.anatomy.flex import FlexOutcome
from fetalstudio.anatomy.layout import Layout
from fetalstudio.anatomy.layout_map import layout_color_map
from fetalstudio.anatomy.roi import write_roi
from fetalstudio.errors import FetalStudioError, disk_full_error, is_disk_full
from fetalstudio.imaging.files import atomic_write_bytes, atomic_write_json, move_into_place, read_json
from fetalstudio.paths import outputs_dir
from fetalstudio.pipelines.metadata import save_png

PROJECT_SCHEMA = "fetalstudio.flex-project"
PROJECT_VERSION = 1
PROJECT_FILE = "project.json"
PARTIAL_MARK = ".partial-"
IMAGE_FILES = ("source", "layout_before", "layout_after", "condition", "roi", "osm_mask", "stage1", "result")
#: Every file a project may hold besides the caller's extra files.
STANDARD_FILES = frozenset([f"{name}.png" for name in IMAGE_FILES] + ["layout_before.json", "layout_after.json",
                                                                      "edits.json", PROJECT_FILE])


def projects_dir() -> Path:
    """Where projects go by default: ``outputs/anatomy/projects``."""
    return outputs_dir() / "anatomy" / "projects"


def new_project_folder(root: Path | None = None) -> Path:
    """A fresh folder name under ``root`` (default :func:`projects_dir`): ``<timestamp>-<short id>``."""
    return Path(root or projects_dir()) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_project_folder(out: Path) -> Path:
    """``out`` if a project may be written there (missing, or an empty folder); else a clear error.
    Call before the run, so a refused folder costs no generation time."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FetalStudioError(f"{out} is a file, not a folder; give a folder for the project (it is created).")
    if out.is_dir() and any(out.iterdir()):
        what = "a finished anatomy project" if (out / PROJECT_FILE).is_file() else "not empty"
        raise FetalStudioError(f"The project folder {out} is {what}; a project is never written over existing files. "
                               "Give a new (or empty) folder, or leave --out out for a fresh one under "
                               f"{projects_dir()}.")
    return out


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels_sha256(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def _write_image(path: Path, image: Image.Image) -> None:
    atomic_write_bytes(path, _png_bytes(image))


def _png_metadata(outcome: FlexOutcome, result_index: int, name: str, folder_name: str) -> dict[str, Any]:
    metadata = dict(outcome.results[result_index].images[0].metadata)
    metadata["flex"] = {"project": folder_name, "image": name, "stage": outcome.options.stage,
                        "options": outcome.options.to_dict(), "letterbox": outcome.letterbox.to_dict(),
                        "source_sha256": _pixels_sha256(outcome.source)}
    return metadata


def _models(outcome: FlexOutcome) -> dict[str, Any]:
    metadata = outcome.results[0].images[0].metadata
    return {"generator": metadata.get("model", {}), "controlnet": dict(outcome.controlnet),
            "loras": metadata.get("loras", [])}


def project_record(outcome: FlexOutcome, folder_name: str, files: list[str], *, image_path: str | None,
                   roi_source: str, edits: list[dict], presets: list[dict], extra: dict[str, Any] | None) -> dict:
    """The contents of project.json."""
    stage_runs = [{"stage": "stage1" if i == 0 else "osm", "seconds": r.seconds,
                   "seeds": [image.seed for image in r.images], "task": r.images[0].metadata.get("task", {})}
                  for i, r in enumerate(outcome.results)]
    return {
        "schema": PROJECT_SCHEMA, "version": PROJECT_VERSION, "name": folder_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "created_unix": time.time(), "fetalstudio": __version__,
        "versions": outcome.results[0].images[0].metadata.get("versions", {}),
        "stage": outcome.options.stage, "options": outcome.options.to_dict(), "settings": outcome.settings.to_dict(),
        "seed": outcome.seed, "models": _models(outcome), "runs": stage_runs,
        "image": {"path": image_path, "width": outcome.source.width, "height": outcome.source.height,
                  "mode": outcome.source.mode, "sha256": _pixels_sha256(outcome.source)},
        "plane": outcome.layout.plane, "roi": {"source": roi_source, "pixels": int(outcome.roi.sum())},
        "osm_mask": None if outcome.osm_mask is None else {"pixels": int(outcome.osm_mask.sum())},
        "letterbox": outcome.letterbox.to_dict(), "edits": len(edits), "presets": [p.get("name") for p in presets],
        "timings": {key: round(value, 3) for key, value in outcome.seconds.items()},
        "files": files, **(extra or {}),
    }


def check_extra_files(extra_files: dict[str, bytes] | None) -> dict[str, bytes]:
    """``extra_files`` if each is a plain file name (no folder, not hidden, not a standard project file)
    with bytes; else a clear error naming the file."""
    checked = {}
    for name, data in (extra_files or {}).items():
        plain = isinstance(name, str) and name.strip() == name and name not in ("", ".", "..") \
            and not name.startswith(".") and not any(c in name for c in "/\\\0")
        if not plain:
            raise FetalStudioError(f"The extra project file {name!r} is not a plain file name; give a name such as "
                                   "editor.json (no folder, not hidden). Nothing was written.")
        if name in STANDARD_FILES:
            raise FetalStudioError(f"The extra project file {name} would replace the project's own {name}; give it "
                                   "another name. Nothing was written.")
        if not isinstance(data, (bytes, bytearray)):
            raise FetalStudioError(f"The extra project file {name} must be bytes, not {type(data).__name__}. "
                                   "Nothing was written.")
        checked[name] = bytes(data)
    return checked


def write_project(outcome: FlexOutcome, out: Path | None = None, *, image_path: str | None = None,
                  roi_source: str = "given", edits: list[dict] | None = None, presets: list[dict] | None = None,
                  extra: dict[str, Any] | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the project folder of a finished edit (see the module doc) and return its path.

    ``out``: the folder (missing or empty; default a new one under :func:`projects_dir`); ``edits``:
    the applied edits as JSON objects; ``presets``: ``{"name", "parameters"}`` of the presets applied;
    ``roi_source``: how the ROI was chosen ("auto", a mask file); ``extra``: more project.json keys;
    ``extra_files``: more files, plain name -> contents (see :func:`check_extra_files`)."""
    if outcome.cancelled or outcome.final is None or outcome.stage1 is None:
        raise FetalStudioError("The edit was cancelled, so there is no result to save; nothing was written.")
    extra_files = check_extra_files(extra_files)
    out = check_project_folder(out if out is not None else new_project_folder())
    edits, presets = list(edits or []), list(presets or [])
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    try:
        building.mkdir()
        files = _write_files(outcome, building, out.name, edits, presets)
        for name, data in extra_files.items():
            atomic_write_bytes(building / name, data)
            files.append(name)
        atomic_write_json(building / PROJECT_FILE, project_record(
            outcome, out.name, files + [PROJECT_FILE], image_path=image_path, roi_source=roi_source, edits=edits,
            presets=presets, extra=extra))
        check_project_folder(out)  # nothing appeared there meanwhile
        move_into_place(building, out)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(error, OSError) and is_disk_full(error):
            raise disk_full_error(out.parent, "No project was written: the half-built folder was removed.") from error
        raise
    return out


def _write_files(outcome: FlexOutcome, folder: Path, name: str, edits: list[dict], presets: list[dict]) -> list[str]:
    files = []

    def image(file: str, picture: Image.Image) -> None:
        _write_image(folder / file, picture)
        files.append(file)

    image("source.png", outcome.source)
    before = outcome.before or outcome.layout
    for label, layout in (("layout_before", before), ("layout_after", outcome.layout)):
        layout.write(folder / f"{label}.json")
        files.append(f"{label}.json")
        image(f"{label}.png", Image.fromarray(layout_color_map(layout)))
    image("condition.png", outcome.condition)
    write_roi(folder / "roi.png", outcome.roi)
    files.append("roi.png")
    if outcome.osm_mask is not None:
        write_roi(folder / "osm_mask.png", outcome.osm_mask)
        files.append("osm_mask.png")
    settings, seed = outcome.settings, outcome.seed
    save_png(outcome.stage1, folder / "stage1.png", settings, seed, _png_metadata(outcome, 0, "stage1", name))
    last = len(outcome.results) - 1
    save_png(outcome.final, folder / "result.png", settings, seed, _png_metadata(outcome, last, "result", name))
    files += ["stage1.png", "result.png"]
    atomic_write_json(folder / "edits.json", {"edits": edits, "presets": presets})
    files.append("edits.json")
    return files


@dataclass(frozen=True)
class FlexProject:
    """A project folder read back: its project.json (``record``) and its files on demand."""

    path: Path
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def created(self) -> str:
        return str(self.record.get("created", ""))

    def file(self, name: str) -> Path:
        """The path of one of the project's files (``result.png``, ``roi.png``, ...)."""
        if name not in self.record.get("files", []):
            raise FetalStudioError(f"The project {self.name} has no {name} (it has: {', '.join(self.record.get('files', []))}).")
        return self.path / name

    def image(self, name: str) -> Image.Image:
        """One of the project's images by its name without .png (``result``, ``stage1``, ``source``, ...)."""
        with Image.open(self.file(f"{name}.png")) as opened:
            opened.load()
            return opened.copy()

    def mask(self, name: str = "roi") -> np.ndarray:
        """``roi`` or ``osm_mask`` as a (H, W) bool array."""
        return np.asarray(self.image(name).convert("L")) > 0

    def layout(self, which: str = "after") -> Layout:
        """The layout ``before`` or ``after`` the edit."""
        return Layout.read(self.file(f"layout_{which}.json"))

    def edits(self) -> dict[str, Any]:
        return read_json(self.file("edits.json"))


def read_project(path: Path) -> FlexProject:
    """A project folder written by :func:`write_project`; a clear error for anything else."""
    path = Path(path)
    manifest = path / PROJECT_FILE
    if not manifest.is_file():
        raise FetalStudioError(f"{path} is not an anatomy project (it has no {PROJECT_FILE}). Pick a folder under "
                               f"{projects_dir()}.")
    record = read_json(manifest)
    if not isinstance(record, dict) or record.get("schema") != PROJECT_SCHEMA:
        raise FetalStudioError(f"{manifest} is not an anatomy project file (schema {PROJECT_SCHEMA!r} expected).")
    if record.get("version") != PROJECT_VERSION:
        raise FetalStudioError(f"{manifest} has project version {record.get('version')!r}; this FetalStudio reads "
                               f"version {PROJECT_VERSION} (a newer FetalStudio wrote it: update to open it).")
    return FlexProject(path, record)


def list_projects(root: Path | None = None) -> list[FlexProject]:
    """The finished projects under ``root`` (default :func:`projects_dir`), newest first; partial
    folders and folders that are not projects are skipped."""
    root = Path(root or projects_dir())
    projects = []
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            projects.append(read_project(folder))
        except FetalStudioError:
            continue
    return sorted(projects, key=lambda project: (float(project.record.get("created_unix") or 0), project.name), reverse=True)
