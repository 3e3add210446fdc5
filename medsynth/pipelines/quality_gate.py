"""Quality gate: check each mask-conditioned sample, regenerate failures with new seeds.

Two checks per generated image and its conditioning mask:

* **intensity**: the median intensity inside each labelled class must lie within the range
  seen in training (:func:`medsynth.evaluation.quality.check_intensities`; ranges fit on the
  training split at ``medsynth assemble`` time and stored in the pipeline's ``quality.json``);
* **agreement**: a segmenter segments the image and its per-class Dice against the mask must
  reach ``min_dice`` for every *large* class (covering at least ``large_fraction`` of the
  grid; small classes such as lesions are scored and recorded but never fail a sample, since
  a Dice of a few voxels says little). ``medsynth assemble`` trains a MONAI SegResNet on the same split (``--segmenter-steps``, default
  200) and the gate uses it; with ``--segmenter-steps 0`` it uses the intensity-threshold
  baseline :class:`~medsynth.evaluation.mask_fidelity.ThresholdSegmenter` fit on that split.
  The segmenter is scored on real cases at assemble time (:func:`calibration_record`: the val
  split, or the training split when there is none); a large class it cannot find on real images
  (mean Dice below ``min_dice``) is not gated, since every generated image would fail on it, and
  is listed as ``ungated`` instead.

A failing sample is regenerated with :func:`derived_seed` ``(seed, attempt)`` up to
``max_retries`` times; the caller keeps or skips a sample that never passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medsynth.errors import ConfigError, InputError
from medsynth.evaluation.mask_fidelity import Segmenter, ThresholdSegmenter
from medsynth.evaluation.quality import IntensityRange, check_intensities, class_medians, fit_intensity_ranges
from medsynth.io.volume import Volume

QUALITY_FORMAT = "medsynth.quality"
DEFAULT_MIN_DICE = 0.5
DEFAULT_LARGE_FRACTION = 0.01
MAX_SEED = 2 ** 63 - 1


def derived_seed(seed: int, attempt: int) -> int:
    """Seed of retry ``attempt`` (0 = ``seed`` itself); independent of other cases' seeds."""
    if attempt == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(attempt)], spawn_key=(7,)).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & MAX_SEED)


# ---------------------------------------------------------------------------------------------
# Fitting (at assemble time)
# ---------------------------------------------------------------------------------------------


def fit_quality_record(cases: Sequence[tuple[np.ndarray, np.ndarray]], labels: Mapping[str, int],
                       intensity_unit: str, splits: Sequence[str] = ("train",)) -> dict[str, Any]:
    """The ``quality.json`` record from training ``(image, label)`` pairs in output units.

    Args:
        cases: ``(X, Y, Z)`` image in the pipeline's output units (HU or normalised) and its
            label map, per training case.
        labels: name -> value.
        intensity_unit: recorded for the reader.
        splits: the dataset splits the cases came from (for the record).

    Raises:
        InputError: no case with labelled voxels.
    """
    cases = list(cases)
    if not cases:
        raise InputError("no labelled training cases to fit the quality ranges on")
    ranges = fit_intensity_ranges(class_medians(image, label, labels) for image, label in cases)
    segmenter = ThresholdSegmenter().fit(cases, labels)
    return {"format": QUALITY_FORMAT, "version": 1, "splits": list(splits), "num_cases": len(cases),
            "intensity_unit": intensity_unit,
            "intensity_ranges": {name: asdict(r) for name, r in ranges.items()},
            "segmenter": {"kind": "threshold", "percentiles": list(segmenter.percentiles),
                          "intervals": {str(v): list(iv) for v, iv in segmenter.intervals.items()},
                          "order": list(segmenter.order)}}


