"""The quality gate's agreement segmenter: a SegResNet trained on real training cases at assemble time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsynth.data.transforms import IntensityMapping
from medsynth.errors import ConfigError
from medsynth.pipelines.assemble import assemble_pipeline
from medsynth.pipelines.pipeline import PIPELINE_FILE, QUALITY_FILE, MedSynthPipeline
from medsynth.pipelines.quality_gate import QualityGate
from medsynth.training.segmentation import (TrainedSegmenter, fit_agreement_segmenter, load_agreement_segmenter,
                                            save_agreement_segmenter)
from tests.pipelines.test_masked_generation import build_controlnet
from tests.pipelines.test_pipeline import build_components


def _phantom_pairs(num: int = 4, size: int = 16) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    from medsynth.data.phantoms import generate_phantom, phantom_labels

    window = IntensityMapping.ct_window()
    pairs, labels = [], phantom_labels("ct")
    for seed in range(num):
        case = generate_phantom("ct", size=size, seed=seed)
        pairs.append((np.asarray(window.forward(case.image.array), np.float32), np.asarray(case.label.array, np.int64)))
    return pairs, labels


def test_segmenter_learns_large_organs_and_round_trips(tmp_path) -> None:
    pairs, labels = _phantom_pairs(num=1)  # one case to overfit: a learning test, not a benchmark
    window = IntensityMapping.ct_window()
    untrained = fit_agreement_segmenter(pairs, labels, window, steps=1, patch=16, seed=0, accelerator="cpu")
    segmenter = fit_agreement_segmenter(pairs, labels, window, steps=50, patch=16, seed=0, accelerator="cpu")
    image_hu = np.asarray(window.inverse(pairs[0][0]), np.float32)  # the gate sees output units (HU)
    prediction = segmenter.predict(image_hu)
    assert prediction.shape == pairs[0][1].shape
    assert set(np.unique(prediction)) <= set(labels.values())

    def background_dice(labels_predicted: np.ndarray) -> float:
        truth, found = pairs[0][1] == 0, labels_predicted == 0
        return float(2 * (truth & found).sum() / max(1, truth.sum() + found.sum()))

    trained_dice, untrained_dice = background_dice(prediction), background_dice(untrained.predict(image_hu))
    assert trained_dice > 0.8 and trained_dice > untrained_dice + 0.2, (trained_dice, untrained_dice)

    save_agreement_segmenter(tmp_path / "seg", segmenter)
    loaded = load_agreement_segmenter(tmp_path / "seg")
    assert isinstance(loaded, TrainedSegmenter) and loaded.labels == labels and loaded.steps == 50
    np.testing.assert_array_equal(loaded.predict(image_hu), prediction)


def test_fit_refuses_no_cases() -> None:
    with pytest.raises(ConfigError, match="labelled real training cases"):
        fit_agreement_segmenter([], {"background": 0}, IntensityMapping.ct_window(), steps=1)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    ae_dir, dit_dir, cache = build_components(root)
    cn_dir = build_controlnet(root, ae_dir, dit_dir, cache)
    return assemble_pipeline(ae_dir, dit_dir, cache, root / "pipeline", controlnet_dir=cn_dir, segmenter_steps=5,
                             segmenter_lr_schedule="poly", segmenter_augmentation="standard")


def test_assemble_stores_the_trained_segmenter_and_the_gate_uses_it(pipeline_dir) -> None:
    record = json.loads((pipeline_dir / PIPELINE_FILE).read_text())
    assert record["components"]["segmenter"]["steps"] == 5
    quality = json.loads((pipeline_dir / QUALITY_FILE).read_text())
    assert quality["segmenter"]["kind"] == "segresnet" and quality["segmenter"]["path"] == "segmenter"
    assert quality["baseline_segmenter"]["kind"] == "threshold"  # kept for comparison
    # how it was trained is recorded with it
    assert quality["segmenter"]["lr_schedule"] == "poly" and quality["segmenter"]["augmentation"] == "standard"
    pipe = MedSynthPipeline.from_pretrained(pipeline_dir)
    gate = QualityGate.from_record(pipe.quality, pipe.labels)
    assert isinstance(gate.segmenter, TrainedSegmenter)
    # the stored segmenter, scored on real cases at assemble time; the gate carries those scores
    calibration = quality["calibration"]
    assert calibration["num_cases"] >= 1 and calibration["splits"] in (["val"], ["train"])
    assert calibration["dice"] and all(0.0 <= v <= 1.0 for v in calibration["dice"].values())
    assert gate.calibration == calibration["dice"]
    # The pipeline folder is self-contained: moved elsewhere, it still finds its segmenter.
    moved = pipeline_dir.parent / "moved"
    pipeline_dir.rename(moved)
    try:
        gate = QualityGate.from_record(MedSynthPipeline.from_pretrained(moved).quality, pipe.labels)
        assert isinstance(gate.segmenter, TrainedSegmenter)
    finally:
        moved.rename(pipeline_dir)


def test_a_tampered_segmenter_is_refused(pipeline_dir, tmp_path) -> None:
    import shutil

    from medsynth.errors import InputError

    copy = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, copy)
    with open(copy / "segmenter" / "model.safetensors", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(InputError):
        MedSynthPipeline.from_pretrained(copy)


def test_negative_segmenter_steps_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--segmenter-steps"):
        assemble_pipeline(tmp_path, tmp_path, tmp_path, tmp_path / "out", segmenter_steps=-1)
    with pytest.raises(ConfigError, match=r"--segmenter-lr-schedule must be one of \['constant', 'poly'\]"):
        assemble_pipeline(tmp_path, tmp_path, tmp_path, tmp_path / "out", segmenter_lr_schedule="cosine")
    with pytest.raises(ConfigError, match=r"--segmenter-augmentation must be one of \['none', 'standard'\]"):
        assemble_pipeline(tmp_path, tmp_path, tmp_path, tmp_path / "out", segmenter_augmentation="mirror")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_evaluate_scores_mask_fidelity_with_the_trained_segmenter(pipeline_dir, tmp_path, capsys) -> None:
    import shutil

    from medsynth.cli import main
    from medsynth.cli.evaluate import load_segmenter

    assert isinstance(load_segmenter(pipeline_dir), TrainedSegmenter)
    assert isinstance(load_segmenter(pipeline_dir / "segmenter"), TrainedSegmenter)
    data = pipeline_dir.parent / "data"
    shutil.copytree(data, tmp_path / "synthetic")
    code = main(["evaluate", "--real", str(data), "--synthetic", str(tmp_path / "synthetic"), "--out",
                 str(tmp_path / "report"), "--size", "16", "--spacing", "24", "--bootstrap", "10", "--no-cache",
                 "--segmenter", str(pipeline_dir)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["mask_fidelity"]["segmenter"] == TrainedSegmenter.name

    plain = tmp_path / "plain"
    plain.mkdir()
    record = json.loads((pipeline_dir / PIPELINE_FILE).read_text())
    del record["components"]["segmenter"]
    (plain / PIPELINE_FILE).write_text(json.dumps(record))
    assert main(["evaluate", "--real", str(data), "--synthetic", str(tmp_path / "synthetic"), "--out",
                 str(tmp_path / "r2"), "--segmenter", str(plain)]) == 2
    assert "no trained segmenter" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()

    tampered = tmp_path / "tampered"
    shutil.copytree(pipeline_dir, tampered)
    with open(tampered / "segmenter" / "model.safetensors", "ab") as fh:
        fh.write(b"x")
    assert main(["evaluate", "--real", str(data), "--synthetic", str(tmp_path / "synthetic"), "--out",
                 str(tmp_path / "r3"), "--segmenter", str(tampered)]) == 2
    assert "does not match the sha256" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_evaluate_hands_real_mr_cases_to_a_trained_segmenter_as_it_was_trained(tmp_path) -> None:
    """MR cases are normalised per case for training, while a pipeline segmenter's predict applies
    one fixed window: the real-image ceiling must undo the first and let the second redo it."""
    from types import SimpleNamespace

    from medsynth.data.manifest import read_dataset
    from medsynth.data.patches import load_case
    from medsynth.data.phantom_dataset import write_phantom_dataset
    from medsynth.data.phantoms import phantom_labels
    from medsynth.evaluation.evaluate import _mask_fidelity

    real = read_dataset(write_phantom_dataset(tmp_path / "mr", modality="mr", num=4, size=16, progress=False).root)
    fixed = IntensityMapping(kind="mr_percentiles", low=0.0, high=900.0)
    received: dict[str, np.ndarray] = {}

    class Recorder:
        name, intensity = "recorder", fixed

        def predict(self, image: np.ndarray) -> np.ndarray:
            received[len(received)] = fixed.forward(image)
            return np.zeros(image.shape, np.int64)

    train = [SimpleNamespace(case_id=real.cases[0].case_id)]
    config = SimpleNamespace(segmentations=None, settings=SimpleNamespace(seed=0))
    _mask_fidelity(real, real, train, phantom_labels("mr"), config, Recorder())
    held = [c for c in real.cases if c.case_id != train[0].case_id]
    ceiling_inputs = list(received.values())[-len(held):]  # synthetic cases first, then the real ceiling
    for case, seen in zip(held, ceiling_inputs):
        np.testing.assert_allclose(seen, load_case(real, case, with_label=False)[1], atol=1e-4)


class _Painter:
    """A stand-in segmenter that paints a fixed label map whatever the image."""

    def __init__(self, label: np.ndarray) -> None:
        self.label = label

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.label


def test_the_gate_leaves_out_classes_its_segmenter_cannot_find_on_real_images() -> None:
    """A class the segmenter misses on real images would fail every generated image: it is
    listed as ungated instead, while a class it finds is still checked."""
    from medsynth.io.volume import Volume
    from medsynth.pipelines.quality_gate import calibration_record

    labels = {"background": 0, "liver": 1, "spleen": 2}
    mask = np.zeros((16, 16, 16), np.int64)
    mask[2:9, 2:12, 2:12], mask[10:14, 4:10, 4:10] = 1, 2
    missed_spleen = np.where(mask == 2, 0, mask)  # liver right, spleen never found
    affine = np.eye(4)
    image, label = Volume(np.zeros(mask.shape, np.float32), affine), Volume(mask, affine)
    # calibration: the segmenter on "real" cases finds the liver and never the spleen
    calibration = calibration_record(_Painter(missed_spleen), [(image.array, mask)] * 2, labels, ["val"])
    assert calibration == {"splits": ["val"], "num_cases": 2, "dice": {"liver": 1.0, "spleen": 0.0}}
    gate = QualityGate(labels, segmenter=_Painter(missed_spleen), calibration=calibration["dice"])
    result = gate(image, label)
    assert result.passed and result.gated == ["liver"] and result.ungated == ["spleen"]
    assert result.dice == {"liver": 1.0, "spleen": 0.0}  # still scored and recorded
    # without calibration (older pipelines) every large class is gated, so the same image fails
    old = QualityGate(labels, segmenter=_Painter(missed_spleen))(image, label)
    assert not old.passed and old.failing == ["dice:spleen"] and old.ungated == []
    # a trusted class still fails the sample when the generated image disagrees
    wrong_liver = np.where(mask == 1, 0, mask)
    failing = QualityGate(labels, segmenter=_Painter(wrong_liver), calibration=calibration["dice"])(image, label)
    assert not failing.passed and failing.failing == ["dice:liver"]
    # the threshold for trust is the gate's own min_dice
    assert QualityGate(labels, min_dice=0.0, calibration=calibration["dice"]).trusted("spleen")
