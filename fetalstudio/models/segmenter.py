"""The segmenter architecture as the model manager rebuilds it: segment-anything's ``Sam`` with a
small image encoder, read from a FetalStudio ``.safetensors`` or a SAM-layout ``.pth``.

The model is segment-anything's own ``Sam`` (``PromptEncoder`` + ``MaskDecoder`` with a
``TwoWayTransformer``), so one predictor serves it and real SAM. Only the image encoder is small:
``{"type": "timm", "name": ...}`` (a timm CNN's stride-16 stage plus a SAM-style neck) or
``{"type": "vit", ...}`` (segment-anything's ``ImageEncoderViT``, also how SAM checkpoints are
described). The configs, the writer (``save_segmenter``) and the measurements behind the default
encoder are in ``fetalstudio.segmentation.model``; this module holds what loading needs, as
``loaders.load_timm_classifier`` holds what loading a classifier needs.
"""

from __future__ import annotations

import json
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetalstudio.errors import ModelLoadError

KIND = "segmenter"
SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]

#: The ViT encoder's defaults (PROBES model A: 256 px, 256 wide, 6 blocks, global attention).
VIT_DEFAULTS: dict[str, Any] = {
    "type": "vit", "embed_dim": 256, "depth": 6, "num_heads": 8, "patch_size": 16, "mlp_ratio": 4.0,
    "window_size": 0, "global_attn_indexes": [], "use_rel_pos": True, "qkv_bias": True,
}


class TimmImageEncoder(nn.Module):
    """A timm CNN's stride-16 features as a SAM image embedding (``out_chans`` x img/16 x img/16)."""

    def __init__(self, name: str, img_size: int, out_chans: int) -> None:
        super().__init__()
        import timm
        from segment_anything.modeling.common import LayerNorm2d

        self.img_size = img_size
        try:
            backbone = timm.create_model(name, pretrained=False, features_only=True)
        except (RuntimeError, ValueError) as error:
            raise ModelLoadError(f"timm has no model {name!r} with feature outputs ({error}).") from error
        reductions = backbone.feature_info.reduction()
        if 16 not in reductions:
            raise ModelLoadError(f"timm model {name!r} has no stride-16 feature map (strides {reductions}).")
        index = reductions.index(16)
        self.backbone = timm.create_model(name, pretrained=False, features_only=True, out_indices=(index,))
        channels = self.backbone.feature_info.channels()[-1]
        self.neck = nn.Sequential(
            nn.Conv2d(channels, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x)[-1])


def _vit_encoder(encoder: dict, img_size: int, out_chans: int) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    settings = {**VIT_DEFAULTS, **encoder}
    return ImageEncoderViT(
        img_size=img_size, patch_size=int(settings["patch_size"]), embed_dim=int(settings["embed_dim"]),
        depth=int(settings["depth"]), num_heads=int(settings["num_heads"]), mlp_ratio=float(settings["mlp_ratio"]),
        out_chans=out_chans, qkv_bias=bool(settings["qkv_bias"]), norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=bool(settings["use_rel_pos"]), window_size=int(settings["window_size"]),
        global_attn_indexes=tuple(int(i) for i in settings["global_attn_indexes"]),
    )


