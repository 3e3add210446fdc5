"""Volume IO: every file read or written by medsynth goes through this package.

Public API:
    read_volume(path, kind=None, *, series=None, resample_irregular=False, modality=None)
    write_nifti(volume, path, *, description=None, dtype=None)   (alias: write_volume)
    list_dicom_series(folder) -> list[DicomSeries]
    affine_from_itk(origin, spacing, direction) / itk_from_affine(affine)   (LPS <-> RAS)
"""

from medsynth.io.dicom import DicomSeries, list_dicom_series
from medsynth.io.geometry import (affine_from_itk, itk_from_affine, orientation_codes,
                                  reorient)
from medsynth.io.itk import from_sitk, to_sitk, write_itk
from medsynth.io.nifti import write_nifti, write_volume
from medsynth.io.reader import SUPPORTED_FORMATS, read_volume
from medsynth.io.volume import Volume, VolumeMetadata

__all__ = [
    "SUPPORTED_FORMATS",
    "DicomSeries",
    "Volume",
    "VolumeMetadata",
    "affine_from_itk",
    "from_sitk",
    "itk_from_affine",
    "list_dicom_series",
    "orientation_codes",
    "read_volume",
    "reorient",
    "to_sitk",
    "write_itk",
    "write_nifti",
    "write_volume",
]
