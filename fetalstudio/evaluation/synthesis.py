"""Evaluate generated images against real ones: plane accuracy, feature Fréchet distance,
diversity (MS-SSIM), a t-SNE plot and a nearest-neighbour memorisation audit.

    python -m fetalstudio eval synthesis --synthetic datasets/brain --out outputs/eval-synthesis \\
        --african ../shared/data/african/train/labels.csv --json synthesis.json

--synthetic: the folder written by `python -m fetalstudio generate --out DIR` (metadata.csv with
file and plane), a CSV with filename and plane (relative to the CSV's folder), or a folder of plane
sub-folders (abdomen/, brain/, ..., head_second/). --real: real images of the same planes (default
../shared/data/spanish_planes, the 20 per plane FU-LoRA trained on). --train-real: the generator's
training images for the memorisation audit (default: --real). --african: a second real set shown
in the t-SNE plot and used as a real-vs-real reference distance.

What is measured (per plane and overall):
- accuracy: share of generated images that the plane classifier (--classifier, default the
  installed one) assigns to the plane they were generated for. "head..." planes are scored
  against the classifier's "brain" class (the fetal head plane) and kept out of the overall figure.
- classifier-feature Fréchet distance: the Fréchet distance between Gaussians fitted to the
  classifier's pooled (penultimate) features of real and generated images. It is NOT the FID of
  papers: the features come from a small 5-class ultrasound classifier, not Inception.
- FID: only with --inception-weights FILE (torchvision's inception_v3 state dict, e.g.
  inception_v3_google-0cc3c7bd.pth): 2048-d pool features at 299 px. Values are not comparable
  to FIDs computed with the TF-Inception network of the papers.
- diversity: mean MS-SSIM over pairs of images of one plane (256 px grayscale; at most
  --max-pairs pairs, chosen with --seed). Lower = more diverse; the same figure for the real
  images of that plane is the reference.
- memorisation: for every generated image the distance to its nearest training image of the
  same plane (classifier features, L2 of unit-length vectors; and pixels, 64 px grayscale,
  root-mean-square difference), compared with the nearest-neighbour distances among the training
  images themselves (leave one out). A "near copy" is a generated image at or below the 5th
  percentile of those real-to-real distances in both spaces.

Every image is first made square (--crop center, as `train sd`/`train lora` do by default; or
pad / stretch) and converted to grayscale.

Report folder: summary.md, per_plane.csv, per_image.csv, summary.json, tsne.png,
nearest_neighbours.png. --json FILE also writes the headline numbers {"accuracy",
"classifier_feature_frechet", "ms_ssim_synthetic", "ms_ssim_real", "near_copy_fraction", "fid",
...}; the same object is printed on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fetalstudio.cli_args import at_least_one, device_name, output_folder
from fetalstudio.errors import FetalStudioError
from fetalstudio.paths import APP_ROOT

DEFAULT_REAL = APP_ROOT.parent / "shared" / "data" / "spanish_planes"
CROP_MODES = ("center", "pad", "stretch")
MS_SSIM_SIZE = 256
PIXEL_SIZE = 64
THUMB_SIZE = 144
INCEPTION_SIZE = 299
NEAR_COPY_PERCENTILE = 5.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
#: Generated subjects that the plane classifier knows under another name.
PLANE_ALIASES = {"head": "brain"}
HEADLINE = (
    "accuracy", "classifier_feature_frechet", "ms_ssim_synthetic", "ms_ssim_real", "near_copy_fraction",
    "near_copy_fraction_pixel", "near_copy_fraction_feature", "fid", "fid_weights", "n_synthetic", "n_real",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthetic", type=Path, required=True,
                        help="generated images: a `generate --out` folder (metadata.csv), a CSV with filename,plane, or a folder of plane sub-folders")
    parser.add_argument("--real", type=Path,
                        help=f"real images of the same planes, CSV or plane folders (default: {DEFAULT_REAL})")
    parser.add_argument("--african", type=Path, help="optional second real set for the t-SNE plot and a real-vs-real reference "
                        "(e.g. ../shared/data/african/train/labels.csv)")
    parser.add_argument("--train-real", type=Path, help="the generator's training images for the memorisation audit (default: --real); never subsampled")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (created)")
    parser.add_argument("--json", type=Path, help="also write the headline numbers to this JSON file")
    parser.add_argument("--classifier", help="plane classifier: a model id from `python -m fetalstudio models` or a .safetensors path "
                        "(default: the manifest's default classifier)")
    parser.add_argument("--inception-weights", type=Path, help="torchvision inception_v3 state dict (e.g. inception_v3_google-0cc3c7bd.pth) to "
                        "also compute FID; without it FID is not computed")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, mps (default: $FETALSTUDIO_DEVICE, else the best available)")
    parser.add_argument("--batch-size", type=at_least_one, default=32, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsampling, MS-SSIM pairs and t-SNE")
    parser.add_argument("--max-pairs", type=int, default=200, help="MS-SSIM pairs per plane at most (chosen with --seed)")
    parser.add_argument("--max-images-per-plane", type=int, help="use at most N images per plane of --synthetic, --real and --african "
                        "(chosen with --seed; for speed)")
    parser.add_argument("--crop", choices=CROP_MODES, default="center", help="how every image is made square before anything else")
    parser.add_argument("--nn-pairs", type=int, default=16, help="closest generated/training pairs shown in nearest_neighbours.png")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and the linear algebra (default: the libraries' choice; "
                        "1 on a shared machine)")


# --- metrics ---------------------------------------------------------------------------------
def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors (rows).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), with the matrix square roots
    from ``scipy.linalg.sqrtm``. The trace term is taken as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))
    (the same number: the matrices are similar), whose argument is symmetric positive
    semi-definite, so the root exists even for singular covariances; imaginary parts from
    rounding are dropped, and a non-finite root is retried with ``eps`` added to both diagonals.
    Both covariances lie in the span of the centred samples, so with fewer samples than
    dimensions everything is computed, exactly, in an orthonormal basis of that span.
    NaN when a set has fewer than 2 rows.
    """
    import numpy as np

    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be two N x D arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return math.nan
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    centred_a, centred_b = a - mu_a, b - mu_b
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    stacked = np.concatenate([centred_a, centred_b])
    if stacked.shape[0] < stacked.shape[1]:
        _, singular, vt = np.linalg.svd(stacked, full_matrices=False)
        tolerance = singular.max(initial=0.0) * max(stacked.shape) * np.finfo(np.float64).eps
        basis = vt[singular > tolerance].T
        if basis.shape[1] == 0:
            return mean_term
        centred_a, centred_b = centred_a @ basis, centred_b @ basis
    sigma_a = centred_a.T @ centred_a / (len(a) - 1)
    sigma_b = centred_b.T @ centred_b / (len(b) - 1)
    trace_root = _trace_sqrt_product(sigma_a, sigma_b)
    if not math.isfinite(trace_root):
        offset = eps * np.eye(len(sigma_a))
        trace_root = _trace_sqrt_product(sigma_a + offset, sigma_b + offset)
    value = mean_term + float(np.trace(sigma_a) + np.trace(sigma_b)) - 2.0 * trace_root
    return max(value, 0.0)


