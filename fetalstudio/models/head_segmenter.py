"""The prompt-free head segmenter as the model manager rebuilds it: a U-Net from
segmentation-models-pytorch (``smp.Unet``, random initialisation, grayscale in, one channel of
head-mask logits out), read from a FetalStudio ``.safetensors`` whose metadata describes it.

The encoder is any smp encoder, timm's included through smp's ``tu-`` names (the bundled model:
``tu-regnetx_002``, RegNetX-200MF); ``decoder_channels`` sets the decoder's widths (one per
encoder stage, so the encoder depth is their count). The input is the image letterboxed into an
``input_size`` square (``fetalstudio.imaging.letterbox``), pixels scaled to [-1, 1]. Prediction
(flip test-time augmentation, the probability map back at the image's own resolution, largest
region, holes filled) lives in ``fetalstudio.segmentation.head_unet``; this module holds what
loading and saving need, as ``models.detector`` does for the structure detector.

Metadata: ``fetalstudio.kind = "head_segmenter"``, ``fetalstudio.architecture = "smp_unet"``,
``fetalstudio.config`` (the JSON of :class:`HeadSegmenterConfig`), ``fetalstudio.input_size``,
``fetalstudio.encoder`` and ``fetalstudio.training`` (JSON).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fetalstudio.errors import ModelLoadError

KIND = "head_segmenter"
ARCHITECTURE = "smp_unet"
#: The bundled model's encoder and decoder widths (2.7 M parameters, 5.2 MiB in fp16).
DEFAULT_ENCODER = "tu-regnetx_002"
DEFAULT_DECODER_CHANNELS = (64, 32, 16, 16, 8)


@dataclass(frozen=True)
class HeadSegmenterConfig:
    encoder: str = DEFAULT_ENCODER
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS
    input_size: int = 256
    in_chans: int = 1

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "decoder_channels": list(self.decoder_channels)})

    @classmethod
    def from_json(cls, text: str) -> HeadSegmenterConfig:
        data = json.loads(text)
        return cls(encoder=str(data["encoder"]), decoder_channels=tuple(int(c) for c in data["decoder_channels"]),
                   input_size=int(data["input_size"]), in_chans=int(data["in_chans"]))

    @property
    def stride(self) -> int:
        """The input side must be a multiple of this (the encoder halves it once per decoder stage)."""
        return 2 ** len(self.decoder_channels)


class HeadUNet(nn.Module):
    """``smp.Unet`` with its config: ``forward`` maps N x in_chans x S x S inputs in [-1, 1] to N x 1 x S x S logits."""

    def __init__(self, config: HeadSegmenterConfig) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        if not config.decoder_channels:
            raise ModelLoadError("a head segmenter needs at least one decoder stage (decoder_channels).")
        if config.input_size % config.stride:
            raise ModelLoadError(f"head segmenter input size {config.input_size} is not a multiple of {config.stride} "
                                 f"({len(config.decoder_channels)} decoder stages).")
        self.config = config
        try:
            self.net = smp.Unet(encoder_name=config.encoder, encoder_weights=None, encoder_depth=len(config.decoder_channels),
                                decoder_channels=list(config.decoder_channels), in_channels=config.in_chans, classes=1)
        except (KeyError, RuntimeError, ValueError) as error:
            raise ModelLoadError(f"segmentation-models-pytorch cannot build a U-Net on the encoder {config.encoder!r} "
                                 f"({error}).") from error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_head_segmenter(config: HeadSegmenterConfig) -> HeadUNet:
    return HeadUNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_head_segmenter(model: HeadUNet, path: Path, training: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write the weights (floating tensors in ``dtype``) and the metadata that rebuilds the model,
    atomically (temporary file, rename)."""
    from safetensors.torch import save_file

    config = model.config
    metadata = {
        "fetalstudio.kind": KIND, "fetalstudio.architecture": ARCHITECTURE, "fetalstudio.config": config.to_json(),
        "fetalstudio.input_size": str(config.input_size), "fetalstudio.encoder": config.encoder,
        "fetalstudio.training": json.dumps(training or {}, default=str),
    }
    state = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu")
        state[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def read_head_segmenter_config(path: Path) -> HeadSegmenterConfig:
    """The config in a head segmenter file's metadata (header only); refused with what to do when the
    file is not one or its metadata is damaged."""
    from fetalstudio.models.inspect import read_safetensors_header

    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name} is not a .safetensors file; a FetalStudio head segmenter is saved as one.")
    metadata = read_safetensors_header(path)[1]
    if metadata.get("fetalstudio.kind") != KIND:
        raise ModelLoadError(f"{path.name} is not a FetalStudio head segmenter (its metadata has no fetalstudio.kind = "
                             f"\"{KIND}\"). Train one with `python -m fetalstudio train head-unet`.")
    architecture = metadata.get("fetalstudio.architecture", ARCHITECTURE)
    if architecture != ARCHITECTURE:
        raise ModelLoadError(f"{path.name}: head segmenter architecture {architecture!r} is not supported (only {ARCHITECTURE!r}).")
    try:
        return HeadSegmenterConfig.from_json(metadata["fetalstudio.config"])
    except (KeyError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{path.name}: its fetalstudio.config metadata is missing or damaged ({error}); train or copy "
                             "the model again.") from error


def load_head_segmenter_file(path: Path) -> HeadUNet:
    """The head U-Net in ``path`` (CPU, float32, eval mode); ``model.config`` says input size and encoder."""
    from safetensors.torch import load_file

    path = Path(path)
    model = build_head_segmenter(read_head_segmenter_config(path))
    weights = {key: value.float() if value.is_floating_point() else value for key, value in load_file(str(path)).items()}
    mismatch = model.load_state_dict(weights, strict=False)
    if mismatch.missing_keys or mismatch.unexpected_keys:
        names = [*mismatch.missing_keys, *mismatch.unexpected_keys][:3]
        raise ModelLoadError(f"{path.name} does not fit the U-Net its own metadata describes ({len(mismatch.missing_keys)} tensors "
                             f"missing, {len(mismatch.unexpected_keys)} unexpected, e.g. {', '.join(names)}); the file is damaged: "
                             "train or copy it again.")
    return model.eval()
