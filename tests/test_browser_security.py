"""Issue 11 items 10 and 17 in a real browser: an upload over --max-file-size is refused with a
message and nothing lands in the upload cache; page loads leave no "id=..., environment=client"
lines in the app's log."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    from tests import browser_fixtures
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    import browser_fixtures

pytestmark = [pytest.mark.browser]
browser_fixtures.skip_module_without_browser()
app, browser_context, folders, module_page, page, requests_seen = (  # the fixtures this module uses
    browser_fixtures.app, browser_fixtures.browser_context, browser_fixtures.folders, browser_fixtures.module_page,
    browser_fixtures.page, browser_fixtures.requests_seen)

APP_ARGS = ["--max-file-size", "1"]


def prepare_app(folders: dict[str, Path]) -> dict[str, str]:
    return {}  # no models needed: nothing here runs one


def test_page_loads_leave_no_custom_component_lines_in_the_log(page, app):
    for _ in range(2):
        page.reload()
        page.get_by_role("tab", name="Analysis").click()
        page.locator("#analysis-annotator").wait_for(state="visible")  # the custom component's files were loaded
    log = app.log()
    assert "FetalStudio is running at" in log
    assert "environment=client" not in log and not re.search(r"^id=", log, re.M), log[-2000:]


def test_an_upload_over_the_limit_is_refused_with_a_message(page, folders):
    big = folders["root"] / "big.png"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    page.get_by_role("tab", name="Analysis").click()
    page.set_input_files("#analysis-upload input[type=file]", str(big))
    page.get_by_text(re.compile(r"exceed|too large|maximum", re.I)).first.wait_for(state="visible", timeout=30_000)
    assert not list(folders["gradio"].rglob("big.png")), "the refused upload was stored"
