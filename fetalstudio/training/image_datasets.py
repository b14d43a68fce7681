"""Image + caption training sets for ``train sd`` and ``train lora``.

A ``--data`` source is a folder or a CSV:

* a classification CSV (``filename``, ``plane``; e.g. ``spanish_planes/labels.csv``) or a folder
  of plane sub-folders (``brain/*.png``...): caption ``a photo of fetal <plane>``;
* a segmentation CSV (``image``, ``mask``, optional ``trimester``/``hc_mm``; e.g.
  ``hc18_heads/pairs.csv``, ``es_heads/pairs.csv``): caption ``An ultrasound image of a fetal
  head, <trimester> trimester``, the trimester from the ``trimester`` column, else from ``hc_mm``
  (``captions.trimester_from_hc``), else the ``unknown_trimester`` choice;
* any CSV with a ``caption`` column (and ``image`` or ``filename``): that caption per image;
* a structures folder (``images.csv`` + ``boxes.csv``, e.g. ``first_trimester_structures``, with
  its ``more/``): the **training split** only (``data.structures.split_structures``; the held-out
  images stay unseen by every generator), caption ``vocabulary.anatomy_caption`` of the layout plane
  with that image's annotated structures, the prompt the Anatomy engine generates with;
* any other folder of images: the caption from a ``.txt`` file beside each image, else the
  folder's caption (``--caption``).

A folder holding ``labels.csv`` or ``pairs.csv`` is read through that table. Precedence: a
per-image caption (column or .txt) > the folder caption (``--caption`` of ``train lora``) > the
caption derived from plane or trimester. The derived plane/trimester stays the item's ``label``
(used for class-balanced sampling and for ``--plane``/``--trimester`` selection).

African images are refused: they are the zero-shot evaluation population of FU-LoRA
(METHODS section 1) and must never train a generator.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fetalstudio.data.structures import BOXES_TABLE, IMAGES_TABLE, read_structures, split_structures
from fetalstudio.data.tables import IMAGE_SUFFIXES
from fetalstudio.errors import FetalStudioError
from fetalstudio.training.captions import DEFAULT_UNKNOWN_TRIMESTER, head_trimester
from fetalstudio.vocabulary import ANATOMY_PLANES, Plane, anatomy_caption, head_caption, plane_caption

AFRICAN_COUNTRY_CODES = {"DZA", "EGY", "GHA", "MWI", "UGA"}
AFRICAN_COUNTRY_NAMES = {"algeria", "egypt", "ghana", "malawi", "uganda"}
_AFRICAN_NAME = re.compile(r"_(DZA|EGY|GHA|MWI|UGA)_plane\d", re.IGNORECASE)
CROP_CHOICES = ("center", "pad", "stretch")


@dataclass(frozen=True)
class ImageItem:
    image: Path
    caption: str
    label: str  # the class for balanced sampling: "plane/brain", "head/second", or the caption itself
    mask: Path | None = None
    source: str = ""
    caption_from: str = ""  # plane | trimester | hc_proxy | default_trimester | column | txt | folder | layout


def collect_items(
    sources: list[Path],
    *,
    caption: str | None = None,
    unknown_trimester: str = DEFAULT_UNKNOWN_TRIMESTER,
    need_masks: bool = False,
    deduplicate: bool = True,
) -> list[ImageItem]:
    """All training images of ``sources`` with their captions; clear errors for unusable data."""
    if not sources:
        raise FetalStudioError("No training data: give --data FOLDER_OR_CSV (repeatable).")
    items: list[ImageItem] = []
    for source in sources:
        source = Path(source).expanduser()
        found = _read_source(source, caption, unknown_trimester)
        _refuse_african(source, found)
        if need_masks:
            without = [i for i in found if i.mask is None]
            if without:
                raise FetalStudioError(
                    f"{source}: --mask-channel needs an image/mask pair for every image ({len(without)} have no "
                    "mask). Give a CSV with image and mask columns, such as hc18_heads/pairs.csv."
                )
        missing = [i.image for i in found if not i.image.is_file()]
        if missing:
            raise FetalStudioError(
                f"{source}: {len(missing)} image(s) listed but not found, e.g. {missing[0]}. Paths in a CSV are "
                "relative to the CSV's folder."
            )
        items.extend(found)
    if deduplicate:
        items = _deduplicate(items)
    return items


def _read_source(source: Path, caption: str | None, unknown_trimester: str) -> list[ImageItem]:
    if not source.exists():
        raise FetalStudioError(f"{source} does not exist. Give a folder of images or a CSV table.")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise FetalStudioError(f"{source} is neither a folder nor a .csv table.")
        return _read_csv(source, caption, unknown_trimester)
    for table in ("labels.csv", "pairs.csv"):
        if (source / table).is_file():
            return _read_csv(source / table, caption, unknown_trimester)
    if (source / IMAGES_TABLE).is_file() and (source / BOXES_TABLE).is_file():
        return _read_structures_folder(source, caption)
    plane_folders = [p for p in sorted(source.iterdir()) if p.is_dir() and p.name.lower() in {x.value for x in Plane}]
    if plane_folders:
        items = []
        for folder in plane_folders:
            for path in _images_in(folder):
                own = _txt_caption(path)
                text = own or caption or plane_caption(folder.name.lower())
                how = "txt" if own else "folder" if caption else "plane"
                items.append(ImageItem(path, text, f"plane/{folder.name.lower()}", source=str(source), caption_from=how))
        if items:
            return items
    images = _images_in(source)
    if not images:
        raise FetalStudioError(
            f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}). Give a folder of images, a folder of "
            "plane sub-folders (brain/, femur/...) or a CSV table."
        )
    items, uncaptioned = [], []
    for path in images:
        text = _txt_caption(path)
        if text:
            items.append(ImageItem(path, text, text, source=str(source), caption_from="txt"))
        elif caption:
            items.append(ImageItem(path, caption, caption, source=str(source), caption_from="folder"))
        else:
            uncaptioned.append(path)
    if uncaptioned:
        raise FetalStudioError(
            f"{len(uncaptioned)} image(s) in {source} have no caption, e.g. {uncaptioned[0].name}. Put a .txt file "
            "with the caption beside each image, or give one caption for the folder with --caption \"...\"."
        )
    return items


def layout_plane_of(structures: set[str], where: Path) -> str:
    """The layout plane whose structure list holds every name in ``structures``."""
    for plane in ANATOMY_PLANES.values():
        if structures <= {s.name for s in plane.structures}:
            return plane.name
    raise FetalStudioError(
        f"{where}: the structures {', '.join(sorted(structures))} do not all belong to one layout plane "
        f"({'; '.join(f'{p.name}: ' + ', '.join(s.name for s in p.structures) for p in ANATOMY_PLANES.values())}). "
        "Rename them in boxes.csv."
    )


def _read_structures_folder(source: Path, caption: str | None) -> list[ImageItem]:
    annotated = split_structures(read_structures(source), "train")
    plane = layout_plane_of({box[0] for item in annotated for box in item.boxes}, source / BOXES_TABLE)
    order = [s.name for s in ANATOMY_PLANES[plane].structures]
    items = []
    for item in annotated:
        text = caption or anatomy_caption(plane, sorted(set(item.structures), key=order.index))
        items.append(ImageItem(item.path, text, f"layout/{plane}", source=str(source),
                               caption_from="folder" if caption else "layout"))
    return items


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _txt_caption(image: Path) -> str:
    text_file = image.with_suffix(".txt")
    if text_file.is_file():
        return " ".join(text_file.read_text(encoding="utf-8").split())
    return ""


def _float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _read_csv(path: Path, caption: str | None, unknown_trimester: str) -> list[ImageItem]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise FetalStudioError(f"{path} has no rows: there is nothing to train on.")
    columns = {c.strip() for c in rows[0] if c}
    path_column = "image" if "image" in columns else "filename" if "filename" in columns else None
    if path_column is None:
        raise FetalStudioError(f"{path} needs an image (or filename) column with the image paths.")
    if "country" in columns or "country_code" in columns:
        values = {str(r.get(c) or "").strip().lower() for r in rows for c in ("country", "country_code")}
        if values & ({c.lower() for c in AFRICAN_COUNTRY_CODES} | AFRICAN_COUNTRY_NAMES):
            raise FetalStudioError(_AFRICAN_MESSAGE.format(source=path))
    base = path.parent
    items, uncaptioned = [], []
    for row in rows:
        image = base / row[path_column].strip()
        mask = base / row["mask"].strip() if row.get("mask") else None
        derived = _derived_caption(row, mask is not None, unknown_trimester, path)
        if derived == "skip":
            continue  # a head of unknown trimester with unknown_trimester="skip"
        own = (row.get("caption") or "").strip()
        how = "column" if own else "txt"
        own = own or _txt_caption(image)
        if own or caption:
            how = how if own else "folder"
            text = own or caption
            items.append(ImageItem(image, text, derived[1] if derived else text, mask, str(path), how))
        elif derived:
            items.append(ImageItem(image, derived[0], derived[1], mask, str(path), derived[2]))
        else:
            uncaptioned.append(image)
    if uncaptioned:
        raise FetalStudioError(
            f"{len(uncaptioned)} row(s) of {path} have no caption, e.g. {uncaptioned[0].name}. Add a caption column, "
            "a plane column, image/mask pairs with a trimester or hc_mm, or give --caption \"...\"."
        )
    return items


def _derived_caption(row: dict, has_mask: bool, unknown_trimester: str, path: Path):
    """(caption, label, how) from a plane column or a head pair's trimester/HC; None if neither; "skip"."""
    plane = (row.get("plane") or "").strip().lower()
    if plane:
        try:
            return plane_caption(plane), f"plane/{plane}", "plane"
        except ValueError as error:
            raise FetalStudioError(f"{path}: {error}") from None
    if has_mask:
        try:
            trimester, how = head_trimester(row.get("trimester"), _float(row.get("hc_mm")), unknown_trimester)
        except ValueError as error:
            raise FetalStudioError(f"{path}: {error}") from None
        if trimester is None:
            return "skip"
        return head_caption(trimester), f"head/{trimester.value}", how
    return None


