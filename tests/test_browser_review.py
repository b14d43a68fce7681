"""The Mask review tab in a real browser (headless chromium via playwright), over the bundled
generator and trimester LoRAs: generate 3 pairs, accept one (keyboard), reject one, edit the third's
ellipse, reload the page and find the same state, export, and check the exported files."""

from __future__ import annotations

import csv
import json
import re
import time
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

from fetalstudio.imaging.ellipse import Ellipse, dice

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


# --- ellipse fields: typed values are saved together, once per action, and never overwritten -------
TYPED_ELLIPSE = {"cx": 130.0, "cy": 120.0, "a": 60.0, "b": 45.0, "angle": 45.0}
ELLIPSE_KEYS = {"cx": "center_x", "cy": "center_y", "a": "axis_a", "b": "axis_b", "angle": "angle_deg"}


def _number_box(page, field: str):
    return page.locator(f"#review-{field} input[type=number]")


def _type_field(page, field: str, value: float, then: str = "Tab") -> None:
    """Type into a number box the way a user does: click, select all, type, then Tab (or Enter) away."""
    _number_box(page, field).click()
    page.keyboard.press("Control+A")
    page.keyboard.type(f"{value:g}")
    if then:
        page.keyboard.press(then)


def _item(folder: Path, item_id: str) -> dict:
    return json.loads((folder / "items" / f"{item_id}.json").read_text())


def _ellipse_saves(folder: Path) -> int:
    lines = (folder / "log.jsonl").read_text().splitlines()
    return sum(json.loads(line)["action"] == "set_mask:ellipse" for line in lines)


def _wait_for_revision(folder: Path, item_id: str, revision: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (item := _item(folder, item_id))["revision"] < revision:
        assert time.monotonic() < deadline, f"item {item_id} stayed at revision {item['revision']}, expected {revision}"
        time.sleep(0.1)
    return item


def _shown_item(page) -> str:
    return re.search(r"(\d{6}), decision", _info(page)).group(1)


def _stored(item: dict) -> dict[str, float]:
    return {field: item["ellipse"][key] for field, key in ELLIPSE_KEYS.items()}


def _open_ellipse_tab(page, folders) -> tuple[Path, str]:
    """The session of the first test in the Ellipse tab: its folder and the shown item's id."""
    _open_tab(page)
    wait_for_text(page, "#review-item-info", "total 3", 30)
    page.get_by_role("tab", name="Ellipse").click()
    return _session_folder(folders), _shown_item(page)


def test_ellipse_fields_typed_in_a_row_save_together_once_and_are_not_overwritten(page, folders):
    folder, item_id = _open_ellipse_tab(page, folders)
    revision, saves = _item(folder, item_id)["revision"], _ellipse_saves(folder)

    for field, value in TYPED_ELLIPSE.items():  # Tab after each: leaving a box saves nothing by itself
        _type_field(page, field, value)
    page.wait_for_timeout(1500)
    assert _item(folder, item_id)["revision"] == revision, "leaving a number box saved a half-typed ellipse"

    page.click("#review-save-ellipse")
    _type_field(page, "cy", 121, then="")  # typed while the save runs: its re-render must leave this alone
    item = _wait_for_revision(folder, item_id, revision + 1)
    wait_for_text(page, "#review-banner", f"ellipse of {item_id}", 30)
    page.wait_for_timeout(1000)
    assert _stored(item) == TYPED_ELLIPSE and item["how"] == "ellipse"
    assert _number_box(page, "cy").input_value() == "121"
    assert _number_box(page, "angle").input_value() == "45"

    _number_box(page, "cy").press("Enter")  # Enter saves, with every box as it is now
    item = _wait_for_revision(folder, item_id, revision + 2)
    assert _stored(item) == {**TYPED_ELLIPSE, "cy": 121.0}

    page.click("#review-save-ellipse")  # nothing changed: no revision
    wait_for_text(page, "#review-banner", "unchanged, nothing to save", 30)
    assert _item(folder, item_id)["revision"] == revision + 2 and _ellipse_saves(folder) == saves + 2

    page.reload()
    page.wait_for_selector("#synthesis-generate")
    _open_tab(page)
    wait_for_text(page, "#review-item-info", f"{item_id}, decision edited", 30)
    shown = {field: float(_number_box(page, field).input_value()) for field in TYPED_ELLIPSE}
    assert shown == {**TYPED_ELLIPSE, "cy": 121.0}


def test_enter_after_typing_several_fields_saves_them_all_in_one_revision(page, folders):
    folder, item_id = _open_ellipse_tab(page, folders)
    revision, saves = _item(folder, item_id)["revision"], _ellipse_saves(folder)
    _type_field(page, "cx", 126)
    _type_field(page, "a", 58)
    _type_field(page, "angle", 30, then="Enter")
    item = _wait_for_revision(folder, item_id, revision + 1)
    page.wait_for_timeout(1500)  # a second save would show up here
    item = _item(folder, item_id)
    assert item["revision"] == revision + 1 and _ellipse_saves(folder) == saves + 1
    assert (item["ellipse"]["center_x"], item["ellipse"]["axis_a"], item["ellipse"]["angle_deg"]) == (126.0, 58.0, 30.0)


def test_letting_go_of_a_slider_saves_once(page, folders):
    folder, item_id = _open_ellipse_tab(page, folders)
    revision = _item(folder, item_id)["revision"]
    slider = page.locator("#review-b input[type=range]")
    slider.scroll_into_view_if_needed()
    box, value, maximum = slider.bounding_box(), float(slider.input_value()), float(slider.get_attribute("max"))
    x, y = box["x"] + box["width"] * value / maximum, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + box["width"] * 0.15, y, steps=8)  # one drag: many input events, one save on letting go
    page.mouse.up()
    _wait_for_revision(folder, item_id, revision + 1)
    page.wait_for_timeout(1500)
    item = _item(folder, item_id)
    dragged = float(_number_box(page, "b").input_value())
    assert item["revision"] == revision + 1 and dragged != value
    assert item["ellipse"]["axis_b"] == dragged

    slider.focus()
    page.keyboard.press("ArrowLeft")  # the keyboard moves a slider too: one step, one save
    item = _wait_for_revision(folder, item_id, revision + 2)
    assert item["ellipse"]["axis_b"] == dragged - 0.5


