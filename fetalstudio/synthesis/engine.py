"""Text-to-image generation on any SD 1.x pipeline held by the model manager.

The engine composes, per run, a fresh scheduler (the chosen sampler built from the model's own
scheduler config) and the chosen LoRA adapters with their weights. LoRAs stay loaded as peft
adapters on the pipeline, so switching between them never reloads the base model; a weight of 0
is left out, and with no active LoRA the adapters are disabled: the base model's output exactly.
"""

from __future__ import annotations

import functools
import logging
import platform
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

import fetalstudio
from fetalstudio.errors import FetalStudioError, ModelLoadError
from fetalstudio.models.entries import ModelKind
from fetalstudio.models.hashing import checkpoint_hash
from fetalstudio.models.manager import ModelManager
from fetalstudio.synthesis.color import GRAYSCALE, conversion_name, resolve_color, to_grayscale
from fetalstudio.synthesis.mask_injection import lora_mask_channel
from fetalstudio.synthesis.samplers import make_scheduler, parse_sampler
from fetalstudio.synthesis.settings import GeneratedImage, GenerationResult, GenerationSettings, LoraSpec, Reproduction

log = logging.getLogger(__name__)

#: (images done, images total, steps done in the current batch, steps per batch)
ProgressCallback = Callable[[int, int, int, int], None]


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class ResolvedLora:
    adapter_name: str
    name: str
    weight: float
    hash: str
    path: str
    mask_channel: int | None  # the channel an image+mask LoRA draws its mask in (from its file)


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {
        "fetalstudio": fetalstudio.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


@dataclass
class PipelineState:
    """What the engine remembers about one loaded pipeline, so repeated runs cost nothing extra."""

    base_scheduler_config: dict
    model_hash: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> file
    active_adapters: tuple[tuple[str, float], ...] | None = None  # None: never set
    sampler: str | None = None


_PIPELINE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SynthesisEngine:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        # Shared by every engine: the state describes the pipeline object (which adapters it holds), and
        # two engines over one manager share its pipelines. Keyed weakly, so a reloaded model starts clean.
        self._states = _PIPELINE_STATES

    def generate(
        self,
        settings: GenerationSettings,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_image: Callable[[GeneratedImage], None] | None = None,
    ) -> GenerationResult:
        """Generate ``batch_count`` batches of ``batch_size`` images; image i uses seed + i.

        Cancelling stops after the current denoising step; images of finished batches are kept.
        Each image's metadata records its batch (size, position, seeds): batched matrix products
        differ from unbatched ones in the last bits, so only the same batch gives the same pixels
        (``reproduce``). The images come back grayscale when ``settings.color`` (or, for "auto",
        the model's manifest entry) says so; an image+mask LoRA's mask channel is kept.
        """
        settings = settings.validated()
        started = time.perf_counter()
        entry = self.manager.entry(settings.model)
        if entry.kind is not ModelKind.SD_PIPELINE:
            raise FetalStudioError(f"'{entry.id}' is a {entry.kind.value}, not a Stable Diffusion pipeline. Pick a generator model.")
        images: list[GeneratedImage] = []
        with self.manager.use(entry.id) as pipeline:
            state = self._state(pipeline, entry)
            loras = self._apply_loras(pipeline, state, settings.loras)
            settings = self._resolve_output(settings, entry, loras)
            self._apply_sampler(pipeline, state, settings.sampler)
            base_metadata = self._base_metadata(pipeline, state, entry, loras, settings)
            try:
                for batch in range(settings.batch_count):
                    indices = list(range(batch * settings.batch_size, (batch + 1) * settings.batch_size))
                    batch_images = self.manager.run_with_oom_retry(
                        lambda: self._run_batch(pipeline, settings, indices, len(images), on_progress, cancel), keep=entry.id
                    )
                    seeds = [settings.seed_for(i) for i in indices]
                    for position, (index, image) in enumerate(zip(indices, batch_images)):
                        if settings.color == GRAYSCALE:
                            image = to_grayscale(image, settings.mask_channel)
                        seed = settings.seed_for(index)
                        batch_record = {"size": len(indices), "index": position, "seeds": seeds}
                        metadata = {**base_metadata, "seed": seed, "index": index, "batch": batch_record}
                        generated = GeneratedImage(image, seed, index, settings, metadata)
                        images.append(generated)
                        if on_image is not None:
                            on_image(generated)
            except _Cancelled:
                return GenerationResult(images, cancelled=True, seconds=time.perf_counter() - started)
        return GenerationResult(images, cancelled=False, seconds=time.perf_counter() - started)

    def output_color(self, model: str, requested: str = "auto") -> str:
        """"grayscale" or "rgb": what ``generate`` makes of ``requested`` for this model."""
        return resolve_color(requested, self.manager.entry(model))

    def reproduce(self, reproduction: Reproduction, cancel: threading.Event | None = None) -> GeneratedImage:
        """The recorded image again, pixel for pixel: its whole batch is re-run and that one image returned."""
        result = self.generate(reproduction.settings, cancel=cancel)
        if result.cancelled or len(result.images) <= reproduction.index:
            raise FetalStudioError("Reproduction was cancelled before the image was made; press Reproduce again.")
        return result.images[reproduction.index]

    @staticmethod
    def _resolve_output(settings: GenerationSettings, entry, loras: list[ResolvedLora]) -> GenerationSettings:
        """The settings as used: the concrete colour, and the mask channel of an active image+mask LoRA."""
        mask_channel = settings.mask_channel
        if mask_channel is None:
            mask_channel = next((l.mask_channel for l in loras if l.weight != 0 and l.mask_channel is not None), None)
        return replace(settings, color=resolve_color(settings.color, entry), mask_channel=mask_channel)

    def _state(self, pipeline, entry) -> PipelineState:
        if pipeline not in self._states:
            pipeline.set_progress_bar_config(disable=True)  # progress goes through on_progress
            self._states[pipeline] = PipelineState(
                base_scheduler_config=dict(pipeline.scheduler.config),  # as loaded, before any sampler swap
                model_hash=checkpoint_hash(self.manager.local_path(entry)),
            )
        return self._states[pipeline]

    @staticmethod
    def _apply_sampler(pipeline, state: PipelineState, sampler: str) -> None:
        """Swap the scheduler only when the sampler changes: every pipeline call resets its state."""
        if state.sampler != sampler:
            pipeline.scheduler = make_scheduler(sampler, state.base_scheduler_config)
            state.sampler = sampler

    def _run_batch(self, pipeline, settings, indices, done, on_progress, cancel):
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        generators = [torch.Generator("cpu").manual_seed(settings.seed_for(i)) for i in indices]

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            if on_progress is not None:
                on_progress(done, settings.total_images, step + 1, settings.steps)
            return callback_kwargs

        output = pipeline(
            prompt=[settings.prompt] * len(indices),
            negative_prompt=[settings.negative_prompt] * len(indices) if settings.negative_prompt else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            width=settings.width,
            height=settings.height,
            generator=generators,
            callback_on_step_end=on_step_end,
            output_type="pil",
        )
        return output.images

    def _apply_loras(self, pipeline, state: PipelineState, specs: tuple[LoraSpec, ...]) -> list[ResolvedLora]:
        resolved = []
        for spec in specs:
            entry = self.manager.entry(spec.source)
            if entry.kind is not ModelKind.LORA:
                raise FetalStudioError(f"'{spec.source}' is a {entry.kind.value}, not a LoRA. Pick a LoRA file.")
            path = self.manager.local_path(entry)
            digest = checkpoint_hash(path)
            adapter_name = "lora_" + digest
            if adapter_name not in state.adapters:
                self._load_adapter(pipeline, path, adapter_name, entry.details.get("weights_file"))
                state.adapters[adapter_name] = str(path)
                state.active_adapters = None  # loading activates the new adapter
            name = re.sub(r"\.(safetensors|ckpt|pt|bin)$", "", path.name)
            resolved.append(ResolvedLora(adapter_name, name, spec.weight, digest, str(path), lora_mask_channel(path)))
        active = tuple((l.adapter_name, l.weight) for l in resolved if l.weight != 0)
        if active != state.active_adapters:  # enable/set_adapters walk every module: only on change
            if active:
                pipeline.enable_lora()
                pipeline.set_adapters([name for name, _ in active], adapter_weights=[weight for _, weight in active])
            elif state.adapters:
                pipeline.disable_lora()  # adapters bypassed: exactly the base model
            state.active_adapters = active
        return resolved

    @staticmethod
    def _load_adapter(pipeline, path, adapter_name: str, weights_file: str | None) -> None:
        try:
            if path.is_dir():
                pipeline.load_lora_weights(str(path), weight_name=weights_file, adapter_name=adapter_name)
            else:
                pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
        except Exception as error:
            raise ModelLoadError(
                f"The LoRA {path.name} does not fit this model ({type(error).__name__}: {str(error)[:300]}). "
                "A LoRA only works on the base architecture it was trained for (e.g. SD 1.5)."
            ) from error

    def _base_metadata(self, pipeline, state: PipelineState, entry, loras: list[ResolvedLora], settings: GenerationSettings) -> dict:
        placement = self.manager.placement  # cheaper than unet.device, which walks every module
        return {
            "settings": settings.to_dict(),
            "sampler": parse_sampler(settings.sampler).label,
            "scheduler": {"class": type(pipeline.scheduler).__name__, "config": _jsonable(dict(pipeline.scheduler.config))},
            "model": {"id": entry.id, "name": entry.id, "hash": state.model_hash},
            "loras": [{"name": l.name, "source": l.path, "weight": l.weight, "hash": l.hash} for l in loras],
            "versions": library_versions(),
            "device": placement.device.type,
            "dtype": str(placement.dtype).removeprefix("torch."),
            "output": {"color": settings.color, "mask_channel": settings.mask_channel,
                       "conversion": conversion_name(settings.color, settings.mask_channel)},
        }


def _jsonable(config: dict) -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for v in value]
        else:
            out[key] = str(value)
    return out
