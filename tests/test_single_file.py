"""Single-file SD 1.x checkpoint loading (fetalstudio.models.single_file), fully offline, CPU only.

A tiny SD-architecture pipeline is built here, exported to the original LDM single-file key layout
(tests/ldm_convert.py) and loaded back with ``load_single_file_sd_pipeline``. The shipped SD 1.5
config folder is checked against the real SD 1.5 architecture without any weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fetalstudio.errors import ModelLoadError, ModelNotFoundError
from fetalstudio.models.single_file import (
    SD15_CONFIG_DIR,
    is_single_file_sd_checkpoint,
    load_single_file_sd_pipeline,
)

try:
    from tests.ldm_convert import pipeline_to_ldm
except ImportError:  # tests/ is not a package and only tests/ is on sys.path
    from ldm_convert import pipeline_to_ldm

PROMPT = "a photo of fetal abdomen"


# --------------------------------------------------------------------------------------------------
# Fixtures


class _NetworkUsed(OSError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Opening a connection or resolving a host name fails, and fails the test even if the caller swallows it."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args))
        raise _NetworkUsed(f"network access attempted: {attempts[-1]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


def test_no_network_fixture_blocks_connections(no_network):
    with pytest.raises(_NetworkUsed):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(_NetworkUsed):
        socket.socket().connect(("127.0.0.1", 9))
    no_network.clear()  # these two were on purpose


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD 1.x-architecture pipeline, its config-only diffusers folder and its LDM state dict."""
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    from tests.tiny_models import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer", local_files_only=True),
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler", local_files_only=True),
    )

    root = tmp_path_factory.mktemp("tiny_sd")
    config_dir = root / "config"
    pipe.save_pretrained(config_dir)
    for weights in [*config_dir.rglob("*.safetensors"), *config_dir.rglob("*.bin")]:
        weights.unlink()  # configs only: every weight must come from the single file

    ldm = pipeline_to_ldm(pipe)
    path = root / "tiny.safetensors"
    save_file(ldm, str(path))
    return {"pipe": pipe, "config_dir": config_dir, "ldm": ldm, "path": path, "root": root}


def _assert_same_weights(original, loaded):
    for name in ("unet", "vae", "text_encoder"):
        a = getattr(original, name).state_dict()
        b = getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), f"{name}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after the round trip"


def _generate(pipe):
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images


def _save(tmp_path: Path, name: str, state_dict: dict) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Round trip


def test_ldm_export_has_the_original_layout(tiny):
    keys = tiny["ldm"].keys()
    assert is_single_file_sd_checkpoint(keys)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert not is_single_file_sd_checkpoint(["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"])
    assert not is_single_file_sd_checkpoint([])


def test_safetensors_round_trip_offline(tiny, no_network):
    loaded = load_single_file_sd_pipeline(tiny["path"], config_dir=tiny["config_dir"])

    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.safety_checker is None
    assert loaded.unet.dtype == torch.float32
    _assert_same_weights(tiny["pipe"], loaded)
    assert loaded.tokenizer(PROMPT).input_ids == tiny["pipe"].tokenizer(PROMPT).input_ids
    assert loaded.scheduler.config == tiny["pipe"].scheduler.config

    expected = _generate(tiny["pipe"])
    got = _generate(loaded)
    assert expected.shape == (1, 64, 64, 3)
    assert (got == expected).all(), "same weights and seed must give identical pixels"


def test_ckpt_round_trip_offline(tiny, no_network, tmp_path):
    ldm = dict(tiny["ldm"])
    # Some merged SD 1.x files carry float, off-by-a-fraction position_ids; the model must keep arange(77).
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).float()[None] + 0.4
    path = tmp_path / "tiny.ckpt"
    # The Lightning layout: weights nested under "state_dict", plus plain training metadata.
    torch.save({"state_dict": ldm, "global_step": 470000, "epoch": 3}, path)

    loaded = load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])
    _assert_same_weights(tiny["pipe"], loaded)
    assert torch.equal(loaded.text_encoder.embeddings.position_ids, torch.arange(77)[None])


def test_fp16_file_and_dtype_request(tiny, tmp_path):
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny["ldm"].items()}
    path = _save(tmp_path, "tiny-fp16.safetensors", half)

    as_fp32 = load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])
    assert {as_fp32.unet.dtype, as_fp32.vae.dtype, as_fp32.text_encoder.dtype} == {torch.float32}

    as_fp16 = load_single_file_sd_pipeline(tiny["path"], config_dir=tiny["config_dir"], torch_dtype=torch.float16)
    assert {as_fp16.unet.dtype, as_fp16.vae.dtype, as_fp16.text_encoder.dtype} == {torch.float16}
    w = "conv_in.weight"
    assert torch.equal(as_fp16.unet.state_dict()[w], tiny["pipe"].unet.state_dict()[w].half())


