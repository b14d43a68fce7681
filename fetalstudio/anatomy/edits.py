"""Layout edits as data (translate, scale, rotate, remove, add, split) and an undo/redo history.

Each edit is a frozen dataclass with ``apply(layout) -> Layout`` and a JSON form
``{"op": "translate", "structure": "thalami", "dx": 10, ...}`` (``edit_from_dict`` reads it back),
so presets and projects store edits, not pixels. An edit names a structure and, with ``index``,
one of its boxes (0 = the first); without ``index`` it acts on every box of that structure.
Layouts are immutable, so the history keeps every state and undo/redo are exact.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar

from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.errors import FetalStudioError


def _finite(value: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FetalStudioError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise FetalStudioError(f"{what} must be a finite number, got {value!r}.")
    return number


def _positive(value: float, what: str) -> float:
    number = _finite(value, what)
    if number <= 0:
        raise FetalStudioError(f"{what} must be above 0 (1 keeps the size), got {value!r}.")
    return number


@dataclass(frozen=True)
class _BoxEdit:
    """An edit of the boxes of one structure (all of them, or the ``index``-th)."""

    op: ClassVar[str] = ""
    structure: str

    def _targets(self, layout: Layout) -> set[int]:
        """Positions in ``layout.boxes`` this edit changes; a clear error if there are none."""
        layout.boxes_of(self.structure)  # a clear error when the layout has none
        positions = [i for i, box in enumerate(layout.boxes) if box.structure == self.structure]
        index = getattr(self, "index", None)
        if index is None:
            return set(positions)
        if not 0 <= index < len(positions):
            raise FetalStudioError(f"The layout has {len(positions)} {self.structure} box(es); box index {index} "
                                   f"does not exist (use 0-{len(positions) - 1}, or leave index out for all).")
        return {positions[index]}

    def _change(self, box: StructureBox, layout: Layout) -> list[StructureBox]:
        raise NotImplementedError

    def apply(self, layout: Layout) -> Layout:
        targets = self._targets(layout)
        boxes: list[StructureBox] = []
        for i, box in enumerate(layout.boxes):
            boxes.extend(self._change(box, layout) if i in targets else [box])
        try:
            return layout.with_boxes(boxes)
        except FetalStudioError as error:
            raise FetalStudioError(f"{self.describe()} cannot be applied: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def describe(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "structure"
                           and getattr(self, f.name) is not None)
        return f"{self.op} {self.structure}" + (f" ({values})" if values else "")


@dataclass(frozen=True)
class Translate(_BoxEdit):
    """Move boxes by (dx, dy) pixels, or by fractions of each box's width/height with ``relative``."""

    op: ClassVar[str] = "translate"
    dx: float = 0.0
    dy: float = 0.0
    relative: bool = False
    index: int | None = None

    def _change(self, box: StructureBox, layout: Layout) -> list[StructureBox]:
        dx = _finite(self.dx, "translate dx") * (box.width if self.relative else 1)
        dy = _finite(self.dy, "translate dy") * (box.height if self.relative else 1)
        return [replace(box, x0=box.x0 + dx, x1=box.x1 + dx, y0=box.y0 + dy, y1=box.y1 + dy)]


@dataclass(frozen=True)
class Scale(_BoxEdit):
    """Scale boxes about their centres, ``sx`` along the box's width and ``sy`` along its height.

    ``target_height_mm``: when set and the layout knows its pixel size, ``sy`` is chosen so that the
    box becomes that tall (e.g. a nuchal translucency of 4 mm, the box height standing for the
    thickness); otherwise ``sy`` applies."""

    op: ClassVar[str] = "scale"
    sx: float = 1.0
    sy: float = 1.0
    target_height_mm: float | None = None
    index: int | None = None

    def _change(self, box: StructureBox, layout: Layout) -> list[StructureBox]:
        sx, sy = _positive(self.sx, "scale sx"), _positive(self.sy, "scale sy")
        if self.target_height_mm is not None and layout.pixel_size_mm:
            target_px = _positive(self.target_height_mm, "target_height_mm") / layout.pixel_size_mm
            sy = target_px / box.height
        cx, cy = box.center
        return [StructureBox.from_center(box.structure, cx, cy, box.width * sx, box.height * sy, box.rotation_deg)]


