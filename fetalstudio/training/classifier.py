"""Train a timm plane classifier (abdomen, brain, femur, thorax, other) with a new 5-way head.

Backbones: any timm model; the paper's are resnet18, densenet169, efficientnet_b0,
mobilenetv2_100 and vit_base_patch16_224. Weights start random, or from a local timm weights file
(--pretrained FILE: .safetensors/.pth of the same architecture; its 1000-class head is dropped,
RGB stem weights are summed for grayscale input, ViT position embeddings are resampled).

Training data (--data, repeatable): a folder with one sub-folder per plane (e.g.
../shared/data/spanish_planes, or a `python -m fetalstudio generate` output folder, whose
OUT/<plane>/<sampler>/*.png layout is read as such), or a CSV with filename,plane columns.
Mixing real and synthetic images: give each source a share after a colon,

    --data ../shared/data/spanish_planes:0.5 --data datasets/fetalstudio-tiny:0.5

and that share of all training samples is drawn from it (shares on every source are normalised;
without any shares the sources are pooled; sources without a share beside ones with a share are
pooled and drawn with the rest, e.g. five real sources pooled beside --data synthetic:0.5). --balance (default) draws the
planes of each source equally often (pooled sources: the planes of the pool, each plane's images
from every source together).

Images of one plane without a plane column (head-measurement sets, an image folder): give the
plane after an equals sign, before any share,

    --data ../shared/data/hc18_heads/pairs.csv=brain --data ../shared/data/es_heads/pairs.csv=brain:0.1

A CSV is read through its image (or filename) column, paths relative to the CSV; a folder
through its labels.csv / pairs.csv / images.csv if it has one, else every image below it.
African images (FU-LoRA's zero-shot population) are refused in --data, whatever the option.

--crop fan crops every image to its ultrasound sector (``fetalstudio.classification.fan``:
burnt-in text and scanner UI outside the sector blacked out) in training and, through the
checkpoint's preprocessing metadata, wherever the model predicts. Every step draws its images from a generator seeded by
(seed, step), so the data order does not depend on interruptions; summary.json counts the
samples drawn per source and plane.

Model selection: --val PATH (labelled images, e.g. ../shared/data/african/train/labels.csv) is
evaluated every --val-every steps and OUT/model.safetensors keeps the step with the best
accuracy (then macro F1). The validation images are never trained on (a path given to both
--data and --val is refused). Without --val, model.safetensors is the last step.

Output folder: model.safetensors (loads through the model manager; preprocessing and classes in
its metadata), last.safetensors (with --val), README.md (model card), summary.json,
train_log.csv, val_history.json, state/ (resumable). Run the same command again to continue
after an interruption, or with a larger --steps to train on.

Example (from scratch, grayscale 128 px, strong augmentation, selected on the African planes):

    python -m fetalstudio train classifier --backbone resnet18 \\
        --data ../shared/data/spanish_planes --val ../shared/data/african/train/labels.csv \\
        --steps 600 --out outputs/classifier-resnet18
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.classification.augment import AUGMENTATIONS
from fetalstudio.cli_args import Command
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.common import StepBatchesBase, add_common_arguments, check_resume_settings, previous_seconds_of, remove_run_files

CHECKPOINT = "model.safetensors"
LAST_CHECKPOINT = "last.safetensors"
#: Settings that define the network; a resumed run must keep them.
ARCHITECTURE_SETTINGS = ("backbone", "input_size", "channels", "classes", "crop")
CROP_MODES = ("none", "fan")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="PATH[=PLANE][:SHARE]",
                      help="labelled training images: folder of plane sub-folders or CSV (filename,plane); repeatable; "
                           "=PLANE labels every image of a CSV (image or filename column) or folder with that plane "
                           "(e.g. hc18_heads/pairs.csv=brain); "
                           "SHARE = part of the training samples drawn from this source (e.g. real:0.3 synthetic:0.7); "
                           "sources without a share are pooled and drawn with the rest (e.g. the real sources beside synthetic:0.5)")
    data.add_argument("--val", type=Path, help="labelled validation images for checkpoint selection (never trained on)")
    data.add_argument("--val-every", type=int, default=50, help="evaluate on --val every N steps (default: %(default)s)")
    data.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                      help="draw the planes of each source equally often")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet18",
                       help="timm model: resnet18, densenet169, efficientnet_b0, mobilenetv2_100, vit_base_patch16_224 or any timm name (default: %(default)s)")
    model.add_argument("--pretrained", type=Path, metavar="FILE",
                       help="local timm weights file of the same architecture (default: train from scratch)")
    model.add_argument("--input-size", type=int, default=128, help="square input size in pixels (the paper: 512; 128 is CPU-friendly) (default: %(default)s)")
    model.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1 = grayscale input, 3 = RGB (default: %(default)s)")
    model.add_argument("--crop", choices=list(CROP_MODES), default="none",
                       help="fan = crop each image to its ultrasound sector and black out text/UI outside it, in training "
                            "and (recorded in the checkpoint) at prediction time; none = the whole image (default: %(default)s)")
    model.add_argument("--head-init", choices=["zero", "timm"], default="zero",
                       help="new head: zero (all planes equally likely at the start) or timm's random init (default: %(default)s)")
    model.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the head (default: %(default)s)")
    model.add_argument("--tta", choices=["none", "hflip"], default="none",
                       help="test-time augmentation recorded in the checkpoint (hflip: average with the mirrored image) (default: %(default)s)")
    model.add_argument("--save-dtype", choices=["fp32", "fp16"], default="fp32", help="precision of the saved weights (default: %(default)s)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--augment", choices=AUGMENTATIONS, default="strong",
                       help="none; paper = rotation +-25 deg, hflip 0.5, vflip 0.1 (pixels in [-1, 1]); "
                            "strong = paper + random resized crop, brightness/contrast/gamma, blur, speckle noise, erasing; "
                            "domain = strong + zoom-out, low resolution, JPEG, burnt-in text, sector mask (default: %(default)s)")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy (default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    optim.add_argument("--warmup", type=float, default=0.1, help="share of the steps with a linear LR warm-up (then cosine decay) (default: %(default)s)")
    optim.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                       help="keep an exponential moving average of the weights (e.g. 0.99, with warm-up); "
                            "validation and the checkpoints use it (0 = off)")
    optim.add_argument("--linear-probe-steps", type=int, default=0, metavar="N",
                       help="train only the new head for the first N steps, then everything (LP-FT: the head is fitted "
                            "before it can pull the --pretrained features around; the backbone gets its own warm-up) (default: %(default)s)")
    optim.add_argument("--backbone-lr-scale", type=float, default=1.0, metavar="S",
                       help="the backbone's learning rate is S times --lr, the head's is --lr (e.g. 0.1 keeps --pretrained "
                            "features closer to what they learnt) (default: %(default)s)")
    optim.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    optim.add_argument("--stop-after", type=int, metavar="N",
                       help="stop after N steps of this run (state saved; run again to continue)")
    add_common_arguments(parser, steps=600, batch_size=32, lr=2e-3)


# --- data ----------------------------------------------------------------------------------
@dataclass
class Source:
    path: Path
    share: float | None
    items: list  # LabelledImage
    labels: list[int]
    plane: str | None = None  # every image labelled this plane (PATH=PLANE)

    @property
    def name(self) -> str:
        return str(self.path) + (f"={self.plane}" if self.plane else "") + (f":{self.share:g}" if self.share else "")


def parse_data_argument(text: str) -> tuple[Path, float | None]:
    """``PATH`` or ``PATH:SHARE`` (a path may itself contain colons; the share is a number > 0)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            share = float(tail)
        except ValueError:
            return Path(text), None
        if not share > 0 or math.isinf(share):
            raise FetalStudioError(f"--data {text}: the share after the colon must be a number above 0.")
        return Path(head), share
    return Path(text), None


