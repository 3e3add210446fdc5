"""Downstream segmentation benchmark (docs/EVALUATION.md section 4): is synthetic data worth it?

Protocol (docs/segmentation_benchmark.md has the full text):

* Data: the real dataset's fixed ``splits.json``. Segmenters train on the real ``train`` split
  (``val`` is not used: no checkpoint selection, the step budget is the stopping rule) and on
  synthetic cases; every score is computed on the real ``test`` split only. Training and test ids
  are checked to be disjoint, and a synthetic folder whose recorded mask source is a real test
  case is refused.
* Conditions: ``real`` (TRTR), ``real+synthetic@r`` for each ratio ``r`` (``round(r * |train|)``
  synthetic cases, a nested subset of one fixed shuffle, capped with a warning), ``synthetic``
  (TSTR, every synthetic case). Same network, same number of steps, each seed.
* Metrics per test case and class: Dice, HD95 (mm), NSD (2 mm) from
  :func:`medsynth.evaluation.mask_fidelity.mask_agreement` (MONAI metrics), and lesion-wise
  sensitivity for lesion classes (a ground-truth connected component counts as detected when
  the prediction has any voxel of that class inside it, or with ``criterion="dice"`` when its
  Dice with the touching predicted components exceeds 0.1).
* Statistics: per-case values are averaged over seeds; means get percentile bootstrap 95 %
  intervals over test cases; every condition is compared with ``real`` by paired per-case Dice
  differences (absolute gain with bootstrap interval, relative gain, two-sided Wilcoxon
  signed-rank, skipped with a reason below :data:`MIN_WILCOXON_CASES` cases or when all
  differences are zero). p-values are not corrected for multiple comparisons.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

from medsynth.data.manifest import Case, Dataset
from medsynth.data.transforms import IntensityMapping
from medsynth.errors import ConfigError, InputError
from medsynth.evaluation.mask_fidelity import mask_agreement
from medsynth.evaluation.stats import Interval, bootstrap_indices
from medsynth.training.segmentation import SegCase

log = logging.getLogger(__name__)

MIN_WILCOXON_CASES = 6
"""Below this many paired cases the signed-rank test cannot reach p < 0.05 (two-sided)."""
LESION_WORDS: tuple[str, ...] = ("lesion", "tumour", "tumor", "metasta", "nodule", "cyst")
MEAN_CLASS = "mean_foreground"
"""Pseudo-class: per case, the mean Dice over the foreground classes present in its ground truth."""
DETECTION_CRITERIA: tuple[str, ...] = ("any", "dice")


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def lesion_classes(labels: Mapping[str, int]) -> list[str]:
    """Label names that denote lesions / tumours (by name: lesion, tumour, tumor, metastasis, ...)."""
    return [name for name in labels if name != "background" and any(w in name.lower() for w in LESION_WORDS)]


def lesion_sensitivity(prediction: np.ndarray, target: np.ndarray, value: int, criterion: str = "any",
                       min_dice: float = 0.1) -> dict[str, Any]:
    """Lesion-wise detection of one class: ground-truth connected components found by the prediction.

    Args:
        prediction, target: ``(X, Y, Z)`` integer label maps.
        value: the lesion class value.
        criterion: "any" (a component is detected when at least one predicted voxel of the class
            lies inside it) or "dice" (its Dice with the union of the predicted components of
            the class that touch it is > ``min_dice``).
        min_dice: threshold for ``criterion="dice"``.

    Returns:
        ``{"detected", "total", "sensitivity"}``; sensitivity is None when the target has no
        component. Components use 26-connectivity (face, edge and corner neighbours).
    """
    if criterion not in DETECTION_CRITERIA:
        raise ConfigError(f"lesion detection criterion must be one of {list(DETECTION_CRITERIA)}, got {criterion!r}")
    structure = np.ones((3, 3, 3), bool)
    truth, total = ndimage.label(target == value, structure=structure)
    pred_mask = prediction == value
    pred_components = ndimage.label(pred_mask, structure=structure)[0] if criterion == "dice" else None
    detected = 0
    for index in range(1, total + 1):
        component = truth == index
        if criterion == "any":
            detected += bool((pred_mask & component).any())
            continue
        touching = np.setdiff1d(np.unique(pred_components[component]), [0])
        matched = np.isin(pred_components, touching)
        dice = 2.0 * (matched & component).sum() / max(1, matched.sum() + component.sum())
        detected += bool(dice > min_dice)
    return {"detected": int(detected), "total": int(total), "sensitivity": detected / total if total else None}


def case_metrics(prediction: np.ndarray, target: np.ndarray, labels: Mapping[str, int],
                 spacing: Sequence[float], lesions: Sequence[str] = (), criterion: str = "any") -> dict[str, dict[str, Any]]:
    """Per-class Dice / HD95 / NSD (and lesion detection for ``lesions``) of one test case.

    Args:
        prediction, target: ``(X, Y, Z)`` integer label maps on the ``labels`` table.
        labels: name -> value, background 0.
        spacing: voxel size in mm.
        lesions: class names that also get lesion-wise sensitivity.
        criterion: lesion detection criterion, see :func:`lesion_sensitivity`.

    Returns:
        ``{class: {"dice", "hd95_mm", "nsd", ...}}`` for the classes present in ``target``, plus
        :data:`MEAN_CLASS` with the mean Dice over them.
    """
    out = mask_agreement(prediction, target, labels, spacing)
    for name in lesions:
        if name in out:
            found = lesion_sensitivity(prediction, target, labels[name], criterion)
            out[name].update(lesions_detected=found["detected"], lesions_total=found["total"],
                             lesion_sensitivity=found["sensitivity"])
    dices = [m["dice"] for m in out.values() if m.get("dice") is not None]
    if dices:
        out[MEAN_CLASS] = {"dice": float(np.mean(dices))}
    return out


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def bootstrap_mean(values: Sequence[float], replicates: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of per-case values with a percentile bootstrap interval over cases."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Interval(value=float("nan"), low=float("nan"), high=float("nan"), level=level, replicates=0)
    return bootstrap_indices(lambda idx, _: float(data[idx].mean()), data.size, 1,
                             replicates=replicates, level=level, seed=seed)


def paired_comparison(base: Mapping[str, float], other: Mapping[str, float], replicates: int = 1000,
                      level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """``other`` vs ``base`` on the cases both define: gains, bootstrap interval and Wilcoxon test.

    Args:
        base, other: case id -> per-case value (e.g. Dice averaged over seeds).

    Returns:
        ``{"n_cases", "base_mean", "abs_gain": {value, ci_low, ci_high, ...}, "rel_gain",
        "wilcoxon": {"statistic", "p_value"} or {"skipped": reason}}``.
    """
    ids = sorted(set(base) & set(other))
    a = np.array([base[i] for i in ids], dtype=np.float64)
    b = np.array([other[i] for i in ids], dtype=np.float64)
    out: dict[str, Any] = {"n_cases": len(ids)}
    if not ids:
        out.update(abs_gain=None, rel_gain=None, wilcoxon={"skipped": "no paired cases"})
        return out
    gain = bootstrap_mean(b - a, replicates, level, seed)
    base_mean = float(a.mean())
    out.update(base_mean=base_mean, other_mean=float(b.mean()), abs_gain=gain.to_dict() | {"bootstrap_unit": "case"},
               rel_gain=gain.value / base_mean if base_mean > 0 else None)
    if len(ids) < MIN_WILCOXON_CASES:
        out["wilcoxon"] = {"skipped": f"{len(ids)} paired cases < {MIN_WILCOXON_CASES}"}
    elif np.all(b - a == 0):
        out["wilcoxon"] = {"skipped": "all paired differences are zero"}
    else:
        result = stats.wilcoxon(b, a, alternative="two-sided")
        out["wilcoxon"] = {"statistic": float(result.statistic), "p_value": float(result.pvalue),
                           "alternative": "two-sided"}
    return out


def synthetic_counts(n_real_train: int, n_synthetic: int, ratios: Sequence[float]) -> tuple[list[tuple[float, int]], list[str]]:
    """Synthetic cases per mixing ratio: ``round(ratio * n_real_train)``, capped by what exists.

    Returns:
        ``[(ratio, count), ...]`` and warnings for every capped ratio.
    """
    counts, warnings = [], []
    for ratio in ratios:
        if not ratio > 0:
            raise ConfigError(f"--ratios must be > 0, got {ratio}")
        wanted = int(round(ratio * n_real_train))
        if wanted > n_synthetic:
            warnings.append(f"ratio {ratio:g} asks for {wanted} synthetic cases ({ratio:g} x {n_real_train} real "
                            f"training cases) but only {n_synthetic} exist; using {n_synthetic}")
        counts.append((float(ratio), min(wanted, n_synthetic)))
    return counts, warnings


# ---------------------------------------------------------------------------------------------
# Inputs: label tables, provenance, intensities
# ---------------------------------------------------------------------------------------------


def label_value_map(real: Dataset, synthetic: Dataset) -> dict[int, int]:
    """Synthetic label value -> real label value, matched by name.

    Raises:
        InputError: a synthetic label name the real table does not have, or no shared foreground.
    """
    unknown = sorted(set(synthetic.labels) - set(real.labels))
    if unknown:
        raise InputError(f"synthetic label names {unknown} are not in the real label table "
                         f"{sorted(real.labels)}; labels are matched by name", synthetic.root)
    if not set(synthetic.labels) - {"background"}:
        raise InputError("synthetic dataset has no foreground labels", synthetic.root)
    return {value: real.labels[name] for name, value in synthetic.labels.items()}


def check_synthetic(real: Dataset, synthetic: Dataset) -> list[Case]:
    """The labelled synthetic cases, after refusing folders the benchmark cannot use honestly.

    Raises:
        InputError: placeholder labels (``medsynth generate`` without masks), no labelled cases,
            the real folder itself, or a synthetic mask recorded as derived from a real test case.
    """
    if str(synthetic.medsynth.get("labels", "")).lower() in ("none", "placeholder"):
        raise InputError("synthetic dataset has placeholder labels (dataset.json medsynth.labels = "
                         "'none'); the benchmark needs paired label maps, e.g. from mask-conditioned "
                         "generation", synthetic.root)
    if synthetic.root.resolve() == real.root.resolve():
        raise InputError("--synthetic is the --real folder; pass a synthetic dataset", synthetic.root)
    cases = [c for c in synthetic.cases if c.label is not None]
    if not cases:
        raise InputError("synthetic dataset has no labelled cases (labelsTr/ is empty)", synthetic.root)
    test_ids = set(real.splits.get("test", []))
    for case_id, source in mask_sources(synthetic).items():
        if source in test_ids:
            raise InputError(f"synthetic case {case_id!r} records real test case {source!r} as its mask source; "
                             f"the test split must never reach a generative stage", synthetic.root)
    return cases


def mask_sources(synthetic: Dataset) -> dict[str, str]:
    """Synthetic case id -> the real case its mask came from, where recorded.

    Looks for ``mask_source: {"case_id": ...}`` in per-case metadata and in ``provenance.jsonl``.
    """
    found: dict[str, str] = {}

    def visit(case_id: str, record: Any) -> None:
        if isinstance(record, Mapping):
            source = record.get("mask_source")
            if isinstance(source, Mapping) and isinstance(source.get("case_id"), str):
                found[case_id] = source["case_id"]
            for value in record.values():
                visit(case_id, value)

    for case in synthetic.cases:
        visit(case.case_id, case.metadata)
    from medsynth.io.provenance import iter_provenance_records

    for record in iter_provenance_records(synthetic.root / "provenance.jsonl"):
        visit(str(record.get("case_id", "?")), record)
    return found


def intensity_mapping(dataset: Dataset, case: Case, image: np.ndarray) -> IntensityMapping:
    """How a case's stored intensities reach the model range: the dataset's recorded mapping.

    Order: the case's ``preprocessing.json`` record; the dataset's ``medsynth.intensity`` block
    (a CT HU window, or per-case MR percentiles); for undescribed datasets the default CT window
    when the channel is CT, else per-case MR percentiles.
    """
    mapping = dataset.intensity_mapping(case.case_id)
    if mapping is not None:
        return mapping
    block = dataset.medsynth.get("intensity")
    if isinstance(block, Mapping) and {"low", "high"} <= set(block):
        return IntensityMapping.from_dict(block)
    if not block and str(dataset.channel_names.get("0", "")).upper() == "CT":
        return IntensityMapping.ct_window()
    return IntensityMapping.mr_percentiles(image, source=str(case.image))


def load_cases(dataset: Dataset, cases: Sequence[Case], source: str, value_map: Mapping[int, int] | None = None) -> list[SegCase]:
    """Read, normalise and relabel cases: ``image`` to the model range, ``label`` to the real table.

    Raises:
        InputError: a case without a label, or a label value outside the dataset's table.
    """
    from medsynth.io import read_volume  # the IO stack is heavy; only the benchmark needs it here

    out = []
    for case in cases:
        if case.label is None:
            raise InputError(f"case {case.case_id!r} has no label map; the benchmark needs labels", case.image)
        image = read_volume(case.image, kind="image")
        label = read_volume(case.label, kind="label")
        if image.shape != label.shape:
            raise InputError(f"case {case.case_id!r}: label shape {label.shape} != image shape {image.shape}", case.label)
        raw = np.asarray(label.array).astype(np.int64)
        if value_map is not None:
            lookup = np.full(max(int(raw.max()), max(value_map)) + 1, -1, np.int64)
            for old, new in value_map.items():
                lookup[old] = new
            mapped = lookup[raw]
            if (mapped < 0).any():
                bad = sorted(int(v) for v in np.unique(raw[mapped < 0]))
                raise InputError(f"case {case.case_id!r}: label values {bad} are not in the table "
                                 f"{dataset.labels}", case.label)
            raw = mapped
        array = np.asarray(image.array, dtype=np.float32)
        normalised = np.asarray(intensity_mapping(dataset, case, array).forward(array), dtype=np.float32)
        out.append(SegCase(case.case_id, source, normalised, raw, tuple(float(s) for s in image.spacing)))
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def plan_conditions(real_train: Sequence[str], synthetic_ids: Sequence[str], ratios: Sequence[float],
                    selection_seed: int = 0) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Training sets of every condition: ``{name: {"ratio", "real": [...], "synthetic": [...]}}``.

    The synthetic subsets of the mixed conditions are prefixes of one fixed shuffle, so a larger
    ratio adds cases to a smaller one's set instead of drawing a different set.
    """
    order = [synthetic_ids[i] for i in np.random.default_rng(selection_seed).permutation(len(synthetic_ids))]
    counts, warnings = synthetic_counts(len(real_train), len(synthetic_ids), ratios)
    plan: dict[str, dict[str, Any]] = {"real": {"kind": "TRTR", "ratio": 0.0, "real": list(real_train), "synthetic": []}}
    for ratio, count in counts:
        plan[f"real+synthetic@{ratio:g}"] = {"kind": "mixed", "ratio": ratio, "real": list(real_train),
                                             "synthetic": sorted(order[:count])}
    plan["synthetic"] = {"kind": "TSTR", "ratio": None, "real": [], "synthetic": sorted(synthetic_ids)}
    return plan, warnings


