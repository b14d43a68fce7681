"""Tiny models for the synthesis tests, built once per test session and loaded like real checkpoints."""

from __future__ import annotations

from pathlib import Path

from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.settings import GenerationSettings
from tests.tiny_models import build_tiny_sd_pipeline, save_tiny_sd_pipeline, write_random_kohya_lora

MODEL_ID = "tinysd"
LORA_ID = "loras/fetal_test_lora"


def build_model_folder(root: Path) -> Path:
    """root/tinysd (diffusers folder) + root/loras/fetal_test_lora.safetensors (kohya format)."""
    save_tiny_sd_pipeline(root / MODEL_ID)
    write_random_kohya_lora(build_tiny_sd_pipeline(), root / f"{LORA_ID}.safetensors", rank=4, alpha=4.0)
    return root


def make_engine(models_root: Path, checkpoints: Path) -> TextToImageRunner:
    checkpoints.mkdir(parents=True, exist_ok=True)
    return TextToImageRunner(ModelManager(checkpoints, extra_folders=(models_root,)))


def small_settings(**overrides) -> GenerationSettings:
    values = dict(model=MODEL_ID, prompt="a photo of fetal brain", steps=3, width=64, height=64, seed=7)
    values.update(overrides)
    return GenerationSettings(**values)
