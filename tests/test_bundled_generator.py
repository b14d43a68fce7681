"""The bundled generator (fetalstudio-tiny) and its trimester image+mask LoRAs: load through the
shipped manifest, generate sane 256x256 ultrasound images, and the LoRAs put a head mask in the
mask channel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fetalstudio.models.entries import ModelKind
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.mask_injection import unpack
from fetalstudio.pipelines.settings import GenerationSettings, LoraSpec

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
TINY = CHECKPOINTS / "bundled" / "fetalstudio-tiny"
TRIMESTERS = ("first", "second", "third")

pytestmark = [
    pytest.mark.skipif(not (TINY / "model_index.json").is_file(), reason="bundled generator not trained yet"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    import torch

    from fetalstudio.models.device import DevicePlacement

    return ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32))


def _generate(manager, prompt: str, seed: int, loras=()) -> np.ndarray:
    result = TextToImageRunner(manager).generate(GenerationSettings(
        model="fetalstudio-tiny", prompt=prompt, steps=12, guidance_scale=4.0, width=256, height=256, seed=seed,
        sampler="unipc", loras=tuple(loras)))
    return np.asarray(result.images[0].image.convert("RGB")).astype(np.float32)


def test_the_bundled_generator_is_the_default_and_fits_the_size_budget(manager):
    assert manager.default_id(ModelKind.SD_PIPELINE) == "fetalstudio-tiny"
    bundled = sum(p.stat().st_size for p in (CHECKPOINTS / "bundled").rglob("*") if p.is_file())
    # small models travel with the repository (153.5 MB with the structure detector of issue 13, 182.3 MB
    # with the canny ControlNet of issue 14, 187.8 MB with the head U-Net of issue 15; the README's model table lists
    # each size): a clone must stay small
    assert bundled < 190e6


def test_generates_grey_ultrasound_like_images_steered_by_the_caption(manager):
    brain = _generate(manager, "a photo of fetal brain", seed=0)
    assert brain.shape == (256, 256, 3)
    # declared grayscale in the manifest: no colour cast or specks from the mask-capable VAE, R = G = B
    assert np.array_equal(brain[..., 0], brain[..., 1]) and np.array_equal(brain[..., 1], brain[..., 2])
    assert brain.std() > 15  # structure, not a flat image
    head = _generate(manager, "An ultrasound image of a fetal head, second trimester", seed=0)
    assert np.abs(brain - head).mean() > 10  # the caption steers the image (planes vs heads; see the card's limits)
    assert np.abs(_generate(manager, "a photo of fetal brain", seed=1) - brain).mean() > 10


def test_the_plane_captions_give_their_planes(manager):
    """The five captions give different images for one seed, and the default classifier names the
    plane of generated brain, femur and abdomen images (eval synthesis: 0.92-1.00 for these three)."""
    from PIL import Image

    from fetalstudio.classification.predict import PlaneClassifier

    images = {plane: [_generate(manager, f"a photo of fetal {plane}", seed=seed) for seed in (7, 8)]
              for plane in ("abdomen", "brain", "femur")}
    assert np.abs(images["brain"][0] - images["femur"][0]).mean() > 10
    assert np.abs(images["brain"][0] - images["abdomen"][0]).mean() > 10
    with manager.use(manager.default_id(ModelKind.CLASSIFIER)) as model:
        classifier = PlaneClassifier(model)
        named = [max(probabilities, key=probabilities.get) == plane
                 for plane, arrays in images.items()
                 for probabilities in classifier.predict([Image.fromarray(a.astype(np.uint8)) for a in arrays])]
    assert sum(named) >= 5, named  # of 6


@pytest.mark.parametrize("trimester", TRIMESTERS)
def test_trimester_lora_draws_a_head_mask_in_the_mask_channel(manager, trimester):
    lora_id = f"fetalstudio-head-{trimester}-mask"
    assert manager.entry(lora_id).kind is ModelKind.LORA
    packed = _generate(manager, f"An ultrasound image of a fetal head, {trimester} trimester", seed=0,
                       loras=[LoraSpec(lora_id, 1.0)])
    assert np.array_equal(packed[..., 1], packed[..., 2])  # grey image channels, the mask channel kept
    image, mask = unpack(packed.astype(np.uint8), 0)
    assert image.std() > 15
    inside = (mask > 127).mean()
    assert 0.03 < inside < 0.8  # a head-sized region, neither empty nor the whole frame
    plain = _generate(manager, f"An ultrasound image of a fetal head, {trimester} trimester", seed=0)
    assert np.abs(plain[..., 0] - plain[..., 1]).mean() < np.abs(packed[..., 0] - packed[..., 1]).mean()
