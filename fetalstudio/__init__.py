"""FetalStudio: synthesis and annotation of fetal ultrasound images.

The library has no UI imports; ``fetalstudio.ui`` is a thin Gradio shell over it.
"""

__version__ = "0.1.0"
