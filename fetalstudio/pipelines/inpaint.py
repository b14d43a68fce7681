"""ControlNet inpainting, RePaint style in latent space: FetalFlex's stage 1 (with SSA) and stage 2 (OSM).

Inputs are plain images and arrays: a source image (the scan to edit, or a stage-1 draft, or any
uploaded image), a condition image (a layout map, a Canny edge map: any H x W x 3 uint8), an ROI
mask (H x W, nonzero = regenerate) of the source's size, and a ControlNet from the model manager.
Everything is resized to the run's width and height (the source with Lanczos, the condition and
the ROI nearest-neighbour, so label colours and the mask stay exact).

The loop is diffusers' own ControlNet pipeline over the loaded generator (``from_pipe`` through
``PreparedPipeline.derived``: ``StableDiffusionControlNetPipeline`` from pure noise at strength 1,
``StableDiffusionControlNetImg2ImgPipeline`` from the source re-noised at a lower strength); the
paper's blending runs in its ``callback_on_step_end`` (``ControlNetInpaint.step_hook``):

- after step i, x_{t_{i+1}} = m * x^bg_{t_{i+1}} + (1 - m) * x^roi_{t_{i+1}} (METHODS section 3),
  where m is the background (the ROI mask downsampled to the latent grid: a latent cell is ROI when
  any of its pixels is), x^roi is the sampler's step and x^bg is the source's latent (VAE posterior
  mode) noised to the next timestep with the scheduler's ``add_noise`` and *fresh* noise each step,
  as RePaint samples q(x_t | x_0). diffusers' ``StableDiffusion(ControlNet)InpaintPipeline`` differs
  in two places, which is why it is not used: it re-uses one noise tensor for every step, and it
  blends the last step too (with the clean source latent); the paper leaves the last step
  **unmasked** so ROI and background blend, and so does this hook (no replacement after the final
  step). The exact background comes back in pixel space instead: outside the ROI the source's
  pixels are pasted back (``finish_image``), inside it a feather ramp (distance to the ROI border /
  ``feather``) blends into the generated pixels, so every pixel outside the ROI is exactly the
  source's.
- Samplers: DDIM (the paper's), Euler, Euler a and DPM++ 2M Karras blend correctly (``add_noise``
  follows each scheduler's convention); UniPC is refused: its corrector recomputes each step from
  the latent before the previous one and undoes the replacement.
- SSA (``ssa.py``), when given, is applied to the latents after every step, before the blend (the
  known background stays exactly the noised source).
- RePaint's resampling jumps (re-noising x_{t-1} back to x_t and denoising again, r times every j
  steps) are not implemented: diffusers' pipeline loop visits each timestep once and a callback
  cannot rewind it, so jumps would need a hand-written copy of the ControlNet sampling loop (CFG,
  ControlNet residuals, scheduler state). The paper's own harmonisation is the unmasked last step
  plus the OSM stage, both here.

OSM (stage 2) is the same task on a draft with an organ mask: ``strength`` below 1 re-samples the
inside of the mask starting from the draft re-noised (refinement); 1 replaces it. Every image
records the task (stage, hashes of the source, condition and ROI, ControlNet id and hash, scale,
strength, SSA parameters, feather), so the same inputs and seed give the same pixels.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.models.entries import ModelKind
from fetalstudio.models.hashing import checkpoint_hash
from fetalstudio.models.prealign import PreAlignment, encode_condition, prealignment_of
from fetalstudio.pipelines.prepared import (
    ImageCallback, PipelineTask, PreparedPipeline, ProgressCallback, StepHook, prepare_pipeline,
)
from fetalstudio.pipelines.runners import PipelineRunner, source_record
from fetalstudio.pipelines.samplers import parse_sampler
from fetalstudio.pipelines.settings import GeneratedImage, GenerationResult, GenerationSettings, Reproduction
from fetalstudio.pipelines.ssa import SSAParameters, scale_space_adaptive

CONTROLNET_INPAINT = "controlnet-inpaint"
#: Stage 1: RePaint inpainting of the ROI (SSA optional); stage 2: OSM re-sampling inside an organ mask.
STAGE_ONE = "stage1"
OSM = "osm"
STAGES = (STAGE_ONE, OSM)
MAX_FEATHER = 64
#: UniPC's corrector recomputes x_t from the latent before the previous step (its ``last_sample``),
#: overwriting the replaced background; measured: the background ends 0.43 off the source latent.
UNBLENDABLE_SAMPLERS = frozenset({"unipc"})
#: Keeps the background noise stream apart from the seed's initial-latent stream.
BACKGROUND_SEED_OFFSET = 0x5EED


def as_rgb_image(value: Image.Image | np.ndarray, what: str) -> Image.Image:
    """An RGB PIL image from a PIL image or an H x W (x 3) uint8 array."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)):
        raise FetalStudioError(
            f"The {what} must be an H x W x 3 (or H x W) uint8 image; got an array of shape "
            f"{array.shape} and type {array.dtype}."
        )
    return Image.fromarray(array.reshape(array.shape[:2]) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")


def as_roi(value: np.ndarray | Image.Image) -> np.ndarray:
    """An H x W bool mask (nonzero = regenerate) from a bool/uint8 array or a mask image."""
    array = np.asarray(value.convert("L") if isinstance(value, Image.Image) else value)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise FetalStudioError(f"The ROI mask must be H x W (one channel); got shape {array.shape}.")
    return array != 0


def resize_roi(roi: np.ndarray, width: int, height: int) -> np.ndarray:
    if roi.shape == (height, width):
        return roi
    return np.asarray(Image.fromarray(roi.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)) > 0


def latent_roi(roi: np.ndarray, latent_height: int, latent_width: int) -> torch.Tensor:
    """(1, 1, h, w) float: 1 where any pixel of the latent cell is in the ROI."""
    mask = torch.from_numpy(roi.astype(np.float32))[None, None]
    return (F.interpolate(mask, size=(latent_height, latent_width), mode="area") > 0).to(torch.float32)


def feather_weights(roi: np.ndarray, feather: int) -> np.ndarray:
    """Weight of the generated pixels: 0 outside the ROI, rising to 1 over ``feather`` px inside it."""
    if feather <= 0:
        return roi.astype(np.float64)
    inside = cv2.distanceTransform(roi.astype(np.uint8), cv2.DIST_L2, 5)  # distance to the nearest outside pixel
    return np.clip(inside.astype(np.float64) / feather, 0.0, 1.0)


def paste_back(generated: Image.Image, source: Image.Image, roi: np.ndarray, feather: int) -> Image.Image:
    """``generated`` inside the ROI (feathered inwards), ``source``'s exact pixels everywhere outside it."""
    known = np.asarray(source.convert(generated.mode))
    made = np.asarray(generated)
    weights = feather_weights(roi, feather)
    if made.ndim == 3:
        weights = weights[..., None]
    blended = np.rint(known * (1.0 - weights) + made * weights).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.where(weights > 0, blended, known), generated.mode)


