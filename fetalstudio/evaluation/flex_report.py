"""The ``eval flex`` report folder: report.md, the CSVs, summary.json and the PNG grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fetalstudio.data.reports import markdown_table, write_csv, write_json
from fetalstudio.imaging.files import atomic_write_bytes

#: FetalFlex's facial sagittal plane (arXiv:2503.14906, their data, 512 px): PSNR / MS-SSIM.
ANCHORS = {
    "fetalflex_ssa": {"psnr": 26.27, "ms_ssim": 0.937},
    "fetalflex_ddim50": {"psnr": 25.26, "ms_ssim": 0.914},
    "controlnet_baseline": {"psnr": 8.85, "ms_ssim": 0.254},
    "source": "FetalFlex (Duan et al. 2025, arXiv:2503.14906), facial sagittal plane, their data, 512 px",
}
THUMB_HEIGHT = 150
ROI_OUTLINE = (255, 40, 40)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# --- pictures --------------------------------------------------------------------------------------
def thumbnail(image, roi: np.ndarray | None = None):
    """An RGB thumbnail THUMB_HEIGHT px high; with ``roi``, the ROI's border drawn in red."""
    import cv2
    from PIL import Image

    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else Image.fromarray(np.asarray(image)).convert("RGB")).copy()
    if roi is not None:
        contours, _ = cv2.findContours(roi.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(rgb.shape[0] / THUMB_HEIGHT))
        cv2.drawContours(rgb, contours, -1, ROI_OUTLINE, thickness)
    picture = Image.fromarray(rgb)
    width = max(1, round(picture.width * THUMB_HEIGHT / picture.height))
    return picture.resize((width, THUMB_HEIGHT), Image.Resampling.LANCZOS)


