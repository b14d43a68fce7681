"""LoRA fine-tuning of a Stable-Diffusion-architecture pipeline (peft), as FU-LoRA and the head paper did.

LoRA (h = W0 x + alpha/r * B A x, A Gaussian-, B zero-initialised, W0 frozen) on the U-Net's
attention projections (to_q, to_k, to_v, to_out.0) and, with --train-text-encoder, on the text
encoder's (q_proj, k_proj, v_proj, out_proj). Constant learning rate (1e-4; text encoder 5e-5 as in
FU-LoRA's released config), ranks 8/32/128 as in the paper (alpha = rank unless given).

Output (OUT):
  pytorch_lora_weights.safetensors   diffusers/peft format: pipe.load_lora_weights(OUT)
  <name>.safetensors                 kohya format (lora_unet_*/lora_te_* with lora_down/lora_up/alpha):
                                     works in A1111, ComfyUI, kohya and FetalStudio alike
  fetalstudio_lora.json, model_card.md, metrics.json, train_log.csv, state/ (resume)

Captions: per image (a caption column in a CSV, or a .txt beside the image), per folder
(--caption), or derived: "a photo of fetal <plane>" for plane tables/folders, "An ultrasound
image of a fetal head, <trimester> trimester" for head image/mask tables.

--mask-channel trains on in-channel mask-injected images (METHODS section 2): the head mask
(outline filled, ellipse fitted where it leaves the frame) in one channel, the grayscale image in the
other two. --channel-order names the mask channel; it is recorded in the output metadata.

Examples:
  # FU-LoRA: 100 Spanish planes, one caption per plane, rank 128
  python -m fetalstudio train lora --base sd15 --data ../shared/data/spanish_planes --rank 128 --out checkpoints/fu-lora-r128
  # head paper: one LoRA per trimester on image+mask
  python -m fetalstudio train lora --base sd15 --data ../shared/data/hc18_heads/pairs.csv --trimester first \\
      --labelled-trimester-only --mask-channel --batch-size 4 --out checkpoints/head-first-mask
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from fetalstudio.cli_args import Command
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.captions import DEFAULT_UNKNOWN_TRIMESTER, UNKNOWN_TRIMESTER_CHOICES
from fetalstudio.training.common import add_common_arguments
from fetalstudio.training.image_datasets import CROP_CHOICES

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
STATE_FILE = "peft_lora_{index}.state"  # not *.safetensors, so model discovery never lists it as a LoRA


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="ID_OR_PATH",
                        help="the SD 1.x pipeline to adapt: a model id (python -m fetalstudio models), a diffusers folder or a .safetensors")
    parser.add_argument("--data", type=Path, action="append", default=[], metavar="FOLDER_OR_CSV",
                        help="training images (repeatable): a folder (captions in .txt files or --caption), plane sub-folders, or a CSV")
    parser.add_argument("--caption", help="caption for every image without its own (.txt or caption column); replaces plane/trimester captions")
    parser.add_argument("--name", help="file name of the kohya-format LoRA (default: the OUT folder's name)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank r (FU-LoRA: 8, 32 or 128)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank, i.e. scale 1 as in the paper)")
    parser.add_argument("--repeats", type=int, default=10, help="times each image is seen per epoch (kohya's repeats)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs; steps = ceil(images x repeats / batch) x epochs unless --steps")
    parser.add_argument("--train-text-encoder", action="store_true", help="also put LoRA on the text encoder's attention")
    parser.add_argument("--text-encoder-lr", type=float, default=5e-5, help="learning rate of the text-encoder LoRA")
    parser.add_argument("--resolution", type=int, default=512, help="square training size in pixels (multiple of 8)")
    parser.add_argument("--crop", choices=CROP_CHOICES, help="how images become square (default: center; pad with --mask-channel, "
                                                              "so the whole head ellipse stays in the picture)")
    parser.add_argument("--mask-channel", action="store_true", help="train on image+mask packed into one RGB image (METHODS 2)")
    parser.add_argument("--channel-order", default="mask,gray,gray",
                        help="with --mask-channel: which channel holds the mask: mask,gray,gray | gray,mask,gray | gray,gray,mask (or 0/1/2, r/g/b)")
    parser.add_argument("--plane", action="append", default=[], help="keep only images of this plane (repeatable)")
    parser.add_argument("--trimester", action="append", default=[], help="keep only head images of this trimester (repeatable)")
    parser.add_argument("--labelled-trimester-only", action="store_true", help="drop head images whose trimester is inferred from HC")
    parser.add_argument("--unknown-trimester", choices=UNKNOWN_TRIMESTER_CHOICES, default=DEFAULT_UNKNOWN_TRIMESTER,
                        help="caption for head images with neither trimester nor hc_mm")
    parser.add_argument("--max-images", type=int, help="train on at most this many images (seeded choice)")
    add_common_arguments(parser, steps=0, batch_size=1, lr=1e-4)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a shared machine)")
    parser.set_defaults(save_every=100)


def _validate(args) -> int | None:
    from fetalstudio.pipelines.mask_injection import parse_channel_order
    from fetalstudio.vocabulary import parse_plane, parse_trimester

    if args.rank < 1:
        raise FetalStudioError("--rank must be at least 1.")
    if args.resolution % 8 or args.resolution < 64:
        raise FetalStudioError(f"--resolution must be a multiple of 8 and at least 64 (got {args.resolution}).")
    if args.repeats < 1 or args.epochs < 1:
        raise FetalStudioError("--repeats and --epochs must be at least 1.")
    try:
        args.plane = [parse_plane(p).value for p in args.plane]
        args.trimester = [parse_trimester(t).value for t in args.trimester]
        return parse_channel_order(args.channel_order) if args.mask_channel else None
    except ValueError as error:
        raise FetalStudioError(str(error)) from None


def load_base_pipeline(base: str):
    """The base SD pipeline (fp32, CPU) through FetalStudio's model manager; a clear error for anything else."""
    import torch

    from fetalstudio.app_context import build_manager
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.loaders import load_sd_pipeline

    manager = build_manager(placement=DevicePlacement(torch.device("cpu"), torch.float32))
    entry = manager.entry(base)
    if entry.kind is not ModelKind.SD_PIPELINE:
        raise FetalStudioError(
            f"--base {base!r} is a {entry.kind.value}, not a Stable Diffusion pipeline. Give an SD 1.x model: a diffusers "
            "folder, an SD 1.x .safetensors or a model id from `python -m fetalstudio models`."
        )
    path = manager.local_path(entry)
    pipeline = load_sd_pipeline(entry, path, torch.float32)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipeline, part, None) is None:
            raise FetalStudioError(f"--base {base!r} has no {part}: LoRA training needs a complete SD 1.x pipeline.")
    return pipeline, entry, path


