#!/usr/bin/env python
"""Seconds per anatomy edit: FetalStudio's engine (``anatomy.flex.run_flex``) vs a plain diffusers call.

One edit = a real first-trimester sagittal scan, its annotated layout edited by a preset (default
``increased_nt``), the ROI around the edit, regenerated at the generator's square size (256 px for
fetalstudio-tiny) with ``--steps`` DDIM steps (20), classifier-free guidance and a layout ControlNet.
For each stage:

- **engine**: ``run_flex(manager, flex_settings(...), source, layout, roi, FlexOptions(stage=...))``,
  everything the UI and CLI run: letterboxing, the layout map, lazy loading through the model
  manager, RePaint blending after every step (``pipelines.inpaint``), SSA (``ssa``, ``ssa+osm``),
  stage 2 (``ssa+osm``: ``osm_strength`` x steps more), paste-back at the source's size, metadata.
- **plain**: diffusers' ``StableDiffusionControlNetInpaintPipeline`` built with ``from_pipe`` over the
  same loaded components (same U-Net object, so a LoRA the engine activated is active here too) and
  the ControlNet loaded with ``ControlNetModel.from_pretrained``; the same prompt, size, steps,
  guidance and a DDIM scheduler from the model's own config; inputs (the letterboxed scan, layout map
  and ROI) prepared outside the clock. ``ddim`` and ``ssa``: one call at strength 1; ``ssa+osm``: that
  call and a second one on its output, inside the organ mask, at ``osm_strength``. diffusers has no
  SSA, so the ``ssa`` ratio includes SSA's own cost; its inpainting VAE-encodes the image and the
  masked image (the engine encodes the source once per stage), so plain does slightly *more* VAE work.

After one untimed warm-up of each (the first engine run also hashes the weights), runs alternate
engine, plain, engine, plain... per stage; figures are medians (and minimums) of ``--repeats`` runs.
CUDA is synchronised before every clock read. The load average is printed beside the figures: on a
machine shared with trainings the wall times swing; the CPU-time column is steadier.

ControlNet: the catalog's ``fetalstudio-tiny-layout-controlnet`` when it is installed; otherwise, and
always with ``--quick``, ``ControlNetModel.from_unet(<the generator's U-Net>)`` saved to a temp folder:
untrained weights cost exactly the same time as trained ones (same architecture, same operations),
only the pictures mean nothing.

CPU (the target: under 10 s per edit on the 2-core machine)::

    python bench/flex.py --repeats 3 --threads 1
    python bench/flex.py --quick

(with 2 threads on the 2 cores while a training ran, an edit took 25x longer: the threads spin-wait).

GPU (a lent device)::

    python bench/flex.py --device cuda --dtype fp16 --repeats 10 --json bench-flex-gpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from machine import cpu_name, load_average  # noqa: E402  (bench/ is on sys.path when a script runs)
from synthesis import DTYPES, synchronize  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "first_trimester_structures"
STAGES = ("ddim", "ssa", "ssa+osm")
TARGET_SECONDS = 10.0


def _stages(text: str) -> list[str]:
    stages = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise argparse.ArgumentTypeError(f"stages must be a comma list of {', '.join(STAGES)} (got {text!r})")
    return stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Seconds per anatomy edit (ControlNet + RePaint inpainting) through FetalStudio's engine "
        "(anatomy.flex.run_flex) next to a plain diffusers StableDiffusionControlNetInpaintPipeline call, per stage.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="fetalstudio-tiny", help="generator: a catalog id or a diffusers folder")
    parser.add_argument("--controlnet", default=None,
                        help="layout ControlNet: a catalog id or folder (default: fetalstudio-tiny-layout-controlnet when "
                        "installed, else an untrained ControlNet.from_unet of the generator)")
    parser.add_argument("--quick", action="store_true",
                        help="untrained from_unet ControlNet, no LoRA, one timed run per stage")
    parser.add_argument("--lora", default="auto",
                        help="'auto': the plane's LoRA when the catalog lists it (as the app does); 'none'; or a LoRA id")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a structures folder (images.csv + boxes.csv)")
    parser.add_argument("--image-index", type=int, default=0, help="which image of --data (its order in images.csv)")
    parser.add_argument("--preset", default="increased_nt", help="the edit: an anatomy preset name")
    parser.add_argument("--stages", type=_stages, default=list(STAGES), help="comma list of ddim, ssa, ssa+osm")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (stage 1)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and stage after one warm-up")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (auto: the app's choice)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="weights dtype (auto: the app's choice)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", metavar="OUT", type=Path, default=None, help="also write every run's times here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch sees no CUDA device here (torch {torch.__version__})")
    if args.quick:
        args.repeats, args.lora = 1, "none"
    return args


def machine_line(device: torch.device) -> str:
    import diffusers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return (f"machine: CPU {cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); GPU {gpu}; "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}")


# --- the edit -----------------------------------------------------------------------------------
@dataclass
class Edit:
    """The scan, its layout before and after the preset, the ROI, and the square inputs of the plain call."""

    source: Image.Image
    before: object
    layout: object
    roi: np.ndarray
    square_source: Image.Image
    condition: Image.Image
    square_roi: Image.Image
    square_organ_mask: Image.Image
    description: str


def make_edit(args: argparse.Namespace, size: int, osm_margin_px: float) -> Edit:
    from fetalstudio.anatomy.flex import layout_condition, organ_mask
    from fetalstudio.anatomy.layout import Layout
    from fetalstudio.anatomy.presets import load_presets
    from fetalstudio.anatomy.roi import edit_roi
    from fetalstudio.data.structures import read_structures
    from fetalstudio.imaging.letterbox import letterbox_image, letterbox_mask

    items = read_structures(args.data, include_more=False)
    if not 0 <= args.image_index < len(items):
        raise SystemExit(f"error: --image-index must be 0-{len(items) - 1} for {args.data}")
    item = items[args.image_index]
    with Image.open(item.path) as opened:
        source = opened.convert("RGB")
    before = Layout.from_annotated_image(item)
    layout = load_presets().get(args.preset).apply(before)
    roi = edit_roi(before, layout)
    condition, _ = layout_condition(layout, size)
    square_roi, _ = letterbox_mask(roi, size)
    square_organ, _ = letterbox_mask(organ_mask(layout, roi, osm_margin_px, before), size)
    square_source, _ = letterbox_image(source, size)

    def as_mask(mask: np.ndarray) -> Image.Image:
        return Image.fromarray(mask.astype(np.uint8) * 255, "L")

    description = (f"{item.path.name} ({source.width}x{source.height}), preset {args.preset}, ROI {int(roi.sum())} px "
                   f"({100 * roi.mean():.1f} % of the image)")
    return Edit(source, before, layout, roi, square_source, condition, as_mask(square_roi), as_mask(square_organ), description)


def untrained_controlnet(manager, model_id: str, folder: Path) -> str:
    """``ControlNetModel.from_unet`` of the generator's U-Net (what ``train controlnet`` starts from), saved."""
    from diffusers import ControlNetModel

    unet = manager.get(model_id).unet
    ControlNetModel.from_unet(unet).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


