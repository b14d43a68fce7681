"""Train a box-prompted fetal-head segmenter built from segment-anything's classes.

Two modes, one model class (``segment_anything.modeling.Sam``), so one predictor serves both:

- Without --sam-checkpoint: a small Sam (timm CNN image encoder, RegNetX-200MF by default, at --image-size, 16x16
  embedding at 256 px, PromptEncoder, MaskDecoder with a depth-2 TwoWayTransformer), trained end
  to end from random weights. --encoder vit gives segment-anything's ImageEncoderViT instead.
- With --sam-checkpoint FILE (an official SAM .pth, vit_b/l/h, or any checkpoint in SAM's key
  layout): image and prompt encoders frozen, only the mask decoder trained (as the paper/MedSAM
  do). The image size is then the checkpoint's (1024 for official SAM).

Data: --csv (repeatable) tables with image, mask and optional subject_group/patient_id,
pixel_size_mm, hc_mm (e.g. ../shared/data/hc18_heads/pairs.csv and es_heads/pairs.csv). Outline
masks are filled (ellipse fitted where the outline leaves the frame). --val-fraction of the groups
of each CSV (subject_group or patient_id; a row without one is its own group) is held out. The
training images are resized once (longest side = image size, as SamPredictor does) into
OUT/cache/*.npz, so later runs and resumes start at once.

Each sample: flips, rotation (+-20 deg), scale (0.85-1.15), shift, gamma/contrast/brightness,
blur/noise; the box prompt = the (augmented) mask's bounding box with every coordinate moved by a
uniform random amount in [-20, 20] px of the original image (--jitter-px). Loss: Dice + binary
cross-entropy on the mask logits (upsampled to the input size) + MSE of the IoU prediction.
Adam, linear warm-up then cosine decay. Step s draws its batch from a generator seeded by
(seed, s), so interrupted runs continue exactly. Batches are built in the main process from
the cache (--workers is not used).

Every --eval-every steps the held-out images are segmented at full resolution with the exact
and with a jittered box (jitter seed 0, as `eval segmenter`): Dice, HC error from the fitted
ellipse, and the box-ellipse baseline beside them. OUT/segmenter.safetensors keeps the step with
the best jittered-box Dice (the last step when nothing is held out).

Output folder: segmenter.safetensors (loads through the model manager), model_card.md,
metrics.json, val_per_image.csv, train_log.csv, run.json, cache/, state/ (resumable: run the
same command again, or with a larger --steps, to continue; --no-resume starts over).

Example (the bundled model: 800 steps, 28 min on 2 shared CPU cores with 1 torch thread;
held-out hc18 Dice 0.97 with jittered boxes, see checkpoints/bundled/fetalstudio-head-segmenter):

    python -m fetalstudio train segmenter --csv ../shared/data/hc18_heads/pairs.csv \\
        --csv ../shared/data/es_heads/pairs.csv --out outputs/head-segmenter --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from fetalstudio.cli_args import Command
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.common import add_common_arguments, check_resume_settings

CHECKPOINT = "segmenter.safetensors"
VALIDATION_JITTER_SEED = 0  # the same boxes as `eval segmenter --box jitter` (default seed)
#: run.json settings that must not change when a run is resumed.
FIXED_SETTINGS = ("csv", "limit", "val_fraction", "seed", "config", "sam_checkpoint", "batch_size", "jitter_px")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--csv", type=Path, action="append", required=True,
                      help="image/mask pairs CSV (image, mask; optional subject_group or patient_id, pixel_size_mm, hc_mm); repeatable")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of each CSV's groups (subject/patient) held out for validation")
    data.add_argument("--limit", type=int, help="use only the first N rows of each CSV (quick trials)")
    data.add_argument("--eval-every", type=int, default=100, help="validate every N steps (and at the end)")
    data.add_argument("--jitter-px", type=float, default=20.0, help="largest box perturbation per coordinate, original pixels")
    model = parser.add_argument_group("model")
    model.add_argument("--image-size", type=int, default=256, help="model input size (longest side), multiple of 16")
    model.add_argument("--encoder", default="regnetx_002", help="small model's image encoder: a timm CNN name (regnetx_002, resnet18, ...) or 'vit'")
    model.add_argument("--embed-dim", type=int, default=128, help="small model's embedding/decoder width (SAM: 256)")
    model.add_argument("--sam-checkpoint", type=Path, metavar="FILE",
                       help="SAM .pth (vit_b/l/h or SAM key layout): freeze image+prompt encoders, train the mask decoder")
    model.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="precision of the saved weights")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    optim.add_argument("--warmup", type=float, default=0.03, help="share of the steps with a linear LR warm-up (then cosine decay)")
    optim.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 when the machine is shared)")
    optim.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this run (state saved; run again to continue)")
    add_common_arguments(parser, steps=800, batch_size=16, lr=1e-3)


# --- data -------------------------------------------------------------------------------------
def split_items(csv_paths: list[Path], val_fraction: float, seed: int, limit: int | None):
    """Per CSV: group-aware train/validation split. Returns (train, val, held-out groups per source)."""
    from fetalstudio.data.tables import group_split
    from fetalstudio.segmentation.scoring import read_items

    if not 0 <= val_fraction < 1:
        raise FetalStudioError("--val-fraction must be at least 0 and below 1 (e.g. 0.1).")
    train, val, held_out = [], [], {}
    for csv_path in csv_paths:
        items = read_items(csv_path, limit)
        if not items:
            raise FetalStudioError(f"{csv_path} lists no image/mask pairs.")
        groups = [item.group or f"row:{item.name}" for item in items]
        train_idx, val_idx = group_split(groups, val_fraction, seed) if val_fraction > 0 else (list(range(len(items))), [])
        if not train_idx:
            raise FetalStudioError(f"{csv_path}: the validation split took every group; lower --val-fraction or give more data.")
        train += [items[i] for i in train_idx]
        val += [items[i] for i in val_idx]
        source = items[0].source
        held_out[source] = sorted({groups[i] for i in val_idx})
    return train, val, held_out


def _cache_key(items, image_size: int) -> str:
    import hashlib

    digest = hashlib.sha1(str(image_size).encode())
    for item in items:
        for path in (item.image, item.mask):
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}\n".encode())
    return digest.hexdigest()[:16]


def build_cache(items, image_size: int, folder: Path, log=print) -> dict:
    """Training images resized once (longest side = image_size) with their filled masks.

    Returns arrays: images/masks (N x S x S, top-left aligned), sizes (N x 2: h, w in the model
    frame), scales (N: model px per original px). Stored as OUT/cache/<key>.npz.
    """
    import cv2
    import numpy as np
    from segment_anything.utils.transforms import ResizeLongestSide

    from fetalstudio.segmentation.scoring import load_example

    path = folder / f"train_{image_size}px_{_cache_key(items, image_size)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    started = time.perf_counter()
    resize = ResizeLongestSide(image_size)
    count = len(items)
    images = np.zeros((count, image_size, image_size), np.uint8)
    masks = np.zeros((count, image_size, image_size), np.uint8)
    sizes = np.zeros((count, 2), np.int32)
    scales = np.zeros(count, np.float32)
    for index, item in enumerate(items):
        image, mask = load_example(item)
        small = resize.apply_image(np.repeat(image[:, :, None], 3, axis=2))[:, :, 0]
        h, w = small.shape
        images[index, :h, :w] = small
        masks[index, :h, :w] = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
        sizes[index] = (h, w)
        scales[index] = image_size / max(image.shape)
        if (index + 1) % 100 == 0:
            log(f"cache: {index + 1}/{count} images")
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(temporary, images=images, masks=masks, sizes=sizes, scales=scales)
    temporary.replace(path)
    log(f"cache: {count} images at {image_size} px in {time.perf_counter() - started:.0f} s -> {path}")
    return {"images": images, "masks": masks, "sizes": sizes, "scales": scales}


def augment(image, mask, rng):
    """Flips, rotation/scale/shift, gamma/contrast/brightness, blur or speckle noise (numpy + cv2)."""
    import cv2
    import numpy as np

    h, w = image.shape
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.2:
        image, mask = image[::-1], mask[::-1]
    image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
    if rng.random() < 0.8:
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-20, 20), rng.uniform(0.85, 1.15))
        matrix[:, 2] += rng.uniform(-0.06, 0.06, 2) * (w, h)
        image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
        mask = cv2.warpAffine(mask.astype(np.float32), matrix, (w, h), flags=cv2.INTER_LINEAR) > 0.5
    x = image.astype(np.float32) / 255
    if rng.random() < 0.8:
        x = np.power(x, math.exp(rng.uniform(math.log(0.7), math.log(1.4))))
        x = x * rng.uniform(0.75, 1.25) + rng.uniform(-0.08, 0.08)
    choice = rng.random()
    if choice < 0.15:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.2))
    elif choice < 0.3:
        x = x * (1 + rng.normal(0, rng.uniform(0.02, 0.1), x.shape).astype(np.float32))
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), mask.astype(bool)


def make_batch(cache: dict, step: int, seed: int, batch_size: int, jitter_px: float, image_size: int):
    """Step ``step``'s batch: uint8 images B x S x S, valid sizes, boxes (model frame), targets."""
    import numpy as np

    from fetalstudio.imaging.ellipse import bounding_box, jitter_box

    rng = np.random.default_rng([seed, step])
    count = len(cache["sizes"])
    images = np.zeros((batch_size, image_size, image_size), np.uint8)
    targets = np.zeros((batch_size, image_size, image_size), np.float32)
    sizes = np.zeros((batch_size, 2), np.int64)
    boxes = np.zeros((batch_size, 4), np.float32)
    for b in range(batch_size):
        index = int(rng.integers(count))
        h, w = (int(v) for v in cache["sizes"][index])
        image, mask = cache["images"][index, :h, :w], cache["masks"][index, :h, :w].astype(bool)
        augmented, augmented_mask = augment(image, mask, rng)
        if augmented_mask.sum() >= 16:
            image, mask = augmented, augmented_mask
        images[b, :h, :w] = image
        targets[b, :h, :w] = mask
        sizes[b] = (h, w)
        boxes[b] = jitter_box(bounding_box(mask), w, h, jitter_px * float(cache["scales"][index]), rng)
    return images, sizes, boxes, targets


