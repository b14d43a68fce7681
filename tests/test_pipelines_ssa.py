"""SSA (FetalFlex stage 1): Perona-Malik diffusion against a loop-by-loop numpy reference, on a real image."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.pipelines.ssa import (
    SSAParameters, anisotropic_diffusion, isotropic_diffusion, scale_space_adaptive,
)
from tests.data_support import DATA, needs_data


def reference_diffusion(image: np.ndarray, k: float | None, delta: float, iterations: int) -> np.ndarray:
    """Perona-Malik written out pixel by pixel (k None: every conductance 1); no flux across the border."""
    x = image.astype(np.float64).copy()
    height, width = x.shape
    for _ in range(iterations):
        new = x.copy()
        for r in range(height):
            for c in range(width):
                total = 0.0
                for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    rr, cc = r + dr, c + dc
                    if not (0 <= rr < height and 0 <= cc < width):
                        continue  # insulated border: no neighbour, no flux
                    gradient = x[rr, cc] - x[r, c]
                    conductance = 1.0 if k is None else np.exp(-((abs(gradient) / k) ** 2))
                    total += conductance * gradient
                new[r, c] = x[r, c] + delta * total
        x = new
    return x


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).to(torch.float64)[None, None]


def test_diffusion_matches_the_pixel_by_pixel_reference():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 9))
    image[:, 5:] += 4.0  # a strong vertical edge
    for k, delta, iterations in ((0.5, 0.25, 1), (1.5, 0.1, 3), (0.2, 0.05, 5)):
        expected = reference_diffusion(image, k, delta, iterations)
        got = anisotropic_diffusion(as_tensor(image), k, delta, iterations)[0, 0].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        isotropic = isotropic_diffusion(as_tensor(image), delta, iterations)[0, 0].numpy()
        np.testing.assert_allclose(isotropic, reference_diffusion(image, None, delta, iterations), rtol=0, atol=1e-12)


def test_eq9_is_the_isotropic_result_plus_the_anisotropic_correction():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(2, 4, 6, 5)))
    parameters = SSAParameters(k=0.7, delta=0.2, iterations=2)
    anisotropic = anisotropic_diffusion(x, 0.7, 0.2, 2)
    isotropic = isotropic_diffusion(x, 0.2, 2)
    result = scale_space_adaptive(x, parameters)
    torch.testing.assert_close(result, (anisotropic - isotropic) + isotropic, rtol=0, atol=0)
    torch.testing.assert_close(result, anisotropic, rtol=0, atol=1e-12)  # eq. 9 sums to AD(x)
    torch.testing.assert_close(scale_space_adaptive(x, SSAParameters(0.7, 0.2, 2, correction=0.0)), isotropic)
    # each channel diffuses on its own
    torch.testing.assert_close(scale_space_adaptive(x[:1, 2:3], parameters), result[:1, 2:3])


@needs_data
def test_strong_edges_are_kept_while_flat_regions_smooth_on_a_real_head():
    with (DATA / "hc18_heads" / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        first = next(csv.DictReader(handle))
    with Image.open(DATA / "hc18_heads" / first["image"]) as image:
        gray = np.asarray(image.convert("L").resize((96, 64), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    rng = np.random.default_rng(2)
    flat = np.full((64, 32), gray.mean())
    noisy = np.concatenate([gray, flat], axis=1) + rng.normal(scale=0.02, size=(64, 128))
    noisy[:, 96:112] += 0.8  # a strong step edge at column 112 (from 0.8 above the flat to the flat)
    x = as_tensor(noisy)
    parameters = SSAParameters(k=0.1, delta=0.2, iterations=10)
    ssa = scale_space_adaptive(x, parameters)[0, 0].numpy()
    heat = isotropic_diffusion(x, 0.2, 10)[0, 0].numpy()

    def edge_height(image):
        return (image[:, 111] - image[:, 112]).mean()  # the step between the two columns at the edge

    assert edge_height(noisy) > 0.75
    assert edge_height(ssa) > 0.95 * edge_height(noisy)  # kept
    assert edge_height(heat) < 0.5 * edge_height(noisy)  # isotropic diffusion blurs it
    flat_noise = noisy[:, 116:].std()
    assert ssa[:, 116:].std() < 0.5 * flat_noise  # the flat region smooths


@pytest.mark.parametrize(("values", "message"), [
    (dict(k=0.0), "k .the edge threshold. must be above 0"),
    (dict(k=float("nan")), "must be above 0"),
    (dict(delta=0.3), "at most 0.25 for a stable"),
    (dict(delta=0.0), "delta must be above 0"),
    (dict(iterations=0), "iterations must be a whole number"),
    (dict(iterations=1.5), "iterations must be a whole number"),
    (dict(correction=-1.0), "correction weight"),
])
def test_parameters_are_validated(values, message):
    with pytest.raises(FetalStudioError, match=message):
        SSAParameters(**values)


def test_a_tensor_that_is_not_4d_is_refused():
    with pytest.raises(FetalStudioError, match="batch, channels, height, width"):
        anisotropic_diffusion(torch.zeros(4, 4), 1.0, 0.1, 1)
