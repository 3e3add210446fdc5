"""Diversity: MS-SSIM among generated pairs, beside the same number among real pairs.

High MS-SSIM between random pairs of generated volumes means the generator repeats itself
(mode collapse); the real-real value is what natural variation looks like. MONAI's 3D
MS-SSIM is used on the normalised thumbnails (window mapped to [0, 1]). The default 5-scale
MS-SSIM needs every side > (kernel - 1) * 16, so on small volumes the kernel shrinks (11, 7, 5,
3) and, if needed, the number of scales, with the standard weights truncated and renormalised;
the kernel and weights used are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics.regression import compute_ms_ssim

from medsynth.errors import ConfigError

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNELS: tuple[int, ...] = (11, 7, 5, 3)


def ms_ssim_settings(shape: Sequence[int]) -> tuple[int, tuple[float, ...]]:
    """The largest kernel and most scales that MONAI's MS-SSIM accepts for ``shape``."""
    side = min(shape)
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        for kernel in KERNELS:
            if side // max(1, scales - 1) ** 2 > kernel - 1:
                weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
                return kernel, tuple(float(w) for w in weights / weights.sum())
    raise ConfigError(f"volumes of shape {tuple(shape)} are too small for MS-SSIM (need every side >= 3)")


def ms_ssim(a: np.ndarray, b: np.ndarray, kernel: int, weights: Sequence[float]) -> float:
    """MS-SSIM of two ``(X, Y, Z)`` volumes in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(b, np.float32))[None, None]
    return float(compute_ms_ssim(x, y, spatial_dims=3, data_range=1.0, kernel_size=kernel, weights=weights)[0])


def random_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` distinct unordered pairs of ``range(n)`` (all of them when few)."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(pairs) > max_pairs:
        pick = rng.choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[k] for k in sorted(pick)]
    return pairs


def pairwise_ms_ssim(volumes: Sequence[np.ndarray], max_pairs: int = 100, seed: int = 0) -> dict[str, Any]:
    """Mean and sd of MS-SSIM over random pairs of same-shape ``(X, Y, Z)`` volumes in [0, 1].

    Raises:
        ConfigError: fewer than 2 volumes.
    """
    if len(volumes) < 2:
        raise ConfigError(f"MS-SSIM diversity needs at least 2 volumes, got {len(volumes)}")
    kernel, weights = ms_ssim_settings(volumes[0].shape)
    pairs = random_pairs(len(volumes), max_pairs, np.random.default_rng(seed))
    values = [ms_ssim(volumes[i], volumes[j], kernel, weights) for i, j in pairs]
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "pairs": len(pairs),
            "kernel_size": kernel, "weights": list(weights), "shape": list(volumes[0].shape)}
