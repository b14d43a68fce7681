"""``python -m fetalstudio flex``: change the anatomy of a scan (FetalFlex) and save a project folder;
``python -m fetalstudio flex presets``: the anomaly presets (built-in and the user's), with their plane
and clinical meaning.

An edit: the scan (``--image``; PNG, JPEG, TIFF, DICOM, ...), its layout (``--layout FILE``, a
fetalstudio.layout JSON of this image's size, or ``--detect``: the bundled structure detector finds
the boxes), what to change (``--preset NAME`` with ``--param NAME=VALUE``, and/or ``--edit``: an edit
as JSON, a list of them, or a file holding either; presets are applied first, then the edits, in the
order given), and the region to regenerate (``--roi auto``: the changed boxes before and after, grown
by ``--roi-margin`` px; or a mask PNG of the image's size). The region is regenerated at the
generator's square size through the layout ControlNet (``--stage``: ddim = RePaint inpainting,
ssa = with Scale-Space Adaptive sampling, ssa+osm = then Organ-Scale Mask re-sampling, the default),
and every pixel outside it stays the scan's own.

The project folder (``--out DIR``, missing or empty; default outputs/anatomy/projects/<time>-<id>) gets
source.png, layout_before/after (.json + map .png), condition.png, roi.png, osm_mask.png (ssa+osm),
stage1.png, result.png (parameters inside), edits.json and project.json. A refused input writes
nothing. Example:

  python -m fetalstudio flex --image scan.png --detect --preset absent_nasal_bone --seed 3 --json

User presets are the ``*.json`` files in ``$FETALSTUDIO_PRESETS`` (default ``outputs/presets/``); a
broken one is reported on stderr and the others are still listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fetalstudio.cli_args import Command, at_least_one, device_name, output_folder
from fetalstudio.errors import FetalStudioError

STAGE_CHOICES = ("ddim", "ssa", "ssa+osm")  # fetalstudio.anatomy.flex.STAGES (not imported: --help stays light)
CONDITION_CHOICES = ("layout", "canny", "hed", "pidinet", "lineart")  # fetalstudio.anatomy.flex.CONDITIONS
DETECTOR_ID = "fetalstudio-structure-detector"


def add_presets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (name, title, plane, meaning, marker, parameters, edits, source)")
    parser.add_argument("--folder", type=Path, help="folder of user presets to scan instead of $FETALSTUDIO_PRESETS or outputs/presets")


def run_presets(args: argparse.Namespace) -> int:
    from fetalstudio.anatomy.presets import load_presets

    catalog = load_presets(args.folder)
    for problem in catalog.problems:
        print(f"warning: preset skipped: {problem}", file=sys.stderr)
    presets = list(catalog.presets.values())
    if args.json:
        print(json.dumps([{**preset.to_dict(), "source": preset.source} for preset in presets], indent=2))
        return 0
    width = max(len(preset.name) for preset in presets)
    plane_width = max(len(preset.plane) for preset in presets)
    for preset in presets:
        parameters = ", ".join(f"{k}={p.default}" for k, p in preset.parameters.items())
        origin = "" if preset.source == "built-in" else f" [{preset.source}]"
        print(f"{preset.name:<{width}}  {preset.plane:<{plane_width}}  {preset.clinical_meaning}"
              + (f" (parameters: {parameters})" if parameters else "") + origin)
    return 0


PRESETS = Command("presets", "list the anomaly presets (built-in and user): name, plane, clinical meaning",
                  add_presets_arguments, run_presets,
                  description="The anomaly presets (built-in and the user's), with their plane and clinical meaning. "
                              "User presets are the *.json files in $FETALSTUDIO_PRESETS (default outputs/presets/); a "
                              "broken one is reported on stderr and the others are still listed.")


# --- flex (an edit) -----------------------------------------------------------------------------
def parameter(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``; the value is read as JSON (2.5, true, "x") and else kept as text (thalami)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE (e.g. factor=2.5), not {text!r}")
    try:
        return name.strip(), json.loads(value)
    except ValueError:
        return name.strip(), value


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, help="the scan to edit (PNG, JPEG, BMP, TIFF or DICOM)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--layout", type=Path, help="the scan's layout: a fetalstudio.layout JSON file of the image's size")
    source.add_argument("--detect", action="store_true", help=f"find the layout with the structure detector ({DETECTOR_ID})")
    parser.add_argument("--preset", action="append", default=[], metavar="NAME", help="an anomaly preset to apply (see `flex presets`); repeatable")
    parser.add_argument("--param", action="append", default=[], type=parameter, metavar="NAME=VALUE",
                        help="a preset parameter (e.g. factor=2.5, structure=thalami); repeatable")
    parser.add_argument("--edit", action="append", default=[], metavar="JSON_OR_FILE",
                        help='an edit as JSON ({"op": "translate", "structure": "thalami", "dx": 10}), a list of them, '
                             "or a file holding either; repeatable; applied after the presets")
    parser.add_argument("--roi", default="auto", metavar="auto|MASK.png",
                        help="region to regenerate: auto (the changed boxes, old and new, plus --roi-margin) or a mask PNG of the image's size (non-zero = regenerate)")
    parser.add_argument("--roi-margin", type=float, default=None, metavar="PX", help="margin around the changed boxes for --roi auto (default 16 px)")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="ssa+osm", help="ddim: RePaint inpainting; ssa: + SSA sampling; ssa+osm: then OSM stage 2 (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed (same inputs + seed = same pixels on a CPU; default 0)")
    add_model_arguments(parser)
    parser.add_argument("--condition", choices=CONDITION_CHOICES, default="layout",
                        help="the ControlNet's condition: layout (the layout map, default) or the edge map of the scan "
                             "(canny works offline; hed/pidinet/lineart need their weights) with an edge --controlnet; "
                             "--roi auto without an edit is then the whole image")
    add_sampling_arguments(parser)
    parser.add_argument("--out", type=Path, help="the project folder to write (missing or empty; default outputs/anatomy/projects/<time>-<id>)")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: $FETALSTUDIO_DEVICE, else the best available)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary (project, files, seed, models, timings)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Steps, sampler, guidance and the models of a run, shared by ``flex`` and ``flex pairs``."""
    parser.add_argument("--steps", type=at_least_one, default=20, help="denoising steps (default 20)")
    parser.add_argument("--sampler", default="DDIM", help="DDIM (default, the paper's), Euler, Euler a or DPM++ 2M Karras")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--model", help="generator id or path (default: the catalog's default generator)")
    parser.add_argument("--controlnet", metavar="ID", help="layout ControlNet id or path (default: the catalog's default ControlNet)")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--lora", metavar="ID", help="LoRA id or path (default: the plane's LoRA when installed, e.g. fetalstudio-sagittal-lora)")
    lora.add_argument("--no-lora", action="store_true", help="apply no LoRA")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's sampling knobs (FlexOptions), shared by ``flex`` and ``eval flex``."""
    from fetalstudio.anatomy.flex import FlexOptions
    from fetalstudio.pipelines.ssa import SSAParameters

    ssa, options = SSAParameters(), FlexOptions()
    parser.add_argument("--ssa-k", type=float, default=ssa.k, help=f"SSA edge threshold k, in latent units (default {ssa.k:g})")
    parser.add_argument("--ssa-delta", type=float, default=ssa.delta, help=f"SSA diffusion step, above 0 to 0.25 (default {ssa.delta:g})")
    parser.add_argument("--ssa-iterations", type=int, default=ssa.iterations, help=f"SSA diffusion iterations per denoising step (default {ssa.iterations})")
    parser.add_argument("--osm-strength", type=float, default=options.osm_strength,
                        help=f"stage 2 re-noise strength, above 0 to 1 (default {options.osm_strength:g})")
    parser.add_argument("--controlnet-scale", type=float, default=options.conditioning_scale,
                        help=f"ControlNet conditioning scale, 0 to 2 (default {options.conditioning_scale:g})")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """FlexOptions keyword arguments from ``add_sampling_arguments``'s options (validated by FlexOptions)."""
    from fetalstudio.pipelines.ssa import SSAParameters

    return {"ssa": SSAParameters(k=args.ssa_k, delta=args.ssa_delta, iterations=args.ssa_iterations),
            "osm_strength": args.osm_strength, "conditioning_scale": args.controlnet_scale}


def read_layout(args: argparse.Namespace, image, manager) -> Any:
    """The layout of the scan: from --layout, or detected; its size must be the image's."""
    from dataclasses import replace

    from fetalstudio.anatomy.layout import Layout

    if args.layout is not None:
        layout = Layout.read(args.layout)
        where = str(args.layout)
    elif args.detect:
        layout = detect_layout(manager, image)
        where = "the detected layout"
    else:
        raise FetalStudioError("flex needs the scan's layout: give --layout FILE (a fetalstudio.layout JSON) or --detect "
                               "(the structure detector finds the boxes).")
    if layout.size != image.size:
        raise FetalStudioError(f"{where} is for a {layout.width}x{layout.height} image but {image.path.name} is "
                               f"{image.size[0]}x{image.size[1]}. Use the layout of this image (or --detect).")
    if layout.pixel_size_mm is None and image.pixel_size_mm:
        layout = replace(layout, pixel_size_mm=image.pixel_size_mm)
    return layout


def structure_detector(manager) -> tuple[Any, str]:
    """The structure detector (the bundled one, else the catalog's default detector) and its catalog id."""
    from fetalstudio.detection.predict import StructureDetector
    from fetalstudio.models.entries import ModelKind

    model_id = DETECTOR_ID if DETECTOR_ID in manager.ids() else manager.default_id(ModelKind.DETECTOR)
    return StructureDetector(manager.get(model_id)), model_id


def detector_planes(detector) -> list[str]:
    """The layout planes whose structures include every class the detector finds."""
    from fetalstudio.vocabulary import ANATOMY_PLANES

    return [name for name, plane in ANATOMY_PLANES.items()
            if set(detector.structures) <= {s.name for s in plane.structures}]


def detector_for_plane(manager, plane: str) -> Any | None:
    """The structure detector when it finds structures of ``plane``, else None (no detector knows that plane)."""
    detector, _ = structure_detector(manager)
    return detector if plane in detector_planes(detector) else None


def detect_structures(manager, image, plane: str | None = None) -> list[Any]:
    """The detector's boxes (``detection.predict.Detection``, with scores) on ``image``, checked to be of ``plane``
    (default: the detector's plane); a clear error when the detector knows no such plane or finds nothing."""
    detector, model_id = structure_detector(manager)
    planes = detector_planes(detector)
    if not planes:
        raise FetalStudioError(f"The detector {model_id} finds {', '.join(detector.structures)}, which no layout plane has.")
    if plane is not None and plane not in planes:
        raise FetalStudioError(f"The structure detector {model_id} finds {', '.join(planes)} structures, not {plane} ones: "
                               "draw the boxes by hand (mouse or table; CLI: give them with --layout).")
    found = detector.detect(image.gray)
    if not found:
        raise FetalStudioError(f"The detector found no structure on {image.path.name}. Check that it is a {planes[0]} "
                               "scan, or draw the boxes by hand (CLI: give the layout with --layout).")
    return found


def detect_layout(manager, image) -> Any:
    """The layout the structure detector finds on ``image`` (its plane: the detector's)."""
    from fetalstudio.anatomy.layout import Layout, StructureBox

    detector, model_id = structure_detector(manager)
    found = detect_structures(manager, image)
    return Layout(detector_planes(detector)[0], image.size[0], image.size[1],
                  tuple(StructureBox(d.structure, d.x0, d.y0, d.x1, d.y1) for d in found), image.pixel_size_mm,
                  f"detected by {model_id}")


def read_edits(texts: list[str]) -> list[Any]:
    """The --edit values: JSON text or a file with JSON; each an edit object or a list of them."""
    from fetalstudio.anatomy.edits import edit_from_dict

    edits = []
    for number, text in enumerate(texts, start=1):
        where = f"--edit {number}"
        stripped = text.strip()
        if not stripped.startswith(("{", "[")):
            path = Path(text).expanduser()
            if not path.is_file():
                raise FetalStudioError(f"{where} ({text}) is neither JSON (an edit object or a list) nor an existing file.")
            stripped, where = path.read_text(encoding="utf-8"), f"{where} ({path.name})"
        try:
            data = json.loads(stripped)
        except ValueError as error:
            raise FetalStudioError(f"{where} is not valid JSON ({error}). Example: "
                                   '{"op": "translate", "structure": "thalami", "dx": 10}.') from None
        items = data if isinstance(data, list) else [data]
        edits += [edit_from_dict(item, f"{where}, edit {i + 1}") for i, item in enumerate(items)]
    return edits


def apply_changes(layout, preset_names: list[str], parameters: list[tuple[str, Any]], edits: list[Any]):
    """(edited layout, applied edits as JSON, presets as {name, parameters}); parameters go to the
    presets that declare them."""
    from fetalstudio.anatomy.edits import EditHistory
    from fetalstudio.anatomy.presets import load_presets

    presets = [load_presets().get(name) for name in preset_names] if preset_names else []
    values = dict(parameters)
    if values and not presets:
        raise FetalStudioError("--param sets a preset parameter, but no --preset is given.")
    unused = sorted(name for name in values if not any(name in preset.parameters for preset in presets))
    if unused:
        declared = ", ".join(f"{p.name}: {', '.join(p.parameters) or 'none'}" for p in presets)
        raise FetalStudioError(f"No chosen preset has the parameter {', '.join(unused)} ({declared}).")
    history = EditHistory(layout)
    records = []
    for preset in presets:
        mine = {name: value for name, value in values.items() if name in preset.parameters}
        preset.check_layout(history.current, mine)
        history.apply_all(preset.edits(mine))
        records.append({"name": preset.name, "parameters": preset.values(mine)})
    history.apply_all(edits)
    return history.current, [edit.to_dict() for edit in history.applied], records


def run_edit(args: argparse.Namespace) -> int:
    if args.image is None:
        raise FetalStudioError("flex needs --image (the scan to edit); `flex presets` lists the anomaly presets, "
                               "`flex --help` shows every option.")
    from fetalstudio.anatomy.flex import FlexOptions, flex_settings, run_flex
    from fetalstudio.anatomy.project import check_project_folder, write_project
    from fetalstudio.anatomy.roi import DEFAULT_MARGIN_PX, edit_roi, read_user_roi
    from fetalstudio.app_context import build_context
    import numpy as np
    from PIL import Image

    from fetalstudio.imaging.image_input import load_image

    if args.out is not None:
        check_project_folder(args.out)
    if args.roi != "auto" and args.roi_margin is not None:
        raise FetalStudioError("--roi-margin applies to --roi auto only; a mask PNG is used as drawn.")
    options = FlexOptions(stage=args.stage, controlnet=args.controlnet, lora="" if args.no_lora else args.lora,
                          condition=args.condition, **sampling_options(args))
    edits = read_edits(args.edit)
    image = load_image(args.image)
    manager = build_context(device=args.device).manager  # libraries quietened, as every command
    before = read_layout(args, image, manager)
    after, applied, presets = apply_changes(before, args.preset, args.param, edits)
    if args.roi == "auto" and args.condition != "layout" and after == before:
        roi, roi_source = np.ones((image.size[1], image.size[0]), bool), "whole image"
    elif args.roi == "auto":
        margin = DEFAULT_MARGIN_PX if args.roi_margin is None else args.roi_margin
        roi, roi_source = edit_roi(before, after, margin), f"auto (margin {margin:g} px)"
    else:
        roi, roi_source = read_user_roi(Path(args.roi), image.size), str(args.roi)
    settings = flex_settings(manager, after, steps=args.steps, seed=args.seed, sampler=args.sampler,
                             guidance_scale=args.guidance, model=args.model)

    def progress(done: int, total: int, step: int, steps: int) -> None:
        if not args.json:
            print(f"step {step}/{steps}", file=sys.stderr, flush=True)

    outcome = run_flex(manager, settings, Image.fromarray(image.gray), after, roi, options, progress, before=before)
    if outcome.cancelled:
        raise FetalStudioError("The edit was cancelled; nothing was written.")
    project = write_project(outcome, args.out, image_path=str(args.image), roi_source=roi_source, edits=applied,
                            presets=presets)
    record = json.loads((project / "project.json").read_text(encoding="utf-8"))
    summary = {"project": str(project), "files": record["files"], "stage": outcome.options.stage, "seed": outcome.seed,
               "seeds": {run["stage"]: run["seeds"] for run in record["runs"]}, "models": record["models"],
               "timings": record["timings"], "roi_pixels": record["roi"]["pixels"],
               "osm_mask_pixels": (record["osm_mask"] or {}).get("pixels"), "presets": [p["name"] for p in presets],
               "edits": len(applied)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"project: {project}")
        print(f"result: {project / 'result.png'} (stage {outcome.options.stage}, seed {outcome.seed}, "
              f"{record['timings'].get('total', 0):.1f} s)")
    return 0


EDIT = Command("flex", "change the anatomy of a scan (FetalFlex) and save a project folder", add_edit_arguments,
               run_edit, description=__doc__)


# --- flex pairs (counterfactual pairs) --------------------------------------------------------------
PAIRS_DESCRIPTION = """Counterfactual pairs: for each scan of --data whose layout has the preset's structures, a normal
and an abnormal image (fetalstudio.anatomy.pairs): the preset's edit region (ROI) regenerated from the
scan's own layout and from the edited layout, with the same seed, ROI and options, so outside the ROI
both are the scan's own pixels and inside only the anatomy differs (both sides synthetic: a detector
trained on them cannot tell "abnormal" by "synthetic").

--data: a structures folder (images.csv + boxes.csv, e.g. ../shared/data/first_trimester_structures:
the annotated layouts), a folder of images or a CSV with an 'image' column (layouts found by the
structure detector). Scan i gets seed --seed + i. --out DIR gets metadata.csv (one row per pair: normal,
abnormal, roi, preset, roi_x0, roi_y0, roi_x1, roi_y1 (x1/y1 exclusive), source, plane, edits, parameters,
seed, stage, models and hashes), normal/, abnormal/, roi/, pairs.json (the settings) and skipped.csv (scans
the preset does not fit, with the reason). Run the same command again to resume (finished pairs are kept,
--limit counts them); a different command into the same folder is refused. Example:

  python -m fetalstudio flex pairs --data ../shared/data/first_trimester_structures --preset absent_nasal_bone \\
      --limit 20 --seed 0 --out outputs/pairs/absent-nasal-bone
"""


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="FOLDER_OR_CSV",
                        help="a structures folder (images.csv + boxes.csv), a folder of images or a CSV with an 'image' column (layouts detected)")
    parser.add_argument("--preset", required=True, metavar="NAME", help="the anomaly preset of the abnormal images (see `flex presets`)")
    parser.add_argument("--param", action="append", default=[], type=parameter, metavar="NAME=VALUE",
                        help="a preset parameter (e.g. factor=2.5); repeatable")
    parser.add_argument("--limit", type=at_least_one, help="at most N pairs in the folder (default: one per scan the preset fits)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: scan i (its place in --data) gets seed + i (default 0)")
    parser.add_argument("--roi-margin", type=float, default=None, metavar="PX", help="margin around the changed boxes (default 16 px)")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="ssa+osm", help="ddim, ssa or ssa+osm (default)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--out", type=output_folder, required=True, help="the pairs folder (created; the same command resumes it)")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: $FETALSTUDIO_DEVICE, else the best available)")


