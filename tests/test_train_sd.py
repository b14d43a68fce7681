"""`train sd` at 64 px on ten shared images: tokenizer, VAE, U-Net, loading, resuming, captions, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fetalstudio.cli import main
from fetalstudio.models.entries import ModelFormat, ModelKind
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.settings import GenerationSettings
from fetalstudio.training.captions import (
    DOMAIN_PHRASES,
    app_captions,
    train_clip_tokenizer,
    trimester_from_hc,
    words_not_whole,
)
from fetalstudio.training.image_datasets import collect_items
from fetalstudio.vocabulary import parse_trimester

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "hc18_heads" / "pairs.csv").is_file(), reason="shared data not available")

TINY = ["--resolution", "64", "--vae-channels", "8,16,16,16", "--vae-layers", "1", "--unet-channels", "16,32",
        "--unet-layers", "1", "--attention-head-dim", "8", "--text-hidden", "32", "--text-layers", "1", "--text-heads", "2",
        "--batch-size", "2", "--log-every", "1", "--warmup-steps", "1", "--samples", "0", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory) -> list[Path]:
    """One Spanish image per plane + five HC18 heads (known trimesters), as two CSVs with absolute paths."""
    folder = tmp_path_factory.mktemp("data")
    planes, seen = [], set()
    for row in _rows(DATA / "spanish_planes" / "labels.csv"):
        if row["plane"] not in seen:
            seen.add(row["plane"])
            planes.append([DATA / "spanish_planes" / row["filename"], row["plane"]])
    heads = [r for r in _rows(DATA / "hc18_heads" / "pairs.csv") if r["trimester"]][::12][:5]
    with (folder / "planes.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["filename", "plane"], *planes])
    with (folder / "heads.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "trimester", "hc_mm"])
        for r in heads:
            writer.writerow([DATA / "hc18_heads" / r["image"], DATA / "hc18_heads" / r["mask"], r["trimester"], r["hc_mm"]])
    return [folder / "planes.csv", folder / "heads.csv"]


def _data_args(sources: list[Path]) -> list[str]:
    return [arg for source in sources for arg in ("--data", str(source))]


@pytest.fixture(scope="module")
def trained(ten_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "fetal-ldm"
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(out), "--steps", "3", "--save-every", "2", *TINY]) == 0
    return out


def test_output_is_a_complete_diffusers_folder_with_card_and_metrics(trained):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (trained / part).is_dir()
    assert json.loads((trained / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"tokenizer", "vae", "unet"}
    assert metrics["data"]["images"] == 10 and len(metrics["data"]["captions"]) == 8
    assert metrics["stages"]["vae"]["scaling_factor"] > 0
    scheduler = json.loads((trained / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"], scheduler["num_train_timesteps"]) == \
        ("scaled_linear", 0.00085, 0.012, 1000)
    card = (trained / "model_card.md").read_text()
    assert "90 mm" in card and "African" in card
    stages = [json.loads(line.split(",", 4)[4].strip('"').replace('""', '"'))["stage"]
              for line in (trained / "train_log.csv").read_text().splitlines()[1:]]
    assert stages == ["vae"] * 3 + ["unet"] * 3


def test_loads_with_from_pretrained_and_through_the_model_manager_and_generates(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(trained), local_files_only=True)
    assert pipeline.unet.config.sample_size == 8 and pipeline.vae.config.latent_channels == 4
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    manager = ModelManager(checkpoints, extra_folders=(trained.parent,))
    entry = manager.entry("fetal-ldm")  # discovered by folder name
    assert entry.kind is ModelKind.SD_PIPELINE and entry.format is ModelFormat.DIFFUSERS_FOLDER
    result = TextToImageRunner(manager).generate(GenerationSettings(
        model="fetal-ldm", prompt="An ultrasound image of a fetal head, second trimester", steps=2, width=64, height=64, seed=1,
        guidance_scale=4.0))
    image = np.asarray(result.images[0].image)
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_each_stage_resumes_from_its_saved_step(trained, ten_images, capsys):
    log = trained / "train_log.csv"
    lines_before = len(log.read_text().splitlines())
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(trained), "--stage", "unet", "--steps", "5", *TINY]) == 0
    assert "steps 3->5" in capsys.readouterr().out
    new_steps = [line.split(",")[0] for line in log.read_text().splitlines()[lines_before:]]
    assert new_steps == ["4", "5"]
    assert json.loads((trained / "stages" / "unet" / "state" / "progress.json").read_text())["step"] == 5
    assert json.loads((trained / "metrics.json").read_text())["stages"]["unet"]["steps"] == 5
    # the tokenizer stage keeps what exists (rebuilding it would invalidate the trained models)
    assert main(["train", "sd", "--out", str(trained), "--stage", "tokenizer", *TINY]) == 0
    assert "kept" in capsys.readouterr().out


def test_unet_continues_from_init_weights_with_a_trained_text_encoder(trained, ten_images, tmp_path):
    """--init-unet: a finished U-Net trained on with other settings (here the text encoder joins)."""
    import shutil

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    out = tmp_path / "continued"
    shutil.copytree(trained, out)
    shutil.copytree(trained / "unet", tmp_path / "init-unet")
    encoder_before = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(out), "--stage", "unet", "--steps", "2", "--no-resume",
                 "--init-unet", str(tmp_path / "init-unet"), "--train-text-encoder", *TINY]) == 0  # step 1 is warm-up (lr 0)
    unet = json.loads((out / "metrics.json").read_text())["stages"]["unet"]
    assert unet["initialised_from"] == str(tmp_path / "init-unet") and unet["text_encoder"] == "trained with the U-Net"
    encoder_after = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert any(not (encoder_before[k] == encoder_after[k]).all() for k in encoder_before)
    assert UNet2DConditionModel.from_pretrained(str(out / "unet")).config.block_out_channels == [16, 32]
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(out), "--stage", "unet", "--steps", "1", "--no-resume",
                 "--init-unet", str(tmp_path), *TINY]) == 2


def test_cpu_options_vae_crops_mask_injection_and_attention_levels(ten_images, tmp_path):
    """The CPU plan of the bundled model: VAE on random crops, some heads shown mask-injected, attention only where chosen."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "cpu-plan"
    tiny = [*TINY, "--unet-channels", "16,32,32", "--unet-attention", "0,1,0"]
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(out), "--steps", "2", "--vae-crop", "32",
                 "--vae-mask-injection", "1.0", *tiny]) == 0
    vae = json.loads((out / "metrics.json").read_text())["stages"]["vae"]
    assert vae["crop"] == 32 and vae["mask_injection"] == {"probability": 1.0, "channel_order": "mask,gray,gray"}
    assert "mask-injected (mask,gray,gray)" in (out / "model_card.md").read_text()
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    assert unet.config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert unet.config.up_block_types == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]


