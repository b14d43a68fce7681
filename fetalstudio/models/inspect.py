"""Tell what a checkpoint file or folder is from its layout and tensor names, without loading it.

safetensors headers are read without touching the tensors; pickled checkpoints are opened with
``weights_only=True`` and ``mmap=True`` so even a 2.5 GB SAM ViT-H file costs almost nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from fetalstudio.errors import ModelLoadError
from fetalstudio.models.entries import ModelFormat, ModelKind

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")

#: SAM image encoders differ in width: patch embedding output channels tell them apart.
SAM_VARIANT_BY_EMBED_DIM = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


@dataclass(frozen=True)
class Inspection:
    kind: ModelKind
    format: ModelFormat
    details: dict[str, str] = field(default_factory=dict)


def inspect_path(path: Path) -> Inspection | None:
    """What ``path`` holds, or None when it is not a model this app knows."""
    if path.is_dir():
        return _inspect_folder(path)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        return None
    if path.suffix.lower() == ".safetensors":
        keys, metadata = read_safetensors_header(path)
        return classify_keys(keys, metadata, shapes=lambda key: _safetensors_shape(path, key))
    state = load_pickled_state_dict(path)
    return classify_keys(state.keys(), {}, shapes=lambda key: tuple(state[key].shape))


def _inspect_folder(folder: Path) -> Inspection | None:
    model_index = folder / "model_index.json"
    if model_index.is_file():
        class_name = _read_json(model_index).get("_class_name", "")
        return Inspection(ModelKind.SD_PIPELINE, ModelFormat.DIFFUSERS_FOLDER, {"pipeline_class": class_name})
    config = folder / "config.json"
    if config.is_file() and _read_json(config).get("_class_name") == "ControlNetModel":
        return Inspection(ModelKind.CONTROLNET, ModelFormat.CONTROLNET_FOLDER)
    for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
        if (folder / name).is_file():
            return Inspection(ModelKind.LORA, ModelFormat.PEFT_LORA, {"weights_file": name})
    return None


#: Image size of SD 1.x checkpoints in the original single-file layout.
SD1_NATIVE_IMAGE_SIZE = 512


def native_image_size(path: Path, format: ModelFormat) -> int | None:
    """The square image size an SD-architecture pipeline was trained at, from its configs; None when unknown.

    A diffusers folder: U-Net ``sample_size`` (latent) x the VAE's downsampling (2 ^ (blocks - 1)).
    """
    if format is ModelFormat.SINGLE_FILE:
        return SD1_NATIVE_IMAGE_SIZE
    if format is not ModelFormat.DIFFUSERS_FOLDER:
        return None
    unet = _read_json(path / "unet" / "config.json")
    vae = _read_json(path / "vae" / "config.json")
    sample_size, blocks = unet.get("sample_size"), vae.get("block_out_channels")
    if not isinstance(sample_size, int) or not isinstance(blocks, list) or not blocks:
        return None
    return sample_size * 2 ** (len(blocks) - 1)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def read_safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ModelLoadError(
            f"{path.name} is not a readable .safetensors file ({error}). "
            "The download may be incomplete: fetch the file again and replace it."
        ) from error


def _safetensors_shape(path: Path, key: str) -> tuple[int, ...]:
    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(key).get_shape())


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint's tensors, loaded safely (no code execution) and memory-mapped."""
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ModelLoadError(
            f"{path.name} could not be read as a PyTorch checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). Only plain tensor "
            "checkpoints are accepted (weights_only=True); re-save it as .safetensors, or fetch "
            "an intact copy if the download was interrupted."
        ) from error
    return unwrap_state_dict(loaded, path)


def unwrap_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """Training scripts nest the weights under "state_dict" or "model"; return the tensor dict."""
    for _ in range(2):
        if isinstance(loaded, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if key in loaded and isinstance(loaded[key], dict):
                    loaded = loaded[key]
                    break
    if not isinstance(loaded, dict) or not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(f"{path.name} holds no tensors: it is not a model checkpoint.")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def classify_keys(keys: Iterable[str], metadata: dict[str, str], shapes) -> Inspection | None:
    """Decide kind and format from tensor names (and safetensors metadata of our own models)."""
    keys = [k for k in keys if isinstance(k, str)]
    declared = metadata.get("fetalstudio.kind")
    if declared == ModelKind.CLASSIFIER.value:
        return Inspection(ModelKind.CLASSIFIER, ModelFormat.TIMM_CHECKPOINT, _prefixed(metadata))
    if declared == ModelKind.SEGMENTER.value:
        return Inspection(ModelKind.SEGMENTER, ModelFormat.FETALSTUDIO_SEGMENTER, _prefixed(metadata))
    if declared == ModelKind.DETECTOR.value:
        return Inspection(ModelKind.DETECTOR, ModelFormat.FETALSTUDIO_DETECTOR, _prefixed(metadata))
    if declared == ModelKind.HEAD_SEGMENTER.value:
        return Inspection(ModelKind.HEAD_SEGMENTER, ModelFormat.FETALSTUDIO_HEAD_SEGMENTER, _prefixed(metadata))
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return Inspection(ModelKind.SD_PIPELINE, ModelFormat.SINGLE_FILE)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return Inspection(ModelKind.LORA, ModelFormat.KOHYA_LORA, _lora_details(keys, shapes, "lora_down"))
    if any(("lora_A" in k or "lora_B" in k or ".lora.down." in k or "lora_linear_layer" in k) for k in keys):
        return Inspection(ModelKind.LORA, ModelFormat.PEFT_LORA, _lora_details(keys, shapes, "lora_A"))
    if any(k.startswith("control_model.") for k in keys):
        return Inspection(ModelKind.CONTROLNET, ModelFormat.SINGLE_FILE)
    patch_key = "image_encoder.patch_embed.proj.weight"
    if patch_key in keys and any(k.startswith("mask_decoder.") for k in keys):
        embed_dim = shapes(patch_key)[0]
        variant = SAM_VARIANT_BY_EMBED_DIM.get(embed_dim, "custom")
        return Inspection(ModelKind.SAM, ModelFormat.SAM_PTH, {"variant": variant, "embed_dim": str(embed_dim)})
    if _looks_like_classifier(keys):
        return Inspection(ModelKind.CLASSIFIER, ModelFormat.TIMM_CHECKPOINT, _prefixed(metadata))
    return None


def _prefixed(metadata: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("fetalstudio."): v for k, v in metadata.items() if k.startswith("fetalstudio.")}


def _lora_details(keys: list[str], shapes, down_marker: str) -> dict[str, str]:
    down_keys = [k for k in keys if down_marker in k or ".lora.down." in k]
    details = {"modules": str(len(down_keys))}
    if down_keys:
        details["rank"] = str(shapes(down_keys[0])[0])
    details["text_encoder"] = "yes" if any(k.startswith("lora_te") or "text_encoder" in k for k in keys) else "no"
    return details


def _looks_like_classifier(keys: list[str]) -> bool:
    heads = ("fc.weight", "classifier.weight", "head.weight", "head.fc.weight", "last_linear.weight")
    return any(k in heads for k in keys)
