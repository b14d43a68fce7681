"""One FetalFlex edit (METHODS section 3): a scan, its (edited) layout and an ROI in; the scan with
the ROI regenerated to show that layout out, stage 1 and (optionally) stage 2.

The run works in the generator's square (256 px for fetalstudio-tiny): the source, the layout and the
ROI are letterboxed into it exactly as the layout ControlNet saw its training images
(``fetalstudio.imaging.letterbox``: whole image kept, centred, black bars; the layout's boxes mapped
into the square and drawn there, filled, one colour per structure). The square result is cropped
back out, resized to the source's size, and the source's own pixels are pasted back outside the ROI
(``pipelines.inpaint.paste_back``, a ``feather`` ramp inside it), so outside the ROI the output *is*
the source, pixel for pixel, at the source's size.

Stages (``FlexOptions.stage``):

- ``ddim``: RePaint inpainting of the ROI only (the sampler is the settings'; DDIM is the paper's);
- ``ssa``: the same with Scale-Space Adaptive diffusion of the latent after every step (stage 1);
- ``ssa+osm``: then Organ-Scale Mask sampling (stage 2): the stage-1 image is the draft, re-noised to
  ``osm_strength`` and re-sampled inside the organ mask only: the boxes the edit moved, resized or
  added (after the edit), grown by ``osm_margin_px``, inside the ROI. An edit that only removes
  leaves no new box: then the mask is the layout's boxes that meet the ROI (the organs around the
  gap), and if none does, the ROI itself.

``FlexOptions.condition`` other than "layout" (canny, hed, ...) conditions on the edge map of the
letterboxed source instead (``pipelines.edges``): structure-preserving re-synthesis of the ROI, with a
ControlNet trained on that condition (``resolve_controlnet``: a ControlNet's catalog entry knows its
condition; the bundled edge one is fetalstudio-tiny-canny-controlnet). There the generator does not see
the boxes, so stage 2 takes the edit's new boxes only; with none it re-samples the whole ROI (the boxes
around a gap would only leave box-shaped seams in an image conditioned on edges).

Everything runs through ``pipelines.inpaint.InpaintRunner``: lazy loading through the model manager,
its memory budget and out-of-memory retry, progress and cancel. The same inputs and seed give the
same pixels on a CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.anatomy.layout_map import box_mask, layout_color_map
from fetalstudio.anatomy.roi import boxes_roi
from fetalstudio.errors import FetalStudioError, ModelNotFoundError
from fetalstudio.imaging.letterbox import Letterbox, letterbox_geometry, letterbox_image, letterbox_mask, unletterbox_image
from fetalstudio.models.entries import LAYOUT_CONDITION, ModelKind
from fetalstudio.models.hashing import checkpoint_hash
from fetalstudio.pipelines.edges import EDGE_DETECTORS, edge_map
from fetalstudio.pipelines.inpaint import OSM, STAGE_ONE, InpaintRequest, InpaintRunner, MAX_FEATHER, as_roi, paste_back
from fetalstudio.pipelines.prepared import ProgressCallback
from fetalstudio.pipelines.settings import GenerationResult, GenerationSettings, LoraSpec
from fetalstudio.pipelines.ssa import SSAParameters
from fetalstudio.vocabulary import FACIAL_SAGITTAL, anatomy_caption

log = logging.getLogger(__name__)

STAGES = ("ddim", "ssa", "ssa+osm")
CONDITIONS = (LAYOUT_CONDITION, *EDGE_DETECTORS)
DEFAULT_STAGE = "ssa+osm"
#: The LoRA that teaches the bundled generator a plane, used by default when the catalog lists it.
PLANE_LORAS = {FACIAL_SAGITTAL: "fetalstudio-sagittal-lora"}
BUNDLED_CONTROLNET = "fetalstudio-tiny-layout-controlnet"
#: The bundled ControlNet for edge mode ("Keep this scan's structure"), trained on Canny maps.
BUNDLED_EDGE_CONTROLNET = "fetalstudio-tiny-canny-controlnet"
DEFAULT_STEPS = 20
DEFAULT_SEED = 0
DEFAULT_SAMPLER = "DDIM"
DEFAULT_GUIDANCE = 7.5
#: Generator size when its configs do not say (SD 1.x).
FALLBACK_SIZE = 512

NO_CONTROLNET_HELP = (
    "No layout ControlNet is installed, and an anatomy edit needs one. The bundled one is "
    f"'{BUNDLED_CONTROLNET}' (checkpoints/manifest.toml, default = true); or train one for your generator with "
    "`python -m fetalstudio train controlnet --data ../shared/data/first_trimester_structures --base "
    "fetalstudio-tiny --out outputs/tiny-layout-controlnet` and put its folder in checkpoints/ (or give it with "
    "--controlnet PATH)."
)


@dataclass(frozen=True)
class FlexOptions:
    """How the edit is sampled (see the module doc for the stages).

    ``osm_strength`` 0.6: stage 2 refines a draft that already has the right anatomy in place, so it
    restarts from the draft noised to 60 % of the schedule (12 of 20 steps): enough noise to redraw
    the organs' texture and edges, little enough that the draft's position and brightness survive
    (1.0 would throw the draft away and repeat stage 1; below ~0.3 the tiny generator barely changes it).
    """

    stage: str = DEFAULT_STAGE
    ssa: SSAParameters = SSAParameters()
    osm_strength: float = 0.6
    osm_margin_px: float = 4
    conditioning_scale: float = 1.0
    feather: int = 4
    controlnet: str | None = None  # None: the catalog's default ControlNet
    lora: str | None = None  # None: the plane's LoRA when the catalog lists it; "": none
    lora_weight: float = 1.0
    #: "layout" (the layout map, FetalFlex) or an edge detector of ``pipelines.edges`` (canny, hed, ...):
    #: the edge map of the letterboxed source, for structure-preserving re-synthesis with an edge ControlNet.
    condition: str = "layout"

    def __post_init__(self) -> None:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"the stage must be one of {', '.join(STAGES)} (got {self.stage!r})")
        if not isinstance(self.ssa, SSAParameters):
            problems.append("ssa must be SSAParameters")
        if not (isinstance(self.osm_strength, (int, float)) and 0 < self.osm_strength <= 1):
            problems.append(f"the OSM strength must be above 0 and at most 1 (got {self.osm_strength!r})")
        if not (isinstance(self.osm_margin_px, (int, float)) and 0 <= self.osm_margin_px <= 256):
            problems.append(f"the OSM margin must be 0-256 pixels (got {self.osm_margin_px!r})")
        if isinstance(self.feather, bool) or not isinstance(self.feather, int) or not 0 <= self.feather <= MAX_FEATHER:
            problems.append(f"the feather must be a whole number of pixels from 0 to {MAX_FEATHER} (got {self.feather!r})")
        if not 0 <= self.conditioning_scale <= 2:
            problems.append(f"the conditioning scale must be between 0 and 2 (got {self.conditioning_scale})")
        if not 0 <= self.lora_weight <= 1.5:
            problems.append(f"the LoRA weight must be between 0 and 1.5 (got {self.lora_weight})")
        if self.condition not in CONDITIONS:
            problems.append(f"the condition must be one of {', '.join(CONDITIONS)} (got {self.condition!r})")
        if problems:
            raise FetalStudioError("Anatomy edit options: " + "; ".join(problems) + ".")

    @property
    def uses_ssa(self) -> bool:
        return self.stage in ("ssa", "ssa+osm")

    @property
    def uses_osm(self) -> bool:
        return self.stage == "ssa+osm"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "ssa": self.ssa.to_dict(), "osm_strength": self.osm_strength,
                "osm_margin_px": self.osm_margin_px, "conditioning_scale": self.conditioning_scale,
                "feather": self.feather, "controlnet": self.controlnet, "lora": self.lora, "lora_weight": self.lora_weight,
                "condition": self.condition}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlexOptions:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if isinstance(values.get("ssa"), dict):
            values["ssa"] = SSAParameters(**values["ssa"])
        return cls(**values)


@dataclass
class FlexOutcome:
    """What one edit made. Images are at the source's size; ``stage1``/``final`` are None when cancelled."""

    source: Image.Image
    before: Layout | None  # the layout before the edit, when known
    layout: Layout  # the layout the ROI was generated from (after the edit)
    roi: np.ndarray  # (H, W) bool at the source's size
    stage1: Image.Image | None
    final: Image.Image | None  # stage 2's image for ssa+osm, else stage 1's
    osm_mask: np.ndarray | None  # (H, W) bool, stage 2's organ mask (ssa+osm only)
    results: tuple[GenerationResult, ...]  # stage 1's and (ssa+osm) stage 2's, at the square size
    settings: GenerationSettings  # as used: concrete seed, the LoRA resolved
    options: FlexOptions
    letterbox: Letterbox
    condition: Image.Image  # the square layout map the ControlNet saw
    controlnet: dict[str, str]  # {"id", "hash"}
    cancelled: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # "stage1", "stage2", "total"

    @property
    def seed(self) -> int:
        return self.settings.seed