def _steps(args, n_images: int, world: int) -> tuple[int, int]:
    per_epoch = math.ceil(n_images * args.repeats / (args.batch_size * world))
    return per_epoch, (args.steps if args.steps > 0 else per_epoch * args.epochs)


def _batch_indices(args, n_images: int, step: int, per_epoch: int, process: int, world: int):
    """The images of ``step``: epoch-wise shuffles of images x repeats, seeded by (seed, epoch): resumable."""
    import torch

    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_images * args.repeats, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch)) % n_images
    start = (position * world + process) * args.batch_size
    picked = order[start:start + args.batch_size]
    if len(picked) < args.batch_size:  # the epoch's last, short batch: fill it from the start of the order
        picked = torch.cat([picked, order[: args.batch_size - len(picked)]])
    return picked


def run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from fetalstudio.training.common import ResumableState, TrainingLog, device_description, make_accelerator
    from fetalstudio.training.image_datasets import collect_items, select_items
    from fetalstudio.training.sd import cached_latents, diffusion_loss, encode_prompts, quiet_libraries, resume, step_generator

    mask_channel = _validate(args)
    quiet_libraries(args.threads)
    crop = args.crop or ("pad" if args.mask_channel else "center")
    alpha = float(args.alpha if args.alpha is not None else args.rank)
    items = collect_items(args.data, caption=args.caption, unknown_trimester=args.unknown_trimester, need_masks=args.mask_channel)
    items = select_items(items, planes=args.plane, trimesters=args.trimester, labelled_trimester_only=args.labelled_trimester_only,
                         max_images=args.max_images, seed=args.seed)
    pipeline, entry, base_path = load_base_pipeline(args.base)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or out.name

    accelerator = make_accelerator(args)  # seeds everything: the Gaussian LoRA init below is reproducible
    device = accelerator.device
    unet, vae, text_encoder, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    trained = [unet]
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": args.lr}]
    if args.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS))
        trained.append(text_encoder)
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": args.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer)
    _register_lora_state_hooks(accelerator)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    unet = prepared[0]
    if args.train_text_encoder:
        text_encoder = prepared[1]
    else:
        text_encoder.to(device)
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    state = ResumableState(accelerator, out)
    start = resume(state, args.no_resume)

    vae.to(device)
    from fetalstudio.models.hashing import checkpoint_hash

    key = {"base": checkpoint_hash(base_path)}
    mean, std = cached_latents(out / "cache", key, items, vae, args.resolution, crop, device, mask_channel=mask_channel)
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    vae.to("cpu")
    captions = [i.caption for i in items]
    unique = sorted(set(captions))
    fixed_states = None
    if not args.train_text_encoder:
        with torch.no_grad():
            fixed_states = encode_prompts(tokenizer, text_encoder, unique, device)
    caption_index = torch.tensor([unique.index(c) for c in captions])
    per_epoch, total = _steps(args, len(items), accelerator.num_processes)
    log = TrainingLog(out / "train_log.csv")
    if accelerator.is_main_process:
        lora_parameters = sum(p.numel() for group in groups for p in group["params"])
        print(f"lora: {len(items)} images ({len(unique)} captions) at {args.resolution}px, rank {args.rank} alpha {alpha:g}, "
              f"{lora_parameters / 1e6:.2f}M trainable parameters, steps {start}->{total} ({per_epoch}/epoch) on {device_description(accelerator)}",
              flush=True)
    started, window = time.perf_counter(), []
    unet.train()
    for step in range(start, total):
        generator = step_generator(args.seed, "lora", step, accelerator.process_index)
        index = _batch_indices(args, len(items), step, per_epoch, accelerator.process_index, accelerator.num_processes)
        latents = ((mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) - shift) * scaling
        with accelerator.autocast():
            if fixed_states is not None:
                hidden = fixed_states[caption_index[index].to(device)]
            else:
                hidden = encode_prompts(tokenizer, text_encoder, [captions[k] for k in index.tolist()], device)
            loss = diffusion_loss(unet, noise_scheduler, latents.to(device), hidden, generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        lr_scheduler.step()
        window.append(float(loss.detach()))
        done = step + 1
        if accelerator.is_main_process and (done % args.log_every == 0 or done == total):
            log.log(done, sum(window) / len(window), args.lr, epoch=step // per_epoch + 1)
            window = []
        if done % args.save_every == 0 and done < total:
            state.save(done)
    seconds = time.perf_counter() - started
    if start < total:
        state.save(total)
    if accelerator.is_main_process:
        unet_model = accelerator.unwrap_model(unet)
        te_model = accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None
        metadata = {
            "base": str(args.base), "base_id": entry.id, "rank": args.rank, "alpha": alpha, "resolution": args.resolution,
            "crop": crop, "captions": dict(sorted({c: captions.count(c) for c in unique}.items())),
            "text_encoder": bool(args.train_text_encoder), "mask_channel": mask_channel,
            "channel_order": _channel_order(mask_channel), "target_modules": UNET_TARGETS,
            "text_encoder_target_modules": TEXT_ENCODER_TARGETS if args.train_text_encoder else [],
        }
        kohya_path = export_lora(out, name, unet_model, te_model, alpha, metadata)
        _write_reports(out, args, items, metadata, kohya_path, total, start, seconds, device_description(accelerator))
        print(f"lora: wrote {out / DIFFUSERS_WEIGHTS} and {kohya_path}", flush=True)
    accelerator.wait_for_everyone()
    return 0


def _channel_order(mask_channel: int | None) -> str | None:
    from fetalstudio.pipelines.mask_injection import channel_order_name

    return channel_order_name(mask_channel) if mask_channel is not None else None


def _register_lora_state_hooks(accelerator) -> None:
    """Resumable state holds only the LoRA weights (not gigabytes of frozen base weights)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for index, model in enumerate(models):
            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(accelerator.unwrap_model(model)).items()}
            save_file(state, str(Path(output_dir) / STATE_FILE.format(index=index)))
        weights.clear()  # accelerate saves nothing else for these models

    def load_hook(models, input_dir):
        loaded = list(models)
        models.clear()
        for index, model in enumerate(loaded):
            state = load_file(str(Path(input_dir) / STATE_FILE.format(index=index)))
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), state)  # shape mismatches raise RuntimeError
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RuntimeError(f"unexpected LoRA weights {unexpected[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def export_lora(out: Path, name: str, unet, text_encoder, alpha: float, metadata: dict) -> Path:
    """OUT/pytorch_lora_weights.safetensors (diffusers) and OUT/<name>.safetensors (kohya)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from fetalstudio.training.kohya import kohya_metadata, peft_to_kohya, save_kohya

    unet_state = get_peft_model_state_dict(unet)
    te_state = get_peft_model_state_dict(text_encoder) if text_encoder is not None else None
    StableDiffusionPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_state) if te_state else None,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None,
        safe_serialization=True,
    )
    kohya = peft_to_kohya(unet_state, te_state, alpha)
    extra = {k: v for k, v in metadata.items() if v is not None}
    kohya_path = out / f"{name}.safetensors"
    if kohya_path.name == DIFFUSERS_WEIGHTS:
        raise FetalStudioError(f"--name {name!r} would overwrite the diffusers file; pick another name.")
    save_kohya(kohya_path, kohya, kohya_metadata(metadata["rank"], alpha, text_encoder=text_encoder is not None,
                                                 resolution=metadata["resolution"], extra=extra))
    return kohya_path


