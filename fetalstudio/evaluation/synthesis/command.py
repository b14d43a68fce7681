"""Evaluate generated images against real ones: plane accuracy, feature Fréchet distance,
diversity (MS-SSIM), a t-SNE plot and a nearest-neighbour memorisation audit.

    python -m fetalstudio eval synthesis --synthetic datasets/brain --out outputs/eval-synthesis \\
        --african ../shared/data/african/train/labels.csv --json synthesis.json

--synthetic: the folder written by `python -m fetalstudio generate --out DIR` (metadata.csv with
file and plane), a CSV with filename and plane (relative to the CSV's folder), or a folder of plane
sub-folders (abdomen/, brain/, ..., head_second/). --real: real images of the same planes (default
../shared/data/spanish_planes, the 20 per plane FU-LoRA trained on). --train-real: the generator's
training images for the memorisation audit (default: --real). --african: a second real set shown
in the t-SNE plot and used as a real-vs-real reference distance.

What is measured (per plane and overall):
- accuracy: share of generated images that the plane classifier (--classifier, default the
  installed one) assigns to the plane they were generated for. "head..." planes are scored
  against the classifier's "brain" class (the fetal head plane) and kept out of the overall figure.
- classifier-feature Fréchet distance: the Fréchet distance between Gaussians fitted to the
  classifier's pooled (penultimate) features of real and generated images. It is NOT the FID of
  papers: the features come from a small 5-class ultrasound classifier, not Inception.
- FID: only with --inception-weights FILE (torchvision's inception_v3 state dict, e.g.
  inception_v3_google-0cc3c7bd.pth): 2048-d pool features at 299 px. Values are not comparable
  to FIDs computed with the TF-Inception network of the papers.
- diversity: mean MS-SSIM over pairs of images of one plane (256 px grayscale; at most
  --max-pairs pairs, chosen with --seed). Lower = more diverse; the same figure for the real
  images of that plane is the reference.
- memorisation: for every generated image the distance to its nearest training image of the
  same plane (classifier features, L2 of unit-length vectors; and pixels, 64 px grayscale,
  root-mean-square difference), compared with the nearest-neighbour distances among the training
  images themselves (leave one out). A "near copy" is a generated image at or below the 5th
  percentile of those real-to-real distances in both spaces.

Every image is first made square (--crop center, as `train sd`/`train lora` do by default; or
pad / stretch) and converted to grayscale.

Report folder: summary.md, per_plane.csv, per_image.csv, kept.csv, summary.json, tsne.png,
nearest_neighbours.png. kept.csv is the memorisation filter: filename,plane of every audited
generated image that is not a near copy, ready for `train classifier --data REPORT/kept.csv`. --json FILE also writes the headline numbers {"accuracy",
"classifier_feature_frechet", "ms_ssim_synthetic", "ms_ssim_real", "near_copy_fraction", "fid",
...}; the same object is printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from fetalstudio.cli_args import Command, at_least_one, device_name, output_folder
from fetalstudio.errors import FetalStudioError
from fetalstudio.evaluation.synthesis.data import CROP_MODES, load_images, read_labelled, subsample
from fetalstudio.evaluation.synthesis.features import classifier_outputs, inception_features, load_inception
from fetalstudio.evaluation.synthesis.metrics import unit_rows
from fetalstudio.evaluation.synthesis.plots import draw_nearest_neighbours, draw_tsne, tsne_embedding
from fetalstudio.evaluation.synthesis.report import kept_images, write_reports
from fetalstudio.evaluation.synthesis.scoring import closest_pairs, evaluate
from fetalstudio.paths import APP_ROOT

DEFAULT_REAL = APP_ROOT.parent / "shared" / "data" / "spanish_planes"
HEADLINE = (
    "accuracy", "classifier_feature_frechet", "ms_ssim_synthetic", "ms_ssim_real", "near_copy_fraction",
    "near_copy_fraction_pixel", "near_copy_fraction_feature", "fid", "fid_weights", "n_synthetic", "n_real", "kept_after_filter",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthetic", type=Path, required=True,
                        help="generated images: a `generate --out` folder (metadata.csv), a CSV with filename,plane, or a folder of plane sub-folders")
    parser.add_argument("--real", type=Path,
                        help=f"real images of the same planes, CSV or plane folders (default: {DEFAULT_REAL})")
    parser.add_argument("--african", type=Path, help="optional second real set for the t-SNE plot and a real-vs-real reference "
                        "(e.g. ../shared/data/african/train/labels.csv)")
    parser.add_argument("--train-real", type=Path, help="the generator's training images for the memorisation audit (default: --real); never subsampled")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (created)")
    parser.add_argument("--json", type=Path, help="also write the headline numbers to this JSON file")
    parser.add_argument("--classifier", help="plane classifier: a model id from `python -m fetalstudio models` or a .safetensors path "
                        "(default: the manifest's default classifier)")
    parser.add_argument("--inception-weights", type=Path, help="torchvision inception_v3 state dict (e.g. inception_v3_google-0cc3c7bd.pth) to "
                        "also compute FID; without it FID is not computed")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, mps (default: $FETALSTUDIO_DEVICE, else the best available)")
    parser.add_argument("--batch-size", type=at_least_one, default=32, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsampling, MS-SSIM pairs and t-SNE")
    parser.add_argument("--max-pairs", type=int, default=200, help="MS-SSIM pairs per plane at most (chosen with --seed)")
    parser.add_argument("--max-images-per-plane", type=int, help="use at most N images per plane of --synthetic, --real and --african "
                        "(chosen with --seed; for speed)")
    parser.add_argument("--crop", choices=CROP_MODES, default="center", help="how every image is made square before anything else")
    parser.add_argument("--nn-pairs", type=int, default=16, help="closest generated/training pairs shown in nearest_neighbours.png")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and the linear algebra (default: the libraries' choice; "
                        "1 on a shared machine)")


def _set_threads(threads: int | None):
    """Limit torch and BLAS threads (a busy 2-core machine is far faster with 1)."""
    import contextlib

    import torch

    if not threads:
        return contextlib.nullcontext()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def _validate(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_pairs", "max_images_per_plane", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise FetalStudioError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
    if args.nn_pairs < 0:
        raise FetalStudioError(f"--nn-pairs must be 0 or more (got {args.nn_pairs}).")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    with _set_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from fetalstudio.app_context import build_manager
    from fetalstudio.classification.predict import PlaneClassifier
    from fetalstudio.errors import ModelNotFoundError
    from fetalstudio.data.reports import write_json
    from fetalstudio.models.device import default_placement
    from fetalstudio.models.entries import ModelKind

    started = time.perf_counter()
    real_source = args.real
    if real_source is None:
        if not DEFAULT_REAL.exists():
            raise FetalStudioError(f"The default real set {DEFAULT_REAL} does not exist. Pass --real FOLDER_OR_CSV: real images of the "
                                   "generated planes (e.g. the images the generator was trained on).")
        real_source = DEFAULT_REAL
    train_source = args.train_real or real_source
    synthetic_items = subsample(read_labelled(args.synthetic, "synthetic"), args.max_images_per_plane, args.seed)
    real_all = read_labelled(real_source, "real")
    real_items = subsample(real_all, args.max_images_per_plane, args.seed)
    same_train = Path(train_source).expanduser().resolve() == Path(real_source).expanduser().resolve()
    train_items = real_all if same_train else read_labelled(train_source, "train_real")
    african_items = subsample(read_labelled(args.african, "african"), args.max_images_per_plane, args.seed) if args.african else None

    with_fid = args.inception_weights is not None
    placement = default_placement(args.device)
    inception = load_inception(args.inception_weights, placement.device) if with_fid else None  # fail early on a bad file
    manager = build_manager(placement=placement)
    try:
        model_id = args.classifier or manager.default_id(ModelKind.CLASSIFIER)
    except ModelNotFoundError:
        raise FetalStudioError("No plane classifier is installed. Give --classifier PATH (a .safetensors classifier) or train one with "
                               "`python -m fetalstudio train classifier --data ../shared/data/spanish_planes --out DIR`.") from None
    entry = manager.entry(model_id)
    if entry.kind is not ModelKind.CLASSIFIER:
        raise FetalStudioError(f"Model {entry.id!r} is a {entry.kind.value}, not a plane classifier; give --classifier a classifier checkpoint.")

    def progress(role: str, done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"[{role}: {done}/{total} images read]", file=sys.stderr, flush=True)

    with manager.use(model_id) as model:
        classifier = PlaneClassifier(model, batch_size=args.batch_size)
        prep = classifier.preprocessing
        synthetic = load_images(synthetic_items, "synthetic", args.synthetic, prep, args.crop, with_fid, progress)
        synthetic.features, synthetic.probabilities = classifier_outputs(classifier, synthetic.tensors, args.batch_size)
        train = load_images(train_items, "real" if same_train else "train_real", train_source, prep, args.crop, with_fid and same_train, progress)
        train.features, _ = classifier_outputs(classifier, train.tensors, args.batch_size, with_probabilities=False)
        if same_train:  # the metric subset of the real set is taken from the (never subsampled) training set
            keep_paths = {item.path for item in real_items}
            real = train.subset([i for i, item in enumerate(train_items) if item.path in keep_paths])
        else:
            real = load_images(real_items, "real", real_source, prep, args.crop, with_fid, progress)
            real.features, _ = classifier_outputs(classifier, real.tensors, args.batch_size, with_probabilities=False)
        african = load_images(african_items, "african", args.african, prep, args.crop, False, progress) if african_items else None
        if african is not None:
            african.features, _ = classifier_outputs(classifier, african.tensors, args.batch_size, with_probabilities=False)
        classes = classifier.classes
        preprocessing = {"input_size": prep.input_size, "in_chans": prep.in_chans, "resize": prep.resize}
    if with_fid:
        print("[Inception features]", file=sys.stderr, flush=True)
        synthetic.inception_features = inception_features(inception, synthetic.inception, args.batch_size)
        real.inception_features = inception_features(inception, real.inception, args.batch_size)

    result = evaluate(synthetic, real, train, african, classes, args.max_pairs, args.seed, with_fid)
    fid_label = f"torchvision Inception-v3 weights from {args.inception_weights}" if with_fid else None
    result["headline"]["fid_weights"] = str(args.inception_weights) if with_fid else None

    args.out.mkdir(parents=True, exist_ok=True)
    tsne_sets = [(real, "real (Spanish)"), *([(african, "real (African)")] if african is not None else []), (synthetic, "synthetic")]
    import numpy as np

    features = np.concatenate([unit_rows(s.features) for s, _ in tsne_sets if len(s)])
    points = tsne_embedding(features, args.seed)
    draw_tsne(args.out / "tsne.png", points, [p for s, _ in tsne_sets for p in s.planes], [label for s, label in tsne_sets for _ in s.planes],
              f"t-SNE of classifier features ({len(features)} images)")
    pairs = closest_pairs(result, args.nn_pairs)
    draw_nearest_neighbours(args.out / "nearest_neighbours.png", pairs, synthetic, train)

    seconds = time.perf_counter() - started
    counts = lambda s: ", ".join(f"{p} {n}" for p, n in sorted(s.counts().items())) if s is not None else "none"  # noqa: E731
    setup = {
        "generated": f"`{args.synthetic}` ({len(synthetic)} images: {counts(synthetic)})",
        "real": f"`{real_source}` ({len(real)} images: {counts(real)})",
        "training images for the audit": f"`{train_source}` ({len(train)} images)" + (" (= real, never subsampled)" if same_train else ""),
        "African": f"`{args.african}` ({len(african)} images: {counts(african)})" if african is not None else "not given",
        "classifier": entry.id,
        "classifier preprocessing": json.dumps(preprocessing),
        "crop": args.crop,
        "max images per plane": args.max_images_per_plane or "all",
        "max MS-SSIM pairs per plane": args.max_pairs,
        "seed": args.seed,
        "FID": fid_label or "not computed (no --inception-weights)",
        "device": manager.placement.label,
        "time": f"{seconds:.1f} s",
    }
    kept = kept_images(result, [item.path for item in synthetic_items], args.out)
    result["headline"]["kept_after_filter"] = len(kept)
    setup["memorisation filter"] = f"kept.csv: {len(kept)} of {len(synthetic)} generated images (near copies dropped)"
    summary_path = write_reports(args.out, result, setup, fid_label, kept)
    headline = {key: result["headline"].get(key) for key in HEADLINE}
    if "classifier_feature_frechet_real_vs_african" in result["headline"]:
        headline["classifier_feature_frechet_real_vs_african"] = result["headline"]["classifier_feature_frechet_real_vs_african"]
    if args.json:
        write_json(args.json, headline)
    printable = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in headline.items()}
    print(json.dumps({**printable, "report": str(summary_path)}))
    return 0


COMMAND = Command("synthesis", "classifier accuracy on generated images, feature Fréchet distance, diversity, t-SNE", add_arguments, run, description=__doc__.strip())
