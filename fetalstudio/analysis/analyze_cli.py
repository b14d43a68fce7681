"""``python -m fetalstudio analyze``: plane classification and head segmentation + biometry for a
folder or CSV of images, into a report folder (resumable: run the same command again).

Input: a folder of images (PNG/JPEG/BMP/TIFF/DICOM, searched recursively) or a CSV with an
``image`` column and optional ``mask`` (ground truth, only used to score: Dice), ``pixel_size_mm``
and ``hc_mm`` (reference HC: the HC error in mm is reported), paths relative to the CSV — the
segmentation CSVs of ../shared/data (e.g. hc18_heads/pairs.csv) work as they are.

The head box comes from the automatic mode (a coarse pass over candidate boxes scored by the
segmenter, then a second pass with the box found): no ground truth is used to make a prediction.

Output (``--out``): report.csv (one row per image: plane and probabilities, box, ellipse, HC/BPD/OFD
in px and mm, Dice and HC error when references are given, a warning when the HC is doubtful:
not a head plane, poor ellipse fit), masks/, overlays/, summary.json and, with ``--export``, mask
exports (png, coco with RLE and polygons, yolo, nnunet) under exports/. A JSON summary (mean
Dice, HC MAE, counts) is printed and written to ``--json FILE``.

An image that cannot be analysed (missing, unreadable, a bad CSV cell) gets an error row and the
run goes on. One run at a time writes into an output folder (a second is refused); an output
folder inside the input folder is not read as input. A full disk stops the run: the rows written
are kept and the same command resumes.

Several processes (GPUs, machines) share one run when started by accelerate: ``accelerate launch
--multi_gpu --num_processes 4 -m fetalstudio analyze ...``; each analyses every 4th image left, the
first merges the rows into report.csv and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fetalstudio.cli_args import Command, at_least_one, device_name, output_folder


def _formats(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="source", type=Path, required=True, help="folder of images, or a CSV with an 'image' column")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (created; the same command resumes an interrupted run)")
    parser.add_argument("--classify", action="store_true", help="predict the plane of every image (default: both when neither is given)")
    parser.add_argument("--segment", action="store_true", help="segment and measure the fetal head (automatic box)")
    parser.add_argument("--pixel-size", type=float, help="mm per pixel for images without one (CSV column or DICOM header win)")
    parser.add_argument("--classifier", action="append", default=[], metavar="ID_OR_PATH",
                        help="plane classifier; repeat to average several (an ensemble). Default: the manifest's default")
    parser.add_argument("--segmenter", metavar="ID_OR_PATH", help="segmenter id/path, or a SAM vit_b/l/h .pth (default: the bundled head segmenter)")
    parser.add_argument("--export", type=_formats, default=(), metavar="FORMATS", help="mask exports, comma-separated: png, coco, yolo, nnunet")
    parser.add_argument("--no-overlays", action="store_true", help="do not write overlay pictures")
    parser.add_argument("--measure-heads-only", action="store_true",
                        help="measure the head only on images classified as a head plane (brain); the others get a row "
                             "saying 'head not measured: not a head plane' (needs classification and segmentation)")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--limit", type=at_least_one, help="only the first N images")
    parser.add_argument("--max-pixels", type=at_least_one, metavar="N",
                        help="refuse images declaring more pixel values than this (rows x columns x samples; checked before "
                             "decoding, against decompression bombs). Default: 50000000 or $FETALSTUDIO_MAX_PIXELS")
    parser.add_argument("--json", type=Path, help="also write the JSON summary to this file")


def run_analyze(args: argparse.Namespace) -> int:
    from fetalstudio.analysis.batch import read_batch_inputs, run_batch
    from fetalstudio.analysis.models import batch_models
    from fetalstudio.analysis.session import checked_pixel_size
    from fetalstudio.app_context import build_manager
    from fetalstudio.imaging.image_input import set_max_pixels
    from fetalstudio.distributed import joined_processes

    classify, segment = args.classify, args.segment
    if not (classify or segment):
        classify = segment = True
    pixel_size = checked_pixel_size(args.pixel_size)
    if args.max_pixels is not None:
        set_max_pixels(args.max_pixels)
    inputs = read_batch_inputs(args.source, exclude=[args.out])[: args.limit]  # --out inside --in: not its own input
    with joined_processes(args.device) as (share, device):
        manager = build_manager(device=device)
        settings, classifier, predictor = batch_models(manager, classify=classify, segment=segment, classifiers=args.classifier,
                                                       segmenter=args.segmenter, pixel_size_mm=pixel_size,
                                                       overlays=not args.no_overlays, formats=args.export,
                                                       measure_heads_only=args.measure_heads_only)

        def progress(done: int, total: int, name: str) -> None:
            print(f"{share.prefix}[{done}/{total}] {name}", file=sys.stderr, flush=True)

        summary = run_batch(inputs, args.out, settings, classifier, predictor, progress=progress, share=share)
    if not share.is_main:
        return 0
    record = summary.as_dict()
    print(json.dumps(record))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


COMMAND = Command("analyze", "classify planes and measure heads in a folder or CSV of images (report CSV, masks, overlays)",
                  add_arguments, run_analyze, description=__doc__.strip())
