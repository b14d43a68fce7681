"""FetalFlex's pre-alignment of the layout condition (METHODS section 3), stored beside a ControlNet.

The layout map goes through the generator's VAE encoder; its latent is rescaled and shifted per
channel from the layout latents' statistics to the image latents' statistics (both measured on the
ControlNet's training set), and that aligned latent is the ControlNet's condition. Such a
ControlNet is a plain ``diffusers.ControlNetModel`` whose conditioning embedding takes 4 latent
channels at the latent grid (``conditioning_channels=4``, one conditioning block: no downsampling);
inside it the embedded condition is added to the noisy latent's features (the channel-wise merge).
The statistics are in ``fetalstudio_prealign.json`` in the ControlNet's folder; the model loader
attaches them to the loaded model as ``PREALIGNMENT_ATTRIBUTE``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fetalstudio.errors import FetalStudioError

PREALIGN_FILE = "fetalstudio_prealign.json"
PREALIGNMENT_ATTRIBUTE = "fetalstudio_prealignment"
#: A pre-aligned ControlNet's conditioning embedding: 4 latent channels in, one block (no downsampling).
PREALIGNED_CONDITIONING_CHANNELS = 4
PREALIGNED_EMBEDDING_CHANNELS = (64,)


@dataclass(frozen=True)
class PreAlignment:
    """Per-channel mean and standard deviation of the layout latents and of the image latents."""

    layout_mean: tuple[float, ...]
    layout_std: tuple[float, ...]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def __post_init__(self) -> None:
        lengths = {len(self.layout_mean), len(self.layout_std), len(self.image_mean), len(self.image_std)}
        values = (*self.layout_mean, *self.layout_std, *self.image_mean, *self.image_std)
        if len(lengths) != 1 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise FetalStudioError("The pre-alignment statistics must be four equally long lists of finite numbers.")
        if min(*self.layout_std, *self.image_std) <= 0:
            raise FetalStudioError("The pre-alignment standard deviations must be above 0.")

    @classmethod
    def measure(cls, layout_latents, image_latents) -> "PreAlignment":
        """The statistics of two N x C x h x w latent batches (per channel, over images and positions)."""
        def stats(latents):
            flat = latents.detach().float().transpose(0, 1).reshape(latents.shape[1], -1)
            return tuple(round(float(v), 6) for v in flat.mean(1)), tuple(round(max(float(v), 1e-4), 6) for v in flat.std(1))
        (layout_mean, layout_std), (image_mean, image_std) = stats(layout_latents), stats(image_latents)
        return cls(layout_mean, layout_std, image_mean, image_std)

    def align(self, layout_latents):
        """Layout latents rescaled and shifted to the image latents' statistics."""
        def column(values):
            return layout_latents.new_tensor(values).view(1, -1, 1, 1)
        return (layout_latents - column(self.layout_mean)) / column(self.layout_std) * column(self.image_std) + column(self.image_mean)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "fetalstudio.prealign", "version": 1, **{k: list(v) for k, v in asdict(self).items()}}

    def write(self, folder: Path) -> Path:
        path = Path(folder) / PREALIGN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def read_prealignment(folder: Path) -> PreAlignment | None:
    """The statistics in ``folder``'s ``fetalstudio_prealign.json``, or None when the ControlNet has none."""
    path = Path(folder) / PREALIGN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PreAlignment(*(tuple(float(v) for v in data[key]) for key in ("layout_mean", "layout_std", "image_mean", "image_std")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FetalStudioError(f"{path} is not a readable pre-alignment file ({error}); restore it from the ControlNet's "
                               "training output.") from None


def prealignment_of(controlnet: Any) -> PreAlignment | None:
    return getattr(controlnet, PREALIGNMENT_ATTRIBUTE, None)


def encode_condition(vae, pixels_01):
    """The VAE latent (posterior mode, scaled as the generator's latents) of condition images in [0, 1]."""
    import torch

    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        latent = vae.encode((pixels_01 * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
    return (latent.float() - shift) * scaling
