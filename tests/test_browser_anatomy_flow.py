"""The Anatomy editor's whole flow in a real browser (headless chromium via playwright) over the bundled tiny
generator, sagittal LoRA, layout ControlNet and structure detector: detect the structures, delete the nasal bone
box with the mouse, apply the increased NT preset, undo with the button and with Ctrl+Z, generate with 2 steps,
see the project and its downloads, reload and find it again; counterfactual pairs of two examples; a box outside
the image refused; two browsers with their own layouts; a painted ROI. Kept small (2 steps, 2 pairs) so that the
module runs in a few minutes on 2 CPU cores."""

from __future__ import annotations

import csv
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.anatomy_browser_support import (X1, TableBox, annotator_canvas, clear_point_inside, click_box,
                                               drag_on_annotator, error_badges, gray_pixels, open_anatomy_tab,
                                               open_example, press_outside_text_fields, settled_table, shown_picture,
                                               table_box, table_boxes, tinted_pixels, type_into_table, wait_for_status)
    from tests.browser_fixtures import (app, browser_context, folders, module_page, page,  # noqa: F401 (fixtures)
                                        requests_seen, skip_module_without_browser)
    from tests.browser_support import choose, set_number, wait_for_text
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    from anatomy_browser_support import (X1, TableBox, annotator_canvas, clear_point_inside, click_box,
                                         drag_on_annotator, error_badges, gray_pixels, open_anatomy_tab, open_example,
                                         press_outside_text_fields, settled_table, shown_picture, table_box,
                                         table_boxes, tinted_pixels, type_into_table, wait_for_status)
    from browser_fixtures import (app, browser_context, folders, module_page, page,  # noqa: F401 (fixtures)
                                  requests_seen, skip_module_without_browser)
    from browser_support import choose, set_number, wait_for_text

from fetalstudio.anatomy.examples import Example, list_examples
from fetalstudio.anatomy.layout import EDGE_TOLERANCE_PX, Layout
from fetalstudio.anatomy.project_files import project_summaries
from fetalstudio.vocabulary import FACIAL_SAGITTAL

pytestmark = pytest.mark.browser
skip_module_without_browser()

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
for _model in ("fetalstudio-tiny-layout-controlnet", "fetalstudio-structure-detector"):
    if not (CHECKPOINTS / "bundled" / _model).is_dir():
        pytest.skip(f"bundled {_model} not trained yet", allow_module_level=True)

GENERATION_TIMEOUT_S = 240
STEPS = 2
PAIRS = 2
SAGITTAL_EXAMPLES: list[Example] = [e for e in list_examples() if e.plane == FACIAL_SAGITTAL]
FIRST, SECOND = SAGITTAL_EXAMPLES[0], SAGITTAL_EXAMPLES[-1]
NASAL_BONE = "nasal_bone"
NT = "nuchal_translucency"
INCREASED_NT = "Increased nuchal translucency"
ABSENT_NASAL_BONE = "Absent nasal bone"
PAIRS_FOLDER = "flow-pairs"


def prepare_app(folders: dict[str, Path]) -> dict[str, str]:
    """The shipped checkpoints (tiny generator, sagittal LoRA, layout ControlNet, structure detector)."""
    return {"FETALSTUDIO_CHECKPOINTS": str(CHECKPOINTS)}


def image_size(example: Example) -> tuple[int, int]:
    layout = example.layout()
    return layout.width, layout.height


# --- detect, delete with the mouse, preset, undo, generate, reload ---------------------------------------
def detect(page) -> list[TableBox]:
    """Detect the open scan's structures; every row shows the detector's confidence."""
    page.click("#anatomy-detect")
    status = wait_for_status(page, "step 1 of 1: detected structures", 120)
    found = int(re.search(r"The detector found (\d+) structures", status).group(1))
    boxes = settled_table(page, lambda rows: len(rows) == found and all(r.confidence is not None for r in rows),
                          f"the {found} detected boxes with their confidence")
    assert "confidence" in page.inner_text("#anatomy-table")
    assert all(0 < box.confidence <= 1 for box in boxes), boxes
    assert NASAL_BONE in {box.structure for box in boxes} and NT in {box.structure for box in boxes}, boxes
    return boxes


