"""Command line: ``python -m fetalstudio <command> ...`` — the same library calls as the UI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fetalstudio.cli_args import at_least_one, output_folder
from fetalstudio.errors import FetalStudioError
from fetalstudio.vocabulary import HEAD_SUBJECT, subject_choices
from fetalstudio.review.extract_cli import add_extract_parser
from fetalstudio.analysis.analyze_cli import add_analyze_parser

EXIT_USER_ERROR = 2


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_generate_parser(commands) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate fetal-plane images into a dataset folder (resumable)",
        description=(
            "Generate N images per plane and sampler into OUT/<plane>/<sampler>/ with metadata.csv. "
            "Re-running the same command skips the images that already exist, so an interrupted run "
            "resumes where it stopped. Example: python -m fetalstudio generate --plane brain --n 500 "
            "--sampler euler,unipc --out datasets/brain"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    parser.set_defaults(handler=run_generate)


#: Image size when neither the user nor the model's configs give one (SD 1.x).
DEFAULT_IMAGE_SIZE = 512


def run_generate(args: argparse.Namespace) -> int:
    from fetalstudio.app_context import build_context
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.synthesis.dataset import DatasetRequest, export_dataset
    from fetalstudio.pipelines.samplers import parse_sampler
    from fetalstudio.pipelines.settings import LoraSpec
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
    context = build_context()
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
            print(f"[{done}/{total}] {last}", file=sys.stderr, flush=True)

    report = export_dataset(context.synthesis, request, on_progress=progress)
    summary = {
        "out": str(report.out_dir), "generated": report.generated, "skipped_existing": report.skipped,
        "total": report.total, "metadata": str(report.out_dir / "metadata.csv"),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


def add_models_parser(commands) -> None:
    parser = commands.add_parser("models", help="list the models FetalStudio knows (manifest + discovered)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from fetalstudio.app_context import build_context

    rows = build_context().manager.status()
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


def add_params_parser(commands) -> None:
    parser = commands.add_parser("params", help="print the generation parameters stored in a PNG")
    parser.add_argument("png", type=Path)
    parser.set_defaults(handler=run_params)


def run_params(args: argparse.Namespace) -> int:
    from fetalstudio.pipelines.metadata import settings_from_png

    print(json.dumps(settings_from_png(args.png).to_dict(), indent=2))
    return 0


def add_command_group(commands, name: str, registry: dict[str, tuple[str, str]], help_text: str) -> None:
    """``train ...`` / ``eval ...``: one sub-command per module of the registry.

    Command modules keep their top-level imports light (heavy libraries are imported in ``run``),
    so building the parser stays fast.
    """
    import importlib

    parser = commands.add_parser(name, help=help_text, description=help_text)
    sub = parser.add_subparsers(dest=f"{name}_command", required=True)
    for key, (module_name, description) in registry.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # not part of this version
        command = sub.add_parser(key, help=description, description=(module.__doc__ or description).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    from fetalstudio import evaluation, training

    parser = argparse.ArgumentParser(prog="python -m fetalstudio", description="FetalStudio: fetal ultrasound synthesis and annotation.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(commands)
    add_models_parser(commands)
    add_params_parser(commands)
    add_extract_parser(commands)
    add_analyze_parser(commands)
    add_command_group(commands, "train", training.COMMANDS, "train a model (writes a checkpoint the model manager loads)")
    add_command_group(commands, "eval", evaluation.COMMANDS, "evaluate a model (writes a report folder)")
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
