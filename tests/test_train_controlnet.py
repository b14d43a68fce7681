"""`train controlnet` on the tiny SD pipeline and a handful of real first-trimester images:
ControlNet weights change while the U-Net stays frozen, resume, condition dropout, model manager, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fetalstudio.cli import main
from fetalstudio.data.structures import VALIDATION_PERCENT, validation_bucket
from fetalstudio.models.entries import ModelKind
from fetalstudio.models.manager import ModelManager
from fetalstudio.training import lora
from fetalstudio.training.controlnet import drop_conditions
from tests.anatomy_support import write_structures_folder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "first_trimester_structures"
pytestmark = [
    pytest.mark.skipif(not (DATA / "boxes.csv").is_file(), reason="shared data not available"),
    pytest.mark.usefixtures("one_torch_thread"),
]
FAST = ["--resolution", "64", "--batch-size", "2", "--log-every", "1", "--threads", "1", "--lr", "1e-3"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _write_structures_folder(folder: Path, n_train: int, n_val: int) -> Path:
    """A structures folder with the first ``n_train`` training-split and ``n_val`` validation-split originals."""
    with (DATA / "images.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    train = [r for r in rows if validation_bucket(Path(r["image"])) >= VALIDATION_PERCENT][:n_train]
    val = [r for r in rows if validation_bucket(Path(r["image"])) < VALIDATION_PERCENT][:n_val]
    keep = train + val
    names = {r["image"] for r in keep}
    with (DATA / "boxes.csv").open(newline="", encoding="utf-8") as handle:
        boxes = [b for b in csv.DictReader(handle) if b["image"] in names]
    return write_structures_folder(folder, keep, boxes, {row["image"]: DATA / row["image"] for row in keep})


@pytest.fixture(scope="module")
def structures(tmp_path_factory) -> Path:
    return _write_structures_folder(tmp_path_factory.mktemp("structures") / "ft", n_train=6, n_val=2)


def _train(base: Path, data: Path, out: Path, steps: int, *extra: str) -> int:
    return main(["train", "controlnet", "--data", str(data), "--base", str(base), "--out", str(out), "--steps", str(steps),
                 "--save-every", "2", *FAST, *extra])


@pytest.fixture(scope="module")
def trained(tiny_sd_dir, structures, tmp_path_factory):
    """Four steps; the base pipeline the command trained against is kept to check that its U-Net stayed frozen."""
    loaded = []
    original = lora.load_base_pipeline

    def keep_pipeline(base):
        result = original(base)
        loaded.append(result[0])
        return result

    out = tmp_path_factory.mktemp("controlnets") / "layout-cn"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora, "load_base_pipeline", keep_pipeline)
        assert _train(tiny_sd_dir, structures, out, 4) == 0
    return out, loaded[0]


def _log_rows(out: Path) -> list[dict]:
    with (out / "training" / "train_log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_loss_is_finite_controlnet_weights_change_and_unet_stays_frozen(trained, tiny_sd_dir):
    from diffusers import ControlNetModel, UNet2DConditionModel

    out, pipeline = trained
    losses = [float(r["loss"]) for r in _log_rows(out)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    on_disk = UNet2DConditionModel.from_pretrained(str(tiny_sd_dir / "unet"))
    after = pipeline.unet.state_dict()
    assert all(torch.equal(value, after[key].cpu()) for key, value in on_disk.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in pipeline.unet.parameters())
    initial = ControlNetModel.from_unet(on_disk).state_dict()
    trained_weights = load_file(str(out / WEIGHTS))
    zero_convs = [k for k in trained_weights if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero_convs and all(initial[k].abs().max() == 0 for k in zero_convs)  # from_unet starts as the base
    assert all(trained_weights[k].abs().max() > 0 for k in zero_convs)  # and training moved every zero convolution


def test_output_is_a_controlnet_the_model_manager_loads_with_card_and_metrics(trained, tmp_path):
    from diffusers import ControlNetModel

    out, _ = trained
    manager = ModelManager(tmp_path / "empty", extra_folders=(out.parent,))
    entry = manager.entry(str(out))
    assert entry.kind is ModelKind.CONTROLNET
    assert [e.path for e in manager.entries(ModelKind.CONTROLNET)] == [out]  # the training/ state is not listed again
    assert isinstance(manager.get(str(out)), ControlNetModel)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["data"]["train_images"] == 6 and metrics["data"]["validation_images_held_out"] == 2
    assert set(metrics["validation"]) >= {"with_layout", "without_layout"}
    card = (out / "model_card.md").read_text()
    assert "6 training images; 2 held out" in card and "SSIM" in card and "CPU" in card


def test_condition_dropout_is_seeded_and_replaces_layout_and_prompt(trained):
    maps = torch.rand(4000, 3, 2, 2) + 0.1
    prompts, null = torch.rand(4000, 5, 3), torch.zeros(1, 5, 3)
    first = drop_conditions(maps, prompts, null, 0.3, torch.Generator().manual_seed(7))
    again = drop_conditions(maps, prompts, null, 0.3, torch.Generator().manual_seed(7))
    new_maps, states, layout_dropped, prompt_dropped = first
    assert torch.equal(layout_dropped, again[2]) and torch.equal(prompt_dropped, again[3])
    assert 0.27 < layout_dropped.float().mean() < 0.33 and 0.27 < prompt_dropped.float().mean() < 0.33
    assert not torch.equal(layout_dropped, prompt_dropped)  # independent draws
    assert torch.all(new_maps[layout_dropped] == 0) and torch.equal(new_maps[~layout_dropped], maps[~layout_dropped])
    assert torch.all(states[prompt_dropped] == 0) and torch.equal(states[~prompt_dropped], prompts[~prompt_dropped])
    none = drop_conditions(maps, prompts, null, 0.0, torch.Generator().manual_seed(7))
    assert not none[2].any() and not none[3].any()
    out, _ = trained  # the training run drew drops too (seeded), and logged them
    extras = [json.loads(r["extra"]) for r in _log_rows(out)]
    assert sum(e["layout_dropped"] for e in extras) + sum(e["prompt_dropped"] for e in extras) > 0


def test_resume_continues_at_the_saved_step_and_matches_an_uninterrupted_run(trained, tiny_sd_dir, structures, tmp_path, capsys):
    out, _ = trained
    resumed = tmp_path / "resumed"
    assert _train(tiny_sd_dir, structures, resumed, 2) == 0
    capsys.readouterr()
    assert _train(tiny_sd_dir, structures, resumed, 4) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert [int(r["step"]) for r in _log_rows(resumed)] == [1, 2, 3, 4]
    one_go, in_two = load_file(str(out / WEIGHTS)), load_file(str(resumed / WEIGHTS))
    assert all(torch.allclose(one_go[k], in_two[k], atol=1e-6) for k in one_go)


def test_bad_inputs_get_clear_messages(trained, tiny_sd_dir, structures, tmp_path, capsys):
    out, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(tiny_sd_dir, empty, tmp_path / "o1", 2) == 2
    assert "images.csv does not exist" in capsys.readouterr().err
    only_validation = _write_structures_folder(tmp_path / "val-only", n_train=0, n_val=2)
    assert _train(tiny_sd_dir, only_validation, tmp_path / "o1", 2) == 2
    assert "has no annotated training images" in capsys.readouterr().err
    assert _train(tiny_sd_dir, tmp_path / "missing", tmp_path / "o2", 2) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert _train(out, structures, tmp_path / "o3", 2) == 2  # a ControlNet is not a base
    assert "is a controlnet, not a Stable Diffusion pipeline" in capsys.readouterr().err
    assert _train(tiny_sd_dir, structures, tmp_path / "o4", 0) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "controlnet", "--help"])
    assert exit_info.value.code == 0 and "--lambda-ssim" in capsys.readouterr().out


def test_pre_aligned_controlnet_on_a_fused_lora_trains_loads_and_generates(tiny_sd_dir, tiny_kohya_lora, structures, tmp_path, capsys):
    """--pre-align: the condition is the layout map's VAE latent aligned to the image latents' statistics
    (saved beside the weights, attached on load, used at generation); --lora is fused into the frozen base."""
    import numpy as np
    from PIL import Image

    from fetalstudio.models.prealign import PREALIGN_FILE, PreAlignment, prealignment_of
    from fetalstudio.pipelines.inpaint import InpaintRequest, InpaintRunner
    from fetalstudio.pipelines.settings import GenerationSettings

    out = tmp_path / "models" / "aligned-cn"
    assert _train(tiny_sd_dir, structures, out, 2, "--pre-align", "--lora", str(tiny_kohya_lora), "--lora-weight", "0.8") == 0
    stats = json.loads((out / PREALIGN_FILE).read_text())
    assert len(stats["layout_mean"]) == 4 and min(stats["image_std"]) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pre_align"] is True and metrics["lora"]["weight"] == 0.8 and metrics["lora"]["fused"] is True
    card = (out / "model_card.md").read_text()
    assert "pre-aligned" in card and "fused at weight 0.8" in card
    assert set(metrics["validation"]) >= {"with_layout", "without_layout"}

    shutil.copytree(tiny_sd_dir, tmp_path / "models" / "tinysd")
    manager = ModelManager(tmp_path / "empty", extra_folders=(tmp_path / "models",))
    controlnet = manager.get(str(out))
    alignment = prealignment_of(controlnet)
    assert isinstance(alignment, PreAlignment) and list(alignment.image_mean) == stats["image_mean"]
    assert controlnet.config.conditioning_channels == 4
    latents = torch.randn(2, 4, 3, 3) * torch.tensor(alignment.layout_std).view(1, 4, 1, 1) + torch.tensor(alignment.layout_mean).view(1, 4, 1, 1)
    aligned = alignment.align(latents)
    assert torch.allclose(aligned.transpose(0, 1).reshape(4, -1).mean(1), torch.tensor(alignment.image_mean), atol=2.0)

    with Image.open(DATA / "images/0.png") as opened:
        source = np.asarray(opened.convert("L").resize((64, 64)).convert("RGB"))
    layout = np.zeros_like(source)
    layout[20:40, 10:30] = (255, 0, 0)
    roi = np.zeros((64, 64), bool)
    roi[16:44, 6:34] = True
    settings = GenerationSettings(model="tinysd", prompt="fetal facial sagittal plane", sampler="ddim", steps=2, width=64, height=64, seed=3)
    request = InpaintRequest(source=source, condition=layout, roi=roi, controlnet=str(out))
    result = InpaintRunner(manager).generate(settings, request)
    made = np.asarray(result.images[0].image.convert("RGB")).astype(int)
    assert made.shape == (64, 64, 3)  # the run keeps its size (diffusers sizes it from the condition image)
    assert np.array_equal(made[~roi], source[~roi].astype(int))
    assert not controlnet._forward_pre_hooks  # the pre-alignment hook is taken off after the run
    assert result.images[0].metadata["task"]["prealigned"] is True
    other = InpaintRunner(manager).generate(settings, InpaintRequest(source=source, condition=np.zeros_like(source), roi=roi,
                                                                     controlnet=str(out)))
    assert not np.array_equal(np.asarray(other.images[0].image), np.asarray(result.images[0].image))  # the layout steers it

    capsys.readouterr()
    assert _train(tiny_sd_dir, structures, tmp_path / "o4", 2, "--lora", str(out)) == 2
    assert "not a LoRA" in capsys.readouterr().err


# --- edge conditions ---------------------------------------------------------------------------------
HC18 = DATA.parent / "hc18_heads" / "images"


@pytest.fixture(scope="module")
def plain_heads(tmp_path_factory) -> Path:
    """A plain folder of HC18 heads without layouts, each with a .txt caption: 3 of the training side, 1 held
    out (one examination: 023_HC and 023_2HC)."""
    from fetalstudio.training.controlnet import is_held_out

    folder = tmp_path_factory.mktemp("heads") / "heads"
    folder.mkdir()
    names = ["000_HC.png", "001_HC.png", "002_HC.png", "023_HC.png"]
    assert [is_held_out(Path(n)) for n in names] == [False, False, False, True]
    for name in names:
        shutil.copy(HC18 / name, folder / name)
        (folder / name).with_suffix(".txt").write_text("An ultrasound image of a fetal head, second trimester")
    return folder


@pytest.fixture(scope="module")
def edge_trained(tiny_sd_dir, structures, plain_heads, tmp_path_factory):
    out = tmp_path_factory.mktemp("edge-controlnets") / "canny-cn"
    assert _train(tiny_sd_dir, structures, out, 2, "--condition", "canny", "--data", str(plain_heads), "--save-dtype", "fp16",
                  "--embedding-channels", "8,8,16,16") == 0
    return out


@pytest.mark.skipif(not HC18.is_dir(), reason="hc18_heads not available")
def test_a_canny_controlnet_trains_on_images_without_layouts_and_records_its_condition(edge_trained, tmp_path):
    from diffusers import ControlNetModel

    from fetalstudio.models.entries import CONDITION_FILE

    out = edge_trained
    assert json.loads((out / CONDITION_FILE).read_text()) == {"condition": "canny"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["condition"] == "canny" and metrics["pre_align"] is False and metrics["plane"] is None
    assert metrics["edge_settings"]["detector"] == "canny" and metrics["edge_settings"]["low_threshold"] == 100
    data = metrics["data"]
    assert data["train_images"] == 6 + 3 and data["validation_images_held_out"] == 2 + 1  # the structures' split + one examination
    assert sorted(n["train"] for n in data["sources"].values()) == [3, 6]
    assert set(metrics["validation"]) >= {"with_edges", "without_edges", "without_controlnet"}
    assert data["captions"]["An ultrasound image of a fetal head, second trimester"] == 3
    card = (out / "model_card.md").read_text()
    assert "Canny-edge ControlNet" in card and "--condition canny" in card and "9 training images; 3 held out" in card
    assert "float16" in card and "without the ControlNet" in card
    weights = load_file(str(out / WEIGHTS))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    manager = ModelManager(tmp_path / "empty", extra_folders=(out.parent,))
    entry = manager.entry(str(out))
    assert entry.kind is ModelKind.CONTROLNET and entry.condition == "canny"
    controlnet = manager.get(str(out))
    assert isinstance(controlnet, ControlNetModel) and controlnet.config.conditioning_channels == 3
    assert list(controlnet.config.conditioning_embedding_out_channels) == metrics["embedding_channels"] == [8, 8, 16, 16]


def test_a_layout_controlnet_says_layout_beside_its_weights(trained, tmp_path):
    from fetalstudio.models.entries import CONDITION_FILE

    out, _ = trained
    assert json.loads((out / CONDITION_FILE).read_text()) == {"condition": "layout"}
    assert json.loads((out / "metrics.json").read_text())["condition"] == "layout"
    assert ModelManager(tmp_path / "empty", extra_folders=(out.parent,)).entry(str(out)).condition == "layout"


def test_the_edge_condition_is_the_edge_map_of_the_letterboxed_training_image(plain_heads):
    import numpy as np
    from PIL import Image

    from fetalstudio.imaging.letterbox import letterbox_image
    from fetalstudio.pipelines.edges import edge_map
    from fetalstudio.training.controlnet import map_condition, prepare_edge_image, stack_images
    from fetalstudio.training.image_datasets import ImageItem

    item = ImageItem(plain_heads / "000_HC.png", "a head", "a head")
    prepared = prepare_edge_image(item, "canny", 128)
    with Image.open(item.image) as opened:
        square, box = letterbox_image(opened.convert("L"), 128)
    assert np.array_equal(prepared.pixels, np.asarray(square))
    assert np.array_equal(prepared.condition_map, np.asarray(edge_map(square, "canny"))[..., 0])
    assert set(np.unique(prepared.condition_map)) == {0, 255}
    left, top, right, bottom = box.window
    assert prepared.roi[top:bottom, left:right].all() and prepared.roi.sum() == (right - left) * (bottom - top) < 128 * 128
    _, maps, _ = stack_images([prepared, prepared])
    condition = map_condition(maps, "cpu")
    assert maps.shape == (2, 1, 128, 128) and condition.shape == (2, 3, 128, 128)
    assert torch.equal(condition[:, 0], condition[:, 2]) and condition.max() == 1.0


def test_the_edge_split_holds_out_patients_and_examinations_together():
    from fetalstudio.data.structures import read_structures, split_structures
    from fetalstudio.training.controlnet import held_out_group, is_held_out

    assert held_out_group(Path("images/010_2HC.png")) == held_out_group(Path("010_HC.png")) == "hc18-010"
    assert held_out_group(Path("brain/Patient00305_Plane3_2_of_5.png")) == held_out_group(Path("Patient00305_Plane3_1_of_5.png"))
    assert is_held_out(Path("023_HC.png")) and is_held_out(Path("023_2HC.png")) and not is_held_out(Path("000_HC.png"))
    items = read_structures(DATA, include_more=False)
    assert {i.path for i in items if is_held_out(i.path)} == {i.path for i in split_structures(items, "val")}


def test_edge_conditions_refuse_pre_alignment_layout_refuses_a_caption_and_african_images_stay_out(
        tiny_sd_dir, structures, tmp_path, capsys):
    assert _train(tiny_sd_dir, structures, tmp_path / "o1", 2, "--condition", "canny", "--pre-align") == 2
    err = capsys.readouterr().err
    assert "Leave out --pre-align with --condition canny" in err and not (tmp_path / "o1").exists()
    assert _train(tiny_sd_dir, structures, tmp_path / "o2", 2, "--caption", "a head") == 2
    assert "--caption is for edge conditions" in capsys.readouterr().err
    assert _train(tiny_sd_dir, structures, tmp_path / "o5", 2, "--condition", "canny", "--embedding-channels", "8,16") == 2
    assert "--embedding-channels needs 4 numbers for this base" in capsys.readouterr().err
    african = DATA.parent / "african" / "train"
    if african.is_dir():
        assert _train(tiny_sd_dir, african, tmp_path / "o3", 2, "--condition", "canny") == 2
        assert "African" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "controlnet", "--condition", "sobel", "--data", str(structures), "--base", "x", "--out", str(tmp_path / "o4")])
    assert "invalid choice: 'sobel'" in capsys.readouterr().err
