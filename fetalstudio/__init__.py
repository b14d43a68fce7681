"""FetalStudio: synthesis and annotation of fetal ultrasound images.

The library has no UI imports; ``fetalstudio.ui`` is a thin Gradio shell over it. Packages are
layered (front ends, training/evaluation, the workflows, app context, pipelines, model
architectures, models, imaging/data, vocabulary/paths, errors): each imports only from layers below
it, as the import-linter contract in pyproject.toml states and tests/test_layers.py checks.
"""

__version__ = "0.1.0"
