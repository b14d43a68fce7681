"""Shared fixtures: tiny random-weight models on disk and an isolated model manager (CPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fetalstudio.models.device import DevicePlacement

#: Environment variables that change where models are found or how they are placed.
_MODEL_ENV_VARS = (
    "FETALSTUDIO_MODELS",
    "FETALSTUDIO_MEMORY_BUDGET_GB",
    "FETALSTUDIO_DEVICE",
    "FETALSTUDIO_DTYPE",
)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A complete tiny SD-1.x-architecture diffusers folder (random weights), shared read-only.

    Copy it (shutil.copytree) before changing anything inside it.
    """
    from tests.tiny_models import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tinysd")


@pytest.fixture(scope="session")
def tiny_kohya_lora(tiny_sd_dir, tmp_path_factory) -> Path:
    """A kohya-format LoRA (rank 4) for the tiny SD U-Net, shared read-only."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from tests.tiny_models import write_random_kohya_lora

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_dir / "unet"))
    path = tmp_path_factory.mktemp("loras") / "tiny_kohya_lora.safetensors"
    return write_random_kohya_lora(SimpleNamespace(unet=unet), path, rank=4)


@pytest.fixture
def cpu_placement() -> DevicePlacement:
    return DevicePlacement(torch.device("cpu"), torch.float32)


@pytest.fixture
def tmp_checkpoints(tmp_path, monkeypatch) -> Path:
    """An empty checkpoints folder, with the model-related environment variables cleared."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in _MODEL_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(folder))
    return folder


@pytest.fixture
def manager(tmp_checkpoints, tiny_sd_dir, cpu_placement):
    """A CPU model manager over an empty checkpoints folder plus the tiny SD folder (id "tinysd")."""
    from fetalstudio.models.manager import ModelManager

    return ModelManager(tmp_checkpoints, extra_folders=(tiny_sd_dir.parent,), placement=cpu_placement)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine's cores are shared: one torch thread is faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
