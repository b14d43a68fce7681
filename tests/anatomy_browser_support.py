"""Helpers for the Anatomy editor browser tests: the tab's box table (a virtual grid), the annotator's canvas
(image pixels to screen points, a box selected with the mouse), keys pressed outside text fields, and the
pictures the page shows. Nothing here imports torch or gradio.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

try:
    from tests.browser_support import choose, wait_for_text
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    from browser_support import choose, wait_for_text

#: The table's columns, as anatomy_tab shows them (editor_boxes.TABLE_COLUMNS).
STRUCTURE, X0, Y0, X1, Y1, ROTATION, CONFIDENCE = range(7)
#: How far (screen pixels) a click must stay from every other box so that it selects the wanted one
#: (the annotator's resize handles stick out of a box by half their size, 4 pixels).
CLICK_CLEARANCE_PX = 8.0


# --- the tab -----------------------------------------------------------------------------------
def open_anatomy_tab(page) -> None:
    page.get_by_role("tab", name="Anatomy editor").click()
    page.locator("#anatomy-open-example").wait_for(state="visible")


def open_example(page, title: str) -> str:
    """Open the bundled example ``title``; returns the status line."""
    open_anatomy_tab(page)
    choose(page, "anatomy-example", title)
    page.click("#anatomy-open-example")
    return wait_for_status(page, f"Opened the example {title}", 60)


def wait_for_status(page, text: str, timeout_s: float = 60) -> str:
    return wait_for_text(page, "#anatomy-status", text, timeout_s)


def press_outside_text_fields(page, keys: str) -> None:
    """Press ``keys`` with the focus on the page itself (the status line is clicked first, no text field has it)."""
    page.click("#anatomy-status")
    focused = page.evaluate("() => document.activeElement ? document.activeElement.tagName : ''")
    assert focused not in ("INPUT", "TEXTAREA", "SELECT"), f"a text field ({focused}) kept the focus"
    page.keyboard.press(keys)


def warning_toasts(page) -> list[str]:
    return page.locator(".toast-body").all_inner_texts()


def error_badges(page) -> int:
    """How many 'Error' labels the page shows (Gradio badges every output of a failed event with one)."""
    return page.get_by_text("Error", exact=True).count()


# --- the box table -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TableBox:
    """One row of the box table as the page shows it."""

    row: int
    structure: str
    x0: float
    y0: float
    x1: float
    y1: float
    confidence: float | None

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def corners(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.x1, self.y1


def _number_or_none(text: str) -> float | None:
    text = text.strip()
    return float(text) if text else None


def table_boxes(page) -> list[TableBox]:
    """The rows of #anatomy-table (a virtual grid: cells carry data-row and data-col), in row order. A selected
    cell's text also holds its menu button (a second line), which is left out."""
    cells = page.evaluate(
        """() => Array.from(document.querySelectorAll('#anatomy-table [role=gridcell][data-row][data-col]'))
                 .map(cell => [Number(cell.dataset.row), Number(cell.dataset.col),
                               cell.innerText.trim().split('\\n')[0].trim()])""")
    rows: dict[int, dict[int, str]] = {}
    for row, column, text in cells:
        rows.setdefault(row, {})[column] = text
    boxes = []
    for row in sorted(rows):
        texts = rows[row]
        if not texts.get(STRUCTURE):
            continue
        boxes.append(TableBox(row, texts[STRUCTURE], *(float(texts[c]) for c in (X0, Y0, X1, Y1)),
                              _number_or_none(texts.get(CONFIDENCE, ""))))
    return boxes


def settled_table(page, wanted, what: str, timeout_s: float = 30) -> list[TableBox]:
    """The table's rows once ``wanted(rows)`` holds (the page redraws the grid a moment after an answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        boxes = table_boxes(page)
        if wanted(boxes):
            return boxes
        if time.monotonic() > deadline:
            raise AssertionError(f"the box table never showed {what}; it shows {boxes}")
        time.sleep(0.2)


def table_box(page, structure: str) -> TableBox:
    found = [box for box in table_boxes(page) if box.structure == structure]
    assert len(found) == 1, f"the table shows {len(found)} {structure} rows: {table_boxes(page)}"
    return found[0]


def type_into_table(page, structure: str, column: int, text: str) -> None:
    """Double-click the cell of ``structure``'s row and ``column``, type ``text`` and press Enter."""
    row = table_box(page, structure).row
    cell = page.locator(f"#anatomy-table [role=gridcell][data-row='{row}'][data-col='{column}']")
    cell.dblclick()
    editor = page.locator("#anatomy-table textarea[aria-label='Edit cell']")
    editor.wait_for(state="visible")
    editor.fill(text)
    editor.press("Enter")
    page.wait_for_function(
        """([selector, text]) => { const cell = document.querySelector(selector);
                                   return !!cell && cell.innerText.trim().split('\\n')[0].trim() === text; }""",
        arg=[f"#anatomy-table [role=gridcell][data-row='{row}'][data-col='{column}']", text])