def build_segmenter(config: dict[str, Any]):
    """A randomly initialised ``segment_anything.modeling.Sam`` described by ``config``."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    size, dim = int(config["image_size"]), int(config["embed_dim"])
    encoder = config["encoder"]
    if encoder.get("type") == "timm":
        image_encoder = TimmImageEncoder(encoder["name"], size, dim)
    elif encoder.get("type") == "vit":
        image_encoder = _vit_encoder(encoder, size, dim)
    else:
        raise ModelLoadError(f"Unknown segmenter image encoder {encoder!r}: expected type 'timm' or 'vit'.")
    patch = 16
    decoder = config["decoder"]
    model = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(size // patch, size // patch), input_image_size=(size, size),
            mask_in_chans=int(config.get("mask_in_chans", 16)),
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=int(decoder["num_multimask_outputs"]),
            transformer=TwoWayTransformer(
                depth=int(decoder["depth"]), embedding_dim=dim, mlp_dim=int(decoder["mlp_dim"]), num_heads=int(decoder["num_heads"]),
            ),
            transformer_dim=dim, iou_head_depth=int(decoder["iou_head_depth"]), iou_head_hidden_dim=int(decoder["iou_head_hidden_dim"]),
        ),
        pixel_mean=list(config.get("pixel_mean", SAM_PIXEL_MEAN)),
        pixel_std=list(config.get("pixel_std", SAM_PIXEL_STD)),
    )
    model.fetalstudio_config = deepcopy(config)
    return model


def sam_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config of a SAM-layout model (ViT encoder) read from its tensor shapes.

    Decoder attention heads cannot be read from shapes; SAM's 8 are assumed.
    """
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]
        embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
        grid = int(state["image_encoder.pos_embed"].shape[1]) if "image_encoder.pos_embed" in state else None
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
        rel = "image_encoder.blocks.{}.attn.rel_pos_h"
        use_rel_pos = rel.format(0) in state
        num_heads = embed_dim // int(state[rel.format(0)].shape[1]) if use_rel_pos else max(1, embed_dim // 64)
        if grid is None:
            raise KeyError("image_encoder.pos_embed")
        window_size, global_indexes = 0, []
        if use_rel_pos:
            for i in range(depth):
                span = (int(state[rel.format(i)].shape[0]) + 1) // 2
                if span == grid:
                    global_indexes.append(i)
                else:
                    window_size = span
        mlp_ratio = int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]) / embed_dim
        out_chans = int(state["image_encoder.neck.0.weight"].shape[0])
        decoder_depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers."))
        iou_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.iou_prediction_head.layers."))
        config = {
            "image_size": grid * patch_size,
            "embed_dim": out_chans,
            "encoder": {
                "type": "vit", "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "patch_size": patch_size,
                "mlp_ratio": mlp_ratio, "window_size": window_size, "global_attn_indexes": global_indexes,
                "use_rel_pos": use_rel_pos, "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state,
            },
            "decoder": {
                "depth": decoder_depth,
                "mlp_dim": int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
                "num_heads": 8,
                "num_multimask_outputs": int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
                "iou_head_depth": iou_layers,
                "iou_head_hidden_dim": int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
            },
            "mask_in_chans": 4 * int(state["prompt_encoder.mask_downscaling.0.weight"].shape[0]),
            "pixel_mean": SAM_PIXEL_MEAN,
            "pixel_std": SAM_PIXEL_STD,
        }
    except (KeyError, ValueError, IndexError) as error:
        raise ModelLoadError(
            f"Not a SAM-layout checkpoint: a tensor is missing or has an unexpected shape ({type(error).__name__}: {error}). "
            "Give an official SAM .pth (vit_b, vit_l, vit_h) or a checkpoint with the same key layout."
        ) from error
    return config


def load_segmenter_file(path: Path):
    """A segmenter from a FetalStudio ``.safetensors`` or a SAM-layout ``.pth`` (float32, eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist or is not a file. Give a segmenter .safetensors or a SAM .pth.")
    if path.suffix.lower() != ".safetensors":
        return load_sam_checkpoint(path)
    from safetensors.torch import load_file

    from fetalstudio.models.inspect import read_safetensors_header

    _, metadata = read_safetensors_header(path)
    if metadata.get("fetalstudio.kind") != KIND:
        raise ModelLoadError(
            f"{path.name} is not a FetalStudio segmenter (its metadata has no fetalstudio.kind = \"segmenter\"). "
            "Train one with `python -m fetalstudio train segmenter`, or give a SAM .pth file."
        )
    try:
        config = json.loads(metadata["fetalstudio.config"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path.name}: the fetalstudio.config metadata is missing or not JSON ({error}); re-save the model.") from error
    model = build_segmenter(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    _load_strict(model, state, path)
    # FetalStudio trains the single-mask output only (decode_batch); SAM's three extra outputs are untrained here.
    model.fetalstudio_multimask = False
    return model.float().eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_lines = "; ".join(str(error).splitlines()[:3])
        raise ModelLoadError(f"{path.name} does not fit the architecture in its own metadata ({first_lines}). The file is damaged: train or copy it again.") from error


def load_sam_checkpoint(path: Path):
    """A SAM-layout checkpoint as a ``Sam`` (float32, eval mode).

    Official vit_b/vit_l/vit_h files go through FetalStudio's ``load_sam`` loader; any other
    size (e.g. a small ViT saved in SAM's key layout) is rebuilt from its tensor shapes.
    """
    from fetalstudio.models.entries import ModelEntry, ModelKind
    from fetalstudio.models.inspect import inspect_path, load_pickled_state_dict
    from fetalstudio.models.loaders import load_sam

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist. Give the path of a SAM checkpoint (e.g. sam_vit_b_01ec64.pth).")
    inspection = inspect_path(path)
    if inspection is None or inspection.kind is not ModelKind.SAM:
        raise ModelLoadError(
            f"{path.name} is not a Segment Anything checkpoint (no image_encoder.patch_embed / mask_decoder tensors). "
            "Give an official SAM .pth (vit_b, vit_l or vit_h) or a checkpoint with the same key layout."
        )
    if inspection.details.get("variant") in ("vit_b", "vit_l", "vit_h"):
        entry = ModelEntry(id=path.stem, kind=inspection.kind, format=inspection.format, path=path, details=inspection.details)
        model = load_sam(entry, path, torch.float32)
        model.fetalstudio_config = sam_config_from_state_dict(model.state_dict())
        return model.eval()
    state = load_pickled_state_dict(path)
    config = sam_config_from_state_dict(state)
    model = build_segmenter(config)
    _load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, path)
    return model.float().eval()
