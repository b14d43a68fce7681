"""The prepared pipeline: an SD 1.x pipeline from the model manager, made ready for one run.

Preparing composes, per run, the chosen LoRA adapters with their weights and a fresh scheduler
(the chosen sampler built from the model's own scheduler config) on the pipeline the manager holds,
and resolves the output colour. LoRAs stay loaded as peft adapters on the pipeline, so switching
between them never reloads the base model; a weight of 0 is left out, and with no active LoRA the
adapters are disabled: the base model's output exactly.

``PreparedPipeline.run`` is the run loop every runner shares: batches of seeded generators, cancel
and progress through the step callback, out-of-memory retry through the manager, grayscale output
and each image's metadata (with its batch, for exact reproduction). A runner brings only a
``PipelineTask``: which diffusers pipeline to call (``PreparedPipeline.derived`` builds an
image-to-image, inpainting or ControlNet pipeline over the same loaded components with diffusers'
``from_pipe``) and the task's own call arguments and recorded inputs.
"""

from __future__ import annotations

import functools
import logging
import platform
import re
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from PIL import Image

import fetalstudio
from fetalstudio.errors import FetalStudioError, ModelLoadError
from fetalstudio.models.entries import ModelEntry, ModelKind
from fetalstudio.models.hashing import checkpoint_hash
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.color import GRAYSCALE, conversion_name, resolve_color, to_grayscale
from fetalstudio.pipelines.mask_injection import lora_mask_channel
from fetalstudio.pipelines.samplers import make_scheduler, parse_sampler
from fetalstudio.pipelines.settings import GeneratedImage, GenerationResult, GenerationSettings, LoraSpec

log = logging.getLogger(__name__)

#: (images done, images total, steps done in the current batch, steps per batch)
ProgressCallback = Callable[[int, int, int, int], None]
ImageCallback = Callable[[GeneratedImage], None]
#: diffusers' ``callback_on_step_end``: (pipeline, step index, timestep, callback kwargs) -> callback kwargs
StepHook = Callable[[Any, int, Any, dict], dict]


class RunCancelled(Exception):
    """Raised inside a run when its cancel event is set; ``PreparedPipeline.run`` ends the run there."""


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
    """What is remembered about one loaded pipeline, so repeated runs cost nothing extra."""

    base_scheduler_config: dict
    model_hash: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> file
    active_adapters: tuple[tuple[str, float], ...] | None = None  # None: never set
    sampler: str | None = None
    derived: dict[tuple, Any] = field(default_factory=dict)  # (class, extra components) -> pipeline sharing the rest


# Shared by every runner: the state describes the pipeline object (which adapters it holds), and two
# runners over one manager share its pipelines. Keyed weakly, so a reloaded model starts clean.
_PIPELINE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class PipelineTask(ABC):
    """What one kind of generation adds to the prepared pipeline: the pipeline it calls, its arguments, its inputs."""

    #: Recorded as ``metadata["task"]["name"]`` in every image ("text-to-image", "image-to-image", ...).
    name: ClassVar[str]

    def pipeline(self, prepared: "PreparedPipeline") -> Any:
        """The diffusers pipeline to call; by default the loaded text-to-image pipeline itself."""
        return prepared.pipeline

    @abstractmethod
    def arguments(self, settings: GenerationSettings, count: int) -> dict[str, Any]:
        """The task's own call arguments for a batch of ``count`` images (prompt, steps, seeds... are shared)."""

    def check(self, settings: GenerationSettings) -> None:
        """Raise ``FetalStudioError`` when the task's inputs do not fit the settings (before any model loads)."""

    def denoising_steps(self, settings: GenerationSettings) -> int:
        """The steps a batch runs (the progress total); image-to-image runs only its strength's share."""
        return settings.steps

    def inputs(self) -> dict[str, Any]:
        """The task's inputs as JSON (e.g. strength, source image hash): recorded so the image can be remade."""
        return {}

    def step_hook(self, pipeline: Any, settings: GenerationSettings, seeds: list[int]) -> StepHook | None:
        """A per-batch hook run after every denoising step (diffusers' ``callback_on_step_end`` signature).

        It may return new ``latents`` in the callback kwargs (e.g. RePaint's known background);
        ``seeds`` are the batch's seeds, for any noise it draws. None: no hook.
        """
        return None

    def finish_image(self, image: Image.Image) -> Image.Image:
        """The image as the task delivers it, after the output colour is applied (e.g. pasting a source back)."""
        return image

    def record(self) -> dict[str, Any]:
        return {"name": self.name, **self.inputs()}