def test_mask_injected_vae_batches_carry_the_mask_channel(ten_images):
    import argparse

    from fetalstudio.training.sd import _mask_injected_pixels

    items = collect_items(ten_images)
    injected, row = _mask_injected_pixels(items, argparse.Namespace(vae_mask_injection=0.5, vae_channel_order="mask,gray,gray",
                                                                   resolution=64, crop="center"))
    heads = [k for k, item in enumerate(items) if item.mask is not None]
    assert len(injected) == len(heads) == 5 and (row >= 0).sum() == 5
    first = injected[row[heads[0]]].numpy().astype(int)
    assert np.array_equal(first[1], first[2]) and np.abs(first[0] - first[1]).mean() > 10  # mask channel differs from the grey ones
    assert ((first[0] < 10) | (first[0] > 245)).mean() > 0.9  # a filled mask (only its resized edge is grey)


def test_tokenizer_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    folder = train_clip_tokenizer(tmp_path / "tokenizer", ["a photo of fetal heart, four-chamber view"], max_vocab_size=2048)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) <= 2048 and tokenizer.model_max_length == 77
    captions = app_captions() + ["a photo of fetal heart, four-chamber view"]
    assert words_not_whole(tokenizer, captions + list(DOMAIN_PHRASES)) == {}
    for caption in captions:
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]  # no <unk> (= <|endoftext|>) inside the caption
        decoded = tokenizer.decode(ids, skip_special_tokens=True)  # CLIP decodes "</w>" as a space, also before "," and "-"
        assert decoded.replace(" ", "") == caption.lower().replace(" ", "")
    tokens = tokenizer.tokenize("a photo of fetal abdomen")
    assert tokens == ["a</w>", "photo</w>", "of</w>", "fetal</w>", "abdomen</w>"]
    # any text still tokenizes (byte fallback), never to <unk>
    assert tokenizer.unk_token_id not in tokenizer("Zebra ñ 🙂").input_ids[1:-1]


