"""The analysis models from the model manager: a plane classifier (one checkpoint or an ensemble)
and a box-prompt predictor for a segmenter (the bundled one or a SAM vit_b/l/h .pth)."""

from __future__ import annotations

from collections.abc import Sequence

from fetalstudio.analysis.batch import BatchSettings
from fetalstudio.analysis.classify import EnsembleClassifier
from fetalstudio.analysis.segment import CachedPredictor
from fetalstudio.classification.predict import PlaneClassifier, PlaneRanking
from fetalstudio.errors import FetalStudioError
from fetalstudio.models.entries import ModelKind
from fetalstudio.models.manager import ModelManager
from fetalstudio.segmentation.predictor import BoxPromptPredictor


SEGMENTER_KINDS = (ModelKind.SEGMENTER, ModelKind.SAM)


def _check_kind(manager: ModelManager, model_id: str, kinds: tuple[ModelKind, ...], what: str) -> str:
    entry = manager.entry(model_id)
    if entry.kind not in kinds:
        raise FetalStudioError(f"{model_id} is a {entry.kind.value} model, not a {what}. "
                               "See `python -m fetalstudio models` for the ids of each kind.")
    return entry.id


def classifier_choices(manager: ModelManager) -> list[str]:
    return manager.ids(ModelKind.CLASSIFIER)


def segmenter_choices(manager: ModelManager) -> list[str]:
    """The bundled/trained segmenters and any SAM checkpoints (vit_b/l/h, MedSAM): one code path for all."""
    return [model_id for kind in SEGMENTER_KINDS for model_id in manager.ids(kind)]


def classifier_ids(manager: ModelManager, ids: Sequence[str] = ()) -> list[str]:
    """The given ids (or paths), or the manifest's default classifier."""
    chosen = list(ids) or [manager.default_id(ModelKind.CLASSIFIER)]
    return [_check_kind(manager, model_id, (ModelKind.CLASSIFIER,), "plane classifier") for model_id in chosen]


def load_plane_classifier(manager: ModelManager, ids: Sequence[str] = ()) -> PlaneRanking:
    """One classifier, or the ensemble (mean probabilities) of several."""
    members = [PlaneClassifier(manager.get(model_id)) for model_id in classifier_ids(manager, ids)]
    return members[0] if len(members) == 1 else EnsembleClassifier(members)


def segmenter_id(manager: ModelManager, model_id: str | None = None) -> str:
    return _check_kind(manager, model_id or manager.default_id(ModelKind.SEGMENTER), SEGMENTER_KINDS, "segmenter (or SAM checkpoint)")


def load_head_predictor(manager: ModelManager, model_id: str | None = None) -> BoxPromptPredictor:
    return BoxPromptPredictor(manager.get(segmenter_id(manager, model_id)))


def batch_models(
    manager: ModelManager,
    *,
    classify: bool,
    segment: bool,
    classifiers: Sequence[str] = (),
    segmenter: str | None = None,
    pixel_size_mm: float | None = None,
    overlays: bool = True,
    formats: Sequence[str] = (),
    measure_heads_only: bool = False,
) -> tuple[BatchSettings, PlaneRanking | None, CachedPredictor | None]:
    """The settings of a batch run (recording the resolved model ids, so a resumed run must use the
    same models) and the models it needs, for the CLI and the tab alike."""
    chosen_classifiers = classifier_ids(manager, classifiers) if classify else []
    chosen_segmenter = segmenter_id(manager, segmenter) if segment else ""
    settings = BatchSettings(classify=classify, segment=segment, pixel_size_mm=pixel_size_mm, classifier=",".join(chosen_classifiers),
                             segmenter=chosen_segmenter, overlays=overlays, formats=tuple(formats),
                             measure_heads_only=measure_heads_only)
    classifier = load_plane_classifier(manager, chosen_classifiers) if classify else None
    predictor = CachedPredictor(load_head_predictor(manager, chosen_segmenter), capacity=1, manager=manager) if segment else None
    return settings, classifier, predictor