def _square_size(manager, model: str) -> int:
    return manager.native_image_size(model) or FALLBACK_SIZE


def flex_settings(manager, layout: Layout, *, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
                  sampler: str = DEFAULT_SAMPLER, guidance_scale: float = DEFAULT_GUIDANCE,
                  model: str | None = None) -> GenerationSettings:
    """The generation settings of an edit: the generator (default: the catalog's), its native square
    size, and FetalFlex's prompt (the plane and the layout's structures, ``vocabulary.anatomy_caption``)."""
    model = model or manager.default_id(ModelKind.SD_PIPELINE)
    size = _square_size(manager, model)
    return GenerationSettings(model=model, prompt=anatomy_caption(layout.plane, layout.structure_names()),
                              sampler=sampler, steps=steps, guidance_scale=guidance_scale, width=size, height=size,
                              seed=seed)


def resolve_controlnet(manager, requested: str | None, condition: str = LAYOUT_CONDITION) -> str:
    """The ControlNet's catalog id for a run conditioned on ``condition`` ("layout" or an edge detector):
    the requested one (checked to be a ControlNet trained on that condition), else the default among the
    installed ControlNets trained on it. A layout run never takes an edge ControlNet; an edge run with no
    ControlNet trained on its edges takes the default one, with a warning (it follows the edges only as far
    as they look like its own condition)."""
    if requested:
        entry = InpaintRunner(manager).controlnet_entry(requested)
        if entry.condition != condition:
            raise FetalStudioError(_condition_mismatch(manager, entry.id, entry.condition, condition))
        return entry.id
    matching = [entry for entry in manager.entries(ModelKind.CONTROLNET) if entry.is_local and entry.condition == condition]
    chosen = next((e for e in matching if e.details.get("default", "").lower() == "true"), matching[0] if matching else None)
    if chosen is not None:
        return chosen.id
    if condition == LAYOUT_CONDITION:
        raise FetalStudioError(NO_CONTROLNET_HELP)
    try:
        fallback = manager.default_id(ModelKind.CONTROLNET)
    except ModelNotFoundError:
        raise FetalStudioError(_no_edge_controlnet_help(condition)) from None
    log.warning("No ControlNet trained on %s edges is installed; using %s, trained on %s: %s", condition, fallback,
                _condition_words(manager.entry(fallback).condition), _train_hint(condition))
    return fallback


