"""Reconstruction quality of an autoencoder on whole held-out volumes.

Metrics, overall and per label class:
- PSNR (dB) on the model window rescaled to ``[0, 1]`` (CT: HU [-1000, 1000] -> [0, 1]);
- 3D SSIM with a Gaussian window (11 voxels, sigma 1.5, K1 0.01, K2 0.03; MONAI's defaults, so
  the overall value equals ``monai.metrics.SSIMMetric``); per class it is the mean of the SSIM
  map over the class's voxels;
- MAE in physical units (HU for CT, scanner units for MR) between the reconstruction mapped
  back through the intensity mapping and the input clipped to the same window (values outside
  the window are not representable by the model by construction).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.data.transforms import IntensityMapping

K1, K2 = 0.01, 0.03


def _gaussian_1d(win: int, sigma: float) -> torch.Tensor:
    x = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map_3d(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
                sigma: float = 1.5) -> torch.Tensor:
    """Local SSIM of ``(B, 1, X, Y, Z)`` volumes over the valid region:
    ``(B, 1, X-w+1, Y-w+1, Z-w+1)`` (float64). The window shrinks (odd) for axes shorter than it."""
    win = min(win_size, *(s if s % 2 else s - 1 for s in x.shape[2:]))
    win = max(win, 1)
    g = _gaussian_1d(win, sigma).to(x.device)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid padding
        t = F.conv3d(t, g.view(1, 1, -1, 1, 1))
        t = F.conv3d(t, g.view(1, 1, 1, -1, 1))
        return F.conv3d(t, g.view(1, 1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    # unbiased local (co)variances, as MONAI computes them
    n = win ** 3
    cov_norm = n / (n - 1) if n > 1 else 1.0
    sxx = cov_norm * (blur(x * x) - mu_x ** 2)
    syy = cov_norm * (blur(y * y) - mu_y ** 2)
    sxy = cov_norm * (blur(x * y) - mu_x * mu_y)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))


def _psnr(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def reconstruction_metrics(image: np.ndarray, recon: np.ndarray, mapping: IntensityMapping,
                           label: np.ndarray | None = None,
                           labels: dict[str, int] | None = None) -> dict[str, Any]:
    """Metrics of one volume.

    Args:
        image, recon: ``(X, Y, Z)`` in the model range (``mapping``'s output range).
        mapping: the intensity mapping used (for physical units and the [0, 1] rescaling).
        label: ``(X, Y, Z)`` integer label map on the same grid, for per-class metrics.
        labels: class name -> value (names in the output); background 0 included.

    Returns:
        ``{"psnr", "ssim", "mae", "per_class": {name: {"psnr", "ssim", "mae", "voxels"}}}``.
    """
    span = mapping.out_high - mapping.out_low
    a = (np.asarray(image, np.float64) - mapping.out_low) / span  # [0, 1]
    b = np.clip((np.asarray(recon, np.float64) - mapping.out_low) / span, 0.0, 1.0)
    sq = (a - b) ** 2
    abs_phys = np.abs(np.asarray(mapping.inverse(np.asarray(recon, np.float64)))
                      - np.asarray(mapping.inverse(np.asarray(image, np.float64))))
    smap = ssim_map_3d(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])[0, 0].numpy()
    out: dict[str, Any] = {"psnr": _psnr(float(sq.mean())), "ssim": float(smap.mean()),
                           "mae": float(abs_phys.mean())}
    if label is not None:
        # the SSIM map covers the valid region only: crop the label the same way
        off = [(s - m) // 2 for s, m in zip(label.shape, smap.shape)]
        lab_c = label[off[0]:off[0] + smap.shape[0], off[1]:off[1] + smap.shape[1], off[2]:off[2] + smap.shape[2]]
        names = {v: k for k, v in (labels or {}).items()}
        per: dict[str, Any] = {}
        for value in np.unique(label):
            mask = label == value
            mask_c = lab_c == value
            name = names.get(int(value), str(int(value)))
            per[name] = {"psnr": _psnr(float(sq[mask].mean())),
                         "ssim": float(smap[mask_c].mean()) if mask_c.any() else None,
                         "mae": float(abs_phys[mask].mean()), "voxels": int(mask.sum())}
        out["per_class"] = per
    return out


def aggregate(per_case: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over cases of the overall metrics, and per class over the cases that contain it."""
    if not per_case:
        return {}
    out: dict[str, Any] = {k: float(np.mean([c[k] for c in per_case])) for k in ("psnr", "ssim", "mae")}
    classes: dict[str, list[dict[str, Any]]] = {}
    for c in per_case:
        for name, m in c.get("per_class", {}).items():
            classes.setdefault(name, []).append(m)
    out["per_class"] = {
        name: {"psnr": float(np.mean([m["psnr"] for m in ms if np.isfinite(m["psnr"])] or [float("inf")])),
               "ssim": (float(np.mean([m["ssim"] for m in ms if m["ssim"] is not None]))
                        if any(m["ssim"] is not None for m in ms) else None),
               "mae": float(np.mean([m["mae"] for m in ms])), "cases": len(ms)}
        for name, ms in classes.items()}
    return out


def metrics_markdown(result: dict[str, Any]) -> str:
    """A readable report of :func:`aggregate`'s output plus context keys."""
    unit = result.get("unit", "")
    lines = [f"# Autoencoder reconstruction ({result.get('split', '?')} split, {result.get('num_cases', 0)} cases)",
             "", f"Model: `{result.get('model', '')}` (sha256 {str(result.get('model_sha256', ''))[:12]})  ",
             f"Data: `{result.get('data', '')}`  ",
             f"Tiling: window {result.get('window')}, overlap {result.get('overlap')}", "",
             "PSNR on the intensity window rescaled to [0, 1]; 3D SSIM (Gaussian 11, sigma 1.5); "
             f"MAE in {unit or 'physical units'} (input clipped to the window).", ""]
    agg = result.get("overall", {})
    if agg:
        lines += ["| class | cases | PSNR (dB) | SSIM | MAE |", "|---|---|---|---|---|",
                  f"| **all** | {result.get('num_cases', 0)} | {agg['psnr']:.2f} | {agg['ssim']:.4f} | {agg['mae']:.2f} |"]
        for name, m in agg.get("per_class", {}).items():
            ssim = "n/a" if m["ssim"] is None else f"{m['ssim']:.4f}"
            lines.append(f"| {name} | {m['cases']} | {m['psnr']:.2f} | {ssim} | {m['mae']:.2f} |")
    for w in result.get("warnings", []):
        lines += ["", f"> warning: {w}"]
    return "\n".join(lines) + "\n"


def evaluate_autoencoder(model, export, data_dir, split: str = "test",
                         window: tuple[int, int, int] | None = None,
                         overlap: tuple[int, int, int] | None = None,
                         device: torch.device | str = "cpu", max_cases: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Tiled reconstruction of every case of ``split`` and its metrics (see module docstring).

    Returns a JSON-friendly dict: context, ``overall`` (:func:`aggregate`) and ``cases``.
    """
    from pathlib import Path

    from tqdm.auto import tqdm

    from medsynth.data.manifest import read_dataset
    from medsynth.data.patches import dataset_modality, load_case
    from medsynth.errors import InputError
    from medsynth.models.tiling import reconstruct_tiled
    from medsynth.pipelines.latent_cache import compatibility_warnings

    dataset = read_dataset(data_dir)
    cases = dataset.cases_for(split) if dataset.splits else list(dataset.cases)
    if max_cases:
        cases = cases[:max_cases]
    if not cases:
        raise InputError(f"the {split} split is empty; nothing to evaluate", dataset.root)
    results, warns = [], []
    for case in tqdm(cases, desc=f"eval {split}", unit="case", disable=not progress):
        volume, array, mapping, label = load_case(dataset, case)
        if not results:
            warns = compatibility_warnings(export, dataset, [volume.spacing])
        x = torch.from_numpy(array)[None, None]
        recon = reconstruct_tiled(model, x, window=window, overlap=overlap, output_device="cpu")[0, 0].numpy()
        m = reconstruction_metrics(array, recon, mapping, label, dataset.labels)
        m["case_id"] = case.case_id
        results.append(m)
    f = model.downsample_factor
    win = list(window or model.config.patch_size)
    return {"model": str(export.path), "model_sha256": export.sha256, "data": str(Path(data_dir)),
            "split": split, "num_cases": len(results), "modality": dataset_modality(dataset),
            "unit": "HU" if dataset_modality(dataset) == "CT" else "scanner units",
            "window": win, "overlap": list(overlap or [max(f, (w // 4) // f * f) for w in win]),
            "warnings": warns, "overall": aggregate(results), "cases": results}