def _trace_sqrt_product(sigma_a, sigma_b) -> float:
    import warnings

    import numpy as np
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "singular matrix" notes: the eps retry handles real failures
        root_a = np.real(linalg.sqrtm(sigma_a))
        inner = root_a @ sigma_b @ root_a
        root = linalg.sqrtm((inner + inner.T) / 2.0)
    if not np.isfinite(root).all():
        return math.nan
    return float(np.trace(np.real(root)))


def ms_ssim(images_a, images_b) -> "list[float]":
    """MS-SSIM (data range 1) of image pairs: two N x H x W arrays/tensors in [0, 1], H, W > 160."""
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    a = torch.as_tensor(images_a, dtype=torch.float32)
    b = torch.as_tensor(images_b, dtype=torch.float32)
    if a.ndim == 2:
        a, b = a[None], b[None]
    with torch.no_grad():
        return _ms_ssim(a[:, None], b[:, None], data_range=1.0, size_average=False).tolist()


def mean_pairwise_ms_ssim(images, max_pairs: int, seed: int, key: str = "") -> tuple[float, int]:
    """(mean MS-SSIM over pairs of ``images`` (N x H x W uint8), pairs used). All pairs when there
    are at most ``max_pairs``, else ``max_pairs`` distinct pairs chosen with ``seed`` (and ``key``)."""
    import numpy as np

    images = np.asarray(images)
    n = len(images)
    if n < 2 or max_pairs < 1:
        return math.nan, 0
    first, second = np.triu_indices(n, k=1)
    if len(first) > max_pairs:
        chosen = np.sort(np.random.default_rng([seed, zlib.crc32(key.encode())]).choice(len(first), max_pairs, replace=False))
        first, second = first[chosen], second[chosen]
    values: list[float] = []
    for start in range(0, len(first), 32):
        i, j = first[start:start + 32], second[start:start + 32]
        values += ms_ssim(images[i].astype(np.float32) / 255.0, images[j].astype(np.float32) / 255.0)
    return float(np.mean(values)), len(values)


def nearest_distances(queries, references, leave_one_out: bool = False):
    """(distance, index) of each query row's nearest reference row (Euclidean). With
    ``leave_one_out`` the queries are the references and a row never matches itself."""
    import numpy as np

    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    if len(q) == 0 or len(r) == 0 or (leave_one_out and len(r) < 2):
        return np.full(len(q), np.nan), np.full(len(q), -1, dtype=np.int64)
    squared = (q ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None, :] - 2.0 * q @ r.T
    distances = np.sqrt(np.maximum(squared, 0.0))
    if leave_one_out:
        np.fill_diagonal(distances, np.inf)
    index = distances.argmin(axis=1)
    return distances[np.arange(len(q)), index], index


def unit_rows(features):
    import numpy as np

    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


# --- data ------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Images of one role (synthetic, real, african, train) with what every metric needs."""

    role: str
    source: Path
    names: list[str] = field(default_factory=list)
    planes: list[str] = field(default_factory=list)
    tensors: list = field(default_factory=list)  # classifier inputs (C x S x S)
    ms_ssim: list = field(default_factory=list)  # 256 x 256 uint8
    pixels: list = field(default_factory=list)  # 64 x 64 float32 in [0, 1]
    thumbs: list = field(default_factory=list)  # PIL thumbnails for the NN grid
    inception: list = field(default_factory=list)  # 299 x 299 uint8, only with Inception weights
    features: object = None  # N x D classifier features
    probabilities: object = None  # N x classes (synthetic only)
    inception_features: object = None  # N x 2048

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, plane: str) -> list[int]:
        return [i for i, p in enumerate(self.planes) if p == plane]

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.planes))

    def subset(self, keep: Sequence[int]) -> ImageSet:
        keep = list(keep)
        pick = lambda values: [values[i] for i in keep] if values else []  # noqa: E731
        return ImageSet(self.role, self.source, pick(self.names), pick(self.planes), pick(self.tensors), pick(self.ms_ssim),
                        pick(self.pixels), pick(self.thumbs), pick(self.inception),
                        None if self.features is None else self.features[keep],
                        None if self.probabilities is None else self.probabilities[keep],
                        None if self.inception_features is None else self.inception_features[keep])


def _read_metadata_csv(path: Path) -> list:
    from fetalstudio.data.tables import LabelledImage

    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "file" not in rows[0]:
        raise FetalStudioError(f"{path} has no rows with a `file` column; a `generate --out` folder's metadata.csv has file and plane columns.")
    if "plane" not in rows[0]:
        raise FetalStudioError(f"{path} has no `plane` column, so the generated images have no plane labels. Add a plane column "
                               "(abdomen, brain, femur, thorax, other, head_...) or give a folder of plane sub-folders.")
    return [LabelledImage(path.parent / row["file"], (row.get("plane") or "").strip().lower()) for row in rows]


