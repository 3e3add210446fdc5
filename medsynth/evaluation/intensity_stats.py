"""Intensity statistics per label class: how real and synthetic voxel distributions differ.

Voxels of each class are pooled over volumes (a fixed-size random sample per volume, so one
large volume does not dominate) and compared with the 1-Wasserstein distance (in intensity
units, e.g. HU), the two-sample Kolmogorov-Smirnov statistic and the Jensen-Shannon distance of
shared-bin histograms (scipy.stats / scipy.spatial).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance

HIST_BINS = 64
VOXELS_PER_VOLUME = 20000


def sample_class_voxels(image: np.ndarray, label: np.ndarray, labels: Mapping[str, int],
                        rng: np.random.Generator, per_volume: int = VOXELS_PER_VOLUME) -> dict[str, np.ndarray]:
    """Up to ``per_volume`` random voxel intensities of each class (incl. background) of one volume."""
    out = {}
    for name, value in labels.items():
        voxels = image[label == value]
        if voxels.size > per_volume:
            voxels = rng.choice(voxels, per_volume, replace=False)
        if voxels.size:
            out[name] = voxels.astype(np.float64)
    return out


def compare_distributions(real: np.ndarray, synthetic: np.ndarray, bins: int = HIST_BINS) -> dict[str, Any]:
    """Distances between two 1D samples plus the shared-bin histograms (for figures)."""
    low = float(min(real.min(), synthetic.min()))
    high = float(max(real.max(), synthetic.max()))
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    h_real = np.histogram(real, edges)[0].astype(np.float64)
    h_syn = np.histogram(synthetic, edges)[0].astype(np.float64)
    return {
        "wasserstein": float(wasserstein_distance(real, synthetic)),
        "ks_statistic": float(ks_2samp(real, synthetic).statistic),
        "js_distance": float(jensenshannon(h_real / h_real.sum(), h_syn / h_syn.sum(), base=2)),
        "real_mean": float(real.mean()), "real_sd": float(real.std()),
        "synthetic_mean": float(synthetic.mean()), "synthetic_sd": float(synthetic.std()),
        "real_voxels": int(real.size), "synthetic_voxels": int(synthetic.size),
        "histogram": {"edges": edges.tolist(), "real": (h_real / h_real.sum()).tolist(),
                      "synthetic": (h_syn / h_syn.sum()).tolist()},
    }


def class_statistics(real: Mapping[str, list[np.ndarray]], synthetic: Mapping[str, list[np.ndarray]]) -> dict[str, Any]:
    """Per class present in both sets: :func:`compare_distributions` of the pooled samples."""
    out = {}
    for name in real:
        if name in synthetic and real[name] and synthetic[name]:
            out[name] = compare_distributions(np.concatenate(real[name]), np.concatenate(synthetic[name]))
    return out
