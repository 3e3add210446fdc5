"""Compile a cohort spec against the real dataset into one condition per sample (``plan.json``).

Rounding rule (every "how many" in the plan): **largest remainder**. Each entry first gets
``floor(n * share)``; the cases left over go one each to the entries with the largest fractional
parts ``n * share - floor(n * share)``, ties to the entry listed first in the spec. So the counts
always sum to ``n``, every count is ``floor`` or ``ceil`` of its exact share, and a share whose
``n * share`` is an integer is hit exactly. It applies to classes (of ``total``), size bins and
lesion counts (of a class's cases), and sex (of ``total``). A share > 0 that rounds to 0 cases
is refused.

Each sample gets: a case id, a class, lesion requests ``CLASS:COUNT:MIN-MAXmm:HOST`` (one size
bin per case), spacing, conditioning metadata (region, sex, age), a prompt and a seed
(``spec.seed + index``). Assignments are shuffled with ``spec.seed`` so classes interleave: a
partial run and every rank's share hold a mix. Same spec + same data = same plan.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.cohort.spec import HEALTHY, REAL, ClassSpec, CohortSpec
from medsynth.cohort.statistics import RealStatistics, lesion_values, real_statistics
from medsynth.errors import ConfigError

PLAN_FILE = "plan.json"
PLAN_FORMAT = "medsynth.cohort.plan"
PLAN_VERSION = 1
CASE_PREFIX = "cohort"
ROUNDING = ("largest remainder: floor(n * share) each, the remaining cases to the largest fractional parts "
            "(ties: first listed)")
REAL_SIZE_SPREAD = 0.1  # "size_bins: real": a real lesion's diameter +- 10 %


def allocate(n: int, shares: Sequence[float]) -> list[int]:
    """Split ``n`` cases by ``shares`` (summing to 1) with the largest-remainder rule (module docstring)."""
    exact = [n * float(s) for s in shares]
    counts = [math.floor(e + 1e-9) for e in exact]
    left = n - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:max(left, 0)]:
        counts[i] += 1
    return counts


def spec_sha256(spec: CohortSpec) -> str:
    """Hash of what determines the cohort (the spec without out/format)."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def _spread(n: int, values: Sequence[Any], shares: Sequence[float], rng: np.random.Generator) -> list[Any]:
    """``n`` values with exact largest-remainder counts, in random order."""
    out = [v for v, k in zip(values, allocate(n, shares)) for _ in range(k)]
    rng.shuffle(out)
    return out


def _finding(cls: str, lesions: Sequence[str]) -> str:
    if cls == HEALTHY:
        return "no lesion"
    from medsynth.pipelines.lesions import LesionSpec

    spec = LesionSpec.parse(lesions[0])
    size = f"{(spec.min_mm + spec.max_mm) / 2:.0f} mm"
    name = cls.replace("_", " ")
    return f"{name} {size}" if spec.count == 1 else f"{spec.count} {name}s, largest {spec.max_mm:.0f} mm"


def _real_prompt(stats: RealStatistics, cls: str, sex: str | None, age: float | None,
                 rng: np.random.Generator) -> str | None:
    """The prompt of the real case closest to the sample: same class presence and sex, nearest age."""
    def matches(c: Any) -> bool:
        has = any(c.lesions.values()) if cls == HEALTHY else bool(c.lesions.get(cls))
        return c.prompt is not None and (not has if cls == HEALTHY else has) and (sex is None or c.sex == sex)

    pool = [c for c in stats.cases if matches(c)]
    if not pool:
        return None
    dist = np.asarray([0.0 if age is None or c.age is None else abs(c.age - age) for c in pool])
    best = np.flatnonzero(dist == dist.min())
    return str(pool[int(rng.choice(best))].prompt)


def _check_classes(spec: CohortSpec, labels: dict[str, int], stats: RealStatistics) -> dict[str, str]:
    """Host of every lesion class, checked against the label table (errors name ``classes.X``)."""
    from medsynth.pipelines.lesions import LesionSpec

    hosts: dict[str, str] = {}
    lesion_like = sorted(lesion_values(labels))
    for cls in spec.lesion_classes:
        key = f"classes.{cls.name}"
        if cls.name not in labels or cls.name == "background":
            raise ConfigError(f"{key}: {cls.name!r} is not a label of the data/pipeline; classes are '{HEALTHY}' or "
                              f"one of {lesion_like}")
        try:
            hosts[cls.name] = LesionSpec(cls.name, 1, 1.0, 1.0, cls.host).resolve_host(labels)
        except ConfigError as err:
            raise ConfigError(f"{key}.host: {err}") from None
    return hosts


