"""peft / diffusers LoRA state dicts -> kohya's LoRA file format (SD 1.x).

kohya's sd-scripts (and A1111, ComfyUI, InvokeAI, FU-LoRA's released files) name a LoRA module
after the diffusers module path with dots turned into underscores:

* U-Net ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` + ``.lora_A.weight`` ->
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` + ``.lora_down.weight``;
  ``.lora_B.weight`` -> ``.lora_up.weight``; LoraConfig.lora_alpha -> ``.alpha`` (a scalar per module);
* text encoder ``(text_model.)encoder.layers.0.self_attn.q_proj`` ->
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.

transformers 5 dropped the ``text_model.`` level of CLIPTextModel's module names; the kohya names
keep it (as every SD 1.x tool expects), and diffusers maps them back when loading.

The update is ``W0 x + (alpha / rank) * up(down(x))`` in both formats, so the weights are copied
unchanged. (diffusers' own ``convert_state_dict_to_kohya`` writes SDXL's ``lora_te1_`` prefix and
alpha = rank whatever the training alpha was, so it is not used here.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[A-Za-z0-9_]+)?\.weight$")
_DIFFUSERS_KEY = re.compile(r"^(?P<module>.+)\.lora(?:_linear_layer)?\.(?P<part>down|up)\.weight$")


def _split_key(key: str) -> tuple[str, str]:
    """(module path, "down"|"up") for a peft (lora_A/lora_B) or older diffusers (lora.down/up) key."""
    match = _PEFT_KEY.match(key)
    if match:
        return match["module"], "down" if match["part"] == "A" else "up"
    match = _DIFFUSERS_KEY.match(key)
    if match:
        return match["module"], match["part"]
    raise ValueError(f"{key!r} is not a LoRA weight key (expected ...lora_A.weight / ...lora_B.weight).")


def kohya_module_name(module_path: str, prefix: str) -> str:
    if prefix == TEXT_ENCODER_PREFIX and not module_path.startswith("text_model."):
        # transformers 5 flattens CLIPTextModel (no .text_model); SD tools expect the original CLIP names
        module_path = "text_model." + module_path
    return prefix + module_path.replace(".", "_")


def peft_to_kohya(
    unet_state: dict[str, torch.Tensor] | None,
    text_encoder_state: dict[str, torch.Tensor] | None = None,
    alpha: float | None = None,
    text_encoder_alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """kohya tensors from peft state dicts of the U-Net and (optionally) the text encoder.

    ``alpha`` defaults to the rank (scale 1), as peft's LoraConfig does when lora_alpha == r.
    """
    out: dict[str, torch.Tensor] = {}
    for state, prefix, module_alpha in (
        (unet_state or {}, UNET_PREFIX, alpha),
        (text_encoder_state or {}, TEXT_ENCODER_PREFIX, text_encoder_alpha if text_encoder_alpha is not None else alpha),
    ):
        for key, tensor in state.items():
            module, part = _split_key(key)
            name = kohya_module_name(module, prefix)
            out[f"{name}.lora_{part}.weight"] = tensor.detach().to("cpu").contiguous()
            if part == "down":
                rank = tensor.shape[0]
                out[f"{name}.alpha"] = torch.tensor(float(module_alpha if module_alpha is not None else rank))
    _check_pairs(out)
    return out


def diffusers_to_kohya(state: dict[str, torch.Tensor], alpha: float | None = None, text_encoder_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """kohya tensors from a diffusers LoRA file's state dict (keys prefixed ``unet.`` / ``text_encoder.``)."""
    unet, text_encoder = {}, {}
    for key, tensor in state.items():
        if key.startswith("unet."):
            unet[key.removeprefix("unet.")] = tensor
        elif key.startswith("text_encoder."):
            text_encoder[key.removeprefix("text_encoder.")] = tensor
        else:
            raise ValueError(f"{key!r}: expected keys starting with 'unet.' or 'text_encoder.' (a diffusers SD 1.x LoRA).")
    return peft_to_kohya(unet, text_encoder, alpha, text_encoder_alpha)


def _check_pairs(state: dict[str, torch.Tensor]) -> None:
    modules = {k.rsplit(".", 2)[0] for k in state}
    for module in modules:
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            if f"{module}.{suffix}" not in state:
                raise ValueError(f"LoRA module {module} lacks {suffix}: the state dict is incomplete.")


def kohya_metadata(rank: int, alpha: float, *, text_encoder: bool, resolution: int, extra: dict | None = None) -> dict[str, str]:
    """safetensors metadata in kohya's ``ss_*`` convention (read by A1111/ComfyUI for display) plus our own."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_resolution": json.dumps([resolution, resolution]),
        "ss_network_train_unet_only": str(not text_encoder),
        "ss_training_comment": "trained with FetalStudio (python -m fetalstudio train lora)",
    }
    for key, value in (extra or {}).items():
        metadata[f"fetalstudio.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def save_kohya(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=metadata or {})
    temporary.replace(path)
    return path


def convert_diffusers_file(source: Path, target: Path, alpha: float | None = None) -> Path:
    """A diffusers ``pytorch_lora_weights.safetensors`` (file or folder) -> a kohya file.

    The alpha comes from the file's ``lora_adapter_metadata`` (written by diffusers when saved with
    adapter metadata) unless given.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = Path(source)
    if source.is_dir():
        source = source / "pytorch_lora_weights.safetensors"
    text_encoder_alpha = None
    if alpha is None:
        with safe_open(str(source), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            packed = json.loads(raw)
            alpha = packed.get("unet.lora_alpha")
            text_encoder_alpha = packed.get("text_encoder.lora_alpha")
    state = load_file(str(source))
    kohya = diffusers_to_kohya(state, alpha, text_encoder_alpha)
    rank = next(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight"))
    metadata = kohya_metadata(rank, float(alpha if alpha is not None else rank), text_encoder=any(k.startswith(TEXT_ENCODER_PREFIX) for k in kohya), resolution=512)
    return save_kohya(Path(target), kohya, metadata)
