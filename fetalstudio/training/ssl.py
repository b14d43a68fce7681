"""Self-supervised pretraining of a classifier backbone on unlabelled ultrasound images (SimCLR).

Any labels of the data are ignored: every image counts. Each step draws --batch-size images, makes
two independently augmented views of each (the classifier's own augmentations, default ``domain``:
crop, rotation, flips, gamma/contrast, blur, speckle, zoom-out, lower resolution, JPEG, burnt-in text,
sector masks) and trains a timm backbone with lightly's SimCLR projection head so that the two views
of one image lie closer together than views of other images (lightly's NT-Xent loss, --temperature).
What the backbone learns is what stays the same under those changes: the anatomy, not the scanner.

    python -m fetalstudio train ssl --data ../shared/data/spanish_planes --data ../shared/data/hc18_heads/pairs.csv \\
        --data ../shared/data/first_trimester_structures --crop fan --steps 600 --out outputs/ssl-resnet18
    python -m fetalstudio train classifier --pretrained outputs/ssl-resnet18/backbone.safetensors --crop fan ...

--data (repeatable): a folder (its labels.csv / pairs.csv / images.csv, else every image below it, e.g. a
`generate --out` folder) or a CSV with an image or filename column. African images are refused: they
are the zero-shot evaluation population and may not be trained on, labelled or not.

Output folder: backbone.safetensors (the timm backbone without a head, the same architecture, input
size and crop as `train classifier --backbone ... --input-size ... --crop ...` builds; give it to
`train classifier --pretrained`), README.md (model card), summary.json, train_log.csv, state/
(resumable: run the same command again to continue, or with a larger --steps to train on).

--pretrained FILE starts the backbone from an earlier backbone.safetensors (or any timm weights of the same
architecture) instead of random weights, with a new learning-rate schedule: a long pretraining can go on
across machines that keep nothing but that file. The projection head starts new. The backbone's metadata
counts the steps of both (``fetalstudio.steps``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fetalstudio.classification.augment import AUGMENTATIONS
from fetalstudio.cli_args import Command
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.common import StepBatchesBase, add_common_arguments, check_resume_settings, previous_seconds_of, remove_run_files

BACKBONE_FILE = "backbone.safetensors"
#: Settings that define the network and its inputs; a resumed run must keep them.
FIXED_SETTINGS = ("backbone", "input_size", "channels", "crop", "projection_dim", "hidden_dim")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="PATH",
                      help="unlabelled training images: folder or CSV (image or filename column); repeatable; labels are ignored")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet18", help="timm model, as for train classifier (default: %(default)s)")
    model.add_argument("--input-size", type=int, default=128, help="square input size in pixels (default: %(default)s)")
    model.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1 = grayscale, 3 = RGB (default: %(default)s)")
    model.add_argument("--crop", choices=["none", "fan"], default="none",
                       help="fan = crop each image to its ultrasound sector first, as train classifier --crop fan (default: %(default)s)")
    model.add_argument("--projection-dim", type=int, default=128, help="SimCLR projection output size (default: %(default)s)")
    model.add_argument("--hidden-dim", type=int, default=512, help="SimCLR projection hidden size (default: %(default)s)")
    model.add_argument("--pretrained", type=Path, metavar="FILE",
                       help="start the backbone from these weights (an earlier backbone.safetensors of the same --backbone, "
                            "to pretrain on with a new schedule) instead of random ones; a resumed run keeps its own state")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--augment", choices=[a for a in AUGMENTATIONS if a != "none"], default="domain",
                       help="how each of the two views is made (see train classifier --augment) (default: %(default)s)")
    optim.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature (default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    optim.add_argument("--warmup", type=float, default=0.05, help="share of the steps with a linear LR warm-up, then cosine decay (default: %(default)s)")
    optim.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    optim.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this run (state saved; run again to continue)")
    add_common_arguments(parser, steps=600, batch_size=64, lr=1e-3)


@dataclass(frozen=True)
class UnlabelledSource:
    path: Path
    images: tuple[Path, ...]


def load_unlabelled(values: list[str]) -> list[UnlabelledSource]:
    """Every image of each --data source; African images refused."""
    from fetalstudio.training.classifier import read_fixed_plane, refuse_african

    sources = []
    for value in values:
        path = Path(value)
        if not path.exists():
            raise FetalStudioError(f"--data {path} does not exist. Give a folder of images or a CSV with an image or filename column.")
        items = read_fixed_plane(path, "other")  # the plane is a placeholder: labels are not used
        missing = [item.path for item in items if not item.path.is_file()]
        if missing:
            raise FetalStudioError(f"--data {value}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}.")
        refuse_african(items, f"--data {value}")
        sources.append(UnlabelledSource(path, tuple(item.path for item in items)))
    if sum(len(s.images) for s in sources) < 2:
        raise FetalStudioError("--data: SimCLR needs at least 2 images (each image's views are told apart from the others').")
    return sources


class SimCLRNetwork(torch.nn.Module):
    """A timm backbone (no head) followed by lightly's SimCLR projection head."""

    def __init__(self, architecture: str, channels: int, timm_kwargs: dict, hidden_dim: int, projection_dim: int) -> None:
        import timm
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = timm.create_model(architecture, pretrained=False, num_classes=0, in_chans=channels, **timm_kwargs)
        self.projection = SimCLRProjectionHead(self.backbone.num_features, hidden_dim, projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(images))


