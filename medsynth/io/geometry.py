"""Voxel-grid geometry: the one place where LPS and RAS meet.

Conventions (see :mod:`medsynth.io.volume`): arrays are ``(X, Y, Z)`` in file index order and
a ``(4, 4)`` affine maps ``(i, j, k, 1)`` to RAS millimetres. DICOM and ITK (SimpleITK, NRRD,
MHA) describe the same grid in LPS with ``origin``, ``spacing`` and a ``direction`` matrix whose
*columns* are the axis directions. Converting between the two is a sign flip of the first two
world axes, and nothing else in medsynth is allowed to do it.

Also here: orientation codes, the "is this really 3D" check shared by every reader, and the
geometry of DICOM slice stacks (sorting along the slice normal, missing/uneven slices, gantry
tilt, resampling onto a uniform grid) shared by classic series and enhanced multi-frame files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.errors import GeometryError, InputError

# diag(-1, -1, 1, 1): LPS <-> RAS (its own inverse).
_FLIP_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# A gap larger than this many median steps is reported as missing slices.
MISSING_SLICE_FACTOR = 1.5
# Steps whose relative deviation from the median exceeds this are "non-uniform spacing".
SPACING_RTOL = 1e-2
# In-plane drift of the slice stack (in pixels) tolerated before calling it a gantry tilt: below
# it the error of placing slices exactly along the normal stays under 1/20 of a pixel, which is
# smaller than the rounding of ImagePositionPatient in many files.
TILT_TOLERANCE_PX = 0.05


# ----------------------------------------------------------------------------------------------
# LPS <-> RAS
# ----------------------------------------------------------------------------------------------

def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert a ``(4, 4)`` voxel->LPS affine to voxel->RAS (or back: the flip is symmetric)."""
    return _FLIP_LPS_RAS @ np.asarray(affine_lps, dtype=np.float64)


def affine_from_itk(origin: Sequence[float], spacing: Sequence[float],
                    direction: Sequence[float] | np.ndarray) -> np.ndarray:
    """The ``(4, 4)`` RAS affine of an ITK/SimpleITK image geometry (given in LPS).

    Args:
        origin: LPS mm of voxel (0, 0, 0), length 3 (``image.GetOrigin()``).
        spacing: voxel size in mm along each index axis, length 3 (``image.GetSpacing()``).
        direction: 9 numbers in row-major order or a ``(3, 3)`` matrix whose columns are the
            LPS unit directions of the index axes (``image.GetDirection()``).

    Returns:
        ``(4, 4)`` float64 affine mapping ``(i, j, k, 1)`` to RAS mm.
    """
    origin_a = np.asarray(origin, dtype=np.float64).reshape(3)
    spacing_a = np.asarray(spacing, dtype=np.float64).reshape(3)
    direction_a = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction_a * spacing_a[None, :]
    lps[:3, 3] = origin_a
    return lps_to_ras(lps)


def itk_from_affine(affine: np.ndarray) -> tuple[tuple[float, float, float],
                                                 tuple[float, float, float],
                                                 tuple[float, ...]]:
    """The LPS ``(origin, spacing, direction)`` SimpleITK wants for a ``(4, 4)`` RAS affine.

    Returns:
        origin (3,), spacing (3,) and direction as 9 row-major numbers (columns = axis
        directions), ready for ``SetOrigin`` / ``SetSpacing`` / ``SetDirection``.
    """
    lps = lps_to_ras(np.asarray(affine, dtype=np.float64))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"affine has a zero-length axis (spacing {spacing.tolist()})")
    direction = lps[:3, :3] / spacing[None, :]
    return (tuple(float(v) for v in lps[:3, 3]), tuple(float(v) for v in spacing),
            tuple(float(v) for v in direction.reshape(9)))


