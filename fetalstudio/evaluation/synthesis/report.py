"""The ``eval synthesis`` report folder: summary.md, per_plane.csv, per_image.csv and summary.json."""

from __future__ import annotations

import math
from pathlib import Path

from fetalstudio.evaluation.synthesis.data import MS_SSIM_SIZE, PIXEL_SIZE
from fetalstudio.evaluation.synthesis.features import INCEPTION_URL
from fetalstudio.evaluation.synthesis.scoring import NEAR_COPY_PERCENTILE


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _blank_nan(row: dict) -> dict:
    """CSV cells: n/a (NaN) becomes an empty cell."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


PER_IMAGE_COLUMNS = ["file", "plane", "target", "predicted", "probability", "p_target", "correct", "nn_feature_distance",
                     "nn_feature_train_file", "near_copy_feature", "nn_pixel_distance", "nn_pixel_train_file", "near_copy_pixel",
                     "nn_pixel_relative", "near_copy"]


def kept_images(result: dict, paths: list[Path], out: Path) -> list[dict]:
    """The memorisation filter: every generated image that is not a near copy (one not audited, e.g. a plane without
    training images, is kept), as filename,plane rows with paths relative to the report folder ``out``."""
    import os

    folder = Path(out).resolve()
    return [{"filename": Path(os.path.relpath(Path(path).resolve(), folder)).as_posix(), "plane": entry["plane"]}
            for entry, path in zip(result["per_image"], paths) if entry.get("near_copy") is not True]


def write_reports(out: Path, result: dict, setup: dict, fid_label: str | None, kept_rows: list[dict] | None = None) -> Path:
    from fetalstudio.data.reports import markdown_table, write_report

    h = result["headline"]
    fid_text = (f"{_fmt(h['fid'], 2)}" if fid_label else "not computed")
    headline_rows = [
        {"metric": "plane accuracy of the classifier on generated images", "value": _fmt(h["accuracy"]),
         "meaning": "higher = the generated images look like their plane to the classifier"},
        {"metric": "classifier-feature Fréchet distance (generated vs real)", "value": _fmt(h["classifier_feature_frechet"]),
         "meaning": "lower = closer feature distributions; not FID"},
    ]
    if "classifier_feature_frechet_real_vs_african" in h:
        headline_rows.append({"metric": "classifier-feature Fréchet distance, real Spanish vs real African (reference)",
                              "value": _fmt(h["classifier_feature_frechet_real_vs_african"]), "meaning": "how far apart two real populations are"})
    headline_rows += [
        {"metric": f"FID ({fid_label})" if fid_label else "FID", "value": fid_text,
         "meaning": "lower = closer; not comparable to TF-Inception FIDs of papers" if fid_label else "give --inception-weights FILE"},
        {"metric": "MS-SSIM within planes, generated", "value": _fmt(h["ms_ssim_synthetic"]), "meaning": "lower = more diverse"},
        {"metric": "MS-SSIM within planes, real (reference)", "value": _fmt(h["ms_ssim_real"]), "meaning": "the diversity of real images"},
        {"metric": "near copies of training images (pixel and feature space)", "value": _fmt(h["near_copy_fraction"]),
         "meaning": "share of generated images as close to a training image as the closest 5 % of real neighbours (in both spaces); near 0 for new images"},
        {"metric": "near copies, pixel space only", "value": _fmt(h["near_copy_fraction_pixel"]), "meaning": ""},
        {"metric": "near copies, feature space only", "value": _fmt(h["near_copy_fraction_feature"]), "meaning": ""},
    ]
    quality = [{"plane": r["plane"], "generated": r["n_synthetic"], "real": r["n_real"], "accuracy": r["accuracy"],
                "predicted as": r["predicted_as"], "feature Fréchet": r["classifier_feature_frechet"],
                **({"Fréchet real vs African": r["classifier_feature_frechet_real_vs_african"]} if "classifier_feature_frechet_real_vs_african" in r else {}),
                **({"FID": r["fid"]} if fid_label else {}),
                "MS-SSIM generated": r["ms_ssim_synthetic"], "MS-SSIM real": r["ms_ssim_real"], "pairs": r["ms_ssim_pairs"]} for r in result["per_plane"]]
    audit = [{"plane": r["plane"], "generated": r["n_synthetic"], "training": r.get("n_train", 0),
              "feature NN median, gen": r.get("nn_feature_median_synthetic", math.nan), "feature NN median, real": r.get("nn_feature_median_real", math.nan),
              "feature ratio": r.get("nn_feature_ratio", math.nan), "pixel NN median, gen": r.get("nn_pixel_median_synthetic", math.nan),
              "pixel NN median, real": r.get("nn_pixel_median_real", math.nan), "pixel ratio": r.get("nn_pixel_ratio", math.nan),
              "near copies (feature)": r.get("near_copy_fraction_feature", math.nan), "near copies (pixel)": r.get("near_copy_fraction_pixel", math.nan),
              "near copies (both)": r.get("near_copy_fraction", math.nan)} for r in result["per_plane"]]
    setup_text = "\n".join(f"- {key}: {value}" for key, value in setup.items())
    fid_note = (f"FID uses {fid_label}: 2048-d pool features of 299 px grayscale images copied to 3 channels with ImageNet normalisation. "
                "Its values are not comparable to FIDs of papers computed with the TF-Inception network (pytorch-fid / clean-fid weights), "
                "and with a few hundred images or fewer it is strongly biased upward." if fid_label else
                "FID was not computed: it needs Inception-v3 weights, which are not shipped. Download torchvision's "
                f"{INCEPTION_URL} and pass `--inception-weights inception_v3_google-0cc3c7bd.pth`.")
    notes = "\n".join(f"- {line}" for line in [
        "Accuracy: the classifier's most likely class equals the plane the image was generated for. The overall figure covers "
        "the classifier's own classes only; head planes are scored as brain per plane.",
        "Classifier-feature Fréchet distance: Fréchet distance between Gaussians fitted to the pooled penultimate features of the "
        f"plane classifier `{setup.get('classifier', '')}` — a small 5-class ultrasound classifier, so the features describe what separates "
        "the planes, not image quality in general. It is not FID. With few images (20 real per plane) the estimate is biased upward "
        "and noisy: compare runs with the same numbers of images, and read the real-vs-African value as the scale of a real domain shift.",
        "The overall Fréchet distance pools all planes that have real images; different plane proportions in the two sets raise it.",
        fid_note,
        f"MS-SSIM: multi-scale structural similarity of {MS_SSIM_SIZE} px grayscale image pairs within a plane (data range 1), at most "
        f"{setup.get('max MS-SSIM pairs per plane', '')} pairs per plane. Lower = more diverse; generated sets much above the real figure "
        "lack diversity. The overall figures are means over planes.",
        "Memorisation audit: each generated image's distance to its nearest training image of the same plane, in classifier features "
        f"(unit-length vectors, L2) and in pixels ({PIXEL_SIZE} px grayscale, root-mean-square difference, 0-1), against the "
        "nearest-neighbour distances among the training images themselves (leave one out). Ratio = median generated / median real; "
        f"well below 1 means the generator reproduces training images. A near copy lies at or below the {NEAR_COPY_PERCENTILE:g}th "
        "percentile of the real-to-real distances in both spaces (about 5 % of independent real images would). With 20 training "
        "images per plane the percentile is rough, and the classifier was trained on these images, so look at nearest_neighbours.png.",
        "Every image was made square first (" + str(setup.get("crop", "")) + ") and converted to grayscale.",
        *result["notes"],
    ])
    sections = {
        "Setup": setup_text,
        "Headline": headline_rows,
        "Per plane: accuracy, distribution distance, diversity": quality,
        "Memorisation audit (nearest training image of the same plane)": markdown_table(audit) + "\n\n![nearest neighbours](nearest_neighbours.png)",
        "t-SNE of classifier features": "Colour = plane, shape = source (circle: real Spanish, square: real African, triangle: generated).\n\n![t-SNE](tsne.png)",
        "Notes": notes,
        "Files": "per_plane.csv (every per-plane number), per_image.csv (prediction and nearest training images of each generated image), "
                 "kept.csv (the memorisation filter: filename,plane of every audited generated image that is not a near copy, paths relative "
                 "to this folder; train on it with `train classifier --data REPORT/kept.csv`), summary.json, tsne.png, nearest_neighbours.png.",
    }
    per_image_rows = [_blank_nan({k: e.get(k) for k in PER_IMAGE_COLUMNS}) for e in result["per_image"]]
    per_plane_rows = [_blank_nan(row) for row in result["per_plane"]]
    return write_report(out, "Synthesis evaluation", sections, csv_files={"per_plane.csv": per_plane_rows, "per_image.csv": per_image_rows,
                                                                         "kept.csv": kept_rows or []},
                        json_files={"summary.json": {"headline": h, "setup": setup, "per_plane": result["per_plane"], "notes": result["notes"]}})
