"""Export a label map as a DICOM Segmentation (highdicom) that references its image series.

One segment per non-background label present in the map, numbered 1..N in increasing label
value, with SegmentLabel = the label's name from ``dataset.json`` and coded properties from
:func:`segment_codes`. The SEG references every slice of the image series written by
:func:`medsynth.io.dicom_writer.write_dicom_series` (or any single-frame series folder) and
shares its patient, study and frame of reference. See ``docs/dicom_export.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io.atomic import atomic_path
from medsynth.io.dicom_writer import DicomSeriesInfo
from medsynth.io.geometry import dicom_affine, orientation_codes, reorient, sort_slice_stack
from medsynth.io.provenance import SYNTHETIC_MARKER
from medsynth.io.volume import Volume

__all__ = ["write_dicom_seg", "segment_codes", "SEG_GRID_ATOL"]

# Label and series grids that differ by less than this (mm / direction cosine) are the same
# grid: header DS text keeps ~1e-6 mm, medsynth's dataset writer tolerates 1e-3.
SEG_GRID_ATOL = 1e-3
_SEGMENT_TYPES = ("BINARY", "LABELMAP")

# Words in a label name -> (category, property type), DICOM CID 7150 / 7151 (SNOMED CT).
# Checked in order; the first word found in the name wins, so "liver_lesion" is a lesion (in
# the liver), not the liver.
_ABNORMAL = codes.cid7150.MorphologicallyAbnormalStructure
_ANATOMY = codes.cid7150.AnatomicalStructure
_TISSUE = codes.cid7150.Tissue
_SUBSTANCE = codes.cid7150.BodySubstance
_KNOWN: tuple[tuple[tuple[str, ...], object, object], ...] = (
    (("oedema", "edema"), _ABNORMAL, codes.SCT.Edema),
    (("tumour", "tumor", "neoplasm", "cancer", "metastasis"), _ABNORMAL, codes.SCT.Neoplasm),
    (("lesion", "nodule", "mass"), _ABNORMAL, codes.SCT.Lesion),
    (("cyst",), _ABNORMAL, codes.SCT.Cyst),
    (("necrosis",), _ABNORMAL, codes.SCT.Necrosis),
    (("liver",), _ANATOMY, codes.SCT.Liver),
    (("spleen",), _ANATOMY, codes.SCT.Spleen),
    (("kidney",), _ANATOMY, codes.SCT.Kidney),
    (("aorta",), _ANATOMY, codes.SCT.Aorta),
    (("pancreas",), _ANATOMY, codes.SCT.Pancreas),
    (("lung",), _ANATOMY, codes.SCT.Lung),
    (("heart",), _ANATOMY, codes.SCT.Heart),
    (("stomach",), _ANATOMY, codes.SCT.Stomach),
    (("gallbladder",), _ANATOMY, codes.SCT.Gallbladder),
    (("bladder",), _ANATOMY, codes.SCT.Bladder),
    (("prostate",), _ANATOMY, codes.SCT.Prostate),
    (("spine", "vertebra"), _ANATOMY, codes.SCT.Spine),
    (("skull",), _ANATOMY, codes.SCT.Skull),
    (("scalp",), _ANATOMY, codes.SCT.Scalp),
    (("ventricle",), _ANATOMY, codes.cid7151.BrainVentricle),
    (("brain",), _ANATOMY, codes.SCT.Brain),
    (("csf", "cerebrospinal"), _SUBSTANCE, codes.SCT.CerebrospinalFluid),
    (("grey_matter", "gray_matter"), _TISSUE, codes.SCT.GrayMatter),
    (("white_matter",), _TISSUE, codes.SCT.WhiteMatter),
    (("muscle",), _TISSUE, codes.SCT.Muscle),
    (("bone",), _TISSUE, codes.SCT.Bone),
    (("fat", "adipose"), _TISSUE, codes.SCT.Fat),
    (("body", "skin", "soft_tissue"), _TISSUE, codes.SCT.SoftTissue),
)
# Organs a lesion can be located in (AnatomicRegionSequence of an abnormal segment).
_REGIONS = {word: code for words, category, code in _KNOWN if category is _ANATOMY
            for word in words}
_SIDES = {"left": codes.SCT.Left, "right": codes.SCT.Right}
_ALL_KEYS = {key for keys, _, _ in _KNOWN for key in keys}


def _words(name: str) -> list[str]:
    return [w for w in name.lower().replace("-", "_").replace(" ", "_").split("_") if w]


def segment_codes(name: str) -> tuple[object, object, object | None, object | None]:
    """Coded meaning of a label name.

    Args:
        name: a label name such as "liver", "kidney_left", "liver_lesion", "tumour_core".

    Returns:
        ``(category, property type, laterality modifier or None, anatomic region or None)`` as
        pydicom ``Code`` objects: SNOMED CT codes from DICOM CID 7150/7151 for known words, and
        category/type "Tissue" for anything else.
    """
    joined = f"_{'_'.join(_words(name))}_"
    # Plurals ("kidneys", "ventricles", "lesions") name the same structure.
    words = {w[:-2] if w.endswith("es") and w[:-2] in _ALL_KEYS else
             w[:-1] if w.endswith("s") and w[:-1] in _ALL_KEYS else w for w in _words(name)}
    category, kind = _TISSUE, codes.SCT.Tissue
    for keys, key_category, key_code in _KNOWN:
        if any((k in words) if "_" not in k else (f"_{k}_" in joined) for k in keys):
            category, kind = key_category, key_code
            break
    side = next((_SIDES[w] for w in ("left", "right") if w in words), None)
    region = None
    if category is _ABNORMAL:
        region = next((_REGIONS[w] for w in _words(name) if w in _REGIONS), None)
    return category, kind, side, region


def _segment_description(number: int, name: str, algorithm: hd.AlgorithmIdentificationSequence,
                         color: tuple[int, int, int]) -> hd.seg.SegmentDescription:
    category, kind, side, region = segment_codes(name)
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64],
        segmented_property_category=category, segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[region] if region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*color))
    if side is not None:
        # Laterality belongs on the property type as a modifier (e.g. Kidney + Left).
        prop = description.SegmentedPropertyTypeCodeSequence[0]
        prop.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(side)]
    return description


def _palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct RGB colours (golden-angle hues), for viewers' segment display."""
    import colorsys

    return [tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb((0.61803 * i) % 1.0, 0.65, 0.95))
            for i in range(count)]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# The image series
