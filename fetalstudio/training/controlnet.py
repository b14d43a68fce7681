"""A layout (or edge) ControlNet for an SD-architecture generator (FetalFlex, METHODS section 3).

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

--condition canny (or hed, pidinet, lineart): an edge ControlNet, for structure-preserving
re-synthesis ("Keep this scan's structure", ``anatomy.flex.FlexOptions.condition``). The condition is
``pipelines.edges.edge_map`` of the very letterboxed image the ControlNet learns to generate (3 equal
channels, white edges on black; no pre-alignment), the ROI is the image's part of the letterboxed
square, and the data need no boxes: any image source ``train sd`` reads (a folder of images, plane
sub-folders, a labels/pairs CSV, a structures folder; African images refused), several --data at once.

Data: structures folders (images.csv + boxes.csv, and their ``more/``; see fetalstudio.data.structures).
The fixed validation split (12% of images, by a hash of the file name) is never trained on; its
ROI-MSE with and without the layout is measured at the end (metrics.json, model card). Images
become grayscale RGB, letterboxed (whole image kept, black bars) to --resolution; boxes follow.
Prompt: fetalstudio.vocabulary.anatomy_caption of the plane with that image's annotated structures.
Edge conditions hold out 12% too, by a hash of the patient (FETAL_PLANES_DB ``PatientNNNNN``), the
examination (HC18 ``NNN_kHC``) or else the file name (the structures folders' split); prompts are
``train sd``'s captions (plane, head trimester, anatomy caption, .txt or --caption).

Output (OUT): the ControlNet as a diffusers folder (config.json + diffusion_pytorch_model.safetensors;
the model manager lists it as a controlnet), model_card.md, metrics.json; OUT/training/ holds the
log, settings, latent cache and the resumable state (run the same command again to continue);
fetalstudio_condition.json names the condition ({"condition": "canny"}) for the model catalog.

Examples:
  python -m fetalstudio train controlnet --data ../shared/data/first_trimester_structures \\
      --base fetalstudio-tiny --out checkpoints/fetalstudio-tiny-layout-controlnet --steps 600 --batch-size 8
  python -m fetalstudio train controlnet --condition canny --data ../shared/data/first_trimester_structures \\
      --data ../shared/data/hc18_heads/pairs.csv --data ../shared/data/spanish_planes --base fetalstudio-tiny \\
      --out outputs/tiny-canny-controlnet --steps 2400 --save-dtype fp16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.cli_args import Command, device_name
from fetalstudio.errors import FetalStudioError
from fetalstudio.models.entries import CONDITION_FILE, LAYOUT_CONDITION
from fetalstudio.training.common import add_common_arguments

TRAINING_DIR = "training"  # log, settings, cache and state: inside OUT but not part of the ControlNet folder
FIXED_SETTINGS = ("data", "include_more", "base_hash", "lora_hash", "lora_weight", "pre_align", "plane", "resolution", "batch_size", "lr", "seed", "drop_prob",
                  "lambda_roi", "lambda_ssim", "roi_margin", "max_images", "condition", "caption", "embedding_channels")
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed noise levels of the held-out measurement
LAYOUT_SPLIT = "fixed: fetalstudio.data.structures.split_structures (hash of the file name), never trained on"
EDGE_SPLIT = ("fixed: 12% held out by a hash of the patient (FETAL_PLANES_DB), the examination (HC18) or else the file name "
              "(structures folders: split_structures), never trained on")
EDGE_ROI = "the image's part of the letterboxed square (no bars), as latent cells"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fetalstudio.anatomy.flex_cli import CONDITION_CHOICES
    from fetalstudio.training.sd import _int_list
    from fetalstudio.vocabulary import ANATOMY_PLANES, FACIAL_SAGITTAL

    parser.add_argument("--data", type=Path, action="append", default=[], required=True, metavar="FOLDER_OR_CSV",
                        help="layout: a structures folder (images.csv + boxes.csv, and its more/); edge conditions: any image "
                             "source of `train sd` (image folder, plane sub-folders, labels/pairs CSV, structures folder); repeatable")
    parser.add_argument("--condition", choices=CONDITION_CHOICES, default=LAYOUT_CONDITION,
                        help="what the ControlNet follows: layout (the layout map, default) or the edge map of the training image "
                             "(canny works offline; hed/pidinet/lineart read their weights from checkpoints/annotators)")
    parser.add_argument("--caption", help="edge conditions: caption for every image without its own (.txt or caption column); "
                                          "replaces plane/trimester/anatomy captions (as in train lora)")
    parser.add_argument("--no-more", dest="include_more", action="store_false", help="leave out the folders' more/ subfolders")
    parser.add_argument("--base", required=True, metavar="ID_OR_PATH",
                        help="the SD-architecture generator to steer: a model id (python -m fetalstudio models), a diffusers folder or a .safetensors")
    parser.add_argument("--lora", metavar="ID_OR_PATH", help="a LoRA fused into the frozen base before training (use the same LoRA when generating)")
    parser.add_argument("--lora-weight", type=float, default=1.0, help="weight of --lora when fused (default 1.0)")
    parser.add_argument("--pre-align", action="store_true", help="FetalFlex pre-alignment: the layout map's VAE latent, rescaled to the image latents' statistics, is the condition")
    parser.add_argument("--embedding-channels", type=_int_list, metavar="C0,C1,C2,C3",
                        help="channels of the conditioning embedding (condition pixels -> latent grid), full resolution first, one "
                             "per VAE scale (default: diffusers' 16,32,96,256; 8,16,32,64 is 4x cheaper on a CPU)")
    parser.add_argument("--plane", choices=sorted(ANATOMY_PLANES), default=FACIAL_SAGITTAL,
                        help="layout: the plane the boxes belong to (colours, caption)")
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
    parser.add_argument("--save-dtype", choices=["fp32", "fp16"], default="fp32",
                        help="precision of the saved weights (the model manager loads either at the run's precision; default: %(default)s)")
    parser.set_defaults(save_every=50)


# --- data ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingImage:
    """One image at the training size: grayscale pixels, its condition (layout or edge map), ROI and caption."""

    path: Path
    pixels: "object"  # uint8 R x R (grayscale, letterboxed)
    condition_map: "object"  # uint8 R x R x 3 (layout map) or R x R (edge map: the three channels are equal)
    roi: "object"  # bool R x R
    caption: str


def prepare_image(item, plane: str, resolution: int, roi_margin: int) -> TrainingImage:
    """Pixels, layout map, dilated-box ROI and caption of one annotated image at ``resolution``."""
    import numpy as np
    from PIL import Image

    from fetalstudio.anatomy.layout import Layout, StructureBox
    from fetalstudio.anatomy.layout_map import layout_color_map
    from fetalstudio.imaging.letterbox import letterbox_image

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
    caption = layout_caption(plane, {b[0] for b in boxes})
    roi = np.zeros((resolution, resolution), dtype=bool)
    for _, x0, y0, x1, y1 in boxes:
        roi[max(0, int(y0) - roi_margin):min(resolution, int(np.ceil(y1)) + roi_margin),
            max(0, int(x0) - roi_margin):min(resolution, int(np.ceil(x1)) + roi_margin)] = True
    return TrainingImage(item.path, np.asarray(pixels), np.asarray(layout_map, dtype=np.uint8), roi, caption)


def layout_caption(plane: str, structures) -> str:
    """FetalFlex's prompt: the plane with the image's annotated structures, in the plane's order."""
    from fetalstudio.vocabulary import anatomy_caption, structures_for

    order = [s.name for s in structures_for(plane)]
    return anatomy_caption(plane, sorted(set(structures), key=order.index))


