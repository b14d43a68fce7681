"""The prompt-free head segmenter (issue 15): its file format and loader, the predictor (probability
map at full resolution, flip test-time augmentation, largest region), `train head-unet` (and its
resume), `eval segmenter --box auto`, and the Analysis automatic mode choosing the U-Net when one
is installed. Tiny U-Nets with random weights are built here: no bundled weights are needed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fetalstudio.cli import main
from fetalstudio.models.entries import ModelFormat, ModelKind
from fetalstudio.models.head_segmenter import HeadSegmenterConfig, build_head_segmenter, load_head_segmenter_file, save_head_segmenter
from fetalstudio.segmentation.head_unet import HeadMaskPredictor, letterboxed_input

try:
    from tests.data_support import DATA, needs_data
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, needs_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = HeadSegmenterConfig(encoder="tu-regnetx_002", decoder_channels=(8, 8, 8, 8, 8), input_size=64)


def _tiny_unet(seed: int = 0, head_bias: float | None = None):
    """A random tiny U-Net; ``head_bias`` sets the last layer's bias (large: every pixel is head)."""
    torch.manual_seed(seed)
    model = build_head_segmenter(TINY).eval()
    if head_bias is not None:
        last = model.net.segmentation_head[0]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, head_bias)
    return model


def _tiny_segmenter(path: Path) -> Path:
    from fetalstudio.models.segmenter import build_segmenter
    from fetalstudio.segmentation.model import save_segmenter, small_config

    torch.manual_seed(0)
    return save_segmenter(build_segmenter(small_config(64)), path, extra_metadata={"note": "random weights for tests"})


class FixedLogits(nn.Module):
    """A stand-in head model whose logits are a fixed square map (whatever the input), to check the predictor's steps."""

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.config = HeadSegmenterConfig(input_size=logits.shape[0])
        self.register_buffer("logits", torch.from_numpy(logits.astype(np.float32)))
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the predictor a device and dtype
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.logits.expand(x.shape[0], 1, *self.logits.shape) + 0 * self.anchor


# --- format and loader ----------------------------------------------------------------------------
def test_a_saved_head_unet_is_recognised_listed_and_loaded_by_the_model_manager(tmp_checkpoints, cpu_placement):
    from fetalstudio.models.inspect import inspect_path
    from fetalstudio.models.manager import ModelManager

    model = _tiny_unet()
    path = tmp_checkpoints / "tiny-head-unet.safetensors"
    save_head_segmenter(model, path, {"note": "test"}, dtype=torch.float32)
    inspection = inspect_path(path)
    assert inspection.kind is ModelKind.HEAD_SEGMENTER and inspection.format is ModelFormat.FETALSTUDIO_HEAD_SEGMENTER
    assert inspection.details["input_size"] == "64" and inspection.details["encoder"] == "tu-regnetx_002"
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    assert manager.default_id(ModelKind.HEAD_SEGMENTER) == "tiny-head-unet"
    loaded = manager.get("tiny-head-unet")
    assert loaded.config == TINY and not loaded.training
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_fp16_weights_load_as_float32_and_a_foreign_file_is_refused(tmp_path):
    from fetalstudio.errors import ModelLoadError

    path = tmp_path / "half.safetensors"
    save_head_segmenter(_tiny_unet(), path)
    assert next(load_head_segmenter_file(path).parameters()).dtype == torch.float32
    _tiny_segmenter(tmp_path / "box-prompted.safetensors")
    with pytest.raises(ModelLoadError, match="not a FetalStudio head segmenter"):
        load_head_segmenter_file(tmp_path / "box-prompted.safetensors")


def test_a_manifest_entry_of_kind_head_segmenter_is_the_default(tmp_checkpoints, cpu_placement):
    from fetalstudio.models.manager import ModelManager

    save_head_segmenter(_tiny_unet(0), tmp_checkpoints / "a.safetensors")
    save_head_segmenter(_tiny_unet(1), tmp_checkpoints / "b.safetensors")
    (tmp_checkpoints / "manifest.toml").write_text('[[model]]\nid = "my-head-unet"\nkind = "head_segmenter"\npath = "b.safetensors"\n'
                                                   'default = true\n', encoding="utf-8")
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    assert manager.entry("my-head-unet").format is ModelFormat.FETALSTUDIO_HEAD_SEGMENTER
    assert manager.default_id(ModelKind.HEAD_SEGMENTER) == "my-head-unet"


# --- the predictor ------------------------------------------------------------------------------
def test_the_probability_map_comes_back_at_the_images_own_resolution():
    image = (np.random.default_rng(0).random((97, 150)) * 255).astype(np.uint8)
    predictor = HeadMaskPredictor(_tiny_unet())
    probability = predictor.probability(image)
    assert probability.shape == (97, 150) and probability.dtype == np.float32
    assert 0 <= probability.min() and probability.max() <= 1
    result = predictor.predict(np.stack([image] * 3, axis=2))  # RGB in, same map
    assert result.mask.shape == (97, 150) and np.allclose(result.probability, probability)


