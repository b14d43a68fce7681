"""Plane classification for the analysis workflow: one checkpoint, or several averaged (an ensemble)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from fetalstudio.classification.predict import PlaneClassifier, PlaneRanking
from fetalstudio.errors import FetalStudioError


class EnsembleClassifier(PlaneRanking):
    """The mean of several classifiers' probabilities (each with its own preprocessing).

    All members must name the same classes in the same order: averaging columns that mean different
    planes would be silently wrong.
    """

    def __init__(self, members: Sequence[PlaneClassifier]) -> None:
        if not members:
            raise FetalStudioError("An ensemble needs at least one classifier.")
        classes = members[0].classes
        for member in members[1:]:
            if member.classes != classes:
                raise FetalStudioError(
                    f"These classifiers do not share their classes ({', '.join(classes)} vs {', '.join(member.classes)}): "
                    "only models with the same classes in the same order can be averaged."
                )
        self.members = tuple(members)
        self.classes = classes

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.mean([member.probabilities(images) for member in self.members], axis=0)
