"""Grayscale output (issue 11, item 12) and exact reproduction of batched images (item 16), on the
tiny SD-architecture test model declared grayscale in a manifest, with an image+mask LoRA."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from fetalstudio.errors import FetalStudioError
from fetalstudio.pipelines.color import LUMA_CONVERSION, to_grayscale
from fetalstudio.synthesis.dataset import DatasetRequest, export_dataset
from fetalstudio.synthesis.gallery import save_generated
from fetalstudio.pipelines.mask_injection import unpack
from fetalstudio.pipelines.metadata import JSON_KEY, read_png_text, reproduction_from_png, save_png, settings_from_png
from fetalstudio.pipelines.settings import LoraSpec
from tests.synthesis_support import LORA_ID, MODEL_ID, build_model_folder, make_engine, small_settings

GRAY_ID = "tinysd-gray"
MASK_LORA_ID = "tiny-mask-lora"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = build_model_folder(tmp_path_factory.mktemp("models"))
    mask_lora = root / "loras" / "tiny_mask_lora.safetensors"
    save_file(load_file(str(root / f"{LORA_ID}.safetensors")), str(mask_lora), metadata={"fetalstudio.mask_channel": "0"})
    gray_copy = tmp_path_factory.mktemp("declared") / MODEL_ID  # the same weights, declared grayscale
    shutil.copytree(root / MODEL_ID, gray_copy)
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    (checkpoints / "manifest.toml").write_text(
        f'[[model]]\nid = "{GRAY_ID}"\nkind = "sd_pipeline"\npath = "{gray_copy.as_posix()}"\noutput = "grayscale"\n\n'
        f'[[model]]\nid = "{MASK_LORA_ID}"\nkind = "lora"\npath = "{mask_lora.as_posix()}"\n', encoding="utf-8")
    return make_engine(root, checkpoints)


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_a_model_declared_grayscale_returns_grey_pixels_and_records_the_conversion(engine):
    gray = engine.generate(small_settings(model=GRAY_ID, batch_size=2)).images
    colour = engine.generate(small_settings(model=GRAY_ID, batch_size=2, color="rgb")).images
    for made, decoded in zip(gray, colour):
        pixels = rgb(made.image)
        assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])
        assert np.abs(rgb(decoded.image)[..., 0].astype(int) - rgb(decoded.image)[..., 1]).max() > 0  # the decoder is not grey
        assert np.array_equal(np.asarray(made.image), np.asarray(decoded.image.convert("L")))  # luma of the same pixels
        assert made.settings.color == "grayscale"
        assert made.metadata["output"] == {"color": "grayscale", "mask_channel": None, "conversion": LUMA_CONVERSION}
    # undeclared models keep the decoder's RGB unless grayscale is asked for
    assert engine.generate(small_settings()).images[0].settings.color == "rgb"
    forced = rgb(engine.generate(small_settings(color="grayscale")).images[0].image)
    assert np.array_equal(forced[..., 0], forced[..., 2])


def test_image_mask_lora_pairs_keep_their_mask_channel(engine):
    lora = (LoraSpec(MASK_LORA_ID, 1.0),)
    gray = engine.generate(small_settings(model=GRAY_ID, loras=lora)).images[0]
    decoded = rgb(engine.generate(small_settings(model=GRAY_ID, loras=lora, color="rgb")).images[0].image)
    pixels = rgb(gray.image)
    assert np.array_equal(pixels[..., 0], decoded[..., 0])  # the mask channel exactly as generated
    assert np.array_equal(pixels[..., 1], pixels[..., 2])  # grey image channels
    # the pair the Mask review reads (review.pairs -> unpack) is the same as from the decoder's pixels
    assert all(np.array_equal(a, b) for a, b in zip(unpack(pixels, 0), unpack(decoded, 0)))
    assert gray.settings.mask_channel == 0 and gray.metadata["output"]["mask_channel"] == 0
    # a channel named by the caller (a LoRA that does not record one) is kept the same way
    named = rgb(engine.generate(small_settings(model=GRAY_ID, loras=(LoraSpec(LORA_ID, 1.0),), mask_channel=2)).images[0].image)
    assert np.array_equal(named[..., 0], named[..., 1]) and not np.array_equal(named[..., 0], named[..., 2])


def test_review_pairs_from_a_grayscale_model_keep_the_mask(engine, tmp_path):
    from fetalstudio.review.pairs import PairRequest, generate_pairs
    from fetalstudio.review.store import ReviewSession

    session = ReviewSession.create(tmp_path / "session")
    request = PairRequest(trimester="second", count=1, lora=MASK_LORA_ID, model=GRAY_ID, steps=3, width=64, height=64, seed=7)
    item = generate_pairs(engine, session, request).added[0]
    decoded = engine.generate(small_settings(
        model=GRAY_ID, prompt="An ultrasound image of a fetal head, second trimester", sampler=request.sampler, steps=3,
        guidance_scale=request.guidance_scale, loras=(LoraSpec(MASK_LORA_ID, request.lora_weight),), color="rgb")).images[0]
    gray, raw_mask = unpack(rgb(decoded.image), 0)
    assert np.array_equal(session.load_raw_mask(item), raw_mask)  # the mask as generated
    assert np.array_equal(session.load_image(item), gray)


def test_png_records_the_colour_and_reproduces_the_same_grey_pixels(engine, tmp_path):
    made = engine.generate(small_settings(model=GRAY_ID, seed=21)).images[0]
    path = save_generated(made, tmp_path)
    assert Image.open(path).mode == "L"
    assert json.loads(read_png_text(path)[JSON_KEY])["settings"]["color"] == "grayscale"
    assert settings_from_png(path).color == "grayscale"
    again = engine.reproduce(reproduction_from_png(path))
    assert np.array_equal(np.asarray(again.image), np.asarray(Image.open(path)))


def test_pngs_from_before_the_colour_was_recorded_reproduce_as_rgb(engine, tmp_path):
    made = engine.generate(small_settings(model=GRAY_ID, color="rgb")).images[0]
    metadata = json.loads(json.dumps(made.metadata))
    del metadata["settings"]["color"], metadata["settings"]["mask_channel"], metadata["batch"]
    path = save_png(made.image, tmp_path / "old.png", made.settings, made.seed, metadata)
    assert settings_from_png(path).color == "rgb"
    assert np.array_equal(np.asarray(engine.reproduce(reproduction_from_png(path)).image), np.asarray(made.image))


def test_an_image_of_a_batch_of_3_is_reproduced_alone_from_its_png_with_identical_pixels(engine, tmp_path):
    batch = engine.generate(small_settings(batch_size=3, seed=40, steps=4)).images
    for made in batch:
        path = save_generated(made, tmp_path)
        reproduction = reproduction_from_png(path)
        assert reproduction.settings.batch_size == 3 and reproduction.settings.seed == 40
        assert reproduction.index == made.index
        again = engine.reproduce(reproduction)
        assert again.seed == made.seed
        assert np.array_equal(np.asarray(again.image), np.asarray(Image.open(path)))
    assert json.loads(read_png_text(path)[JSON_KEY])["batch"] == {"size": 3, "index": 2, "seeds": [40, 41, 42]}


def test_dataset_export_of_a_grayscale_model_writes_grey_pngs_and_resumes(engine, tmp_path):
    request = DatasetRequest(out_dir=tmp_path / "ds", model=GRAY_ID, planes=("brain",), images_per_plane=2, steps=2,
                             width=64, height=64, seed=3, batch_size=2)
    export_dataset(engine, request)
    files = sorted((tmp_path / "ds").rglob("*.png"))
    assert len(files) == 2 and all(Image.open(f).mode == "L" for f in files)
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["color"] == "grayscale"
    assert export_dataset(engine, request).skipped == 2  # "auto" resolves the same way on resume
    with pytest.raises(FetalStudioError, match="color"):
        export_dataset(engine, DatasetRequest(**{**request.__dict__, "color": "rgb"}))


def test_bad_colour_values_are_refused_with_a_reason(engine, tmp_path):
    with pytest.raises(FetalStudioError, match="colour must be one of"):
        engine.generate(small_settings(color="sepia"))
    with pytest.raises(FetalStudioError, match="Unknown output colour"):
        engine.output_color(MODEL_ID, "sepia")
    assert to_grayscale(Image.new("RGB", (4, 4), (200, 10, 10))).getpixel((0, 0)) == 67  # Pillow's luma, rounded: 0.299*200 + 0.587*10 + 0.114*10