def normalize(model, images, sizes):
    """Like ``Sam.preprocess``: gray -> 3 channels, (x - mean) / std, zero padding right/bottom."""
    import torch

    x = images.float().unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x - model.pixel_mean.view(1, 3, 1, 1)) / model.pixel_std.view(1, 3, 1, 1)
    rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
    cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    valid = (rows < sizes[:, 0].view(-1, 1, 1)) & (cols < sizes[:, 1].view(-1, 1, 1))
    return x * valid.unsqueeze(1)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 2 % of the peak."""
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def _make_trainee(sam, train_encoder: bool):
    import torch

    from fetalstudio.segmentation.model import decode_batch

    class Trainee(torch.nn.Module):
        """The Sam plus its training forward pass (one box per image); frozen parts stay in eval mode."""

        def __init__(self) -> None:
            super().__init__()
            self.sam = sam

        def train(self, mode: bool = True):
            super().train(mode)
            if not train_encoder:
                self.sam.image_encoder.eval()
                self.sam.prompt_encoder.eval()
            return self

        def forward(self, images, sizes, boxes):
            x = normalize(self.sam, images, sizes)
            if train_encoder:
                embeddings = self.sam.image_encoder(x)
            else:
                with torch.no_grad():
                    embeddings = self.sam.image_encoder(x)
            return decode_batch(self.sam, embeddings, boxes)

    return Trainee()


def segmentation_loss(low_res_logits, iou_prediction, targets):
    """Dice + BCE on logits upsampled to the target size, + MSE of the predicted IoU."""
    import torch
    import torch.nn.functional as F

    logits = F.interpolate(low_res_logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    probabilities = torch.sigmoid(logits)
    dims = (1, 2)
    dice = 1 - (2 * (probabilities * targets).sum(dims) + 1) / (probabilities.sum(dims) + targets.sum(dims) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    with torch.no_grad():
        predicted = logits > 0
        truth = targets > 0.5
        iou = (predicted & truth).sum(dims).float() / (predicted | truth).sum(dims).clamp(min=1).float()
    iou_loss = F.mse_loss(iou_prediction[:, 0].float(), iou)
    return dice.mean() + bce + iou_loss, {"dice_loss": float(dice.mean().detach()), "bce": float(bce.detach()), "train_iou": float(iou.mean())}


# --- validation ---------------------------------------------------------------------------------
def validate(model, items, cache: dict, jitter_px: float) -> tuple[dict, list[dict]]:
    """Full-resolution Dice/HC with exact and jittered boxes, model and baseline, overall and per source."""
    from fetalstudio.segmentation.scoring import evaluate_items, summarize, summarize_by_source
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    was_training = model.training
    model.eval()
    try:
        rows = evaluate_items(BoxPromptPredictor(model), items, ("exact", "jitter"), jitter_px, VALIDATION_JITTER_SEED, cache)
    finally:
        model.train(was_training)
    result = {}
    for mode in ("exact", "jitter"):
        selected = [r for r in rows if r["box_mode"] == mode]
        result[mode] = {**summarize(selected), "per_source": summarize_by_source(selected)}
    return result, rows


# --- the command ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from fetalstudio.data.reports import write_csv
    from fetalstudio.models.segmenter import build_segmenter, load_sam_checkpoint
    from fetalstudio.segmentation.model import count_parameters, model_config, save_segmenter, small_config
    from fetalstudio.training.common import LOG_NAME, STATE_DIR, open_run, optimizer_step, TrainingLog, device_description, finish_run, make_accelerator, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1:
        raise FetalStudioError("--steps, --batch-size and --eval-every must be at least 1.")
    if args.jitter_px < 0:
        raise FetalStudioError("--jitter-px must be 0 or more.")
    for csv_path in args.csv:
        if not Path(csv_path).is_file():
            raise FetalStudioError(f"--csv {csv_path} does not exist. Give a CSV with image and mask columns (e.g. ../shared/data/hc18_heads/pairs.csv).")
    train_items, val_items, held_out = split_items(args.csv, args.val_fraction, args.seed, args.limit)

    if args.sam_checkpoint is not None:
        sam = load_sam_checkpoint(args.sam_checkpoint)
        config = model_config(sam)
        train_encoder = False
        if config["image_size"] != args.image_size:
            print(f"--sam-checkpoint: using the checkpoint's image size {config['image_size']} px (not --image-size {args.image_size})", flush=True)
    else:
        try:
            config = small_config(args.image_size, args.encoder, args.embed_dim)
        except ValueError as error:
            raise FetalStudioError(f"--image-size: {error}.") from None
        sam = build_segmenter(config)
        train_encoder = True
    for module in (sam.image_encoder, sam.prompt_encoder):
        module.requires_grad_(train_encoder)
    image_size = int(config["image_size"])

    out: Path = args.out
    if args.no_resume:
        for name in (STATE_DIR, "best.json", "time.json", LOG_NAME, "run.json", CHECKPOINT):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "csv": [str(p) for p in args.csv], "limit": args.limit, "val_fraction": args.val_fraction, "seed": args.seed,
        "config": config, "sam_checkpoint": str(args.sam_checkpoint) if args.sam_checkpoint else None,
        "batch_size": args.batch_size, "jitter_px": args.jitter_px, "lr": args.lr, "weight_decay": args.weight_decay,
        "warmup": args.warmup, "steps": args.steps, "train_encoder": train_encoder,
    }
    check_resume_settings(out, settings, FIXED_SETTINGS)

    accelerator = make_accelerator(args)
    trainee = _make_trainee(sam, train_encoder)
    parameters = [p for p in trainee.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)
    total = args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, args.warmup))
    trainee, optimizer, scheduler = accelerator.prepare(trainee, optimizer, scheduler)
    state, start = open_run(accelerator, out, settings)
    time_path, best_path = out / "time.json", out / "best.json"
    previous_seconds = json.loads(time_path.read_text())["seconds"] if start and time_path.is_file() else 0.0
    best = json.loads(best_path.read_text()) if start and best_path.is_file() else None

    cache = build_cache(train_items, image_size, out / "cache", log=lambda text: print(text, flush=True))
    val_cache: dict = {}
    log = TrainingLog(out / LOG_NAME)
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(trainee).sam
    save_dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
    sources = sorted({item.source for item in train_items + val_items})
    data_info = {
        "csv": settings["csv"],
        "train_images": {s: sum(1 for i in train_items if i.source == s) for s in sources},
        "val_images": {s: sum(1 for i in val_items if i.source == s) for s in sources},
        "held_out_groups": held_out,
    }

    def save_checkpoint(step: int, validation: dict | None) -> None:
        extra = {
            "trained_steps": str(step), "train_data": data_info["csv"], "train_images": data_info["train_images"],
            "trained_encoder": "yes" if train_encoder else "no (SAM checkpoint: mask decoder only)",
        }
        if args.sam_checkpoint:
            extra["base_checkpoint"] = Path(args.sam_checkpoint).name
        if validation:
            jitter = validation["jitter"]
            extra.update({"val_dice_jitter": f"{jitter['dice_mean']:.4f}", "val_hc_mae_mm_jitter": f"{jitter['hc_mae_mm']:.3f}",
                          "val_dice_exact": f"{validation['exact']['dice_mean']:.4f}"})
        save_segmenter(unwrapped, out / CHECKPOINT, config, extra, dtype=save_dtype)

    started = time.perf_counter()
    end = total if not args.stop_after else min(total, start + max(1, args.stop_after))
    step = start
    trainee.train()
    for step in range(start + 1, end + 1):
        images, sizes, boxes, targets = make_batch(cache, step, args.seed, args.batch_size, args.jitter_px, image_size)
        images, sizes = torch.from_numpy(images).to(device), torch.from_numpy(sizes).to(device)
        boxes, targets = torch.from_numpy(boxes).to(device), torch.from_numpy(targets).to(device)
        with accelerator.autocast():
            low_res, iou = trainee(images, sizes, boxes)
        loss, parts = segmentation_loss(low_res, iou, targets)
        loss_value = optimizer_step(accelerator, loss, optimizer, scheduler)
        log.add(step, loss_value, scheduler.get_last_lr()[0], step % args.log_every == 0 or step == end, **parts)
        if val_items and (step % args.eval_every == 0 or step == total):
            validation, rows = validate(unwrapped, val_items, val_cache, args.jitter_px)
            jitter, exact = validation["jitter"], validation["exact"]
            print(f"step {step} validation: jittered box Dice {jitter['dice_mean']:.4f} HC MAE {jitter['hc_mae_mm']:.2f} mm "
                  f"(baseline {jitter['baseline_dice_mean']:.4f} / {jitter['baseline_hc_mae_mm']:.2f} mm); exact box Dice "
                  f"{exact['dice_mean']:.4f} HC MAE {exact['hc_mae_mm']:.2f} mm", flush=True)
            if best is None or jitter["dice_mean"] > best["validation"]["jitter"]["dice_mean"]:
                best = {"step": step, "validation": validation}
                save_checkpoint(step, validation)
                write_csv(out / "val_per_image.csv", rows)
                write_json(best_path, best)
            trainee.train()
        if step % args.save_every == 0 or step == end:
            if not val_items:
                save_checkpoint(step, None)
            state.save(step)
            write_json(time_path, {"step": step, "seconds": previous_seconds + time.perf_counter() - started})
    seconds = previous_seconds + time.perf_counter() - started
    if not (out / CHECKPOINT).exists():  # e.g. stopped before the first validation
        save_checkpoint(step, None)

    finished = step >= total
    metrics = {
        "finished": finished, "step": step, "steps": total, "resumed_from": start,
        "wall_time_s": round(seconds, 1), "wall_time_this_run_s": round(time.perf_counter() - started, 1),
        "device": device_description(accelerator), "torch_threads": torch.get_num_threads(),
        "model": {"config": config, "parameters": count_parameters(unwrapped),
                  "trainable_parameters": sum(p.numel() for p in parameters), "trained_encoder": train_encoder,
                  "sam_checkpoint": settings["sam_checkpoint"]},
        "training": {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "warmup": args.warmup,
                     "jitter_px": args.jitter_px, "seed": args.seed, "loss": "Dice + BCE (+ MSE of the IoU head)", "optimizer": "Adam"},
        "data": data_info,
        "selected_step": best["step"] if best else step,
        "validation": best["validation"] if best else None,
        "checkpoint": str(out / CHECKPOINT),
        "checkpoint_bytes": (out / CHECKPOINT).stat().st_size,
    }
    finish_run(out, metrics, "metrics.json", "model_card.md", model_card(metrics), step, total,
               {"selected_step": metrics["selected_step"]})
    return 0


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def model_card(metrics: dict) -> str:
    """A markdown model card from metrics.json."""
    from fetalstudio.data.reports import markdown_table
    from fetalstudio.segmentation.model import describe_architecture

    config = metrics["model"]["config"]
    data = metrics["data"]
    lines = [
        "# FetalStudio box-prompted head segmenter", "",
        f"{describe_architecture(config)}; {metrics['model']['parameters']:,} parameters "
        f"({'all trained from random weights' if metrics['model']['trained_encoder'] else 'mask decoder trained on top of ' + str(metrics['model']['sam_checkpoint'])}).",
        "Input: a grayscale ultrasound image and a box around the fetal head (original pixel coordinates); output: the head mask at full resolution.",
        "Use it with `fetalstudio.segmentation.predictor.BoxPromptPredictor` (the model manager loads the file).", "",
        "## Training", "",
        f"- data: {', '.join(f'`{c}`' for c in data['csv'])}",
        f"- training images: {', '.join(f'{k} {v}' for k, v in data['train_images'].items())}; "
        f"held out for validation: {', '.join(f'{k} {v}' for k, v in data['val_images'].items())}",
        "- held-out groups (subject_group / patient_id): " + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in data["held_out_groups"].items()),
        f"- steps: {metrics['step']} of {metrics['steps']} (batch {metrics['training']['batch_size']}, Adam lr {metrics['training']['lr']:g}, "
        f"{metrics['training']['loss']}); selected step {metrics['selected_step']} (best jittered-box validation Dice)",
        f"- box prompt: mask bounding box, each coordinate moved by up to {metrics['training']['jitter_px']:g} px; flips, rotation, scale, "
        "contrast/gamma, blur/noise augmentation",
        f"- hardware: {metrics['device']}; wall time {metrics['wall_time_s'] / 60:.1f} min",
        f"- checkpoint: {metrics['checkpoint_bytes'] / 2**20:.1f} MiB", "",
    ]
    validation = metrics.get("validation")
    if validation:
        lines += ["## Held-out validation (full resolution)", "",
                  "Model beside the trivial baseline \"filled ellipse inscribed in the box\". Jittered boxes use seed 0, "
                  "as `python -m fetalstudio eval segmenter --box jitter`.", ""]
        rows = []
        for mode in ("jitter", "exact"):
            per_source = validation[mode].get("per_source", {})
            for source, summary in [("all", validation[mode]), *per_source.items()]:
                rows.append({"box": mode, "images": f"{source} ({summary['n']})",
                             "Dice model": _fmt(summary["dice_mean"]), "Dice baseline": _fmt(summary["baseline_dice_mean"]),
                             "HC MAE mm model": _fmt(summary["hc_mae_mm"], 2), "HC MAE mm baseline": _fmt(summary["baseline_hc_mae_mm"], 2)})
        lines += [markdown_table(rows), ""]
    lines += ["## Limitations", "",
              "Research software, not a medical device. Trained on trans-thalamic head planes; it needs a box around the head "
              "(no automatic detection yet). Check the licences of the training data before redistributing the weights.", ""]
    return "\n".join(lines)


COMMAND = Command("segmenter", "a box-prompted fetal-head segmenter (segment-anything classes)", add_arguments, run, description=__doc__.strip())
