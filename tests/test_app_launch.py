"""``python app.py`` refuses unsafe launch options before starting anything (no server, no Gradio)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "0.0.0.0"],
        ["--host", "192.168.1.20", "--port", "7999"],
        ["--share"],
    ],
    ids=["all-interfaces", "lan-address", "share-link"],
)
def test_exposing_the_app_needs_auth(args):
    # A server would keep running: the timeout turns that into a failure instead of a hang.
    result = subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True, timeout=120,
                            cwd=APP.parent, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "--auth" in result.stderr, output
    assert "Running on" not in output, output


def test_auth_must_be_user_and_password():
    result = subprocess.run([sys.executable, str(APP), "--host", "0.0.0.0", "--auth", "nopassword"],
                            capture_output=True, text=True, timeout=120, cwd=APP.parent, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "USER:PASSWORD" in result.stderr
