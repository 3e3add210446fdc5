"""The spot rule: a lesion anywhere in the host, judged against real lesion-free organs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsynth.errors import ConfigError, InputError
from medsynth.evaluation.lesion_spot import SpotRule, spot_score


def organ(rng: np.random.Generator, lesion_at: tuple[int, int, int] | None = None, depth: float = 0.3,
          noise: float = 0.03) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 24^3 image: dark outside (-1), an organ of value 1 with noise, optionally a 3^3 lesion ``depth`` darker."""
    image = -1.0 + noise * rng.standard_normal((24, 24, 24))
    host = np.zeros((24, 24, 24), bool)
    host[4:20, 4:20, 4:20] = True
    image[host] = 1.0 + noise * rng.standard_normal(int(host.sum()))
    lesion = np.zeros_like(host)
    if lesion_at is not None:
        x, y, z = lesion_at
        lesion[x - 1:x + 2, y - 1:y + 2, z - 1:z + 2] = True
        image[lesion] -= depth
    return image, host, lesion


def test_score_sees_an_interior_lesion_and_not_the_dark_outside() -> None:
    rng = np.random.default_rng(0)
    clean, host, _ = organ(rng)
    with_lesion, _, lesion = organ(rng, (10, 12, 9))
    # the dark tissue around the organ does not leak into the smoothed organ
    assert spot_score(clean, host) < 0.1
    assert spot_score(with_lesion, host) > 0.15
    # a bright lesion is found with the other sign, not with this one
    bright = with_lesion.copy()
    bright[lesion] += 0.6
    assert spot_score(bright, host, sign=-1.0) > 0.15 > spot_score(bright, host, sign=1.0)
    assert spot_score(with_lesion, host, relative=True) == pytest.approx(
        spot_score(with_lesion * 3, host, relative=True), rel=1e-9)  # relative: no absolute scale
    assert spot_score(clean, np.zeros_like(host)) is None
    tiny = np.zeros_like(host)
    tiny[9:13, 9:13, 9:13] = True
    assert spot_score(clean, tiny) is None  # nothing left inside a 2-voxel rim
    assert spot_score(clean, tiny, margin=1) is not None
    # the rim is left out: a dark rim (the scanner's blur) is no lesion
    rim = clean.copy()
    rim[host & ~ndimage.binary_erosion(host)] -= 0.5  # a one-voxel dark rim
    assert spot_score(rim, host) < 0.1 < spot_score(rim, host, margin=0)
    with pytest.raises(InputError, match="shape"):
        spot_score(clean, host[:-1])
    with pytest.raises(ConfigError, match="sigma"):
        spot_score(clean, host, sigma=0)
    with pytest.raises(ConfigError, match="margin"):
        spot_score(clean, host, margin=-1)


def test_rule_fit_on_real_cases_finds_lesions_at_about_its_false_alarm_rate() -> None:
    rng = np.random.default_rng(1)
    centres = [tuple(int(v) for v in rng.integers(7, 17, 3)) for _ in range(20)]
    calibration = [organ(rng) for _ in range(40)] + [organ(rng, c) for c in centres]
    rule = SpotRule.fit(calibration)
    assert rule.sign == 1.0 and rule.lesion_cases == 20 and rule.lesion_free_cases == 40
    fresh_free = [organ(rng) for _ in range(100)]
    false_alarms = np.mean([rule.judge(image, host)["detected"] for image, host, _ in fresh_free])
    assert false_alarms < 0.15
    fresh_lesions = [organ(rng, tuple(int(v) for v in rng.integers(7, 17, 3))) for _ in range(40)]
    assert np.mean([rule.judge(image, host)["detected"] for image, host, _ in fresh_lesions]) > 0.9
    faint = [organ(rng, (12, 12, 12), depth=0.01) for _ in range(40)]
    assert np.mean([rule.judge(image, host)["detected"] for image, host, _ in faint]) < 0.3
    # bright lesions: the sign is learnt from them
    bright = [organ(rng)[:2] + (np.zeros((24, 24, 24), bool),) for _ in range(10)]
    for c in centres[:5]:
        image, host, lesion = organ(rng, c, depth=-0.3)
        bright.append((image, host, lesion))
    assert SpotRule.fit(bright).sign == -1.0
    with pytest.raises(InputError, match="without a lesion"):
        SpotRule.fit([organ(rng, (12, 12, 12))])
    with pytest.raises(InputError, match="with a lesion"):
        SpotRule.fit([organ(rng)])
    with pytest.raises(ConfigError, match="false_alarm"):
        SpotRule.fit(calibration, false_alarm=0.7)
