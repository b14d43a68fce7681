import diffusers
import pytest

from fetalstudio.pipelines.samplers import SAMPLERS, make_scheduler, parse_sampler

SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "steps_offset": 1, "prediction_type": "epsilon",
}


@pytest.mark.parametrize(
    "key,cls",
    [
        ("euler", diffusers.EulerDiscreteScheduler),
        ("euler_a", diffusers.EulerAncestralDiscreteScheduler),
        ("unipc", diffusers.UniPCMultistepScheduler),
        ("ddim", diffusers.DDIMScheduler),
        ("dpmpp_2m_karras", diffusers.DPMSolverMultistepScheduler),
    ],
)
def test_each_sampler_maps_to_its_diffusers_scheduler_and_keeps_the_model_schedule(key, cls):
    scheduler = make_scheduler(key, SD15_SCHEDULER)
    assert type(scheduler) is cls
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)


def test_dpmpp_2m_karras_settings():
    scheduler = make_scheduler("dpmpp_2m_karras", SD15_SCHEDULER)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2
    assert scheduler.config.use_karras_sigmas is True


def test_sampler_names_by_key_or_label():
    assert parse_sampler("UniPC").key == "unipc"
    assert parse_sampler("DPM++ 2M Karras").key == "dpmpp_2m_karras"
    assert parse_sampler(" euler a ").key == "euler_a"
    assert len(SAMPLERS) == 5
    with pytest.raises(ValueError, match="Choose one of: euler, euler_a, unipc, ddim, dpmpp_2m_karras"):
        parse_sampler("heun")


def test_ddim_does_not_clip_latents_unless_the_model_config_asks():
    """The bundled generator's PNDM config has no clip_sample; DDIM's own default (True) clipped the predicted
    latent x0 to [-1, 1] and DDIM images were texture noise."""
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).resolve().parents[1] / "checkpoints/bundled/fetalstudio-tiny/scheduler/scheduler_config.json").read_text())
    assert "clip_sample" not in config
    assert make_scheduler("ddim", config).config.clip_sample is False
    assert make_scheduler("ddim", {**config, "clip_sample": True}).config.clip_sample is True
    assert "clip_sample" not in config  # the model's config is not changed
