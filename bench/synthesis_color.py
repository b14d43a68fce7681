#!/usr/bin/env python
"""Colour cast of generated images, and what exact reproduction of a batched image costs.

Colour: N images from a generator (default: the bundled fetalstudio-tiny, 256 px, Euler 20 steps,
guidance 4, the five plane captions and the head caption in turn, seeds 9000...) with the app's
``TextToImageRunner``. Per image:

- mean channel difference: the mean over pixels of max(R, G, B) - min(R, G, B), in grey levels
  (0 for a grayscale image);
- tint: the largest distance of one channel's mean from the mean of all three channels; an image
  is *strongly tinted* when that exceeds ``--tint-threshold`` grey levels (default 10: a red cast that
  is plainly visible on a grey ultrasound background).

Both figures are given for the decoder's pixels (``color="rgb"``: what every model returned
before grayscale output existed) and for the same images as the engine returns them with grayscale
output (``color.to_grayscale``, the very function ``generate`` applies; a test checks that the
engine's grayscale images equal it), so one generation pass measures before and after.

Reproduction (``--reproduce B``): the seconds to generate one image alone, and to reproduce an
image of a batch of B exactly (the whole batch is run again, as ``reproduce`` does).

Examples::

    python bench/synthesis_color.py --color rgb --n 30
    python bench/synthesis_color.py --color auto --n 30 --reproduce 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from machine import cpu_name  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fetalstudio.models.manager import ModelManager  # noqa: E402
from fetalstudio.pipelines.color import to_grayscale  # noqa: E402
from fetalstudio.pipelines.runners import TextToImageRunner  # noqa: E402
from fetalstudio.pipelines.settings import GenerationSettings  # noqa: E402
from fetalstudio.vocabulary import prompt_for  # noqa: E402

SUBJECTS = (("abdomen", None), ("brain", None), ("femur", None), ("thorax", None), ("other", None), ("head", "second"))


def channel_figures(image) -> tuple[float, float]:
    """(mean channel difference, tint) of one image in grey levels."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    spread = float((rgb.max(axis=2) - rgb.min(axis=2)).mean())
    means = rgb.reshape(-1, 3).mean(axis=0)
    return spread, float(np.abs(means - means.mean()).max())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fetalstudio-tiny", help="generator id or path")
    parser.add_argument("--color", default="auto", choices=("auto", "grayscale", "rgb"), help="output colour for --reproduce")
    parser.add_argument("--n", type=int, default=30, help="images to measure")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--tint-threshold", type=float, default=10.0)
    parser.add_argument("--reproduce", type=int, default=0, metavar="B", help="also time exact reproduction from a batch of B")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = TextToImageRunner(ModelManager(REPO_ROOT / "checkpoints"))
    size = engine.manager.native_image_size(args.model) or 512
    before, after = [], []
    started = time.perf_counter()
    for i in range(args.n):
        subject, trimester = SUBJECTS[i % len(SUBJECTS)]
        settings = GenerationSettings(model=args.model, prompt=prompt_for(subject, trimester), sampler=args.sampler,
                                      steps=args.steps, guidance_scale=args.guidance, width=size, height=size,
                                      seed=args.seed + i, color="rgb")
        image = engine.generate(settings).images[0].image
        before.append(channel_figures(image))
        after.append(channel_figures(to_grayscale(image)))
        print(f"{i + 1}/{args.n} {subject}: before {before[-1][0]:.1f}/{before[-1][1]:.1f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    result = {"machine": cpu_name(), "threads": args.threads, "model": args.model, "n": args.n,
              "tint_threshold": args.tint_threshold, "seconds_per_image": seconds / args.n}
    for name, figures in (("decoder_rgb", before), ("grayscale_output", after)):
        spreads = np.array([f[0] for f in figures])
        tints = np.array([f[1] for f in figures])
        result[name] = {
            "mean_channel_difference": float(spreads.mean()), "max_channel_difference": float(spreads.max()),
            "strongly_tinted_fraction": float((tints > args.tint_threshold).mean()),
            "tint_median": float(np.median(tints)), "tint_max": float(tints.max()),
        }
    if args.reproduce:
        result.update(time_reproduction(engine, args, size))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def time_reproduction(engine: TextToImageRunner, args: argparse.Namespace, size: int) -> dict:
    import tempfile

    from fetalstudio.pipelines.metadata import reproduction_from_png, save_png

    settings = GenerationSettings(model=args.model, prompt=prompt_for("brain"), sampler=args.sampler, steps=args.steps,
                                  guidance_scale=args.guidance, width=size, height=size, seed=args.seed,
                                  batch_size=args.reproduce, color=args.color)
    batch = engine.generate(settings)
    last = batch.images[-1]
    with tempfile.TemporaryDirectory() as folder:
        path = save_png(last.image, Path(folder) / "x.png", last.settings, last.seed, last.metadata)
        started = time.perf_counter()
        single = engine.generate(GenerationSettings.from_dict({**settings.to_dict(), "seed": last.seed, "batch_size": 1}))
        alone = time.perf_counter() - started
        started = time.perf_counter()
        reproduced = engine.reproduce(reproduction_from_png(path))
        exact = time.perf_counter() - started
        original = np.asarray(last.image)
        differing = float((np.asarray(single.images[0].image) != original).mean())
    return {
        "reproduce_batch_size": args.reproduce, "seconds_alone": alone, "seconds_exact_reproduction": exact,
        "exact_reproduction_identical": bool(np.array_equal(np.asarray(reproduced.image), original)),
        "alone_differing_pixel_fraction": differing,
    }


if __name__ == "__main__":
    sys.exit(main())
