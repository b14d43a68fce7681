"""Runners: one kind of generation each, all over the shared prepared pipeline (``prepared.py``).

A runner turns its inputs into a ``PipelineTask`` and calls ``PipelineRunner.run``, which prepares
the model (LoRAs, sampler, colour) and runs the shared loop (batches, seeds, cancel, progress,
out-of-memory retry, metadata with the task's inputs). New kinds (inpainting, ControlNet) add a task
whose ``pipeline`` is ``prepared.derived(<diffusers pipeline class>)`` and a runner with its own
``generate``; their images record and reproduce exactly as text-to-image ones do.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.prepared import (
    ImageCallback, PipelineTask, PreparedPipeline, ProgressCallback, output_color, prepare_pipeline,
)
from fetalstudio.pipelines.settings import TEXT_TO_IMAGE, GeneratedImage, GenerationResult, GenerationSettings, Reproduction

IMAGE_TO_IMAGE = "image-to-image"


class TextToImage(PipelineTask):
    """A prompt alone: the loaded pipeline at the settings' width and height."""

    name = TEXT_TO_IMAGE

    def arguments(self, settings: GenerationSettings, count: int) -> dict[str, Any]:
        return {"width": settings.width, "height": settings.height}


@dataclass(frozen=True)
class ImageToImage(PipelineTask):
    """A source image re-noised to ``strength`` (0 keeps it, 1 replaces it) and denoised under the prompt.

    The source is resized to the settings' width and height; its pixel hash and the strength are
    recorded, so the image is remade exactly from the same source file.
    """

    source: Image.Image
    strength: float = 0.6

    name = IMAGE_TO_IMAGE

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:
            raise FetalStudioError(f"Image-to-image strength must be above 0 and at most 1 (got {self.strength}).")

    def pipeline(self, prepared: PreparedPipeline) -> Any:
        from diffusers import StableDiffusionImg2ImgPipeline

        return prepared.derived(StableDiffusionImg2ImgPipeline)

    def check(self, settings: GenerationSettings) -> None:
        if self.denoising_steps(settings) < 1:
            raise FetalStudioError(
                f"Strength {self.strength:g} of {settings.steps} steps runs no denoising step; "
                f"raise the steps to at least {int(1 / self.strength) + 1} or the strength."
            )

    def denoising_steps(self, settings: GenerationSettings) -> int:
        return min(int(settings.steps * self.strength), settings.steps)  # as diffusers' img2img counts them

    def arguments(self, settings: GenerationSettings, count: int) -> dict[str, Any]:
        image = self.source.convert("RGB")
        if image.size != (settings.width, settings.height):
            image = image.resize((settings.width, settings.height), Image.Resampling.LANCZOS)
        return {"image": [image] * count, "strength": self.strength}

    def inputs(self) -> dict[str, Any]:
        return {"strength": self.strength, "source": source_record(self.source)}


def source_record(image: Image.Image) -> dict[str, Any]:
    """A source image's identity as recorded: its size and the SHA-256 of its RGB pixels."""
    rgb = image.convert("RGB")
    return {"width": rgb.width, "height": rgb.height, "sha256": hashlib.sha256(rgb.tobytes()).hexdigest()}


class PipelineRunner:
    """Runs tasks on the manager's models; shared by every runner, so each stays a thin entry point."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def output_color(self, model: str, requested: str = "auto") -> str:
        """"grayscale" or "rgb": what a run makes of ``requested`` for this model."""
        return output_color(self.manager, model, requested)

    def run(
        self,
        settings: GenerationSettings,
        task: PipelineTask,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_image: ImageCallback | None = None,
    ) -> GenerationResult:
        """``batch_count`` batches of ``batch_size`` images of ``task``; image i uses seed + i (see ``PreparedPipeline.run``)."""
        task.check(settings)
        with prepare_pipeline(self.manager, settings) as prepared:
            return prepared.run(task, on_progress, cancel, on_image)

    def reproduce_task(self, reproduction: Reproduction, task: PipelineTask, cancel: threading.Event | None) -> GeneratedImage:
        """The recorded image again, pixel for pixel: its whole batch is re-run and that one image returned."""
        if reproduction.task.get("name") != task.name:
            raise FetalStudioError(
                f"This image was made by {reproduction.task.get('name')}, not {task.name}; "
                f"remake it with the {reproduction.task.get('name')} generator."
            )
        result = self.run(reproduction.settings, task, cancel=cancel)
        if result.cancelled or len(result.images) <= reproduction.index:
            raise FetalStudioError("Reproduction was cancelled before the image was made; press Reproduce again.")
        return result.images[reproduction.index]


class TextToImageRunner(PipelineRunner):
    """Text-to-image: the Synthesis tab, dataset export, review pairs and the CLI."""

    def generate(
        self,
        settings: GenerationSettings,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_image: ImageCallback | None = None,
    ) -> GenerationResult:
        """Generate ``batch_count`` batches of ``batch_size`` images; image i uses seed + i.

        Cancelling stops after the current denoising step; images of finished batches are kept.
        Each image's metadata records its batch (size, position, seeds): batched matrix products
        differ from unbatched ones in the last bits, so only the same batch gives the same pixels
        (``reproduce``). The images come back grayscale when ``settings.color`` (or, for "auto",
        the model's manifest entry) says so; an image+mask LoRA's mask channel is kept.
        """
        return self.run(settings, TextToImage(), on_progress, cancel, on_image)

    def reproduce(self, reproduction: Reproduction, cancel: threading.Event | None = None) -> GeneratedImage:
        """The recorded image again, pixel for pixel: its whole batch is re-run and that one image returned."""
        return self.reproduce_task(reproduction, TextToImage(), cancel)


class ImageToImageRunner(PipelineRunner):
    """Image-to-image over the same loaded model (diffusers' ``from_pipe``: no second load, the same LoRAs)."""

    def generate(
        self,
        settings: GenerationSettings,
        source: Image.Image,
        strength: float = 0.6,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_image: ImageCallback | None = None,
    ) -> GenerationResult:
        """As ``TextToImageRunner.generate``, starting from ``source`` re-noised to ``strength``."""
        return self.run(settings, ImageToImage(source, strength), on_progress, cancel, on_image)

    def reproduce(self, reproduction: Reproduction, source: Image.Image, cancel: threading.Event | None = None) -> GeneratedImage:
        """The recorded image again from the same ``source`` (checked against the recorded pixel hash)."""
        recorded = reproduction.task.get("source") or {}
        if reproduction.task.get("name") == IMAGE_TO_IMAGE and recorded.get("sha256") != source_record(source)["sha256"]:
            raise FetalStudioError(
                "This source image is not the one the image was made from (its pixels differ); "
                "pick the original source file."
            )
        strength = float(reproduction.task.get("strength", 0.6))
        return self.reproduce_task(reproduction, ImageToImage(source, strength), cancel)
