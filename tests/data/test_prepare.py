"""prepare: geometry kept in the world, intensities recorded not baked, resumable, held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.data.manifest import read_dataset
from medsynth.data.prepare import prepare_dataset
from medsynth.data.transforms import IntensityMapping, label_remapping
from medsynth.data.writer import DatasetWriter
from medsynth.errors import ConfigError, GeometryError, InputError
from medsynth.io import Volume, read_volume, write_volume

LABELS = {"background": 0, "liver": 1, "tumour": 2}
# Odd orientations with anisotropic voxels: array axes (P, S, R) and (L, I, A).
PSR = np.array([[0, 0, 0.8, -12.0], [-2.5, 0, 0, 30.0], [0, 0.6, 0, -7.0], [0, 0, 0, 1]])
LIA = np.array([[-0.7, 0, 0, 20.0], [0, 0, 3.0, -15.0], [0, -1.2, 0, 9.0], [0, 0, 0, 1]])
SHAPE = (12, 20, 16)
BLOB = (slice(5, 8), slice(9, 12), slice(6, 9))  # centre voxel (6, 10, 7)


def _case(affine: np.ndarray, seed: int = 0, value: float = 400.0) -> tuple[Volume, Volume]:
    rng = np.random.default_rng(seed)
    image = np.round(rng.normal(-900, 10, SHAPE)).astype(np.int16)
    image[BLOB] = value
    label = np.zeros(SHAPE, np.uint8)
    label[BLOB] = 1
    label[6, 10, 7] = 2
    return Volume(image, affine), Volume(label, affine, kind="label")


def _source(root: Path, n: int = 1, affine: np.ndarray = PSR, test: tuple[str, ...] = (),
            channel: str = "CT", metadata=None) -> Path:
    writer = DatasetWriter(root, "toy", LABELS, {"0": channel})
    for i in range(n):
        case_id = f"c{i:02d}"
        writer.add_case(case_id, *_case(affine, i), prompt=f"case {i}", test=case_id in test,
                        metadata=(metadata or {}).get(case_id), image_dtype="int16")
    writer.finalize()
    return root


def _world_com(array: np.ndarray, affine: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Centre of mass in RAS mm of ``array > 0`` (or of ``weights``)."""
    w = (array > 0).astype(float) if weights is None else weights
    index = np.array([(w.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(w.shape[ax])).sum()
                      for ax in range(3)]) / w.sum()
    return affine[:3, :3] @ index + affine[:3, 3]


# ---------------------------------------------------------------------------------------------
# Intensity mapping and label remapping
# ---------------------------------------------------------------------------------------------


def test_ct_window_inverse_undoes_forward_on_the_window() -> None:
    mapping = IntensityMapping.ct_window()
    hu = np.linspace(-1000, 1000, 101)
    assert np.allclose(mapping.inverse(mapping.forward(hu)), hu, atol=1e-9)
    assert np.allclose(mapping.forward(np.array([-3000.0, -1000.0, 0.0, 1000.0, 3000.0])), [-1, -1, 0, 1, 1])
    tensor = torch.tensor([-1000.0, 250.0, 1000.0])
    assert torch.allclose(mapping.inverse(mapping.forward(tensor)), tensor)
    assert IntensityMapping.from_dict(mapping.to_dict()) == mapping


def test_mr_percentiles_map_to_the_unit_range_and_back() -> None:
    array = np.random.default_rng(0).gamma(2.0, 100.0, (20, 20, 20))
    mapping = IntensityMapping.mr_percentiles(array)
    low, high = np.percentile(array, [0.5, 99.5])
    assert mapping.low == pytest.approx(low) and mapping.high == pytest.approx(high)
    inside = np.clip(array, low, high)
    assert np.allclose(mapping.inverse(mapping.forward(array)), inside, rtol=1e-6, atol=1e-6)
    assert mapping.forward(array).min() == pytest.approx(-1) and mapping.forward(array).max() == pytest.approx(1)
    with pytest.raises(InputError, match="constant"):
        IntensityMapping.mr_percentiles(np.ones((4, 4, 4)), source="flat.nii.gz")


