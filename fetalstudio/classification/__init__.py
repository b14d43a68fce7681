"""Plane classification: timm backbones with a 5-way head (abdomen, brain, femur, thorax, other).

- ``model``: build a backbone (from scratch or from a local pretrained weights file), save and
  read FetalStudio classifier checkpoints (.safetensors whose metadata carries the architecture,
  the class order and the preprocessing).
- ``predict``: ``PlaneClassifier(model).predict(images)`` -> one {plane: probability} per image,
  always with the preprocessing stored in the checkpoint.
- ``augment``: the FU-LoRA paper's traditional augmentation and a stronger domain-shift one.
- ``metrics``: accuracy, F1, ROC AUC and the headline line shared by training and ``eval classifier``.

Training: ``python -m fetalstudio train classifier``; evaluation: ``python -m fetalstudio eval
classifier``. Imports here stay light; torch and timm are imported by the sub-modules.

Layer 6, beside ``segmentation`` (they never import each other): may import models, imaging, data,
vocabulary, paths, errors.
"""

CHECKPOINT_NAME = "model.safetensors"
