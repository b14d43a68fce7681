"""The numbers of ``eval synthesis``: Fréchet distance, MS-SSIM, nearest neighbours (no file or model access)."""

from __future__ import annotations

import math
import zlib


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors (rows).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), with the matrix square roots
    from ``scipy.linalg.sqrtm``. The trace term is taken as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))
    (the same number: the matrices are similar), whose argument is symmetric positive
    semi-definite, so the root exists even for singular covariances; imaginary parts from
    rounding are dropped, and a non-finite root is retried with ``eps`` added to both diagonals.
    Both covariances lie in the span of the centred samples, so with fewer samples than
    dimensions everything is computed, exactly, in an orthonormal basis of that span.
    NaN when a set has fewer than 2 rows.
    """
    import numpy as np

    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be two N x D arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return math.nan
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    centred_a, centred_b = a - mu_a, b - mu_b
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    stacked = np.concatenate([centred_a, centred_b])
    if stacked.shape[0] < stacked.shape[1]:
        _, singular, vt = np.linalg.svd(stacked, full_matrices=False)
        tolerance = singular.max(initial=0.0) * max(stacked.shape) * np.finfo(np.float64).eps
        basis = vt[singular > tolerance].T
        if basis.shape[1] == 0:
            return mean_term
        centred_a, centred_b = centred_a @ basis, centred_b @ basis
    sigma_a = centred_a.T @ centred_a / (len(a) - 1)
    sigma_b = centred_b.T @ centred_b / (len(b) - 1)
    trace_root = _trace_sqrt_product(sigma_a, sigma_b)
    if not math.isfinite(trace_root):
        offset = eps * np.eye(len(sigma_a))
        trace_root = _trace_sqrt_product(sigma_a + offset, sigma_b + offset)
    value = mean_term + float(np.trace(sigma_a) + np.trace(sigma_b)) - 2.0 * trace_root
    return max(value, 0.0)


def _trace_sqrt_product(sigma_a, sigma_b) -> float:
    import warnings

    import numpy as np
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "singular matrix" notes: the eps retry handles real failures
        root_a = np.real(linalg.sqrtm(sigma_a))
        inner = root_a @ sigma_b @ root_a
        root = linalg.sqrtm((inner + inner.T) / 2.0)
    if not np.isfinite(root).all():
        return math.nan
    return float(np.trace(np.real(root)))


def ms_ssim(images_a, images_b) -> "list[float]":
    """MS-SSIM (data range 1) of image pairs: two N x H x W arrays/tensors in [0, 1], H, W > 160."""
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    a = torch.as_tensor(images_a, dtype=torch.float32)
    b = torch.as_tensor(images_b, dtype=torch.float32)
    if a.ndim == 2:
        a, b = a[None], b[None]
    with torch.no_grad():
        return _ms_ssim(a[:, None], b[:, None], data_range=1.0, size_average=False).tolist()


def mean_pairwise_ms_ssim(images, max_pairs: int, seed: int, key: str = "") -> tuple[float, int]:
    """(mean MS-SSIM over pairs of ``images`` (N x H x W uint8), pairs used). All pairs when there
    are at most ``max_pairs``, else ``max_pairs`` distinct pairs chosen with ``seed`` (and ``key``)."""
    import numpy as np

    images = np.asarray(images)
    n = len(images)
    if n < 2 or max_pairs < 1:
        return math.nan, 0
    first, second = np.triu_indices(n, k=1)
    if len(first) > max_pairs:
        chosen = np.sort(np.random.default_rng([seed, zlib.crc32(key.encode())]).choice(len(first), max_pairs, replace=False))
        first, second = first[chosen], second[chosen]
    values: list[float] = []
    for start in range(0, len(first), 32):
        i, j = first[start:start + 32], second[start:start + 32]
        values += ms_ssim(images[i].astype(np.float32) / 255.0, images[j].astype(np.float32) / 255.0)
    return float(np.mean(values)), len(values)


def nearest_distances(queries, references, leave_one_out: bool = False):
    """(distance, index) of each query row's nearest reference row (Euclidean). With
    ``leave_one_out`` the queries are the references and a row never matches itself."""
    import numpy as np

    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    if len(q) == 0 or len(r) == 0 or (leave_one_out and len(r) < 2):
        return np.full(len(q), np.nan), np.full(len(q), -1, dtype=np.int64)
    squared = (q ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None, :] - 2.0 * q @ r.T
    distances = np.sqrt(np.maximum(squared, 0.0))
    if leave_one_out:
        np.fill_diagonal(distances, np.inf)
    index = distances.argmin(axis=1)
    return distances[np.arange(len(q)), index], index


def unit_rows(features):
    import numpy as np

    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

