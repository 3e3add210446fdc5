"""DICOM series and DICOM-SEG export: geometry, values, identity, synthetic marker, validity."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medsynth.data.phantoms import generate_phantom, phantom_labels
from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io import affine_from_itk, orientation_codes, read_volume, reorient
from medsynth.io.dicom_writer import DicomSeriesInfo, encode_int16, write_dicom_series
from medsynth.io.provenance import SYNTHETIC_MARKER, provenance_record, provenance_text
from medsynth.io.seg import segment_codes, write_dicom_seg
from medsynth.io.volume import Volume

GEOMETRY_ATOL = 1e-4  # mm


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _integral_ct(size: int = 24, seed: int = 3):
    """A CT phantom whose HU are whole numbers (so the export must be exact)."""
    case = generate_phantom("ct", size, seed=seed, lesion_rate=1.0)
    case.image = case.image.with_array(np.round(case.image.array).astype(np.int16))
    return case


def _rotated(volume: Volume, degrees: tuple[float, float, float]) -> Volume:
    """The volume with its affine rotated (X, Y, Z Euler angles) about the world origin."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    turn = np.eye(4)
    turn[:3, :3] = rz @ ry @ rx
    return volume.with_array(volume.array.copy(), affine=turn @ volume.affine)


def _permuted(volume: Volume, codes: str) -> Volume:
    array, affine = reorient(volume.array, volume.affine, codes)
    return volume.with_array(array, affine=affine)


def _sitk_read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    affine = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine  # (Z,Y,X) -> (X,Y,Z)


def _source_on(source: Volume, affine: np.ndarray) -> np.ndarray:
    """Source voxels in the axis order of a read-back grid; checks the grids coincide."""
    array, moved = reorient(source.array, source.affine, orientation_codes(affine))
    np.testing.assert_allclose(moved, affine, atol=GEOMETRY_ATOL)
    return array


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy not installed (Debian package dicom3tools: apt-get install dicom3tools)")


@pytest.fixture(scope="module")
def ct_export(tmp_path_factory):
    """Integral-HU CT phantom written as a series plus its SEG."""
    root = tmp_path_factory.mktemp("ct_export")
    case = _integral_ct()
    info = write_dicom_series(case.image, root / "series", provenance={"model_hash": "abc123"})
    seg = write_dicom_seg(case.label, info, phantom_labels("ct"), root / "seg.dcm")
    return case, info, seg


# ----------------------------------------------------------------------------------------------
# Image series: geometry and values
# ----------------------------------------------------------------------------------------------

def test_ct_series_reads_back_with_same_geometry_and_exact_hu(ct_export):
    case, info, _ = ct_export
    assert len(info.files) == 24 and all(f.is_file() for f in info.files)
    assert info.lossless and (info.rescale_slope, info.rescale_intercept) == (1.0, 0.0)
    back = read_volume(info.folder)
    np.testing.assert_allclose(back.affine, info.affine, atol=GEOMETRY_ATOL)
    np.testing.assert_array_equal(back.array, _source_on(case.image, back.affine))
    assert back.metadata.modality == "CT" and back.metadata.intensity_unit == "HU"
    assert back.metadata.synthetic  # the marker survives the round trip
    array, affine = _sitk_read(info.folder)
    np.testing.assert_allclose(affine, info.affine, atol=GEOMETRY_ATOL)
    np.testing.assert_array_equal(array, _source_on(case.image, affine))


def test_display_orientation_is_radiological_and_keep_preserves_axes(tmp_path):
    case = _integral_ct()
    ds = pydicom.dcmread(write_dicom_series(case.image, tmp_path / "d").files[0])
    # Axial display: columns run to the patient's left, rows to posterior (LPS +x, +y).
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                               [1, 0, 0, 0, 1, 0], atol=1e-9)
    kept = write_dicom_series(case.image, tmp_path / "k", display_orientation=False)
    np.testing.assert_allclose(kept.affine, case.image.affine, atol=GEOMETRY_ATOL)
    back = read_volume(kept.folder)
    np.testing.assert_allclose(back.affine, case.image.affine, atol=GEOMETRY_ATOL)
    np.testing.assert_array_equal(back.array, case.image.array)