def test_label_remapping_merges_drops_and_names_unknown_labels() -> None:
    source = {"background": 0, "kidney_left": 3, "kidney_right": 4, "liver": 5}
    target, lookup = label_remapping(source, {"kidney_left": "kidney", "kidney_right": "kidney", "liver": "liver"})
    assert target == {"background": 0, "kidney": 1, "liver": 2}
    assert lookup == {0: 0, 3: 1, 4: 1, 5: 2}
    assert label_remapping(source, {"liver": "liver"})[1] == {0: 0, 3: 0, 4: 0, 5: 1}
    with pytest.raises(ConfigError, match=r"\['spleen'\].*'kidney_left'"):
        label_remapping(source, {"spleen": "spleen"})


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [PSR, LIA], ids=["PSR", "LIA"])
def test_blob_keeps_its_world_position(tmp_path: Path, affine: np.ndarray) -> None:
    src = _source(tmp_path / "src", affine=affine)
    expected = (affine @ np.array([6.0, 10.0, 7.0, 1.0]))[:3]
    out = prepare_dataset(src, tmp_path / "out", spacing=(1.5, 1.5, 1.5), progress=False)
    case = out.case("c00")
    image, label = read_volume(case.image), read_volume(case.label)
    assert image.orientation == label.orientation == ("R", "A", "S")
    assert np.allclose(image.spacing, 1.5) and all(n % 8 == 0 for n in image.shape)
    assert image.same_grid(label)
    assert np.allclose(_world_com(label.array, label.affine), expected, atol=0.75)
    bright = np.clip(image.array.astype(float) + 900, 0, None)  # above the -900 HU background
    assert np.allclose(_world_com(bright, image.affine, weights=bright), expected, atol=0.75)


