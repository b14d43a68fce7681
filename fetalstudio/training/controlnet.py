"""A layout ControlNet for an SD-architecture generator (FetalFlex, METHODS section 3).

The base's U-Net, VAE and text encoder are frozen; a ``diffusers.ControlNetModel`` initialised from
the U-Net (``ControlNetModel.from_unet``: the U-Net's encoder copied, zero convolutions out) learns
to steer it with a layout map: the structure boxes of the image drawn one colour per structure
(fetalstudio.anatomy.layout_map). Layout and prompt are each replaced by null (a black map / the
empty prompt, what classifier-free guidance uses) with probability --drop-prob (0.3 as in FetalFlex).

Loss = --lambda-roi * ROI-MSE + --lambda-ssim * (1 - SSIM):
  ROI-MSE  the noise-prediction MSE inside the ROI only, in latent space. The ROI in training is the
           union of the image's boxes dilated by --roi-margin pixels (then any latent cell it
           touches): at inference the ROI is the edited structures' boxes plus a margin, and the
           union of all boxes puts every structure the layout names into the loss at every step.
  SSIM     on the predicted clean latent x0 (from the noisy latent and the predicted noise) against
           the true latent, whole image (pytorch_msssim.ssim, data range = the batch's latent range).
           Decoding to pixels at every step would add a VAE decode with gradients per step, which
           the 2-core CPU cannot afford; the latent keeps the image's layout at 1/8 scale.

--pre-align: FetalFlex's pre-alignment (fetalstudio.models.prealign): the layout map is encoded by
the base's VAE, rescaled and shifted per channel to the image latents' statistics (measured on the
training set, saved as fetalstudio_prealign.json beside the weights) and fed to a ControlNet whose
conditioning embedding works on the latent grid; without it the ControlNet reads the layout map's
pixels through diffusers' usual 8x-downsampling embedding.

--lora: a LoRA (e.g. the plane's own, which teaches the base the plane) is fused into the frozen
U-Net (and text encoder) before training, so the ControlNet learns on the base as it will generate
with that LoRA; the same LoRA must then be active at generation (recorded in the card and metrics).

Data: structures folders (images.csv + boxes.csv, and their ``more/``; see fetalstudio.data.structures).
The fixed validation split (12% of images, by a hash of the file name) is never trained on; its
ROI-MSE with and without the layout is measured at the end (metrics.json, model card). Images
become grayscale RGB, letterboxed (whole image kept, black bars) to --resolution; boxes follow.
Prompt: fetalstudio.vocabulary.anatomy_caption of the plane with that image's annotated structures.

Output (OUT): the ControlNet as a diffusers folder (config.json + diffusion_pytorch_model.safetensors;
the model manager lists it as a controlnet), model_card.md, metrics.json; OUT/training/ holds the
log, settings, latent cache and the resumable state (run the same command again to continue).

Examples:
  python -m fetalstudio train controlnet --data ../shared/data/first_trimester_structures \\
      --base fetalstudio-tiny --out checkpoints/fetalstudio-tiny-layout-controlnet --steps 600 --batch-size 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.cli_args import Command, device_name
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.common import add_common_arguments

TRAINING_DIR = "training"  # log, settings, cache and state: inside OUT but not part of the ControlNet folder
FIXED_SETTINGS = ("data", "include_more", "base_hash", "lora_hash", "lora_weight", "pre_align", "plane", "resolution", "batch_size", "lr", "seed", "drop_prob",
                  "lambda_roi", "lambda_ssim", "roi_margin", "max_images")
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed noise levels of the held-out measurement


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fetalstudio.vocabulary import ANATOMY_PLANES, FACIAL_SAGITTAL

    parser.add_argument("--data", type=Path, action="append", default=[], required=True, metavar="FOLDER",
                        help="structures folder (images.csv + boxes.csv, and its more/), repeatable")
    parser.add_argument("--no-more", dest="include_more", action="store_false", help="leave out the folders' more/ subfolders")
    parser.add_argument("--base", required=True, metavar="ID_OR_PATH",
                        help="the SD-architecture generator to steer: a model id (python -m fetalstudio models), a diffusers folder or a .safetensors")
    parser.add_argument("--lora", metavar="ID_OR_PATH", help="a LoRA fused into the frozen base before training (use the same LoRA when generating)")
    parser.add_argument("--lora-weight", type=float, default=1.0, help="weight of --lora when fused (default 1.0)")
    parser.add_argument("--pre-align", action="store_true", help="FetalFlex pre-alignment: the layout map's VAE latent, rescaled to the image latents' statistics, is the condition")
    parser.add_argument("--plane", choices=sorted(ANATOMY_PLANES), default=FACIAL_SAGITTAL, help="the plane the boxes belong to (colours, caption)")
    parser.add_argument("--resolution", type=int, help="square training size in pixels, multiple of 8 (default: the base's native size, 256 for fetalstudio-tiny)")
    parser.add_argument("--drop-prob", type=float, default=0.3, help="probability of dropping the layout, and independently the prompt (FetalFlex: 0.3)")
    parser.add_argument("--lambda-roi", type=float, default=1.0, help="weight of the ROI-restricted noise MSE")
    parser.add_argument("--lambda-ssim", type=float, default=0.2, help="weight of 1 - SSIM of the predicted clean latent")
    parser.add_argument("--roi-margin", type=int, default=8, help="pixels (at --resolution) the boxes are dilated by to make the ROI")
    parser.add_argument("--max-images", type=int, help="train on at most this many images (the first ones of the training split)")
    parser.add_argument("--val-limit", type=int, default=64, help="held-out images measured at the end")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, cuda:N, mps (default: the best available)")
    add_common_arguments(parser, steps=600, batch_size=8, lr=1e-4)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(save_every=50)


# --- data ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingImage:
    """One image at the training size: grayscale pixels, its layout map, ROI and caption."""

    path: Path
    pixels: "object"  # uint8 R x R (grayscale, letterboxed)
    layout_map: "object"  # uint8 R x R x 3
    roi: "object"  # bool R x R
    caption: str


def prepare_image(item, plane: str, resolution: int, roi_margin: int) -> TrainingImage:
    """Pixels, layout map, dilated-box ROI and caption of one annotated image at ``resolution``."""
    import numpy as np
    from PIL import Image

    from fetalstudio.anatomy.layout import Layout, StructureBox
    from fetalstudio.anatomy.layout_map import layout_color_map
    from fetalstudio.imaging.letterbox import letterbox_image
    from fetalstudio.vocabulary import anatomy_caption, structures_for

    with Image.open(item.path) as opened:
        gray = opened.convert("L")
        pixels, fit = letterbox_image(gray, resolution)  # the anatomy engine letterboxes its runs the same way
        sx, sy, ox, oy = fit.scale_x, fit.scale_y, fit.pad_x, fit.pad_y

    def placed(x: float, y: float) -> tuple[float, float]:  # into the letterboxed frame (boxes may touch the border)
        return min(max(x * sx + ox, 0.0), float(resolution)), min(max(y * sy + oy, 0.0), float(resolution))

    boxes = [(name, *placed(x0, y0), *placed(x1, y1)) for name, x0, y0, x1, y1 in item.boxes]
    try:
        layout = Layout(plane=plane, width=resolution, height=resolution, boxes=tuple(StructureBox(*box) for box in boxes),
                        source=str(item.path))
    except FetalStudioError as error:
        raise FetalStudioError(f"{item.path}: {error} (--plane {plane}: check the plane and the boxes.csv structure names)") from None
    layout_map = layout_color_map(layout)
    order = [s.name for s in structures_for(plane)]
    caption = anatomy_caption(plane, sorted({b[0] for b in boxes}, key=order.index))
    roi = np.zeros((resolution, resolution), dtype=bool)
    for _, x0, y0, x1, y1 in boxes:
        roi[max(0, int(y0) - roi_margin):min(resolution, int(np.ceil(y1)) + roi_margin),
            max(0, int(x0) - roi_margin):min(resolution, int(np.ceil(x1)) + roi_margin)] = True
    return TrainingImage(item.path, np.asarray(pixels), np.asarray(layout_map, dtype=np.uint8), roi, caption)


def read_split(folders: list[Path], include_more: bool, max_images: int | None):
    """(training items, validation items) of the structures folders; the validation split is fixed."""
    from fetalstudio.data.structures import read_structure_folders, split_structures

    for folder in folders:
        if not folder.is_dir():
            raise FetalStudioError(f"--data {folder} is not a folder. Give a structures folder with images.csv and boxes.csv "
                                   "(laid out like ../shared/data/first_trimester_structures).")
    items = [item for item in read_structure_folders(folders, include_more=include_more) if item.boxes]
    train, val = split_structures(items, "train"), split_structures(items, "val")
    if max_images is not None:
        train = train[:max_images]
    if not train:
        raise FetalStudioError(f"--data {', '.join(map(str, folders))} has no annotated training images (images.csv lists "
                               "none with a box, or all of them fall in the validation split). Add images with boxes.")
    return train, val


def stack_images(images: list[TrainingImage]):
    """Tensors: pixels N x 3 x R x R uint8 (gray in all three), layout maps N x 3 x R x R uint8, ROI N x 1 x R x R float."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.stack([i.pixels for i in images]))[:, None].repeat(1, 3, 1, 1)
    maps = torch.from_numpy(np.stack([i.layout_map for i in images])).permute(0, 3, 1, 2).contiguous()
    roi = torch.from_numpy(np.stack([i.roi for i in images]))[:, None].float()
    return pixels, maps, roi


