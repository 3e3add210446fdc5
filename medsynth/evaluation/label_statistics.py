"""Statistics of label maps: per-class volumes and lesion counts, and how two sets compare.

The label generator is trained and judged on these: its export stores the training split's
per-class volume distributions and lesion counts (the reference for the ``volume:CLASS``
quantile attribute and for the lesion-count range), and ``scripts/bench_label_generator.py``
compares the maps it samples against them.

* volume: voxels of the class x voxel volume, in millilitres (spacing-independent, so maps at
  other spacings compare directly);
* lesion count: connected components (26-connectivity) of a lesion class, i.e. one whose name
  contains "lesion", "tumor", "tumour" or "metasta";
* lesion size: the volume (mL) of each such component, pooled over cases (a set of maps can hold
  the right number of lesions and still draw them too small);
* comparison per class: median of each set, relative difference of the medians, and the
  two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

LESION_WORDS: tuple[str, ...] = ("lesion", "tumor", "tumour", "metasta")
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def lesion_classes(labels: Mapping[str, int]) -> list[str]:
    """Names of the lesion classes of a label table (see module docstring)."""
    return [name for name in labels if any(w in name.lower() for w in LESION_WORDS)]


def case_statistics(array: np.ndarray, labels: Mapping[str, int], spacing: Sequence[float]) -> dict[str, Any]:
    """Volumes (mL) of every non-background class and component counts of lesion classes.

    Args:
        array: ``(X, Y, Z)`` integer label map.
        labels: name -> value (background 0 is skipped).
        spacing: voxel size in mm.

    Returns:
        ``{"volumes_ml": {name: float}, "lesion_counts": {name: int}, "lesion_sizes_ml": {name: [float]}}``
        (one size per component of each lesion class, largest first).
    """
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    counts = np.bincount(np.asarray(array).ravel().astype(np.int64), minlength=max(labels.values()) + 1)
    volumes = {name: float(counts[value]) * voxel_ml for name, value in labels.items() if value != 0}
    lesions, sizes = {}, {}
    for name in lesion_classes(labels):
        components, found = ndimage.label(np.asarray(array) == labels[name], structure=STRUCTURE_26)
        lesions[name] = int(found)
        voxels = np.bincount(components.ravel())[1:]
        sizes[name] = sorted((float(v) * voxel_ml for v in voxels), reverse=True)
    return {"volumes_ml": volumes, "lesion_counts": lesions, "lesion_sizes_ml": sizes}


def collect_statistics(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-case results of :func:`case_statistics` -> ``{"num_cases", "volumes_ml": {name: [...]},
    "lesion_counts": {name: [...]}, "lesion_sizes_ml": {name: [...]}}`` (volumes and counts: one
    entry per case, in case order; sizes: one per lesion, pooled over cases)."""
    out: dict[str, Any] = {"num_cases": len(cases), "volumes_ml": {}, "lesion_counts": {}, "lesion_sizes_ml": {}}
    for case in cases:
        for key in ("volumes_ml", "lesion_counts"):
            for name, value in case[key].items():
                out[key].setdefault(name, []).append(value)
        for name, sizes in case.get("lesion_sizes_ml", {}).items():
            out["lesion_sizes_ml"].setdefault(name, []).extend(sizes)
    return out


def volume_quantile(reference: Sequence[float], value: float) -> float:
    """Mid-rank empirical quantile of ``value`` among ``reference``, in ``[0, 1]``.

    Ties count half, so the median training case has quantile ~0.5 and a value seen in every
    case (e.g. an always-absent class at 0 mL) gets 0.5, not 0 or 1.
    """
    ref = np.asarray(reference, dtype=float)
    if ref.size == 0:
        return 0.5
    below = float(np.sum(ref < value))
    equal = float(np.sum(ref == value))
    return (below + 0.5 * equal) / ref.size