@dataclass
class PreparedPipeline:
    """A loaded pipeline with this run's LoRAs and sampler applied; ``settings`` are the settings as used."""

    manager: ModelManager
    entry: ModelEntry
    pipeline: Any
    state: PipelineState
    settings: GenerationSettings  # validated (concrete seed), concrete colour and mask channel
    loras: list[ResolvedLora]
    started: float  # perf_counter at preparation; GenerationResult.seconds counts from here

    def derived(self, pipeline_class: type, **components: Any) -> Any:
        """``pipeline_class`` (e.g. ``StableDiffusionImg2ImgPipeline``) over this pipeline's loaded components.

        Built once per loaded model (and per set of extra ``components``, e.g. ``controlnet=...``) with
        diffusers' ``from_pipe``: no second load, and the same LoRA adapters and weights (they live in
        the shared UNet and text encoder). It gets this run's scheduler.
        """
        key = (pipeline_class, *sorted((name, id(component)) for name, component in components.items()))
        pipeline = self.state.derived.get(key)
        if pipeline is None:
            # from_pipe casts every module to its dtype argument, float32 by default: a half-precision
            # model (shared with the base pipeline) would silently become float32
            pipeline = _quietly(lambda: pipeline_class.from_pipe(self.pipeline, dtype=self.pipeline.dtype, **components))
            pipeline.set_progress_bar_config(disable=True)
            self.state.derived[key] = pipeline  # holds the components, so their ids stay theirs
        if pipeline.scheduler is not self.pipeline.scheduler:
            pipeline.scheduler = self.pipeline.scheduler
        return pipeline

    def forget(self, component: Any) -> None:
        """Drop the derived pipelines that hold ``component`` (e.g. a ControlNet after its run), so that
        unloading it from the manager frees its memory; the next run derives again (cheap: no load)."""
        for key, pipeline in list(self.state.derived.items()):
            if any(value is component for value in pipeline.components.values()):
                del self.state.derived[key]

    def metadata(self, task: PipelineTask) -> dict:
        """What every image of the run records (its seed, index and batch are added per image)."""
        settings = self.settings
        placement = self.manager.placement  # cheaper than unet.device, which walks every module
        return {
            "settings": settings.to_dict(),
            "task": task.record(),
            "sampler": parse_sampler(settings.sampler).label,
            "scheduler": {"class": type(self.pipeline.scheduler).__name__, "config": _jsonable(dict(self.pipeline.scheduler.config))},
            "model": {"id": self.entry.id, "name": self.entry.id, "hash": self.state.model_hash},
            "loras": [{"name": l.name, "source": l.path, "weight": l.weight, "hash": l.hash} for l in self.loras],
            "versions": library_versions(),
            "device": placement.device.type,
            "dtype": str(placement.dtype).removeprefix("torch."),
            "output": {"color": settings.color, "mask_channel": settings.mask_channel,
                       "conversion": conversion_name(settings.color, settings.mask_channel)},
        }

    def run(
        self,
        task: PipelineTask,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_image: ImageCallback | None = None,
    ) -> GenerationResult:
        """Generate ``batch_count`` batches of ``batch_size`` images; image i uses seed + i.

        Cancelling stops after the current denoising step; images of finished batches are kept.
        Each image's metadata records its batch (size, position, seeds): batched matrix products
        differ from unbatched ones in the last bits, so only the same batch gives the same pixels.
        The images come back grayscale when the settings' colour says so; a mask channel is kept.
        """
        settings = self.settings
        pipeline = task.pipeline(self)
        base_metadata = self.metadata(task)
        images: list[GeneratedImage] = []
        try:
            for batch in range(settings.batch_count):
                indices = list(range(batch * settings.batch_size, (batch + 1) * settings.batch_size))
                batch_images = self.manager.run_with_oom_retry(
                    lambda: self._run_batch(pipeline, task, indices, len(images), on_progress, cancel), keep=self.entry.id
                )
                seeds = [settings.seed_for(i) for i in indices]
                for position, (index, image) in enumerate(zip(indices, batch_images)):
                    if settings.color == GRAYSCALE:
                        image = to_grayscale(image, settings.mask_channel)
                    image = task.finish_image(image)
                    seed = settings.seed_for(index)
                    batch_record = {"size": len(indices), "index": position, "seeds": seeds}
                    metadata = {**base_metadata, "seed": seed, "index": index, "batch": batch_record}
                    generated = GeneratedImage(image, seed, index, settings, metadata)
                    images.append(generated)
                    if on_image is not None:
                        on_image(generated)
        except RunCancelled:
            return GenerationResult(images, cancelled=True, seconds=time.perf_counter() - self.started)
        return GenerationResult(images, cancelled=False, seconds=time.perf_counter() - self.started)

    def _run_batch(self, pipeline, task: PipelineTask, indices: list[int], done: int,
                   on_progress: ProgressCallback | None, cancel: threading.Event | None) -> list:
        settings = self.settings
        if cancel is not None and cancel.is_set():
            raise RunCancelled
        generators = [torch.Generator("cpu").manual_seed(settings.seed_for(i)) for i in indices]
        steps = task.denoising_steps(settings)
        hook = task.step_hook(pipeline, settings, [settings.seed_for(i) for i in indices])

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if cancel is not None and cancel.is_set():
                raise RunCancelled
            if hook is not None:
                callback_kwargs = hook(pipe, step, timestep, callback_kwargs)
            if on_progress is not None:
                on_progress(done, settings.total_images, step + 1, steps)
            return callback_kwargs

        output = pipeline(
            prompt=[settings.prompt] * len(indices),
            negative_prompt=[settings.negative_prompt] * len(indices) if settings.negative_prompt else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
            callback_on_step_end=on_step_end,
            output_type="pil",
            **task.arguments(settings, len(indices)),
        )
        return output.images