def prepare_edge_image(item, detector: str, resolution: int) -> TrainingImage:
    """Pixels, edge map (``pipelines.edges.edge_map`` of those very letterboxed pixels, one channel),
    the image's part of the square as ROI, and the caption of one image at ``resolution``."""
    import numpy as np
    from PIL import Image

    from fetalstudio.imaging.letterbox import letterbox_image
    from fetalstudio.pipelines.edges import edge_map

    with Image.open(item.image) as opened:
        pixels, fit = letterbox_image(opened.convert("L"), resolution)
    edges = np.asarray(edge_map(pixels, detector).convert("L"))
    roi = np.zeros((resolution, resolution), dtype=bool)
    left, top, right, bottom = fit.window
    roi[top:bottom, left:right] = True
    return TrainingImage(item.image, np.asarray(pixels), edges, roi, item.caption)


def read_split(folders: list[Path], include_more: bool, max_images: int | None):
    """(training items, validation items) of the structures folders; the validation split is fixed."""
    from fetalstudio.data.structures import read_structure_folders, split_structures

    for folder in folders:
        if not folder.is_dir():
            raise FetalStudioError(f"--data {folder} is not a folder. Give a structures folder with images.csv and boxes.csv "
                                   "(laid out like ../shared/data/first_trimester_structures).")
    items = [item for item in read_structure_folders(folders, include_more=include_more) if item.boxes]
    train = _first_training_images(split_structures(items, "train"), max_images,
                                   f"--data {', '.join(map(str, folders))} has no annotated training images (images.csv lists "
                                   "none with a box, or all of them fall in the validation split). Add images with boxes.")
    return train, split_structures(items, "val")