def delete_with_mouse(page, detected: list[TableBox], structure: str, size: tuple[int, int]) -> None:
    """Click ``structure``'s box on the annotator's canvas, press Delete: only that box is gone."""
    target = next(box for box in detected if box.structure == structure)
    click_box(page, target, [box for box in detected if box is not target], size)
    page.keyboard.press("Delete")
    status = wait_for_status(page, "step 2 of 2: moved with the mouse", 30)
    assert "Boxes changed with the mouse." in status
    kept = settled_table(page, lambda rows: structure not in {r.structure for r in rows}, f"no {structure} row")
    expected = {(b.structure, b.corners(), b.confidence) for b in detected if b is not target}
    assert {(b.structure, b.corners(), b.confidence) for b in kept} == expected  # the others as detected


def apply_increased_nt(page, nt_before: TableBox) -> None:
    choose(page, "anatomy-preset", INCREASED_NT)
    wait_for_text(page, "#anatomy-preset-meaning", "nuchal translucency", 30)
    page.click("#anatomy-apply-preset")
    status = wait_for_status(page, "step 3 of 3: preset increased_nt", 30)
    assert "Preset applied." in status
    rows = settled_table(page, lambda rows: any(r.structure == NT and r.height > nt_before.height for r in rows),
                         "a taller nuchal translucency box")
    assert next(r for r in rows if r.structure == NT).confidence is None  # changed by hand: no detector score


def undo_with_button_and_ctrl_z(page, nt_detected: TableBox) -> None:
    """The Undo button takes back the preset, Ctrl+Z (focus outside text fields) the mouse's deletion."""
    page.click("#anatomy-undo")
    assert "Undone." in wait_for_status(page, "step 2 of 3: moved with the mouse", 30)
    settled_table(page, lambda rows: any(r.structure == NT and r.corners() == nt_detected.corners() for r in rows),
                  "the detected nuchal translucency box again")
    press_outside_text_fields(page, "Control+z")
    assert "Undone." in wait_for_status(page, "step 1 of 3: detected structures", 30)
    settled_table(page, lambda rows: NASAL_BONE in {r.structure for r in rows}, "the nasal bone again")
    press_outside_text_fields(page, "Control+Shift+z")  # both edits back, for the run
    wait_for_status(page, "step 2 of 3: moved with the mouse", 30)
    press_outside_text_fields(page, "Control+y")
    assert "Redone." in wait_for_status(page, "step 3 of 3: preset increased_nt", 30)
    settled_table(page, lambda rows: NASAL_BONE not in {r.structure for r in rows}, "no nasal bone")


def generate(page, folders) -> Path:
    """Generate with 2 steps; returns the project folder."""
    set_number(page, page.locator("#anatomy-steps input[type=number]"), STEPS, "steps")
    page.click("#anatomy-generate")
    status = wait_for_status(page, "saved as the project", GENERATION_TIMEOUT_S)
    name = re.search(r"saved as the project ([\w.-]+?)\.(\s|$)", status).group(1)
    return folders["outputs"] / "anatomy" / "projects" / name


def check_project(page, project: Path) -> None:
    """Before and after are shown; the folder holds source, result and ROI; outside the ROI the scan is kept."""
    for side in ("#anatomy-before img", "#anatomy-after img"):
        page.locator(side).wait_for(state="visible")
    for name in ("source.png", "result.png", "roi.png"):
        assert (project / name).is_file(), f"{project} has no {name}"
    source, result = gray_pixels(project / "source.png"), gray_pixels(project / "result.png")
    roi = gray_pixels(project / "roi.png") > 0
    assert source.shape == result.shape == roi.shape
    assert roi.any() and not roi.all()
    assert np.array_equal(source[~roi], result[~roi])  # every pixel outside the ROI is the scan's own
    assert not np.array_equal(source[roi], result[roi])  # the ROI was regenerated
    before, after = Layout.read(project / "layout_before.json"), Layout.read(project / "layout_after.json")
    assert NASAL_BONE in {b.structure for b in before.boxes} and NASAL_BONE not in {b.structure for b in after.boxes}
    nt_before, nt_after = (next(b for b in layout.boxes if b.structure == NT) for layout in (before, after))
    assert nt_after.y1 - nt_after.y0 > nt_before.y1 - nt_before.y0