def dicom_affine(row_cosine: np.ndarray, col_cosine: np.ndarray,
                 pixel_spacing: Sequence[float], first_position: np.ndarray,
                 slice_step: np.ndarray) -> np.ndarray:
    """RAS affine of a DICOM slice stack stored as an ``(X, Y, Z)`` = (column, row, slice) array.

    Args:
        row_cosine: LPS direction of increasing column index (ImageOrientationPatient[0:3]).
        col_cosine: LPS direction of increasing row index (ImageOrientationPatient[3:6]).
        pixel_spacing: DICOM PixelSpacing ``(between rows, between columns)`` in mm: note the
            order; the column index ``i`` advances by ``pixel_spacing[1]``.
        first_position: LPS ImagePositionPatient of the first slice in array order.
        slice_step: LPS vector from one slice to the next, in mm.
    """
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_cosine, dtype=np.float64) * float(pixel_spacing[1])
    lps[:3, 1] = np.asarray(col_cosine, dtype=np.float64) * float(pixel_spacing[0])
    lps[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    lps[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return lps_to_ras(lps)


# ----------------------------------------------------------------------------------------------
# Orientation codes
# ----------------------------------------------------------------------------------------------

def orientation_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """Axis codes of the array axes, e.g. ``("L", "P", "S")`` (nibabel's ``aff2axcodes``)."""
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    return (str(codes[0]), str(codes[1]), str(codes[2]))


def reorient(array: np.ndarray, affine: np.ndarray,
             codes: str | Sequence[str] = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute voxel axes so the array is stored in ``codes`` orientation; no resampling.

    Args:
        array: ``(X, Y, Z)`` voxels.
        affine: ``(4, 4)`` RAS affine of ``array``.
        codes: target axis codes, e.g. "RAS" or "LPS".

    Returns:
        ``(array', affine')`` describing the same voxels in the same world positions.
    """
    target = tuple(c.upper() for c in codes)
    axes = sorted({"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(c, -1) for c in target)
    if axes != [0, 1, 2]:
        raise InputError(f"orientation codes must be one of R/L, A/P and S/I each, like 'RAS', "
                         f"got {codes!r}")
    start = nib.orientations.io_orientation(affine)
    end = nib.orientations.axcodes2ornt(target)
    transform = nib.orientations.ornt_transform(start, end)
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), new_affine


# ----------------------------------------------------------------------------------------------
# 3D checks shared by all readers
# ----------------------------------------------------------------------------------------------

def check_3d_shape(shape: Sequence[int], source: str | Path) -> tuple[int, int, int]:
    """The 3D grid shape of data with ``shape``; trailing singleton dims (4D with 1 volume) dropped.

    Raises:
        InputError: for 2D data (fewer than 3 axes or a spatial axis of size 1) and for 4D+ data
            with more than one volume, naming the file and the shape.
    """
    shape = tuple(int(s) for s in shape)
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise InputError(f"{len(shape)}D data of shape {shape} ({int(np.prod(extra))} volumes); "
                         f"a single 3D volume is needed: extract one volume first", source)
    if len(shape) < 3 or min(shape[:3]) == 1:
        raise InputError(f"2D data of shape {shape}; a 3D volume with at least 2 voxels along "
                         f"each axis is needed", source)
    return shape[0], shape[1], shape[2]


def require_3d(array: np.ndarray, source: str | Path) -> np.ndarray:
    """``array`` reshaped to 3D by :func:`check_3d_shape` (which raises for 2D and 4D data)."""
    return array.reshape(check_3d_shape(array.shape, source))


# ----------------------------------------------------------------------------------------------
# DICOM slice stacks
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceStack:
    """Geometry of a stack of parallel 2D slices, sorted along the slice normal.

    Attributes:
        order: ``(N,)`` indices into the input slices, ascending along ``normal``.
        positions: ``(N, 3)`` LPS ImagePositionPatient in sorted order.
        offsets: ``(N,)`` mm of each sorted slice along ``normal`` from the first one.
        normal: LPS unit normal, ``row_cosine x col_cosine``.
        step: the slice step along the normal in mm (uniform stacks) or the median step.
        problem: None for a uniform stack along the normal; otherwise why it is not.
        tilted: True when slices drift in-plane (a gantry tilt): the stack is not along the normal.
    """

    order: np.ndarray
    positions: np.ndarray
    offsets: np.ndarray
    normal: np.ndarray
    step: float
    problem: str | None
    tilted: bool

    @property
    def regular(self) -> bool:
        """True when the slices are uniformly spaced exactly along the normal."""
        return self.problem is None


def slice_normal(row_cosine: np.ndarray, col_cosine: np.ndarray) -> np.ndarray:
    """Unit LPS normal of slices with the given ImageOrientationPatient cosines."""
    normal = np.cross(row_cosine, col_cosine)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise GeometryError(f"ImageOrientationPatient row {np.round(row_cosine, 4).tolist()} and "
                            f"column {np.round(col_cosine, 4).tolist()} are parallel")
    return normal / norm


def sort_slice_stack(positions: np.ndarray, row_cosine: np.ndarray, col_cosine: np.ndarray,
                     pixel_spacing: Sequence[float], names: Sequence[str],
                     source: str | Path) -> SliceStack:
    """Sort slices along their normal and diagnose the stack (never by file name or number).

    Args:
        positions: ``(N, 3)`` LPS ImagePositionPatient of each slice, N >= 2.
        row_cosine, col_cosine: shared ImageOrientationPatient cosines (LPS).
        pixel_spacing: PixelSpacing (between rows, between columns) in mm.
        names: one label per slice (file name or frame number) for error messages.
        source: the file or folder, for error messages.

    Raises:
        GeometryError: duplicate positions (with a hint when it looks like 4D data).
    """
    positions = np.asarray(positions, dtype=np.float64)
    normal = slice_normal(row_cosine, col_cosine)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    extent = float(along[-1] - along[0])
    duplicate_tol = max(1e-3, 1e-4 * extent)
    dup = np.flatnonzero(steps <= duplicate_tol)
    if dup.size:
        unique = np.unique(np.round(along / duplicate_tol)).size
        if len(along) % unique == 0 and unique > 1 and len(dup) == len(along) - unique:
            raise InputError(f"{len(along) // unique} images at each of {unique} slice positions "
                             f"(several echoes, phases or time points: 4D data); a 3D volume is "
                             f"needed: split the series first", source)
        a, b = names[order[dup[0]]], names[order[dup[0] + 1]]
        raise GeometryError(f"{dup.size} duplicate slice position(s), first at "
                            f"{np.round(positions[dup[0]], 3).tolist()} mm (LPS) in {a} and {b}",
                            source)
    median = float(np.median(steps))
    offsets = along - along[0]

    problem = None
    gap = int(np.argmax(steps))
    uneven = np.abs(steps - median) / median
    if steps[gap] > MISSING_SLICE_FACTOR * median:
        problem = (f"missing slice(s): gap of {steps[gap]:.4g} mm between slices at "
                   f"{along[gap]:.4g} and {along[gap + 1]:.4g} mm along the normal "
                   f"({names[order[gap]]} -> {names[order[gap + 1]]}); the median step is "
                   f"{median:.4g} mm")
    elif uneven.max() > SPACING_RTOL:
        worst = int(np.argmax(uneven))
        problem = (f"non-uniform slice spacing: step of {steps[worst]:.4g} mm between slices at "
                   f"{along[worst]:.4g} and {along[worst + 1]:.4g} mm along the normal "
                   f"({names[order[worst]]} -> {names[order[worst + 1]]}); the median step is "
                   f"{median:.4g} mm (relative deviation {uneven.max():.2g} > {SPACING_RTOL})")

    # In-plane drift of each slice relative to the first: zero when stacked along the normal.
    drift = (positions - positions[0]) - np.outer(offsets, normal)
    drift_mm = float(np.linalg.norm(drift, axis=1).max())
    tilted = drift_mm > TILT_TOLERANCE_PX * min(float(s) for s in pixel_spacing)
    if tilted:
        angle = float(np.degrees(np.arctan2(drift_mm, max(extent, 1e-9))))
        tilt = (f"slices are not stacked along their normal: in-plane drift of {drift_mm:.3g} mm "
                f"over {extent:.4g} mm (about {angle:.2f} degrees, a gantry tilt?)")
        problem = tilt if problem is None else f"{problem}; {tilt}"
    step = extent / (len(along) - 1) if problem is None else median
    return SliceStack(order=order, positions=positions, offsets=offsets, normal=normal,
                      step=float(step), problem=problem, tilted=tilted)


def stack_affine(stack: SliceStack, row_cosine: np.ndarray, col_cosine: np.ndarray,
                 pixel_spacing: Sequence[float], step: float | None = None) -> np.ndarray:
    """RAS affine of a stack: the first slice's position, then ``step`` mm along the normal.

    ``step`` defaults to ``stack.step`` (right for regular stacks); after
    :func:`resample_stack` pass the step it returned.
    """
    step = stack.step if step is None else step
    return dicom_affine(row_cosine, col_cosine, pixel_spacing, stack.positions[0],
                        stack.normal * step)


def resample_stack(slices: np.ndarray, stack: SliceStack, row_cosine: np.ndarray,
                   col_cosine: np.ndarray, pixel_spacing: Sequence[float], *,
                   nearest: bool) -> tuple[np.ndarray, float, dict]:
    """Resample an irregular stack onto a uniform grid along the normal.

    Each slice is first shifted in-plane by its drift (undoing a gantry tilt), then values are
    interpolated along the normal between the two neighbouring slices onto positions
    ``0, step, 2 step, ...`` from the first slice, with ``step`` the median step rescaled so the
    last slice lands exactly on the grid.

    Args:
        slices: ``(X, Y, N)`` voxels in sorted order.
        nearest: nearest-neighbour (for label maps) instead of linear interpolation.

    Returns:
        ``(X, Y, M)`` array (float32 for linear, input dtype for nearest), the new step in mm
        (give it to :func:`stack_affine`) and a JSON-friendly record of what was done, for
        ``metadata.extra["resampled"]``.
    """
    from scipy import ndimage

    offsets = stack.offsets
    extent = float(offsets[-1])
    count = max(int(round(extent / stack.step)) + 1, 2)
    step = extent / (count - 1)
    fill = slices.min()
    work = slices if nearest else slices.astype(np.float32)
    if stack.tilted:
        shifted = np.empty_like(work)
        drift = (stack.positions - stack.positions[0]) - np.outer(offsets, stack.normal)
        for k in range(work.shape[2]):
            shift = (float(drift[k] @ row_cosine) / float(pixel_spacing[1]),
                     float(drift[k] @ col_cosine) / float(pixel_spacing[0]))
            shifted[:, :, k] = ndimage.shift(work[:, :, k], shift, order=0 if nearest else 1,
                                             mode="constant", cval=fill)
        work = shifted
    targets = np.arange(count) * step
    upper = np.clip(np.searchsorted(offsets, targets, side="right"), 1, len(offsets) - 1)
    lower = upper - 1
    weight = (targets - offsets[lower]) / (offsets[upper] - offsets[lower])
    out = np.empty(work.shape[:2] + (count,), dtype=work.dtype)
    for m in range(count):
        if nearest:
            out[:, :, m] = work[:, :, upper[m] if weight[m] >= 0.5 else lower[m]]
        else:
            out[:, :, m] = ((1.0 - weight[m]) * work[:, :, lower[m]]
                            + weight[m] * work[:, :, upper[m]])
    record = {
        "reason": stack.problem,
        "method": "nearest" if nearest else "linear",
        "axis": "slice normal",
        "step_mm": step,
        "original_offsets_mm": [round(float(o), 4) for o in offsets],
        "in_plane_shift": bool(stack.tilted),
        "fill_value": float(fill),
    }
    return out, step, record