_AFRICAN_MESSAGE = (
    "{source} contains African fetal-plane images. They are FetalStudio's zero-shot evaluation population "
    "(FU-LoRA, METHODS section 1) and must never train a generator: leave them out of --data."
)


def is_african_image(path: Path) -> bool:
    """An image of the African planes set: under a folder named ``african`` or named like its files."""
    parts = {p.lower() for p in Path(path).resolve().parts}
    return "african" in parts or bool(_AFRICAN_NAME.search(Path(path).name))


def _refuse_african(source: Path, items: list[ImageItem]) -> None:
    for item in items:
        if is_african_image(item.image):
            raise FetalStudioError(_AFRICAN_MESSAGE.format(source=source))


def _deduplicate(items: list[ImageItem]) -> list[ImageItem]:
    """Byte-identical images are kept once (the first source wins, e.g. a plane over a head caption)."""
    seen: set[str] = set()
    unique = []
    for item in items:
        digest = hashlib.sha1(item.image.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        unique.append(item)
    return unique


def summarize(items: list[ImageItem]) -> dict:
    return {
        "images": len(items),
        "captions": dict(sorted(Counter(i.caption for i in items).items())),
        "caption_from": dict(sorted(Counter(i.caption_from for i in items).items())),
        "sources": dict(sorted(Counter(i.source for i in items).items())),
    }


def select_items(items: list[ImageItem], *, planes=(), trimesters=(), labelled_trimester_only=False,
                 max_images: int | None = None, seed: int = 0) -> list[ImageItem]:
    """Filter by plane / head trimester and draw at most ``max_images`` (seeded, order kept)."""
    if planes or trimesters:
        wanted = {f"plane/{p}" for p in planes} | {f"head/{t}" for t in trimesters}
        items = [i for i in items if i.label in wanted]
    if labelled_trimester_only:
        items = [i for i in items if not i.label.startswith("head/") or i.caption_from == "trimester"]
    if max_images is not None and len(items) > max_images:
        keep = sorted(np.random.default_rng(seed).choice(len(items), size=max_images, replace=False))
        items = [items[k] for k in keep]
    if not items:
        raise FetalStudioError("No image is left after the selection (--plane/--trimester/--max-images): widen it.")
    return items


# --- pixels ----------------------------------------------------------------------------------

def _square(image, resolution: int, crop: str, resample):
    from PIL import ImageOps

    if crop == "stretch":
        return image.resize((resolution, resolution), resample)
    if crop == "pad":
        return ImageOps.pad(image, (resolution, resolution), method=resample, color=0, centering=(0.5, 0.5))
    if crop == "center":
        return ImageOps.fit(image, (resolution, resolution), method=resample, centering=(0.5, 0.5))
    raise ValueError(f"crop must be one of {', '.join(CROP_CHOICES)} (got {crop!r})")


def load_pixels(item: ImageItem, resolution: int, crop: str = "center", mask_channel: int | None = None) -> np.ndarray:
    """resolution x resolution x 3 uint8: the image (RGB), or image+mask packed when ``mask_channel`` is set."""
    from PIL import Image

    with Image.open(item.image) as opened:
        if mask_channel is None:
            mode = "L" if opened.mode in ("L", "LA", "I", "I;16", "1") else "RGB"  # resize gray images as gray (3x faster)
            return np.asarray(_square(opened.convert(mode), resolution, crop, Image.BICUBIC).convert("RGB"))
        gray = np.asarray(opened.convert("L"))
    from fetalstudio.pipelines.mask_injection import filled_mask, pack

    if item.mask is None:
        raise FetalStudioError(f"{item.image.name} has no mask: --mask-channel needs image/mask pairs.")
    with Image.open(item.mask) as opened_mask:
        mask = np.asarray(opened_mask.convert("L"))
    if mask.shape != gray.shape:
        raise FetalStudioError(f"{item.mask.name} is {mask.shape[::-1]} but its image is {gray.shape[::-1]}: they must match.")
    packed = pack(gray, filled_mask(mask), mask_channel)  # fill at full size, then resize image and mask together
    return np.asarray(_square(Image.fromarray(packed), resolution, crop, Image.BICUBIC))


def load_all_pixels(items: list[ImageItem], resolution: int, crop: str = "center", mask_channel: int | None = None):
    """A uint8 tensor N x 3 x R x R of every item (kept in memory: the sets here are small)."""
    import torch

    arrays = np.stack([load_pixels(i, resolution, crop, mask_channel) for i in items])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def to_model_range(pixels_uint8):
    """uint8 N x 3 x H x W -> float in [-1, 1]."""
    return pixels_uint8.float().div(127.5).sub(1.0)


def balanced_probabilities(labels: list[str]) -> np.ndarray:
    """Sampling probability per item so that every label is drawn equally often."""
    counts = Counter(labels)
    weights = np.array([1.0 / (len(counts) * counts[label]) for label in labels], dtype=np.float64)
    return weights / weights.sum()