def _condition_words(condition: str | None) -> str:
    return "layout maps" if condition == LAYOUT_CONDITION else f"{condition} edges"


def _train_hint(condition: str) -> str:
    if condition == LAYOUT_CONDITION:
        return ("train one with `python -m fetalstudio train controlnet --data ../shared/data/first_trimester_structures "
                "--base fetalstudio-tiny --out outputs/tiny-layout-controlnet`")
    return (f"train one with `python -m fetalstudio train controlnet --condition {condition} --data FOLDER_OR_CSV "
            f"--base fetalstudio-tiny --out outputs/tiny-{condition}-controlnet`")


def _condition_mismatch(manager, controlnet: str, trained_on: str | None, condition: str) -> str:
    """Why a requested ControlNet does not fit the run's condition, and what to pick or train instead."""
    run = "a layout edit" if condition == LAYOUT_CONDITION else "edge mode"
    fitting = [e.id for e in manager.entries(ModelKind.CONTROLNET) if e.is_local and e.condition == condition]
    pick = f"pick {' or '.join(fitting)} or " if fitting else ""
    return (f"{controlnet} was trained on {_condition_words(trained_on)}; {run} needs a ControlNet trained on "
            f"{_condition_words(condition)}: {pick}{_train_hint(condition)} (and put its folder in checkpoints/).")


def _no_edge_controlnet_help(condition: str) -> str:
    bundled = f"The bundled one is '{BUNDLED_EDGE_CONTROLNET}' (checkpoints/manifest.toml); or " if condition == "canny" else "Please "
    return (f"No ControlNet is installed, and edge mode needs one trained on {condition} edges. {bundled}"
            f"{_train_hint(condition)} and put its folder in checkpoints/ (or give it with --controlnet PATH).")


