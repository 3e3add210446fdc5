"""NIfTI-1 (``.nii``, ``.nii.gz``) and FreeSurfer MGH/MGZ through nibabel; the NIfTI writer.

Reading keeps physical values: ``scl_slope``/``scl_inter`` are applied (nibabel's scaled data
proxy), spatial units other than mm (metres, microns) are converted to mm. The affine is
nibabel's choice (sform if its code is set, else qform, else the pixdim fallback, which is
recorded as untrusted geometry).

Writing (:func:`write_nifti`, also :func:`write_volume`): qform and sform both hold the affine
with code 1 (``NIFTI_XFORM_SCANNER_ANAT``: our coordinates are the scanner's patient space as
read from the source file; medsynth never registers to a template), unless the volume was read
from a NIfTI whose code was 2-4 (aligned/Talairach/MNI), which is kept. ``descrip`` names the
writer and says "synthetic" for generated volumes; a JSON header extension (``ecode`` 6,
comment) repeats kind, modality, unit and the synthetic flag so a reread restores them.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medsynth.errors import InputError
from medsynth.io.atomic import atomic_path
from medsynth.io.geometry import check_3d_shape, require_3d
from medsynth.io.volume import Volume

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
MGH_SUFFIXES: tuple[str, ...] = (".mgz", ".mgh")
# The qform/sform code written unless the source's own code (2-4) is known.
DEFAULT_XFORM_CODE = 1
IMAGE_WRITE_DTYPES: tuple[str, ...] = ("float32", "int16")
LABEL_WRITE_DTYPES: tuple[str, ...] = ("uint8", "uint16")
_EXTENSION_CODE = 6  # NIFTI_ECODE_COMMENT
_EXTENSION_TAG = "medsynth"
# Errors nibabel / gzip / zlib raise for truncated or corrupt files.
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError)
_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Case-insensitive check of a (possibly double) file extension."""
    return path.name.lower().endswith(suffixes)