class ViewBatches(StepBatchesBase):
    """Both views of step ``s``'s images (the images and each view's augmentation seeded by step)."""

    def __init__(self, images: list[Path], store, augmentation, preprocessing, seed: int, start: int, end: int, batch_size: int) -> None:
        super().__init__(seed, start, end, batch_size)
        self.images, self.store = images, store
        self.augmentation, self.preprocessing = augmentation, preprocessing

    def batch(self, step: int):
        rng = np.random.default_rng([self.seed, step])
        picks = rng.choice(len(self.images), size=min(self.batch_size, len(self.images)), replace=False)
        views = ([], [])
        for position, pick in enumerate(picks):
            image = self.store.get(self.images[int(pick)])
            for view in (0, 1):
                views[view].append(self.preprocessing.normalize(self.augmentation(image, np.random.default_rng([self.seed, step, position, view]))))
        return torch.stack(views[0]), torch.stack(views[1])


def run(args: argparse.Namespace) -> int:
    from lightly.loss import NTXentLoss
    from safetensors.torch import save_file

    from fetalstudio.classification.augment import make_augmentation
    from fetalstudio.classification.model import resolve_backbone, size_kwargs
    from fetalstudio.classification.predict import Preprocessing
    from fetalstudio.training.classifier import ImageStore, lr_factor
    from fetalstudio.training.common import LOG_NAME, STATE_DIR, open_run, optimizer_step, TrainingLog, device_description, finish_run, make_accelerator, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1:
        raise FetalStudioError("--steps must be at least 1.")
    if args.batch_size < 2:
        raise FetalStudioError("--batch-size must be at least 2: SimCLR tells each image's views apart from the other images'.")
    if args.input_size < 16:
        raise FetalStudioError("--input-size must be at least 16 pixels.")
    if not args.temperature > 0:
        raise FetalStudioError("--temperature must be above 0 (SimCLR uses 0.1-0.5).")
    architecture = resolve_backbone(args.backbone)
    sources = load_unlabelled(args.data)
    images = [path for source in sources for path in source.images]
    preprocessing = Preprocessing(input_size=args.input_size, in_chans=args.channels, mean=(0.5,) * args.channels,
                                  std=(0.5,) * args.channels, resize="letterbox", crop=args.crop)

    out: Path = args.out
    if args.no_resume:
        remove_run_files(out, (STATE_DIR, "time.json", LOG_NAME, "run.json"))
    out.mkdir(parents=True, exist_ok=True)
    settings = {"method": "simclr", "backbone": architecture, "input_size": args.input_size, "channels": args.channels,
                "crop": args.crop, "augment": args.augment, "projection_dim": args.projection_dim, "hidden_dim": args.hidden_dim,
                "temperature": args.temperature, "data": [str(s.path) for s in sources], "batch_size": args.batch_size,
                "lr": args.lr, "seed": args.seed, "pretrained": str(args.pretrained) if args.pretrained else None}
    other = check_resume_settings(out, settings, FIXED_SETTINGS)
    if other:
        print(f"note: resuming with changed {', '.join(other)}", flush=True)

    accelerator = make_accelerator(args)
    timm_kwargs = size_kwargs(architecture, args.input_size)
    model = SimCLRNetwork(architecture, args.channels, timm_kwargs, args.hidden_dim, args.projection_dim)
    earlier_steps = start_from_pretrained(model.backbone, args.pretrained, args.input_size, args.crop) if args.pretrained else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, args.warmup))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state, start = open_run(accelerator, out, settings)
    previous_seconds = previous_seconds_of(out, start)

    store = ImageStore(preprocessing, int(round(args.input_size * 1.25)))
    end = total if not args.stop_after else min(total, start + max(1, args.stop_after))
    batches = ViewBatches(images, store, make_augmentation(args.augment, args.input_size), preprocessing, args.seed, start, end, args.batch_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=args.workers)
    loss_fn = NTXentLoss(temperature=args.temperature)
    log = TrainingLog(out / LOG_NAME)
    started = time.perf_counter()
    step = start
    model.train()
    for first, second in loader:
        with accelerator.autocast():
            loss = loss_fn(model(first.to(accelerator.device)), model(second.to(accelerator.device)))
        if not torch.isfinite(loss):
            raise FetalStudioError(f"The SimCLR loss became {float(loss)} at step {step + 1}. Lower --lr or raise --temperature, "
                                   "then run again with --no-resume.")
        loss_value = optimizer_step(accelerator, loss, optimizer, scheduler)
        step += 1
        log.add(step, loss_value, scheduler.get_last_lr()[0], step % args.log_every == 0 or step == end)
        if step % args.save_every == 0 or step == end:
            state.save(step)
            write_json(out / "time.json", {"step": step, "seconds": previous_seconds + time.perf_counter() - started})
    seconds = previous_seconds + time.perf_counter() - started

    backbone = accelerator.unwrap_model(model).backbone
    metadata = {"fetalstudio.kind": "backbone", "fetalstudio.architecture": architecture, "fetalstudio.method": "simclr",
                "fetalstudio.input_size": str(args.input_size), "fetalstudio.in_chans": str(args.channels), "fetalstudio.crop": args.crop,
                "fetalstudio.steps": str(earlier_steps + step)}
    if args.pretrained:
        metadata["fetalstudio.pretrained"] = str(args.pretrained)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    temporary = out / (BACKBONE_FILE + ".tmp")
    save_file(weights, str(temporary), metadata=metadata)
    temporary.replace(out / BACKBONE_FILE)
    summary = {
        "finished": step >= total, "step": step, "steps": total, "resumed_from": start, "wall_time_s": round(seconds, 1),
        "device": device_description(accelerator), "architecture": architecture,
        "parameters": sum(p.numel() for p in backbone.parameters()), "settings": settings,
        "sources": [{"path": str(s.path), "images": len(s.images)} for s in sources], "images": len(images),
        "checkpoint": str(out / BACKBONE_FILE), "final_loss": log_tail_loss(out / LOG_NAME),
        "earlier_steps": earlier_steps,
    }
    finish_run(out, summary, "summary.json", "README.md", model_card(summary), step, total, {})
    return 0


