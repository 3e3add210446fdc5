"""The one in-memory volume type: voxel array + 4x4 RAS affine + kind + metadata.

Array axes are voxel indices ``(i, j, k)`` in the order the file stores them (NIfTI
convention, as nibabel returns them); ``affine`` maps ``(i, j, k, 1)`` to RAS millimetres.
All LPS<->RAS conversion lives in :mod:`medsynth.io.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from medsynth.errors import InputError

VolumeKind = Literal["image", "label"]
VOLUME_KINDS: tuple[str, ...] = ("image", "label")


@dataclass
class VolumeMetadata:
    """What is known about where a volume came from and what its values mean.

    Attributes:
        modality: "CT", "MR" or another DICOM modality code; None when unknown.
        source: the file or folder it was read from.
        intensity_unit: "HU" for CT in Hounsfield units, "a.u." for MR, "label" for label maps.
        orientation: axis codes of the array as stored, e.g. ("L", "P", "S").
        series_uid: DICOM SeriesInstanceUID, when read from DICOM.
        patient_position: DICOM PatientPosition (HFS, FFS, ...).
        manufacturer: DICOM Manufacturer.
        synthetic: True for volumes medsynth generated.
        extra: anything else worth carrying (provenance, prompts, DICOM tags).
    """

    modality: str | None = None
    source: str | None = None
    intensity_unit: str | None = None
    orientation: tuple[str, str, str] | None = None
    series_uid: str | None = None
    patient_position: str | None = None
    manufacturer: str | None = None
    synthetic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        if self.orientation is not None:
            out["orientation"] = "".join(self.orientation)
        out["extra"] = dict(self.extra)
        return out


@dataclass
class Volume:
    """A 3D scalar volume.

    Attributes:
        array: voxel values, shape ``(X, Y, Z)`` in file index order. Images are float or
            integer in physical units; labels are unsigned/signed integers.
        affine: ``(4, 4)`` float64 matrix mapping voxel indices to RAS mm.
        kind: "image" or "label".
        metadata: provenance and meaning of the values.
    """

    array: np.ndarray
    affine: np.ndarray
    kind: VolumeKind = "image"
    metadata: VolumeMetadata = field(default_factory=VolumeMetadata)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.kind not in VOLUME_KINDS:
            raise InputError(f"volume kind must be one of {VOLUME_KINDS}, got {self.kind!r}")
        if self.affine.shape != (4, 4):
            raise InputError(f"affine must be 4x4, got shape {self.affine.shape}")
        if not np.all(np.isfinite(self.affine)):
            raise InputError("affine contains NaN or Inf")
        if self.array.ndim != 3:
            raise InputError(
                f"a 3D volume is needed, got {self.array.ndim}D data of shape {self.array.shape}",
                self.metadata.source,
            )
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise InputError("affine is singular (zero spacing or degenerate directions)",
                             self.metadata.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS mm position of voxel (0, 0, 0)'s centre."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` unit column vectors of the array axes in RAS."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Axis codes of the array axes as stored, e.g. ("R", "A", "S")."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None,
                   kind: VolumeKind | None = None) -> "Volume":
        """A copy with new voxels (and optionally a new affine or kind); metadata is copied."""
        return Volume(array=array, affine=self.affine.copy() if affine is None else affine,
                      kind=self.kind if kind is None else kind,
                      metadata=replace(self.metadata, extra=dict(self.metadata.extra)))

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True when both volumes share shape and affine (to ``atol`` mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))
