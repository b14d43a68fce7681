"""The model catalog: manifest parsing and discovery of checkpoints dropped into folders."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fetalstudio.errors import FetalStudioError, ModelLoadError
from fetalstudio.models.catalog import ManifestError, build_catalog, discover, parse_manifest
from fetalstudio.models.entries import ModelFormat, ModelKind
from fetalstudio.models.manager import ModelManager

CATALOG_LOGGER = "fetalstudio.models.catalog"


def write_manifest(folder: Path, text: str) -> Path:
    path = folder / "manifest.toml"
    path.write_text(text, encoding="utf-8")
    return path


def write_peft_lora(path: Path, rank: int = 8, text_encoder: bool = False) -> Path:
    """A LoRA in the diffusers/peft layout (lora_A / lora_B, unet. prefix)."""
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {}
    for proj in ("to_q", "to_k", "to_v"):
        tensors[f"{base}.{proj}.lora_A.weight"] = torch.randn(rank, 32)
        tensors[f"{base}.{proj}.lora_B.weight"] = torch.randn(32, rank)
    if text_encoder:
        te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        tensors[f"{te}.lora_A.weight"] = torch.randn(rank, 32)
        tensors[f"{te}.lora_B.weight"] = torch.randn(32, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_sam_pth(path: Path, embed_dim: int) -> Path:
    """Only the tensors that tell SAM and its variant apart, with SAM's real names and shapes."""
    state = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(embed_dim, 3, 16, 16),
        "image_encoder.patch_embed.proj.bias": torch.zeros(embed_dim),
        "mask_decoder.iou_token.weight": torch.zeros(1, 256),
        "prompt_encoder.no_mask_embed.weight": torch.zeros(1, 256),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_controlnet_folder(tiny_sd_dir: Path, folder: Path) -> Path:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_dir / "unet"))
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory) -> Path:
    """A timm resnet18 with 5 classes, as a plain .pth and as a .safetensors with our metadata."""
    import timm

    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False, num_classes=5).state_dict()
    torch.save(state, folder / "cls_pth.pth")
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(folder / "cls_st.safetensors"),
        metadata={"fetalstudio.kind": "classifier", "fetalstudio.architecture": "resnet18"},
    )
    return folder


# --- manifest ------------------------------------------------------------------------------------


def test_manifest_entries_paths_hub_licence_and_details(tmp_checkpoints, tmp_path):
    absolute = tmp_path / "elsewhere" / "sam_vit_b.pth"
    write_manifest(
        tmp_checkpoints,
        f"""
[[model]]
id = "sd15"
kind = "sd_pipeline"
path = "sd15"
licence = "CreativeML OpenRAIL-M"
notes = "base model"

[[model]]
id = "sam"
kind = "sam"
path = '{absolute}'
variant = "vit_b"

[[model]]
id = "fu-lora"
kind = "lora"
hub_repo = "org/fu-lora"
hub_file = "fu_lora.safetensors"
license = "MIT"

[[model]]
id = "plane-classifier"
kind = "classifier"
path = "classifiers/planes.safetensors"
architecture = "resnet18"
num_classes = 6
""",
    )
    entries = {e.id: e for e in parse_manifest(tmp_checkpoints / "manifest.toml")}
    assert list(entries) == ["sd15", "sam", "fu-lora", "plane-classifier"]

    sd = entries["sd15"]
    assert sd.kind is ModelKind.SD_PIPELINE and sd.format is ModelFormat.DIFFUSERS_FOLDER
    assert sd.path == tmp_checkpoints / "sd15"  # relative to the manifest's folder
    assert sd.licence == "CreativeML OpenRAIL-M" and sd.notes == "base model"
    assert sd.origin == "manifest" and sd.hub is None

    sam = entries["sam"]
    assert sam.path == absolute and sam.kind is ModelKind.SAM and sam.format is ModelFormat.SAM_PTH
    assert sam.details == {"variant": "vit_b"}

    lora = entries["fu-lora"]
    assert lora.path is None and lora.format is ModelFormat.HUB
    assert lora.hub.repo_id == "org/fu-lora" and lora.hub.filename == "fu_lora.safetensors"
    assert lora.hub.url == "https://huggingface.co/org/fu-lora/blob/main/fu_lora.safetensors"
    assert lora.licence == "MIT"  # American spelling accepted
    assert lora.source_label == "hub:org/fu-lora/fu_lora.safetensors"
    assert not lora.is_local

    cls = entries["plane-classifier"]
    assert cls.path == tmp_checkpoints / "classifiers" / "planes.safetensors"
    assert cls.format is ModelFormat.TIMM_CHECKPOINT
    assert cls.details == {"architecture": "resnet18", "num_classes": "6"}


