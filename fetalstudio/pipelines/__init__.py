"""Diffusion pipelines shared by every workflow that generates images.

What lives here: the prepared pipeline (``prepared.py``: a Stable Diffusion pipeline from the model
manager with this run's LoRA adapters and weights, a sampler built from the model's own scheduler
config, the output colour, cancel/progress, out-of-memory retry and the shared run loop); the
runners over it (``runners.py``: ``TextToImageRunner``, ``ImageToImageRunner``; further kinds share
the loaded components through ``PreparedPipeline.derived`` = diffusers' ``from_pipe``); generation
settings and results (``settings.py``), samplers (``samplers.py``), output colour (``color.py``),
the PNG metadata every image carries for exact reproduction (``metadata.py``), and the image+mask
channel packing used by generators, review pairs and training (``mask_injection.py``); FetalFlex's
sampling (``inpaint.py``: ControlNet RePaint-style inpainting in latent space, OSM re-sampling inside a
mask, ``InpaintRunner``; ``ssa.py``: Perona-Malik scale-space adaptive smoothing of the latents). They
take plain arrays (condition image, ROI mask); layouts and presets live in ``fetalstudio.anatomy``.

What it may import: ``fetalstudio.models``, ``fetalstudio.imaging``, ``fetalstudio.vocabulary``,
``fetalstudio.errors``, ``fetalstudio.paths`` (and libraries). Never a workflow (synthesis, review,
analysis, anatomy), training, evaluation, the app context, the CLI or the UI.
"""
