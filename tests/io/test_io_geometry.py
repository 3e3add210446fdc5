"""LPS<->RAS conversion, orientation helpers and slice-stack diagnosis."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.errors import GeometryError, InputError
from medsynth.io import Volume, affine_from_itk, itk_from_affine, reorient
from medsynth.io.geometry import check_3d_shape, orientation_codes, sort_slice_stack
from medsynth.io.itk import from_sitk, to_sitk


def _random_itk_geometry(seed: int):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return rng.normal(scale=50, size=3), rng.uniform(0.3, 4.0, size=3), q


@pytest.mark.parametrize("seed", range(4))
def test_affine_from_itk_agrees_with_simpleitk_points(seed):
    origin, spacing, direction = _random_itk_geometry(seed)
    image = sitk.Image(3, 4, 5, sitk.sitkUInt8)
    image.SetOrigin(origin.tolist())
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.reshape(9).tolist())
    affine = affine_from_itk(origin, spacing, direction.reshape(9))
    for index in [(0, 0, 0), (2, 3, 4), (1, 0, 3)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = (affine @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    back = itk_from_affine(affine)
    np.testing.assert_allclose(back[0], origin, atol=1e-9)
    np.testing.assert_allclose(back[1], spacing, atol=1e-9)
    np.testing.assert_allclose(back[2], direction.reshape(9), atol=1e-9)


def test_identity_itk_is_lps():
    affine = affine_from_itk((1, 2, 3), (1, 1, 1), np.eye(3))
    assert orientation_codes(affine) == ("L", "P", "S")
    np.testing.assert_array_equal(affine[:3, 3], [-1, -2, 3])


def test_volume_to_sitk_and_back_keeps_voxel_positions():
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    image = to_sitk(Volume(array, affine))
    # Voxel (1, 2, 3) holds array[1, 2, 3] and sits at the RAS point the affine gives.
    assert image.GetPixel(1, 2, 3) == array[1, 2, 3]
    lps = np.array(image.TransformIndexToPhysicalPoint((1, 2, 3)))
    np.testing.assert_allclose(lps * [-1, -1, 1], (affine @ [1, 2, 3, 1])[:3])
    back = from_sitk(image)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-12)


def test_reorient_is_exact_and_keeps_world_positions():
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    affine = np.array([[0, 0, -2.0, 10], [0, 1.0, 0, -5], [-3.0, 0, 0, 7], [0, 0, 0, 1]])
    out, new_affine = reorient(array, affine, "RAS")
    assert orientation_codes(new_affine) == ("R", "A", "S")
    assert sorted(out.shape) == sorted(array.shape)
    # Same value at the same world point: voxel (1, 2, 3) before and wherever it went after.
    world = affine @ [1, 2, 3, 1]
    index = np.rint(np.linalg.solve(new_affine, world)[:3]).astype(int)
    assert out[tuple(index)] == array[1, 2, 3]
    with pytest.raises(InputError, match="orientation codes"):
        reorient(array, affine, "RAR")


def test_check_3d_shape():
    assert check_3d_shape((4, 5, 6, 1, 1), "f.nii") == (4, 5, 6)
    with pytest.raises(InputError, match=r"f\.nii: 5D data of shape \(4, 5, 6, 1, 3\)"):
        check_3d_shape((4, 5, 6, 1, 3), "f.nii")
    with pytest.raises(InputError, match="2D data"):
        check_3d_shape((4, 5), "f.nii")
    with pytest.raises(InputError, match="2D data"):
        check_3d_shape((4, 1, 6), "f.nii")


_ROW, _COL = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])


def _stack(z):
    positions = np.c_[np.zeros(len(z)), np.zeros(len(z)), z]
    return sort_slice_stack(positions, _ROW, _COL, (0.5, 0.5),
                            [f"f{n}" for n in range(len(z))], "series")


def test_stack_sorted_by_position_not_input_order():
    stack = _stack([4.0, 0.0, 2.0, 6.0])
    np.testing.assert_array_equal(stack.order, [1, 2, 0, 3])
    assert stack.regular and stack.step == pytest.approx(2.0)


def test_stack_diagnoses():
    assert "missing slice" in _stack([0, 2, 4, 8, 10]).problem
    assert "gap of 4 mm" in _stack([0, 2, 4, 8, 10]).problem
    uneven = _stack([0, 2, 4.1, 6, 8]).problem
    assert "non-uniform" in uneven and "2.1 mm" in uneven
    assert _stack([0, 2, 4.001, 6, 8]).regular  # 0.05 % is IPP rounding, not unevenness
    with pytest.raises(GeometryError, match=r"series: 1 duplicate slice position.*f1 and f2"):
        _stack([0, 2, 2, 4])
    tilted = sort_slice_stack(np.array([[0, 0, 0], [0, 0.3, 2], [0, 0.6, 4.0]]), _ROW, _COL,
                              (0.5, 0.5), ["a", "b", "c"], "series")
    assert tilted.tilted and "gantry tilt" in tilted.problem
