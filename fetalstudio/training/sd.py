"""Train a compact Stable-Diffusion-architecture pipeline from scratch.

Stages (``--stage``, default ``all`` = the three in order):

  tokenizer  a CLIP BPE tokenizer trained on the app's prompt vocabulary and the data's captions
             (tokenizers library), a small randomly initialised CLIPTextModel, SD's scheduler config
  vae        an AutoencoderKL (3 channels, 4 latent channels, 8x downsampling): L1 + frequency L1 +
             tiny KL, and a patch discriminator in the second half against over-smoothed speckle
  unet       a UNet2DConditionModel on the frozen text encoder's hidden states: epsilon prediction,
             10% caption dropout (classifier-free guidance), class-balanced batches, EMA weights

Output: OUT is a normal diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) that StableDiffusionPipeline.from_pretrained and FetalStudio's model manager load,
plus model_card.md, metrics.json, train_log.csv and samples/. Resumable state lives in
OUT/stages/<stage>/state; running the same command again continues where it stopped.

Data (--data, repeatable): spanish_planes (labels.csv -> "a photo of fetal <plane>"),
hc18_heads/pairs.csv and es_heads/pairs.csv (-> "An ultrasound image of a fetal head, <trimester>
trimester"; trimester from the table, else from HC: first < 90 mm <= second < 258 mm <= third;
es_heads have neither and get --unknown-trimester, default second). African images are refused.

Example (the bundled generator; GPU recommended):
  python -m fetalstudio train sd --data ../shared/data/spanish_planes \\
      --data ../shared/data/hc18_heads/pairs.csv --data ../shared/data/es_heads/pairs.csv \\
      --resolution 256 --out checkpoints/fetal-ldm-256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

from fetalstudio.cli_args import Command
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.captions import DEFAULT_UNKNOWN_TRIMESTER, FIRST_SECOND_HC_MM, SECOND_THIRD_HC_MM, UNKNOWN_TRIMESTER_CHOICES
from fetalstudio.training.common import add_common_arguments
from fetalstudio.training.image_datasets import CROP_CHOICES

STAGES = ("tokenizer", "vae", "unet")
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128,256 (got {text!r})") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers (got {text!r})")
    return values


def _flag_list(text: str) -> tuple[bool, ...]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("0", "1") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated 0/1 flags such as 0,1,1,0 (got {text!r})")
    return tuple(v == "1" for v in values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, action="append", default=[], metavar="FOLDER_OR_CSV",
                        help="training images (repeatable): spanish_planes, hc18_heads/pairs.csv, es_heads/pairs.csv, "
                             "a folder of plane sub-folders, or a CSV with a caption column")
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all", help="which stage to run (all: tokenizer, vae, unet)")
    parser.add_argument("--resolution", type=int, default=256, help="square training size in pixels (multiple of 8; >= 256 for a usable model)")
    parser.add_argument("--crop", choices=CROP_CHOICES, default="center", help="how images become square")
    parser.add_argument("--unknown-trimester", choices=UNKNOWN_TRIMESTER_CHOICES, default=DEFAULT_UNKNOWN_TRIMESTER,
                        help="caption for head images with neither trimester nor hc_mm (es_heads); skip leaves them out")
    parser.add_argument("--balance", choices=["caption", "none"], default="caption",
                        help="caption: every caption is drawn equally often (825 heads would swamp 5 x 20 planes)")

    text = parser.add_argument_group("tokenizer and text encoder")
    text.add_argument("--vocab-size", type=int, default=2048, help="largest tokenizer vocabulary (BPE stops earlier when every word is whole)")
    text.add_argument("--text-hidden", type=int, default=256, help="CLIPTextModel width = U-Net cross-attention dim")
    text.add_argument("--text-layers", type=int, default=4, help="CLIPTextModel layers")
    text.add_argument("--text-heads", type=int, default=4, help="CLIPTextModel attention heads")
    text.add_argument("--train-text-encoder", action="store_true",
                      help="train the text encoder with the U-Net (default: frozen random encoder, see model card)")

    vae = parser.add_argument_group("VAE")
    vae.add_argument("--vae-channels", type=_int_list, default=(64, 128, 256, 256), help="4 block widths (8x downsampling)")
    vae.add_argument("--vae-layers", type=int, default=2, help="resnet layers per VAE block")
    vae.add_argument("--vae-steps", type=int, help="VAE steps (default: --steps)")
    vae.add_argument("--vae-lr", type=float, default=2e-4, help="VAE learning rate")
    vae.add_argument("--vae-batch-size", type=int, help="VAE batch size (default: --batch-size)")
    vae.add_argument("--vae-kl-weight", type=float, default=1e-6, help="KL weight")
    vae.add_argument("--vae-freq-weight", type=float, default=0.1, help="weight of the L1 between Fourier magnitudes (keeps speckle)")
    vae.add_argument("--vae-disc-weight", type=float, default=0.05, help="patch-discriminator (hinge) weight; 0 disables it")
    vae.add_argument("--vae-disc-start", type=int, help="step the discriminator starts (default: half of the VAE steps)")
    vae.add_argument("--vae-crop", type=int,
                     help="train the VAE on random square crops of this size (multiple of 8) of the --resolution images: "
                          "the VAE is convolutional, so crops teach the same reconstruction at a fraction of the cost (CPU)")
    vae.add_argument("--vae-mask-injection", type=float, default=0.0, metavar="P",
                     help="probability of showing a head image that has a mask in its in-channel mask-injected form "
                          "(--vae-channel-order), so that LoRAs trained with train lora --mask-channel get a VAE that can "
                          "carry the mask channel (a VAE that saw only grey images turns the mask channel grey)")
    vae.add_argument("--vae-channel-order", default="mask,gray,gray", help="channel order of those mask-injected images")
    vae.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability for VAE training")

    unet = parser.add_argument_group("U-Net")
    unet.add_argument("--unet-channels", type=_int_list, default=(128, 256, 256), help="block widths (all but the last with cross-attention)")
    unet.add_argument("--unet-layers", type=int, default=2, help="resnet layers per U-Net block")
    unet.add_argument("--unet-attention", type=_flag_list,
                      help="which U-Net blocks have cross-attention, one 0/1 per width, e.g. 0,1,1,0 (default: all but the last). "
                           "Attention at the full latent size dominates the cost on a CPU")
    unet.add_argument("--attention-head-dim", type=int, default=8, help="channels per attention head")
    unet.add_argument("--init-unet", type=Path, metavar="FOLDER",
                      help="start the U-Net from these weights (a diffusers unet/ folder, e.g. OUT/unet of an earlier run) instead "
                           "of random ones: continue a finished model with other settings such as --train-text-encoder; "
                           "use with --no-resume when OUT already has U-Net state")
    unet.add_argument("--caption-dropout", type=float, default=0.1, help="probability of training on the empty caption (for guidance)")
    unet.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the U-Net weights (with warm-up)")
    unet.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0 for plain MSE")
    unet.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up (U-Net)")
    unet.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon", help="what the U-Net predicts")
    unet.add_argument("--samples", type=int, default=1, help="sample images per caption written to OUT/samples at the end")
    unet.add_argument("--sample-steps", type=int, default=20, help="denoising steps of those samples")
    add_common_arguments(parser, steps=2000, batch_size=16, lr=1e-4)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a shared machine)")


# --- shared helpers (also used by train lora) ----------------------------------------------------

def step_generator(seed: int, tag: str, step: int, process: int = 0):
    """A CPU generator that depends only on (seed, stage, step, process): resumed runs draw the same."""
    import torch

    digest = hashlib.sha256(f"{seed}/{tag}/{step}/{process}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _norm_groups(channels) -> int:
    groups = math.gcd(*channels) if len(channels) > 1 else channels[0]
    return max(g for g in (32, 16, 8, 4, 2, 1) if groups % g == 0)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device):
    """The text encoder's last hidden states, exactly as StableDiffusionPipeline.encode_prompt computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def file_digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


