"""Draw docs/figures/phantoms_ct.png and phantoms_mr.png: three planes of a few phantom cases.

Each row is one case; columns are axial, coronal and sagittal slices through the case's first
lesion (or through the liver / brain centre when it has none), with the label map drawn as
coloured contours. Axial and coronal views are in radiological convention (the patient's right
on the viewer's left); sagittal views have anterior on the left. CT uses a soft-tissue window
(W400/L40); MR is scaled to its 0.5-99.5 percentiles.

Usage: python scripts/phantom_figure.py [--out-dir docs/figures] [--size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

from medsynth.data.phantoms import PhantomCase, generate_phantom, phantom_labels  # noqa: E402

# (seed, lesion_rate) per row, picked to show each contrast and a lesion of clear size; a
# lesion rate of 1.0 forces lesions (the anatomy of a seed does not depend on the rate).
ROWS: dict[str, list[tuple[int, float]]] = {"ct": [(0, 0.0), (5, 0.0), (15, 1.0)],
                                            "mr": [(0, 0.0), (32, 1.0), (15, 1.0)]}


def _focus(case: PhantomCase, modality: str) -> np.ndarray:
    """Voxel index ``(i, j, k)`` the sagittal, coronal and axial planes pass through.

    Lesion cases: the first lesion's centre. Otherwise CT: axial between liver and kidneys,
    coronal through the kidneys, sagittal through the right kidney; MR: axial and coronal
    through the ventricles, sagittal through the right lateral ventricle.
    """
    if case.metadata["lesions"]:
        return np.array(case.metadata["lesions"][0]["center_vox"])
    lab = case.label.array
    labels = phantom_labels(modality)

    def centroid(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask).mean(axis=0)

    if modality == "ct":
        liver = centroid(lab == labels["liver"])
        kidneys = centroid((lab == labels["kidney_left"]) | (lab == labels["kidney_right"]))
        right = centroid(lab == labels["kidney_right"])
        at = np.array([right[0], kidneys[1], (liver[2] + kidneys[2]) / 2])
    else:
        vent = lab == labels["ventricles"]
        mid = centroid(vent)
        vent_right = vent.copy()
        vent_right[: int(round(mid[0]))] = False  # +x (higher index) is the patient's right
        at = np.array([centroid(vent_right)[0], mid[1], mid[2]])
    return np.round(at).astype(int)


def _planes(vol: np.ndarray, at: np.ndarray, spacing: tuple[float, ...]) -> list[tuple[np.ndarray, float]]:
    """(2D display array, pixel aspect) for axial, coronal, sagittal; rows run top to bottom."""
    sx, sy, sz = spacing
    axial = vol[:, :, at[2]][::-1, ::-1].T  # rows: anterior -> posterior; cols: right -> left
    coronal = vol[:, at[1], :][::-1, ::-1].T  # rows: superior -> inferior; cols: right -> left
    sagittal = vol[at[0], :, :][::-1, ::-1].T  # rows: superior -> inferior; cols: anterior -> posterior
    return [(axial, sy / sx), (coronal, sz / sx), (sagittal, sz / sy)]


def draw(modality: str, out: Path, size: int, seed_offset: int) -> None:
    """Render one modality's figure to ``out``."""
    labels = {k: v for k, v in phantom_labels(modality).items() if v > 0}
    colours = plt.get_cmap("tab10")
    rows = ROWS[modality]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.0, 3.0 * len(rows) + 0.6), facecolor="black")
    for r, (seed, rate) in enumerate(rows):
        case = generate_phantom(modality, size=size, seed=seed + seed_offset, lesion_rate=rate)
        img, lab = case.image.array, case.label.array
        if modality == "ct":
            vmin, vmax = 40 - 200, 40 + 200
        else:
            vmin, vmax = np.percentile(img, [0.5, 99.5])
        at = _focus(case, modality)
        for c, ((im2, aspect), (lab2, _)) in enumerate(zip(_planes(img, at, case.image.spacing),
                                                           _planes(lab, at, case.image.spacing))):
            ax = axes[r, c]
            ax.imshow(im2, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="bilinear")
            for i, (name, value) in enumerate(labels.items()):
                if (lab2 == value).any():
                    ax.contour(lab2 == value, levels=[0.5], colors=[colours(i % 10)], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            if r == 0:
                ax.set_title(["axial (R on left)", "coronal (R on left)", "sagittal (A on left)"][c],
                             color="white", fontsize=9)
        axes[r, 0].set_ylabel(textwrap.fill(case.prompt, 34), color="white", fontsize=7.5)
    handles = [Line2D([0], [0], color=colours(i % 10), lw=2, label=name) for i, name in enumerate(labels)]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7.5, frameon=False, labelcolor="white")
    window = "W400/L40" if modality == "ct" else "0.5-99.5 percentile"
    fig.suptitle(f"medsynth {modality.upper()} phantoms, {size}^3, {window}; contours: labels",
                 color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
    _save_paletted(out, [colours(i % 10) for i in range(len(labels))])


def _save_paletted(path: Path, colours: list[tuple[float, ...]]) -> None:
    """Rewrite a PNG with 240 greys + the contour colours: small (< 300 KB), colours exact."""
    palette = [int(g) for g in np.linspace(0, 255, 240) for _ in range(3)]
    for c in colours:
        palette += [int(round(255 * ch)) for ch in c[:3]]
    palette += [0] * (768 - len(palette))
    holder = Image.new("P", (1, 1))
    holder.putpalette(palette)
    rgb = Image.open(path).convert("RGB")
    rgb.quantize(palette=holder, dither=Image.Dither.NONE).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="added to each row's seed")
    args = parser.parse_args()
    for modality in ("ct", "mr"):
        out = args.out_dir / f"phantoms_{modality}.png"
        draw(modality, out, args.size, args.seed)
        print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
