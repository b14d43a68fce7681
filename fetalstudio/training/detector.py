"""Train the structure detector (a CenterNet-style heatmap detector on a timm CNN, from scratch)
on structure boxes: one heatmap channel per structure of the plane, at most one box each.

Data (--data, repeatable): a folder laid out like ../shared/data/first_trimester_structures
(images.csv + boxes.csv, boxes in each image's pixels; its more/ subfolder is read too). Only the
train part of the fixed split (fetalstudio.data.structures.split_structures: a hash of the file
name, 12 % held out) is trained on; the validation part is evaluated every --val-every steps
(AP50 and mean IoU per structure) and OUT/model.safetensors keeps the step with the best mean
AP50. A structure without a box on an image is "not annotated": its heatmap channel is left out
of the loss for that image, never taught as absent.

Augmentation: random scale 0.8-1.2, rotation +-8 degrees, shift +-8 %, horizontal flip,
brightness/contrast; boxes follow the same affine map (the corners' bounding box).

Output folder: model.safetensors (kind "detector": loads through the model manager; structures
and input size in its metadata), last.safetensors, metrics.json (validation AP50 / mean IoU per
structure of the selected step), README.md (model card), train_log.csv, val_history.json,
state/ (resumable: run the same command again to continue, or with a larger --steps).

Example (2-core CPU, about 40 minutes):

    python -m fetalstudio train detector --data ../shared/data/first_trimester_structures \\
        --steps 1200 --out runs/detector
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fetalstudio.cli_args import Command
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.common import StepBatchesBase, add_common_arguments, check_resume_settings, previous_seconds_of, remove_run_files

CHECKPOINT = "model.safetensors"
LAST_CHECKPOINT = "last.safetensors"
METRICS = "metrics.json"
#: Settings that define the network; a resumed run must keep them.
ARCHITECTURE_SETTINGS = ("backbone", "input_size", "classes", "width")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fetalstudio.vocabulary import ANATOMY_PLANES, FACIAL_SAGITTAL

    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, type=Path, metavar="FOLDER",
                      help="structures folder (images.csv + boxes.csv, and its more/); repeatable; only the train split is trained on")
    data.add_argument("--plane", default=FACIAL_SAGITTAL, choices=sorted(ANATOMY_PLANES),
                      help="layout plane whose structures are the classes (default: %(default)s)")
    data.add_argument("--val-every", type=int, default=200, help="evaluate the validation split every N steps (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet18", help="timm CNN with stride 4-32 features, from scratch (default: %(default)s)")
    model.add_argument("--input-size", type=int, default=256, help="square input in pixels, a multiple of 32 (default: %(default)s)")
    model.add_argument("--width", type=int, default=64, help="channels of the feature pyramid and heads (default: %(default)s)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    optim.add_argument("--warmup", type=float, default=0.05, help="share of the steps with a linear LR warm-up, then cosine (default: %(default)s)")
    optim.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto = a GPU when there is one (default: %(default)s)")
    optim.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    optim.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this run (state saved; run again to continue)")
    add_common_arguments(parser, steps=1200, batch_size=16, lr=1e-3)


# --- data ----------------------------------------------------------------------------------
@dataclass
class CachedImage:
    """An image scaled to fit the input square (unpadded) and its boxes in those pixels."""

    pixels: np.ndarray  # uint8 H x W, longer side = input size
    boxes: list[tuple[int, float, float, float, float]]  # class index, x0, y0, x1, y1


def load_training_images(items, classes: tuple[str, ...], size: int) -> list[CachedImage]:
    from PIL import Image

    from fetalstudio.detection.letterbox import as_gray, fit_image

    index = {name: i for i, name in enumerate(classes)}
    cached = []
    for item in items:
        try:
            with Image.open(item.path) as opened:
                gray = as_gray(opened)
        except OSError as error:
            raise FetalStudioError(f"{item.path} could not be read as an image ({error}).") from error
        if gray.shape != (item.height, item.width):
            raise FetalStudioError(f"{item.path} is {gray.shape[1]}x{gray.shape[0]} but its table says {item.width}x{item.height}; "
                                   "the boxes would not fit. Correct the width/height columns.")
        resized, box = fit_image(gray, size)
        boxes = [(index[name], x0 * box.scale_x, y0 * box.scale_y, x1 * box.scale_x, y1 * box.scale_y)
                 for name, x0, y0, x1, y1 in item.boxes]
        cached.append(CachedImage(resized, boxes))
    return cached


def check_structures(items, classes: tuple[str, ...], plane: str) -> None:
    unknown = sorted({name for item in items for name in item.structures} - set(classes))
    if unknown:
        example = next(item.path for item in items if unknown[0] in item.structures)
        raise FetalStudioError(f"structure(s) {', '.join(unknown)} (e.g. on {example}) are not structures of the plane {plane} "
                               f"({', '.join(classes)}). Rename them in boxes.csv or pick another --plane.")


def augmented_sample(image: CachedImage, size: int, rng: np.random.Generator, augment: bool = True):
    """The padded square input and its boxes after a random affine map (or just the padding)."""
    import cv2

    height, width = image.pixels.shape
    matrix = np.array([[1.0, 0.0, (size - width) // 2], [0.0, 1.0, (size - height) // 2], [0.0, 0.0, 1.0]])
    pixels = image.pixels
    if augment:
        scale = rng.uniform(0.8, 1.2)
        angle = rng.uniform(-8, 8)
        shift = rng.uniform(-0.08, 0.08, size=2) * size
        rotation = np.vstack([cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale), [0, 0, 1]])
        rotation[:2, 2] += shift
        matrix = rotation @ matrix
        if rng.random() < 0.5:
            matrix = np.array([[-1.0, 0.0, size], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ matrix
        contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
        pixels = np.clip(pixels.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
    square = cv2.warpAffine(pixels, matrix[:2], (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    boxes = []
    for cls, x0, y0, x1, y1 in image.boxes:
        corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]]) @ matrix[:2].T
        (bx0, by0), (bx1, by1) = corners.min(axis=0), corners.max(axis=0)
        cx0, cy0, cx1, cy1 = max(bx0, 0), max(by0, 0), min(bx1, size), min(by1, size)
        # a box mostly pushed out of the frame is treated as not annotated in this sample
        if cx1 - cx0 >= 1 and cy1 - cy0 >= 1 and (cx1 - cx0) * (cy1 - cy0) >= 0.6 * (bx1 - bx0) * (by1 - by0):
            boxes.append((cls, cx0, cy0, cx1, cy1))
    return square, boxes


class StepBatches(StepBatchesBase):
    """Step ``s``'s batch (drawn from ``numpy.random.default_rng([seed, step])``, so a resumed run sees the
    same batches): augmented squares, heatmap targets, annotated-structure masks and box targets."""

    def __init__(self, images: list[CachedImage], n_classes: int, size: int, seed: int, start: int, end: int, batch_size: int) -> None:
        super().__init__(seed, start, end, batch_size)
        self.images, self.n_classes, self.size = images, n_classes, size

    def batch(self, step: int):
        import torch

        from fetalstudio.detection.targets import encode

        rng = np.random.default_rng([self.seed, step])
        inputs, heatmaps, masks, objects = [], [], [], []
        for position, chosen in enumerate(rng.integers(len(self.images), size=self.batch_size)):
            square, boxes = augmented_sample(self.images[int(chosen)], self.size, rng)
            heatmap, found = encode(boxes, self.n_classes, self.size)
            mask = np.zeros(self.n_classes, dtype=bool)
            mask[[box[0] for box in boxes]] = True
            inputs.append(square)
            heatmaps.append(heatmap)
            masks.append(mask)
            objects.append(np.concatenate([np.full((len(found), 1), position, dtype=np.float32), found], axis=1))
        return (torch.from_numpy(np.stack(inputs))[:, None].float() / 127.5 - 1, torch.from_numpy(np.stack(heatmaps)),
                torch.from_numpy(np.stack(masks)), torch.from_numpy(np.concatenate(objects)))


# --- validation ------------------------------------------------------------------------------
class Validator:
    """AP50 / mean IoU per structure on the validation split; remembers the best step (mean AP50)."""

    def __init__(self, items, classes: tuple[str, ...], out: Path) -> None:
        from PIL import Image

        from fetalstudio.detection.letterbox import as_gray

        self.items, self.classes = items, classes
        self.images = []
        for item in items:
            with Image.open(item.path) as opened:
                self.images.append(as_gray(opened))
        self.history_path = out / "val_history.json"
        self.history: dict[str, dict] = {}
        if self.history_path.exists():
            self.history = json.loads(self.history_path.read_text(encoding="utf-8"))

    def evaluate(self, model, step: int) -> dict:
        from fetalstudio.training.common import write_json

        from fetalstudio.detection.predict import StructureDetector

        result = StructureDetector(model).evaluate(self.images, [item.boxes for item in self.items])
        self.history = {k: v for k, v in self.history.items() if int(k) < step}  # a redone step replaces later ones
        self.history[str(step)] = result
        write_json(self.history_path, self.history)
        return result

    def best_step(self) -> int | None:
        if not self.history:
            return None
        return int(max(self.history, key=lambda k: (_finite(self.history[k]["map50"]), -int(k))))

    def summary(self) -> dict:
        best = self.best_step()
        return {"images": len(self.items), "selected": {"step": best, **self.history[str(best)]} if best is not None else None,
                "history": {k: {"map50": v["map50"], "mean_iou": v["mean_iou"]} for k, v in self.history.items()}}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1.0


# --- training --------------------------------------------------------------------------------
def _accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    set_seed(args.seed)
    return accelerator


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from fetalstudio.data.structures import read_structure_folders, split_structures
    from fetalstudio.detection.targets import detector_loss
    from fetalstudio.models.detector import DetectorConfig, build_detector, save_detector
    from fetalstudio.training.classifier import lr_factor
    from fetalstudio.training.common import LOG_NAME, STATE_DIR, open_run, optimizer_step, TrainingLog, device_description, finish_run, write_json
    from fetalstudio.vocabulary import structures_for

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.val_every < 1:
        raise FetalStudioError("--steps and --val-every must be at least 1.")
    if args.input_size < 64 or args.input_size % 32:
        raise FetalStudioError(f"--input-size {args.input_size} must be a multiple of 32, at least 64 (e.g. 256).")
    for folder in args.data:
        if not folder.is_dir():
            raise FetalStudioError(f"--data {folder} is not a folder. Give a structures folder with images.csv and boxes.csv.")
    classes = tuple(s.name for s in structures_for(args.plane))
    items = read_structure_folders(args.data)
    check_structures(items, classes, args.plane)
    train_items, val_items = split_structures(items, "train"), split_structures(items, "val")
    train_items = [item for item in train_items if item.boxes]
    if not train_items:
        raise FetalStudioError("the train split holds no image with boxes; give a folder with more annotated images.")

    out: Path = args.out
    if args.no_resume:
        remove_run_files(out, (STATE_DIR, "val_history.json", "time.json", LOG_NAME, "run.json"))
    out.mkdir(parents=True, exist_ok=True)
    settings = {"backbone": args.backbone, "input_size": args.input_size, "classes": list(classes), "width": args.width,
                "plane": args.plane, "data": [str(folder) for folder in args.data], "batch_size": args.batch_size,
                "seed": args.seed, "lr": args.lr, "weight_decay": args.weight_decay}
    other = check_resume_settings(out, settings, ARCHITECTURE_SETTINGS)
    if other:
        print(f"note: resuming with changed {', '.join(other)}", flush=True)

    accelerator = _accelerator(args)
    config = DetectorConfig(classes=classes, backbone=args.backbone, input_size=args.input_size, width=args.width)
    model = build_detector(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, args.warmup))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state, start = open_run(accelerator, out, settings)
    previous_seconds = previous_seconds_of(out, start)

    print(f"{len(train_items)} training and {len(val_items)} validation images; decoding...", flush=True)
    images = load_training_images(train_items, classes, args.input_size)
    validator = Validator(val_items, classes, out) if val_items else None
    end = total if not args.stop_after else min(total, start + max(1, args.stop_after))
    batches = StepBatches(images, len(classes), args.input_size, args.seed, start, end, args.batch_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=args.workers)
    log = TrainingLog(out / LOG_NAME)
    training_info = {"plane": args.plane, "data": settings["data"], "split": "fetalstudio.data.structures.split_structures train",
                     "train_images": len(train_items), "validation_images": len(val_items), "steps": total,
                     "batch_size": args.batch_size, "seed": args.seed}

    started = time.perf_counter()
    step = start
    model.train()
    for inputs, heatmaps, masks, objects in loader:
        device = accelerator.device
        with accelerator.autocast():
            outputs = model(inputs.to(device))
        loss, parts = detector_loss(outputs, heatmaps.to(device), masks.to(device), objects.to(device))
        if not torch.isfinite(loss):
            raise FetalStudioError(f"the loss became {float(loss)} at step {step + 1}; lower --lr and run again "
                                   "(the last saved state is kept).")
        loss_value = optimizer_step(accelerator, loss, optimizer, scheduler)
        step += 1
        log.add(step, loss_value, scheduler.get_last_lr()[0], step % args.log_every == 0 or step == end, **parts)
        if validator is not None and (step % args.val_every == 0 or step == total):
            result = validator.evaluate(accelerator.unwrap_model(model), step)
            print(f"step {step} validation mAP50 {result['map50']:.4f} mean IoU {result['mean_iou']:.4f}", flush=True)
            if validator.best_step() == step:
                save_detector(accelerator.unwrap_model(model), out / CHECKPOINT, {**training_info, "selected_step": step})
            model.train()
        if step % args.save_every == 0 or step == end:
            state.save(step)
            write_json(out / "time.json", {"step": step, "seconds": previous_seconds + time.perf_counter() - started})
    seconds = previous_seconds + time.perf_counter() - started
    unwrapped = accelerator.unwrap_model(model)
    save_detector(unwrapped, out / LAST_CHECKPOINT, {**training_info, "selected_step": step})
    if validator is None or not (out / CHECKPOINT).exists():  # no validation ran yet in a short run
        shutil.copyfile(out / LAST_CHECKPOINT, out / CHECKPOINT)

    validation = validator.summary() if validator is not None else None
    summary = {
        "finished": step >= total, "step": step, "steps": total, "resumed_from": start, "wall_time_s": round(seconds, 1),
        "wall_time_this_run_s": round(time.perf_counter() - started, 1), "device": device_description(accelerator),
        "architecture": f"centernet/{args.backbone}", "parameters": sum(p.numel() for p in unwrapped.parameters()),
        "settings": settings, "train_images": len(train_items), "train_boxes": sum(len(i.boxes) for i in train_items),
        "validation": validation, "checkpoint": str(out / CHECKPOINT), "checkpoint_bytes": (out / CHECKPOINT).stat().st_size,
    }
    selected = (validation or {}).get("selected") or {}
    finish_run(out, summary, METRICS, "README.md", model_card(summary), step, total,
               {"map50": selected.get("map50"), "mean_iou": selected.get("mean_iou"), "selected_step": selected.get("step")})
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def model_card(summary: dict) -> str:
    from fetalstudio.detection.predict import EVALUATION_SCORE_THRESHOLD

    settings = summary["settings"]
    lines = [
        f"# Structure detector ({summary['architecture']}, plane {settings['plane']})", "",
        f"- structures (heatmap channel order): {', '.join(settings['classes'])}",
        f"- input: grayscale, letterboxed to {settings['input_size']}x{settings['input_size']}, pixels scaled to [-1, 1]; "
        "one heatmap channel per structure at stride 4, log box size and centre offset at the peak",
        f"- weights: random initialisation (from scratch), {summary['parameters']:,} parameters; "
        f"checkpoint {summary['checkpoint_bytes'] / 2**20:.1f} MiB",
        f"- data: {', '.join(f'`{d}`' for d in settings['data'])} (with more/), train split only: "
        f"{summary['train_images']} images, {summary['train_boxes']} boxes",
        f"- steps: {summary['step']} of {summary['steps']} (batch {settings['batch_size']}, lr {settings['lr']}, seed {settings['seed']})",
        f"- hardware: {summary['device']}; wall time {summary['wall_time_s'] / 60:.1f} min",
    ]
    validation = summary.get("validation")
    if validation and validation.get("selected"):
        selected = validation["selected"]
        lines += ["", "## Validation split (never trained on)", "",
                  f"{validation['images']} images (hash of the file name, fetalstudio.data.structures.split_structures); "
                  f"model.safetensors is the step with the best mean AP50: step {selected['step']}. AP50 = area under "
                  "the precision envelope at IoU 0.5; mean IoU = each annotated box's IoU with the detection of its "
                  "structure (0 when none); one detection per structure, score >= "
                  f"{EVALUATION_SCORE_THRESHOLD}.", "",
                  "| structure | boxes | AP50 | mean IoU |", "|---|---|---|---|"]
        for name, value in selected["per_structure"].items():
            lines.append(f"| {name} | {value['boxes']} | {_fmt(value['ap50'])} | {_fmt(value['mean_iou'])} |")
        lines.append(f"| **mean** | | **{_fmt(selected['map50'])}** | **{_fmt(selected['mean_iou'])}** |")
    lines += ["", "Load it with `ModelManager(...).get(path)` and detect with "
              "`fetalstudio.detection.predict.StructureDetector(model).detect(image)` (boxes in the image's own pixels).",
              "Research software, not a medical device.", ""]
    return "\n".join(lines)


COMMAND = Command("detector", "a structure detector (boxes of a layout plane's structures)", add_arguments, run,
                  description=__doc__.strip())
