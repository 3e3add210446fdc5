"""`medsynth evaluate` end to end on phantom folders: report files, planted copy, bad inputs, cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.errors import ConfigError, InputError
from medsynth.evaluation.evaluate import EvaluationConfig, evaluate
from medsynth.evaluation.preprocessing import Protocol
from medsynth.evaluation.privacy import memorisation_audit
from medsynth.evaluation.quality import check_intensities, fit_intensity_ranges, class_medians
from medsynth.evaluation.set_metrics import MetricSettings

from eval_phantom_folders import write_phantom_dataset  # beside this file (rootdir import mode)

PROTOCOL = Protocol(spacing=(16.0, 16.0, 16.0), size=(24, 24, 24))
FAST = MetricSettings(bootstrap=10, kid_subsets=5, fid_infinity_points=4)


def test_audit_flags_a_planted_copy_of_a_training_case() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(10, 8))
    held = rng.normal(size=(20, 8))
    synthetic = np.vstack([rng.normal(size=(5, 8)), train[3]])  # last one is an exact copy
    volumes = [rng.normal(size=(4, 4, 4)) for _ in range(10)]
    syn_volumes = [rng.normal(size=(4, 4, 4)) for _ in range(5)] + [volumes[3]]
    out = memorisation_audit(train, [f"t{i}" for i in range(10)], synthetic, [f"g{i}" for i in range(6)],
                             held, [f"h{i}" for i in range(20)], train_volumes=volumes, synthetic_volumes=syn_volumes)
    flagged = {p["synthetic"]: p for p in out["flagged"]}
    assert "g5" in flagged and flagged["g5"]["train"] == "t3" and flagged["g5"]["distance"] == 0.0
    assert flagged["g5"]["confirmed_copy"] and flagged["g5"]["voxel_correlation"] == pytest.approx(1.0)
    assert [p["synthetic"] for p in out["confirmed_copies"]] == ["g5"]
    assert out["fraction_below_p1"] >= 1 / 6 and out["ratio_of_medians"] < 2


def test_quality_check_flags_an_organ_outside_the_training_range() -> None:
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    labels = {"background": 0, "liver": 1}
    train = [class_medians(np.where(label == 1, 60.0 + i, -900.0), label, labels) for i in range(5)]
    ranges = fit_intensity_ranges(train)
    assert ranges["liver"].low < 60.0 and ranges["liver"].high > 64.0
    assert check_intensities(np.where(label == 1, 62.0, 0.0), label, labels, ranges).passed
    bad = check_intensities(np.where(label == 1, 400.0, 0.0), label, labels, ranges)
    assert not bad.passed and bad.failing == ["liver"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    real = write_phantom_dataset(root / "real", 10, seed=1, size=24, n_test=3)
    syn = write_phantom_dataset(root / "syn", 7, seed=2, size=24, copy_from=real)
    return {"root": root, "real": real, "syn": syn}


def test_evaluate_writes_reports_and_finds_the_planted_copy(folders: dict[str, Path]) -> None:
    out = folders["root"] / "report"
    cache = folders["root"] / "cache"
    config = EvaluationConfig(real=folders["real"], synthetic=folders["syn"], out=out, protocol=PROTOCOL,
                              settings=FAST, cache_dir=cache, command="pytest")
    report = evaluate(config)
    saved = json.loads((out / "report.json").read_text())
    rep = saved["reproducibility"]
    assert rep["real"]["n"] == 10 and rep["synthetic"]["n"] == 8 and "copy_0000" in rep["synthetic"]["case_ids"]
    assert rep["sqrt_method"].startswith("eigvalsh") and rep["library_versions"]["torch"]
    assert rep["extractors"][0]["name"] == "medsynth_random2d" and rep["protocol"]["center_ratio"] == 0.4
    fid = saved["features"]["medsynth_random2d"]["fid"]
    assert set(fid) == {"xy", "yz", "zx", "mean"} and fid["mean"]["bootstrap_unit"] == "volume"
    assert fid["mean"]["value"] == pytest.approx(np.mean([fid[p]["value"] for p in ("xy", "yz", "zx")]))
    assert "real_vs_real" in saved["features"]["medsynth_random3d"]["floor"]
    mem = saved["memorisation"]
    assert any(p["synthetic"] == "copy_0000" and p["train"] == "s1_000" for p in mem["confirmed_copies"])
    assert mem["n_held_out"] == 3 and mem["n_train"] == 7
    assert saved["quality"]["pass_rate"] is not None and "body" in saved["intensity"]["classes"]
    assert "liver" in saved["mask_fidelity"]["synthetic"] and saved["mask_fidelity"]["real_ceiling"]
    assert saved["reconstruction"]["skipped"]
    for name in ("gallery", "histograms", "fid_intervals", "nn_pairs"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "figures/gallery.png" in html and "medsynth_random3d" in (out / "report.md").read_text()
    # The cache is content-addressed: the planted copy has the same bytes as real s1_000.
    assert rep["cache_hits"] == {"real": 0, "synthetic": 1}
    # A second run against the same real set reads every feature from the cache, same numbers.
    again = evaluate(EvaluationConfig(real=folders["real"], synthetic=folders["syn"], out=folders["root"] / "r2",
                                      protocol=PROTOCOL, settings=FAST, cache_dir=cache))
    assert again["reproducibility"]["cache_hits"] == {"real": 10, "synthetic": 8}
    assert again["features"]["medsynth_random2d"]["fid"]["mean"] == report["features"]["medsynth_random2d"]["fid"]["mean"]


def test_bad_inputs_are_refused_or_skipped_with_the_minimum(folders: dict[str, Path], tmp_path: Path) -> None:
    def run(real: Path, syn: Path, **kw: object) -> dict:
        return evaluate(EvaluationConfig(real=real, synthetic=syn, out=tmp_path / "o", protocol=PROTOCOL,
                                         settings=FAST, **kw))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no dataset.json"):
        run(empty, folders["syn"])
    mr = write_phantom_dataset(tmp_path / "mr", 2, seed=3, size=16, modality="mr")
    with pytest.raises(ConfigError, match="modalities differ: real .* is CT, synthetic .* is MR"):
        run(folders["real"], mr)
    with pytest.raises(InputError, match="wrong weight file|not found"):
        run(folders["real"], folders["syn"], features=[f"medicalnet_resnet10={tmp_path / 'missing.pth'}"])


@pytest.mark.slow
def test_too_few_volumes_skip_the_metric_and_name_the_minimum(folders: dict[str, Path], tmp_path: Path) -> None:
    few = write_phantom_dataset(tmp_path / "few", 3, seed=4, size=20)  # other size: resampled onto the grid
    report = evaluate(EvaluationConfig(real=folders["real"], synthetic=few, out=tmp_path / "o", protocol=PROTOCOL,
                                       settings=FAST))
    three_d = report["features"]["medsynth_random3d"]
    assert three_d["fid"] == {"skipped": "fid_3d needs >= 4 volumes per set; got real 10, synthetic 3"}
    assert "prdc needs >= 6 volumes" in report["sample_metrics"]["skipped"]
    assert "bootstrap needs >= 4" in report["features"]["medsynth_random2d"]["fid"]["mean"]["skipped"]


@pytest.mark.slow
def test_cli_parses_and_runs(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medsynth.cli import evaluate as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--real", str(folders["real"]), "--synthetic", str(folders["syn"]),
                              "--out", str(tmp_path / "cli"), "--spacing", "16", "--size", "24x24x24",
                              "--bootstrap", "10", "--kid-subsets", "5", "--no-cache"])
    assert args.size == (24, 24, 24) and args.spacing == (16.0, 16.0, 16.0)
    assert args.func(args) == 0
    assert "medsynth_random2d: FID" in capsys.readouterr().out
    assert (tmp_path / "cli" / "report.html").is_file()
