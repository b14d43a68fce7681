"""Evaluate the anatomy engine (FetalFlex) on annotated images it was not trained on: reconstruction
(PSNR, MS-SSIM), layout fidelity (a structure detector on the generated images) and edit fidelity
(the anomaly presets), for plain DDIM, SSA and SSA+OSM.

    python -m fetalstudio eval flex --limit 20 --out outputs/eval-flex --json flex.json

--data: a folder laid out like ../shared/data/first_trimester_structures (images.csv + boxes.csv with
image, structure, x_min, y_min, x_max, y_max in that image's pixels, paths relative to the folder; its
more/ subfolder too), default that shared folder. --split val (default) evaluates the fixed validation
split (`fetalstudio.data.structures.split_structures`: the images every trainer holds out); --split all
every image (training images included: optimistic). --limit N evaluates N images drawn with --seed.

Every image is scaled so its longer side is --size pixels (default: the generator's square size, 256
for fetalstudio-tiny; its boxes with it), and runs with seed --seed + its index, the same for every
stage. For each image:

- Reconstruction: two ROIs are hidden and regenerated from the real layout with `anatomy.flex.run_flex`:
  one structure's box + --roi-margin px (the structure drawn from the image's annotated ones with
  --seed and its file name) and the union of all its boxes + the margin. PSNR and MS-SSIM against
  the real image, on the whole image and on the ROI's bounding rectangle ("ROI only").
- Layout fidelity: the detector (--detector, default the installed one) on the images regenerated
  inside the all-boxes ROI vs the requested boxes (AP50, mean IoU per structure), beside the same
  detector on the real images (the ceiling).
- Edit fidelity: each preset of the plane (--presets) applied to the real layout and generated with
  the last of --stages inside the edit's ROI: is the removed structure still detected, are the
  untouched ones, and the largest pixel change outside the ROI (measured; 0 by construction).

When --stages has both ssa and ssa+osm, the SSA image is the SSA+OSM run's stage 1 (the same
request and seed: identical pixels), so SSA costs no extra run.

Report folder: report.md, reconstruction.csv, layout_fidelity.csv, presets.csv, summary.json,
reconstruction_structure.png, reconstruction_all_boxes.png (real | layout | DDIM | SSA | SSA+OSM) and
presets.png (before | layout before | layout after | after). --json FILE writes the headline figures:
{"ddim": {psnr, ms_ssim, psnr_roi, ms_ssim_roi, layout_miou, ...}, "ssa": {...}, "ssa_osm": {...},
"real": {layout_miou, ...}, "presets": {name: {removed_detected_rate, kept_detected_rate,
outside_roi_max_abs_diff, ...}}, "n_images", "anchors", "settings"}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fetalstudio.anatomy.flex_cli import add_sampling_arguments, sampling_options
from fetalstudio.cli_args import Command, at_least_one, device_name, output_folder
from fetalstudio.errors import FetalStudioError
from fetalstudio.paths import APP_ROOT

DEFAULT_DATA = APP_ROOT.parent / "shared" / "data" / "first_trimester_structures"
DEFAULT_STAGES = "ddim,ssa,ssa+osm"
#: Images shown in each reconstruction grid, and (image, preset) rows in the preset grid.
GRID_IMAGES = 8
GRID_PRESET_ROWS = 12
ROI_KINDS = ("structure", "all_boxes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"structures folder (images.csv + boxes.csv, laid out like first_trimester_structures; default {DEFAULT_DATA})")
    parser.add_argument("--split", choices=["val", "all"], default="val",
                        help="val: the fixed validation split no trainer uses (default); all: every image (training ones included)")
    parser.add_argument("--limit", type=at_least_one, help="evaluate N images drawn with --seed (default: all of the split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image draw, the hidden structure and the sampling (image i: seed + i)")
    parser.add_argument("--steps", type=at_least_one, default=20, help="denoising steps per stage")
    parser.add_argument("--stages", default=DEFAULT_STAGES, help="comma-separated stages to compare: ddim, ssa, ssa+osm")
    add_sampling_arguments(parser)
    parser.add_argument("--model", help="generator id or path (default: the catalog's default generator)")
    parser.add_argument("--controlnet", help="layout ControlNet id or path (default: the catalog's default ControlNet)")
    parser.add_argument("--lora", help="LoRA id or path (default: the plane's LoRA when installed; 'none' for none)")
    parser.add_argument("--detector", help="structure detector id or path (default: the catalog's default detector)")
    parser.add_argument("--presets", help="comma-separated preset names (default: the built-in presets of the plane; 'none' to skip)")
    parser.add_argument("--plane", default="facial_sagittal", help="the plane of the data's boxes")
    parser.add_argument("--size", type=at_least_one, help="longer side of the evaluated images in pixels (default: the generator's size)")
    parser.add_argument("--roi-margin", type=float, default=None, help="pixels (at --size) added around the boxes of every ROI (default 16)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="detector score from which a structure counts as detected in the edit rates (default: the detector's 0.3)")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, mps (default: $FETALSTUDIO_DEVICE, else the best available)")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (created)")
    parser.add_argument("--json", type=Path, help="also write the headline figures to this JSON file")


# --- inputs -----------------------------------------------------------------------------------------
def parse_stages(text: str) -> list[str]:
    from fetalstudio.anatomy.flex import STAGES

    stages = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise FetalStudioError(f"--stages {text!r}: unknown stage {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(STAGES)} (comma-separated).")
    return [stage for stage in STAGES if stage in stages]  # each once, in the engine's order


@dataclass
class EvalImage:
    """One annotated image at the evaluation size: 8-bit grayscale pixels and its layout."""

    key: str  # path relative to the data folder
    gray: object  # (H, W) uint8
    layout: object  # anatomy.layout.Layout at the same size
    index: int


def select_items(data: Path, split: str, limit: int | None, seed: int) -> list:
    """The annotated images of ``data`` with boxes, of the split, at most ``limit`` drawn with ``seed`` (order kept)."""
    import numpy as np

    from fetalstudio.data.structures import read_structures, split_structures

    items = read_structures(data)
    if split == "val":
        items = split_structures(items, "val")
    with_boxes = [item for item in items if item.boxes]
    if not with_boxes:
        raise FetalStudioError(f"{data} has no annotated image in the {split} split (images with boxes). "
                               + ("Use --split all to evaluate every image, or " if split == "val" else "") +
                               "add boxes to boxes.csv.")
    if limit and limit < len(with_boxes):
        chosen = np.sort(np.random.default_rng(seed).choice(len(with_boxes), limit, replace=False))
        with_boxes = [with_boxes[i] for i in chosen]
    return with_boxes


def load_image(item, data: Path, size: int, plane: str, index: int) -> EvalImage:
    """The image scaled (Lanczos, aspect kept) so its longer side is ``size``, with its layout scaled alike."""
    import numpy as np
    from PIL import Image

    from fetalstudio.anatomy.layout import Layout

    try:
        with Image.open(item.path) as opened:
            gray = opened.convert("L")
    except OSError as error:
        raise FetalStudioError(f"{item.path} could not be read as an image ({error}); fix or remove it in images.csv.") from error
    if gray.size != (item.width, item.height):
        raise FetalStudioError(f"{item.path} is {gray.width}x{gray.height} but images.csv says {item.width}x{item.height}; "
                               "correct the table (boxes are in the image's own pixels).")
    scale = size / max(gray.size)
    width, height = max(1, round(gray.width * scale)), max(1, round(gray.height * scale))
    try:
        layout = Layout.from_annotated_image(item, plane).resized(width, height)
    except FetalStudioError as error:
        raise FetalStudioError(f"{item.path}: {error}") from None
    try:
        key = item.path.resolve().relative_to(data.resolve()).as_posix()
    except ValueError:
        key = str(item.path)
    resized = gray.resize((width, height), Image.Resampling.LANCZOS) if (width, height) != gray.size else gray
    return EvalImage(key, np.asarray(resized), layout, index)


# --- running ----------------------------------------------------------------------------------------
@dataclass
class Collected:
    """What the loop keeps for the detector and the pictures (small: images at the evaluation size)."""

    real: list = field(default_factory=list)  # gray arrays
    annotations: list = field(default_factory=list)  # [(structure, x0, y0, x1, y1)] per image
    all_boxes: dict = field(default_factory=dict)  # stage -> gray arrays regenerated in the all-boxes ROI
    reconstruction: list = field(default_factory=list)  # CSV rows
    edits: list = field(default_factory=list)  # (image index, preset, before, after, roi, edited gray, outside diff)
    skipped_presets: dict = field(default_factory=dict)  # preset -> [reasons]
    grid_rows: dict = field(default_factory=lambda: {kind: [] for kind in ROI_KINDS})
    preset_grid: list = field(default_factory=list)


def run_image(manager, image: EvalImage, stages: list[str], presets: list, context: dict, collected: Collected) -> None:
    """Reconstruct both ROIs of one image at every stage, then apply every preset that fits it."""
    import numpy as np
    from PIL import Image

    from fetalstudio.anatomy.flex import flex_settings
    from fetalstudio.anatomy.layout_map import layout_color_map
    from fetalstudio.anatomy.roi import boxes_roi, structures_roi
    from fetalstudio.evaluation.flex_metrics import hidden_structure, outside_max_abs_diff, reconstruction_scores
    from fetalstudio.evaluation.flex_report import thumbnail

    layout, margin = image.layout, context["roi_margin"]
    source = Image.fromarray(image.gray, "L")
    settings = flex_settings(manager, layout, steps=context["steps"], seed=context["seed"] + image.index, model=context["model"])
    hidden = hidden_structure(layout.structure_names(), context["seed"], image.key)
    rois = {"structure": structures_roi(layout, [hidden], margin),
            "all_boxes": boxes_roi(layout.boxes, layout.size, margin)}
    collected.real.append(image.gray)
    collected.annotations.append([(b.structure, b.x0, b.y0, b.x1, b.y1) for b in layout.boxes])
    layout_picture = thumbnail(Image.fromarray(layout_color_map(layout)))
    for kind, roi in rois.items():
        made = generate_stages(manager, settings, source, layout, roi, stages, context)
        for stage, picture in made.items():
            gray = np.asarray(picture.convert("L"))
            row = {"image": image.key, "roi": kind, "hidden_structure": hidden if kind == "structure" else "",
                   "stage": stage, "seed": settings.seed, **reconstruction_scores(image.gray, gray, roi),
                   "outside_roi_max_abs_diff": outside_max_abs_diff(image.gray, gray, roi)}
            collected.reconstruction.append(row)
            if kind == "all_boxes":
                collected.all_boxes.setdefault(stage, []).append(gray)
        if len(collected.grid_rows[kind]) < GRID_IMAGES:
            label = f"{image.key}" + (f"  (hidden: {hidden})" if kind == "structure" else "")
            collected.grid_rows[kind].append((label, [thumbnail(source, roi), layout_picture] + [thumbnail(made[s]) for s in stages]))
    preset_stage = stages[-1]
    for preset in presets:
        run_preset(manager, image, preset, settings, preset_stage, context, collected)


def generate_stages(manager, settings, source, layout, roi, stages: list[str], context: dict, before=None) -> dict:
    """stage -> the final image of each requested stage (SSA from SSA+OSM's stage 1 when both are asked)."""
    from fetalstudio.anatomy.flex import FlexOptions, run_flex

    made = {}
    for stage in stages:
        if stage == "ssa" and "ssa+osm" in stages:
            continue
        outcome = run_flex(manager, settings, source, layout, roi, FlexOptions(stage=stage, **context["options"]), before=before)
        made[stage] = outcome.final
        if stage == "ssa+osm" and "ssa" in stages:
            made["ssa"] = outcome.stage1
    return {stage: made[stage] for stage in stages}


def run_preset(manager, image: EvalImage, preset, settings, stage: str, context: dict, collected: Collected) -> None:
    import numpy as np
    from PIL import Image

    from fetalstudio.anatomy.layout_map import layout_color_map
    from fetalstudio.anatomy.roi import edit_roi
    from fetalstudio.evaluation.flex_metrics import outside_max_abs_diff
    from fetalstudio.evaluation.flex_report import thumbnail

    before = image.layout
    try:
        after = preset.apply(before)
        roi = edit_roi(before, after, context["roi_margin"])
    except FetalStudioError as error:  # the preset does not fit this image (a structure not annotated, a box leaving the frame)
        collected.skipped_presets.setdefault(preset.name, []).append(f"{image.key}: {error}")
        return
    source = Image.fromarray(image.gray, "L")
    edited = generate_stages(manager, settings, source, after, roi, [stage], context, before=before)[stage]
    gray = np.asarray(edited.convert("L"))
    # against the source in the edited image's own mode: every channel of every pixel outside the ROI
    difference = outside_max_abs_diff(np.asarray(source.convert(edited.mode)), np.asarray(edited), roi)
    collected.edits.append((image.index, preset.name, before, after, roi, gray, difference, image.key))
    if len(collected.preset_grid) < GRID_PRESET_ROWS:
        collected.preset_grid.append((f"{image.key}  {preset.name}", [
            thumbnail(source, roi), thumbnail(Image.fromarray(layout_color_map(before))),
            thumbnail(Image.fromarray(layout_color_map(after))), thumbnail(edited)]))


# --- scoring ----------------------------------------------------------------------------------------
def score(manager, detector_id: str, stages: list[str], collected: Collected, threshold: float) -> tuple[dict, list[dict]]:
    """The detector's part: layout fidelity per stage and on the real images, and the per-edit rows."""
    from fetalstudio.detection.predict import StructureDetector
    from fetalstudio.evaluation.flex_metrics import preset_image_row

    with manager.use(detector_id) as model:
        detector = StructureDetector(model)
        layout = {"real": detector.evaluate(collected.real, collected.annotations)}
        for stage in stages:
            layout[stage] = detector.evaluate(collected.all_boxes[stage], collected.annotations)
        real_found = [[d.as_tuple() for d in found] for found in detector.detect_batch(collected.real, threshold)]
        edited_found = [[d.as_tuple() for d in detector.detect(edit[5], threshold)] for edit in collected.edits]
        known = set(detector.structures)
    rows = []
    for (index, preset, before, after, _roi, _gray, difference, key), found in zip(collected.edits, edited_found):
        row = preset_image_row(before, after, real_found[index], found, known)  # images are collected in index order
        rows.append({"image": key, "preset": preset, "outside_roi_max_abs_diff": difference, **row})
    return layout, rows


def run(args: argparse.Namespace) -> int:
    from fetalstudio.anatomy.flex import resolve_controlnet, resolve_lora
    from fetalstudio.anatomy.presets import load_presets
    from fetalstudio.anatomy.roi import DEFAULT_MARGIN_PX
    from fetalstudio.app_context import build_manager
    from fetalstudio.data.reports import write_json
    from fetalstudio.detection.predict import DEFAULT_SCORE_THRESHOLD
    from fetalstudio.errors import ModelNotFoundError
    from fetalstudio.evaluation.flex_metrics import MS_SSIM_WINDOW, stage_figures, summarise_presets
    from fetalstudio.evaluation.flex_report import ANCHORS, csv_row, draw_grid, json_key, write_reports
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.vocabulary import anatomy_plane

    stages = parse_stages(args.stages)
    try:
        plane = anatomy_plane(args.plane).name
    except ValueError as error:
        raise FetalStudioError(str(error)) from None
    margin = DEFAULT_MARGIN_PX if args.roi_margin is None else args.roi_margin
    if not (math.isfinite(margin) and margin >= 0):
        raise FetalStudioError(f"--roi-margin must be 0 or more pixels (got {margin}).")
    threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
    if not 0 <= threshold <= 1:
        raise FetalStudioError(f"--score-threshold must be between 0 and 1 (got {threshold}).")
    catalog = load_presets()
    if args.presets is None:
        presets = [p for p in catalog.presets.values() if p.source == "built-in" and p.plane == plane]
    elif args.presets.strip().lower() == "none":
        presets = []
    else:
        presets = [catalog.get(name.strip()) for name in args.presets.split(",") if name.strip()]
        other = [p.name for p in presets if p.plane != plane]
        if other:
            raise FetalStudioError(f"--presets: {', '.join(other)} are not for the {plane} plane of the data; leave them out.")
    items = select_items(args.data, args.split, args.limit, args.seed)

    manager = build_manager(device=args.device)
    try:
        model = args.model or manager.default_id(ModelKind.SD_PIPELINE)
        detector_id = args.detector or manager.default_id(ModelKind.DETECTOR)
    except ModelNotFoundError as error:
        raise FetalStudioError(f"{error} Give --model and --detector, or install the bundled models (README, 'Models').") from None
    model = manager.entry(model).id
    detector_entry = manager.entry(detector_id)
    if detector_entry.kind is not ModelKind.DETECTOR:
        raise FetalStudioError(f"--detector '{detector_entry.id}' is a {detector_entry.kind.value}, not a structure detector "
                               "(train one with `python -m fetalstudio train detector`).")
    controlnet = resolve_controlnet(manager, args.controlnet)
    lora = resolve_lora(manager, plane, "" if (args.lora or "").lower() == "none" else args.lora)
    size = args.size or manager.native_image_size(model) or 512
    context = {"roi_margin": margin, "steps": args.steps, "seed": args.seed, "model": model,
               "options": {"controlnet": controlnet, "lora": lora or "", **sampling_options(args)}}

    started = time.perf_counter()
    collected = Collected()
    for number, item in enumerate(items):
        image = load_image(item, args.data, size, plane, number)
        run_image(manager, image, stages, presets, context, collected)
        print(f"[{number + 1}/{len(items)}] {image.key} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    layout, preset_rows = score(manager, detector_entry.id, stages, collected, threshold)
    seconds = time.perf_counter() - started

    settings = {
        "data": str(args.data), "split": args.split, "limit": args.limit, "seed": args.seed, "steps": args.steps,
        "stages": stages, "preset_stage": stages[-1], "sampler": "DDIM", "model": model, "controlnet": controlnet,
        "lora": lora, "detector": detector_entry.id, "size": size, "roi_margin": margin, "plane": plane,
        "presets": [p.name for p in presets], "score_threshold": threshold,
        "ssa": context["options"]["ssa"].to_dict(), "osm_strength": context["options"]["osm_strength"],
        "controlnet_scale": context["options"]["conditioning_scale"],
        "ms_ssim": {"window": MS_SSIM_WINDOW, "scales": "5 when the smaller side > 160 px, else those that fit (weights renormalised)",
                    "data_range": 1.0, "roi": "bounding rectangle of the ROI"},
        "roi_only": "bounding rectangle of the ROI (crop of both images)",
        "hidden_structure": "one per image, drawn from its annotated structures with (seed, CRC-32 of the file name)",
        "device": manager.placement.label,
    }
    result: dict = {json_key(stage): stage_figures(collected.reconstruction, stage, layout[stage]) for stage in stages}
    result["real"] = {"layout_miou": layout["real"]["mean_iou"], "layout_map50": layout["real"]["map50"],
                      "per_structure": layout["real"]["per_structure"]}
    result["presets"] = summarise_presets([p.name for p in presets], preset_rows, collected.skipped_presets)
    result.update(n_images=len(items), anchors=ANCHORS, settings=settings, seconds=round(seconds, 1))
    structures = [s.name for s in anatomy_plane(plane).structures]

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    columns = ["real (ROI in red)", "layout"] + [{"ddim": "DDIM", "ssa": "SSA", "ssa+osm": "SSA+OSM"}[s] for s in stages]
    draw_grid(out / "reconstruction_structure.png", "Reconstruction of one structure's ROI", columns, collected.grid_rows["structure"])
    draw_grid(out / "reconstruction_all_boxes.png", "Reconstruction of the ROI of all boxes", columns, collected.grid_rows["all_boxes"])
    draw_grid(out / "presets.png", f"Presets ({stages[-1]}): before / after", ["before (ROI in red)", "layout before", "layout after", "after"],
              collected.preset_grid)
    report = write_reports(out, result, stages, structures, collected.reconstruction, [csv_row(r) for r in preset_rows],
                           collected.skipped_presets, seconds)
    headline = {key: value for key, value in result.items() if key != "real"}
    headline["real"] = {"layout_miou": result["real"]["layout_miou"], "layout_map50": result["real"]["layout_map50"]}
    for stage in stages:
        headline[json_key(stage)] = {k: v for k, v in result[json_key(stage)].items() if k != "layout_per_structure"}
    if args.json:
        write_json(args.json, headline)
    printable = {json_key(s): {k: headline[json_key(s)][k] for k in ("psnr", "ms_ssim", "psnr_roi", "ms_ssim_roi", "layout_miou")} for s in stages}
    print(json.dumps(_finite({**printable, "real": headline["real"], "n_images": len(items), "report": str(report)})), flush=True)
    return 0


def _finite(data):
    """NaN and infinities as null, so stdout is valid JSON."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    return data


COMMAND = Command("flex", "anatomy engine (FetalFlex): reconstruction PSNR/MS-SSIM, layout and edit fidelity", add_arguments, run,
                  description=__doc__.strip())