@contextmanager
def prepare_pipeline(manager: ModelManager, settings: GenerationSettings) -> Iterator[PreparedPipeline]:
    """The settings' model, held (pinned) by the manager for the block, with their LoRAs and sampler applied."""
    settings = settings.validated()
    started = time.perf_counter()
    entry = manager.entry(settings.model)
    if entry.kind is not ModelKind.SD_PIPELINE:
        raise FetalStudioError(f"'{entry.id}' is a {entry.kind.value}, not a Stable Diffusion pipeline. Pick a generator model.")
    with manager.use(entry.id) as pipeline:
        state = _state(manager, pipeline, entry)
        loras = _apply_loras(manager, pipeline, state, settings.loras)
        settings = _resolve_output(settings, entry, loras)
        _apply_sampler(pipeline, state, settings.sampler)
        yield PreparedPipeline(manager, entry, pipeline, state, settings, loras, started)


def output_color(manager: ModelManager, model: str, requested: str = "auto") -> str:
    """"grayscale" or "rgb": what a run makes of ``requested`` for this model."""
    return resolve_color(requested, manager.entry(model))


def _resolve_output(settings: GenerationSettings, entry: ModelEntry, loras: list[ResolvedLora]) -> GenerationSettings:
    """The settings as used: the concrete colour, and the mask channel of an active image+mask LoRA."""
    mask_channel = settings.mask_channel
    if mask_channel is None:
        mask_channel = next((l.mask_channel for l in loras if l.weight != 0 and l.mask_channel is not None), None)
    return replace(settings, color=resolve_color(settings.color, entry), mask_channel=mask_channel)


def _state(manager: ModelManager, pipeline, entry: ModelEntry) -> PipelineState:
    if pipeline not in _PIPELINE_STATES:
        pipeline.set_progress_bar_config(disable=True)  # progress goes through on_progress
        _PIPELINE_STATES[pipeline] = PipelineState(
            base_scheduler_config=dict(pipeline.scheduler.config),  # as loaded, before any sampler swap
            model_hash=checkpoint_hash(manager.local_path(entry)),
        )
    return _PIPELINE_STATES[pipeline]


def _apply_sampler(pipeline, state: PipelineState, sampler: str) -> None:
    """Swap the scheduler only when the sampler changes: every pipeline call resets its state."""
    if state.sampler != sampler:
        pipeline.scheduler = make_scheduler(sampler, state.base_scheduler_config)
        state.sampler = sampler


def _apply_loras(manager: ModelManager, pipeline, state: PipelineState, specs: tuple[LoraSpec, ...]) -> list[ResolvedLora]:
    resolved = []
    for spec in specs:
        entry = manager.entry(spec.source)
        if entry.kind is not ModelKind.LORA:
            raise FetalStudioError(f"'{spec.source}' is a {entry.kind.value}, not a LoRA. Pick a LoRA file.")
        path = manager.local_path(entry)
        digest = checkpoint_hash(path)
        adapter_name = "lora_" + digest
        if adapter_name not in state.adapters:
            load_lora_adapter(pipeline, path, adapter_name, entry.details.get("weights_file"))
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


def load_lora_adapter(pipeline, path, adapter_name: str, weights_file: str | None) -> None:
    """Load a LoRA file or folder into ``pipeline`` as ``adapter_name``; a ModelLoadError when it does not fit."""
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


def _quietly(build: Callable[[], Any]) -> Any:
    """Run ``build`` with diffusers' warnings off: ``from_pipe(dtype=...)`` warns on every call that "modules
    in AutoencoderKL should be kept in float32: []" (an empty list: nothing is affected)."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return build()
    finally:
        diffusers_logging.set_verbosity(previous)
