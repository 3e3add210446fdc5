"""Fréchet distance (FID), its small-sample extrapolation FID-infinity, and the exact protocol.

Protocol (docs/EVALUATION.md section 1): features as float64, mean and covariance with
``ddof=1``, and

    FID = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr((S_r S_g)^1/2)

where the trace term is computed from the eigenvalues of the symmetric positive semi-definite
matrix ``S_r^1/2 S_g S_r^1/2`` (same spectrum as ``S_r S_g``), negatives clipped at 0. A
symmetric eigendecomposition never produces the complex rounding noise that a general
``sqrtm`` of the non-symmetric ``S_r S_g`` does, and it has no SciPy version quirks.
:func:`frechet_distance_scipy` keeps SciPy's ``sqrtm`` as a cross-check only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsynth.errors import ConfigError, InputError

SQRT_METHOD = ("eigvalsh of S_r^1/2 S_g S_r^1/2 (float64, negatives clipped to 0); when N < D the same "
               "non-zero spectrum from the N x N form (A B^T)^T (A B^T) / ((n_r-1)(n_g-1)) of the centred features")
"""The matrix square-root method, recorded verbatim in every report."""


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise InputError(f"{name} features must be a 2D (N, D) array, got shape {array.shape}")
    if array.shape[0] < 2:
        raise InputError(f"{name} features need at least 2 samples for a covariance (ddof=1), "
                         f"got N={array.shape[0]}")
    if not np.isfinite(array).all():
        raise InputError(f"{name} features contain NaN or inf values")
    return array


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (ddof=1) of ``(N, D)`` features, float64."""
    array = _as_features(features, "input")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False, ddof=1))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix ``(D, D)`` via eigh, negative eigenvalues clipped."""
    sym = (matrix + matrix.T) / 2.0
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_stats(mu_r: np.ndarray, sigma_r: np.ndarray, mu_g: np.ndarray,
                                sigma_g: np.ndarray) -> float:
    """Fréchet distance between N(mu_r, sigma_r) and N(mu_g, sigma_g).

    Args:
        mu_r, mu_g: ``(D,)`` means.
        sigma_r, sigma_g: ``(D, D)`` covariances.

    Returns:
        The distance (float >= 0 up to rounding; tiny negatives from rounding are clipped to 0).
    """
    mu_r, mu_g = np.asarray(mu_r, np.float64), np.asarray(mu_g, np.float64)
    sigma_r, sigma_g = np.asarray(sigma_r, np.float64), np.asarray(sigma_g, np.float64)
    if mu_r.shape != mu_g.shape or sigma_r.shape != sigma_g.shape:
        raise InputError(f"feature dimensions differ: real {mu_r.shape}, generated {mu_g.shape}")
    root_r = _psd_sqrt(sigma_r)
    inner = root_r @ sigma_g @ root_r
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu_r - mu_g
    value = float(diff @ diff + np.trace(sigma_r) + np.trace(sigma_g) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """FID between ``(N_r, D)`` real and ``(N_g, D)`` generated features (protocol above).

    With fewer samples than dimensions (2.5D slices of a few volumes, one row per volume in 3D)
    the covariances have rank < D, and the non-zero eigenvalues of ``S_r^1/2 S_g S_r^1/2`` are
    those of the small symmetric matrix ``C^T C`` with ``C = A B^T / sqrt((n_r - 1)(n_g - 1))``
    (A, B the centred features): the same spectrum, from an ``N x N`` instead of a ``D x D``
    eigenproblem, which keeps bootstrap replicates cheap.
    """
    real_a, gen_a = _as_features(real, "real"), _as_features(generated, "generated")
    if real_a.shape[1] != gen_a.shape[1]:
        raise InputError(f"feature dimensions differ: real D={real_a.shape[1]}, generated D={gen_a.shape[1]}")
    n_r, n_g, dim = real_a.shape[0], gen_a.shape[0], real_a.shape[1]
    if min(n_r, n_g) >= dim:
        return frechet_distance_from_stats(*gaussian_stats(real_a), *gaussian_stats(gen_a))
    mu_r, mu_g = real_a.mean(axis=0), gen_a.mean(axis=0)
    a, b = real_a - mu_r, gen_a - mu_g
    cross = (a @ b.T) / np.sqrt((n_r - 1) * (n_g - 1))  # (n_r, n_g)
    small = cross @ cross.T if n_r <= n_g else cross.T @ cross
    eigenvalues = np.linalg.eigvalsh((small + small.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    trace_r = float((a * a).sum() / (n_r - 1))
    trace_g = float((b * b).sum() / (n_g - 1))
    diff = mu_r - mu_g
    return max(float(diff @ diff + trace_r + trace_g - 2.0 * trace_sqrt), 0.0)


def frechet_distance_scipy(real: np.ndarray, generated: np.ndarray) -> float:
    """Cross-check only: the same distance with ``scipy.linalg.sqrtm`` of ``S_r S_g``."""
    from scipy import linalg

    mu_r, s_r = gaussian_stats(real)
    mu_g, s_g = gaussian_stats(generated)
    covmean = linalg.sqrtm(s_r @ s_g)
    trace = float(np.real(np.trace(covmean)))
    diff = mu_r - mu_g
    return float(diff @ diff + np.trace(s_r) + np.trace(s_g) - 2.0 * trace)


@dataclass
class FidInfinity:
    """FID extrapolated to infinitely many generated samples.

    Attributes:
        value: the intercept of the least-squares line FID_N = value + slope / N.
        slope: its slope.
        ns: the N (generated groups) used for each point.
        fids: the mean FID at each N.
    """

    value: float
    slope: float
    ns: list[int]
    fids: list[float]


def fid_infinity(real: np.ndarray, generated_groups: Sequence[np.ndarray], *, points: int = 10,
                 repeats: int = 3, min_groups: int | None = None, seed: int = 0) -> FidInfinity:
    """FID-infinity (Chong & Forsyth 2020) with generated samples drawn as whole groups.

    A group is one volume's features (its slices for 2.5D, one row for 3D), so N counts volumes,
    the unit that is actually sampled. FID is computed against the full real set at ``points``
    evenly spaced N between ``min_groups`` and all groups (each averaged over ``repeats`` random
    subsets without replacement), then a line in 1/N is fit and its intercept reported.

    Args:
        real: ``(N_r, D)`` real features.
        generated_groups: one ``(n_i, D)`` array per generated volume.
        points: number of distinct N values (at least 3 are needed for a meaningful fit).
        repeats: random subsets per N.
        min_groups: smallest N (default: half of the groups, at least 2).
        seed: subset-sampling seed.

    Raises:
        ConfigError: fewer than 3 distinct N values are possible.
    """
    n = len(generated_groups)
    low = max(2, n // 2) if min_groups is None else int(min_groups)
    ns = sorted({int(round(v)) for v in np.linspace(low, n, points)})
    if len(ns) < 3:
        raise ConfigError(f"FID-infinity needs at least 3 distinct sample sizes; with {n} generated "
                          f"volumes and minimum {low} there are {len(ns)}")
    rng = np.random.default_rng(seed)
    mu_r, s_r = gaussian_stats(real)
    fids: list[float] = []
    for size in ns:
        values = []
        for _ in range(repeats if size < n else 1):
            pick = rng.choice(n, size=size, replace=False)
            rows = np.concatenate([np.atleast_2d(generated_groups[i]) for i in pick])
            values.append(frechet_distance_from_stats(mu_r, s_r, *gaussian_stats(rows)))
        fids.append(float(np.mean(values)))
    slope, intercept = np.polyfit(1.0 / np.asarray(ns, dtype=np.float64), np.asarray(fids), 1)
    return FidInfinity(value=float(intercept), slope=float(slope), ns=ns, fids=fids)