def split_fixed_plane(text: str, planes: tuple[str, ...]) -> tuple[str, str | None]:
    """``PATH=PLANE`` -> (PATH, PLANE); a path without a known plane after its last ``=`` is kept whole."""
    head, sep, tail = text.rpartition("=")
    if sep and head and tail.strip().lower() in planes:
        return head, tail.strip().lower()
    return text, None


def read_fixed_plane(path: Path, plane: str) -> list:
    """Every image of a CSV (image or filename column) or folder, labelled ``plane``."""
    from fetalstudio.data.tables import IMAGE_SUFFIXES, LabelledImage, read_csv_rows

    table = path
    if path.is_dir():
        table = next((path / name for name in ("labels.csv", "pairs.csv", "images.csv") if (path / name).is_file()), None)
        if table is None:
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FetalStudioError(f"--data {path}={plane}: the folder holds no images.")
            return [LabelledImage(image, plane) for image in images]
    rows = read_csv_rows(table)
    column = next((c for c in ("image", "filename") if rows and c in rows[0]), None)
    if column is None:
        raise FetalStudioError(f"--data {path}={plane}: {table} needs an image (or filename) column.")
    group_column = next((c for c in ("subject_group", "patient_id", "case_id") if c in rows[0]), None)
    return [LabelledImage(table.parent / row[column].strip(), plane, (row.get(group_column) or "") if group_column else "")
            for row in rows if (row.get(column) or "").strip()]


