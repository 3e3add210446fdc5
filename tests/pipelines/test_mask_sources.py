"""Mask sources for mask-conditioned generation: user masks, the mask bank, lesion insertion."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsynth.data.phantom_dataset import write_phantom_dataset
from medsynth.data.phantoms import CT_LABELS
from medsynth.errors import ConfigError, GeometryError, InputError, MedsynthError
from medsynth.io.volume import Volume
from medsynth.pipelines.lesions import LesionSpec, insert_lesions, parse_lesion_specs
from medsynth.pipelines.mask_bank import MaskBank, augment_mask, scale_organ
from medsynth.pipelines.masks import map_user_mask

# Two balls placed asymmetrically in world (RAS mm), so a flip or a lost origin moves them.
BALLS = {3: (np.array([10.0, -6.0, 4.0]), 9.0), 4: (np.array([-12.0, 8.0, -6.0]), 6.0)}


def world_label(shape, affine, values=None) -> np.ndarray:
    """Voxelise BALLS on a grid: voxel centres -> RAS mm -> label."""
    values = values or {v: v for v in BALLS}
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    ras = affine[:3, :3] @ ijk + affine[:3, 3:4]
    out = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    for v, (centre, radius) in BALLS.items():
        out[np.linalg.norm(ras - centre[:, None], axis=0) <= radius] = values[v]
    return out.reshape(shape)


def centroid_mm(array: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    idx = np.argwhere(array == value).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def target_grid_24():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -23.0  # centred on the origin
    return (24, 24, 24), affine


def lps_coarse_grid():
    """12^3 grid of 4 mm voxels whose first two axes run L and P (an LPS-stored DICOM-like map)."""
    affine = np.diag([-4.0, -4.0, 4.0, 1.0])
    affine[:3, 3] = [22.0, 22.0, -22.0]
    return (12, 12, 12), affine


# ---------------------------------------------------------------------------------------------
# User masks
# ---------------------------------------------------------------------------------------------


def test_user_mask_from_flipped_coarse_grid_lands_at_same_world_positions():
    shape, affine = lps_coarse_grid()
    mask = Volume(world_label(shape, affine), affine, "label")
    grid = target_grid_24()
    out = map_user_mask(mask, grid, None, CT_LABELS)
    assert out.shape == grid[0] and np.array_equal(out.affine, grid[1]) and out.kind == "label"
    assert set(np.unique(out.array)) == {0, 3, 4}
    truth = world_label(*grid)
    for value, (centre, _) in BALLS.items():
        assert np.linalg.norm(centroid_mm(out.array, out.affine, value) - centre) < 2.0
        inter = np.logical_and(out.array == value, truth == value).sum()
        dice = 2 * inter / ((out.array == value).sum() + (truth == value).sum())
        assert dice > 0.75


def test_user_mask_labels_mapped_by_name():
    grid = target_grid_24()
    own = {"background": 0, "Liver": 7, "spleen": 2}  # another tool's numbering and spelling
    mask = Volume(world_label(*grid, values={3: 7, 4: 2}), grid[1], "label")
    out = map_user_mask(mask, grid, own, CT_LABELS)
    assert np.array_equal(out.array, world_label(*grid))


def test_user_mask_refusals():
    grid = target_grid_24()
    labelled = world_label(*grid)
    with pytest.raises(ConfigError, match="not labels of this model.*liver=3"):
        map_user_mask(Volume(labelled, grid[1], "label"), grid, {"liver": 3, "pancreas": 4}, CT_LABELS)
    with pytest.raises(ConfigError, match=r"values \[42\].*known labels are background=0"):
        map_user_mask(Volume(np.where(labelled == 4, 42, labelled).astype(np.uint8), grid[1], "label"),
                      grid, None, CT_LABELS)
    with pytest.raises(ConfigError, match=r"values \[4\] that its label names do not declare"):
        map_user_mask(Volume(labelled, grid[1], "label"), grid, {"liver": 3}, CT_LABELS)
    with pytest.raises(InputError, match="empty"):
        map_user_mask(Volume(np.zeros((8, 8, 8), np.uint8), np.eye(4), "label"), grid, None, CT_LABELS)
    far = grid[1].copy()
    far[:3, 3] += 500.0  # a grid in another world frame: nothing overlaps
    with pytest.raises(GeometryError, match="inside the generation grid"):
        map_user_mask(Volume(labelled, far, "label"), grid, None, CT_LABELS)


# ---------------------------------------------------------------------------------------------
# Mask bank
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds") / "ct", modality="ct", num=7, size=24, seed=3,
                                 progress=False)


def test_mask_bank_holds_training_cases_only(phantom_dataset, tmp_path):
    test_ids = set(phantom_dataset.splits["test"])
    assert test_ids
    bank = MaskBank.build(phantom_dataset)
    assert set(bank.case_ids) == set(phantom_dataset.splits["train"])
    assert not test_ids & set(bank.case_ids)
    bank.save(tmp_path / "bank")
    loaded = MaskBank.load(tmp_path / "bank")
    assert loaded.case_ids == bank.case_ids and loaded.labels == phantom_dataset.labels
    assert all(np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)
               for a, b in zip(loaded.volumes, bank.volumes))
    for split in (("test",), ("train", "test")):
        with pytest.raises(ConfigError, match="held-out test split"):
            MaskBank.build(phantom_dataset, split)


def test_mask_bank_sample_on_generation_grid(phantom_dataset):
    bank = MaskBank.build(phantom_dataset)
    rng = np.random.default_rng(0)
    vol = bank.sample(rng, target_shape=(16, 20, 12), target_spacing=(20.0, 20.0, 20.0))
    assert vol.shape == (16, 20, 12) and np.allclose(vol.spacing, 20.0) and vol.kind == "label"
    assert set(np.unique(vol.array)) <= set(CT_LABELS.values())
    assert vol.metadata.extra["mask_source"]["case_id"] in bank.case_ids


def test_augmentation_keeps_labels_and_volumes_in_bounds(phantom_dataset):
    bank = MaskBank.build(phantom_dataset)
    source = bank.volumes[0]
    label, spacing = source.array, source.spacing
    counts = np.bincount(label.ravel(), minlength=10)
    for seed in range(3):
        out = augment_mask(label, np.random.default_rng(seed), affine_deg=10, scale=(0.9, 1.1), elastic_sigma=20,
                           elastic_magnitude=3, spacing=spacing)
        assert out.dtype == label.dtype and set(np.unique(out)) <= set(np.unique(label))
        new = np.bincount(out.ravel(), minlength=10)
        for name in ("body", "liver"):  # big organs: volume ~ scale^3, so within [0.9^3, 1.1^3] +- voxelisation
            v = CT_LABELS[name]
            assert 0.9 ** 3 * 0.8 <= new[v] / counts[v] <= 1.1 ** 3 * 1.2
    liver = CT_LABELS["liver"]
    for factor in (0.8, 1.25):
        scaled = scale_organ(label, liver, factor)
        ratio = (scaled == liver).sum() / (label == liver).sum()
        assert factor ** 3 * 0.75 <= ratio <= factor ** 3 * 1.15
        assert not ((scaled > 0) & (label == 0)).any()  # never outside the body
        for other in ("spleen", "kidney_left", "spine"):  # never eats another organ
            assert (scaled == CT_LABELS[other]).sum() >= (label == CT_LABELS[other]).sum()
    out = augment_mask(label, np.random.default_rng(1), affine_deg=0, scale=(1, 1), elastic_sigma=0,
                       organ_scale={"liver": 1.25}, labels=CT_LABELS, spacing=spacing)
    assert (out == liver).sum() > 1.4 * (label == liver).sum()
    with pytest.raises(ConfigError, match="not a label"):
        augment_mask(label, np.random.default_rng(0), organ_scale={"pancreas": 1.1}, labels=CT_LABELS)


# ---------------------------------------------------------------------------------------------
# Lesion insertion
# ---------------------------------------------------------------------------------------------


def liver_volume() -> Volume:
    """24^3 at 2 mm: a body ball with an ellipsoidal liver, and one existing lesion."""
    g = np.indices((24, 24, 24)).astype(float) - 11.5
    arr = np.zeros((24, 24, 24), np.uint8)
    arr[(g ** 2).sum(0) < 11.5 ** 2] = CT_LABELS["body"]
    arr[((g / np.array([10.0, 9.0, 8.0])[:, None, None, None]) ** 2).sum(0) < 1] = CT_LABELS["liver"]
    arr[9:11, 11:13, 11:13] = CT_LABELS["liver_lesion"]
    return Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]), "label")


def test_lesion_spec_parsing():
    spec = LesionSpec.parse("liver_lesion:2:5-15mm:liver")
    assert (spec.class_name, spec.count, spec.min_mm, spec.max_mm, spec.host) == ("liver_lesion", 2, 5, 15, "liver")
    assert LesionSpec.parse("liver_lesion:1:8mm").host is None
    assert LesionSpec.parse(str(spec)) == spec
    for bad in ("liver_lesion:two:5-15mm", "liver_lesion:2:15-5mm", "liver_lesion:0:5mm", "liver_lesion:2",
                "liver_lesion:2:5-15cm"):
        with pytest.raises(ConfigError):
            LesionSpec.parse(bad)
    assert parse_lesion_specs(None) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_insert_lesions_places_exactly_what_was_asked(seed):
    vol = liver_volume()
    before = ndimage.label(vol.array == 9, structure=np.ones((3, 3, 3)))[1]
    out, records = insert_lesions(vol, [LesionSpec.parse("liver_lesion:3:4-9mm:liver")], CT_LABELS,
                                  np.random.default_rng(seed))
    assert np.array_equal(vol.array, liver_volume().array)  # the input is untouched
    new = (out.array == 9) & (vol.array != 9)
    comps, n = ndimage.label(new, structure=np.ones((3, 3, 3)))
    assert n == 3 and len(records) == 3
    assert ndimage.label(out.array == 9, structure=np.ones((3, 3, 3)))[1] == before + 3  # no lesion merged
    assert np.all(vol.array[new] == CT_LABELS["liver"])  # inside the host
    assert set(np.unique(out.array[vol.array != CT_LABELS["liver"]])) == set(np.unique(vol.array[vol.array != 3]))
    voxel = 2.0
    for i in range(1, n + 1):
        d = (6 * (comps == i).sum() * voxel ** 3 / np.pi) ** (1 / 3)
        assert 4 - voxel <= d <= 9 + voxel
    assert sorted(r["voxels"] for r in records) == sorted(int((comps == i).sum()) for i in range(1, n + 1))
    assert out.metadata.extra["lesions"] == records


def test_insert_lesions_refuses_impossible_requests():
    vol = liver_volume()
    rng = np.random.default_rng(0)
    with pytest.raises(MedsynthError, match="does not fit inside 'liver'"):
        insert_lesions(vol, [LesionSpec.parse("liver_lesion:3:20-30mm:liver")], CT_LABELS, rng)
    with pytest.raises(ConfigError, match="does not fit"):
        insert_lesions(vol, [LesionSpec.parse("liver_lesion:40:6-8mm")], CT_LABELS, rng)
    with pytest.raises(ConfigError, match="not a label of this model"):
        insert_lesions(vol, [LesionSpec.parse("liver_lesion:1:5mm:pancreas")], CT_LABELS, rng)
    with pytest.raises(ConfigError, match="no 'spleen' voxels"):
        insert_lesions(vol, [LesionSpec.parse("liver_lesion:1:5mm:spleen")], CT_LABELS, rng)
    with pytest.raises(ConfigError, match="would vanish"):
        insert_lesions(vol, [LesionSpec.parse("liver_lesion:1:1-2mm")], CT_LABELS, rng)
    with pytest.raises(ConfigError, match="no default host"):
        insert_lesions(vol, [LesionSpec.parse("aorta:1:5mm")], CT_LABELS, rng)


@pytest.mark.parametrize("prompt, expected", [
    ("CT abdomen portal venous, liver lesion 38 mm, female, 60", {"liver_lesion": (1, 38.0)}),
    ("CT abdomen non-contrast, 2 liver lesions, largest 30 mm, male, 71", {"liver_lesion": (2, 30.0)}),
    ("CT abdomen, 3 Liver Lesions", {"liver_lesion": (3, None)}),
    ("CT abdomen portal venous, no lesion, female, 60", {"liver_lesion": (0, None)}),
    ("MR head FLAIR, tumour 22 mm with oedema, female, 55", {"tumour_core": (1, 22.0)}),
    ("MR head T1, no tumour, male, 40", {"tumour_core": (0, None)}),
    ("CT abdomen portal venous, no liver lesion", {"liver_lesion": (0, None)}),
    ("CT abdomen, liver lesion 0 mm", {"liver_lesion": (1, None)}),  # no size is not a size of 0
    ("CT abdomen portal venous, female, 60", {}),
    (None, {}),
])
def test_findings_in_prompt_reads_the_phantom_prompt_grammar(prompt, expected):
    from medsynth.pipelines.lesions import findings_in_prompt

    found = findings_in_prompt(prompt, ["liver_lesion", "tumour_core"])
    assert {k: (f.count, f.diameter_mm) for k, f in found.items()} == expected


def test_prompt_finding_accepts_diameters_around_the_stated_one():
    from medsynth.pipelines.lesions import PromptFinding

    assert PromptFinding("liver_lesion", 1, 40.0).accepted_mm(1.25) == (32.0, 50.0)
    assert PromptFinding("liver_lesion", 2, 40.0).accepted_mm(1.25) == (0.0, 50.0)  # "largest 40 mm": up to it
    assert PromptFinding("liver_lesion", 0).accepted_mm(1.25) is None


def test_drop_lesions_outside_keeps_only_the_asked_diameters():
    from medsynth.data.phantom_shapes import Grid, equivalent_diameter
    from medsynth.pipelines.lesions import drop_lesions_outside

    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"), axis=-1)
    label = np.ones((20, 20, 20), dtype=np.uint8)
    label[np.linalg.norm(grid - 9.5, axis=-1) < 9] = 3
    for radius, centre in ((1.0, (5, 9, 9)), (3.0, (13, 9, 9))):
        label[np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius] = 9
    spacing = (2.0, 2.0, 2.0)
    big = int((np.linalg.norm(grid - np.asarray((13, 9, 9)), axis=-1) <= 3.0).sum())
    diameter = equivalent_diameter(big, Grid(label.shape, spacing))
    kept, removed = drop_lesions_outside(label, 9, (diameter - 1, diameter + 1), spacing)
    assert removed == 1 and kept[13, 9, 9] == 9 and kept[5, 9, 9] == 3  # the small one closed by the liver
    assert ((kept != label) <= (label == 9)).all() and int((kept == 9).sum()) == big
    same, removed = drop_lesions_outside(label, 9, (0.0, 1000.0), spacing)
    assert removed == 0 and np.array_equal(same, label)


def test_no_tumour_clears_every_class_of_the_tumour():
    from medsynth.pipelines.lesions import findings_in_prompt

    found = findings_in_prompt("MR head T1, no tumour, male, 40", ["tumour_oedema", "tumour_core"])
    assert {k: f.count for k, f in found.items()} == {"tumour_oedema": 0, "tumour_core": 0}
    stated = findings_in_prompt("MR head FLAIR, tumour 22 mm with oedema", ["tumour_oedema", "tumour_core"])
    assert {k: (f.count, f.diameter_mm) for k, f in stated.items()} == {"tumour_core": (1, 22.0)}
