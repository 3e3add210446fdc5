"""Bad inputs found while benchmarking the evaluation (docs/benchmarks/evaluation_ranking.md):
a real set too small for the intensity check, a label on another grid than its image, and
provided segmentations on the wrong grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth.errors import InputError
from medsynth.evaluation.evaluate import EvaluationConfig, evaluate
from medsynth.evaluation.preprocessing import Protocol
from medsynth.evaluation.set_metrics import MetricSettings
from medsynth.io import read_volume, write_volume

from eval_phantom_folders import write_phantom_dataset  # beside this file (rootdir import mode)

PROTOCOL = Protocol(spacing=(12.0, 12.0, 12.0), size=(16, 16, 16))
FAST = MetricSettings(bootstrap=10, kid_subsets=5, fid_infinity_points=4)


def test_one_real_case_skips_the_intensity_check_and_a_misfit_label_is_left_out(tmp_path: Path) -> None:
    real = write_phantom_dataset(tmp_path / "real", 1, seed=1, size=16)
    syn = write_phantom_dataset(tmp_path / "syn", 3, seed=2, size=16)
    label_path = sorted((syn / "labelsTr").glob("*.nii.gz"))[0]
    label = read_volume(label_path, kind="label")
    write_volume(label.with_array(label.array[:12, :12, :12].copy()), label_path)  # not on its image's grid

    report = evaluate(EvaluationConfig(real=real, synthetic=syn, out=tmp_path / "o", protocol=PROTOCOL,
                                       settings=FAST))
    # One training volume gives no range: before, every case "passed" a check that checked nothing.
    assert report["quality"] == {"skipped": "intensity_check needs >= 2 real training volumes with labels "
                                            "per class; got 1"}
    # Before, MONAI failed on arrays of different shapes; now the case is left out and named.
    fidelity = report["mask_fidelity"]
    assert fidelity["left_out"]["cases"] == [label_path.name.split(".")[0]]
    assert fidelity["synthetic"] and len(fidelity["synthetic_cases"]) == 2
    assert "intensity_check needs >= 2" in (tmp_path / "o" / "report.md").read_text()


def test_provided_segmentations_on_another_grid_are_refused(tmp_path: Path) -> None:
    real = write_phantom_dataset(tmp_path / "real", 2, seed=1, size=16)
    syn = write_phantom_dataset(tmp_path / "syn", 2, seed=2, size=16)
    segs = tmp_path / "segs"
    segs.mkdir()
    for path in sorted((syn / "labelsTr").glob("*.nii.gz")):
        label = read_volume(path, kind="label")
        write_volume(label.with_array(label.array[:8].copy()), segs / path.name)
    with pytest.raises(InputError, match=r"segmentation of 's2_000' has shape \(8, 16, 16\), its label \(16, 16, 16\)"):
        evaluate(EvaluationConfig(real=real, synthetic=syn, out=tmp_path / "o", protocol=PROTOCOL, settings=FAST,
                                  segmentations=segs))
