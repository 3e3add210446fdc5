"""What ``medsynth generate`` and ``medsynth cohort run`` write for one generated case besides the
dataset folder's NIfTI pair: the placeholder label of an unlabelled case, and its DICOM series
(+ DICOM-SEG of the label). One implementation, so the two commands cannot drift apart.

Layout::

    OUT/dicom/<case_id>/*.dcm        the SYNTHETIC-marked image series
    OUT/dicom/<case_id>_seg.dcm      the DICOM-SEG of the label (labelled cases only)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medsynth.io.volume import Volume, VolumeMetadata


def placeholder_label(volume: Volume, ignore_value: int, modality: str) -> Volume:
    """A label map for an unlabelled case: every voxel is nnU-Net v2's ``ignore`` value.

    Args:
        volume: the generated image, shape (X, Y, Z); the label takes its grid and affine.
        ignore_value: the ``ignore`` label's value (largest training label + 1).
        modality: "CT" or "MR", recorded in the label's metadata.

    Returns:
        A label volume of shape (X, Y, Z), uint8 (uint16 when ``ignore_value`` > 255).
    """
    dtype = np.uint8 if ignore_value < 256 else np.uint16
    return Volume(np.full(volume.shape, ignore_value, dtype=dtype), volume.affine.copy(), "label",
                  VolumeMetadata(modality=modality, intensity_unit="label", synthetic=True))


def dicom_paths(out: Path, case_id: str) -> tuple[Path, Path]:
    """(series folder, DICOM-SEG file) of ``case_id`` under the dataset folder ``out``."""
    return out / "dicom" / case_id, out / "dicom" / f"{case_id}_seg.dcm"


def dicom_complete(out: Path, case_id: str, labelled: bool) -> bool:
    """True when the case's series (and, for a labelled case, its DICOM-SEG) are on disk."""
    series, seg = dicom_paths(out, case_id)
    return series.is_dir() and (not labelled or seg.is_file())


def write_case_dicom(out: Path, case_id: str, volume: Volume, label: Volume | None, labels: Mapping[str, int],
                     *, prompt: str, series_number: int, modality: str) -> None:
    """Write the parts of the case's DICOM export that are missing (resumable, never rewritten).

    Args:
        out: the dataset folder.
        case_id: the case, e.g. "synth_0003".
        volume: the generated image, shape (X, Y, Z); ``metadata.extra`` goes into the provenance.
        label: its label map of shape (X, Y, Z), or None for an unlabelled case (no DICOM-SEG).
        labels: class name -> value, the segments of the DICOM-SEG.
        prompt: the case's prompt (in the series description, cut to DICOM's 64 characters).
        series_number: DICOM SeriesNumber.
        modality: "CT" or "MR".
    """
    from medsynth.io.dicom_writer import write_dicom_series
    from medsynth.io.provenance import provenance_record

    series, seg = dicom_paths(out, case_id)
    if not series.is_dir():
        series = write_dicom_series(volume, series, series_description=f"medsynth {case_id}: {prompt}"[:64],
                                    series_number=series_number,
                                    provenance=provenance_record(modality=modality, kind="image",
                                                                 source=volume.metadata.extra))
    if label is not None and not seg.is_file():
        from medsynth.io.seg import write_dicom_seg

        write_dicom_seg(label, series, labels, seg, series_description=f"medsynth {case_id} label"[:64])


__all__ = ["placeholder_label", "dicom_paths", "dicom_complete", "write_case_dicom"]
