"""ControlNet inpainting (RePaint in latent space, SSA stage 1) and OSM (stage 2) on the tiny pipeline and a
tiny ControlNet loaded through the manager, with a real first-trimester sagittal image as the source."""

import csv
import gc
import threading
import weakref

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fetalstudio.errors import FetalStudioError
from fetalstudio.models.device import DevicePlacement
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.inpaint import (
    CONTROLNET_INPAINT, OSM, ControlNetInpaint, InpaintRequest, InpaintRunner, feather_weights, latent_roi,
)
from fetalstudio.pipelines.metadata import reproduction_from_png, save_png
from fetalstudio.pipelines.prepared import prepare_pipeline
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.ssa import SSAParameters
from tests.data_support import DATA
from tests.synthesis_support import CONTROLNET_ID, LORA_ID, MODEL_ID, build_flex_model_folder, small_settings

STRUCTURES = DATA / "first_trimester_structures"
needs_structures = pytest.mark.skipif(not (STRUCTURES / "boxes.csv").is_file(), reason="shared data not found")
pytestmark = needs_structures
SIZE = 64


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return build_flex_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture()
def manager(models_root, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    return ModelManager(tmp_path / "checkpoints", extra_folders=(models_root,))


@pytest.fixture(scope="module")
def scan():
    """A real 11-14-week sagittal scan at 64 x 64, its layout map (filled boxes, one colour each) and a
    nasal-bone ROI (the box plus a margin), all as plain arrays."""
    with (STRUCTURES / "boxes.csv").open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["image"] == "images/0.png"]
    with Image.open(STRUCTURES / "images/0.png") as image:
        width, height = image.size
        source = np.asarray(image.convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS).convert("RGB"))
    layout = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(layout)
    roi = np.zeros((SIZE, SIZE), bool)
    for number, row in enumerate(rows, start=1):
        box = [float(row["x_min"]) * SIZE / width, float(row["y_min"]) * SIZE / height,
               float(row["x_max"]) * SIZE / width, float(row["y_max"]) * SIZE / height]
        draw.rectangle(box, fill=(number * 25, 255 - number * 20, (number * 70) % 256))
        if row["structure"] == "nasal_bone":
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            roi[max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8] = True
    assert 100 < roi.sum() < SIZE * SIZE / 2
    return source, np.asarray(layout), roi


def settings(**overrides):
    return small_settings(**{"sampler": "ddim", "steps": 4, "seed": 5, **overrides})


def request(scan, **overrides):
    source, layout, roi = scan
    return InpaintRequest(**{"source": source, "condition": layout, "roi": roi, "controlnet": CONTROLNET_ID, **overrides})


def pixels(result, i=0):
    return np.asarray(result.images[i].image).astype(int)


def source_as(result, scan):
    return np.asarray(Image.fromarray(scan[0]).convert(result.images[0].image.mode)).astype(int)


class Unpasted(ControlNetInpaint):
    """The task without the pixel paste-back, recording its final latents."""

    final: list

    def step_hook(self, pipeline, settings, seeds):
        hook = super().step_hook(pipeline, settings, seeds)

        def record(pipe, step, timestep, callback_kwargs):
            callback_kwargs = hook(pipe, step, timestep, callback_kwargs)
            self.final.append(callback_kwargs["latents"].clone())
            return callback_kwargs

        return record

    def finish_image(self, image):
        return image


