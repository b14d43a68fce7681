"""Plane classification of real images with the bundled classifiers, alone and as an ensemble."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.analysis.classify import EnsembleClassifier
from fetalstudio.classification.predict import PlaneClassifier
from fetalstudio.errors import FetalStudioError

try:
    from tests.data_support import DATA, needs_data
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, needs_data

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
PLANES = ("abdomen", "brain", "femur", "thorax", "other")
pytestmark = [needs_data, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def classifiers():
    import torch

    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.manager import ModelManager

    manager = ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32))
    return [PlaneClassifier(manager.get(i)) for i in ("fetalstudio-plane-classifier", "fetalstudio-plane-classifier-real-only")]


def _african_images(per_plane: int = 4):
    """African planes (validation data, never trained on): the first images of each plane."""
    import csv

    with (DATA / "african" / "train" / "labels.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    chosen = [r for plane in ("abdomen", "brain", "femur", "thorax") for r in [x for x in rows if x["plane"] == plane][:per_plane]]
    return [Image.open(DATA / "african" / "train" / r["filename"]).convert("L") for r in chosen], [r["plane"] for r in chosen]


def test_each_bundled_classifier_and_their_ensemble_beat_chance(classifiers):
    images, truth = _african_images()
    ensemble = EnsembleClassifier(classifiers)
    for model in (*classifiers, ensemble):
        top = model.top_k(images, k=3)
        assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for t in top)
        accuracy = np.mean([t[0][0] == plane for t, plane in zip(top, truth)])
        assert accuracy > 0.25, (model, accuracy)  # chance: 1/4 here (the model has 5 outputs)
    members = [m.probabilities(images) for m in classifiers]
    np.testing.assert_allclose(ensemble.probabilities(images), (members[0] + members[1]) / 2, rtol=1e-6)
    assert all(abs(sum(p.values()) - 1) < 1e-4 for p in ensemble.predict(images))


def test_an_ensemble_refuses_members_with_other_classes(classifiers):
    class Other:
        classes = ("head", "not head")

    with pytest.raises(FetalStudioError, match="do not share their classes"):
        EnsembleClassifier([classifiers[0], Other()])
    with pytest.raises(FetalStudioError, match="at least one"):
        EnsembleClassifier([])
