"""DICOM series folders and enhanced multi-frame files -> ``(X, Y, Z)`` voxels + RAS affine.

Reading is tolerant of what scanners really write (no preamble, no ``.dcm`` extension, missing
optional tags, padded strings, odd decimal formatting) and strict about what decides where a
voxel is: slices are grouped by SeriesInstanceUID, sorted by position along the slice normal
(never by file name or InstanceNumber), and missing slices, uneven spacing, duplicate positions
and gantry tilt are errors unless the caller asks for resampling. Geometry is checked from the
headers before any pixel is decoded, so a broken series fails fast.

Pixels are decoded by pydicom (JPEG 2000 through pylibjpeg-openjpeg); transfer syntaxes pydicom
has no decoder for (e.g. JPEG Lossless without the GPL pylibjpeg-libjpeg plugin) fall back to
GDCM through SimpleITK. Modality values come out with RescaleSlope/Intercept applied per slice
or per frame (CT in HU).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medsynth.io.provenance import SYNTHETIC_MARKER
from medsynth.errors import GeometryError, InputError
from medsynth.io.geometry import resample_stack, sort_slice_stack, stack_affine
from medsynth.io.volume import VolumeMetadata

logger = logging.getLogger(__name__)

# Modalities / SOP classes whose "pixels" are not a scan: skipped when scanning a folder.
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO",
                         "REG", "DOC", "FID", "PLAN"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Orientation cosines / pixel spacings that differ by less than this are "the same".
_SAME_TOL = 1e-4


@dataclass(frozen=True)
class DicomSeries:
    """One image series found in a folder.

    Attributes:
        uid: SeriesInstanceUID ("" when the files carry none).
        number: SeriesNumber, or None.
        description: SeriesDescription ("" when absent).
        modality: DICOM Modality code, or None.
        files: the image files of the series, sorted by path.
        frames: total number of 2D frames (a multi-frame file counts all its frames).
    """

    uid: str
    number: int | None
    description: str
    modality: str | None
    files: tuple[Path, ...]
    frames: int

    def summary(self) -> str:
        """One-line description used in error messages and listings."""
        uid = self.uid or "<no SeriesInstanceUID>"
        return (f"uid={uid} number={self.number} description={self.description!r} "
                f"modality={self.modality} files={len(self.files)}")


# ----------------------------------------------------------------------------------------------
# Tolerant tag access
# ----------------------------------------------------------------------------------------------

def _text(ds: Dataset, keyword: str) -> str | None:
    """A string tag stripped of padding (spaces, NULs); None when absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip(" \x00")
    return text or None


def _floats(ds: Dataset, keyword: str, count: int | None = None) -> list[float] | None:
    """Numbers from a DS/FD/IS tag, tolerating padding, comma decimals and unsplit backslashes."""
    elem = ds.get(keyword)
    if elem is None:
        return None
    raw = elem if isinstance(elem, (list, tuple, pydicom.multival.MultiValue)) else [elem]
    parts: list[str] = []
    for item in raw:
        if isinstance(item, bytes):
            item = item.decode("latin-1")
        parts.extend(str(item).split("\\"))
    try:
        values = [float(p.strip(" \x00").replace(",", ".")) for p in parts if p.strip(" \x00")]
    except ValueError:
        return None
    if count is not None and len(values) != count:
        return None
    return values


def _int(ds: Dataset, keyword: str) -> int | None:
    values = _floats(ds, keyword, 1)
    return int(round(values[0])) if values else None


def _one_line(err: Exception) -> str:
    """Exception text on one line (pydicom's decoder messages span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def _is_multiframe(ds: Dataset) -> bool:
    return (_int(ds, "NumberOfFrames") or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _series_uid(ds: Dataset) -> str:
    return _text(ds, "SeriesInstanceUID") or ""


# ----------------------------------------------------------------------------------------------
# Finding DICOM images
# ----------------------------------------------------------------------------------------------

def looks_like_dicom(path: Path) -> bool:
    """Cheap content sniff: "DICM" magic, or a preamble-less file starting with group 0002/0008."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    # Old/raw files (e.g. some GE exports) have no preamble and start with a little-endian tag.
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