def test_manifest_hub_revision_and_whole_repository(tmp_checkpoints):
    write_manifest(
        tmp_checkpoints,
        """
[[model]]
id = "sd"
kind = "sd_pipeline"
hub_repo = "org/sd"
hub_revision = "v2"

[[model]]
id = "lora"
kind = "lora"
hub_repo = "org/lora"
hub_file = "w.safetensors"
hub_revision = "abc123"
""",
    )
    sd, lora = parse_manifest(tmp_checkpoints / "manifest.toml")
    assert sd.format is ModelFormat.HUB and sd.hub.filename is None and sd.hub.revision == "v2"
    assert sd.hub.url == "https://huggingface.co/org/sd"
    assert lora.hub.url == "https://huggingface.co/org/lora/blob/abc123/w.safetensors"


def test_manifest_format_comes_from_the_file_when_present(tmp_checkpoints, tiny_kohya_lora):
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "style.safetensors")
    write_peft_lora(tmp_checkpoints / "peft.safetensors")
    write_manifest(
        tmp_checkpoints,
        """
[[model]]
id = "style"
kind = "lora"
path = "style.safetensors"

[[model]]
id = "peft"
kind = "lora"
path = "peft.safetensors"

[[model]]
id = "declared"
kind = "lora"
path = "peft.safetensors"
format = "kohya_lora"
""",
    )
    entries = {e.id: e for e in parse_manifest(tmp_checkpoints / "manifest.toml")}
    assert entries["style"].format is ModelFormat.KOHYA_LORA
    assert entries["peft"].format is ModelFormat.PEFT_LORA
    assert entries["declared"].format is ModelFormat.KOHYA_LORA  # an explicit format wins


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[model]]\nid = "a"\nkind = "lora\npath = "x"\n', "not valid TOML"),
        ('[[model]]\nkind = "lora"\npath = "x.safetensors"\n', "needs an id"),
        ('[[model]]\nid = "a"\nkind = "upscaler"\npath = "x"\n', "kind must be one of"),
        ('[[model]]\nid = "a"\npath = "x"\n', "kind must be one of"),
        ('[[model]]\nid = "a"\nkind = "lora"\nlicence = "MIT"\n', "give a path (file or folder) or a hub_repo"),
        (
            '[[model]]\nid = "a"\nkind = "lora"\npath = "x"\n[[model]]\nid = "a"\nkind = "sam"\npath = "y"\n',
            "'a' appears twice",
        ),
        ('[[model]]\nid = "a"\nkind = "lora"\npath = "x"\nformat = "onnx"\n', "unknown format 'onnx'"),
        ('[model]\nid = "a"\nkind = "lora"\npath = "x"\n', "[[model]] table"),
    ],
    ids=["invalid-toml", "missing-id", "unknown-kind", "missing-kind", "no-source", "duplicate-id", "unknown-format", "not-array"],
)
def test_manifest_errors_name_the_problem_and_the_file(tmp_checkpoints, text, expected):
    manifest = write_manifest(tmp_checkpoints, text)
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest)
    message = str(caught.value)
    assert expected in message
    assert str(manifest) in message
    assert isinstance(caught.value, FetalStudioError)  # shown as-is in the UI


def test_unknown_kind_message_lists_the_choices(tmp_checkpoints):
    manifest = write_manifest(tmp_checkpoints, '[[model]]\nid = "a"\nkind = "upscaler"\npath = "x"\n')
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest)
    for kind in ModelKind:
        assert kind.value in str(caught.value)


