"""Metric core: FID vs torchmetrics/MONAI/scipy, KID vs torchmetrics, PRDC, bootstrap over volumes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from medsynth.errors import ConfigError
from medsynth.evaluation.fid import (fid_infinity, frechet_distance, frechet_distance_scipy,
                                     gaussian_stats)
from medsynth.evaluation.kid import kernel_inception_distance, mmd2_unbiased
from medsynth.evaluation.sample_metrics import precision_recall_density_coverage
from medsynth.evaluation.stats import bootstrap_volumes, split_halves


def _features(seed: int, n: int = 300, d: int = 16, shift: float = 0.0) -> np.ndarray:
    mix = np.random.default_rng(100).normal(size=(d, d)) / np.sqrt(d)  # one distribution for all seeds
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift


def test_fid_matches_torchmetrics_monai_and_scipy() -> None:
    from monai.metrics.fid import get_fid_score
    from torchmetrics.image.fid import _compute_fid

    real, gen = _features(0), _features(1, n=250, shift=0.3)
    ours = frechet_distance(real, gen)
    mu_r, s_r = gaussian_stats(real)
    mu_g, s_g = gaussian_stats(gen)
    tm = float(_compute_fid(*(torch.from_numpy(a) for a in (mu_r, s_r, mu_g, s_g))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI passes scipy's deprecated `disp=`
        monai = float(get_fid_score(torch.from_numpy(gen), torch.from_numpy(real)))
        sp = frechet_distance_scipy(real, gen)
    for reference in (tm, monai, sp):
        assert abs(ours - reference) / reference < 1e-6
    assert ours > 0.1


def test_small_sample_form_equals_the_protocol_eigen_form() -> None:
    from medsynth.evaluation.fid import frechet_distance_from_stats

    real, gen = _features(0, n=12, d=40), _features(1, n=9, d=40, shift=0.2)  # N < D: rank-deficient
    direct = frechet_distance_from_stats(*gaussian_stats(real), *gaussian_stats(gen))
    # 1e-6, not 1e-9: the D x D form takes square roots of rounding-level eigenvalues of the
    # rank-deficient S_r (sqrt(1e-16) = 1e-8 each); the N x N form never sees them.
    assert frechet_distance(real, gen) == pytest.approx(direct, rel=1e-6)
    assert frechet_distance(gen, real) == pytest.approx(direct, rel=1e-6)


def test_fid_of_identical_sets_is_zero_and_grows_with_shift() -> None:
    real = _features(0)
    assert frechet_distance(real, real.copy()) == pytest.approx(0.0, abs=1e-9)
    values = [frechet_distance(real, _features(1, shift=s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > 10 * values[0]


def test_kid_agrees_with_torchmetrics_on_full_sets() -> None:
    from torchmetrics.image.kid import poly_mmd

    real, gen = _features(0, n=80), _features(1, n=80, shift=0.4)
    ours = mmd2_unbiased(real, gen)
    theirs = float(poly_mmd(torch.from_numpy(real), torch.from_numpy(gen)))
    assert ours == pytest.approx(theirs, rel=1e-9)
    kid = kernel_inception_distance(real, gen, subsets=20, subset_size=50, seed=3)
    again = kernel_inception_distance(real, gen, subsets=20, subset_size=50, seed=3)
    assert kid == again and kid.std > 0 and kid.subset_size == 50
    same = kernel_inception_distance(real, _features(2, n=80), subsets=20, subset_size=50)
    assert abs(same.mean) < kid.mean


def test_fid_infinity_recovers_the_intercept_of_a_biased_estimator() -> None:
    real = _features(0, n=4000, d=8)
    groups = [row[None] for row in _features(1, n=600, d=8)]  # same distribution: true FID is 0
    result = fid_infinity(real, groups, points=8, repeats=4, min_groups=30)
    assert result.slope > 0  # FID is biased upward at small N
    assert result.fids[0] > 0.2 and abs(result.value) < 0.3 * result.fids[0]
    with pytest.raises(ConfigError, match="at least 3 distinct sample sizes"):
        fid_infinity(real, groups[:3], points=5)


def test_prdc_perfect_for_same_distribution_and_refuses_small_sets() -> None:
    real = _features(0, n=200, d=4)
    same = precision_recall_density_coverage(real, real.copy())
    assert same.precision == 1.0 and same.recall == 1.0 and same.coverage == 1.0
    far = precision_recall_density_coverage(real, _features(1, n=200, d=4, shift=10.0))
    assert far.precision == 0.0 and far.coverage == 0.0
    with pytest.raises(ConfigError, match="needs more than 5 volumes"):
        precision_recall_density_coverage(real[:5], real[:5])


def test_bootstrap_resamples_whole_volumes_not_slices() -> None:
    slices_per_volume = 7
    # Column 0 tags the volume, so each call tells us which rows came together.
    groups = [np.column_stack([np.full(slices_per_volume, v), np.random.default_rng(v).normal(size=(7, 2))])
              for v in range(6)]
    seen: list[np.ndarray] = []

    def metric(real: np.ndarray, gen: np.ndarray) -> float:
        seen.append(gen[:, 0])
        return float(gen[:, 1].mean())

    interval = bootstrap_volumes(metric, groups, groups, replicates=50, seed=1)
    assert len(seen) == 51 and interval.replicates == 50
    for tags in seen:
        _, counts = np.unique(tags, return_counts=True)
        assert np.all(counts % slices_per_volume == 0)  # whole volumes, never single slices
        assert len(tags) == 6 * slices_per_volume
    assert any(len(np.unique(tags)) < 6 for tags in seen[1:])  # with replacement
    assert interval.low <= interval.value <= interval.high


def test_split_halves_are_disjoint_and_seeded() -> None:
    a, b = split_halves(11, seed=4)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert np.array_equal(split_halves(11, seed=4)[0], a)
