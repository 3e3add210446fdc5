"""The frozen evaluation preprocessing (MAISI-compatible 2.5D protocol, and the 3D variant).

Every volume, real or synthetic, goes through the same steps before any feature network:

1. orient to RAS (index permutation only);
2. resample to ``spacing`` mm (default 1 mm isotropic);
3. pad (CT: -1000 HU; MR: the volume's 0.5th percentile) and centre-crop to ``size`` voxels,
   so volumes of different sizes and spacings land on one grid;
4. clip the intensity window (CT: [-1000, 1000] HU; MR: the volume's 0.5-99.5 percentiles).

2.5D features then use the central ``center_ratio`` (0.4) of slices along each axis, with the
index range ``[int((1 - r) / 2 * n), int((1 + r) / 2 * n))`` exactly as MAISI's
``get_features_2p5d``; per volume and plane the slice stack is min-max scaled to [0, 1]
(``+1e-10`` in the denominator), repeated to 3 channels and the channel means
(0.406, 0.456, 0.485) subtracted (no std division, no resize). 3D features use a per-volume
z-score (``(x - mean) / (std + 1e-5)``, MedicalNet's normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from medsynth.data.transforms import Grid, reorient_to_ras, resample_to_grid, target_grid
from medsynth.errors import ConfigError
from medsynth.io.volume import Volume

PLANES: tuple[str, ...] = ("xy", "yz", "zx")
"""Slice planes; ``xy`` slices are taken along Z (axis 2), ``yz`` along X (0), ``zx`` along Y (1)."""
PLANE_AXIS: dict[str, int] = {"xy": 2, "yz": 0, "zx": 1}
CHANNEL_MEANS: tuple[float, float, float] = (0.406, 0.456, 0.485)
CT_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)


@dataclass(frozen=True)
class Protocol:
    """The preprocessing settings recorded in every report.

    Attributes:
        spacing: target voxel size in mm (X, Y, Z).
        size: target grid in voxels (X, Y, Z); pad/centre-crop to it.
        center_ratio: fraction of central slices kept per axis for 2.5D features.
        ct_window: HU clip window (and pad value = its low end) for CT.
        mr_percentiles: per-volume percentile window for non-CT modalities.
        channel_means: subtracted from the 3 repeated channels (RadImageNet / MAISI).
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: tuple[int, int, int] = (512, 512, 512)
    center_ratio: float = 0.4
    ct_window: tuple[float, float] = CT_WINDOW
    mr_percentiles: tuple[float, float] = MR_PERCENTILES
    channel_means: tuple[float, float, float] = field(default=CHANNEL_MEANS)

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ConfigError(f"protocol spacing must be 3 positive mm values, got {self.spacing}")
        if len(self.size) != 3 or any(int(s) < 8 for s in self.size):
            raise ConfigError(f"protocol size must be 3 integers >= 8, got {self.size}")
        if not 0.0 < self.center_ratio <= 1.0:
            raise ConfigError(f"center slice ratio must be in (0, 1], got {self.center_ratio}")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["slice_range"] = "[int((1 - r) / 2 * n), int((1 + r) / 2 * n)) per axis"
        record["steps"] = ["orient RAS", "resample (B-spline, anti-aliased) to spacing",
                           "pad (CT -1000 HU / MR 0.5th pct) + centre-crop to size", "clip window"]
        return record


def central_slice_indices(n: int, ratio: float) -> range:
    """Indices of the central ``ratio`` of ``n`` slices, exactly MAISI's ``start:end``."""
    start = int((1.0 - ratio) / 2.0 * n)
    end = int((1.0 + ratio) / 2.0 * n)
    if end <= start:  # tiny axes: keep the middle slice rather than nothing
        start, end = n // 2, n // 2 + 1
    return range(start, end)


def _pad_crop(array: np.ndarray, size: Sequence[int], fill: float) -> np.ndarray:
    """Centre pad (with ``fill``) and centre crop ``(X, Y, Z)`` to ``size``."""
    out = array
    for axis, target in enumerate(size):
        n = out.shape[axis]
        if n < target:
            before = (target - n) // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, target - n - before)
            out = np.pad(out, pad, constant_values=fill)
        elif n > target:
            start = (n - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
    return out


def is_ct(modality: str | None) -> bool:
    """True for CT (HU window); everything else is windowed by percentiles."""
    return (modality or "").upper() == "CT"


def centre_crop_grid(grid: Grid, size: Sequence[int]) -> Grid:
    """The part of ``grid`` that :func:`_pad_crop` keeps along axes longer than ``size``.

    Resampling only onto the kept voxels gives the same values as resampling the whole field of
    view and cropping afterwards, at a fraction of the cost (a 380 mm CT at 1 mm is 55 M voxels;
    a 32^3 protocol keeps 33 k of them).
    """
    shape, affine = grid
    starts = [max((n - t) // 2, 0) for n, t in zip(shape, size)]
    new_shape = tuple(min(n, int(t)) for n, t in zip(shape, size))
    new_affine = np.array(affine, dtype=np.float64, copy=True)
    new_affine[:3, 3] = affine[:3, :3] @ np.asarray(starts, dtype=np.float64) + affine[:3, 3]
    return new_shape, new_affine  # type: ignore[return-value]


def prepare_volume(volume: Volume, modality: str | None, protocol: Protocol) -> np.ndarray:
    """Steps 1-4 above: ``Volume`` -> float32 ``protocol.size`` array on the protocol grid."""
    ras = reorient_to_ras(volume)
    grid = centre_crop_grid(target_grid(ras, protocol.spacing), protocol.size)
    resampled = resample_to_grid(ras, grid)
    array = resampled.array.astype(np.float32, copy=False)
    if is_ct(modality):
        low, high = protocol.ct_window
    else:
        low, high = (float(v) for v in np.percentile(array, protocol.mr_percentiles))
    array = _pad_crop(array, protocol.size, fill=low)
    return np.clip(array, low, high).astype(np.float32)


def slice_stack(array: np.ndarray, plane: str, ratio: float) -> np.ndarray:
    """Central slices of one plane as ``(S, H, W)``: ``xy`` -> (S=Z, X, Y), ``yz`` -> (X, Y, Z), ``zx`` -> (Y, X, Z)."""
    axis = PLANE_AXIS[plane]
    index = central_slice_indices(array.shape[axis], ratio)
    return np.moveaxis(np.take(array, np.asarray(index), axis=axis), axis, 0)


def normalise_slices(stack: np.ndarray, means: Sequence[float] = CHANNEL_MEANS) -> torch.Tensor:
    """``(S, H, W)`` -> ``(S, 3, H, W)`` float32: stack min-max to [0, 1], 3 channels, minus means."""
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    x = (x - x.min()) / (x.max() - x.min() + 1e-10)
    x = x[:, None].repeat(1, 3, 1, 1)
    return x - torch.tensor(means, dtype=torch.float32).view(1, 3, 1, 1)


def zscore_volume(array: np.ndarray) -> torch.Tensor:
    """``(X, Y, Z)`` -> ``(1, 1, X, Y, Z)`` float32 with per-volume z-score (MedicalNet)."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return ((x - x.mean()) / (x.std() + 1e-5))[None, None]
