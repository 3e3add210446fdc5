"""Export an image :class:`Volume` as a classic DICOM series: one CT or MR file per slice.

What is written (see ``docs/dicom_export.md``):

- CT Image Storage (modality CT, values in HU) or MR Image Storage (modality MR), explicit VR
  little endian, signed 16-bit pixels with RescaleSlope/RescaleIntercept. Integral values that
  fit are stored losslessly (slope 1); anything else is scaled linearly onto the int16 range.
- Geometry: the third array axis stays the slice axis. By default the in-plane axes are flipped
  or swapped into the conventional display orientation for the slice plane (axial L->R columns,
  A->P rows; coronal L, I; sagittal P, I), and slices are always ordered along the slice normal,
  which is how every DICOM reader stacks them. ``DicomSeriesInfo.affine`` is the grid readers
  return; it describes the same voxels at the same world positions as the input.
- Identity: no patient data exist, so none is copied: PatientName ``SYNTHETIC^PHANTOM``, a
  PatientID starting with ``SYNTHETIC``, new Study/Series/SOP/FrameOfReference UIDs.
- Synthetic marker: ImageType ``DERIVED\\SECONDARY\\...\\SYNTHETIC``, SeriesDescription starting
  with ``SYNTHETIC``, DerivationDescription, PatientIdentityRemoved ``YES`` with a
  DeidentificationMethod saying why, ContributingEquipmentSequence naming medsynth, and the
  provenance record as JSON in ImageComments.

The folder is written atomically: files go into a hidden temporary folder beside the destination,
which is renamed into place only when every slice is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian,
                         MRImageStorage, generate_uid)
from pydicom.valuerep import format_number_as_ds

from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io.geometry import lps_to_ras, reorient
from medsynth.io.provenance import (SYNTHETIC_MARKER, SYNTHETIC_STATEMENT, provenance_record,
                                    provenance_text)
from medsynth.io.volume import Volume

__all__ = ["DicomSeriesInfo", "write_dicom_series", "DEFAULT_PATIENT_NAME", "series_grid"]

DEFAULT_PATIENT_NAME = "SYNTHETIC^PHANTOM"
_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
# ImageType value 3: CT Image Module allows only AXIAL or LOCALIZER (AXIAL means "not a
# localizer", whatever the plane); MR has no constraint that fits a synthetic image, so OTHER.
_IMAGE_TYPE_3 = {"CT": "AXIAL", "MR": "OTHER"}
# Conventional display orientation of each slice plane, keyed by the world axis (0 = L/R,
# 1 = A/P, 2 = S/I) the slice axis is closest to: columns, rows, slices. Each is right-handed in
# LPS, so the slice step runs along row x column cosine, the order readers sort slices in.
_DISPLAY_CODES = {2: "LPS", 1: "LIP", 0: "PIR"}
# In-plane axes further from orthogonal than this (cosine) cannot be an ImageOrientationPatient.
_ORTHO_TOL = 1e-6
_INT16 = (-32768, 32767)
# ImageComments is LT (10240 characters); keep the provenance a readable fraction of that.
_COMMENT_LIMIT = 4096


@dataclass(frozen=True)
class DicomSeriesInfo:
    """What :func:`write_dicom_series` wrote.

    Attributes:
        folder: the series folder.
        files: one path per slice, in slice order (axis 2 of ``affine``'s grid).
        series_uid, study_uid, frame_of_reference_uid: the UIDs shared by every file.
        sop_instance_uids: one per file, same order as ``files``.
        affine: ``(4, 4)`` RAS affine of the grid as stored, i.e. what ``read_volume`` and
            SimpleITK return for the folder (the input grid, possibly with axes flipped/permuted).
        shape: ``(X, Y, Z)`` = (columns, rows, slices) of that grid.
        modality: "CT" or "MR".
        rescale_slope, rescale_intercept: value = stored * slope + intercept.
        lossless: True when every stored value reproduces the input exactly.
    """

    folder: Path
    files: tuple[Path, ...]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    affine: np.ndarray
    shape: tuple[int, int, int]
    modality: str
    rescale_slope: float
    rescale_intercept: float
    lossless: bool


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def series_grid(array: np.ndarray, affine: np.ndarray, *,
                display_orientation: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The voxels and affine as a DICOM slice stack stores them.

    Args:
        array: ``(X, Y, Z)`` voxels; Z (the third axis) becomes the slice axis.
        affine: ``(4, 4)`` RAS affine of ``array``.
        display_orientation: flip/swap the in-plane axes into the conventional display
            orientation of the slice plane (see module docstring); False keeps them as stored.

    Returns:
        ``(array', affine')``: same voxels at the same world positions, with columns = axis 0,
        rows = axis 1 and slices = axis 2 ordered along the slice normal.

    Raises:
        GeometryError: in-plane axes that are not orthogonal, or slices not stacked along their
            normal (a sheared or tilted grid): resample onto an orthogonal grid first.
    """
    if display_orientation:
        slice_world_axis = int(nib.orientations.io_orientation(affine)[2, 0])
        array, affine = reorient(array, affine, _DISPLAY_CODES[slice_world_axis])
    lps = lps_to_ras(affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    col_dir, row_dir, step_dir = (lps[:3, i] / spacing[i] for i in range(3))
    cosine = float(col_dir @ row_dir)
    if abs(cosine) > _ORTHO_TOL:
        raise GeometryError(f"the first two voxel axes are not orthogonal (cosine {cosine:.3g}); "
                            f"DICOM slices need an orthogonal in-plane grid: resample first")
    normal = np.cross(col_dir, row_dir)
    along = float(step_dir @ normal)
    if abs(along) < 1.0 - _ORTHO_TOL:
        tilt = float(np.degrees(np.arccos(min(1.0, abs(along)))))
        raise GeometryError(f"the slice axis is {tilt:.3g} degrees off the slice normal (a sheared "
                            f"or tilted grid); DICOM readers would misplace the slices: resample "
                            f"onto an orthogonal grid first")
    if along < 0:
        # Readers sort slices along row x column cosine; store them in that order.
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1.0, array.shape[2] - 1
        array, affine = array[:, :, ::-1], affine @ flip
    return np.ascontiguousarray(array), affine


# ----------------------------------------------------------------------------------------------
# Pixel values
# ----------------------------------------------------------------------------------------------

def encode_int16(values: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
    """Signed 16-bit stored values with ``values = stored * slope + intercept``.

    Integral values within a 65536-wide range are kept exactly (slope 1, intercept 0 when they
    fit int16, else an integer shift); anything else is scaled linearly onto [-32767, 32767].

    Returns:
        ``(stored int16 array of values' shape, slope, intercept, lossless)``.
    """
    low, high = float(values.min()), float(values.max())
    integral = values.dtype.kind in "iub" or bool(np.all(values == np.round(values)))
    if integral and high - low <= _INT16[1] - _INT16[0]:
        shift = 0.0 if low >= _INT16[0] and high <= _INT16[1] else float(np.floor(low) - _INT16[0])
        stored = (values.astype(np.float64) - shift).astype(np.int16)
        return stored, 1.0, shift, True
    intercept = (high + low) / 2.0
    slope = (high - low) / (2.0 * _INT16[1]) if high > low else 1.0
    # The DS text of slope/intercept is what readers use; quantise with exactly those numbers.
    slope, intercept = float(format_number_as_ds(slope)), float(format_number_as_ds(intercept))
    stored = np.clip(np.round((values.astype(np.float64) - intercept) / slope), *_INT16)
    return stored.astype(np.int16), slope, intercept, False


# ----------------------------------------------------------------------------------------------
# Headers
# ----------------------------------------------------------------------------------------------

def _ds(value: float) -> str:
    # Cosines like 6e-17 are rounding noise from the affine; DS text has 16 characters anyway.
    return format_number_as_ds(0.0 if abs(value) < 1e-12 else float(value))


def _check_identifier(value: str, what: str, limit: int) -> str:
    # Refuse anything that does not announce itself as synthetic: a pipeline that forwards a
    # source scan's PatientID here would otherwise leak a real identifier into synthetic data.
    if not isinstance(value, str) or not value.upper().startswith(SYNTHETIC_MARKER):
        raise ConfigError(f"{what} must start with {SYNTHETIC_MARKER!r} (synthetic data carry no "
                          f"real identifiers), got {value!r}")
    if len(value) > limit or "\\" in value:
        raise ConfigError(f"{what} must be at most {limit} characters without backslashes, "
                          f"got {value!r}")
    return value


def _modality(volume: Volume) -> str:
    if volume.kind != "image":
        raise InputError(f"write_dicom_series writes images, got a volume of kind "
                         f"{volume.kind!r}; write label maps with write_dicom_seg")
    modality = (volume.metadata.modality or "").upper()
    if modality not in _SOP_CLASSES:
        raise InputError(f"DICOM export supports modality CT or MR, got "
                         f"{volume.metadata.modality!r}; set volume.metadata.modality")
    unit = volume.metadata.intensity_unit
    if modality == "CT" and unit not in (None, "HU"):
        raise InputError(f"a CT series stores Hounsfield units, got intensity_unit {unit!r}; "
                         f"undo the intensity mapping first")
    if not np.issubdtype(volume.array.dtype, np.number) or not np.all(np.isfinite(volume.array)):
        raise InputError("image voxels must be finite numbers to be written as DICOM")
    return modality


def _shared_header(modality: str, *, patient_id: str, patient_name: str, study_uid: str,
                   series_uid: str, frame_uid: str, series_number: int, description: str,
                   provenance: Mapping[str, Any], now: datetime) -> Dataset:
    """The attributes every slice of the series shares (no geometry or pixels)."""
    from medsynth import __version__

    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _SOP_CLASSES[modality]
    ds.ImageType = ["DERIVED", "SECONDARY", _IMAGE_TYPE_3[modality], SYNTHETIC_MARKER]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "medsynth"
    ds.ManufacturerModelName = "medsynth synthetic generator"
    ds.SoftwareVersions = __version__
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"{SYNTHETIC_MARKER} medsynth study"
    ds.SeriesDescription = description
    ds.DerivationDescription = SYNTHETIC_STATEMENT
    equipment = Dataset()
    equipment.Manufacturer = "medsynth"
    equipment.ManufacturerModelName = "medsynth synthetic generator"
    equipment.SoftwareVersions = __version__
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = SYNTHETIC_STATEMENT[:64]
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "109102", "DCM"
    purpose.CodeMeaning = "Processing Equipment"
    equipment.PurposeOfReferenceCodeSequence = [purpose]
    ds.ContributingEquipmentSequence = [equipment]
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # There never was a patient; YES tells de-identification gates there is nothing to remove,
    # and DeidentificationMethod (required with it) says why.
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "No patient: synthetic image generated by medsynth"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = series_number
    # Type 2C (paired body parts): dciodvfy cannot evaluate the condition and wants it present.
    ds.Laterality = ""
    ds.AcquisitionNumber = ""
    ds.PatientPosition = ""
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageComments = (f"{SYNTHETIC_STATEMENT}. provenance: "
                        + provenance_text(provenance, _COMMENT_LIMIT))
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if modality == "CT":
        ds.KVP = ""
        ds.RescaleType = "HU"
    else:
        # MR Image Module, type 1 and 2: a synthetic image has no sequence; "RM" is the defined
        # term for research mode and NONE the sequence variant, the rest is present but empty.
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        ds.MagneticFieldStrength = ""
    return ds


def _window(values: np.ndarray, modality: str) -> tuple[float, float]:
    """(center, width) for display: soft tissue for CT, 1-99 percentile range otherwise."""
    if modality == "CT":
        return 40.0, 400.0
    low, high = np.percentile(values, [1.0, 99.0])
    return float(low + high) / 2.0, max(float(high - low), 1.0)


# ----------------------------------------------------------------------------------------------
# Folder handling
# ----------------------------------------------------------------------------------------------

def _check_destination(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise InputError("exists and is not a folder; a DICOM series is written as a folder",
                         folder)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError("folder exists and is not empty; pass overwrite=True to replace it",
                         folder)


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` folder onto ``folder`` (replacing it, if it exists)."""
    if folder.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.rename(folder, old / folder.name)
        try:
            os.rename(tmp, folder)
        except BaseException:
            os.rename(old / folder.name, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def write_dicom_series(volume: Volume, folder: str | Path, *,
                       series_description: str | None = None,
                       patient_id: str | None = None,
                       patient_name: str = DEFAULT_PATIENT_NAME,
                       study_uid: str | None = None,
                       frame_of_reference_uid: str | None = None,
                       series_number: int = 1,
                       provenance: Mapping[str, Any] | None = None,
                       display_orientation: bool = True,
                       synthetic_data_tag: bool = False,
                       overwrite: bool = False) -> DicomSeriesInfo:
    """Write a CT or MR image volume as a DICOM series, one file per slice.

    Args:
        volume: kind "image", ``(X, Y, Z)`` voxels with a RAS affine; ``metadata.modality``
            "CT" (values in HU) or "MR". Z becomes the slice axis.
        folder: destination folder (created; must not exist or be empty unless ``overwrite``).
        series_description: free text; ``"SYNTHETIC "`` is prefixed unless it starts with it.
        patient_id: must start with "SYNTHETIC"; default ``SYNTHETIC-<hash of the study UID>``,
            so series written into the same study share it.
        patient_name: must start with "SYNTHETIC".
        study_uid: put the series into an existing (synthetic) study; default a new UID.
        frame_of_reference_uid: share a frame of reference with other series; default new.
        series_number: SeriesNumber (IS).
        provenance: extra provenance facts (model hash, prompt, ...) merged into the record
            built from ``volume.metadata.extra``; stored as JSON in ImageComments.
        display_orientation: reorder in-plane axes for conventional display (see
            :func:`series_grid`); False keeps the array axes (slices may still be reversed).
        synthetic_data_tag: also write SyntheticData (0008,001C) = YES, the standard's own
            marker since DICOM 2023; off by default because validators older than it (Debian's
            dicom3tools 2022 ``dciodvfy``) report it as an unknown standard attribute (an error).
        overwrite: replace a non-empty existing folder.

    Returns:
        :class:`DicomSeriesInfo` with the files in slice order and the stored grid.

    Raises:
        InputError: not an image, modality other than CT/MR, non-finite voxels, a CT volume not
            in HU, a destination that is a file or a non-empty folder without ``overwrite``.
        GeometryError: a sheared or tilted grid (see :func:`series_grid`).
        ConfigError: identifiers that do not start with "SYNTHETIC".
    """
    folder = Path(folder)
    modality = _modality(volume)
    _check_destination(folder, overwrite)
    study_uid = study_uid or generate_uid()
    if patient_id is None:
        digest = hashlib.sha1(study_uid.encode()).hexdigest()[:12].upper()
        patient_id = f"{SYNTHETIC_MARKER}-{digest}"
    _check_identifier(patient_id, "patient_id", 64)
    _check_identifier(patient_name, "patient_name", 64)
    if isinstance(series_number, bool) or not isinstance(series_number, (int, np.integer)) \
            or not 0 <= series_number <= 2**31 - 1:
        raise ConfigError(f"series_number must be an integer in [0, 2147483647], got "
                          f"{series_number!r}")
    text = (series_description or f"medsynth {modality}").strip()
    if not text.upper().startswith(SYNTHETIC_MARKER):
        text = f"{SYNTHETIC_MARKER} {text}"
    description = text[:64]

    array, affine = series_grid(volume.array, volume.affine,
                                display_orientation=display_orientation)
    stored, slope, intercept, lossless = encode_int16(array)
    lps = lps_to_ras(affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    col_dir, row_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    normal = np.cross(col_dir, row_dir)
    now = datetime.now(timezone.utc)
    series_uid = generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    record = provenance_record(modality=modality, kind="image", source=volume.metadata.extra,
                               extra=provenance, created=now)
    shared = _shared_header(modality, patient_id=patient_id, patient_name=patient_name,
                            study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid,
                            series_number=int(series_number), description=description,
                            provenance=record, now=now)
    if synthetic_data_tag:
        shared.SyntheticData = "YES"
    # ImageOrientationPatient: LPS direction of increasing column index (array axis 0), then of
    # increasing row index (axis 1). PixelSpacing is (distance between rows, between columns):
    # rows follow each other along axis 1, so it is (spacing[1], spacing[0]).
    shared.ImageOrientationPatient = [_ds(v) for v in (*col_dir, *row_dir)]
    shared.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    shared.SliceThickness = _ds(spacing[2])
    if modality == "MR":
        shared.SpacingBetweenSlices = _ds(spacing[2])
    shared.Columns, shared.Rows = int(array.shape[0]), int(array.shape[1])
    if modality == "CT" or (slope, intercept) != (1.0, 0.0):
        # The MR IOD has no Modality LUT module: leave it out when it would be the identity.
        # Otherwise it is kept (dciodvfy warns; GDCM/SimpleITK, pydicom and medsynth apply it).
        shared.RescaleSlope, shared.RescaleIntercept = _ds(slope), _ds(intercept)
    center, width = _window(array, modality)
    shared.WindowCenter, shared.WindowWidth = _ds(center), _ds(width)

    count = array.shape[2]
    width_digits = max(4, len(str(count)))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    files, sop_uids = [], []
    try:
        for k in range(count):
            ds = Dataset()
            ds.update(shared)
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(position @ normal))
            # A slice is (rows, columns) = array[:, :, k] transposed; int16 little endian.
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
            ds.file_meta = meta
            name = f"slice_{k + 1:0{width_digits}d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            files.append(folder / name)
            sop_uids.append(sop_uid)
        _move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DicomSeriesInfo(folder=folder, files=tuple(files), series_uid=series_uid,
                           study_uid=study_uid, frame_of_reference_uid=frame_uid,
                           sop_instance_uids=tuple(sop_uids), affine=affine,
                           shape=tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
                           modality=modality, rescale_slope=slope, rescale_intercept=intercept,
                           lossless=lossless)
