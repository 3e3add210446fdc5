"""Intensity quality check: is the median intensity inside each organ plausible?

Pure functions, shared by ``medsynth evaluate`` and by generation (which regenerates failing
samples). The protocol (docs/EVALUATION.md section 3): a class's median intensity in a
generated image must fall within the range seen in training, namely mean +/- 3 sd of the
training medians, widened to include the 0.5-99.5 percentiles of those medians.
:data:`MAISI_CT_RANGES` are MAISI's published CT ranges (HU) for reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medsynth.errors import ConfigError, InputError

MAISI_CT_RANGES: dict[str, tuple[float, float]] = {
    "liver": (-21.6, 162.0), "spleen": (-43.1, 184.1), "pancreas": (-56.6, 149.5),
    "kidney": (-130.6, 267.3), "lung": (-1088.6, -367.0), "bone": (71.4, 1000.0),
}
"""MAISI's CT intensity ranges in HU (for comparison; medsynth fits its own from training data)."""

MIN_TRAINING_CASES = 2


def class_medians(image: np.ndarray, label: np.ndarray, labels: Mapping[str, int]) -> dict[str, float]:
    """Median intensity of each non-background class present in ``label``.

    Args:
        image: ``(X, Y, Z)`` intensities (HU for CT).
        label: ``(X, Y, Z)`` integer label map on the same grid.
        labels: name -> value; ``background`` (0) is skipped.
    """
    if image.shape != label.shape:
        raise InputError(f"image {image.shape} and label {label.shape} must share a grid")
    out = {}
    for name, value in labels.items():
        if value == 0:
            continue
        inside = label == value
        if inside.any():
            out[name] = float(np.median(image[inside]))
    return out


@dataclass(frozen=True)
class IntensityRange:
    """Accepted median range of one class and how it was fit."""

    low: float
    high: float
    mean: float
    sd: float
    n_cases: int


def fit_intensity_ranges(medians: Iterable[Mapping[str, float]], n_sd: float = 3.0,
                         percentiles: tuple[float, float] = (0.5, 99.5)) -> dict[str, IntensityRange]:
    """Fit per-class accepted ranges from training cases' :func:`class_medians`.

    Classes seen in fewer than :data:`MIN_TRAINING_CASES` cases get no range (never checked).
    """
    if n_sd <= 0:
        raise ConfigError(f"n_sd must be > 0, got {n_sd}")
    per_class: dict[str, list[float]] = {}
    for case in medians:
        for name, value in case.items():
            per_class.setdefault(name, []).append(float(value))
    ranges = {}
    for name, values in per_class.items():
        if len(values) < MIN_TRAINING_CASES:
            continue
        arr = np.asarray(values)
        mean, sd = float(arr.mean()), float(arr.std(ddof=1))
        p_low, p_high = np.percentile(arr, percentiles)
        ranges[name] = IntensityRange(low=float(min(mean - n_sd * sd, p_low)),
                                      high=float(max(mean + n_sd * sd, p_high)),
                                      mean=mean, sd=sd, n_cases=len(values))
    return ranges


@dataclass
class QualityResult:
    """Outcome of :func:`check_intensities` for one volume.

    Attributes:
        passed: every checked class is inside its range.
        failing: names of classes outside their range.
        classes: per class ``{"median", "low", "high", "ok"}``.
        unchecked: classes present but without a fitted range.
    """

    passed: bool
    failing: list[str]
    classes: dict[str, dict[str, Any]]
    unchecked: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_medians(medians: Mapping[str, float], ranges: Mapping[str, IntensityRange]) -> QualityResult:
    """Check precomputed :func:`class_medians` of one volume against fitted ranges."""
    classes, failing, unchecked = {}, [], []
    for name, median in medians.items():
        if name not in ranges:
            unchecked.append(name)
            continue
        r = ranges[name]
        ok = bool(r.low <= median <= r.high)
        classes[name] = {"median": float(median), "low": r.low, "high": r.high, "ok": ok}
        if not ok:
            failing.append(name)
    return QualityResult(passed=not failing, failing=failing, classes=classes, unchecked=unchecked)


def check_intensities(image: np.ndarray, label: np.ndarray, labels: Mapping[str, int],
                      ranges: Mapping[str, IntensityRange]) -> QualityResult:
    """Check one ``(X, Y, Z)`` image against fitted ranges using its label map."""
    return check_medians(class_medians(image, label, labels), ranges)