def test_trimester_proxy_agrees_with_every_labelled_hc18_image():
    labelled = [r for r in _rows(DATA / "hc18_heads" / "pairs.csv") if r["trimester"]]
    assert len(labelled) == 61
    assert all(trimester_from_hc(float(r["hc_mm"])) is parse_trimester(r["trimester"]) for r in labelled)


def test_captions_of_the_shared_training_data():
    items = collect_items([DATA / "spanish_planes", DATA / "hc18_heads" / "pairs.csv", DATA / "es_heads" / "pairs.csv"])
    captions = {}
    for item in items:
        captions[item.caption] = captions.get(item.caption, 0) + 1
    assert all(captions[f"a photo of fetal {p}"] == 20 for p in ("abdomen", "brain", "femur", "thorax", "other"))
    heads = {t: captions[f"An ultrasound image of a fetal head, {t} trimester"] for t in ("first", "second", "third")}
    # HC18 (one pixel-identical pair dropped) by trimester/HC + 19 es_heads (one is a spanish_planes brain file) as second
    assert heads == {"first": 126, "second": 561 - 1 + 19, "third": 118}
    assert not any("african" in str(i.image).lower() for i in items)


def test_errors_are_clear(tmp_path, ten_images, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "sd", "--data", str(empty), "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(tmp_path / "b"), "--stage", "unet", *TINY]) == 2
    assert "run --stage tokenizer and --stage vae first" in capsys.readouterr().err
    assert main(["train", "sd", "--data", str(DATA / "african" / "train" / "labels.csv"), "--out", str(tmp_path / "c"), *TINY]) == 2
    assert "must never train a generator" in capsys.readouterr().err
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(tmp_path / "d"), *TINY, "--vae-channels", "8,16"]) == 2
    assert "exactly 4 widths" in capsys.readouterr().err
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(tmp_path / "e"), *TINY, "--unet-attention", "1,1,0"]) == 2
    assert "one 0/1 flag per --unet-channels width" in capsys.readouterr().err
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(tmp_path / "f"), *TINY, "--unet-attention", "0,0"]) == 2
    assert "at least one block" in capsys.readouterr().err
    assert main(["train", "sd", *_data_args(ten_images), "--out", str(tmp_path / "g"), *TINY, "--vae-crop", "100"]) == 2
    assert "--vae-crop must be a multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sd", "lora"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--resume" not in text and ("--stage" in text if command == "sd" else "--mask-channel" in text)


def test_the_test_models_live_with_the_tests_and_share_the_byte_vocabulary(tmp_path):
    """Issue 12: the tiny builders left the library; their byte-level tokenizer and the trained one start alike."""
    import importlib.util

    from tests.tiny_models import write_byte_level_clip_tokenizer

    assert importlib.util.find_spec("fetalstudio.models.tiny") is None
    write_byte_level_clip_tokenizer(tmp_path / "bytes")
    trained = train_clip_tokenizer(tmp_path / "trained", ["fetal head"], max_vocab_size=600)
    by_id = lambda folder: sorted(json.loads((folder / "vocab.json").read_text(encoding="utf-8")).items(), key=lambda kv: kv[1])  # noqa: E731
    byte_vocab, trained_vocab = by_id(tmp_path / "bytes"), by_id(trained)
    assert len(byte_vocab) == 514 and byte_vocab[:512] == trained_vocab[:512]
    assert byte_vocab[ord("a") - ord("!")] == ("a", ord("a") - ord("!")) and byte_vocab[256 + ord("a") - ord("!")][0] == "a</w>"
