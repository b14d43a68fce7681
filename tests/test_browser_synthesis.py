"""The Synthesis tab in a real browser (issue 11, items 12 and 15): at a 1366x768 laptop screen
Generate and Cancel are visible without scrolling, the results gallery invites no upload, one LoRA
slot is shown with "Add a LoRA", and a model declared grayscale in the manifest gives grey PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

try:
    from tests import browser_fixtures
    from tests.browser_support import png_pixels, saved_images, set_number, set_slider, wait_for_text
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    import browser_fixtures
    from browser_support import png_pixels, saved_images, set_number, set_slider, wait_for_text

pytestmark = pytest.mark.browser
browser_fixtures.skip_module_without_browser()
app, browser_context, folders, module_page, page, requests_seen = (
    browser_fixtures.app, browser_fixtures.browser_context, browser_fixtures.folders, browser_fixtures.module_page,
    browser_fixtures.page, browser_fixtures.requests_seen)

MODEL_ID = "tinysd-gray"
LAPTOP = {"width": 1366, "height": 768}


def prepare_app(folders: dict[str, Path]) -> dict[str, str]:
    """A tiny SD model declared grayscale (manifest ``output = "grayscale"``, the default generator) and a LoRA."""
    from tests.tiny_models import build_tiny_sd_pipeline, save_tiny_sd_pipeline, write_random_kohya_lora

    save_tiny_sd_pipeline(folders["root"] / "declared" / MODEL_ID)
    write_random_kohya_lora(build_tiny_sd_pipeline(), folders["models"] / "tiny_lora.safetensors")
    (folders["checkpoints"] / "manifest.toml").write_text(
        f'[[model]]\nid = "{MODEL_ID}"\nkind = "sd_pipeline"\npath = "{(folders["root"] / "declared" / MODEL_ID).as_posix()}"\n'
        'default = true\noutput = "grayscale"\n', encoding="utf-8")
    return {}


def test_generate_and_cancel_are_visible_without_scrolling_at_1366x768(page, folders):
    page.set_viewport_size(LAPTOP)
    page.reload()
    page.wait_for_selector("#synthesis-generate")
    for button in ("#synthesis-generate", "#synthesis-cancel"):
        box = page.locator(button).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= LAPTOP["height"], (button, box)
    page.screenshot(path=str(folders["root"] / "synthesis-1366x768.png"))


def test_the_results_gallery_invites_no_upload(page):
    gallery = page.locator("#synthesis-gallery")
    text = gallery.inner_text()
    assert "Drop" not in text and "Upload" not in text, text
    assert gallery.locator("input[type=file]").count() == 0


def test_one_lora_slot_is_shown_and_add_a_lora_shows_the_next(page):
    assert page.locator("#synthesis-lora-0").is_visible()
    assert not page.locator("#synthesis-lora-1").is_visible()
    page.locator("#synthesis-add-lora").click()
    page.locator("#synthesis-lora-1").wait_for(state="visible")
    assert not page.locator("#synthesis-lora-2").is_visible()


def test_a_model_declared_grayscale_gives_grey_pngs_in_the_tab(page, folders):
    set_slider(page, "Steps", 3)
    set_number(page, page.locator("#synthesis-seed input[type=number]"), 11, "seed")
    page.locator("#synthesis-generate").click()
    wait_for_text(page, "#synthesis-status", "Done:")
    assert "grayscale" in page.locator("#synthesis-status").inner_text()
    (path,) = saved_images(folders["outputs"])
    pixels = png_pixels(path)
    assert pixels.ndim == 2 or (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))