def check_downloads(page, folders, project: Path) -> None:
    """The result, the before|after pair and the project's zip are listed and lie under outputs/anatomy/downloads."""
    name = project.name
    links = page.locator("#anatomy-downloads a[download]")
    expected = ["result.png", f"{name}-pair.png", f"{name}.zip"]
    page.wait_for_function("n => document.querySelectorAll('#anatomy-downloads a[download]').length >= n",
                           arg=len(expected))
    assert [link.get_attribute("download") for link in links.all()] == expected
    downloads = folders["outputs"] / "anatomy" / "downloads" / name
    with zipfile.ZipFile(downloads / f"{name}.zip") as archive:
        names = {Path(member).name for member in archive.namelist()}
    assert {"source.png", "result.png", "roi.png"} <= names, names
    assert (downloads / f"{name}-pair.png").is_file()


def check_restored_after_reload(page, folders, project: Path) -> None:
    """A reload reopens the document and lists the project (its title as the project list shows it)."""
    page.reload()
    page.wait_for_selector("#synthesis-generate")
    open_anatomy_tab(page)
    status = wait_for_status(page, "Restored your last document", 60)
    assert "step 3 of 3: preset increased_nt" in status
    settled_table(page, lambda rows: rows and NASAL_BONE not in {r.structure for r in rows}, "the edited layout")
    page.locator("#anatomy-after img").wait_for(state="visible")
    summary = next(s for s in project_summaries(folders["outputs"] / "anatomy" / "projects") if s.name == project.name)
    page.get_by_text("Projects (earlier runs)").click()
    shown = page.locator("#anatomy-project input[role=combobox]")
    shown.wait_for(state="visible")
    assert shown.input_value() == summary.title
    choose(page, "anatomy-project", summary.title)  # listed in the project list
    page.click("#anatomy-open-project")
    wait_for_status(page, f"Reopened the project {project.name}", 60)
    assert error_badges(page) == 0


def test_detect_delete_with_the_mouse_preset_undo_generate_and_reload(page, folders):
    open_example(page, FIRST.title)
    detected = detect(page)
    delete_with_mouse(page, detected, NASAL_BONE, image_size(FIRST))
    nt_detected = next(box for box in detected if box.structure == NT)
    apply_increased_nt(page, nt_detected)
    undo_with_button_and_ctrl_z(page, nt_detected)
    project = generate(page, folders)
    check_project(page, project)
    check_downloads(page, folders, project)
    check_restored_after_reload(page, folders, project)


# --- counterfactual pairs -------------------------------------------------------------------------------------
def make_pairs(page) -> str:
    open_anatomy_tab(page)
    page.get_by_text("Counterfactual pairs: normal / abnormal").click()
    page.locator("#anatomy-pairs-run").wait_for(state="visible")
    page.locator("#anatomy-pairs-source input[value=examples]").check()
    choose(page, "anatomy-pairs-preset", INCREASED_NT)
    set_number(page, page.locator("#anatomy-pairs-count input[type=number]"), PAIRS, "pairs")
    set_number(page, page.locator("#anatomy-pairs-steps input[type=number]"), STEPS, "pairs steps")
    page.locator("#anatomy-pairs-name").get_by_role("textbox").fill(PAIRS_FOLDER)
    page.click("#anatomy-pairs-run")
    return wait_for_text(page, "#anatomy-pairs-status", "Done:", GENERATION_TIMEOUT_S)


def check_pair(out: Path, row: dict[str, str]) -> None:
    """Normal and abnormal of one scan: the ROI's size, identical outside its box, different inside."""
    normal, abnormal = gray_pixels(out / row["normal"]), gray_pixels(out / row["abnormal"])
    roi = gray_pixels(out / row["roi"]) > 0
    assert normal.shape == abnormal.shape == roi.shape == (int(row["height"]), int(row["width"]))
    x0, y0, x1, y1 = (int(row[key]) for key in ("roi_x0", "roi_y0", "roi_x1", "roi_y1"))
    outside_box = np.ones(roi.shape, bool)
    outside_box[y0:y1, x0:x1] = False
    assert not (roi & outside_box).any(), "the ROI reaches outside its box in metadata.csv"
    assert np.array_equal(normal[outside_box], abnormal[outside_box])
    assert not np.array_equal(normal[~outside_box], abnormal[~outside_box])


