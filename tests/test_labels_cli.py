"""`medsynth labels fit` -> `assemble --label-generator` -> `generate --mask-source generator` (CLI), and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medsynth.cli import main
from medsynth.data.manifest import read_dataset
from medsynth.io import read_volume
from tests.pipelines.test_pipeline import build_components
from tests.test_cli import assert_user_error, run_cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "labels" / "tiny.yaml"
# Small enough to fit in seconds. The maps of so short a run are crude (body and background), so
# the lesion test hosts its lesion in the body; map quality is measured by
# scripts/bench_label_generator.py, not here. The volume calibration is off: on so crude a decoder it
# raises every organ it never decodes to the largest offset, which carves the body into pieces too
# small for the lesion (it is tested in tests/training/test_label_generator_training.py).
OVERRIDES = {
    "autoencoder": {"channels": [4, 8, 8], "latent_channels": 4, "num_groups": 4},
    "autoencoder_training": {"max_steps": 20, "batch_size": 1, "lr": 1.0e-2, "latent_noise": 0.05,
                             "calibrate_volumes": False},
    "dit": {"patch_size": [1, 1, 1], "hidden_size": 32, "depth": 1, "num_heads": 4, "text_dim": 16},
    "text_encoder": {"kind": "vocab", "dim": 16, "depth": 1, "num_heads": 4, "max_length": 16},
    "dit_training": {"max_steps": 20, "batch_size": 1, "lr": 3.0e-3, "ema_decay": 0.9},
}


# Small 3D convolutions run faster on one thread, and far faster on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from medsynth.pipelines.assemble import assemble_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lgcli")
    ae_dir, dit_dir, cache = build_components(root)
    cn = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "controlnet" / "tiny.yaml").read_text())
    cn["controlnet"].update(num_blocks=1, embed_channels=[4, 8])
    cn["training"].update(batch_size=2)
    (root / "cn.yaml").write_text(yaml.safe_dump(cn))
    assert main(["controlnet", "fit", "--dit", str(dit_dir), "--cache", str(cache), "--config", str(root / "cn.yaml"),
                 "--out", str(root / "cn"), "--max-steps", "1", "--accelerator", "cpu"]) == 0
    config = yaml.safe_load(CONFIG.read_text())
    for section, values in OVERRIDES.items():
        config[section] = values if section in ("dit", "text_encoder") else {**config[section], **values}
    (root / "labels.yaml").write_text(yaml.safe_dump(config))
    assert main(["labels", "fit", "--data", str(root / "data"), "--config", str(root / "labels.yaml"),
                 "--out", str(root / "lg"), "--accelerator", "cpu"]) == 0
    # The quality gate's trained segmenter is not what is tested here.
    assemble_pipeline(ae_dir, dit_dir, cache, root / "pipeline", controlnet_dir=root / "cn" / "export",
                      label_generator_dir=root / "lg" / "export", segmenter_steps=0)
    return {"root": root, "pipeline": root / "pipeline", "data": root / "data", "ae": ae_dir, "dit": dit_dir,
            "cache": cache, "cn": root / "cn" / "export", "lg": root / "lg" / "export"}


def _generate(p, out, *extra):
    return ["generate", "--pipeline", str(p["pipeline"]), "--prompt", "CT abdomen", "--num", "2", "--out", str(out),
            "--steps", "1", "--device", "cpu", "--no-progress", "--keep-failed", *extra]


def test_labels_fit_trains_on_the_train_split_and_assemble_copies_it_with_hashes(parts):
    summary = json.loads((parts["root"] / "lg" / "fit_summary.json").read_text())
    assert Path(summary["export"]) == parts["lg"]
    config = json.loads((parts["lg"] / "config.json").read_text())
    data = read_dataset(parts["data"])
    assert config["config"]["statistics"]["case_ids"] == sorted(data.splits["train"])
    record = json.loads((parts["pipeline"] / "pipeline.json").read_text())
    comp = record["components"]["label_generator"]
    from medsynth.io.checkpoint import file_sha256

    assert comp["labels"] == data.labels
    for name, digest in comp["files"].items():
        assert file_sha256(parts["pipeline"] / comp["path"] / name) == digest


def test_generate_from_generated_masks_with_lesions(parts, tmp_path, capsys):
    out = tmp_path / "synth"
    code, _, err = run_cli(capsys, *_generate(parts, out, "--mask-source", "generator",
                                              "--label-attribute", "liver=0.7", "--lesion-count", "0",
                                              "--lesion", "liver_lesion:1:50-60mm:body"))
    assert code == 0, err
    dataset = read_dataset(out)
    labels = dataset.labels
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert len(dataset.cases) == 2 and len(provenance) == 2
    for case, prov in zip(dataset.cases, provenance):
        label, image = read_volume(case.label, kind="label"), read_volume(case.image)
        assert label.shape == image.shape == (16, 16, 16)
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-6)
        assert set(np.unique(label.array).tolist()) <= set(labels.values())
        assert prov["mask"]["kind"] == "generator" and prov["mask"]["prompt"] == "CT abdomen"
        assert prov["mask"]["attributes"] == {"volume:liver": 0.7, "lesions:liver_lesion": 0.0}
        assert prov["mask"]["sha256"] == json.loads((parts["lg"] / "config.json").read_text())["weights_sha256"]
        assert len(prov["lesions"]) == 1 and prov["lesions"][0]["host"] == "body"
        assert int((label.array == labels["liver_lesion"]).sum()) == prov["lesions"][0]["voxels"]
    block = json.loads((out / "dataset.json").read_text())["medsynth"]["generation"]["masks"]
    assert block["source"] == "generator" and block["generator_request"]["volume_quantiles"] == {"liver": 0.7}
    # The two cases got different masks (new maps, not one map copied).
    first, second = (read_volume(c.label, kind="label").array for c in dataset.cases)
    assert not np.array_equal(first, second)


def test_generate_holds_each_prompts_finding_and_records_it(parts, tmp_path, capsys):
    out = tmp_path / "synth"
    code, _, err = run_cli(capsys, *_generate(parts, out, "--mask-source", "generator", "--hold-findings",
                                              "--prompt", "CT abdomen, no lesion", "--prompt",
                                              "CT abdomen, liver lesion 60 mm", "--num", "3"))
    assert code == 0, err
    dataset = read_dataset(out)
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [p["mask"]["prompt"] for p in provenance] == ["CT abdomen", "CT abdomen, no lesion",
                                                         "CT abdomen, liver lesion 60 mm"]
    assert "held" not in provenance[0]["mask"]  # nothing stated, nothing held
    lesion = dataset.labels["liver_lesion"]
    assert provenance[1]["mask"]["held"]["met"] and provenance[1]["mask"]["held"]["lesion_counts"]["asked"] == {
        "liver_lesion": 0}
    assert not (read_volume(dataset.cases[1].label, kind="label").array == lesion).any()
    # the tiny model draws no lesion of 60 mm: one is inserted at that size, and the record says so
    held = provenance[2]["mask"]["held"]
    assert held["met"] and held["lesion_diameters"]["asked"] == {"liver_lesion": [48.0, 75.0]}
    assert held["lesion_diameters"]["inserted"] == {"liver_lesion": 1}
    from medsynth.data.phantom_shapes import Grid, equivalent_diameter

    label = read_volume(dataset.cases[2].label, kind="label")
    assert 48.0 <= equivalent_diameter(int((label.array == lesion).sum()), Grid(label.shape, label.spacing)) <= 75.0
    block = json.loads((out / "dataset.json").read_text())["medsynth"]["generation"]["masks"]
    assert block["generator_request"]["hold_findings"] is True


@pytest.mark.parametrize("extra, fragment", [
    (["--mask-source", "generator", "--label-attribute", "lung=0.5"], "unknown label 'lung'"),
    (["--mask-source", "generator", "--label-attribute", "liver=2"], "must lie in [0, 1]"),
    (["--mask-source", "generator", "--lesion-count", "4"], "outside what the model saw in training (0..0)"),
    (["--mask-source", "generator", "--label-attribute", "liver"], "expects CLASS=VALUE"),
    (["--label-attribute", "liver=0.5"], "add --mask-source generator"),
    (["--hold-findings"], "add --mask-source generator"),
    (["--mask-source", "generator", "--bank", "nowhere"], "cannot be combined with --mask-source generator"),
])
def test_generate_refusals_are_one_line_errors(parts, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *_generate(parts, out, *extra))
    assert_user_error(code, err, fragment)
    assert not out.exists()


def test_labels_fit_and_assemble_refusals(parts, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("latent_channels: 4", "latent_chanels: 4"))
    cases = [
        (["labels", "fit", "--data", str(parts["data"]), "--config", str(bad), "--out", str(tmp_path / "o1")],
         "unknown key(s) ['latent_chanels']"),
        (["labels", "fit", "--data", str(tmp_path / "none"), "--config", str(CONFIG), "--out", str(tmp_path / "o2")],
         "does not exist"),
        (["labels", "fit", "--data", str(parts["data"]), "--config", str(CONFIG), "--out", str(tmp_path / "o3"),
          "--max-steps", "0"], "--max-steps must be >= 1"),
        (["assemble", "--autoencoder", str(parts["ae"]), "--dit", str(parts["dit"]), "--cache", str(parts["cache"]),
          "--label-generator", str(parts["lg"]), "--out", str(tmp_path / "o4")], "needs --controlnet"),
        (["assemble", "--autoencoder", str(parts["ae"]), "--dit", str(parts["dit"]), "--cache", str(parts["cache"]),
          "--controlnet", str(parts["cn"]), "--label-generator", str(parts["cn"]), "--out", str(tmp_path / "o5")],
         "'controlnet' model, but a 'label_generator' model is needed"),
    ]
    for argv, fragment in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_user_error(code, err, fragment)
        assert not Path(argv[argv.index("--out") + 1]).exists()


@pytest.fixture()
def step_counts(monkeypatch) -> dict[str, list[int]]:
    """The global step at each training step of the two labels-fit stages."""
    from medsynth.training.dit import DiTModule
    from medsynth.training.label_generator import LabelAutoencoderModule

    counts: dict[str, list[int]] = {"autoencoder": [], "dit": []}
    for stage, cls in (("autoencoder", LabelAutoencoderModule), ("dit", DiTModule)):
        def counted(self, batch, batch_idx, _stage=stage, _original=cls.training_step):
            counts[_stage].append(self.global_step)
            return _original(self, batch, batch_idx)
        monkeypatch.setattr(cls, "training_step", counted)
    return counts


def _resume_config(parts, tmp_path, ae_steps: int, dit_steps: int) -> Path:
    config = yaml.safe_load((parts["root"] / "labels.yaml").read_text())
    config["autoencoder_training"]["max_steps"] = ae_steps
    config["dit_training"]["max_steps"] = dit_steps
    path = tmp_path / "labels.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stage, ae_steps, dit_steps, ran, trained", [
    # a DiT checkpoint carries the finished autoencoder: only the DiT continues (20 -> 22)
    ("dit", 22, 22, {"autoencoder": [], "dit": [20, 21]}, {"autoencoder": 20, "dit": 22}),
    # an autoencoder checkpoint continues the autoencoder (20 -> 22), then a new DiT trains
    ("autoencoder", 22, 2, {"autoencoder": [20, 21], "dit": [0, 1]}, {"autoencoder": 22, "dit": 2}),
])
def test_labels_fit_resumes_the_stage_of_its_checkpoint(parts, tmp_path, step_counts, stage, ae_steps, dit_steps,
                                                        ran, trained):
    last = parts["root"] / "lg" / "checkpoints" / stage / "last.ckpt"  # the fixture's 20-step stages
    out = tmp_path / "lg"
    assert main(["labels", "fit", "--data", str(parts["data"]), "--config",
                 str(_resume_config(parts, tmp_path, ae_steps, dit_steps)), "--out", str(out),
                 "--accelerator", "cpu", "--resume", str(last)]) == 0
    assert step_counts == ran
    assert json.loads((out / "export" / "config.json").read_text())["metadata"]["trained_steps"] == trained
    checkpoint = torch.load(out / "checkpoints" / "dit" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == trained["dit"]
    assert checkpoint["medsynth_label_generator"]["autoencoder_steps"] == trained["autoencoder"]


def test_labels_fit_refuses_a_checkpoint_of_another_command(parts, tmp_path, capsys):
    out = tmp_path / "lg"
    code, _, err = run_cli(capsys, "labels", "fit", "--data", str(parts["data"]), "--config",
                           str(parts["root"] / "labels.yaml"), "--out", str(out), "--accelerator", "cpu",
                           "--resume", str(parts["root"] / "cn" / "checkpoints" / "last.ckpt"))
    assert_user_error(code, err, "is not a `labels fit` checkpoint")
    assert not out.exists()


def test_labels_fit_refuses_a_file_that_is_not_a_checkpoint(parts, tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a pickle")
    out = tmp_path / "lg"
    code, _, err = run_cli(capsys, "labels", "fit", "--data", str(parts["data"]), "--config",
                           str(parts["root"] / "labels.yaml"), "--out", str(out), "--accelerator", "cpu",
                           "--resume", str(junk))
    assert_user_error(code, err, "is not a readable Lightning checkpoint")
    assert not out.exists()