def refuse_african(items, what: str) -> None:
    """African images are the zero-shot evaluation population: never trained on, labelled or not."""
    from fetalstudio.training.image_datasets import is_african_image

    african = [item.path for item in items if is_african_image(item.path)]
    if african:
        raise FetalStudioError(
            f"{what}: {len(african)} African image(s) (e.g. {african[0]}). They are FetalStudio's zero-shot "
            "evaluation population (FU-LoRA, METHODS section 1) and must never be trained on; use them only "
            "as --val or with `eval classifier`."
        )


def load_sources(values: list[str], classes: tuple[str, ...]) -> list[Source]:
    from fetalstudio.data.tables import read_classification

    sources = []
    for value in values:
        path_share, share = parse_data_argument(value)
        text, plane = split_fixed_plane(str(path_share), classes)
        path = Path(text)
        if not path.exists():
            raise FetalStudioError(f"--data {path} does not exist. Give a folder of plane sub-folders or a CSV with filename,plane.")
        items = read_fixed_plane(path, plane) if plane else read_classification(path)
        check_labelled(items, classes, f"--data {value}")
        refuse_african(items, f"--data {value}")
        sources.append(Source(path, share, items, [classes.index(item.plane) for item in items], plane))
    given = [s.share for s in sources if s.share is not None]
    if given and len(given) < len(sources) and not sum(given) < 1:
        raise FetalStudioError(
            f"The --data shares add up to {sum(given):g}, but the sources without a share are pooled and drawn with the rest "
            "(1 - the shares): make the given shares add up to less than 1 (e.g. synthetic:0.5 beside the real sources), "
            "or give every source a share."
        )
    return sources


def check_labelled(items, classes: tuple[str, ...], what: str) -> None:
    unknown = sorted({item.plane for item in items} - set(classes))
    if unknown:
        example = next(item.path for item in items if item.plane == unknown[0])
        raise FetalStudioError(
            f"{what}: unknown plane(s) {', '.join(unknown)} (e.g. {example}). Planes are {', '.join(classes)}; "
            "rename the folders / plane column, or leave those images out."
        )
    missing = [item.path for item in items if not item.path.is_file()]
    if missing:
        raise FetalStudioError(f"{what}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}.")


