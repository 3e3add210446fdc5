"""Report figures (matplotlib, Agg): galleries, histograms, metric intervals, nearest pairs.

Every figure is written atomically as a PNG into the report's ``figures/`` folder; the
functions return ``(relative path, caption)`` pairs for the HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medsynth.evaluation.collect import CaseData  # noqa: E402
from medsynth.evaluation.preprocessing import PLANE_AXIS, PLANES  # noqa: E402
from medsynth.io.atomic import atomic_path  # noqa: E402

GALLERY_CASES = 4


def central_slice(volume: np.ndarray, plane: str) -> np.ndarray:
    """The middle slice of a plane, oriented for display (rows = second in-plane axis, flipped)."""
    axis = PLANE_AXIS[plane]
    return np.rot90(np.take(volume, volume.shape[axis] // 2, axis=axis))


def save_figure(fig: plt.Figure, path: Path, dpi: int = 90) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (never a half-written file), then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def gallery(real: Sequence[CaseData], synthetic: Sequence[CaseData], path: Path) -> None:
    """Rows: real then synthetic cases; columns: the three planes' central slices."""
    rows = [("real", c) for c in real[:GALLERY_CASES]] + [("synthetic", c) for c in synthetic[:GALLERY_CASES]]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, (kind, case) in enumerate(rows):
        for p, plane in enumerate(PLANES):
            ax = axes[r, p]
            ax.imshow(central_slice(case.thumbnail, plane), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if p == 0:
                ax.set_ylabel(f"{kind}\n{case.case_id}", fontsize=7)
            if r == 0:
                ax.set_title(plane.upper(), fontsize=9)
    save_figure(fig, path)


def histograms(intensity: dict[str, Any], path: Path) -> bool:
    classes = intensity.get("classes", {})
    if not classes:
        return False
    n = len(classes)
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (name, stats) in zip(axes.ravel(), classes.items()):
        h = stats["histogram"]
        centres = (np.asarray(h["edges"][:-1]) + np.asarray(h["edges"][1:])) / 2
        ax.plot(centres, h["real"], label="real")
        ax.plot(centres, h["synthetic"], label="synthetic")
        ax.set_title(f"{name} (W1 {stats['wasserstein']:.3g})", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"intensity histograms per class ({intensity.get('unit', '')})", fontsize=9)
    save_figure(fig, path)
    return True


def metric_intervals(report: dict[str, Any], path: Path) -> bool:
    """FID with 95 % bootstrap intervals and the real-vs-real floor, per extractor."""
    entries = []
    for name, block in report.get("features", {}).items():
        fid = block.get("fid", {})
        items = [(p, fid.get(p)) for p in (*PLANES, "mean")] if block["kind"] == "2.5d" else [("3d", fid)]
        floor = block.get("floor", {}).get("real_vs_real")
        for label, v in items:
            if isinstance(v, dict) and v.get("value") is not None:
                entries.append((f"{name}\n{label}", v["value"], v.get("ci_low"), v.get("ci_high"), floor))
    if not entries:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(entries)), 3))
    x = np.arange(len(entries))
    values = np.array([e[1] for e in entries])
    low = np.array([e[2] if e[2] is not None else e[1] for e in entries])
    high = np.array([e[3] if e[3] is not None else e[1] for e in entries])
    # A percentile interval of a biased statistic need not contain the point estimate.
    ax.errorbar(x, values, yerr=[np.clip(values - low, 0, None), np.clip(high - values, 0, None)], fmt="o", capsize=4, label="real vs synthetic")
    floors = [e[4] for e in entries]
    ax.scatter(x, [f if f is not None else np.nan for f in floors], marker="_", s=300, color="k",
               label="real vs real floor")
    ax.set_xticks(x, [e[0] for e in entries], fontsize=6)
    ax.set_ylabel("FID")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def nearest_pairs(memorisation: dict[str, Any], real: Sequence[CaseData], synthetic: Sequence[CaseData],
                  path: Path) -> bool:
    pairs = memorisation.get("closest_pairs", [])
    if not pairs:
        return False
    by_id = {c.case_id: c for c in (*real, *synthetic)}
    fig, axes = plt.subplots(len(pairs), 2, figsize=(4, 2 * len(pairs)), squeeze=False)
    for r, pair in enumerate(pairs):
        for col, key in enumerate(("synthetic", "train")):
            ax = axes[r, col]
            ax.imshow(central_slice(by_id[pair[key]].thumbnail, "xy"), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{key}: {pair[key]}", fontsize=7)
        corr = pair.get("voxel_correlation")
        flag = " FLAGGED" if pair.get("flagged") else ""
        axes[r, 0].set_ylabel(f"d={pair['distance']:.3g}" + (f"\nr={corr:.3f}" if corr is not None else "") + flag,
                              fontsize=7)
    save_figure(fig, path)
    return True


def distance_histogram(memorisation: dict[str, Any], path: Path) -> bool:
    syn = [p["distance"] for p in memorisation.get("synthetic_nn", [])]
    held = [p["distance"] for p in memorisation.get("held_out_nn", [])]
    if not syn:
        return False
    fig, ax = plt.subplots(figsize=(5, 2.8))
    bins = np.linspace(0, max(syn + held) * 1.05 + 1e-12, 30)
    ax.hist(syn, bins, alpha=0.6, label="synthetic -> nearest train")
    if held:
        ax.hist(held, bins, alpha=0.6, label="held-out real -> nearest train")
        ax.axvline(memorisation["held_out_p5"], color="r", ls="--", label="held-out 5th pct")
    ax.set_xlabel(f"distance in {memorisation.get('embedding')} embedding")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def make_figures(report: dict[str, Any], real: Sequence[CaseData], synthetic: Sequence[CaseData],
                 folder: Path) -> list[tuple[str, str]]:
    """Write all figures that have data; returns ``(path relative to the report, caption)``."""
    out = []
    gallery(real, synthetic, folder / "gallery.png")
    out.append(("figures/gallery.png", "Central slices in three planes: real (top) vs synthetic (bottom), "
                                       "evaluation grid, intensity window mapped to [0, 1]"))
    if histograms(report.get("intensity", {}), folder / "histograms.png"):
        out.append(("figures/histograms.png", "Voxel intensity histograms per label class"))
    if metric_intervals(report, folder / "fid_intervals.png"):
        out.append(("figures/fid_intervals.png", "FID with 95 % bootstrap intervals over volumes; "
                                                  "black bars: real-vs-real floor (two halves)"))
    mem = report.get("memorisation", {})
    if distance_histogram(mem, folder / "nn_distances.png"):
        out.append(("figures/nn_distances.png", "Nearest-training-neighbour distances"))
    if nearest_pairs(mem, real, synthetic, folder / "nn_pairs.png"):
        out.append(("figures/nn_pairs.png", "Closest synthetic / training pairs (d: embedding distance, "
                                            "r: voxel correlation)"))
    return out
