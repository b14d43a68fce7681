"""timm backbones with a new plane head; local pretrained weights; the checkpoint format.

Checkpoint: one ``.safetensors`` file, the timm ``state_dict`` plus string metadata::

    fetalstudio.kind          "classifier"
    fetalstudio.architecture  timm name, e.g. "resnet18"
    fetalstudio.num_classes   "5"
    fetalstudio.in_chans      "1" (grayscale) or "3"
    fetalstudio.classes       JSON list, the output order: ["abdomen", "brain", "femur", "thorax", "other"]
    fetalstudio.input_size    e.g. "128" (square)
    fetalstudio.resize        "letterbox" (pad to square with black, then resize) or "stretch"
    fetalstudio.mean / .std   JSON lists, normalisation after scaling pixels to [0, 1]
    fetalstudio.timm_kwargs   JSON dict of extra timm.create_model arguments (e.g. {"img_size": 128} for ViTs)
    fetalstudio.tta           "" or "hflip" (average with the mirrored image at prediction time)
    fetalstudio.training      JSON summary of how it was trained (informative only)

``fetalstudio.models.loaders.load_timm_classifier`` rebuilds the model from these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fetalstudio.classification.predict import PLANE_CLASSES, Preprocessing
from fetalstudio.errors import FetalStudioError, ModelLoadError

FORMAT_VERSION = "1"

#: Short names accepted by ``--backbone`` (any other timm model name works too).
BACKBONE_ALIASES = {
    "resnet18": "resnet18",
    "densenet169": "densenet169",
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet-b0": "efficientnet_b0",
    "mobilenetv2": "mobilenetv2_100",
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenetv2_100": "mobilenetv2_100",
    "vit_b16": "vit_base_patch16_224",
    "vit-b16": "vit_base_patch16_224",
    "vit_base_patch16_224": "vit_base_patch16_224",
}

#: The paper's five backbones (FU-LoRA, METHODS.md section 1).
PAPER_BACKBONES = ("densenet169", "resnet18", "efficientnet_b0", "mobilenetv2_100", "vit_base_patch16_224")


def resolve_backbone(name: str) -> str:
    import timm

    key = name.strip()
    architecture = BACKBONE_ALIASES.get(key.lower(), key)
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{key.split('_')[0].lower()}*")[:8]
        raise FetalStudioError(
            f"timm has no model called {name!r}. Use one of {', '.join(PAPER_BACKBONES)} or any name from "
            f"timm.list_models(){' (similar: ' + ', '.join(close) + ')' if close else ''}."
        )
    return architecture


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild a classifier and feed it the right inputs."""

    architecture: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    classes: tuple[str, ...] = PLANE_CLASSES
    timm_kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    tta: str = ""

    def metadata(self, training: dict | None = None) -> dict[str, str]:
        data = {
            "fetalstudio.kind": "classifier",
            "fetalstudio.format_version": FORMAT_VERSION,
            "fetalstudio.architecture": self.architecture,
            "fetalstudio.num_classes": str(len(self.classes)),
            "fetalstudio.classes": json.dumps(list(self.classes)),
            "fetalstudio.timm_kwargs": json.dumps(self.timm_kwargs),
            "fetalstudio.tta": self.tta,
            **self.preprocessing.metadata(),
        }
        if training:
            data["fetalstudio.training"] = json.dumps(training, default=str)
        return data


