"""What the model manager knows about a model before loading it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import read_json

#: What a ControlNet follows when nothing says otherwise: a layout map (every ControlNet before edge conditions).
LAYOUT_CONDITION = "layout"
#: Written beside a ControlNet's weights by ``train controlnet``: ``{"condition": "canny"}``.
CONDITION_FILE = "fetalstudio_condition.json"


class ModelKind(str, Enum):
    SD_PIPELINE = "sd_pipeline"
    LORA = "lora"
    CONTROLNET = "controlnet"
    SAM = "sam"
    CLASSIFIER = "classifier"
    SEGMENTER = "segmenter"
    DETECTOR = "detector"
    HEAD_SEGMENTER = "head_segmenter"  # prompt-free head mask (a U-Net): the Analysis automatic mode


class ModelFormat(str, Enum):
    """How the weights are laid out on disk; picks the loader."""

    DIFFUSERS_FOLDER = "diffusers_folder"  # model_index.json + component folders
    SINGLE_FILE = "single_file"  # original SD layout in one .safetensors/.ckpt
    KOHYA_LORA = "kohya_lora"  # lora_unet_..._lora_down.weight keys
    PEFT_LORA = "peft_lora"  # diffusers/peft keys (lora_A / lora_B, unet./text_encoder. prefixes)
    CONTROLNET_FOLDER = "controlnet_folder"
    SAM_PTH = "sam_pth"
    TIMM_CHECKPOINT = "timm_checkpoint"
    FETALSTUDIO_SEGMENTER = "fetalstudio_segmenter"  # small segment-anything model + config in metadata
    FETALSTUDIO_DETECTOR = "fetalstudio_detector"  # structure detector (models/detector.py) + config in metadata
    FETALSTUDIO_HEAD_SEGMENTER = "fetalstudio_head_segmenter"  # head U-Net (models/head_segmenter.py) + config in metadata
    HUB = "hub"  # not local yet; resolved on demand


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    filename: str | None = None  # None: the whole repository (a diffusers folder)
    revision: str | None = None

    @property
    def url(self) -> str:
        base = f"https://huggingface.co/{self.repo_id}"
        return f"{base}/blob/{self.revision or 'main'}/{self.filename}" if self.filename else base


@dataclass(frozen=True)
class ModelEntry:
    """One model the app knows: from the manifest, from discovery, or a path the user gave."""

    id: str
    kind: ModelKind
    format: ModelFormat
    path: Path | None = None
    hub: HubSource | None = None
    licence: str = ""
    notes: str = ""
    origin: str = "manifest"  # manifest | discovered | user
    #: Kind-specific details: SAM variant ("vit_b"), timm architecture, LoRA rank, ...
    details: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def source_label(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.hub is not None:
            return f"hub:{self.hub.repo_id}" + (f"/{self.hub.filename}" if self.hub.filename else "")
        return "?"

    @property
    def is_local(self) -> bool:
        return self.path is not None and self.path.exists()

    @property
    def condition(self) -> str | None:
        """What a ControlNet was trained to follow ("layout", "canny", ...): the manifest's ``condition``, else
        ``fetalstudio_condition.json`` in its folder, else "layout"; None for other kinds of model."""
        if self.kind is not ModelKind.CONTROLNET:
            return None
        declared = self.details.get("condition", "").strip()
        if declared:
            return declared
        if self.path is not None and (self.path / CONDITION_FILE).is_file():
            return read_condition_file(self.path / CONDITION_FILE)
        return LAYOUT_CONDITION


def read_condition_file(path: Path) -> str:
    """The condition named in a ControlNet's ``fetalstudio_condition.json``."""
    hint = "; restore it from the ControlNet's training output, or delete it if the ControlNet was trained on layout maps"
    data = read_json(path, hint)
    condition = data.get("condition") if isinstance(data, dict) else None
    if not isinstance(condition, str) or not condition.strip():
        raise FetalStudioError(f"{path} does not name a condition (expected {{\"condition\": \"canny\"}} or "
                               f"{{\"condition\": \"layout\"}}){hint}.")
    return condition.strip()