def encode_latents(cache: Path, key: dict, pixels, vae, device):
    """(mean, std) of the VAE posterior of every image, cached by content key in ``cache``."""
    from fetalstudio.training.sd import cached_posterior

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cached_posterior(cache / f"latents-{digest}.cache", lambda: pixels, vae, device)


def map_condition(maps_uint8, device):
    """Layout maps as the ControlNet's condition image: float in [0, 1] (as diffusers' pipelines feed it)."""
    return maps_uint8.to(device).float().div(255.0)


# --- loss ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    roi: float
    ssim: float


def latent_roi(roi_pixels, latent_size: int):
    """The pixel ROI as latent cells: a cell is in the ROI when any of its pixels is."""
    import torch.nn.functional as F

    return F.adaptive_max_pool2d(roi_pixels, latent_size)


def ssim_window(latent_size: int) -> int:
    """pytorch_msssim's Gaussian window (11) or the largest odd size that fits a small latent."""
    return min(11, latent_size if latent_size % 2 else latent_size - 1)


def controlnet_loss(controlnet, unet, noise_scheduler, latents, hidden, layout_maps, roi, generator, weights: LossWeights):
    """(loss, parts): the ControlNet-steered U-Net's noise prediction scored by ROI-MSE + (1 - SSIM of x0)."""
    import torch
    from pytorch_msssim import ssim

    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    return score_prediction(controlnet, unet, noise_scheduler, latents, noise, timesteps.to(latents.device), hidden,
                            layout_maps, roi, weights, ssim)


