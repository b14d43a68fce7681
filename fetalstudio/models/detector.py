"""The structure detector as the model manager rebuilds it: a CenterNet-style network (a timm CNN,
a small top-down feature pyramid to stride 4, and three heads), read from a FetalStudio
``.safetensors`` whose metadata describes it.

Heads at stride 4 of the square input: ``heatmap`` (one channel per structure, logits of "the
centre of this structure is here"), ``size`` (log width and log height of each structure's box in
stride units, two channels per structure) and ``offset`` (the centre's sub-cell position). One
heatmap channel per structure suits a plane with one box per structure: the peak of a channel is
the structure, its value the score. Decoding lives in ``fetalstudio.detection.predict``; this
module holds what loading and saving need (as ``models.segmenter`` does for the segmenter).

Metadata: ``fetalstudio.kind = "detector"``, ``fetalstudio.architecture = "centernet"``,
``fetalstudio.classes`` (structures in output order, comma-separated), ``fetalstudio.input_size``,
``fetalstudio.config`` (the JSON of :class:`DetectorConfig`) and ``fetalstudio.training`` (JSON).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fetalstudio.errors import ModelLoadError

KIND = "detector"
ARCHITECTURE = "centernet"
STRIDE = 4
#: Initial heatmap bias: sigmoid(-2.19) = 0.1, CenterNet's prior that keeps the focal loss stable.
HEATMAP_PRIOR_BIAS = -2.19


@dataclass(frozen=True)
class DetectorConfig:
    classes: tuple[str, ...]
    backbone: str = "resnet18"
    input_size: int = 256
    in_chans: int = 1
    width: int = 64  # channels of the feature pyramid and heads

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "classes": list(self.classes)})

    @classmethod
    def from_json(cls, text: str) -> DetectorConfig:
        data = json.loads(text)
        return cls(classes=tuple(data["classes"]), backbone=data["backbone"], input_size=int(data["input_size"]),
                   in_chans=int(data["in_chans"]), width=int(data["width"]))


def _head(width: int, out: int, bias: float = 0.0) -> nn.Sequential:
    last = nn.Conv2d(width, out, kernel_size=1)
    nn.init.constant_(last.bias, bias)
    return nn.Sequential(nn.Conv2d(width, width, kernel_size=3, padding=1), nn.ReLU(inplace=True), last)


class CenterNetDetector(nn.Module):
    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        import timm

        if config.input_size % 32:
            raise ModelLoadError(f"detector input size {config.input_size} is not a multiple of 32.")
        self.config = config
        try:
            probe = timm.create_model(config.backbone, pretrained=False, features_only=True)
        except (RuntimeError, ValueError) as error:
            raise ModelLoadError(f"timm has no model {config.backbone!r} with feature outputs ({error}).") from error
        reductions = probe.feature_info.reduction()
        indices = tuple(i for i, r in enumerate(reductions) if r in (4, 8, 16, 32))
        if [reductions[i] for i in indices] != [4, 8, 16, 32]:
            raise ModelLoadError(f"timm model {config.backbone!r} lacks feature maps at strides 4-32 (it has {reductions}).")
        self.backbone = timm.create_model(config.backbone, pretrained=False, features_only=True,
                                          out_indices=indices, in_chans=config.in_chans)
        channels = self.backbone.feature_info.channels()
        self.laterals = nn.ModuleList(nn.Conv2d(c, config.width, kernel_size=1) for c in channels)
        self.smooth = nn.Sequential(nn.Conv2d(config.width, config.width, kernel_size=3, padding=1, bias=False),
                                    nn.BatchNorm2d(config.width), nn.ReLU(inplace=True))
        n = len(config.classes)
        self.heatmap = _head(config.width, n, HEATMAP_PRIOR_BIAS)
        self.size = _head(config.width, 2 * n)
        self.offset = _head(config.width, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        merged = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            merged = nn.functional.interpolate(merged, size=feature.shape[-2:], mode="nearest") + lateral(feature)
        merged = self.smooth(merged)
        return {"heatmap": self.heatmap(merged), "size": self.size(merged), "offset": self.offset(merged)}


def build_detector(config: DetectorConfig) -> CenterNetDetector:
    return CenterNetDetector(config)


def save_detector(model: CenterNetDetector, path: Path, training: dict | None = None) -> None:
    """Write the weights and the metadata that rebuilds the model, atomically (temporary file, rename)."""
    from safetensors.torch import save_file

    config = model.config
    metadata = {
        "fetalstudio.kind": KIND, "fetalstudio.architecture": ARCHITECTURE, "fetalstudio.config": config.to_json(),
        "fetalstudio.classes": ",".join(config.classes), "fetalstudio.input_size": str(config.input_size),
        "fetalstudio.backbone": config.backbone, "fetalstudio.training": json.dumps(training or {}, default=str),
    }
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def load_detector_file(path: Path) -> CenterNetDetector:
    """The detector in ``path`` (CPU, eval mode); ``model.config`` says classes and input size."""
    from safetensors.torch import load_file

    from fetalstudio.models.inspect import read_safetensors_header

    if Path(path).suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{Path(path).name} is not a .safetensors file; a FetalStudio detector is saved as one.")
    _, metadata = read_safetensors_header(path)
    if metadata.get("fetalstudio.kind") != KIND:
        raise ModelLoadError(f"{Path(path).name} is not a FetalStudio structure detector (its metadata has no "
                             f"fetalstudio.kind = \"{KIND}\"). Train one with `python -m fetalstudio train detector`.")
    if metadata.get("fetalstudio.architecture", ARCHITECTURE) != ARCHITECTURE:
        raise ModelLoadError(f"{Path(path).name}: detector architecture {metadata['fetalstudio.architecture']!r} is not "
                             f"supported (only {ARCHITECTURE!r}).")
    try:
        config = DetectorConfig.from_json(metadata["fetalstudio.config"])
    except (KeyError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{Path(path).name}: the fetalstudio.config metadata is missing or damaged ({error}); "
                             "train or copy the model again.") from error
    model = build_detector(config)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        first_lines = "; ".join(str(error).splitlines()[:3])
        raise ModelLoadError(f"{Path(path).name} does not fit the architecture in its own metadata ({first_lines}). "
                             "The file is damaged: train or copy it again.") from error
    return model.eval()
