"""Every number of the ``eval synthesis`` report from image sets with their features: accuracy per plane,
Fréchet distances, diversity and the memorisation audit."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from fetalstudio.evaluation.synthesis.data import PIXEL_SIZE, ImageSet
from fetalstudio.evaluation.synthesis.metrics import frechet_distance, mean_pairwise_ms_ssim, nearest_distances, unit_rows

NEAR_COPY_PERCENTILE = 5.0
#: Generated subjects that the plane classifier knows under another name.
PLANE_ALIASES = {"head": "brain"}


def plane_order(planes, classes: Sequence[str]) -> list[str]:
    planes = set(planes)
    return [c for c in classes if c in planes] + sorted(planes - set(classes))


def accuracy_target(plane: str, classes: Sequence[str]) -> str | None:
    """The classifier class a generated plane should be predicted as (None: not scorable)."""
    if plane in classes:
        return plane
    stem = plane.split("_")[0]
    alias = PLANE_ALIASES.get(stem)
    return alias if alias in classes else None


def _median(values) -> float:
    import numpy as np

    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def memorisation_audit(synthetic: ImageSet, train: ImageSet, plane: str) -> tuple[dict, dict[int, dict]]:
    """Per-plane NN summary and per-synthetic-image NN fields (keyed by index into ``synthetic``)."""
    import numpy as np

    s_idx, t_idx = synthetic.indices(plane), train.indices(plane)
    summary = {"n_train": len(t_idx)}
    rows: dict[int, dict] = {}
    if not s_idx or not t_idx:
        return summary, rows
    spaces = {
        "feature": (unit_rows(synthetic.features[s_idx]), unit_rows(train.features[t_idx])),
        "pixel": (np.stack([synthetic.pixels[i].ravel() for i in s_idx]), np.stack([train.pixels[i].ravel() for i in t_idx])),
    }
    flags = {}
    for space, (query, reference) in spaces.items():
        scale = 1.0 if space == "feature" else math.sqrt(PIXEL_SIZE * PIXEL_SIZE)  # pixels: root-mean-square difference
        distance, nearest = nearest_distances(query, reference)
        distance = distance / scale
        real, _ = nearest_distances(reference, reference, leave_one_out=True)
        real = real / scale
        threshold = float(np.percentile(real, NEAR_COPY_PERCENTILE)) if len(t_idx) >= 2 else math.nan
        flags[space] = distance <= threshold if math.isfinite(threshold) else np.zeros(len(s_idx), dtype=bool)
        summary.update({
            f"nn_{space}_median_synthetic": _median(distance), f"nn_{space}_median_real": _median(real),
            f"nn_{space}_ratio": _ratio(_median(distance), _median(real)), f"nn_{space}_threshold": threshold,
            f"near_copy_fraction_{space}": float(flags[space].mean()) if math.isfinite(threshold) else math.nan,
        })
        for k, i in enumerate(s_idx):
            rows.setdefault(i, {}).update({
                f"nn_{space}_distance": float(distance[k]), f"nn_{space}_train_file": train.names[t_idx[int(nearest[k])]],
                f"nn_{space}_train_index": t_idx[int(nearest[k])], f"near_copy_{space}": bool(flags[space][k]) if math.isfinite(threshold) else None,
            })
    both = flags["feature"] & flags["pixel"]
    summary["near_copy_fraction"] = float(both.mean()) if math.isfinite(summary["nn_pixel_threshold"]) else math.nan
    summary["near_copies"] = int(both.sum())
    for k, i in enumerate(s_idx):
        rows[i]["near_copy"] = bool(both[k]) if math.isfinite(summary["nn_pixel_threshold"]) else None
        rows[i]["nn_pixel_relative"] = _ratio(rows[i]["nn_pixel_distance"], summary["nn_pixel_median_real"])
    return summary, rows


def evaluate(synthetic: ImageSet, real: ImageSet, train: ImageSet, african: ImageSet | None, classes: Sequence[str],
             max_pairs: int, seed: int, with_fid: bool) -> dict:
    """Every number of the report from sets whose features (and probabilities) are filled in."""
    import numpy as np

    classes = list(classes)
    predicted = [classes[int(row.argmax())] for row in synthetic.probabilities]
    per_image = [{"file": name, "plane": plane, "target": accuracy_target(plane, classes), "predicted": pred,
                  "probability": float(row.max())} for name, plane, pred, row in zip(synthetic.names, synthetic.planes, predicted, synthetic.probabilities)]
    for entry, row in zip(per_image, synthetic.probabilities):
        entry["p_target"] = float(row[classes.index(entry["target"])]) if entry["target"] else None
        entry["correct"] = (entry["predicted"] == entry["target"]) if entry["target"] else None
    per_plane, notes = [], []
    for plane in plane_order(synthetic.planes, classes):
        s_idx, r_idx = synthetic.indices(plane), real.indices(plane)
        target = accuracy_target(plane, classes)
        scored = [per_image[i]["correct"] for i in s_idx if per_image[i]["correct"] is not None]
        row = {"plane": plane, "n_synthetic": len(s_idx), "n_real": len(r_idx), "accuracy_target": target or "",
               "accuracy": float(np.mean(scored)) if scored else math.nan,
               "predicted_as": ", ".join(f"{name} {count}" for name, count in Counter(per_image[i]["predicted"] for i in s_idx).most_common())}
        row["classifier_feature_frechet"] = frechet_distance(synthetic.features[s_idx], real.features[r_idx]) if r_idx else math.nan
        if african is not None:
            a_idx = african.indices(plane)
            row["classifier_feature_frechet_real_vs_african"] = frechet_distance(real.features[r_idx], african.features[a_idx]) if r_idx and a_idx else math.nan
        if with_fid:
            row["fid"] = frechet_distance(synthetic.inception_features[s_idx], real.inception_features[r_idx]) if r_idx else math.nan
        row["ms_ssim_synthetic"], row["ms_ssim_pairs"] = mean_pairwise_ms_ssim([synthetic.ms_ssim[i] for i in s_idx], max_pairs, seed, "synthetic/" + plane)
        row["ms_ssim_real"], _ = mean_pairwise_ms_ssim([real.ms_ssim[i] for i in r_idx], max_pairs, seed, "real/" + plane)
        audit, nn_rows = memorisation_audit(synthetic, train, plane)
        row.update(audit)
        for i, fields in nn_rows.items():
            per_image[i].update(fields)
        plane_notes = []
        if target is None:
            plane_notes.append(f"the classifier has no class for {plane}: accuracy n/a")
        elif target != plane:
            plane_notes.append(f"scored as {target} (the classifier's class for it); not in the overall accuracy")
        if not r_idx:
            plane_notes.append("no real images of this plane: no Fréchet distance" + (" or FID" if with_fid else ""))
        if not train.indices(plane):
            plane_notes.append("no training images of this plane: no memorisation audit")
        elif len(train.indices(plane)) < 2:
            plane_notes.append("fewer than 2 training images: no real-to-real reference, near copies n/a")
        if len(s_idx) < 2:
            plane_notes.append("fewer than 2 generated images: Fréchet distance and MS-SSIM n/a")
        row["note"] = "; ".join(plane_notes)
        if plane_notes:
            notes.append(f"{plane}: {row['note']}.")
        per_plane.append(row)

    # overall numbers
    own = [e["correct"] for e in per_image if e["target"] is not None and e["target"] == e["plane"]]
    shared = [p for p in plane_order(synthetic.planes, classes) if real.indices(p)]
    s_all = [i for p in shared for i in synthetic.indices(p)]
    r_all = [i for p in shared for i in real.indices(p)]
    audited = [e for e in per_image if e.get("near_copy") is not None]

    def fraction(key: str) -> float:
        values = [e[key] for e in per_image if e.get(key) is not None]
        return float(np.mean(values)) if values else math.nan

    headline = {
        "accuracy": float(np.mean(own)) if own else math.nan,
        "classifier_feature_frechet": frechet_distance(synthetic.features[s_all], real.features[r_all]) if s_all else math.nan,
        "ms_ssim_synthetic": _finite_mean(row["ms_ssim_synthetic"] for row in per_plane),
        "ms_ssim_real": _finite_mean(row["ms_ssim_real"] for row in per_plane if row["n_real"]),
        "near_copy_fraction": float(np.mean([e["near_copy"] for e in audited])) if audited else math.nan,
        "near_copy_fraction_pixel": fraction("near_copy_pixel"),
        "near_copy_fraction_feature": fraction("near_copy_feature"),
        "fid": frechet_distance(synthetic.inception_features[s_all], real.inception_features[r_all]) if with_fid and s_all else None,
        "n_synthetic": len(synthetic), "n_real": len(real),
    }
    if african is not None and len(african):
        a_all = [i for p in shared for i in african.indices(p)]
        headline["classifier_feature_frechet_real_vs_african"] = (
            frechet_distance(real.features[[i for p in shared if african.indices(p) for i in real.indices(p)]], african.features[a_all]) if a_all else math.nan)
    if not shared:
        notes.append("No plane of the generated set has real images: no Fréchet distance, FID or memorisation audit.")
    return {"headline": headline, "per_plane": per_plane, "per_image": per_image, "notes": notes, "shared_planes": shared}


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan



def closest_pairs(result: dict, limit: int) -> list[dict]:
    """The ``limit`` generated images closest to a training image, relative to their plane's
    real-to-real median NN distance (pixel space) so planes compare."""
    medians = {row["plane"]: row for row in result["per_plane"]}
    candidates = []
    for index, entry in enumerate(result["per_image"]):
        if "nn_pixel_distance" not in entry:
            continue
        plane = medians[entry["plane"]]
        relative = entry["nn_pixel_relative"]
        candidates.append({
            "synthetic_index": index, "train_index": entry["nn_pixel_train_index"], "plane": entry["plane"],
            "synthetic_file": entry["file"], "train_file": entry["nn_pixel_train_file"], "pixel": entry["nn_pixel_distance"],
            "feature": entry["nn_feature_distance"], "near_copy": entry.get("near_copy"),
            "pixel_median_real": plane.get("nn_pixel_median_real", math.nan), "feature_median_real": plane.get("nn_feature_median_real", math.nan),
            "key": relative if math.isfinite(relative) else entry["nn_pixel_distance"],
        })
    return sorted(candidates, key=lambda c: c["key"])[:max(0, limit)]

