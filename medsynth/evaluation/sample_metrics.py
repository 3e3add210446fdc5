"""Precision, recall, density and coverage on one embedding per volume (Naeem et al. 2020).

Each real sample gets a k-NN radius (distance to its k-th nearest *other* real sample); the
metrics count how generated samples fall inside those balls (precision, density, coverage)
and how real samples fall inside the generated balls (recall). k = 5 by the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist

from medsynth.errors import ConfigError

DEFAULT_K = 5


def _kth_neighbour_radius(points: np.ndarray, k: int) -> np.ndarray:
    """``(N,)`` distance of each point to its k-th nearest other point."""
    dist = cdist(points, points)
    # Column 0 after sorting is the point itself (distance 0), so the k-th neighbour is column k.
    return np.sort(dist, axis=1)[:, k]


@dataclass
class PRDC:
    """Precision / recall / density / coverage and the k used."""

    precision: float
    recall: float
    density: float
    coverage: float
    k: int


def precision_recall_density_coverage(real: np.ndarray, generated: np.ndarray,
                                      k: int = DEFAULT_K) -> PRDC:
    """PRDC between ``(N_r, D)`` real and ``(N_g, D)`` generated volume embeddings.

    Raises:
        ConfigError: either set has ``k`` samples or fewer (the k-th neighbour must exist).
    """
    x, y = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if min(x.shape[0], y.shape[0]) <= k:
        raise ConfigError(f"precision/recall/density/coverage with k={k} needs more than {k} volumes "
                          f"per set, got real {x.shape[0]} and generated {y.shape[0]}")
    radius_real = _kth_neighbour_radius(x, k)
    radius_gen = _kth_neighbour_radius(y, k)
    dist = cdist(x, y)  # (N_r, N_g)
    inside = dist <= radius_real[:, None]
    precision = float(inside.any(axis=0).mean())
    recall = float((dist <= radius_gen[None, :]).any(axis=1).mean())
    density = float(inside.sum() / (k * y.shape[0]))
    coverage = float((dist.min(axis=1) <= radius_real).mean())
    return PRDC(precision=precision, recall=recall, density=density, coverage=coverage, k=k)