def run_pairs(args: argparse.Namespace) -> int:
    import time

    from fetalstudio.anatomy.flex import FlexOptions
    from fetalstudio.anatomy.pairs import SKIPPED_FILE, PairsRequest, export_pairs
    from fetalstudio.anatomy.roi import DEFAULT_MARGIN_PX
    from fetalstudio.app_context import build_context

    options = FlexOptions(stage=args.stage, controlnet=args.controlnet, lora="" if args.no_lora else args.lora,
                          **sampling_options(args))
    request = PairsRequest(data=args.data, out=args.out, preset=args.preset, parameters=dict(args.param), limit=args.limit,
                           seed=args.seed, steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance,
                           model=args.model, roi_margin=DEFAULT_MARGIN_PX if args.roi_margin is None else args.roi_margin,
                           options=options)
    manager = build_context(device=args.device).manager
    started = time.perf_counter()

    def progress(pairs: int, wanted: int | None, row: dict) -> None:
        print(f"[{pairs}/{wanted or '-'}] {row['source']} -> {row['normal']}, {row['abnormal']} (seed {row['seed']}, "
              f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    report = export_pairs(manager, request, progress)
    if report.skipped:
        examples = "; ".join(f"{source}: {reason}" for source, reason in report.skipped[:3])
        print(f"skipped {len(report.skipped)} scan(s) the preset does not fit (all in {report.out / SKIPPED_FILE}): {examples}",
              file=sys.stderr)
    print(f"{report.pairs} pair(s) in {report.out} ({report.written} new, {report.existing} already there)")
    if report.pairs == 0:
        raise FetalStudioError(f"No scan of {args.data} fits preset {args.preset} (see {report.out / SKIPPED_FILE}); "
                               "choose another preset or data with the structures it changes.")
    return 0


PAIRS = Command("pairs", "write counterfactual normal/abnormal pairs for a set of scans and a preset (resumable)",
                add_pairs_arguments, run_pairs, description=PAIRS_DESCRIPTION)