def score_prediction(controlnet, unet, noise_scheduler, latents, noise, timesteps, hidden, layout_maps, roi, weights: LossWeights, ssim):
    import torch

    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=layout_maps, return_dict=False)
    prediction = unet(noisy, timesteps, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample.float()
    alpha_bar = noise_scheduler.alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1).float()
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps).float()
        predicted_x0 = alpha_bar.sqrt() * noisy.float() - (1 - alpha_bar).sqrt() * prediction
    else:
        target = noise.float()
        predicted_x0 = (noisy.float() - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    cells = latent_roi(roi, latents.shape[-1])
    roi_mse = (((prediction - target) ** 2) * cells).sum() / (cells.sum() * prediction.shape[1]).clamp(min=1.0)
    clean = latents.float()
    data_range = float((clean.max() - clean.min()).clamp(min=1e-3))
    similarity = ssim(predicted_x0, clean, data_range=data_range, win_size=ssim_window(latents.shape[-1]))
    loss = weights.roi * roi_mse + weights.ssim * (1 - similarity)
    return loss, {"roi_mse": float(roi_mse.detach()), "ssim": float(similarity.detach())}


def drop_conditions(layout_maps, prompt_states, null_states, probability: float, generator, null_condition=None):
    """Replace each sample's layout condition by the null one (a black map, or ``null_condition``: a
    black map's pre-aligned latent) and, independently, its prompt by the empty prompt's states with
    ``probability``; returns (conditions, states, layout_dropped, prompt_dropped)."""
    import torch

    n = layout_maps.shape[0]
    layout_dropped = torch.rand(n, generator=generator) < probability
    prompt_dropped = torch.rand(n, generator=generator) < probability
    null = torch.zeros_like(layout_maps[:1]) if null_condition is None else null_condition.to(layout_maps.device, layout_maps.dtype)
    maps = torch.where(layout_dropped.view(-1, 1, 1, 1).to(layout_maps.device), null.expand_as(layout_maps), layout_maps)
    states = torch.where(prompt_dropped.view(-1, 1, 1).to(prompt_states.device), null_states.expand_as(prompt_states), prompt_states)
    return maps, states, layout_dropped, prompt_dropped


# --- the command -----------------------------------------------------------------------------------

def _validate(args) -> None:
    if args.steps < 1:
        raise FetalStudioError(f"--steps must be at least 1 (got {args.steps}).")
    if args.resolution is not None and (args.resolution % 8 or args.resolution < 64):
        raise FetalStudioError(f"--resolution must be a multiple of 8 and at least 64 (got {args.resolution}).")
    if not 0 <= args.drop_prob < 1:
        raise FetalStudioError(f"--drop-prob is a probability in [0, 1) (got {args.drop_prob}).")
    if args.lambda_roi < 0 or args.lambda_ssim < 0 or args.lambda_roi + args.lambda_ssim == 0:
        raise FetalStudioError("--lambda-roi and --lambda-ssim must be 0 or more, and not both 0.")
    if args.roi_margin < 0:
        raise FetalStudioError("--roi-margin must be 0 or more.")
    if args.save_every < 1 or args.log_every < 1:
        raise FetalStudioError("--save-every and --log-every must be at least 1.")
    if args.max_images is not None and args.max_images < 1:
        raise FetalStudioError("--max-images must be at least 1.")


def _accelerator(args):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if args.device and args.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(args.device))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    set_seed(args.seed)
    return accelerator


