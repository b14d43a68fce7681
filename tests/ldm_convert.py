"""Test helper: turn a diffusers Stable Diffusion 1.x pipeline into an original LDM single-file state dict.

This is the inverse of what ``from_single_file`` does, following the key layout of the original
CompVis code (the same layout diffusers' public ``scripts/convert_diffusers_to_original_stable_diffusion.py``
writes), but generalised to any ``layers_per_block`` / number of blocks so that tiny test models
can be exported too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Inside a ResNet block: diffusers name -> LDM name.
_UNET_RESNET_PARTS = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET_PARTS = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION_PARTS = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _rename(key: str, block_map: list[tuple[str, str, dict[str, str]]]) -> str | None:
    """Map ``key`` with the first matching (diffusers prefix, ldm prefix, inner renames) entry."""
    for d_prefix, l_prefix, inner in block_map:
        if key.startswith(d_prefix):
            rest = key[len(d_prefix) :]
            for d_part, l_part in inner.items():
                if rest.startswith(d_part):
                    rest = l_part + rest[len(d_part) :]
                    break
            return l_prefix + rest
    return None


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    lpb = config["layers_per_block"]
    n_blocks = len(config["block_out_channels"])
    stride = lpb + 1  # LDM input/output blocks per resolution level
    res = _UNET_RESNET_PARTS
    block_map: list[tuple[str, str, dict[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", res),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", res),
    ]
    for i in range(n_blocks):
        for j in range(lpb):
            block_map.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{stride * i + j + 1}.0.", res))
            block_map.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{stride * i + j + 1}.1.", {}))
        if i < n_blocks - 1:
            block_map.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{stride * (i + 1)}.0.op.", {}))
        for j in range(lpb + 1):
            block_map.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{stride * i + j}.0.", res))
            block_map.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{stride * i + j}.1.", {}))
        if i < n_blocks - 1:
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            block_map.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{stride * i + lpb}.{slot}.", {}))

    out = {}
    for key, value in state_dict.items():
        new = _rename(key, block_map)
        if new is None:
            raise KeyError(f"no LDM name for UNet key {key!r}")
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    n_blocks = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    block_map: list[tuple[str, str, dict[str, str]]] = []
    for part in ("encoder", "decoder"):
        block_map += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET_PARTS),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET_PARTS),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION_PARTS),
        ]
    for i in range(n_blocks):
        for j in range(lpb):
            block_map.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET_PARTS))
        block_map.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        ldm_i = n_blocks - 1 - i  # LDM numbers decoder levels from the lowest resolution up
        for j in range(lpb + 1):
            block_map.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm_i}.block.{j}.", _VAE_RESNET_PARTS))
        block_map.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{ldm_i}.upsample.conv.", {}))
    block_map += [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]

    out = {}
    for key, value in state_dict.items():
        new = _rename(key, block_map)
        if new is None:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, 1, 1)  # LDM uses 1x1 convolutions for the VAE attention
        out[VAE_PREFIX + new] = value
    return out


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor], max_positions: int = 77) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        full = key if key.startswith("text_model.") else "text_model." + key
        out[CLIP_PREFIX + full] = value
    # Real SD 1.x files carry this (now non-persistent) buffer; keep it so the test files look real.
    out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(max_positions).unsqueeze(0)
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """Whole pipeline -> one LDM state dict, plus the non-model tensors real SD 1.x files carry."""
    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    sd.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), pipe.text_encoder.config.max_position_embeddings))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    sd["betas"] = betas.float()
    sd["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}
