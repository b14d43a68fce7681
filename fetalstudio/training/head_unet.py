"""Train the prompt-free head segmenter: a U-Net from segmentation-models-pytorch (random
initialisation, grayscale in, head-mask logits out) that finds and outlines the fetal head with
no box, for the Analysis tab's and `analyze`'s automatic mode.

Data: --csv (repeatable) tables with image, mask and optional subject_group/patient_id,
pixel_size_mm, hc_mm (../shared/data/hc18_heads/pairs.csv and es_heads/pairs.csv). Outline masks
are filled as in `train segmenter` (ellipse fitted where the outline leaves the frame). The split
is `train segmenter`'s own (``fetalstudio.training.segmenter.split_items``: --val-fraction of each
CSV's subject groups, --seed), so both models are validated on the same held-out subjects. The
training images are letterboxed once into the --input-size square (image INTER_AREA, mask area-
averaged: a soft edge) and kept in OUT/cache/*.npz.

Each sample: random scale 0.75-1.33, rotation +-25 degrees, shift +-10 %, horizontal flip (0.5),
vertical flip (0.1), gamma 0.7-1.5, contrast and brightness, then one of speckle (multiplicative
noise), Gaussian blur or a lower resolution (down and up again), or none. Loss: soft Dice + binary
cross-entropy on the logits (soft targets). AdamW, linear warm-up then cosine decay. Step s draws
its batch from ``numpy.random.default_rng([seed, s])``, so a resumed run sees the same batches.

Every --eval-every steps (and at the end) the held-out images are segmented as the automatic mode
does it (``fetalstudio.segmentation.head_unet.HeadMaskPredictor``: flip test-time augmentation,
probability map at full resolution, largest region, holes filled) and measured with the Analysis
ellipse extractor: mean Dice and HC mean absolute error (mm) against `hc_mm`. OUT/model.safetensors
keeps the step with the best --select figure (Dice by default).

Output folder: model.safetensors (kind "head_segmenter": loads through the model manager),
last.safetensors, README.md (model card), metrics.json, val_per_image.csv (selected step),
validation/<source>/pairs.csv (the held-out pairs, for `eval segmenter --csv`), val_history.json, train_log.csv, run.json, time.json, cache/, state/ (resumable: run the same
command again, or with a larger --steps, to continue; --no-resume starts over).

Example (2-core CPU, one torch thread, about 0.2 s per 256 px image and step):

    python -m fetalstudio train head-unet --csv ../shared/data/hc18_heads/pairs.csv \\
        --csv ../shared/data/es_heads/pairs.csv --out runs/head-unet --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fetalstudio.cli_args import Command
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.common import add_common_arguments, check_resume_settings, previous_seconds_of, remove_run_files

CHECKPOINT = "model.safetensors"
LAST_CHECKPOINT = "last.safetensors"
METRICS = "metrics.json"
HISTORY = "val_history.json"
#: OUT/validation/<source>/pairs.csv: the held-out pairs, for `eval segmenter --csv`.
VALIDATION_FOLDER = "validation"
#: Settings that define the network and its data; a resumed run must keep them.
FIXED_SETTINGS = ("csv", "limit", "val_fraction", "seed", "config", "batch_size", "init_weights")
SELECT_CHOICES = ("dice", "hc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fetalstudio.models.head_segmenter import DEFAULT_DECODER_CHANNELS, DEFAULT_ENCODER

    data = parser.add_argument_group("data and validation")
    data.add_argument("--csv", type=Path, action="append", required=True, metavar="PAIRS_CSV",
                      help="head image/mask table (columns image, mask; subject_group or patient_id, pixel_size_mm and hc_mm when known); "
                           "give it once per dataset")
    data.add_argument("--limit", type=int, metavar="N", help="only the first N rows of every table (for quick trials)")
    data.add_argument("--val-fraction", type=float, default=0.1,
                      help="held-out share of each table's subject groups, split as `train segmenter` does (default: %(default)s)")
    data.add_argument("--eval-every", type=int, default=250, metavar="N", help="segment the held-out images every N steps and at the end")
    data.add_argument("--select", choices=SELECT_CHOICES, default="dice",
                      help="validation figure that picks the kept step: mean Dice (higher) or HC mean absolute error (lower)")
    model = parser.add_argument_group("model")
    model.add_argument("--input-size", type=int, default=256, help="square model input in pixels (default: %(default)s)")
    model.add_argument("--encoder", default=DEFAULT_ENCODER,
                       help="segmentation-models-pytorch encoder, from scratch; timm models as tu-NAME (default: %(default)s)")
    model.add_argument("--decoder-channels", default=",".join(str(c) for c in DEFAULT_DECODER_CHANNELS),
                       help="decoder widths, one per encoder stage, comma-separated (default: %(default)s)")
    model.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="precision of the saved weights")
    model.add_argument("--init-weights", type=Path, metavar="FILE",
                       help="start from a trained head U-Net (.safetensors; its encoder and decoder widths are used, "
                            "--input-size may differ: e.g. continue a 256 px model at 384 px) instead of random weights")
    optim = parser.add_argument_group("optimisation and machine")
    optim.add_argument("--warmup", type=float, default=0.03, help="linear LR warm-up as a share of --steps, cosine decay after it")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's weight decay (default: %(default)s)")
    optim.add_argument("--stop-after", type=int, metavar="N", help="end this run after N more steps, state saved (the same command continues)")
    optim.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (a shared machine: 1; default: torch's own choice)")
    add_common_arguments(parser, steps=4000, batch_size=8, lr=2e-3)


def parse_decoder_channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1:
        raise FetalStudioError(f"--decoder-channels {text!r}: give positive widths separated by commas, e.g. 64,32,16,16,8.")
    return channels


# --- data ---------------------------------------------------------------------------------------
def _cache_name(items, size: int) -> str:
    digest = hashlib.sha1(f"letterbox {size}".encode())
    for item in items:
        for path in (item.image, item.mask):
            digest.update(f"{path.resolve()}|{path.stat().st_size}|{int(path.stat().st_mtime)}\n".encode())
    return f"train_{size}px_{digest.hexdigest()[:16]}.npz"


def letterboxed_pairs(items, size: int, folder: Path, log=print) -> dict[str, np.ndarray]:
    """The training images letterboxed into ``size`` squares (uint8) with their filled masks
    (area-averaged, 0-255: the edge keeps its sub-pixel position), cached in ``folder``."""
    import cv2

    from fetalstudio.segmentation.head_unet import letterboxed_input
    from fetalstudio.segmentation.scoring import load_example

    path = folder / _cache_name(items, size)
    if path.is_file():
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    started = time.perf_counter()
    squares = np.zeros((len(items), size, size), np.uint8)
    masks = np.zeros((len(items), size, size), np.uint8)
    for index, item in enumerate(items):
        gray, truth = load_example(item)
        squares[index], box = letterboxed_input(gray, size)
        soft = cv2.resize(truth.astype(np.float32), (box.fitted_width, box.fitted_height), interpolation=cv2.INTER_AREA)
        masks[index, box.pad_y:box.pad_y + box.fitted_height, box.pad_x:box.pad_x + box.fitted_width] = np.round(soft * 255)
        if (index + 1) % 100 == 0:
            log(f"cached {index + 1}/{len(items)} training images")
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.npz")
    np.savez(temporary, squares=squares, masks=masks)
    temporary.replace(path)
    log(f"cached {len(items)} training images at {size} px in {time.perf_counter() - started:.0f} s ({path})")
    return {"squares": squares, "masks": masks}


def write_validation_csvs(folder: Path, items) -> list[Path]:
    """The held-out pairs as one CSV per source, ``folder/<source>/pairs.csv`` (absolute paths), so that
    `eval segmenter --csv ...` scores exactly the validation split under the same source names."""
    from fetalstudio.data.reports import write_csv

    written = []
    for source in sorted({item.source for item in items}):
        rows = [{"image": str(item.image.resolve()), "mask": str(item.mask.resolve()), "subject_group": item.group,
                 "pixel_size_mm": item.pixel_size_mm if item.pixel_size_mm is not None else "",
                 "hc_mm": item.hc_mm if item.hc_mm is not None else ""} for item in items if item.source == source]
        written.append(write_csv(folder / source / "pairs.csv", rows))
    return written


def augment(square: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random geometric and intensity variant of a letterboxed image and its soft mask (both uint8)."""
    import cv2

    size = square.shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-25, 25), math.exp(rng.uniform(math.log(0.75), math.log(1.33))))
    matrix[:, 2] += rng.uniform(-0.1, 0.1, size=2) * size
    if rng.random() < 0.5:
        matrix = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0, 0, 1]])
    if rng.random() < 0.1:
        matrix = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, size - 1.0]]) @ np.vstack([matrix, [0, 0, 1]])
    image = cv2.warpAffine(square, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0).astype(np.float32) / 255
    target = cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    image = image ** rng.uniform(0.7, 1.5)
    image = (image - 0.5) * rng.uniform(0.75, 1.3) + 0.5 + rng.uniform(-0.08, 0.08)
    degradation = rng.random()
    if degradation < 0.25:  # speckle: multiplicative noise
        image = image * (1 + rng.normal(0, rng.uniform(0.05, 0.25), image.shape).astype(np.float32))
    elif degradation < 0.45:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.5))
    elif degradation < 0.6:  # a coarser scanner or export
        factor = rng.uniform(0.4, 0.8)
        small = cv2.resize(image, (max(8, round(size * factor)),) * 2, interpolation=cv2.INTER_AREA)
        image = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(image * 255, 0, 255).astype(np.uint8), target


