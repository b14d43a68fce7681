"""Project folders for the Anatomy editor: listing them, reopening one as an editor document, and
its downloads (the source and result side by side, the whole folder as a zip).

Every folder given must lie inside the projects root (``root``, default ``project.projects_dir()``),
symlinks resolved: the editor takes a project's name from the browser, so a name that leads
anywhere else is refused with the same clear message.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fetalstudio.anatomy.editor import (
    EditorState, PresetChoice, SourceImage, open_image, pixels_sha256, set_project, set_roi_mask, state_from_dict,
    with_layout,
)
from fetalstudio.anatomy.edits import edit_from_dict
from fetalstudio.anatomy.project import FlexProject, projects_dir, read_project
from fetalstudio.detection.predict import Detection
from fetalstudio.errors import FetalStudioError, disk_full_error, is_disk_full
from fetalstudio.imaging.files import atomic_write_bytes, png_bytes, read_json
from fetalstudio.imaging.image_input import load_image
from fetalstudio.paths import is_under

#: The editor's document (``editor.state_to_dict``, with its undo history), kept in a project by the editor.
EDITOR_FILE = "editor.json"
#: The structure detector's boxes on the project's result (``found_json``), kept by the editor so that
#: reopening a project shows the anatomy check without running the detector again.
FOUND_FILE = "found.json"
FOUND_SCHEMA = "fetalstudio.found-structures"
#: The white bar between source and result in :func:`pair_picture`.
PAIR_SEPARATOR_PX = 4


# --- where projects may be -----------------------------------------------------------------------
def project_folder(folder: str | Path, root: Path | None = None) -> Path:
    """``folder`` resolved, when it is a folder inside ``root`` (default :func:`projects_dir`); else a
    clear error (the same for a name that is missing or leads outside)."""
    root = Path(root or projects_dir())
    folder = Path(folder)
    if not is_under(folder, [root]) or folder.resolve() == root.resolve() or not folder.resolve().is_dir():
        raise FetalStudioError(f"There is no project {folder.name!r} among the projects in {root}; pick one from the "
                               "list of projects (each run of Generate makes one).")
    return folder.resolve()


def _opened_project(folder: str | Path, root: Path | None) -> FlexProject:
    return read_project(project_folder(folder, root))


# --- the list -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectSummary:
    """What the list of projects shows of one project."""

    name: str
    folder: Path
    created: str  # local time, "YYYY-mm-dd HH:MM:SS"
    source: str  # the edited image's file name
    preset: str | None  # the presets applied, comma-separated
    seed: int | None
    stage: str
    plane: str
    created_unix: float = 0.0

    @property
    def title(self) -> str:
        """One line naming the project: when, which image, which preset, seed and stage."""
        return (f"{self.created} · {self.source} · {self.preset or 'edited by hand'} · seed "
                f"{'?' if self.seed is None else self.seed} · {self.stage}")


def _text(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) and value else default


def _summary(project: FlexProject) -> ProjectSummary:
    record = project.record
    created_unix = record.get("created_unix")
    if isinstance(created_unix, (int, float)) and not isinstance(created_unix, bool) and np.isfinite(created_unix):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created_unix))
    else:
        created_unix, created = 0.0, _text(record.get("created"), "unknown time")
    image = record.get("image") if isinstance(record.get("image"), dict) else {}
    presets = record.get("presets") if isinstance(record.get("presets"), list) else []
    seed = record.get("seed")
    return ProjectSummary(
        project.name, project.path, created, Path(_text(image.get("path"), "source.png")).name,
        ", ".join(p for p in presets if isinstance(p, str)) or None,
        seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        _text(record.get("stage"), "?"), _text(record.get("plane"), "?"), float(created_unix))


def project_summaries(root: Path | None = None, limit: int = 200) -> list[ProjectSummary]:
    """The newest ``limit`` projects under ``root`` (default :func:`projects_dir`), newest first. Partial
    folders, folders that are not projects and projects that cannot be read are left out (never an error)."""
    root = Path(root or projects_dir())
    summaries = []
    try:
        folders = [folder for folder in root.iterdir() if not folder.name.startswith(".")] if root.is_dir() else []
    except OSError:
        return []
    for folder in folders:
        try:
            summaries.append(_summary(_opened_project(folder, root)))
        except (FetalStudioError, OSError, ValueError, TypeError, AttributeError, OverflowError):
            continue
    summaries.sort(key=lambda summary: (summary.created_unix, summary.name), reverse=True)
    return summaries[:max(0, int(limit))]


# --- reopening a project ---------------------------------------------------------------------------------
def _same_pixels_at(path: str, sha256: str) -> bool:
    try:
        return pixels_sha256(load_image(path).gray) == sha256
    except (FetalStudioError, OSError):
        return False


def _saved_state(project: FlexProject, source: SourceImage) -> EditorState | None:
    """The document kept in the project's editor.json, its image the original file when that still holds
    the project's source pixels, else the project's source.png; None when it is missing or unusable."""
    path = project.path / EDITOR_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("state"), dict):  # an editor session's revision file
            data = data["state"]
        state = state_from_dict(data, f"{project.name}/{EDITOR_FILE}")
    except FetalStudioError:
        return None
    if state.image.sha256 != source.sha256 or state.image.size != source.size:
        return None  # not this project's image
    if not _same_pixels_at(state.image.path, source.sha256):
        state = replace(state, image=replace(source, pixel_size_mm=state.image.pixel_size_mm))
    return state


def _recorded(project: FlexProject) -> tuple[tuple, PresetChoice | None]:
    """The edits and the last preset recorded in edits.json (none when it cannot be read: they are a record)."""
    try:
        data = project.edits()
        edits = tuple(edit_from_dict(edit, f"{project.name}/edits.json") for edit in data.get("edits", []))
        presets = [p for p in data.get("presets", []) if isinstance(p, dict) and isinstance(p.get("name"), str)]
        preset = PresetChoice(presets[-1]["name"], tuple(dict(presets[-1].get("parameters") or {}).items())) \
            if presets else None
    except (FetalStudioError, AttributeError, TypeError, ValueError):
        return (), None
    return edits, preset


def _rebuilt_state(project: FlexProject) -> EditorState:
    """The document rebuilt from the project's files: its source, the layout before and the layout after
    (two undo steps, origin "project"), its painted ROI when it had one."""
    before, after = project.layout("before"), project.layout("after")
    state = open_image(load_image(project.file("source.png")), after.plane, before, "project")
    edits, preset = _recorded(project)
    state = replace(with_layout(state, after, "the project's edited layout", edits), preset=preset)
    roi = project.record.get("roi")
    if isinstance(roi, dict) and roi.get("source") == "mask" and "roi.png" in project.record.get("files", []):
        try:
            state = set_roi_mask(state, project.path / "roi.png")
        except FetalStudioError:
            pass  # the automatic ROI is the fallback
    return state


def open_project_state(folder: str | Path, root: Path | None = None) -> EditorState:
    """The editor document of the project in ``folder`` (inside ``root``): the one the editor kept in its
    editor.json (with its undo history) when it is there and readable, else one rebuilt from the project's
    source and layouts. Its ``project`` is the folder."""
    project = _opened_project(folder, root)
    image = load_image(project.file("source.png"))
    source = SourceImage.from_loaded(image)
    state = _saved_state(project, source) or _rebuilt_state(project)
    return set_project(state, project.path)


# --- downloads -------------------------------------------------------------------------------------------
def _gray(project: FlexProject, name: str) -> np.ndarray:
    return np.asarray(project.image(name).convert("L"))


def pair_picture(folder: str | Path, root: Path | None = None) -> np.ndarray:
    """The project's source and result side by side (gray uint8), split by a white bar of
    :data:`PAIR_SEPARATOR_PX` pixels."""
    project = _opened_project(folder, root)
    source, result = _gray(project, "source"), _gray(project, "result")
    height = max(source.shape[0], result.shape[0])
    pair = np.zeros((height, source.shape[1] + PAIR_SEPARATOR_PX + result.shape[1]), np.uint8)
    pair[:source.shape[0], :source.shape[1]] = source
    pair[:, source.shape[1]:source.shape[1] + PAIR_SEPARATOR_PX] = 255
    pair[:result.shape[0], source.shape[1] + PAIR_SEPARATOR_PX:] = result
    return pair


def _outside_project(out: Path, project: FlexProject, what: str) -> Path:
    out = Path(out).expanduser()
    if is_under(out, [project.path]):
        raise FetalStudioError(f"The {what} would be written into the project {project.name} itself, which is never "
                               "changed; write it to another folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write_download(out: Path, project: FlexProject, data: bytes) -> None:
    try:
        atomic_write_bytes(out, data)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(out.parent, f"The project {project.name} itself is complete.") from error
        raise


def write_pair_png(folder: str | Path, out_path: Path, root: Path | None = None) -> Path:
    """Write :func:`pair_picture` as a PNG at ``out_path`` (atomically, outside the project) and return it."""
    project = _opened_project(folder, root)
    out_path = _outside_project(out_path, project, "side-by-side picture")
    _write_download(out_path, project, png_bytes(pair_picture(project.path, root), out_path.name))
    return out_path


def _project_members(folder: Path) -> list[Path]:
    """Every file of the project folder, sorted; a symlink or anything that is not a plain file is refused."""
    members = []
    for current, folders, files in os.walk(folder, followlinks=False):
        for name in sorted(folders + files):
            path = Path(current) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                inside = path.relative_to(folder)
                raise FetalStudioError(f"The project {folder.name} holds {inside}, which is a link or not a plain "
                                       "file; it is not zipped. Remove it from the project folder.")
            if path.is_file():
                members.append(path)
    return sorted(members)


def zip_project(folder: str | Path, out_zip: Path, root: Path | None = None) -> Path:
    """The whole project folder as a zip at ``out_zip`` (names relative to the folder; written atomically,
    outside the project) and return its path. A project holding a symlink is refused."""
    project = _opened_project(folder, root)
    out_zip = _outside_project(out_zip, project, "zip file")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in _project_members(project.path):
            # PNG is compressed already: stored as it is
            packed = zipfile.ZIP_STORED if path.suffix.lower() == ".png" else zipfile.ZIP_DEFLATED
            archive.write(path, path.relative_to(project.path).as_posix(), packed)
    _write_download(out_zip, project, buffer.getvalue())
    return out_zip


# --- the detector's boxes on the result ------------------------------------------------------------------
def found_json(found: list[Detection], detector: str) -> bytes:
    """The detector's boxes on a result as the project's found.json (``detector``: its catalog id)."""
    boxes = [{"structure": d.structure, "x0": d.x0, "y0": d.y0, "x1": d.x1, "y1": d.y1, "score": d.score} for d in found]
    return json.dumps({"schema": FOUND_SCHEMA, "version": 1, "detector": detector, "boxes": boxes}, indent=1).encode("utf-8")


def read_found(folder: str | Path, root: Path | None = None) -> list[Detection] | None:
    """The boxes of a project's found.json; None when the project has none (made before it was kept) or it
    cannot be read (then the caller runs the detector again)."""
    path = project_folder(folder, root) / FOUND_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") != FOUND_SCHEMA:
            return None
        return [Detection(str(b["structure"]), float(b["x0"]), float(b["y0"]), float(b["x1"]), float(b["y1"]),
                          float(b["score"])) for b in data["boxes"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
