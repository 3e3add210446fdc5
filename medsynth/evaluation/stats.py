"""Uncertainty for set-level metrics: bootstrap over volumes and the real-vs-real floor.

Slices of one volume are strongly correlated, so resampling slices would pretend there are
hundreds of independent samples where there are a dozen. Every interval here therefore
resamples whole *volumes* (a group of feature rows) with replacement, and recomputes the metric
on the concatenated rows of the drawn volumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medsynth.errors import ConfigError

SetMetric = Callable[[np.ndarray, np.ndarray], float]
"""A metric of ``(N_r, D)`` real and ``(N_g, D)`` generated feature rows."""


def stack_groups(groups: Sequence[np.ndarray], pick: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Concatenate the ``(n_i, D)`` (or ``(D,)``) rows of the chosen groups into ``(sum n_i, D)``."""
    index = range(len(groups)) if pick is None else pick
    return np.concatenate([np.atleast_2d(groups[i]) for i in index], axis=0)


@dataclass
class Interval:
    """A point estimate with a percentile bootstrap interval over volumes.

    Attributes:
        value: the metric on all volumes.
        low, high: the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the replicates.
        level: the coverage, e.g. 0.95.
        replicates: number of bootstrap replicates that gave a finite value.
    """

    value: float
    low: float
    high: float
    level: float
    replicates: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "ci_level": self.level,
                "bootstrap_replicates": self.replicates, "bootstrap_unit": "volume"}


def bootstrap_indices(metric: Callable[[np.ndarray, np.ndarray], float], n_real: int, n_generated: int, *,
                      replicates: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of a metric of *volume indices* (resampled with replacement).

    Args:
        metric: ``metric(real_indices, generated_indices) -> float``; it gathers whatever per-volume
            data it needs (slices of three planes, one embedding, ...) for the drawn volumes.
        n_real, n_generated: number of volumes in each set.
        replicates: bootstrap replicates (>= 10).
        level: interval coverage in (0, 1).
        seed: resampling seed.
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap level must be in (0, 1), got {level}")
    if replicates < 10:
        raise ConfigError(f"bootstrap needs at least 10 replicates, got {replicates}")
    rng = np.random.default_rng(seed)
    value = float(metric(np.arange(n_real), np.arange(n_generated)))
    values = []
    for _ in range(int(replicates)):
        result = float(metric(rng.integers(0, n_real, n_real), rng.integers(0, n_generated, n_generated)))
        if np.isfinite(result):
            values.append(result)
    tail = (1.0 - level) / 2.0
    low, high = (np.quantile(values, [tail, 1.0 - tail]) if values else (np.nan, np.nan))
    return Interval(value=value, low=float(low), high=float(high), level=level, replicates=len(values))


def bootstrap_volumes(metric: SetMetric, real_groups: Sequence[np.ndarray],
                      generated_groups: Sequence[np.ndarray], *, replicates: int = 200,
                      level: float = 0.95, seed: int = 0) -> Interval:
    """:func:`bootstrap_indices` for a metric of stacked rows, e.g. FID of one plane.

    Args:
        metric: computes the number from stacked rows, e.g. :func:`~medsynth.evaluation.fid.frechet_distance`.
        real_groups, generated_groups: one ``(n_i, D)`` array per volume.
    """
    return bootstrap_indices(lambda r, g: metric(stack_groups(real_groups, r), stack_groups(generated_groups, g)),
                             len(real_groups), len(generated_groups), replicates=replicates, level=level, seed=seed)


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of ``range(n)`` (sizes ``n // 2`` each; an odd one out is dropped)."""
    if n < 2:
        raise ConfigError(f"a real-vs-real floor needs at least 2 volumes, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(order[:half]), np.sort(order[half:2 * half])