def _spacing_for(spec: CohortSpec, stats: RealStatistics, default: Sequence[float], n: int,
                 rng: np.random.Generator) -> list[list[float]]:
    if spec.spacing == "default":
        return [list(map(float, default))] * n
    if spec.spacing == REAL:
        pool = stats.spacings()
        if not pool:
            raise ConfigError("spacing: 'real' needs real cases; the dataset's train/val split is empty")
        return [list(pool[int(i)]) for i in rng.integers(len(pool), size=n)]
    return [list(spec.spacing)] * n  # type: ignore[arg-type]


def _sexes(spec: CohortSpec, stats: RealStatistics, rng: np.random.Generator) -> list[str | None]:
    real = stats.sexes()
    if spec.sex is None:
        return [None] * spec.total
    if not real:
        raise ConfigError("demographics.sex: the real dataset records no 'sex' (prompts.jsonl metadata); remove it")
    if spec.sex == REAL:
        values = sorted(real)
        return _spread(spec.total, values, [real[v] / sum(real.values()) for v in values], rng)
    unknown = sorted(set(spec.sex) - set(real))  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"demographics.sex.{unknown[0]}: the real data has no such value; it has {sorted(real)}")
    names = list(spec.sex)  # type: ignore[arg-type]
    counts = allocate(spec.total, [spec.sex[n] for n in names])  # type: ignore[index]
    for name, share, k in zip(names, spec.sex.values(), counts):  # type: ignore[union-attr]
        if share > 0 and k == 0:
            raise ConfigError(f"demographics.sex.{name}: share {share:g} of {spec.total} cases rounds to 0")
    return _spread(spec.total, names, [spec.sex[n] for n in names], rng)  # type: ignore[index]


def _ages(spec: CohortSpec, stats: RealStatistics, rng: np.random.Generator) -> list[float | None]:
    if spec.age is None:
        return [None] * spec.total
    real = stats.ages()
    if spec.age == REAL:
        if not real:
            raise ConfigError("demographics.age: 'real' needs ages in the real data (prompts.jsonl metadata); it has "
                              "none; give a range [MIN, MAX] or remove it")
        return [float(real[int(i)]) for i in rng.integers(len(real), size=spec.total)]
    lo, hi = spec.age  # type: ignore[misc]
    return [float(round(v)) for v in rng.uniform(lo, hi, size=spec.total)]


