"""A small segment-anything model: its configs, its checkpoint format, and SAM ``.pth`` files.

The model is segment-anything's own ``Sam`` (``PromptEncoder`` + ``MaskDecoder`` with a
``TwoWayTransformer``), so one predictor serves it and real SAM. Only the image encoder is small:

- ``{"type": "timm", "name": "regnetx_002"}`` (the default): the stride-16 stage of a timm CNN
  (random init) plus a SAM-style neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d). Measured
  on the shared 2-core CPU (1 torch thread, 16 images of 256 px, encoder forward + backward):
  regnetx_002 (RegNetX-200MF) 0.8 s, a 128-wide 4-block ViT 0.9 s, resnet10t 3.0 s, resnet18
  3.6 s; the mask decoder adds little. PROBES found ResNet-18 features and a ViT equally good
  (Dice 0.98 at 256 px), and a pilot run with regnetx_002 reached a jittered-box Dice of 0.95
  after 200 steps of batch 16, so the cheapest encoder is the default (any timm CNN with a
  stride-16 feature map can be named instead, e.g. resnet18).
- ``{"type": "vit", ...}``: segment-anything's ``ImageEncoderViT`` with the given sizes; this is
  also how SAM checkpoints are described (official vit_b/l/h or any smaller one).

Building a model from a config (``build_segmenter``) and reading checkpoints back
(``load_segmenter_file``, ``load_sam_checkpoint``) live in ``fetalstudio.models.segmenter``, below
this package, because the model manager loads segmenters.

Checkpoint format (``save_segmenter``): one ``.safetensors`` whose metadata holds
``fetalstudio.kind = "segmenter"`` and ``fetalstudio.config`` = the JSON config below; the
model manager reads the metadata into ``entry.details`` (``config``, ``image_size``, ...).
Floating-point weights are stored as float16 by default (half the size; the loader returns
float32).
"""

from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetalstudio.models.segmenter import KIND, SAM_PIXEL_MEAN, SAM_PIXEL_STD, VIT_DEFAULTS, sam_config_from_state_dict

FORMAT_VERSION = "1"

#: The default small model (what ``train segmenter`` builds without ``--sam-checkpoint``).
DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 256,
    "embed_dim": 128,  # prompt/decoder width = image-embedding channels
    "encoder": {"type": "timm", "name": "regnetx_002"},
    "decoder": {"depth": 2, "mlp_dim": 512, "num_heads": 8, "num_multimask_outputs": 3, "iou_head_depth": 3, "iou_head_hidden_dim": 128},
    "mask_in_chans": 16,
    "pixel_mean": SAM_PIXEL_MEAN,
    "pixel_std": SAM_PIXEL_STD,
}

def small_config(image_size: int = 256, encoder: str = "regnetx_002", embed_dim: int = 128) -> dict[str, Any]:
    """A small-model config: ``encoder`` is a timm model name (stride-16 features) or "vit"."""
    if image_size % 16 or image_size < 32:
        raise ValueError(f"image size must be a multiple of 16 and at least 32, not {image_size}")
    config = deepcopy(DEFAULT_CONFIG)
    config["image_size"] = int(image_size)
    config["embed_dim"] = int(embed_dim)
    config["encoder"] = dict(VIT_DEFAULTS) if encoder == "vit" else {"type": "timm", "name": encoder}
    config["decoder"]["mlp_dim"] = 2048 if embed_dim >= 256 else 4 * embed_dim
    config["decoder"]["iou_head_hidden_dim"] = 256 if embed_dim >= 256 else embed_dim
    return config


def model_config(model) -> dict[str, Any]:
    """The config a model was built from (set by every builder/loader in this module)."""
    config = getattr(model, "fetalstudio_config", None)
    if config is None:
        config = sam_config_from_state_dict(model.state_dict())
        model.fetalstudio_config = config
    return deepcopy(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- checkpoint files ---------------------------------------------------------------------


def save_segmenter(
    model, path: Path, config: dict[str, Any] | None = None, extra_metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``model`` as a FetalStudio segmenter ``.safetensors`` (atomically) and return the path.

    ``extra_metadata`` values are stored as strings under ``fetalstudio.<key>`` (dicts/lists as
    JSON); the model manager shows them in ``entry.details``.
    """
    from safetensors.torch import save_file

    config = deepcopy(config) if config is not None else model_config(model)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    metadata = {
        "fetalstudio.kind": KIND,
        "fetalstudio.format_version": FORMAT_VERSION,
        "fetalstudio.config": json.dumps(config, sort_keys=True),
        "fetalstudio.image_size": str(config["image_size"]),
        "fetalstudio.architecture": describe_architecture(config),
    }
    for key, value in (extra_metadata or {}).items():
        name = key if key.startswith("fetalstudio.") else f"fetalstudio.{key}"
        metadata[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=metadata)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
    return path


def describe_architecture(config: dict[str, Any]) -> str:
    encoder = config["encoder"]
    name = encoder.get("name") if encoder.get("type") == "timm" else f"vit{encoder.get('embed_dim')}x{encoder.get('depth')}"
    return f"segment-anything Sam, {name} image encoder, {config['image_size']} px, decoder width {config['embed_dim']}"


# --- SAM checkpoints (.pth) ---------------------------------------------------------------


def save_sam_pth(model, path: Path) -> Path:
    """Save a ``Sam`` in SAM's own ``.pth`` key layout (a plain state dict), e.g. for tests."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, str(path))
    return path


# --- training-time forward pass -------------------------------------------------------------


def decode_batch(model, image_embeddings: torch.Tensor, boxes: torch.Tensor, points=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits (B x 1 x 4h x 4w) and IoU predictions (B x 1), one prompt per image.

    ``MaskDecoder.forward`` pairs every prompt with every image (for many prompts on one image);
    this runs its exact computation pairing image i with prompt i, so a batch costs one pass.
    ``boxes`` are B x 4 in the model's input frame (``image_size`` px).
    """
    decoder = model.mask_decoder
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = image_embeddings + dense
    pos_src = model.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])
    b, c, h, w = upscaled.shape
    masks = (hyper.unsqueeze(1) @ upscaled.view(b, c, h * w)).view(b, 1, h, w)
    iou = decoder.iou_prediction_head(hs[:, 0, :])[:, :1]
    return masks, iou
