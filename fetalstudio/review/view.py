"""The pictures of one review item as PNG files, ready to be served to a browser.

Written with fast PNG compression into the session's ``.view/`` folder (never part of the
session's data) and named by the item's mask file, which never changes once written: revisiting
an item reuses its files, and an edit gets new ones. Serving files by path spares the web layer a
second PNG encoding per click.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fetalstudio.imaging.masks import editor_background, overlay
from fetalstudio.review.store import ReviewItem, ReviewSession

VIEW_FOLDER = ".view"
_FAST_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


@dataclass(frozen=True)
class ItemPictures:
    overlay: Path  # the image with the mask tinted and the ellipse drawn
    raw_mask: Path  # the raw mask channel (the session's own file)
    editor_background: Path | None  # the image with the mask tinted, for the brush editor (when asked for)


def _write_rgb(path: Path, rgb: np.ndarray) -> Path:
    if not path.is_file():
        temporary = path.with_name(f".{path.name}.tmp.png")
        cv2.imwrite(str(temporary), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _FAST_PNG)
        temporary.replace(path)
    return path


def item_pictures(session: ReviewSession, item: ReviewItem, *, opacity: float = 0.4, show_mask: bool = True,
                  show_ellipse: bool = True, editor: bool = False) -> ItemPictures:
    """The item's pictures; the editor background only with ``editor`` (a second PNG per mask change)."""
    folder = session.folder / VIEW_FOLDER
    folder.mkdir(exist_ok=True)
    key = Path(item.mask).stem if item.mask else f"{item.id}.none"
    look = f"{int(round(opacity * 100))}{'m' if show_mask else ''}{'e' if show_ellipse else ''}"
    overlay_path = folder / f"{key}.{look}.png"
    background_path = folder / f"{key}.editor.png"
    if not overlay_path.is_file() or (editor and not background_path.is_file()):
        gray, mask = session.load_image(item), session.load_mask(item)
        _write_rgb(overlay_path, overlay(gray, mask, item.ellipse, opacity=opacity, show_mask=show_mask, show_ellipse=show_ellipse))
        if editor:
            _write_rgb(background_path, editor_background(gray, mask))
    raw = session.folder / item.raw_mask if item.raw_mask else overlay_path
    return ItemPictures(overlay_path, raw, background_path if editor else None)
