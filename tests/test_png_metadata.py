"""Generation parameters written into PNGs and read back (ours and A1111's)."""

import json

import numpy as np
import pytest
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.pipelines.metadata import (
    a1111_parameters, parse_a1111_parameters, read_png_text, reproduction_from_png, save_png, settings_from_png,
)
from fetalstudio.pipelines.settings import GenerationSettings, LoraSpec

SETTINGS = GenerationSettings(
    model="sd15", prompt="a photo of fetal femur", negative_prompt="text, watermark", sampler="unipc",
    steps=20, guidance_scale=6.5, width=512, height=384, seed=41, batch_size=2, batch_count=3,
    loras=(LoraSpec("fetal_ultrasound_v1.0", 0.9),),
)
METADATA = {
    "settings": SETTINGS.to_dict(), "seed": 42, "index": 1,
    "model": {"id": "sd15", "name": "sd15", "hash": "0123456789"},
    "loras": [{"name": "fetal_ultrasound_v1.0", "source": "/x/fetal_ultrasound_v1.0.safetensors", "weight": 0.9, "hash": "abcdef0123"}],
    "versions": {"fetalstudio": "0.1.0"},
}


def test_a1111_parameters_text_has_the_fields_other_tools_read():
    text = a1111_parameters(SETTINGS, 42, METADATA)
    prompt_line, negative_line, fields = text.split("\n")
    assert prompt_line == "a photo of fetal femur <lora:fetal_ultrasound_v1.0:0.9>"
    assert negative_line == "Negative prompt: text, watermark"
    for field in ("Steps: 20", "Sampler: UniPC", "CFG scale: 6.5", "Seed: 42", "Size: 512x384",
                  "Model hash: 0123456789", 'Lora hashes: "fetal_ultrasound_v1.0: abcdef0123"'):
        assert field in fields


def test_png_round_trip_restores_the_settings_of_that_image(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 512, 3), dtype=np.uint8))
    path = save_png(image, tmp_path / "out" / "img.png", SETTINGS, 42, METADATA)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))  # lossless
    assert not list((tmp_path / "out").glob(".*.part"))  # atomic write left no temp file
    restored = settings_from_png(path)
    assert restored.seed == 42 and restored.batch_size == 1 and restored.batch_count == 1
    assert restored.prompt == SETTINGS.prompt and restored.sampler == "unipc" and restored.loras == SETTINGS.loras
    assert json.loads(read_png_text(path)["fetalstudio"])["model"]["hash"] == "0123456789"


def test_a1111_png_without_our_json_is_parsed_too(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "fetal head, first trimester <lora:fu_head:0.8>\nNegative prompt: blurry\n"
                  "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    settings = settings_from_png(path)
    assert settings.prompt == "fetal head, first trimester"
    assert settings.negative_prompt == "blurry"
    assert settings.sampler == "dpmpp_2m_karras" and settings.steps == 25 and settings.guidance_scale == 5
    assert settings.seed == 1234 and settings.model == "v1-5-pruned-emaonly"
    assert settings.loras == (LoraSpec("fu_head", 0.8),)


def test_png_without_parameters_and_non_images_are_explained(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("L", (4, 4)).save(plain)
    with pytest.raises(FetalStudioError, match="carries no generation parameters"):
        settings_from_png(plain)
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(FetalStudioError, match="Cannot read"):
        settings_from_png(fake)


def test_parse_a1111_round_trips_our_own_text():
    parsed = parse_a1111_parameters(a1111_parameters(SETTINGS, 42, METADATA))
    assert (parsed.prompt, parsed.negative_prompt, parsed.sampler, parsed.steps, parsed.seed, parsed.width, parsed.height) == (
        SETTINGS.prompt, SETTINGS.negative_prompt, "unipc", 20, 42, 512, 384)


@pytest.mark.parametrize("text,expected", [("a.safetensors:0.7", ("a.safetensors", 0.7)), ("lora_id", ("lora_id", 1.0)),
                                            ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0))])
def test_lora_spec_parsing(text, expected):
    spec = LoraSpec.parse(text)
    assert (spec.source, spec.weight) == expected


@pytest.mark.parametrize("task, expected", [
    (None, {"name": "text-to-image"}),  # PNGs from before the task was recorded
    ({"name": "image-to-image", "strength": 0.5}, {"name": "image-to-image", "strength": 0.5}),
])
def test_reproduction_reads_the_recorded_task(tmp_path, task, expected):
    metadata = {**METADATA, **({"task": task} if task else {})}
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "img.png", SETTINGS, 42, metadata)
    assert reproduction_from_png(path).task == expected


@pytest.mark.parametrize("task", ["image-to-image", ["name"], {"strength": 0.5}])
def test_a_damaged_task_record_is_explained(tmp_path, task):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "img.png", SETTINGS, 42, {**METADATA, "task": task})
    with pytest.raises(FetalStudioError, match="metadata is damaged"):
        reproduction_from_png(path)
