"""Callbacks for autoencoder training: slice figures of input vs reconstruction, and export.

Both write only on global rank 0, so multi-GPU runs produce one figure and one export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from medsynth.io.atomic import atomic_path
from medsynth.io.checkpoint import save_autoencoder


def save_slice_figure(path: str | Path, image: np.ndarray, recon: np.ndarray, title: str = "") -> Path:
    """Write a PNG: centre axial/coronal/sagittal slices of input, reconstruction and |error|.

    Args:
        image, recon: ``(X, Y, Z)`` arrays in ``[-1, 1]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def planes(v: np.ndarray) -> list[np.ndarray]:
        cx, cy, cz = (s // 2 for s in v.shape)
        # transpose so that the second axis is horizontal, as in a radiology viewer
        return [v[:, :, cz].T, v[:, cy, :].T, v[cx, :, :].T]

    rows = [("input", planes(image), (-1, 1), "gray"), ("reconstruction", planes(recon), (-1, 1), "gray"),
            ("|error|", planes(np.abs(recon - image)), (0, 0.5), "magma")]
    fig, axes = plt.subplots(3, 3, figsize=(7.5, 7.5))
    for r, (name, imgs, (lo, hi), cmap) in enumerate(rows):
        for c, (img, plane) in enumerate(zip(imgs, ("axial", "coronal", "sagittal"))):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(plane)
            if c == 0:
                ax.set_ylabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


class ReconstructionFigure(L.Callback):
    """After validation, every ``every_n_steps`` generator steps, save a slice figure."""

    def __init__(self, directory: str | Path, every_n_steps: int = 200) -> None:
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self._last = -1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        sample = getattr(pl_module, "last_validation", None)
        step = int(pl_module.generator_step)
        if sample is None or (self._last >= 0 and step - self._last < self.every_n_steps):
            return
        self._last = step
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        title = f"step {step}  " + "  ".join(f"{k[4:]} {v:.3f}" for k, v in sorted(metrics.items()))
        save_slice_figure(self.directory / f"step_{step:07d}.png", sample["input"][0, 0].numpy(),
                          sample["recon"][0, 0].numpy(), title)


class ExportOnTrainEnd(L.Callback):
    """At the end of fitting, call ``pl_module.export(directory)`` on rank 0 (DiT, ControlNet)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.directory)


class ExportAutoencoder(L.Callback):
    """At the end of fitting, write ``config.json`` + ``model.safetensors`` to ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        metadata = dict(pl_module.metadata)
        metadata["trained_steps"] = int(pl_module.generator_step)
        metadata["training"] = pl_module.cfg.to_dict()
        metadata["discriminator"] = dict(pl_module.hparams.get("discriminator") or {})
        save_autoencoder(self.directory, pl_module.model, metadata)