def start_from_pretrained(backbone: torch.nn.Module, path: Path, input_size: int, crop: str) -> int:
    """Load ``path`` into ``backbone``; the SimCLR steps it already had (0 if not a train ssl backbone).

    A train ssl backbone records the input size and crop it learnt with; pretraining it on with others
    would mix two preprocessings, so that is refused, from the file's header before its weights are read.
    """
    from fetalstudio.classification.model import load_pretrained_weights
    from fetalstudio.models.inspect import read_safetensors_header

    metadata = {}
    if path.is_file() and path.suffix.lower() == ".safetensors":  # a missing file is reported by load_pretrained_weights
        _, metadata = read_safetensors_header(path)
    is_ssl_backbone = metadata.get("fetalstudio.kind") == "backbone"
    if is_ssl_backbone:
        learnt = {"input size": (metadata.get("fetalstudio.input_size"), str(input_size)), "crop": (metadata.get("fetalstudio.crop"), crop)}
        differing = [f"{name} {theirs} (this run: {ours})" for name, (theirs, ours) in learnt.items() if theirs is not None and theirs != ours]
        if differing:
            raise FetalStudioError(f"--pretrained {path.name} was pretrained with {', '.join(differing)}. Give the same "
                                   "--input-size and --crop to pretrain it on, or leave out --pretrained to start anew.")
    report = load_pretrained_weights(backbone, path)
    if not is_ssl_backbone:
        print(f"pretrained weights: {report['tensors_loaded']} tensors from {path}", flush=True)
        return 0
    steps = int(metadata.get("fetalstudio.steps", "0") or 0)
    print(f"pretrained backbone: {report['tensors_loaded']} tensors, {steps} SimCLR steps, from {path}", flush=True)
    return steps


def log_tail_loss(path: Path) -> float | None:
    """The last logged loss (None before the first log line)."""
    import csv

    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return float(rows[-1]["loss"]) if rows else None


def model_card(summary: dict) -> str:
    settings = summary["settings"]
    lines = [
        f"# Self-supervised backbone ({summary['architecture']}, SimCLR)", "",
        f"- input: {'grayscale' if settings['channels'] == 1 else 'RGB'}, crop {settings['crop']}, letterboxed to "
        f"{settings['input_size']}x{settings['input_size']}, pixels scaled to [-1, 1]",
        f"- views: two `{settings['augment']}` augmentations of each image; NT-Xent temperature {settings['temperature']}; "
        f"projection {settings['hidden_dim']} -> {settings['projection_dim']}",
        f"- steps: {summary['step']} of {summary['steps']} (batch {settings['batch_size']} images = {2 * settings['batch_size']} views, "
        f"lr {settings['lr']}, seed {settings['seed']}); final loss {summary['final_loss']}",
        f"- started from: {settings['pretrained']} ({summary['earlier_steps']} SimCLR steps before these)" if settings.get("pretrained")
        else "- started from: random weights",
        f"- hardware: {summary['device']}; wall time {summary['wall_time_s']} s",
        f"- data ({summary['images']} images, no labels used, no African image): "
        + ", ".join(f"`{s['path']}` ({s['images']})" for s in summary["sources"]), "",
        f"Fine-tune it: `python -m fetalstudio train classifier --pretrained {summary['checkpoint']} --backbone {summary['architecture']} "
        f"--input-size {settings['input_size']} --crop {settings['crop']} ...`", "",
    ]
    return "\n".join(lines)


COMMAND = Command("ssl", "self-supervised backbone pretraining on unlabelled images (SimCLR, lightly)", add_arguments, run,
                  description=__doc__.strip())
