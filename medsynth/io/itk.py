"""MHA / MHD / NRRD through SimpleITK, and conversion between :class:`Volume` and ``sitk.Image``.

SimpleITK arrays come out as ``(z, y, x)`` (``GetArrayFromImage``); medsynth arrays are
``(X, Y, Z)``, so every crossing transposes. Geometry goes through
:mod:`medsynth.io.geometry` (ITK is LPS, medsynth is RAS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsynth.errors import InputError
from medsynth.io.atomic import atomic_path
from medsynth.io.geometry import affine_from_itk, itk_from_affine, require_3d
from medsynth.io.volume import Volume, VolumeKind, VolumeMetadata

# Single-file formats SimpleITK reads for us (".mhd" + ".raw" pairs are read, never written).
ITK_READ_SUFFIXES: tuple[str, ...] = (".mha", ".mhd", ".nrrd", ".nhdr")
ITK_WRITE_SUFFIXES: tuple[str, ...] = (".mha", ".nrrd")


def _one_line(err: Exception) -> str:
    """ITK exceptions span many lines with C++ file names: keep the meaningful last line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text.split("ITK ERROR:")[-1].strip()


def sitk_to_arrays(image) -> tuple[np.ndarray, np.ndarray]:  # image: SimpleITK.Image
    """``(array, affine)`` of a SimpleITK image: array ``(X, Y, Z[, T...])``, affine ``(4, 4)`` RAS.

    For images with more than 3 dimensions the affine describes the first three.
    """
    import SimpleITK as sitk

    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        # Vector pixels come out as (..., components): keep them last like an extra dimension.
        array = np.moveaxis(array, -1, 0)
    array = np.ascontiguousarray(array.transpose(tuple(range(array.ndim))[::-1]))
    if dim < 3:
        return array, np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = affine_from_itk(image.GetOrigin()[:3], image.GetSpacing()[:3], direction)
    return array, affine


def read_itk(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Read an MHA/MHD/NRRD file.

    Returns:
        array ``(X, Y, Z)`` in the stored dtype, ``(4, 4)`` RAS affine, and the file's metadata
        dictionary (NRRD/MHA header keys).

    Raises:
        InputError: unreadable file, vector pixels, 2D or 4D data.
    """
    import SimpleITK as sitk

    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"SimpleITK could not read it ({_one_line(err)})", path) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         f"(vector or colour image); a scalar volume is needed", path)
    array, affine = sitk_to_arrays(image)
    if image.GetDimension() < 3:
        raise InputError(f"2D image of size {image.GetSize()}; a 3D volume is needed", path)
    array = require_3d(array, path)
    header = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    return array, affine, header


def to_sitk(volume: Volume):  # -> SimpleITK.Image
    """A SimpleITK image with the same voxels and geometry (LPS origin/spacing/direction)."""
    import SimpleITK as sitk

    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    origin, spacing, direction = itk_from_affine(volume.affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def from_sitk(image, kind: VolumeKind = "image",  # image: SimpleITK.Image
              metadata: VolumeMetadata | None = None) -> Volume:
    """A :class:`Volume` from a 3D scalar SimpleITK image (array transposed to ``(X, Y, Z)``)."""
    array, affine = sitk_to_arrays(image)
    return Volume(array=array, affine=affine, kind=kind,
                  metadata=metadata if metadata is not None else VolumeMetadata())


def write_itk(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``volume`` as ``.nrrd`` or ``.mha`` (voxels in their current dtype), atomically.

    Returns:
        The written path.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.suffix.lower() not in ITK_WRITE_SUFFIXES:
        raise InputError(f"SimpleITK output must end with one of {ITK_WRITE_SUFFIXES}", path)
    image = to_sitk(volume)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as err:
            raise InputError(f"SimpleITK could not write it ({_one_line(err)})", path) from None
    return path
