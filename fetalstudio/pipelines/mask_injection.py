"""In-channel mask injection (METHODS section 2): a grayscale image and its head mask in one RGB image.

One channel holds the mask (an ellipse-like grayscale shape), the other two hold the grayscale
image. A diffusion model trained on such images generates image and mask together from a text
prompt alone; ``unpack`` splits a generated image back into (gray, mask).

The mask channel is a choice of the training run (``--channel-order`` of ``train lora``) and is
recorded in the LoRA's metadata: generate and unpack with the same channel.

Masks drawn as ellipse *outlines* (HC18, es_heads) must be filled first: ``filled_mask``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Channel orders by the index of the mask channel.
CHANNEL_ORDERS = {0: "mask,gray,gray", 1: "gray,mask,gray", 2: "gray,gray,mask"}
_ALIASES = {
    "0": 0, "r": 0, "red": 0, "mask,gray,gray": 0, "mgg": 0,
    "1": 1, "g": 1, "green": 1, "gray,mask,gray": 1, "gmg": 1,
    "2": 2, "b": 2, "blue": 2, "gray,gray,mask": 2, "ggm": 2,
}


def parse_channel_order(value: int | str) -> int:
    """The mask channel index from 0/1/2, r/g/b or "mask,gray,gray"-style names."""
    key = str(value).strip().lower().replace(" ", "").replace("-", ",")
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(
        f"Unknown channel order {value!r}: give the mask channel as 0/1/2, r/g/b or one of "
        f"{', '.join(CHANNEL_ORDERS.values())}."
    )


def lora_mask_channel(path: Path) -> int | None:
    """The mask channel recorded in a LoRA file by ``train lora --mask-channel`` (None when absent)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or files[0].suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(files[0]), "np") as handle:
            value = (handle.metadata() or {}).get("fetalstudio.mask_channel")
    except Exception:  # not a safetensors file we can read: no recorded channel
        return None
    return int(value) if value not in (None, "", "None", "null") else None


def channel_order_name(mask_channel: int) -> str:
    return CHANNEL_ORDERS[_check_channel(mask_channel)]


def _check_channel(mask_channel: int) -> int:
    if mask_channel not in CHANNEL_ORDERS:
        raise ValueError(f"mask_channel must be 0, 1 or 2 (got {mask_channel!r}).")
    return int(mask_channel)


def _as_gray_uint8(gray: np.ndarray) -> np.ndarray:
    gray = np.asarray(gray)
    if gray.ndim == 3 and gray.shape[2] in (3, 4):  # an RGB(A) picture of a grayscale image
        gray = gray[..., :3].astype(np.float32).mean(axis=2).round()
    if gray.ndim != 2:
        raise ValueError(f"Expected a 2-D grayscale image, got shape {gray.shape}.")
    if gray.dtype != np.uint8:
        gray = np.clip(gray, 0, 255).astype(np.uint8)
    return gray


def _as_mask_uint8(mask: np.ndarray) -> np.ndarray:
    """bool or {0,1} masks become {0,255}; other uint8 masks are kept as drawn (grayscale shape)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"Expected a 2-D mask, got shape {mask.shape}.")
    if mask.dtype == bool or (mask.size and mask.max() <= 1):
        return (mask > 0).astype(np.uint8) * 255
    return np.clip(mask, 0, 255).astype(np.uint8)


def pack(gray: np.ndarray, mask: np.ndarray, mask_channel: int = 0) -> np.ndarray:
    """H x W x 3 uint8: the mask in ``mask_channel``, the grayscale image in the other two."""
    mask_channel = _check_channel(mask_channel)
    gray = _as_gray_uint8(gray)
    mask = _as_mask_uint8(mask)
    if gray.shape != mask.shape:
        raise ValueError(f"Image {gray.shape} and mask {mask.shape} differ in size; resize the mask to the image first.")
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[..., mask_channel] = mask
    return rgb


def unpack(rgb: np.ndarray, mask_channel: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(gray, mask) as uint8 from a packed (or generated) RGB image.

    The grayscale image is the rounded mean of the two image channels: exactly the packed image for
    a packed input, and the less noisy estimate for a generated one. The mask is returned as the
    grayscale shape in its channel; threshold it (e.g. at 127) for a binary mask.
    """
    mask_channel = _check_channel(mask_channel)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"Expected an H x W x 3 image, got shape {rgb.shape}.")
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    a, b = (rgb[..., c].astype(np.uint16) for c in range(3) if c != mask_channel)
    gray = ((a + b + 1) // 2).astype(np.uint8)
    return gray, rgb[..., mask_channel].copy()


def filled_mask(outline: np.ndarray) -> np.ndarray:
    """A filled head mask (uint8 0/255) from an ellipse outline such as HC18's annotations.

    Uses ``fetalstudio.imaging.ellipse.fill_outline`` when that module is installed; otherwise
    fills the holes of the outline with OpenCV and, where the outline runs out of the frame (so
    hole filling gives no region), fits an ellipse to the outline pixels and fills that.
    An already filled mask comes back unchanged (as 0/255).
    """
    try:
        from fetalstudio.imaging.ellipse import fill_outline
    except ImportError:
        fill_outline = None
    if fill_outline is not None:
        return (np.asarray(fill_outline(outline)) > 0).astype(np.uint8) * 255
    return fill_outline_opencv(outline)


def fill_outline_opencv(outline: np.ndarray) -> np.ndarray:
    import cv2

    binary = (_as_mask_uint8(outline) > 127).astype(np.uint8)
    if not binary.any():
        raise ValueError("The mask is empty: there is no outline to fill.")
    height, width = binary.shape
    # flood the background from a one-pixel border added around the frame; what it cannot reach is inside
    padded = np.pad(binary, 1)
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((height + 4, width + 4), np.uint8), (0, 0), 1)
    holes = (flood[1:-1, 1:-1] == 0)
    filled = binary.astype(bool) | holes
    outline_pixels = int(binary.sum())
    if holes.sum() >= outline_pixels:  # a closed outline: its inside is a region of its own
        return filled.astype(np.uint8) * 255
    core = cv2.erode(binary, np.ones((5, 5), np.uint8))
    if core.sum() > 0.5 * outline_pixels:  # already a filled region, not a thin outline
        return binary * 255
    points = cv2.findNonZero(binary)
    if points is None or len(points) < 5:
        raise ValueError("The outline has fewer than 5 pixels: no ellipse can be fitted to it.")
    (cx, cy), (major, minor), angle = cv2.fitEllipse(points)
    ellipse = np.zeros_like(binary)
    cv2.ellipse(ellipse, ((cx, cy), (major, minor), angle), 1, thickness=-1)
    return ((ellipse > 0) | binary.astype(bool)).astype(np.uint8) * 255
