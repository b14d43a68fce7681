"""The web app in a real browser (headless Debian chromium, driven by playwright).

One app process for the whole module: ``python app.py --port N`` over a tiny random-weight SD
model and a kohya LoRA, with outputs/checkpoints in temporary folders. The tests run in file
order and share one browser page; every request the page makes is recorded, and the last test
checks that none left 127.0.0.1 (the UI renders fully offline: no fonts, CDN or analytics).
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

try:
    from tests import browser_fixtures
    from tests.browser_support import (choose, png_pixels, png_size, png_text, request_host, saved_images, set_number,
                                       set_slider, wait_for_any_text, wait_for_text)
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    import browser_fixtures
    from browser_support import (choose, png_pixels, png_size, png_text, request_host, saved_images, set_number,
                                 set_slider, wait_for_any_text, wait_for_text)

pytestmark = pytest.mark.browser
browser_fixtures.skip_module_without_browser()
app, browser_context, folders, module_page, page, requests_seen = (  # the fixtures this module uses
    browser_fixtures.app, browser_fixtures.browser_context, browser_fixtures.folders, browser_fixtures.module_page,
    browser_fixtures.page, browser_fixtures.requests_seen)

MODEL_ID = "tinysd"
LORA_ID = "tiny_lora"
SEED = 4242
PROMPT = "a photo of fetal femur, browser test"
SIZE = 64
STEPS = 5
#: The Generate button runs a model; the first run also loads it (a few seconds on a laptop CPU).
GENERATION_TIMEOUT_S = 120


# --- fixtures ------------------------------------------------------------------------------


def prepare_app(folders: dict[str, Path]) -> dict[str, str]:
    """The app over a tiny SD model (id "tinysd") and a kohya LoRA (id "tiny_lora"); no bundled models."""
    from tests.tiny_models import build_tiny_sd_pipeline, save_tiny_sd_pipeline, write_random_kohya_lora

    save_tiny_sd_pipeline(folders["models"] / MODEL_ID)
    write_random_kohya_lora(build_tiny_sd_pipeline(), folders["models"] / f"{LORA_ID}.safetensors")
    return {}


#: Results shared by the tests of this module (they run in file order).
shared: dict[str, Path] = {}


def _small_settings(page, steps: int = STEPS) -> None:
    set_slider(page, "Width", SIZE)
    set_slider(page, "Height", SIZE)
    set_slider(page, "Steps", steps)


def _set_seed(page, seed: int) -> None:
    set_number(page, page.locator("#synthesis-seed input[type=number]"), seed, "seed")


def _generate(page, expect: str = "Done") -> str:
    page.click("#synthesis-generate")
    return wait_for_text(page, "#synthesis-status", expect, GENERATION_TIMEOUT_S)


def _new_files(before: list[Path], outputs: Path) -> list[Path]:
    return [p for p in saved_images(outputs) if p not in before]


# --- tests ---------------------------------------------------------------------------------


def test_generate_and_download_png_with_parameters(page, folders):
    outputs = folders["outputs"]
    _small_settings(page)
    _set_seed(page, SEED)
    prompt = page.locator("#synthesis-prompt textarea")
    prompt.fill(PROMPT)
    choose(page, "synthesis-lora-0", LORA_ID)

    status = _generate(page)
    assert f"seeds {SEED}" in status and f"{STEPS} steps" in status, status
    thumbnail = page.locator("#synthesis-gallery img").first
    thumbnail.wait_for(state="visible")
    page.wait_for_function(  # the browser really fetched and decoded the image
        "(size) => { const i = document.querySelector('#synthesis-gallery img'); return i.complete && i.naturalWidth === size; }",
        arg=SIZE,
    )

    files = saved_images(outputs)
    assert len(files) == 1 and files[0].name.endswith(f"-{SEED}.png"), files
    shared["first"] = files[0]

    # The download button lives in the gallery's preview: open it from the thumbnail.
    download_button = page.locator("#synthesis-gallery button[aria-label=Download]")
    if not download_button.is_visible():
        page.locator("#synthesis-gallery button.thumbnail-item").first.click()
    with page.expect_download() as download_info:
        download_button.click()
    downloaded = folders["downloads"] / (download_info.value.suggested_filename or "download.png")
    download_info.value.save_as(downloaded)

    assert downloaded.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the download is not a PNG"
    assert png_size(downloaded) == (SIZE, SIZE)
    text = png_text(downloaded)
    parameters = text.get("parameters", "")
    assert f"Seed: {SEED}" in parameters, parameters
    assert f"Size: {SIZE}x{SIZE}" in parameters and f"Steps: {STEPS}" in parameters, parameters
    assert PROMPT in parameters and f"<lora:{LORA_ID}:1>" in parameters, parameters
    assert "fetalstudio" in text, "the reproducibility JSON chunk was lost on the way to the browser"
    assert np.array_equal(png_pixels(downloaded), png_pixels(files[0])), "the download differs from the saved file"
    shared["download"] = downloaded


def test_same_seed_gives_identical_pixels(page, folders):
    first = shared.get("first")
    if first is None:
        pytest.skip("needs the image of test_generate_and_download_png_with_parameters")
    before = saved_images(folders["outputs"])
    _small_settings(page)
    _set_seed(page, SEED)
    page.locator("#synthesis-prompt textarea").fill(PROMPT)
    choose(page, "synthesis-lora-0", LORA_ID)

    _generate(page)
    new = _new_files(before, folders["outputs"])
    assert len(new) == 1 and new[0].name.endswith(f"-{SEED}.png"), new
    assert np.array_equal(png_pixels(new[0]), png_pixels(first)), "same settings and seed gave different pixels"
    assert png_text(new[0])["parameters"] == png_text(first)["parameters"]


def test_load_parameters_from_png(page, folders):
    source = shared.get("download")
    if source is None:
        pytest.skip("needs the download of test_generate_and_download_png_with_parameters")
    seed_box = page.locator("#synthesis-seed input[type=number]")
    width_box = page.get_by_label("number input for Width", exact=True)
    prompt_box = page.locator("#synthesis-prompt textarea")
    assert seed_box.input_value() == "-1" and width_box.input_value() == "64"  # a fresh page: the defaults (tinysd is trained at 64 px)
    assert prompt_box.input_value() != PROMPT

    page.locator("#synthesis-params-png input[type=file]").set_input_files(str(source))

    wait_for_text(page, "#synthesis-status", "Parameters loaded")
    page.wait_for_function(
        "(seed) => document.querySelector('#synthesis-seed input[type=number]').value === String(seed)", arg=SEED
    )
    assert seed_box.input_value() == str(SEED)
    assert prompt_box.input_value() == PROMPT
    assert width_box.input_value() == str(SIZE)
    assert page.get_by_label("number input for Height", exact=True).input_value() == str(SIZE)
    assert page.get_by_label("number input for Steps", exact=True).input_value() == str(STEPS)
    assert page.locator("#synthesis-subject input").input_value() == "custom"
    assert page.locator("#synthesis-lora-0 input").input_value() == LORA_ID
    assert page.locator("#synthesis-model input").input_value() == MODEL_ID


def test_cancel_stops_a_long_run(page, folders):
    before = saved_images(folders["outputs"])
    _small_settings(page, steps=50)
    set_slider(page, "Batch count", 20)

    page.click("#synthesis-generate")
    wait_for_text(page, "#synthesis-status", "Generated 1/20", GENERATION_TIMEOUT_S)
    page.click("#synthesis-cancel")
    status = wait_for_any_text(page, "#synthesis-status", ["Cancelled", "Done"], GENERATION_TIMEOUT_S)

    assert "Cancelled" in status, status
    made = int(re.search(r"Cancelled after (\d+) image", status).group(1))
    assert 1 <= made < 20, status
    assert len(_new_files(before, folders["outputs"])) == made
    page.wait_for_function("(n) => document.querySelectorAll('#synthesis-gallery .grid-container img').length === n",
                           arg=made)


def test_invalid_settings_show_the_library_message(page, folders):
    before = saved_images(folders["outputs"])
    page.locator("#synthesis-prompt textarea").fill("")
    choose(page, "synthesis-subject", "custom")
    assert page.locator("#synthesis-prompt textarea").input_value() == ""

    page.click("#synthesis-generate")
    toast = page.locator("[data-testid=toast-body].error")
    toast.first.wait_for(state="visible", timeout=GENERATION_TIMEOUT_S * 1000)
    message = toast.first.inner_text()
    assert "prompt is empty" in message, message
    assert "Traceback" not in message
    assert saved_images(folders["outputs"]) == before


def test_dataset_export(page, folders):
    _small_settings(page, steps=3)
    page.locator("#dataset-export").get_by_text("Dataset export", exact=True).click()
    export = page.locator("#dataset-export")
    export.get_by_label("Images per plane and sampler").wait_for(state="visible")
    for plane in ("femur", "thorax", "other"):
        export.get_by_label(plane, exact=True).uncheck()
    export.get_by_label("UniPC", exact=True).uncheck()
    assert export.get_by_label("abdomen", exact=True).is_checked() and export.get_by_label("brain", exact=True).is_checked()
    assert export.get_by_label("Euler", exact=True).is_checked()
    set_number(page, export.get_by_label("Images per plane and sampler"), 2, "images per plane")
    export.get_by_label("Folder (under outputs/").fill("browser-test")

    page.click("#dataset-export-run")
    status = wait_for_any_text(page, "#dataset-export-status", ["Finished", "Cancelled"], GENERATION_TIMEOUT_S)
    assert "Finished: 4 new" in status, status

    folder = folders["outputs"] / "datasets" / "browser-test"
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    pngs = sorted(p for p in folder.rglob("*.png"))
    assert len(rows) == 4, rows
    assert len(pngs) == 4, pngs
    assert {r["plane"] for r in rows} == {"abdomen", "brain"}
    assert {r["sampler"] for r in rows} == {"euler"}
    assert sorted((folder / r["file"]).resolve() for r in rows) == [p.resolve() for p in pngs]
    assert all(png_size(p) == (SIZE, SIZE) for p in pngs)


def test_models_tab_lists_and_refreshes(page, folders):
    page.get_by_role("tab", name="Models").click()
    table = page.locator("#models-table")
    table.wait_for(state="visible")
    wait_for_text(page, "#models-table", MODEL_ID, 30)
    text = table.inner_text()
    assert MODEL_ID in text and LORA_ID in text, text

    added = "tiny_lora_refresh"
    shutil.copy(folders["models"] / f"{LORA_ID}.safetensors", folders["models"] / f"{added}.safetensors")
    assert added not in table.inner_text()
    page.click("#models-refresh")
    wait_for_text(page, "#models-table", added, 30)

    # The Synthesis tab's own rescan offers the new LoRA too.
    page.get_by_role("tab", name="Synthesis").click()
    page.click("#synthesis-rescan")
    choose(page, "synthesis-lora-0", added)


def test_no_request_leaves_the_machine(requests_seen):
    """Run last: the whole module's traffic (page loads, uploads, downloads) stayed on 127.0.0.1."""
    assert requests_seen, "no request was recorded"
    foreign = sorted({url for url in requests_seen if request_host(url) not in (None, "127.0.0.1")})
    assert not foreign, "requests left the machine:\n" + "\n".join(foreign)