def roi_record(roi: np.ndarray) -> dict[str, Any]:
    return {"width": int(roi.shape[1]), "height": int(roi.shape[0]), "pixels": int(roi.sum()),
            "sha256": hashlib.sha256(np.packbits(roi).tobytes()).hexdigest()}


@dataclass(frozen=True, eq=False)
class InpaintRequest:
    """What to inpaint: plain images and arrays plus the method's parameters (no model loaded here).

    ``source``: the image whose outside-ROI pixels are kept (the scan, or a stage-1 draft for OSM);
    ``condition``: the ControlNet's condition image; ``roi``: H x W, nonzero = regenerate, the
    source's size; ``controlnet``: a ControlNet's catalog id or path; ``strength`` 1 generates the
    ROI from pure noise, below 1 from the source re-noised (OSM refinement).
    """

    source: Image.Image | np.ndarray
    condition: Image.Image | np.ndarray
    roi: np.ndarray | Image.Image
    controlnet: str
    conditioning_scale: float = 1.0
    strength: float = 1.0
    ssa: SSAParameters | None = None
    feather: int = 4
    stage: str = STAGE_ONE
    source_image: Image.Image = field(init=False, repr=False)
    condition_image: Image.Image = field(init=False, repr=False)
    roi_mask: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        source = as_rgb_image(self.source, "source image")
        condition = as_rgb_image(self.condition, "condition image")
        roi = as_roi(self.roi)
        problems = []
        if condition.size != source.size:
            problems.append(f"the condition image is {condition.width} x {condition.height} but the source is "
                            f"{source.width} x {source.height}; draw the condition at the source's size")
        if roi.shape != (source.height, source.width):
            problems.append(f"the ROI mask is {roi.shape[1]} x {roi.shape[0]} but the source is "
                            f"{source.width} x {source.height}; use a mask of the source's size")
        elif not roi.any():
            problems.append("the ROI mask is empty; mark the region to regenerate")
        if not 0 <= self.conditioning_scale <= 2:
            problems.append(f"the conditioning scale must be between 0 and 2 (got {self.conditioning_scale})")
        if not 0 < self.strength <= 1:
            problems.append(f"the strength must be above 0 and at most 1 (got {self.strength})")
        if isinstance(self.feather, bool) or not isinstance(self.feather, int) or not 0 <= self.feather <= MAX_FEATHER:
            problems.append(f"the feather must be a whole number of pixels from 0 to {MAX_FEATHER} (got {self.feather!r})")
        if self.stage not in STAGES:
            problems.append(f"the stage must be one of {', '.join(STAGES)} (got {self.stage!r})")
        if self.ssa is not None and not isinstance(self.ssa, SSAParameters):
            problems.append("ssa must be SSAParameters or None")
        if problems:
            raise FetalStudioError("Inpainting: " + "; ".join(problems) + ".")
        object.__setattr__(self, "source_image", source)
        object.__setattr__(self, "condition_image", condition)
        object.__setattr__(self, "roi_mask", roi)

    def at_size(self, width: int, height: int) -> tuple[Image.Image, Image.Image, np.ndarray]:
        """Source, condition and ROI at the run's size."""
        source, condition = self.source_image, self.condition_image
        if source.size != (width, height):
            source = source.resize((width, height), Image.Resampling.LANCZOS)
            condition = condition.resize((width, height), Image.Resampling.NEAREST)
        return source, condition, resize_roi(self.roi_mask, width, height)

    def inputs(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "conditioning_scale": self.conditioning_scale,
            "strength": self.strength,
            "ssa": None if self.ssa is None else self.ssa.to_dict(),
            "feather": self.feather,
            "source": source_record(self.source_image),
            "condition": source_record(self.condition_image),
            "roi": roi_record(self.roi_mask),
            "repaint": {"background_noise": "fresh each step", "last_step": "unmasked", "jumps": 0},
        }