# --- the annotator's canvas --------------------------------------------------------------------------
@dataclass(frozen=True)
class AnnotatorCanvas:
    """Where the annotator draws the image: its canvas on screen and the image's size in pixels. The
    annotator fits the image to the canvas width (never enlarging it) and centres it horizontally."""

    left: float
    top: float
    css_width: float
    css_height: float
    canvas_width: int
    canvas_height: int
    image_width: int
    image_height: int

    def screen_point(self, x: float, y: float) -> tuple[float, float]:
        """The screen point showing image pixel (x, y)."""
        scale = min(1.0, self.canvas_width / self.image_width)
        offset_x = (self.canvas_width - self.image_width * scale) / 2
        return (self.left + (offset_x + x * scale) * self.css_width / self.canvas_width,
                self.top + y * scale * self.css_height / self.canvas_height)


def annotator_canvas(page, image_size: tuple[int, int]) -> AnnotatorCanvas:
    canvas = page.locator("#anatomy-annotator canvas").first
    canvas.wait_for(state="visible")
    geometry = canvas.evaluate(
        "c => { const r = c.getBoundingClientRect(); return [r.left, r.top, r.width, r.height, c.width, c.height]; }")
    return AnnotatorCanvas(*geometry, *image_size)


def _distance_to_box(x: float, y: float, box: TableBox) -> float:
    dx = max(box.x0 - x, 0.0, x - box.x1)
    dy = max(box.y0 - y, 0.0, y - box.y1)
    return float(np.hypot(dx, dy))


def clear_point_inside(target: TableBox, others: list[TableBox]) -> tuple[float, float]:
    """A pixel inside ``target`` as far as can be from every other box, so a click there selects ``target``."""
    candidates = [(x, y) for x in np.linspace(target.x0 + 1, target.x1 - 1, 24)
                  for y in np.linspace(target.y0 + 1, target.y1 - 1, 12)]
    best = max(candidates, key=lambda point: min([_distance_to_box(*point, box) for box in others] or [np.inf]))
    clearance = min([_distance_to_box(*best, box) for box in others] or [np.inf])
    assert clearance >= CLICK_CLEARANCE_PX, f"no point of {target} is clear of the other boxes ({clearance:.1f} px)"
    return float(best[0]), float(best[1])


def click_box(page, target: TableBox, others: list[TableBox], image_size: tuple[int, int]) -> tuple[float, float]:
    """Click ``target`` on the annotator's canvas (it becomes the selected box); returns the screen point."""
    point = annotator_canvas(page, image_size).screen_point(*clear_point_inside(target, others))
    page.mouse.click(*point)
    return point


def drag_on_annotator(page, start: tuple[float, float], end: tuple[float, float], steps: int = 20) -> None:
    """Press the mouse at screen point ``start``, move it to ``end`` in ``steps``, release it there."""
    page.mouse.move(*start)
    page.mouse.down()
    for step in range(1, steps + 1):
        page.mouse.move(start[0] + (end[0] - start[0]) * step / steps, start[1] + (end[1] - start[1]) * step / steps)
    page.mouse.up()


# --- pictures ------------------------------------------------------------------------------------
def shown_picture(page, selector: str) -> np.ndarray:
    """The RGB pixels of the picture the ``selector`` image component shows (fetched as the page does)."""
    image = page.locator(f"{selector} img").first
    image.wait_for(state="visible")
    response = page.request.get(image.get_attribute("src"))
    assert response.ok, f"{selector}: the picture could not be fetched ({response.status})"
    with Image.open(io.BytesIO(response.body())) as picture:
        return np.asarray(picture.convert("RGB"))


def tinted_pixels(picture: np.ndarray) -> np.ndarray:
    """The pixels of a gray scan picture that carry a colour (the ROI tint and outline), (H, W) bool."""
    channels = picture.astype(np.int16)
    return (channels.max(axis=2) - channels.min(axis=2)) > 0


def gray_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))
