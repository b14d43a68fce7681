"""Box-prompted fetal-head segmentation built from segment-anything's classes.

- ``predictor``: ``BoxPromptPredictor``: set an image once, then predict a full-resolution
  mask from a box (and optional points); the same code serves the small model and real SAM.
- ``model``: the small segment-anything ``Sam``'s configs (timm CNN or ViT image encoder), its
  ``.safetensors`` writer, SAM ``.pth`` files and the training-time forward pass. Building a model
  and reading checkpoints back is in ``fetalstudio.models.segmenter`` (the model manager loads them).
- ``scoring``: the evaluation items, prompt boxes (exact/jittered) and Dice/HC scoring shared by
  training and ``eval segmenter``.

Layer 6, beside ``classification`` (they never import each other): may import models, imaging,
data, vocabulary, paths, errors. Importing this package is cheap: torch is imported by
``model``/``predictor`` only. Head ellipses and biometry are in ``fetalstudio.imaging``.
"""