def calibration_record(segmenter: Segmenter, cases: Sequence[tuple[np.ndarray, np.ndarray]],
                       labels: Mapping[str, int], splits: Sequence[str]) -> dict[str, Any]:
    """How well the agreement segmenter finds each class on real images: ``{"splits",
    "num_cases", "dice": {class: mean Dice over the cases that have it}}``.

    Args:
        segmenter: the gate's segmenter (``predict(image) -> label``).
        cases: ``(X, Y, Z)`` real image in output units and its label map.
        labels: name -> value.
        splits: where the cases came from (for the record; the val split when it has cases, so
            that a trained segmenter is not scored on what it learnt).
    """
    per_class: dict[str, list[float]] = {}
    cases = list(cases)
    for image, label in cases:
        for name, value in dice_per_class(np.asarray(segmenter.predict(image)), np.asarray(label), labels).items():
            per_class.setdefault(name, []).append(value)
    return {"splits": list(splits), "num_cases": len(cases),
            "dice": {name: round(float(np.mean(values)), 4) for name, values in per_class.items()}}


def segmenter_from_record(record: Mapping[str, Any]) -> Segmenter:
    """The segmenter stored in a ``quality.json`` record: the trained SegResNet (kind
    ``segresnet``, its ``path`` resolved by the pipeline loader) or the threshold baseline."""
    seg = dict(record.get("segmenter") or {})
    if seg.get("kind") == "segresnet":
        from pathlib import Path

        from medsynth.training.segmentation import load_agreement_segmenter

        if not seg.get("path") or not Path(seg["path"]).is_absolute():
            raise InputError(f"the quality record's segmenter path {seg.get('path')!r} is not resolved; load the "
                             f"pipeline with MedSynthPipeline.from_pretrained")
        return load_agreement_segmenter(seg["path"])
    if seg.get("kind") != "threshold":
        raise InputError(f"unknown segmenter kind {seg.get('kind')!r} in quality.json; re-run `medsynth assemble`")
    return ThresholdSegmenter(percentiles=tuple(seg.get("percentiles", (5.0, 95.0))),  # type: ignore[arg-type]
                              intervals={int(v): (float(iv[0]), float(iv[1])) for v, iv in seg["intervals"].items()},
                              order=[int(v) for v in seg["order"]])


# ---------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------


@dataclass
class GateResult:
    """Outcome for one sample.

    Attributes:
        passed: both checks passed.
        failing: ``"intensity:CLASS"`` / ``"dice:CLASS"`` entries that failed.
        intensity: per class ``{"median", "low", "high", "ok"}``.
        dice: per class present in the mask, Dice of the segmentation vs the mask.
        gated: the classes whose Dice can fail the sample (large classes the segmenter finds on
            real images).
        ungated: large classes left out because the segmenter's mean Dice on real images is
            below ``min_dice`` (see :func:`calibration_record`).
    """

    passed: bool
    failing: list[str] = field(default_factory=list)
    intensity: dict[str, Any] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)
    gated: list[str] = field(default_factory=list)
    ungated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dice_per_class(prediction: np.ndarray, target: np.ndarray, labels: Mapping[str, int]) -> dict[str, float]:
    """Dice of each non-background class present in ``target`` (two ``(X, Y, Z)`` label maps)."""
    out = {}
    for name, value in labels.items():
        if value == 0:
            continue
        ref = target == value
        n_ref = int(ref.sum())
        if n_ref == 0:
            continue
        pred = prediction == value
        out[name] = round(2.0 * float(np.logical_and(pred, ref).sum()) / (n_ref + int(pred.sum())), 4)
    return out


