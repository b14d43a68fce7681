"""`train lora` on the tiny SD pipeline: diffusers and kohya outputs, mask channel, resume, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fetalstudio.cli import main
from fetalstudio.models.entries import ModelFormat, ModelKind
from fetalstudio.models.inspect import inspect_path
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.settings import GenerationSettings, LoraSpec
from fetalstudio.training.kohya import convert_diffusers_file, peft_to_kohya

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [
    pytest.mark.skipif(not (DATA / "hc18_heads" / "pairs.csv").is_file(), reason="shared data not available"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute"),  # two LoRAs on one pipeline, on purpose
]

FAST = ["--resolution", "64", "--rank", "4", "--alpha", "8", "--batch-size", "2", "--log-every", "1", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def plane_folder(tmp_path_factory) -> Path:
    """Four Spanish brain-plane images in a folder, no captions of their own."""
    folder = tmp_path_factory.mktemp("brain")
    for image in sorted((DATA / "spanish_planes" / "brain").glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
    return folder


@pytest.fixture(scope="module")
def head_pairs(tmp_path_factory) -> Path:
    """A pairs CSV of three HC18 heads with known trimester (absolute paths)."""
    with (DATA / "hc18_heads" / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["trimester"]][:3]
    path = tmp_path_factory.mktemp("heads") / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "trimester", "hc_mm"])
        for r in rows:
            writer.writerow([DATA / "hc18_heads" / r["image"], DATA / "hc18_heads" / r["mask"], r["trimester"], r["hc_mm"]])
    return path


@pytest.fixture(scope="module")
def trained(tiny_sd_dir, plane_folder, tmp_path_factory) -> Path:
    """A LoRA on U-Net and text encoder; a large lr so that 3 steps visibly change the output."""
    out = tmp_path_factory.mktemp("loras") / "brain-lora"
    code = main(["train", "lora", "--base", str(tiny_sd_dir), "--data", str(plane_folder), "--caption", "a photo of fetal brain",
                 "--out", str(out), "--steps", "3", "--lr", "1e-2", "--text-encoder-lr", "1e-2", "--train-text-encoder", *FAST])
    assert code == 0
    return out


def _engine(tmp_path: Path) -> TextToImageRunner:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    return TextToImageRunner(ModelManager(checkpoints))


def _pixels(engine, base: Path, loras=()) -> np.ndarray:
    settings = GenerationSettings(model=str(base), prompt="a photo of fetal brain", steps=3, width=64, height=64, seed=3, loras=loras)
    return np.asarray(engine.generate(settings).images[0].image).astype(int)


def test_writes_diffusers_and_kohya_files_that_fetalstudio_recognises(trained):
    kohya = trained / "brain-lora.safetensors"
    assert (trained / "pytorch_lora_weights.safetensors").is_file() and kohya.is_file()
    folder = inspect_path(trained)
    assert folder.kind is ModelKind.LORA and folder.format is ModelFormat.PEFT_LORA
    single = inspect_path(kohya)
    assert single.kind is ModelKind.LORA and single.format is ModelFormat.KOHYA_LORA
    assert single.details["rank"] == "4" and single.details["text_encoder"] == "yes"
    with safe_open(str(kohya), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)  # SD tools' CLIP names
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}  # kohya names hold no dots
    assert float(load_file(str(kohya))[next(k for k in keys if k.endswith(".alpha"))]) == 8.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    log = (trained / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,lr,elapsed_s") and len(log) == 4
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["data"]["captions"] == {"a photo of fetal brain": 4}


def test_kohya_and_diffusers_files_give_the_same_image_and_weight_zero_gives_the_base(trained, tiny_sd_dir, tmp_path):
    engine = _engine(tmp_path)
    base = _pixels(engine, tiny_sd_dir)
    diffusers_format = _pixels(engine, tiny_sd_dir, (LoraSpec(str(trained), 1.0),))
    kohya_format = _pixels(engine, tiny_sd_dir, (LoraSpec(str(trained / "brain-lora.safetensors"), 1.0),))
    at_zero = _pixels(engine, tiny_sd_dir, (LoraSpec(str(trained / "brain-lora.safetensors"), 0.0),))
    assert np.abs(diffusers_format - base).mean() > 1.0  # the LoRA does something
    assert np.array_equal(diffusers_format, kohya_format)
    assert np.array_equal(at_zero, base)


def test_converting_the_diffusers_file_reproduces_the_kohya_file(trained, tmp_path):
    converted = load_file(str(convert_diffusers_file(trained, tmp_path / "converted.safetensors")))
    written = load_file(str(trained / "brain-lora.safetensors"))
    assert converted.keys() == written.keys()
    assert all(torch.equal(converted[k], written[k]) for k in written)


def test_peft_keys_map_to_kohya_names():
    down, up = torch.zeros(2, 8), torch.zeros(8, 2)
    state = peft_to_kohya({"mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight": down,
                           "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight": up},
                          {"encoder.layers.3.self_attn.v_proj.lora_A.weight": down, "encoder.layers.3.self_attn.v_proj.lora_B.weight": up},
                          alpha=1.0)
    assert set(state) == {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha",
        "lora_te_text_model_encoder_layers_3_self_attn_v_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_3_self_attn_v_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_3_self_attn_v_proj.alpha",
    }


def test_mask_channel_training_records_the_channel_order(tiny_sd_dir, head_pairs, tmp_path):
    out = tmp_path / "head-mask"
    code = main(["train", "lora", "--base", str(tiny_sd_dir), "--data", str(head_pairs), "--mask-channel",
                 "--channel-order", "gray,mask,gray", "--out", str(out), "--steps", "2", "--name", "head_first", *FAST])
    assert code == 0
    with safe_open(str(out / "head_first.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["fetalstudio.mask_channel"] == "1" and metadata["fetalstudio.channel_order"] == "gray,mask,gray"
    info = json.loads((out / "fetalstudio_lora.json").read_text())
    assert info["mask_channel"] == 1 and info["crop"] == "pad"
    assert set(info["captions"]) <= {f"An ultrasound image of a fetal head, {t} trimester" for t in ("first", "second", "third")}
    assert "gray,mask,gray" in (out / "model_card.md").read_text()


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny_sd_dir, plane_folder, tmp_path):
    common = ["train", "lora", "--base", str(tiny_sd_dir), "--data", str(plane_folder), "--caption", "a photo of fetal brain",
              "--lr", "1e-2", "--save-every", "2", *FAST]
    assert main([*common, "--out", str(tmp_path / "straight"), "--steps", "4"]) == 0
    assert main([*common, "--out", str(tmp_path / "resumed"), "--steps", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "resumed"), "--steps", "4"]) == 0
    steps = [line.split(",")[0] for line in (tmp_path / "resumed" / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]  # continued at step 3, not from the start
    straight = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)


def test_a_base_that_is_not_an_sd_pipeline_is_refused(tiny_kohya_lora, plane_folder, tmp_path, capsys):
    code = main(["train", "lora", "--base", str(tiny_kohya_lora), "--data", str(plane_folder), "--caption", "x",
                 "--out", str(tmp_path / "o"), *FAST])
    assert code == 2 and "not a Stable Diffusion pipeline" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    assert main(["train", "lora", "--base", str(tmp_path / "junk"), "--data", str(plane_folder), "--caption", "x",
                 "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "not a model FetalStudio recognises" in capsys.readouterr().err


def test_data_errors_are_clear(tiny_sd_dir, plane_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["train", "lora", "--base", str(tiny_sd_dir), "--out", str(tmp_path / "o"), *FAST]
    assert main([*base, "--data", str(empty)]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main([*base, "--data", str(plane_folder)]) == 2  # no .txt captions and no --caption
    assert "have no caption" in capsys.readouterr().err
    assert main([*base, "--data", str(plane_folder), "--caption", "x", "--mask-channel"]) == 2
    assert "--mask-channel needs an image/mask pair" in capsys.readouterr().err
    assert main([*base, "--data", str(DATA / "african" / "train")]) == 2
    assert "must never train a generator" in capsys.readouterr().err


def test_resuming_with_other_settings_is_a_clear_error(trained, tiny_sd_dir, plane_folder, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    code = main(["train", "lora", "--base", str(tiny_sd_dir), "--data", str(plane_folder), "--caption", "a photo of fetal brain",
                 "--out", str(out), "--steps", "4", "--train-text-encoder", *FAST[:2], "--rank", "8", *FAST[6:]])
    assert code == 2 and "--no-resume" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "first_trimester_structures" / "boxes.csv").is_file(), reason="shared data not available")
def test_a_structures_folder_trains_on_its_training_split_with_the_anatomy_caption():
    """first_trimester_structures (images.csv + boxes.csv + more/): the held-out validation images never reach a
    generator, and each caption lists the plane and that image's annotated structures (the engine's prompt)."""
    from fetalstudio.data.structures import read_structures, split_structures
    from fetalstudio.training.image_datasets import collect_items, layout_plane_of
    from fetalstudio.errors import FetalStudioError

    folder = DATA / "first_trimester_structures"
    items = collect_items([folder])
    everything = read_structures(folder)
    train = {item.path for item in split_structures(everything, "train")}
    held_out = {item.path for item in split_structures(everything, "val")}
    assert held_out and not {item.image for item in items} & held_out
    assert {item.image for item in items} <= train and len(items) > 0.8 * len(train)  # duplicates aside
    assert {item.label for item in items} == {"layout/facial_sagittal"}
    first = next(item for item in items if item.image.name == "0.png" and item.image.parent.name == "images")
    assert first.caption.startswith("An ultrasound image of a fetal facial sagittal plane, first trimester, with thalami, midbrain")
    assert "nasal bone" in first.caption and first.caption_from == "layout"
    with pytest.raises(FetalStudioError, match="do not all belong to one layout plane"):
        layout_plane_of({"nasal_bone", "skull"}, folder / "boxes.csv")
