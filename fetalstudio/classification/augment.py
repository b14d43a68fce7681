"""Training-time augmentation for plane classifiers.

``none``   resize only.
``paper``  the FU-LoRA paper's "traditional augmentation" (METHODS.md section 1): rotation by an
           angle drawn uniformly in [-25, 25] degrees, horizontal flip with p = 0.5, vertical flip
           with p = 0.1; pixels are then scaled to [-1, 1] (the classifier's mean/std of 0.5).
``strong`` the paper's augmentation plus what helps across scanners (Spanish -> African): a
           random resized crop (area 50-100 %, aspect 0.8-1.25), brightness, contrast and gamma
           jitter, Gaussian blur, multiplicative speckle-like noise and a random black box
           (hides burnt-in text now and then).
``domain`` ``strong`` plus the scanner and centre shifts seen between FETAL_PLANES_DB, HC18 and the
           African planes: zoom-out (the image shrunk onto a black canvas: other depth settings
           and framings), loss of resolution (down- then up-sampling), JPEG compression, random
           burnt-in text drawn over the image (so text is no cue) and a sector-shaped mask (other
           probe geometries).

Each augmentation draws its parameters from a ``numpy.random.Generator`` (``sample``) and
applies them (``apply``); training seeds the generator per step and image, so a resumed run sees
exactly the images it would have seen without the interruption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from fetalstudio.errors import FetalStudioError

AUGMENTATIONS = ("none", "paper", "strong", "domain")


@dataclass(frozen=True)
class PaperAugmentation:
    """Rotation in [-max_rotation, max_rotation], hflip p, vflip p (the paper: 25, 0.5, 0.1)."""

    output_size: int
    max_rotation: float = 25.0
    hflip_p: float = 0.5
    vflip_p: float = 0.1

    def sample(self, rng: np.random.Generator) -> dict:
        return {
            "angle": float(rng.uniform(-self.max_rotation, self.max_rotation)),
            "hflip": bool(rng.random() < self.hflip_p),
            "vflip": bool(rng.random() < self.vflip_p),
        }

    def apply(self, image: Image.Image, params: dict) -> np.ndarray:
        """``image`` (square, any size) -> H x W x C float32 in [0, 1] at ``output_size``."""
        image = _resize(image, self.output_size)
        image = _geometric(image, params)
        return _to_array(image)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, self.sample(rng))


@dataclass(frozen=True)
class StrongAugmentation(PaperAugmentation):
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    brightness: float = 0.25  # multiply by 1 +- this
    contrast: float = 0.3  # scale around the mean by 1 +- this
    gamma: tuple[float, float] = (0.7, 1.5)
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_p: float = 0.5
    noise_sigma: tuple[float, float] = (0.05, 0.25)
    erase_p: float = 0.25

    def sample(self, rng: np.random.Generator) -> dict:
        params = super().sample(rng)
        area = rng.uniform(*self.crop_scale)
        log_ratio = rng.uniform(np.log(self.crop_ratio[0]), np.log(self.crop_ratio[1]))
        ratio = float(np.exp(log_ratio))
        crop_w = min(1.0, float(np.sqrt(area * ratio)))
        crop_h = min(1.0, float(np.sqrt(area / ratio)))
        params.update(
            crop=(float(rng.uniform(0, 1 - crop_w)), float(rng.uniform(0, 1 - crop_h)), crop_w, crop_h),
            brightness=float(rng.uniform(1 - self.brightness, 1 + self.brightness)),
            contrast=float(rng.uniform(1 - self.contrast, 1 + self.contrast)),
            gamma=float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1])))),
            blur=float(rng.uniform(*self.blur_sigma)) if rng.random() < self.blur_p else 0.0,
            noise=float(rng.uniform(*self.noise_sigma)) if rng.random() < self.noise_p else 0.0,
            noise_seed=int(rng.integers(0, 2**31 - 1)),
            erase=(tuple(float(v) for v in rng.uniform(0, 1, size=4)) if rng.random() < self.erase_p else None),
        )
        return params

    def apply(self, image: Image.Image, params: dict) -> np.ndarray:
        size = self.output_size
        left, top, width, height = params["crop"]
        w, h = image.size
        box = (left * w, top * h, (left + width) * w, (top + height) * h)
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        image = _geometric(image, params)
        if params["blur"] > 0:
            image = image.filter(ImageFilter.GaussianBlur(params["blur"] * size / 128))
        array = _to_array(image)
        mean = float(array.mean())
        array = (array - mean) * params["contrast"] + mean
        array = np.clip(array * params["brightness"], 0.0, 1.0) ** params["gamma"]
        if params["noise"] > 0:
            noise_rng = np.random.default_rng(params["noise_seed"])
            grain = max(1, size // 2)  # speckle grains about two pixels wide
            noise = noise_rng.standard_normal((grain, grain)).astype(np.float32)
            noise = np.asarray(Image.fromarray(noise, mode="F").resize((size, size), Image.Resampling.BILINEAR))
            array = array * (1.0 + params["noise"] * noise[:, :, None])
        if params["erase"] is not None:
            x, y, ew, eh = params["erase"]
            ew, eh = int(size * (0.1 + 0.25 * ew)), int(size * (0.05 + 0.15 * eh))
            x0, y0 = int(x * (size - ew)), int(y * (size - eh))
            array[y0:y0 + eh, x0:x0 + ew] = 0.0
        return np.clip(array, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class DomainAugmentation(StrongAugmentation):
    zoom_out_p: float = 0.3
    zoom_out_scale: tuple[float, float] = (0.6, 0.95)
    lowres_p: float = 0.3
    lowres_factor: tuple[float, float] = (0.3, 0.7)
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (20, 75)
    text_p: float = 0.3
    sector_p: float = 0.25

    def sample(self, rng: np.random.Generator) -> dict:
        params = super().sample(rng)
        params.update(
            zoom_out=(float(rng.uniform(*self.zoom_out_scale)), float(rng.random()), float(rng.random()))
            if rng.random() < self.zoom_out_p else None,
            lowres=float(rng.uniform(*self.lowres_factor)) if rng.random() < self.lowres_p else 0.0,
            jpeg=int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)) if rng.random() < self.jpeg_p else 0,
            text_seed=int(rng.integers(0, 2**31 - 1)) if rng.random() < self.text_p else None,
            sector=(float(rng.uniform(0.25, 0.6)), float(rng.uniform(-0.1, 0.1))) if rng.random() < self.sector_p else None,
        )
        return params

    def apply(self, image: Image.Image, params: dict) -> np.ndarray:
        size = self.output_size
        array = super().apply(image, params)
        picture = Image.fromarray(np.round(array[:, :, 0] * 255).astype(np.uint8)) if array.shape[2] == 1 else \
            Image.fromarray(np.round(array * 255).astype(np.uint8))
        if params["zoom_out"] is not None:
            scale, x, y = params["zoom_out"]
            inner = max(1, int(round(size * scale)))
            canvas = Image.new(picture.mode, (size, size), 0)
            canvas.paste(picture.resize((inner, inner), Image.Resampling.BILINEAR),
                         (int(x * (size - inner)), int(y * (size - inner))))
            picture = canvas
        if params["lowres"] > 0:
            small = max(8, int(round(size * params["lowres"])))
            picture = picture.resize((small, small), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.BILINEAR)
        if params["text_seed"] is not None:
            picture = _draw_text(picture, np.random.default_rng(params["text_seed"]))
        if params["jpeg"]:
            picture = _jpeg(picture, params["jpeg"])
        result = _to_array(picture)
        if params["sector"] is not None:
            result = result * _sector_mask(size, *params["sector"])[:, :, None]
        return np.clip(result, 0.0, 1.0).astype(np.float32)


def _draw_text(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    """1-6 short strings of scanner-like text (letters, digits, units) at random places and grays."""
    from PIL import ImageDraw, ImageFont

    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    size = picture.size[0]
    alphabet = np.array(list("ABCDEFGHIKLMNPRSTVWXZ0123456789./:%-+ "))
    for _ in range(int(rng.integers(1, 7))):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(2, 10))))
        font = ImageFont.load_default(size=max(6, int(size * rng.uniform(0.04, 0.09))))
        position = (int(rng.uniform(0, 0.85) * size), int(rng.uniform(0, 0.95) * size))
        level = int(rng.integers(150, 256))
        draw.text(position, text, fill=level if picture.mode == "L" else (level,) * 3, font=font)
    return picture


def _jpeg(picture: Image.Image, quality: int) -> Image.Image:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.convert(picture.mode)


def _sector_mask(size: int, half_angle: float, tilt: float) -> np.ndarray:
    """1 inside a fan whose apex lies above the image's top centre (``half_angle`` in radians)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    apex_y = -0.3 * size
    angle = np.arctan2(xs - size / 2, ys - apex_y) - tilt
    return (np.abs(angle) <= half_angle + 0.35).astype(np.float32)


@dataclass(frozen=True)
class NoAugmentation:
    output_size: int

    def sample(self, rng: np.random.Generator) -> dict:
        return {}

    def apply(self, image: Image.Image, params: dict) -> np.ndarray:
        return _to_array(_resize(image, self.output_size))

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, {})


def make_augmentation(name: str, output_size: int):
    if name == "none":
        return NoAugmentation(output_size)
    if name == "paper":
        return PaperAugmentation(output_size)
    if name == "strong":
        return StrongAugmentation(output_size)
    if name == "domain":
        return DomainAugmentation(output_size)
    raise FetalStudioError(f"Unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}.")


def _resize(image: Image.Image, size: int) -> Image.Image:
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)


def _geometric(image: Image.Image, params: dict) -> Image.Image:
    """Rotate about the centre (counter-clockwise by ``angle`` degrees, black corners), then flip."""
    angle = params.get("angle", 0.0)
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    if params.get("hflip"):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.get("vflip"):
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _to_array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[:, :, None] if array.ndim == 2 else array
