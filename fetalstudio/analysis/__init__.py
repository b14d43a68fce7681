"""The Analysis workflow (the Analysis tab and ``analyze`` CLI): a user's own images through plane
classification, box-prompted segmentation and head biometry, one at a time or as a batch folder.

- ``session``: one image's analysis (``AnalysisSession``); ``head``: segment a head, fit its
  ellipse, measure HC/BPD/OFD with warnings; ``picture``: the picture with mask, axes, box, points.
- ``segment``: ``CachedPredictor`` (one image-encoder run per image, an LRU of embeddings by image
  hash, then cheap box/point prompts) and ``auto_box`` (a head box without user input).
- ``classify``: ``EnsembleClassifier``, the mean of several plane classifiers' probabilities;
  ``saliency``: where a classifier looked; ``models``: the default model choices.
- ``batch``: a folder or CSV of images, resumable, with a results table; ``mask_export``: its masks
  as PNG, COCO, YOLO and nnU-Net; ``analyze_cli``: the ``analyze`` command.

Layer 3 (a workflow): may import app_context/cli_args, pipelines, classification, segmentation,
models, imaging, data, vocabulary, paths, errors; never its siblings synthesis and review, nor
training, evaluation, cli or ui. Image reading lives in ``fetalstudio.imaging.image_input``.
"""
