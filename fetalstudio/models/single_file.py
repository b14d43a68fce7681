"""Load single-file Stable Diffusion 1.x checkpoints (original LDM/CompVis layout) fully offline.

A "single-file" checkpoint is what most community SD 1.x models are published as: one
``.safetensors`` (or legacy pickle ``.ckpt``) file holding the whole pipeline in the original
CompVis key layout::

    model.diffusion_model.*           UNet
    first_stage_model.*               VAE
    cond_stage_model.transformer.*    CLIP ViT-L/14 text encoder

diffusers can convert such a file (``StableDiffusionPipeline.from_single_file``), but it needs a
diffusers-format *config* folder, which it normally downloads from the Hub. FetalStudio ships that
folder (``configs/sd15``: configs and tokenizer only, no weights), so loading never touches the
network.

Safety: ``.safetensors`` files are never executed. Pickle files (``.ckpt``/``.pt``/``.pth``/``.bin``)
are read with ``torch.load(..., weights_only=True)`` both by our pre-flight check and by diffusers
0.42 itself (``diffusers.models.model_loading_utils.load_state_dict``), so a checkpoint that contains
anything but tensors and plain containers is refused instead of unpickled.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fetalstudio.errors import ModelLoadError, ModelNotFoundError

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers; diffusers is imported lazily
    from diffusers import StableDiffusionPipeline

__all__ = [
    "SD15_CONFIG_DIR",
    "SUPPORTED_ARCHITECTURES",
    "is_single_file_sd_checkpoint",
    "load_single_file_sd_pipeline",
]

SD15_CONFIG_DIR: Path = Path(__file__).resolve().parent / "configs" / "sd15"

SUPPORTED_ARCHITECTURES = "Stable Diffusion 1.x text-to-image (SD 1.4 / 1.5 and their fine-tunes)"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
# Key as written by transformers >= 4.x; very old SD 1.x files lack the "text_model." level.
_CLIP_MODERN_PREFIX = CLIP_PREFIX + "text_model."

_SAFETENSORS_SUFFIXES = {".safetensors"}
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}

_CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
_TOKEN_EMBEDDING_SUFFIX = "embeddings.token_embedding.weight"


def is_single_file_sd_checkpoint(keys: Iterable[str]) -> bool:
    """True if ``keys`` (a state dict's keys) are in the original LDM/CompVis single-file layout.

    This only says "a UNet in the ``model.diffusion_model.`` layout is present". It is true for
    SD 1.x, SD 2.x and SDXL files alike; :func:`load_single_file_sd_pipeline` tells them apart.
    """
    return any(k.startswith(UNET_PREFIX) for k in keys)


def load_single_file_sd_pipeline(
    path: Path,
    *,
    torch_dtype: torch.dtype = torch.float32,
    config_dir: Path | None = None,
) -> StableDiffusionPipeline:
    """Load a single-file SD 1.x checkpoint into a ``StableDiffusionPipeline`` without any network access.

    Args:
        path: a ``.safetensors`` file (preferred) or a pickle ``.ckpt``/``.pt``/``.pth``/``.bin`` file in
            the original LDM layout.
        torch_dtype: dtype of the loaded model weights.
        config_dir: a diffusers-format pipeline folder whose configs describe the checkpoint's
            architecture (weights in it are ignored). Defaults to :data:`SD15_CONFIG_DIR`.

    The pipeline is returned on the CPU with no safety checker.

    Raises:
        ModelNotFoundError: ``path`` does not exist.
        ModelLoadError: the file is corrupt or truncated, is not an SD checkpoint, is an
            unsupported architecture (SD 2.x, SDXL, inpainting, ...), is a pickle that needs
            arbitrary code to load, or lacks some weights.
    """
    path = Path(path).expanduser()
    config_dir = Path(config_dir).expanduser() if config_dir is not None else SD15_CONFIG_DIR
    if not path.is_file():
        raise ModelNotFoundError(
            f"Checkpoint file not found: {path}. Check the path (it must be a single .safetensors or .ckpt file)."
        )
    _check_config_dir(config_dir)

    info = _inspect_checkpoint(path)
    _check_architecture(path, info, config_dir)

    extra_components: dict[str, Any] = {}
    if info.legacy_clip_layout:
        # diffusers only recognises "cond_stage_model.transformer.text_model.*"; build this one ourselves.
        extra_components["text_encoder"] = _load_legacy_layout_text_encoder(path, info, config_dir, torch_dtype)

    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            # A local folder: diffusers then never calls the Hub. (A missing folder would make it
            # treat the string as a repo id and download; _check_config_dir rules that out.)
            config=str(config_dir),
            local_files_only=True,
            torch_dtype=torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
            **extra_components,
        )
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # diffusers raises ValueError/OSError/RuntimeError/SingleFileComponentError
        raise _explain_load_failure(path, exc, config_dir) from exc

    _check_fully_loaded(path, pipe)
    return pipe


# --------------------------------------------------------------------------------------------------
# Pre-flight inspection: keys and shapes, read without materialising the weights where possible.


@dataclass
class _CheckpointInfo:
    keys: set[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    is_safetensors: bool = True
    legacy_clip_layout: bool = False


def _inspect_checkpoint(path: Path) -> _CheckpointInfo:
    if _is_git_lfs_pointer(path):
        raise ModelLoadError(
            f"{path.name} is a Git LFS pointer (a small text file), not the weights. Run `git lfs pull` in the "
            "repository it came from, or download the file itself."
        )
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        return _inspect_safetensors(path)
    if suffix in _PICKLE_SUFFIXES or _looks_like_pickle(path):
        return _inspect_pickle(path)
    if _looks_like_safetensors(path):
        raise ModelLoadError(
            f"{path.name} is a safetensors file with the extension '{path.suffix}'. "
            "Rename it to end in .safetensors and load it again."
        )
    raise ModelLoadError(
        f"{path.name} is not a checkpoint format FetalStudio can read (extension '{path.suffix}'). "
        "Use a .safetensors file (preferred) or a .ckpt file."
    )


def _inspect_safetensors(path: Path) -> _CheckpointInfo:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys if _shape_needed(k)}
    except Exception as exc:  # SafetensorError, OSError
        raise ModelLoadError(
            f"{path.name} is not a readable safetensors file ({_first_lines(str(exc))}). The file is "
            "corrupt or truncated, e.g. an interrupted download: download it again and compare its size "
            "or SHA-256 with the one published by the model's author."
        ) from exc
    return _CheckpointInfo(keys=set(keys), shapes=shapes, is_safetensors=True)


def _inspect_pickle(path: Path) -> _CheckpointInfo:
    state_dict = _torch_load_weights_only(path)
    keys = {k for k in state_dict if isinstance(k, str)}
    shapes = {
        k: tuple(v.shape) for k, v in state_dict.items() if isinstance(k, str) and _shape_needed(k) and hasattr(v, "shape")
    }
    return _CheckpointInfo(keys=keys, shapes=shapes, is_safetensors=False)


def _torch_load_weights_only(path: Path) -> Mapping[str, Any]:
    """``torch.load`` with ``weights_only=True`` (memory-mapped when possible), unwrapping ``state_dict``."""
    is_zip = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise ModelLoadError(
                f"{path.name} is a pickle checkpoint that contains Python objects besides weights (for example "
                f"'{unsafe.group(1)}'). FetalStudio only reads pickle files in safe weights-only mode, because "
                "unpickling arbitrary objects can run arbitrary code. Get a .safetensors version of this model, "
                "or convert the file to .safetensors in an isolated environment you trust."
            ) from exc
        raise _corrupt_pickle_error(path, exc) from exc
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # RuntimeError (bad zip), EOFError, ValueError, ...
        raise _corrupt_pickle_error(path, exc) from exc

    # Lightning checkpoints nest the weights under "state_dict" (diffusers unwraps the same way).
    while isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{path.name} holds a {type(obj).__name__}, not a dictionary of weights, so it is not a "
            f"Stable Diffusion checkpoint. Supported: {SUPPORTED_ARCHITECTURES}."
        )
    return obj


def _corrupt_pickle_error(path: Path, exc: BaseException) -> ModelLoadError:
    hint = ""
    if _looks_like_safetensors(path):
        hint = " It looks like a safetensors file: rename it to end in .safetensors."
    return ModelLoadError(
        f"{path.name} could not be read as a PyTorch checkpoint ({type(exc).__name__}: "
        f"{_first_lines(str(exc), 1)}). The file is corrupt or truncated, e.g. an interrupted download: "
        f"download it again and compare its size or SHA-256 with the published one.{hint}"
    )


def _shape_needed(key: str) -> bool:
    return (
        key == _CONV_IN_KEY
        or (key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"))
        or (key.startswith(CLIP_PREFIX) and key.endswith(_TOKEN_EMBEDDING_SUFFIX))
    )


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len < path.stat().st_size


def _is_git_lfs_pointer(path: Path) -> bool:
    try:
        if path.stat().st_size > 1024:
            return False
        with open(path, "rb") as f:
            return f.read(64).startswith(b"version https://git-lfs")
    except OSError:
        return False


def _looks_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


# --------------------------------------------------------------------------------------------------
# Architecture checks: name what the file is when it is not SD 1.x.


def _check_architecture(path: Path, info: _CheckpointInfo, config_dir: Path) -> None:
    keys = info.keys
    name = path.name
    unsupported = f"FetalStudio supports {SUPPORTED_ARCHITECTURES} so far."

    def has_prefix(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if not keys:
        raise ModelLoadError(f"{name} contains no weights at all. Download it again or pick another file.")

    # Families that share the "model.diffusion_model." prefix or are easily mistaken for a checkpoint.
    if has_prefix("conditioner.embedders."):
        raise ModelLoadError(
            f"{name} is a Stable Diffusion XL checkpoint (it has SDXL's 'conditioner.embedders' text "
            f"encoders). SDXL is not supported yet. {unsupported}"
        )
    if has_prefix("model.diffusion_model.joint_blocks.", "joint_blocks."):
        raise ModelLoadError(f"{name} is a Stable Diffusion 3 checkpoint, which is not supported yet. {unsupported}")
    if has_prefix("model.diffusion_model.double_blocks.", "double_blocks."):
        raise ModelLoadError(f"{name} is a FLUX checkpoint, which is not supported. {unsupported}")
    if has_prefix("control_model.", "controlnet_cond_embedding."):
        raise ModelLoadError(
            f"{name} is a ControlNet, not a full Stable Diffusion checkpoint. Load it as a ControlNet, and "
            "pick an SD 1.x checkpoint as the base model."
        )
    if has_prefix("lora_unet_", "lora_te") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        raise ModelLoadError(
            f"{name} is a LoRA adapter, not a full Stable Diffusion checkpoint. Load it as a LoRA on top of "
            "an SD 1.x base model."
        )

    if not is_single_file_sd_checkpoint(keys):
        what = ""
        if has_prefix("down_blocks.", "conv_in.", "encoder.down_blocks.", "decoder.up_blocks."):
            what = (
                " It looks like the weights of a single diffusers-format component (UNet or VAE); load the "
                "whole diffusers model folder instead."
            )
        elif has_prefix("text_model.", "embeddings.token_embedding."):
            what = " It looks like a stand-alone CLIP text encoder."
        raise ModelLoadError(
            f"{name} is not a Stable Diffusion checkpoint: none of its {len(keys)} tensors is a UNet weight "
            f"in the original single-file layout (keys starting with '{UNET_PREFIX}').{what} "
            f"Pick a full SD 1.x .safetensors/.ckpt file. {unsupported}"
        )

    if has_prefix("cond_stage_model.model."):
        raise ModelLoadError(
            f"{name} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder). SD 2.x is not supported "
            f"yet. {unsupported}"
        )
    if UNET_PREFIX + "input_blocks.10.0.skip_connection.bias" in keys and UNET_PREFIX + "label_emb.weight" in keys:
        raise ModelLoadError(f"{name} is a Stable Diffusion x4 upscaler, which is not supported. {unsupported}")

    unet_config = _read_json(config_dir / "unet" / "config.json")
    conv_in = info.shapes.get(_CONV_IN_KEY)
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError(
            f"{name} has UNet weights but no usable input convolution ('{_CONV_IN_KEY}'), so it is "
            "truncated or not a Stable Diffusion UNet. Download it again or pick another file."
        )
    in_channels = unet_config.get("in_channels", 4)
    if conv_in[1] != in_channels:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix style (image-conditioned)", 5: "a depth-conditioned"}.get(
            conv_in[1], f"a {conv_in[1]}-input-channel"
        )
        raise ModelLoadError(
            f"{name} is {kind} Stable Diffusion checkpoint (its UNet takes {conv_in[1]} input channels, "
            f"text-to-image takes {in_channels}). This variant is not supported yet. {unsupported}"
        )

    cross = sorted({s[-1] for k, s in info.shapes.items() if k.endswith("attn2.to_k.weight") and s})
    expected_cross = unet_config.get("cross_attention_dim", 768)
    if cross and cross != [expected_cross]:
        family = {1024: "a Stable Diffusion 2.x", 2048: "a Stable Diffusion XL"}.get(cross[0], "an unknown")
        raise ModelLoadError(
            f"{name} looks like {family} checkpoint: its UNet cross-attention width is {cross[0]}, SD 1.x "
            f"uses {expected_cross}. It is not supported yet. {unsupported}"
        )

    missing = [
        part
        for part, prefix in (("VAE ('first_stage_model.*')", VAE_PREFIX), ("text encoder ('cond_stage_model.*')", CLIP_PREFIX))
        if not has_prefix(prefix)
    ]
    if missing:
        raise ModelLoadError(
            f"{name} has a UNet but no {' and no '.join(missing)} weights, so it is a partial checkpoint "
            "(e.g. a UNet-only export) that cannot be loaded on its own. Use the full checkpoint that contains "
            "the UNet, VAE and text encoder."
        )

    info.legacy_clip_layout = not has_prefix(_CLIP_MODERN_PREFIX)
    token_emb = next((s for k, s in info.shapes.items() if k.endswith(_TOKEN_EMBEDDING_SUFFIX)), None)
    text_config = _read_json(config_dir / "text_encoder" / "config.json")
    expected_emb = (text_config.get("vocab_size"), text_config.get("hidden_size"))
    if token_emb is not None and tuple(token_emb) != expected_emb:
        raise ModelLoadError(
            f"{name} has a text encoder of shape {tuple(token_emb)} (vocabulary, width); SD 1.x's CLIP ViT-L/14 "
            f"has {expected_emb}. This text encoder is not supported. {unsupported}"
        )


def _check_config_dir(config_dir: Path) -> None:
    needed = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]
    missing = [n for n in needed if not (config_dir / n).is_file()]
    if missing:
        raise ModelLoadError(
            f"The Stable Diffusion config folder {config_dir} is missing {', '.join(missing)}. It must be a "
            "diffusers-format pipeline folder (configs are enough, no weights needed); FetalStudio's own is "
            f"{SD15_CONFIG_DIR}. Restore it from the repository if it was deleted."
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not read config file {path}: {exc}. Restore it from the repository.") from exc


# --------------------------------------------------------------------------------------------------
# Text encoders saved without the "text_model." level (very old transformers); diffusers skips them.


def _load_legacy_layout_text_encoder(path: Path, info: _CheckpointInfo, config_dir: Path, torch_dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_keys = [k for k in info.keys if k.startswith(CLIP_PREFIX)]
    if info.is_safetensors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in clip_keys}
    else:
        state_dict = _torch_load_weights_only(path)
        tensors = {k: state_dict[k] for k in clip_keys}

    config = CLIPTextConfig.from_pretrained(str(config_dir), subfolder="text_encoder", local_files_only=True)
    with init_empty_weights():
        model = CLIPTextModel(config)
    expected = set(model.state_dict().keys())
    converted = {}
    for key, value in tensors.items():
        short = key[len(CLIP_PREFIX) :]
        for candidate in (short, "text_model." + short, short.removeprefix("text_model.")):
            if candidate in expected:
                converted[candidate] = value
                break
    missing = sorted(expected - converted.keys())
    if missing:
        raise ModelLoadError(
            f"{path.name}: the text encoder weights are incomplete ({len(missing)} missing, e.g. "
            f"'{missing[0]}'). The file is truncated or not an SD 1.x checkpoint; download it again."
        )
    model.load_state_dict(converted, strict=True, assign=True)
    return model.to(torch_dtype).eval()


# --------------------------------------------------------------------------------------------------
# Post-load check: diffusers loads with strict=False onto "meta" tensors, so a checkpoint with
# missing tensors would otherwise come back half-empty instead of failing.


def _check_fully_loaded(path: Path, pipe: Any) -> None:
    for component in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, component, None)
        if module is None:
            raise ModelLoadError(f"{path.name}: the pipeline has no {component} after loading. Download the file again.")
        empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if empty:
            raise ModelLoadError(
                f"{path.name} is missing {len(empty)} {component} weights (e.g. '{empty[0]}'), so it is truncated "
                "or an incomplete export. Download it again, or pick a full SD 1.x checkpoint."
            )


def _explain_load_failure(path: Path, exc: BaseException, config_dir: Path) -> ModelLoadError:
    text = str(exc)
    detail = f"{type(exc).__name__}: {_first_lines(text)}"
    if "meta tensor" in text or "appear to be missing" in text:
        return ModelLoadError(
            f"{path.name} is missing some UNet/VAE/text-encoder weights ({detail}), so it is truncated or an "
            "incomplete export. Download it again, or pick a full SD 1.x checkpoint."
        )
    if "size mismatch" in text or "shape" in text.lower():
        return ModelLoadError(
            f"The layer sizes in {path.name} do not match the Stable Diffusion 1.x configs in {config_dir} "
            f"({detail}). The file is an SD variant with a different architecture. "
            f"Supported: {SUPPORTED_ARCHITECTURES}."
        )
    return ModelLoadError(
        f"Could not build a Stable Diffusion pipeline from {path.name} ({detail}). The file passed FetalStudio's "
        f"format checks; if it is an SD 1.x variant, its layers may differ from the configs in {config_dir}. "
        f"Supported: {SUPPORTED_ARCHITECTURES}."
    )


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    short = " / ".join(lines[:n])
    return short[:500] + ("..." if len(short) > 500 else "")

