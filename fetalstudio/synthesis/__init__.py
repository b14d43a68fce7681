"""Synthesis workflow: prompt-based generation of fetal planes with SD + LoRA (FU-LoRA)."""

from fetalstudio.synthesis.engine import SynthesisEngine
from fetalstudio.synthesis.samplers import SAMPLERS, parse_sampler
from fetalstudio.synthesis.settings import GeneratedImage, GenerationResult, GenerationSettings, LoraSpec

__all__ = ["SAMPLERS", "GeneratedImage", "GenerationResult", "GenerationSettings", "LoraSpec", "SynthesisEngine", "parse_sampler"]
