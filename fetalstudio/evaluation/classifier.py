"""Evaluate a plane classifier on a labelled folder or CSV: accuracy, recall, precision, F-score,
AUC and a confusion matrix, written as a report folder.

Example (the African planes: 4 classes, the model has 5 outputs):

    python -m fetalstudio eval classifier --model bundled/fetalstudio-plane-classifier/model \\
        --data ../shared/data/african/train/labels.csv --out outputs/eval/african --json african.json

Definitions (the FU-LoRA paper's metrics):
- accuracy: share of images whose most likely class is the true class. A prediction of a class
  that the labels do not use (e.g. "other" on the 4-class African set) is simply wrong.
- recall, precision, F-score: per true class (the classes present in the labels), then the
  unweighted mean (macro). F-score is the macro mean of the per-class F1 values. A class never
  predicted has precision 0.
- AUC: one-vs-rest ROC AUC per true class from the model's probability of that class (ties
  count half), macro mean over the classes present.
- confusion matrix: rows = true classes present, columns = all model classes.

Report folder: report.md, metrics.json, per_class.csv, confusion_matrix.csv, predictions.csv,
confusion_matrix.png, per_class.png, roc.png. ``--json FILE`` also writes the headline numbers
{"accuracy", "recall", "precision", "f1", "auc", "n"}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from fetalstudio.classification.metrics import classification_metrics, headline, roc_curve
from fetalstudio.cli_args import Command, at_least_one, device_name, output_folder
from fetalstudio.errors import FetalStudioError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="classifier: a model id from `python -m fetalstudio models` or a path to a "
                        ".safetensors checkpoint (default: the manifest's default classifier, else the first one found)")
    parser.add_argument("--data", type=Path, required=True,
                        help="labelled images: a CSV with filename,plane (relative to the CSV) or a folder of plane sub-folders")
    parser.add_argument("--out", type=output_folder, required=True, help="report folder (created)")
    parser.add_argument("--json", type=Path, help="also write {accuracy, recall, precision, f1, auc, n} to this file")
    parser.add_argument("--batch-size", type=at_least_one, default=32, help="images per forward pass")
    parser.add_argument("--device", type=device_name, help="cpu, cuda, mps (default: $FETALSTUDIO_DEVICE, else the best available)")
    parser.add_argument("--tta", choices=["auto", "none", "hflip"], default="auto",
                        help="test-time augmentation: auto = what the checkpoint says")


# --- running ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from fetalstudio.app_context import build_manager
    from fetalstudio.classification.predict import PlaneClassifier
    from fetalstudio.data.tables import read_classification
    from fetalstudio.models.entries import ModelKind

    items = read_classification(args.data)
    missing = [str(item.path) for item in items if not item.path.is_file()]
    if missing:
        raise FetalStudioError(f"{len(missing)} image(s) listed in {args.data} do not exist, e.g. {missing[0]}. Fix the paths (relative to the CSV).")
    manager = build_manager(device=args.device)
    model_id = args.model or manager.default_id(ModelKind.CLASSIFIER)
    entry = manager.entry(model_id)
    if entry.kind is not ModelKind.CLASSIFIER:
        raise FetalStudioError(f"Model {model_id!r} is a {entry.kind.value}, not a classifier.")
    started = time.perf_counter()
    with manager.use(model_id) as model:
        classifier = PlaneClassifier(model, batch_size=args.batch_size,
                                     hflip_tta=None if args.tta == "auto" else args.tta == "hflip")
        probabilities = _predict_files(classifier, [item.path for item in items], args.batch_size)
    seconds = time.perf_counter() - started
    metrics = classification_metrics([item.plane for item in items], probabilities, classifier.classes)
    metrics.update(model=entry.id, data=str(args.data), seconds=round(seconds, 2),
                   device=manager.placement.label, tta="hflip" if classifier.hflip_tta else "none",
                   preprocessing={"input_size": classifier.preprocessing.input_size, "in_chans": classifier.preprocessing.in_chans,
                                  "resize": classifier.preprocessing.resize, "crop": classifier.preprocessing.crop})
    write_report(args.out, metrics, items, probabilities, classifier.classes)
    summary = headline(metrics)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps({**summary, "report": str(args.out / "report.md")}))
    return 0


def _predict_files(classifier, paths: list[Path], batch_size: int):
    import numpy as np
    from PIL import Image

    rows = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    image.load()
                    images.append(image.copy())
            except OSError as error:
                raise FetalStudioError(f"{path} could not be read as an image ({error}).") from error
        rows.append(classifier.probabilities(images))
    return np.concatenate(rows) if rows else np.zeros((0, len(classifier.classes)))


# --- report ----------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(out: Path, metrics: dict, items, probabilities, classes: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    present = metrics["classes_present"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "true", "predicted", "correct", *[f"p_{c}" for c in classes]])
        for item, row in zip(items, probabilities):
            predicted = classes[int(row.argmax())]
            writer.writerow([str(item.path), item.plane, predicted, int(predicted == item.plane), *[f"{p:.5f}" for p in row]])
    with (out / "per_class.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "support", "predicted", "precision", "recall", "f1", "auc"])
        for name in present:
            v = metrics["per_class"][name]
            writer.writerow([name, v["support"], v["predicted"], _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), _fmt(v["auc"])])
        writer.writerow(["macro", metrics["n"], "", _fmt(metrics["precision"]), _fmt(metrics["recall"]), _fmt(metrics["f1"]), _fmt(metrics["auc"])])
    with (out / "confusion_matrix.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(present, metrics["confusion_matrix"]):
            writer.writerow([name, *row])
    draw_confusion_matrix(out / "confusion_matrix.png", metrics["confusion_matrix"], present, classes)
    draw_per_class(out / "per_class.png", metrics)
    labels = [item.plane for item in items]
    curves = {name: roc_curve(probabilities[:, classes.index(name)], [t == name for t in labels]) for name in present}
    draw_roc(out / "roc.png", curves, {name: metrics["per_class"][name]["auc"] for name in present})
    (out / "report.md").write_text(markdown_report(metrics), encoding="utf-8")


def markdown_report(metrics: dict) -> str:
    classes, present = metrics["model_classes"], metrics["classes_present"]
    lines = [
        "# Plane classifier evaluation", "",
        f"- model: `{metrics.get('model', '')}`", f"- data: `{metrics.get('data', '')}` ({metrics['n']} images; "
        f"classes present: {', '.join(present)})",
        f"- device: {metrics.get('device', '')}; {metrics.get('seconds', '')} s; test-time augmentation: {metrics.get('tta', 'none')}",
        "",
        "| accuracy | recall (macro) | precision (macro) | F1 (macro) | AUC (macro, one-vs-rest) | n |",
        "|---|---|---|---|---|---|",
        f"| {_fmt(metrics['accuracy'])} | {_fmt(metrics['recall'])} | {_fmt(metrics['precision'])} | {_fmt(metrics['f1'])} | {_fmt(metrics['auc'])} | {metrics['n']} |",
        "",
        "Macro means run over the classes present in the labels. A prediction of a class the labels do not use "
        f"(here {', '.join(c for c in classes if c not in present) or 'none'}) counts as wrong: "
        f"{metrics['predicted_outside_labels']} image(s).",
        "", "## Per class", "",
        "| class | support | predicted | precision | recall | F1 | AUC |", "|---|---|---|---|---|---|---|",
    ]
    for name in present:
        v = metrics["per_class"][name]
        lines.append(f"| {name} | {v['support']} | {v['predicted']} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | {_fmt(v['auc'])} |")
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(present, metrics["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![per class](per_class.png)", "", "![ROC](roc.png)",
              "", "Files: metrics.json, per_class.csv, confusion_matrix.csv, predictions.csv.", ""]
    return "\n".join(lines)


# --- plots (matplotlib when installed, else PIL) -----------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text(draw, xy, text, font, fill=(0, 0, 0), anchor="mm"):
    draw.text(xy, text, font=font, fill=fill, anchor=anchor)


def draw_confusion_matrix(path: Path, matrix: list[list[int]], rows: Sequence[str], columns: Sequence[str]) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _draw_confusion_pil(path, matrix, rows, columns)
    import numpy as np

    data = np.asarray(matrix, dtype=float).reshape(len(rows), len(columns))
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 0.9 * len(rows) + 1.8))
    ax.imshow(data / np.maximum(data.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, str(int(data[i, j])), ha="center", va="center", color="black")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (colour: share of the true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _draw_confusion_pil(path: Path, matrix, rows, columns) -> Path:
    from PIL import Image, ImageDraw

    cell, left, top = 90, 130, 90
    width, height = left + cell * len(columns) + 30, top + cell * len(rows) + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title, label, small = _font(18), _font(16), _font(14)
    _text(draw, (width // 2, 22), "Confusion matrix (rows: true, columns: predicted)", title)
    for j, name in enumerate(columns):
        _text(draw, (left + cell * j + cell // 2, top - 18), name, label)
    for i, name in enumerate(rows):
        total = max(1, sum(matrix[i]))
        _text(draw, (left - 10, top + cell * i + cell // 2), name, label, anchor="rm")
        for j, value in enumerate(matrix[i]):
            share = value / total
            shade = (int(255 - 200 * share), int(255 - 150 * share), 255)
            x0, y0 = left + cell * j, top + cell * i
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=shade, outline=(160, 160, 160))
            colour = (255, 255, 255) if share > 0.6 else (0, 0, 0)
            _text(draw, (x0 + cell // 2, y0 + cell // 2 - 8), str(value), label, fill=colour)
            _text(draw, (x0 + cell // 2, y0 + cell // 2 + 14), f"{100 * share:.0f}%", small, fill=colour)
    _text(draw, (left + cell * len(columns) // 2, height - 25), "predicted", label)
    image.save(path)
    return path


def draw_per_class(path: Path, metrics: dict) -> Path:
    from PIL import Image, ImageDraw

    names = list(metrics["classes_present"]) + ["macro"]
    keys = [("precision", (70, 110, 200)), ("recall", (230, 140, 50)), ("f1", (80, 170, 90)), ("auc", (150, 90, 180))]
    group, bar, left, top, plot_h = 150, 30, 60, 60, 300
    width, height = left + group * len(names) + 30, top + plot_h + 80
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    _text(draw, (width // 2, 20), f"Per-class metrics (accuracy {_fmt(metrics['accuracy'])}, n={metrics['n']})", font)
    base = top + plot_h
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = base - tick * plot_h
        draw.line([left, y, width - 20, y], fill=(225, 225, 225))
        _text(draw, (left - 8, y), f"{tick:.2f}", small, anchor="rm")
    for g, name in enumerate(names):
        values = metrics if name == "macro" else metrics["per_class"][name]
        for k, (key, colour) in enumerate(keys):
            value = values.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            x0 = left + g * group + 10 + k * bar
            draw.rectangle([x0, base - value * plot_h, x0 + bar - 4, base], fill=colour)
        _text(draw, (left + g * group + group // 2, base + 16), name, font)
    for k, (key, colour) in enumerate(keys):
        x = left + k * 110
        draw.rectangle([x, height - 30, x + 14, height - 16], fill=colour)
        _text(draw, (x + 20, height - 23), key, small, anchor="lm")
    image.save(path)
    return path


def draw_roc(path: Path, curves: dict[str, list[tuple[float, float]]], aucs: dict) -> Path:
    from PIL import Image, ImageDraw

    colours = [(70, 110, 200), (230, 140, 50), (80, 170, 90), (200, 60, 60), (150, 90, 180)]
    size, left, top = 360, 60, 50
    width, height = left + size + 190, top + size + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    _text(draw, (width // 2, 20), "ROC, one class vs rest", font)
    draw.rectangle([left, top, left + size, top + size], outline=(0, 0, 0))
    draw.line([left, top + size, left + size, top], fill=(200, 200, 200))
    for tick in (0.0, 0.5, 1.0):
        _text(draw, (left + tick * size, top + size + 12), f"{tick:.1f}", small)
        _text(draw, (left - 8, top + size - tick * size), f"{tick:.1f}", small, anchor="rm")
    _text(draw, (left + size // 2, top + size + 34), "false positive rate", small)
    _text(draw, (left, top - 12), "true positive rate", small, anchor="lm")
    for index, (name, points) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        xy = [(left + fpr * size, top + size - tpr * size) for fpr, tpr in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        y = top + 10 + index * 22
        draw.line([left + size + 15, y, left + size + 40, y], fill=colour, width=3)
        _text(draw, (left + size + 46, y), f"{name} (AUC {_fmt(aucs.get(name))})", small, anchor="lm")
    image.save(path)
    return path


COMMAND = Command("classifier", "accuracy, recall, precision, F-score, AUC, confusion matrix", add_arguments, run, description=__doc__.strip())
