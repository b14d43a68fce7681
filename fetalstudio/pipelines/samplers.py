"""Sampler names -> diffusers schedulers, built from the loaded model's own scheduler config.

Building from the model's config keeps its beta schedule and prediction type; only the sampling
algorithm changes, as in A1111's sampler menu.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    key: str  # used in the CLI and metadata.csv
    label: str  # shown in the UI and written to A1111 "Sampler:" fields
    scheduler_class: str
    overrides: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, Sampler] = {
    s.key: s
    for s in (
        Sampler("euler", "Euler", "EulerDiscreteScheduler"),
        Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
        Sampler("ddim", "DDIM", "DDIMScheduler"),
        Sampler(
            "dpmpp_2m_karras",
            "DPM++ 2M Karras",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
    )
}

DEFAULT_SAMPLER = "euler"


def parse_sampler(name: str) -> Sampler:
    """A sampler by key or label, case-insensitive ("unipc", "UniPC", "DPM++ 2M Karras")."""
    wanted = name.strip().lower()
    for sampler in SAMPLERS.values():
        if wanted in (sampler.key, sampler.label.lower()):
            return sampler
    raise ValueError(f"Unknown sampler {name!r}. Choose one of: {', '.join(SAMPLERS)}.")


def make_scheduler(sampler: Sampler | str, base_config: dict[str, Any]):
    """A fresh scheduler instance (schedulers keep per-run state, so never share one)."""
    import diffusers

    if isinstance(sampler, str):
        sampler = parse_sampler(sampler)
    scheduler_class = getattr(diffusers, sampler.scheduler_class)
    config = dict(base_config)
    # DDIM and DDPM default to clipping the predicted x0 to [-1, 1], a pixel-space rule: latents are
    # not in that range, and a model whose own config does not say (fetalstudio-tiny's PNDM config)
    # gave texture noise with DDIM. SD's released configs say clip_sample false; so does the default here.
    config.setdefault("clip_sample", False)
    return scheduler_class.from_config(config, **sampler.overrides)