@dataclass(frozen=True, eq=False)
class ControlNetInpaint(PipelineTask):
    """A request with its loaded ControlNet (``controlnet_record``: catalog id and weights hash)."""

    request: InpaintRequest
    controlnet: Any
    controlnet_record: dict[str, str]
    #: While a pre-aligned ControlNet runs: the forward pre-hook that encodes its condition (``pipeline()``).
    _hooks: list[Any] = field(default_factory=list, repr=False)

    name = CONTROLNET_INPAINT

    def pipeline(self, prepared: PreparedPipeline) -> Any:
        from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

        _check_fits(self.controlnet, prepared.pipeline.unet, self.controlnet_record["id"], prepared.entry.id)
        alignment = prealignment_of(self.controlnet)
        if alignment is not None and not self._hooks:
            self._hooks.append(self.controlnet.register_forward_pre_hook(
                prealigned_condition_hook(alignment, prepared.pipeline.vae), with_kwargs=True))
        pipeline_class = StableDiffusionControlNetPipeline if self.request.strength == 1 else StableDiffusionControlNetImg2ImgPipeline
        return prepared.derived(pipeline_class, controlnet=self.controlnet)

    def release(self) -> None:
        """Take the pre-alignment hook off the shared ControlNet (the run is over)."""
        while self._hooks:
            self._hooks.pop().remove()

    def check(self, settings: GenerationSettings) -> None:
        if _sampler_key(settings.sampler) in UNBLENDABLE_SAMPLERS:
            raise FetalStudioError(
                f"Inpainting cannot use the {settings.sampler} sampler: its corrector re-derives each step from "
                "the previous latent and undoes the background replacement. Pick DDIM (the paper's), Euler, "
                "Euler a or DPM++ 2M Karras."
            )
        if self.denoising_steps(settings) < 1:
            raise FetalStudioError(
                f"Strength {self.request.strength:g} of {settings.steps} steps runs no denoising step; "
                f"raise the steps to at least {int(1 / self.request.strength) + 1} or the strength."
            )

    def denoising_steps(self, settings: GenerationSettings) -> int:
        return min(int(settings.steps * self.request.strength), settings.steps)

    def arguments(self, settings: GenerationSettings, count: int) -> dict[str, Any]:
        source, condition, _ = self.request.at_size(settings.width, settings.height)
        scale = self.request.conditioning_scale
        if self.request.strength == 1:
            return {"image": [condition] * count, "width": settings.width, "height": settings.height,
                    "controlnet_conditioning_scale": scale}
        return {"image": [source] * count, "control_image": [condition] * count, "strength": self.request.strength,
                "width": settings.width, "height": settings.height, "controlnet_conditioning_scale": scale}

    def step_hook(self, pipeline: Any, settings: GenerationSettings, seeds: list[int]) -> StepHook:
        source, _, roi = self.request.at_size(settings.width, settings.height)
        vae = pipeline.vae
        with torch.no_grad():
            pixels = pipeline.image_processor.preprocess(source, height=settings.height, width=settings.width)
            known = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
        known = known.expand(len(seeds), -1, -1, -1)
        inside = latent_roi(roi, known.shape[2], known.shape[3]).to(known.device, known.dtype)
        generators = [torch.Generator("cpu").manual_seed(seed + BACKGROUND_SEED_OFFSET) for seed in seeds]
        ssa = self.request.ssa

        def blend(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            latents = callback_kwargs["latents"]
            if ssa is not None:
                latents = scale_space_adaptive(latents, ssa)
            run_timesteps = pipe.scheduler.timesteps[-pipe.num_timesteps:]
            if step + 1 < len(run_timesteps):  # the last step stays unmasked (METHODS)
                noise = torch.stack([torch.randn(known.shape[1:], generator=g) for g in generators]).to(latents.device, latents.dtype)
                level = run_timesteps[step + 1].reshape(1).repeat(len(seeds))
                background = pipe.scheduler.add_noise(known.to(latents.dtype), noise, level)
                latents = inside * latents + (1 - inside) * background
            callback_kwargs["latents"] = latents
            return callback_kwargs

        return blend

    def finish_image(self, image: Image.Image) -> Image.Image:
        source, _, roi = self.request.at_size(image.width, image.height)
        return paste_back(image, source, roi, self.request.feather)

    def inputs(self) -> dict[str, Any]:
        return {**self.request.inputs(), "controlnet": dict(self.controlnet_record),
                "prealigned": prealignment_of(self.controlnet) is not None}


def prealigned_condition_hook(alignment: PreAlignment, vae: Any):
    """A ControlNet forward pre-hook for FetalFlex's pre-alignment: the pipeline feeds the condition image
    (3 channels in [0, 1], image-sized, so diffusers sizes the run from it as usual); the hook swaps in
    its VAE latent aligned to the image latents' statistics. Encoded once per run: the condition is the
    same at every step (keyed by the batch shape, which classifier-free guidance doubles)."""
    encoded: dict[tuple[int, ...], torch.Tensor] = {}

    def hook(module, args, kwargs):
        condition = kwargs.get("controlnet_cond")
        if condition is None or condition.shape[1] != 3:
            return None
        key = tuple(condition.shape)
        if key not in encoded:
            encoded[key] = alignment.align(encode_condition(vae, condition.float()))
        return args, {**kwargs, "controlnet_cond": encoded[key].to(condition.device, condition.dtype)}

    return hook


def _sampler_key(name: str) -> str | None:
    try:
        return parse_sampler(name).key
    except ValueError:
        return None  # the settings' validation names it


def _check_fits(controlnet: Any, unet: Any, controlnet_id: str, model_id: str) -> None:
    """A ControlNet adds residuals to its base U-Net's blocks: their widths must match."""
    mine, theirs = controlnet.config, unet.config
    if (tuple(mine.block_out_channels) != tuple(theirs.block_out_channels)
            or mine.cross_attention_dim != theirs.cross_attention_dim):
        raise FetalStudioError(
            f"The ControlNet '{controlnet_id}' was made for another base model than '{model_id}' "
            f"(its blocks {tuple(mine.block_out_channels)} / text width {mine.cross_attention_dim}, the "
            f"generator's {tuple(theirs.block_out_channels)} / {theirs.cross_attention_dim}); pick a ControlNet "
            "trained on this generator."
        )


class InpaintRunner(PipelineRunner):
    """ControlNet inpainting (stage 1, SSA optional) and OSM (stage 2) over the manager's models."""

    def controlnet_entry(self, id_or_path: str):
        entry = self.manager.entry(id_or_path)
        if entry.kind is not ModelKind.CONTROLNET:
            raise FetalStudioError(
                f"'{entry.id}' is a {entry.kind.value}, not a ControlNet. Pick a ControlNet model "
                "(a diffusers ControlNetModel folder or a ControlNet file)."
            )
        return entry

    def run(self, settings: GenerationSettings, task: PipelineTask, on_progress: ProgressCallback | None = None,
            cancel: threading.Event | None = None, on_image: ImageCallback | None = None) -> GenerationResult:
        """As ``PipelineRunner.run``; afterwards the derived pipeline lets go of the ControlNet, so the
        manager's unload (or eviction for memory) really frees it."""
        task.check(settings)
        with prepare_pipeline(self.manager, settings) as prepared:
            try:
                return prepared.run(task, on_progress, cancel, on_image)
            finally:
                if isinstance(task, ControlNetInpaint):
                    task.release()
                    prepared.forget(task.controlnet)

    def generate(
        self,
        settings: GenerationSettings,
        request: InpaintRequest,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_image: ImageCallback | None = None,
    ) -> GenerationResult:
        """Regenerate ``request.roi`` of ``request.source`` under the condition and prompt (see the module doc).

        The ControlNet is loaded lazily and held by the manager for the run, beside the generator.
        """
        entry = self.controlnet_entry(request.controlnet)
        ControlNetInpaint(request, None, {}).check(settings)  # before anything loads
        record = {"id": entry.id, "hash": checkpoint_hash(self.manager.local_path(entry))}
        with self.manager.use(entry.id) as controlnet:
            return self.run(settings, ControlNetInpaint(request, controlnet, record), on_progress, cancel, on_image)

    def reproduce(self, reproduction: Reproduction, request: InpaintRequest, cancel: threading.Event | None = None) -> GeneratedImage:
        """The recorded image again from the same inputs (checked against the recorded hashes)."""
        recorded = reproduction.task
        given = request.inputs()
        for key, what in (("source", "source image"), ("condition", "condition image"), ("roi", "ROI mask")):
            if (recorded.get(key) or {}).get("sha256") != given[key]["sha256"]:
                raise FetalStudioError(f"This {what} is not the one the image was made from (its pixels differ); pick the original.")
        entry = self.controlnet_entry(request.controlnet)
        record = {"id": entry.id, "hash": checkpoint_hash(self.manager.local_path(entry))}
        with self.manager.use(entry.id) as controlnet:
            return self.reproduce_task(reproduction, ControlNetInpaint(request, controlnet, record), cancel)
