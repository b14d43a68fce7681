"""Generation settings and results as dataclasses; validation gives actionable messages."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, replace

from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.pipelines.samplers import DEFAULT_SAMPLER, parse_sampler

MAX_SEED = 2**32 - 1
LORA_WEIGHT_RANGE = (0.0, 1.5)
#: Output colour: "auto" follows the model's declaration (``output = "grayscale"`` in
#: checkpoints/manifest.toml; undeclared models keep the decoder's RGB), or forced either way.
OUTPUT_COLORS = ("auto", "grayscale", "rgb")
#: The task of every image made before tasks were recorded, and of A1111 PNGs.
TEXT_TO_IMAGE = "text-to-image"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA (catalog id or file path) and the strength it is applied with."""

    source: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """"FILE_OR_ID[:WEIGHT]" as in the CLI's --lora (a Windows drive letter is not a weight)."""
        head, sep, tail = text.rpartition(":")
        if sep and head and not tail.startswith(("\\", "/")):
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)


@dataclass(frozen=True)
class GenerationSettings:
    model: str
    prompt: str
    negative_prompt: str = ""
    sampler: str = DEFAULT_SAMPLER
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    seed: int = -1  # -1: pick a random seed (recorded in every image's metadata)
    batch_size: int = 1
    batch_count: int = 1
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    color: str = "auto"  # one of OUTPUT_COLORS; the engine records the colour it resolved to
    #: The channel an image+mask LoRA draws its mask in (kept as generated when the image is made
    #: grayscale); None: read from the active LoRAs' files (``train lora --mask-channel``).
    mask_channel: int | None = None

    @property
    def total_images(self) -> int:
        return self.batch_size * self.batch_count

    def validated(self) -> "GenerationSettings":
        """A copy with the sampler normalised and a concrete seed; raises on bad values."""
        problems = []
        if not self.prompt.strip():
            problems.append("the prompt is empty (pick a plane or type a prompt)")
        try:
            sampler = parse_sampler(self.sampler).key
        except ValueError as error:
            problems.append(str(error).rstrip("."))
            sampler = self.sampler
        if not 1 <= self.steps <= 150:
            problems.append(f"steps must be between 1 and 150 (got {self.steps})")
        if not 0 <= self.guidance_scale <= 30:
            problems.append(f"guidance scale must be between 0 and 30 (got {self.guidance_scale})")
        for name, value in (("width", self.width), ("height", self.height)):
            if value < 64 or value > 2048 or value % 8:
                problems.append(f"{name} must be a multiple of 8 between 64 and 2048 (got {value})")
        if not 1 <= self.batch_size <= 64 or not 1 <= self.batch_count <= 10_000:
            problems.append("batch size must be 1-64 and batch count 1-10000")
        if not -1 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be -1 (random) or between 0 and {MAX_SEED}")
        if self.color not in OUTPUT_COLORS:
            problems.append(f"colour must be one of {', '.join(OUTPUT_COLORS)} (got {self.color!r})")
        if self.mask_channel not in (None, 0, 1, 2):
            problems.append(f"mask channel must be 0, 1 or 2 (got {self.mask_channel!r})")
        for lora in self.loras:
            low, high = LORA_WEIGHT_RANGE
            if not low <= lora.weight <= high:
                problems.append(f"LoRA weight for {lora.source} must be between {low} and {high} (got {lora.weight})")
        if problems:
            raise FetalStudioError("Cannot generate: " + "; ".join(problems) + ".")
        seed = secrets.randbelow(MAX_SEED - self.total_images) if self.seed == -1 else self.seed
        return replace(self, sampler=sampler, seed=seed)

    def seed_for(self, index: int) -> int:
        """Image ``index`` of the run uses seed + index (wrapping at 2**32)."""
        return (self.seed + index) % (MAX_SEED + 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["loras"] = [asdict(l) for l in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationSettings":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = tuple(LoraSpec(**l) for l in data.get("loras", ()))
        return cls(**values)


@dataclass(frozen=True)
class Reproduction:
    """How to remake one recorded image exactly: its whole batch, and its position in it."""

    settings: GenerationSettings  # batch_size = the original batch, seed = the batch's first seed
    index: int = 0
    #: The recorded task (``metadata["task"]``): its name and inputs such as an image-to-image strength.
    task: dict = field(default_factory=lambda: {"name": TEXT_TO_IMAGE})


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    index: int
    settings: GenerationSettings
    metadata: dict  # the JSON written into the PNG (hashes, versions, device...)


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    cancelled: bool = False
    seconds: float = 0.0
