"""Mask fidelity: does a generated image obey its conditioning label map?

A segmenter (anything with ``predict(image) -> label``) segments each generated image, and the
prediction is compared with the conditioning mask per class with MONAI's Dice, HD95 and
surface Dice (NSD). The same segmenter on real images gives the ceiling. Until medsynth's
trained segmenter lands, :class:`ThresholdSegmenter` is the baseline: a per-class intensity
interval fit on real training cases. It is crude (organs of similar intensity are confused),
so its scores are a floor on what the check can detect, comparable only with its own ceiling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

from medsynth.errors import ConfigError

NSD_TOLERANCE_MM = 2.0


class Segmenter(Protocol):
    """Anything that turns an ``(X, Y, Z)`` image into an integer ``(X, Y, Z)`` label map."""

    name: str

    def predict(self, image: np.ndarray) -> np.ndarray: ...


@dataclass
class ThresholdSegmenter:
    """Baseline: each class is the voxels inside its intensity interval from training data.

    ``fit`` takes, per class, the ``(low_pct, high_pct)`` percentiles of the class's voxels over
    all training cases. ``predict`` paints classes from the largest (by training volume) to the
    smallest, so small structures inside large ones survive; the rest is background.
    """

    percentiles: tuple[float, float] = (5.0, 95.0)
    intervals: dict[int, tuple[float, float]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    name: str = "intensity-threshold baseline (per-class 5-95th percentile of real training voxels)"

    def fit(self, cases: Iterable[tuple[np.ndarray, np.ndarray]], labels: Mapping[str, int],
            max_voxels_per_case: int = 50000, seed: int = 0) -> "ThresholdSegmenter":
        rng = np.random.default_rng(seed)
        values: dict[int, list[np.ndarray]] = {}
        counts: dict[int, int] = {}
        for image, label in cases:
            for value in labels.values():
                if value == 0:
                    continue
                voxels = image[label == value]
                if voxels.size:
                    counts[value] = counts.get(value, 0) + voxels.size
                    if voxels.size > max_voxels_per_case:
                        voxels = rng.choice(voxels, max_voxels_per_case, replace=False)
                    values.setdefault(value, []).append(voxels)
        if not values:
            raise ConfigError("the threshold baseline needs real training cases with labelled voxels")
        self.intervals = {v: tuple(float(p) for p in np.percentile(np.concatenate(vs), self.percentiles))
                          for v, vs in values.items()}  # type: ignore[misc]
        self.order = sorted(self.intervals, key=lambda v: -counts[v])
        return self

    def predict(self, image: np.ndarray) -> np.ndarray:
        out = np.zeros(image.shape, np.int16)
        for value in self.order:
            low, high = self.intervals[value]
            out[(image >= low) & (image <= high)] = value
        return out


def _one_hot(label: np.ndarray, values: Sequence[int]) -> torch.Tensor:
    """``(X, Y, Z)`` -> ``(1, 1 + len(values), X, Y, Z)`` float one-hot, channel 0 = everything else."""
    channels = [np.isin(label, values, invert=True)] + [label == v for v in values]
    return torch.from_numpy(np.stack(channels)[None].astype(np.float32))


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def mask_agreement(prediction: np.ndarray, target: np.ndarray, labels: Mapping[str, int],
                   spacing: Sequence[float], nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> dict[str, dict[str, Any]]:
    """Per-class Dice, HD95 (mm) and NSD between two ``(X, Y, Z)`` label maps (MONAI metrics).

    Classes absent from the target are skipped; HD95 / NSD are None where undefined (empty
    prediction).
    """
    values = [v for v in labels.values() if v != 0]
    names = {v: n for n, v in labels.items()}
    pred, ref = _one_hot(prediction, values), _one_hot(target, values)
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty classes; we report None instead
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, ref)[0]
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            pred, ref, spacing=spacing)[0]
        nsd = SurfaceDiceMetric([nsd_tolerance_mm] * len(values), include_background=False, reduction="none")(
            pred, ref, spacing=spacing)[0]
    out = {}
    for i, value in enumerate(values):
        if not (target == value).any():
            continue
        out[names[value]] = {"dice": _finite(float(dice[i])), "hd95_mm": _finite(float(hd95[i])),
                             "nsd": _finite(float(nsd[i]))}
    return out


def summarise_agreement(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean (over cases where defined) of each metric per class, with the number of cases."""
    classes: dict[str, dict[str, list[float]]] = {}
    for scores in per_case.values():
        for name, metrics in scores.items():
            for metric, value in metrics.items():
                if value is not None:
                    classes.setdefault(name, {}).setdefault(metric, []).append(value)
    return {name: {**{m: float(np.mean(v)) for m, v in ms.items()},
                   "n_cases": max(len(v) for v in ms.values())} for name, ms in classes.items()}