def fuse_lora(pipeline, lora: str, weight: float) -> tuple[str, str]:
    """Fuse a LoRA from the catalog (id or path) into the pipeline's U-Net and text encoder; (id, weights hash)."""
    import torch

    from fetalstudio.app_context import build_manager
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.hashing import checkpoint_hash
    from fetalstudio.pipelines.prepared import load_lora_adapter

    manager = build_manager(placement=DevicePlacement(torch.device("cpu"), torch.float32))
    entry = manager.entry(lora)
    if entry.kind is not ModelKind.LORA:
        raise FetalStudioError(f"--lora {lora!r} is a {entry.kind.value}, not a LoRA. Give a LoRA id (python -m fetalstudio models) or file.")
    path = manager.local_path(entry)
    load_lora_adapter(pipeline, path, "fused", entry.details.get("weights_file"))  # the app's loader: same files, same errors
    pipeline.fuse_lora(lora_scale=weight, adapter_names=["fused"])
    pipeline.unload_lora_weights()  # the fused weights stay; the adapter layers go
    return entry.id, checkpoint_hash(path)


def encode_layouts(maps_uint8, vae, device, batch: int = 16):
    """The VAE latents (posterior mode, scaled) of layout maps, on the CPU."""
    import torch

    from fetalstudio.models.prealign import encode_condition

    vae.to(device)
    return torch.cat([encode_condition(vae, map_condition(maps_uint8[i:i + batch], device)).cpu()
                      for i in range(0, len(maps_uint8), batch)])


