"""The image sets of ``eval synthesis``: reading labelled sources, subsampling, squaring and the small copies the metrics use."""

from __future__ import annotations

import csv
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fetalstudio.errors import FetalStudioError

CROP_MODES = ("center", "pad", "stretch")
MS_SSIM_SIZE = 256
PIXEL_SIZE = 64
THUMB_SIZE = 144
INCEPTION_SIZE = 299


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