@pytest.mark.parametrize("display", [True, False])
@pytest.mark.parametrize("variant", ["oblique", "psr", "anisotropic"])
def test_non_ras_grids_keep_geometry(tmp_path, variant, display):
    case = _integral_ct(size=20, seed=5)

    def transform(volume: Volume) -> Volume:
        if variant == "oblique":
            return _rotated(volume, (20.0, -10.0, 35.0))
        if variant == "psr":
            return _permuted(volume, "PSR")  # left-handed: slices must be reversed on disk
        # Non-square pixels catch a swapped PixelSpacing (row vs column spacing).
        scaled = volume.with_array(volume.array, affine=volume.affine @ np.diag([1, 2.5, 0.7, 1]))
        return _rotated(scaled, (0.0, 25.0, 0.0))

    image, label = transform(case.image), transform(case.label)
    info = write_dicom_series(image, tmp_path / "s", display_orientation=display)
    back = read_volume(info.folder)
    for array, affine in ((back.array, back.affine), _sitk_read(info.folder)):
        np.testing.assert_allclose(affine, info.affine, atol=GEOMETRY_ATOL)
        np.testing.assert_array_equal(array, _source_on(image, affine))
    seg_path = write_dicom_seg(label, info, phantom_labels("ct"), tmp_path / "seg.dcm")
    _check_seg(seg_path, info, label, phantom_labels("ct"))


def test_fractional_values_are_scaled_within_half_a_step(tmp_path):
    case = generate_phantom("ct", 20, seed=2)  # float HU with fractions
    info = write_dicom_series(case.image, tmp_path / "s")
    assert not info.lossless and info.rescale_slope < 0.05
    back = read_volume(info.folder)
    error = np.abs(back.array - _source_on(case.image, back.affine))
    assert error.max() <= info.rescale_slope / 2 + 1e-3


