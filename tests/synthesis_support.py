"""Tiny models for the synthesis tests, built once per test session and loaded like real checkpoints."""

from __future__ import annotations

from pathlib import Path

from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.settings import GenerationSettings
from tests.tiny_models import build_tiny_sd_pipeline, save_tiny_controlnet, save_tiny_sd_pipeline, write_random_kohya_lora

MODEL_ID = "tinysd"
LORA_ID = "loras/fetal_test_lora"
CONTROLNET_ID = "controlnets/tiny_layout"


def build_model_folder(root: Path) -> Path:
    """root/tinysd (diffusers folder) + root/loras/fetal_test_lora.safetensors (kohya format)."""
    save_tiny_sd_pipeline(root / MODEL_ID)
    write_random_kohya_lora(build_tiny_sd_pipeline(), root / f"{LORA_ID}.safetensors", rank=4, alpha=4.0)
    return root


def build_flex_model_folder(root: Path) -> Path:
    """``build_model_folder`` plus root/controlnets/tiny_layout: a tiny ControlNet for tinysd (the anatomy engine)."""
    build_model_folder(root)
    save_tiny_controlnet(root / MODEL_ID, root / CONTROLNET_ID)
    return root


def use_models_folder(monkeypatch, tmp_path: Path, models_root: Path) -> Path:
    """The CLI's environment for a test: ``models_root`` found through $FETALSTUDIO_MODELS, empty checkpoints,
    outputs under ``tmp_path``, the CPU."""
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("FETALSTUDIO_MODELS", str(models_root))
    monkeypatch.setenv("FETALSTUDIO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("FETALSTUDIO_DEVICE", "cpu")
    return tmp_path


def make_engine(models_root: Path, checkpoints: Path) -> TextToImageRunner:
    checkpoints.mkdir(parents=True, exist_ok=True)
    return TextToImageRunner(ModelManager(checkpoints, extra_folders=(models_root,)))


def small_settings(**overrides) -> GenerationSettings:
    values = dict(model=MODEL_ID, prompt="a photo of fetal brain", steps=3, width=64, height=64, seed=7)
    values.update(overrides)
    return GenerationSettings(**values)
