"""Procedural phantoms: determinism, labels, anatomy, intensities, lesions, prompts, arguments."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from scipy import ndimage

from medsynth.data.phantoms import (CT_LABELS, MR_LABELS, PhantomCase, generate_phantom,
                                    generate_phantoms, phantom_case_id, phantom_case_seed,
                                    phantom_labels, phantom_lesion_planned, phantom_noise_scale)
from medsynth.errors import ConfigError

CT_ORGANS = [name for name, value in CT_LABELS.items() if 0 < value < CT_LABELS["liver_lesion"]]
MR_TISSUES = ["scalp", "skull", "csf", "grey_matter", "white_matter", "ventricles"]
FACE = ndimage.generate_binary_structure(3, 1)  # face neighbours


def centroid_mm(case: PhantomCase, mask: np.ndarray) -> np.ndarray:
    """RAS mm centroid of a voxel mask."""
    ijk = np.argwhere(mask).mean(axis=0)
    return case.label.affine[:3, :3] @ ijk + case.label.affine[:3, 3]


def interior_median(case: PhantomCase, value: int) -> float:
    """Median image value over a label's voxels whose face neighbours share the label."""
    inner = ndimage.binary_erosion(case.label.array == value, FACE)
    return float(np.median(case.image.array[inner]))


# -- determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_same_seed_same_case_and_different_seed_differs(modality: str) -> None:
    a = generate_phantom(modality, 24, seed=3, lesion_rate=0.5)
    b = generate_phantom(modality, 24, seed=3, lesion_rate=0.5)
    c = generate_phantom(modality, 24, seed=4, lesion_rate=0.5)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    assert a.prompt == b.prompt and a.metadata == b.metadata
    assert not np.array_equal(a.label.array, c.label.array)
    assert not np.allclose(a.image.array, c.image.array)


def test_case_i_does_not_depend_on_num_and_its_seed_regenerates_it() -> None:
    three = list(generate_phantoms("ct", 3, size=16, seed=11, lesion_rate=0.5))
    one = next(generate_phantoms("ct", 1, size=16, seed=11, lesion_rate=0.5))
    np.testing.assert_array_equal(one.image.array, three[0].image.array)
    assert [c.metadata["case_id"] for c in three] == ["phantom_0000", "phantom_0001", "phantom_0002"]
    assert len({c.metadata["seed"] for c in three}) == 3
    again = generate_phantom("ct", 16, seed=three[2].metadata["seed"], lesion_rate=0.5)
    np.testing.assert_array_equal(again.label.array, three[2].label.array)
    assert three[2].metadata["seed"] == phantom_case_seed(11, 2)
    assert phantom_case_seed(12, 2) != phantom_case_seed(11, 2)


def test_anatomy_is_fixed_in_mm_whatever_the_grid_size() -> None:
    small = generate_phantom("ct", 32, seed=2, lesion_rate=0.0)
    large = generate_phantom("ct", 64, seed=2, lesion_rate=0.0)
    for organ in ("liver", "spleen", "kidney_left"):
        v = CT_LABELS[organ]
        gap = np.linalg.norm(centroid_mm(small, small.label.array == v)
                             - centroid_mm(large, large.label.array == v))
        assert gap < max(small.label.spacing), organ


