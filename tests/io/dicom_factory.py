"""Small synthetic DICOM files built in code with pydicom (no binary test files in the repo).

Geometry is given in LPS, as DICOM stores it: ``origin`` = ImagePositionPatient of slice 0,
``row``/``col`` = ImageOrientationPatient cosines, ``spacing`` = (column step dx along ``row``,
row step dy along ``col``), ``step`` = LPS vector from one slice to the next. Voxel arrays are
``(X, Y, Z)`` = (column, row, slice) of *stored* values; modality values are
``stored * slope + intercept``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian,
                         generate_uid)


def _ds(value: float) -> str:
    # DS is at most 16 characters.
    return f"{value:.10g}"[:16]


def _base(modality: str, sop_class: str, series_uid: str, series_number: int,
          description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.Modality = modality
    ds.Manufacturer = "MEDSYNTH TEST"
    ds.PatientPosition = "HFS"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "TEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _file_meta(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta


def ct_slice(pixels: np.ndarray, position: Sequence[float], *,
             orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
             spacing: Sequence[float] = (0.8, 0.7), slope: float = 1.0,
             intercept: float = -1024.0, series_uid: str = "1.2.826.0.1.3680043.8.498.10",
             series_number: int = 3, instance: int = 1, description: str = "synthetic CT",
             modality: str = "CT", thickness: float | None = 2.5) -> Dataset:
    """One classic CT Image Storage slice; ``pixels`` is ``(rows, cols)`` int16 stored values.

    ``spacing`` is (dx, dy): written as PixelSpacing = [dy, dx] (row spacing first), as DICOM
    orders it.
    """
    ds = _base(modality, CTImageStorage, series_uid, series_number, description)
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    if thickness is not None:
        ds.SliceThickness = _ds(thickness)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleIntercept = _ds(intercept)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    _file_meta(ds)
    return ds


def slice_positions(n: int, origin: Sequence[float], step: Sequence[float]) -> np.ndarray:
    """``(n, 3)`` LPS positions ``origin + k * step``."""
    return np.asarray(origin, dtype=float)[None, :] + np.arange(n)[:, None] * np.asarray(step)


def write_series(folder: Path, stored: np.ndarray, *,
                 origin: Sequence[float] = (-20.0, -30.0, 40.0),
                 row: Sequence[float] = (1, 0, 0), col: Sequence[float] = (0, 1, 0),
                 spacing: Sequence[float] = (0.8, 0.7), step: Sequence[float] | None = None,
                 positions: np.ndarray | None = None, names: Sequence[str] | None = None,
                 instance_numbers: Sequence[int] | None = None,
                 slopes: Sequence[float] | None = None,
                 intercept: float = -1024.0, preamble: bool = True, **kwargs) -> list[Path]:
    """Write ``stored`` ``(X, Y, Z)`` as one file per slice; returns the paths in slice order.

    ``step`` defaults to 2.5 mm along ``row x col``; ``positions`` overrides all positions.
    ``preamble=False`` writes raw implicit-VR files without preamble or file meta (old GE-style).
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = stored.shape[2]
    if positions is None:
        normal = np.cross(row, col)
        positions = slice_positions(n, origin, normal * 2.5 if step is None else step)
    paths = []
    for k in range(n):
        ds = ct_slice(stored[:, :, k].T, positions[k], orientation=tuple(row) + tuple(col),
                      spacing=spacing, instance=(instance_numbers or range(1, n + 1))[k],
                      slope=(slopes[k] if slopes is not None else 1.0), intercept=intercept,
                      **kwargs)
        path = folder / (names[k] if names is not None else f"slice_{k:03d}.dcm")
        if preamble:
            ds.save_as(path, enforce_file_format=True)
        else:
            del ds.file_meta
            pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        paths.append(path)
    return paths


def enhanced_ct(stored: np.ndarray, positions: np.ndarray, *,
                orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
                spacing: Sequence[float] = (0.8, 0.7), slopes: Sequence[float] | None = None,
                intercepts: Sequence[float] | None = None, rescale_type: str = "HU") -> Dataset:
    """An Enhanced CT Image Storage file: frame f holds ``stored[:, :, f].T`` at ``positions[f]``.

    Orientation and pixel measures are shared; position and the pixel value transformation are
    per frame (as scanners that vary the rescale per frame write them).
    """
    n = stored.shape[2]
    ds = _base("CT", EnhancedCTImageStorage, generate_uid(), 7, "synthetic enhanced CT")
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [_ds(v) for v in orientation]
    shared.PlaneOrientationSequence = DicomSequence([ori])
    measures = Dataset()
    measures.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    measures.SliceThickness = "5"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for f in range(n):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [_ds(v) for v in positions[f]]
        item.PlanePositionSequence = DicomSequence([pos])
        transform = Dataset()
        transform.RescaleSlope = _ds(slopes[f] if slopes is not None else 1.0)
        transform.RescaleIntercept = _ds(intercepts[f] if intercepts is not None else -1024.0)
        transform.RescaleType = rescale_type
        item.PixelValueTransformationSequence = DicomSequence([transform])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.ascontiguousarray(stored.transpose(2, 1, 0), dtype="<i2").tobytes()
    _file_meta(ds)
    return ds


def expected_ras(index: Sequence[float], origin: Sequence[float], row: Sequence[float],
                 col: Sequence[float], spacing: Sequence[float],
                 step: Sequence[float]) -> np.ndarray:
    """RAS mm of voxel ``(i, j, k)``, derived directly from the DICOM definition (not our code)."""
    i, j, k = index
    lps = (np.asarray(origin, float) + i * spacing[0] * np.asarray(row, float)
           + j * spacing[1] * np.asarray(col, float) + k * np.asarray(step, float))
    return lps * np.array([-1.0, -1.0, 1.0])


__all__ = ["ct_slice", "enhanced_ct", "expected_ras", "slice_positions", "write_series"]