def read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file without its pixel data, or None if it is not DICOM."""
    if not looks_like_dicom(path):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every non-conformant value
        try:
            # Large values (pixel data) are deferred: we only need to know they exist.
            ds = pydicom.dcmread(path, defer_size=1024, force=True)
        except Exception as err:  # noqa: BLE001 - any unparsable file is "not DICOM": skip it
            logger.debug("skipping %s: not readable as DICOM (%s)", path, err)
            return None
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            del ds[keyword]  # never keep (possibly compressed) pixels in a header list
            ds.medsynth_has_pixels = True
    return ds


def _is_image(ds: Dataset) -> bool:
    """True for files holding a scan image (not SEG/RT/SR/DICOMDIR/pixel-less files)."""
    if not getattr(ds, "medsynth_has_pixels", False):
        return False
    if _int(ds, "Rows") is None or _int(ds, "Columns") is None:
        return False
    modality = (_text(ds, "Modality") or "").upper()
    sop_name = str(getattr(ds.get("SOPClassUID"), "name", ""))
    return modality not in _NON_IMAGE_MODALITIES and "Segmentation" not in sop_name


def _scan_folder(folder: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], int, int]:
    """Group the image files under ``folder`` (recursively) by SeriesInstanceUID.

    Returns:
        ``{uid: [(path, header), ...]}`` sorted by path, the number of files looked at, and the
        number skipped (not DICOM, or DICOM without an image).
    """
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(folder).parts))
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped = 0
    for path in files:
        ds = read_header(path)
        if ds is None or not _is_image(ds):
            skipped += 1
            continue
        groups.setdefault(_series_uid(ds), []).append((path, ds))
    return groups, len(files), skipped


def _describe(uid: str, members: list[tuple[Path, Dataset]]) -> DicomSeries:
    first = members[0][1]
    modality = _text(first, "Modality")
    return DicomSeries(uid=uid, number=_int(first, "SeriesNumber"),
                       description=_text(first, "SeriesDescription") or "",
                       modality=modality.upper() if modality else None,
                       files=tuple(p for p, _ in members),
                       frames=sum(_int(ds, "NumberOfFrames") or 1 for _, ds in members))


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """The image series in ``folder`` (searched recursively), sorted by SeriesNumber then UID.

    Non-image files (DICOMDIR, SEG, SR, files without pixel data, non-DICOM files) are skipped.

    Raises:
        InputError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("is not a folder; list_dicom_series needs a folder of DICOM files",
                         folder)
    groups, _, _ = _scan_folder(folder)
    series = [_describe(uid, members) for uid, members in groups.items()]
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


def _choose_series(folder: Path, groups: dict[str, list[tuple[Path, Dataset]]],
                   series: str | int | None) -> tuple[str, list[tuple[Path, Dataset]]]:
    described = sorted((_describe(uid, m) for uid, m in groups.items()),
                       key=lambda s: (s.number is None, s.number or 0, s.uid))
    listing = "; ".join(f"[{s.summary()}]" for s in described)
    if series is None:
        if len(groups) == 1:
            uid = next(iter(groups))
            return uid, groups[uid]
        raise InputError(f"holds {len(groups)} DICOM series; choose one with series= "
                         f"(SeriesInstanceUID string or SeriesNumber int): {listing}", folder)
    key = str(series).strip()
    if isinstance(series, str) and key in groups:
        return key, groups[key]
    if isinstance(series, int) or key.isdigit():
        matches = [s for s in described if s.number == int(key)]
        if len(matches) == 1:
            return matches[0].uid, groups[matches[0].uid]
        if len(matches) > 1:
            raise InputError(f"SeriesNumber {key} matches {len(matches)} series; choose by "
                             f"SeriesInstanceUID: {listing}", folder)
    raise InputError(f"no series matches series={series!r}; available: {listing}", folder)


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------