def test_counterfactual_pairs_of_two_examples(page, folders):
    status = make_pairs(page)
    out = folders["outputs"] / "anatomy" / "pairs" / PAIRS_FOLDER
    assert f"{PAIRS} pairs made now, 0 already in" in status and f"({PAIRS} rows in metadata.csv)" in status
    with open(out / "metadata.csv", newline="", encoding="utf-8") as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == PAIRS
    assert [row["seed"] for row in rows] == ["0", "1"]
    assert {row["preset"] for row in rows} == {"increased_nt"} and {row["steps"] for row in rows} == {str(STEPS)}
    example_files = {str(example.image.resolve()) for example in SAGITTAL_EXAMPLES}
    assert {row["source"] for row in rows} <= example_files
    for row in rows:
        for side in ("normal", "abnormal", "roi"):
            assert (out / row[side]).is_file(), f"{row[side]} is missing"
        check_pair(out, row)
    page.wait_for_function("n => document.querySelectorAll('#anatomy-pairs-gallery img').length >= n", arg=2 * PAIRS)
    assert page.locator("#anatomy-pairs-download a[download]").get_attribute("download") == f"pairs-{PAIRS_FOLDER}.zip"
    assert error_badges(page) == 0


# --- refusals and the mouse at the image's edge ----------------------------------------------------------------
def test_a_table_box_outside_the_image_is_refused_with_a_warning(page):
    open_example(page, FIRST.title)
    width, height = image_size(FIRST)
    kept = table_box(page, NASAL_BONE)
    type_into_table(page, NASAL_BONE, X1, str(width + 100))
    page.click("#anatomy-apply-table")
    status = wait_for_status(page, "⚠ The table was not applied", 30)  # a note in the status line
    assert f"outside the {width}x{height} image" in status
    assert "step 0 of 0: opened" in status  # the layout is unchanged
    toast = wait_for_text(page, "[data-testid=toast-body].warning", f"outside the {width}x{height} image", 30)
    assert toast.startswith("Warning")
    assert page.locator("[data-testid=toast-body].error").count() == 0
    settled_table(page, lambda rows: any(r.structure == NASAL_BONE and r.corners() == kept.corners() for r in rows),
                  "the kept nasal bone box again")
    assert error_badges(page) == 0


def test_a_box_dragged_past_the_image_edge_stays_on_the_image(page):
    """The annotator keeps a dragged box on the image (it stops at the edge), so the layout stays valid."""
    open_example(page, FIRST.title)
    width, height = image_size(FIRST)
    boxes = table_boxes(page)
    nt = next(box for box in boxes if box.structure == NT)
    canvas = annotator_canvas(page, (width, height))
    start = canvas.screen_point(*clear_point_inside(nt, [box for box in boxes if box is not nt]))
    drag_on_annotator(page, start, (canvas.left - 200, canvas.top + canvas.css_height + 200))
    wait_for_status(page, "step 1 of 1: moved with the mouse", 30)
    moved = settled_table(page, lambda rows: any(r.structure == NT and r.corners() != nt.corners() for r in rows),
                          "the moved nuchal translucency box")
    dragged = next(box for box in moved if box.structure == NT)
    assert dragged.x0 >= -EDGE_TOLERANCE_PX and dragged.y1 <= height + EDGE_TOLERANCE_PX, dragged
    assert dragged.x0 < nt.x0 and dragged.y1 > nt.y1  # it went as far as the edges let it
    assert error_badges(page) == 0


def test_turning_the_annotator_view_leaves_the_layout_as_it_is(page):
    open_example(page, FIRST.title)
    kept = [(box.structure, box.corners()) for box in table_boxes(page)]
    for _ in range(2):
        page.locator("#anatomy-annotator button[aria-label='Rotate clockwise']").click()
    page.mouse.click(*annotator_canvas(page, image_size(FIRST)).screen_point(5, 5))  # a click beside every box
    try:  # a wrong answer arrives within seconds; the right one may be no answer at all
        wait_for_status(page, "moved with the mouse", 15)
    except Exception:  # playwright's TimeoutError: nothing changed
        pass
    assert "step 0 of 0: opened" in page.inner_text("#anatomy-status")
    assert [(box.structure, box.corners()) for box in table_boxes(page)] == kept
    page.locator("#anatomy-annotator button[aria-label='Rotate clockwise']").click()  # three quarter turns: sideways
    page.mouse.click(*annotator_canvas(page, image_size(FIRST)).screen_point(5, 5))
    page.wait_for_timeout(3000)
    assert "step 0 of 0: opened" in page.inner_text("#anatomy-status") and error_badges(page) == 0
    assert [(box.structure, box.corners()) for box in table_boxes(page)] == kept