def draw_grid(path: Path, title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence]]) -> Path:
    """A PNG grid: one titled column per entry of ``columns``, one row per (label, thumbnails)."""
    from PIL import Image, ImageDraw

    from fetalstudio.evaluation.classifier import _font, _text

    cell_width = max([THUMB_HEIGHT] + [thumb.width for _, thumbs in rows for thumb in thumbs]) + 8
    top, label_height, gap = 58, 18, 6
    width = max(len(columns) * cell_width + 16, 420)
    height = top + max(1, len(rows)) * (THUMB_HEIGHT + label_height + gap) + 8
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(16), _font(12)
    _text(draw, (width // 2, 16), title, font)
    for j, name in enumerate(columns):
        _text(draw, (8 + j * cell_width + cell_width // 2, 44), name, small)
    if not rows:
        _text(draw, (width // 2, top + THUMB_HEIGHT // 2), "no images", font)
    for i, (label, thumbs) in enumerate(rows):
        y = top + i * (THUMB_HEIGHT + label_height + gap)
        _text(draw, (8, y + 8), label, small, fill=(70, 70, 70), anchor="lm")
        for j, thumb in enumerate(thumbs):
            canvas.paste(thumb, (8 + j * cell_width + (cell_width - thumb.width) // 2, y + label_height))
    import io

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def csv_row(row: dict) -> dict:
    """A preset row for presets.csv: lists as ';'-joined names and counts of detections."""
    joined = lambda names, flags: ";".join(f"{n}={'yes' if f else 'no'}" for n, f in zip(names, flags))  # noqa: E731
    return {"image": row["image"], "preset": row["preset"], "outside_roi_max_abs_diff": row["outside_roi_max_abs_diff"],
            "removed_detected_edited": joined(row["removed"], row["removed_detected"]),
            "removed_detected_real": joined(row["removed"], row["removed_detected_real"]),
            "kept_detected_edited": f"{sum(row['kept_detected'])}/{len(row['kept'])}",
            "kept_detected_real": f"{sum(row['kept_detected_real'])}/{len(row['kept'])}",
            "edited_iou_new": ";".join(f"{n}={v:.3f}" for n, v in zip(row["modified"], row["iou_new"])),
            "edited_iou_old": ";".join(f"{n}={v:.3f}" for n, v in zip(row["modified"], row["iou_old"]))}


# --- report ----------------------------------------------------------------------------------------
STAGE_NAMES = {"ddim": "DDIM", "ssa": "SSA", "ssa+osm": "SSA+OSM"}


def headline_rows(result: dict, stages: Sequence[str]) -> list[dict]:
    rows = []
    for stage in stages:
        figures = result[json_key(stage)]
        union = figures["union_roi"]
        rows.append({
            "stage": STAGE_NAMES.get(stage, stage),
            "PSNR": figures["psnr"], "MS-SSIM": figures["ms_ssim"], "PSNR ROI": figures["psnr_roi"],
            "MS-SSIM ROI": figures["ms_ssim_roi"],
            "PSNR (all boxes)": union["psnr"], "MS-SSIM (all boxes)": union["ms_ssim"],
            "PSNR ROI (all boxes)": union["psnr_roi"], "MS-SSIM ROI (all boxes)": union["ms_ssim_roi"],
            "layout mIoU": figures["layout_miou"], "layout mAP50": figures["layout_map50"],
        })
    rows.append({"stage": "real image (detector ceiling)", "layout mIoU": result["real"]["layout_miou"],
                 "layout mAP50": result["real"]["layout_map50"]})
    return rows


def anchor_rows() -> list[dict]:
    return [
        {"method (FetalFlex paper, facial sagittal, 512 px)": "FetalFlex, SSA", "PSNR": ANCHORS["fetalflex_ssa"]["psnr"],
         "MS-SSIM": ANCHORS["fetalflex_ssa"]["ms_ssim"]},
        {"method (FetalFlex paper, facial sagittal, 512 px)": "DDIM-50", "PSNR": ANCHORS["fetalflex_ddim50"]["psnr"],
         "MS-SSIM": ANCHORS["fetalflex_ddim50"]["ms_ssim"]},
        {"method (FetalFlex paper, facial sagittal, 512 px)": "ControlNet baseline", "PSNR": ANCHORS["controlnet_baseline"]["psnr"],
         "MS-SSIM": ANCHORS["controlnet_baseline"]["ms_ssim"]},
    ]


def json_key(stage: str) -> str:
    return stage.replace("+", "_")


def layout_rows(result: dict, stages: Sequence[str], structures: Sequence[str]) -> list[dict]:
    """Per structure: AP50 / mean IoU of the detector on each stage's images and on the real ones."""
    rows = []
    for name in structures:
        row: dict = {"structure": name, "boxes": result["real"]["per_structure"].get(name, {}).get("boxes", 0)}
        for label, per in [(STAGE_NAMES.get(s, s), result[json_key(s)]["layout_per_structure"]) for s in stages] + \
                [("real", result["real"]["per_structure"])]:
            values = per.get(name, {})
            row[f"{label} AP50"] = values.get("ap50", math.nan)
            row[f"{label} mIoU"] = values.get("mean_iou", math.nan)
        rows.append(row)
    return rows


def preset_rows(result: dict) -> list[dict]:
    return [{"preset": name, "images": p["n_images"], "removed": ", ".join(p["removed_structures"]) or "-",
             "removed detected (edited)": p["removed_detected_rate"], "removed detected (real)": p["removed_detected_rate_real"],
             "kept detected (edited)": p["kept_detected_rate"], "kept detected (real)": p["kept_detected_rate_real"],
             "edited box IoU (new / old)": f"{_fmt(p['edited_iou_new'])} / {_fmt(p['edited_iou_old'])}",
             "outside-ROI max abs diff": p["outside_roi_max_abs_diff"]}
            for name, p in result["presets"].items()]


def skipped_text(skipped: dict[str, list[str]]) -> str:
    """Which presets did not fit some images (a structure not annotated there, a box leaving the frame)."""
    if not any(skipped.values()):
        return ""
    parts = [f"{name}: {len(reasons)} image(s), e.g. {reasons[0]}" for name, reasons in skipped.items() if reasons]
    return "\n\nNot applied (the preset did not fit the image; see presets_skipped.csv):\n\n" + "\n".join(f"- {p}" for p in parts)


def notes(settings: dict) -> str:
    ms = settings["ms_ssim"]
    lines = [
        f"Images: the {settings['split']} split of `{settings['data']}` ({'the fixed validation split: never trained on' if settings['split'] == 'val' else 'every image, training ones included'}), "
        f"each scaled so its longer side is {settings['size']} px (boxes with it); all numbers at that size, on grayscale.",
        "Reconstruction: the ROI is hidden and regenerated from the image's real layout, then compared with the real image. "
        f"Two ROIs per image: one structure's box + {settings['roi_margin']:g} px (the structure drawn per image from its annotated "
        "ones with a generator seeded by --seed and the file name; `hidden_structure` in reconstruction.csv), and the union of all "
        "its boxes + the same margin (\"all boxes\"). The headline PSNR / MS-SSIM columns are the single-structure ROI.",
        "Whole image = every pixel; outside the ROI the engine pastes the source back, so the whole-image figures mix the "
        "regenerated ROI with exact background and rise as the ROI shrinks. ROI only = the ROI's bounding rectangle, cropped "
        "from both images (PSNR and MS-SSIM on the same crop).",
        f"PSNR: peak 255, mean over images. MS-SSIM: pytorch_msssim, data range 1, Gaussian window {ms['window']}, the standard "
        "5 scales when the smaller side exceeds 160 px; a smaller image or crop gets the scales that fit (side > 10 x 2^(L-1)) "
        "with the first L standard weights renormalised (computed exactly: pixel repetition + zero weights; "
        "`ms_ssim_levels` columns in reconstruction.csv); a crop of 10 px or less gets none (n/a).",
        f"Layout fidelity: the detector `{settings['detector']}` on the images regenerated inside the all-boxes ROI, against the "
        "requested (real) boxes: AP50 and mean IoU per structure (`fetalstudio.detection.metrics`), beside the same detector on "
        "the real images (its ceiling).",
        f"Edit fidelity: each preset applied to the real layout; the ROI is the changed boxes, old and new, + {settings['roi_margin']:g} px; "
        f"stage {settings['preset_stage']}. A structure counts as detected when the detector (score >= {settings['score_threshold']:g}, "
        "one box per structure) returns it with IoU >= 0.5 against its box (for a removed structure: the box it had). "
        "Removed detected should be near 0, kept detected near the real-image rate; `(real)` columns are the same detector on the "
        "unedited image. Edited box IoU: the detection of each changed structure against its new and its old box (a preset "
        "that moves or scales a box should raise the first). Outside-ROI max abs diff: the largest difference of any pixel outside "
        "the ROI between the edited image and the source, measured (0 = untouched).",
        "The paper's figures are on their data at 512 px with SD 1.5; ours come from the bundled models at "
        f"{settings['size']} px, so compare trends (SSA vs DDIM, the ControlNet's gain) rather than absolute values.",
    ]
    return "\n".join(f"- {line}" for line in lines)


def write_reports(out: Path, result: dict, stages: Sequence[str], structures: Sequence[str],
                  reconstruction: list[dict], edits: list[dict], skipped: dict[str, list[str]], seconds: float) -> Path:
    """report.md, reconstruction.csv, layout_fidelity.csv, presets.csv, summary.json (the grids are drawn as
    the images are made)."""
    settings = result["settings"]
    setup = "\n".join(f"- {key}: {value}" for key, value in [
        ("generator", f"`{settings['model']}`" + (f" + LoRA `{settings['lora']}`" if settings["lora"] else "")),
        ("ControlNet", f"`{settings['controlnet']}`"), ("detector", f"`{settings['detector']}`"),
        ("data", f"`{settings['data']}`, {settings['split']} split, {result['n_images']} images"),
        ("sampling", f"{settings['steps']} steps, seed {settings['seed']} (+ image index), stages {', '.join(stages)}"),
        ("time", f"{seconds:.0f} s on {settings['device']}"),
    ])
    layout = layout_rows(result, stages, structures)
    sections = [
        ("Setup", setup),
        ("Reconstruction and layout fidelity", markdown_table(headline_rows(result, stages), digits=3)),
        ("Anchors (FetalFlex paper)", markdown_table(anchor_rows(), digits=3)),
        ("Layout fidelity per structure (AP50 / mean IoU)", markdown_table(layout, digits=3)),
        ("Edit fidelity per preset", (markdown_table(preset_rows(result), digits=3) if result["presets"] else "_(no presets evaluated)_")
         + skipped_text(skipped)),
        ("Pictures", "Reconstruction, single-structure ROI (red outline):\n\n![reconstruction](reconstruction_structure.png)\n\n"
                     "Reconstruction, all boxes:\n\n![reconstruction, all boxes](reconstruction_all_boxes.png)\n\n"
                     "Presets, before / after:\n\n![presets](presets.png)"),
        ("Notes", notes(settings)),
        ("Files", "reconstruction.csv (one row per image, ROI and stage), layout_fidelity.csv (per structure), presets.csv "
                  "(one row per image and preset), presets_skipped.csv (presets that did not fit an image, and why), summary.json (everything in --json), the three PNG grids."),
    ]
    text = "\n".join(["# Anatomy engine (FetalFlex) evaluation", ""] + [part for heading, body in sections for part in (f"## {heading}", "", body, "")])
    write_csv(out / "reconstruction.csv", reconstruction)
    write_csv(out / "layout_fidelity.csv", layout)
    write_csv(out / "presets.csv", edits)
    write_csv(out / "presets_skipped.csv", [{"preset": name, "reason": reason} for name, reasons in skipped.items() for reason in reasons],
              columns=["preset", "reason"])
    write_json(out / "summary.json", result)
    atomic_write_bytes(out / "report.md", (text.rstrip() + "\n").encode("utf-8"))
    return out / "report.md"