def _frames(path: Path, expected_frames: int) -> np.ndarray:
    """Stored (not rescaled) pixel values, shape ``(frames, rows, cols)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as err:  # pydicom raises many types for broken files
            raise InputError(f"cannot read DICOM file ({type(err).__name__}: "
                             f"{_one_line(err)})", path) from None
        if (_int(ds, "SamplesPerPixel") or 1) != 1:
            raise InputError(f"has {_int(ds, 'SamplesPerPixel')} samples per pixel "
                             f"({_text(ds, 'PhotometricInterpretation')}); a greyscale scan is "
                             f"needed", path)
        try:
            pixels = ds.pixel_array
        except Exception as err:  # missing decoder plugin, corrupt codestream, ...
            if expected_frames != 1:
                raise InputError(f"cannot decode pixel data ({_syntax(ds)}): "
                                 f"{_one_line(err)}", path) from None
            pixels = _decode_with_gdcm(path, ds, err)
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != expected_frames:
        raise InputError(f"holds {pixels.shape[0]} frames, expected {expected_frames}", path)
    return pixels


def _syntax(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"transfer syntax {uid.name if uid is not None else 'unknown'}"


def _decode_with_gdcm(path: Path, ds: Dataset, cause: Exception) -> np.ndarray:
    """Decode a single-frame file with GDCM (via SimpleITK) when pydicom has no decoder.

    GDCM returns modality values (rescale applied); we undo the rescale so the caller's per-slice
    rescale path stays the only one.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        values = sitk.GetArrayFromImage(reader.Execute()).astype(np.float64).reshape(
            _int(ds, "Rows") or -1, _int(ds, "Columns") or -1)
    except RuntimeError:
        raise InputError(f"cannot decode pixel data ({_syntax(ds)}; pydicom: "
                         f"{_one_line(cause)}; GDCM failed too)", path) from None
    slope, intercept = _rescale(ds)
    stored = np.round((values - intercept) / slope)
    signed = (_int(ds, "PixelRepresentation") or 0) == 1
    return stored.astype(np.int32 if signed or stored.min() < 0 else np.uint32)


def _rescale(item: Dataset) -> tuple[float, float]:
    slope = _floats(item, "RescaleSlope", 1)
    intercept = _floats(item, "RescaleIntercept", 1)
    # A slope of 0 is a broken header, not a real transform.
    return (slope[0] if slope and slope[0] != 0 else 1.0,
            intercept[0] if intercept else 0.0)


