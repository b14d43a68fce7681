"""The Mask review tab in a real browser (headless chromium via playwright), over the bundled
generator and trimester LoRAs: generate 3 pairs, accept one (keyboard), reject one, edit the third's
ellipse, reload the page and find the same state, export, and check the exported files."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from tests import browser_fixtures
    from tests.browser_support import set_number, wait_for_text
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    import browser_fixtures
    from browser_support import set_number, wait_for_text

from fetalstudio.segmentation.ellipse import Ellipse, dice

pytestmark = pytest.mark.browser
browser_fixtures.skip_module_without_browser()
app, browser_context, folders, module_page, page, requests_seen = (  # the fixtures this module uses
    browser_fixtures.app, browser_fixtures.browser_context, browser_fixtures.folders, browser_fixtures.module_page,
    browser_fixtures.page, browser_fixtures.requests_seen)

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
if not (CHECKPOINTS / "bundled" / "fetalstudio-tiny" / "model_index.json").is_file():
    pytest.skip("bundled generator not trained yet", allow_module_level=True)

GENERATION_TIMEOUT_S = 240
EDITED_AXIS = 50


def prepare_app(folders: dict[str, Path]) -> dict[str, str]:
    """The shipped checkpoints (bundled generator + image+mask LoRAs), outputs in a temporary folder."""
    return {"FETALSTUDIO_CHECKPOINTS": str(CHECKPOINTS)}


def _open_tab(page) -> None:
    page.get_by_role("tab", name="Mask review").click()
    page.locator("#review-generate").wait_for(state="visible")


def _info(page) -> str:
    return page.locator("#review-item-info").inner_text()


def _session_folder(folders) -> Path:
    sessions = [p for p in (folders["outputs"] / "review").iterdir() if (p / "session.json").is_file()]
    assert len(sessions) == 1, sessions
    return sessions[0]


def _decisions(folder: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["decision"] for p in sorted((folder / "items").glob("*.json"))}


def test_generate_review_reload_and_export(page, folders):
    _open_tab(page)
    set_number(page, page.locator("#review-count input"), 3, "pairs")
    set_number(page, page.locator("#review-steps input[type=number]"), 4, "steps")
    page.click("#review-generate")
    wait_for_text(page, "#review-banner", "3 new pair(s) stored", GENERATION_TIMEOUT_S)
    assert "Item 1 of 3" in _info(page) and "pending 3" in _info(page)
    folder = _session_folder(folders)
    assert _decisions(folder) == {"000001": "pending", "000002": "pending", "000003": "pending"}

    page.locator("body").click(position={"x": 5, "y": 5})  # focus outside any field: shortcuts apply
    page.keyboard.press("a")
    wait_for_text(page, "#review-banner", "000001 accepted", 30)
    assert "Item 2 of 3" in _info(page)
    assert _decisions(folder)["000001"] == "accepted"  # on disk before the page showed it

    page.click("#review-reject")
    wait_for_text(page, "#review-banner", "000002 rejected", 30)
    assert "Item 3 of 3" in _info(page)

    set_number(page, page.locator("#review-a input[type=number]"), EDITED_AXIS, "semi-axis a")
    page.click("#review-save-ellipse")
    wait_for_text(page, "#review-banner", "ellipse of 000003", 30)
    assert _decisions(folder) == {"000001": "accepted", "000002": "rejected", "000003": "edited"}
    ellipse = json.loads((folder / "items" / "000003.json").read_text())["ellipse"]
    assert ellipse["axis_a"] == pytest.approx(EDITED_AXIS)

    page.reload()
    page.wait_for_selector("#synthesis-generate")
    _open_tab(page)
    wait_for_text(page, "#review-item-info", "accepted 1 · rejected 1 · edited 1", 30)
    assert "000003" in _info(page) and "decision edited" in _info(page)
    assert float(page.locator("#review-a input[type=number]").input_value()) == pytest.approx(EDITED_AXIS, abs=0.1)

    page.get_by_role("tab", name="Export").click()
    page.get_by_label("nnU-Net v2").check()
    page.click("#review-export")
    wait_for_text(page, "#review-export-status", "Exported 2 pair(s)", 60)
    exports = sorted((folders["outputs"] / "review-exports").glob(f"{folder.name}-*"))
    out = next(p for p in exports if p.is_dir())
    with open(out / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    assert {k: r["decision"] for k, r in rows.items()} == {"000001": "accepted", "000003": "edited"}
    edited = np.asarray(Image.open(out / rows["000003"]["mask"]))
    assert set(np.unique(edited)) <= {0, 255}
    expected = Ellipse(*(float(ellipse[k]) for k in ("center_x", "center_y", "axis_a", "axis_b", "angle_deg"))).to_mask(edited.shape)
    assert dice(edited > 0, expected) > 0.99
    dataset = next((out / "nnunet").glob("Dataset*"))
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    with zipfile.ZipFile(out.with_suffix(".zip")) as archive:
        assert "metadata.csv" in archive.namelist()


def test_a_bad_ellipse_is_refused_with_a_message_and_nothing_changes(page, folders):
    _open_tab(page)
    wait_for_text(page, "#review-item-info", "total 3", 30)
    folder = _session_folder(folders)
    before = _decisions(folder)
    revision = json.loads((folder / "items" / "000003.json").read_text())["revision"]
    set_number(page, page.locator("#review-b input[type=number]"), 0, "semi-axis b")
    page.get_by_role("tab", name="Ellipse").click()
    page.click("#review-save-ellipse")
    wait_for_text(page, ".toast-body", "semi-axes must be at least 1 pixel", 30)
    assert _decisions(folder) == before
    assert json.loads((folder / "items" / "000003.json").read_text())["revision"] == revision


def test_brush_strokes_come_back_as_a_binary_mask_of_the_image_size(page, folders):
    _open_tab(page)
    wait_for_text(page, "#review-item-info", "total 3", 30)
    folder = _session_folder(folders)
    before = json.loads((folder / "items" / "000003.json").read_text())
    before_mask = np.asarray(Image.open(folder / before["mask"])) > 0
    with page.expect_response(lambda response: ".editor.png" in response.url, timeout=30_000):
        page.get_by_role("tab", name="Brush").click()  # loads the item into the editor
    canvas = page.locator("#review-editor canvas").first
    canvas.wait_for(state="visible")
    canvas.scroll_into_view_if_needed()  # mouse strokes need it on screen
    page.wait_for_timeout(1500)  # the background image is drawn into the canvas
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 60, y - 60)
    page.mouse.down()
    page.mouse.move(x + 60, y + 60, steps=12)
    page.mouse.up()
    page.click("#review-save-brush")
    wait_for_text(page, "#review-banner", "painted mask of 000003", 30)
    after = json.loads((folder / "items" / "000003.json").read_text())
    assert after["how"] == "brush" and after["revision"] > before["revision"] and after["decision"] == "edited"
    mask = np.asarray(Image.open(folder / after["mask"]))
    assert mask.shape == before_mask.shape and set(np.unique(mask)) <= {0, 255}
    assert (mask > 0).sum() > before_mask.sum() and (mask > 0)[before_mask].all()  # red paint only adds
