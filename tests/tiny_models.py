"""Tiny Stable-Diffusion-architecture pipelines with random weights, built from config.

Used by the tests and by bench/synthesis.py (``--model tiny`` imports this file from tests/): the
same classes as SD 1.5 (UNet2DConditionModel, AutoencoderKL with 8x downsampling, CLIPTextModel,
CLIPTokenizer), small enough to run in a fraction of a second on a CPU, saved as a normal diffusers
folder and loaded back through the model manager. Test-only: the library never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_byte_level_clip_tokenizer(folder: Path) -> None:
    """A CLIPTokenizer with no merges: every byte is a token. 514 ids, no download needed."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP's reversible byte -> character map

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny_sd_pipeline(seed: int = 0, sample_size: int = 8, tokenizer=None, scheduler=None):
    """A random-weight SD-architecture pipeline; ``sample_size`` latents -> 8x pixels.

    By default it gets a byte-level CLIP tokenizer (no download) and an Euler scheduler; pass the
    real SD 1.5 tokenizer/scheduler to mimic a full checkpoint's layout.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    import tempfile

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    )
    if tokenizer is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_byte_level_clip_tokenizer(Path(tmp))
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd_pipeline(folder: Path, seed: int = 0) -> Path:
    build_tiny_sd_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_random_kohya_lora(pipeline, path: Path, rank: int = 4, alpha: float = 4.0, seed: int = 0, scale: float = 0.5) -> Path:
    """A LoRA in kohya's file format for the pipeline's U-Net attention projections.

    Keys look like FU-LoRA's released files: ``lora_unet_<module path with _>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha``. Random (non-zero) up weights so that the LoRA visibly
    changes the output.
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in pipeline.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in {"to_q", "to_k", "to_v"} or name.endswith("to_out.0"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * scale
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return path


def save_tiny_controlnet(pipeline_folder: Path, folder: Path, seed: int = 0) -> Path:
    """A ControlNet for the tiny pipeline (``ControlNetModel.from_unet``), saved as a diffusers folder.

    Its conditioning embedding downsamples 8x (four channel counts: three stride-2 steps) like SD's,
    so the condition image meets the latent grid. The embedding and the zero convolutions get random
    weights (std 0.2 and 0.1, measured so the condition changes the residuals about as much as they
    are large): a fresh ControlNet adds exactly nothing, and an untrained embedding barely sees its input.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(pipeline_folder / "unet"))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(seed)
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
        for conv in (embedding.conv_in, *embedding.blocks, embedding.conv_out):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    return folder
