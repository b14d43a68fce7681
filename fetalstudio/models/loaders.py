"""One loader per model kind. Loaders read local files only and return CPU-resident objects;
the manager moves them to the device. Every failure becomes a ModelLoadError that names the file
and says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fetalstudio.errors import FetalStudioError, ModelLoadError
from fetalstudio.models.entries import ModelEntry, ModelFormat, ModelKind
from fetalstudio.models.inspect import load_pickled_state_dict, read_safetensors_header

Loader = Callable[[ModelEntry, Path, torch.dtype], Any]


def load_sd_pipeline(entry: ModelEntry, path: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    if entry.format is ModelFormat.SINGLE_FILE or path.is_file():
        from fetalstudio.models.single_file import load_single_file_sd_pipeline

        return load_single_file_sd_pipeline(path, torch_dtype=dtype)
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"The Stable Diffusion folder {path} lacks {', '.join(missing)}/. A diffusers folder "
            "must be complete (tokenizer and configs included) so that it loads offline; copy the "
            "whole folder again."
        )
    return _wrap_load_errors(
        path,
        lambda: StableDiffusionPipeline.from_pretrained(
            str(path),
            dtype=dtype,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        ),
    )


def load_controlnet(entry: ModelEntry, path: Path, dtype: torch.dtype):
    from diffusers import ControlNetModel

    from fetalstudio.models.prealign import PREALIGNMENT_ATTRIBUTE, read_prealignment

    if path.is_file():
        return _wrap_load_errors(path, lambda: ControlNetModel.from_single_file(str(path), dtype=dtype, local_files_only=True))
    controlnet = _wrap_load_errors(path, lambda: ControlNetModel.from_pretrained(str(path), dtype=dtype, local_files_only=True))
    setattr(controlnet, PREALIGNMENT_ATTRIBUTE, read_prealignment(path))  # FetalFlex pre-alignment statistics, if trained with them
    return controlnet


def load_sam(entry: ModelEntry, path: Path, dtype: torch.dtype):
    """A Segment Anything model (vit_b/l/h, MedSAM) built by segment-anything, weights loaded safely."""
    from segment_anything import sam_model_registry

    variant = entry.details.get("variant", "vit_b")
    if variant not in sam_model_registry or variant == "default":
        raise ModelLoadError(
            f"{path.name}: SAM variant {variant!r} is not one of vit_b, vit_l, vit_h "
            "(told apart by the image encoder width 768/1024/1280)."
        )
    model = sam_model_registry[variant](checkpoint=None)
    _load_state(model, _read_state_dict(path), path)
    return model.to(dtype=dtype).eval()


def load_timm_classifier(entry: ModelEntry, path: Path, dtype: torch.dtype):
    """A timm model whose architecture comes from the checkpoint's metadata or the manifest."""
    import timm

    details = dict(entry.details)
    if path.suffix.lower() == ".safetensors":  # our checkpoints describe themselves; the manifest may add to it
        _, metadata = read_safetensors_header(path)
        details = {**{k.removeprefix("fetalstudio."): v for k, v in metadata.items() if k.startswith("fetalstudio.")}, **details}
    architecture = details.get("architecture")
    if not architecture:
        raise ModelLoadError(
            f"{path.name}: the timm architecture is unknown. Add `architecture = \"resnet18\"` "
            "(or whichever timm model it is) to its entry in checkpoints/manifest.toml."
        )
    state = _read_state_dict(path)
    num_classes = int(details.get("num_classes", _infer_num_classes(state)))
    in_chans = int(details.get("in_chans", 3))
    extra = json.loads(details.get("timm_kwargs") or "{}")  # e.g. img_size of a ViT trained off 224
    try:
        model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)
    except RuntimeError as error:
        raise ModelLoadError(f"{path.name}: timm does not know the architecture {architecture!r} ({error}).") from error
    _load_state(model, state, path)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "fetalstudio": details}
    return model.to(dtype=dtype).eval()


def load_segmenter(entry: ModelEntry, path: Path, dtype: torch.dtype):
    """A FetalStudio box-prompted segmenter (.safetensors, architecture in its metadata) or a
    SAM-layout .pth listed as a segmenter; a segment-anything ``Sam`` either way."""
    from fetalstudio.models.segmenter import load_segmenter_file

    return load_segmenter_file(path).to(dtype=dtype).eval()


def load_detector(entry: ModelEntry, path: Path, dtype: torch.dtype):
    """A FetalStudio structure detector (.safetensors, architecture and structures in its metadata)."""
    from fetalstudio.models.detector import load_detector_file

    return load_detector_file(path).to(dtype=dtype).eval()


def load_head_segmenter(entry: ModelEntry, path: Path, dtype: torch.dtype):
    """A FetalStudio head U-Net (.safetensors, encoder, decoder widths and input size in its metadata)."""
    from fetalstudio.models.head_segmenter import load_head_segmenter_file

    return load_head_segmenter_file(path).to(dtype=dtype).eval()


def _infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    for key in ("fc.weight", "classifier.weight", "head.weight", "head.fc.weight", "last_linear.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise ModelLoadError("Cannot tell the number of classes: no classifier head in the checkpoint.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        read_safetensors_header(path)  # clear error for a corrupt header
        return load_file(str(path))
    return load_pickled_state_dict(path)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_lines = "; ".join(str(error).splitlines()[:3])
        raise ModelLoadError(
            f"{path.name} does not fit the model it was declared as ({first_lines}). "
            "Check the kind/architecture/variant in checkpoints/manifest.toml."
        ) from error


def _wrap_load_errors(path: Path, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except FetalStudioError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError, EnvironmentError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"Could not load {path}: {detail}. The checkpoint is missing files, corrupt or of an "
            "architecture this app does not support (SD 1.x pipelines); replace it with a complete copy."
        ) from error


LOADERS: dict[ModelKind, Loader] = {
    ModelKind.SD_PIPELINE: load_sd_pipeline,
    ModelKind.CONTROLNET: load_controlnet,
    ModelKind.SAM: load_sam,
    ModelKind.CLASSIFIER: load_timm_classifier,
    ModelKind.SEGMENTER: load_segmenter,
    ModelKind.DETECTOR: load_detector,
    ModelKind.HEAD_SEGMENTER: load_head_segmenter,
}