def test_invalid_manifest_stops_the_manager_with_the_manifest_error(tmp_checkpoints, cpu_placement):
    write_manifest(tmp_checkpoints, '[[model]]\nid = "a"\nkind = "lora"\n')
    with pytest.raises(ManifestError, match="hub_repo"):
        ModelManager(tmp_checkpoints, placement=cpu_placement)


def test_manifest_entry_wins_over_discovered_file(tmp_checkpoints, tiny_kohya_lora):
    (tmp_checkpoints / "loras").mkdir()
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "loras" / "fu.safetensors")
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "other.safetensors")
    write_manifest(
        tmp_checkpoints,
        """
[[model]]
id = "fu"
kind = "lora"
path = "loras/fu.safetensors"
licence = "CC-BY-4.0"

[[model]]
id = "other"
kind = "lora"
hub_repo = "org/other"
hub_file = "other.safetensors"
""",
    )
    catalog = build_catalog(tmp_checkpoints)
    # Same path: only the manifest entry (with its licence), not a second "loras/fu".
    assert catalog["fu"].origin == "manifest" and catalog["fu"].licence == "CC-BY-4.0"
    assert "loras/fu" not in catalog
    assert [e for e in catalog.values() if e.path == tmp_checkpoints / "loras" / "fu.safetensors"] == [catalog["fu"]]
    # Same id, different file: the manifest keeps the id, the file stays reachable under its path.
    assert catalog["other"].origin == "manifest" and catalog["other"].format is ModelFormat.HUB
    discovered = catalog[str(tmp_checkpoints / "other.safetensors")]
    assert discovered.origin == "discovered" and discovered.kind is ModelKind.LORA


# --- discovery -----------------------------------------------------------------------------------


def test_discovers_diffusers_folder(tmp_checkpoints, tiny_sd_dir):
    catalog = build_catalog(tmp_checkpoints, extra_folders=(tiny_sd_dir.parent,))
    entry = catalog["tinysd"]
    assert entry.kind is ModelKind.SD_PIPELINE and entry.format is ModelFormat.DIFFUSERS_FOLDER
    assert entry.path == tiny_sd_dir and entry.origin == "discovered"
    assert entry.details["pipeline_class"] == "StableDiffusionPipeline"
    # The pipeline's own component folders are not listed as separate models.
    assert [e.id for e in catalog.values()] == ["tinysd"]


def test_discovers_kohya_lora_with_rank(tmp_checkpoints, tiny_kohya_lora):
    (tmp_checkpoints / "loras").mkdir()
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "loras" / "fu-lora.v1.safetensors")
    catalog = build_catalog(tmp_checkpoints)
    entry = catalog["loras/fu-lora.v1"]  # sub-folder kept in the id, weight suffix dropped
    assert entry.kind is ModelKind.LORA and entry.format is ModelFormat.KOHYA_LORA
    assert entry.details["rank"] == "4"
    assert entry.details["text_encoder"] == "no"
    assert int(entry.details["modules"]) > 0


def test_discovers_peft_lora_file_and_folder(tmp_checkpoints):
    write_peft_lora(tmp_checkpoints / "peft_style.safetensors", rank=8, text_encoder=True)
    write_peft_lora(tmp_checkpoints / "trained" / "pytorch_lora_weights.safetensors", rank=2)
    catalog = build_catalog(tmp_checkpoints)
    single = catalog["peft_style"]
    assert single.kind is ModelKind.LORA and single.format is ModelFormat.PEFT_LORA
    assert single.details["rank"] == "8"
    assert single.details["modules"] == "4"
    assert single.details["text_encoder"] == "yes"
    folder = catalog["trained"]
    assert folder.kind is ModelKind.LORA and folder.format is ModelFormat.PEFT_LORA
    assert folder.path == tmp_checkpoints / "trained"
    assert folder.details["weights_file"] == "pytorch_lora_weights.safetensors"
    assert "trained/pytorch_lora_weights" not in catalog


def test_discovers_controlnet_folder(tmp_checkpoints, tiny_sd_dir):
    write_controlnet_folder(tiny_sd_dir, tmp_checkpoints / "controlnet-seg")
    entry = build_catalog(tmp_checkpoints)["controlnet-seg"]
    assert entry.kind is ModelKind.CONTROLNET and entry.format is ModelFormat.CONTROLNET_FOLDER