# --- Generate pairs twice: new seeds, and a pair already in the session is skipped with a message ---
def _generated_keys(folder: Path) -> list[tuple]:
    sources = [json.loads(p.read_text())["source"] for p in sorted((folder / "items").glob("*.json"))]
    return [tuple(source.get(key) for key in ("model", "lora", "lora_weight", "sampler", "steps", "seed", "prompt"))
            for source in sources]


def _wait_for_items(folder: Path, count: int, timeout_s: float = GENERATION_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list((folder / "items").glob("*.json"))) < count:
        assert time.monotonic() < deadline, f"the session did not reach {count} items"
        time.sleep(0.2)


def test_generating_twice_makes_new_pairs_and_skips_ones_already_there(page, folders):
    _open_tab(page)
    wait_for_text(page, "#review-item-info", "total 3", 30)
    folder = _session_folder(folders)
    seed_box = page.locator("#review-seed input")
    assert seed_box.input_value() == "3"  # the seed the next run uses: after the session's last pair
    set_number(page, page.locator("#review-count input"), 1, "pairs")
    set_number(page, page.locator("#review-steps input[type=number]"), 4, "steps")

    for total in (4, 5):
        page.click("#review-generate")
        _wait_for_items(folder, total)
        wait_for_text(page, "#review-item-info", f"total {total}", 60)
        assert seed_box.input_value() == str(total)
    keys = _generated_keys(folder)
    assert [key[5] for key in keys] == [0, 1, 2, 3, 4] and len(set(keys)) == 5

    set_number(page, seed_box, 0, "seed")  # the first run's settings again: all three pairs are there already
    set_number(page, page.locator("#review-count input"), 3, "pairs")
    page.click("#review-generate")
    wait_for_text(page, "#review-banner", "3 pairs skipped: already in this session (seeds 0-2)", GENERATION_TIMEOUT_S)
    assert "0 new pair(s) stored" in page.inner_text("#review-banner")
    assert _generated_keys(folder) == keys