def _first_training_images(train: list, max_images: int | None, none_left: str) -> list:
    """The first ``max_images`` training items; ``none_left`` is the error when there are none."""
    train = train if max_images is None else train[:max_images]
    if not train:
        raise FetalStudioError(none_left)
    return train


_FETAL_PLANES_PATIENT = re.compile(r"^(Patient\d+)_", re.IGNORECASE)  # FETAL_PLANES_DB: Patient00305_Plane3_2_of_5.png
_HC18_EXAMINATION = re.compile(r"^(\d+)_\d*HC\.", re.IGNORECASE)  # HC18: 010_HC.png and 010_2HC.png are one examination


def held_out_group(path: Path) -> str:
    """What the edge split holds out together: the patient, the examination, else the image (file name)."""
    name = Path(path).name
    patient = _FETAL_PLANES_PATIENT.match(name)
    if patient:
        return patient.group(1).lower()
    examination = _HC18_EXAMINATION.match(name)
    return f"hc18-{examination.group(1)}" if examination else name


def is_held_out(path: Path) -> bool:
    """The edge split: the group's hash (``data.structures.validation_bucket``) in the validation buckets; for
    a structures folder's images (grouped by file name) this is exactly ``split_structures``."""
    from fetalstudio.data.structures import VALIDATION_PERCENT, validation_bucket

    return validation_bucket(Path(held_out_group(path))) < VALIDATION_PERCENT


def _is_structures_folder(source: Path) -> bool:
    from fetalstudio.data.structures import BOXES_TABLE, IMAGES_TABLE

    tables = ("labels.csv", "pairs.csv")  # image_datasets reads a folder through these first
    return source.is_dir() and (source / IMAGES_TABLE).is_file() and (source / BOXES_TABLE).is_file() and \
        not any((source / table).is_file() for table in tables)


def structures_validation_items(folder: Path, include_more: bool) -> list:
    """A structures folder's held-out images (``split_structures``) as image items with their anatomy caption."""
    from fetalstudio.data.structures import read_structures, split_structures
    from fetalstudio.training.image_datasets import ImageItem, layout_plane_of

    annotated = read_structures(folder, include_more=include_more)
    plane = layout_plane_of({box[0] for item in annotated for box in item.boxes}, folder)
    return [ImageItem(item.path, layout_caption(plane, item.structures), f"layout/{plane}", source=str(folder), caption_from="layout")
            for item in split_structures(annotated, "val")]


def read_edge_split(sources: list[Path], include_more: bool, max_images: int | None, caption: str | None):
    """(training items, validation items) of an edge condition: every image ``train sd`` reads from
    ``sources`` (``image_datasets.collect_items``: structures folders give their training split), split by
    :func:`is_held_out`; a structures folder's held-out images are added to the validation items."""
    from fetalstudio.data.structures import MORE_SUBFOLDER
    from fetalstudio.training.image_datasets import collect_items

    items = collect_items(sources, caption=caption)
    if not include_more:
        items = [i for i in items if not (_is_structures_folder(Path(i.source)) and Path(i.source) / MORE_SUBFOLDER in i.image.parents)]
    train = _first_training_images([i for i in items if not is_held_out(i.image)], max_images,
                                   f"--data {', '.join(map(str, sources))} has no training images: all of them fall in the "
                                   "validation split (held out by patient or file name). Add more images.")
    val = [i for i in items if is_held_out(i.image)]
    val += [i for source in sources if _is_structures_folder(Path(source)) for i in structures_validation_items(Path(source), include_more)]
    return train, val


