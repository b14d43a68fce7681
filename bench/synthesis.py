#!/usr/bin/env python
"""Seconds per image: FetalStudio's synthesis path vs a plain diffusers call on the same pipeline.

The app path is ``ModelManager`` + ``TextToImageRunner.generate(GenerationSettings(...))``: exactly
what the UI and CLI run, per-run scheduler construction, metadata and hashing included. The plain
path calls the very same pipeline object (same weights, device and dtype) directly::

    pipe(prompt=[prompt] * batch, num_inference_steps=steps, guidance_scale=cfg, width=w, height=h,
         generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)])

with a fresh scheduler of the same class as the app's sampler, built from the model's own
scheduler config (built outside the timed region). Runs alternate app, plain, app, plain... after
one untimed warm-up of each, so that clock drift and thermal effects hit both alike; CUDA is
synchronised before every clock read. The ratio app/plain (of the medians) should be <= 1.05.

Examples::

    python bench/synthesis.py --model tiny --steps 20 --batch-size 1,4 --repeats 3
    python bench/synthesis.py --model sd15-random --device cuda --dtype fp16 --steps 20 \\
        --batch-size 1,8 --width 512 --height 512
"""

from __future__ import annotations

import argparse
import json
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

from machine import cpu_name  # noqa: E402  (bench/ is on sys.path when a script runs)

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SD15_CONFIGS = REPO_ROOT / "fetalstudio" / "models" / "configs" / "sd15"
DEFAULT_PROMPT = "fetal ultrasound, transthalamic plane of the fetal brain, high quality"


# --- arguments ----------------------------------------------------------------------------------
def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers separated by commas (got {text!r})") from None
    if not sizes or any(not 1 <= s <= 64 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be between 1 and 64 (got {text!r})")
    return sizes


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" for computed defaults
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Seconds per image of FetalStudio's synthesis path (ModelManager + TextToImageRunner) "
            "next to a plain diffusers call on the same pipeline object, and their ratio (target <= 1.05)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--model", default="tiny",
        help="a catalog id, a path to a diffusers folder or single-file checkpoint, 'tiny' (tiny random "
        "SD-architecture pipeline) or 'sd15-random' (SD-1.5 architecture, random weights, built from "
        "fetalstudio/models/configs/sd15)",
    )
    parser.add_argument("--sampler", default="euler", help="sampler key or label (euler, euler_a, unipc, ddim, dpmpp_2m_karras)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--width", type=int, default=None, help="image width (default 512, or 64 for --model tiny)")
    parser.add_argument("--height", type=int, default=None, help="image height (default 512, or 64 for --model tiny)")
    parser.add_argument("--batch-size", type=_batch_sizes, default=[1], help="images per batch; a comma list (e.g. 1,8) runs each")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path after one untimed warm-up of each")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="device (auto: the app's choice)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="weights dtype (auto: the app's choice for the device)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of image 0; image i uses seed + i")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (the same for every image)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (empty: none, as the app does)")
    parser.add_argument(
        "--lora-rank", type=int, default=0,
        help="if > 0, also time the app path with a random kohya LoRA of this rank active (extra rows)",
    )
    parser.add_argument("--lora-weight", type=float, default=1.0, help="weight of the --lora-rank LoRA")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch intra-op CPU threads (0: torch's default). On a shared or small CPU, fewer threads than "
        "cores gives steadier timings",
    )
    parser.add_argument("--json", metavar="OUT", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no per-run lines, only the table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch %s)" % torch.__version__)
    default_size = 64 if args.model == "tiny" else 512
    args.width = args.width or default_size
    args.height = args.height or default_size
    return args