def read_labelled(source: Path, role: str) -> list:
    """The labelled images of a --synthetic/--real/--african/--train-real source; clear errors."""
    from fetalstudio.data.tables import read_classification

    source = Path(source).expanduser()
    option = f"--{role.replace('_', '-')}"
    if not source.exists():
        raise FetalStudioError(f"{option} {source} does not exist. Give a folder of plane sub-folders (brain/, femur/, ...), a CSV with "
                               "filename,plane columns" + (", or the folder written by `python -m fetalstudio generate --out DIR`" if role == "synthetic" else "") + ".")
    if source.is_dir() and (source / "metadata.csv").is_file():
        items = _read_metadata_csv(source / "metadata.csv")
    elif source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        if "file" in header and "filename" not in header:
            items = _read_metadata_csv(source)
        elif "filename" in header and "plane" not in header:
            raise FetalStudioError(f"{option} {source} has no `plane` column, so its images have no plane labels. Add a plane column "
                                   "(abdomen, brain, femur, thorax, other, head_...) or give a folder of plane sub-folders.")
        else:
            items = read_classification(source)
    elif source.is_file():
        raise FetalStudioError(f"{option} {source} is neither a folder nor a .csv table.")
    else:
        items = read_classification(source)
    if not items:
        raise FetalStudioError(f"{option} {source} lists no images.")
    unlabelled = [item for item in items if not item.plane]
    if unlabelled:
        raise FetalStudioError(f"{option} {source}: {len(unlabelled)} image(s) have no plane label, e.g. {unlabelled[0].path}. "
                               "Every image needs its plane (abdomen, brain, femur, thorax, other, head_...).")
    missing = [item.path for item in items if not item.path.is_file()]
    if missing:
        raise FetalStudioError(f"{option} {source}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}. "
                               "Paths in a CSV are relative to the CSV's folder.")
    return items


def subsample(items: list, max_per_plane: int | None, seed: int) -> list:
    """At most ``max_per_plane`` items per plane, chosen with ``seed`` (per plane, order kept)."""
    import numpy as np

    if not max_per_plane:
        return list(items)
    keep: set[int] = set()
    for plane in sorted({item.plane for item in items}):
        indices = [i for i, item in enumerate(items) if item.plane == plane]
        if len(indices) > max_per_plane:
            indices = np.random.default_rng([seed, zlib.crc32(plane.encode())]).choice(indices, max_per_plane, replace=False).tolist()
        keep.update(indices)
    return [item for i, item in enumerate(items) if i in keep]


