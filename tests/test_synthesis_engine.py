"""The synthesis engine on a tiny SD-architecture pipeline loaded from disk like a real checkpoint."""

import threading

import numpy as np
import pytest

from fetalstudio.errors import FetalStudioError, ModelLoadError
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.settings import LoraSpec
from tests.synthesis_support import LORA_ID, MODEL_ID, build_model_folder, make_engine, small_settings


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = build_model_folder(tmp_path_factory.mktemp("models"))
    return make_engine(root, tmp_path_factory.mktemp("checkpoints"))


def pixels(result, i=0):
    return np.asarray(result.images[i].image)


def test_generates_images_of_the_requested_size_end_to_end(engine):
    result = engine.generate(small_settings(batch_size=2, batch_count=2))
    assert len(result.images) == 4 and not result.cancelled
    assert all(img.image.size == (64, 64) and img.image.mode == "RGB" for img in result.images)
    assert [img.seed for img in result.images] == [7, 8, 9, 10]  # image i uses seed + i
    assert pixels(result, 0).std() > 1  # a real decoded image, not a constant


def test_same_parameters_and_seed_give_identical_pixels(engine):
    first = pixels(engine.generate(small_settings(sampler="euler_a")))
    second = pixels(engine.generate(small_settings(sampler="euler_a")))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, pixels(engine.generate(small_settings(sampler="euler_a", seed=8))))


def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(engine):
    batch = engine.generate(small_settings(batch_size=1, batch_count=3, seed=100))
    single = engine.generate(small_settings(seed=102))
    assert np.array_equal(pixels(batch, 2), pixels(single))


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "unipc", "ddim", "dpmpp_2m_karras"])
def test_every_sampler_runs_and_is_recorded(engine, sampler):
    result = engine.generate(small_settings(sampler=sampler))
    meta = result.images[0].metadata
    assert meta["settings"]["sampler"] == sampler
    assert meta["scheduler"]["class"].endswith("Scheduler")


def test_random_seed_is_drawn_and_recorded(engine):
    result = engine.generate(small_settings(seed=-1))
    assert 0 <= result.images[0].seed < 2**32
    assert result.images[0].metadata["seed"] == result.images[0].seed


def test_kohya_lora_weight_zero_is_exactly_base_and_weight_one_changes_output(engine):
    base = pixels(engine.generate(small_settings()))
    at_zero = pixels(engine.generate(small_settings(loras=(LoraSpec(LORA_ID, 0.0),))))
    at_one = pixels(engine.generate(small_settings(loras=(LoraSpec(LORA_ID, 1.0),))))
    at_half = pixels(engine.generate(small_settings(loras=(LoraSpec(LORA_ID, 0.5),))))
    assert np.array_equal(base, at_zero)
    assert np.abs(at_one.astype(int) - base).mean() > 1.0
    assert not np.array_equal(at_half, at_one)
    # switching back to no LoRA needs no reload of the base model and restores it exactly
    pipeline_before = engine.manager.get(MODEL_ID)
    assert np.array_equal(base, pixels(engine.generate(small_settings())))
    assert engine.manager.get(MODEL_ID) is pipeline_before


def test_a_second_engine_on_the_same_manager_does_not_inherit_an_active_lora(engine):
    base = pixels(engine.generate(small_settings()))
    with_lora = pixels(engine.generate(small_settings(loras=(LoraSpec(LORA_ID, 1.0),))))
    other_engine = TextToImageRunner(engine.manager)  # e.g. the CLI and a script sharing one manager
    assert np.array_equal(base, pixels(other_engine.generate(small_settings())))
    assert np.array_equal(with_lora, pixels(other_engine.generate(small_settings(loras=(LoraSpec(LORA_ID, 1.0),)))))


def test_lora_metadata_names_file_weight_and_hash(engine):
    meta = engine.generate(small_settings(loras=(LoraSpec(LORA_ID, 0.8),))).images[0].metadata
    (lora,) = meta["loras"]
    assert lora["name"] == "fetal_test_lora" and lora["weight"] == 0.8 and len(lora["hash"]) == 10
    assert len(meta["model"]["hash"]) == 10
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert {"torch", "diffusers", "transformers", "peft", "fetalstudio"} <= set(meta["versions"])


def test_cancel_keeps_finished_images(engine):
    cancel = threading.Event()
    done = []

    def on_image(image):
        done.append(image)
        if len(done) == 2:
            cancel.set()

    result = engine.generate(small_settings(batch_count=10), cancel=cancel, on_image=on_image)
    assert result.cancelled and len(result.images) == 2


def test_progress_reports_every_step(engine):
    calls = []
    engine.generate(small_settings(steps=4, batch_count=2), on_progress=lambda *a: calls.append(a))
    assert calls[:4] == [(0, 2, 1, 4), (0, 2, 2, 4), (0, 2, 3, 4), (0, 2, 4, 4)]
    assert calls[-1] == (1, 2, 4, 4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({"width": 100}, "width must be a multiple of 8"),
        ({"steps": 0}, "steps must be between 1 and 150"),
        ({"sampler": "heun"}, "Unknown sampler"),
        ({"loras": (LoraSpec(LORA_ID, 2.0),)}, "LoRA weight"),
        ({"seed": -5}, "seed must be -1"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(engine, overrides, message):
    with pytest.raises(FetalStudioError, match=message):
        engine.generate(small_settings(**overrides))


def test_a_lora_id_that_is_not_a_lora_or_does_not_fit(engine, tmp_path):
    with pytest.raises(FetalStudioError, match="not a LoRA"):
        engine.generate(small_settings(loras=(LoraSpec(MODEL_ID, 1.0),)))
    from safetensors.torch import save_file
    import torch

    wrong = tmp_path / "sdxl_lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(1280, 4)}, str(wrong))
    with pytest.raises(ModelLoadError, match="does not fit this model"):
        engine.generate(small_settings(loras=(LoraSpec(str(wrong), 1.0),)))
    # the base model still works after the failed LoRA
    assert len(engine.generate(small_settings()).images) == 1


def test_generator_that_is_not_a_pipeline_is_refused(engine):
    with pytest.raises(FetalStudioError, match="not a Stable Diffusion pipeline"):
        engine.generate(small_settings(model=LORA_ID))