def test_loads_discovered_controlnet_through_manager(tmp_checkpoints, tiny_sd_dir, cpu_placement):
    from diffusers import ControlNetModel

    write_controlnet_folder(tiny_sd_dir, tmp_checkpoints / "cn")
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    model = manager.get("cn")
    assert isinstance(model, ControlNetModel)
    assert model.dtype == torch.float32


def test_a_controlnet_knows_its_condition_from_the_manifest_its_folder_or_layout(tmp_checkpoints, tiny_sd_dir):
    import json

    from fetalstudio.models.entries import CONDITION_FILE

    for name in ("edge-listed", "edge-file", "both", "plain"):
        write_controlnet_folder(tiny_sd_dir, tmp_checkpoints / name)
    (tmp_checkpoints / "edge-file" / CONDITION_FILE).write_text(json.dumps({"condition": "hed"}))
    (tmp_checkpoints / "both" / CONDITION_FILE).write_text(json.dumps({"condition": "lineart"}))
    write_manifest(tmp_checkpoints, """
[[model]]
id = "edge-listed"
kind = "controlnet"
path = "edge-listed"
condition = "canny"

[[model]]
id = "both"
kind = "controlnet"
path = "both"
condition = "pidinet"
""")
    catalog = build_catalog(tmp_checkpoints)
    assert catalog["edge-listed"].condition == "canny"  # the manifest key
    assert catalog["edge-file"].condition == "hed"  # discovered: fetalstudio_condition.json beside the weights
    assert catalog["both"].condition == "pidinet"  # the manifest wins over the file
    assert catalog["plain"].condition == "layout"  # a ControlNet from before edge conditions
    assert catalog["edge-listed"].details["condition"] == "canny"
    (tmp_checkpoints / "edge-file" / CONDITION_FILE).write_text("{broken")
    with pytest.raises(FetalStudioError, match="could not be read as JSON.*restore it from the ControlNet's training output"):
        build_catalog(tmp_checkpoints)["edge-file"].condition
    (tmp_checkpoints / "edge-file" / CONDITION_FILE).write_text(json.dumps({"detector": "canny"}))
    with pytest.raises(FetalStudioError, match="does not name a condition"):
        build_catalog(tmp_checkpoints)["edge-file"].condition


def test_condition_is_only_for_controlnets_and_must_be_a_name(tmp_checkpoints, tiny_kohya_lora):
    manifest = write_manifest(tmp_checkpoints, '[[model]]\nid = "a"\nkind = "lora"\npath = "x.safetensors"\ncondition = "canny"\n')
    with pytest.raises(ManifestError, match="condition is only for ControlNets"):
        parse_manifest(manifest)
    manifest = write_manifest(tmp_checkpoints, '[[model]]\nid = "a"\nkind = "controlnet"\npath = "cn"\ncondition = 3\n')
    with pytest.raises(ManifestError, match="condition must be a quoted name such as \"canny\""):
        parse_manifest(manifest)
    manifest = write_manifest(tmp_checkpoints, '[[model]]\nid = "a"\nkind = "lora"\npath = "x.safetensors"\n')
    assert parse_manifest(manifest)[0].condition is None  # not a ControlNet


@pytest.mark.parametrize(("embed_dim", "variant"), [(768, "vit_b"), (1024, "vit_l"), (1280, "vit_h"), (512, "custom")])
def test_discovers_sam_variant_from_encoder_width(tmp_checkpoints, embed_dim, variant):
    write_sam_pth(tmp_checkpoints / "sam" / f"sam_{embed_dim}.pth", embed_dim)
    entry = build_catalog(tmp_checkpoints)[f"sam/sam_{embed_dim}"]
    assert entry.kind is ModelKind.SAM and entry.format is ModelFormat.SAM_PTH
    assert entry.details == {"variant": variant, "embed_dim": str(embed_dim)}