# --- two browsers ---------------------------------------------------------------------------------------
def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#synthesis-generate")
    return context, page


def restored_after_reload(page) -> str:
    page.reload()
    page.wait_for_selector("#synthesis-generate")
    open_anatomy_tab(page)
    return wait_for_status(page, "Restored your last document", 60)


def test_two_browsers_do_not_see_each_others_layouts(browser_context, app):
    browser = browser_context.browser
    first_context, first = open_page(browser, app.url)
    second_context, second = open_page(browser, app.url)
    try:
        open_example(first, FIRST.title)
        choose(first, "anatomy-preset", ABSENT_NASAL_BONE)
        first.click("#anatomy-apply-preset")
        wait_for_status(first, "step 1 of 1: preset absent_nasal_bone", 30)

        open_anatomy_tab(second)  # a browser of its own: nothing to restore
        second.wait_for_timeout(1000)
        assert "No image open" in second.inner_text("#anatomy-status")
        open_example(second, SECOND.title)
        settled_table(second, lambda rows: NASAL_BONE in {r.structure for r in rows},
                      "the second example's nasal bone")

        status = restored_after_reload(first)
        assert Path(FIRST.image).name in status and "preset absent_nasal_bone" in status
        settled_table(first, lambda rows: rows and NASAL_BONE not in {r.structure for r in rows}, "the edited layout")
        status = restored_after_reload(second)
        assert Path(SECOND.image).name in status and "step 0 of 0: opened" in status
        expected = [(box.structure, round(box.x0, 1)) for box in SECOND.layout().boxes]
        settled_table(second, lambda rows: [(r.structure, r.x0) for r in rows] == expected,
                      "the second example's own layout")
    finally:
        first_context.close()
        second_context.close()


# --- the ROI brush ---------------------------------------------------------------------------------------
def wait_for_brush_background(page, timeout_s: float = 30) -> None:
    """The brush editor shows its picture (a zoom figure, no hint to pick a tool, nothing processing)."""
    page.wait_for_function(
        """() => { const e = document.querySelector('#anatomy-brush'); if (!e) return false;
                   const t = e.innerText;
                   return /\\d+%/.test(t) && !t.includes('processing') && !t.includes('select the draw tool'); }""",
        timeout=timeout_s * 1000)


def paint_stroke(page) -> None:
    """A red stroke across the middle of the brush editor's picture."""
    page.locator("#anatomy-brush button[aria-label=Brush]").click()
    canvas = page.locator("#anatomy-brush canvas").first.bounding_box()
    start = (canvas["x"] + canvas["width"] * 0.4, canvas["y"] + canvas["height"] * 0.5)
    end = (canvas["x"] + canvas["width"] * 0.6, canvas["y"] + canvas["height"] * 0.55)
    drag_on_annotator(page, start, end)


def roi_preview_tint(page, timeout_s: float = 30) -> np.ndarray:
    """The tinted pixels of the ROI preview once it shows some."""
    deadline = time.monotonic() + timeout_s
    while True:
        tint = tinted_pixels(shown_picture(page, "#anatomy-roi-preview"))
        if tint.any() or time.monotonic() > deadline:
            return tint
        time.sleep(0.3)


def test_a_painted_roi_is_used(page):
    status = open_example(page, FIRST.title)
    assert "ROI (automatic, margin 16 px): none yet" in status
    page.get_by_role("tab", name="ROI", exact=True).click()
    wait_for_brush_background(page)
    assert not tinted_pixels(shown_picture(page, "#anatomy-roi-preview")).any()
    paint_stroke(page)
    page.click("#anatomy-use-brush")
    status = wait_for_status(page, "The painted ROI is used.", 30)
    painted = int(re.search(r"ROI \(painted\): (\d+) pixels", status).group(1))
    assert painted > 0
    tint = roi_preview_tint(page)
    width, height = image_size(FIRST)
    assert tint.shape == (height, width)
    assert abs(int(tint.sum()) - painted) <= 0.01 * painted  # the preview tints exactly the painted ROI
    rows, columns = np.nonzero(tint)
    assert width / 4 < columns.mean() < 3 * width / 4 and height / 4 < rows.mean() < 3 * height / 4
    assert error_badges(page) == 0