class ConditionSet:
    """The ControlNet's conditions for a set of images: layout maps in [0, 1], or (--pre-align) their
    VAE latents aligned to the image latents' statistics; ``null`` is a black map's condition."""

    def __init__(self, maps_uint8, alignment=None, layout_latents=None, null_latent=None):
        self.alignment = alignment
        if alignment is None:
            self.values, self.null = maps_uint8, None
        else:
            self.values, self.null = alignment.align(layout_latents), alignment.align(null_latent)

    def take(self, index, device):
        if self.alignment is None:
            return map_condition(self.values[index], device)
        return self.values[index].to(device)

    def blank(self, conditions):
        """The null condition for a batch like ``conditions``."""
        import torch

        return torch.zeros_like(conditions) if self.null is None else self.null.to(conditions.device).expand_as(conditions)


def condition_sets(maps, val_maps, image_latents, pre_align: bool, vae, device):
    """(training conditions, validation conditions or None, the pre-alignment or None). Pre-aligned:
    FetalFlex's statistics are the training layout maps' latents vs the training images' latents."""
    import torch

    from fetalstudio.models.prealign import PreAlignment

    if not pre_align:
        return ConditionSet(maps), None if val_maps is None else ConditionSet(val_maps), None
    latents = encode_layouts(maps, vae, device)
    null_latent = encode_layouts(torch.zeros_like(maps[:1]), vae, device)
    alignment = PreAlignment.measure(latents, image_latents)
    val = None if val_maps is None else ConditionSet(val_maps, alignment, encode_layouts(val_maps, vae, device), null_latent)
    return ConditionSet(maps, alignment, latents, null_latent), val, alignment


