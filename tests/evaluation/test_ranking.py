"""The metrics rank a real-vs-real floor below severe degradations (a small copy of
scripts/bench_evaluation.py, docs/benchmarks/evaluation_ranking.md).

Twelve 20^3 CT phantoms are split into a reference half and a second half; each test degrades
the second half and checks that the metric the benchmark found sensitive to that degradation
scores the floor better than the degraded set, through the same functions ``medsynth
evaluate`` calls. A metric that stops seeing the degradation fails here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medsynth.data.phantoms import generate_phantoms, phantom_labels
from medsynth.evaluation.features import build_extractor
from medsynth.evaluation.fid import frechet_distance
from medsynth.evaluation.intensity_stats import class_statistics, sample_class_voxels
from medsynth.evaluation.mask_fidelity import ThresholdSegmenter, mask_agreement
from medsynth.evaluation.preprocessing import PLANES, Protocol, prepare_volume
from medsynth.evaluation.quality import check_medians, class_medians, fit_intensity_ranges
from medsynth.io.volume import Volume

SIZE, N = 20, 12
LABELS = phantom_labels("ct")
Pair = tuple[Volume, np.ndarray]


@pytest.fixture(scope="module")
def halves() -> tuple[list[Pair], list[Pair]]:
    cases = [(c.image, c.label.array) for c in generate_phantoms("ct", N, size=SIZE, seed=7, lesion_rate=0.3)]
    return cases[: N // 2], cases[N // 2:]


def degrade(pairs: Sequence[Pair], fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> list[Pair]:
    rng = np.random.default_rng(0)
    return [(image.with_array(fn(image.array.astype(np.float32), rng).astype(np.float32)), label)
            for image, label in pairs]


def fid_25d(reference: Sequence[Pair], other: Sequence[Pair]) -> float:
    """Mean over planes of the 2.5D FID on the default extractor, on the phantoms' own grid."""
    extractor = build_extractor("medsynth_random2d")
    protocol = Protocol(spacing=tuple(reference[0][0].spacing), size=(SIZE,) * 3)

    def planes(pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
        feats = [extractor.extract(prepare_volume(image, "CT", protocol), protocol) for image, _ in pairs]
        return {p: np.concatenate([f[p] for f in feats]) for p in PLANES}

    ref, oth = planes(reference), planes(other)
    return float(np.mean([frechet_distance(ref[p], oth[p]) for p in PLANES]))


def wasserstein(reference: Sequence[Pair], other: Sequence[Pair]) -> float:
    """Mean per-class (background excluded) Wasserstein-1 in HU of pooled voxel samples."""
    def pooled(pairs: Sequence[Pair]) -> dict[str, list[np.ndarray]]:
        rng, out = np.random.default_rng(0), {}
        for image, label in pairs:
            for name, values in sample_class_voxels(image.array, label, LABELS, rng).items():
                out.setdefault(name, []).append(values)
        return out

    stats = class_statistics(pooled(reference), pooled(other))
    return float(np.mean([s["wasserstein"] for name, s in stats.items() if name != "background"]))


def test_blur_raises_the_25d_fid_above_the_floor(halves: tuple[list[Pair], list[Pair]]) -> None:
    reference, second = halves
    floor = fid_25d(reference, second)
    mild = fid_25d(reference, degrade(second, lambda a, _: gaussian_filter(a, 1.0, mode="nearest")))
    severe = fid_25d(reference, degrade(second, lambda a, _: gaussian_filter(a, 2.0, mode="nearest")))
    assert floor < mild < severe
    assert severe > 3 * floor  # the benchmark: 0.029 -> 0.53 at 32^3


def test_intensity_statistics_rank_noise_and_shift(halves: tuple[list[Pair], list[Pair]]) -> None:
    reference, second = halves
    floor = wasserstein(reference, second)
    noisy = wasserstein(reference, degrade(second, lambda a, rng: a + rng.normal(0.0, 150.0, a.shape)))
    shifted = wasserstein(reference, degrade(second, lambda a, _: a + 300.0))
    assert noisy > 3 * floor and shifted > 3 * floor
    assert shifted == pytest.approx(300.0, rel=0.2)  # a global shift moves every class by ~300 HU


def test_intensity_check_fails_a_shift_and_passes_the_floor(halves: tuple[list[Pair], list[Pair]]) -> None:
    reference, second = halves
    ranges = fit_intensity_ranges(class_medians(image.array, label, LABELS) for image, label in reference)

    def pass_rate(pairs: Sequence[Pair]) -> float:
        return float(np.mean([check_medians(class_medians(image.array, label, LABELS), ranges).passed
                              for image, label in pairs]))

    assert pass_rate(second) >= 0.5
    assert pass_rate(degrade(second, lambda a, _: a + 300.0)) == 0.0


def test_mask_fidelity_drops_when_labels_are_shuffled(halves: tuple[list[Pair], list[Pair]]) -> None:
    reference, second = halves
    segmenter = ThresholdSegmenter().fit([(image.array, label) for image, label in reference], LABELS)

    def dice(pairs: Sequence[Pair]) -> float:
        scores = [s["dice"] for image, label in pairs
                  for name, s in mask_agreement(segmenter.predict(image.array), label, LABELS, image.spacing).items()
                  if s["dice"] is not None]
        return float(np.mean(scores))

    labels = [label for _, label in second]
    shuffled = [(image, labels[(i + 1) % len(labels)]) for i, (image, _) in enumerate(second)]
    own, swapped = dice(second), dice(shuffled)
    assert swapped < own - 0.02  # the benchmark: 0.18 -> 0.12 at 32^3 with the threshold baseline