def _apply_rescale(stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Modality values from ``(X, Y, N)`` stored values with per-slice ``(N,)`` slope/intercept.

    Integer output (int16 when it fits, else int32) when every slope is 1 and every intercept a
    whole number (CT in HU, most MR), float32 otherwise.
    """
    integral = np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts))
    if integral and stored.dtype.kind in "ui":
        low = float(stored.min()) + float(intercepts.min())
        high = float(stored.max()) + float(intercepts.max())
        dtype = np.int16 if low >= -32768 and high <= 32767 else np.int32
        if not np.any(intercepts):
            return stored.astype(dtype, copy=False)
        return (stored.astype(np.int32) + intercepts.astype(np.int32)[None, None, :]).astype(dtype)
    out = stored.astype(np.float32)
    out *= slopes.astype(np.float32)[None, None, :]
    out += intercepts.astype(np.float32)[None, None, :]
    return out


# ----------------------------------------------------------------------------------------------
# Slice stacks -> volume
# ----------------------------------------------------------------------------------------------

@dataclass
class _Plane:
    """Geometry and rescale of one 2D slice or frame."""

    name: str
    position: list[float] | None
    orientation: list[float] | None
    spacing: list[float] | None
    rows: int
    cols: int
    slope: float
    intercept: float


def _check_planes(planes: Sequence[_Plane], source: Path) -> tuple[np.ndarray, np.ndarray,
                                                                   list[float]]:
    """Shared (row cosine, column cosine, pixel spacing) of the planes, or a GeometryError."""
    for what, attr, tag in (("position", "position", "ImagePositionPatient"),
                            ("orientation", "orientation", "ImageOrientationPatient"),
                            ("pixel spacing", "spacing", "PixelSpacing")):
        missing = [p.name for p in planes if getattr(p, attr) is None]
        if missing:
            raise GeometryError(f"{len(missing)} slice(s) lack a valid {tag} (first: "
                                f"{missing[0]}); without the {what} voxels cannot be placed",
                                source)
    first = planes[0]
    for plane in planes[1:]:
        if (plane.rows, plane.cols) != (first.rows, first.cols):
            raise GeometryError(f"slices differ in size: {first.name} is {first.rows}x"
                                f"{first.cols}, {plane.name} is {plane.rows}x{plane.cols}", source)
        if not np.allclose(plane.orientation, first.orientation, atol=_SAME_TOL):
            raise GeometryError(f"slices have different orientations ({first.name}: "
                                f"{first.orientation}, {plane.name}: {plane.orientation}); "
                                f"e.g. a multi-plane localizer, not a volume", source)
        if not np.allclose(plane.spacing, first.spacing, rtol=_SAME_TOL):
            raise GeometryError(f"slices differ in PixelSpacing ({first.name}: {first.spacing}, "
                                f"{plane.name}: {plane.spacing})", source)
    iop = np.asarray(first.orientation, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    return row / np.linalg.norm(row), col / np.linalg.norm(col), list(first.spacing)


def _stack_volume(planes: Sequence[_Plane], read_stored, source: Path, *,
                  resample_irregular: bool, nearest: bool) -> tuple[np.ndarray, np.ndarray,
                                                                    dict[str, Any]]:
    """Sort, check, decode, rescale (and if allowed resample) a stack of planes.

    Args:
        planes: one per slice/frame, in file/frame order.
        read_stored: ``f(order) -> (rows, cols, N)`` stored values in the given plane order.

    Returns:
        ``(X, Y, Z)`` modality values, ``(4, 4)`` RAS affine, extra metadata.
    """
    if len(planes) < 2:
        raise InputError(f"a single 2D slice ({planes[0].rows}x{planes[0].cols}); a 3D volume "
                         f"needs a series of at least 2 slices", source)
    row, col, spacing = _check_planes(planes, source)
    stack = sort_slice_stack(np.array([p.position for p in planes]), row, col, spacing,
                             [p.name for p in planes], source)
    if not stack.regular and not resample_irregular:
        raise GeometryError(f"{stack.problem}; pass resample_irregular=True to resample onto a "
                            f"uniform grid along the slice normal", source)
    stored = read_stored(stack.order)  # (rows, cols, N) -> (X, Y, Z) = (cols, rows, N)
    array = _apply_rescale(stored.transpose(1, 0, 2),
                           np.array([planes[i].slope for i in stack.order]),
                           np.array([planes[i].intercept for i in stack.order]))
    extra: dict[str, Any] = {}
    step = stack.step
    if not stack.regular:
        array, step, extra["resampled"] = resample_stack(array, stack, row, col, spacing,
                                                         nearest=nearest)
        logger.warning("%s: %s; resampled onto a uniform %.4g mm grid", source, stack.problem,
                       step)
    affine = stack_affine(stack, row, col, spacing, step)
    return np.ascontiguousarray(array), affine, extra


def _metadata(ds: Dataset, source: Path, rescale_type: str | None,
              extra: dict[str, Any]) -> VolumeMetadata:
    modality = (_text(ds, "Modality") or "").upper() or None
    if modality == "CT":
        # CT Image Storage defines rescaled values as HU; an explicit other type (e.g. "US",
        # unspecified, on perfusion maps) means they are not.
        unit = "HU" if rescale_type in (None, "HU") else None
    elif modality == "MR":
        unit = "a.u."
    else:
        unit = rescale_type
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    extra = {
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription"),
        "sop_class": str(getattr(ds.get("SOPClassUID"), "name", "")) or None,
        "transfer_syntax": syntax.name if syntax is not None else None,
        "rescale_type": rescale_type,
        **extra,
    }
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    # medsynth's DICOM writer marks its files in ImageType (see medsynth.io.provenance).
    synthetic = SYNTHETIC_MARKER in image_type
    return VolumeMetadata(modality=modality, source=str(source), intensity_unit=unit,
                          synthetic=synthetic, series_uid=_series_uid(ds) or None,
                          patient_position=_text(ds, "PatientPosition"),
                          manufacturer=_text(ds, "Manufacturer"), extra=extra)


def _classic_plane(path: Path, ds: Dataset) -> _Plane:
    slope, intercept = _rescale(ds)
    return _Plane(name=path.name, position=_floats(ds, "ImagePositionPatient", 3),
                  orientation=_floats(ds, "ImageOrientationPatient", 6),
                  spacing=_floats(ds, "PixelSpacing", 2), rows=_int(ds, "Rows") or 0,
                  cols=_int(ds, "Columns") or 0, slope=slope, intercept=intercept)


def _read_classic(folder: Path, members: list[tuple[Path, Dataset]], *,
                  resample_irregular: bool, nearest: bool):
    planes = [_classic_plane(p, ds) for p, ds in members]

    def read_stored(order: np.ndarray) -> np.ndarray:
        first = _frames(members[order[0]][0], 1)[0]
        out = np.empty(first.shape + (len(order),), dtype=first.dtype)
        out[:, :, 0] = first
        for n, index in enumerate(order[1:], start=1):
            pixels = _frames(members[index][0], 1)[0]
            if pixels.shape != first.shape:
                raise GeometryError(f"pixel array is {pixels.shape}, expected {first.shape}",
                                    members[index][0])
            out[:, :, n] = pixels
        return out

    array, affine, extra = _stack_volume(planes, read_stored, folder,
                                         resample_irregular=resample_irregular, nearest=nearest)
    ds = members[0][1]
    extra["n_files"] = len(members)
    extra["slice_thickness"] = (_floats(ds, "SliceThickness", 1) or [None])[0]
    types = {_text(d, "RescaleType") for _, d in members}
    return array, affine, _metadata(ds, folder, types.pop() if len(types) == 1 else None, extra)


def _group_item(frame: Dataset, shared: Dataset, sequence: str) -> Dataset | None:
    """The first item of a functional-group sequence, per-frame first, then shared."""
    for source in (frame, shared):
        seq = source.get(sequence)
        if seq:
            return seq[0]
    return None


def _read_enhanced(path: Path, ds: Dataset, *, resample_irregular: bool, nearest: bool):
    n_frames = _int(ds, "NumberOfFrames") or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != n_frames:
        raise GeometryError(f"multi-frame file with {n_frames} frames but "
                            f"{len(per_frame) if per_frame else 0} PerFrameFunctionalGroups "
                            f"items: frame positions are unknown", path)
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else Dataset()
    planes, rescale_types = [], set()
    top_slope, top_intercept = _rescale(ds)
    for index, frame in enumerate(per_frame):
        pos = _group_item(frame, shared, "PlanePositionSequence")
        ori = _group_item(frame, shared, "PlaneOrientationSequence")
        measures = _group_item(frame, shared, "PixelMeasuresSequence")
        transform = _group_item(frame, shared, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transform) if transform is not None else (top_slope,
                                                                              top_intercept)
        rescale_types.add(_text(transform if transform is not None else ds, "RescaleType"))
        planes.append(_Plane(
            name=f"frame {index + 1}",
            position=_floats(pos, "ImagePositionPatient", 3) if pos is not None else None,
            orientation=_floats(ori, "ImageOrientationPatient", 6) if ori is not None else None,
            spacing=_floats(measures, "PixelSpacing", 2) if measures is not None else None,
            rows=_int(ds, "Rows") or 0, cols=_int(ds, "Columns") or 0,
            slope=slope, intercept=intercept))

    def read_stored(order: np.ndarray) -> np.ndarray:
        return _frames(path, n_frames)[order].transpose(1, 2, 0)

    array, affine, extra = _stack_volume(planes, read_stored, path,
                                         resample_irregular=resample_irregular, nearest=nearest)
    extra["n_frames"] = n_frames
    thickness = _group_item(per_frame[0], shared, "PixelMeasuresSequence")
    extra["slice_thickness"] = ((_floats(thickness, "SliceThickness", 1) or [None])[0]
                                if thickness is not None else None)
    rescale_type = rescale_types.pop() if len(rescale_types) == 1 else None
    return array, affine, _metadata(ds, path, rescale_type, extra)


# ----------------------------------------------------------------------------------------------
# Entry points used by medsynth.io.reader
# ----------------------------------------------------------------------------------------------

def read_dicom_folder(folder: str | Path, *, series: str | int | None = None,
                      resample_irregular: bool = False,
                      nearest: bool = False) -> tuple[np.ndarray, np.ndarray, VolumeMetadata]:
    """Read one series from a folder of DICOM files.

    Args:
        folder: folder holding the files (searched recursively; any file names).
        series: SeriesInstanceUID (str) or SeriesNumber (int) when the folder holds several.
        resample_irregular: resample stacks with missing slices, uneven spacing or gantry tilt
            onto a uniform grid along the normal instead of raising GeometryError.
        nearest: nearest-neighbour resampling (label maps) instead of linear.

    Returns:
        ``(X, Y, Z)`` array (X = columns, Y = rows, Z = slices ascending along the normal),
        ``(4, 4)`` RAS affine, and metadata.
    """
    folder = Path(folder)
    groups, looked, skipped = _scan_folder(folder)
    if not groups:
        if looked == 0:
            raise InputError("empty folder; a folder of DICOM files of one series is needed",
                             folder)
        raise InputError(f"no DICOM image files among its {looked} files ({skipped} skipped: "
                         f"not DICOM, or DICOMDIR/SEG/SR/files without pixel data)", folder)
    uid, members = _choose_series(folder, groups, series)
    multi = [(p, ds) for p, ds in members if _is_multiframe(ds)]
    if multi:
        if len(members) > 1:
            raise InputError(f"series {uid or '<no uid>'} mixes {len(multi)} multi-frame file(s) "
                             f"with {len(members) - len(multi)} other file(s); read a multi-frame "
                             f"file directly by its path (first: {multi[0][0].name})", folder)
        return read_dicom_file(multi[0][0], resample_irregular=resample_irregular,
                               nearest=nearest)
    array, affine, meta = _read_classic(folder, members, resample_irregular=resample_irregular,
                                        nearest=nearest)
    meta.extra["skipped_files"] = skipped
    return array, affine, meta


def read_dicom_file(path: str | Path, *, resample_irregular: bool = False,
                    nearest: bool = False) -> tuple[np.ndarray, np.ndarray, VolumeMetadata]:
    """Read an enhanced (or legacy-converted) multi-frame DICOM file as a 3D volume.

    A classic single-slice file is 2D and refused with a pointer to its folder.

    Returns:
        ``(X, Y, Z)`` array (frames sorted along the normal), ``(4, 4)`` RAS affine, metadata.
    """
    path = Path(path)
    ds = read_header(path)
    if ds is None:
        raise InputError("is not a readable DICOM file", path)
    if not _is_image(ds):
        raise InputError(f"DICOM file without a scan image (Modality "
                         f"{_text(ds, 'Modality')}, SOP class "
                         f"{getattr(ds.get('SOPClassUID'), 'name', None)})", path)
    if not _is_multiframe(ds):
        raise InputError(f"a single 2D DICOM slice ({_int(ds, 'Rows')}x{_int(ds, 'Columns')}); "
                         f"a 3D volume needs the whole series: pass its folder ({path.parent})",
                         path)
    return _read_enhanced(path, ds, resample_irregular=resample_irregular, nearest=nearest)
