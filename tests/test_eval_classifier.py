"""`python -m fetalstudio eval classifier`: metrics with known answers, 4-class labels on a 5-way model."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fetalstudio.cli import main
from fetalstudio.classification.predict import PLANE_CLASSES
from fetalstudio.classification.metrics import classification_metrics, roc_auc

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AFRICAN = SHARED_DATA / "african" / "train"


def _one_hot(predicted: list[str]) -> np.ndarray:
    probabilities = np.full((len(predicted), 5), 0.1)
    for row, name in enumerate(predicted):
        probabilities[row, PLANE_CLASSES.index(name)] = 0.6
    return probabilities


def test_metrics_with_other_predictions_counted_wrong():
    true = ["abdomen", "abdomen", "brain", "brain", "femur", "femur", "thorax", "thorax"]
    predicted = ["abdomen", "other", "brain", "brain", "abdomen", "femur", "other", "thorax"]
    metrics = classification_metrics(true, _one_hot(predicted), PLANE_CLASSES)
    assert metrics["n"] == 8
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["classes_present"] == ["abdomen", "brain", "femur", "thorax"]
    per = metrics["per_class"]
    assert (per["abdomen"]["precision"], per["abdomen"]["recall"], per["abdomen"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (per["brain"]["precision"], per["brain"]["recall"], per["brain"]["f1"]) == pytest.approx((1, 1, 1))
    assert (per["femur"]["precision"], per["femur"]["recall"], per["femur"]["f1"]) == pytest.approx((1, 0.5, 2 / 3))
    assert (per["thorax"]["precision"], per["thorax"]["recall"], per["thorax"]["f1"]) == pytest.approx((1, 0.5, 2 / 3))
    assert metrics["recall"] == pytest.approx(0.625)
    assert metrics["precision"] == pytest.approx(0.875)
    assert metrics["f1"] == pytest.approx(17 / 24)
    assert metrics["confusion_matrix"] == [
        [1, 0, 0, 0, 1],
        [0, 2, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 0, 0, 1, 1],
    ]
    assert metrics["predicted_outside_labels"] == 2
    # abdomen: positives score 0.6 and 0.1; negatives one 0.6 and five 0.1 -> (5 + 0.5 + 2.5) / 12
    assert per["abdomen"]["auc"] == pytest.approx(8 / 12)
    assert per["brain"]["auc"] == pytest.approx(1.0)
    assert metrics["auc"] == pytest.approx(np.mean([per[c]["auc"] for c in metrics["classes_present"]]))


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40) / 5.0  # many ties
    positives = rng.random(40) < 0.4
    pairs = [(s, t) for s, t in itertools.product(scores[positives], scores[~positives])]
    expected = np.mean([1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs])
    assert roc_auc(scores, positives) == pytest.approx(expected)
    assert roc_auc([0.1, 0.2], [True, True]) is None


def _constant_brain_model(path: Path) -> Path:
    """A resnet18 checkpoint that answers "brain" (probability e^5/(e^5+4)) for every image."""
    from fetalstudio.classification.model import ClassifierSpec, build_model, save_classifier
    from fetalstudio.classification.predict import Preprocessing

    spec = ClassifierSpec("resnet18", Preprocessing(input_size=32))
    model, _ = build_model(spec)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0]))
    return save_classifier(model, path, spec)


@pytest.mark.skipif(not (AFRICAN / "labels.csv").is_file(), reason="shared data not present")
def test_eval_cli_on_african_style_labels(tmp_path, tmp_checkpoints):
    model = _constant_brain_model(tmp_checkpoints / "brain-only.safetensors")
    with (AFRICAN / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    wanted = {"abdomen": 2, "brain": 3, "femur": 1, "thorax": 2}
    chosen = [r for plane, k in wanted.items() for r in [r for r in rows if r["plane"] == plane][:k]]
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "plane"])
        for row in chosen:
            writer.writerow([str(AFRICAN / row["filename"]), row["plane"]])
    out, summary = tmp_path / "report", tmp_path / "summary.json"
    assert main(["eval", "classifier", "--model", str(model), "--data", str(table), "--out", str(out),
                 "--json", str(summary), "--device", "cpu"]) == 0
    result = json.loads(summary.read_text())
    assert set(result) == {"accuracy", "recall", "precision", "f1", "auc", "n"}
    assert result["n"] == 8
    assert result["accuracy"] == pytest.approx(3 / 8)
    assert result["recall"] == pytest.approx(1 / 4)
    assert result["precision"] == pytest.approx((3 / 8) / 4)
    assert result["f1"] == pytest.approx((2 * (3 / 8) / (3 / 8 + 1)) / 4)
    assert result["auc"] == pytest.approx(0.5)  # every image gets the same scores
    for name in ("report.md", "metrics.json", "per_class.csv", "confusion_matrix.csv", "predictions.csv",
                 "confusion_matrix.png", "per_class.png", "roc.png"):
        assert (out / name).is_file(), name
    with (out / "confusion_matrix.csv").open(newline="") as handle:
        matrix = list(csv.reader(handle))
    assert matrix[0] == ["true \\ predicted", *PLANE_CLASSES]
    assert matrix[1:] == [["abdomen", "0", "2", "0", "0", "0"], ["brain", "0", "3", "0", "0", "0"],
                          ["femur", "0", "1", "0", "0", "0"], ["thorax", "0", "2", "0", "0", "0"]]
    assert "| 0.3750 |" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["preprocessing"]["crop"] == "none"  # no crop in its metadata


def test_eval_cli_refuses_labels_the_model_lacks(tmp_path, tmp_checkpoints, capsys):
    from PIL import Image

    model = _constant_brain_model(tmp_checkpoints / "brain-only.safetensors")
    (tmp_path / "data" / "cervix").mkdir(parents=True)
    Image.new("L", (20, 20)).save(tmp_path / "data" / "cervix" / "a.png")
    code = main(["eval", "classifier", "--model", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert code == 2 and "cervix" in capsys.readouterr().err
