"""Kernel Inception Distance: the unbiased squared MMD with a cubic polynomial kernel.

Unlike FID, KID has an unbiased estimator, so it can be compared across sample sizes. The
estimator, kernel ``k(x, y) = (x.y / D + 1)^3`` and subset scheme follow Binkowski et al. 2018
(and torchmetrics' ``KernelInceptionDistance``, which tests cross-check); the subsets are drawn
with a seeded NumPy generator so the report is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsynth.errors import ConfigError, InputError


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """``(N, M)`` kernel matrix ``(gamma * x @ y.T + coef) ** degree`` for ``(N, D)``, ``(M, D)``."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef) ** degree


def mmd2_unbiased(real: np.ndarray, generated: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD^2 between two equally sized ``(m, D)`` samples (diagonals excluded)."""
    x, y = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise InputError(f"unbiased MMD needs two samples of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    k_xx, k_yy, k_xy = (polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree),
                        polynomial_kernel(x, y, degree))
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


@dataclass
class KidResult:
    """KID over random subsets: mean, standard deviation (ddof=0), subset size and count."""

    mean: float
    std: float
    subset_size: int
    subsets: int


def kernel_inception_distance(real: np.ndarray, generated: np.ndarray, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> KidResult:
    """KID of ``(N_r, D)`` vs ``(N_g, D)`` features, mean +/- sd over ``subsets`` random subsets.

    Each subset is drawn without replacement. When ``subset_size`` is not smaller than the
    smaller set, it is reduced to half of that set, so that subsets differ and the sd means
    something (the full set every time would give sd = 0); the size used is returned.

    Raises:
        ConfigError: fewer than 2 samples in either set or invalid counts.
    """
    x, y = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise InputError(f"KID needs (N, D) features of equal D, got {x.shape} and {y.shape}")
    smallest = min(x.shape[0], y.shape[0])
    size = int(subset_size) if int(subset_size) < smallest else smallest // 2
    if size < 2 or subsets < 1:
        raise ConfigError(f"KID needs subset_size >= 2 and subsets >= 1; got subset size {size} "
                          f"(real N={x.shape[0]}, generated N={y.shape[0]}) and subsets={subsets}")
    rng = np.random.default_rng(seed)
    scores = [mmd2_unbiased(x[rng.choice(x.shape[0], size, replace=False)],
                            y[rng.choice(y.shape[0], size, replace=False)]) for _ in range(int(subsets))]
    return KidResult(mean=float(np.mean(scores)), std=float(np.std(scores)), subset_size=size,
                     subsets=int(subsets))