def cached_latents(cache_dir: Path, key_parts: dict, items, vae, resolution: int, crop: str, device, mask_channel=None, batch_size: int = 8):
    """(mean, std) of the VAE posterior for every item, cached on disk by content key."""
    from fetalstudio.training.image_datasets import load_all_pixels

    key = hashlib.sha256(json.dumps({**key_parts, "images": [str(i.image) for i in items], "resolution": resolution,
                                     "crop": crop, "mask_channel": mask_channel}, sort_keys=True).encode()).hexdigest()[:16]
    return cached_posterior(cache_dir / f"latents-{key}.cache", lambda: load_all_pixels(items, resolution, crop, mask_channel),
                            vae, device, batch_size)


def cached_posterior(path: Path, load_pixels, vae, device, batch_size: int = 8):
    """(mean, std) of the VAE posterior of ``load_pixels()`` (uint8 N x 3 x R x R), kept in ``path``
    (torch.save format; name it *.cache, not *.pt, so model discovery skips it); read back when it exists."""
    import torch

    from fetalstudio.training.image_datasets import to_model_range

    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return cached["mean"], cached["std"]
    pixels = load_pixels()
    means, stds = [], []
    vae.eval()
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            batch = to_model_range(pixels[start:start + batch_size]).to(device, dtype=vae.dtype)
            dist = vae.encode(batch).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"mean": mean, "std": std}, temporary)
    temporary.replace(path)
    return mean, std


