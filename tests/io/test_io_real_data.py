"""Real scans from ../shared/data: geometry and voxels cross-checked against SimpleITK/nibabel.

SimpleITK (ITK's NIfTI/NRRD readers, GDCM for DICOM series) is an independent implementation
of the same conventions; agreement to 1e-4 mm on every file is the evidence that our LPS<->RAS
handling, slice sorting and rescaling are right.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medsynth.errors import GeometryError, InputError
from medsynth.io import list_dicom_series, read_volume, reorient
from medsynth.io.dicom import looks_like_dicom
from medsynth.io.itk import sitk_to_arrays

_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd")


def _volume_files() -> list[str]:
    if not _DATA.is_dir():
        return []
    return sorted(str(p.relative_to(_DATA)) for p in _DATA.rglob("*")
                  if p.is_file() and p.name.lower().endswith(_VOLUME_SUFFIXES))


def _series_folders() -> list[str]:
    """Folders holding exactly one DICOM series of classic single-frame files."""
    if not _DATA.is_dir():
        return []
    found = []
    for folder in sorted(p for p in _DATA.rglob("*") if p.is_dir()):
        files = [f for f in folder.iterdir() if f.is_file()]
        if sum(looks_like_dicom(f) for f in files) < 2:
            continue
        series = list_dicom_series(folder)
        if len(series) == 1 and len(series[0].files) >= 2 and series[0].frames == len(
                series[0].files):
            found.append(str(folder.relative_to(_DATA)))
    return found


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (X, Y, Z), RAS affine) from SimpleITK, or nibabel for MGH/MGZ (ITK cannot read it)."""
    if path.name.endswith((".mgz", ".mgh")):
        image = nib.load(str(path))
        return np.asanyarray(image.dataobj), image.affine
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return sitk_to_arrays(reader.Execute())
    return sitk_to_arrays(sitk.ReadImage(str(path)))


def _assert_same_voxels(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    if ours.dtype.kind in "ui" and ref.dtype.kind in "ui" or ours.dtype == ref.dtype:
        assert np.array_equal(ours, ref)  # exact, also across int widths / byte orders
    else:  # e.g. NIfTI scl_slope data: nibabel scales in float64, ITK in float32
        np.testing.assert_allclose(ours.astype(ref.dtype), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("relpath", _volume_files() + _series_folders())
def test_geometry_and_voxels_match_reference(shared_data, relpath):
    path = shared_data / relpath
    vol = read_volume(path)
    ref_array, ref_affine = _reference(path)
    np.testing.assert_allclose(vol.affine, ref_affine, atol=1e-4, rtol=0)
    _assert_same_voxels(vol.array, ref_array)
    assert vol.metadata.orientation == tuple(nib.aff2axcodes(ref_affine))


def test_discovery_found_every_format(shared_data):
    files, folders = _volume_files(), _series_folders()
    assert {Path(f).suffix for f in files} >= {".gz", ".mgz", ".nrrd"}
    assert {"totalsegmentator/example_ct_dicom", "dcmqi_ct3slice/ct-3slice",
            "dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22"} <= set(folders)


@pytest.mark.parametrize("relpath", ["niivue/enh.dcm", "pydicom_testdata/eCT_Supplemental.dcm"])
def test_enhanced_multiframe_matches_frame_positions(shared_data, relpath):
    """Reference: the per-frame PlanePositionSequence, sorted along the slice normal.

    SimpleITK keeps frames in stored order and builds its z axis from them: for enh.dcm (frames
    stored ascending) it agrees with us exactly; for eCT_Supplemental (2 frames stored at z -159
    then -149 with normal -z) it reports a +z axis, i.e. the same voxels in the opposite slice
    order. We therefore check every frame centre against its own ImagePositionPatient, and
    compare with SimpleITK after flipping the slice axis when its z direction is reversed.
    """
    path = shared_data / relpath
    vol = read_volume(path)
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                          for f in frames])
    ras = positions * [-1, -1, 1]
    centres = (vol.affine @ np.c_[np.zeros((len(frames), 2)), np.arange(len(frames)),
                                  np.ones(len(frames))].T).T[:, :3]
    # Our slices are the frames sorted along the normal: each centre is one frame's position.
    normal = vol.affine[:3, 2] / np.linalg.norm(vol.affine[:3, 2])
    np.testing.assert_allclose(centres, ras[np.argsort(ras @ normal)], atol=1e-4)

    ref_array, ref_affine = sitk_to_arrays(sitk.ReadImage(str(path)))
    if np.dot(ref_affine[:3, 2], vol.affine[:3, 2]) < 0:
        ref_array = ref_array[:, :, ::-1]
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1, ref_array.shape[2] - 1
        ref_affine = ref_affine @ flip
    np.testing.assert_allclose(vol.affine, ref_affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, ref_array)


def test_enhanced_metadata(shared_data):
    ct = read_volume(shared_data / "pydicom_testdata/eCT_Supplemental.dcm")
    # RescaleType "US" (unspecified; a perfusion map): not claimed to be HU.
    assert ct.metadata.modality == "CT" and ct.metadata.intensity_unit is None
    assert ct.array.min() == -1024  # intercept -1024 applied to stored 0
    mr = read_volume(shared_data / "niivue/enh.dcm")
    assert (mr.metadata.modality, mr.metadata.intensity_unit) == ("MR", "a.u.")
    assert mr.metadata.manufacturer == "Siemens HealthCare GmbH" and mr.shape == (64, 64, 6)


