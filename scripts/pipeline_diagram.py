"""Draw the medsynth pipeline (stages as boxes, arrows labelled with the files between them).

Usage: ``python scripts/pipeline_diagram.py [--out docs/figures/pipeline.png]``

The figure is the picture form of the mermaid chart in docs/pipeline_overview.md; keep the two in
step when a stage or a file changes. Only matplotlib is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# Box styles: what kind of thing a box is.
STYLES = {
    "input": {"face": "#e8e8e8", "edge": "#555555", "dash": None},
    "stage": {"face": "#dbe9f6", "edge": "#1f5f99", "dash": None},
    "train": {"face": "#fde9d2", "edge": "#b35900", "dash": None},
    "output": {"face": "#ddf0dd", "edge": "#2e7d32", "dash": None},
    "planned": {"face": "#ffffff", "edge": "#888888", "dash": (0, (4, 3))},
}
BOX_W, BOX_H = 3.2, 1.05
COL = 4.5  # distance between columns

# name: (x centre, y centre, text, style)
NODES: dict[str, tuple[float, float, str, str]] = {
    "scans": (0 * COL, 6.0, "real scans + labels\nNIfTI, DICOM, MHA,\nNRRD, MGZ", "input"),
    "prepare": (1 * COL, 6.0, "medsynth prepare\nRAS, spacing, splits", "stage"),
    "ae": (2 * COL, 6.0, "medsynth autoencoder fit\n(+ autoencoder eval)", "train"),
    "encode": (3 * COL, 6.0, "medsynth encode\ntiled, resumable", "stage"),
    "dit": (4 * COL, 6.0, "medsynth dit fit\ntext + metadata", "train"),
    "phantoms": (0 * COL, 3.4, "medsynth phantoms\nbuilt-in CT / MR", "stage"),
    "bank": (2 * COL, 3.4, "medsynth labels bank\ntrain-split masks", "stage"),
    "labelgen": (3 * COL, 3.4, "medsynth labels fit\nlabel generator", "train"),
    "cn": (4 * COL, 3.4, "medsynth controlnet fit\nmask branch, DiT frozen", "train"),
    "assemble": (5 * COL, 3.4, "medsynth assemble\npipeline.json + sha256", "stage"),
    "bench": (3 * COL, 0.4, "medsynth benchmark seg\nreal vs real + synthetic\n-> report.html", "output"),
    "evaluate": (4 * COL, 0.4, "medsynth evaluate\nFID family, privacy, masks\n-> report.html", "output"),
    "generate": (5 * COL, 0.4, "medsynth generate\n(cohort run)", "stage"),
}


def side(name: str, where: str, shift: float = 0.0) -> tuple[float, float]:
    """A point on a box side: where in n/s/e/w; shift moves along the side."""
    x, y = NODES[name][:2]
    gap = 0.06
    return {"n": (x + shift, y + BOX_H / 2 + gap), "s": (x + shift, y - BOX_H / 2 - gap),
            "e": (x + BOX_W / 2 + gap, y + shift), "w": (x - BOX_W / 2 - gap, y + shift)}[where]


# Each edge: points of the path (arrow head at the last), label, label position, colour, dashed.
Edge = tuple[list[tuple[float, float]], str, tuple[float, float] | None, str, bool]
DARK, GREEN, GREY = "#444444", "#2e7d32", "#999999"


def edges() -> list[Edge]:
    x = {name: NODES[name][0] for name in NODES}
    bus_top, bus_mid, bus_low = 7.45, 2.1, -0.8
    return [
        ([side("scans", "e"), side("prepare", "w")], "folder or CSV", (x["scans"] + COL / 2, 6.75), DARK, False),
        ([side("phantoms", "n", 0.6), side("prepare", "s", -0.6)], "dataset folder",
         (x["scans"] + COL / 2 + 0.35, 4.55), DARK, False),
        ([side("prepare", "e"), side("ae", "w")], "DATA/\nimagesTr labelsTr", (x["prepare"] + COL / 2, 6.8),
         DARK, False),
        ([side("ae", "e"), side("encode", "w")], "RUN/model/\nmodel.safetensors", (x["ae"] + COL / 2, 6.8),
         DARK, False),
        ([side("encode", "e"), side("dit", "w")], "CACHE/latents/\nstats.json", (x["encode"] + COL / 2, 6.8),
         DARK, False),
        ([side("dit", "s"), side("cn", "n")], "DIT/export/", (x["dit"] + 0.75, 4.7), DARK, False),
        ([side("encode", "s", 0.9), side("cn", "w", 0.25)], "CACHE/ latent +\nlabel pairs",
         (x["encode"] + 1.15, 4.55), DARK, False),
        ([side("prepare", "s", 0.6), side("bank", "w")], "DATA/labelsTr\n(train split)",
         (x["prepare"] + 0.95, 4.2), DARK, False),
        # autoencoder export and cache go to assemble over the top
        ([side("ae", "n"), (x["ae"], bus_top), (x["assemble"], bus_top), side("assemble", "n")],
         "--autoencoder RUN/model/   --cache CACHE/   --dit DIT/export/", (x["encode"] + COL / 2, bus_top + 0.25),
         DARK, False),
        ([side("encode", "n"), (x["encode"], bus_top)], "", None, DARK, False),
        ([side("dit", "n"), (x["dit"], bus_top)], "", None, DARK, False),
        ([side("cn", "e"), side("assemble", "w")], "CN/export/", (x["cn"] + COL / 2, 3.72), DARK, False),
        ([side("bank", "s"), (x["bank"], bus_mid), (x["assemble"] - 0.6, bus_mid), side("assemble", "s", -0.6)],
         "--bank BANK/ (bank.json, labels/)", (x["bank"] + 2.2, bus_mid - 0.22), DARK, False),
        ([side("prepare", "s", 1.1), (x["prepare"] + 1.1, 4.65), (x["labelgen"], 4.65), side("labelgen", "n")],
         "DATA/ labels + prompts (train split)", (x["ae"] + 1.2, 4.87), DARK, False),
        ([side("labelgen", "s"), (x["labelgen"], bus_mid)], "--label-generator LG/export/",
         (x["labelgen"] + 1.25, 2.5), DARK, False),
        ([side("assemble", "s", 0.6), side("generate", "n", 0.6)], "PIPELINE/\npipeline.json",
         (x["assemble"] + 1.55, 1.9), DARK, False),
        ([side("generate", "w"), side("evaluate", "e")], "SYN/\nprovenance.jsonl", (x["evaluate"] + COL / 2, 1.2),
         DARK, False),
        ([side("generate", "s"), (x["generate"], bus_low), (x["bench"] + 0.6, bus_low), side("bench", "s", 0.6)],
         "SYN/ image + label pairs", (x["evaluate"] + 2.55, bus_low - 0.22), DARK, False),
        # the real dataset (test split held out) into both measurements
        ([side("prepare", "s"), (x["prepare"], 0.4), side("bench", "w")],
         "real DATA/ (test split held out)", (x["prepare"] + 3.35, 0.62), GREEN, False),
        ([(x["prepare"], 0.4), (x["prepare"], -1.45), (x["evaluate"], -1.45), side("evaluate", "s")], "",
         None, GREEN, False),
    ]


def _box(ax: plt.Axes, name: str) -> None:
    x, y, text, style = NODES[name]
    s = STYLES[style]
    patch = FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                           boxstyle="round,pad=0.02,rounding_size=0.15", facecolor=s["face"],
                           edgecolor=s["edge"], linewidth=1.6, linestyle=s["dash"] or "solid", zorder=3)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=9, zorder=4,
            color="#333333" if style != "planned" else "#777777")


def _path(ax: plt.Axes, points: list[tuple[float, float]], label: str, where: tuple[float, float] | None,
          colour: str, dashed: bool) -> None:
    style = "--" if dashed else "-"
    xs, ys = zip(*points)
    if len(points) > 2:
        ax.plot(xs[:-1], ys[:-1], color=colour, linewidth=1.3, linestyle=style, zorder=2,
                solid_joinstyle="miter")
    head = points[-2:]
    bus_end = label == "" and len(points) == 2 and points[-1][1] in (7.45, 2.1)  # joins a bus: no head
    ax.add_patch(FancyArrowPatch(head[0], head[1], arrowstyle="-" if bus_end else "-|>", mutation_scale=14,
                                 linewidth=1.3, color=colour, linestyle=style, zorder=2,
                                 shrinkA=0, shrinkB=0))
    if label and where is not None:
        ax.text(where[0], where[1], label, ha="center", va="center", fontsize=8, family="monospace",
                color=colour if colour != GREY else "#777777", zorder=5,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.92})


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(18, 8.4))
    ax.set_xlim(-1.7, 5 * COL + 1.7)
    ax.set_ylim(-1.9, 8.6)
    ax.axis("off")
    for name in NODES:
        _box(ax, name)
    for points, label, where, colour, dashed in edges():
        _path(ax, points, label, where, colour, dashed)
    # Legend and title.
    legend = [("input", "your data"), ("stage", "data stage"), ("train", "training stage"),
              ("output", "measurement")]
    for i, (style, text) in enumerate(legend):
        s = STYLES[style]
        ax.add_patch(FancyBboxPatch((-1.5 + i * 2.3, 8.15), 0.4, 0.28, boxstyle="round,pad=0.02",
                                    facecolor=s["face"], edgecolor=s["edge"], linestyle=s["dash"] or "solid"))
        ax.text(-1.0 + i * 2.3, 8.29, text, va="center", fontsize=9.5)
    ax.text(5 * COL + 1.6, 8.29, "medsynth: commands (boxes) and the files between them (arrows)",
            ha="right", va="center", fontsize=12, weight="bold")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures"
                        / "pipeline.png")
    print(draw(parser.parse_args().out))


if __name__ == "__main__":
    main()
