"""Helpers for the browser tests: start app.py on a free port, drive Gradio widgets, read PNGs.

Kept free of pytest fixtures so that tests/test_browser.py stays readable; nothing here imports
torch or gradio.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = REPO_ROOT / "app.py"

#: Debian's chromium; playwright's own browser builds cannot be downloaded on the project machines.
CHROMIUM = os.environ.get("FETALSTUDIO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppServer:
    """``python app.py --port N`` in a subprocess, its output in ``log_path``."""

    port: int
    env: dict[str, str]
    log_path: Path
    #: More app.py options (e.g. ["--max-file-size", "1"]).
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    _log_file: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(self.port), *self.args],
            cwd=REPO_ROOT, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_until_up(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with code {self.process.returncode} before serving:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"app.py did not answer on {self.url} within {timeout_s:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log(self, start: int = 0) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[start:].decode("utf-8", "replace")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0


# --- URLs ----------------------------------------------------------------------------------

#: URL schemes whose requests never reach the network (the page's own blobs, inline data).
LOCAL_SCHEMES = {"data", "blob", "about", "chrome", "chrome-extension"}


def request_host(url: str) -> str | None:
    """The host a request goes to; None for URLs that stay inside the browser."""
    parts = urlsplit(url)
    if parts.scheme == "blob":  # blob:http://127.0.0.1:7860/uuid belongs to that origin
        return request_host(url.removeprefix("blob:"))
    if parts.scheme in LOCAL_SCHEMES:
        return None
    return parts.hostname


# --- Gradio widgets (driven the way a user does: type, press Enter, click) -----------------


def set_slider(page, label: str, value: int | float) -> None:
    """Type into a slider's number box and press Enter; checks both the box and the range moved."""
    box = page.get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")
    expected = str(value)
    _expect_value(box, expected, f"slider {label!r} number box")
    _expect_value(page.get_by_label(f"range slider for {label}", exact=True), expected, f"slider {label!r} range")


def set_number(page, locator, value: int | float, what: str) -> None:
    locator.fill(str(value))
    locator.press("Enter")
    _expect_value(locator, str(value), what)


def _expect_value(locator, expected: str, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        actual = locator.input_value()
        if _same_number_text(actual, expected):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: expected value {expected!r}, the page shows {actual!r}")
        time.sleep(0.1)


def _same_number_text(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def choose(page, elem_id: str, option: str) -> None:
    """Pick ``option`` in the Gradio dropdown ``#elem_id`` by clicking it in the opened list."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(f"#{elem_id} input[role=combobox]")
    item = page.get_by_role("option", name=option, exact=True)
    deadline = time.monotonic() + 30
    while True:  # the choices may still be arriving (e.g. right after a rescan): reopen until listed
        if box.get_attribute("aria-expanded") != "true":
            box.click()
        try:
            item.click(timeout=3000)
            break
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
            box.press("Escape")
    _expect_value(box, option, f"dropdown #{elem_id}")


def wait_for_text(page, selector: str, text: str, timeout_s: float = 120) -> str:
    """Wait until an element matching ``selector`` shows ``text`` (any of them: an earlier toast may still be
    on screen above a new one); returns that element's visible text."""
    handle = page.wait_for_function(
        "([selector, text]) => { for (const e of document.querySelectorAll(selector)) {"
        " if (e.innerText.includes(text)) return e.innerText; } return false; }",
        arg=[selector, text], timeout=timeout_s * 1000,
    )
    return handle.json_value()


def wait_for_empty_text(page, selector: str, timeout_s: float = 30) -> None:
    """Wait until the element shows no text (a follow-up event's queue/progress overlay has gone)."""
    page.wait_for_function(
        "(selector) => { const e = document.querySelector(selector); return !!e && e.innerText.trim() === ''; }",
        arg=selector, timeout=timeout_s * 1000,
    )


def wait_for_any_text(page, selector: str, texts: list[str], timeout_s: float = 120) -> str:
    page.wait_for_function(
        "([selector, texts]) => { const e = document.querySelector(selector);"
        " return !!e && texts.some(t => e.innerText.includes(t)); }",
        arg=[selector, texts], timeout=timeout_s * 1000,
    )
    return page.inner_text(selector)


# --- PNGs ------------------------------------------------------------------------------------


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is a {image.format}, not a PNG"
        return dict(image.text)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def saved_images(outputs_dir: Path) -> list[Path]:
    """PNGs the Synthesis tab saved, in creation order (outputs/synthesis/<date>/<n>-<seed>.png)."""
    return sorted((outputs_dir / "synthesis").glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