def _write_reports(out: Path, args, items, metadata: dict, kohya_path: Path, total: int, start: int, seconds: float, device: str) -> None:
    from fetalstudio.training.common import write_json
    from fetalstudio.training.image_datasets import summarize

    summary = summarize(items)
    write_json(out / "fetalstudio_lora.json", {**metadata, "kohya_file": kohya_path.name, "diffusers_file": DIFFUSERS_WEIGHTS})
    write_json(out / "metrics.json", {
        "steps": total, "steps_this_run": total - start, "seconds_this_run": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, total - start), 3), "batch_size": args.batch_size, "lr": args.lr,
        "text_encoder_lr": args.text_encoder_lr if args.train_text_encoder else None, "repeats": args.repeats,
        "epochs": args.epochs, "device": device, "data": summary, **metadata,
    })
    mask_line = ""
    if metadata["mask_channel"] is not None:
        mask_line = (f"- In-channel mask injection: channel order {metadata['channel_order']} (mask in channel "
                     f"{metadata['mask_channel']}). Unpack generated images with "
                     f"`fetalstudio.pipelines.mask_injection.unpack(rgb, {metadata['mask_channel']})`.\n")
    captions = "; ".join(f"\"{c}\" x {n}" for c, n in metadata["captions"].items())
    card = (
        f"# {kohya_path.stem}: LoRA for {metadata['base_id']}\n\n"
        f"Trained with FetalStudio (`python -m fetalstudio train lora`).\n\n"
        f"- Files: `{DIFFUSERS_WEIGHTS}` (diffusers/peft; `pipe.load_lora_weights(folder)`) and `{kohya_path.name}` "
        f"(kohya format for A1111/ComfyUI/kohya and FetalStudio). Both hold the same weights.\n"
        f"- Rank {metadata['rank']}, alpha {metadata['alpha']:g}, U-Net attention ({', '.join(UNET_TARGETS)})"
        + (", text encoder attention" if metadata["text_encoder"] else "") + ".\n"
        f"- Data: {summary['images']} images at {metadata['resolution']} px ({metadata['crop']} crop); captions: {captions}.\n"
        + mask_line +
        f"- Training: {total} steps x batch {args.batch_size}, lr {args.lr:g} constant"
        + (f" (text encoder {args.text_encoder_lr:g})" if metadata["text_encoder"] else "")
        + f", repeats {args.repeats}, epochs {args.epochs}, seed {args.seed}; {device}.\n"
        f"- Use the training captions as prompts (weight 1.0; FU-LoRA sampled with Euler/UniPC, 20 steps).\n"
        f"- Never trained on African images. A research model, not a medical device.\n"
    )
    (out / "model_card.md").write_text(card, encoding="utf-8")


COMMAND = Command("lora", "LoRA fine-tuning of an SD-architecture pipeline (peft; kohya + diffusers output)", add_arguments, run, description=__doc__.strip())
