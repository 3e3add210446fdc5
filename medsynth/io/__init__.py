"""Volume IO: every file read or written by medsynth goes through this package.

Public API:
    read_volume(path, kind=None, *, series=None, resample_irregular=False, modality=None)
    write_nifti(volume, path, *, description=None, dtype=None)   (alias: write_volume)
    list_dicom_series(folder) -> list[DicomSeries]
    affine_from_itk(origin, spacing, direction) / itk_from_affine(affine)   (LPS <-> RAS)
    write_dicom_series(volume, folder, ...) -> DicomSeriesInfo    (CT/MR image series)
    write_dicom_seg(label, series, labels, out_file, ...)          (DICOM-SEG via highdicom)
"""

from medsynth.io.dicom import DicomSeries, list_dicom_series
from medsynth.io.dicom_writer import DicomSeriesInfo, write_dicom_series
from medsynth.io.geometry import (affine_from_itk, itk_from_affine, orientation_codes,
                                  reorient)
from medsynth.io.itk import from_sitk, to_sitk, write_itk
from medsynth.io.nifti import write_nifti, write_volume
from medsynth.io.provenance import SYNTHETIC_MARKER, provenance_record
from medsynth.io.reader import SUPPORTED_FORMATS, read_volume
from medsynth.io.seg import write_dicom_seg
from medsynth.io.volume import Volume, VolumeMetadata

__all__ = [
    "SUPPORTED_FORMATS",
    "SYNTHETIC_MARKER",
    "DicomSeries",
    "DicomSeriesInfo",
    "Volume",
    "VolumeMetadata",
    "affine_from_itk",
    "from_sitk",
    "itk_from_affine",
    "list_dicom_series",
    "orientation_codes",
    "provenance_record",
    "read_volume",
    "reorient",
    "to_sitk",
    "write_dicom_seg",
    "write_dicom_series",
    "write_itk",
    "write_nifti",
    "write_volume",
]