class MixtureSampler:
    """Draws (source, item) pairs: a source by its share, then (balanced) a plane, then an image.

    Sources without a share are pooled: balanced, a plane of the pool is drawn first and then an
    image of that plane from any pooled source (so a large one-plane set such as HC18 adds variety
    to its plane, not weight); unbalanced, every pooled image is equally likely. With shares on some
    sources only, the pool is drawn with the rest of the probability (1 - the given shares), e.g.
    the real sources pooled at 0.5 beside ``synthetic:0.5``. Shares on every source are normalised.
    Step ``s`` uses ``numpy.random.default_rng([seed, s])``, so any step can be redrawn exactly.
    """

    def __init__(self, sources: list[Source], seed: int, balance: bool) -> None:
        import numpy as np

        self.seed = seed
        self.balance = balance
        shared = [s.share is not None for s in sources]
        self.mixed = any(shared) and not all(shared)
        weights = np.asarray([s.share if all(shared) else len(s.items) for s in sources], dtype=np.float64)
        self.probabilities = weights / weights.sum()  # per source, when no source is pooled beside a shared one
        # mixed: one unit per source (a pooled source's own unit has probability 0), then the pool with the rest
        shares = np.asarray([s.share or 0.0 for s in sources], dtype=np.float64)
        self.unit_probabilities = np.append(shares, 1.0 - shares.sum()) if self.mixed else None
        self.by_class = []
        for source in sources:
            groups: dict[int, list[int]] = {}
            for index, label in enumerate(source.labels):
                groups.setdefault(label, []).append(index)
            self.by_class.append([groups[k] for k in sorted(groups)])
        self.sizes = [len(s.items) for s in sources]
        pooled_numbers = [n for n, s in enumerate(sources) if s.share is None]
        pooled: dict[int, list[tuple[int, int]]] = {}
        for number in pooled_numbers:
            for index, label in enumerate(sources[number].labels):
                pooled.setdefault(label, []).append((number, index))
        self.pooled_items = [pair for k in sorted(pooled) for pair in pooled[k]]
        self.pooled_by_class: list[list[tuple[int, int]]] = []
        if balance and (self.mixed or (len(sources) > 1 and not any(shared))):
            self.pooled_by_class = [pooled[k] for k in sorted(pooled)]

    def _from_pool(self, rng) -> tuple[int, int]:
        if self.pooled_by_class:
            group = self.pooled_by_class[int(rng.integers(len(self.pooled_by_class)))]
            return group[int(rng.integers(len(group)))]
        return self.pooled_items[int(rng.integers(len(self.pooled_items)))]

    def _from_source(self, source: int, rng) -> tuple[int, int]:
        if self.balance:
            group = self.by_class[source][int(rng.integers(len(self.by_class[source])))]
            return source, group[int(rng.integers(len(group)))]
        return source, int(rng.integers(self.sizes[source]))

    def draw(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        import numpy as np

        rng = np.random.default_rng([self.seed, step])
        if self.mixed:
            pool = len(self.sizes)
            units = rng.choice(pool + 1, size=batch_size, p=self.unit_probabilities)
            return [self._from_pool(rng) if int(unit) == pool else self._from_source(int(unit), rng) for unit in units]
        if self.pooled_by_class:
            return [self._from_pool(rng) for _ in range(batch_size)]
        chosen = rng.choice(len(self.sizes), size=batch_size, p=self.probabilities)
        return [self._from_source(int(source), rng) for source in chosen]


def count_draws(sampler: MixtureSampler, sources: list[Source], steps: int, batch_size: int, classes) -> list[dict]:
    """Samples drawn over steps [0, steps) per source and plane (redrawn, not logged)."""
    counts = [{"total": 0, "per_plane": {c: 0 for c in classes}} for _ in sources]
    for step in range(steps):
        for source, item in sampler.draw(step, batch_size):
            counts[source]["total"] += 1
            counts[source]["per_plane"][classes[sources[source].labels[item]]] += 1
    return counts


class ImageStore:
    """Training images decoded once, squared (letterbox) at the working size, kept in memory."""

    def __init__(self, preprocessing, size: int) -> None:
        self.preprocessing = preprocessing
        self.size = size
        self.cache: dict[Path, object] = {}

    def get(self, path: Path):
        image = self.cache.get(path)
        if image is None:
            from PIL import Image

            try:
                with Image.open(path) as opened:
                    opened.load()
                    image = self.preprocessing.square(opened, self.size)
            except OSError as error:
                raise FetalStudioError(f"{path} could not be read as an image ({error}).") from error
            self.cache[path] = image
        return image


class StepBatches(StepBatchesBase):
    """Step ``s``'s batch of augmented training images and their labels."""

    def __init__(self, sources, sampler, store, augmentation, preprocessing, seed, start, steps, batch_size) -> None:
        super().__init__(seed, start, steps, batch_size)
        self.sources, self.sampler, self.store = sources, sampler, store
        self.augmentation, self.preprocessing = augmentation, preprocessing

    def batch(self, step: int):
        import numpy as np
        import torch

        inputs, labels = [], []
        for position, (source, item) in enumerate(self.sampler.draw(step, self.batch_size)):
            rng = np.random.default_rng([self.seed, step, position, 1])
            image = self.store.get(self.sources[source].items[item].path)
            inputs.append(self.preprocessing.normalize(self.augmentation(image, rng)))
            labels.append(self.sources[source].labels[item])
        return torch.stack(inputs), torch.tensor(labels, dtype=torch.long)


# --- training --------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 2 % of the peak."""
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, args: argparse.Namespace, total: int):
    """AdamW and its warm-up + cosine schedule; the head and the backbone as two groups when they differ.

    The backbone's factor is 0 during the linear probe, then ``--backbone-lr-scale`` times a schedule of
    its own over the remaining steps (a fresh warm-up); the head follows the whole run's schedule.
    """
    import torch

    def head_factor(step: int) -> float:
        return lr_factor(step, total, args.warmup)

    if args.linear_probe_steps == 0 and args.backbone_lr_scale == 1.0:  # one group, as runs before these levers
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, head_factor)
    head = model.get_classifier()
    head_ids = {id(p) for p in head.parameters()}
    if not head_ids:
        raise FetalStudioError(f"--linear-probe-steps / --backbone-lr-scale: {type(model).__name__} has no separate head to train apart.")
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    probe = args.linear_probe_steps

    def backbone_factor(step: int) -> float:
        return 0.0 if step < probe else args.backbone_lr_scale * lr_factor(step - probe, total - probe, args.warmup)

    optimizer = torch.optim.AdamW([{"params": backbone}, {"params": list(head.parameters())}], lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [backbone_factor, head_factor])


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from fetalstudio.classification.augment import make_augmentation
    from fetalstudio.classification.model import ClassifierSpec, build_model, resolve_backbone, save_classifier, size_kwargs
    from fetalstudio.classification.predict import PLANE_CLASSES, Preprocessing
    from fetalstudio.training.common import STATE_DIR, LOG_NAME, open_run, optimizer_step, TrainingLog, device_description, finish_run, make_accelerator, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_size < 1:
        raise FetalStudioError("--steps and --batch-size must be at least 1.")
    if args.input_size < 16:
        raise FetalStudioError("--input-size must be at least 16 pixels.")
    if not 0 <= args.linear_probe_steps < args.steps:
        raise FetalStudioError(f"--linear-probe-steps must be from 0 to below --steps ({args.steps}): the backbone needs steps after the probe.")
    if not 0 < args.backbone_lr_scale <= 10:
        raise FetalStudioError("--backbone-lr-scale must be above 0 and at most 10 (e.g. 0.1); to keep the backbone fixed, use --linear-probe-steps.")
    classes = PLANE_CLASSES
    architecture = resolve_backbone(args.backbone)
    preprocessing = Preprocessing(input_size=args.input_size, in_chans=args.channels,
                                  mean=(0.5,) * args.channels, std=(0.5,) * args.channels, resize="letterbox",
                                  crop=args.crop)
    spec = ClassifierSpec(architecture, preprocessing, classes, size_kwargs(architecture, args.input_size),
                          tta="" if args.tta == "none" else args.tta)
    sources = load_sources(args.data, classes)
    val_items = _validation_items(args.val, sources, classes)

    out: Path = args.out
    if args.no_resume:
        remove_run_files(out, (STATE_DIR, "val_history.json", "selection.json", "time.json", LOG_NAME, "run.json"))
    out.mkdir(parents=True, exist_ok=True)
    settings = {"backbone": architecture, "input_size": args.input_size, "channels": args.channels, "classes": list(classes),
                "augment": args.augment, "data": [s.name for s in sources],
                "crop": None if args.crop == "none" else args.crop,  # None: as runs from before --crop recorded it
                "balance": args.balance, "ema": args.ema, "head_init": args.head_init, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
                "pretrained": str(args.pretrained) if args.pretrained else None,
                "linear_probe_steps": args.linear_probe_steps, "backbone_lr_scale": args.backbone_lr_scale}
    other = check_resume_settings(out, settings, ARCHITECTURE_SETTINGS)
    if other:
        print(f"note: resuming with changed {', '.join(other)}", flush=True)

    accelerator = make_accelerator(args)
    model, pretrained_report = build_model(spec, args.pretrained, drop_rate=args.drop_rate, zero_head=args.head_init == "zero")
    if pretrained_report:
        print(f"pretrained weights: {pretrained_report['tensors_loaded']} tensors from {args.pretrained}", flush=True)
    total = args.steps
    optimizer, scheduler = make_optimizer(model, args, total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = None
    if args.ema > 0:
        if not args.ema < 1:
            raise FetalStudioError("--ema must be between 0 and 1 (e.g. 0.99).")
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.ema, use_warmup=True, warmup_power=0.75)
        accelerator.register_for_checkpointing(ema)  # saved and resumed with the state
    state, start = open_run(accelerator, out, settings)
    previous_seconds = previous_seconds_of(out, start)

    base_size = args.input_size if args.augment not in ("strong", "domain") else int(round(args.input_size * 1.25))
    store = ImageStore(preprocessing, base_size)
    sampler = MixtureSampler(sources, args.seed, args.balance)
    augmentation = make_augmentation(args.augment, args.input_size)
    end = total if not args.stop_after else min(total, start + max(1, args.stop_after))
    batches = StepBatches(sources, sampler, store, augmentation, preprocessing, args.seed, start, end, args.batch_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=args.workers)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    log = TrainingLog(out / LOG_NAME)
    validator = _Validator(val_items, preprocessing, classes, out, args.tta == "hflip") if val_items else None
    save_dtype = torch.float16 if args.save_dtype == "fp16" else None
    training_info = {"architecture": architecture, "data": settings["data"], "augment": args.augment, "steps": total,
                     "batch_size": args.batch_size, "input_size": args.input_size, "channels": args.channels,
                     "crop": args.crop, "pretrained": settings["pretrained"], "seed": args.seed, "ema": args.ema,
                     "linear_probe_steps": args.linear_probe_steps, "backbone_lr_scale": args.backbone_lr_scale}

    started = time.perf_counter()
    step = start
    model.train()
    for inputs, labels in loader:
        inputs, labels = inputs.to(accelerator.device), labels.to(accelerator.device)
        with accelerator.autocast():
            loss = loss_fn(model(inputs), labels)
        loss_value = optimizer_step(accelerator, loss, optimizer, scheduler)
        step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=step)
        log.add(step, loss_value, scheduler.get_last_lr()[-1], step % args.log_every == 0 or step == end)  # the head's
        if validator is not None and (step % args.val_every == 0 or step == total):
            result = validator.evaluate(_weights_to_use(accelerator, model, ema), step)
            print(f"step {step} validation accuracy {result['accuracy']:.4f} f1 {result['f1']:.4f} "
                  f"auc {result['auc'] if result['auc'] is None else round(result['auc'], 4)}", flush=True)
            if validator.is_best(step):
                save_classifier(_weights_to_use(accelerator, model, ema), out / CHECKPOINT, spec,
                                {**training_info, "selected_step": step, "validation": str(args.val)}, save_dtype)
            model.train()
        if step % args.save_every == 0 or step == end:
            state.save(step)
            write_json(out / "time.json", {"step": step, "seconds": previous_seconds + time.perf_counter() - started})
    seconds = previous_seconds + time.perf_counter() - started
    finished = step >= total
    unwrapped = _weights_to_use(accelerator, model, ema)
    final_path = out / (LAST_CHECKPOINT if validator is not None else CHECKPOINT)
    save_classifier(unwrapped, final_path, spec, {**training_info, "selected_step": step}, save_dtype)
    if validator is not None and not (out / CHECKPOINT).exists():  # no validation ran yet in a short run
        shutil.copyfile(final_path, out / CHECKPOINT)

    summary = {
        "finished": finished, "step": step, "steps": total, "resumed_from": start, "wall_time_s": round(seconds, 1),
        "wall_time_this_run_s": round(time.perf_counter() - started, 1), "device": device_description(accelerator),
        "architecture": architecture, "parameters": sum(p.numel() for p in unwrapped.parameters()),
        "settings": settings, "pretrained": pretrained_report or None,
        "sources": [
            {"path": str(s.path), "plane": s.plane, "share": s.share, "images": len(s.items),
             "images_per_plane": {c: sum(1 for label in s.labels if label == i) for i, c in enumerate(classes)},
             "drawn": drawn}
            for s, drawn in zip(sources, count_draws(sampler, sources, step, args.batch_size, classes))
        ],
        "validation": validator.summary() if validator is not None else None,
        "checkpoint": str(out / CHECKPOINT),
        "checkpoint_bytes": (out / CHECKPOINT).stat().st_size,
    }
    finish_run(out, summary, "summary.json", "README.md", model_card(summary), step, total,
               {"selected": (summary["validation"] or {}).get("selected")})
    return 0


