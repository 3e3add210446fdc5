"""Downstream segmentation benchmark: protocol guards, metrics, statistics and the CLI (tiny)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from medsynth.cli import main
from medsynth.data.manifest import read_json_object
from medsynth.data.phantom_dataset import write_phantom_dataset
from medsynth.errors import ConfigError
from medsynth.evaluation.segmentation import (MEAN_CLASS, case_metrics, lesion_sensitivity, paired_comparison,
                                              plan_conditions, synthetic_counts)
from medsynth.training.segmentation import SegmenterConfig

LABELS = {"background": 0, "organ": 1, "liver_lesion": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segbench")
    write_phantom_dataset(root / "real", modality="ct", num=10, size=16, seed=1, progress=False)
    write_phantom_dataset(root / "synthetic", modality="ct", num=8, size=16, seed=2, lesion_rate=0.5, progress=False)
    return {"root": root, "real": root / "real", "synthetic": root / "synthetic"}


@pytest.fixture(scope="module")
def report(folders: dict[str, Path]) -> dict:
    out = folders["root"] / "report"
    code = main(["benchmark", "seg", "--real", str(folders["real"]), "--synthetic", str(folders["synthetic"]),
                 "--out", str(out), "--steps", "3", "--seeds", "0", "--patch", "16", "--bootstrap", "50",
                 "--accelerator", "cpu", "--devices", "1", "--no-progress", "--lr-schedule", "poly",
                 "--augmentation", "standard"])
    assert code == 0
    for name in ("report.json", "report.md", "report.html", "figures/dice_per_class.png", "figures/gain_vs_ratio.png"):
        assert (out / name).is_file(), name
    return json.loads((out / "report.json").read_text())


def test_cli_writes_every_condition(report: dict) -> None:
    # the training options reach every condition's segmenter and are recorded with the report
    assert report["settings"]["segmenter"]["lr_schedule"] == "poly"
    assert report["settings"]["segmenter"]["augmentation"] == "standard"
    assert list(report["conditions"]) == ["real", "real+synthetic@0.5", "real+synthetic@1", "real+synthetic@1.5",
                                          "synthetic"]
    for name, cond in report["conditions"].items():
        assert "dice" in cond["summary"][MEAN_CLASS], name
        if name != "real":
            assert "abs_gain" in cond["vs_real"][MEAN_CLASS]
            assert "skipped" in cond["vs_real"][MEAN_CLASS]["wilcoxon"]  # 2 test cases < 6


def test_test_split_never_trained_on(report: dict, folders: dict[str, Path]) -> None:
    splits = read_json_object(folders["real"] / "splits.json")
    test = set(splits["test"])
    assert test and set(report["splits"]["test"]) == test
    for cond in report["conditions"].values():
        assert not test & set(cond["training_cases"]["real"])
        assert set(cond["training_cases"]["real"]) <= set(splits["train"])


def test_mixing_counts(report: dict) -> None:
    n_train = len(report["splits"]["train"])
    counts = {name: cond["n_synthetic"] for name, cond in report["conditions"].items()}
    assert counts["real"] == 0 and counts["synthetic"] == 8
    for ratio in (0.5, 1, 1.5):
        assert counts[f"real+synthetic@{ratio:g}"] == min(8, round(ratio * n_train))
    assert any("only 8 exist" in w for w in report["warnings"]) == (round(1.5 * n_train) > 8)


def test_synthetic_counts_and_nesting() -> None:
    counts, warns = synthetic_counts(10, 12, [0.5, 1, 1.5])
    assert counts == [(0.5, 5), (1.0, 10), (1.5, 12)] and len(warns) == 1 and "15" in warns[0]
    plan, _ = plan_conditions([f"r{i}" for i in range(4)], [f"s{i}" for i in range(6)], [0.5, 1])
    assert set(plan["real+synthetic@0.5"]["synthetic"]) < set(plan["real+synthetic@1"]["synthetic"])
    with pytest.raises(ConfigError, match="ratios"):
        synthetic_counts(4, 4, [0])


def _pair() -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((16, 16, 16), np.int64)
    target[2:10, 2:10, 2:10] = 1
    target[12:14, 12:14, 12:14] = 2
    pred = np.zeros_like(target)
    pred[3:11, 2:10, 2:9] = 1
    pred[12:13, 12:14, 12:14] = 2
    return pred, target


def _one_hot(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([label == v for v in range(3)])[None].astype(np.float32))


def test_metrics_match_monai() -> None:
    pred, target = _pair()
    spacing = (1.0, 1.0, 2.0)
    scores = case_metrics(pred, target, LABELS, spacing, lesions=["liver_lesion"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=False, reduction="none")(_one_hot(pred), _one_hot(target))[0]
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            _one_hot(pred), _one_hot(target), spacing=list(spacing))[0]
    for i, name in enumerate(("organ", "liver_lesion")):
        assert scores[name]["dice"] == pytest.approx(float(dice[i]))
        assert scores[name]["hd95_mm"] == pytest.approx(float(hd[i]))
    assert scores[MEAN_CLASS]["dice"] == pytest.approx(float(dice.mean()))
    perfect = case_metrics(target, target, LABELS, spacing, lesions=["liver_lesion"])
    assert all(perfect[n]["dice"] == pytest.approx(1.0) for n in ("organ", "liver_lesion", MEAN_CLASS))
    assert perfect["liver_lesion"]["lesion_sensitivity"] == 1.0


def test_lesion_components_counted() -> None:
    target = np.zeros((20, 20, 20), np.int64)
    target[1:4, 1:4, 1:4] = 2          # lesion A: hit by one voxel
    target[10:16, 10:16, 10:16] = 2    # lesion B: large, hit by one voxel
    target[17:19, 1:3, 1:3] = 2        # lesion C: missed
    target[5, 5, 5] = 2                # lesion D: touches A? no, (4,4,4)-(5,5,5) gap: separate
    pred = np.zeros_like(target)
    pred[2, 2, 2] = 2
    pred[12, 12, 12] = 2
    pred[5, 5, 5] = 2
    result = lesion_sensitivity(pred, target, 2)
    assert result == {"detected": 3, "total": 4, "sensitivity": 0.75}
    # With Dice > 0.1: A (1/27 voxels) and B (1/216) are not detected, D (exact) is.
    assert lesion_sensitivity(pred, target, 2, criterion="dice")["detected"] == 1
    assert lesion_sensitivity(pred, np.zeros_like(target), 2)["sensitivity"] is None


def test_paired_statistics() -> None:
    rng = np.random.default_rng(0)
    base = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.5, 0.7, 12))}
    other = {k: v + 0.05 + 0.01 * rng.standard_normal() for k, v in base.items()}
    result = paired_comparison(base, other, replicates=200)
    gain = result["abs_gain"]
    assert gain["ci_low"] <= gain["value"] <= gain["ci_high"] and gain["ci_low"] > 0
    assert result["wilcoxon"]["p_value"] < 0.01 and result["rel_gain"] == pytest.approx(gain["value"] / result["base_mean"])
    assert "zero" in paired_comparison(base, base)["wilcoxon"]["skipped"]
    few = {k: base[k] for k in list(base)[:4]}
    assert "< 6" in paired_comparison(few, few)["wilcoxon"]["skipped"]


def test_bad_inputs_exit_2(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    def run(synthetic: Path) -> str:
        code = main(["benchmark", "seg", "--real", str(folders["real"]), "--synthetic", str(synthetic),
                     "--out", str(tmp_path / "out"), "--steps", "1", "--seeds", "0", "--patch", "16"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and not (tmp_path / "out").exists()
        return err

    placeholder = tmp_path / "placeholder"
    shutil.copytree(folders["synthetic"], placeholder)
    meta = json.loads((placeholder / "dataset.json").read_text())
    meta["medsynth"]["labels"] = "none"
    (placeholder / "dataset.json").write_text(json.dumps(meta))
    assert "placeholder labels" in run(placeholder)

    renamed = tmp_path / "renamed"
    shutil.copytree(folders["synthetic"], renamed)
    meta = json.loads((renamed / "dataset.json").read_text())
    meta["labels"] = {("hepar" if k == "liver" else k): v for k, v in meta["labels"].items()}
    (renamed / "dataset.json").write_text(json.dumps(meta))
    assert "'hepar'" in run(renamed)

    (tmp_path / "empty").mkdir()
    assert "dataset.json" in run(tmp_path / "empty")

    leaky = tmp_path / "leaky"
    shutil.copytree(folders["synthetic"], leaky)
    test_id = read_json_object(folders["real"] / "splits.json")["test"][0]
    (leaky / "provenance.jsonl").write_text(json.dumps({"case_id": "phantom_0000",
                                                        "mask_source": {"kind": "bank", "case_id": test_id}}) + "\n")
    assert "mask source" in run(leaky)


def test_config_errors_name_values() -> None:
    with pytest.raises(ConfigError, match="swinunetr needs --patch a multiple of 32 and >= 64, got 48"):
        SegmenterConfig(network="swinunetr", patch=48)
    with pytest.raises(ConfigError, match="'vnet'"):
        SegmenterConfig(network="vnet")
    with pytest.raises(ConfigError, match="between 0 and 1.*got 1.5"):
        SegmenterConfig(foreground_oversampling=1.5)


def test_foreground_oversampling_centres_patches_on_rare_classes() -> None:
    from medsynth.training.segmentation import PatchDataset, SegCase

    label = np.zeros((64, 64, 64), np.int64)
    label[10:50, 10:50, 10:50] = 1  # a large organ
    label[44:47, 44:47, 44:47] = 2  # a 27-voxel lesion: 0.01 % of the volume
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape)  # each value names its voxel
    cases = [SegCase("a", "real", image, label, (1.0, 1.0, 1.0)),
             SegCase("empty", "real", image, np.zeros_like(label), (1.0, 1.0, 1.0))]

    def lesion_share(oversampling: float) -> tuple[float, float]:
        data = PatchDataset(cases[:1], 16, 120, seed=3, foreground_oversampling=oversampling, num_classes=3)
        patches = [data[i] for i in range(len(data))]
        assert all(p["image"].shape == p["label"].shape == (1, 16, 16, 16) for p in patches)
        for p in patches:  # image and label are cropped at the same place
            x, y, z = np.unravel_index(int(p["image"][0, 0, 0, 0]), image.shape)
            assert np.array_equal(p["label"][0].numpy(), label[x:x + 16, y:y + 16, z:z + 16])
        return (float(np.mean([(p["label"] == 2).any() for p in patches])),
                float(np.mean([(p["label"] == 1).any() for p in patches])))

    uniform, centred = lesion_share(0.0), lesion_share(1.0)
    assert uniform[0] < 0.15  # few random 16^3 crops of 64^3 touch the lesion
    # classes drawn uniformly among those present: about half of the patches are on the lesion
    assert 0.35 < centred[0] < 0.75 and centred[1] == 1.0
    # a case with no foreground falls back to a random crop instead of failing
    empty = PatchDataset(cases[1:], 16, 4, seed=0, foreground_oversampling=1.0, num_classes=3)
    assert all(not empty[i]["label"].any() for i in range(4))
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        PatchDataset(cases, 16, 4, seed=0, foreground_oversampling=0.5)


def test_poly_schedule_decays_the_rate_to_zero_over_the_budget() -> None:
    from medsynth.training.segmentation import SegmentationModule, train_segmenter

    with pytest.raises(ConfigError, match=r"lr_schedule must be one of \['constant', 'poly'\]"):
        SegmenterConfig(lr_schedule="cosine")
    constant = SegmentationModule("segresnet", 3, 0.01).configure_optimizers()
    assert isinstance(constant, torch.optim.AdamW)
    poly = SegmentationModule("segresnet", 3, 0.01, "poly", 10).configure_optimizers()
    optimizer, decay = poly["optimizer"], poly["lr_scheduler"]["scheduler"]
    assert poly["lr_scheduler"]["interval"] == "step" and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    rates = []
    for _ in range(10):
        optimizer.step()
        decay.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[4] == pytest.approx(0.01 * 0.5 ** 0.9) and rates[-1] == 0.0
    assert all(a > b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ConfigError, match="total_steps"):
        SegmentationModule("segresnet", 3, 0.01, "poly").configure_optimizers()
    # a poly run trains for exactly its budget (train_segmenter refuses a shorter run) and records its schedule
    from medsynth.training.segmentation import SegCase

    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 16), np.int64)
    label[4:12, 4:12, 4:12] = 1
    cases = [SegCase("c0", "real", (label + 0.1 * rng.standard_normal(label.shape)).astype(np.float32), label,
                     (1.0, 1.0, 1.0))]
    config = SegmenterConfig(patch=16, steps=6, lr=0.01, accelerator="cpu", devices=1, lr_schedule="poly")
    module = train_segmenter(cases, 2, config, seed=0)
    assert module.hparams.lr_schedule == "poly" and module.hparams.total_steps == 6


def test_standard_augmentation_changes_patches_keeps_labels_and_crops() -> None:
    """Augmented patches differ from plain ones at the same crop, labels stay label values that
    still sit on the same structure, the stream is seeded, and a bad name is refused."""
    from medsynth.training.segmentation import PatchDataset, SegCase, train_segmenter

    rng = np.random.default_rng(1)
    label = np.zeros((24, 24, 24), np.int64)
    label[6:18, 6:18, 6:18] = 1
    label[9:15, 9:15, 9:15] = 2
    image = (0.5 * label + 0.05 * rng.standard_normal(label.shape)).astype(np.float32)
    cases = [SegCase("c0", "real", image, label, (1.0, 1.0, 1.0))]
    plain = PatchDataset(cases, 16, 40, seed=3)
    augmented = PatchDataset(cases, 16, 40, seed=3, augmentation="standard")
    again = PatchDataset(cases, 16, 40, seed=3, augmentation="standard")
    changed_image = changed_label = 0
    for i in range(40):
        p, a, b = plain[i], augmented[i], again[i]
        assert a["image"].shape == a["label"].shape == (1, 16, 16, 16)
        assert a["label"].dtype == torch.int64 and set(a["label"].unique().tolist()) <= {0, 1, 2}
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])  # seeded
        changed_image += not torch.allclose(a["image"], p["image"])
        changed_label += not torch.equal(a["label"], p["label"])
        # the label follows the image: class-2 voxels stay the brightest on average
        if (a["label"] == 2).sum() > 10 and (a["label"] == 0).sum() > 10:
            assert a["image"][a["label"] == 2].mean() > a["image"][a["label"] == 0].mean() + 0.5
    assert changed_image >= 10 and changed_label >= 3  # intensity and spatial parts both act
    with pytest.raises(ConfigError, match=r"augmentation must be one of \['none', 'standard'\]"):
        SegmenterConfig(augmentation="heavy")
    with pytest.raises(ConfigError, match="augmentation must be one of"):
        PatchDataset(cases, 16, 4, seed=0, augmentation="flip")
    config = SegmenterConfig(patch=16, steps=4, lr=0.01, accelerator="cpu", devices=1, augmentation="standard")
    module = train_segmenter(cases, 3, config, seed=0)
    assert not module.training