class QualityGate:
    """Intensity + agreement check of one generated image against its conditioning mask.

    Args:
        labels: name -> value of the mask.
        ranges: per-class accepted median ranges (empty: no intensity check).
        segmenter: anything with ``predict(image) -> label`` (None: no agreement check).
        min_dice: least Dice for each large class.
        large_fraction: a class is "large" (Dice-gated) when it covers at least this fraction
            of the mask's voxels.
        calibration: the segmenter's mean Dice per class on real images
            (:func:`calibration_record`); a large class below ``min_dice`` there is not gated.
            None: every large class is gated (pipelines assembled before calibration existed).
    """

    def __init__(self, labels: Mapping[str, int], ranges: Mapping[str, IntensityRange] | None = None,
                 segmenter: Segmenter | None = None, min_dice: float = DEFAULT_MIN_DICE,
                 large_fraction: float = DEFAULT_LARGE_FRACTION,
                 calibration: Mapping[str, float] | None = None) -> None:
        if not 0.0 <= min_dice <= 1.0:
            raise ConfigError(f"--min-dice must lie in [0, 1], got {min_dice}")
        self.labels = dict(labels)
        self.ranges = dict(ranges or {})
        self.segmenter = segmenter
        self.min_dice = float(min_dice)
        self.large_fraction = float(large_fraction)
        self.calibration = None if calibration is None else {k: float(v) for k, v in calibration.items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], labels: Mapping[str, int], **options: Any) -> "QualityGate":
        """A gate from a pipeline's ``quality.json`` record (see :func:`fit_quality_record`)."""
        ranges = {name: IntensityRange(**r) for name, r in dict(record.get("intensity_ranges") or {}).items()}
        calibration = (record.get("calibration") or {}).get("dice")
        return cls(labels, ranges, segmenter_from_record(record), calibration=calibration, **options)

    def trusted(self, name: str) -> bool:
        """Whether the segmenter finds class ``name`` on real images well enough to gate on it."""
        return self.calibration is None or self.calibration.get(name, 0.0) >= self.min_dice

    def ungated_classes(self) -> list[str]:
        """Calibrated classes the agreement check leaves out (real-image Dice below ``min_dice``)."""
        return sorted(n for n in (self.calibration or {}) if not self.trusted(n))

    def warn_ungated(self, log: Any) -> list[str]:
        """Log (warning) and return :meth:`ungated_classes`, for the start of a run."""
        ungated = self.ungated_classes()
        if ungated and self.segmenter is not None:
            log.warning("the quality gate's segmenter finds %s on real images at Dice below %.2f; the agreement "
                        "check leaves them out (assemble with more --segmenter-steps to check them)",
                        ", ".join(ungated), self.min_dice)
        return ungated

    def __call__(self, image: Volume, label: Volume) -> GateResult:
        """Check ``image`` (output units) against ``label`` on the same grid."""
        img, lab = np.asarray(image.array), np.asarray(label.array)
        result = GateResult(passed=True)
        if self.ranges:
            quality = check_intensities(img, lab, self.labels, self.ranges)
            result.intensity = quality.classes
            result.failing += [f"intensity:{name}" for name in quality.failing]
        if self.segmenter is not None:
            result.dice = dice_per_class(np.asarray(self.segmenter.predict(img)), lab, self.labels)
            total = lab.size
            large = [n for n in result.dice if (lab == self.labels[n]).sum() >= self.large_fraction * total]
            result.gated = [n for n in large if self.trusted(n)]
            result.ungated = [n for n in large if not self.trusted(n)]
            result.failing += [f"dice:{n}" for n in result.gated if result.dice[n] < self.min_dice]
        result.passed = not result.failing
        return result


CheckFn = Callable[[Volume, Volume], GateResult]
"""``(image, label) -> GateResult``: a :class:`QualityGate` or a stand-in (tests)."""


def generate_checked(make: Callable[[int], Volume], label: Volume, seed: int, check: CheckFn | None,
                     max_retries: int) -> tuple[Volume, int, list[dict[str, Any]], bool]:
    """Generate with ``make(seed)`` until ``check`` passes or ``max_retries`` retries are spent.

    Returns:
        ``(image, seed used, attempts, passed)``: the first passing image, or the last attempt
        if none passed; ``attempts`` holds ``{"attempt", "seed", **GateResult}`` per try.
    """
    attempts: list[dict[str, Any]] = []
    image = make(seed)
    if check is None:
        return image, seed, attempts, True
    for attempt in range(max_retries + 1):
        current = derived_seed(seed, attempt)
        if attempt:
            image = make(current)
        result = check(image, label)
        attempts.append({"attempt": attempt, "seed": current, **result.to_dict()})
        if result.passed:
            return image, current, attempts, True
    return image, current, attempts, False


__all__ = ["QualityGate", "GateResult", "generate_checked", "derived_seed", "fit_quality_record", "calibration_record",
           "segmenter_from_record", "dice_per_class", "DEFAULT_MIN_DICE", "DEFAULT_LARGE_FRACTION"]
