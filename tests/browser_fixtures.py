"""Browser-test fixtures shared by the browser test modules: one ``python app.py`` per module,
one headless chromium page, every request recorded, a screenshot and the app log on failure.

A module imports these fixtures and defines ``prepare_app(folders) -> dict`` (models in place,
environment overrides) and may set ``APP_ARGS`` (more app.py options). Its pages open on the app's first tab.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, AppServer, free_port
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path, the repo root may not be
    from browser_support import CHROMIUM, CHROMIUM_ARGS, AppServer, free_port

#: .ci/run sets this: there a missing browser is a broken setup, not a reason to skip.
REQUIRE_BROWSER = os.environ.get("FETALSTUDIO_REQUIRE_BROWSER") == "1"


def skip_module_without_browser() -> None:
    """Call at the top of a browser test module: skip it when chromium or playwright is missing (not in CI)."""
    if REQUIRE_BROWSER:
        return
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set FETALSTUDIO_CHROMIUM)",
                    allow_module_level=True)
    pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("browser")
    names = ("models", "outputs", "checkpoints", "gradio", "downloads")
    paths = {name: root / name for name in names}
    for path in paths.values():
        path.mkdir()
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def app(folders, request):
    """``python app.py`` with outputs in a temporary folder; the test module's ``prepare_app(folders)``
    puts its models in place and returns environment overrides (e.g. FETALSTUDIO_CHECKPOINTS)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETALSTUDIO_")}
    env.update(
        FETALSTUDIO_MODELS=str(folders["models"]),
        FETALSTUDIO_OUTPUTS=str(folders["outputs"]),
        FETALSTUDIO_CHECKPOINTS=str(folders["checkpoints"]),
        FETALSTUDIO_DEVICE=os.environ.get("FETALSTUDIO_DEVICE", "cpu"),
        GRADIO_TEMP_DIR=str(folders["gradio"]),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONUNBUFFERED="1",
    )
    env.update(request.module.prepare_app(folders))
    server = AppServer(port=free_port(), env=env, log_path=folders["root"] / "app.log",
                       args=list(getattr(request.module, "APP_ARGS", [])))
    failed_before = request.session.testsfailed
    server.start()
    try:
        server.wait_until_up()
        yield server
    finally:
        server.stop()
        if request.session.testsfailed > failed_before:
            _report(request, f"app.py log ({server.log_path})", server.log())


@pytest.fixture(scope="module")
def requests_seen() -> list[str]:
    """Every URL the browser requested during this module."""
    return []


@pytest.fixture(scope="module")
def browser_context(app, requests_seen, folders):
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        context.on("request", lambda r: requests_seen.append(r.url))
        context.set_default_timeout(30_000)
        yield context
        context.close()
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def module_page(browser_context):
    page = browser_context.new_page()
    yield page
    page.close()


@pytest.fixture
def page(module_page, app, request):
    """A freshly loaded app page (defaults restored); on failure, a screenshot and the new log lines."""
    log_start = app.log_size()
    failed_before = request.session.testsfailed
    module_page.goto(app.url)
    module_page.wait_for_selector("#synthesis-generate")
    yield module_page
    if request.session.testsfailed > failed_before:
        shot = Path(str(app.log_path.parent / f"{request.node.name}.png"))
        try:
            module_page.screenshot(path=str(shot), full_page=True)
        except Exception as error:  # the page may be gone; the log still helps
            shot = f"(no screenshot: {error})"
        _report(request, f"{request.node.name}: app.py log during the test; screenshot {shot}", app.log(log_start))


def _report(request, title: str, text: str) -> None:
    """Write to the terminal even though pytest captures output (fixture teardown has no report)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else _nullcontext():
        reporter.ensure_newline()
        reporter.write_sep("-", title)
        reporter.write_line(text[-20_000:] or "(empty)")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