def make_square(image, mode: str):
    """A grayscale PIL image made square: central crop, black padding, or stretched."""
    from PIL import Image

    image = image.convert("L")
    width, height = image.size
    if width == height or mode == "stretch":
        side = max(width, height)
        return image if width == height else image.resize((side, side), Image.Resampling.BILINEAR)
    if mode == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))
    side = max(width, height)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_images(items: list, role: str, source: Path, preprocessing, crop: str, with_inception: bool, progress=None) -> ImageSet:
    """Read every image once and keep the small versions the metrics use."""
    import numpy as np
    from PIL import Image

    images = ImageSet(role, Path(source))
    base = Path(source) if Path(source).is_dir() else Path(source).parent
    for index, item in enumerate(items):
        try:
            with Image.open(item.path) as handle:
                handle.load()
                square = make_square(handle, crop)
        except (OSError, ValueError) as error:
            raise FetalStudioError(f"{item.path} (from --{role.replace('_', '-')} {source}) could not be read as an image ({error}). "
                                   "Remove it from the set or replace the file.") from error
        try:
            name = item.path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            name = str(item.path)
        images.names.append(name)
        images.planes.append(item.plane)
        images.tensors.append(preprocessing(square))
        images.ms_ssim.append(np.asarray(square.resize((MS_SSIM_SIZE, MS_SSIM_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8))
        images.pixels.append(np.asarray(square.resize((PIXEL_SIZE, PIXEL_SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0)
        images.thumbs.append(square.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR))
        if with_inception:
            images.inception.append(np.asarray(square.resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8))
        if progress is not None:
            progress(role, index + 1, len(items))
    return images


# --- models ----------------------------------------------------------------------------------
def classifier_outputs(classifier, tensors: list, batch_size: int, with_probabilities: bool = True):
    """(N x D pooled penultimate features, N x classes probabilities or None) of a timm classifier."""
    import numpy as np
    import torch

    model = classifier.model
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise FetalStudioError(f"The classifier ({type(model).__name__}) has no timm forward_features/forward_head, so its features "
                               "cannot be read. Use a classifier trained with `python -m fetalstudio train classifier`.")
    if not tensors:
        return np.zeros((0, 0)), np.zeros((0, len(classifier.classes)))
    features, probabilities = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(tensors), batch_size):
                batch = torch.stack(tensors[start:start + batch_size]).to(classifier.device, classifier.dtype)
                trunk = model.forward_features(batch)
                features.append(model.forward_head(trunk, pre_logits=True).float().flatten(1).cpu())
                if with_probabilities:
                    probs = torch.softmax(model.forward_head(trunk).float(), dim=1)
                    if classifier.hflip_tta:
                        probs = (probs + torch.softmax(model(torch.flip(batch, dims=[3])).float(), dim=1)) / 2
                    probabilities.append(probs.cpu())
    finally:
        model.train(was_training)
    return torch.cat(features).double().numpy(), (torch.cat(probabilities).double().numpy() if with_probabilities else None)


def load_inception(path: Path, device=None):
    """torchvision Inception-v3 with the weights of ``path``, returning 2048-d pool features."""
    import torch
    import torchvision

    path = Path(path).expanduser()
    expected = (f"Give torchvision's Inception-v3 ImageNet weights (a state dict), e.g. {INCEPTION_URL} "
                "saved as inception_v3_google-0cc3c7bd.pth, or leave out --inception-weights.")
    if not path.is_file():
        raise FetalStudioError(f"--inception-weights {path} does not exist. {expected}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors errors alike
        raise FetalStudioError(f"--inception-weights {path} could not be read as a PyTorch state dict ({type(error).__name__}: {error}). {expected}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FetalStudioError(f"--inception-weights {path} is not a state dict of tensors. {expected}")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier head is not used
    aux = any(k.startswith("AuxLogits.") for k in state)
    model = torchvision.models.inception_v3(weights=None, aux_logits=aux, transform_input=True, init_weights=False)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first = "; ".join(str(error).splitlines()[:3])
        raise FetalStudioError(f"--inception-weights {path} does not fit torchvision's inception_v3 ({first}). {expected}") from error
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise FetalStudioError(f"--inception-weights {path} is not a torchvision inception_v3 state dict ({len(missing)} missing and "
                               f"{len(unexpected)} unexpected tensors, e.g. {example!r}). {expected}")
    model.fc = torch.nn.Identity()
    return model.eval().to(device or "cpu", torch.float32)


def inception_features(model, images: list, batch_size: int):
    """N x 2048 pool features: grayscale 299 px uint8 -> 3 channels, ImageNet normalisation."""
    import numpy as np
    import torch

    if not images:
        return np.zeros((0, 2048))
    device = next(model.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start:start + batch_size])).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
            rows.append(model(((batch - mean) / std).to(device)).float().cpu())
    return torch.cat(rows).double().numpy()


# --- evaluation ------------------------------------------------------------------------------
def plane_order(planes, classes: Sequence[str]) -> list[str]:
    planes = set(planes)
    return [c for c in classes if c in planes] + sorted(planes - set(classes))


def accuracy_target(plane: str, classes: Sequence[str]) -> str | None:
    """The classifier class a generated plane should be predicted as (None: not scorable)."""
    if plane in classes:
        return plane
    stem = plane.split("_")[0]
    alias = PLANE_ALIASES.get(stem)
    return alias if alias in classes else None


def _median(values) -> float:
    import numpy as np

    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def memorisation_audit(synthetic: ImageSet, train: ImageSet, plane: str) -> tuple[dict, dict[int, dict]]:
    """Per-plane NN summary and per-synthetic-image NN fields (keyed by index into ``synthetic``)."""
    import numpy as np

    s_idx, t_idx = synthetic.indices(plane), train.indices(plane)
    summary = {"n_train": len(t_idx)}
    rows: dict[int, dict] = {}
    if not s_idx or not t_idx:
        return summary, rows
    spaces = {
        "feature": (unit_rows(synthetic.features[s_idx]), unit_rows(train.features[t_idx])),
        "pixel": (np.stack([synthetic.pixels[i].ravel() for i in s_idx]), np.stack([train.pixels[i].ravel() for i in t_idx])),
    }
    flags = {}
    for space, (query, reference) in spaces.items():
        scale = 1.0 if space == "feature" else math.sqrt(PIXEL_SIZE * PIXEL_SIZE)  # pixels: root-mean-square difference
        distance, nearest = nearest_distances(query, reference)
        distance = distance / scale
        real, _ = nearest_distances(reference, reference, leave_one_out=True)
        real = real / scale
        threshold = float(np.percentile(real, NEAR_COPY_PERCENTILE)) if len(t_idx) >= 2 else math.nan
        flags[space] = distance <= threshold if math.isfinite(threshold) else np.zeros(len(s_idx), dtype=bool)
        summary.update({
            f"nn_{space}_median_synthetic": _median(distance), f"nn_{space}_median_real": _median(real),
            f"nn_{space}_ratio": _ratio(_median(distance), _median(real)), f"nn_{space}_threshold": threshold,
            f"near_copy_fraction_{space}": float(flags[space].mean()) if math.isfinite(threshold) else math.nan,
        })
        for k, i in enumerate(s_idx):
            rows.setdefault(i, {}).update({
                f"nn_{space}_distance": float(distance[k]), f"nn_{space}_train_file": train.names[t_idx[int(nearest[k])]],
                f"nn_{space}_train_index": t_idx[int(nearest[k])], f"near_copy_{space}": bool(flags[space][k]) if math.isfinite(threshold) else None,
            })
    both = flags["feature"] & flags["pixel"]
    summary["near_copy_fraction"] = float(both.mean()) if math.isfinite(summary["nn_pixel_threshold"]) else math.nan
    summary["near_copies"] = int(both.sum())
    for k, i in enumerate(s_idx):
        rows[i]["near_copy"] = bool(both[k]) if math.isfinite(summary["nn_pixel_threshold"]) else None
        rows[i]["nn_pixel_relative"] = _ratio(rows[i]["nn_pixel_distance"], summary["nn_pixel_median_real"])
    return summary, rows


def evaluate(synthetic: ImageSet, real: ImageSet, train: ImageSet, african: ImageSet | None, classes: Sequence[str],
             max_pairs: int, seed: int, with_fid: bool) -> dict:
    """Every number of the report from sets whose features (and probabilities) are filled in."""
    import numpy as np

    classes = list(classes)
    predicted = [classes[int(row.argmax())] for row in synthetic.probabilities]
    per_image = [{"file": name, "plane": plane, "target": accuracy_target(plane, classes), "predicted": pred,
                  "probability": float(row.max())} for name, plane, pred, row in zip(synthetic.names, synthetic.planes, predicted, synthetic.probabilities)]
    for entry, row in zip(per_image, synthetic.probabilities):
        entry["p_target"] = float(row[classes.index(entry["target"])]) if entry["target"] else None
        entry["correct"] = (entry["predicted"] == entry["target"]) if entry["target"] else None
    per_plane, notes = [], []
    for plane in plane_order(synthetic.planes, classes):
        s_idx, r_idx = synthetic.indices(plane), real.indices(plane)
        target = accuracy_target(plane, classes)
        scored = [per_image[i]["correct"] for i in s_idx if per_image[i]["correct"] is not None]
        row = {"plane": plane, "n_synthetic": len(s_idx), "n_real": len(r_idx), "accuracy_target": target or "",
               "accuracy": float(np.mean(scored)) if scored else math.nan,
               "predicted_as": ", ".join(f"{name} {count}" for name, count in Counter(per_image[i]["predicted"] for i in s_idx).most_common())}
        row["classifier_feature_frechet"] = frechet_distance(synthetic.features[s_idx], real.features[r_idx]) if r_idx else math.nan
        if african is not None:
            a_idx = african.indices(plane)
            row["classifier_feature_frechet_real_vs_african"] = frechet_distance(real.features[r_idx], african.features[a_idx]) if r_idx and a_idx else math.nan
        if with_fid:
            row["fid"] = frechet_distance(synthetic.inception_features[s_idx], real.inception_features[r_idx]) if r_idx else math.nan
        row["ms_ssim_synthetic"], row["ms_ssim_pairs"] = mean_pairwise_ms_ssim([synthetic.ms_ssim[i] for i in s_idx], max_pairs, seed, "synthetic/" + plane)
        row["ms_ssim_real"], _ = mean_pairwise_ms_ssim([real.ms_ssim[i] for i in r_idx], max_pairs, seed, "real/" + plane)
        audit, nn_rows = memorisation_audit(synthetic, train, plane)
        row.update(audit)
        for i, fields in nn_rows.items():
            per_image[i].update(fields)
        plane_notes = []
        if target is None:
            plane_notes.append(f"the classifier has no class for {plane}: accuracy n/a")
        elif target != plane:
            plane_notes.append(f"scored as {target} (the classifier's class for it); not in the overall accuracy")
        if not r_idx:
            plane_notes.append("no real images of this plane: no Fréchet distance" + (" or FID" if with_fid else ""))
        if not train.indices(plane):
            plane_notes.append("no training images of this plane: no memorisation audit")
        elif len(train.indices(plane)) < 2:
            plane_notes.append("fewer than 2 training images: no real-to-real reference, near copies n/a")
        if len(s_idx) < 2:
            plane_notes.append("fewer than 2 generated images: Fréchet distance and MS-SSIM n/a")
        row["note"] = "; ".join(plane_notes)
        if plane_notes:
            notes.append(f"{plane}: {row['note']}.")
        per_plane.append(row)

    # overall numbers
    own = [e["correct"] for e in per_image if e["target"] is not None and e["target"] == e["plane"]]
    shared = [p for p in plane_order(synthetic.planes, classes) if real.indices(p)]
    s_all = [i for p in shared for i in synthetic.indices(p)]
    r_all = [i for p in shared for i in real.indices(p)]
    audited = [e for e in per_image if e.get("near_copy") is not None]

    def fraction(key: str) -> float:
        values = [e[key] for e in per_image if e.get(key) is not None]
        return float(np.mean(values)) if values else math.nan

    headline = {
        "accuracy": float(np.mean(own)) if own else math.nan,
        "classifier_feature_frechet": frechet_distance(synthetic.features[s_all], real.features[r_all]) if s_all else math.nan,
        "ms_ssim_synthetic": _finite_mean(row["ms_ssim_synthetic"] for row in per_plane),
        "ms_ssim_real": _finite_mean(row["ms_ssim_real"] for row in per_plane if row["n_real"]),
        "near_copy_fraction": float(np.mean([e["near_copy"] for e in audited])) if audited else math.nan,
        "near_copy_fraction_pixel": fraction("near_copy_pixel"),
        "near_copy_fraction_feature": fraction("near_copy_feature"),
        "fid": frechet_distance(synthetic.inception_features[s_all], real.inception_features[r_all]) if with_fid and s_all else None,
        "n_synthetic": len(synthetic), "n_real": len(real),
    }
    if african is not None and len(african):
        a_all = [i for p in shared for i in african.indices(p)]
        headline["classifier_feature_frechet_real_vs_african"] = (
            frechet_distance(real.features[[i for p in shared if african.indices(p) for i in real.indices(p)]], african.features[a_all]) if a_all else math.nan)
    if not shared:
        notes.append("No plane of the generated set has real images: no Fréchet distance, FID or memorisation audit.")
    return {"headline": headline, "per_plane": per_plane, "per_image": per_image, "notes": notes, "shared_planes": shared}


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


# --- plots -----------------------------------------------------------------------------------
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194),
           (127, 127, 127), (188, 189, 34), (23, 190, 207)]
SOURCE_MARKERS = {"real (Spanish)": "circle", "real (African)": "square", "synthetic": "triangle"}


def tsne_embedding(features, seed: int):
    """2-D t-SNE of feature rows (perplexity min(30, (n - 1) / 3), PCA init, seeded); None below 4 rows."""
    import numpy as np
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    if len(features) < 4:
        return None
    perplexity = min(30.0, (len(features) - 1) / 3.0)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(features)


def _marker(draw, x: float, y: float, shape: str, colour, r: int = 5) -> None:
    outline = (40, 40, 40)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=outline)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour, outline=outline)
    else:
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour, outline=outline)