def test_sam_nested_under_state_dict_key_is_found(tmp_checkpoints):
    state = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16),
        "mask_decoder.iou_token.weight": torch.zeros(1, 256),
    }
    torch.save({"epoch": 3, "model": state}, tmp_checkpoints / "medsam.pth")
    entry = build_catalog(tmp_checkpoints)["medsam"]
    assert entry.kind is ModelKind.SAM and entry.details["variant"] == "vit_l"


def test_sam_of_unknown_width_fails_to_load_with_a_clear_message(tmp_checkpoints, cpu_placement):
    write_sam_pth(tmp_checkpoints / "odd_sam.pth", 512)
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    with pytest.raises(ModelLoadError) as caught:
        manager.get("odd_sam")
    assert "'custom'" in str(caught.value) and "vit_b" in str(caught.value)
    assert manager.loaded_ids() == []


def test_sam_checkpoint_missing_weights_fails_to_load_with_a_clear_message(tmp_checkpoints, cpu_placement):
    write_sam_pth(tmp_checkpoints / "partial_sam.pth", 768)
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    with pytest.raises(ModelLoadError) as caught:
        manager.get("partial_sam")
    message = str(caught.value)
    assert "partial_sam.pth does not fit the model" in message
    assert "manifest.toml" in message
    assert manager.loaded_ids() == []


def test_discovers_timm_checkpoints(tmp_checkpoints, timm_dir):
    catalog = build_catalog(tmp_checkpoints, extra_folders=(timm_dir,))
    pth, st = catalog["cls_pth"], catalog["cls_st"]
    assert pth.kind is ModelKind.CLASSIFIER and pth.format is ModelFormat.TIMM_CHECKPOINT
    assert st.kind is ModelKind.CLASSIFIER and st.format is ModelFormat.TIMM_CHECKPOINT
    assert st.details["architecture"] == "resnet18"
    assert "architecture" not in pth.details  # a bare .pth does not say which network it is


def test_loads_classifier_with_metadata_through_manager(tmp_checkpoints, timm_dir, cpu_placement):
    manager = ModelManager(tmp_checkpoints, extra_folders=(timm_dir,), placement=cpu_placement)
    model = manager.get("cls_st")
    assert isinstance(model, torch.nn.Module)
    assert not model.training
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    assert manager.loaded_ids() == ["cls_st"]


def test_bare_pth_classifier_needs_architecture_in_manifest(tmp_checkpoints, timm_dir, cpu_placement):
    manager = ModelManager(tmp_checkpoints, extra_folders=(timm_dir,), placement=cpu_placement)
    with pytest.raises(ModelLoadError, match=r'architecture = "resnet18"'):
        manager.get("cls_pth")

    write_manifest(
        tmp_checkpoints,
        f"""
[[model]]
id = "planes"
kind = "classifier"
path = '{timm_dir / "cls_pth.pth"}'
architecture = "resnet18"
""",
    )
    manager.refresh()
    assert "cls_pth" not in manager.ids()  # the manifest claims that file now
    model = manager.get("planes")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_classifier_with_unknown_architecture_fails_clearly(tmp_checkpoints, timm_dir, cpu_placement):
    write_manifest(
        tmp_checkpoints,
        f"""
[[model]]
id = "planes"
kind = "classifier"
path = '{timm_dir / "cls_pth.pth"}'
architecture = "resnet_does_not_exist"
""",
    )
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    with pytest.raises(ModelLoadError, match="resnet_does_not_exist"):
        manager.get("planes")


def test_extra_folders_from_environment(tmp_checkpoints, tmp_path, monkeypatch, tiny_kohya_lora):
    first, second = tmp_path / "models-a", tmp_path / "models-b"
    write_peft_lora(first / "a_lora.safetensors")
    second.mkdir()
    shutil.copy(tiny_kohya_lora, second / "b_lora.safetensors")
    monkeypatch.setenv("FETALSTUDIO_MODELS", os.pathsep.join([str(first), "", str(second)]))
    catalog = build_catalog(tmp_checkpoints)
    assert catalog["a_lora"].format is ModelFormat.PEFT_LORA
    assert catalog["b_lora"].format is ModelFormat.KOHYA_LORA
    assert catalog["b_lora"].path == second / "b_lora.safetensors"


