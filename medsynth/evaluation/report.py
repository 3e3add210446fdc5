"""Writing the report folder: ``report.json`` (every number), ``report.md`` and ``report.html``.

The JSON is the source of truth; the Markdown and HTML are views of it. Figures are PNG files
next to the HTML (``figures/``), so the folder can be zipped or served as is.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.evaluation.collect import CaseData
from medsynth.evaluation.preprocessing import PLANES
from medsynth.io.atomic import write_json_atomic, write_text_atomic


def json_safe(value: Any) -> Any:
    """Recursively convert numpy scalars/arrays to Python and non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, dict):
        if "skipped" in value:
            return f"skipped ({value['skipped']})"
        if "value" in value:
            text = _fmt(value["value"], digits)
            if value.get("ci_low") is not None:
                text += f" [{_fmt(value['ci_low'], digits)}, {_fmt(value['ci_high'], digits)}]"
            return text
        if "mean" in value and "std" in value:
            return f"{_fmt(value['mean'], digits)} +/- {_fmt(value['std'], digits)}"
        if "mean" in value and "sd" in value:
            return f"{_fmt(value['mean'], digits)} +/- {_fmt(value['sd'], digits)}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "n/a" if value is None else str(value)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(section, metric, value)`` rows shared by the Markdown and HTML views."""
    rows: list[tuple[str, str, str]] = []
    for name, block in report.get("features", {}).items():
        if block["kind"] == "2.5d":
            fid = block.get("fid", {})
            if "skipped" in fid:
                rows.append((name, "FID 2.5D", _fmt(fid)))
                continue
            for plane in (*PLANES, "mean"):
                rows.append((name, f"FID {plane} (95% CI over volumes)", _fmt(fid.get(plane))))
            for plane in PLANES:
                rows.append((name, f"KID {plane} (mean +/- sd)", _fmt(block["kid"][plane])))
            inf = block.get("fid_infinity", {})
            rows.append((name, "FID-infinity (mean of planes)", _fmt(inf.get("mean")) if "mean" in inf else _fmt(inf)))
        else:
            rows.append((name, "FID 3D (95% CI over volumes)", _fmt(block.get("fid"))))
            rows.append((name, "KID 3D (mean +/- sd)", _fmt(block.get("kid"))))
            inf = block.get("fid_infinity", {})
            rows.append((name, "FID-infinity 3D", _fmt(inf.get("value")) if "value" in inf else _fmt(inf)))
        floor = block.get("floor", {})
        if not floor:  # the metric itself was skipped; its note is already in the table
            continue
        if "skipped" in floor:
            rows.append((name, "real-vs-real floor", _fmt(floor)))
        else:
            rows.append((name, f"real-vs-real floor (N={floor['n_per_half']} per half)", _fmt(floor["real_vs_real"])))
            if "real_vs_synthetic_same_n" in floor:
                rows.append((name, "real-vs-synthetic at the same N", _fmt(floor["real_vs_synthetic_same_n"])))
    sm = report.get("sample_metrics", {})
    for key in ("precision", "recall", "density", "coverage"):
        if key in sm:
            rows.append((f"sample metrics ({sm['embedding']}, k={sm['k']})", key, _fmt(sm[key])))
    if "skipped" in sm:
        rows.append(("sample metrics", "PRDC", _fmt(sm)))
    div = report.get("diversity", {})
    for key in ("synthetic", "real"):
        if key in div:
            rows.append(("diversity", f"MS-SSIM {key} pairs", _fmt(div[key])))
    mem = report.get("memorisation", {})
    if "confirmed_copies" in mem:
        rows.append(("memorisation", "confirmed copies (voxel r >= 0.95)",
                     _fmt([f"{p['synthetic']} ~ {p['train']}" for p in mem["confirmed_copies"]])))
    for key in ("ratio_of_medians", "fraction_below_p1", "fraction_below_p5", "flagged_train_cases", "note"):
        if key in mem:
            rows.append(("memorisation", key, _fmt(mem[key])))
    q = report.get("quality", {})
    if "pass_rate" in q:
        rows.append(("intensity quality check", "pass rate (synthetic)", _fmt(q["pass_rate"])))
    elif "skipped" in q:
        rows.append(("intensity quality check", "pass rate (synthetic)", _fmt(q)))
    mf = report.get("mask_fidelity", {})
    if "skipped" in mf and "skipped" not in q:  # both skipped: one label note is enough
        rows.append(("mask fidelity", "Dice", _fmt(mf)))
    if "left_out" in mf:
        rows.append(("mask fidelity", "cases left out", f"{mf['left_out']['cases']} ({mf['left_out']['reason']})"))
    for name, scores in mf.get("synthetic", {}).items():
        ceiling = mf.get("real_ceiling", {}).get(name, {})
        rows.append(("mask fidelity (Dice, synthetic | real ceiling)", name,
                     f"{_fmt(scores.get('dice'))} | {_fmt(ceiling.get('dice'))}"))
    for name, stats in report.get("intensity", {}).get("classes", {}).items():
        rows.append(("intensity per class (Wasserstein, KS)", name,
                     f"{_fmt(stats['wasserstein'])}, {_fmt(stats['ks_statistic'])}"))
    rec = report.get("reconstruction", {})
    if "skipped" in rec:
        rows.append(("reconstruction", "autoencoder", _fmt(rec)))
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: a summary table plus the reproducibility record."""
    rep = report["reproducibility"]
    lines = ["# medsynth evaluation report", "",
             f"- real: `{rep['real']['path']}` (N={rep['real']['n']}), synthetic: `{rep['synthetic']['path']}` "
             f"(N={rep['synthetic']['n']}), modality {rep['modality']}",
             f"- command: `{rep['command']}`", f"- created: {report['created']}", ""]
    lines += ["## Feature extractors", ""]
    for e in rep["extractors"]:
        sha = e["weights_sha256"] or "none (no pretrained weights)"
        lines.append(f"- **{e['name']}** ({e['kind']}, {e['feature_dim']}-d), weights sha256 {sha}: {e['comparable']}")
    lines += ["", "## Metrics", "", "| section | metric | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    lines += ["", "## Reproducibility", "", f"- sqrt method: {rep['sqrt_method']}; covariance {rep['covariance']}",
              f"- protocol: `{rep['protocol']}`", f"- settings: `{rep['settings']}`",
              f"- library versions: `{rep['library_versions']}`", ""]
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any], figures: Sequence[tuple[str, str]]) -> str:
    """``report.html``: the same table, the figures (relative PNG links) and the raw record."""
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>" for a, b, c in summary_rows(report))
    rep = report["reproducibility"]
    extractors = "".join(f"<li><b>{esc(e['name'])}</b> ({esc(e['kind'])}): sha256 "
                         f"{esc(str(e['weights_sha256']))}; {esc(e['comparable'])}</li>" for e in rep["extractors"])
    figs = "".join(f"<figure><img src='{esc(path)}' style='max-width:100%'><figcaption>{esc(caption)}"
                   f"</figcaption></figure>" for path, caption in figures)
    import json

    record = esc(json.dumps(json_safe(rep), indent=1))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>medsynth evaluation</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td{{padding:2px 8px;"
            f"border-bottom:1px solid #ddd}}</style></head><body><h1>medsynth evaluation report</h1>"
            f"<p>real {esc(rep['real']['path'])} (N={rep['real']['n']}) vs synthetic {esc(rep['synthetic']['path'])} "
            f"(N={rep['synthetic']['n']}), {esc(rep['modality'])}</p><h2>Feature extractors</h2><ul>{extractors}</ul>"
            f"<h2>Metrics</h2><table>{rows}</table><h2>Figures</h2>{figs}"
            f"<h2>Reproducibility record</h2><pre>{record}</pre></body></html>\n")


def write_reports(report: dict[str, Any], real: Sequence[CaseData], synthetic: Sequence[CaseData], out: Path) -> None:
    """Write ``report.json``, ``report.md``, ``figures/*.png`` and ``report.html`` into ``out``."""
    from medsynth.evaluation.figures import make_figures

    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(report, real, synthetic, out / "figures")
    report["figures"] = [path for path, _ in figures]
    safe = json_safe(report)
    write_json_atomic(out / "report.json", safe)
    write_text_atomic(out / "report.md", render_markdown(safe))
    write_text_atomic(out / "report.html", render_html(safe, figures))
