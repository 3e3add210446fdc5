"""The demo's one-page report: every stage's figures and numbers, linked from one ``report.html``.

Each stage of ``medsynth demo`` writes its own files (autoencoder figures and metrics, the
synthetic dataset, the evaluation report, the segmentation benchmark); this module draws the
paired image+label gallery of a dataset folder and writes the page that links them all.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medsynth.data.manifest import read_dataset  # noqa: E402
from medsynth.io import read_volume  # noqa: E402
from medsynth.io.atomic import atomic_path, write_text_atomic  # noqa: E402

# Soft-tissue window for CT display (W400/L40), as radiologists read abdomen CT.
CT_DISPLAY_WINDOW = (-160.0, 240.0)


@dataclass
class ReportSection:
    """One stage in the report: a title, lines of text, links and figures (paths relative to the page)."""

    title: str
    lines: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (relative path, text)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)


def _display_range(array: np.ndarray, unit: str | None) -> tuple[float, float]:
    if unit == "HU":
        return CT_DISPLAY_WINDOW
    low, high = np.percentile(array, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def _for_display(plane: np.ndarray) -> np.ndarray:
    """A RAS slice ``(a, b)`` as an image: b (anterior/superior) up, a (right/anterior) on the left.

    Transposing puts the first in-plane axis on the columns; flipping both axes puts its positive
    end (patient right, or anterior for sagittal) on the left and the second axis's positive end
    at the top: radiological convention.
    """
    return np.flip(plane.T)


def paired_gallery(dataset_root: str | Path, out_png: str | Path, max_cases: int = 4, title: str = "") -> Path:
    """Axial/coronal/sagittal central slices of image + label contours for a dataset's first cases.

    Slices go through the label map's centre of mass, so organs (and lesions) are in view.
    Display convention: the array is in RAS; axial and coronal are shown with the patient's right
    on the left (radiological), sagittal with anterior on the left.
    """
    dataset = read_dataset(dataset_root)
    cases = [c for c in dataset.cases if c.label is not None][:max_cases]
    fig, axes = plt.subplots(max(len(cases), 1), 3, figsize=(7.5, 2.5 * max(len(cases), 1)), squeeze=False)
    for row, case in enumerate(cases):
        image = read_volume(case.image)
        label = read_volume(case.label, kind="label").array
        vmin, vmax = _display_range(image.array, image.metadata.intensity_unit)
        lesion_values = [v for k, v in dataset.labels.items() if "lesion" in k or "tumour" in k]
        focus = np.isin(label, lesion_values) if np.isin(label, lesion_values).any() else label > 0
        centre = [int(round(c)) for c in np.argwhere(focus).mean(axis=0)] if focus.any() else \
            [s // 2 for s in label.shape]
        planes = (("axial", 2), ("coronal", 1), ("sagittal", 0))
        for col, (name, axis) in enumerate(planes):
            img = np.take(image.array, centre[axis], axis=axis)
            lab = np.take(label, centre[axis], axis=axis)
            ax = axes[row, col]
            ax.imshow(_for_display(img), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            # One outline per label: contouring the label values as a height map would draw
            # every intermediate level where, e.g., spine (7) meets body (1).
            shown = _for_display(lab)
            for value in np.unique(shown[shown > 0]):
                ax.contour(shown == value, levels=[0.5], linewidths=0.6,
                           colors=[plt.cm.tab10(int(value) % 10)])
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{case.case_id}\n{(case.prompt or '')[:38]}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out_png


def render_demo_html(sections: Sequence[ReportSection], summary: dict) -> str:
    """The demo page: a section per stage, then the run record as JSON."""
    esc = html.escape
    parts = []
    for section in sections:
        lines = "".join(f"<li>{esc(line)}</li>" for line in section.lines)
        links = "".join(f"<li><a href='{esc(path)}'>{esc(text)}</a></li>" for path, text in section.links)
        figures = "".join(f"<figure><img src='{esc(path)}' style='max-width:100%'><figcaption>{esc(caption)}"
                          f"</figcaption></figure>" for path, caption in section.figures)
        parts.append(f"<h2>{esc(section.title)}</h2><ul>{lines}{links}</ul>{figures}")
    record = esc(json.dumps(summary, indent=1, default=str))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>medsynth demo</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}figure{margin:1em 0}"
            "figcaption{font-size:90%;color:#444}</style></head><body><h1>medsynth demo</h1>"
            "<p>Every stage of the pipeline on procedural phantoms. Tiny models trained for minutes on "
            "a CPU: the numbers show that each stage runs and is measured, not what a trained model "
            "reaches.</p>" + "".join(parts) + f"<h2>Run record</h2><pre>{record}</pre></body></html>\n")


def write_demo_report(out_dir: str | Path, sections: Sequence[ReportSection], summary: dict) -> Path:
    """Write ``out_dir/report.html`` atomically; returns its path."""
    path = Path(out_dir) / "report.html"
    write_text_atomic(path, render_demo_html(sections, summary))
    return path