def test_repaint_loop_keeps_the_background_in_latent_space_then_exactly_in_pixels(manager, scan):
    inpainting = request(scan)
    with manager.use(CONTROLNET_ID) as controlnet, prepare_pipeline(manager, settings()) as prepared:
        task = Unpasted(inpainting, controlnet, {"id": CONTROLNET_ID, "hash": "-"})
        object.__setattr__(task, "final", [])
        unpasted = prepared.run(task)
        vae = prepared.pipeline.vae
        with torch.no_grad():
            image = prepared.pipeline.image_processor.preprocess(Image.fromarray(scan[0]))
            known = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
    final = task.final[-1]
    inside = latent_roi(scan[2], 8, 8).bool().expand_as(final)
    outside_error = (final - known)[~inside].abs()
    inside_change = (final - known)[inside].abs()
    # before paste-back the background follows the source latent: the unmasked last DDIM step (from t=1)
    # moves it by sqrt((1 - a_1) / a_1) ~ 0.041 times the noise-prediction error (measured: mean 0.026,
    # max 0.099); the regenerated ROI moves ~17x more on average (0.45)
    assert outside_error.mean() < 0.04 and outside_error.max() < 0.2, outside_error
    assert inside_change.mean() > 10 * outside_error.mean()
    assert len(task.final) == 4  # one blend per step

    pasted = InpaintRunner(manager).generate(settings(), inpainting)
    made, original, roi = pixels(pasted), source_as(pasted, scan), scan[2]
    assert np.array_equal(made[~roi], original[~roi])  # exactly the source outside the ROI
    assert np.abs(made[roi] - original[roi]).mean() > 5  # the ROI is regenerated
    # the ROI's inner part is the generated image itself; the paste-back only touched the feather band
    core = feather_weights(roi, inpainting.feather) == 1
    assert np.array_equal(made[core], pixels(unpasted)[core])


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m_karras"])
def test_every_sampler_blends_at_the_right_noise_level(manager, scan, sampler, strength):
    """add_noise follows each scheduler's own convention (sigma-scaled latents for Euler and DPM++,
    begin index for image-to-image); a wrong level would leave noise in the background at the end."""
    with manager.use(CONTROLNET_ID) as controlnet, prepare_pipeline(manager, settings(sampler=sampler, steps=6)) as prepared:
        task = Unpasted(request(scan, strength=strength), controlnet, {"id": CONTROLNET_ID, "hash": "-"})
        object.__setattr__(task, "final", [])
        prepared.run(task)
        vae = prepared.pipeline.vae
        with torch.no_grad():
            image = prepared.pipeline.image_processor.preprocess(Image.fromarray(scan[0]))
            known = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
    final = task.final[-1]
    outside = ~latent_roi(scan[2], 8, 8).bool().expand_as(final)
    assert len(task.final) == int(6 * strength)
    assert (final - known)[outside].abs().mean() < 0.04


def test_osm_resamples_only_inside_the_mask_of_a_draft_from_another_model(manager, scan):
    draft = np.asarray(TextToImageRunner(manager).generate(settings(seed=9)).images[0].image.convert("RGB"))
    _, layout, roi = scan
    runner = InpaintRunner(manager)
    refined = runner.generate(settings(steps=6), InpaintRequest(draft, layout, roi, CONTROLNET_ID, strength=0.5, stage=OSM))
    made = pixels(refined)
    draft_pixels = np.asarray(Image.fromarray(draft).convert(refined.images[0].image.mode)).astype(int)
    assert np.array_equal(made[~roi], draft_pixels[~roi])
    assert np.abs(made[roi] - draft_pixels[roi]).max() > 10
    assert refined.images[0].metadata["task"]["stage"] == "osm" and refined.images[0].metadata["task"]["strength"] == 0.5
    # a lower strength stays closer to the draft inside the mask
    light = pixels(runner.generate(settings(steps=6), InpaintRequest(draft, layout, roi, CONTROLNET_ID, strength=0.25, stage=OSM)))
    assert np.abs(light[roi] - draft_pixels[roi]).mean() < np.abs(made[roi] - draft_pixels[roi]).mean()


