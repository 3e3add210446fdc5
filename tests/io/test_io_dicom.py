"""DICOM series and enhanced multi-frame reading on synthetic files built with pydicom."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import enhanced_ct, expected_ras, slice_positions, write_series

from medsynth.errors import GeometryError, InputError
from medsynth.io import list_dicom_series, read_volume
from medsynth.io.itk import sitk_to_arrays

SHAPE = (6, 5, 7)  # (X, Y, Z): 6 columns, 5 rows, 7 slices


@pytest.fixture
def stored() -> np.ndarray:
    """``(X, Y, Z)`` stored int16 values, all distinct so any reordering shows."""
    return np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) + 100


def _sitk_series(folder) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk_to_arrays(reader.Execute())


def test_series_values_geometry_and_metadata(tmp_path, stored):
    write_series(tmp_path, stored, intercept=-1024.0)
    vol = read_volume(tmp_path)
    assert vol.shape == SHAPE
    assert vol.array.dtype == np.int16  # slope 1, whole intercept: integer HU
    np.testing.assert_array_equal(vol.array, stored.astype(np.int32) - 1024)
    # Voxel (i, j, k) lands where the DICOM definition puts it (LPS origin (-20, -30, 40)).
    for index in [(0, 0, 0), (5, 4, 6), (2, 3, 1)]:
        world = vol.affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(world[:3], expected_ras(index, (-20, -30, 40), (1, 0, 0),
                                                           (0, 1, 0), (0.8, 0.7), (0, 0, 2.5)),
                                   atol=1e-6)
    meta = vol.metadata
    assert (meta.modality, meta.intensity_unit, meta.patient_position, meta.manufacturer) == (
        "CT", "HU", "HFS", "MEDSYNTH TEST")
    assert meta.series_uid == "1.2.826.0.1.3680043.8.498.10"
    assert meta.orientation == ("L", "P", "S")
    assert meta.extra["series_number"] == 3


def test_order_ignores_file_names_and_instance_numbers(tmp_path, stored):
    ordered = read_volume(write_series(tmp_path / "a", stored)[0].parent)
    rng = np.random.default_rng(0)
    names = [f"IMG{n:04d}" for n in rng.permutation(SHAPE[2])]  # no extension either
    shuffled = write_series(tmp_path / "b", stored, names=names,
                            instance_numbers=list(rng.permutation(SHAPE[2]) + 1))
    again = read_volume(shuffled[0].parent)
    np.testing.assert_array_equal(again.array, ordered.array)
    np.testing.assert_allclose(again.affine, ordered.affine, atol=1e-9)


def test_reversed_acquisition_is_sorted_along_normal(tmp_path, stored):
    # Slices written head-to-feet: the volume still ascends along the normal (+S).
    positions = slice_positions(SHAPE[2], (-20, -30, 40), (0, 0, -2.5))
    write_series(tmp_path, stored, positions=positions)
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, stored[:, :, ::-1] - 1024)
    assert vol.affine[2, 2] == pytest.approx(2.5)
    assert vol.affine[2, 3] == pytest.approx(40 - 6 * 2.5)


def test_per_slice_rescale(tmp_path, stored):
    slopes = [1.0, 2.0, 0.5, 1.0, 1.5, 1.0, 3.0]
    write_series(tmp_path, stored, slopes=slopes, intercept=-1000.5)
    vol = read_volume(tmp_path)
    assert vol.array.dtype == np.float32
    expected = stored * np.array(slopes)[None, None, :] - 1000.5
    np.testing.assert_allclose(vol.array, expected, rtol=1e-6)


def test_oblique_series_matches_simpleitk(tmp_path, stored):
    angle = np.radians(17.0)
    row = (np.cos(angle), np.sin(angle), 0.0)
    col = (-np.sin(angle) * np.cos(0.3), np.cos(angle) * np.cos(0.3), np.sin(0.3))
    normal = np.cross(row, col)
    write_series(tmp_path, stored, row=row, col=col, step=normal * 1.25)
    vol = read_volume(tmp_path)
    ref_array, ref_affine = _sitk_series(tmp_path)
    np.testing.assert_allclose(vol.affine, ref_affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, ref_array)
    world = vol.affine @ np.array([5.0, 4.0, 6.0, 1.0])
    np.testing.assert_allclose(world[:3], expected_ras((5, 4, 6), (-20, -30, 40), row, col,
                                                       (0.8, 0.7), normal * 1.25), atol=1e-4)


def test_missing_slice_is_an_error_naming_the_gap(tmp_path, stored):
    paths = write_series(tmp_path, stored)
    paths[3].unlink()
    with pytest.raises(GeometryError, match=r"missing slice.*gap of 5 mm.*median step is 2\.5"):
        read_volume(tmp_path)


def test_uneven_spacing_error_then_resampled(tmp_path, stored):
    positions = slice_positions(SHAPE[2], (-20, -30, 40), (0, 0, 2.5))
    positions[4, 2] += 0.6  # slice 4 sits 0.6 mm too high
    write_series(tmp_path, stored, positions=positions)
    with pytest.raises(GeometryError, match=r"non-uniform slice spacing.*3\.1 mm"):
        read_volume(tmp_path)
    vol = read_volume(tmp_path, resample_irregular=True)
    assert vol.shape == SHAPE and vol.spacing[2] == pytest.approx(2.5)
    record = vol.metadata.extra["resampled"]
    assert record["method"] == "linear" and "non-uniform" in record["reason"]
    values = stored.astype(np.float64) - 1024
    # Untouched slices come back exactly; slice 4 (grid z=10 mm) interpolates slices 3 (7.5 mm)
    # and 4 (now at 10.6 mm): weight 2.5 / 3.1 on slice 4.
    np.testing.assert_allclose(vol.array[:, :, 2], values[:, :, 2])
    w = 2.5 / 3.1
    np.testing.assert_allclose(vol.array[:, :, 4], (1 - w) * values[:, :, 3] + w * values[:, :, 4],
                               rtol=1e-5)
    labels = read_volume(tmp_path, kind="label", resample_irregular=True)
    assert labels.metadata.extra["resampled"]["method"] == "nearest"
    assert np.issubdtype(labels.array.dtype, np.integer)


def test_missing_slice_resampled_onto_regular_grid(tmp_path, stored):
    paths = write_series(tmp_path, stored)
    paths[2].unlink()
    vol = read_volume(tmp_path, resample_irregular=True)
    assert vol.shape == SHAPE  # the gap is filled by interpolation
    values = stored.astype(np.float64) - 1024
    np.testing.assert_allclose(vol.array[:, :, 2], 0.5 * (values[:, :, 1] + values[:, :, 3]))


def test_duplicate_position_is_an_error(tmp_path, stored):
    positions = slice_positions(SHAPE[2], (-20, -30, 40), (0, 0, 2.5))
    positions[5] = positions[4]
    write_series(tmp_path, stored, positions=positions)
    with pytest.raises(GeometryError, match="duplicate slice position"):
        read_volume(tmp_path)


def test_4d_series_is_refused(tmp_path, stored):
    positions = np.repeat(slice_positions(SHAPE[2] // 2 + 1, (0, 0, 0), (0, 0, 3)), 2, axis=0)
    write_series(tmp_path, stored[:, :, :6], positions=positions[:6])
    with pytest.raises(InputError, match="2 images at each of 3 slice positions"):
        read_volume(tmp_path)


def test_gantry_tilt_refused_then_resampled(tmp_path):
    stored = np.zeros((12, 10, 6), dtype=np.int16)
    stored[3, 4, :] = 1000  # a rod along the table axis, as the scanner saw it per slice
    tilt = np.radians(20.0)
    # The table moves along z; the gantry tilt shifts each slice along the column direction (y).
    step = np.array([0.0, 2.0 * np.tan(tilt), 2.0])
    write_series(tmp_path, stored, spacing=(1.0, 1.0), step=step)
    with pytest.raises(GeometryError, match="not stacked along their normal"):
        read_volume(tmp_path)
    vol = read_volume(tmp_path, resample_irregular=True)
    assert vol.metadata.extra["resampled"]["in_plane_shift"] is True
    # The rod is at LPS (x0 + 3, y0 + 4 + k * 2 tan(tilt), z0 + 2 k): find it in each slice.
    for k in range(1, 3):
        j = 4 + k * 2.0 * np.tan(tilt)
        column = vol.array[3, :, k] + 1024
        assert np.argmax(column) in (int(np.floor(j)), int(np.ceil(j)))
        assert column.sum() == pytest.approx(1000, rel=1e-4)  # linear interpolation keeps mass


def test_mixed_series_folder(tmp_path, stored):
    write_series(tmp_path / "t1", stored, series_uid="1.2.3.4.1", series_number=4,
                 description="first")
    write_series(tmp_path / "t2", stored[:, :, :3] * 2, series_uid="1.2.3.4.2", series_number=9,
                 description="second")
    (tmp_path / "README.txt").write_text("not dicom")
    listed = list_dicom_series(tmp_path)
    assert [(s.uid, s.number, s.description, len(s.files)) for s in listed] == [
        ("1.2.3.4.1", 4, "first", 7), ("1.2.3.4.2", 9, "second", 3)]
    with pytest.raises(InputError) as err:
        read_volume(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "2 DICOM series" in message
    assert "uid=1.2.3.4.1 number=4 description='first'" in message and "files=3" in message
    by_number = read_volume(tmp_path, series=9)
    by_uid = read_volume(tmp_path, series="1.2.3.4.2")
    assert by_number.shape == by_uid.shape == (6, 5, 3)
    np.testing.assert_array_equal(by_uid.array, stored[:, :, :3] * 2 - 1024)
    with pytest.raises(InputError, match="no series matches series=12"):
        read_volume(tmp_path, series=12)


def test_non_image_files_are_skipped(tmp_path, stored):
    write_series(tmp_path, stored)
    # A header-only DICOM file (no pixel data), e.g. a stripped DICOMDIR-like object.
    ds = pydicom.dcmread(tmp_path / "slice_000.dcm")
    del ds.PixelData
    ds.SeriesInstanceUID = "1.2.3.999"
    ds.save_as(tmp_path / "nopixels.dcm")
    (tmp_path / "notes.txt").write_text("hello")
    vol = read_volume(tmp_path)
    assert vol.shape == SHAPE and vol.metadata.extra["skipped_files"] == 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_tolerates_no_preamble_padding_and_missing_tags(tmp_path, stored):
    paths = write_series(tmp_path, stored, preamble=False, thickness=None)
    for path in paths:  # odd but legal-ish formatting scanners produce
        ds = pydicom.dcmread(path, force=True)
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + "\x00"
        del ds.SeriesDescription
        del ds.Manufacturer
        ds.RescaleIntercept = " -1024 "
        ds.save_as(path, implicit_vr=True, little_endian=True)
    assert pydicom.dcmread(paths[0], force=True).preamble is None
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, stored - 1024)
    assert vol.metadata.manufacturer is None and vol.metadata.extra["slice_thickness"] is None


def test_empty_and_non_dicom_folders(tmp_path):
    with pytest.raises(InputError, match="empty folder"):
        read_volume(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM image files among its 1 files"):
        read_volume(tmp_path)


def test_single_slice_is_refused_as_2d(tmp_path, stored):
    paths = write_series(tmp_path / "one", stored[:, :, :1])
    with pytest.raises(InputError, match="single 2D DICOM slice.*pass its folder"):
        read_volume(paths[0])
    with pytest.raises(InputError, match="single 2D slice"):
        read_volume(paths[0].parent)


def test_gdcm_fallback_when_pydicom_cannot_decode(tmp_path, stored, monkeypatch):
    write_series(tmp_path, stored, slopes=[2.0] * SHAPE[2], intercept=-1000.0)

    def no_decoder(self):
        raise RuntimeError("no pixel data decoder available")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    vol = read_volume(tmp_path)
    np.testing.assert_allclose(vol.array, stored * 2.0 - 1000.0)


def test_enhanced_frames_sorted_along_normal_with_per_frame_rescale(tmp_path, stored):
    """Frames stored in scrambled order, each with its own rescale; the reference is the
    per-frame PlanePositionSequence (sorted along the normal), checked against the definition."""
    order = np.array([3, 0, 6, 1, 5, 2, 4])  # frame f holds slice order[f]
    positions = slice_positions(SHAPE[2], (10, 20, -50), (0, 0, 3.0))[order]
    slopes = np.array([1.0, 2.0, 1.0, 0.5, 1.0, 4.0, 1.0])
    ds = enhanced_ct(stored[:, :, order], positions, slopes=slopes,
                     intercepts=np.full(7, -1024.0))
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    vol = read_volume(path)
    expected = np.empty(SHAPE)
    expected[:, :, order] = stored[:, :, order] * slopes[None, None, :] - 1024
    np.testing.assert_allclose(vol.array, expected, rtol=1e-6)
    np.testing.assert_allclose((vol.affine @ [1, 2, 3, 1])[:3],
                               expected_ras((1, 2, 3), (10, 20, -50), (1, 0, 0), (0, 1, 0),
                                            (0.8, 0.7), (0, 0, 3.0)), atol=1e-6)
    assert vol.metadata.intensity_unit == "HU" and vol.metadata.extra["n_frames"] == 7


def test_enhanced_without_positions_is_refused(tmp_path, stored):
    ds = enhanced_ct(stored, slice_positions(SHAPE[2], (0, 0, 0), (0, 0, 1)))
    del ds.PerFrameFunctionalGroupsSequence
    path = tmp_path / "nogeom.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(GeometryError, match="frame positions are unknown"):
        read_volume(path)