# -- grid, volumes, metadata -------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_volumes_share_a_centred_diagonal_ras_grid(modality: str) -> None:
    case = generate_phantom(modality, (32, 28, 24), seed=0)
    image, label = case.image, case.label
    assert image.kind == "image" and label.kind == "label"
    assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
    assert image.shape == (32, 28, 24) and image.same_grid(label)
    assert image.orientation == ("R", "A", "S")
    np.testing.assert_allclose(image.affine[:3, :3], np.diag(image.spacing))
    centre = image.affine @ np.array([(n - 1) / 2 for n in image.shape] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    fov = (380, 380, 280) if modality == "ct" else (240, 240, 240)
    np.testing.assert_allclose(image.spacing, np.array(fov) / np.array(image.shape))
    assert image.metadata.synthetic and label.metadata.synthetic
    assert image.metadata.extra["generator"] == "phantom"
    assert image.metadata.modality == modality.upper()
    assert image.metadata.intensity_unit == ("HU" if modality == "ct" else "a.u.")
    meta = case.metadata
    assert meta["modality"] == modality.upper() and meta["region"] == ("abdomen" if modality == "ct" else "head")
    assert meta["sex"] in ("female", "male") and isinstance(meta["age"], int) and 18 <= meta["age"] <= 90
    assert meta["spacing"] == list(image.spacing) and meta["seed"] == 0
    assert ("contrast" in meta) == (modality == "ct") and ("sequence" in meta) == (modality == "mr")
    assert json.loads(json.dumps(meta)) == meta  # goes into prompts.jsonl as is


def test_explicit_spacing_sets_the_field_of_view() -> None:
    case = generate_phantom("mr", 20, seed=1, spacing=(10.0, 11.0, 12.0))
    assert case.image.spacing == pytest.approx((10.0, 11.0, 12.0))


# -- labels and anatomy ------------------------------------------------------------------------

def test_label_tables_start_with_background_and_are_distinct() -> None:
    for table in (CT_LABELS, MR_LABELS):
        assert next(iter(table.items())) == ("background", 0)
        assert sorted(table.values()) == list(range(len(table)))
    assert phantom_labels("CT") == CT_LABELS and phantom_labels("mr") == MR_LABELS


@pytest.mark.parametrize("size,seed", [(32, 0), (32, 1), (32, 2), (32, 3), (64, 4)])
def test_every_ct_organ_present_and_only_declared_values(size: int, seed: int) -> None:
    case = generate_phantom("ct", size, seed=seed, lesion_rate=0.0)
    present = set(np.unique(case.label.array).tolist())
    assert present == set(CT_LABELS.values()) - {CT_LABELS["liver_lesion"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_mr_tissue_present_and_only_declared_values(seed: int) -> None:
    case = generate_phantom("mr", 32, seed=seed, lesion_rate=1.0)
    present = set(np.unique(case.label.array).tolist())
    assert present <= set(MR_LABELS.values())
    assert {MR_LABELS[t] for t in MR_TISSUES} <= present


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ct_organs_sit_on_their_anatomical_side(seed: int) -> None:
    case = generate_phantom("ct", 32, seed=seed, lesion_rate=0.0)
    c = {name: centroid_mm(case, case.label.array == CT_LABELS[name]) for name in CT_ORGANS}
    x, y = 0, 1  # RAS: +x is the patient's right, +y anterior
    assert c["liver"][x] > 15 and c["spleen"][x] < -15
    assert c["kidney_right"][x] > c["spine"][x] > c["kidney_left"][x]
    assert c["aorta"][x] < c["spine"][x] and c["aorta"][y] > c["spine"][y]
    assert c["spine"][y] < c["liver"][y] and c["spine"][y] < c["body"][y]
    assert c["kidney_right"][2] < c["kidney_left"][2] + 5  # the liver pushes the right kidney down


# -- intensities -------------------------------------------------------------------------------

CT_RANGES = {  # interior median HU per organ, by contrast phase
    "none": {"liver": (40, 80), "spleen": (30, 65), "kidney_left": (15, 50), "kidney_right": (15, 50),
             "muscle": (25, 70), "aorta": (20, 60)},
    "portal_venous": {"liver": (85, 140), "spleen": (80, 140), "kidney_left": (125, 215),
                      "kidney_right": (125, 215), "muscle": (35, 80), "aorta": (115, 210)},
}


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_ct_hounsfield_units_are_realistic(seed: int) -> None:
    case = generate_phantom("ct", 64, seed=seed, lesion_rate=0.0)
    img, lab = case.image.array, case.label.array
    for organ, (lo, hi) in CT_RANGES[case.metadata["contrast"]].items():
        assert lo <= interior_median(case, CT_LABELS[organ]) <= hi, organ
    assert np.median(img[lab == 0]) < -900  # air
    assert interior_median(case, CT_LABELS["spine"]) > 150  # bone
    assert np.median(img[lab == CT_LABELS["body"]]) < 0  # mostly fat


def test_both_ct_contrast_phases_occur() -> None:
    phases = {generate_phantom("ct", 16, seed=s).metadata["contrast"] for s in range(12)}
    assert phases == {"none", "portal_venous"}


def test_large_liver_lesion_is_hypodense() -> None:
    case = generate_phantom("ct", 64, seed=15, lesion_rate=1.0)
    assert max(les["diameter_mm"] for les in case.metadata["lesions"]) > 18
    les = interior_median(case, CT_LABELS["liver_lesion"])
    assert les < interior_median(case, CT_LABELS["liver"]) - 10


def _mr_with(sequence: str) -> PhantomCase:
    for seed in range(40):
        case = generate_phantom("mr", 48, seed=seed, lesion_rate=1.0)
        if case.metadata["sequence"] == sequence:
            return case
    raise AssertionError(f"no {sequence} case in 40 seeds")


def test_mr_contrasts_follow_the_sequence() -> None:
    t1, t2, flair = _mr_with("T1"), _mr_with("T2"), _mr_with("FLAIR")

    def med(case: PhantomCase, name: str) -> float:
        return float(np.median(case.image.array[case.label.array == MR_LABELS[name]]))

    assert med(t1, "white_matter") > med(t1, "grey_matter") > med(t1, "csf")
    assert med(t2, "csf") > med(t2, "grey_matter") > med(t2, "white_matter")
    assert med(flair, "ventricles") < med(flair, "white_matter") < med(flair, "tumour_oedema")
    assert med(t1, "background") < 0.15 * med(t1, "white_matter")
    assert t1.image.array.min() >= 0  # magnitude images


# -- lesions -----------------------------------------------------------------------------------

def test_lesion_rate_is_respected() -> None:
    rate, n = 0.3, 80
    cases = list(generate_phantoms("ct", n, size=16, seed=0, lesion_rate=rate))
    flags = [c.metadata["has_lesion"] for c in cases]
    sd = np.sqrt(n * rate * (1 - rate))
    assert abs(sum(flags) - n * rate) < 3.5 * sd
    # the cheap plan (used to stratify splits) agrees with what was generated
    assert flags == [phantom_lesion_planned(c.metadata["seed"], rate) for c in cases]
    assert not any(c.metadata["has_lesion"] for c in generate_phantoms("mr", 10, size=16, lesion_rate=0.0))
    assert all(c.metadata["has_lesion"] for c in generate_phantoms("mr", 10, size=16, lesion_rate=1.0))


@pytest.mark.parametrize("modality,size,seed", [("ct", 16, 0), ("ct", 24, 1), ("ct", 32, 13), ("ct", 48, 15),
                                                ("ct", 32, 2), ("mr", 16, 0), ("mr", 24, 1), ("mr", 48, 6)])
def test_lesions_are_inside_their_host_and_match_the_metadata(modality: str, size: int, seed: int) -> None:
    case = generate_phantom(modality, size, seed=seed, lesion_rate=1.0)
    lab, meta = case.label.array, case.metadata
    assert meta["has_lesion"] and meta["lesion_count"] == len(meta["lesions"]) >= 1
    if modality == "ct":
        lesion = lab == CT_LABELS["liver_lesion"]
        host = np.isin(lab, [CT_LABELS["liver"], CT_LABELS["liver_lesion"]])
    else:
        lesion = lab == MR_LABELS["tumour_core"]
        brain = ("grey_matter", "white_matter", "tumour_oedema", "tumour_core")
        host = np.isin(lab, [MR_LABELS[n] for n in brain])
        assert (lab == MR_LABELS["tumour_oedema"]).any()
        # the oedema rim wraps every core
        rim = ndimage.binary_dilation(lesion, FACE) & ~lesion
        assert np.all(lab[rim] == MR_LABELS["tumour_oedema"])
    # fully inside the host organ: the lesion and its face neighbours are host or lesion
    assert np.all(host[ndimage.binary_dilation(lesion, FACE)])
    # one connected component per recorded lesion, each the recorded size
    components, count = ndimage.label(lesion, FACE)
    assert count == len(meta["lesions"])
    voxel_ml = float(np.prod(case.label.spacing))
    for les in meta["lesions"]:
        comp = components[tuple(les["center_vox"])]
        assert comp > 0
        volume = (components == comp).sum() * voxel_ml
        assert volume == pytest.approx(np.pi / 6 * les["diameter_mm"] ** 3, rel=0.02)
        # never lost to the grid: two voxels across from 32^3 on (one voxel only on coarser grids)
        if size >= 32:
            assert les["diameter_mm"] >= 1.9 * min(case.label.spacing)


# -- prompts -----------------------------------------------------------------------------------

def test_prompt_mentions_a_lesion_iff_the_label_has_one() -> None:
    for modality, lesion_value in (("ct", CT_LABELS["liver_lesion"]), ("mr", MR_LABELS["tumour_core"])):
        for case in generate_phantoms(modality, 16, size=16, seed=3, lesion_rate=0.5):
            has = bool((case.label.array == lesion_value).any())
            negative = "no lesion" in case.prompt or "no tumour" in case.prompt
            assert has == (not negative) == case.metadata["has_lesion"], case.prompt
            meta = case.metadata
            assert case.prompt.endswith(f", {meta['sex']}, {meta['age']}")
            if has:
                largest = max(les["diameter_mm"] for les in meta["lesions"])
                assert re.search(rf"\b{largest:.0f} mm", case.prompt), case.prompt


def test_prompt_formats() -> None:
    ct = generate_phantom("ct", 24, seed=15, lesion_rate=1.0).prompt
    assert re.fullmatch(r"CT abdomen (non-contrast|portal venous), (liver lesion \d+ mm|\d liver lesions, "
                        r"largest \d+ mm), (female|male), \d+", ct), ct
    mr = generate_phantom("mr", 24, seed=0, lesion_rate=0.0).prompt
    assert re.fullmatch(r"MR head (T1|T2|FLAIR), no tumour, (female|male), \d+", mr), mr


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_lesion_size_range_sets_the_diameters_and_default_cases_are_unchanged(modality: str) -> None:
    cases = [generate_phantom(modality, 48, seed=s, lesion_rate=1.0, lesion_size_mm=(28, 40)) for s in range(6)]
    largest = [max(les["diameter_mm"] for les in c.metadata["lesions"]) for c in cases]
    # the largest lesion of a case was drawn from [28, 40] mm; one that did not fit its host shrank
    assert max(largest) <= 46 and np.median(largest) >= 24, largest
    assert cases[0].metadata["lesion_size_mm"] == [28.0, 40.0]
    small = [generate_phantom(modality, 48, seed=s, lesion_rate=1.0, lesion_size_mm=(2, 3)) for s in range(6)]
    # two voxels across (10 mm at 48^3) is the floor: asked-for 2-3 mm lesions come out at the floor
    floor = 2 * max(small[0].image.spacing)
    assert all(les["diameter_mm"] < 1.6 * floor for c in small for les in c.metadata["lesions"])
    assert np.mean(largest) > 1.4 * np.mean([les["diameter_mm"] for c in small for les in c.metadata["lesions"]])
    # asking for nothing gives exactly the old case (the draws and the metadata keys are unchanged)
    plain = generate_phantom(modality, 32, seed=3, lesion_rate=1.0)
    default = generate_phantom(modality, 32, seed=3, lesion_rate=1.0, lesion_size_mm=None)
    assert "lesion_size_mm" not in plain.metadata
    assert np.array_equal(plain.label.array, default.label.array)


@pytest.mark.parametrize("modality,law", [("ct", 0.5), ("mr", 1.0)])
def test_scanner_noise_scales_with_voxel_volume_and_changes_nothing_else(modality: str, law: float) -> None:
    fixed = generate_phantom(modality, 32, seed=5, lesion_rate=1.0)
    scanner = generate_phantom(modality, 32, seed=5, lesion_rate=1.0, noise="scanner")
    volume = float(np.prod(fixed.image.spacing))
    factor = phantom_noise_scale(modality, fixed.image.spacing, "scanner")
    # CT quantum noise goes as 1/sqrt(V), MR thermal noise as 1/V (noise drawn for 1 mm^3 voxels)
    assert factor == pytest.approx(volume ** -law)
    assert phantom_noise_scale(modality, (1.0, 1.0, 1.0), "scanner") == pytest.approx(1.0)
    assert phantom_noise_scale(modality, fixed.image.spacing, "fixed") == 1.0
    assert scanner.metadata["noise_sd"] == pytest.approx(fixed.metadata["noise_sd"] * factor, abs=0.01)
    assert scanner.metadata["noise_model"] == "scanner" and "noise_model" not in fixed.metadata
    # anatomy, lesions, contrast and prompt are those of the same seed; only the noise shrank
    assert np.array_equal(fixed.label.array, scanner.label.array)
    assert fixed.prompt == scanner.prompt and fixed.metadata["lesions"] == scanner.metadata["lesions"]
    if modality == "ct":
        residual = fixed.image.array - scanner.image.array  # the removed noise: white, of the drawn SD
        body = fixed.label.array > 0
        assert np.std(residual[body]) == pytest.approx(fixed.metadata["noise_sd"] * (1 - factor), rel=0.1)
        # inside the liver (away from its boundary's partial volume) texture is what remains
        liver = ndimage.binary_erosion(fixed.label.array == CT_LABELS["liver"], FACE, iterations=2)
        assert np.std(scanner.image.array[liver]) < 0.8 * np.std(fixed.image.array[liver])


def test_scanner_noise_grows_as_voxels_shrink() -> None:
    ratios = [generate_phantom("ct", size, seed=2, noise="scanner").metadata["noise_sd"]
              / generate_phantom("ct", size, seed=2).metadata["noise_sd"] for size in (32, 64, 128)]
    assert ratios[0] < ratios[1] < ratios[2] < 1
    # 8x smaller voxels: sqrt(8) times the noise (noise_sd is rounded to 0.01 HU, hence the tolerance)
    assert ratios[2] / ratios[1] == pytest.approx(8 ** 0.5, rel=0.03)


# -- arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    (dict(modality="pet"), "pet"),
    (dict(size=8), "8"),
    (dict(size=513), "513"),
    (dict(size=(16, 16)), "(16, 16)"),
    (dict(lesion_rate=1.5), "1.5"),
    (dict(lesion_rate=-0.1), "-0.1"),
    (dict(seed=-1), "-1"),
    (dict(spacing=0.0), "0.0"),
    (dict(lesion_size_mm=(30, 10)), "(30, 10)"),
    (dict(lesion_size_mm=(0, 10)), "(0, 10)"),
    (dict(lesion_size_mm=(5, 500)), "(5, 500)"),
    (dict(lesion_size_mm=(5,)), "(5,)"),
    (dict(noise="gaussian"), "'gaussian'"),
])
def test_bad_arguments_raise_config_error(kwargs: dict, needle: str) -> None:
    args = dict(modality="ct", size=16, seed=0, lesion_rate=0.1) | kwargs
    with pytest.raises(ConfigError, match=re.escape(needle)):
        generate_phantom(**args)


def test_bad_num_and_index_raise_config_error_eagerly() -> None:
    with pytest.raises(ConfigError, match="got 0"):
        generate_phantoms("ct", 0)
    with pytest.raises(ConfigError, match="MRI"):
        generate_phantoms("MRI", 2)
    with pytest.raises(ConfigError, match="fixed, scanner"):
        generate_phantoms("ct", 2, noise="physical")
    with pytest.raises(ConfigError):
        phantom_case_id(-1)
    assert phantom_case_id(7) == "phantom_0007"
    assert [c.metadata["index"] for c in itertools.islice(generate_phantoms("Mr", 5, 16), 2)] == [0, 1]