def test_grayscale_output_and_a_source_of_another_size_keep_the_outside_exactly(manager, scan):
    """The paste-back follows the output colour; a larger scan is resized (Lanczos, ROI nearest) to the run's size."""
    source, layout, roi = scan
    big = Image.fromarray(source).resize((128, 128), Image.Resampling.LANCZOS)
    big_layout = np.asarray(Image.fromarray(layout).resize((128, 128), Image.Resampling.NEAREST))
    big_roi = np.asarray(Image.fromarray(roi).resize((128, 128), Image.Resampling.NEAREST))
    result = InpaintRunner(manager).generate(settings(color="grayscale"), InpaintRequest(big, big_layout, big_roi, CONTROLNET_ID))
    image = result.images[0].image
    assert image.mode == "L" and image.size == (SIZE, SIZE)
    expected = np.asarray(big.resize((SIZE, SIZE), Image.Resampling.LANCZOS).convert("L")).astype(int)
    run_roi = np.asarray(Image.fromarray(big_roi).resize((SIZE, SIZE), Image.Resampling.NEAREST))
    made = np.asarray(image).astype(int)
    assert np.array_equal(made[~run_roi], expected[~run_roi])
    assert np.abs(made[run_roi] - expected[run_roi]).mean() > 5
    assert result.images[0].metadata["task"]["source"]["width"] == 128


def test_same_inputs_and_seed_give_the_same_pixels_and_the_png_records_the_task(manager, scan, tmp_path):
    runner = InpaintRunner(manager)
    ssa = SSAParameters(k=0.5, delta=0.2, iterations=2)
    result = runner.generate(settings(batch_size=2), request(scan, ssa=ssa, conditioning_scale=0.8))
    again = runner.generate(settings(batch_size=2), request(scan, ssa=ssa, conditioning_scale=0.8))
    assert np.array_equal(pixels(result, 1), pixels(again, 1))
    task = result.images[1].metadata["task"]
    assert task["name"] == CONTROLNET_INPAINT and task["stage"] == "stage1"
    assert task["ssa"] == {"k": 0.5, "delta": 0.2, "iterations": 2, "correction": 1.0}
    assert task["conditioning_scale"] == 0.8 and task["controlnet"]["id"] == CONTROLNET_ID
    assert len(task["controlnet"]["hash"]) == 10
    assert task["roi"]["pixels"] == int(scan[2].sum()) and len(task["condition"]["sha256"]) == 64
    assert task["repaint"]["last_step"] == "unmasked"

    path = save_png(result.images[1].image, tmp_path / "flex.png", result.images[1].settings, result.images[1].seed,
                    result.images[1].metadata)
    reproduction = reproduction_from_png(path)
    remade = runner.reproduce(reproduction, request(scan, ssa=ssa, conditioning_scale=0.8))
    assert np.array_equal(np.asarray(remade.image), np.asarray(result.images[1].image))
    moved = np.roll(scan[2], 3, axis=1)
    with pytest.raises(FetalStudioError, match="ROI mask is not the one"):
        runner.reproduce(reproduction, request(scan, roi=moved, ssa=ssa, conditioning_scale=0.8))


def test_ssa_and_the_condition_change_the_regenerated_region(manager, scan):
    runner = InpaintRunner(manager)
    plain = pixels(runner.generate(settings(), request(scan)))
    with_ssa = pixels(runner.generate(settings(), request(scan, ssa=SSAParameters(k=0.5, delta=0.25, iterations=3))))
    flipped = pixels(runner.generate(settings(), request(scan, condition=scan[1][:, ::-1].copy())))
    roi = scan[2]
    assert np.abs(with_ssa[roi] - plain[roi]).mean() > 1
    assert np.abs(flipped[roi] - plain[roi]).mean() > 1
    assert np.array_equal(with_ssa[~roi], plain[~roi]) and np.array_equal(flipped[~roi], plain[~roi])


def test_progress_per_step_and_cancel(manager, scan):
    runner = InpaintRunner(manager)
    cancel = threading.Event()
    steps = []

    def on_progress(done, total, step, of):
        steps.append((step, of))
        if step == 2:
            cancel.set()

    result = runner.generate(settings(batch_count=2), request(scan), on_progress=on_progress, cancel=cancel)
    assert result.cancelled and result.images == []
    assert steps == [(1, 4), (2, 4)]
    assert [s for s in steps] and len(InpaintRunner(manager).generate(settings(), request(scan)).images) == 1


