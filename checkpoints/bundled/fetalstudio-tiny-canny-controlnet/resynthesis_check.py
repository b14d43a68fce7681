# Run from the checkout: PYTHONPATH=. python checkpoints/bundled/fetalstudio-tiny-canny-controlnet/resynthesis_check.py [N_PER_SOURCE] [THREADS]
"""Edge mode as the Anatomy editor runs it ("Keep this scan's structure", nothing edited: the ROI is the whole
scan): anatomy.flex.run_flex with condition canny, stage ddim, 20 DDIM steps, guidance 7.5, seed 0, on held-out
validation images of each source (the training command's split), with the canny ControlNet at scale 1 and at
scale 0 (its residuals switched off: the generator alone, the same prompt and LoRA). Scores against the source
at its own size: PSNR, MS-SSIM (evaluation.flex_metrics); and edge F1 in the 256 px letterboxed square the
ControlNet works in (the result's Canny edges within 2 px of the source's, and back). Writes resynthesis.json and resynthesis.png (source | with | without, per source)."""
import json, sys, time
from pathlib import Path
import cv2, numpy as np, torch
from PIL import Image
from fetalstudio.anatomy.flex import FlexOptions, run_flex
from fetalstudio.anatomy.layout import Layout
from fetalstudio.app_context import build_manager
from fetalstudio.evaluation.flex_metrics import ms_ssim, psnr
from fetalstudio.imaging.letterbox import letterbox_image
from fetalstudio.pipelines.edges import edge_map
from fetalstudio.pipelines.settings import GenerationSettings
from fetalstudio.training.controlnet import read_edge_split, spread

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
here = Path(__file__).resolve().parent
data = Path("../shared/data")
sources = [data / "first_trimester_structures", data / "hc18_heads/pairs.csv", data / "spanish_planes", data / "es_heads/pairs.csv"]
_, val = read_edge_split(sources, True, None, None)
manager = build_manager()

def edges(image):
    return np.asarray(edge_map(image, "canny").convert("L")) > 0

def edge_f1(source, made, tolerance=2):
    """In the generator's square, where the ControlNet saw the source's edges: both letterboxed to 256 px."""
    a, b = edges(letterbox_image(source, 256)[0]), edges(letterbox_image(made, 256)[0])
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_a, near_b = cv2.dilate(a.astype(np.uint8), kernel) > 0, cv2.dilate(b.astype(np.uint8), kernel) > 0
    precision = (b & near_a).sum() / max(1, b.sum())
    recall = (a & near_b).sum() / max(1, a.sum())
    return float(2 * precision * recall / max(1e-9, precision + recall))

rows, strips = [], []
started = time.perf_counter()
for source_name in dict.fromkeys(i.source for i in val):  # as the items name them (a folder read through its table: the table)
    items = spread([i for i in val if i.source == source_name], n)
    for number, item in enumerate(items):
        with Image.open(item.image) as opened:
            gray = opened.convert("L")
        sagittal = item.caption_from == "layout"
        layout = Layout("facial_sagittal" if sagittal else "trans_thalamic", gray.width, gray.height)
        roi = np.ones((gray.height, gray.width), bool)
        settings = GenerationSettings(model="fetalstudio-tiny", prompt=item.caption, sampler="DDIM", steps=20, guidance_scale=7.5,
                                      width=256, height=256, seed=0)
        row = {"source": Path(source_name).name if Path(source_name).is_dir() else Path(source_name).parent.name,
               "image": item.image.name, "lora": "fetalstudio-sagittal-lora" if sagittal else ""}
        made = {}
        for label, scale in (("with", 1.0), ("without", 0.0)):
            options = FlexOptions(stage="ddim", condition="canny", conditioning_scale=scale, lora=None if sagittal else "")
            final = run_flex(manager, settings, gray, layout, roi, options).final.convert("L")
            made[label] = final
            a, b = np.asarray(gray), np.asarray(final)
            row[label] = {"psnr": round(psnr(a, b), 3), "ms_ssim": round(ms_ssim(a, b)[0], 4), "edge_f1": round(edge_f1(gray, final), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if number < 2:
            strips.append(np.concatenate([np.asarray(im.resize((256, round(256 * gray.height / gray.width)))) for im in (gray, made["with"], made["without"])], 1))

def mean(key, label, subset):
    return round(float(np.mean([r[label][key] for r in subset])), 4)

summary = {}
for group in sorted({r["source"] for r in rows}) + ["all"]:
    subset = [r for r in rows if group in ("all", r["source"])]
    summary[group] = {"images": len(subset), **{label: {k: mean(k, label, subset) for k in ("psnr", "ms_ssim", "edge_f1")} for label in ("with", "without")}}
result = {"setting": "run_flex condition=canny stage=ddim ROI=whole image, 256 px square, 20 DDIM steps, guidance 7.5, seed 0; "
                     "'with' = the canny ControlNet at conditioning scale 1, 'without' = scale 0 (the generator alone)",
          "controlnet": "fetalstudio-tiny-canny-controlnet (picked by resolve_controlnet for condition canny)", "seconds": round(time.perf_counter() - started, 1), "summary": summary, "rows": rows}
(here / "resynthesis.json").write_text(json.dumps(result, indent=1) + "\n")
height = max(s.shape[0] for s in strips)
Image.fromarray(np.concatenate([np.pad(s, ((0, height - s.shape[0]), (0, 0))) for s in strips], 0)).save(here / "resynthesis.png")
print(json.dumps(summary, indent=1))
