"""Runners over the shared prepared pipeline, on the tiny SD pipeline loaded from disk like a real checkpoint.

The seam for the next runners (inpainting, ControlNet): ``PreparedPipeline.derived`` builds another
diffusers pipeline over the loaded components with ``from_pipe``: no second load, the same LoRA
state, the same sampler; its images record and reproduce the same way as text-to-image ones.
"""

import csv
import gc
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.models.device import DevicePlacement
from fetalstudio.models.entries import ModelKind
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.metadata import reproduction_from_png, save_png
from fetalstudio.pipelines.prepared import prepare_pipeline
from fetalstudio.pipelines.runners import ImageToImageRunner, TextToImageRunner
from fetalstudio.pipelines.settings import GenerationSettings, LoraSpec
from tests.data_support import DATA, needs_data
from tests.synthesis_support import LORA_ID, MODEL_ID, build_model_folder, small_settings

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "bundled" / "fetalstudio-tiny"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture()
def manager(models_root, tmp_path):
    """A fresh manager per test, counting how often the generator is loaded."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    manager = ModelManager(checkpoints, extra_folders=(models_root,))
    load = manager.loaders[ModelKind.SD_PIPELINE]
    manager.loads = 0

    def counting_load(*args, **kwargs):
        manager.loads += 1
        return load(*args, **kwargs)

    manager.loaders[ModelKind.SD_PIPELINE] = counting_load
    return manager


@pytest.fixture(scope="module")
def source() -> Image.Image:
    """A real HC18 head image, cropped and scaled to the tiny model's 64 x 64."""
    if not (DATA / "hc18_heads" / "pairs.csv").is_file():
        pytest.skip("shared data not found")
    with (DATA / "hc18_heads" / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        first = next(csv.DictReader(handle))
    with Image.open(DATA / "hc18_heads" / first["image"]) as image:
        return image.convert("L").resize((64, 64), Image.Resampling.LANCZOS)


def pixels(result, i=0):
    return np.asarray(result.images[i].image).astype(int)


def test_from_pipe_shares_the_loaded_components_and_the_lora_state(manager):
    with prepare_pipeline(manager, small_settings(loras=(LoraSpec(LORA_ID, 0.7),), sampler="unipc")) as prepared:
        base = prepared.pipeline
        img2img = prepared.derived(StableDiffusionImg2ImgPipeline)
        inpaint = prepared.derived(StableDiffusionInpaintPipeline)
        for derived in (img2img, inpaint):
            for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
                assert getattr(derived, name) is getattr(base, name), name
            assert derived.get_active_adapters() == base.get_active_adapters() == [prepared.loras[0].adapter_name]
            assert type(derived.scheduler).__name__ == "UniPCMultistepScheduler"
        assert prepared.derived(StableDiffusionImg2ImgPipeline) is img2img  # built once per loaded model
    assert manager.loads == 1 and manager.loaded_ids() == [MODEL_ID]  # from_pipe loaded nothing

    # the next run's sampler and LoRA weights reach the derived pipeline too
    with prepare_pipeline(manager, small_settings(loras=(LoraSpec(LORA_ID, 0.0),), sampler="ddim")) as prepared:
        derived = prepared.derived(StableDiffusionImg2ImgPipeline)
        assert derived is img2img and derived.scheduler is prepared.pipeline.scheduler
        assert type(derived.scheduler).__name__ == "DDIMScheduler"
    assert manager.loads == 1


def test_derived_pipelines_do_not_keep_an_unloaded_model_alive(manager):
    with prepare_pipeline(manager, small_settings()) as prepared:
        prepared.derived(StableDiffusionImg2ImgPipeline)
        loaded = weakref.ref(prepared.pipeline)
    del prepared
    assert manager.unload(MODEL_ID)
    gc.collect()
    assert loaded() is None


@needs_data
def test_image_to_image_runs_on_the_same_load_with_the_same_loras(manager, source):
    text_runner, image_runner = TextToImageRunner(manager), ImageToImageRunner(manager)
    text_runner.generate(small_settings())
    base = pixels(image_runner.generate(small_settings(steps=4), source, strength=0.5))
    at_zero = pixels(image_runner.generate(small_settings(steps=4, loras=(LoraSpec(LORA_ID, 0.0),)), source, strength=0.5))
    at_one = pixels(image_runner.generate(small_settings(steps=4, loras=(LoraSpec(LORA_ID, 1.0),)), source, strength=0.5))
    assert np.array_equal(base, at_zero)  # weight 0: the base model exactly
    assert np.abs(at_one - base).mean() > 1.0  # the LoRA loaded for text-to-image acts on image-to-image
    assert manager.loads == 1
    # the text-to-image pipeline is untouched by the derived one's runs
    assert np.array_equal(pixels(text_runner.generate(small_settings())), pixels(TextToImageRunner(manager).generate(small_settings())))


@needs_data
@pytest.mark.skipif(not (BUNDLED / "model_index.json").is_file(), reason="bundled generator not trained yet")
@pytest.mark.usefixtures("one_torch_thread")
def test_image_to_image_follows_the_source_by_strength_on_the_bundled_generator(source):
    """The bundled generator (trained on ultrasound) keeps a real head image the closer, the lower the strength."""
    manager = ModelManager(BUNDLED.parents[1], placement=DevicePlacement(torch.device("cpu"), torch.float32))
    head = source.resize((256, 256), Image.Resampling.LANCZOS)
    runner = ImageToImageRunner(manager)
    settings = GenerationSettings(model="fetalstudio-tiny", prompt="fetal head ultrasound", steps=10,
                                  guidance_scale=4.0, width=256, height=256, seed=3)
    gray = np.asarray(head).astype(int)
    distances = [np.abs(pixels(runner.generate(settings, head, strength=s)) - gray).mean() for s in (0.2, 0.5, 1.0)]
    assert distances[0] < distances[1] < distances[2]
    again = runner.generate(settings, head, strength=0.2)
    assert np.abs(pixels(again) - gray).mean() == distances[0]  # same seed, same pixels
    assert again.images[0].image.mode == "L" and again.images[0].image.size == (256, 256)  # declared grayscale


@needs_data
def test_image_to_image_pngs_record_the_task_and_reproduce_exactly(manager, source, tmp_path):
    runner = ImageToImageRunner(manager)
    result = runner.generate(small_settings(steps=4, batch_size=3, seed=11), source, strength=0.75)
    made = result.images[2]
    assert made.metadata["task"] == {
        "name": "image-to-image", "strength": 0.75,
        "source": {"width": 64, "height": 64, "sha256": made.metadata["task"]["source"]["sha256"]},
    }
    path = save_png(made.image, tmp_path / "made.png", made.settings, made.seed, made.metadata)
    reproduction = reproduction_from_png(path)
    assert reproduction.task["name"] == "image-to-image" and reproduction.index == 2
    assert np.array_equal(np.asarray(runner.reproduce(reproduction, source).image), np.asarray(made.image))

    other = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    with pytest.raises(FetalStudioError, match="not the one the image was made from"):
        runner.reproduce(reproduction, other)
    with pytest.raises(FetalStudioError, match="made by image-to-image, not text-to-image"):
        TextToImageRunner(manager).reproduce(reproduction)


def test_text_to_image_records_its_task(manager, tmp_path):
    made = TextToImageRunner(manager).generate(small_settings()).images[0]
    assert made.metadata["task"] == {"name": "text-to-image"}
    path = save_png(made.image, tmp_path / "made.png", made.settings, made.seed, made.metadata)
    assert reproduction_from_png(path).task == {"name": "text-to-image"}
    with pytest.raises(FetalStudioError, match="made by text-to-image, not image-to-image"):
        ImageToImageRunner(manager).reproduce(reproduction_from_png(path), Image.new("L", (64, 64)))


@needs_data
def test_image_to_image_progress_counts_the_steps_it_runs_and_cancel_keeps_finished_images(manager, source):
    progress = []
    cancel = threading.Event()
    done = []

    def on_image(image):
        done.append(image)
        cancel.set()

    result = ImageToImageRunner(manager).generate(
        small_settings(steps=8, batch_count=3), source, strength=0.5,
        on_progress=lambda *p: progress.append(p), cancel=cancel, on_image=on_image,
    )
    assert result.cancelled and len(result.images) == 1
    assert progress == [(0, 3, step, 4) for step in range(1, 5)]  # 8 steps at strength 0.5 run 4


@pytest.mark.parametrize("strength, steps, message", [
    (0.0, 10, "strength must be above 0"),
    (1.5, 10, "strength must be above 0"),
    (0.05, 10, "runs no denoising step"),
])
def test_image_to_image_refuses_a_strength_that_cannot_run_before_loading(manager, strength, steps, message):
    with pytest.raises(FetalStudioError, match=message):
        ImageToImageRunner(manager).generate(small_settings(steps=steps), Image.new("L", (64, 64), 128), strength=strength)
    assert manager.loads == 0


def test_a_controlnet_pipeline_derives_with_its_extra_component(manager):
    """The ControlNet seam: from_pipe adds the controlnet, the rest is the loaded model with its LoRA."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    with prepare_pipeline(manager, small_settings(loras=(LoraSpec(LORA_ID, 1.0),))) as prepared:
        controlnet = ControlNetModel.from_unet(prepared.pipeline.unet, load_weights_from_unet=False)
        derived = prepared.derived(StableDiffusionControlNetPipeline, controlnet=controlnet)
        assert derived.controlnet is controlnet and derived.unet is prepared.pipeline.unet
        assert derived.get_active_adapters() == [prepared.loras[0].adapter_name]
        assert prepared.derived(StableDiffusionControlNetPipeline, controlnet=controlnet) is derived
        other = ControlNetModel.from_unet(prepared.pipeline.unet, load_weights_from_unet=False)
        assert prepared.derived(StableDiffusionControlNetPipeline, controlnet=other).controlnet is other
        image = derived(prompt="a photo of fetal brain", image=Image.new("RGB", (64, 64)), num_inference_steps=2,
                        generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert manager.loads == 1
