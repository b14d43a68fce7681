"""train ssl: SimCLR pretraining on unlabelled real images, resumable, its backbone fine-tuned by train classifier."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fetalstudio.cli import main

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPANISH = SHARED_DATA / "spanish_planes"
HC18 = SHARED_DATA / "hc18_heads"
AFRICAN = SHARED_DATA / "african" / "train"

pytestmark = pytest.mark.skipif(not (SPANISH / "labels.csv").is_file(), reason="shared data not present")

TINY = ["--input-size", "32", "--batch-size", "4", "--log-every", "1", "--threads", "1", "--hidden-dim", "32", "--projection-dim", "16"]


@pytest.fixture(scope="module")
def unlabelled_csv(tmp_path_factory) -> Path:
    """8 real images (Spanish planes and HC18 heads), downscaled, listed in an image-column CSV without labels."""
    folder = tmp_path_factory.mktemp("unlabelled")
    spanish = sorted(SPANISH.glob("*/*.png"))[::20][:4]
    heads = sorted((HC18 / "images").glob("*.png"))[:4]
    path = folder / "images.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image"])
        for source in spanish + heads:
            with Image.open(source) as image:
                image.resize((image.width // 4, image.height // 4)).save(folder / source.name)
            writer.writerow([source.name])
    return path


def _ssl(out: Path, data: Path, *extra: str) -> int:
    return main(["train", "ssl", "--data", str(data), "--out", str(out), *TINY, *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_simclr_trains_resumes_exactly_and_writes_a_timm_backbone(unlabelled_csv, tmp_path):
    import timm
    from safetensors import safe_open

    straight = tmp_path / "straight"
    assert _ssl(straight, unlabelled_csv, "--steps", "4", "--crop", "fan") == 0
    interrupted = tmp_path / "interrupted"
    assert _ssl(interrupted, unlabelled_csv, "--steps", "4", "--crop", "fan", "--stop-after", "2") == 0
    assert json.loads((interrupted / "summary.json").read_text())["step"] == 2
    assert _ssl(interrupted, unlabelled_csv, "--steps", "4", "--crop", "fan") == 0
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"] == 2 and summary["images"] == 8
    logged = [line.split(",")[0] for line in (interrupted / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == ["1", "2", "3", "4"]
    a, b = _weights(straight / "backbone.safetensors"), _weights(interrupted / "backbone.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a if a[k].is_floating_point())

    reference = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1).state_dict()
    assert set(a) == set(reference) and all(a[k].shape == reference[k].shape for k in a)  # the backbone, no head
    untrained = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    assert not torch.allclose(a["layer1.0.conv1.weight"], untrained.state_dict()["layer1.0.conv1.weight"])
    with safe_open(str(straight / "backbone.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["fetalstudio.kind"] == "backbone" and metadata["fetalstudio.crop"] == "fan"
    assert "train classifier --pretrained" in (straight / "README.md").read_text()


def test_the_backbone_is_fine_tuned_by_train_classifier(unlabelled_csv, tmp_path):
    ssl = tmp_path / "ssl"
    assert _ssl(ssl, unlabelled_csv, "--steps", "2") == 0
    out = tmp_path / "classifier"
    assert main(["train", "classifier", "--data", str(SPANISH), "--pretrained", str(ssl / "backbone.safetensors"),
                 "--input-size", "32", "--batch-size", "4", "--steps", "1", "--lr", "1e-9", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "summary.json").read_text())["pretrained"]
    assert report["tensors_loaded"] == report["backbone_tensors"] and not report["head_loaded"]
    trained, pretrained = _weights(out / "model.safetensors"), _weights(ssl / "backbone.safetensors")
    assert torch.allclose(trained["layer3.0.conv1.weight"].float(), pretrained["layer3.0.conv1.weight"], atol=1e-4)


def test_bad_inputs_are_refused_with_what_to_do(unlabelled_csv, tmp_path, capsys):
    assert _ssl(tmp_path / "a", AFRICAN / "labels.csv", "--steps", "1") == 2
    assert "African" in capsys.readouterr().err
    assert _ssl(tmp_path / "b", tmp_path / "missing.csv", "--steps", "1") == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "ssl", "--data", str(unlabelled_csv), "--out", str(tmp_path / "c"), "--batch-size", "1", "--steps", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert _ssl(tmp_path / "d", unlabelled_csv, "--steps", "1", "--temperature", "0") == 2
    assert "--temperature" in capsys.readouterr().err
    assert _ssl(tmp_path / "e", unlabelled_csv, "--steps", "2") == 0
    assert _ssl(tmp_path / "e", unlabelled_csv, "--steps", "3", "--input-size", "48") == 2  # another network: not resumed
    assert "other settings" in capsys.readouterr().err


def test_pretraining_goes_on_from_an_earlier_backbone_with_its_steps_counted(unlabelled_csv, tmp_path, capsys):
    from safetensors import safe_open

    first = tmp_path / "first"
    assert _ssl(first, unlabelled_csv, "--steps", "2", "--crop", "fan") == 0
    earlier = first / "backbone.safetensors"
    second = tmp_path / "second"
    assert _ssl(second, unlabelled_csv, "--steps", "1", "--crop", "fan", "--pretrained", str(earlier), "--lr", "1e-9", "--warmup", "0") == 0
    assert "2 SimCLR steps" in capsys.readouterr().out
    before, after = _weights(earlier), _weights(second / "backbone.safetensors")
    # one step at a vanishing learning rate: the weights are the earlier backbone's (batch-norm statistics move on)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before if k.endswith("conv1.weight"))
    assert _ssl(tmp_path / "fresh", unlabelled_csv, "--steps", "1", "--crop", "fan", "--lr", "1e-9", "--warmup", "0") == 0
    fresh = _weights(tmp_path / "fresh" / "backbone.safetensors")
    assert not torch.allclose(fresh["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    with safe_open(str(second / "backbone.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["fetalstudio.steps"] == "3" and metadata["fetalstudio.pretrained"] == str(earlier)
    summary = json.loads((second / "summary.json").read_text())
    assert summary["earlier_steps"] == 2 and summary["settings"]["pretrained"] == str(earlier)
    assert "2 SimCLR steps before these" in (second / "README.md").read_text()


def test_pretraining_on_refuses_another_preprocessing_or_architecture(unlabelled_csv, tmp_path, capsys):
    first = tmp_path / "first"
    assert _ssl(first, unlabelled_csv, "--steps", "1", "--crop", "fan") == 0
    earlier = first / "backbone.safetensors"
    assert _ssl(tmp_path / "a", unlabelled_csv, "--steps", "1", "--pretrained", str(earlier)) == 2  # crop none
    error = capsys.readouterr().err
    assert "crop fan (this run: none)" in error and "--crop" in error
    assert _ssl(tmp_path / "b", unlabelled_csv, "--steps", "1", "--crop", "fan", "--input-size", "48", "--pretrained", str(earlier)) == 2
    assert "input size 32 (this run: 48)" in capsys.readouterr().err
    assert _ssl(tmp_path / "c", unlabelled_csv, "--steps", "1", "--crop", "fan", "--backbone", "resnet34", "--pretrained", str(earlier)) == 2
    assert "do not fit" in capsys.readouterr().err
    assert _ssl(tmp_path / "d", unlabelled_csv, "--steps", "1", "--pretrained", str(tmp_path / "missing.safetensors")) == 2
    assert "does not exist" in capsys.readouterr().err