def diffusion_loss(unet, noise_scheduler, latents, hidden_states, generator, snr_gamma: float = 0.0):
    """Noise the latents at random timesteps and return the (Min-SNR weighted) MSE of the prediction."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, encoder_hidden_states=hidden_states).sample
    if not snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def resume(state, no_resume: bool) -> int:
    """The step to continue from (0 after --no-resume); a clear error when the saved state does not fit."""
    import shutil

    if no_resume and state.folder.exists():
        shutil.rmtree(state.folder)
    try:
        return state.load()
    except FetalStudioError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError) as error:
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise FetalStudioError(
            f"The saved training state in {state.folder} does not fit these settings ({detail}). Run with the settings it was "
            "started with, or add --no-resume to start over."
        ) from error


def update_metrics(out: Path, stage: str, values: dict, **top) -> dict:
    from fetalstudio.training.common import write_json

    path = out / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    metrics.setdefault("stages", {})[stage] = values
    metrics.update(top)
    write_json(path, metrics)
    return metrics


def _versions() -> dict:
    import accelerate
    import diffusers
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "accelerate": accelerate.__version__}


# --- the command ---------------------------------------------------------------------------------

def _validate(args) -> None:
    if args.resolution % 8 or args.resolution < 32:
        raise FetalStudioError(f"--resolution must be a multiple of 8 and at least 32 (got {args.resolution}).")
    if len(args.vae_channels) != 4:
        raise FetalStudioError("--vae-channels needs exactly 4 widths (3 downsamplings = SD's 8x latent scale), e.g. 64,128,256,256.")
    if len(args.unet_channels) < 2:
        raise FetalStudioError("--unet-channels needs at least 2 widths, e.g. 128,256,256.")
    latent = args.resolution // 8
    if latent % (2 ** (len(args.unet_channels) - 1)):
        raise FetalStudioError(f"The latent size {latent} (resolution/8) must be divisible by 2^{len(args.unet_channels) - 1} for {len(args.unet_channels)} U-Net blocks.")
    if args.text_hidden % args.text_heads:
        raise FetalStudioError("--text-hidden must be divisible by --text-heads.")
    if any(c % args.attention_head_dim for c in args.unet_channels):
        raise FetalStudioError("Every --unet-channels width must be divisible by --attention-head-dim.")
    attention = getattr(args, "unet_attention", None)
    if attention is not None and len(attention) != len(args.unet_channels):
        raise FetalStudioError(f"--unet-attention needs one 0/1 flag per --unet-channels width ({len(args.unet_channels)}), got {len(attention)}.")
    if attention is not None and not any(attention):
        raise FetalStudioError("--unet-attention must keep cross-attention in at least one block, or the captions cannot steer the U-Net.")
    crop = getattr(args, "vae_crop", None)
    if crop is not None and (crop % 8 or crop < 32 or crop > args.resolution):
        raise FetalStudioError(f"--vae-crop must be a multiple of 8 between 32 and --resolution ({args.resolution}); got {crop}.")
    if not 0 <= getattr(args, "vae_mask_injection", 0.0) <= 1:
        raise FetalStudioError("--vae-mask-injection is a probability in [0, 1].")
    if not 0 <= args.caption_dropout < 1:
        raise FetalStudioError("--caption-dropout must be in [0, 1).")


def quiet_libraries(threads: int | None = None) -> None:
    """No download/progress bars from diffusers/transformers (the training log is the progress); CPU threads."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    _validate(args)
    quiet_libraries(args.threads)
    stages = STAGES if args.stage == "all" else (args.stage,)
    args.out.mkdir(parents=True, exist_ok=True)
    items = None
    if args.data or any(s != "tokenizer" for s in stages):
        from fetalstudio.training.image_datasets import collect_items

        items = collect_items(args.data, unknown_trimester=args.unknown_trimester)
    for stage in stages:
        {"tokenizer": run_tokenizer_stage, "vae": run_vae_stage, "unet": run_unet_stage}[stage](args, items)
    write_model_card(args.out)
    return 0


def _stage_dir(args, stage: str) -> Path:
    return args.out / "stages" / stage


def run_tokenizer_stage(args, items) -> None:
    import torch
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fetalstudio.training.captions import app_captions, train_clip_tokenizer, words_not_whole
    from fetalstudio.training.common import seed_everything

    out = args.out
    if (out / "tokenizer" / "vocab.json").is_file() and (out / "text_encoder").is_dir() and not args.no_resume:
        print(f"tokenizer and text encoder exist in {out}: kept (--no-resume rebuilds them)", flush=True)
        return
    started = time.perf_counter()
    data_captions = sorted({i.caption for i in items}) if items else []
    train_clip_tokenizer(out / "tokenizer", data_captions, max_vocab_size=args.vocab_size)
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    split = words_not_whole(tokenizer, app_captions() + data_captions)
    seed_everything(args.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_hidden, intermediate_size=4 * args.text_hidden,
        num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads, max_position_embeddings=77,
        projection_dim=args.text_hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                  prediction_type=args.prediction_type).save_pretrained(str(out / "scheduler"))
    with torch.no_grad():
        states = encode_prompts(tokenizer, text_encoder, app_captions(), "cpu").flatten(1)
    distances = torch.cdist(states, states)
    off_diagonal = distances[~torch.eye(len(states), dtype=torch.bool)]
    update_metrics(out, "tokenizer", {
        "vocab_size": len(tokenizer), "merges": sum(1 for _ in open(out / "tokenizer" / "merges.txt", encoding="utf-8")) - 1,
        "captions": len(set(app_captions() + data_captions)), "words_split_into_several_tokens": split,
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "text_encoder": "trained with the U-Net" if args.train_text_encoder else "frozen (random initialisation)",
        "min_distance_between_app_captions": float(off_diagonal.min()), "seconds": round(time.perf_counter() - started, 2),
    })
    print(f"tokenizer: {len(tokenizer)} tokens; text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M parameters", flush=True)