def stack_images(images: list[TrainingImage]):
    """Tensors: pixels N x 3 x R x R uint8 (gray in all three), condition maps N x 3 x R x R uint8 (layout) or
    N x 1 x R x R (edges, kept in one channel: ``map_condition`` spreads it to three), ROI N x 1 x R x R float."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.stack([i.pixels for i in images]))[:, None].repeat(1, 3, 1, 1)
    maps = torch.from_numpy(np.stack([i.condition_map for i in images]))
    maps = maps[:, None] if maps.ndim == 3 else maps.permute(0, 3, 1, 2).contiguous()
    roi = torch.from_numpy(np.stack([i.roi for i in images]))[:, None].float()
    return pixels, maps, roi


def encode_latents(cache: Path, key: dict, pixels, vae, device):
    """(mean, std) of the VAE posterior of every image, cached by content key in ``cache``."""
    from fetalstudio.training.sd import cached_posterior

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cached_posterior(cache / f"latents-{digest}.cache", lambda: pixels, vae, device)


def map_condition(maps_uint8, device):
    """Condition maps as the ControlNet's condition image: float in [0, 1] (as diffusers' pipelines feed it),
    three channels (a one-channel edge map repeated, as ``edge_map`` draws it: R = G = B)."""
    maps = maps_uint8.to(device).float().div(255.0)
    return maps.expand(-1, 3, -1, -1) if maps.shape[1] == 1 else maps


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
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    down, mid = (None, None) if controlnet is None else \
        controlnet(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=layout_maps, return_dict=False)
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

def spread(items: list, limit: int) -> list:
    """At most ``limit`` of ``items``, evenly spaced (every source of a mixed validation set is measured)."""
    if limit <= 0:
        return []
    if len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def _validate(args) -> None:
    if args.pre_align and args.condition != LAYOUT_CONDITION:
        raise FetalStudioError(f"--pre-align is FetalFlex's pre-alignment of the layout map's VAE latent; an edge map is fed to "
                               f"the ControlNet as pixels. Leave out --pre-align with --condition {args.condition} (or train on "
                               "layouts with --condition layout).")
    if args.pre_align and args.embedding_channels:
        raise FetalStudioError("--embedding-channels sizes the embedding of a condition image; a pre-aligned condition is a latent "
                               "with its own one-block embedding. Leave out one of them.")
    if args.caption is not None and args.condition == LAYOUT_CONDITION:
        raise FetalStudioError("--caption is for edge conditions (plain image folders); a layout ControlNet's prompt is the "
                               "anatomy caption of each image's boxes. Leave out --caption, or add --condition canny.")
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


def embedding_arguments(channels: tuple[int, ...] | None, vae) -> dict:
    """``ControlNetModel.from_unet``'s conditioning-embedding channels, checked to reach the latent grid."""
    if channels is None:
        return {}
    scales = len(vae.config.block_out_channels)  # the VAE downsamples 2 ** (scales - 1) times
    if len(channels) != scales:
        raise FetalStudioError(f"--embedding-channels needs {scales} numbers for this base (its VAE downsamples "
                               f"{2 ** (scales - 1)}x: one per scale), got {len(channels)}: e.g. 8,16,32,64.")
    return {"conditioning_embedding_out_channels": tuple(channels)}


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
    edges = args.condition != LAYOUT_CONDITION
    if edges:
        train_items, val_items = read_edge_split(args.data, args.include_more, args.max_images, args.caption)
    else:
        train_items, val_items = read_split(args.data, args.include_more, args.max_images)
    pipeline, entry, base_path = load_base_pipeline(args.base)
    lora_id, lora_hash = fuse_lora(pipeline, args.lora, args.lora_weight) if args.lora else (None, None)
    resolution = args.resolution or native_resolution(pipeline)
    embedding = embedding_arguments(args.embedding_channels, pipeline.vae)
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
        "condition": args.condition, "caption": args.caption,
        "embedding_channels": list(args.embedding_channels) if args.embedding_channels else None,
    }
    check_resume_settings(work, settings, FIXED_SETTINGS)

    print(f"controlnet: preparing {len(train_items)} training images at {resolution} px ({len(val_items)} held out), "
          f"condition {args.condition}", flush=True)
    if edges:
        train_images = [prepare_edge_image(item, args.condition, resolution) for item in train_items]
        val_images = [prepare_edge_image(item, args.condition, resolution) for item in spread(val_items, args.val_limit)]
    else:
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
    else:  # the U-Net's encoder copied; zero convolutions: starts as the base
        controlnet = ControlNetModel.from_unet(unet, **embedding)
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
                                     weights, args.seed, device, condition_noun(args.condition))
    if accelerator.is_main_process:
        from fetalstudio.imaging.files import atomic_write_json

        (model.half() if args.save_dtype == "fp16" else model).save_pretrained(str(out), safe_serialization=True)
        if alignment is not None:
            alignment.write(out)
        atomic_write_json(out / CONDITION_FILE, {"condition": args.condition})
        metrics = {
            "finished": step >= total, "step": total, "steps": total, "resumed_from": start,
            "wall_time_s": round(seconds, 1), "seconds_per_step": round(seconds_this_run / max(1, total - start), 3),
            "device": device_description(accelerator), "torch_threads": torch.get_num_threads(),
            "base": {"id": entry.id, "given": args.base, "hash": settings["base_hash"]},
            "lora": None if lora_id is None else {"id": lora_id, "hash": lora_hash, "weight": args.lora_weight, "fused": True},
            "pre_align": args.pre_align, "condition": args.condition,
            "embedding_channels": list(model.config.conditioning_embedding_out_channels),
            "edge_settings": edge_record(args.condition) if edges else None, "save_dtype": args.save_dtype,
            "controlnet_parameters": trainable, "plane": None if edges else args.plane, "resolution": resolution,
            "training": {"batch_size": args.batch_size, "lr": args.lr, "optimizer": "AdamW (weight decay 0.01), constant lr, grad clip 1",
                         "seed": args.seed, "drop_prob": args.drop_prob, "lambda_roi": args.lambda_roi,
                         "lambda_ssim": args.lambda_ssim, "roi_margin_px": args.roi_margin,
                         "ssim_space": "predicted clean latent x0 vs the true latent (whole image)",
                         "roi": EDGE_ROI if edges else "union of the image's boxes dilated by roi_margin_px, as latent cells"},
            "data": {"folders": settings["data"], "include_more": args.include_more, "train_images": len(train_images),
                     "validation_images_held_out": len(val_items), "validation_images_measured": len(val_images),
                     "split": EDGE_SPLIT if edges else LAYOUT_SPLIT,
                     "sources": source_counts(train_items, val_items, [i.path for i in val_images]) if edges else None,
                     "captions": {c: sum(1 for i in train_images if i.caption == c) for c in captions}},
            "validation": validation,
            "checkpoint": str(out),
        }
        finish_run(out, metrics, "metrics.json", "model_card.md", model_card(metrics), step, total,
                   {"validation": validation})
    return 0