def _weights_to_use(accelerator, model, ema):
    """The network to validate and save: the moving average when --ema is on."""
    return ema.module if ema is not None else accelerator.unwrap_model(model)


def _validation_items(path: Path | None, sources: list[Source], classes) -> list:
    if path is None:
        return []
    from fetalstudio.data.tables import read_classification

    if not path.exists():
        raise FetalStudioError(f"--val {path} does not exist. Give a folder of plane sub-folders or a CSV with filename,plane.")
    items = read_classification(path)
    check_labelled(items, classes, f"--val {path}")
    training = {item.path.resolve() for source in sources for item in source.items}
    shared = [item.path for item in items if item.path.resolve() in training]
    if shared:
        raise FetalStudioError(
            f"{len(shared)} validation image(s) are also training images (e.g. {shared[0]}). Validation images "
            "must never be trained on: remove them from --data or give another --val."
        )
    return items


class _Validator:
    """Validation metrics during training; remembers the best step (accuracy, then macro F1)."""

    def __init__(self, items, preprocessing, classes, out: Path, hflip: bool) -> None:
        import torch
        from PIL import Image

        tensors = []
        for item in items:
            with Image.open(item.path) as image:
                image.load()
                tensors.append(preprocessing(image))
        self.inputs = torch.stack(tensors)
        self.labels = [item.plane for item in items]
        self.preprocessing, self.classes, self.hflip = preprocessing, classes, hflip
        self.history_path = out / "val_history.json"
        self.history: dict[str, dict] = {}
        if self.history_path.exists():
            self.history = json.loads(self.history_path.read_text(encoding="utf-8"))

    def evaluate(self, model, step: int) -> dict:
        from fetalstudio.classification.predict import PlaneClassifier
        from fetalstudio.classification.metrics import classification_metrics, headline
        from fetalstudio.training.common import write_json

        classifier = PlaneClassifier(model, self.preprocessing, self.classes, batch_size=64, hflip_tta=self.hflip)
        metrics = classification_metrics(self.labels, classifier.probabilities_from_tensor(self.inputs), self.classes)
        result = {**headline(metrics), "per_class_recall": {k: v["recall"] for k, v in metrics["per_class"].items()},
                  "confusion_matrix": metrics["confusion_matrix"]}
        self.history = {k: v for k, v in self.history.items() if int(k) < step}  # a redone step replaces later ones
        self.history[str(step)] = result
        write_json(self.history_path, self.history)
        return result

    @staticmethod
    def _key(result: dict) -> tuple:
        return (round(result["accuracy"], 6), round(result["f1"], 6))

    def best_step(self) -> int | None:
        if not self.history:
            return None
        return int(max(self.history, key=lambda k: (self._key(self.history[k]), -int(k))))

    def is_best(self, step: int) -> bool:
        return self.best_step() == step

    def summary(self) -> dict:
        best = self.best_step()
        return {"images": len(self.labels), "selected": {"step": best, **self.history[str(best)]} if best is not None else None,
                "history": self.history}


