"""Command line: ``python -m fetalstudio <command> ...`` — the same library calls as the UI.

Every command is a :class:`fetalstudio.cli_args.Command` listed once in :func:`commands`; its module
defines ``COMMAND`` (the ones below: generate, models, params).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fetalstudio.cli_args import Command, CommandGroup, at_least_one, output_folder
from fetalstudio.errors import FetalStudioError
from fetalstudio.vocabulary import HEAD_SUBJECT, subject_choices

if TYPE_CHECKING:
    from fetalstudio.app_context import AppContext
    from fetalstudio.distributed import ProcessShare

EXIT_USER_ERROR = 2


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plane", action="append", required=True,
                        help=f"plane(s) to generate, repeatable or comma-separated: {', '.join(subject_choices())}; 'head' needs --trimester")
    parser.add_argument("--trimester", choices=["first", "second", "third"], help="trimester for --plane head (prompt 'An ultrasound image of a fetal head, <trimester> trimester')")
    parser.add_argument("--n", type=int, default=1, help="images per plane (and per sampler)")
    parser.add_argument("--sampler", default="euler", help="sampler(s), comma-separated: euler, euler_a, unipc, ddim, dpmpp_2m_karras")
    parser.add_argument("--out", type=output_folder, required=True, help="output folder (created; an existing one from the same settings is resumed)")
    parser.add_argument("--model", help="generator: a model id from `python -m fetalstudio models` or a path to a diffusers folder / SD 1.x .safetensors (default: the manifest's default generator)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE_OR_ID[:WEIGHT]", help="LoRA to apply with its weight 0-1.5 (default 1.0); repeatable")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--width", type=int, help="image width in pixels (multiple of 8; default: the size the model was trained at, else 512)")
    parser.add_argument("--height", type=int, help="image height in pixels (multiple of 8; default: the size the model was trained at, else 512)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed+i")
    parser.add_argument("--prompt", help="prompt to use instead of the plane's caption (e.g. 'a photo of fetal abdomen')")
    parser.add_argument("--negative-prompt", default="", help="negative prompt")
    parser.add_argument("--batch-size", type=at_least_one, default=1, help="images generated together (more memory, faster on GPUs)")
    parser.add_argument("--color", choices=["auto", "grayscale", "rgb"], default="auto",
                        help="output colour: auto = the model's declaration (output = \"grayscale\" in checkpoints/manifest.toml, "
                             "e.g. the bundled fetalstudio-tiny; undeclared models keep RGB), grayscale (R=G=B; an image+mask "
                             "LoRA's mask channel is kept) or rgb (the decoder's pixels)")
    parser.add_argument("--json", type=Path, help="also write a JSON summary to this file")


#: Image size when neither the user nor the model's configs give one (SD 1.x).
DEFAULT_IMAGE_SIZE = 512


def run_generate(args: argparse.Namespace) -> int:
    from fetalstudio.app_context import build_context
    from fetalstudio.distributed import joined_processes
    from fetalstudio.pipelines.samplers import parse_sampler
    from fetalstudio.vocabulary import parse_plane

    planes = [p.lower() for value in args.plane for p in _comma_list(value)]
    for plane in planes:
        if plane == HEAD_SUBJECT:
            if not args.trimester:
                raise FetalStudioError("--plane head needs --trimester first|second|third.")
        else:
            try:
                parse_plane(plane)
            except ValueError as error:
                raise FetalStudioError(str(error)) from None
    try:
        samplers = [parse_sampler(s).key for s in _comma_list(args.sampler)]
    except ValueError as error:
        raise FetalStudioError(str(error)) from None
    if args.n < 1:
        raise FetalStudioError("--n must be at least 1.")
    with joined_processes() as (share, device):
        return _export(args, planes, samplers, share, build_context(device=device))


def _export(args: argparse.Namespace, planes: list[str], samplers: list[str], share: ProcessShare,
            context: AppContext) -> int:
    """The dataset export of ``generate``: this process's share of it, the summary printed by the main process."""
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.pipelines.settings import LoraSpec
    from fetalstudio.synthesis.dataset import DatasetRequest, export_dataset

    model = args.model or context.manager.default_id(ModelKind.SD_PIPELINE)
    native = context.manager.native_image_size(model) or DEFAULT_IMAGE_SIZE
    args.width, args.height = args.width or native, args.height or native
    request = DatasetRequest(
        out_dir=args.out, model=model, planes=tuple(planes), samplers=tuple(samplers), images_per_plane=args.n,
        steps=args.steps, guidance_scale=args.guidance, width=args.width, height=args.height, seed=args.seed,
        batch_size=args.batch_size, negative_prompt=args.negative_prompt, prompt=args.prompt,
        trimester=args.trimester, loras=tuple(LoraSpec.parse(text) for text in args.lora), color=args.color,
    )

    def progress(done: int, total: int, last: str) -> None:
        if last:
            print(f"{share.prefix}[{done}/{total}] {last}", file=sys.stderr, flush=True)

    report = export_dataset(context.synthesis, request, on_progress=progress, share=share)
    if not share.is_main:
        return 0
    summary = {
        "out": str(report.out_dir), "generated": report.generated, "skipped_existing": report.skipped,
        "total": report.total, "metadata": str(report.out_dir / "metadata.csv"),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from fetalstudio.app_context import build_manager

    rows = build_manager().status()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    if not rows:
        from fetalstudio.paths import checkpoints_dir

        print(f"No models found. Put checkpoints in {checkpoints_dir()} (see README, 'Models').")
        return 0
    width = max(len(r.id) for r in rows)
    for row in rows:
        print(f"{row.id:<{width}}  {row.kind:<12} {row.format:<18} {row.source}")
    return 0


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("png", type=Path)


def run_params(args: argparse.Namespace) -> int:
    from fetalstudio.pipelines.metadata import settings_from_png

    print(json.dumps(settings_from_png(args.png).to_dict(), indent=2))
    return 0


GENERATE = Command(
    "generate", "generate fetal-plane images into a dataset folder (resumable)", add_generate_arguments, run_generate,
    description=(
        "Generate N images per plane and sampler into OUT/<plane>/<sampler>/ with metadata.csv. "
        "Re-running the same command skips the images that already exist, so an interrupted run "
        "resumes where it stopped. Example: python -m fetalstudio generate --plane brain --n 500 "
        "--sampler euler,unipc --out datasets/brain. Several processes (GPUs, machines) share one export when "
        "started by accelerate: accelerate launch --multi_gpu --num_processes 4 -m fetalstudio generate ..."
    ),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
)
MODELS = Command("models", "list the models FetalStudio knows (manifest + discovered)", add_models_arguments, run_models,
                 formatter_class=argparse.HelpFormatter)
PARAMS = Command("params", "print the generation parameters stored in a PNG", add_params_arguments, run_params,
                 formatter_class=argparse.HelpFormatter)


def commands() -> tuple[Command | CommandGroup, ...]:
    """Every command, in the order ``--help`` lists them. A new command: its module's ``COMMAND``, one line here.

    Imported here, not at the top, so that importing this module stays light.
    """
    from fetalstudio.analysis import analyze_cli
    from fetalstudio.anatomy import flex_cli
    from fetalstudio.evaluation import classifier as eval_classifier
    from fetalstudio.evaluation import flex as eval_flex
    from fetalstudio.evaluation import segmenter as eval_segmenter
    from fetalstudio.evaluation.synthesis import command as eval_synthesis
    from fetalstudio.review import extract_cli
    from fetalstudio.training import classifier as train_classifier
    from fetalstudio.training import controlnet as train_controlnet
    from fetalstudio.training import detector as train_detector
    from fetalstudio.training import head_unet as train_head_unet
    from fetalstudio.training import ssl as train_ssl
    from fetalstudio.training import lora as train_lora
    from fetalstudio.training import sd as train_sd
    from fetalstudio.training import segmenter as train_segmenter

    return (
        GENERATE,
        MODELS,
        PARAMS,
        extract_cli.COMMAND,
        analyze_cli.COMMAND,
        CommandGroup("train", "train a model (writes a checkpoint the model manager loads)",
                     (train_sd.COMMAND, train_lora.COMMAND, train_classifier.COMMAND, train_segmenter.COMMAND, train_controlnet.COMMAND,
                      train_detector.COMMAND, train_head_unet.COMMAND, train_ssl.COMMAND)),
        CommandGroup("eval", "evaluate a model (writes a report folder)",
                     (eval_classifier.COMMAND, eval_segmenter.COMMAND, eval_synthesis.COMMAND, eval_flex.COMMAND)),
        CommandGroup("flex", "anatomy-controlled synthesis (FetalFlex): edit a scan's layout, anomaly presets", (flex_cli.PRESETS, flex_cli.PAIRS),
                     default=flex_cli.EDIT),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fetalstudio", description="FetalStudio: fetal ultrasound synthesis and annotation.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in commands():
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FetalStudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; run the same command again to resume.", file=sys.stderr)
        return 130