def test_non_model_files_are_skipped(tmp_checkpoints, tiny_kohya_lora, caplog):
    (tmp_checkpoints / "README.txt").write_text("put models here")
    (tmp_checkpoints / "notes.json").write_text("{}")
    (tmp_checkpoints / "random.bin").write_bytes(os.urandom(4096))
    (tmp_checkpoints / "empty_folder").mkdir()
    (tmp_checkpoints / ".hidden.safetensors").write_bytes(b"junk")
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "good.safetensors")
    with caplog.at_level(logging.WARNING, logger=CATALOG_LOGGER):
        catalog = build_catalog(tmp_checkpoints)
    assert list(catalog) == ["good"]
    assert "random.bin" in caplog.text  # unreadable weight files are reported, not fatal
    assert ".hidden" not in caplog.text


def test_corrupt_safetensors_is_skipped_with_a_warning(tmp_checkpoints, tiny_kohya_lora, caplog):
    data = tiny_kohya_lora.read_bytes()
    (tmp_checkpoints / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_checkpoints / "garbage.safetensors").write_bytes(b"\xff" * 64)
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "good.safetensors")
    with caplog.at_level(logging.WARNING, logger=CATALOG_LOGGER):
        catalog = build_catalog(tmp_checkpoints)
    assert list(catalog) == ["good"]
    assert "truncated.safetensors" in caplog.text and "garbage.safetensors" in caplog.text
    assert "fetch the file again" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        {"epoch": 3, "notes": "no weights here"},
        [torch.zeros(2), torch.ones(2)],
        torch.zeros(3),
        {"optimizer": {"lr": 0.1}, "state_dict": {"step": 5}},
    ],
    ids=["dict-without-tensors", "list-of-tensors", "bare-tensor", "nested-without-tensors"],
)
def test_pickle_that_is_not_a_tensor_dict_is_skipped(tmp_checkpoints, caplog, content):
    torch.save(content, tmp_checkpoints / "odd.pth")
    with caplog.at_level(logging.WARNING, logger=CATALOG_LOGGER):
        catalog = build_catalog(tmp_checkpoints)
    assert catalog == {}
    assert "odd.pth" in caplog.text and "not a model checkpoint" in caplog.text


def test_pickled_module_is_refused_without_running_code(tmp_checkpoints, caplog):
    torch.save(torch.nn.Linear(2, 2), tmp_checkpoints / "whole_module.pt")
    with caplog.at_level(logging.WARNING, logger=CATALOG_LOGGER):
        catalog = build_catalog(tmp_checkpoints)
    assert catalog == {}
    assert "whole_module.pt" in caplog.text and "weights_only=True" in caplog.text


def test_unrelated_tensor_dict_is_not_a_model(tmp_checkpoints, caplog):
    torch.save({"embedding": torch.zeros(4, 4)}, tmp_checkpoints / "embeddings.pt")
    with caplog.at_level(logging.WARNING, logger=CATALOG_LOGGER):
        catalog = build_catalog(tmp_checkpoints)
    assert catalog == {}
    assert [r for r in caplog.records if r.name == CATALOG_LOGGER] == []  # readable, not a model: ignored


def test_tensor_dict_with_non_string_keys_does_not_break_discovery(tmp_checkpoints, tiny_kohya_lora):
    torch.save({0: torch.zeros(2), 1: torch.ones(2)}, tmp_checkpoints / "int_keys.pth")
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "good.safetensors")
    assert list(build_catalog(tmp_checkpoints)) == ["good"]


def test_corrupt_file_named_in_manifest_does_not_break_the_catalog(tmp_checkpoints, cpu_placement):
    (tmp_checkpoints / "broken.safetensors").write_bytes(b"\x00" * 32)
    write_manifest(
        tmp_checkpoints,
        '[[model]]\nid = "broken"\nkind = "classifier"\npath = "broken.safetensors"\narchitecture = "resnet18"\n',
    )
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)  # the app must still start
    assert manager.entry("broken").kind is ModelKind.CLASSIFIER
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        manager.get("broken")


def test_discover_ignores_missing_folders(tmp_path):
    assert discover([tmp_path / "does-not-exist"]) == []