def draw_tsne(path: Path, points, planes: Sequence[str], sources: Sequence[str], title: str, message: str | None = None) -> Path:
    from PIL import Image, ImageDraw

    from fetalstudio.evaluation.classifier import _font, _text

    size, left, top, legend = 620, 30, 50, 230
    image = Image.new("RGB", (left + size + legend, top + size + 30), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    _text(draw, (image.width // 2, 22), title, font)
    draw.rectangle([left, top, left + size, top + size], outline=(180, 180, 180))
    if points is None:
        _text(draw, (left + size // 2, top + size // 2), message or "too few images for t-SNE", font)
        image.save(path)
        return path
    unique_planes = list(dict.fromkeys(planes))
    colours = {plane: PALETTE[i % len(PALETTE)] for i, plane in enumerate(unique_planes)}
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = [max(float(h - l), 1e-9) for l, h in zip(lo, hi)]
    order = sorted(range(len(points)), key=lambda i: list(SOURCE_MARKERS).index(sources[i]) if sources[i] in SOURCE_MARKERS else 9)
    for i in order:
        x = left + 12 + (points[i, 0] - lo[0]) / span[0] * (size - 24)
        y = top + 12 + (points[i, 1] - lo[1]) / span[1] * (size - 24)
        _marker(draw, x, y, SOURCE_MARKERS.get(sources[i], "circle"), colours[planes[i]])
    x0, y = left + size + 20, top + 10
    _text(draw, (x0, y), "colour: plane", small, anchor="lm")
    for plane in unique_planes:
        y += 22
        _marker(draw, x0 + 8, y, "circle", colours[plane])
        _text(draw, (x0 + 22, y), f"{plane} ({sum(1 for p in planes if p == plane)})", small, anchor="lm")
    y += 40
    _text(draw, (x0, y), "shape: source", small, anchor="lm")
    for source, shape in SOURCE_MARKERS.items():
        count = sum(1 for s in sources if s == source)
        if count:
            y += 22
            _marker(draw, x0 + 8, y, shape, (200, 200, 200))
            _text(draw, (x0 + 22, y), f"{source} ({count})", small, anchor="lm")
    image.save(path)
    return path


def draw_nearest_neighbours(path: Path, pairs: list[dict], synthetic: ImageSet, train: ImageSet, message: str | None = None) -> Path:
    """Generated image beside its nearest training image (pixel space), closest pairs first."""
    from PIL import Image, ImageDraw

    from fetalstudio.evaluation.classifier import _font, _text

    columns = 2
    cell_w, cell_h, gap, top = max(2 * THUMB_SIZE + 12, 340), THUMB_SIZE + 76, 24, 50
    rows = max(1, math.ceil(len(pairs) / columns))
    image = Image.new("RGB", (columns * (cell_w + gap) + gap, top + rows * (cell_h + 10) + 10), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    _text(draw, (image.width // 2, 18), "Closest generated / training pairs (left: generated, right: its nearest training image)", font)
    if not pairs:
        _text(draw, (image.width // 2, top + cell_h // 2), message or "no generated plane has training images", font)
    for k, pair in enumerate(pairs):
        x = gap + (k % columns) * (cell_w + gap)
        y = top + (k // columns) * (cell_h + 10)
        image.paste(synthetic.thumbs[pair["synthetic_index"]].convert("RGB"), (x, y))
        image.paste(train.thumbs[pair["train_index"]].convert("RGB"), (x + THUMB_SIZE + 12, y))
        line = y + THUMB_SIZE + 10
        near = pair.get("near_copy")
        _text(draw, (x, line), pair["plane"] + ("   NEAR COPY" if near else ""), small, fill=(200, 30, 30) if near else (0, 0, 0), anchor="lm")
        _text(draw, (x, line + 15), f"pixel distance {pair['pixel']:.3f} (real-real median {pair['pixel_median_real']:.3f})", small, anchor="lm")
        _text(draw, (x, line + 30), f"feature distance {pair['feature']:.3f} (real-real median {pair['feature_median_real']:.3f})", small, anchor="lm")
        _text(draw, (x, line + 45), _shorten(pair["synthetic_file"]) + "  |  " + _shorten(pair["train_file"]), small, fill=(90, 90, 90), anchor="lm")
    image.save(path)
    return path


def _shorten(name: str, keep: int = 24) -> str:
    name = Path(name).name
    return name if len(name) <= keep else "..." + name[-keep + 3:]


def closest_pairs(result: dict, limit: int) -> list[dict]:
    """The ``limit`` generated images closest to a training image, relative to their plane's
    real-to-real median NN distance (pixel space) so planes compare."""
    medians = {row["plane"]: row for row in result["per_plane"]}
    candidates = []
    for index, entry in enumerate(result["per_image"]):
        if "nn_pixel_distance" not in entry:
            continue
        plane = medians[entry["plane"]]
        relative = entry["nn_pixel_relative"]
        candidates.append({
            "synthetic_index": index, "train_index": entry["nn_pixel_train_index"], "plane": entry["plane"],
            "synthetic_file": entry["file"], "train_file": entry["nn_pixel_train_file"], "pixel": entry["nn_pixel_distance"],
            "feature": entry["nn_feature_distance"], "near_copy": entry.get("near_copy"),
            "pixel_median_real": plane.get("nn_pixel_median_real", math.nan), "feature_median_real": plane.get("nn_feature_median_real", math.nan),
            "key": relative if math.isfinite(relative) else entry["nn_pixel_distance"],
        })
    return sorted(candidates, key=lambda c: c["key"])[:max(0, limit)]


# --- report ----------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _blank_nan(row: dict) -> dict:
    """CSV cells: n/a (NaN) becomes an empty cell."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


PER_IMAGE_COLUMNS = ["file", "plane", "target", "predicted", "probability", "p_target", "correct", "nn_feature_distance",
                     "nn_feature_train_file", "near_copy_feature", "nn_pixel_distance", "nn_pixel_train_file", "near_copy_pixel",
                     "nn_pixel_relative", "near_copy"]


def write_reports(out: Path, result: dict, setup: dict, fid_label: str | None) -> Path:
    from fetalstudio.evaluation.report import markdown_table, write_report

    h = result["headline"]
    fid_text = (f"{_fmt(h['fid'], 2)}" if fid_label else "not computed")
    headline_rows = [
        {"metric": "plane accuracy of the classifier on generated images", "value": _fmt(h["accuracy"]),
         "meaning": "higher = the generated images look like their plane to the classifier"},
        {"metric": "classifier-feature Fréchet distance (generated vs real)", "value": _fmt(h["classifier_feature_frechet"]),
         "meaning": "lower = closer feature distributions; not FID"},
    ]
    if "classifier_feature_frechet_real_vs_african" in h:
        headline_rows.append({"metric": "classifier-feature Fréchet distance, real Spanish vs real African (reference)",
                              "value": _fmt(h["classifier_feature_frechet_real_vs_african"]), "meaning": "how far apart two real populations are"})
    headline_rows += [
        {"metric": f"FID ({fid_label})" if fid_label else "FID", "value": fid_text,
         "meaning": "lower = closer; not comparable to TF-Inception FIDs of papers" if fid_label else "give --inception-weights FILE"},
        {"metric": "MS-SSIM within planes, generated", "value": _fmt(h["ms_ssim_synthetic"]), "meaning": "lower = more diverse"},
        {"metric": "MS-SSIM within planes, real (reference)", "value": _fmt(h["ms_ssim_real"]), "meaning": "the diversity of real images"},
        {"metric": "near copies of training images (pixel and feature space)", "value": _fmt(h["near_copy_fraction"]),
         "meaning": "share of generated images as close to a training image as the closest 5 % of real neighbours (in both spaces); near 0 for new images"},
        {"metric": "near copies, pixel space only", "value": _fmt(h["near_copy_fraction_pixel"]), "meaning": ""},
        {"metric": "near copies, feature space only", "value": _fmt(h["near_copy_fraction_feature"]), "meaning": ""},
    ]
    quality = [{"plane": r["plane"], "generated": r["n_synthetic"], "real": r["n_real"], "accuracy": r["accuracy"],
                "predicted as": r["predicted_as"], "feature Fréchet": r["classifier_feature_frechet"],
                **({"Fréchet real vs African": r["classifier_feature_frechet_real_vs_african"]} if "classifier_feature_frechet_real_vs_african" in r else {}),
                **({"FID": r["fid"]} if fid_label else {}),
                "MS-SSIM generated": r["ms_ssim_synthetic"], "MS-SSIM real": r["ms_ssim_real"], "pairs": r["ms_ssim_pairs"]} for r in result["per_plane"]]
    audit = [{"plane": r["plane"], "generated": r["n_synthetic"], "training": r.get("n_train", 0),
              "feature NN median, gen": r.get("nn_feature_median_synthetic", math.nan), "feature NN median, real": r.get("nn_feature_median_real", math.nan),
              "feature ratio": r.get("nn_feature_ratio", math.nan), "pixel NN median, gen": r.get("nn_pixel_median_synthetic", math.nan),
              "pixel NN median, real": r.get("nn_pixel_median_real", math.nan), "pixel ratio": r.get("nn_pixel_ratio", math.nan),
              "near copies (feature)": r.get("near_copy_fraction_feature", math.nan), "near copies (pixel)": r.get("near_copy_fraction_pixel", math.nan),
              "near copies (both)": r.get("near_copy_fraction", math.nan)} for r in result["per_plane"]]
    setup_text = "\n".join(f"- {key}: {value}" for key, value in setup.items())
    fid_note = (f"FID uses {fid_label}: 2048-d pool features of 299 px grayscale images copied to 3 channels with ImageNet normalisation. "
                "Its values are not comparable to FIDs of papers computed with the TF-Inception network (pytorch-fid / clean-fid weights), "
                "and with a few hundred images or fewer it is strongly biased upward." if fid_label else
                "FID was not computed: it needs Inception-v3 weights, which are not shipped. Download torchvision's "
                f"{INCEPTION_URL} and pass `--inception-weights inception_v3_google-0cc3c7bd.pth`.")
    notes = "\n".join(f"- {line}" for line in [
        "Accuracy: the classifier's most likely class equals the plane the image was generated for. The overall figure covers "
        "the classifier's own classes only; head planes are scored as brain per plane.",
        "Classifier-feature Fréchet distance: Fréchet distance between Gaussians fitted to the pooled penultimate features of the "
        f"plane classifier `{setup.get('classifier', '')}` — a small 5-class ultrasound classifier, so the features describe what separates "
        "the planes, not image quality in general. It is not FID. With few images (20 real per plane) the estimate is biased upward "
        "and noisy: compare runs with the same numbers of images, and read the real-vs-African value as the scale of a real domain shift.",
        "The overall Fréchet distance pools all planes that have real images; different plane proportions in the two sets raise it.",
        fid_note,
        f"MS-SSIM: multi-scale structural similarity of {MS_SSIM_SIZE} px grayscale image pairs within a plane (data range 1), at most "
        f"{setup.get('max MS-SSIM pairs per plane', '')} pairs per plane. Lower = more diverse; generated sets much above the real figure "
        "lack diversity. The overall figures are means over planes.",
        "Memorisation audit: each generated image's distance to its nearest training image of the same plane, in classifier features "
        f"(unit-length vectors, L2) and in pixels ({PIXEL_SIZE} px grayscale, root-mean-square difference, 0-1), against the "
        "nearest-neighbour distances among the training images themselves (leave one out). Ratio = median generated / median real; "
        f"well below 1 means the generator reproduces training images. A near copy lies at or below the {NEAR_COPY_PERCENTILE:g}th "
        "percentile of the real-to-real distances in both spaces (about 5 % of independent real images would). With 20 training "
        "images per plane the percentile is rough, and the classifier was trained on these images, so look at nearest_neighbours.png.",
        "Every image was made square first (" + str(setup.get("crop", "")) + ") and converted to grayscale.",
        *result["notes"],
    ])
    sections = {
        "Setup": setup_text,
        "Headline": headline_rows,
        "Per plane: accuracy, distribution distance, diversity": quality,
        "Memorisation audit (nearest training image of the same plane)": markdown_table(audit) + "\n\n![nearest neighbours](nearest_neighbours.png)",
        "t-SNE of classifier features": "Colour = plane, shape = source (circle: real Spanish, square: real African, triangle: generated).\n\n![t-SNE](tsne.png)",
        "Notes": notes,
        "Files": "per_plane.csv (every per-plane number), per_image.csv (prediction and nearest training images of each generated image), "
                 "summary.json, tsne.png, nearest_neighbours.png.",
    }
    per_image_rows = [_blank_nan({k: e.get(k) for k in PER_IMAGE_COLUMNS}) for e in result["per_image"]]
    per_plane_rows = [_blank_nan(row) for row in result["per_plane"]]
    return write_report(out, "Synthesis evaluation", sections, csv_files={"per_plane.csv": per_plane_rows, "per_image.csv": per_image_rows},
                        json_files={"summary.json": {"headline": h, "setup": setup, "per_plane": result["per_plane"], "notes": result["notes"]}})


# --- running ---------------------------------------------------------------------------------
def _set_threads(threads: int | None):
    """Limit torch and BLAS threads (a busy 2-core machine is far faster with 1)."""
    import contextlib

    import torch

    if not threads:
        return contextlib.nullcontext()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def _validate(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_pairs", "max_images_per_plane", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise FetalStudioError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
    if args.nn_pairs < 0:
        raise FetalStudioError(f"--nn-pairs must be 0 or more (got {args.nn_pairs}).")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    with _set_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from fetalstudio.classification.predict import PlaneClassifier
    from fetalstudio.errors import ModelNotFoundError
    from fetalstudio.evaluation.report import write_json
    from fetalstudio.models.device import default_placement
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.paths import checkpoints_dir

    started = time.perf_counter()
    real_source = args.real
    if real_source is None:
        if not DEFAULT_REAL.exists():
            raise FetalStudioError(f"The default real set {DEFAULT_REAL} does not exist. Pass --real FOLDER_OR_CSV: real images of the "
                                   "generated planes (e.g. the images the generator was trained on).")
        real_source = DEFAULT_REAL
    train_source = args.train_real or real_source
    synthetic_items = subsample(read_labelled(args.synthetic, "synthetic"), args.max_images_per_plane, args.seed)
    real_all = read_labelled(real_source, "real")
    real_items = subsample(real_all, args.max_images_per_plane, args.seed)
    same_train = Path(train_source).expanduser().resolve() == Path(real_source).expanduser().resolve()
    train_items = real_all if same_train else read_labelled(train_source, "train_real")
    african_items = subsample(read_labelled(args.african, "african"), args.max_images_per_plane, args.seed) if args.african else None

    with_fid = args.inception_weights is not None
    placement = default_placement(args.device)
    inception = load_inception(args.inception_weights, placement.device) if with_fid else None  # fail early on a bad file
    manager = ModelManager(checkpoints_dir(), placement=placement)
    try:
        model_id = args.classifier or manager.default_id(ModelKind.CLASSIFIER)
    except ModelNotFoundError:
        raise FetalStudioError("No plane classifier is installed. Give --classifier PATH (a .safetensors classifier) or train one with "
                               "`python -m fetalstudio train classifier --data ../shared/data/spanish_planes --out DIR`.") from None
    entry = manager.entry(model_id)
    if entry.kind is not ModelKind.CLASSIFIER:
        raise FetalStudioError(f"Model {entry.id!r} is a {entry.kind.value}, not a plane classifier; give --classifier a classifier checkpoint.")

    def progress(role: str, done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"[{role}: {done}/{total} images read]", file=sys.stderr, flush=True)

    with manager.use(model_id) as model:
        classifier = PlaneClassifier(model, batch_size=args.batch_size)
        prep = classifier.preprocessing
        synthetic = load_images(synthetic_items, "synthetic", args.synthetic, prep, args.crop, with_fid, progress)
        synthetic.features, synthetic.probabilities = classifier_outputs(classifier, synthetic.tensors, args.batch_size)
        train = load_images(train_items, "real" if same_train else "train_real", train_source, prep, args.crop, with_fid and same_train, progress)
        train.features, _ = classifier_outputs(classifier, train.tensors, args.batch_size, with_probabilities=False)
        if same_train:  # the metric subset of the real set is taken from the (never subsampled) training set
            keep_paths = {item.path for item in real_items}
            real = train.subset([i for i, item in enumerate(train_items) if item.path in keep_paths])
        else:
            real = load_images(real_items, "real", real_source, prep, args.crop, with_fid, progress)
            real.features, _ = classifier_outputs(classifier, real.tensors, args.batch_size, with_probabilities=False)
        african = load_images(african_items, "african", args.african, prep, args.crop, False, progress) if african_items else None
        if african is not None:
            african.features, _ = classifier_outputs(classifier, african.tensors, args.batch_size, with_probabilities=False)
        classes = classifier.classes
        preprocessing = {"input_size": prep.input_size, "in_chans": prep.in_chans, "resize": prep.resize}
    if with_fid:
        print("[Inception features]", file=sys.stderr, flush=True)
        synthetic.inception_features = inception_features(inception, synthetic.inception, args.batch_size)
        real.inception_features = inception_features(inception, real.inception, args.batch_size)

    result = evaluate(synthetic, real, train, african, classes, args.max_pairs, args.seed, with_fid)
    fid_label = f"torchvision Inception-v3 weights from {args.inception_weights}" if with_fid else None
    result["headline"]["fid_weights"] = str(args.inception_weights) if with_fid else None

    args.out.mkdir(parents=True, exist_ok=True)
    tsne_sets = [(real, "real (Spanish)"), *([(african, "real (African)")] if african is not None else []), (synthetic, "synthetic")]
    import numpy as np

    features = np.concatenate([unit_rows(s.features) for s, _ in tsne_sets if len(s)])
    points = tsne_embedding(features, args.seed)
    draw_tsne(args.out / "tsne.png", points, [p for s, _ in tsne_sets for p in s.planes], [label for s, label in tsne_sets for _ in s.planes],
              f"t-SNE of classifier features ({len(features)} images)")
    pairs = closest_pairs(result, args.nn_pairs)
    draw_nearest_neighbours(args.out / "nearest_neighbours.png", pairs, synthetic, train)

    seconds = time.perf_counter() - started
    counts = lambda s: ", ".join(f"{p} {n}" for p, n in sorted(s.counts().items())) if s is not None else "none"  # noqa: E731
    setup = {
        "generated": f"`{args.synthetic}` ({len(synthetic)} images: {counts(synthetic)})",
        "real": f"`{real_source}` ({len(real)} images: {counts(real)})",
        "training images for the audit": f"`{train_source}` ({len(train)} images)" + (" (= real, never subsampled)" if same_train else ""),
        "African": f"`{args.african}` ({len(african)} images: {counts(african)})" if african is not None else "not given",
        "classifier": entry.id,
        "classifier preprocessing": json.dumps(preprocessing),
        "crop": args.crop,
        "max images per plane": args.max_images_per_plane or "all",
        "max MS-SSIM pairs per plane": args.max_pairs,
        "seed": args.seed,
        "FID": fid_label or "not computed (no --inception-weights)",
        "device": manager.placement.label,
        "time": f"{seconds:.1f} s",
    }
    summary_path = write_reports(args.out, result, setup, fid_label)
    headline = {key: result["headline"].get(key) for key in HEADLINE}
    if "classifier_feature_frechet_real_vs_african" in result["headline"]:
        headline["classifier_feature_frechet_real_vs_african"] = result["headline"]["classifier_feature_frechet_real_vs_african"]
    if args.json:
        write_json(args.json, headline)
    printable = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in headline.items()}
    print(json.dumps({**printable, "report": str(summary_path)}))
    return 0
