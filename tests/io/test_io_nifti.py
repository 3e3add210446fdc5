"""NIfTI writing/reading, value policies and the one-line errors of read_volume."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth import __version__
from medsynth.errors import ConfigError, InputError
from medsynth.io import Volume, VolumeMetadata, read_volume, write_nifti, write_volume

# An oblique, anisotropic, off-centre affine: catches transposes and sign errors.
_ROT = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [-0.6, 0.0, 0.8]])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROT @ np.diag([0.7, 1.1, 2.5])
AFFINE[:3, 3] = [-12.5, 30.25, 7.0]


def _image(array: np.ndarray, **meta) -> Volume:
    return Volume(array=array, affine=AFFINE, kind="image", metadata=VolumeMetadata(**meta))


def _save(path, array, affine=AFFINE, **header) -> None:
    img = nib.Nifti1Image(array, affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))


def test_image_round_trip_float32(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float64)
    path = write_nifti(_image(data, modality="MR", intensity_unit="a.u.", synthetic=True),
                       tmp_path / "img.nii.gz", description="case 7")
    back = read_volume(path)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, data.astype(np.float32))
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-5)
    header = nib.load(path).header
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), AFFINE, atol=1e-5)
    np.testing.assert_allclose(header.get_sform(), AFFINE, atol=1e-5)
    assert header["descrip"].item().decode() == f"medsynth {__version__} synthetic: case 7"
    # kind, modality, unit and the synthetic flag come back from the header extension.
    assert (back.kind, back.metadata.modality, back.metadata.intensity_unit) == ("image", "MR",
                                                                                "a.u.")
    assert back.metadata.synthetic is True
    # SimpleITK sees the same geometry (qform and sform agree).
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(image.GetSpacing(), [0.7, 1.1, 2.5], atol=1e-5)


def test_description_is_capped_at_80_bytes_keeping_synthetic(tmp_path):
    path = write_nifti(_image(np.zeros((2, 2, 2)), synthetic=True), tmp_path / "a.nii",
                       description="x" * 200)
    text = nib.load(path).header["descrip"].item().decode()
    assert len(text) == 80 and text.startswith(f"medsynth {__version__} synthetic: xxx")
    real = write_nifti(_image(np.zeros((2, 2, 2))), tmp_path / "b.nii")
    assert "synthetic" not in nib.load(real).header["descrip"].item().decode()


def test_ct_int16_on_request(tmp_path):
    hu = np.array([-1024.0, -0.4, 0.5, 3071.2]).reshape(1, 2, 2).repeat(2, axis=0)
    path = write_nifti(_image(hu, modality="CT", intensity_unit="HU"), tmp_path / "ct.nii.gz",
                       dtype="int16")
    back = read_volume(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, np.round(hu))
    assert back.metadata.intensity_unit == "HU"
    with pytest.raises(InputError, match="fractional values"):
        write_nifti(_image(hu, intensity_unit="a.u."), tmp_path / "mr.nii.gz", dtype="int16")
    with pytest.raises(InputError, match="do not fit int16"):
        write_nifti(_image(hu * 100, intensity_unit="HU"), tmp_path / "big.nii.gz", dtype="int16")
    with pytest.raises(InputError, match="image dtype must be one of"):
        write_nifti(_image(hu), tmp_path / "u8.nii.gz", dtype="uint8")


def test_label_dtype_policy(tmp_path):
    small = np.zeros((3, 3, 3), dtype=np.int64)
    small[1, 1, 1] = 255
    path = write_nifti(Volume(small, AFFINE, kind="label"), tmp_path / "s.nii.gz")
    assert nib.load(path).get_data_dtype() == np.uint8
    back = read_volume(path)
    assert back.kind == "label" and back.metadata.intensity_unit == "label"  # from the extension
    big = small.copy()
    big[0, 0, 0] = 530
    assert nib.load(write_nifti(Volume(big, AFFINE, kind="label"),
                                tmp_path / "b.nii.gz")).get_data_dtype() == np.uint16
    for bad, message in ((-small, "negative value -255"), (small * 300, "does not fit uint16"),
                         (small + 0.5, "non-integer value 0.5")):
        with pytest.raises(InputError, match=message):
            write_nifti(Volume(bad, AFFINE, kind="label"), tmp_path / "x.nii.gz")


def test_float_label_map_reads_as_smallest_uint(tmp_path):
    values = np.zeros((4, 4, 4), dtype=np.float32)
    values[0, 0, 0], values[1, 1, 1] = 530.0, 3.0
    _save(tmp_path / "seg.nii.gz", values)
    vol = read_volume(tmp_path / "seg.nii.gz", kind="label")
    assert vol.array.dtype == np.uint16 and vol.array[0, 0, 0] == 530
    assert read_volume(tmp_path / "seg.nii.gz").array.dtype == np.float32  # default: image
    _save(tmp_path / "frac.nii.gz", values + 0.25)
    with pytest.raises(InputError, match=r"frac\.nii\.gz: label map has non-integer value"):
        read_volume(tmp_path / "frac.nii.gz", kind="label")
    ints = np.zeros((4, 4, 4), dtype=np.int16)
    _save(tmp_path / "int.nii.gz", ints)
    assert read_volume(tmp_path / "int.nii.gz", kind="label").array.dtype == np.int16


def test_scaled_nifti_and_spatial_units(tmp_path):
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(stored, AFFINE)
    img.header.set_slope_inter(0.5, -10.0)
    img.header.set_xyzt_units(xyz="meter")
    nib.save(img, str(tmp_path / "m.nii"))
    vol = read_volume(tmp_path / "m.nii")
    np.testing.assert_allclose(vol.array, stored * 0.5 - 10.0)
    np.testing.assert_allclose(vol.affine[:3, :], AFFINE[:3, :] * 1000.0)  # metres -> mm
    assert vol.metadata.extra["nifti"]["spatial_unit_converted"] == "meter -> mm"


def test_nan_in_image_is_an_error_naming_the_file(tmp_path):
    data = np.ones((3, 3, 3), dtype=np.float32)
    data[1, 2, 0] = np.nan
    data[0, 0, 0] = np.inf
    _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match=r"nan\.nii\.gz: image has 2 NaN/Inf voxel"):
        read_volume(tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="NaN or Inf"):
        write_nifti(_image(data), tmp_path / "out.nii.gz")


def test_4d_and_2d_data(tmp_path):
    _save(tmp_path / "four.nii.gz", np.zeros((4, 4, 4, 2), dtype=np.float32))
    with pytest.raises(InputError, match=r"four\.nii\.gz: 4D data of shape \(4, 4, 4, 2\)"):
        read_volume(tmp_path / "four.nii.gz")
    _save(tmp_path / "one.nii.gz", np.ones((4, 4, 4, 1), dtype=np.float32))
    assert read_volume(tmp_path / "one.nii.gz").shape == (4, 4, 4)
    _save(tmp_path / "flat.nii.gz", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(InputError, match=r"flat\.nii\.gz: 2D data"):
        read_volume(tmp_path / "flat.nii.gz")
    _save(tmp_path / "slice.nii.gz", np.zeros((4, 4, 1), dtype=np.float32))
    with pytest.raises(InputError, match="2D data of shape"):
        read_volume(tmp_path / "slice.nii.gz")


def test_truncated_gzip_is_an_input_error(tmp_path):
    path = tmp_path / "cut.nii.gz"
    _save(path, np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError) as err:
        read_volume(path)
    assert "truncated or corrupt" in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(str(path))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(InputError, match="garbage.nii.gz"):
        read_volume(garbage)


def test_missing_path_unknown_format_and_bad_kind(tmp_path):
    with pytest.raises(InputError, match=r"nope\.nii\.gz: does not exist"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=r"table\.csv: not a supported medical image; "
                                         r"supported: NIfTI.*NRRD.*DICOM"):
        read_volume(tmp_path / "table.csv")
    with pytest.raises(ConfigError, match="kind must be"):
        read_volume(tmp_path / "table.csv", kind="mask")
    with pytest.raises(InputError, match="must end with one of"):
        write_nifti(_image(np.zeros((2, 2, 2))), tmp_path / "x.img")


def test_modality_argument_sets_unit(tmp_path):
    _save(tmp_path / "ct.nii.gz", np.zeros((2, 3, 4), dtype=np.int16))
    vol = read_volume(tmp_path / "ct.nii.gz", modality="ct")
    assert (vol.metadata.modality, vol.metadata.intensity_unit) == ("CT", "HU")
    assert read_volume(tmp_path / "ct.nii.gz").metadata.modality is None


def test_write_is_atomic_and_source_code_kept(tmp_path):
    _save(tmp_path / "mni.nii.gz", np.zeros((3, 3, 3), dtype=np.float32))
    img = nib.load(tmp_path / "mni.nii.gz")
    img.header.set_sform(AFFINE, code=4)
    nib.save(img, str(tmp_path / "mni.nii.gz"))
    vol = read_volume(tmp_path / "mni.nii.gz")
    out = write_volume(vol, tmp_path / "out" / "copy.nii.gz")
    assert int(nib.load(out).header["sform_code"]) == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.nii.gz"]  # no temp files left


def test_nrrd_write_round_trip(tmp_path):
    labels = np.zeros((3, 4, 5), dtype=np.int32)
    labels[1, 2, 3] = 7
    path = write_volume(Volume(labels, AFFINE, kind="label"), tmp_path / "l.nrrd")
    back = read_volume(path, kind="label")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