def _lesion_plan(cls: ClassSpec, host: str, n: int, stats: RealStatistics, spacing_mm: float,
                 rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` ``(lesion request, size-bin name)`` pairs for a lesion class."""
    key = f"classes.{cls.name}"
    if cls.count == REAL:
        counts_real = stats.lesion_counts(cls.name)
        if not counts_real:
            raise ConfigError(f"{key}.count: 'real' needs real cases with {cls.name!r}; the data has none, give "
                              f"the count as a number or [MIN, MAX]")
        hist = sorted(set(counts_real))
        counts = _spread(n, hist, [counts_real.count(c) / len(counts_real) for c in hist], rng)
    else:
        lo, hi = cls.count  # type: ignore[misc]
        values = list(range(lo, hi + 1))
        counts = _spread(n, values, [1.0 / len(values)] * len(values), rng)
    smallest = 2.0 * spacing_mm
    capacity = stats.host_capacity(host)
    if cls.size_bins == REAL:
        diam = stats.diameters(cls.name)
        if not diam:
            raise ConfigError(f"{key}.size_bins: 'real' needs real {cls.name!r} lesions; the data has none, give "
                              f"[{{range_mm: [MIN, MAX], share: S}}, ...]")
        drawn = [float(diam[int(i)]) for i in rng.integers(len(diam), size=n)]
        ranges = [(max(d * (1 - REAL_SIZE_SPREAD), smallest), max(d * (1 + REAL_SIZE_SPREAD), smallest))
                  for d in drawn]
        bins = ["real"] * n
    else:
        for i, b in enumerate(cls.size_bins):  # type: ignore[union-attr]
            where = f"{key}.size_bins[{i}].range_mm"
            if b.max_mm < smallest:
                raise ConfigError(f"{where}: {b.label} is below two voxels ({smallest:g} mm at the planned spacing); "
                                  f"lesions that small vanish from the label map")
            if capacity and b.min_mm > capacity:
                raise ConfigError(f"{where}: {b.label} does not fit inside {host!r} (the real {host} organs hold at "
                                  f"most ~{capacity:.1f} mm); ask for smaller lesions")
        order = list(cls.size_bins)  # type: ignore[arg-type]
        picked = _spread(n, order, [b.share for b in order], rng)
        for b, k in zip(order, allocate(n, [b.share for b in order])):
            if b.share > 0 and k == 0:
                raise ConfigError(f"{key}.size_bins: bin {b.label} (share {b.share:g}) of {n} {cls.name} cases "
                                  f"rounds to 0 cases; raise total or the share")
        ranges = [(max(b.min_mm, smallest), b.max_mm) for b in picked]
        bins = [b.label for b in picked]
    return [(f"{cls.name}:{c}:{lo:.4g}-{hi:.4g}mm:{host}", name) for c, (lo, hi), name in zip(counts, ranges, bins)]


def build_plan(spec: CohortSpec, stats: RealStatistics, pipeline_record: dict[str, Any],
               pipeline_hash: str = "") -> dict[str, Any]:
    """The plan: one condition per sample, plus why (real statistics and the allocation).

    Args:
        spec: the validated spec.
        stats: the real dataset's statistics (:func:`real_statistics`).
        pipeline_record: the pipeline's ``pipeline.json`` (labels, modality, defaults, components).
        pipeline_hash: sha256 of ``pipeline.json`` (recorded; ``run`` refuses another pipeline).

    Raises:
        ConfigError: naming the spec key: classes the data does not have, shares that round to 0
            cases, lesions too small or too large, demographics the data does not record, a
            modality other than the pipeline's, lesions without a ControlNet.
    """
    labels = {str(k): int(v) for k, v in dict(pipeline_record.get("labels") or {}).items()}
    modality = str(pipeline_record["modality"]).upper()
    if spec.modality is not None and spec.modality != modality:
        raise ConfigError(f"modality: the spec asks for {spec.modality} but the pipeline makes {modality}")
    components = dict(pipeline_record.get("components") or {})
    wants_masks = spec.mask_source != "none"
    if wants_masks and "controlnet" not in components:
        raise ConfigError(f"masks.source: {spec.mask_source!r} needs a ControlNet in the pipeline (assemble it with "
                          f"--controlnet); use masks.source 'none' for images without lesion classes")
    if spec.mask_source == "generator" and "label_generator" not in components:
        raise ConfigError("masks.source: 'generator' needs a label generator in the pipeline (train one with "
                          "`medsynth labels fit`, assemble with --label-generator); or use masks.source bank")
    if spec.mask_source == "bank" and spec.bank is None and "bank" not in components:
        raise ConfigError("masks.bank: the pipeline holds no mask bank; give masks.bank DIR (`medsynth labels bank`)")
    hosts = _check_classes(spec, labels, stats)
    names = list(spec.classes)
    counts = allocate(spec.total, [spec.classes[n].share for n in names])
    for name, k in zip(names, counts):
        share = spec.classes[name].share
        if share > 0 and k == 0:
            raise ConfigError(f"classes.{name}.share: {share:g} of {spec.total} cases rounds to 0 cases; raise total "
                              f"to at least {math.ceil(0.5 / share)} or the share")
    rng = np.random.default_rng([spec.seed, 7])
    defaults = dict(pipeline_record["defaults"])
    spacings = _spacing_for(spec, stats, defaults["spacing"], spec.total, rng)
    coarsest = max(max(s) for s in spacings)
    per_class: dict[str, list[tuple[str, str] | None]] = {}
    for name, k in zip(names, counts):
        cls = spec.classes[name]
        per_class[name] = [None] * k if not cls.is_lesion else _lesion_plan(cls, hosts[name], k, stats, coarsest, rng)
    assignment = [(name, item) for name in names for item in per_class[name]]
    order = rng.permutation(len(assignment))
    sexes, ages = _sexes(spec, stats, rng), _ages(spec, stats, rng)
    region = spec.region
    if region == REAL:
        region = stats.regions().most_common(1)[0][0] if stats.regions() else \
            dict(defaults.get("metadata") or {}).get("region")
    width = max(4, len(str(spec.total - 1)))
    cases = []
    for index, j in enumerate(order):
        name, item = assignment[int(j)]
        lesions = [] if item is None else [item[0]]
        metadata = {k: v for k, v in (("region", region), ("sex", sexes[index]), ("age", ages[index]))
                    if v is not None}
        if spec.prompt_template is not None:
            prompt = spec.prompt_template.format(modality=modality, region=region or "", sex=sexes[index] or "",
                                                 age="" if ages[index] is None else f"{ages[index]:g}", cls=name,
                                                 finding=_finding(name, lesions))
        else:
            prompt = _real_prompt(stats, name, sexes[index], ages[index], rng) or ", ".join(
                p for p in (f"{modality} {region or ''}".strip(), _finding(name, lesions), sexes[index],
                            None if ages[index] is None else f"{ages[index]:g}") if p)
        cases.append({"case_id": f"{CASE_PREFIX}_{index:0{width}d}", "index": index, "class": name,
                      "lesions": lesions, "size_bin": None if item is None else item[1],
                      "spacing": spacings[index], "metadata": metadata, "prompt": prompt,
                      "seed": spec.seed + index})
    why = [f"{name}: {k} of {spec.total} cases (share {spec.classes[name].share:g} -> "
           f"{spec.total * spec.classes[name].share:g}"
           f", rounded by largest remainder)" + ("" if not spec.classes[name].is_lesion else
                                                f"; real prevalence {stats.prevalence(name):.3g}")
           for name, k in zip(names, counts)]
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "cohort": spec.name, "spec_sha256": spec_sha256(spec),
            "spec": spec.to_dict(), "pipeline": None if spec.pipeline is None else str(spec.pipeline),
            "pipeline_hash": pipeline_hash, "modality": modality, "rounding": ROUNDING,
            "counts": dict(zip(names, counts)), "why": why,
            "statistics": stats.summary([c.name for c in spec.lesion_classes]), "cases": cases}


def plan_sha256(plan: dict[str, Any]) -> str:
    """Hash of the planned cases (the cohort's identity in its output folder)."""
    return hashlib.sha256(json.dumps(plan["cases"], sort_keys=True).encode()).hexdigest()


def plan_cohort(spec: CohortSpec, progress: bool = True) -> dict[str, Any]:
    """Read the spec's pipeline record and real dataset, and :func:`build_plan`.

    Raises:
        ConfigError: ``pipeline`` or ``data`` missing from the spec, or any :func:`build_plan` error.
        InputError: an unreadable pipeline folder or dataset.
    """
    from medsynth.data.manifest import read_dataset
    from medsynth.io.checkpoint import file_sha256
    from medsynth.pipelines.pipeline import PIPELINE_FILE, read_pipeline_record

    for key in ("pipeline", "data"):
        if getattr(spec, key) is None:
            raise ConfigError(f"{key}: missing; a cohort plan needs the {key} folder (relative to the spec file)")
    record = read_pipeline_record(spec.pipeline)  # type: ignore[arg-type]
    dataset = read_dataset(spec.data)  # type: ignore[arg-type]
    hosts = [c.host or c.name.removesuffix("_lesion") for c in spec.lesion_classes]
    stats = real_statistics(dataset, [c.name for c in spec.lesion_classes], hosts, progress=progress)
    plan = build_plan(spec, stats, record, file_sha256(Path(spec.pipeline) / PIPELINE_FILE))  # type: ignore[arg-type]
    plan["data"] = str(spec.data)
    return plan


def describe_plan(plan: dict[str, Any]) -> str:
    """Human-readable plan summary: how many of each, and why."""
    lines = [f"cohort {plan['cohort']!r}: {len(plan['cases'])} cases ({plan['modality']}); "
             f"rounding: {plan['rounding']}"]
    lines += [f"  {w}" for w in plan["why"]]
    stats = plan["statistics"]
    lines.append(f"  real data {stats['dataset']!r}: {stats['n_cases']} train/val cases, sex {stats['sex'] or 'n/a'}, "
                 f"spacing median {stats.get('spacing_median')}")
    bins: dict[tuple[str, str], int] = {}
    counts: dict[tuple[str, int], int] = {}
    for case in plan["cases"]:
        if case["lesions"]:
            bins[(case["class"], case["size_bin"])] = bins.get((case["class"], case["size_bin"]), 0) + 1
            n = int(case["lesions"][0].split(":")[1])
            counts[(case["class"], n)] = counts.get((case["class"], n), 0) + 1
    for (cls, name), k in sorted(bins.items()):
        lines.append(f"  {cls} size bin {name}: {k} cases")
    for (cls, n), k in sorted(counts.items()):
        lines.append(f"  {cls} with {n} lesion(s): {k} cases")
    return "\n".join(lines)


__all__ = ["allocate", "build_plan", "plan_cohort", "describe_plan", "plan_sha256", "spec_sha256", "PLAN_FILE",
           "ROUNDING", "real_statistics"]