def test_ct_series_on_the_grid_of_its_label_map(shared_data):
    ct = read_volume(shared_data / "totalsegmentator/example_ct_dicom")
    seg = read_volume(shared_data / "totalsegmentator/example_seg_dicom.nii.gz", kind="label")
    assert ct.metadata.intensity_unit == "HU"
    assert "JPEG 2000" in ct.metadata.extra["transfer_syntax"]
    assert ct.spacing[2] == pytest.approx(2.0)  # the 2 mm step, not the 3 mm SliceThickness
    assert ct.metadata.extra["slice_thickness"] == pytest.approx(3.0)
    # The NIfTI stores rows flipped (LAS) relative to DICOM (LPS): same grid once reoriented.
    array, affine = reorient(ct.array, ct.affine, seg.orientation)
    assert array.shape == seg.shape
    np.testing.assert_allclose(affine, seg.affine, atol=1e-4)
    # And the labels sit on tissue, not air: a wrong flip would put organs outside the body.
    assert np.mean(array[seg.array > 0] > -500) > 0.95


def test_ge_mr_series_without_extensions(shared_data):
    vol = read_volume(shared_data / "dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22")
    assert vol.shape == (256, 256, 130)
    np.testing.assert_allclose(vol.spacing, (0.9375, 0.9375, 1.2), atol=1e-6)
    meta = vol.metadata
    assert (meta.modality, meta.intensity_unit, meta.manufacturer) == ("MR", "a.u.",
                                                                      "GE MEDICAL SYSTEMS")
    assert meta.series_uid == "1.2.840.113619.2.44.7088985.14091324.23121.1601318184.311"


def _copy_ct3(shared_data: Path, dest: Path) -> list[Path]:
    dest.mkdir()
    return [Path(shutil.copy(p, dest)) for p in
            sorted((shared_data / "dcmqi_ct3slice/ct-3slice").iterdir())]


def test_real_series_order_is_independent_of_names(shared_data, tmp_path):
    original = read_volume(shared_data / "dcmqi_ct3slice/ct-3slice")
    for n, path in enumerate(_copy_ct3(shared_data, tmp_path / "s")):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 10 - n  # reversed numbering
        ds.save_as(tmp_path / "s" / f"z{(n * 7) % 3}")  # shuffled names, no extension
        path.unlink()
    shuffled = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(shuffled.array, original.array)
    np.testing.assert_allclose(shuffled.affine, original.affine, atol=1e-9)


def test_real_series_with_a_missing_slice(shared_data, tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(shared_data / "totalsegmentator/example_ct_dicom", folder)
    files = sorted(folder.iterdir(), key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    files[10].unlink()
    with pytest.raises(GeometryError, match=r"example_ct_dicom|ct: missing slice.*gap of 4 mm"):
        read_volume(folder)


def test_real_series_with_uneven_spacing(shared_data, tmp_path):
    paths = _copy_ct3(shared_data, tmp_path / "s")
    ds = pydicom.dcmread(paths[1])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.3
    ds.save_as(paths[1])
    with pytest.raises(GeometryError, match="non-uniform slice spacing") as err:
        read_volume(tmp_path / "s")
    assert str(err.value).startswith(str(tmp_path / "s")) and "\n" not in str(err.value)
    vol = read_volume(tmp_path / "s", resample_irregular=True)
    assert vol.shape == (512, 512, 3) and vol.metadata.extra["resampled"]["method"] == "linear"


def test_real_mixed_series_folder(shared_data, tmp_path):
    _copy_ct3(shared_data, tmp_path / "mix")
    # Three neighbouring GE slices (the file names do not follow the slice order).
    ge_all = sorted((shared_data / "dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22").iterdir())
    ge = sorted(ge_all, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True)
                                          .InstanceNumber))[:3]
    for path in ge:
        shutil.copy(path, tmp_path / "mix")
    with pytest.raises(InputError, match=r"2 DICOM series.*number=2 .*files=3.*number=5 "
                                         r"description='3D Ax T1 MP-RAGE_R22'"):
        read_volume(tmp_path / "mix")
    assert read_volume(tmp_path / "mix", series=2).metadata.modality == "CT"
    ge_uid = pydicom.dcmread(ge[0], stop_before_pixels=True).SeriesInstanceUID
    assert read_volume(tmp_path / "mix", series=ge_uid).metadata.modality == "MR"


def test_folder_with_seg_and_nrrd_reads_the_ct_series(shared_data):
    # dcmqi_ct3slice/ holds the CT series (in a subfolder), a DICOM SEG and NRRD label maps.
    vol = read_volume(shared_data / "dcmqi_ct3slice")
    assert vol.shape == (512, 512, 3) and vol.metadata.modality == "CT"
    with pytest.raises(InputError, match="liver.dcm: DICOM file without a scan image"):
        read_volume(shared_data / "dcmqi_ct3slice/liver.dcm")


def test_unusable_real_dicom_files(shared_data):
    with pytest.raises(InputError, match=r"CT_small\.dcm: a single 2D DICOM slice \(128x128\)"):
        read_volume(shared_data / "pydicom_testdata/CT_small.dcm")
    # emri_small has 10 frames but its functional groups were stripped: no positions.
    with pytest.raises(GeometryError, match=r"emri_small\.dcm: .*frame positions are unknown"):
        read_volume(shared_data / "pydicom_testdata/emri_small.dcm")
    with pytest.raises(InputError, match=r"holds 5 DICOM series"):
        read_volume(shared_data / "pydicom_testdata")


@pytest.mark.parametrize("relpath,dtype", [
    ("deepmedic_brats2015/test/brats_2013_pat0001_1/OTMultiClass.nii.gz", np.uint8),
    ("synthseg/training_seg_01.nii.gz", np.uint16),
])
def test_float_label_maps_become_unsigned(shared_data, relpath, dtype):
    vol = read_volume(shared_data / relpath, kind="label")
    assert vol.array.dtype == dtype
    stored = np.asanyarray(nib.load(shared_data / relpath).dataobj)
    np.testing.assert_array_equal(vol.array, stored)
