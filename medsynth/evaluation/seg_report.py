"""Segmentation benchmark report: ``report.json`` (every number), ``report.md``, ``report.html``.

The JSON is the source of truth; Markdown and HTML are views of it. Figures (``figures/``):
Dice per class per condition with bootstrap 95 % intervals, and the Dice gain over real only
versus the synthetic ratio.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.evaluation.figures import save_figure, plt
from medsynth.evaluation.report import _fmt, json_safe
from medsynth.evaluation.segmentation import MEAN_CLASS
from medsynth.io.atomic import write_json_atomic, write_text_atomic

TITLE = "medsynth segmentation benchmark"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows ``[condition, class, n train (real+syn), Dice [CI], HD95, NSD, lesion sens., gain, p]``."""
    rows = []
    for name, cond in report["conditions"].items():
        for cls, block in cond["summary"].items():
            vs = (cond.get("vs_real") or {}).get(cls, {})
            gain = vs.get("abs_gain")
            wil = vs.get("wilcoxon", {})
            p = "" if name == "real" else (f"skipped ({wil['skipped']})" if "skipped" in wil else _fmt(wil.get("p_value"), 3))
            rel = vs.get("rel_gain")
            gain_text = "" if name == "real" else _fmt(gain, 3) + (f" ({100 * rel:+.1f} %)" if rel is not None else "")
            rows.append([name, cls, f"{cond['n_real']}+{cond['n_synthetic']}", _fmt(block.get("dice"), 3),
                         _fmt(block.get("hd95_mm"), 3), _fmt(block.get("nsd"), 3),
                         _fmt(block.get("lesion_sensitivity"), 3) if "lesion_sensitivity" in block else "",
                         gain_text, p])
    return rows


HEADER = ["condition", "class", "train real+syn", "Dice [95% CI]", "HD95 mm", "NSD 2 mm", "lesion sensitivity",
          "Dice gain vs real", "Wilcoxon p"]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {TITLE}", "", f"- real: `{report['real']}`, synthetic: `{report['synthetic']}`",
             f"- command: `{report['command']}`", f"- created: {report['created']}",
             f"- test cases (real test split, never trained on): {len(report['splits']['test'])}; "
             f"seeds {report['settings']['seeds']}; {report['settings']['segmenter']['steps']} steps of "
             f"{report['settings']['segmenter']['network']}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(report)]
    lines += [""] + [f"- warning: {w}" for w in report.get("warnings", [])]
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    lines += ["", "## Settings", "", f"`{json.dumps(report['settings'])}`", ""]
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any], figures: list[tuple[str, str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in summary_rows(report))
    figs = "".join(f"<figure><img src='{esc(p)}' style='max-width:100%'><figcaption>{esc(c)}</figcaption></figure>"
                   for p, c in figures)
    notes = "".join(f"<li>{esc(t)}</li>" for t in [*report.get("warnings", []), *report.get("notes", [])])
    record = esc(json.dumps({k: report[k] for k in ("settings", "splits", "reproducibility") if k in report}, indent=1))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title><style>body{{font-family:"
            f"sans-serif;max-width:1200px;margin:auto}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style>"
            f"</head><body><h1>{TITLE}</h1><p>real {esc(str(report['real']))} vs synthetic "
            f"{esc(str(report['synthetic']))}; command <code>{esc(report['command'])}</code></p>"
            f"<table><tr>{head}</tr>{rows}</table><ul>{notes}</ul><h2>Figures</h2>{figs}"
            f"<h2>Record</h2><pre>{record}</pre></body></html>\n")


def dice_figure(report: dict[str, Any], path: Path) -> bool:
    """Grouped bars: Dice per class (x) per condition (colour) with bootstrap 95 % intervals."""
    conditions = report["conditions"]
    classes = [c for c in report["labels"] if c != "background" and any(c in v["summary"] for v in conditions.values())]
    classes += [MEAN_CLASS]
    if not classes:
        return False
    width = 0.8 / len(conditions)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(classes)), 4))
    for k, (name, cond) in enumerate(conditions.items()):
        vals, lows, highs = [], [], []
        for cls in classes:
            d = cond["summary"].get(cls, {}).get("dice") or {}
            v = d.get("value")
            vals.append(np.nan if v is None else v)
            lows.append(0 if v is None or d.get("ci_low") is None else v - d["ci_low"])
            highs.append(0 if v is None or d.get("ci_high") is None else d["ci_high"] - v)
        ax.bar(np.arange(len(classes)) + k * width, vals, width, yerr=[lows, highs], label=name, capsize=2)
    ax.set_xticks(np.arange(len(classes)) + width * (len(conditions) - 1) / 2, classes, rotation=45, ha="right")
    ax.set_ylabel("Dice (mean over test cases, 95 % CI)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def gain_figure(report: dict[str, Any], path: Path) -> bool:
    """Dice gain over real only versus synthetic ratio, per class, with bootstrap 95 % intervals."""
    mixed = [(c["ratio"], c) for c in report["conditions"].values() if c["kind"] == "mixed"]
    if not mixed:
        return False
    mixed.sort(key=lambda item: item[0])
    classes = sorted({cls for _, c in mixed for cls in c.get("vs_real", {})})
    fig, ax = plt.subplots(figsize=(6, 4))
    for cls in classes:
        xs, ys, lo, hi = [], [], [], []
        for ratio, cond in mixed:
            gain = cond["vs_real"].get(cls, {}).get("abs_gain") or {}
            if gain.get("value") is None:
                continue
            xs.append(ratio)
            ys.append(gain["value"])
            lo.append(gain["value"] - (gain.get("ci_low") if gain.get("ci_low") is not None else gain["value"]))
            hi.append((gain.get("ci_high") if gain.get("ci_high") is not None else gain["value"]) - gain["value"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=2, label=cls,
                        linewidth=2.5 if cls == MEAN_CLASS else 1)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("synthetic / real training cases")
    ax.set_ylabel("Dice gain vs real only (95 % CI)")
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)
    return True


def write_seg_report(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Write ``report.json``, ``report.md``, ``figures/*.png`` and ``report.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    safe = json_safe(report)
    figures = []
    if dice_figure(safe, out / "figures" / "dice_per_class.png"):
        figures.append(("figures/dice_per_class.png", "Dice per class and condition (bootstrap 95 % CI over test cases)"))
    if gain_figure(safe, out / "figures" / "gain_vs_ratio.png"):
        figures.append(("figures/gain_vs_ratio.png", "Dice gain over real only vs synthetic ratio (95 % CI)"))
    safe["figures"] = [p for p, _ in figures]
    write_json_atomic(out / "report.json", safe)
    write_text_atomic(out / "report.md", render_markdown(safe))
    write_text_atomic(out / "report.html", render_html(safe, figures))
    return figures