def size_kwargs(architecture: str, input_size: int) -> dict:
    """Extra ``timm.create_model`` arguments for a non-default input size.

    CNNs take any size. Vision transformers have a fixed patch grid, so they are built for the
    input size (``img_size``); their position embeddings are resampled when pretrained weights of
    another size are loaded.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(architecture)
    default = int((getattr(cfg, "input_size", None) or (3, 224, 224))[-1]) if cfg is not None else 224
    if input_size == default:
        return {}
    probe = timm.create_model(architecture, pretrained=False, num_classes=1)
    if hasattr(probe, "patch_embed") and getattr(probe.patch_embed, "img_size", None) is not None:
        return {"img_size": input_size}
    return {}


def build_model(
    spec: ClassifierSpec,
    pretrained_file: Path | None = None,
    drop_rate: float = 0.0,
    zero_head: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """A timm model with a new ``len(spec.classes)``-way head; random weights or a local file.

    ``zero_head``: start the head at zero (``_zero_head``) instead of timm's random init.

    Returns the model and a report of the pretrained load (``{}`` without a file).
    """
    import timm

    try:
        model = timm.create_model(
            spec.architecture, pretrained=False, num_classes=len(spec.classes),
            in_chans=spec.preprocessing.in_chans, drop_rate=drop_rate, **spec.timm_kwargs,
        )
    except (RuntimeError, TypeError, ValueError) as error:
        raise FetalStudioError(f"Could not build timm model {spec.architecture!r}: {error}") from error
    if zero_head:
        _zero_head(model)
    report = {}
    if pretrained_file is not None:
        report = load_pretrained_weights(model, Path(pretrained_file))
    return model, report


def _zero_head(model: torch.nn.Module) -> None:
    """Start the new head at zero: every class equally likely, loss ln(classes) at step 0.

    timm's default head init gives MobileNet/EfficientNet logits with a standard deviation of
    about 4 on random weights, which costs the first hundred steps of a short from-scratch run.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A tensor dict from .safetensors / .pth / .pt / .bin (nested "state_dict"/"model" accepted)."""
    from fetalstudio.models.inspect import load_pickled_state_dict

    if not path.is_file():
        raise FetalStudioError(
            f"The pretrained weights file {path} does not exist. Give the path of a local timm "
            "weights file (.safetensors or .pth) of the same architecture, or leave out --pretrained "
            "to train from scratch."
        )
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return load_pickled_state_dict(path)
    except ModelLoadError as error:
        raise FetalStudioError(f"--pretrained: {error}") from error
    except Exception as error:  # safetensors raises its own types for damaged files
        raise FetalStudioError(
            f"--pretrained: {path.name} could not be read as weights ({type(error).__name__}: {error}). "
            "Give an intact .safetensors or .pth file of the same timm architecture."
        ) from error


def _head_names(model: torch.nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier") or "fc"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(names)


def _first_convs(model: torch.nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first = cfg.get("first_conv") or ()
    return (first,) if isinstance(first, str) else tuple(first)


def load_pretrained_weights(model: torch.nn.Module, path: Path) -> dict:
    """Load a local timm weights file into ``model``; the head (other class count) stays new.

    RGB stem weights are summed for a grayscale model (timm's ``adapt_input_conv``); ViT position
    embeddings are resampled to the model's patch grid. Every backbone tensor must be found with
    the right shape, otherwise a FetalStudioError says which file does not fit which model.
    """
    from timm.models import adapt_input_conv

    state = dict(read_weights_file(path))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    heads = _head_names(model)

    def is_head(key: str) -> bool:
        return any(key == f"{h}.weight" or key == f"{h}.bias" or key.startswith(f"{h}.") for h in heads)

    for conv in _first_convs(model):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            try:
                state[key] = adapt_input_conv(own[key].shape[1], state[key].float()).to(state[key].dtype)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # reported as a shape mismatch below
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix_tokens = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = tuple(model.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid, num_prefix_tokens=prefix_tokens)

    backbone_keys = [k for k in own if not is_head(k)]
    missing = [k for k in backbone_keys if k not in state]
    mismatched = [k for k in backbone_keys if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own and not is_head(k)]
    architecture = (getattr(model, "pretrained_cfg", {}) or {}).get("architecture", type(model).__name__)
    if missing or mismatched:
        examples = [f"missing {k}" for k in missing[:3]] + [
            f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in mismatched[:3]
        ]
        raise FetalStudioError(
            f"The pretrained weights {path.name} do not fit {architecture}: {len(missing)} of "
            f"{len(backbone_keys)} backbone tensors missing, {len(mismatched)} of another shape "
            f"({'; '.join(examples)}). Give a weights file of exactly this architecture (e.g. saved "
            f"from timm.create_model({architecture!r}, pretrained=True).state_dict()), pick the matching "
            "--backbone, or leave out --pretrained to train from scratch."
        )
    loadable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    head_loaded = [k for k in loadable if is_head(k)]
    model.load_state_dict(loadable, strict=False)
    return {
        "file": str(path),
        "tensors_loaded": len(loadable),
        "backbone_tensors": len(backbone_keys),
        "head_loaded": bool(head_loaded),
        "ignored_keys": len(unexpected) + sum(1 for k in state if is_head(k) and k not in loadable),
    }


def save_classifier(model: torch.nn.Module, path: Path, spec: ClassifierSpec, training: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous().clone()
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=spec.metadata(training))
    temporary.replace(path)
    return path


def spec_from_details(details: dict[str, str]) -> ClassifierSpec:
    """The spec recorded in a checkpoint (metadata keys without the ``fetalstudio.`` prefix)."""
    classes: Sequence[str] = json.loads(details["classes"]) if details.get("classes") else PLANE_CLASSES
    return ClassifierSpec(
        architecture=details["architecture"],
        preprocessing=Preprocessing.from_details(details),
        classes=tuple(classes),
        timm_kwargs=json.loads(details.get("timm_kwargs") or "{}"),
        tta=details.get("tta", ""),
    )


def read_spec(path: Path) -> ClassifierSpec:
    """The spec of a checkpoint file, read from its header only."""
    from fetalstudio.models.inspect import read_safetensors_header

    _, metadata = read_safetensors_header(path)
    if metadata.get("fetalstudio.kind") != "classifier":
        raise FetalStudioError(f"{path} is not a FetalStudio classifier checkpoint (no fetalstudio.kind=classifier metadata).")
    return spec_from_details({k.removeprefix("fetalstudio."): v for k, v in metadata.items() if k.startswith("fetalstudio.")})
