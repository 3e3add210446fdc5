"""``read_volume``: any supported scan file or DICOM folder -> :class:`Volume`.

Dispatch: a folder is a DICOM series folder; a file goes by extension (NIfTI/MGZ through
nibabel, MHA/MHD/NRRD through SimpleITK, ``.dcm``) and, when the extension says nothing, by
content (DICOM magic or a preamble-less DICOM header).

Values: images keep physical units as stored (CT in HU, MR in arbitrary units; scaling from the
header applied) and must be finite. Labels keep their integer dtype; float label maps whose
values are whole numbers become the smallest unsigned integer type that holds them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.errors import ConfigError, InputError
from medsynth.io.dicom import looks_like_dicom, read_dicom_file, read_dicom_folder
from medsynth.io.geometry import orientation_codes
from medsynth.io.itk import ITK_READ_SUFFIXES, read_itk
from medsynth.io.nifti import MGH_SUFFIXES, NIFTI_SUFFIXES, has_suffix, label_array, read_nibabel
from medsynth.io.volume import Volume, VolumeMetadata

logger = logging.getLogger(__name__)

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")
SUPPORTED_FORMATS = ("NIfTI (.nii, .nii.gz), MGH/MGZ (.mgh, .mgz), MetaImage (.mha, .mhd), "
                     "NRRD (.nrrd, .nhdr), a DICOM series folder, or an enhanced multi-frame "
                     "DICOM file")
_MODALITY_ALIASES = {"MRI": "MR", "CAT": "CT"}
_UNIT_FOR_MODALITY = {"CT": "HU", "MR": "a.u."}


def read_volume(path: str | Path, kind: str | None = None, *, series: str | int | None = None,
                resample_irregular: bool = False, modality: str | None = None) -> Volume:
    """Read a 3D scan or label map.

    Args:
        path: a NIfTI/MGZ/MHA/MHD/NRRD file, a folder holding a DICOM series, or an enhanced
            multi-frame DICOM file.
        kind: "image", "label", or None: the kind a medsynth-written NIfTI records, else
            "image".
        series: for a folder with several DICOM series: SeriesInstanceUID (str) or
            SeriesNumber (int).
        resample_irregular: DICOM stacks with missing slices, uneven spacing or gantry tilt are
            resampled onto a uniform grid along the slice normal (linear for images, nearest for
            labels; recorded in ``metadata.extra["resampled"]``) instead of raising.
        modality: "CT", "MR", ... for formats that do not record it (ignored with a warning when
            a DICOM file says otherwise).

    Returns:
        A :class:`Volume` with array ``(X, Y, Z)`` in file index order and a ``(4, 4)`` RAS
        affine.

    Raises:
        InputError: missing/unsupported/corrupt input, 2D or 4D data, NaN/Inf in an image,
            non-integer label values, mixed DICOM series without ``series``.
        GeometryError: DICOM geometry that cannot be trusted (missing slices, uneven spacing,
            duplicate positions, gantry tilt) unless ``resample_irregular``.
        ConfigError: invalid ``kind``.
    """
    if kind not in (None, "image", "label"):
        raise ConfigError(f"kind must be 'image', 'label' or None (auto), got {kind!r}")
    path = Path(path).expanduser()
    if modality is not None:
        modality = _MODALITY_ALIASES.get(modality.strip().upper(), modality.strip().upper())
    if not path.exists():
        raise InputError("does not exist", path)
    if series is not None and not path.is_dir():
        raise ConfigError(f"series={series!r} only applies to DICOM folders, not to file {path}")

    info: dict[str, Any] = {}
    from_dicom = True
    if path.is_dir():
        array, affine, meta = read_dicom_folder(path, series=series,
                                                resample_irregular=resample_irregular,
                                                nearest=kind == "label")
    elif has_suffix(path, NIFTI_SUFFIXES + MGH_SUFFIXES):
        array, affine, info = read_nibabel(path)
        meta = VolumeMetadata(source=str(path))
        from_dicom = False
    elif has_suffix(path, ITK_READ_SUFFIXES):
        array, affine, header = read_itk(path)
        meta = VolumeMetadata(source=str(path))
        from_dicom = False
        info = {"format": path.suffix.lower().lstrip("."),
                **{k: v for k, v in header.items() if k.startswith("NRRD_space")}}
    elif has_suffix(path, DICOM_SUFFIXES) or looks_like_dicom(path):
        array, affine, meta = read_dicom_file(path, resample_irregular=resample_irregular,
                                              nearest=kind == "label")
    else:
        raise InputError(f"not a supported medical image; supported: {SUPPORTED_FORMATS}", path)

    if not np.all(np.isfinite(affine)):
        raise InputError("voxel-to-world transform contains NaN or Inf", path)
    recorded = info.pop("medsynth", None) or {}
    if info:
        meta.extra["nifti" if info.get("format") == "NIfTI" else "header"] = info
    if kind is None:
        kind = recorded.get("kind") if recorded.get("kind") in ("image", "label") else "image"
    if meta.modality is None:
        meta.modality = modality or recorded.get("modality")
    elif modality is not None and modality != meta.modality:
        logger.warning("%s: modality=%r ignored; the DICOM file says %r", path, modality,
                       meta.modality)
    meta.synthetic = (meta.synthetic or bool(recorded.get("synthetic"))
                      or _says_synthetic(info.get("descrip")))

    if kind == "label":
        array = _label_values(array, path)
        meta.intensity_unit = "label"
    else:
        finite = np.isfinite(array) if array.dtype.kind == "f" else None
        if finite is not None and not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputError(f"image has {bad} NaN/Inf voxel(s); physical values must be finite",
                             path)
        if array.dtype.kind not in "uif":
            raise InputError(f"image has dtype {array.dtype}; numeric voxels are needed", path)
        if meta.intensity_unit is None and not from_dicom:
            meta.intensity_unit = recorded.get("intensity_unit") or _UNIT_FOR_MODALITY.get(
                meta.modality or "")
    meta.orientation = orientation_codes(affine)
    return Volume(array=array, affine=affine, kind=kind, metadata=meta)  # type: ignore[arg-type]


def _label_values(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer label maps unchanged; whole-number float maps to the smallest unsigned type."""
    if array.dtype.kind in "ui":
        return array
    return label_array(array, path)


def _says_synthetic(descrip: str | None) -> bool:
    return descrip is not None and "medsynth" in descrip and "synthetic" in descrip
