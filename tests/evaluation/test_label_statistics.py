"""Label statistics: per-lesion sizes beside volumes and counts, and their comparison."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsynth.evaluation.label_statistics import case_statistics, collect_statistics, compare_statistics

LABELS = {"background": 0, "liver": 1, "liver_lesion": 2}


def _map(lesion_voxels: list[int]) -> np.ndarray:
    """A liver holding one cube-ish lesion of each asked voxel count, apart from each other."""
    label = np.zeros((24, 8, 8), np.uint8)
    label[:, 1:7, 1:7] = 1
    for i, n in enumerate(lesion_voxels):
        block = np.zeros(64, bool)
        block[:n] = True
        label[6 * i:6 * i + 4, 2:6, 2:6][block.reshape(4, 4, 4)] = 2  # the first n voxels of a 4^3 block
    return label


def test_lesion_sizes_are_component_volumes():
    spacing = (2.0, 1.0, 1.5)  # 3 mm^3 per voxel
    label = _map([5, 12, 1])
    stats = case_statistics(label, LABELS, spacing)
    # each size is a connected component's voxel count x voxel volume, largest first, and matches scipy
    components, found = ndimage.label(label == 2, structure=np.ones((3, 3, 3)))
    expected = sorted((np.bincount(components.ravel())[1:] * 3e-3).tolist(), reverse=True)
    assert stats["lesion_counts"]["liver_lesion"] == found == 3
    assert stats["lesion_sizes_ml"]["liver_lesion"] == pytest.approx(expected)
    assert expected == pytest.approx([0.036, 0.015, 0.003])
    assert sum(stats["lesion_sizes_ml"]["liver_lesion"]) == pytest.approx(stats["volumes_ml"]["liver_lesion"])


def test_sizes_pool_over_cases_and_compare():
    spacing = (1.0, 1.0, 1.0)
    reference = collect_statistics([case_statistics(_map(n), LABELS, spacing) for n in ([8, 8], [8], [])])
    assert reference["lesion_sizes_ml"]["liver_lesion"] == pytest.approx([0.008] * 3)  # pooled, one per lesion
    assert reference["lesion_counts"]["liver_lesion"] == [2, 1, 0]  # still one per case
    small = collect_statistics([case_statistics(_map(n), LABELS, spacing) for n in ([2, 2], [2])])
    row = compare_statistics(reference, small)["lesion_sizes"]["liver_lesion"]
    assert row["reference_lesions"] == 3 and row["generated_lesions"] == 3
    assert row["size_ratio"] == pytest.approx(0.25) and row["ks_statistic"] == pytest.approx(1.0)
    same = compare_statistics(reference, reference)["lesion_sizes"]["liver_lesion"]
    assert same["size_ratio"] == 1.0 and same["ks_statistic"] == 0.0
    # statistics written before sizes existed (label generator exports) compare without them
    old = {k: v for k, v in reference.items() if k != "lesion_sizes_ml"}
    assert compare_statistics(old, small)["lesion_sizes"] == {}
    none = compare_statistics(reference, collect_statistics([case_statistics(_map([]), LABELS, spacing)]))
    assert none["lesion_sizes"]["liver_lesion"]["generated_lesions"] == 0
    assert none["lesion_sizes"]["liver_lesion"]["size_ratio"] is None