def test_text_encoder_without_text_model_level_loads(tiny, tmp_path, no_network):
    """Very old SD 1.x files store 'cond_stage_model.transformer.embeddings...' (no 'text_model.')."""
    prefix = "cond_stage_model.transformer.text_model."
    old = {
        ("cond_stage_model.transformer." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in tiny["ldm"].items()
    }
    path = _save(tmp_path, "old-clip-layout.safetensors", old)

    loaded = load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])
    _assert_same_weights(tiny["pipe"], loaded)


# --------------------------------------------------------------------------------------------------
# Error paths


def test_missing_file_is_model_not_found(tmp_path, tiny):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_single_file_sd_pipeline(tmp_path / "nope.safetensors", config_dir=tiny["config_dir"])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_random_bytes_are_a_model_load_error(tmp_path, tiny, suffix, no_network):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as info:
        load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])
    assert path.name in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_is_a_model_load_error(tmp_path, tiny, suffix):
    full = tmp_path / f"full{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": tiny["ldm"]}, full)
    else:
        shutil.copy(tiny["path"], full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_single_file_sd_pipeline(cut, config_dir=tiny["config_dir"])


def test_unrelated_safetensors_is_not_an_sd_checkpoint(tmp_path, tiny):
    path = _save(tmp_path, "classifier.safetensors", {"backbone.fc.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)})
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])


def test_diffusers_component_file_is_explained(tmp_path, tiny):
    path = _save(tmp_path, "diffusion_pytorch_model.safetensors", tiny["pipe"].unet.state_dict())
    with pytest.raises(ModelLoadError, match="diffusers-format"):
        load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])


def test_pickle_with_code_is_refused(tmp_path, tiny):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny["ldm"], "callback": _PickledObject()}, path)
    with pytest.raises(ModelLoadError, match="safe weights-only mode") as info:
        load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])
    assert "_PickledObject" in str(info.value)


class _PickledObject:
    """Stands in for Lightning callbacks etc.: any non-tensor object needs code to unpickle."""


def test_git_lfs_pointer_is_explained(tmp_path, tiny):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 2132625894\n")
    with pytest.raises(ModelLoadError, match="git lfs pull"):
        load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])


def test_safetensors_with_another_extension_is_explained(tmp_path, tiny):
    path = tmp_path / "model.weights"
    shutil.copy(tiny["path"], path)
    with pytest.raises(ModelLoadError, match="Rename it to end in .safetensors"):
        load_single_file_sd_pipeline(path, config_dir=tiny["config_dir"])


