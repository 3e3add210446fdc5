"""Audit a generated cohort against its spec, and for memorisation (``OUT/audit/``).

What is checked, from the files on disk (not from what the run believed it wrote):

* **class shares**: produced share of every class among the written cases vs the spec's
  target; a difference above ``tolerance`` (absolute, default 0.05) is a mismatch.
* **lesions**: per lesion case, the 26-connected components of its class in the label map vs
  the planned count, and their equivalent-sphere diameters vs the planned size bin (within
  ``size_tolerance``, default 25 %, for voxelisation); ``healthy`` cases must hold no lesion.
* **quality flags**: statuses (done / flagged / skipped / failed / pending) with reasons.
* **memorisation** (docs/EVALUATION.md section 5): nearest-training-case distances in the
  default volume embedding (``medsynth_random3d``, random weights: no download), calibrated with
  the real held-out split, via :func:`medsynth.evaluation.privacy.memorisation_audit`.

Writes ``report.json``, ``report.md`` and ``shares.png`` (target vs produced shares).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medsynth.cohort.plan import PLAN_FILE
from medsynth.cohort.run import COHORT_FILE, WRITTEN_STATUSES, read_statuses
from medsynth.cohort.spec import HEALTHY, CohortSpec
from medsynth.cohort.statistics import lesion_values
from medsynth.data.manifest import read_dataset, read_json_object
from medsynth.errors import ConfigError, InputError, MedsynthError
from medsynth.io import read_volume
from medsynth.io.atomic import atomic_path, write_json_atomic, write_text_atomic

AUDIT_DIR = "audit"
_TOUCH = ndimage.generate_binary_structure(3, 3)


def _shares(spec: CohortSpec, plan: dict[str, Any], statuses: dict[str, Any], tolerance: float) -> dict[str, Any]:
    produced = Counter(s["class"] for s in statuses.values() if s.get("status") in WRITTEN_STATUSES)
    n = sum(produced.values())
    rows = {}
    for name, cls in spec.classes.items():
        share = produced.get(name, 0) / n if n else 0.0
        rows[name] = {"target_share": cls.share, "planned": plan["counts"].get(name, 0),
                      "produced": produced.get(name, 0),
                      "produced_share": round(share, 6), "abs_error": round(abs(share - cls.share), 6),
                      "mismatch": abs(share - cls.share) > tolerance}
    return {"n_written": n, "tolerance": tolerance, "classes": rows}


def _lesions(out: Path, spec: CohortSpec, plan: dict[str, Any], statuses: dict[str, Any], labels: dict[str, int],
             size_tolerance: float, progress: bool) -> dict[str, Any]:
    from medsynth.data.phantom_shapes import Grid, equivalent_diameter
    from medsynth.pipelines.lesions import LesionSpec

    values = lesion_values(labels, [c.name for c in spec.lesion_classes])
    per_class: dict[str, Any] = {c.name: {"cases": 0, "count_match": 0, "lesions": 0, "in_size_range": 0,
                                          "diameters_mm": [], "bins": {}} for c in spec.lesion_classes}
    healthy_with_lesions = []
    cases = [c for c in plan["cases"] if statuses.get(c["case_id"], {}).get("status") in WRITTEN_STATUSES]
    for case in tqdm(cases, desc="audit labels", unit="case", disable=not progress):
        label = read_volume(out / statuses[case["case_id"]]["label"], kind="label")
        array, grid = np.asarray(label.array), Grid(label.shape, label.spacing)
        if case["class"] == HEALTHY:
            if np.isin(array, list(values.values())).any():
                healthy_with_lesions.append(case["case_id"])
            continue
        want = LesionSpec.parse(case["lesions"][0])
        components, n = ndimage.label(array == labels[want.class_name], structure=_TOUCH)
        diam = [equivalent_diameter(int(s), grid) for s in np.bincount(components.ravel())[1:]]
        row = per_class[want.class_name]
        inside = [want.min_mm * (1 - size_tolerance) <= d <= want.max_mm * (1 + size_tolerance) for d in diam]
        row["cases"] += 1
        row["count_match"] += int(n == want.count)
        row["lesions"] += n
        row["in_size_range"] += sum(inside)
        row["diameters_mm"] += [round(d, 2) for d in diam]
        b = row["bins"].setdefault(case["size_bin"], {"cases": 0, "lesions": 0, "in_size_range": 0})
        b["cases"] += 1
        b["lesions"] += n
        b["in_size_range"] += sum(inside)
    for row in per_class.values():
        row["count_match_rate"] = row["count_match"] / row["cases"] if row["cases"] else None
        row["size_match_rate"] = row["in_size_range"] / row["lesions"] if row["lesions"] else None
    return {"size_tolerance": size_tolerance, "classes": per_class, "healthy_with_lesions": healthy_with_lesions}


def _memorisation(out: Path, plan: dict[str, Any], statuses: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The memorisation audit of the written cases against the real dataset's splits."""
    from medsynth.evaluation.collect import collect_case
    from medsynth.evaluation.features import FeatureCache, build_extractor
    from medsynth.evaluation.preprocessing import Protocol
    from medsynth.evaluation.privacy import memorisation_audit

    if not plan.get("data"):
        return {"skipped": "the plan names no real dataset"}
    real = read_dataset(plan["data"])
    synthetic = read_dataset(out)
    written = {k for k, s in statuses.items() if s.get("status") in WRITTEN_STATUSES}
    syn_cases = [c for c in synthetic.cases if c.case_id in written]
    train = real.generative_cases() if real.splits else list(real.cases)
    held = real.cases_for("test") if real.splits else []
    if not train or not syn_cases:
        return {"skipped": f"needs real training and synthetic cases, got {len(train)} and {len(syn_cases)}"}
    first = read_volume(train[0].image)
    size = tuple(max(8, int(round(n))) for n in first.shape)
    protocol = Protocol(spacing=tuple(float(s) for s in first.spacing), size=size)  # the real grid
    extractor = build_extractor("medsynth_random3d")
    labels = {n: v for n, v in real.labels.items() if synthetic.labels.get(n) == v}
    rng, cache = np.random.default_rng(0), FeatureCache(None)
    modality = str(plan.get("modality"))

    def collect(cases: list[Any]) -> list[Any]:
        return [collect_case(c, modality, labels, [extractor], protocol, cache, 32, rng)
                for c in tqdm(cases, desc="memorisation features", unit="case", disable=not progress)]

    tr, sy, ho = collect(train), collect(syn_cases), collect(held)
    emb = lambda data: np.concatenate([d.features[extractor.name]["volume"] for d in data])  # noqa: E731
    masks = all(d.label_thumbnail is not None for d in tr + sy)
    result = memorisation_audit(
        emb(tr), [d.case_id for d in tr], emb(sy), [d.case_id for d in sy], emb(ho) if ho else None,
        [d.case_id for d in ho], train_volumes=[d.thumbnail for d in tr], synthetic_volumes=[d.thumbnail for d in sy],
        train_masks=[d.label_thumbnail for d in tr] if masks else None,
        synthetic_masks=[d.label_thumbnail for d in sy] if masks else None)
    return {"embedding": extractor.name, "protocol": protocol.to_dict(), **result}


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Cohort audit: {report['cohort']}", "", f"Verdict: **{'OK' if report['ok'] else 'MISMATCH'}**", ""]
    for m in report["mismatches"]:
        lines.append(f"- {m}")
    lines += ["", "## Class shares", "", "| class | target | planned | produced | produced share | |",
              "|---|---|---|---|---|---|"]
    for name, row in report["shares"]["classes"].items():
        lines.append(f"| {name} | {row['target_share']:.3f} | {row['planned']} | {row['produced']} | "
                     f"{row['produced_share']:.3f} | {'MISMATCH' if row['mismatch'] else 'ok'} |")
    lines += ["", "## Lesions", "", "| class | cases | count match | lesions | in size range |",
              "|---|---|---|---|---|"]
    for name, row in report["lesions"]["classes"].items():
        lines.append(f"| {name} | {row['cases']} | {row['count_match']} | {row['lesions']} | {row['in_size_range']} |")
    lines += ["", "## Statuses", "", ", ".join(f"{k}: {v}" for k, v in report["statuses"].items())]
    for case_id, reason in report["reasons"].items():
        lines.append(f"- {case_id}: {reason}")
    mem = report["memorisation"]
    lines += ["", "## Memorisation", ""]
    if "skipped" in mem:
        lines.append(f"skipped: {mem['skipped']}")
    else:
        lines.append(f"embedding {mem['embedding']}; median synthetic NN distance "
                     f"{mem['synthetic_median_distance']:.4g}"
                     + (f"; ratio of medians {mem['ratio_of_medians']:.3g}" if "ratio_of_medians" in mem else ""))
        lines.append(f"flagged pairs: {len(mem['flagged'])}; confirmed copies: {len(mem['confirmed_copies'])}")
        if mem.get("note"):
            lines.append(f"note: {mem['note']}")
    lines += ["", "![class shares](shares.png)", ""]
    return "\n".join(lines)


