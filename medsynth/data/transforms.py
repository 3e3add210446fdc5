"""Canonical preprocessing of one volume: RAS orientation, target spacing, crop/pad, intensities.

Every function here keeps anatomy where it is in the world: an array change always comes with
the matching affine change, so a structure's RAS millimetre position is the same before and
after (to interpolation accuracy). Image and label of one case must go through the *same*
grid operations; :func:`target_grid` and :func:`crop_pad_window` compute a grid once so both can
be resampled / cut onto it.

Intensity mapping is deliberately *not* applied to stored images: :class:`IntensityMapping`
records the CT window or MR percentiles so that training code maps HU / a.u. to ``[-1, 1]`` on
the fly and generated volumes can be mapped back to physical units with ``inverse``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from medsynth.errors import ConfigError, InputError
from medsynth.io.geometry import itk_from_affine, reorient
from medsynth.io.itk import to_sitk
from medsynth.io.volume import Volume

Grid = tuple[tuple[int, int, int], np.ndarray]
"""A voxel grid: shape ``(X, Y, Z)`` and its ``(4, 4)`` RAS affine."""

CropPolicy = Literal["none", "foreground", "label"]
CROP_POLICIES: tuple[str, ...] = ("none", "foreground", "label")

DEFAULT_CT_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
DEFAULT_MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)
# Spacings closer than this (mm) count as equal: no interpolation is done at all, which keeps
# already-canonical data bit-exact instead of blurring it through a no-op B-spline.
SPACING_TOLERANCE_MM = 1e-3


# ---------------------------------------------------------------------------------------------
# Orientation and resampling
# ---------------------------------------------------------------------------------------------


def reorient_to_ras(volume: Volume) -> Volume:
    """The volume with array axes flipped/permuted so that they run (closest to) R, A, S.

    Pure index permutation (no interpolation), so voxel values and world positions are exact.
    An oblique acquisition stays oblique: the affine keeps its small rotation, only the axis
    order and signs change.

    Args:
        volume: any 3D volume, array ``(X, Y, Z)``.

    Returns:
        A new volume whose ``orientation`` is ``("R", "A", "S")``; array ``(X', Y', Z')`` is a
        permutation of the input shape.
    """
    array, affine = reorient(volume.array, volume.affine, "RAS")
    out = volume.with_array(array, affine=affine)
    out.metadata.orientation = ("R", "A", "S")
    return out


def target_grid(volume: Volume, spacing: Sequence[float] | None) -> Grid:
    """The grid with ``spacing`` that covers the same field of view as ``volume``.

    The new grid keeps the volume's axis directions and is centred on the same world point as
    the old one (so no half-voxel shift creeps in when the voxel size changes); its size is
    ``round(n * old_spacing / new_spacing)`` per axis, at least 1.

    Args:
        volume: the source volume (usually already in RAS).
        spacing: target voxel size in mm along the array axes, or None to keep the grid.

    Returns:
        ``(shape, affine)`` of the target grid.
    """
    if spacing is None:
        return volume.shape, volume.affine.copy()
    new_spacing = _check_spacing(spacing)
    old_spacing = np.asarray(volume.spacing)
    old_shape = np.asarray(volume.shape, dtype=float)
    new_shape = np.maximum(1, np.round(old_shape * old_spacing / new_spacing)).astype(int)
    direction = volume.direction
    centre = volume.affine @ np.append((old_shape - 1) / 2, 1.0)
    affine = np.eye(4)
    affine[:3, :3] = direction * new_spacing[None, :]
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((new_shape - 1) / 2)
    return tuple(int(n) for n in new_shape), affine  # type: ignore[return-value]


def resample_to_grid(volume: Volume, grid: Grid) -> Volume:
    """Resample ``volume`` onto ``grid`` with SimpleITK.

    Images use cubic B-spline interpolation after a Gaussian anti-aliasing blur along axes that
    get coarser, and are clipped to the input's value range (B-splines overshoot at edges, which
    would invent HU values below air). Labels use nearest neighbour and keep their dtype.
    Points outside the input get the input minimum (images) or 0 (labels).

    Args:
        volume: source volume, array ``(X, Y, Z)``.
        grid: target ``(shape, affine)`` as from :func:`target_grid`.

    Returns:
        A volume on ``grid``: array of shape ``grid[0]``; float32 for resampled images (a volume
        already on ``grid`` is returned unchanged, in its own dtype).
    """
    shape, affine = grid
    if volume.shape == tuple(shape) and np.allclose(volume.affine, affine, atol=SPACING_TOLERANCE_MM):
        # Already on the grid: interpolating would only blur.
        return volume.with_array(volume.array.copy(), affine=affine)
    is_label = volume.kind == "label"
    source = volume.array if is_label else volume.array.astype(np.float32)
    image = to_sitk(volume.with_array(source))
    if not is_label:
        image = _antialias(image, np.asarray(volume.spacing), np.linalg.norm(affine[:3, :3], axis=0))
    origin, spacing, direction = itk_from_affine(affine)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in shape])
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(direction)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline3)
    fill = 0.0 if is_label else float(source.min())
    resampler.SetDefaultPixelValue(fill)
    array = sitk.GetArrayFromImage(resampler.Execute(image)).transpose(2, 1, 0)
    if is_label:
        array = array.astype(volume.array.dtype, copy=False)
    else:
        array = np.clip(array, source.min(), source.max()).astype(np.float32, copy=False)
    return volume.with_array(np.ascontiguousarray(array), affine=affine)


def _antialias(image: sitk.Image, old_spacing: np.ndarray, new_spacing: np.ndarray) -> sitk.Image:
    # Same rule as scikit-image's resize: sigma = (factor - 1) / 2 voxels, only when downsampling.
    # Without it a 0.5 mm -> 1.5 mm resample aliases thin bright structures. Axis i of the source
    # is compared with axis i of the target: true for target_grid, which keeps the directions.
    factor = new_spacing / old_spacing
    sigma_mm = np.where(factor > 1 + 1e-6, (factor - 1) / 2 * old_spacing, 0.0)
    if not np.any(sigma_mm > 0):
        return image
    return sitk.DiscreteGaussian(image, variance=[float(s) ** 2 for s in sigma_mm],
                                 maximumKernelWidth=64, useImageSpacing=True)


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    values = np.asarray(list(spacing), dtype=float)
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ConfigError(f"spacing must be three positive numbers in mm, got {list(spacing)!r}")
    return values


# ---------------------------------------------------------------------------------------------
# Crop / pad
# ---------------------------------------------------------------------------------------------


def crop_pad_window(mask: np.ndarray | None, shape: Sequence[int], *, margin: Sequence[int] = (0, 0, 0),
                    multiple_of: int = 1) -> tuple[tuple[int, int], ...]:
    """Index window ``[(start, stop)] * 3`` to cut from a grid of ``shape``.

    Starts from the bounding box of ``mask`` grown by ``margin`` voxels and clipped to the grid
    (or the whole grid when ``mask`` is None or empty), then grows each axis symmetrically to a
    multiple of ``multiple_of``. A window may extend beyond the grid; :func:`apply_window` pads
    there.

    Args:
        mask: boolean ``(X, Y, Z)`` foreground, or None.
        shape: grid shape ``(X, Y, Z)``.
        margin: voxels kept around the mask's bounding box, per axis.
        multiple_of: every output size is a multiple of this (the latent downsampling factor).

    Returns:
        Three ``(start, stop)`` pairs in index coordinates of the grid.
    """
    if multiple_of < 1:
        raise ConfigError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    window = [[0, int(n)] for n in shape]
    if mask is not None and mask.any():
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            hits = np.flatnonzero(mask.any(axis=other))
            window[axis] = [max(0, int(hits[0]) - int(margin[axis])),
                            min(int(shape[axis]), int(hits[-1]) + 1 + int(margin[axis]))]
    for bounds in window:
        extra = (-(bounds[1] - bounds[0])) % multiple_of
        bounds[0] -= extra // 2
        bounds[1] += extra - extra // 2
    return tuple((a, b) for a, b in window)


def apply_window(volume: Volume, window: Sequence[tuple[int, int]], fill: float) -> Volume:
    """Cut ``window`` out of ``volume``, padding with ``fill`` where it leaves the grid.

    The affine is shifted by the window start, so world positions do not move.

    Args:
        volume: array ``(X, Y, Z)``.
        window: three ``(start, stop)`` index pairs, as from :func:`crop_pad_window`.
        fill: value for voxels outside the input grid.

    Returns:
        A volume of shape ``(stop - start)`` per axis.
    """
    shape = volume.shape
    out_shape = tuple(b - a for a, b in window)
    out = np.full(out_shape, fill, dtype=volume.array.dtype)
    src, dst = [], []
    for (a, b), n in zip(window, shape):
        lo, hi = max(a, 0), min(b, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - a, lo - a + max(0, hi - lo)))
    out[tuple(dst)] = volume.array[tuple(src)]
    shift = np.eye(4)
    shift[:3, 3] = [a for a, _ in window]
    return volume.with_array(out, affine=volume.affine @ shift)


# ---------------------------------------------------------------------------------------------
# Intensities
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntensityMapping:
    """A clipped linear map from physical units to the model range, and back.

    ``forward`` clips ``[low, high]`` (HU for CT, scanner units for MR) and maps it linearly onto
    ``[out_low, out_high]``; ``inverse`` undoes it, so ``inverse(forward(x)) == x`` for ``x``
    inside the window. Both accept a numpy array or a torch tensor of any shape and return the
    same type.

    Attributes:
        kind: "ct_window" (fixed HU window) or "mr_percentiles" (per-case percentiles).
        low: physical value mapped to ``out_low``.
        high: physical value mapped to ``out_high``.
        out_low: model-range minimum.
        out_high: model-range maximum.
        percentiles: for "mr_percentiles", the percentiles that gave ``low`` and ``high``.
    """

    kind: str
    low: float
    high: float
    out_low: float = -1.0
    out_high: float = 1.0
    percentiles: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ConfigError(f"intensity window must satisfy low < high, got [{self.low}, {self.high}]")
        if not self.out_high > self.out_low:
            raise ConfigError(f"output range must satisfy out_low < out_high, got [{self.out_low}, {self.out_high}]")

    @classmethod
    def ct_window(cls, window: Sequence[float] = DEFAULT_CT_WINDOW) -> "IntensityMapping":
        """The fixed CT window (HU) mapping ``[window[0], window[1]]`` to ``[-1, 1]``."""
        low, high = (float(v) for v in window)
        return cls(kind="ct_window", low=low, high=high)

    @classmethod
    def mr_percentiles(cls, array: np.ndarray, percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES,
                       source: str | None = None) -> "IntensityMapping":
        """Per-case MR scaling: the given percentiles of ``array`` map to ``[-1, 1]``.

        Args:
            array: the image ``(X, Y, Z)`` in scanner units.
            percentiles: lower and upper percentile, in ``[0, 100]``.
            source: the file the array came from, named in errors.

        Raises:
            InputError: the image is (nearly) constant, so no scaling can be derived.
        """
        p_low, p_high = (float(p) for p in percentiles)
        if not 0 <= p_low < p_high <= 100:
            raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {list(percentiles)}")
        low, high = (float(v) for v in np.percentile(array, [p_low, p_high]))
        if not high > low:
            raise InputError(f"image is constant between the {p_low} and {p_high} percentiles "
                             f"(value {low}); MR percentile scaling needs contrast", source)
        return cls(kind="mr_percentiles", low=low, high=high, percentiles=(p_low, p_high))

    @property
    def scale(self) -> float:
        """Model units per physical unit."""
        return (self.out_high - self.out_low) / (self.high - self.low)

    def forward(self, x: Any) -> Any:
        """Physical units -> model range: clip to ``[low, high]``, then map linearly."""
        x = _as_array(x)
        return (x.clip(self.low, self.high) - self.low) * self.scale + self.out_low

    def inverse(self, y: Any) -> Any:
        """Model range -> physical units; values outside ``[out_low, out_high]`` are clipped."""
        y = _as_array(y)
        return (y.clip(self.out_low, self.out_high) - self.out_low) / self.scale + self.low

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record, as stored in ``dataset.json`` / ``preprocessing.json``."""
        out = asdict(self)
        if self.percentiles is None:
            out.pop("percentiles")
        else:
            out["percentiles"] = list(self.percentiles)
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "IntensityMapping":
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        allowed = {"kind", "low", "high", "out_low", "out_high", "percentiles"}
        unknown = sorted(set(record) - allowed)
        if unknown or not {"kind", "low", "high"} <= set(record):
            raise ConfigError(f"intensity record needs keys kind, low, high (optional out_low, out_high, "
                              f"percentiles); got {sorted(record)}")
        values = dict(record)
        if values.get("percentiles") is not None:
            values["percentiles"] = tuple(float(p) for p in values["percentiles"])
        return cls(**values)


