"""One way to build the model manager and the engines (issue 12): app_context for every front end."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from fetalstudio.app_context import build_context, build_manager
from fetalstudio.models.device import DevicePlacement

REPO = Path(__file__).resolve().parent.parent


def _constructors_of(name: str) -> list[str]:
    """Library modules that call ``name(...)`` (docstrings and comments do not count)."""
    found = []
    for path in sorted((REPO / "fetalstudio").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                found.append(str(path.relative_to(REPO)))
                break
    return found


def test_the_model_manager_is_built_in_app_context_alone():
    assert _constructors_of("ModelManager") == ["fetalstudio/app_context.py"]


def test_build_manager_takes_the_device_folder_and_shared_limits(tmp_path, monkeypatch):
    monkeypatch.delenv("FETALSTUDIO_DEVICE", raising=False)
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(tmp_path / "default"))
    manager = build_manager(device="cpu")
    assert manager.placement.device == torch.device("cpu") and manager.checkpoints_dir == tmp_path / "default"
    assert manager.user_path_roots is None  # on this computer: any typed path
    fixed = DevicePlacement(torch.device("cpu"), torch.float32)
    data = tmp_path / "data"
    shared = build_manager(device="cpu", checkpoints=tmp_path / "mine", data_dirs=(data,), placement=fixed)
    assert shared.placement is fixed and shared.checkpoints_dir == tmp_path / "mine"
    assert shared.user_path_roots == (tmp_path / "mine", *shared.extra_folders, data)


def test_build_context_shares_its_manager_with_the_synthesis_runner(tmp_path):
    context = build_context(device="cpu", checkpoints=tmp_path, outputs=tmp_path / "outputs")
    assert context.synthesis.manager is context.manager and context.outputs_dir == tmp_path / "outputs"
    assert context.manager.placement.device == torch.device("cpu")