def test_sdxl_checkpoint_is_not_supported(tmp_path, tiny):
    sdxl = dict(tiny["ldm"])
    sdxl["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 4)
    with pytest.raises(ModelLoadError, match=r"XL.*not supported yet.*Stable Diffusion 1\.x"):
        load_single_file_sd_pipeline(_save(tmp_path, "sdxl.safetensors", sdxl), config_dir=tiny["config_dir"])


def test_sd2_checkpoint_is_not_supported(tmp_path, tiny):
    sd2 = {
        k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v for k, v in tiny["ldm"].items()
    }
    with pytest.raises(ModelLoadError, match=r"2\.x.*not supported yet.*Stable Diffusion 1\.x"):
        load_single_file_sd_pipeline(_save(tmp_path, "sd2.safetensors", sd2), config_dir=tiny["config_dir"])


def test_sd2_cross_attention_width_is_detected(tmp_path, tiny):
    """SD 2.x UNet weights with an SD 1.x-style text encoder (e.g. a bad merge) are caught by shape."""
    wide = dict(tiny["ldm"])
    for key in [k for k in wide if k.endswith("attn2.to_k.weight")]:
        wide[key] = torch.zeros(wide[key].shape[0], 1024)
    with pytest.raises(ModelLoadError, match=r"2\.x.*1024"):
        load_single_file_sd_pipeline(_save(tmp_path, "wide.safetensors", wide), config_dir=tiny["config_dir"])


def test_inpainting_checkpoint_is_not_supported(tmp_path, tiny):
    inpaint = dict(tiny["ldm"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint[key] = torch.zeros(inpaint[key].shape[0], 9, 3, 3)
    with pytest.raises(ModelLoadError, match="inpainting"):
        load_single_file_sd_pipeline(_save(tmp_path, "inpaint.safetensors", inpaint), config_dir=tiny["config_dir"])


def test_unet_only_checkpoint_is_explained(tmp_path, tiny):
    unet_only = {k: v for k, v in tiny["ldm"].items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(ModelLoadError, match="partial checkpoint"):
        load_single_file_sd_pipeline(_save(tmp_path, "unet-only.safetensors", unet_only), config_dir=tiny["config_dir"])


@pytest.mark.parametrize(
    "missing_key",
    [
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.conv_out.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ],
)
def test_missing_tensor_is_a_model_load_error(tmp_path, tiny, missing_key):
    partial = {k: v for k, v in tiny["ldm"].items() if k != missing_key}
    with pytest.raises(ModelLoadError, match="missing"):
        load_single_file_sd_pipeline(_save(tmp_path, "partial.safetensors", partial), config_dir=tiny["config_dir"])


def test_architecture_mismatch_with_config_is_a_model_load_error(tiny, no_network):
    """The tiny file against the real SD 1.5 configs: caught by the cross-attention width check."""
    with pytest.raises(ModelLoadError, match="cross-attention width is 32"):
        load_single_file_sd_pipeline(tiny["path"])


def test_missing_config_dir_never_falls_back_to_the_hub(tiny, tmp_path, no_network):
    with pytest.raises(ModelLoadError, match="config folder"):
        load_single_file_sd_pipeline(tiny["path"], config_dir=tmp_path / "no-such-config")


# --------------------------------------------------------------------------------------------------
# The shipped SD 1.5 config folder


def test_sd15_config_dir_layout():
    assert SD15_CONFIG_DIR.is_dir()
    index = json.loads((SD15_CONFIG_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert not list(SD15_CONFIG_DIR.rglob("*.safetensors")) and not list(SD15_CONFIG_DIR.rglob("*.bin"))


def test_sd15_configs_describe_the_sd15_architecture(no_network):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    unet_config = UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet", local_files_only=True)
    assert unet_config["cross_attention_dim"] == 768
    assert unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet_config["sample_size"] == 64
    assert unet_config["attention_head_dim"] == 8
    assert unet_config["layers_per_block"] == 2
    assert (unet_config["in_channels"], unet_config["out_channels"]) == (4, 4)

    vae_config = AutoencoderKL.load_config(SD15_CONFIG_DIR, subfolder="vae", local_files_only=True)
    assert vae_config["block_out_channels"] == [128, 256, 512, 512]
    assert vae_config["latent_channels"] == 4
    assert vae_config["sample_size"] == 512
    assert vae_config["scaling_factor"] == 0.18215

    text_config = CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR, subfolder="text_encoder", local_files_only=True)
    assert (text_config.hidden_size, text_config.num_hidden_layers, text_config.num_attention_heads) == (768, 12, 12)
    assert (text_config.intermediate_size, text_config.vocab_size) == (3072, 49408)
    assert text_config.max_position_embeddings == 77
    assert text_config.hidden_act == "quick_gelu"

    # Parameter counts of the real SD 1.5 models, built on the meta device (no memory, no weights).
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(text_config)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480

    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler", local_files_only=True)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.skip_prk_steps is True
    assert scheduler.config.steps_offset == 1
    assert scheduler.config.set_alpha_to_one is False

    processor = CLIPImageProcessor.from_pretrained(SD15_CONFIG_DIR, subfolder="feature_extractor", local_files_only=True)
    assert processor.crop_size["height"] == processor.crop_size["width"] == 224


def test_sd15_tokenizer_is_openai_clip(no_network):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer", local_files_only=True)
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)

    ids = tokenizer(PROMPT).input_ids
    assert ids[:4] == [49406, 320, 1125, 539]  # <|startoftext|> a photo of
    assert ids[-1] == 49407
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == PROMPT
    # Other well-known CLIP ids, and lower-casing.
    assert tokenizer("A cat, dog").input_ids == [49406, 320, 2368, 267, 1929, 49407]

    padded = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[len(ids) :] == [49407] * (77 - len(ids))


def test_tokenizer_build_script_is_reproducible(tmp_path):
    """Rebuilding from OpenAI's BPE list gives the committed files (from $CLIP_BPE_GZ if set)."""
    import gzip

    gz = os.environ.get("CLIP_BPE_GZ", "")  # path to OpenAI's bpe_simple_vocab_16e6.txt.gz, if at hand
    if not gz or not Path(gz).is_file():
        # Recreate the .gz from the committed merges.txt: the script must invert its own output exactly.
        merges = (SD15_CONFIG_DIR / "tokenizer" / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        gz = tmp_path / "bpe.txt.gz"
        with gzip.open(gz, "wt", encoding="utf-8") as f:
            f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges))

    import importlib.util

    script = SD15_CONFIG_DIR.parent / "build_clip_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_clip_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tokenizer(Path(gz), tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (SD15_CONFIG_DIR / "tokenizer" / name).read_bytes(), name