@dataclass(frozen=True)
class Rotate(_BoxEdit):
    """Turn boxes about their centres by ``degrees`` (clockwise on screen, like OpenCV)."""

    op: ClassVar[str] = "rotate"
    degrees: float = 0.0
    index: int | None = None

    def _change(self, box: StructureBox, layout: Layout) -> list[StructureBox]:
        return [replace(box, rotation_deg=box.rotation_deg + _finite(self.degrees, "rotate degrees"))]


@dataclass(frozen=True)
class Remove(_BoxEdit):
    """Remove boxes: the structure becomes absent (e.g. an absent nasal bone)."""

    op: ClassVar[str] = "remove"
    index: int | None = None

    def _change(self, box: StructureBox, layout: Layout) -> list[StructureBox]:
        return []


@dataclass(frozen=True)
class Split(_BoxEdit):
    """Cut boxes across their longer side, leaving a gap: two boxes remain (e.g. a cleft palate's
    maxillary gap). ``gap`` is the fraction of the length removed, centred at ``at`` (0-1 along the
    longer side, from x0 or y0 before the turn)."""

    op: ClassVar[str] = "split"
    gap: float = 0.3
    at: float = 0.5
    index: int | None = None

    def _change(self, box: StructureBox, layout: Layout) -> list[StructureBox]:
        gap, at = _finite(self.gap, "split gap"), _finite(self.at, "split at")
        if not 0 < gap < 1 or not gap / 2 < at < 1 - gap / 2:
            raise FetalStudioError(f"{self.describe()}: gap must be between 0 and 1 and the gap must lie inside "
                                   f"the box (gap/2 < at < 1 - gap/2); got gap={gap}, at={at}.")
        along_width = box.width >= box.height
        length = box.width if along_width else box.height
        cut_start, cut_end = (at - gap / 2) * length, (at + gap / 2) * length
        pieces = [(0.0, cut_start), (cut_end, length)]
        angle = math.radians(box.rotation_deg)
        axis = (math.cos(angle), math.sin(angle)) if along_width else (-math.sin(angle), math.cos(angle))
        cx, cy = box.center
        result = []
        for start, end in pieces:
            offset = (start + end) / 2 - length / 2  # piece centre along the axis, from the box centre
            size = end - start
            width, height = (size, box.height) if along_width else (box.width, size)
            result.append(StructureBox.from_center(box.structure, cx + offset * axis[0], cy + offset * axis[1],
                                                   width, height, box.rotation_deg))
        return result