def summarise_condition(per_case: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
                        replicates: int, seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """Seed-averaged per-case Dice and per-class summaries of one condition.

    Args:
        per_case: ``{seed: {case_id: {class: metrics}}}``.

    Returns:
        ``(summary, dice)``: ``summary[class][metric]`` is a bootstrap interval dict (lesion
        sensitivity is pooled over lesions: detected / total over cases and seeds), and
        ``dice[class][case_id]`` the Dice averaged over seeds (for paired comparisons).
    """
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    lesions: dict[str, dict[str, list[int]]] = {}
    for by_case in per_case.values():
        for case_id, classes in by_case.items():
            for name, metrics in classes.items():
                for metric in ("dice", "hd95_mm", "nsd"):
                    if metrics.get(metric) is not None:
                        values.setdefault(name, {}).setdefault(metric, {}).setdefault(case_id, []).append(metrics[metric])
                if "lesions_total" in metrics:
                    found = lesions.setdefault(name, {}).setdefault(case_id, [0, 0])
                    found[0] += metrics["lesions_detected"]
                    found[1] += metrics["lesions_total"]
    summary: dict[str, dict[str, Any]] = {}
    dice: dict[str, dict[str, float]] = {}
    for name, metrics in values.items():
        block = summary.setdefault(name, {})
        for metric, by_case in metrics.items():
            means = {case_id: float(np.mean(v)) for case_id, v in by_case.items()}
            block[metric] = bootstrap_mean(list(means.values()), replicates, seed=seed).to_dict() | {
                "bootstrap_unit": "case", "n_cases": len(means)}
            if metric == "dice":
                dice[name] = means
    for name, by_case in lesions.items():
        ids = sorted(by_case)
        detected = np.array([by_case[i][0] for i in ids], float)
        total = np.array([by_case[i][1] for i in ids], float)
        pooled = bootstrap_indices(lambda idx, _: float(detected[idx].sum() / total[idx].sum()) if total[idx].sum()
                                   else float("nan"), len(ids), 1, replicates=replicates, seed=seed)
        summary.setdefault(name, {})["lesion_sensitivity"] = pooled.to_dict() | {
            "bootstrap_unit": "case", "lesions_detected": int(detected.sum()), "lesions_total": int(total.sum())}
    return summary, dice


def run_benchmark(real: Dataset, synthetic: Dataset, config: Any, *, ratios: Sequence[float] = (0.5, 1.0, 1.5),
                  seeds: Sequence[int] = (0,), bootstrap: int = 1000, criterion: str = "any",
                  lesions: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train and score every condition with every seed; returns the report record (no files).

    Args:
        real: the real dataset with fixed splits (train for training, test for scoring).
        synthetic: labelled synthetic dataset, label names a subset of the real table's.
        config: a :class:`~medsynth.training.segmentation.SegmenterConfig`.
        ratios: synthetic / real-train ratios of the mixed conditions.
        seeds: training seeds (weights, case order, crops).
        bootstrap: bootstrap replicates over test cases.
        criterion: lesion detection criterion ("any" or "dice").
        lesions: lesion class names (default: detected by name, :func:`lesion_classes`).

    Raises:
        InputError / ConfigError: naming the offending folder, split or value.
    """
    from tqdm.auto import tqdm

    from medsynth.training.segmentation import predict_volume, train_segmenter

    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    if criterion not in DETECTION_CRITERIA:
        raise ConfigError(f"--lesion-criterion must be one of {list(DETECTION_CRITERIA)}, got {criterion!r}")
    train_cases, test_cases = real.cases_for("train"), real.cases_for("test")
    if not train_cases or not test_cases:
        raise InputError(f"real dataset needs non-empty train and test splits, got {len(train_cases)} train and "
                         f"{len(test_cases)} test cases", real.root)
    train_ids, test_ids = [c.case_id for c in train_cases], [c.case_id for c in test_cases]
    if set(train_ids) & set(test_ids):
        raise InputError(f"cases {sorted(set(train_ids) & set(test_ids))[:5]} are in both train and test", real.root)
    synthetic_cases = check_synthetic(real, synthetic)
    value_map = label_value_map(real, synthetic)
    lesion_names = list(lesion_classes(real.labels) if lesions is None else lesions)
    unknown = sorted(set(lesion_names) - set(real.labels))
    if unknown:
        raise ConfigError(f"--lesion-classes {unknown} are not labels of the real dataset {sorted(real.labels)}")
    plan, warnings = plan_conditions(train_ids, [c.case_id for c in synthetic_cases], ratios)
    for text in warnings:
        log.warning(text)

    pool = {("real", c.case_id): c for c in load_cases(real, train_cases, "real")}
    pool.update({("synthetic", c.case_id): c for c in load_cases(synthetic, synthetic_cases, "synthetic", value_map)})
    tests = load_cases(real, test_cases, "real")
    spacings = {c.spacing for c in pool.values()} | {c.spacing for c in tests}
    if len({tuple(round(s, 2) for s in sp) for sp in spacings}) > 1:
        warnings.append(f"voxel spacings differ between cases ({sorted(spacings)[:4]}...); the segmenter sees "
                        f"voxels, so resample both datasets to one spacing (medsynth prepare) for a fair benchmark")
    num_classes = max(real.labels.values()) + 1

    conditions: dict[str, dict[str, Any]] = {}
    dice_by_condition: dict[str, dict[str, dict[str, float]]] = {}
    runs = [(name, seed) for name in plan for seed in seeds]
    per_case: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in plan}
    for name, seed in tqdm(runs, desc="benchmark", unit="run", disable=not progress):
        spec = plan[name]
        training = [pool[("real", i)] for i in spec["real"]] + [pool[("synthetic", i)] for i in spec["synthetic"]]
        leaked = set(spec["real"]) & set(test_ids)
        if leaked:  # cannot happen with disjoint splits; kept as the protocol's guard
            raise InputError(f"condition {name!r} would train on test cases {sorted(leaked)}", real.root)
        module = train_segmenter(training, num_classes, config, seed)
        per_case[name][seed] = {
            case.case_id: case_metrics(predict_volume(module, case.image, config.patch), case.label, real.labels,
                                       case.spacing, lesion_names, criterion)
            for case in tests}
    for name, spec in plan.items():
        summary, dice = summarise_condition(per_case[name], bootstrap, seed=0)
        dice_by_condition[name] = dice
        conditions[name] = {"kind": spec["kind"], "ratio": spec["ratio"], "n_real": len(spec["real"]),
                            "n_synthetic": len(spec["synthetic"]),
                            "training_cases": {"real": spec["real"], "synthetic": spec["synthetic"]},
                            "summary": summary}
    for name in plan:
        if name == "real":
            continue
        conditions[name]["vs_real"] = {
            cls: paired_comparison(dice_by_condition["real"].get(cls, {}), dice_by_condition[name].get(cls, {}),
                                   bootstrap, seed=0)
            for cls in dice_by_condition["real"]}
    return {"splits": {"train": train_ids, "val": list(real.splits.get("val", [])), "test": test_ids},
            "lesion_classes": lesion_names, "labels": real.labels, "conditions": conditions,
            "per_case": per_case, "warnings": warnings,
            "settings": {"segmenter": config.to_dict(), "ratios": [float(r) for r in ratios], "seeds": list(seeds),
                         "bootstrap": bootstrap, "lesion_criterion": criterion, "nsd_tolerance_mm": 2.0,
                         "min_wilcoxon_cases": MIN_WILCOXON_CASES}}