def resolve_lora(manager, plane: str, requested: str | None) -> str | None:
    """The LoRA to apply: the requested one (checked to be a LoRA), none for "", else the plane's when listed."""
    if requested == "":
        return None
    if requested is None:
        default = PLANE_LORAS.get(plane)
        return default if default is not None and default in manager.ids(ModelKind.LORA) else None
    entry = manager.entry(requested)
    if entry.kind is not ModelKind.LORA:
        raise FetalStudioError(f"'{entry.id}' is a {entry.kind.value}, not a LoRA. Pick a LoRA model, or leave "
                               "the LoRA out.")
    return entry.id


def square_layout(layout: Layout, box: Letterbox) -> Layout:
    """The layout in the letterboxed square: each box mapped like the ControlNet's training boxes
    (``training.controlnet.prepare_image``), clipped to the square."""
    def placed(x: float, y: float) -> tuple[float, float]:
        sx, sy, _, _ = box.to_input(x, y, x, y)
        return min(max(sx, 0.0), float(box.size)), min(max(sy, 0.0), float(box.size))

    boxes = []
    for b in layout.boxes:
        (x0, y0), (x1, y1) = placed(b.x0, b.y0), placed(b.x1, b.y1)
        boxes.append(StructureBox(b.structure, x0, y0, x1, y1, b.rotation_deg))
    return Layout(layout.plane, box.size, box.size, tuple(boxes))


def layout_condition(layout: Layout, size: int) -> tuple[Image.Image, Letterbox]:
    """The ControlNet's condition: the layout map (filled) of the letterboxed layout, ``size`` square."""
    box = letterbox_geometry(layout.width, layout.height, size)
    return Image.fromarray(layout_color_map(square_layout(layout, box))), box


def organ_mask(layout: Layout, roi: np.ndarray, margin_px: float, before: Layout | None = None,
               around_gap: bool = True) -> np.ndarray:
    """Stage 2's mask (see the module doc): the edit's new boxes, else (``around_gap``) the boxes meeting
    the ROI, grown by ``margin_px``, inside the ROI; the ROI itself when that leaves nothing."""
    boxes: list[StructureBox] = []
    if before is not None:
        boxes = list((Counter(layout.boxes) - Counter(before.boxes)).elements())
    if not boxes and around_gap:
        boxes = [b for b in layout.boxes if (box_mask(b, layout.size) & roi).any()]
    mask = boxes_roi(boxes, layout.size, margin_px) & roi if boxes else np.zeros_like(roi)
    return mask if mask.any() else roi.copy()


def _check_inputs(source: Image.Image, layout: Layout, roi: np.ndarray, before: Layout | None) -> None:
    if layout.size != source.size:
        raise FetalStudioError(f"The layout is for a {layout.width}x{layout.height} image but the image is "
                               f"{source.width}x{source.height}. Use the layout drawn (or detected) on this image.")
    if before is not None and (before.size != layout.size or before.plane != layout.plane):
        raise FetalStudioError("The layouts before and after the edit are not of the same image (size or plane differ).")
    if roi.shape != (source.height, source.width):
        raise FetalStudioError(f"The ROI mask is {roi.shape[1]}x{roi.shape[0]} but the image is {source.width}x"
                               f"{source.height}; draw the mask on the image itself (same size).")
    if not roi.any():
        raise FetalStudioError("The ROI is empty, so nothing would be regenerated. Edit a structure (or choose a "
                               "preset), or give a mask of the region to regenerate.")


def _in_mode(image: Image.Image, mode: str) -> Image.Image:
    return image if image.mode == mode else image.convert(mode)


def _stage_progress(on_progress: ProgressCallback | None, offset: int, total: int) -> ProgressCallback | None:
    """The runner's per-stage progress as steps of the whole edit: (0 or 1 edits done, 1, step, steps)."""
    if on_progress is None:
        return None
    return lambda done, images, step, steps: on_progress(0, 1, offset + step, total)


