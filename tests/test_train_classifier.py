"""`python -m fetalstudio train classifier` on a few shared images at a tiny size (CPU, seconds)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fetalstudio.cli import main
from fetalstudio.classification.predict import PLANE_CLASSES, PlaneClassifier

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPANISH = SHARED_DATA / "spanish_planes"
AFRICAN = SHARED_DATA / "african" / "train"

pytestmark = pytest.mark.skipif(not (SPANISH / "labels.csv").is_file(), reason="shared data not present")

TINY = ["--input-size", "32", "--batch-size", "4", "--log-every", "1", "--threads", "1"]


def _spanish_rows(per_plane: int) -> list[dict]:
    with (SPANISH / "labels.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    chosen, seen = [], {}
    for row in rows:
        if seen.get(row["plane"], 0) < per_plane:
            seen[row["plane"]] = seen.get(row["plane"], 0) + 1
            chosen.append(row)
    return chosen


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    """10 shared Spanish images (2 per plane), absolute paths, downscaled copies for speed."""
    folder = tmp_path_factory.mktemp("spanish10")
    path = folder / "labels.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "plane"])
        for row in _spanish_rows(2):
            target = folder / Path(row["filename"]).name
            with Image.open(SPANISH / row["filename"]) as image:
                image.resize((image.width // 4, image.height // 4)).save(target)
            writer.writerow([str(target), row["plane"]])
    return path


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory) -> Path:
    """A folder laid out like `generate` output: OUT/<plane>/<sampler>/*.png (random images)."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    for plane in PLANE_CLASSES:
        folder = root / plane / "euler"
        folder.mkdir(parents=True)
        for index in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"{plane}_euler_{index:05d}.png")
    return root


def _train(out: Path, *extra: str) -> int:
    return main(["train", "classifier", "--out", str(out), *TINY, *extra])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_100"])
def test_train_loads_through_model_manager_and_predicts(backbone, small_csv, tmp_path, tmp_checkpoints, cpu_placement):
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager

    out = tmp_path / backbone
    assert _train(out, "--data", str(small_csv), "--backbone", backbone, "--steps", "2") == 0
    checkpoint = out / "model.safetensors"
    assert checkpoint.is_file() and (out / "README.md").is_file() and (out / "train_log.csv").is_file()
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    assert manager.entry(checkpoint).kind is ModelKind.CLASSIFIER
    model = manager.get(checkpoint)
    classifier = PlaneClassifier(model)
    assert classifier.classes == PLANE_CLASSES
    assert classifier.preprocessing.in_chans == 1 and classifier.preprocessing.input_size == 32
    images = [Image.open(SPANISH / row["filename"]) for row in _spanish_rows(1)[:2]]
    predictions = classifier.predict(images)
    assert len(predictions) == 2
    for prediction in predictions:
        assert list(prediction) == list(PLANE_CLASSES)
        assert sum(prediction.values()) == pytest.approx(1.0, abs=1e-5)
    top = classifier.top_k(images, k=3)
    assert [len(t) for t in top] == [3, 3] and top[0][0][1] >= top[0][1][1] >= top[0][2][1]
    summary = _summary(out)
    assert summary["finished"] and summary["step"] == 2 and summary["sources"][0]["drawn"]["total"] == 8


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_after_interruption_continues_from_saved_step(small_csv, tmp_path):
    common = ["--data", str(small_csv), "--backbone", "resnet18", "--save-every", "100", "--ema", "0.9"]  # EMA resumes too
    straight = tmp_path / "straight"
    assert _train(straight, *common, "--steps", "4") == 0

    interrupted = tmp_path / "interrupted"
    assert _train(interrupted, *common, "--steps", "4", "--stop-after", "2") == 0
    first = _summary(interrupted)
    assert not first["finished"] and first["step"] == 2
    assert json.loads((interrupted / "state" / "progress.json").read_text())["step"] == 2
    assert _train(interrupted, *common, "--steps", "4") == 0
    second = _summary(interrupted)
    assert second["resumed_from"] == 2 and second["step"] == 4 and second["finished"]
    logged = [line.split(",")[0] for line in (interrupted / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == ["1", "2", "3", "4"]  # no step trained twice
    a, b = _weights(straight / "model.safetensors"), _weights(interrupted / "model.safetensors")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)  # same result as without the stop

    assert _train(interrupted, *common, "--steps", "6") == 0  # more steps continue from the saved step
    third = _summary(interrupted)
    assert third["resumed_from"] == 4 and third["step"] == 6
    assert third["sources"][0]["drawn"]["total"] == 6 * 4


def test_real_and_synthetic_shares_are_honoured(small_csv, synthetic_folder, tmp_path):
    out = tmp_path / "mixed"
    args = ["--data", f"{small_csv}:0.25", "--data", f"{synthetic_folder}:0.75", "--backbone", "resnet18",
            "--steps", "4", "--batch-size", "50", "--log-every", "4"]
    assert main(["train", "classifier", "--out", str(out), "--input-size", "32", "--threads", "1", *args]) == 0
    sources = _summary(out)["sources"]
    assert [s["images"] for s in sources] == [10, 10]
    drawn = [s["drawn"]["total"] for s in sources]
    assert sum(drawn) == 4 * 50
    assert abs(drawn[0] - 50) <= 20  # expected 50 of 200 (binomial sd about 6)

    from fetalstudio.training.classifier import MixtureSampler, Source, count_draws

    # The sampler itself over many steps: shares within 1 %, planes balanced inside each source
    # even when a source is unbalanced.
    labels_a = [0] * 40 + [1] * 5 + [2] * 5
    labels_b = [0, 1, 2, 3, 4] * 4
    sources = [Source(Path("a"), 0.3, [None] * len(labels_a), labels_a), Source(Path("b"), 0.7, [None] * 20, labels_b)]
    sampler = MixtureSampler(sources, seed=1, balance=True)
    counts = count_draws(sampler, sources, steps=1000, batch_size=32, classes=PLANE_CLASSES)
    total = sum(c["total"] for c in counts)
    assert abs(counts[0]["total"] / total - 0.3) < 0.01
    per_plane_a = counts[0]["per_plane"]
    assert per_plane_a["thorax"] == per_plane_a["other"] == 0
    assert max(per_plane_a["abdomen"], per_plane_a["brain"], per_plane_a["femur"]) / min(
        per_plane_a["abdomen"], per_plane_a["brain"], per_plane_a["femur"]) < 1.1
    assert sampler.draw(7, 32) == MixtureSampler(sources, seed=1, balance=True).draw(7, 32)  # redrawable


def test_pooled_sources_share_the_rest_beside_a_shared_source(small_csv, synthetic_folder):
    from fetalstudio.training.classifier import MixtureSampler, count_draws, load_sources

    hc18 = SHARED_DATA / "hc18_heads" / "pairs.csv"
    sources = load_sources([str(small_csv), f"{hc18}=brain", f"{synthetic_folder}:0.5"], PLANE_CLASSES)
    assert [s.share for s in sources] == [None, None, 0.5]
    sampler = MixtureSampler(sources, seed=3, balance=True)
    counts = count_draws(sampler, sources, steps=400, batch_size=32, classes=PLANE_CLASSES)
    total = sum(c["total"] for c in counts)
    assert abs(counts[2]["total"] / total - 0.5) < 0.02  # the synthetic share
    real = {plane: counts[0]["per_plane"][plane] + counts[1]["per_plane"][plane] for plane in PLANE_CLASSES}
    assert max(real.values()) / min(real.values()) < 1.15  # the pool's planes balanced over both real sources
    assert counts[1]["per_plane"]["brain"] > 5 * counts[0]["per_plane"]["brain"]  # 805 heads vs 2 Spanish brains
    synthetic = counts[2]["per_plane"]
    assert max(synthetic.values()) / min(synthetic.values()) < 1.15
    assert sampler.draw(9, 16) == MixtureSampler(sources, seed=3, balance=True).draw(9, 16)
    flat = MixtureSampler(sources, seed=3, balance=False)
    drawn = count_draws(flat, sources, steps=200, batch_size=32, classes=PLANE_CLASSES)
    assert drawn[1]["total"] > 20 * max(1, drawn[0]["total"]) / 2  # unbalanced: every pooled image equally likely


def test_data_arguments_are_checked(small_csv, synthetic_folder, tmp_path, capsys):
    from fetalstudio.training.classifier import parse_data_argument

    assert parse_data_argument("/a/b:c/d") == (Path("/a/b:c/d"), None)
    assert parse_data_argument("/a/b:0.3") == (Path("/a/b"), 0.3)
    out = str(tmp_path / "x")
    assert _train(Path(out), "--data", f"{small_csv}:1.5", "--data", str(synthetic_folder), "--steps", "1") == 2
    assert "add up to less than 1" in capsys.readouterr().err
    assert _train(Path(out), "--data", str(small_csv), "--val", str(small_csv), "--steps", "1") == 2
    assert "never be trained on" in capsys.readouterr().err
    odd = tmp_path / "odd"
    shutil.copytree(synthetic_folder, odd)
    (odd / "head_first").mkdir()
    shutil.copy(next((odd / "brain" / "euler").glob("*.png")), odd / "head_first" / "h.png")
    assert _train(Path(out), "--data", str(odd), "--steps", "1") == 2
    assert "unknown plane(s) head_first" in capsys.readouterr().err
    assert _train(Path(out), "--data", str(small_csv), "--backbone", "no_such_net", "--steps", "1") == 2
    assert "timm has no model" in capsys.readouterr().err


def test_validation_selects_checkpoint(small_csv, tmp_path):
    rows = [r for r in csv.DictReader((AFRICAN / "labels.csv").open(newline=""))][:6]
    val = tmp_path / "val.csv"
    with val.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "plane"])
        for row in rows:
            writer.writerow([str(AFRICAN / row["filename"]), row["plane"]])
    out = tmp_path / "val-run"
    assert _train(out, "--data", str(small_csv), "--val", str(val), "--val-every", "1", "--steps", "3") == 0
    validation = _summary(out)["validation"]
    assert sorted(validation["history"], key=int) == ["1", "2", "3"]
    best = max(validation["history"].values(), key=lambda r: (r["accuracy"], r["f1"]))
    assert validation["selected"]["accuracy"] == best["accuracy"]
    assert (out / "last.safetensors").is_file()
    from fetalstudio.classification.model import read_spec
    from fetalstudio.models.inspect import read_safetensors_header

    training = json.loads(read_safetensors_header(out / "model.safetensors")[1]["fetalstudio.training"])
    assert training["selected_step"] == validation["selected"]["step"]
    assert read_spec(out / "model.safetensors").preprocessing.input_size == 32


def test_local_pretrained_weights_are_used(small_csv, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = timm.create_model("resnet18", pretrained=False)  # stands in for downloaded ImageNet weights
    file = tmp_path / "resnet18_weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    out = tmp_path / "pre"
    assert _train(out, "--data", str(small_csv), "--pretrained", str(file), "--steps", "1", "--lr", "1e-9") == 0
    report = _summary(out)["pretrained"]
    assert report["tensors_loaded"] == report["backbone_tensors"] and not report["head_loaded"]
    trained = _weights(out / "model.safetensors")
    expected_stem = source.state_dict()["conv1.weight"].sum(dim=1, keepdim=True)  # RGB -> grayscale
    assert torch.allclose(trained["conv1.weight"], expected_stem, atol=1e-5)
    assert torch.allclose(trained["layer3.0.conv1.weight"], source.state_dict()["layer3.0.conv1.weight"], atol=1e-5)
    assert trained["fc.weight"].shape == (5, 512)

    wrong = tmp_path / "mobilenet.safetensors"
    other = timm.create_model("mobilenetv2_100", pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    assert _train(tmp_path / "wrong", "--data", str(small_csv), "--pretrained", str(wrong), "--steps", "1") == 2
    message = capsys.readouterr().err
    assert "do not fit resnet18" in message and "--pretrained" in message
    assert _train(tmp_path / "missing", "--data", str(small_csv), "--pretrained", str(tmp_path / "nope.pth"), "--steps", "1") == 2
    assert "does not exist" in capsys.readouterr().err


def test_linear_probe_keeps_the_backbone_then_trains_it_at_its_own_scale(small_csv, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    source = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    file = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    conv = "layer2.0.conv1.weight"

    probe = tmp_path / "probe"
    assert _train(probe, "--data", str(small_csv), "--pretrained", str(file), "--steps", "3", "--linear-probe-steps", "2",
                  "--stop-after", "2", "--lr", "1e-2") == 0
    after_probe = _weights(probe / "model.safetensors")
    assert torch.equal(after_probe[conv], source.state_dict()[conv])  # the backbone was not moved by the probe
    assert not torch.allclose(after_probe["fc.weight"], torch.zeros_like(after_probe["fc.weight"]))  # the head was trained
    assert _train(probe, "--data", str(small_csv), "--pretrained", str(file), "--steps", "3", "--linear-probe-steps", "2", "--lr", "1e-2") == 0
    assert not torch.allclose(_weights(probe / "model.safetensors")[conv], source.state_dict()[conv])  # resumed: step 3 trains it
    summary = _summary(probe)
    assert summary["settings"]["linear_probe_steps"] == 2 and summary["resumed_from"] == 2
    assert "head alone for the first 2 steps" in (probe / "README.md").read_text()
    logged = [float(row.split(",")[2]) for row in (probe / "train_log.csv").read_text().splitlines()[1:]]
    assert all(lr > 0 for lr in logged)  # the logged rate is the head's, which trains from step 1

    def moved(scale: str) -> float:
        out = tmp_path / f"scale{scale}"
        assert _train(out, "--data", str(small_csv), "--pretrained", str(file), "--steps", "2", "--warmup", "0",
                      "--backbone-lr-scale", scale, "--lr", "1e-3") == 0
        return float((_weights(out / "model.safetensors")[conv] - source.state_dict()[conv]).abs().max())

    # Adam's first steps move each weight by about the learning rate, so the backbone moves about 10x less at scale 0.1
    assert 5 < moved("1.0") / moved("0.1") < 20

    assert _train(tmp_path / "bad1", "--data", str(small_csv), "--steps", "3", "--linear-probe-steps", "3") == 2
    assert "--linear-probe-steps" in capsys.readouterr().err
    assert _train(tmp_path / "bad2", "--data", str(small_csv), "--steps", "3", "--backbone-lr-scale", "0") == 2
    assert "--backbone-lr-scale" in capsys.readouterr().err
