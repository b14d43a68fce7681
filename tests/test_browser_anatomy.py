"""The Anatomy editor tab in a real browser (headless chromium via playwright), over the bundled tiny
generator, sagittal LoRA and layout ControlNet: open an example and see its boxes, apply the absent nasal
bone preset, undo and redo it, generate with 2 steps and see the after image and the project folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from tests import browser_fixtures
    from tests.browser_support import choose, set_number, wait_for_text
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    import browser_fixtures
    from browser_support import choose, set_number, wait_for_text

from fetalstudio.anatomy.examples import list_examples

pytestmark = pytest.mark.browser
browser_fixtures.skip_module_without_browser()
app, browser_context, folders, module_page, page, requests_seen = (  # the fixtures this module uses
    browser_fixtures.app, browser_fixtures.browser_context, browser_fixtures.folders, browser_fixtures.module_page,
    browser_fixtures.page, browser_fixtures.requests_seen)

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
if not (CHECKPOINTS / "bundled" / "fetalstudio-tiny-layout-controlnet").is_dir():
    pytest.skip("bundled layout ControlNet not trained yet", allow_module_level=True)

GENERATION_TIMEOUT_S = 240
EXAMPLE = list_examples()[0]


def prepare_app(folders: dict[str, Path]) -> dict[str, str]:
    """The shipped checkpoints (tiny generator, sagittal LoRA, layout ControlNet), outputs in a temporary folder."""
    return {"FETALSTUDIO_CHECKPOINTS": str(CHECKPOINTS)}


def _open_example(page) -> None:
    page.get_by_role("tab", name="Anatomy editor").click()
    page.locator("#anatomy-open-example").wait_for(state="visible")
    choose(page, "anatomy-example", EXAMPLE.title)
    page.click("#anatomy-open-example")
    wait_for_text(page, "#anatomy-status", "Opened the example", 60)


def _table_structures(page) -> list[str]:
    cells = page.locator("#anatomy-table tbody tr td:first-child")
    return [text.strip() for text in cells.all_inner_texts() if text.strip()]


def test_open_preset_undo_generate(page, folders):
    _open_example(page)
    expected = [box.structure for box in EXAMPLE.layout().boxes]
    assert f"{len(expected)} boxes" in page.inner_text("#anatomy-status")
    for name in expected:
        page.wait_for_function("n => document.querySelector('#anatomy-table').innerText.includes(n)", arg=name)
    assert page.locator("#anatomy-annotator canvas").count() >= 1  # the boxes are drawn on the image

    choose(page, "anatomy-preset", "Absent nasal bone")
    wait_for_text(page, "#anatomy-preset-meaning", "trisomy 21", 30)
    page.click("#anatomy-apply-preset")
    wait_for_text(page, "#anatomy-status", "Preset applied", 30)
    assert "nasal_bone" not in page.inner_text("#anatomy-table")

    page.click("#anatomy-undo")
    wait_for_text(page, "#anatomy-status", "Undone", 30)
    page.wait_for_function("() => document.querySelector('#anatomy-table').innerText.includes('nasal_bone')")
    page.click("#anatomy-redo")  # back to the edited layout: the ROI is the removed nasal bone
    wait_for_text(page, "#anatomy-status", "Redone", 30)
    assert "nasal_bone" not in page.inner_text("#anatomy-table")

    set_number(page, page.locator("#anatomy-steps input[type=number]"), 2, "steps")
    page.click("#anatomy-generate")
    wait_for_text(page, "#anatomy-status", "saved as the project", GENERATION_TIMEOUT_S)
    page.locator("#anatomy-after img").wait_for(state="visible")
    projects = [p for p in (folders["outputs"] / "anatomy" / "projects").iterdir() if (p / "project.json").is_file()]
    assert len(projects) == 1, projects
    project = projects[0]
    source = np.asarray(Image.open(project / "source.png").convert("L"))
    result = np.asarray(Image.open(project / "result.png").convert("L"))
    roi = np.asarray(Image.open(project / "roi.png")) > 0
    assert source.shape == result.shape == roi.shape
    assert (source[~roi] == result[~roi]).mean() > 0.99  # outside the ROI the scan is kept
    assert json.loads((project / "edits.json").read_text())["presets"][0]["name"] == "absent_nasal_bone"
    assert "nasal_bone" not in json.loads((project / "layout_after.json").read_text())["boxes"].__repr__()



def test_a_reload_restores_the_document_and_its_undo_history(page, folders):
    """The editor's document is kept per browser (a cookie id), so reloading the page reopens it."""
    _open_example(page)
    choose(page, "anatomy-preset", "Absent nasal bone")
    page.click("#anatomy-apply-preset")
    page.wait_for_function("() => !document.querySelector('#anatomy-table').innerText.includes('nasal_bone')")
    page.reload()
    page.get_by_role("tab", name="Anatomy editor").click()
    wait_for_text(page, "#anatomy-status", "Restored your last document", 60)
    page.wait_for_function("() => document.querySelector('#anatomy-table').innerText.includes('thalami')")
    assert "nasal_bone" not in page.inner_text("#anatomy-table")  # the restored table is the edited layout
    page.wait_for_timeout(1000)  # the annotator's echo of its new value must not fail (it did, restored on page load)
    assert page.get_by_text("Error", exact=True).count() == 0
    assert "Restored your last document" in page.inner_text("#anatomy-status")  # the echo changed nothing
    page.click("#anatomy-undo")
    page.wait_for_function("() => document.querySelector('#anatomy-table').innerText.includes('nasal_bone')")