def step_batch(cache: dict[str, np.ndarray], step: int, seed: int, batch_size: int):
    """The batch of optimizer step ``step``: (N x 1 x S x S inputs in [-1, 1], N x S x S targets in [0, 1])."""
    import torch

    from fetalstudio.segmentation.head_unet import to_model_input

    rng = np.random.default_rng([seed, step])
    pairs = [augment(cache["squares"][i], cache["masks"][i], rng) for i in rng.integers(len(cache["squares"]), size=batch_size)]
    images = np.stack([image for image, _ in pairs])
    targets = np.stack([target for _, target in pairs]).astype(np.float32) / 255
    return to_model_input(images), torch.from_numpy(targets)


def dice_bce_loss(logits, targets):
    """Soft Dice (per image) + binary cross-entropy with soft targets; logits N x 1 x S x S, targets N x S x S."""
    import torch
    import torch.nn.functional as F

    logits = logits[:, 0].float()
    probabilities = torch.sigmoid(logits)
    dims = (1, 2)
    dice = 1 - (2 * (probabilities * targets).sum(dims) + 1) / (probabilities.sum(dims) + targets.sum(dims) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    return dice.mean() + bce, {"dice_loss": float(dice.mean().detach()), "bce": float(bce.detach())}


# --- validation ----------------------------------------------------------------------------------
def evaluate_head_masks(predictor, items, examples: dict) -> list[dict]:
    """One row per item (``fetalstudio.segmentation.head_scoring.head_row``): the automatic mask of
    ``predictor`` (a HeadMaskPredictor) measured as the Analysis workflow measures it. ``examples``
    (image path -> grayscale image and filled truth) is filled on first use and reused."""
    from fetalstudio.analysis.head import measure_head
    from fetalstudio.segmentation.head_scoring import head_row
    from fetalstudio.segmentation.scoring import load_example

    rows = []
    for item in items:
        if item.image not in examples:
            examples[item.image] = load_example(item)
        gray, truth = examples[item.image]
        prediction = predictor.predict(gray)
        measurement = measure_head(prediction.mask, item.pixel_size_mm)
        hc_mm = measurement.biometry.hc_mm if measurement.biometry is not None else None
        rows.append(head_row(item, truth, prediction.mask, measurement.ellipse, hc_mm, prediction.score))
    return rows


class Validator:
    """The held-out images, the history of validations (``val_history.json``) and the best step."""

    def __init__(self, items, out: Path, select: str) -> None:
        self.items, self.select = items, select
        self.examples: dict = {}
        self.path = out / HISTORY
        self.history: dict[str, dict] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    def evaluate(self, model, step: int) -> tuple[dict, list[dict]]:
        from fetalstudio.segmentation.head_scoring import summarize_head_rows, summarize_head_rows_by_source
        from fetalstudio.segmentation.head_unet import HeadMaskPredictor
        from fetalstudio.training.common import write_json

        was_training = model.training
        model.eval()
        try:
            rows = evaluate_head_masks(HeadMaskPredictor(model), self.items, self.examples)
        finally:
            model.train(was_training)
        result = {**summarize_head_rows(rows), "per_source": summarize_head_rows_by_source(rows)}
        self.history = {k: v for k, v in self.history.items() if int(k) < step}  # a redone step replaces later ones
        self.history[str(step)] = result
        write_json(self.path, self.history)
        return result, rows

    def _rank(self, step: str) -> tuple[float, int]:
        entry = self.history[step]
        value = entry["dice_mean"] if self.select == "dice" else -entry["hc_mae_mm"]
        return (value if math.isfinite(value) else -math.inf), -int(step)

    def best_step(self) -> int | None:
        return int(max(self.history, key=self._rank)) if self.history else None


# --- the command ---------------------------------------------------------------------------------
def _model_and_optimizer(config, args: argparse.Namespace):
    """A new U-Net, its AdamW optimizer and the warm-up + cosine learning-rate schedule over ``args.steps``."""
    import torch

    from fetalstudio.models.head_segmenter import build_head_segmenter, load_head_segmenter_file
    from fetalstudio.training.segmenter import lr_factor

    model = build_head_segmenter(config)
    if args.init_weights is not None:
        model.load_state_dict(load_head_segmenter_file(args.init_weights).state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args.steps, args.warmup))