def read_nibabel(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a NIfTI or MGH/MGZ file.

    Returns:
        array ``(X, Y, Z)`` (stored dtype in native byte order, or float when the header scales
        values), ``(4, 4)`` RAS affine in mm, and a JSON-friendly dict of header facts
        (``descrip``, ``qform_code``, ``sform_code``, ``medsynth`` extension content, ...).

    Raises:
        InputError: unreadable/truncated file, 2D data, 4D data with more than one volume.
    """
    path = Path(path)
    try:
        image = nib.load(str(path))
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
            raise InputError(f"nibabel reads it as {type(image).__name__}, not NIfTI or MGH/MGZ",
                             path)
        # Decide 3D-ness from the header before paying for decompression.
        check_3d_shape(image.shape, path)
        array = np.asanyarray(image.dataobj)
    except InputError:
        raise
    except _READ_ERRORS as err:
        if isinstance(err, nib.filebasedimages.ImageFileError):
            reason = "header not recognised"
        else:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot read it as {_format_name(path)}, the file is truncated or "
                         f"corrupt ({type(err).__name__}: {reason})", path) from None
    array = require_3d(array, path)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    affine = np.asarray(image.affine, dtype=np.float64)
    info: dict[str, Any] = {"format": _format_name(path)}
    if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        header = image.header
        unit = header.get_xyzt_units()[0]
        if _UNIT_TO_MM.get(unit, 1.0) != 1.0:
            affine = affine.copy()
            affine[:3, :] *= _UNIT_TO_MM[unit]
            info["spatial_unit_converted"] = f"{unit} -> mm"
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        info.update(qform_code=qcode, sform_code=scode,
                    descrip=header["descrip"].item().decode("latin-1").strip("\x00 "))
        if qcode == 0 and scode == 0:
            info["geometry_warning"] = ("no qform or sform: orientation unknown, nibabel's "
                                        "pixdim-only fallback affine used")
        elif qcode > 0 and scode > 0 and not np.allclose(header.get_qform(), header.get_sform(),
                                                         atol=1e-3):
            # Tools disagree on which to trust (ITK may pick the qform); say which we used.
            info["geometry_warning"] = "qform and sform differ; the sform was used"
        for ext in header.extensions:
            if ext.get_code() == _EXTENSION_CODE:
                content = ext.get_content()
                text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
                try:
                    parsed = json.loads(text)
                except ValueError:
                    continue
                if isinstance(parsed, dict) and parsed.get("writer") == _EXTENSION_TAG:
                    info["medsynth"] = parsed
    return array, affine, info


def _format_name(path: Path) -> str:
    return "MGH/MGZ" if has_suffix(path, MGH_SUFFIXES) else "NIfTI"


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def label_array(array: np.ndarray, source: str | Path,
                dtype: str | None = None) -> np.ndarray:
    """Label values as ``uint8`` (max <= 255) or ``uint16`` (max <= 65535), or ``dtype`` if given.

    Raises:
        InputError: non-integer, negative, non-finite or too large values, naming ``source``.
    """
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError("label map contains NaN or Inf", source)
        if not np.array_equal(array, np.round(array)):
            bad = array[array != np.round(array)].flat[0]
            raise InputError(f"label map has non-integer value {float(bad):g}; labels must be "
                             f"whole numbers (read it as an image instead?)", source)
    elif array.dtype.kind not in "ui":
        raise InputError(f"label map has dtype {array.dtype}; integers are needed", source)
    if array.size == 0:
        raise InputError("label map is empty", source)
    low, high = array.min(), array.max()
    if low < 0:
        raise InputError(f"label map has negative value {low}; labels must be >= 0", source)
    if dtype is None:
        dtype = "uint8" if high <= 255 else "uint16"
    if dtype not in LABEL_WRITE_DTYPES:
        raise InputError(f"label dtype must be one of {LABEL_WRITE_DTYPES}, got {dtype!r}", source)
    if high > np.iinfo(dtype).max:
        raise InputError(f"label value {high} does not fit {dtype} (max {np.iinfo(dtype).max})",
                         source)
    return array.astype(dtype, copy=False)


def _image_array(volume: Volume, dtype: str | None, path: Path) -> np.ndarray:
    """Image voxels as float32 (default) or int16 (on request, when the values fit)."""
    dtype = dtype or "float32"
    if dtype not in IMAGE_WRITE_DTYPES:
        raise InputError(f"image dtype must be one of {IMAGE_WRITE_DTYPES}, got {dtype!r}", path)
    array = volume.array
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError("image contains NaN or Inf; refusing to write it", path)
    if dtype == "float32":
        return array.astype(np.float32, copy=False)
    rounded = np.round(array) if array.dtype.kind == "f" else array
    if array.dtype.kind == "f" and not np.array_equal(rounded, array):
        # Rounding to whole HU is below CT noise; for other units it would silently lose data.
        if volume.metadata.intensity_unit != "HU":
            raise InputError(f"int16 needs whole-number voxels but this "
                             f"{volume.metadata.intensity_unit or 'unit-less'} image has "
                             f"fractional values; write float32 instead", path)
    low, high = rounded.min(), rounded.max()
    if low < -32768 or high > 32767:
        raise InputError(f"values {low}..{high} do not fit int16 (-32768..32767); write float32",
                         path)
    return rounded.astype(np.int16)


def _description(volume: Volume, description: str | None) -> bytes:
    from medsynth import __version__

    text = f"medsynth {__version__}"
    if volume.metadata.synthetic:
        text += " synthetic"
    if description:
        text += f": {description}"
    # descrip is 80 bytes; the "synthetic" marker comes first so truncation only cuts user text.
    return text.encode("ascii", "replace")[:80]


def write_nifti(volume: Volume, path: str | Path, *, description: str | None = None,
                dtype: str | None = None) -> Path:
    """Write ``volume`` to ``path`` (``.nii`` or ``.nii.gz``) atomically.

    Dtype policy: images float32 by default, or ``dtype="int16"`` when every value fits (CT in
    HU is rounded to whole HU; other fractional images are refused); labels uint8 when the
    largest label is <= 255, else uint16 (negative or > 65535 refused).

    Args:
        volume: the ``(X, Y, Z)`` volume with its RAS affine.
        path: destination ending in ``.nii`` or ``.nii.gz`` (gzip-compressed).
        description: extra text for the header's 80-byte ``descrip`` (after "medsynth <version>"
            and, for generated volumes, "synthetic").
        dtype: images: "float32" (default) or "int16"; labels: "uint8" or "uint16" (default:
            the smallest that fits).

    Returns:
        The written path.
    """
    path = Path(path)
    if not has_suffix(path, NIFTI_SUFFIXES):
        raise InputError(f"NIfTI output must end with one of {NIFTI_SUFFIXES}", path)
    if volume.kind == "label":
        array = label_array(volume.array, path, dtype)
    else:
        array = _image_array(volume, dtype, path)
    affine = np.asarray(volume.affine, dtype=np.float64)
    image = nib.Nifti1Image(array, affine)
    header = image.header
    header.set_data_dtype(array.dtype)
    source_code = volume.metadata.extra.get("nifti", {}).get("sform_code")
    code = source_code if source_code in (2, 3, 4) else DEFAULT_XFORM_CODE
    header.set_sform(affine, code=code)
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6):
        header.set_qform(affine, code=code)
    else:
        # A sheared affine cannot be a qform (rotation + zooms only); leave only the sform.
        header.set_qform(None, code=0)
    header.set_xyzt_units(xyz="mm", t="sec")
    header["descrip"] = _description(volume, description)
    meta = volume.metadata
    payload = {"writer": _EXTENSION_TAG, "kind": volume.kind, "modality": meta.modality,
               "intensity_unit": meta.intensity_unit, "synthetic": bool(meta.synthetic)}
    header.extensions.append(nib.nifti1.Nifti1Extension(
        _EXTENSION_CODE, json.dumps(payload).encode("utf-8")))
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def write_volume(volume: Volume, path: str | Path, *, description: str | None = None,
                 dtype: str | None = None) -> Path:
    """Write ``volume`` as NIfTI (``.nii``/``.nii.gz``); same contract as :func:`write_nifti`.

    ``.nrrd`` / ``.mha`` go through SimpleITK (:func:`medsynth.io.itk.write_itk`) with the
    same dtype policy.
    """
    path = Path(path)
    if has_suffix(path, (".nrrd", ".mha")):
        from medsynth.io.itk import write_itk

        if volume.kind == "label":
            array = label_array(volume.array, path, dtype)
        else:
            array = _image_array(volume, dtype, path)
        return write_itk(volume.with_array(array), path)
    return write_nifti(volume, path, description=description, dtype=dtype)
