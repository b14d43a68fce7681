"""Plane-classification metrics: accuracy, per-class recall/precision/F-score, ROC curves and AUC, the confusion matrix.

Used by ``eval classifier`` and by ``train classifier``'s validation; plain numbers in, plain
numbers out (numpy only).
"""

from __future__ import annotations

from collections.abc import Sequence

from fetalstudio.errors import FetalStudioError

HEADLINE = ("accuracy", "recall", "precision", "f1", "auc", "n")


def roc_auc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks); None without both classes."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    start = 0
    while start < len(scores):  # average ranks of tied scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], positives: Sequence[bool]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) points, from (0, 0) to (1, 1)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = max(1, int(positives.sum())), max(1, int((~positives).sum()))
    points = [(0.0, 0.0)]
    for threshold in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= threshold
        points.append((float((chosen & ~positives).sum() / n_neg), float((chosen & positives).sum() / n_pos)))
    if points[-1] != (1.0, 1.0):
        points.append((1.0, 1.0))
    return points


def classification_metrics(true_labels: Sequence[str], probabilities, classes: Sequence[str]) -> dict:
    """Metrics of N predictions (``probabilities`` N x len(classes)) against N true class names.

    Only classes present in ``true_labels`` are averaged over; predictions of any other class
    count as wrong.
    """
    import numpy as np

    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = list(classes)
    if probabilities.ndim != 2 or probabilities.shape != (len(true_labels), len(classes)):
        raise ValueError(f"probabilities must be {len(true_labels)} x {len(classes)}, got {probabilities.shape}")
    unknown = sorted(set(true_labels) - set(classes))
    if unknown:
        raise FetalStudioError(
            f"The labels use classes the model does not have: {', '.join(unknown)}. The model's classes: {', '.join(classes)}."
        )
    present = [c for c in classes if c in set(true_labels)]
    true = np.asarray([classes.index(t) for t in true_labels], dtype=np.int64)
    predicted = probabilities.argmax(axis=1) if len(true) else np.zeros(0, dtype=np.int64)
    per_class = {}
    for name in present:
        index = classes.index(name)
        tp = int(((predicted == index) & (true == index)).sum())
        fp = int(((predicted == index) & (true != index)).sum())
        fn = int(((predicted != index) & (true == index)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "support": int((true == index).sum()), "predicted": tp + fp, "tp": tp,
            "precision": precision, "recall": recall, "f1": f1,
            "auc": roc_auc(probabilities[:, index], true == index),
        }
    confusion = [[int(((true == classes.index(t)) & (predicted == j)).sum()) for j in range(len(classes))] for t in present]
    aucs = [v["auc"] for v in per_class.values() if v["auc"] is not None]

    def macro(key: str) -> float:
        return float(np.mean([v[key] for v in per_class.values()])) if per_class else float("nan")

    return {
        "n": int(len(true)),
        "accuracy": float((predicted == true).mean()) if len(true) else float("nan"),
        "recall": macro("recall"),
        "precision": macro("precision"),
        "f1": macro("f1"),
        "auc": float(np.mean(aucs)) if aucs else None,
        "classes_present": present,
        "model_classes": classes,
        "per_class": per_class,
        "confusion_matrix": confusion,
        "predicted_outside_labels": int(sum(1 for p in predicted if classes[p] not in per_class)),
    }


def headline(metrics: dict) -> dict:
    return {key: metrics[key] for key in HEADLINE}