def native_resolution(pipeline) -> int:
    """The image size the base was trained at: its U-Net's latent size times the VAE's downsampling."""
    return int(pipeline.unet.config.sample_size) * 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch
    from diffusers import ControlNetModel, DDPMScheduler

    from fetalstudio.models.hashing import checkpoint_hash
    from fetalstudio.training.common import (LOG_NAME, ResumableState, TrainingLog, check_resume_settings, device_description,
                                             finish_run, write_json)
    from fetalstudio.training.lora import load_base_pipeline
    from fetalstudio.training.sd import encode_prompts, quiet_libraries, resume, step_generator

    _validate(args)
    quiet_libraries(args.threads)
    train_items, val_items = read_split(args.data, args.include_more, args.max_images)
    pipeline, entry, base_path = load_base_pipeline(args.base)
    lora_id, lora_hash = fuse_lora(pipeline, args.lora, args.lora_weight) if args.lora else (None, None)
    resolution = args.resolution or native_resolution(pipeline)
    out: Path = args.out
    work = out / TRAINING_DIR
    if args.no_resume and work.exists():
        shutil.rmtree(work)
    settings = {
        "data": [str(p) for p in args.data], "include_more": args.include_more, "base": args.base, "base_hash": checkpoint_hash(base_path),
        "plane": args.plane, "resolution": resolution, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "drop_prob": args.drop_prob, "lambda_roi": args.lambda_roi, "lambda_ssim": args.lambda_ssim, "roi_margin": args.roi_margin,
        "max_images": args.max_images, "steps": args.steps, "lora": lora_id, "lora_hash": lora_hash,
        "lora_weight": args.lora_weight if args.lora else None, "pre_align": args.pre_align,
    }
    check_resume_settings(work, settings, FIXED_SETTINGS)

    print(f"controlnet: preparing {len(train_items)} training images at {resolution} px ({len(val_items)} held out)", flush=True)
    train_images = [prepare_image(item, args.plane, resolution, args.roi_margin) for item in train_items]
    val_images = [prepare_image(item, args.plane, resolution, args.roi_margin) for item in val_items[: max(0, args.val_limit)]]

    accelerator = _accelerator(args)
    device = accelerator.device
    unet, vae, text_encoder, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    if args.pre_align:  # the condition is a latent: a one-block embedding at the latent grid
        from fetalstudio.models.prealign import PREALIGNED_CONDITIONING_CHANNELS, PREALIGNED_EMBEDDING_CHANNELS

        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=PREALIGNED_CONDITIONING_CHANNELS,
                                               conditioning_embedding_out_channels=PREALIGNED_EMBEDDING_CHANNELS)
    else:
        controlnet = ControlNetModel.from_unet(unet)  # the U-Net's encoder copied; zero convolutions: starts as the base
    controlnet.train()
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=1e-2)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
    state = ResumableState(accelerator, work)
    start = resume(state, no_resume=False)
    if start:
        print(f"resuming from step {start} (saved state in {state.folder})", flush=True)
    write_json(work / "run.json", settings)

    pixels, maps, roi = stack_images(train_images)
    vae.to(device)
    latent_key = {"base": settings["base_hash"], "images": [str(i.path) for i in train_images], "resolution": resolution}
    mean, std = encode_latents(work / "cache", latent_key, pixels, vae, device)
    val_mean = None
    if val_images:
        val_pixels, val_maps, val_roi = stack_images(val_images)
        val_mean, _ = encode_latents(work / "cache", {**latent_key, "images": [str(i.path) for i in val_images]}, val_pixels, vae, device)
    del pixels  # only the latents are trained on
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    conditions, val_conditions, alignment = condition_sets(maps, val_maps if val_mean is not None else None,
                                                           (mean - shift) * scaling, args.pre_align, vae, device)
    vae.to("cpu")
    unet.to(device)
    text_encoder.to(device)
    captions = sorted({i.caption for i in train_images} | {i.caption for i in val_images})
    with torch.no_grad():
        caption_states = encode_prompts(tokenizer, text_encoder, captions, device)
        null_states = encode_prompts(tokenizer, text_encoder, [""], device)
    caption_index = torch.tensor([captions.index(i.caption) for i in train_images])
    weights = LossWeights(args.lambda_roi, args.lambda_ssim)

    total = args.steps
    log = TrainingLog(work / LOG_NAME)
    time_path = work / "time.json"
    previous_seconds = json.loads(time_path.read_text())["seconds"] if start and time_path.is_file() else 0.0
    trainable = sum(p.numel() for p in accelerator.unwrap_model(controlnet).parameters())
    print(f"controlnet: {trainable / 1e6:.2f}M trainable parameters (U-Net frozen), steps {start}->{total}, batch {args.batch_size} "
          f"on {device_description(accelerator)}", flush=True)
    started = time.perf_counter()
    window: list[dict] = []
    step = start
    for step in range(start + 1, total + 1):
        generator = step_generator(args.seed, "controlnet", step, accelerator.process_index)
        index = torch.randint(0, len(train_images), (args.batch_size,), generator=generator)
        latents = ((mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) - shift) * scaling
        batch_maps, hidden, layout_dropped, prompt_dropped = drop_conditions(
            conditions.take(index, device), caption_states[caption_index[index].to(device)], null_states, args.drop_prob, generator,
            conditions.null)
        with accelerator.autocast():
            loss, parts = controlnet_loss(controlnet, unet, noise_scheduler, latents.to(device), hidden, batch_maps,
                                          roi[index].to(device), generator, weights)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        window.append({"loss": float(loss.detach()), **parts, "layout_dropped": int(layout_dropped.sum()),
                       "prompt_dropped": int(prompt_dropped.sum())})
        if accelerator.is_main_process and (step % args.log_every == 0 or step == total):
            log.log(step, sum(w["loss"] for w in window) / len(window), args.lr,
                    roi_mse=sum(w["roi_mse"] for w in window) / len(window), ssim=sum(w["ssim"] for w in window) / len(window),
                    layout_dropped=sum(w["layout_dropped"] for w in window), prompt_dropped=sum(w["prompt_dropped"] for w in window),
                    samples=len(window) * args.batch_size)
            window = []
        if step % args.save_every == 0 and step < total:
            state.save(step)
            write_json(time_path, {"step": step, "seconds": previous_seconds + time.perf_counter() - started})
    seconds_this_run = time.perf_counter() - started
    seconds = previous_seconds + seconds_this_run
    if start < total:
        state.save(total)
        write_json(time_path, {"step": total, "seconds": seconds})
    model = accelerator.unwrap_model(controlnet)
    validation = None
    if val_mean is not None:
        validation = held_out_scores(model, unet, noise_scheduler, (val_mean - shift) * scaling, val_conditions, val_roi,
                                     caption_states[torch.tensor([captions.index(i.caption) for i in val_images])], null_states,
                                     weights, args.seed, device)
    if accelerator.is_main_process:
        model.save_pretrained(str(out), safe_serialization=True)
        if alignment is not None:
            alignment.write(out)
        metrics = {
            "finished": step >= total, "step": total, "steps": total, "resumed_from": start,
            "wall_time_s": round(seconds, 1), "seconds_per_step": round(seconds_this_run / max(1, total - start), 3),
            "device": device_description(accelerator), "torch_threads": torch.get_num_threads(),
            "base": {"id": entry.id, "given": args.base, "hash": settings["base_hash"]},
            "lora": None if lora_id is None else {"id": lora_id, "hash": lora_hash, "weight": args.lora_weight, "fused": True},
            "pre_align": args.pre_align,
            "controlnet_parameters": trainable, "plane": args.plane, "resolution": resolution,
            "training": {"batch_size": args.batch_size, "lr": args.lr, "optimizer": "AdamW (weight decay 0.01), constant lr, grad clip 1",
                         "seed": args.seed, "drop_prob": args.drop_prob, "lambda_roi": args.lambda_roi,
                         "lambda_ssim": args.lambda_ssim, "roi_margin_px": args.roi_margin,
                         "ssim_space": "predicted clean latent x0 vs the true latent (whole image)",
                         "roi": "union of the image's boxes dilated by roi_margin_px, as latent cells"},
            "data": {"folders": settings["data"], "include_more": args.include_more, "train_images": len(train_images),
                     "validation_images_held_out": len(val_items), "validation_images_measured": len(val_images),
                     "split": "fixed: fetalstudio.data.structures.split_structures (hash of the file name), never trained on",
                     "captions": {c: sum(1 for i in train_images if i.caption == c) for c in captions}},
            "validation": validation,
            "checkpoint": str(out),
        }
        finish_run(out, metrics, "metrics.json", "model_card.md", model_card(metrics), step, total,
                   {"validation": validation})
    return 0