def test_the_controlnet_is_loaded_lazily_and_freed_when_the_manager_unloads_it(manager, scan):
    runner = InpaintRunner(manager)
    assert manager.loaded_ids() == []
    runner.generate(settings(), request(scan))
    assert sorted(manager.loaded_ids()) == sorted([MODEL_ID, CONTROLNET_ID])
    controlnet = weakref.ref(manager.get(CONTROLNET_ID))
    assert manager.unload(CONTROLNET_ID)
    gc.collect()
    assert controlnet() is None  # no derived pipeline keeps it alive
    assert len(runner.generate(settings(), request(scan)).images) == 1  # loaded again on demand


def test_derived_pipelines_keep_a_half_precision_model_in_half_precision(models_root, tmp_path):
    """diffusers' from_pipe casts to float32 unless told: the shared U-Net, VAE and text encoder must stay float16."""
    (tmp_path / "checkpoints").mkdir()
    half = ModelManager(tmp_path / "checkpoints", extra_folders=(models_root,),
                        placement=DevicePlacement(torch.device("cpu"), torch.float16))
    from diffusers import StableDiffusionControlNetPipeline

    with half.use(CONTROLNET_ID) as controlnet, prepare_pipeline(half, settings()) as prepared:
        derived = prepared.derived(StableDiffusionControlNetPipeline, controlnet=controlnet)
        assert derived.unet is prepared.pipeline.unet
        for module in (prepared.pipeline.unet, prepared.pipeline.vae, prepared.pipeline.text_encoder, controlnet):
            assert module.dtype == torch.float16, module


@pytest.mark.parametrize("model", [MODEL_ID, LORA_ID])
def test_a_model_that_is_not_a_controlnet_is_refused(manager, scan, model):
    with pytest.raises(FetalStudioError, match="not a ControlNet. Pick a ControlNet model"):
        InpaintRunner(manager).generate(settings(), request(scan, controlnet=model))
    assert manager.loaded_ids() == []  # refused before anything loaded


def test_a_controlnet_of_another_base_is_refused(manager, scan, models_root, tmp_path):
    from diffusers import ControlNetModel

    ControlNetModel(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, layers_per_block=1,
                    conditioning_embedding_out_channels=(8, 8, 16, 16)).save_pretrained(str(tmp_path / "checkpoints" / "other_cn"))
    manager.refresh()
    with pytest.raises(FetalStudioError, match="made for another base model"):
        InpaintRunner(manager).generate(settings(), request(scan, controlnet="other_cn"))


@pytest.mark.parametrize(("change", "message"), [
    (lambda s, l, r: dict(roi=r[:32]), "ROI mask is 64 x 32 but the source is 64 x 64"),
    (lambda s, l, r: dict(roi=np.zeros_like(r)), "ROI mask is empty"),
    (lambda s, l, r: dict(condition=l[:, :48]), "condition image is 48 x 64"),
    (lambda s, l, r: dict(condition=l.astype(np.float32)), "uint8 image"),
    (lambda s, l, r: dict(strength=0.0), "strength must be above 0"),
    (lambda s, l, r: dict(conditioning_scale=3.0), "conditioning scale"),
    (lambda s, l, r: dict(feather=-1), "feather"),
    (lambda s, l, r: dict(stage="ssa+osm"), "stage must be one of"),
])
def test_bad_inputs_are_refused_with_a_clear_message(scan, change, message):
    with pytest.raises(FetalStudioError, match=message):
        request(scan, **change(*scan))


def test_unipc_whose_corrector_undoes_the_blend_is_refused_before_loading(manager, scan):
    with pytest.raises(FetalStudioError, match="cannot use the unipc sampler.*Pick DDIM"):
        InpaintRunner(manager).generate(settings(sampler="unipc"), request(scan))
    assert manager.loaded_ids() == []


def test_too_few_steps_for_the_strength_are_refused_before_loading(manager, scan):
    with pytest.raises(FetalStudioError, match="runs no denoising step"):
        InpaintRunner(manager).generate(settings(steps=2), request(scan, strength=0.3, stage=OSM))
