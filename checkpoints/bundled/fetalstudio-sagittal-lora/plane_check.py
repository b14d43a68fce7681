# Run from the checkout: PYTHONPATH=. python checkpoints/bundled/fetalstudio-sagittal-lora/plane_check.py 64
"""KID (polynomial kernel, unbiased) in the structure detector's deepest backbone features (pooled): generated
sagittal images with/without the sagittal LoRA vs real validation images; real training images as the floor."""
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from fetalstudio.app_context import build_manager
from fetalstudio.data.structures import read_structures, split_structures
from fetalstudio.detection.letterbox import letterbox, as_gray
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.settings import GenerationSettings, LoraSpec
from fetalstudio.vocabulary import FACIAL_SAGITTAL, anatomy_caption
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
n = int(sys.argv[1])
m = build_manager()
det = m.get("fetalstudio-structure-detector")
size = det.config.input_size
def feats(images):
    x = np.stack([letterbox(as_gray(i), size)[0] for i in images])
    x = torch.from_numpy(x).float()[:, None] / 127.5 - 1
    with torch.inference_mode():
        f = det.backbone(x)[-1].mean((2, 3))
    return f.double().numpy()
def kid(a, b):
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    na, nb = len(a), len(b)
    return (kaa.sum() - np.trace(kaa)) / (na * (na - 1)) + (kbb.sum() - np.trace(kbb)) / (nb * (nb - 1)) - 2 * kab.mean()
data = Path("../shared/data/first_trimester_structures")
allitems = read_structures(data)
val = [Image.open(i.path).convert("L") for i in split_structures(allitems, "val")[:n]]
train = [Image.open(i.path).convert("L") for i in split_structures(allitems, "train")[:n]]
fv = feats(val)
res = {"n": n, "features": "fetalstudio-structure-detector backbone, last stage, mean-pooled", "kid_x1000": {"real train vs real val": round(1000 * kid(feats(train), fv), 2)}}
for label, loras in (("base", ()), ("base + fetalstudio-sagittal-lora", (LoraSpec("fetalstudio-sagittal-lora", 1.0),))):
    s = GenerationSettings(model="fetalstudio-tiny", prompt=anatomy_caption(FACIAL_SAGITTAL), sampler="ddim", steps=20, width=256,
                           height=256, seed=1000, batch_size=8, batch_count=n // 8, loras=loras)
    ims = [g.image for g in TextToImageRunner(m).generate(s).images]
    res["kid_x1000"][label + " vs real val"] = round(1000 * kid(feats(ims), fv), 2)
print(json.dumps(res, indent=1))