def compare_statistics(reference: Mapping[str, Any], generated: Mapping[str, Any]) -> dict[str, Any]:
    """Compare two :func:`collect_statistics` results, per class.

    Returns:
        ``{"volumes": {name: {"reference_median_ml", "generated_median_ml", "relative_median_difference",
        "ks_statistic", "ks_pvalue"}}, "lesion_counts": {name: {"reference_mean", "generated_mean",
        "reference_histogram", "generated_histogram"}}, "lesion_sizes": {name: {"reference_lesions",
        "generated_lesions", "reference_median_ml", "generated_median_ml", "size_ratio", "ks_statistic",
        "ks_pvalue"}}, "max_relative_median_difference", "max_ks_statistic"}`` (the maxima over
        classes present in the reference). ``lesion_sizes`` compares the pooled per-lesion volumes
        (``size_ratio``: generated / reference median) and is empty for statistics written before
        sizes were collected.
    """
    volumes: dict[str, Any] = {}
    for name, ref in reference["volumes_ml"].items():
        gen = generated["volumes_ml"].get(name, [])
        ref_a, gen_a = np.asarray(ref, dtype=float), np.asarray(gen, dtype=float)
        ref_med = float(np.median(ref_a)) if ref_a.size else 0.0
        gen_med = float(np.median(gen_a)) if gen_a.size else 0.0
        rel = abs(gen_med - ref_med) / ref_med if ref_med > 0 else (0.0 if gen_med == 0 else float("inf"))
        ks = stats.ks_2samp(ref_a, gen_a) if ref_a.size and gen_a.size else None
        volumes[name] = {"reference_median_ml": round(ref_med, 3), "generated_median_ml": round(gen_med, 3),
                         "relative_median_difference": round(rel, 4),
                         "ks_statistic": None if ks is None else round(float(ks.statistic), 4),
                         "ks_pvalue": None if ks is None else round(float(ks.pvalue), 4)}
    lesions: dict[str, Any] = {}
    for name, ref in reference.get("lesion_counts", {}).items():
        gen = generated.get("lesion_counts", {}).get(name, [])
        lesions[name] = {"reference_mean": round(float(np.mean(ref)), 3) if len(ref) else None,
                         "generated_mean": round(float(np.mean(gen)), 3) if len(gen) else None,
                         "reference_histogram": _histogram(ref), "generated_histogram": _histogram(gen)}
    sizes: dict[str, Any] = {}
    for name, ref in reference.get("lesion_sizes_ml", {}).items():
        ref_a = np.asarray(ref, dtype=float)
        gen_a = np.asarray(generated.get("lesion_sizes_ml", {}).get(name, []), dtype=float)
        ref_med = float(np.median(ref_a)) if ref_a.size else None
        gen_med = float(np.median(gen_a)) if gen_a.size else None
        ks = stats.ks_2samp(ref_a, gen_a) if ref_a.size and gen_a.size else None
        sizes[name] = {"reference_lesions": int(ref_a.size), "generated_lesions": int(gen_a.size),
                       "reference_median_ml": None if ref_med is None else round(ref_med, 3),
                       "generated_median_ml": None if gen_med is None else round(gen_med, 3),
                       "size_ratio": round(gen_med / ref_med, 3) if ref_med and gen_med is not None else None,
                       "ks_statistic": None if ks is None else round(float(ks.statistic), 4),
                       "ks_pvalue": None if ks is None else round(float(ks.pvalue), 4)}
    present = [v for n, v in volumes.items() if v["reference_median_ml"] > 0]
    return {"volumes": volumes, "lesion_counts": lesions, "lesion_sizes": sizes,
            "max_relative_median_difference": max((v["relative_median_difference"] for v in present), default=0.0),
            "max_ks_statistic": max((v["ks_statistic"] or 0.0 for v in present), default=0.0)}


def _histogram(counts: Sequence[int]) -> dict[str, int]:
    values, freq = np.unique(np.asarray(counts, dtype=int), return_counts=True)
    return {str(int(v)): int(f) for v, f in zip(values, freq)}


__all__ = ["lesion_classes", "case_statistics", "collect_statistics", "volume_quantile", "compare_statistics",
           "LESION_WORDS"]