def held_out_scores(controlnet, unet, noise_scheduler, latents, conditions: ConditionSet, roi, prompt_states, null_states, weights: LossWeights,
                    seed: int, device, batch_size: int = 8) -> dict:
    """ROI-MSE and x0-SSIM on the held-out images at fixed noise levels, with the layout and with a black map
    (what the base alone does): the layout's gain is the difference."""
    import torch
    from pytorch_msssim import ssim

    controlnet.eval()
    results = {}
    for name, use_layout in (("with_layout", True), ("without_layout", False)):
        totals = {"roi_mse": 0.0, "ssim": 0.0}
        count = 0
        for t in VALIDATION_TIMESTEPS:
            generator = torch.Generator().manual_seed(seed * 1009 + t)
            noise_all = torch.randn(latents.shape, generator=generator)
            for start in range(0, len(latents), batch_size):
                part = slice(start, start + batch_size)
                batch = latents[part].to(device)
                timesteps = torch.full((len(batch),), t, dtype=torch.long, device=device)
                batch_maps = conditions.take(torch.arange(len(latents))[part], device)
                if not use_layout:
                    batch_maps = conditions.blank(batch_maps)
                with torch.no_grad():
                    _, parts = score_prediction(controlnet, unet, noise_scheduler, batch, noise_all[part].to(device), timesteps,
                                                prompt_states[part].to(device), batch_maps, roi[part].to(device), weights, ssim)
                totals["roi_mse"] += parts["roi_mse"] * len(batch)
                totals["ssim"] += parts["ssim"] * len(batch)
                count += len(batch)
        results[name] = {key: round(value / count, 6) for key, value in totals.items()}
    results["timesteps"] = list(VALIDATION_TIMESTEPS)
    results["images"] = len(latents)
    controlnet.train()
    return results


