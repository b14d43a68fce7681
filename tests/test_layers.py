"""The package layering of pyproject.toml ([tool.importlinter]) holds, and is a real check."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` run in ``root`` (its pyproject.toml and its fetalstudio package), no cache left behind."""
    beside_python = Path(sys.executable).with_name("lint-imports")
    command = str(beside_python) if beside_python.is_file() else shutil.which("lint-imports")
    assert command, "lint-imports is not installed: pip install -r requirements-test.txt"
    return subprocess.run([command, "--no-cache", "--no-logo"], cwd=root, capture_output=True, text=True, timeout=300)


def test_no_import_breaks_the_layers_contract():
    result = _lint_imports(REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "0 broken" in output, output


def test_a_sideways_import_breaks_the_contract(tmp_path):
    """The contract is not vacuous: the lowest shared layer importing a workflow is reported."""
    shutil.copytree(REPO / "fetalstudio", tmp_path / "fetalstudio", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    files = tmp_path / "fetalstudio" / "imaging" / "files.py"
    files.write_text(files.read_text() + "\nfrom fetalstudio.review.store import ReviewSession  # noqa: E402\n")
    result = _lint_imports(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "fetalstudio.imaging is not allowed to import fetalstudio.review" in output, output
    assert "fetalstudio.imaging.files -> fetalstudio.review.store" in output, output


def test_every_top_level_package_has_a_layer():
    """A new package (e.g. the anatomy workflow) must be placed in the layering before it can land."""
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    assert contract["type"] == "layers" and contract["containers"] == ["fetalstudio"] and contract["exhaustive"] is True
    layered = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    modules = {p.stem for p in (REPO / "fetalstudio").glob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in (REPO / "fetalstudio").glob("*/__init__.py")}
    assert layered == modules | packages


def test_the_console_command_is_python_m_fetalstudio():
    """``pip install -e .`` installs ``fetalstudio``, which runs what ``python -m fetalstudio`` runs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"fetalstudio": "fetalstudio.cli:main"}
    assert "from fetalstudio.cli import main" in (REPO / "fetalstudio" / "__main__.py").read_text()
    help_text = subprocess.run([sys.executable, "-m", "fetalstudio", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "generate" in help_text.stdout