def test_the_mask_edge_is_placed_at_full_resolution_not_at_the_model_size():
    """Logits of a disc of radius 20.3 input pixels in a 64 px square; on a 640 px image the mask must
    be the disc of radius 203 (within a pixel), not a 10x blocky upscale of a 64 px mask."""
    size, scale = 64, 10
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    radius = np.hypot(xx - 32, yy - 32)
    model = FixedLogits((20.3 - radius) * 4)  # signed distance: probability 0.5 exactly on the circle
    mask = HeadMaskPredictor(model, flip_tta=False).predict(np.zeros((size * scale, size * scale), np.uint8)).mask
    ys, xs = np.nonzero(mask)
    width = xs.max() - xs.min() + 1
    assert abs(width - 2 * 20.3 * scale) <= 3, width  # a 64 px mask scaled up would be a multiple of 10 wide


def test_flip_test_time_augmentation_averages_the_mirrored_prediction():
    logits = np.zeros((64, 64), np.float32)
    logits[:, :16] = 4.0  # "head" on the left in both passes: the mirror pass puts it on the right of the original
    model = FixedLogits(logits)
    image = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    square, _ = letterboxed_input(image, 64)
    probability = HeadMaskPredictor(model).square_probability(square)
    assert torch.equal(model.inputs[-1][1], torch.flip(model.inputs[-1][0], dims=[2]))  # the second input is the mirror
    expected = (1 / (1 + np.exp(-logits)) + np.fliplr(1 / (1 + np.exp(-logits)))) / 2
    assert np.allclose(probability, expected, atol=1e-6)
    plain = HeadMaskPredictor(model, flip_tta=False).square_probability(square)
    assert np.allclose(plain, 1 / (1 + np.exp(-logits)), atol=1e-6)


def test_only_the_largest_region_is_kept_with_its_holes_filled():
    logits = np.full((64, 64), -6.0, np.float32)
    logits[10:40, 10:40] = 6.0  # the head, with a hole
    logits[20:25, 20:25] = -6.0
    logits[50:55, 50:55] = 6.0  # a small blob elsewhere
    result = HeadMaskPredictor(FixedLogits(logits), flip_tta=False).predict(np.zeros((64, 64), np.uint8))
    assert result.raw_mask[52, 52] and not result.mask[52, 52]
    assert result.mask[22, 22] and result.mask[12:38, 12:38].all()
    assert 0.9 < result.score <= 1.0


# --- training -------------------------------------------------------------------------------------
@needs_data
def test_train_head_unet_on_a_few_hc18_images_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    command = ["train", "head-unet", "--csv", str(DATA / "hc18_heads" / "pairs.csv"), "--limit", "10", "--val-fraction", "0.2",
               "--out", str(out), "--input-size", "64", "--decoder-channels", "8,8,8,8,8", "--steps", "4", "--batch-size", "2",
               "--eval-every", "2", "--save-every", "1", "--log-every", "1", "--threads", "1"]
    assert main([*command, "--stop-after", "2"]) == 0
    assert json.loads((out / "state" / "progress.json").read_text())["step"] == 2
    assert json.loads((out / "metrics.json").read_text())["finished"] is False
    assert main(command) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["step"] == 4 and metrics["resumed_from"] == 2
    assert set(metrics["history"]) == {"2", "4"} and metrics["selected_step"] in (2, 4)
    assert 0 <= metrics["validation"]["dice_mean"] <= 1 and metrics["validation"]["hc_n"] >= 1
    steps = [int(row["step"]) for row in csv.DictReader((out / "train_log.csv").open())]
    assert steps == [1, 2, 3, 4]
    model = load_head_segmenter_file(out / "model.safetensors")
    assert model.config.input_size == 64 and model.config.decoder_channels == (8, 8, 8, 8, 8)
    held_out = list(csv.DictReader((out / "validation" / "hc18_heads" / "pairs.csv").open()))
    assert len(held_out) == metrics["validation"]["n"] and Path(held_out[0]["image"]).is_file()
    card = (out / "README.md").read_text()
    assert "Held-out validation" in card and "HC MAE" in card
    capsys.readouterr()
    assert main([*command, "--batch-size", "4"]) != 0  # another batch size is another run: refused
    assert "other settings" in capsys.readouterr().err


@needs_data
def test_train_head_unet_continues_a_trained_model_at_another_input_size(tmp_path):
    start = tmp_path / "start.safetensors"
    trained = _tiny_unet(seed=3)
    save_head_segmenter(trained, start, dtype=torch.float32)
    out = tmp_path / "run96"
    assert main(["train", "head-unet", "--csv", str(DATA / "hc18_heads" / "pairs.csv"), "--limit", "6", "--val-fraction", "0",
                 "--out", str(out), "--init-weights", str(start), "--input-size", "96", "--steps", "1", "--batch-size", "2",
                 "--lr", "1e-9", "--threads", "1"]) == 0
    model = load_head_segmenter_file(out / "model.safetensors")
    assert model.config == HeadSegmenterConfig(encoder="tu-regnetx_002", decoder_channels=(8, 8, 8, 8, 8), input_size=96)
    first = next(iter(trained.state_dict()))
    assert torch.allclose(model.state_dict()[first], trained.state_dict()[first].half().float(), atol=1e-3)  # lr ~ 0: the start kept
    assert "continued from `start.safetensors`" in (out / "README.md").read_text()


