"""Evaluation commands: `python -m fetalstudio eval classifier|segmenter|synthesis` (report folders).

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

COMMANDS = {
    "classifier": ("fetalstudio.evaluation.classifier", "accuracy, recall, precision, F-score, AUC, confusion matrix"),
    "segmenter": ("fetalstudio.evaluation.segmenter", "Dice per image and HC error in mm"),
    "synthesis": ("fetalstudio.evaluation.synthesis", "classifier accuracy on generated images, feature Fréchet distance, diversity, t-SNE"),
}