# ----------------------------------------------------------------------------------------------

def _series_datasets(series: DicomSeriesInfo | str | Path) -> tuple[list[pydicom.Dataset], Path]:
    """Headers of the series' slices (no pixel data), and its folder."""
    if isinstance(series, DicomSeriesInfo):
        files, folder = list(series.files), series.folder
    else:
        folder = Path(series)
        if not folder.is_dir():
            raise InputError("is not a folder; give the DICOM series folder or the "
                             "DicomSeriesInfo that write_dicom_series returned", folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as err:  # noqa: BLE001 - any parse failure means "not a DICOM slice"
            raise InputError(f"cannot read as DICOM: {str(err).splitlines()[0]}", path) from None
    if len(datasets) < 2:
        raise InputError(f"{len(datasets)} DICOM file(s); a SEG needs an image series of at "
                         f"least 2 single-frame slices", folder)
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) != 1:
        raise InputError(f"files of {len(uids)} series; give a folder holding one image series",
                         folder)
    if any(int(ds.get("NumberOfFrames", 1) or 1) != 1 for ds in datasets):
        raise InputError("multi-frame images; write_dicom_seg references single-frame series",
                         folder)
    return datasets, folder


def _series_affine(datasets: list[pydicom.Dataset], folder: Path
                   ) -> tuple[list[pydicom.Dataset], np.ndarray, tuple[int, int, int]]:
    """Slices sorted along the normal, the RAS affine and ``(X, Y, Z)`` shape of the stack."""
    try:
        iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
        spacing = [float(v) for v in datasets[0].PixelSpacing]
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    except (AttributeError, TypeError, ValueError) as err:
        raise GeometryError(f"image series lacks valid geometry tags ({err})", folder) from None
    row, col = iop[:3], iop[3:]
    stack = sort_slice_stack(positions, row, col, spacing,
                             [Path(str(ds.filename)).name for ds in datasets], folder)
    if not stack.regular:
        raise GeometryError(f"image series is not a regular stack: {stack.problem}", folder)
    affine = dicom_affine(row, col, spacing, stack.positions[0], stack.normal * stack.step)
    shape = (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets))
    return [datasets[i] for i in stack.order], affine, shape


