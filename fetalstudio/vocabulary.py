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


# --- Anatomy (FetalFlex layouts): structures per plane -----------------------------------------
# A layout plane is named by the dataset it comes from, not by the FU-LoRA Plane above: the facial
# sagittal plane is FetalFlex's (first-trimester mid-sagittal, 11-14 weeks;
# ../shared/data/first_trimester_structures), the trans-thalamic plane is hc18_heads' skull ellipse.
# Label ids are unique over all planes (0 = background), so one label map never means two things.
# Colours are saturated hues well apart from each other and from gray, so a box stays readable
# drawn over a grayscale scan (and a layout map stays distinct per structure for a ControlNet).

FACIAL_SAGITTAL = "facial_sagittal"
TRANS_THALAMIC = "trans_thalamic"
BACKGROUND_LABEL = 0


@dataclass(frozen=True)
class Structure:
    """One anatomical structure of a layout plane: its key, label id in label maps, display colour."""

    name: str  # the key used in layouts, boxes.csv and presets, e.g. "nasal_bone"
    label: int  # 1..255, unique over all planes
    color_rgb: tuple[int, int, int]
    clinical_name: str
    description: str


@dataclass(frozen=True)
class AnatomyPlane:
    """A plane that layouts are drawn on: its structures in label order."""

    name: str
    title: str
    description: str
    structures: tuple[Structure, ...]


ANATOMY_PLANES: dict[str, AnatomyPlane] = {
    plane.name: plane
    for plane in (
        AnatomyPlane(
            FACIAL_SAGITTAL,
            "Facial sagittal (first trimester, 11-14 weeks)",
            "Mid-sagittal section of the fetal head and face at 11-14 weeks, the plane of the "
            "nuchal translucency and nasal bone screening (FetalFlex's facial sagittal plane).",
            (
                Structure("thalami", 1, (230, 25, 75), "Thalami",
                          "Paired deep grey-matter nuclei, the hypoechoic oval at the centre of the brain."),
                Structure("midbrain", 2, (245, 130, 48), "Midbrain (mesencephalon)",
                          "Brain stem segment between thalami and fourth ventricle, posterior to the thalami."),
                Structure("palate", 3, (255, 225, 25), "Palate (maxilla)",
                          "Echogenic line of the hard palate/maxilla under the nose; a gap suggests a cleft."),
                Structure("nasal_bone", 4, (60, 180, 75), "Nasal bone",
                          "Echogenic line under the nasal skin; absent or hypoplastic in many trisomy 21 fetuses."),
                Structure("nasal_tip", 5, (70, 240, 240), "Nasal tip",
                          "Tip of the nose, the anterior end of the nasal skin line."),
                Structure("nasal_skin", 6, (0, 130, 200), "Nasal skin",
                          "Skin line over the nasal bridge, parallel to and above the nasal bone."),
                Structure("nuchal_translucency", 7, (145, 30, 180), "Nuchal translucency (NT)",
                          "Fluid-filled space under the skin behind the neck; thickness above 3.5 mm is increased."),
                Structure("intracranial_translucency_4th_ventricle", 8, (240, 50, 230),
                          "Intracranial translucency (fourth ventricle)",
                          "Fourth ventricle seen as a translucent band; its absence is a marker of open spina bifida."),
                Structure("cisterna_magna", 9, (0, 255, 100), "Cisterna magna",
                          "Fluid space behind the cerebellum, posterior to the intracranial translucency."),
            ),
        ),
        AnatomyPlane(
            TRANS_THALAMIC,
            "Trans-thalamic (head circumference plane)",
            "Axial section of the fetal head at the level of the thalami, where head circumference is "
            "measured (hc18_heads); the skull ellipse is given as a rotated box.",
            (
                Structure("skull", 10, (0, 200, 255), "Skull (head circumference ellipse)",
                          "Outer border of the fetal skull; its fitted ellipse gives the head circumference."),
            ),
        ),
    )
}


def anatomy_plane(plane: str) -> AnatomyPlane:
    """The layout plane named ``plane``; a ValueError listing the planes if unknown."""
    try:
        return ANATOMY_PLANES[str(plane).strip().lower()]
    except KeyError:
        raise ValueError(
            f"Unknown layout plane {plane!r}. Choose one of: {', '.join(ANATOMY_PLANES)}."
        ) from None


def structures_for(plane: str) -> tuple[Structure, ...]:
    """The structures of a layout plane, in label order."""
    return anatomy_plane(plane).structures


def structure(plane: str, name: str) -> Structure:
    """One structure of ``plane``; a ValueError listing the plane's structures if ``name`` is not one."""
    structures = structures_for(plane)
    for candidate in structures:
        if candidate.name == name:
            return candidate
    raise ValueError(
        f"Unknown structure {name!r} for plane {plane!r}. "
        f"Valid names: {', '.join(s.name for s in structures)}."
    )


def structure_by_label(label: int) -> Structure:
    """The structure with label id ``label`` (any plane); a ValueError if none has it."""
    for plane in ANATOMY_PLANES.values():
        for candidate in plane.structures:
            if candidate.label == label:
                return candidate
    raise ValueError(f"No structure has label id {label}; label ids are 1-{max_structure_label()}.")


def max_structure_label() -> int:
    return max(s.label for p in ANATOMY_PLANES.values() for s in p.structures)


#: Structures named by their clinical abbreviation in captions: the full names take 18 tokens of the
#: bundled generator's tokenizer and pushed the 9-structure caption past CLIP's 77-token limit
#: (the last structures were cut off); with these it is 64.
CAPTION_WORDS = {"nuchal_translucency": "NT", "intracranial_translucency_4th_ventricle": "IT"}


def anatomy_caption(plane: str, structure_names: tuple[str, ...] | list[str] | None = None) -> str:
    """The caption of a layout plane's images, listing the plane and its structures (FetalFlex's
    global prompt), e.g. "An ultrasound image of a fetal facial sagittal plane, first trimester,
    with thalami, midbrain, ..., NT, IT, cisterna magna" (``CAPTION_WORDS``: NT and IT by their
    abbreviations, so the whole caption fits CLIP's 77 tokens). ``structure_names`` narrows the
    list (a layout's own structures)."""
    spec = anatomy_plane(plane)
    names = [s.name for s in spec.structures] if structure_names is None else list(structure_names)
    for name in names:
        structure(spec.name, name)
    words = ", ".join(CAPTION_WORDS.get(name, name.replace("_", " ")) for name in names)
    if spec.name == FACIAL_SAGITTAL:
        head = "An ultrasound image of a fetal facial sagittal plane, first trimester"
    else:
        head = "An ultrasound image of a fetal head, trans-thalamic plane"
    return f"{head}, with {words}" if words else head