# --- timing -------------------------------------------------------------------------------------
@dataclass
class Row:
    stage: str
    unet_steps: int
    engine_seconds: list[float] = field(default_factory=list)
    engine_cpu_seconds: list[float] = field(default_factory=list)
    plain_seconds: list[float] = field(default_factory=list)
    plain_cpu_seconds: list[float] = field(default_factory=list)
    load_averages: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.engine_seconds) / statistics.median(self.plain_seconds)

    @property
    def ratio_min(self) -> float:
        return min(self.engine_seconds) / min(self.plain_seconds)

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.engine_cpu_seconds) / statistics.median(self.plain_cpu_seconds)


class Bench:
    def __init__(self, args: argparse.Namespace, manager, model_id: str, controlnet: str, edit: Edit) -> None:
        import diffusers
        from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

        from fetalstudio.anatomy.flex import FlexOptions, flex_settings
        from fetalstudio.models.prealign import read_prealignment
        from fetalstudio.pipelines.inpaint import prealigned_condition_hook
        from fetalstudio.pipelines.samplers import parse_sampler

        self.args, self.manager, self.edit = args, manager, edit
        self.device, self.dtype = manager.placement.device, manager.placement.dtype
        self.controlnet = controlnet
        self.lora = {"auto": None, "none": ""}.get(args.lora, args.lora)
        self.settings = flex_settings(manager, edit.layout, steps=args.steps, seed=args.seed, sampler="DDIM",
                                      guidance_scale=args.guidance, model=model_id)
        self.osm_strength = FlexOptions().osm_strength
        base = manager.get(model_id)
        sampler = parse_sampler("DDIM")
        self.scheduler_class = getattr(diffusers, sampler.scheduler_class)
        self.scheduler_config = {**base.scheduler.config, "clip_sample": base.scheduler.config.get("clip_sample", False)}
        self.scheduler_overrides = sampler.overrides
        controlnet_path = manager.local_path(manager.entry(controlnet))
        plain_controlnet = ControlNetModel.from_pretrained(str(controlnet_path)).to(self.device, self.dtype)
        alignment = read_prealignment(controlnet_path)
        if alignment is not None:  # a pre-aligned ControlNet reads its layout through the VAE: part of the model
            plain_controlnet.register_forward_pre_hook(prealigned_condition_hook(alignment, base.vae), with_kwargs=True)
        self.plain = StableDiffusionControlNetInpaintPipeline.from_pipe(base, controlnet=plain_controlnet)
        self.plain.set_progress_bar_config(disable=True)

    def options(self, stage: str):
        from fetalstudio.anatomy.flex import FlexOptions

        return FlexOptions(stage=stage, controlnet=self.controlnet, lora=self.lora)

    def engine_run(self, stage: str) -> tuple[float, float, object]:
        from fetalstudio.anatomy.flex import run_flex

        e = self.edit
        synchronize(self.device)
        started, started_cpu = time.perf_counter(), time.process_time()
        outcome = run_flex(self.manager, self.settings, e.source, e.layout, e.roi, self.options(stage), before=e.before)
        synchronize(self.device)
        return time.perf_counter() - started, time.process_time() - started_cpu, outcome

    def _plain_call(self, image: Image.Image, mask: Image.Image, strength: float) -> Image.Image:
        s = self.settings
        self.plain.scheduler = self.scheduler_class.from_config(self.scheduler_config, **self.scheduler_overrides)
        return self.plain(
            prompt=s.prompt, image=image, mask_image=mask, control_image=self.edit.condition, strength=strength,
            num_inference_steps=s.steps, guidance_scale=s.guidance_scale, width=s.width, height=s.height,
            generator=torch.Generator("cpu").manual_seed(s.seed),
        ).images[0]

    def plain_run(self, stage: str) -> tuple[float, float]:
        e = self.edit
        synchronize(self.device)
        started, started_cpu = time.perf_counter(), time.process_time()
        draft = self._plain_call(e.square_source, e.square_roi, 1.0)
        if stage == "ssa+osm":
            self._plain_call(draft, e.square_organ_mask, self.osm_strength)
        synchronize(self.device)
        return time.perf_counter() - started, time.process_time() - started_cpu

    def measure(self, stage: str) -> Row:
        steps = self.settings.steps + (int(self.settings.steps * self.osm_strength) if stage == "ssa+osm" else 0)
        row = Row(stage, steps)
        warm_engine, _, outcome = self.engine_run(stage)
        warm_plain, _ = self.plain_run(stage)
        lora = ", ".join(spec.source for spec in outcome.settings.loras) or "none"
        print(f"[{stage}] warm-up: engine {warm_engine:.2f} s, plain {warm_plain:.2f} s (LoRA: {lora})", flush=True)
        for repeat in range(self.args.repeats):
            seconds, cpu, outcome = self.engine_run(stage)
            row.engine_seconds.append(seconds)
            row.engine_cpu_seconds.append(cpu)
            plain_seconds, plain_cpu = self.plain_run(stage)
            row.plain_seconds.append(plain_seconds)
            row.plain_cpu_seconds.append(plain_cpu)
            row.load_averages.append(load_average())
            stages = ", ".join(f"{k} {v:.2f} s" for k, v in outcome.seconds.items())
            print(f"[{stage}] run {repeat + 1}/{self.args.repeats}: engine {seconds:.2f} s ({stages}; CPU {cpu:.2f} s), "
                  f"plain {plain_seconds:.2f} s (CPU {plain_cpu:.2f} s); load average {row.load_averages[-1]}", flush=True)
        return row