def test_without_spacing_reorientation_is_exact(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", affine=LIA)
    out = prepare_dataset(src, tmp_path / "out", spacing=None, multiple_of=1, progress=False)
    original = nib.load(src / "imagesTr" / "c00_0000.nii.gz")
    canonical = nib.as_closest_canonical(original)
    stored = nib.load(out.case("c00").image)
    assert np.array_equal(np.asarray(stored.dataobj), np.asarray(canonical.dataobj))
    assert np.allclose(stored.affine, canonical.affine, atol=1e-5)


def test_label_crop_keeps_the_labelled_region_and_pads_to_the_multiple(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", affine=PSR)
    full = prepare_dataset(src, tmp_path / "full", progress=False)
    crop = prepare_dataset(src, tmp_path / "crop", crop_pad="label", crop_margin_mm=3.0, multiple_of=8,
                           progress=False)
    big, small = read_volume(full.case("c00").label), read_volume(crop.case("c00").label)
    assert np.prod(small.shape) < np.prod(big.shape) and all(n % 8 == 0 for n in small.shape)
    assert np.array_equal(np.bincount(small.array.ravel())[1:], np.bincount(big.array.ravel())[1:])  # no label lost
    assert np.allclose(_world_com(small.array, small.affine), _world_com(big.array, big.affine), atol=1e-6)
    assert crop.medsynth["crop_pad"] == {"policy": "label", "margin_mm": 3.0, "multiple_of": 8}
    body = prepare_dataset(src, tmp_path / "body", crop_pad="foreground", crop_margin_mm=0.0, progress=False)
    body_label = read_volume(body.case("c00").label)
    assert np.prod(body_label.shape) < np.prod(big.shape)  # the -900 HU "air" around the blob is cut
    assert np.array_equal(np.bincount(body_label.array.ravel())[1:], np.bincount(big.array.ravel())[1:])


def _real_pairs(shared: Path, tmp_path: Path) -> list[tuple[Path, Path]]:
    sct = shared / "sct_testing_data"
    pairs = [(sct / "t2.nii.gz", sct / "t2_seg-manual.nii.gz"),  # PSR, 1 mm
             (sct / "t2s.nii.gz", sct / "t2s_gmseg_manual.nii.gz")]  # LAS, 0.5 x 0.5 x 7.5 mm
    # LIA 256^3 FreeSurfer volume: a 48^3 crop keeps the test fast; the crop offset goes into
    # the affine so the crop sits where it was in the world.
    norm = nib.load(shared / "niivue" / "norm.mgz")
    aseg = nib.load(shared / "niivue" / "aparc.a2009s+aseg.mgz")
    box = (slice(104, 152), slice(104, 152), slice(104, 152))
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    image = Volume(np.asarray(norm.dataobj)[box].astype(np.float32), norm.affine @ shift)
    label = Volume(np.asarray(aseg.dataobj)[box].astype(np.int32), aseg.affine @ shift, kind="label")
    write_volume(image, tmp_path / "norm_crop.nii.gz")
    write_volume(label, tmp_path / "aparc_crop.nii.gz")
    pairs.append((tmp_path / "norm_crop.nii.gz", tmp_path / "aparc_crop.nii.gz"))
    return pairs


def test_real_scans_keep_label_centres_in_the_world(shared_data: Path, tmp_path: Path) -> None:
    pairs = _real_pairs(shared_data, tmp_path)
    rows = ["case_id,image,label,modality"] + [f"r{i},{img},{lab},MR" for i, (img, lab) in enumerate(pairs)]
    (tmp_path / "real.csv").write_text("\n".join(rows) + "\n")
    out = prepare_dataset(tmp_path / "real.csv", tmp_path / "out", spacing=(1.5, 1.5, 1.5), progress=False)
    assert sorted(sum(out.splits.values(), [])) == ["r0", "r1", "r2"]
    for i, (_, label_path) in enumerate(pairs):
        original = nib.load(label_path)  # geometry straight from nibabel, not from medsynth
        before = np.asarray(original.dataobj)
        prepared = nib.load(out.case(f"r{i}").label)
        after = np.asarray(prepared.dataobj)
        assert nib.aff2axcodes(prepared.affine) == ("R", "A", "S")
        assert nib.aff2axcodes(nib.load(out.case(f"r{i}").image).affine) == ("R", "A", "S")
        shift = _world_com(after, prepared.affine) - _world_com(before, original.affine)
        assert np.linalg.norm(shift) < 0.75, (label_path.name, shift)
        if i == 2:  # a big structure of the multi-label map too (label values unchanged)
            value = 2 if np.any(before == 2) else int(np.unique(before)[1])
            shift = (_world_com(after == value, prepared.affine)
                     - _world_com(before == value, original.affine))
            assert np.linalg.norm(shift) < 0.75


# ---------------------------------------------------------------------------------------------
# Intensities recorded, not baked in
# ---------------------------------------------------------------------------------------------


def test_ct_stays_in_hu_and_the_window_is_recorded(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", n=2)
    out = prepare_dataset(src, tmp_path / "out", progress=False)
    stored = read_volume(out.case("c00").image)
    assert stored.array.dtype == np.int16
    assert stored.array.max() == pytest.approx(400, abs=40) and stored.array.min() < -850
    intensity = out.medsynth["intensity"]
    assert intensity["applied"] is False
    assert intensity["CT"] == {"kind": "ct_window", "low": -1000.0, "high": 1000.0, "out_low": -1.0, "out_high": 1.0}
    mapping = out.intensity_mapping("c00")
    assert mapping == IntensityMapping.ct_window()
    assert np.allclose(mapping.inverse(mapping.forward(stored.array.astype(float))), stored.array)


def test_mr_percentiles_are_recorded_per_case(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "src", "mr", LABELS, {"0": "T2"})
    for i, scale in enumerate((1.0, 3.0)):
        image, label = _case(PSR, i)
        writer.add_case(f"m{i}", image.with_array((image.array.astype(np.float32) + 1000) * scale), label)
    writer.finalize()
    out = prepare_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    first, second = out.intensity_mapping("m0"), out.intensity_mapping("m1")
    assert first.kind == second.kind == "mr_percentiles" and first.percentiles == (0.5, 99.5)
    assert second.high == pytest.approx(3 * first.high, rel=0.05)
    stored = read_volume(out.case("m1").image).array
    assert stored.max() > 100  # scanner units, not [-1, 1]
    record = json.loads((tmp_path / "out" / "preprocessing.json").read_text())["cases"]["m1"]
    assert record["intensity"]["high"] == second.high and record["source_orientation"] == "PSR"
    assert out.channel_names == {"0": "T2"} and out.case("m0").metadata["modality"] == "MR"


# ---------------------------------------------------------------------------------------------
# Resume, settings, splits, errors
# ---------------------------------------------------------------------------------------------


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rerun_skips_finished_cases_and_redoes_missing_ones(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", n=3)
    out = tmp_path / "out"
    prepare_dataset(src, out, progress=False)
    before = _mtimes(out)
    prepare_dataset(src, out, progress=False)
    assert _mtimes(out) == before
    missing = out / "imagesTr" / "c01_0000.nii.gz"
    if not missing.exists():
        missing = out / "imagesTs" / "c01_0000.nii.gz"
    missing.unlink()
    prepare_dataset(src, out, progress=False)
    after = _mtimes(out)
    assert missing in after
    unchanged = [p for p in before if p != missing and "c01" not in p.name and p.suffix == ".gz"]
    assert unchanged and all(after[p] == before[p] for p in unchanged)
    with pytest.raises(ConfigError, match="different settings"):
        prepare_dataset(src, out, spacing=(2.0, 2.0, 2.0), progress=False)


def test_held_out_test_split_goes_to_images_ts(tmp_path: Path) -> None:
    lesion = {f"c{i:02d}": {"has_lesion": i in (1, 4, 7)} for i in range(10)}
    src = _source(tmp_path / "src", n=10, metadata=lesion)
    out = prepare_dataset(src, tmp_path / "out", splits_seed=3, stratify_by="has_lesion", progress=False)
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert splits["held_out"] == "test" and splits["seed"] == 3 and all(splits[n] for n in ("train", "val", "test"))
    for name in ("train", "val", "test"):
        assert sum(lesion[i]["has_lesion"] for i in splits[name]) == 1
    for case_id in splits["test"]:
        assert (tmp_path / "out" / "imagesTs" / f"{case_id}_0000.nii.gz").is_file()
        assert not (tmp_path / "out" / "imagesTr" / f"{case_id}_0000.nii.gz").exists()
    generative = {c.case_id for c in out.generative_cases()}
    assert generative == set(splits["train"]) | set(splits["val"]) and not generative & set(splits["test"])
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["numTraining"] == len(generative)


def test_source_test_cases_stay_held_out(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", n=5, test=("c03",))
    out = prepare_dataset(src, tmp_path / "out", progress=False)
    assert out.splits["test"] == ["c03"] and out.splits["val"]


def _csv_source(tmp_path: Path, image: Volume, label: Volume) -> Path:
    write_volume(label, tmp_path / "lab.nii.gz")
    (tmp_path / "m.csv").write_text("case_id,image,label,modality\npatient7,img.nii.gz,lab.nii.gz,CT\n")
    return tmp_path / "m.csv"


def test_image_and_label_on_different_grids_are_refused(tmp_path: Path) -> None:
    image, label = _case(PSR)
    write_volume(image, tmp_path / "img.nii.gz")
    csv = _csv_source(tmp_path, image, label.with_array(label.array[:, :, :-1]))
    with pytest.raises(GeometryError, match="case 'patient7'.*different grids"):
        prepare_dataset(csv, tmp_path / "out", progress=False)


def test_nan_in_the_input_image_names_the_file(tmp_path: Path) -> None:
    image, label = _case(PSR)
    array = image.array.astype(np.float32)
    array[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(array, PSR), tmp_path / "img.nii.gz")
    csv = _csv_source(tmp_path, image, label)
    with pytest.raises(InputError, match="NaN") as err:
        prepare_dataset(csv, tmp_path / "out", progress=False)
    assert "img.nii.gz" in str(err.value)


def test_label_map_by_name_and_unknown_names(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", n=1)
    out = prepare_dataset(src, tmp_path / "out", label_map={"liver": "organ", "tumour": "organ"}, progress=False)
    assert out.labels == {"background": 0, "organ": 1}
    assert set(np.unique(read_volume(out.case("c00").label).array)) == {0, 1}
    with pytest.raises(ConfigError, match=r"unknown source labels \['spleen'\]; known labels are"):
        prepare_dataset(src, tmp_path / "out2", label_map={"spleen": "spleen"}, progress=False)


def test_prepared_folder_reads_back_as_nnunet(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", n=3)
    prepare_dataset(src, tmp_path / "out", progress=False)
    dataset = read_dataset(tmp_path / "out")
    assert dataset.layout == "nnunetv2" and dataset.case("c02").prompt == "case 2"
    dataset.validate(check_labels=True)
