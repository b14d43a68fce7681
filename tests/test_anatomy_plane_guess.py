"""The Anatomy editor's plane guess on real scans with the bundled models, and without them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetalstudio.anatomy.plane_guess import CLASSIFIER_IDS, DETECTOR_ID, PlaneGuess, guess_plane
from fetalstudio.imaging.image_input import load_image
from fetalstudio.vocabulary import FACIAL_SAGITTAL, TRANS_THALAMIC

try:
    from tests.data_support import DATA, needs_data
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, needs_data

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BUNDLED = CHECKPOINTS / "bundled"
# Validation-split images (never trained on) on which the detector finds all 9 structures.
FACIAL = ("first_trimester_structures/images/56.png", "first_trimester_structures/more/images/134.png")
# HC18 heads the two classifiers call brain planes clearly (mean P(brain) > 0.8).
HEADS = ("hc18_heads/images/191_HC.png", "hc18_heads/images/632_HC.png")
FEMUR = "spanish_planes/femur/Patient00708_Plane5_1_of_1.png"
pytestmark = [needs_data, pytest.mark.usefixtures("one_torch_thread")]


def _cpu_manager(checkpoints: Path):
    import torch

    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.manager import ModelManager

    return ModelManager(checkpoints, placement=DevicePlacement(torch.device("cpu"), torch.float32))


@pytest.fixture(scope="module")
def bundled_manager():
    return _cpu_manager(CHECKPOINTS)


def _guess(manager, relative: str) -> PlaneGuess:
    return guess_plane(manager, load_image(DATA / relative))


@pytest.mark.parametrize("relative", FACIAL)
def test_a_first_trimester_scan_is_facial_sagittal(bundled_manager, relative):
    guess = _guess(bundled_manager, relative)
    assert guess.plane == FACIAL_SAGITTAL, guess.reason
    assert 0.3 <= guess.confidence <= 1
    assert guess.reason.startswith(f"Guessed {FACIAL_SAGITTAL}: the structure detector found 9 of its 9 structures")


@pytest.mark.parametrize("relative", HEADS)
def test_an_hc18_head_is_trans_thalamic(bundled_manager, relative):
    guess = _guess(bundled_manager, relative)
    assert guess.plane == TRANS_THALAMIC, guess.reason
    assert guess.confidence > 0.6
    assert guess.reason.startswith(f"Guessed {TRANS_THALAMIC}: the plane classifiers") and "uncertain" not in guess.reason


def test_a_femur_plane_gives_no_plane_and_says_what_the_models_saw(bundled_manager):
    guess = _guess(bundled_manager, FEMUR)
    assert guess.plane is None and guess.confidence is None
    assert guess.reason.startswith("Could not tell the plane: the structure detector found 0 facial structures")
    assert "most likely femur" in guess.reason and guess.reason.endswith("Choose the plane in the list.")


def _manifest(folder: Path, models: dict[str, tuple[str, Path]]) -> Path:
    """A checkpoints folder whose manifest lists only ``models`` (id -> (kind, absolute path))."""
    folder.mkdir()
    entries = [f'[[model]]\nid = "{model_id}"\nkind = "{kind}"\npath = "{path.as_posix()}"\n'
               for model_id, (kind, path) in models.items()]
    (folder / "manifest.toml").write_text("\n".join(entries), encoding="utf-8")
    return folder


def test_without_any_model_the_reason_names_the_detector(tmp_checkpoints):
    guess = _guess(_cpu_manager(tmp_checkpoints), FACIAL[0])
    assert guess.plane is None and guess.confidence is None
    assert guess.reason.startswith(f"Could not tell the plane: the model {DETECTOR_ID} is missing")
    assert guess.reason.endswith("Choose the plane in the list.")


def test_without_the_classifiers_a_facial_scan_is_still_guessed_and_a_head_names_the_missing_classifier(
        tmp_checkpoints, tmp_path, monkeypatch):
    detector = (DETECTOR_ID, ("detector", BUNDLED / DETECTOR_ID / "detector.safetensors"))
    folder = _manifest(tmp_path / "only-detector", dict([detector]))
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(folder))
    manager = _cpu_manager(folder)
    assert _guess(manager, FACIAL[0]).plane == FACIAL_SAGITTAL
    guess = _guess(manager, HEADS[0])
    assert guess.plane is None
    assert f"the model {CLASSIFIER_IDS[0]} is missing" in guess.reason


def test_a_broken_classifier_file_gives_no_plane_instead_of_an_error(tmp_checkpoints, tmp_path, monkeypatch):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    models = {DETECTOR_ID: ("detector", BUNDLED / DETECTOR_ID / "detector.safetensors"),
              CLASSIFIER_IDS[0]: ("classifier", broken),
              CLASSIFIER_IDS[1]: ("classifier", BUNDLED / CLASSIFIER_IDS[1] / "model.safetensors")}
    folder = _manifest(tmp_path / "broken-classifier", models)
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(folder))
    guess = _guess(_cpu_manager(folder), HEADS[0])
    assert guess.plane is None
    assert guess.reason.startswith(f"Could not tell the plane: the model {CLASSIFIER_IDS[0]} is missing or could not be loaded (")