def build_vae(args):
    from diffusers import AutoencoderKL

    channels = tuple(args.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=args.vae_layers, norm_num_groups=_norm_groups(channels), sample_size=args.resolution,
    )


def build_patch_discriminator(width: int):
    """A PatchGAN discriminator (pix2pix style, 3 strided convs) sized from the VAE's first width."""
    from torch import nn

    def block(cin, cout, stride, norm=True):
        layers = [nn.Conv2d(cin, cout, 4, stride, 1)]
        if norm:
            layers.append(nn.GroupNorm(_norm_groups((cout,)), cout))
        layers.append(nn.LeakyReLU(0.2))
        return layers

    return nn.Sequential(*block(3, width, 2, norm=False), *block(width, width * 2, 2), *block(width * 2, width * 4, 1),
                         nn.Conv2d(width * 4, 1, 4, 1, 1))


def _vae_wrapper(vae):
    from torch import nn

    class VAETrainer(nn.Module):
        """Encode, sample, decode in one forward so that DDP sees every parameter used."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x, generator):
            posterior = self.vae.encode(x).latent_dist
            z = posterior.sample(generator=generator)
            return self.vae.decode(z).sample, posterior.kl().mean()

    return VAETrainer(vae)


def _frequency_l1(a, b):
    import torch

    fa = torch.fft.rfft2(a.float(), norm="ortho").abs()
    fb = torch.fft.rfft2(b.float(), norm="ortho").abs()
    return (fa - fb).abs().mean()


def _sampler(items, args):
    import numpy as np

    from fetalstudio.training.image_datasets import balanced_probabilities

    if args.balance == "caption":
        return balanced_probabilities([i.label for i in items])
    return np.full(len(items), 1.0 / len(items))


def _draw(probabilities, batch_size: int, generator):
    import torch

    return torch.multinomial(torch.as_tensor(probabilities, dtype=torch.float64), batch_size, replacement=True, generator=generator)


def run_vae_stage(args, items) -> None:
    import torch

    from fetalstudio.training.common import ResumableState, TrainingLog, device_description, make_accelerator
    from fetalstudio.training.image_datasets import load_all_pixels, to_model_range

    out, stage_dir = args.out, _stage_dir(args, "vae")
    steps = args.vae_steps if args.vae_steps is not None else args.steps
    batch_size = args.vae_batch_size or args.batch_size
    disc_start = args.vae_disc_start if args.vae_disc_start is not None else steps // 2
    accelerator = make_accelerator(args)
    vae = build_vae(args)
    model = _vae_wrapper(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.5, 0.9), weight_decay=0.0)
    use_disc = args.vae_disc_weight > 0
    prepared = [model, optimizer]
    if use_disc:
        disc = build_patch_discriminator(args.vae_channels[0])
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=args.vae_lr, betas=(0.5, 0.9), weight_decay=0.0)
        prepared += [disc, disc_optimizer]
    prepared = accelerator.prepare(*prepared)
    model, optimizer = prepared[0], prepared[1]
    if use_disc:
        disc, disc_optimizer = prepared[2], prepared[3]
    state = ResumableState(accelerator, stage_dir)
    start = resume(state, args.no_resume)
    _set_learning_rate(optimizer, args.vae_lr)
    if use_disc:
        _set_learning_rate(disc_optimizer, args.vae_lr)
    if (out / "unet").is_dir() and start < steps and accelerator.is_main_process:
        print("note: retraining the VAE invalidates the U-Net trained on its latents: run --stage unet again afterwards", flush=True)
    pixels = load_all_pixels(items, args.resolution, args.crop)
    injected, injected_row = _mask_injected_pixels(items, args)
    probabilities = _sampler(items, args)
    log = TrainingLog(out / "train_log.csv")
    if accelerator.is_main_process:
        print(f"vae: {len(items)} images at {args.resolution}px, {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
              f"steps {start}->{steps} on {device_description(accelerator)}", flush=True)
    started, window = time.perf_counter(), []
    model.train()
    for step in range(start, steps):
        generator = step_generator(args.seed, "vae", step, accelerator.process_index)
        index = _draw(probabilities, batch_size, generator)
        batch = pixels[index]
        if injected is not None:
            chosen = (injected_row[index] >= 0) & (torch.rand(len(index), generator=generator) < args.vae_mask_injection)
            batch[chosen] = injected[injected_row[index][chosen]]
        x = to_model_range(_random_crops(batch, args.vae_crop, generator) if args.vae_crop else batch)
        flip = torch.rand(len(x), generator=generator) < args.hflip
        x[flip] = x[flip].flip(-1)
        x = x.to(accelerator.device)
        with accelerator.autocast():
            recon, kl = model(x, generator)
            l1 = (recon.float() - x).abs().mean()
            frequency = _frequency_l1(recon, x)
            loss = l1 + args.vae_freq_weight * frequency + args.vae_kl_weight * kl
            adversarial = torch.zeros(())
            if use_disc and step >= disc_start:
                adversarial = -disc(recon).float().mean()
                loss = loss + args.vae_disc_weight * adversarial
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        disc_loss = torch.zeros(())
        if use_disc and step >= disc_start:
            with accelerator.autocast():
                disc_loss = torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(recon.detach())).mean()
            disc_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(disc_loss)
            disc_optimizer.step()
        window.append(float(loss.detach()))
        done = step + 1
        if accelerator.is_main_process and (done % args.log_every == 0 or done == steps):
            psnr = float(10 * torch.log10(4.0 / ((recon.detach().float().clamp(-1, 1) - x) ** 2).mean().clamp_min(1e-10)))
            log.log(done, sum(window) / len(window), args.vae_lr, stage="vae", l1=float(l1.detach()), freq=float(frequency.detach()),
                    kl=float(kl.detach()), adv=float(adversarial.detach()), disc=float(disc_loss.detach()), psnr=psnr)
            window = []
        if done % args.save_every == 0 and done < steps:
            state.save(done)
    seconds = time.perf_counter() - started
    if start < steps:
        state.save(steps)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model).vae
        evaluation = evaluate_vae(trained, pixels, accelerator.device)
        trained.register_to_config(scaling_factor=evaluation["scaling_factor"])
        trained.save_pretrained(str(out / "vae"), safe_serialization=True)
        update_metrics(out, "vae", {
            "steps": steps, "batch_size": batch_size, "lr": args.vae_lr, "resolution": args.resolution, "crop": args.vae_crop,
            "mask_injection": {"probability": args.vae_mask_injection, "channel_order": args.vae_channel_order},
            "parameters": sum(p.numel() for p in trained.parameters()), "block_out_channels": list(args.vae_channels),
            "layers_per_block": args.vae_layers, "discriminator": {"weight": args.vae_disc_weight, "start": disc_start},
            "kl_weight": args.vae_kl_weight, "frequency_weight": args.vae_freq_weight,
            "seconds_this_run": round(seconds, 1), "steps_this_run": steps - start,
            "seconds_per_step": round(seconds / max(1, steps - start), 3), "device": device_description(accelerator), **evaluation,
        }, data=_data_summary(items), versions=_versions())
        print(f"vae: PSNR {evaluation['psnr_db']:.2f} dB, neighbour difference real {evaluation['neighbour_difference_real']:.4f} "
              f"vs reconstructed {evaluation['neighbour_difference_reconstructed']:.4f}, scaling factor {evaluation['scaling_factor']:.4f}", flush=True)
    accelerator.wait_for_everyone()


def _set_learning_rate(optimizer, lr: float) -> None:
    """The learning rate asked for now, also after a resume (the saved optimizer state carries the old one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _mask_injected_pixels(items, args):
    """(mask-injected pixels of the items that have masks, row of each item in them or -1); (None, None) when off."""
    import torch

    from fetalstudio.pipelines.mask_injection import parse_channel_order
    from fetalstudio.training.image_datasets import load_all_pixels

    if not args.vae_mask_injection:
        return None, None
    with_mask = [k for k, item in enumerate(items) if item.mask is not None]
    if not with_mask:
        raise FetalStudioError("--vae-mask-injection needs image/mask pairs in --data (e.g. hc18_heads/pairs.csv); none of the images has a mask.")
    try:
        channel = parse_channel_order(args.vae_channel_order)
    except ValueError as error:
        raise FetalStudioError(str(error)) from None
    row = torch.full((len(items),), -1, dtype=torch.long)
    row[with_mask] = torch.arange(len(with_mask))
    return load_all_pixels([items[k] for k in with_mask], args.resolution, args.crop, channel), row


def _random_crops(pixels, size: int, generator):
    """One random size x size crop per image (positions from the step's generator, so resumes repeat them)."""
    import torch

    height, width = pixels.shape[-2:]
    tops = torch.randint(0, height - size + 1, (len(pixels),), generator=generator).tolist()
    lefts = torch.randint(0, width - size + 1, (len(pixels),), generator=generator).tolist()
    return torch.stack([p[:, t:t + size, l:l + size] for p, t, l in zip(pixels, tops, lefts)])


def evaluate_vae(vae, pixels, device, limit: int = 64) -> dict:
    """Reconstruction PSNR, the speckle measure of PROBES (mean neighbour-pixel difference) and the latent scale."""
    import torch

    from fetalstudio.training.image_datasets import to_model_range

    index = torch.linspace(0, len(pixels) - 1, min(limit, len(pixels))).round().long().unique()
    generator = torch.Generator("cpu").manual_seed(0)
    mse, real_diff, recon_diff, latents = [], [], [], []
    vae.eval()
    with torch.no_grad():
        for chunk in index.split(8):
            x = to_model_range(pixels[chunk]).to(device, dtype=vae.dtype)
            dist = vae.encode(x).latent_dist
            latents.append(dist.sample(generator=generator).float().cpu())
            recon = vae.decode(dist.mean).sample.float().clamp(-1, 1)
            x01, r01 = (x.float() + 1) / 2, (recon + 1) / 2
            mse.append(((x01 - r01) ** 2).mean(dim=(1, 2, 3)).cpu())
            real_diff.append((x01[..., 1:] - x01[..., :-1]).abs().mean(dim=(1, 2, 3)).cpu())
            recon_diff.append((r01[..., 1:] - r01[..., :-1]).abs().mean(dim=(1, 2, 3)).cpu())
    mse = torch.cat(mse)
    latent_std = float(torch.cat(latents).std())
    return {
        "evaluated_images": int(len(index)),
        "psnr_db": float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()),
        "neighbour_difference_real": float(torch.cat(real_diff).mean()),
        "neighbour_difference_reconstructed": float(torch.cat(recon_diff).mean()),
        "latent_std": latent_std,
        "scaling_factor": 1.0 / max(latent_std, 1e-6),
    }


