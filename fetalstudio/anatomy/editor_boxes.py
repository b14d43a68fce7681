"""The editor's boxes as a typed table and as ``gradio_image_annotation``'s value, both ways.

Table rows are ``[structure, x0, y0, x1, y1, rotation, confidence]`` (pixels, degrees), shown rounded
to :data:`TABLE_DECIMALS`; a row that still shows its box's rounded values keeps the box exactly, so
re-reading an untouched table changes nothing. ``confidence`` is the detector's score while the box
is as detected (blank for boxes drawn, typed or changed by hand); it is only shown: applying a table
ignores it, and a table of the first six columns is read as well. The annotator's value is
``{"image": ..., "boxes": [{"xmin", "ymin", "xmax", "ymax", "label", "color"}]}`` with whole-pixel
corners (its ``preprocess`` rounds them) and the structure's name as label; the annotator draws
boxes upright, so a turned box shows its extent before the turn and keeps its turn when moved
(the turn is typed in the table). Every problem is a FetalStudioError naming the row or box.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace
from typing import Any

from fetalstudio.anatomy.editor import EditorState, box_confidence, set_boxes
from fetalstudio.anatomy.layout import EDGE_TOLERANCE_PX, Layout, StructureBox
from fetalstudio.errors import FetalStudioError
from fetalstudio.vocabulary import anatomy_plane, structure

TABLE_COLUMNS = ("structure", "x0", "y0", "x1", "y1", "rotation", "confidence")
TABLE_DECIMALS = 1
CONFIDENCE_DECIMALS = 2


# --- the table ----------------------------------------------------------------------------------
def _shown(box: StructureBox) -> tuple:
    values = (box.x0, box.y0, box.x1, box.y1, box.rotation_deg)
    return (box.structure, *(round(v, TABLE_DECIMALS) + 0.0 for v in values))


def table_rows(document: EditorState | Layout) -> list[list[Any]]:
    """The boxes of a document (with the detector's confidence where a box is as detected) or of a
    layout (no confidence) as table rows, in the layout's order."""
    layout = document if isinstance(document, Layout) else document.layout

    def confidence(box: StructureBox) -> float | str:
        score = None if isinstance(document, Layout) else box_confidence(document, box)
        return "" if score is None else round(score, CONFIDENCE_DECIMALS)
    return [[*_shown(box), confidence(box)] for box in layout.boxes]


def _plain_rows(rows: Any) -> list[list[Any]]:
    """Rows from a list of lists or a pandas DataFrame (what ``gr.Dataframe`` gives)."""
    if hasattr(rows, "to_numpy"):
        return [list(row) for row in rows.to_numpy(dtype=object)]
    if rows is None:
        return []
    if isinstance(rows, dict) and "data" in rows:  # gr.Dataframe's JSON form
        rows = rows["data"]
    return [list(row) for row in rows]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _number(value: Any, row: int, column: str, default: float | None = None) -> float:
    if _blank(value) and default is not None:
        return default
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        shown = "empty" if _blank(value) else repr(value)
        raise FetalStudioError(f"Row {row}, column {column}: {shown} is not a number; type pixels (e.g. 120.5)"
                               + (" or degrees." if column == "rotation" else "."))
    return number


def _table_box(plane: str, cells: list[Any], row: int) -> StructureBox:
    if len(cells) < 5:
        raise FetalStudioError(f"Row {row} has {len(cells)} cells; a row is {', '.join(TABLE_COLUMNS[:6])} "
                               "(rotation may be left blank).")
    name = cells[0].strip() if isinstance(cells[0], str) else cells[0]
    try:
        name = structure(plane, name).name
    except ValueError as error:
        raise FetalStudioError(f"Row {row}, column structure: {error}") from None
    x0, y0, x1, y1 = (_number(cells[i], row, TABLE_COLUMNS[i]) for i in range(1, 5))
    rotation = _number(cells[5] if len(cells) > 5 else None, row, "rotation", default=0.0)
    return StructureBox(name, x0, y0, x1, y1, rotation)


def parse_table(state: EditorState, rows: Any) -> list[StructureBox]:
    """The boxes the table's rows describe; every row's problem in one error (one line per row).
    Rows left wholly empty are skipped; a row that still shows a box's values keeps that box exactly;
    the confidence column is ignored."""
    shown = {}
    for box in state.layout.boxes:
        shown.setdefault(_shown(box), []).append(box)
    boxes, problems = [], []
    for number, cells in enumerate(_plain_rows(rows), start=1):
        if all(_blank(cell) for cell in cells[:6]):
            continue
        try:
            box = _table_box(state.plane, cells, number)
            Layout(state.plane, state.image.width, state.image.height, (box,))
        except FetalStudioError as error:
            message = str(error)
            problems.append(message if message.startswith("Row ") else f"Row {number}: {message}")
            continue
        kept = shown.get(_shown(box))
        boxes.append(kept.pop(0) if kept else box)
    if problems:
        raise FetalStudioError("The table was not applied (the layout is unchanged):\n" + "\n".join(problems))
    return boxes


def apply_table(state: EditorState, rows: Any) -> EditorState:
    """``state`` with the boxes typed in the table, as one undo step."""
    return set_boxes(state, parse_table(state, rows), "typed in the box table")


# --- gradio_image_annotation ----------------------------------------------------------------------
def annotator_labels(plane: str) -> tuple[list[str], list[str]]:
    """``label_list`` and ``label_colors`` (hex) for the annotator: the plane's structures in label order."""
    structures = anatomy_plane(plane).structures
    return [s.name for s in structures], ["#{:02x}{:02x}{:02x}".format(*s.color_rgb) for s in structures]


def annotator_value(state: EditorState, image: Any = None) -> dict[str, Any]:
    """The annotator's value for the current layout; ``image`` (a path or array) defaults to the source's path."""
    boxes = [{"xmin": round(box.x0), "ymin": round(box.y0), "xmax": round(box.x1), "ymax": round(box.y1),
              "label": box.structure, "color": structure(state.plane, box.structure).color_rgb}
             for box in state.layout.boxes]
    return {"image": state.image.path if image is None else image, "boxes": boxes}


def _corner(box: dict, key: str, number: int) -> float:
    try:
        value = float(box[key])
    except (KeyError, TypeError, ValueError):
        raise FetalStudioError(f"Box {number} has no usable {key} ({box.get(key)!r}); draw the box again.") from None
    if not math.isfinite(value):
        raise FetalStudioError(f"Box {number} has {key} = {value}; draw the box again.")
    return value


def _annotator_box(state: EditorState, box: Any, number: int) -> StructureBox:
    if not isinstance(box, dict):
        raise FetalStudioError(f"Box {number} is not a box ({box!r}); draw it again.")
    names = [s.name for s in anatomy_plane(state.plane).structures]
    label = box.get("label")
    if not isinstance(label, str) or not label.strip():
        raise FetalStudioError(f"Box {number} has no structure label; choose one of: {', '.join(names)}.")
    try:
        name = structure(state.plane, label.strip()).name
    except ValueError as error:
        raise FetalStudioError(f"Box {number}: {error}") from None
    xs = sorted((_corner(box, "xmin", number), _corner(box, "xmax", number)))  # a corner dragged past the other
    ys = sorted((_corner(box, "ymin", number), _corner(box, "ymax", number)))
    width, height = state.image.size
    where = f"The {name} box ({xs[0]:g}, {ys[0]:g})-({xs[1]:g}, {ys[1]:g})"
    if xs[1] <= 0 or ys[1] <= 0 or xs[0] >= width or ys[0] >= height:
        raise FetalStudioError(f"{where} was dragged wholly outside the {width}x{height} image; the layout was kept "
                               "as it was. Draw boxes on the image.")
    tolerance = EDGE_TOLERANCE_PX
    if xs[0] < -tolerance or ys[0] < -tolerance or xs[1] > width + tolerance or ys[1] > height + tolerance:
        raise FetalStudioError(f"{where} was dragged partly outside the {width}x{height} image; the layout was kept "
                               "as it was. Keep every box inside the image.")
    if xs[0] == xs[1] or ys[0] == ys[1]:
        raise FetalStudioError(f"{where} has zero size; the layout was kept as it was. Drag out a box with a width "
                               "and a height.")
    return StructureBox(name, xs[0], ys[0], xs[1], ys[1])


def _view_turns(value: dict) -> int:
    """How many quarter turns clockwise the annotator's view is turned (its own Rotate buttons): 0-3."""
    turns = value.get("orientation") or 0
    if isinstance(turns, bool) or not isinstance(turns, (int, float)) or turns != int(turns):
        raise FetalStudioError(f"The editor sent a view orientation that is not a whole number of quarter turns "
                               f"({turns!r}); the layout was kept. Reload the page.")
    return int(turns) % 4


def _unturned(box: Any, turns: int, width: int, height: int) -> Any:
    """A box drawn on the view turned ``turns`` quarter turns clockwise, in the image's own pixels
    (the annotator turns its boxes with the view: clockwise, (x, y) -> (height - y, x))."""
    if turns == 0 or not isinstance(box, dict):
        return box
    try:
        x0, y0, x1, y1 = (float(box[key]) for key in ("xmin", "ymin", "xmax", "ymax"))
    except (KeyError, TypeError, ValueError):
        return box  # left for _annotator_box to name
    if turns == 1:
        corners = (y0, height - x1, y1, height - x0)
    elif turns == 2:
        corners = (width - x1, height - y1, width - x0, height - y0)
    else:
        corners = (width - y1, x0, width - y0, x1)
    return {**box, **dict(zip(("xmin", "ymin", "xmax", "ymax"), corners))}


def parse_annotator_value(state: EditorState, value: Any) -> list[StructureBox]:
    """The boxes of an annotator value. A box whose whole-pixel corners and label match a box of the
    layout is that box exactly (turn and sub-pixel corners kept); a moved or resized box keeps the
    turn of the unmatched box of its structure it replaces; the rest are new upright boxes. Boxes drawn
    while the annotator's view is turned (its Rotate buttons) are turned back to the image's pixels."""
    if not isinstance(value, dict) or value.get("image") is None:
        raise FetalStudioError("The image was removed from the editor; the layout was kept. Open the image again "
                               "(or undo) to go on editing.")
    turns, (width, height) = _view_turns(value), state.image.size
    drawn = [_annotator_box(state, _unturned(box, turns, width, height), number)
             for number, box in enumerate(value.get("boxes") or [], start=1)]
    unmatched = list(state.layout.boxes)

    def rounded(box: StructureBox) -> tuple:
        return (box.structure, round(box.x0), round(box.y0), round(box.x1), round(box.y1))

    result: list[StructureBox | None] = []
    for box in drawn:
        same = next((old for old in unmatched if rounded(old) == rounded(box)), None)
        if same is not None:
            unmatched.remove(same)
        result.append(same)
    for i, box in enumerate(drawn):
        if result[i] is None:
            replaced = next((old for old in unmatched if old.structure == box.structure), None)
            if replaced is not None:
                unmatched.remove(replaced)
                box = replace(box, rotation_deg=replaced.rotation_deg)
            result[i] = box
    return [box for box in result if box is not None]


def annotator_payload_value(payload: Any) -> Any:
    """The annotator's raw browser payload (its event registered with ``preprocess=False``) in the form its
    ``preprocess`` gives: each box's corners divided by the box's ``scaleFactor`` (the on-screen scale) and
    rounded. The image itself is not decoded and re-encoded (the component's own preprocess does that on
    every drag, about 50 ms): only whether there is one matters here. Unreadable numbers are passed on as
    they are, for :func:`parse_annotator_value` to name."""
    if not isinstance(payload, dict):
        return payload
    boxes = []
    for box in payload.get("boxes") or []:
        if not isinstance(box, dict):
            boxes.append(box)
            continue
        scale = box.get("scaleFactor", 1)
        scaled = dict(box)
        for key in ("xmin", "ymin", "xmax", "ymax"):
            try:
                value = float(box[key]) / float(scale)
                scaled[key] = round(value) if math.isfinite(value) else value
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                pass
        boxes.append(scaled)
    return {"image": payload.get("image"), "boxes": boxes, "orientation": payload.get("orientation")}


def apply_annotator_value(state: EditorState, value: Any) -> EditorState:
    """``state`` with the boxes as the mouse left them (one undo step; the same boxes: no step)."""
    return set_boxes(state, parse_annotator_value(state, value), "moved with the mouse")


def annotator_key(value: Any) -> tuple:
    """What identifies an annotator value's boxes (label and whole-pixel corners, in any order)."""
    boxes = (value or {}).get("boxes") or [] if isinstance(value, dict) else []
    try:
        return tuple(sorted((str(box.get("label")), *(round(float(box[k])) for k in ("xmin", "ymin", "xmax", "ymax")))
                            for box in boxes))
    except (KeyError, TypeError, ValueError, AttributeError):
        return ("unreadable",)


class PendingEchoes:
    """The annotator values a server sent and the browser has not echoed back yet, per editor session.

    ``gradio_image_annotation`` has only a ``change`` event, which fires for a value the server sets as well as
    for a drag; a quick undo-then-redo can make the first value's echo arrive after the second was sent, and
    that stale echo would look like a drag back to the old layout. An incoming value that matches a pending
    sent value is that echo (it is consumed and ignored); anything else is the user's edit. Entries expire
    after ``ttl_s`` (a hidden annotator does not echo) and at most ``limit`` are kept per session.
    """

    def __init__(self, limit: int = 8, ttl_s: float = 30.0) -> None:
        self.limit, self.ttl_s = limit, ttl_s
        self._sent: dict[str, list[tuple[tuple, float]]] = {}
        self._lock = threading.Lock()

    def sent(self, session: str, value: Any, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            fresh = [(key, when) for key, when in self._sent.get(session, []) if now - when < self.ttl_s]
            self._sent[session] = (fresh + [(annotator_key(value), now)])[-self.limit:]

    def is_echo(self, session: str, value: Any, now: float | None = None) -> bool:
        """True (and forgotten) when ``value`` is an echo of a value sent to ``session``'s annotator."""
        now = time.monotonic() if now is None else now
        key = annotator_key(value)
        with self._lock:
            pending = [(k, when) for k, when in self._sent.get(session, []) if now - when < self.ttl_s]
            for index, (sent_key, _) in enumerate(pending):
                if sent_key == key:
                    self._sent[session] = pending[:index] + pending[index + 1:]
                    return True
            self._sent[session] = pending
            return False
