"""The Anatomy editor's document and its transitions, as pure functions over immutable state (no UI).

An :class:`EditorState` holds the source image (path, pixel hash, size), the layout's history (every
state is a whole immutable :class:`Layout`, so undo/redo are exact), the ROI settings, the chosen
preset and the last run's project folder. Every transition returns a new state; a bad input raises
:class:`FetalStudioError` saying what to do, and the caller keeps the state it had. A transition
that changes nothing returns the same state (no undo step), so a UI's change events that echo a
value back cost nothing.

Boxes the structure detector found keep their scores (:attr:`EditorState.detections`, set by
:func:`set_detected`); :func:`box_confidence` gives a box's score while the box is still as detected.

The box table (structure, x0, y0, x1, y1, rotation, confidence) and ``gradio_image_annotation``'s value
(``{"image": ..., "boxes": [{"xmin", "ymin", "xmax", "ymax", "label", "color"}]}``) convert both
ways in :mod:`fetalstudio.anatomy.editor_boxes`; each browser session's document lives on disk through
:mod:`fetalstudio.anatomy.editor_store`.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fetalstudio.anatomy.edits import Edit, edit_from_dict
from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.anatomy.presets import Preset
from fetalstudio.anatomy.roi import DEFAULT_MARGIN_PX, edit_roi, read_user_roi, require_roi
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import png_bytes
from fetalstudio.imaging.image_input import LoadedImage
from fetalstudio.vocabulary import anatomy_plane, structure

#: Undo steps kept (the opened layout is always kept too); older intermediate steps are dropped.
UNDO_LIMIT = 200
ROI_MODES = ("auto", "mask")
#: Where a document's first layout came from.
LAYOUT_ORIGINS = ("annotation", "detected", "empty", "file", "project")


def pixels_sha256(gray: np.ndarray) -> str:
    """The hash a project records for its source (``project.json`` image.sha256) of a grayscale image."""
    image = Image.fromarray(np.ascontiguousarray(gray))
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


@dataclass(frozen=True)
class SourceImage:
    """The scan being edited: where it is, the hash of its pixels and its size."""

    path: str
    sha256: str
    width: int
    height: int
    pixel_size_mm: float | None = None

    @classmethod
    def from_loaded(cls, image: LoadedImage) -> SourceImage:
        return cls(str(image.path), pixels_sha256(image.gray), image.size[0], image.size[1], image.pixel_size_mm)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class RoiSettings:
    """The region to regenerate: ``auto`` (the edited boxes grown by ``margin_px``) or the user's ``mask``
    (kept as a lossless 0/255 PNG of the image's size, so the state stays immutable and comparable)."""

    mode: str = "auto"
    margin_px: float = DEFAULT_MARGIN_PX
    mask_png: bytes | None = None

    def mask(self) -> np.ndarray | None:
        """The user's mask as a (H, W) bool array, or None."""
        if self.mask_png is None:
            return None
        import cv2

        return cv2.imdecode(np.frombuffer(self.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE) > 0


@dataclass(frozen=True)
class PresetChoice:
    """The preset applied last and the parameter values it was given."""

    name: str
    parameters: tuple[tuple[str, Any], ...] = ()

    def values(self) -> dict[str, Any]:
        return dict(self.parameters)


@dataclass(frozen=True)
class Step:
    """One state of the layout and how it was reached (``action``, shown to the user; ``edits``: the
    engine edits that made it, when it was made by edits or a preset). A ``baseline`` step says what the
    scan shows (the opened layout, the detector's boxes): edits, and so the ROI, count from the last one."""

    layout: Layout
    action: str
    edits: tuple[Edit, ...] = ()
    baseline: bool = False


@dataclass(frozen=True)
class History:
    """The layout's steps (``steps[0]`` the opened layout) and the position of the current one.

    ``original`` is the layout of the last baseline step up to the current one (``steps[0]`` counts as one):
    after Detect structures the detected boxes are what the scan shows, and the edit (and its ROI) is what
    was changed since; undoing the detection makes the opened layout the original again."""

    steps: tuple[Step, ...]
    position: int = 0

    @property
    def current(self) -> Layout:
        return self.steps[self.position].layout

    @property
    def baseline_index(self) -> int:
        return max([0] + [i for i, step in enumerate(self.steps[: self.position + 1]) if step.baseline])

    @property
    def original(self) -> Layout:
        return self.steps[self.baseline_index].layout

    @property
    def can_undo(self) -> bool:
        return self.position > 0

    @property
    def can_redo(self) -> bool:
        return self.position < len(self.steps) - 1

    def pushed(self, step: Step) -> History:
        """The history with ``step`` after the current one (undone steps are dropped)."""
        steps = self.steps[: self.position + 1] + (step,)
        if len(steps) > UNDO_LIMIT + 1:
            kept = steps[len(steps) - UNDO_LIMIT:]
            dropped_baselines = [s for s in steps[1: len(steps) - UNDO_LIMIT] if s.baseline]
            # the newest baseline among the dropped steps stays: it is what the kept edits are edits of
            steps = steps[:1] + tuple(dropped_baselines[-1:]) + kept[len(dropped_baselines[-1:]):]
        return History(steps, len(steps) - 1)

    def applied_edits(self) -> list[Edit]:
        """The engine edits since the baseline up to the current step (table and mouse changes have none)."""
        return [edit for step in self.steps[self.baseline_index + 1: self.position + 1] for edit in step.edits]


@dataclass(frozen=True)
class DetectedBox:
    """A box the structure detector found (clipped to the image), with its confidence score."""

    structure: str
    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    def as_box(self) -> StructureBox:
        return StructureBox(self.structure, self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class EditorState:
    """One editor document. Build it with :func:`open_image`; change it with the module's transitions."""

    image: SourceImage
    history: History
    origin: str = "annotation"
    roi: RoiSettings = field(default_factory=RoiSettings)
    preset: PresetChoice | None = None
    project: str | None = None  # the folder of the last run's project
    detections: tuple[DetectedBox, ...] = ()  # the detector's last boxes on this image, with their scores

    @property
    def layout(self) -> Layout:
        return self.history.current

    @property
    def original(self) -> Layout:
        return self.history.original

    @property
    def plane(self) -> str:
        return self.layout.plane


# --- opening ------------------------------------------------------------------------------------
def open_image(image: LoadedImage | SourceImage, plane: str, layout: Layout | None = None,
               origin: str | None = None) -> EditorState:
    """A new document for ``image`` on ``plane`` with ``layout`` (its annotation, detected boxes, a
    file, ...; ``origin`` says which) or, without one, no boxes (``origin`` "empty")."""
    source = SourceImage.from_loaded(image) if isinstance(image, LoadedImage) else image
    try:
        plane = anatomy_plane(plane).name
    except ValueError as error:
        raise FetalStudioError(str(error)) from None
    if layout is None:
        layout, origin = Layout(plane, source.width, source.height, (), source.pixel_size_mm, source.path), "empty"
    elif layout.plane != plane:
        raise FetalStudioError(f"The layout is for the {layout.plane} plane but {plane} was chosen; choose "
                               f"{layout.plane}, or open the image without this layout.")
    elif layout.size != source.size:
        raise FetalStudioError(f"The layout is for a {layout.width}x{layout.height} image but "
                               f"{Path(source.path).name} is {source.width}x{source.height}. Use this image's own "
                               "layout, or detect its structures.")
    elif layout.pixel_size_mm is None and source.pixel_size_mm:
        layout = replace(layout, pixel_size_mm=source.pixel_size_mm)
    origin = origin or "annotation"
    if origin not in LAYOUT_ORIGINS:
        raise FetalStudioError(f"Unknown layout origin {origin!r}; use one of: {', '.join(LAYOUT_ORIGINS)}.")
    return EditorState(source, History((Step(layout, f"opened ({origin})"),)), origin)


def clipped_detections(plane: str, size: tuple[int, int], detections: Iterable[Any]) -> list[DetectedBox]:
    """Detector boxes (objects with structure, x0, y0, x1, y1 and optionally score:
    ``detection.predict.Detection``) clipped to the image; a box left with no size is dropped."""
    width, height = size
    kept = []
    for found in detections:
        name = _check_label(plane, found.structure, "The detector's box")
        x0, x1 = max(0.0, float(found.x0)), min(float(width), float(found.x1))
        y0, y1 = max(0.0, float(found.y0)), min(float(height), float(found.y1))
        if x1 > x0 and y1 > y0:
            kept.append(DetectedBox(name, x0, y0, x1, y1, float(getattr(found, "score", 1.0))))
    return kept


def layout_from_detections(plane: str, size: tuple[int, int], detections: Iterable[Any],
                           pixel_size_mm: float | None = None, source: str = "") -> Layout:
    """A layout from detector boxes, clipped to the image (see :func:`clipped_detections`)."""
    boxes = [found.as_box() for found in clipped_detections(plane, size, detections)]
    return Layout(plane, size[0], size[1], tuple(boxes), pixel_size_mm, source)


# --- layout changes -----------------------------------------------------------------------------
def _check_label(plane: str, name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        names = ", ".join(s.name for s in anatomy_plane(plane).structures)
        raise FetalStudioError(f"{where} has no structure label; choose one of: {names}.")
    try:
        return structure(plane, name.strip()).name
    except ValueError as error:
        raise FetalStudioError(f"{where}: {error}") from None


def check_duplicates(before: Layout, after: Layout) -> None:
    """Refuse a structure boxed more often than before (a second box of one structure is only made by
    an edit such as a split, not by drawing one by mistake)."""
    old, new = Counter(b.structure for b in before.boxes), Counter(b.structure for b in after.boxes)
    for name, count in new.items():
        if count > max(1, old[name]):
            raise FetalStudioError(f"The layout would have {count} {name} boxes; each structure has one box (a split "
                                   "makes two). Move or resize the existing box, or delete it first.")


def with_layout(state: EditorState, layout: Layout, action: str, edits: tuple[Edit, ...] = (),
                baseline: bool = False) -> EditorState:
    """``state`` with ``layout`` as a new undo step (a ``baseline`` one: what the scan shows, see :class:`History`);
    ``state`` itself when the layout is unchanged."""
    if layout.plane != state.plane or layout.size != state.layout.size:
        raise FetalStudioError(f"The new layout is for a {layout.plane} image of {layout.width}x{layout.height} pixels; "
                               f"this document is {state.plane}, {state.image.width}x{state.image.height}.")
    if layout == state.layout:
        return state
    return replace(state, history=state.history.pushed(Step(layout, action, tuple(edits), baseline)))


def apply_edit(state: EditorState, edit: Edit | dict) -> EditorState:
    """Apply one engine edit (an ``anatomy.edits`` object, or its JSON form)."""
    edit = edit_from_dict(edit) if isinstance(edit, dict) else edit
    return with_layout(state, edit.apply(state.layout), edit.describe(), (edit,))


def preview_preset(state: EditorState, preset: Preset, parameters: dict[str, Any] | None = None) -> Layout:
    """The layout ``preset`` would make of the current one (nothing is changed)."""
    return preset.apply(state.layout, parameters)


def apply_preset(state: EditorState, preset: Preset, parameters: dict[str, Any] | None = None) -> EditorState:
    """Apply ``preset`` as one undo step and remember it as the chosen preset."""
    values = preset.values(parameters)
    layout = preview_preset(state, preset, values)
    changed = with_layout(state, layout, f"preset {preset.name}", tuple(preset.edits(values)))
    if changed is state:
        raise FetalStudioError(f"Preset {preset.name} does not change this layout; choose other parameters or another preset.")
    return replace(changed, preset=PresetChoice(preset.name, tuple(values.items())))


def undo(state: EditorState) -> EditorState:
    if not state.history.can_undo:
        raise FetalStudioError("Nothing to undo: the layout is as it was opened.")
    return replace(state, history=replace(state.history, position=state.history.position - 1))


def redo(state: EditorState) -> EditorState:
    if not state.history.can_redo:
        raise FetalStudioError("Nothing to redo: no undone change is waiting.")
    return replace(state, history=replace(state.history, position=state.history.position + 1))


def _box_index(state: EditorState, index: int) -> int:
    count = len(state.layout.boxes)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        where = f"rows 1-{count}" if count else "no boxes yet"
        raise FetalStudioError(f"There is no box {index!r} in the layout ({where}); pick a box in the table.")
    return int(index)


def _checked_box(state: EditorState, box: StructureBox, where: str) -> StructureBox:
    name = _check_label(state.plane, box.structure, where)
    box = replace(box, structure=name)
    try:
        Layout(state.plane, state.image.width, state.image.height, (box,))
    except FetalStudioError as error:
        raise FetalStudioError(f"{where}: {error}") from None
    return box


def set_box(state: EditorState, index: int, box: StructureBox) -> EditorState:
    """Replace box ``index`` (its position in ``state.layout.boxes``) with ``box``."""
    index = _box_index(state, index)
    box = _checked_box(state, box, f"Box {index + 1}")
    boxes = list(state.layout.boxes)
    boxes[index] = box
    layout = state.layout.with_boxes(boxes)
    check_duplicates(state.layout, layout)
    return with_layout(state, layout, f"set {box.describe()}")


def delete_box(state: EditorState, index: int) -> EditorState:
    """Delete box ``index``: the structure becomes absent (e.g. an absent nasal bone)."""
    index = _box_index(state, index)
    removed = state.layout.boxes[index]
    layout = state.layout.with_boxes(state.layout.boxes[:index] + state.layout.boxes[index + 1:])
    return with_layout(state, layout, f"deleted {removed.describe()}")


def add_box(state: EditorState, structure_name: str, x0: float, y0: float, x1: float, y1: float,
            rotation_deg: float = 0.0) -> EditorState:
    """Add a box for a structure the layout lacks."""
    box = _checked_box(state, StructureBox(structure_name, x0, y0, x1, y1, rotation_deg), "The new box")
    if state.layout.has(box.structure):
        raise FetalStudioError(f"The layout already has a {box.structure} box; move or resize it (or delete it first) "
                               "instead of adding a second one.")
    return with_layout(state, state.layout.with_boxes(state.layout.boxes + (box,)), f"added {box.describe()}")


def set_boxes(state: EditorState, boxes: Iterable[StructureBox], action: str) -> EditorState:
    """The whole box list at once (from the table or the mouse); each box is checked with the layout's rules."""
    try:
        layout = state.layout.with_boxes(boxes)
    except FetalStudioError as error:
        raise FetalStudioError(f"{error} The layout was kept as it was.") from None
    check_duplicates(state.layout, layout)
    return with_layout(state, layout, action)


def set_detected(state: EditorState, detections: Iterable[Any], action: str = "detected structures") -> EditorState:
    """The detector's boxes (``detection.predict.Detection``: structure, corners, score) as the layout, clipped
    to the image, in one undo step; their scores are kept for :func:`box_confidence`. The detector's answer
    replaces the whole layout, so it may hold as many boxes of a structure as the detector found. It is a
    baseline step: what the scan shows, so edits (and the ROI) count from it."""
    found = tuple(clipped_detections(state.plane, state.image.size, detections))
    changed = with_layout(state, state.layout.with_boxes(box.as_box() for box in found), action, baseline=True)
    if changed is state and found == state.detections:
        return state
    return replace(changed, detections=found)


#: How far (pixels) a box's corners may be from the detector's and still count as the detected box.
DETECTED_TOLERANCE_PX = 0.5


def box_confidence(state: EditorState, box: StructureBox) -> float | None:
    """The detector's score of ``box`` while it is still as detected (same structure, upright, corners
    within :data:`DETECTED_TOLERANCE_PX`); None for a box drawn, typed or changed by hand."""
    if box.rotation_deg:
        return None
    corners = np.array([box.x0, box.y0, box.x1, box.y1])
    for found in state.detections:
        if found.structure == box.structure and np.all(
                np.abs(corners - (found.x0, found.y0, found.x1, found.y1)) <= DETECTED_TOLERANCE_PX):
            return found.score
    return None


# --- ROI, preset, project -----------------------------------------------------------------------
def set_roi_mode(state: EditorState, mode: str) -> EditorState:
    if mode not in ROI_MODES:
        raise FetalStudioError(f"Unknown ROI mode {mode!r}; use auto (from the edit) or mask (your own).")
    if mode == "mask" and state.roi.mask_png is None:
        raise FetalStudioError("There is no ROI mask yet: paint one (or upload a PNG of the image's size) first.")
    return replace(state, roi=replace(state.roi, mode=mode))


def set_roi_margin(state: EditorState, margin_px: float) -> EditorState:
    try:
        margin = float(margin_px)
    except (TypeError, ValueError):
        raise FetalStudioError(f"The ROI margin must be a number of pixels, got {margin_px!r}.") from None
    if not np.isfinite(margin) or margin < 0 or margin > max(state.image.size):
        raise FetalStudioError(f"The ROI margin must be 0 to {max(state.image.size)} pixels, got {margin_px!r}.")
    return replace(state, roi=replace(state.roi, margin_px=margin))


def set_roi_mask(state: EditorState, mask: str | Path | np.ndarray) -> EditorState:
    """Use the user's mask (a PNG file of the image's size, or a (H, W) array; non-zero = regenerate)
    and switch the ROI to mask mode."""
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2 or mask.shape != (state.image.height, state.image.width):
            raise FetalStudioError(f"The ROI mask is {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} pixels but "
                                   f"the image is {state.image.width}x{state.image.height}; draw it on the image itself.")
        region = require_roi(mask != 0, "the ROI mask")
    else:
        region = read_user_roi(Path(mask), state.image.size)
    encoded = png_bytes(np.where(region, 255, 0).astype(np.uint8), "the ROI mask")
    return replace(state, roi=RoiSettings("mask", state.roi.margin_px, encoded))


def roi_mask(state: EditorState) -> np.ndarray:
    """The region a run would regenerate, (H, W) bool; a clear error when it would be empty."""
    if state.roi.mode == "mask":
        return require_roi(state.roi.mask(), "the ROI mask")
    return edit_roi(state.original, state.layout, state.roi.margin_px)


def set_project(state: EditorState, folder: str | Path) -> EditorState:
    """Remember the project folder the last run wrote."""
    return replace(state, project=str(folder))


# --- JSON (the session files) -------------------------------------------------------------------
def state_to_dict(state: EditorState) -> dict[str, Any]:
    image = state.image
    return {
        "image": {"path": image.path, "sha256": image.sha256, "width": image.width, "height": image.height,
                  "pixel_size_mm": image.pixel_size_mm},
        "origin": state.origin,
        "roi": {"mode": state.roi.mode, "margin_px": state.roi.margin_px,
                "mask_png": None if state.roi.mask_png is None else base64.b64encode(state.roi.mask_png).decode("ascii")},
        "preset": None if state.preset is None else {"name": state.preset.name, "parameters": state.preset.values()},
        "project": state.project,
        "detections": [{"structure": d.structure, "x0": d.x0, "y0": d.y0, "x1": d.x1, "y1": d.y1, "score": d.score}
                       for d in state.detections],
        "history": {"position": state.history.position,
                    "steps": [{"action": step.action, "edits": [edit.to_dict() for edit in step.edits],
                               "layout": step.layout.to_dict(), "baseline": step.baseline}
                              for step in state.history.steps]},
    }


def state_from_dict(data: Any, where: str = "the editor state") -> EditorState:
    """An :class:`EditorState` from :func:`state_to_dict`'s form; a FetalStudioError naming ``where`` if broken."""
    try:
        image, roi, history = data["image"], data["roi"], data["history"]
        source = SourceImage(str(image["path"]), str(image["sha256"]), int(image["width"]), int(image["height"]),
                             image.get("pixel_size_mm"))
        steps = tuple(Step(Layout.from_dict(step["layout"], f"{where}, step {i}"), str(step["action"]),
                           tuple(edit_from_dict(e, f"{where}, step {i}") for e in step["edits"]),
                           bool(step.get("baseline", False)))  # older documents: no baseline after the first step
                      for i, step in enumerate(history["steps"]))
        position = int(history["position"])
        mask = None if roi["mask_png"] is None else base64.b64decode(roi["mask_png"], validate=True)
        preset = data["preset"]
        detections = tuple(DetectedBox(str(d["structure"]), *(float(d[k]) for k in ("x0", "y0", "x1", "y1", "score")))
                           for d in data.get("detections") or ())  # older documents have none
        state = EditorState(
            source, History(steps, position), str(data["origin"]),
            RoiSettings(str(roi["mode"]), float(roi["margin_px"]), mask),
            None if preset is None else PresetChoice(str(preset["name"]), tuple(dict(preset["parameters"]).items())),
            data["project"], detections)
    except FetalStudioError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise FetalStudioError(f"{where} is incomplete or damaged ({type(error).__name__}: {error}).") from None
    if not steps or not 0 <= position < len(steps) or any(s.layout.size != source.size for s in steps):
        raise FetalStudioError(f"{where} is damaged: its undo history does not fit the image.")
    if state.roi.mode not in ROI_MODES or (state.roi.mode == "mask" and mask is None):
        raise FetalStudioError(f"{where} is damaged: its ROI mode {state.roi.mode!r} is not auto or mask with a mask.")
    return state