def test_mr_series_round_trip(tmp_path):
    case = generate_phantom("mr", 20, seed=4, lesion_rate=1.0)
    info = write_dicom_series(case.image, tmp_path / "mr")
    ds = pydicom.dcmread(info.files[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
    back = read_volume(info.folder)
    np.testing.assert_allclose(back.affine, info.affine, atol=GEOMETRY_ATOL)
    expected = _source_on(case.image, back.affine)
    assert np.abs(back.array - expected).max() <= info.rescale_slope / 2 + 1e-3
    array, affine = _sitk_read(info.folder)
    np.testing.assert_allclose(affine, info.affine, atol=GEOMETRY_ATOL)
    assert np.abs(array - expected).max() <= info.rescale_slope / 2 + 1e-3


def test_encode_int16_policy():
    stored, slope, intercept, lossless = encode_int16(np.array([-1024.0, 0.0, 3071.0]))
    assert (slope, intercept, lossless) == (1.0, 0.0, True)
    np.testing.assert_array_equal(stored, [-1024, 0, 3071])
    # Whole numbers beyond int16 but within a 65536-wide range: shifted, still exact.
    values = np.array([0.0, 40000.0, 60000.0])
    stored, slope, intercept, lossless = encode_int16(values)
    assert lossless and slope == 1.0
    np.testing.assert_array_equal(stored * slope + intercept, values)


# ----------------------------------------------------------------------------------------------
# Identity, synthetic marker, provenance
# ----------------------------------------------------------------------------------------------

def test_identity_and_synthetic_marker(ct_export, tmp_path):
    case, info, _ = ct_export
    datasets = [pydicom.dcmread(f) for f in info.files]
    uids = {ds.SOPInstanceUID for ds in datasets}
    assert uids == set(info.sop_instance_uids) and len(uids) == len(datasets)
    for ds in datasets:
        assert ds.SeriesInstanceUID == info.series_uid and ds.StudyInstanceUID == info.study_uid
        assert ds.FrameOfReferenceUID == info.frame_of_reference_uid
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert SYNTHETIC_MARKER in ds.ImageType
        assert ds.SeriesDescription.startswith(SYNTHETIC_MARKER)
        assert "Synthetic image generated by medsynth" in ds.DerivationDescription
        assert ds.PatientName == "SYNTHETIC^PHANTOM" and ds.PatientID.startswith("SYNTHETIC-")
        assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
    comment = datasets[0].ImageComments
    assert '"synthetic":true' in comment and '"model_hash":"abc123"' in comment
    assert '"seed":3' in comment  # from the phantom's metadata.extra


def test_no_identifier_leaks_from_volume_metadata(tmp_path):
    case = _integral_ct(size=16)
    image = case.image
    image.metadata.source = "/scans/DOE_JANE_0042"
    image.metadata.extra["dicom"] = {"PatientName": "DOE^JANE", "PatientID": "MRN0042"}
    info = write_dicom_series(image, tmp_path / "s")
    for path in info.files:
        raw = path.read_bytes()
        assert b"DOE" not in raw and b"MRN0042" not in raw


def test_identifiers_must_be_synthetic(tmp_path):
    case = _integral_ct(size=16)
    with pytest.raises(ConfigError, match="patient_id"):
        write_dicom_series(case.image, tmp_path / "a", patient_id="123456")
    with pytest.raises(ConfigError, match="patient_name"):
        write_dicom_series(case.image, tmp_path / "b", patient_name="DOE^JANE")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_series_share_study_and_patient(tmp_path):
    case = _integral_ct(size=16)
    first = write_dicom_series(case.image, tmp_path / "a")
    second = write_dicom_series(case.image, tmp_path / "b", study_uid=first.study_uid,
                                frame_of_reference_uid=first.frame_of_reference_uid)
    a, b = (pydicom.dcmread(s.files[0]) for s in (first, second))
    assert a.PatientID == b.PatientID and a.StudyInstanceUID == b.StudyInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID


def test_provenance_text_stays_valid_json_when_truncated():
    import json

    record = provenance_record(modality="CT", extra={"prompt": "x" * 500, "seed": 7})
    text = provenance_text(record, 200)
    parsed = json.loads(text)
    assert len(text) <= 200 and parsed["synthetic"] is True and parsed["truncated"] == ["prompt"]
    with pytest.raises(ConfigError):
        provenance_record(extra={"bad": object()})


# ----------------------------------------------------------------------------------------------
# Folder handling and input checks
# ----------------------------------------------------------------------------------------------

def test_overwrite_refused_then_allowed(tmp_path):
    case = _integral_ct(size=16)
    first = write_dicom_series(case.image, tmp_path / "s")
    with pytest.raises(InputError, match="overwrite=True"):
        write_dicom_series(case.image, tmp_path / "s")
    assert sorted(tmp_path.iterdir()) == [tmp_path / "s"]  # no temporary folder left
    second = write_dicom_series(case.image, tmp_path / "s", overwrite=True)
    assert second.series_uid != first.series_uid
    on_disk = {pydicom.dcmread(f).SeriesInstanceUID for f in (tmp_path / "s").iterdir()}
    assert on_disk == {second.series_uid}
    (tmp_path / "empty").mkdir()
    write_dicom_series(case.image, tmp_path / "empty")  # an empty folder is fine


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    case = _integral_ct(size=16)
    calls = {"n": 0}
    real = pydicom.Dataset.save_as

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(case.image, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_rejects_labels_and_unknown_modality(tmp_path):
    case = _integral_ct(size=16)
    with pytest.raises(InputError, match="write_dicom_seg"):
        write_dicom_series(case.label, tmp_path / "a")
    pet = case.image.with_array(case.image.array)
    pet.metadata.modality = "PT"
    with pytest.raises(InputError, match="'PT'"):
        write_dicom_series(pet, tmp_path / "b")
    sheared = case.image.with_array(case.image.array, affine=case.image.affine
                                    @ np.array([[1, 0, 0.3, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                [0, 0, 0, 1.0]]))
    with pytest.raises(GeometryError, match="off the slice normal"):
        write_dicom_series(sheared, tmp_path / "c")


# ----------------------------------------------------------------------------------------------
# DICOM-SEG
# ----------------------------------------------------------------------------------------------

def _check_seg(seg_path: Path, info: DicomSeriesInfo, label: Volume, labels: dict[str, int]):
    seg = hd.seg.segread(seg_path)
    grid = _source_on(label, info.affine)  # (X, Y, Z) on the series grid
    present = [v for v in sorted(labels.values()) if v != 0 and np.any(grid == v)]
    names = {v: k for k, v in labels.items()}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [names[v] for v in present]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_uid
    assert seg.FrameOfReferenceUID == info.frame_of_reference_uid
    assert seg.StudyInstanceUID == info.study_uid
    assert seg.SeriesDescription.startswith(SYNTHETIC_MARKER)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(info.sop_instance_uids),
        segment_numbers=list(range(1, len(present) + 1)), assert_missing_frames_are_empty=True)
    # (slices, rows, columns, segments); slice k is grid[:, :, k] transposed.
    assert pixels.shape == (grid.shape[2], grid.shape[1], grid.shape[0], len(present))
    for number, value in enumerate(present):
        np.testing.assert_array_equal(pixels[..., number], (grid == value).transpose(2, 1, 0))


def test_seg_matches_label_map_ct(ct_export):
    case, info, seg_path = ct_export
    _check_seg(seg_path, info, case.label, phantom_labels("ct"))
    seg = hd.seg.segread(seg_path)
    kidney = next(s for s in seg.SegmentSequence if s.SegmentLabel == "kidney_left")
    prop = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert prop.CodeMeaning == "Kidney"
    assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert kidney.SegmentAlgorithmType == "AUTOMATIC"
    assert kidney.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "medsynth"


def test_labelmap_seg_reads_back(ct_export, tmp_path):
    case, info, _ = ct_export
    labels = phantom_labels("ct")
    path = write_dicom_seg(case.label, info, labels, tmp_path / "lm.dcm",
                           segmentation_type="LABELMAP")
    seg = hd.seg.segread(path)
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP
    grid = _source_on(case.label, info.affine)
    present = [v for v in sorted(labels.values()) if v != 0 and np.any(grid == v)]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(info.sop_instance_uids), combine_segments=True,
        assert_missing_frames_are_empty=True)
    numbered = np.zeros_like(grid)
    for number, value in enumerate(present, start=1):
        numbered[grid == value] = number
    np.testing.assert_array_equal(pixels, numbered.transpose(2, 1, 0))


def test_seg_on_oblique_mr_from_folder(tmp_path):
    case = generate_phantom("mr", 20, seed=6, lesion_rate=1.0)
    image, label = (_rotated(v, (0.0, 15.0, -30.0)) for v in (case.image, case.label))
    info = write_dicom_series(image, tmp_path / "mr")
    # Given as a folder: the SEG must find, sort and reference the slices itself.
    seg_path = write_dicom_seg(label, tmp_path / "mr", phantom_labels("mr"), tmp_path / "seg.dcm")
    _check_seg(seg_path, info, label, phantom_labels("mr"))


def test_seg_rejects_label_off_grid_and_unknown_values(ct_export, tmp_path):
    case, info, _ = ct_export
    shifted = case.label.with_array(case.label.array, affine=case.label.affine.copy())
    shifted.affine[0, 3] += 1.0
    with pytest.raises(GeometryError, match="not the image series grid"):
        write_dicom_seg(shifted, info, phantom_labels("ct"), tmp_path / "a.dcm")
    cropped = case.label.with_array(case.label.array[:, :, :-1])
    with pytest.raises(GeometryError):
        write_dicom_seg(cropped, info, phantom_labels("ct"), tmp_path / "b.dcm")
    partial = {k: v for k, v in phantom_labels("ct").items() if k != "liver"}
    with pytest.raises(InputError, match=r"\[3\]"):
        write_dicom_seg(case.label, info, partial, tmp_path / "c.dcm")
    assert not any(tmp_path.iterdir())


def test_segment_codes():
    category, kind, side, region = segment_codes("liver_lesion")
    assert (category.meaning, kind.meaning, side, region.meaning) == (
        "Morphologically Abnormal Structure", "Lesion", None, "Liver")
    assert segment_codes("spleen")[1].value == "78961009"
    assert segment_codes("something_else")[:2] == segment_codes("tissue")[:2]


# ----------------------------------------------------------------------------------------------
# Standard conformance (dciodvfy)
# ----------------------------------------------------------------------------------------------

@needs_dciodvfy
def test_dciodvfy_finds_no_errors(ct_export, tmp_path):
    _, info, seg_path = ct_export
    mr = write_dicom_series(generate_phantom("mr", 16, seed=1).image, tmp_path / "mr")
    for path in (info.files[0], mr.files[0], seg_path):
        assert _dciodvfy_errors(path) == [], path