def _figure(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["shares"]["classes"]
    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3))
    ax.bar(x - 0.2, [rows[n]["target_share"] for n in names], 0.4, label="target")
    ax.bar(x + 0.2, [rows[n]["produced_share"] for n in names], 0.4, label="produced")
    ax.set_xticks(x, names)
    ax.set_ylabel("share of cases")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def audit_cohort(spec: CohortSpec, out: str | Path, *, tolerance: float = 0.05, size_tolerance: float = 0.25,
                 memorisation: bool = True, progress: bool = True) -> dict[str, Any]:
    """Audit the cohort in ``out`` against ``spec``; writes ``out/audit/report.{json,md}`` and ``shares.png``.

    Raises:
        InputError: ``out`` holds no cohort (run ``medsynth cohort run`` first).
        ConfigError: ``out`` holds a cohort made from another spec, or bad tolerances.
    """
    from medsynth.cohort.plan import spec_sha256

    out = Path(out)
    if not 0 <= tolerance <= 1 or not 0 <= size_tolerance <= 1:
        raise ConfigError(f"--tolerance and --size-tolerance must lie in [0, 1], got {tolerance} and {size_tolerance}")
    if not (out / COHORT_FILE).is_file() or not (out / PLAN_FILE).is_file():
        raise InputError(f"no cohort here ({COHORT_FILE} or {PLAN_FILE} missing); run `medsynth cohort run` first", out)
    plan = read_json_object(out / PLAN_FILE)
    if plan.get("spec_sha256") != spec_sha256(spec):
        raise ConfigError(f"{out} holds cohort {plan.get('cohort')!r} made from another spec; audit it with its own "
                          f"spec (or rerun `medsynth cohort run` with this one into a new folder)")
    statuses = read_statuses(out)
    labels = dict(read_json_object(out / "dataset.json").get("labels", {})) if (out / "dataset.json").is_file() else {}
    if not labels:
        raise InputError("dataset.json missing: the run has not finished any case yet; rerun `medsynth cohort run`",
                         out)
    counts = Counter(statuses.get(c["case_id"], {}).get("status", "pending") for c in plan["cases"])
    report: dict[str, Any] = {
        "cohort": plan["cohort"], "out": str(out), "spec_sha256": plan["spec_sha256"], "n_planned": len(plan["cases"]),
        "statuses": {k: counts.get(k, 0) for k in ("done", "flagged", "skipped", "failed", "pending")},
        "reasons": {k: s["reason"] for k, s in sorted(statuses.items()) if s.get("reason")},
        "shares": _shares(spec, plan, statuses, tolerance),
        "lesions": _lesions(out, spec, plan, statuses, labels, size_tolerance, progress),
    }
    try:
        report["memorisation"] = _memorisation(out, plan, statuses, progress) if memorisation else {"skipped": "off"}
    except MedsynthError as err:
        report["memorisation"] = {"skipped": str(err)}
    mismatches = [f"class {n}: produced share {r['produced_share']:.3f} vs target {r['target_share']:.3f} "
                  f"(> {tolerance:g} apart)" for n, r in report["shares"]["classes"].items() if r["mismatch"]]
    for name, row in report["lesions"]["classes"].items():
        if row["cases"] and row["count_match"] < row["cases"]:
            mismatches.append(f"class {name}: {row['cases'] - row['count_match']} case(s) with another lesion count "
                              f"than planned")
        if row["lesions"] and row["in_size_range"] < row["lesions"]:
            mismatches.append(f"class {name}: {row['lesions'] - row['in_size_range']} lesion(s) outside their size bin")
    if report["lesions"]["healthy_with_lesions"]:
        mismatches.append(f"healthy cases with lesions: {report['lesions']['healthy_with_lesions']}")
    not_made = sum(report["statuses"][k] for k in ("skipped", "failed", "pending"))
    if not_made:
        mismatches.append(f"{not_made} planned case(s) not written (skipped/failed/pending)")
    if report["memorisation"].get("confirmed_copies"):
        mismatches.append(f"{len(report['memorisation']['confirmed_copies'])} synthetic case(s) copy training cases")
    report["mismatches"], report["ok"] = mismatches, not mismatches
    folder = out / AUDIT_DIR
    folder.mkdir(exist_ok=True)
    _figure(report, folder / "shares.png")
    write_text_atomic(folder / "report.md", _markdown(report))
    write_json_atomic(folder / "report.json", json.loads(json.dumps(report, default=float)))
    return report


__all__ = ["audit_cohort", "AUDIT_DIR"]
