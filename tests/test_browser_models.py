"""The Models tab in a real browser (headless chromium via playwright) over the bundled classifier and
head segmenter plus a Hugging Face entry that is not downloaded (HF_HUB_OFFLINE=1): loading the hub
model says why once and leaves the tab working; the summary and table count the models the Analysis
tab loaded; the loaded/device/size columns are readable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

try:
    from tests import browser_fixtures
    from tests.browser_support import choose, wait_for_text
    from tests.data_support import DATA, needs_data
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    import browser_fixtures
    from browser_support import choose, wait_for_text
    from data_support import DATA, needs_data

pytestmark = [pytest.mark.browser, needs_data]
browser_fixtures.skip_module_without_browser()
app, browser_context, folders, module_page, page, requests_seen = (  # the fixtures this module uses
    browser_fixtures.app, browser_fixtures.browser_context, browser_fixtures.folders, browser_fixtures.module_page,
    browser_fixtures.page, browser_fixtures.requests_seen)

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "bundled"
CLASSIFIER, SEGMENTER, HUB_MODEL = "fetalstudio-plane-classifier", "fetalstudio-head-segmenter", "sd-from-the-hub"
OFFLINE_TEXT = "comes from the Hugging Face Hub and this machine is offline"
#: Narrower than this, a header such as "size MB" wraps letter by letter (the defect: one character wide).
MIN_COLUMN_PX = 60


def prepare_app(folders: dict[str, Path]) -> dict[str, str]:
    """A manifest with the bundled classifier and segmenter (the Analysis defaults) and a hub model
    that is in no cache."""
    (folders["checkpoints"] / "manifest.toml").write_text(
        f"""
[[model]]
id = "{CLASSIFIER}"
kind = "classifier"
path = "{BUNDLED / 'fetalstudio-plane-classifier' / 'model.safetensors'}"
default = true

[[model]]
id = "{SEGMENTER}"
kind = "segmenter"
path = "{BUNDLED / 'fetalstudio-head-segmenter' / 'segmenter.safetensors'}"
default = true

[[model]]
id = "{HUB_MODEL}"
kind = "sd_pipeline"
hub_repo = "fetal-org/sd15-fetal"
hub_file = "sd15-fetal.safetensors"
format = "single_file"
""",
        encoding="utf-8",
    )
    return {}


def _open_tab(page) -> None:
    page.get_by_role("tab", name="Models").click()
    page.locator("#models-load").wait_for(state="visible")


def _row(page, model_id: str) -> list[str]:
    """The table's cells for ``model_id`` (the dataframe draws rows as role=row/gridcell divs)."""
    for row in page.locator("#models-table [role=row]").all():
        cells = [text.strip() for text in row.locator("[role=gridcell]").all_inner_texts()]
        if cells and cells[0] == model_id:
            return cells
    raise AssertionError(f"no row for {model_id} in the models table")


def _visible_error_pills(page) -> int:
    """Gradio's red "Error" badges, drawn over every output of an event that raised."""
    return sum(1 for pill in page.get_by_text("Error", exact=True).all() if pill.is_visible())


def test_an_offline_hub_model_is_explained_once_and_the_tab_keeps_working(page):
    _open_tab(page)
    choose(page, "models-choice", HUB_MODEL)
    page.click("#models-load")
    message = wait_for_text(page, "#models-message", OFFLINE_TEXT, 60)
    assert "sd15-fetal.safetensors" in message  # what to download, and where to put it
    page.wait_for_timeout(1000)  # a second report (a toast) would have arrived by now
    shown = page.evaluate(  # visible elements whose own text says it
        "text => [...document.querySelectorAll('body *')].filter(e => e.getClientRects().length > 0 && [...e.childNodes]"
        ".some(n => n.nodeType === Node.TEXT_NODE && n.textContent.includes(text))).length", "this machine is offline")
    assert shown == 1, f"the offline message is shown {shown} times"
    assert _visible_error_pills(page) == 0

    choose(page, "models-choice", CLASSIFIER)  # the dropdown still works, and so does Load
    page.click("#models-load")
    wait_for_text(page, "#models-message", f"Loaded {CLASSIFIER}", 60)
    assert _row(page, CLASSIFIER)[3:5] == ["yes", "cpu / float32"]
    assert _visible_error_pills(page) == 0

    page.click("#models-unload")
    wait_for_text(page, "#models-message", f"Unloaded {CLASSIFIER}", 30)
    wait_for_text(page, "#models-summary", "0 loaded", 30)


def test_the_summary_counts_the_models_another_tab_loaded(page, folders):
    image = folders["root"] / "head.png"
    shutil.copy(DATA / "spanish_planes" / "brain" / sorted(p.name for p in (DATA / "spanish_planes" / "brain").glob("*.png"))[0],
                image)
    page.get_by_role("tab", name="Analysis").click()
    page.set_input_files("#analysis-upload input[type=file]", str(image))
    wait_for_text(page, "#analysis-status", "Ready", 60)  # encoded by the segmenter, classified by the classifier

    _open_tab(page)
    wait_for_text(page, "#models-summary", "2 loaded", 30)
    for model_id in (CLASSIFIER, SEGMENTER):
        row = _row(page, model_id)
        assert row[3] == "yes" and row[4] == "cpu / float32" and float(row[5]) > 0, row
    assert _row(page, HUB_MODEL)[3] == ""


def test_the_loaded_device_and_size_columns_are_readable(page):
    _open_tab(page)
    headers = page.locator("#models-table th")
    names = [text.strip() for text in headers.all_inner_texts()]
    for name in ("loaded", "device", "size MB"):
        box = headers.nth(names.index(name)).bounding_box()
        assert box["width"] >= MIN_COLUMN_PX, f"column {name!r} is {box['width']:.0f} px wide"
    row_heights = {headers.nth(i).bounding_box()["height"] for i in range(len(names))}
    assert max(row_heights) < 60  # one line of header text, not a letter per line