@dataclass(frozen=True)
class Add:
    """Add a box (a structure that was not annotated, or a second one)."""

    op: ClassVar[str] = "add"
    structure: str
    x0: float
    y0: float
    x1: float
    y1: float
    rotation_deg: float = 0.0

    def apply(self, layout: Layout) -> Layout:
        box = StructureBox(self.structure, *(_finite(getattr(self, k), f"add {k}") for k in ("x0", "y0", "x1", "y1")),
                           rotation_deg=_finite(self.rotation_deg, "add rotation_deg"))
        try:
            return layout.with_boxes(layout.boxes + (box,))
        except FetalStudioError as error:
            raise FetalStudioError(f"{self.describe()} cannot be applied: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def describe(self) -> str:
        return f"add {self.structure} ({self.x0:g}, {self.y0:g})-({self.x1:g}, {self.y1:g})"


Edit = Translate | Scale | Rotate | Remove | Split | Add
EDIT_TYPES: dict[str, type] = {cls.op: cls for cls in (Translate, Scale, Rotate, Remove, Split, Add)}


def edit_from_dict(data: Any, where: str = "an edit") -> Edit:
    """An edit from its JSON form; a FetalStudioError saying which op or field is wrong."""
    if not isinstance(data, dict) or "op" not in data:
        raise FetalStudioError(f"{where} must be an object with an \"op\" ({', '.join(EDIT_TYPES)}); got {data!r}.")
    cls = EDIT_TYPES.get(data["op"])
    if cls is None:
        raise FetalStudioError(f"{where}: unknown edit op {data['op']!r}; choose one of: {', '.join(EDIT_TYPES)}.")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names) - {"op"})
    if unknown:
        raise FetalStudioError(f"{where}: {data['op']} has no field {', '.join(unknown)}; its fields are "
                               f"{', '.join(names)}.")
    missing = [name for name, f in names.items() if name not in data and f.default is MISSING]
    if missing:
        raise FetalStudioError(f"{where}: {data['op']} needs {', '.join(missing)}.")
    values = {k: v for k, v in data.items() if k != "op"}
    if not isinstance(values.get("structure"), str):
        raise FetalStudioError(f"{where}: structure must be a structure name, got {values.get('structure')!r}.")
    index = values.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise FetalStudioError(f"{where}: index must be a whole number (0 = the first box) or left out, got {index!r}.")
    for name, value in values.items():
        if name in {"structure", "index", "relative"} or value is None:
            continue
        values[name] = _finite(value, f"{where}: {name}")
    if "relative" in values and not isinstance(values["relative"], bool):
        raise FetalStudioError(f"{where}: relative must be true or false, got {values['relative']!r}.")
    return cls(**values)


class EditHistory:
    """The edits made to one layout, with exact undo and redo (every state is kept)."""

    def __init__(self, original: Layout):
        self._states: list[Layout] = [original]
        self._edits: list[Edit] = []
        self._position = 0  # index of the current state

    @property
    def original(self) -> Layout:
        return self._states[0]

    @property
    def current(self) -> Layout:
        return self._states[self._position]

    @property
    def applied(self) -> tuple[Edit, ...]:
        """The edits that lead from the original to the current layout."""
        return tuple(self._edits[: self._position])

    @property
    def can_undo(self) -> bool:
        return self._position > 0

    @property
    def can_redo(self) -> bool:
        return self._position < len(self._edits)

    def apply(self, edit: Edit) -> Layout:
        """Apply ``edit`` to the current layout (an undone edit can no longer be redone)."""
        layout = edit.apply(self.current)
        del self._states[self._position + 1:]
        del self._edits[self._position:]
        self._states.append(layout)
        self._edits.append(edit)
        self._position += 1
        return layout

    def apply_all(self, edits: list[Edit] | tuple[Edit, ...]) -> Layout:
        """Apply several edits as steps; if one fails, none of them stays applied."""
        position = self._position
        states, history = list(self._states), list(self._edits)
        try:
            for edit in edits:
                self.apply(edit)
        except FetalStudioError:
            self._states, self._edits, self._position = states, history, position
            raise
        return self.current

    def undo(self) -> Layout:
        if not self.can_undo:
            raise FetalStudioError("Nothing to undo: the layout is as it was loaded.")
        self._position -= 1
        return self.current

    def redo(self) -> Layout:
        if not self.can_redo:
            raise FetalStudioError("Nothing to redo: no undone edit is waiting.")
        self._position += 1
        return self.current

    def to_dict(self) -> dict[str, Any]:
        """The original layout and the applied edits (undone ones are not kept)."""
        return {"original": self.original.to_dict(), "edits": [edit.to_dict() for edit in self.applied]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "the edit history") -> EditHistory:
        if not isinstance(data, dict) or not {"original", "edits"} <= set(data) or not isinstance(data["edits"], list):
            raise FetalStudioError(f"{where} must be an object with \"original\" (a layout) and \"edits\" (a list).")
        history = cls(Layout.from_dict(data["original"], f"{where}, original layout"))
        history.apply_all([edit_from_dict(item, f"{where}, edit {i + 1}") for i, item in enumerate(data["edits"])])
        return history