def _train_step(accelerator, model, optimizer, scheduler, batch) -> tuple[float, dict]:
    """One optimizer step on ``batch`` (inputs, targets); the loss and its parts."""
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    with accelerator.autocast():
        loss, parts = dice_bce_loss(model(inputs.to(accelerator.device)), targets.to(accelerator.device))
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), parts


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from fetalstudio.data.reports import write_csv
    from fetalstudio.models.head_segmenter import HeadSegmenterConfig, count_parameters, read_head_segmenter_config, save_head_segmenter
    from fetalstudio.training.common import LOG_NAME, STATE_DIR, ResumableState, TrainingLog, device_description, finish_run, make_accelerator, write_json
    from fetalstudio.training.segmenter import split_items

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.eval_every < 1:
        raise FetalStudioError("--steps and --eval-every must be at least 1.")
    config = HeadSegmenterConfig(encoder=args.encoder, decoder_channels=parse_decoder_channels(args.decoder_channels),
                                 input_size=args.input_size)
    if args.init_weights is not None:  # the starting model's architecture, at this run's input size
        config = replace(read_head_segmenter_config(args.init_weights), input_size=args.input_size)
    if args.input_size < 64 or args.input_size % config.stride:
        raise FetalStudioError(f"--input-size {args.input_size} must be a multiple of {config.stride}, at least 64 (e.g. 256).")
    train_items, val_items, held_out = split_items(args.csv, args.val_fraction, args.seed, args.limit)

    out: Path = args.out
    if args.no_resume:
        remove_run_files(out, (STATE_DIR, HISTORY, "time.json", LOG_NAME, "run.json", CHECKPOINT, LAST_CHECKPOINT))
    out.mkdir(parents=True, exist_ok=True)
    settings = {"csv": [str(p) for p in args.csv], "limit": args.limit, "val_fraction": args.val_fraction, "seed": args.seed,
                "config": json.loads(config.to_json()), "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                "warmup": args.warmup, "steps": args.steps, "select": args.select,
                "init_weights": str(args.init_weights.resolve()) if args.init_weights else None}
    other = check_resume_settings(out, settings, FIXED_SETTINGS)
    if other:
        print(f"note: resuming with changed {', '.join(other)}", flush=True)

    total = args.steps
    accelerator = make_accelerator(args)
    model, optimizer, scheduler = accelerator.prepare(*_model_and_optimizer(config, args))
    state = ResumableState(accelerator, out)
    start = state.load()
    previous_seconds = previous_seconds_of(out, start)
    write_json(out / "run.json", settings)
    if start:
        print(f"resuming from step {start} of {total} ({out / STATE_DIR})", flush=True)

    print(f"{len(train_items)} training and {len(val_items)} validation images", flush=True)
    if val_items:
        write_validation_csvs(out / VALIDATION_FOLDER, val_items)
    cache = letterboxed_pairs(train_items, args.input_size, out / "cache", log=lambda text: print(text, flush=True))
    validator = Validator(val_items, out, args.select) if val_items else None
    log = TrainingLog(out / LOG_NAME)
    unwrapped = accelerator.unwrap_model(model)
    save_dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
    sources = sorted({item.source for item in train_items + val_items})
    data_info = {"csv": settings["csv"], "train_images": {s: sum(1 for i in train_items if i.source == s) for s in sources},
                 "val_images": {s: sum(1 for i in val_items if i.source == s) for s in sources}, "held_out_groups": held_out,
                 "split": "fetalstudio.training.segmenter.split_items (as train segmenter)"}

    def training_record(step: int) -> dict:
        return {"trained_steps": step, "train_data": data_info["csv"], "train_images": data_info["train_images"], "seed": args.seed}

    end = min(total, start + max(1, args.stop_after)) if args.stop_after else total
    model.train()
    started = time.perf_counter()
    step = start
    for step in range(start + 1, end + 1):
        loss, parts = _train_step(accelerator, model, optimizer, scheduler, step_batch(cache, step, args.seed, args.batch_size))
        if not math.isfinite(loss):
            raise FetalStudioError(f"the loss became {loss} at step {step}; lower --lr and run again (the last saved state is kept).")
        log.add(step, loss, scheduler.get_last_lr()[0], step % args.log_every == 0 or step == end, **parts)
        if validator is not None and (step % args.eval_every == 0 or step == total):
            result, rows = validator.evaluate(unwrapped, step)
            print(f"step {step} validation: Dice {result['dice_mean']:.4f} ± {result['dice_se']:.4f} (ellipse "
                  f"{result['ellipse_dice_mean']:.4f}), HC MAE {result['hc_mae_mm']:.2f} ± {result['hc_mae_se_mm']:.2f} mm, "
                  f"min Dice {result['dice_min']:.3f}", flush=True)
            if validator.best_step() == step:
                save_head_segmenter(unwrapped, out / CHECKPOINT, {**training_record(step), "selected_by": args.select}, save_dtype)
                write_csv(out / "val_per_image.csv", rows)
            model.train()
        if step % args.save_every == 0 or step == end:
            state.save(step)
            write_json(out / "time.json", {"step": step, "seconds": previous_seconds + time.perf_counter() - started})
    seconds = previous_seconds + time.perf_counter() - started
    save_head_segmenter(unwrapped, out / LAST_CHECKPOINT, training_record(step), save_dtype)
    if validator is None or not (out / CHECKPOINT).exists():  # nothing held out, or stopped before the first validation
        shutil.copyfile(out / LAST_CHECKPOINT, out / CHECKPOINT)

    best = validator.best_step() if validator is not None else None
    summary = {
        "finished": step >= total, "step": step, "steps": total, "resumed_from": start, "wall_time_s": round(seconds, 1),
        "wall_time_this_run_s": round(time.perf_counter() - started, 1), "device": device_description(accelerator),
        "torch_threads": torch.get_num_threads(), "config": json.loads(config.to_json()), "parameters": count_parameters(unwrapped),
        "training": {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "warmup": args.warmup,
                     "seed": args.seed, "loss": "soft Dice + BCE", "optimizer": "AdamW", "select": args.select,
                     "init_weights": settings["init_weights"]},
        "data": data_info, "selected_step": best if best is not None else step,
        "validation": validator.history[str(best)] if best is not None else None,
        "history": {k: {"dice_mean": v["dice_mean"], "hc_mae_mm": v["hc_mae_mm"]} for k, v in (validator.history if validator else {}).items()},
        "checkpoint": str(out / CHECKPOINT), "checkpoint_bytes": (out / CHECKPOINT).stat().st_size,
    }
    validation = summary["validation"] or {}
    finish_run(out, summary, METRICS, "README.md", model_card(summary), step, total,
               {"selected_step": summary["selected_step"], "dice_mean": validation.get("dice_mean"), "hc_mae_mm": validation.get("hc_mae_mm")})
    return 0


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def model_card(summary: dict) -> str:
    """A markdown model card from metrics.json."""
    config, data, training = summary["config"], summary["data"], summary["training"]
    lines = [
        "# FetalStudio prompt-free head segmenter (U-Net)", "",
        f"segmentation-models-pytorch `Unet`, encoder `{config['encoder']}`, decoder widths {config['decoder_channels']}, "
        f"{summary['parameters']:,} parameters, "
        + (f"continued from `{Path(training['init_weights']).name}` (itself trained from random weights)" if training.get("init_weights")
           else "all trained from random weights")
        + "; input: the grayscale image letterboxed to "
        f"{config['input_size']} x {config['input_size']} px, output: head-mask logits.",
        "Use it with `fetalstudio.segmentation.head_unet.HeadMaskPredictor` (flip test-time augmentation, probability map "
        "at full resolution, largest region, holes filled); the Analysis automatic mode uses it when it is installed.", "",
        "## Training", "",
        f"- data: {', '.join(f'`{c}`' for c in data['csv'])}",
        f"- training images: {', '.join(f'{k} {v}' for k, v in data['train_images'].items())}; held out: "
        f"{', '.join(f'{k} {v}' for k, v in data['val_images'].items())} ({data['split']})",
        "- held-out groups: " + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in data["held_out_groups"].items()),
        f"- {summary['step']} of {summary['steps']} steps on {summary['device']} in {summary['wall_time_s'] / 60:.1f} min; batch "
        f"{training['batch_size']}, AdamW lr {training['lr']:g}, {training['loss']}; augmentation: scale, rotation, shift, flips, "
        "gamma/contrast/brightness, speckle / blur / lower resolution",
        f"- kept: step {summary['selected_step']} (best validation {training['select']}), "
        f"{summary['checkpoint_bytes'] / 2**20:.1f} MiB", "",
    ]
    validation = summary.get("validation")
    if validation:
        lines += ["## Held-out validation (full resolution, no prompt)", "",
                  "| images | Dice (mean ± SE) | Dice of the fitted ellipse | HC MAE mm (± SE) | HC bias mm | min Dice |",
                  "|---|---|---|---|---|---|"]
        for source, value in [("all", validation), *validation.get("per_source", {}).items()]:
            lines.append(f"| {source} ({value['n']}) | {_fmt(value['dice_mean'])} ± {_fmt(value['dice_se'])} | "
                         f"{_fmt(value['ellipse_dice_mean'])} | {_fmt(value['hc_mae_mm'], 2)} ± {_fmt(value['hc_mae_se_mm'], 2)} | "
                         f"{_fmt(value['hc_bias_mm'], 2)} | {_fmt(value['dice_min'], 3)} |")
        lines.append("")
    lines += ["Research software, not a medical device. Check the licences of the training data before redistributing the weights.", ""]
    return "\n".join(lines)


COMMAND = Command("head-unet", "a prompt-free head segmenter (U-Net) for the automatic head mode", add_arguments, run,
                  description=__doc__.strip())