def format_table(rows: list[Row]) -> str:
    """A Markdown table (pasteable into bench/README.md) with the library's own table writer."""
    from fetalstudio.data.reports import markdown_table

    table = [{
        "stage": r.stage, "U-Net steps": r.unet_steps,
        "engine s/edit": statistics.median(r.engine_seconds), "plain s/edit": statistics.median(r.plain_seconds),
        "ratio (median)": round(r.ratio, 3), "ratio (min)": round(r.ratio_min, 3), "CPU-time ratio": round(r.cpu_ratio, 3),
        f"< {TARGET_SECONDS:g} s": "yes" if statistics.median(r.engine_seconds) < TARGET_SECONDS else "no",
    } for r in rows]
    return markdown_table(table, digits=3)


# --- main ---------------------------------------------------------------------------------------
def placement_for(args: argparse.Namespace):
    """The app's own device and dtype choice, or the ones asked for."""
    from fetalstudio.models import device as devices

    placement = devices.default_placement(None if args.device == "auto" else args.device)
    if args.dtype == "auto":
        return placement
    return devices.DevicePlacement(device=placement.device, dtype=DTYPES[args.dtype])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    import logging

    from fetalstudio import paths
    from fetalstudio.anatomy.flex import BUNDLED_CONTROLNET, FlexOptions
    from fetalstudio.errors import FetalStudioError
    from fetalstudio.models.manager import ModelManager

    logging.basicConfig(level=logging.WARNING)
    placement = placement_for(args)
    with tempfile.TemporaryDirectory(prefix="fetalstudio-bench-flex-") as tmp:
        manager = ModelManager(checkpoints_dir=paths.checkpoints_dir(), placement=placement)
        try:
            model_id = manager.entry(args.model).id
            if args.controlnet:
                controlnet, trained = manager.entry(args.controlnet).id, "given"
            elif not args.quick and BUNDLED_CONTROLNET in manager.ids():
                controlnet, trained = BUNDLED_CONTROLNET, "bundled"
            else:
                controlnet = manager.entry(untrained_controlnet(manager, model_id, Path(tmp) / "controlnet-from-unet")).id
                trained = "untrained ControlNetModel.from_unet (times the same as trained weights; pictures meaningless)"
            size = manager.native_image_size(model_id) or 512
            edit = make_edit(args, size, FlexOptions().osm_margin_px)
            bench = Bench(args, manager, model_id, controlnet, edit)
        except FetalStudioError as error:
            raise SystemExit(f"error: {error}") from None
        print(f"FetalStudio anatomy-edit benchmark: {model_id} + ControlNet {controlnet} ({trained}); "
              f"{placement.label}; DDIM {args.steps} steps, guidance {args.guidance:g}, {size}x{size}; {edit.description}; "
              f"{args.repeats} timed runs per stage; load average before {load_average()}", flush=True)
        rows = [bench.measure(stage) for stage in args.stages]
        print()
        print(format_table(rows))
        print()
        print(machine_line(placement.device))
        print(f"load average (1/5/15 min) after each run: {'; '.join(a for r in rows for a in r.load_averages)}. On a "
              "machine shared with trainings, wall times swing with the load; compare the CPU-time ratio.")
        print("engine = anatomy.flex.run_flex (everything the app runs); plain = StableDiffusionControlNetInpaintPipeline "
              "(from_pipe, same components) with the same steps/size/guidance; ssa+osm = two calls; ssa's ratio "
              "includes SSA's own cost (diffusers has none).")
        if args.json:
            from fetalstudio.data.reports import write_json

            write_json(args.json, {
                "args": vars(args), "model": model_id, "controlnet": controlnet, "controlnet_weights": trained,
                "machine": machine_line(placement.device), "edit": edit.description,
                "rows": [{**asdict(r), "ratio_median": r.ratio, "ratio_min": r.ratio_min, "cpu_time_ratio": r.cpu_ratio}
                         for r in rows],
            })
            print(f"wrote {args.json}")
        manager.unload_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
