"""The lesion contrast rule: contrast against the surround, a sign and thresholds fit on real images."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.errors import ConfigError, InputError
from medsynth.evaluation.lesion_contrast import ContrastRule, decoy_components, detection_by_bin, lesion_contrasts
from medsynth.io.volume import Volume

LABELS = {"background": 0, "liver": 1, "liver_lesion": 2}
SPACING = (4.0, 4.0, 4.0)
SHAPE = (24, 24, 24)


def ball(center, radius_vox: float) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius_vox ** 2


def case(rng: np.random.Generator, lesion_centre=None, lesion_drop: float = 40.0, noise: float = 5.0,
         radius_vox: float = 2.0) -> tuple[np.ndarray, Volume]:
    """A 'liver' block at 100 HU in 0 HU background, Gaussian noise, optionally a ball lesion ``lesion_drop`` darker."""
    label = np.zeros(SHAPE, np.uint8)
    label[3:21, 3:21, 3:21] = 1
    image = np.where(label == 1, 100.0, 0.0)
    if lesion_centre is not None:
        lesion = ball(lesion_centre, radius_vox)
        label[lesion] = 2
        image[lesion] -= lesion_drop
    image = image + rng.normal(0.0, noise, SHAPE)
    return image.astype(np.float32), Volume(label, np.diag([*SPACING, 1.0]), kind="label")


def test_contrast_is_surround_minus_lesion_with_the_host_as_surround() -> None:
    image, label = case(np.random.default_rng(0), (12, 12, 12), lesion_drop=40.0, noise=0.0)
    (measured,) = lesion_contrasts(image, label.array, [2], SPACING)
    assert measured.raw == pytest.approx(40.0)
    assert measured.surround_label == 1
    # equivalent-sphere diameter of the painted voxels
    voxels = int((label.array == 2).sum())
    assert measured.voxels == voxels
    assert measured.diameter_mm == pytest.approx((6 * voxels * 64.0 / np.pi) ** (1 / 3), abs=0.01)
    # relative contrast does not depend on the intensity scale (MR)
    (rel,) = lesion_contrasts(image * 7.0, label.array, [2], SPACING, relative=True)
    assert rel.raw == pytest.approx(0.4)


def test_rule_detects_real_lesions_and_fires_rarely_on_lesion_free_regions() -> None:
    rng = np.random.default_rng(1)
    calibration = [case(rng, (12 + rng.integers(-3, 4), 12, 12)) for _ in range(12)]
    rule = ContrastRule.fit(calibration, "liver_lesion", "liver", LABELS, [16.0, 24.0], false_alarm=0.05)
    assert rule.sign == 1.0  # hypodense lesions
    assert rule.real_lesions == 12 and sum(rule.decoys.values()) >= 12
    # the thresholds sit in the noise of a few-voxel mean, far below a 40 HU lesion
    assert all(0.0 < t < 15.0 for t in rule.thresholds.values())

    fresh = np.random.default_rng(2)
    hits = [row["detected"] for _ in range(10)
            for row in rule.judge(*((lambda im, lab: (im, lab.array))(*case(fresh, (12, 12, 12)))), [2], SPACING)]
    assert all(hits) and len(hits) == 10
    # decoys in images without any lesion: about the false-alarm rate (5 % nominal)
    alarms = []
    for _ in range(20):
        image, label = case(fresh)
        decoys = decoy_components(label, "liver_lesion", "liver", LABELS, [16.0, 24.0], fresh)
        alarms += [row["detected"] for row in rule.judge(image, label.array, [2], SPACING, components=decoys)]
    assert len(alarms) >= 20 and np.mean(alarms) <= 0.2
    # a faint lesion (0.5 HU: well inside the noise of a 33-voxel mean) is mostly missed
    faint = [row["detected"] for _ in range(10)
             for row in rule.judge(*(lambda im, lab: (im, lab.array))(*case(fresh, (12, 12, 12), lesion_drop=0.5)),
                                   [2], SPACING)]
    assert np.mean(faint) < 0.6


def test_the_sign_follows_the_real_lesions() -> None:
    rng = np.random.default_rng(3)
    bright = [case(rng, (12, 12, 12), lesion_drop=-40.0) for _ in range(6)]
    rule = ContrastRule.fit(bright, "liver_lesion", "liver", LABELS, [16.0])
    assert rule.sign == -1.0
    image, label = case(rng, (10, 12, 12), lesion_drop=-40.0)
    assert all(row["detected"] and row["contrast"] > 30 for row in rule.judge(image, label.array, [2], SPACING))
    dark_image, dark_label = case(rng, (10, 12, 12), lesion_drop=40.0)
    assert not any(row["detected"] for row in rule.judge(dark_image, dark_label.array, [2], SPACING))


def test_decoys_stay_in_the_host_and_off_real_lesions() -> None:
    rng = np.random.default_rng(4)
    _, label = case(rng, (12, 12, 12))
    decoys = decoy_components(label, "liver_lesion", "liver", LABELS, [12.0, 16.0, 500.0], rng)
    assert decoys.max() == 2  # the 500 mm one does not fit and is skipped
    assert np.all(label.array[decoys > 0] == 1)
    assert np.asarray(label.array).max() == 2  # the input map is not modified


def test_bins_and_bad_input() -> None:
    rows = [{"bin": "30-40 mm", "detected": True}, {"bin": "20-30 mm", "detected": False},
            {"bin": "30-40 mm", "detected": False}, {"bin": "100-110 mm", "detected": True}]
    assert list(detection_by_bin(rows)) == ["20-30 mm", "30-40 mm", "100-110 mm"]
    assert detection_by_bin(rows)["30-40 mm"] == {"detected": 1, "lesions": 2, "rate": 0.5}
    rng = np.random.default_rng(5)
    image, label = case(rng)
    with pytest.raises(InputError, match="shape"):
        lesion_contrasts(image[:-1], label.array, [2], SPACING)
    with pytest.raises(InputError, match="no 'liver_lesion' lesion"):
        ContrastRule.fit([(image, label)], "liver_lesion", "liver", LABELS, [16.0])
    with pytest.raises(ConfigError, match="false_alarm"):
        ContrastRule.fit([(image, label)], "liver_lesion", "liver", LABELS, [16.0], false_alarm=0.7)


def test_added_contrast_cancels_what_the_region_shows_anyway() -> None:
    """A generator that draws every region 10 HU brighter than its rim fools the plain rule one way;
    the paired difference sees only what the lesion adds."""
    from medsynth.evaluation.lesion_contrast import added_contrast_by_bin, contrast_by_bin

    rule = ContrastRule(sign=1.0, thresholds={"20-30 mm": 5.0}, pooled_threshold=5.0, false_alarm=0.05,
                        relative=False, ring=2, real_lesions=1)
    rng = np.random.default_rng(6)
    with_rows, without_rows = [], []
    for _ in range(8):
        image, label = case(rng, (12, 12, 12), lesion_drop=-10.0, noise=1.0)  # without: region 10 HU brighter
        drawn = image - 8.0 * (label.array == 2)  # with: the lesion darkens it by 8 HU
        without_rows += rule.judge(image, label.array, [2], SPACING)
        with_rows += rule.judge(drawn, label.array, [2], SPACING)
    assert not any(r["detected"] for r in with_rows)  # -2 HU: the plain rule sees no lesion
    (added,) = added_contrast_by_bin(with_rows, without_rows).values()
    assert added["mean"] == pytest.approx(8.0, abs=0.1) and added["lesions"] == 8 and added["above_threshold"] == 8
    (plain,) = contrast_by_bin(with_rows).values()
    assert plain["mean"] == pytest.approx(-2.0, abs=0.5) and plain["se"] < 0.5
    with pytest.raises(InputError, match="same regions"):
        added_contrast_by_bin(with_rows[:1], [dict(without_rows[0], voxels=1)])


def test_an_added_contrast_counts_only_when_positive() -> None:
    """A negative threshold (lesion-free regions mostly read as the opposite of a lesion) must not
    count a lesion that adds nothing, or one that adds the wrong sign."""
    from medsynth.evaluation.lesion_contrast import added_contrast_by_bin

    def row(contrast: float) -> dict:
        return {"bin": "20-30 mm", "voxels": 10, "contrast": contrast, "threshold": -0.03}

    added = added_contrast_by_bin([row(0.0), row(-0.01), row(0.05)], [row(0.0), row(0.0), row(0.0)])
    assert added["20-30 mm"]["above_threshold"] == 1
