"""`medsynth controlnet fit` -> `labels bank` -> `assemble --controlnet --bank` -> `generate --mask/--lesion` (CLI)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsynth.cli import main
from medsynth.data.manifest import read_dataset
from medsynth.io import read_volume, write_volume
from tests.pipelines.test_pipeline import build_components
from tests.test_cli import assert_user_error, run_cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "controlnet" / "tiny.yaml"


@pytest.fixture(scope="module")
def cli_parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cncli")
    ae_dir, dit_dir, cache = build_components(root)
    config = yaml.safe_load(CONFIG.read_text())
    config["controlnet"].update(num_blocks=1, embed_channels=[4, 8])
    config["training"].update(batch_size=2)
    (root / "cn.yaml").write_text(yaml.safe_dump(config))
    assert main(["controlnet", "fit", "--dit", str(dit_dir), "--cache", str(cache), "--config", str(root / "cn.yaml"),
                 "--out", str(root / "cn"), "--max-steps", "1", "--accelerator", "cpu"]) == 0
    assert main(["labels", "bank", "--data", str(root / "data"), "--out", str(root / "bank")]) == 0
    assert main(["assemble", "--autoencoder", str(ae_dir), "--dit", str(dit_dir), "--cache", str(cache),
                 "--controlnet", str(root / "cn" / "export"), "--bank", str(root / "bank"),
                 "--segmenter-steps", "3", "--out", str(root / "pipeline")]) == 0
    assert main(["assemble", "--autoencoder", str(ae_dir), "--dit", str(dit_dir), "--cache", str(cache),
                 "--out", str(root / "plain")]) == 0
    mask = read_volume(read_dataset(root / "data").cases_for("train")[0].label, kind="label")
    write_volume(mask, root / "mask.nii.gz")
    return {"root": root, "pipeline": root / "pipeline", "plain": root / "plain", "mask": root / "mask.nii.gz",
            "data": root / "data", "dit": dit_dir, "cache": cache}


def _generate(p, out, *extra):
    return ["generate", "--pipeline", str(p["pipeline"]), "--prompt", "CT abdomen", "--num", "1", "--out", str(out),
            "--steps", "1", "--device", "cpu", "--no-progress", *extra]


def test_generate_with_mask_writes_the_mask_as_label_and_dicom_seg(cli_parts, tmp_path, capsys):
    out = tmp_path / "synth"
    code, stdout, err = run_cli(capsys, *_generate(cli_parts, out, "--mask", str(cli_parts["mask"]),
                                                   "--format", "both", "--keep-failed"))
    assert code == 0, err
    dataset = read_dataset(out)
    label = read_volume(dataset.cases[0].label, kind="label")
    mask = read_volume(cli_parts["mask"], kind="label")
    # Default grid = the training grid centred on the mask: here exactly the mask's own grid.
    np.testing.assert_array_equal(label.array, mask.array)
    np.testing.assert_allclose(label.affine, read_volume(dataset.cases[0].image).affine, atol=1e-6)
    assert (out / "dicom" / "synth_0000_seg.dcm").is_file() and (out / "dicom" / "synth_0000").is_dir()
    prov = json.loads((out / "provenance.jsonl").read_text().splitlines()[0])
    assert prov["mask"]["kind"] == "user" and "quality" in prov and "flagged" in prov


def test_labels_bank_refuses_test_split(cli_parts, tmp_path, capsys):
    code, _, err = run_cli(capsys, "labels", "bank", "--data", str(cli_parts["data"]), "--out", str(tmp_path / "b"),
                           "--splits", "train", "test")
    assert_user_error(code, err, "held-out test split")
    assert not (tmp_path / "b").exists()
    bank = json.loads((cli_parts["root"] / "bank" / "bank.json").read_text())
    test_ids = set(read_dataset(cli_parts["data"]).splits["test"])
    assert bank["splits"] == ["train"] and not set(bank["case_ids"]) & test_ids


def test_generate_bad_mask_inputs_are_one_line_errors(cli_parts, tmp_path, capsys):
    mask = read_volume(cli_parts["mask"], kind="label")
    unknown = write_volume(mask.with_array(np.where(mask.array > 0, 77, 0).astype(np.uint8), kind="label"),
                           tmp_path / "unknown.nii.gz")
    empty = write_volume(mask.with_array(np.zeros(mask.shape, np.uint8), kind="label"), tmp_path / "empty.nii.gz")
    cases = [
        (["--mask", str(unknown)], "do(es)? not know|not labels of this model|77"),
        (["--mask", str(empty)], "empty"),
        (["--mask-source", "generator"], "needs a label generator in the pipeline"),
        (["--mask", str(cli_parts["mask"]), "--lesion", "liver_lesion:3:150-200mm:liver"], "does not fit"),
        (["--lesion", "liver_lesion:nope"], "cannot parse lesion request"),
        (["--mask", str(cli_parts["mask"]), "--size", "4", "4", "4"], "lies inside the generation grid"),
    ]
    for i, (extra, pattern) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, _, err = run_cli(capsys, *_generate(cli_parts, out, *extra))
        assert_user_error(code, err)
        assert re.search(pattern, err), err
        assert not out.exists()
    plain = {**cli_parts, "pipeline": cli_parts["plain"]}
    code, _, err = run_cli(capsys, *_generate(plain, tmp_path / "p", "--mask", str(cli_parts["mask"])))
    assert_user_error(code, err, "no ControlNet")
    assert not (tmp_path / "p").exists()


def test_controlnet_fit_resumes_from_its_last_checkpoint(cli_parts, tmp_path, monkeypatch):
    import torch

    from medsynth.training.controlnet import ControlNetModule

    steps = []
    original = ControlNetModule.training_step

    def counted(self, batch, batch_idx):
        steps.append(self.global_step)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ControlNetModule, "training_step", counted)
    last = cli_parts["root"] / "cn" / "checkpoints" / "last.ckpt"  # the fixture's one-step run
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1
    out = tmp_path / "cn"
    assert main(["controlnet", "fit", "--dit", str(cli_parts["dit"]), "--cache", str(cli_parts["cache"]),
                 "--config", str(cli_parts["root"] / "cn.yaml"), "--out", str(out), "--max-steps", "3",
                 "--accelerator", "cpu", "--resume", str(last)]) == 0
    # Steps 1 and 2 ran (step 0 came from the checkpoint), and the run ends at step 3.
    assert steps == [1, 2]
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    assert json.loads((out / "export" / "config.json").read_text())["metadata"]["trained_steps"] == 3