def _data_summary(items) -> dict:
    from fetalstudio.training.image_datasets import summarize

    summary = summarize(items)
    summary["trimester_proxy_hc_mm"] = {"first_below": FIRST_SECOND_HC_MM, "third_from": SECOND_THIRD_HC_MM}
    return summary


def build_unet(args, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    channels = tuple(args.unet_channels)
    n = len(channels)
    attention = getattr(args, "unet_attention", None) or (True,) * (n - 1) + (False,)
    return UNet2DConditionModel(
        sample_size=args.resolution // 8, in_channels=4, out_channels=4, block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        layers_per_block=args.unet_layers, cross_attention_dim=cross_attention_dim,
        attention_head_dim=args.attention_head_dim, norm_num_groups=_norm_groups(channels),
    )


def _initial_unet(args, cross_attention_dim: int):
    """A new U-Net, or the --init-unet weights (checked against the text encoder's width)."""
    from diffusers import UNet2DConditionModel

    if not args.init_unet:
        return build_unet(args, cross_attention_dim)
    if not (args.init_unet / "config.json").is_file():
        raise FetalStudioError(f"--init-unet {args.init_unet} is not a diffusers U-Net folder (no config.json): give e.g. OUT/unet.")
    unet = UNet2DConditionModel.from_pretrained(str(args.init_unet))
    if unet.config.cross_attention_dim != cross_attention_dim:
        raise FetalStudioError(f"--init-unet has cross-attention width {unet.config.cross_attention_dim} but this text encoder has "
                               f"{cross_attention_dim}: start from a U-Net trained with the same text encoder.")
    return unet


def _require_parts(out: Path, parts: tuple[str, ...], stage: str) -> None:
    missing = [p for p in parts if not (out / p).is_dir()]
    if missing:
        hint = {"tokenizer": "tokenizer", "text_encoder": "tokenizer", "scheduler": "tokenizer", "vae": "vae"}
        needed = sorted({hint[m] for m in missing})
        raise FetalStudioError(
            f"--stage {stage} needs {', '.join(m + '/' for m in missing)} in {out}: run --stage {' and --stage '.join(needed)} first "
            "(or --stage all)."
        )


def run_unet_stage(args, items) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from fetalstudio.training.common import ResumableState, TrainingLog, device_description, make_accelerator

    out, stage_dir = args.out, _stage_dir(args, "unet")
    _require_parts(out, ("tokenizer", "text_encoder", "scheduler", "vae"), "unet")
    accelerator = make_accelerator(args)
    device = accelerator.device
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).to(device)
    vae.requires_grad_(False)
    noise_scheduler = DDPMScheduler(**SD_BETAS, prediction_type=args.prediction_type, clip_sample=False)
    unet = _initial_unet(args, text_encoder.config.hidden_size)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3,
                   model_cls=type(unet), model_config=unet.config)
    parameters = [{"params": unet.parameters(), "lr": args.lr}]
    if args.train_text_encoder:
        text_encoder.train()
        parameters.append({"params": text_encoder.parameters(), "lr": args.lr})
    else:
        text_encoder.requires_grad_(False)
        text_encoder.eval()
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    if args.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        text_encoder.to(device)
    ema.to(device)
    accelerator.register_for_checkpointing(ema)
    state = ResumableState(accelerator, stage_dir)
    start = resume(state, args.no_resume)

    vae_key = {"vae": file_digest(*sorted((out / "vae").glob("*.safetensors")), out / "vae" / "config.json")}
    mean, std = cached_latents(stage_dir / "cache", vae_key, items, vae, args.resolution, args.crop, device)
    scaling = vae.config.scaling_factor
    del vae
    captions = sorted({i.caption for i in items})
    caption_index = torch.tensor([captions.index(i.caption) for i in items])
    fixed_states = None
    if not args.train_text_encoder:
        with torch.no_grad():
            fixed_states = encode_prompts(tokenizer, text_encoder, captions + [""], device)
    probabilities = _sampler(items, args)
    log = TrainingLog(out / "train_log.csv")
    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in accelerator.unwrap_model(unet).parameters())
        print(f"unet: {len(items)} images ({len(captions)} captions), latents {tuple(mean.shape[1:])}, {n_params / 1e6:.2f}M parameters, "
              f"steps {start}->{args.steps} on {device_description(accelerator)}", flush=True)
    started, window = time.perf_counter(), []
    unet.train()
    for step in range(start, args.steps):
        generator = step_generator(args.seed, "unet", step, accelerator.process_index)
        index = _draw(probabilities, args.batch_size, generator)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scaling
        which = caption_index[index].clone()
        drop = torch.rand(len(index), generator=generator) < args.caption_dropout
        which[drop] = len(captions)  # the empty caption
        with accelerator.autocast():
            if fixed_states is not None:
                hidden = fixed_states[which.to(device)]
            else:
                hidden = encode_prompts(tokenizer, text_encoder, [(captions + [""])[k] for k in which.tolist()], device)
            loss = diffusion_loss(unet, noise_scheduler, latents.to(device), hidden, generator, args.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema.step(accelerator.unwrap_model(unet).parameters())
        window.append(float(loss.detach()))
        done = step + 1
        if accelerator.is_main_process and (done % args.log_every == 0 or done == args.steps):
            log.log(done, sum(window) / len(window), lr_scheduler.get_last_lr()[0], stage="unet", ema_decay=float(ema.cur_decay_value or 0.0))
            window = []
        if done % args.save_every == 0 and done < args.steps:
            state.save(done)
    seconds = time.perf_counter() - started
    if start < args.steps:
        state.save(args.steps)
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        ema.copy_to(final_unet.parameters())  # the exported U-Net is the EMA one
        final_unet.save_pretrained(str(out / "unet"), safe_serialization=True)
        if args.train_text_encoder:
            accelerator.unwrap_model(text_encoder).save_pretrained(str(out / "text_encoder"), safe_serialization=True)
        pipeline = assemble_pipeline(out)
        samples = write_samples(pipeline, out, captions, args)
        update_metrics(out, "unet", {
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
            "resolution": args.resolution, "latent_shape": list(mean.shape[1:]), "latent_scaling_factor": scaling,
            "parameters": sum(p.numel() for p in final_unet.parameters()), "block_out_channels": list(args.unet_channels),
            "layers_per_block": args.unet_layers, "cross_attention_dim": final_unet.config.cross_attention_dim,
            "down_block_types": list(final_unet.config.down_block_types),
            "initialised_from": str(args.init_unet) if args.init_unet else None,
            "caption_dropout": args.caption_dropout, "balance": args.balance, "ema_decay": args.ema_decay,
            "snr_gamma": args.snr_gamma, "prediction_type": args.prediction_type,
            "text_encoder": "trained with the U-Net" if args.train_text_encoder else "frozen (random initialisation)",
            "captions": captions, "seconds_this_run": round(seconds, 1), "steps_this_run": args.steps - start,
            "seconds_per_step": round(seconds / max(1, args.steps - start), 3), "device": device_description(accelerator),
            "samples": samples,
        }, data=_data_summary(items), versions=_versions())
    accelerator.wait_for_everyone()


def assemble_pipeline(out: Path):
    """Write model_index.json (the folder becomes a complete diffusers pipeline) and load it back as a check."""
    from diffusers import StableDiffusionPipeline

    from fetalstudio.training.common import write_json

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_json(out / "model_index.json", index)
    try:
        return StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    except Exception as error:
        (out / "model_index.json").unlink(missing_ok=True)
        raise FetalStudioError(f"The trained pipeline in {out} does not load back ({type(error).__name__}: {error}).") from error


def write_samples(pipeline, out: Path, captions: list[str], args) -> list[str]:
    """args.samples images per caption (Euler, guidance 4) into OUT/samples/, seeds 0.."""
    import re

    import torch
    from diffusers import EulerDiscreteScheduler

    if args.samples <= 0:
        return []
    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    written = []
    for caption in captions:
        slug = re.sub(r"[^a-z0-9]+", "_", caption.lower()).strip("_")[:60]
        for k in range(args.samples):
            image = pipeline(caption, num_inference_steps=args.sample_steps, guidance_scale=4.0,
                             generator=torch.Generator("cpu").manual_seed(k), height=args.resolution, width=args.resolution).images[0]
            path = folder / f"{slug}_{k}.png"
            image.save(path)
            written.append(str(path.relative_to(out)))
    return written


def write_model_card(out: Path) -> None:
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    stages = metrics.get("stages", {})
    data = metrics.get("data", {})
    lines = [
        f"# {out.name}: a small latent diffusion model for fetal ultrasound (trained with FetalStudio)",
        "",
        "Stable-Diffusion architecture (CLIPTokenizer + CLIPTextModel, AutoencoderKL with 4 latent channels and 8x",
        "downsampling, UNet2DConditionModel, SD's scaled-linear 0.00085-0.012 / 1000-step noise schedule), trained from",
        "scratch on openly licensed fetal ultrasound images. Load it like any diffusers SD 1.x folder:",
        "",
        "```",
        f"python -m fetalstudio generate --model {out} --plane brain --n 4 --width {stages.get('unet', {}).get('resolution', 256)} "
        f"--height {stages.get('unet', {}).get('resolution', 256)} --guidance 4",
        "```",
        "",
        "## Data",
        "",
        f"- Images: {data.get('images', '?')} (byte-identical duplicates kept once). Sources: "
        + ", ".join(f"{Path(k).parent.name}/{Path(k).name} ({v})" for k, v in data.get("sources", {}).items()),
        "- Captions: " + "; ".join(f"\"{k}\" x {v}" for k, v in data.get("captions", {}).items()),
        "- How captions were decided (images): " + ", ".join(f"{k} {v}" for k, v in data.get("caption_from", {}).items())
        + f". Without a recorded trimester the head circumference decides: first < {FIRST_SECOND_HC_MM:g} mm <= second < "
          f"{SECOND_THIRD_HC_MM:g} mm <= third (Hadlock HC at 14+0 and 28+0 weeks; all 61 HC18 images with a known "
          "trimester fall on the right side). es_heads have neither and get the --unknown-trimester caption (default second).",
        "- No African image was used (they are the zero-shot evaluation population of FU-LoRA).",
        "- Licences: FETAL_PLANES_DB and HC18 images are CC BY 4.0; cite Burgos-Artizzu et al. 2020 and van den Heuvel et al. 2018.",
        "",
        "## Training",
        "",
    ]
    tokenizer = stages.get("tokenizer")
    if tokenizer:
        whole = "every caption word is one token" if not tokenizer.get("words_split_into_several_tokens") else \
            "caption words split into several tokens: " + ", ".join(tokenizer["words_split_into_several_tokens"])
        lines.append(f"- Tokenizer: byte-level BPE (CLIP layout) trained on the app's prompt vocabulary, {tokenizer['vocab_size']} tokens; "
                     f"{whole}. Text encoder: {tokenizer['text_encoder_parameters'] / 1e6:.2f}M parameters, "
                     f"{stages.get('unet', {}).get('text_encoder', tokenizer.get('text_encoder'))}.")
        lines.append("  A frozen random text encoder is the default: the data has only 8 distinct captions, which a random causal")
        lines.append("  transformer already maps to clearly different hidden states; keeping it fixed lets the hidden states be")
        lines.append("  computed once, cannot collapse, and leaves LoRA fine-tuning (--train-text-encoder there) a stable encoder.")
    vae = stages.get("vae")
    if vae:
        lines.append(f"- VAE: widths {vae['block_out_channels']}, {vae['parameters'] / 1e6:.2f}M parameters, {vae['steps']} steps x batch "
                     f"{vae['batch_size']}" + (f" ({vae['crop']} px random crops)" if vae.get("crop") else "") + f", lr {vae['lr']}; L1 + {vae['frequency_weight']} x Fourier-magnitude L1 + {vae['kl_weight']} x KL"
                     + (f" + {vae['discriminator']['weight']} x patch-GAN from step {vae['discriminator']['start']}" if vae['discriminator']['weight'] else "")
                     + (f"; head images shown mask-injected ({vae['mask_injection']['channel_order']}) with probability "
                        f"{vae['mask_injection']['probability']}, so image+mask LoRAs can use this VAE" if vae.get("mask_injection", {}).get("probability") else "")
                     + f". Reconstruction PSNR {vae['psnr_db']:.2f} dB on {vae['evaluated_images']} training images; mean neighbour-pixel "
                     f"difference (speckle) real {vae['neighbour_difference_real']:.4f} vs reconstructed {vae['neighbour_difference_reconstructed']:.4f}; "
                     f"latent scaling factor {vae['scaling_factor']:.4f}.")
    unet = stages.get("unet")
    if unet:
        lines.append(f"- U-Net: widths {unet['block_out_channels']}, {unet['parameters'] / 1e6:.2f}M parameters, {unet['steps']} steps x batch "
                     f"{unet['batch_size']}, lr {unet['lr']} (warm-up {unet['warmup_steps']}), {unet['prediction_type']} prediction, Min-SNR "
                     f"gamma {unet['snr_gamma']}, caption dropout {unet['caption_dropout']}, {unet['balance']}-balanced batches, exported "
                     f"weights = EMA (decay {unet['ema_decay']}).")
        lines.append(f"- Device: {unet['device']}; {unet['seconds_per_step']} s/step in the last run.")
    lines += [
        "",
        "## Caveats",
        "",
        "- The five plane classes have only 20 training images each: samples of them can be near copies of training images.",
        "  Run a nearest-neighbour (memorisation) audit before treating synthetic images as new or privacy-preserving.",
        "- A research model, not a medical device.",
        "",
    ]
    (out / "model_card.md").write_text("\n".join(lines), encoding="utf-8")


COMMAND = Command("sd", "a compact Stable-Diffusion-architecture pipeline from scratch", add_arguments, run, description=__doc__.strip())
