"""The Mask review workflow (the Mask review tab and ``extract`` CLI, METHODS section 2): image+mask
pairs (generated or imported) in a crash-safe review session, reviewed, corrected and exported.

- ``pairs``: generate pairs with a mask-channel LoRA or import real ones, each through the Ellipse
  Extractor (``fetalstudio.imaging.extract``).
- ``store``: one folder per review session; every decision and edit written atomically
  (``fetalstudio.imaging.files``), with undo/redo and an action log.
- ``corrections``: mask edits (ellipse, threshold, brush, segmenter); ``navigation``: moving
  through items by decision; ``view``: the pictures of an item.
- ``export``: accepted/edited pairs as images/ + masks/ + metadata.csv, nnU-Net v2 and COCO.
- ``extract_cli``: the ``extract`` command (ellipses of a folder of masks).

Layer 3 (a workflow): may import app_context/cli_args, pipelines, classification, segmentation,
models, imaging, data, vocabulary, paths, errors; never its siblings synthesis and analysis, nor
training, evaluation, cli or ui. No UI imports; torch is only needed to generate pairs.
"""