def _fmt(value) -> str:
    return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def model_card(summary: dict) -> str:
    settings = summary["settings"]
    lines = [
        f"# Plane classifier ({summary['architecture']})", "",
        f"- classes (output order): {', '.join(settings['classes'])}",
        f"- input: {'grayscale' if settings['channels'] == 1 else 'RGB'}, letterboxed to {settings['input_size']}x{settings['input_size']}, pixels scaled to [-1, 1]",
        f"- weights: {'from ' + settings['pretrained'] if settings['pretrained'] else 'random initialisation (from scratch)'}",
        f"- augmentation: {settings['augment']}; balanced planes: {settings['balance']}; "
        f"weight EMA: {settings.get('ema') or 'off'}",
        *([f"- fine-tuning: head alone for the first {settings.get('linear_probe_steps', 0)} steps; backbone learning rate "
           f"{settings.get('backbone_lr_scale', 1.0)} x the head's"]
          if settings.get("linear_probe_steps") or settings.get("backbone_lr_scale", 1.0) != 1.0 else []),
        f"- steps: {summary['step']} of {summary['steps']} (batch {settings['batch_size']}, lr {settings['lr']}, seed {settings['seed']})",
        f"- hardware: {summary['device']}; wall time {summary['wall_time_s']} s",
        f"- parameters: {summary['parameters']:,}; checkpoint {summary['checkpoint_bytes'] / 2**20:.1f} MiB", "",
        "## Training data", "", "| source | share | images | per plane | samples drawn |", "|---|---|---|---|---|",
    ]
    for source in summary["sources"]:
        planes = ", ".join(f"{k} {v}" for k, v in source["images_per_plane"].items())
        lines.append(f"| `{source['path']}` | {source['share'] or 'pooled'} | {source['images']} | {planes} | {source['drawn']['total']} |")
    validation = summary.get("validation")
    if validation and validation.get("selected"):
        selected = validation["selected"]
        lines += ["", "## Validation (checkpoint selection only, never trained on)", "",
                  f"{validation['images']} images; model.safetensors is the step with the best accuracy: step {selected['step']}.", "",
                  "| accuracy | recall | precision | F1 | AUC |", "|---|---|---|---|---|",
                  f"| {_fmt(selected['accuracy'])} | {_fmt(selected['recall'])} | {_fmt(selected['precision'])} | {_fmt(selected['f1'])} | {_fmt(selected['auc'])} |"]
    lines += ["", "Load it with `ModelManager(...).get(path)` and predict with "
              "`fetalstudio.classification.predict.PlaneClassifier(model).predict(images)`.", ""]
    return "\n".join(lines)


COMMAND = Command("classifier", "a timm plane classifier (5 planes)", add_arguments, run, description=__doc__.strip())
