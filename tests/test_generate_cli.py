"""`medsynth dit fit` -> `medsynth assemble` -> `medsynth generate` on 16^3 phantoms, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsynth.cli import main
from medsynth.data.manifest import read_dataset
from medsynth.io import read_volume
from tests.pipelines.test_pipeline import DIT, TEXT, build_components
from tests.test_cli import assert_user_error, run_cli

PROMPTS = ("CT abdomen, liver lesion", "CT abdomen, no lesion")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """Autoencoder + cache built in Python; the DiT trained (3 steps) and assembled through the CLI."""
    root = tmp_path_factory.mktemp("gen")
    ae_dir, _, cache = build_components(root)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": DIT, "text_encoder": TEXT, "objective": {"name": "rectified_flow"},
                                      "sampling": {"num_inference_steps": 2, "guidance_scale": 1.5},
                                      "training": {"batch_size": 2, "max_steps": 50}}))
    assert main(["dit", "fit", "--config", str(config), "--cache", str(cache), "--out", str(root / "run"),
                 "--max-steps", "3", "--accelerator", "cpu"]) == 0
    assert (root / "run" / "export" / "model.safetensors").is_file()
    assert (root / "run" / "checkpoints" / "last.ckpt").is_file()
    assert main(["assemble", "--autoencoder", str(ae_dir), "--dit", str(root / "run" / "export"),
                 "--cache", str(cache), "--out", str(root / "pipeline")]) == 0
    return root / "pipeline"


def test_generate_writes_resumable_synthetic_dataset(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["generate", "--pipeline", str(pipeline_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--num", "2", "--out", str(out), "--seed", "7", "--steps", "2", "--device", "cpu",
            "--format", "both", "--metadata", "age=63", "--no-progress"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    dataset = read_dataset(out)
    assert dataset.case_ids == ["synth_0000", "synth_0001"] and dataset.channel_names == {"0": "CT"}
    assert [c.prompt for c in dataset.cases] == list(PROMPTS)
    assert dataset.description["medsynth"]["synthetic"] is True and dataset.description["medsynth"]["labels"] == "none"
    ignore = dataset.labels["ignore"]
    assert ignore == max(v for k, v in dataset.labels.items() if k != "ignore") + 1
    assert np.all(read_volume(dataset.cases[0].label, kind="label").array == ignore)  # "not annotated"
    images = [read_volume(c.image) for c in dataset.cases]
    for vol in images:
        assert vol.metadata.synthetic and vol.shape == (16, 16, 16)
        assert vol.array.min() >= -1000 and vol.array.max() <= 1000  # stored in HU
    lines = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [p["case_id"] for p in lines] == ["synth_0000", "synth_0001"]
    for i, p in enumerate(lines):
        assert p["prompt"] == PROMPTS[i] and p["seed"] == 7 + i and p["num_inference_steps"] == 2
        assert p["guidance_scale"] == 1.5 and p["synthetic"] is True and p["metadata"]["age"] == 63
        assert len(p["pipeline_hash"]) == 64 and p["created"]
    dicom = sorted((out / "dicom" / "synth_0000").iterdir())
    assert dicom and read_volume(out / "dicom" / "synth_0000").shape[2] == 16

    # Rerun: nothing is rewritten.
    files = [p for p in out.rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # Resume after a "killed" run: case 1 is regenerated identically (same seed), case 0 untouched.
    image1 = dataset.cases[1].image
    image1.unlink()
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    np.testing.assert_array_equal(read_volume(image1).array, images[1].array)
    assert dataset.cases[0].image.stat().st_mtime_ns == mtimes[dataset.cases[0].image]

    # Other settings into the same folder are refused instead of mixing cohorts.
    code, _, err = run_cli(capsys, *[a if a != "7" else "8" for a in args])
    assert_user_error(code, err, "synth")


def test_generate_bad_input_is_one_line_error(pipeline_dir, tmp_path, capsys):
    base = ["generate", "--pipeline", str(pipeline_dir), "--prompt", "CT abdomen", "--num", "1",
            "--steps", "1", "--no-progress"]
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, *base, "--out", str(out), "--device", "cuda:7")
    assert_user_error(code, err, "cuda:7", "not available")
    assert not out.exists()
    code, _, err = run_cli(capsys, *base, "--out", str(out), "--metadata", "region=knee")
    assert_user_error(code, err, "knee", "valid regions")
    assert not out.exists()
    code, _, err = run_cli(capsys, *base[:4], " ", *base[5:], "--out", str(out))
    assert_user_error(code, err, "--prompt")
    code, _, err = run_cli(capsys, *base, "--out", str(out), "--negative-prompt", "no lesion", "--guidance", "1")
    assert_user_error(code, err, "negative_prompt", "guidance_scale is 1")
    assert not out.exists()
    code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "neg"), "--negative-prompt", "CT head",
                           "--guidance", "3", "--device", "cpu")
    assert code == 0, err
    assert '"negative_prompt": "CT head"' in (tmp_path / "neg" / "provenance.jsonl").read_text()
    code, _, err = run_cli(capsys, *base, "--out", str(out), "--size", "18", "16", "13", "--device", "cpu")
    assert code == 0, err  # not a multiple of 4: padded, generated, cropped back
    assert read_volume(read_dataset(out).cases[0].image).shape == (18, 16, 13)
    code, _, err = run_cli(capsys, "generate", "--pipeline", str(tmp_path / "nope"), "--prompt", "CT",
                           "--num", "1", "--out", str(tmp_path / "o2"))
    assert_user_error(code, err, "nope", "medsynth assemble")


def test_dit_configs_parse():
    from medsynth.cli.dit import load_dit_config

    for path in sorted(Path(__file__).parents[1].joinpath("configs", "dit").glob("*.yaml")):
        config = load_dit_config(path)
        assert {"model", "training"} <= set(config), path