def condition_noun(condition: str) -> str:
    """The word the held-out scores are named with: with_layout / with_edges."""
    return "layout" if condition == LAYOUT_CONDITION else "edges"


def edge_record(detector: str) -> dict:
    """The edge detector's settings as ``pipelines.edges`` records them (thresholds, controlnet_aux version, weights)."""
    from fetalstudio.pipelines.edges import EdgeSettings, edge_settings_record

    return edge_settings_record(EdgeSettings(detector))


def source_counts(train_items, val_items, measured: list[Path]) -> dict:
    """Images per --data source: trained on, held out, measured (edge conditions)."""
    counts: dict[str, dict[str, int]] = {}
    for part, items in (("train", train_items), ("held_out", val_items)):
        for item in items:
            counts.setdefault(item.source, {"train": 0, "held_out": 0, "measured": 0})[part] += 1
    measured_set = set(measured)
    for item in val_items:
        counts[item.source]["measured"] += item.image in measured_set
    return counts


def held_out_scores(controlnet, unet, noise_scheduler, latents, conditions: ConditionSet, roi, prompt_states, null_states, weights: LossWeights,
                    seed: int, device, noun: str = "layout", batch_size: int = 8) -> dict:
    """ROI-MSE and x0-SSIM on the held-out images at fixed noise levels, with the condition (``with_<noun>``),
    with a black map (``without_<noun>``) and with no ControlNet at all (``without_controlnet``: the base
    alone): the condition's gain is the difference."""
    import torch
    from pytorch_msssim import ssim

    controlnet.eval()
    results = {}
    for name, use_layout in ((f"with_{noun}", True), (f"without_{noun}", False), ("without_controlnet", None)):
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
                    _, parts = score_prediction(None if use_layout is None else controlnet, unet, noise_scheduler, batch, noise_all[part].to(device), timesteps,
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
    condition = metrics.get("condition", LAYOUT_CONDITION)
    edges = condition != LAYOUT_CONDITION
    noun = condition_noun(condition)
    what = f"the {condition} edge map" if edges else "the layout"
    if validation:
        scores = (f"- Held-out ({validation['images']} validation images, noise levels {validation['timesteps']}): ROI noise MSE "
                  f"{validation[f'with_{noun}']['roi_mse']:.4f} with {what} vs {validation[f'without_{noun}']['roi_mse']:.4f} "
                  f"with a black map and {validation['without_controlnet']['roi_mse']:.4f} without the ControlNet (the base alone); "
                  f"x0-latent SSIM {validation[f'with_{noun}']['ssim']:.4f} vs {validation[f'without_{noun}']['ssim']:.4f} and "
                  f"{validation['without_controlnet']['ssim']:.4f}.\n")
    else:
        scores = "- No held-out images were measured.\n"
    if edges:
        title = f"{condition.capitalize()}-edge ControlNet"
        trained_on = (f"{condition} edge maps of the training images themselves (pipelines.edges.edge_map of the letterboxed image "
                      "the ControlNet learns to generate), for structure-preserving re-synthesis (Anatomy editor edge mode, "
                      f"`flex --condition {condition}`)")
        condition_line = (f"- Condition: the **{condition}** edge map, 3 equal channels, white edges on black "
                          f"({json.dumps(metrics.get('edge_settings') or {})}); named in {CONDITION_FILE}. Conditioning "
                          f"embedding channels {metrics.get('embedding_channels')} (edge map pixels to the latent grid).\n")
        plane_line = f"- Planes: those of the data (captions below), at {metrics['resolution']} px (grayscale, letterboxed). "
        roi = "the image's part of the letterboxed square"
    else:
        title = "Layout ControlNet"
        trained_on = "layout maps (structure boxes, one colour per structure, fetalstudio.anatomy.layout_map)"
        condition_line = ("- Condition: **pre-aligned** layout latent (FetalFlex; statistics in fetalstudio_prealign.json).\n"
                          if metrics.get("pre_align") else "- Condition: the layout map's pixels (diffusers' conditioning embedding).\n")
        plane_line = f"- Plane: {metrics['plane']} at {metrics['resolution']} px (grayscale, letterboxed). "
        roi = f"the union of the image's boxes + {training['roi_margin_px']} px"
    sources = "".join(f"  - {source}: {n['train']} trained on, {n['held_out']} held out, {n['measured']} measured\n"
                      for source, n in (data.get("sources") or {}).items())
    stored = ("- Stored in float16 (the model manager loads it at the run's precision). The training ran in float32.\n"
              if metrics.get("save_dtype") == "fp16" else "")
    return (
        f"# {title} for {metrics['base']['id']}\n\n"
        "Trained with FetalStudio (`python -m fetalstudio train controlnet"
        + (f" --condition {condition}" if edges else "") + "`), FetalFlex's recipe (METHODS section 3): the base's "
        f"U-Net frozen, a diffusers ControlNetModel initialised from it and trained on {trained_on}.\n\n"
        + (f"- Base with LoRA **{metrics['lora']['id']}** fused at weight {metrics['lora']['weight']:g} (hash {metrics['lora']['hash']}): "
           "generate with that LoRA active.\n" if metrics.get("lora") else "")
        + condition_line
        + plane_line + "Load with `ControlNetModel.from_pretrained(folder)` or through the model manager (kind controlnet).\n"
        f"- Data: {', '.join(data['folders'])} (more/ {'included' if data['include_more'] else 'left out'}): "
        f"{data['train_images']} training images; {data['validation_images_held_out']} held out ({data['split']}).\n"
        + sources +
        f"- Training: {metrics['step']} steps x batch {training['batch_size']}, lr {training['lr']:g}, seed {training['seed']}; "
        f"condition and prompt each dropped with p={training['drop_prob']}; loss {training['lambda_roi']:g} x ROI-MSE "
        f"(ROI = {roi}) + {training['lambda_ssim']:g} x (1 - SSIM) on the {training['ssim_space']}.\n"
        f"- Hardware: {metrics['device']}; {metrics['wall_time_s']:.0f} s in all ({metrics['seconds_per_step']:.2f} s per step in the last run).\n"
        + scores +
        f"- Base: {metrics['base']['id']} (weights hash {metrics['base']['hash']}). It steers only this base (or one with the "
        "same U-Net architecture). A research model, not a medical device.\n"
        + stored
    )


COMMAND = Command("controlnet", "a layout or edge ControlNet for an SD-architecture generator (FetalFlex; frozen U-Net)", add_arguments, run,
                  description=__doc__.strip())