# --- evaluation and the Analysis automatic mode ---------------------------------------------------
@needs_data
def test_eval_segmenter_box_auto_scores_the_automatic_mode_with_the_head_unet(tmp_path, tmp_checkpoints):
    _tiny_segmenter(tmp_checkpoints / "tiny-segmenter.safetensors")
    unet_path = tmp_path / "head.safetensors"
    save_head_segmenter(_tiny_unet(head_bias=8.0), unet_path)  # every pixel is head: the box is the frame
    report = tmp_path / "report"
    assert main(["eval", "segmenter", "--csv", str(DATA / "hc18_heads" / "pairs.csv"), "--limit", "2", "--box", "auto",
                 "--head-model", str(unet_path), "--out", str(report), "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["box"] == "auto" and result["method"] == "head U-Net" and result["n"] == 2
    assert 0 < result["dice_mean"] < 0.9 and result["hc_mae_mm"] > 10  # the whole frame is no head
    assert result["baseline"]["dice_mean"] > 0.8  # the jittered ground-truth box's ellipse
    assert result["seconds_per_image_mean"] > 0 and result["dice_se"] >= 0
    rows = list(csv.DictReader((report / "per_image.csv").open()))
    assert [r["box_mode"] for r in rows] == ["auto", "auto"] and all(float(r["ellipse_dice"]) >= 0 for r in rows)
    assert "Automatic mode" in (report / "summary.md").read_text()


def test_the_automatic_mode_uses_the_installed_head_unet_and_falls_back_without_one(tmp_checkpoints, cpu_placement, monkeypatch):
    from fetalstudio.analysis import segment
    from fetalstudio.analysis.head import segment_head
    from fetalstudio.analysis.segment import CachedPredictor
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    sam = ModelManager(tmp_checkpoints, placement=cpu_placement).get(str(_tiny_segmenter(tmp_checkpoints.parent / "sam.safetensors")))
    assert CachedPredictor(BoxPromptPredictor(sam)).head_predictor() is None  # nothing installed: the box search runs

    save_head_segmenter(_tiny_unet(head_bias=8.0), tmp_checkpoints / "head-unet.safetensors")

    def no_box_search(predictor):
        raise AssertionError("the box search must not run when a head U-Net is installed")

    monkeypatch.setattr(segment, "auto_box", no_box_search)
    image = (np.random.default_rng(1).random((90, 120)) * 255).astype(np.uint8)
    cached = CachedPredictor(BoxPromptPredictor(sam))
    result = segment_head(cached, image, auto=True, pixel_size_mm=0.2)
    assert result.box_source == "auto" and result.box == (0.0, 0.0, 119.0, 89.0)
    assert result.mask.shape == (90, 120) and result.mask.all()
    assert result.measurement.biometry is not None and result.measurement.biometry.hc_mm > 0
    refined_box, refined = segment.auto_head(cached, image, refine_with_box_segmenter=True)
    assert refined_box == result.box and refined.mask.shape == (90, 120)  # the box-prompted segmenter's mask from that box
    with_points = segment_head(cached, image, auto=True, points=[[60, 45]])
    assert with_points.box == result.box and with_points.box_source == "auto"


def test_a_box_prompt_keeps_the_segmenters_mask_where_the_head_unet_sees_no_head(tmp_checkpoints, cpu_placement):
    from fetalstudio.analysis.head import segment_head
    from fetalstudio.analysis.segment import CachedPredictor, box_head
    from fetalstudio.errors import FetalStudioError
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    sam = ModelManager(tmp_checkpoints, placement=cpu_placement).get(str(_tiny_segmenter(tmp_checkpoints.parent / "sam.safetensors")))
    image = (np.random.default_rng(2).random((90, 120)) * 255).astype(np.uint8)
    box = (20, 15, 90, 70)
    alone = CachedPredictor(BoxPromptPredictor(sam), head_model=None)
    plain = segment_head(alone, image, box=box)
    assert not plain.fused_with_head_unet and alone.head_runs == 0  # no U-Net: the segmenter's mask
    np.testing.assert_array_equal(plain.mask, alone.predict(box=box).mask)

    no_head = CachedPredictor(BoxPromptPredictor(sam), head_model=_tiny_unet(head_bias=-8.0))  # sees no head anywhere
    with pytest.raises(FetalStudioError, match="set_image"):
        no_head.head_probability(image)
    no_head.set_image(image)
    prediction, fused = box_head(no_head, image, box)
    assert not fused and no_head.head_runs == 1
    np.testing.assert_array_equal(prediction.mask, plain.mask)
    result = segment_head(no_head, image, box=box)
    assert not result.fused_with_head_unet and no_head.head_runs == 1
    assert result.select(0, None).fused_with_head_unet is False