def model_card(metrics: dict) -> str:
    data, training, validation = metrics["data"], metrics["training"], metrics["validation"]
    if validation:
        scores = (f"- Held-out ({validation['images']} validation images, noise levels {validation['timesteps']}): ROI noise MSE "
                  f"{validation['with_layout']['roi_mse']:.4f} with the layout vs {validation['without_layout']['roi_mse']:.4f} "
                  f"with a black layout (the base alone); x0-latent SSIM {validation['with_layout']['ssim']:.4f} vs "
                  f"{validation['without_layout']['ssim']:.4f}.\n")
    else:
        scores = "- No held-out images were measured.\n"
    return (
        f"# Layout ControlNet for {metrics['base']['id']}\n\n"
        "Trained with FetalStudio (`python -m fetalstudio train controlnet`), FetalFlex's recipe (METHODS section 3): the base's "
        "U-Net frozen, a diffusers ControlNetModel initialised from it and trained on layout maps (structure boxes, one colour "
        "per structure, fetalstudio.anatomy.layout_map).\n\n"
        + (f"- Base with LoRA **{metrics['lora']['id']}** fused at weight {metrics['lora']['weight']:g} (hash {metrics['lora']['hash']}): "
           "generate with that LoRA active.\n" if metrics.get("lora") else "")
        + ("- Condition: **pre-aligned** layout latent (FetalFlex; statistics in fetalstudio_prealign.json).\n" if metrics.get("pre_align")
           else "- Condition: the layout map's pixels (diffusers' conditioning embedding).\n")
        + f"- Plane: {metrics['plane']} at {metrics['resolution']} px (grayscale, letterboxed). Load with "
        "`ControlNetModel.from_pretrained(folder)` or through the model manager (kind controlnet).\n"
        f"- Data: {', '.join(data['folders'])} (more/ {'included' if data['include_more'] else 'left out'}): "
        f"{data['train_images']} training images; {data['validation_images_held_out']} held out ({data['split']}).\n"
        f"- Training: {metrics['step']} steps x batch {training['batch_size']}, lr {training['lr']:g}, seed {training['seed']}; "
        f"layout and prompt each dropped with p={training['drop_prob']}; loss {training['lambda_roi']:g} x ROI-MSE "
        f"(ROI = the union of the image's boxes + {training['roi_margin_px']} px) + {training['lambda_ssim']:g} x (1 - SSIM) on the {training['ssim_space']}.\n"
        f"- Hardware: {metrics['device']}; {metrics['wall_time_s']:.0f} s in all ({metrics['seconds_per_step']:.2f} s per step in the last run).\n"
        + scores +
        f"- Base: {metrics['base']['id']} (weights hash {metrics['base']['hash']}). It steers only this base (or one with the "
        "same U-Net architecture). A research model, not a medical device.\n"
    )


COMMAND = Command("controlnet", "a layout ControlNet for an SD-architecture generator (FetalFlex; frozen U-Net)", add_arguments, run,
                  description=__doc__.strip())
