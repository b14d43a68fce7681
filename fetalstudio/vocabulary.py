"""Domain vocabulary: standard fetal planes, trimesters and the prompts built from them.

Captions follow the papers (../shared/docs/METHODS.md):
- FU-LoRA trained one caption per plane, "a photo of fetal <plane>".
- The mask-guided head paper uses "An ultrasound image of a fetal head, <trimester> trimester".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Plane(str, Enum):
    ABDOMEN = "abdomen"
    BRAIN = "brain"
    FEMUR = "femur"
    THORAX = "thorax"
    OTHER = "other"


class Trimester(str, Enum):
    FIRST = "first"
    SECOND = "second"
    THIRD = "third"


PLANES: tuple[Plane, ...] = tuple(Plane)
TRIMESTERS: tuple[Trimester, ...] = tuple(Trimester)

#: The subject a prompt is about: one of the five planes, or "head" (by trimester).
HEAD_SUBJECT = "head"

DEFAULT_NEGATIVE_PROMPT = ""


def plane_caption(plane: Plane | str) -> str:
    """FU-LoRA's training caption for a plane, e.g. "a photo of fetal abdomen"."""
    return f"a photo of fetal {parse_plane(plane).value}"


def head_caption(trimester: Trimester | str) -> str:
    """The mask-guided paper's caption for a fetal head of one trimester."""
    return f"An ultrasound image of a fetal head, {parse_trimester(trimester).value} trimester"


def parse_plane(value: Plane | str) -> Plane:
    if isinstance(value, Plane):
        return value
    key = str(value).strip().lower()
    for plane in Plane:
        if key == plane.value:
            return plane
    raise ValueError(
        f"Unknown plane {value!r}. Choose one of: {', '.join(p.value for p in Plane)}."
    )


def parse_trimester(value: Trimester | str) -> Trimester:
    if isinstance(value, Trimester):
        return value
    key = str(value).strip().lower().removesuffix(" trimester")
    aliases = {"1": "first", "2": "second", "3": "third", "1st": "first", "2nd": "second", "3rd": "third"}
    key = aliases.get(key, key)
    for trimester in Trimester:
        if key == trimester.value:
            return trimester
    raise ValueError(
        f"Unknown trimester {value!r}. Choose one of: {', '.join(t.value for t in Trimester)}."
    )


@dataclass(frozen=True)
class PromptChoice:
    """What the user picked in the prompt builder; ``prompt`` renders it."""

    subject: str  # a Plane value, "head", or "custom"
    trimester: str | None = None
    custom_text: str = ""

    def prompt(self) -> str:
        if self.subject == "custom":
            if not self.custom_text.strip():
                raise ValueError("The custom prompt is empty. Type a prompt or pick a plane.")
            return self.custom_text.strip()
        if self.subject == HEAD_SUBJECT:
            if self.trimester is None:
                raise ValueError("A fetal head prompt needs a trimester (first, second or third).")
            return head_caption(self.trimester)
        return plane_caption(self.subject)


def subject_choices() -> list[str]:
    """Subjects offered in the UI and CLI, in display order."""
    return [p.value for p in Plane] + [HEAD_SUBJECT]


def prompt_for(subject: str, trimester: str | None = None) -> str:
    """Prompt for a plane name or "head" (with trimester)."""
    return PromptChoice(subject=subject, trimester=trimester).prompt()