def _label_on_grid(label: Volume, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The label voxels on the series grid ``(X, Y, Z)``, or a GeometryError."""
    # The series may store the label's grid with axes flipped/swapped (display orientation,
    # slices ordered along the normal): bring the label to the series' axis codes, which undoes
    # exactly those flips and swaps, then demand the same grid.
    array, moved = reorient(label.array, label.affine, orientation_codes(affine))
    if array.shape == shape and np.allclose(moved, affine, atol=SEG_GRID_ATOL):
        return array
    raise GeometryError(
        f"label grid (shape {label.shape}, affine {np.round(label.affine, 4).tolist()}) is not "
        f"the image series grid (shape {shape}, affine {np.round(affine, 4).tolist()}) within "
        f"{SEG_GRID_ATOL} mm; resample the label onto the image (nearest neighbour) first")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def write_dicom_seg(label: Volume, series: DicomSeriesInfo | str | Path,
                    labels: Mapping[str, int], out_file: str | Path, *,
                    algorithm_name: str = "medsynth",
                    algorithm_version: str | None = None,
                    series_description: str | None = None,
                    series_number: int = 100,
                    segmentation_type: str = "BINARY") -> Path:
    """Write ``label`` as a DICOM Segmentation referencing the image series it was drawn on.

    Args:
        label: kind "label", integer ``(X, Y, Z)`` voxels on the image's grid (the grid given to
            ``write_dicom_series``, or the series' own stored grid).
        series: the :class:`DicomSeriesInfo` from ``write_dicom_series`` or a folder holding
            one single-frame image series.
        labels: label name -> value (``dataset.json`` "labels"); 0 / "background" is skipped.
        out_file: the ``.dcm`` file to write (atomically).
        algorithm_name: AlgorithmName of every segment (algorithm type AUTOMATIC).
        algorithm_version: AlgorithmVersion; default the medsynth version.
        series_description: free text; ``"SYNTHETIC "`` is prefixed unless present.
        series_number: SeriesNumber of the SEG series.
        segmentation_type: "BINARY" (default; widest reader support) or "LABELMAP" (DICOM
            2024 Label Map Segmentation; smaller, but older tools cannot read it).

    Returns:
        ``out_file`` as a Path.

    Raises:
        GeometryError: the label is not on the series grid.
        InputError: not a label map, values missing from ``labels``, no foreground voxels, or
            a series folder that cannot be read.
        ConfigError: invalid ``labels`` or ``segmentation_type``.
    """
    from medsynth import __version__

    out_file = Path(out_file)
    if label.kind != "label" or label.array.dtype.kind not in "ui":
        raise InputError(f"write_dicom_seg needs an integer label map of kind 'label', got kind "
                         f"{label.kind!r} with dtype {label.array.dtype}")
    seg_type = str(segmentation_type).upper()
    if seg_type not in _SEGMENT_TYPES:
        raise ConfigError(f"segmentation_type must be one of {_SEGMENT_TYPES}, got "
                          f"{segmentation_type!r}")
    names: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"label values must be integers >= 0, got {name!r}: {value!r}")
        if int(value) in names:
            raise ConfigError(f"labels {names[int(value)]!r} and {name!r} share value {value}")
        names[int(value)] = str(name)

    datasets, folder = _series_datasets(series)
    datasets, affine, shape = _series_affine(datasets, folder)
    array = _label_on_grid(label, affine, shape)
    present = [int(v) for v in np.unique(array) if v != 0]
    unknown = [v for v in present if v not in names]
    if unknown:
        raise InputError(f"label map holds value(s) {unknown} that are not in labels "
                         f"{dict(labels)}; pass the dataset's full label table")
    if not present:
        raise InputError("label map has no non-background voxels; a SEG needs at least one "
                         "segment")

    # Segment numbers are 1..N (required consecutive by the standard), in label value order.
    numbered = np.zeros(array.shape, dtype=np.uint16 if len(present) > 255 else np.uint8)
    for number, value in enumerate(present, start=1):
        numbered[array == value] = number
    # (X, Y, Z) -> (frames, rows, columns), frame k on the k-th sorted source slice.
    frames = np.ascontiguousarray(numbered.transpose(2, 1, 0))

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64], family=codes.cid7162.ArtificialIntelligence,
        version=(algorithm_version or __version__)[:64])
    colors = _palette(len(present))
    descriptions = [_segment_description(n, names[v], algorithm, colors[n - 1])
                    for n, v in enumerate(present, start=1)]
    text = (series_description or "medsynth labels").strip()
    if not text.upper().startswith(SYNTHETIC_MARKER):
        text = f"{SYNTHETIC_MARKER} {text}"
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=seg_type,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=int(series_number), sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="medsynth", manufacturer_model_name="medsynth synthetic generator",
        software_versions=__version__, device_serial_number="SYNTHETIC",
        content_label="SYNTHETIC", content_description=f"{SYNTHETIC_MARKER} labels "
        f"generated by medsynth; not from a patient"[:64], omit_empty_frames=True)
    seg.SeriesDescription = text[:64]
    with atomic_path(out_file) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out_file