def run_flex(manager, settings: GenerationSettings, source: Image.Image, layout: Layout, roi: np.ndarray,
             options: FlexOptions = FlexOptions(), on_progress: ProgressCallback | None = None,
             cancel: threading.Event | None = None, *, before: Layout | None = None) -> FlexOutcome:
    """Regenerate ``roi`` of ``source`` so that it shows ``layout`` (see the module doc).

    ``settings``: from :func:`flex_settings` (a square size); ``roi``: (H, W) nonzero = regenerate, the
    source's size; ``before``: the layout before the edit (picks stage 2's organ mask).
    ``on_progress(edits done, 1, steps done, steps in all)``; ``cancel`` stops after the current step
    (the outcome is then ``cancelled`` with no images)."""
    started = time.perf_counter()
    roi = as_roi(roi)
    source_mode = source.mode if source.mode in ("L", "RGB") else "RGB"
    source = _in_mode(source, source_mode)
    _check_inputs(source, layout, roi, before)
    if settings.width != settings.height:
        raise FetalStudioError(f"An anatomy edit runs in the generator's square; got {settings.width}x{settings.height}. "
                               "Use flex_settings (the generator's native size).")
    controlnet = resolve_controlnet(manager, options.controlnet, options.condition)
    lora = resolve_lora(manager, layout.plane, options.lora)
    if lora is not None and all(spec.source != lora for spec in settings.loras):
        settings = replace(settings, loras=settings.loras + (LoraSpec(lora, options.lora_weight),))
    settings = settings.validated()
    runner = InpaintRunner(manager)
    record = {"id": controlnet, "hash": checkpoint_hash(manager.local_path(manager.entry(controlnet)))}
    size = settings.width
    condition, box = layout_condition(layout, size)
    square_roi, _ = letterbox_mask(roi, size)
    square_source, _ = letterbox_image(source, size)
    if options.condition != "layout":
        condition = edge_map(square_source, options.condition)

    osm_steps = int(settings.steps * options.osm_strength) if options.uses_osm else 0
    total_steps = settings.steps + osm_steps
    outcome = FlexOutcome(source=source, before=before, layout=layout, roi=roi, stage1=None, final=None, osm_mask=None,
                          results=(), settings=settings, options=options, letterbox=box, condition=condition,
                          controlnet=record)

    stage_one = InpaintRequest(source=square_source, condition=condition, roi=square_roi, controlnet=controlnet,
                               conditioning_scale=options.conditioning_scale, strength=1.0,
                               ssa=options.ssa if options.uses_ssa else None, feather=0, stage=STAGE_ONE)
    if options.uses_osm:  # refuse too few steps for stage 2 before stage 1 spends its time
        InpaintRequest(source=square_source, condition=condition, roi=square_roi, controlnet=controlnet,
                       strength=options.osm_strength, stage=OSM)
        if osm_steps < 1:
            raise FetalStudioError(f"Stage 2 (OSM) at strength {options.osm_strength:g} of {settings.steps} steps runs no "
                                   f"step; raise the steps to at least {int(1 / options.osm_strength) + 1} or the OSM strength.")
    first = runner.generate(settings, stage_one, _stage_progress(on_progress, 0, total_steps), cancel)
    outcome.results = (first,)
    outcome.seconds["stage1"] = first.seconds
    if first.cancelled or not first.images:
        return _cancelled(outcome, started)
    stage1 = paste_back(_in_mode(unletterbox_image(first.images[0].image, box), source_mode), source, roi, options.feather)
    outcome.stage1 = outcome.final = stage1
    if options.uses_osm:
        mask = organ_mask(layout, roi, options.osm_margin_px, before, around_gap=options.condition == LAYOUT_CONDITION)
        square_mask, _ = letterbox_mask(mask, size)
        square_draft, _ = letterbox_image(stage1, size)
        stage_two = InpaintRequest(source=square_draft, condition=condition, roi=square_mask, controlnet=controlnet,
                                   conditioning_scale=options.conditioning_scale, strength=options.osm_strength,
                                   ssa=None, feather=0, stage=OSM)
        second = runner.generate(settings, stage_two, _stage_progress(on_progress, settings.steps, total_steps), cancel)
        outcome.results = (first, second)
        outcome.seconds["stage2"] = second.seconds
        if second.cancelled or not second.images:
            return _cancelled(outcome, started)
        outcome.osm_mask = mask
        outcome.final = paste_back(_in_mode(unletterbox_image(second.images[0].image, box), source_mode), stage1, mask,
                                   options.feather)
    outcome.seconds["total"] = time.perf_counter() - started
    if on_progress is not None:
        on_progress(1, 1, total_steps, total_steps)
    return outcome


def _cancelled(outcome: FlexOutcome, started: float) -> FlexOutcome:
    outcome.cancelled = True
    outcome.stage1 = outcome.final = None
    outcome.seconds["total"] = time.perf_counter() - started
    return outcome
