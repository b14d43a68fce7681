"""The pictures of the ``eval synthesis`` report: t-SNE of classifier features and the closest generated/training pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fetalstudio.evaluation.synthesis.data import THUMB_SIZE, ImageSet

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194),
           (127, 127, 127), (188, 189, 34), (23, 190, 207)]
SOURCE_MARKERS = {"real (Spanish)": "circle", "real (African)": "square", "synthetic": "triangle"}


def tsne_embedding(features, seed: int):
    """2-D t-SNE of feature rows (perplexity min(30, (n - 1) / 3), PCA init, seeded); None below 4 rows."""
    import numpy as np
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    if len(features) < 4:
        return None
    perplexity = min(30.0, (len(features) - 1) / 3.0)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(features)


def _marker(draw, x: float, y: float, shape: str, colour, r: int = 5) -> None:
    outline = (40, 40, 40)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=outline)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour, outline=outline)
    else:
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour, outline=outline)


def draw_tsne(path: Path, points, planes: Sequence[str], sources: Sequence[str], title: str, message: str | None = None) -> Path:
    from PIL import Image, ImageDraw

    from fetalstudio.evaluation.classifier import _font, _text

    size, left, top, legend = 620, 30, 50, 230
    image = Image.new("RGB", (left + size + legend, top + size + 30), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    _text(draw, (image.width // 2, 22), title, font)
    draw.rectangle([left, top, left + size, top + size], outline=(180, 180, 180))
    if points is None:
        _text(draw, (left + size // 2, top + size // 2), message or "too few images for t-SNE", font)
        image.save(path)
        return path
    unique_planes = list(dict.fromkeys(planes))
    colours = {plane: PALETTE[i % len(PALETTE)] for i, plane in enumerate(unique_planes)}
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = [max(float(h - l), 1e-9) for l, h in zip(lo, hi)]
    order = sorted(range(len(points)), key=lambda i: list(SOURCE_MARKERS).index(sources[i]) if sources[i] in SOURCE_MARKERS else 9)
    for i in order:
        x = left + 12 + (points[i, 0] - lo[0]) / span[0] * (size - 24)
        y = top + 12 + (points[i, 1] - lo[1]) / span[1] * (size - 24)
        _marker(draw, x, y, SOURCE_MARKERS.get(sources[i], "circle"), colours[planes[i]])
    x0, y = left + size + 20, top + 10
    _text(draw, (x0, y), "colour: plane", small, anchor="lm")
    for plane in unique_planes:
        y += 22
        _marker(draw, x0 + 8, y, "circle", colours[plane])
        _text(draw, (x0 + 22, y), f"{plane} ({sum(1 for p in planes if p == plane)})", small, anchor="lm")
    y += 40
    _text(draw, (x0, y), "shape: source", small, anchor="lm")
    for source, shape in SOURCE_MARKERS.items():
        count = sum(1 for s in sources if s == source)
        if count:
            y += 22
            _marker(draw, x0 + 8, y, shape, (200, 200, 200))
            _text(draw, (x0 + 22, y), f"{source} ({count})", small, anchor="lm")
    image.save(path)
    return path


def draw_nearest_neighbours(path: Path, pairs: list[dict], synthetic: ImageSet, train: ImageSet, message: str | None = None) -> Path:
    """Generated image beside its nearest training image (pixel space), closest pairs first."""
    from PIL import Image, ImageDraw

    from fetalstudio.evaluation.classifier import _font, _text

    columns = 2
    cell_w, cell_h, gap, top = max(2 * THUMB_SIZE + 12, 340), THUMB_SIZE + 76, 24, 50
    rows = max(1, math.ceil(len(pairs) / columns))
    image = Image.new("RGB", (columns * (cell_w + gap) + gap, top + rows * (cell_h + 10) + 10), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    _text(draw, (image.width // 2, 18), "Closest generated / training pairs (left: generated, right: its nearest training image)", font)
    if not pairs:
        _text(draw, (image.width // 2, top + cell_h // 2), message or "no generated plane has training images", font)
    for k, pair in enumerate(pairs):
        x = gap + (k % columns) * (cell_w + gap)
        y = top + (k // columns) * (cell_h + 10)
        image.paste(synthetic.thumbs[pair["synthetic_index"]].convert("RGB"), (x, y))
        image.paste(train.thumbs[pair["train_index"]].convert("RGB"), (x + THUMB_SIZE + 12, y))
        line = y + THUMB_SIZE + 10
        near = pair.get("near_copy")
        _text(draw, (x, line), pair["plane"] + ("   NEAR COPY" if near else ""), small, fill=(200, 30, 30) if near else (0, 0, 0), anchor="lm")
        _text(draw, (x, line + 15), f"pixel distance {pair['pixel']:.3f} (real-real median {pair['pixel_median_real']:.3f})", small, anchor="lm")
        _text(draw, (x, line + 30), f"feature distance {pair['feature']:.3f} (real-real median {pair['feature_median_real']:.3f})", small, anchor="lm")
        _text(draw, (x, line + 45), _shorten(pair["synthetic_file"]) + "  |  " + _shorten(pair["train_file"]), small, fill=(90, 90, 90), anchor="lm")
    image.save(path)
    return path


def _shorten(name: str, keep: int = 24) -> str:
    name = Path(name).name
    return name if len(name) <= keep else "..." + name[-keep + 3:]