def _as_array(x: Any) -> Any:
    # numpy arrays and torch tensors both have .clip and arithmetic; anything else (lists,
    # Python floats) becomes a float numpy array.
    return x if hasattr(x, "clip") and hasattr(x, "shape") else np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def label_remapping(source: Mapping[str, int], label_map: Mapping[str, str] | None
                    ) -> tuple[dict[str, int], dict[int, int]]:
    """Target label table and value lookup for remapping labels by name.

    ``label_map`` maps source label names to target names. Several sources may share a target
    (merging classes); a target named "background" drops a class; source labels that are not
    listed become background. Target values are 1, 2, ... in order of first appearance.
    Without ``label_map`` the source table is kept unchanged.

    Args:
        source: source label table, name -> value, including ``background: 0``.
        label_map: source name -> target name, or None.

    Returns:
        ``(target_labels, lookup)``: target name -> value, and source value -> target value.

    Raises:
        ConfigError: a name in ``label_map`` is not a source label (the message lists them).
    """
    if not label_map:
        return dict(source), {int(v): int(v) for v in source.values()}
    unknown = [name for name in label_map if name not in source]
    if unknown:
        raise ConfigError(f"label_map names unknown source labels {unknown}; "
                          f"known labels are {sorted(source, key=lambda n: source[n])}")
    target: dict[str, int] = {"background": 0}
    for name in label_map.values():
        if name not in target:
            target[name] = len(target)
    lookup = {int(v): 0 for v in source.values()}
    for src_name, dst_name in label_map.items():
        lookup[int(source[src_name])] = target[dst_name]
    return target, lookup


def remap_label_array(array: np.ndarray, lookup: Mapping[int, int], source: str | None = None) -> np.ndarray:
    """Apply a value lookup to a label array ``(X, Y, Z)``; returns the smallest fitting uint dtype.

    Raises:
        InputError: the array holds values that are not in ``lookup`` (not declared labels).
    """
    values = np.unique(array)
    missing = [int(v) for v in values if int(v) not in lookup or v != int(v)]
    if missing:
        raise InputError(f"label values {missing[:10]} are not declared in the dataset's labels "
                         f"{sorted(lookup)}", source)
    dtype = np.uint8 if max(lookup.values(), default=0) < 256 else np.uint16
    if all(int(k) == int(v) for k, v in lookup.items()) and np.issubdtype(array.dtype, np.integer):
        return array.astype(dtype, copy=False)
    out = np.zeros(array.shape, dtype=dtype)
    for value in values:
        target = lookup[int(value)]
        if target:
            out[array == value] = target
    return out
