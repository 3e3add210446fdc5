"""Distribution metrics of one extractor's features: FID (2.5D per plane + mean, or 3D), KID,
FID-infinity, bootstrap intervals over volumes and the real-vs-real floor.

Every metric has a minimum number of volumes (:data:`MIN_VOLUMES`); below it the metric is
skipped with a note naming the metric and the minimum, never reported as a meaningless number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsynth.evaluation.fid import fid_infinity, frechet_distance
from medsynth.evaluation.kid import kernel_inception_distance
from medsynth.evaluation.preprocessing import PLANES
from medsynth.evaluation.stats import bootstrap_indices, split_halves, stack_groups

MIN_VOLUMES: dict[str, int] = {
    "fid_2.5d": 2,        # slices pool into many samples, but a covariance needs >= 2 volumes
    "fid_3d": 4,          # one sample per volume
    "kid_2.5d": 2,
    "kid_3d": 4,
    "fid_infinity": 6,    # >= 3 distinct N between N/2 and N
    "bootstrap": 4,       # fewer distinct resamples make the interval meaningless
    "floor_2.5d": 4,      # two disjoint halves of the real set, >= 2 volumes each
    "floor_3d": 8,        # halves of >= 4 volumes
    "prdc": 6,            # k = 5 neighbours must exist
    "ms_ssim": 2,
}
"""Minimum volumes per set for each metric."""


@dataclass
class MetricSettings:
    """Knobs recorded in the report: seeds, replicate and subset counts."""

    seed: int = 0
    bootstrap: int = 200
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    fid_infinity_points: int = 8


def skipped(metric: str, n_real: int, n_synthetic: int, minimum: int | None = None) -> dict[str, str]:
    """The record of a skipped metric."""
    minimum = MIN_VOLUMES[metric] if minimum is None else minimum
    return {"skipped": f"{metric} needs >= {minimum} volumes per set; got real {n_real}, synthetic {n_synthetic}"}


def _enough(metric: str, n_real: int, n_synthetic: int) -> bool:
    return min(n_real, n_synthetic) >= MIN_VOLUMES[metric]


def _groups(features: Sequence[dict[str, np.ndarray]], key: str) -> list[np.ndarray]:
    return [np.atleast_2d(f[key]) for f in features]


def slice_metrics(real: Sequence[dict[str, np.ndarray]], synthetic: Sequence[dict[str, np.ndarray]],
                  settings: MetricSettings) -> dict[str, Any]:
    """2.5D metrics: per-plane and mean FID with CIs, KID per plane, FID-infinity, floor."""
    n_r, n_s = len(real), len(synthetic)
    out: dict[str, Any] = {"n_real": n_r, "n_synthetic": n_s,
                           "n_slices_real": {p: int(sum(len(f[p]) for f in real)) for p in PLANES},
                           "n_slices_synthetic": {p: int(sum(len(f[p]) for f in synthetic)) for p in PLANES}}
    if not _enough("fid_2.5d", n_r, n_s):
        out["fid"] = skipped("fid_2.5d", n_r, n_s)
        return out
    groups_r = {p: _groups(real, p) for p in PLANES}
    groups_s = {p: _groups(synthetic, p) for p in PLANES}

    def plane_fid(plane: str) -> Callable[[np.ndarray, np.ndarray], float]:
        return lambda r, g: frechet_distance(stack_groups(groups_r[plane], r), stack_groups(groups_s[plane], g))

    def mean_fid(r: np.ndarray, g: np.ndarray) -> float:
        return float(np.mean([plane_fid(p)(r, g) for p in PLANES]))

    fid: dict[str, Any] = {}
    do_boot = _enough("bootstrap", n_r, n_s)
    for name, fn in [*((p, plane_fid(p)) for p in PLANES), ("mean", mean_fid)]:
        if do_boot:
            fid[name] = bootstrap_indices(fn, n_r, n_s, replicates=settings.bootstrap, seed=settings.seed).to_dict()
        else:
            fid[name] = {"value": fn(np.arange(n_r), np.arange(n_s)), **skipped("bootstrap", n_r, n_s)}
    out["fid"] = fid
    out["kid"] = {p: vars(kernel_inception_distance(stack_groups(groups_r[p]), stack_groups(groups_s[p]),
                                                    subsets=settings.kid_subsets,
                                                    subset_size=settings.kid_subset_size, seed=settings.seed))
                  for p in PLANES}
    if _enough("fid_infinity", n_r, n_s):
        per_plane = {p: fid_infinity(stack_groups(groups_r[p]), groups_s[p], points=settings.fid_infinity_points,
                                     seed=settings.seed) for p in PLANES}
        out["fid_infinity"] = {**{p: vars(v) for p, v in per_plane.items()},
                               "mean": float(np.mean([v.value for v in per_plane.values()]))}
    else:
        out["fid_infinity"] = skipped("fid_infinity", n_r, n_s)
    out["floor"] = _floor(n_r, n_s, lambda r, g, real_only: (
        float(np.mean([frechet_distance(stack_groups(groups_r[p], r),
                                        stack_groups(groups_r[p] if real_only else groups_s[p], g)) for p in PLANES]))),
        "floor_2.5d", settings)
    return out


def volume_metrics(real: Sequence[dict[str, np.ndarray]], synthetic: Sequence[dict[str, np.ndarray]],
                   settings: MetricSettings) -> dict[str, Any]:
    """3D metrics on one embedding per volume: FID with CI, KID, FID-infinity, floor."""
    n_r, n_s = len(real), len(synthetic)
    out: dict[str, Any] = {"n_real": n_r, "n_synthetic": n_s}
    rows_r, rows_s = _groups(real, "volume"), _groups(synthetic, "volume")
    out["feature_dim"] = int(rows_r[0].shape[1]) if rows_r else 0
    if not _enough("fid_3d", n_r, n_s):
        out["fid"] = skipped("fid_3d", n_r, n_s)
        return out

    def fid(r: np.ndarray, g: np.ndarray) -> float:
        return frechet_distance(stack_groups(rows_r, r), stack_groups(rows_s, g))

    if _enough("bootstrap", n_r, n_s):
        out["fid"] = bootstrap_indices(fid, n_r, n_s, replicates=settings.bootstrap, seed=settings.seed).to_dict()
    else:
        out["fid"] = {"value": fid(np.arange(n_r), np.arange(n_s)), **skipped("bootstrap", n_r, n_s)}
    if min(n_r, n_s) <= out["feature_dim"]:
        out["fid"]["note"] = (f"N ({min(n_r, n_s)}) <= feature dim ({out['feature_dim']}): covariances are "
                              f"rank-deficient and FID is strongly biased; compare only at equal N")
    if _enough("kid_3d", n_r, n_s):
        out["kid"] = vars(kernel_inception_distance(stack_groups(rows_r), stack_groups(rows_s),
                                                    subsets=settings.kid_subsets,
                                                    subset_size=settings.kid_subset_size, seed=settings.seed))
    else:
        out["kid"] = skipped("kid_3d", n_r, n_s)
    if _enough("fid_infinity", n_r, n_s):
        out["fid_infinity"] = vars(fid_infinity(stack_groups(rows_r), rows_s, points=settings.fid_infinity_points,
                                                seed=settings.seed))
    else:
        out["fid_infinity"] = skipped("fid_infinity", n_r, n_s)
    out["floor"] = _floor(n_r, n_s, lambda r, g, real_only: frechet_distance(
        stack_groups(rows_r, r), stack_groups(rows_r if real_only else rows_s, g)), "floor_3d", settings)
    return out


def _floor(n_r: int, n_s: int, fid: Callable[[np.ndarray, np.ndarray, bool], float], metric: str,
           settings: MetricSettings) -> dict[str, Any]:
    """Real half A vs real half B, and real half A vs as many synthetic volumes (same N)."""
    if n_r < MIN_VOLUMES[metric]:
        return skipped(metric, n_r, n_s)
    half_a, half_b = split_halves(n_r, settings.seed)
    out: dict[str, Any] = {"real_vs_real": fid(half_a, half_b, True), "n_per_half": len(half_a),
                           "split_seed": settings.seed}
    if n_s >= len(half_b):
        pick = np.sort(np.random.default_rng(settings.seed).choice(n_s, len(half_b), replace=False))
        out["real_vs_synthetic_same_n"] = fid(half_a, pick, False)
    return out