# --- machine ------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    cpu = cpu_name()
    import diffusers
    import transformers

    info = {
        "cpu": cpu,
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "gpu": None,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --- models -------------------------------------------------------------------------------------
def build_sd15_random(folder: Path, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Path:
    """An SD-1.5-architecture pipeline with random weights from the repo's configs, saved as a diffusers folder."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    needed = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer", "scheduler")
    missing = [name for name in needed if not (SD15_CONFIGS / name).exists()]
    if missing:
        raise SystemExit(f"sd15-random needs {SD15_CONFIGS}; missing: {', '.join(missing)}")
    torch.manual_seed(seed)
    # Random init of 860M U-Net parameters is far faster on a GPU; the saved folder is the same.
    init_device = device if device.type == "cuda" else torch.device("cpu")
    with init_device:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIGS / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIGS / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIGS / "tokenizer")
    scheduler_config = json.loads((SD15_CONFIGS / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.to(dtype=dtype)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    del pipeline, unet, vae, text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def prepare_model(name: str, workdir: Path, dtype: torch.dtype, device: torch.device) -> str:
    """The --model value the manager should see (a catalog id or a path)."""
    if name == "tiny":
        from tests.tiny_models import save_tiny_sd_pipeline  # the tests' tiny model (REPO_ROOT is on sys.path)

        return str(save_tiny_sd_pipeline(workdir / "tiny-sd"))
    if name == "sd15-random":
        return str(build_sd15_random(workdir / "sd15-random", dtype, device))
    return name


# --- timing -------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    device: str
    dtype: str
    sampler: str
    steps: int
    width: int
    height: int
    batch: int
    variant: str  # "base" or "lora r<N>"
    app_seconds: list[float] = field(default_factory=list)  # per run (whole batch)
    app_overhead_seconds: list[float] = field(default_factory=list)  # per app run: time outside the pipeline call
    plain_seconds: list[float] = field(default_factory=list)
    app_cpu_seconds: list[float] = field(default_factory=list)  # process CPU time per run (robust on a busy CPU)
    plain_cpu_seconds: list[float] = field(default_factory=list)
    plain_label: str = "plain"
    same_images: bool | None = None
    max_pixel_diff: int | None = None
    note: str = ""

    def per_image(self, runs: list[float]) -> tuple[float, float]:
        return statistics.median(runs) / self.batch, min(runs) / self.batch

    @property
    def app_median(self) -> float:
        return self.per_image(self.app_seconds)[0]

    @property
    def plain_median(self) -> float:
        return self.per_image(self.plain_seconds)[0]

    @property
    def ratio(self) -> float:
        return self.app_median / self.plain_median

    @property
    def ratio_min(self) -> float:
        return self.per_image(self.app_seconds)[1] / self.per_image(self.plain_seconds)[1]

    @property
    def cpu_time_ratio(self) -> float:
        return statistics.median(self.app_cpu_seconds) / statistics.median(self.plain_cpu_seconds)

    @property
    def overhead_ms(self) -> float:
        return statistics.median(self.app_overhead_seconds) * 1e3

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            app_overhead_ms_per_run_median=self.overhead_ms,
            app_s_per_image_median=self.app_median, app_s_per_image_min=self.per_image(self.app_seconds)[1],
            plain_s_per_image_median=self.plain_median, plain_s_per_image_min=self.per_image(self.plain_seconds)[1],
            ratio_median=self.ratio, ratio_min=self.ratio_min, cpu_time_ratio_median=self.cpu_time_ratio,
        )
        return data


def compare_images(a: list, b: list) -> tuple[bool, int]:
    diffs = [int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()) for x, y in zip(a, b)]
    worst = max(diffs) if diffs else 0
    return len(a) == len(b) and worst == 0, worst


class Bench:
    def __init__(self, args: argparse.Namespace, manager, engine, model_id: str, pipe, base_scheduler_config: dict):
        from fetalstudio.pipelines.samplers import parse_sampler

        self.args = args
        self.manager = manager
        self.engine = engine
        self.model_id = model_id
        self.pipe = pipe
        self.device = manager.placement.device
        self.sampler = parse_sampler(args.sampler)
        self.base_scheduler_config = base_scheduler_config

    def settings(self, batch: int, loras=()):
        from fetalstudio.pipelines.settings import GenerationSettings

        a = self.args
        return GenerationSettings(
            model=self.model_id, prompt=a.prompt, negative_prompt=a.negative_prompt, sampler=self.sampler.key,
            steps=a.steps, guidance_scale=a.guidance, width=a.width, height=a.height, seed=a.seed,
            batch_size=batch, batch_count=1, loras=tuple(loras),
        )

    def app_run(self, settings) -> tuple[float, float, float, list]:
        """Wall and process-CPU seconds of ``engine.generate``, the wall seconds of it spent
        outside the diffusers call, and the images.

        The pipeline class's ``__call__`` is wrapped with a clock for the duration of the app run
        only (the engine calls ``pipeline(...)``, which Python resolves on the class), so the
        engine's own work (settings, scheduler construction, hashing, metadata) is measured
        directly, independent of how noisy the denoising itself is.
        """
        cls = type(self.pipe)
        original = cls.__dict__.get("__call__")
        inner = [0.0]
        call = cls.__call__

        def timed_call(pipe, *args, **kwargs):
            started_inner = time.perf_counter()
            try:
                return call(pipe, *args, **kwargs)
            finally:
                synchronize(self.device)
                inner[0] += time.perf_counter() - started_inner

        cls.__call__ = timed_call
        try:
            synchronize(self.device)
            started, started_cpu = time.perf_counter(), time.process_time()
            result = self.engine.generate(settings)
            synchronize(self.device)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        finally:
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original
        return seconds, cpu_seconds, seconds - inner[0], [g.image for g in result.images]

    def plain_run(self, batch: int) -> tuple[float, float, list]:
        import diffusers

        a = self.args
        # Same scheduler class and config as the app's sampler; built outside the timed region.
        scheduler_class = getattr(diffusers, self.sampler.scheduler_class)
        self.pipe.scheduler = scheduler_class.from_config(dict(self.base_scheduler_config), **self.sampler.overrides)
        generators = [torch.Generator("cpu").manual_seed(a.seed + i) for i in range(batch)]
        negative = [a.negative_prompt] * batch if a.negative_prompt else None
        synchronize(self.device)
        started, started_cpu = time.perf_counter(), time.process_time()
        output = self.pipe(
            prompt=[a.prompt] * batch, negative_prompt=negative, num_inference_steps=a.steps,
            guidance_scale=a.guidance, width=a.width, height=a.height, generator=generators,
        )
        images = output.images
        synchronize(self.device)
        return time.perf_counter() - started, time.process_time() - started_cpu, images

    def measure(self, row: Row, app_settings, before_plain=None, before_app=None) -> Row:
        """Warm-up (app, plain), then ``repeats`` x (app, plain), alternating."""
        def app():
            if before_app:
                before_app()
            return self.app_run(app_settings)

        def plain():
            if before_plain:
                before_plain()
            return self.plain_run(row.batch)

        label = f"{row.variant} batch {row.batch}"
        warm_app, _, warm_overhead, _ = app()
        warm_plain, _, _ = plain()
        self.log(f"[{label}] warm-up: app {warm_app:.3f} s (outside the pipeline call {warm_overhead * 1e3:.1f} ms), "
                 f"{row.plain_label} {warm_plain:.3f} s")
        app_images = plain_images = None
        for repeat in range(self.args.repeats):
            seconds, cpu_seconds, overhead, app_images = app()
            row.app_seconds.append(seconds)
            row.app_cpu_seconds.append(cpu_seconds)
            row.app_overhead_seconds.append(overhead)
            seconds_plain, cpu_plain, plain_images = plain()
            row.plain_seconds.append(seconds_plain)
            row.plain_cpu_seconds.append(cpu_plain)
            self.log(f"[{label}] run {repeat + 1}/{self.args.repeats}: app {seconds:.3f} s (outside the pipeline call "
                     f"{overhead * 1e3:.1f} ms; CPU time {cpu_seconds:.3f} s), {row.plain_label} {seconds_plain:.3f} s "
                     f"(CPU time {cpu_plain:.3f} s)")
        row.same_images, row.max_pixel_diff = compare_images(app_images, plain_images)
        return row

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(text, flush=True)


# --- output -------------------------------------------------------------------------------------
def format_table(rows: list[Row], machine: dict) -> str:
    header = ["model", "device", "dtype", "sampler", "steps", "size", "batch", "variant",
              "app s/img", "plain s/img", "ratio", "(min: app/plain/ratio)", "app overhead ms/run", "CPU-time ratio", "same img"]
    lines = []
    for r in rows:
        app_med, app_min = r.per_image(r.app_seconds)
        plain_med, plain_min = r.per_image(r.plain_seconds)
        lines.append([
            r.model, r.device, r.dtype, r.sampler, str(r.steps), f"{r.width}x{r.height}", str(r.batch), r.variant,
            f"{app_med:.4f}", f"{plain_med:.4f}" + ("" if r.plain_label == "plain" else f" ({r.plain_label})"),
            f"{r.ratio:.3f}" + ("" if r.ratio <= 1.05 else " !"),
            f"{app_min:.4f}/{plain_min:.4f}/{r.ratio_min:.3f}",
            f"{r.overhead_ms:.1f}",
            f"{r.cpu_time_ratio:.3f}",
            "yes" if r.same_images else f"no (max diff {r.max_pixel_diff})",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    out.append("")
    out.append(
        f"machine: CPU {machine['cpu']} ({machine['cpu_count']} cores, torch threads {machine['torch_threads']}); "
        f"GPU {machine['gpu'] or 'none'}; torch {machine['torch']}, diffusers {machine['diffusers']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}, python {machine['python']}"
    )
    out.append("s/img: median over runs of (seconds per batch / batch size); ratio = app/plain of medians (target <= 1.05, '!' above).")
    out.append("app overhead ms/run: median time of engine.generate spent outside the diffusers pipeline call (per batch).")
    out.append("CPU-time ratio: app/plain of this process's CPU seconds (time.process_time); on a CPU device with "
               "--threads 1 it is less sensitive than wall time to other processes competing for the cores.")
    if any(r.variant != "base" for r in rows):
        out.append(
            "LoRA rows: 'plain+lora' = plain call on the same pipeline with the same peft adapter set active "
            "(app overhead); 'vs plain without LoRA' is in the JSON and below."
        )
        for r in rows:
            if r.variant != "base" and r.note:
                out.append(f"  {r.variant} batch {r.batch}: {r.note}")
    return "\n".join(out)


# --- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from fetalstudio import paths
    from fetalstudio.models import device as devices
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.pipelines.runners import TextToImageRunner
    from fetalstudio.pipelines.settings import LoraSpec

    # "auto" is the app's own choice (incl. $FETALSTUDIO_DEVICE / $FETALSTUDIO_DTYPE where it honours them).
    placement = devices.default_placement(None if args.device == "auto" else args.device)
    if args.dtype != "auto":
        placement = devices.DevicePlacement(device=placement.device, dtype=DTYPES[args.dtype])
    device, dtype = placement.device, placement.dtype
    machine = machine_info(device)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"FetalStudio synthesis benchmark: model {args.model}, {placement.label}, sampler {args.sampler}, "
          f"{args.steps} steps, {args.width}x{args.height}, batch sizes {args.batch_size}, {args.repeats} repeats", flush=True)

    with tempfile.TemporaryDirectory(prefix="fetalstudio-bench-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        model_arg = prepare_model(args.model, workdir, dtype, device)
        if args.model in ("tiny", "sd15-random"):
            print(f"built {args.model} in {time.perf_counter() - started:.1f} s at {model_arg}", flush=True)

        manager = ModelManager(checkpoints_dir=paths.checkpoints_dir(), placement=placement)
        engine = TextToImageRunner(manager)
        model_id = manager.entry(model_arg).id
        started = time.perf_counter()
        pipe = manager.get(model_id)
        print(f"loaded through the model manager in {time.perf_counter() - started:.1f} s ({manager.describe()})", flush=True)
        base_scheduler_config = dict(pipe.scheduler.config)  # as loaded; the engine keeps the same copy
        pipe.set_progress_bar_config(disable=True)  # same object for both paths: no tqdm in either

        bench = Bench(args, manager, engine, model_id, pipe, base_scheduler_config)
        common = dict(model=args.model, device=device.type, dtype=dtype_name, sampler=bench.sampler.key,
                      steps=args.steps, width=args.width, height=args.height)
        rows: list[Row] = []
        base_rows: dict[int, Row] = {}
        for batch in args.batch_size:
            row = bench.measure(Row(batch=batch, variant="base", **common), bench.settings(batch))
            rows.append(row)
            base_rows[batch] = row

        if args.lora_rank > 0:
            from tests.tiny_models import write_random_kohya_lora

            lora_path = write_random_kohya_lora(pipe, workdir / "loras" / f"bench_lora_r{args.lora_rank}.safetensors",
                                                rank=args.lora_rank, alpha=float(args.lora_rank))
            spec = LoraSpec(str(lora_path), args.lora_weight)
            # First app call loads the adapter (untimed); afterwards the plain path uses the same adapter.
            engine.generate(bench.settings(args.batch_size[0], [spec]))
            adapter_names = list(pipe.get_active_adapters())  # the adapter the app loaded and activated

            def plain_with_lora():
                pipe.enable_lora()
                pipe.set_adapters(adapter_names, adapter_weights=[args.lora_weight] * len(adapter_names))

            for batch in args.batch_size:
                row = Row(batch=batch, variant=f"lora r{args.lora_rank}", plain_label="plain+lora", **common)
                bench.measure(row, bench.settings(batch, [spec]), before_plain=plain_with_lora)
                base = base_rows[batch]
                vs_base = row.app_median / base.plain_median
                row.note = (f"app+LoRA {row.app_median:.4f} s/img vs plain without LoRA {base.plain_median:.4f} s/img "
                            f"(measured earlier, before the adapter was loaded): x{vs_base:.3f}")
                rows.append(row)

        print()
        print(format_table(rows, machine))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "machine": machine, "rows": [r.to_dict() for r in rows]}
            args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
            print(f"wrote {args.json}")
        manager.unload_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
