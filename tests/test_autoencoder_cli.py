"""`medsynth autoencoder fit|eval` and `medsynth encode` end to end on tiny CT phantoms."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from medsynth.cli import autoencoder as ae_cli
from medsynth.errors import ConfigError, InputError
from medsynth.io.checkpoint import load_autoencoder, load_tensors

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "autoencoder").glob("*.yaml"))

TINY = {
    "model": {"channels": [8, 16, 16], "norm_num_groups": 8, "latent_channels": 4, "num_embeddings": 64,
              "patch_size": [16, 16, 16]},
    "discriminator": {"channels": 8, "num_layers": 2},
    "training": {"max_steps": 4, "adversarial_start_step": 2, "val_every_n_steps": 2,
                 "figure_every_n_steps": 2, "checkpoint_every_n_steps": 2},
    "data": {"batch_size": 1, "patches_per_volume": 1},
}


def run(argv: list[str]) -> int:
    """The autoencoder commands alone (independent of the CLI's module list)."""
    parser = argparse.ArgumentParser()
    ae_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory) -> Path:
    from medsynth.data.phantom_dataset import write_phantom_dataset

    root = tmp_path_factory.mktemp("ct")
    write_phantom_dataset(root, modality="ct", num=5, size=24, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def fitted(ct_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = out / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert run(["autoencoder", "fit", "--config", str(cfg), "--data", str(ct_data), "--out", str(out / "fit"),
                "--no-progress"]) == 0
    return out / "fit"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_file_parses(path):
    cfg = ae_cli.load_run_config(path)
    assert cfg["model"].downsample_factor in (2, 4, 8)
    assert all(s % cfg["model"].downsample_factor == 0 for s in cfg["model"].patch_size)
    assert {p.stem for p in CONFIGS} >= {"tiny", "tiny_f2", "base", "large"}


def test_config_errors_name_the_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"channels": [30, 64], "norm_num_groups": 32}}))
    with pytest.raises(ConfigError, match="channels=\\(30, 64\\) and norm_num_groups=32"):
        ae_cli.load_run_config(bad)
    bad.write_text(yaml.safe_dump({"trainig": {}}))
    with pytest.raises(ConfigError, match="unknown section\\(s\\) \\['trainig'\\]"):
        ae_cli.load_run_config(bad)
    bad.write_text(yaml.safe_dump({"training": {"adversarial_criterion": "wgan"}}))
    with pytest.raises(ConfigError, match="adversarial_criterion='wgan'"):
        ae_cli.load_run_config(bad)
    bad.write_text(yaml.safe_dump({"training": {"perceptual_weight": 0.1}}))
    with pytest.raises(ConfigError, match="never downloads"):
        ae_cli.load_run_config(bad)


def test_fit_exports_checkpoints_figures_and_resumes(fitted, ct_data):
    assert (fitted / "model" / "config.json").is_file() and (fitted / "model" / "model.safetensors").is_file()
    assert (fitted / "checkpoints" / "last.ckpt").is_file()
    assert list((fitted / "figures").glob("*.png"))
    summary = json.loads((fitted / "fit_summary.json").read_text())
    assert summary["steps"] == 4 and "val/psnr" in summary["metrics"]
    model, export = load_autoencoder(fitted / "model")
    assert export.metadata["modality"] == "CT" and export.metadata["trained_steps"] == 4
    # resume: continues from step 4 to 6 instead of starting again
    assert run(["autoencoder", "fit", "--config", str(fitted.parent / "tiny.yaml"), "--data", str(ct_data),
                "--out", str(fitted), "--max-steps", "6", "--resume", str(fitted / "checkpoints" / "last.ckpt"),
                "--no-progress"]) == 0
    assert json.loads((fitted / "fit_summary.json").read_text())["steps"] == 6


def test_eval_writes_metrics(fitted, ct_data, tmp_path):
    assert run(["autoencoder", "eval", "--model", str(fitted / "model"), "--data", str(ct_data),
                "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_cases"] >= 1 and metrics["unit"] == "HU"
    assert {"psnr", "ssim", "mae", "per_class"} <= set(metrics["overall"])
    assert "liver" in metrics["overall"]["per_class"]
    assert "| **all** |" in (tmp_path / "ev" / "metrics.md").read_text()


def test_encode_cache_is_complete_resumable_and_refuses_mixing(fitted, ct_data, tmp_path):
    cache = tmp_path / "cache"
    assert run(["encode", "--model", str(fitted / "model"), "--data", str(ct_data), "--out", str(cache),
                "--no-progress"]) == 0
    files = sorted((cache / "latents").glob("*.safetensors"))
    assert len(files) == 5
    tensors, meta = load_tensors(files[0])
    assert tensors["latent"].shape == (4, 6, 6, 6) and tensors["label"].shape == (24, 24, 24)
    assert meta["split"] in ("train", "val", "test") and len(meta["affine"]) == 4 and meta["prompt"]
    stats = json.loads((cache / "stats.json").read_text())
    every = torch.cat([load_tensors(f)[0]["latent"].flatten() for f in files])
    assert stats["scale_factor"] == pytest.approx(1.0 / float(every.double().std(unbiased=False)), rel=1e-4)
    assert stats["num_cases"] == 5 and len(stats["channel_std"]) == 4
    # resume: a deleted case is re-encoded, finished ones are left alone
    mtime = files[1].stat().st_mtime_ns
    files[0].unlink()
    assert run(["encode", "--model", str(fitted / "model"), "--data", str(ct_data), "--out", str(cache),
                "--no-progress"]) == 0
    assert files[0].is_file() and files[1].stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="window"):
        run(["encode", "--model", str(fitted / "model"), "--data", str(ct_data), "--out", str(cache),
             "--window", "8", "--no-progress"])


def test_bad_inputs(fitted, ct_data, tmp_path):
    with pytest.raises(InputError, match="missing config.json"):
        (tmp_path / "empty").mkdir()
        run(["autoencoder", "eval", "--model", str(tmp_path / "empty"), "--data", str(ct_data)])
    with pytest.raises(ConfigError, match="16-mixed needs a GPU"):
        run(["autoencoder", "fit", "--config", str(fitted.parent / "tiny.yaml"), "--data", str(ct_data),
             "--out", str(tmp_path / "x"), "--precision", "16-mixed", "--accelerator", "cpu"])
    # a model trained on CT used on MR data warns
    from medsynth.data.phantom_dataset import write_phantom_dataset

    mr = write_phantom_dataset(tmp_path / "mr", modality="mr", num=3, size=16, seed=0, progress=False).root
    with pytest.warns(UserWarning, match="trained on CT but the data .* is MR"):
        run(["autoencoder", "eval", "--model", str(fitted / "model"), "--data", str(mr),
             "--out", str(tmp_path / "ev"), "--no-progress"])


@pytest.mark.slow
def test_fit_ddp_two_cpu_processes(ct_data, tmp_path):
    """DDP without code changes: two gloo processes on CPU; the run finishes and exports. With
    grouped codebooks and a time-budgeted cosine lr (rank 0's clock is broadcast)."""
    import subprocess
    import sys

    runner = tmp_path / "run_ae.py"
    runner.write_text("import argparse, sys\nfrom medsynth.cli import autoencoder\n"
                      "p = argparse.ArgumentParser(); autoencoder.register(p.add_subparsers(dest='c'))\n"
                      "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")
    cfg = tmp_path / "tiny.yaml"
    config = {**TINY, "model": {**TINY["model"], "num_codebooks": 2},
              "training": {**TINY["training"], "lr_schedule": "cosine", "lr_warmup_steps": 2}}
    cfg.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, str(runner), "autoencoder", "fit", "--config", str(cfg), "--data",
                           str(ct_data), "--out", str(tmp_path / "ddp"), "--devices", "2", "--accelerator", "cpu",
                           "--max-time", "30", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "fit_summary.json").read_text())["steps"] == 4
    load_autoencoder(tmp_path / "ddp" / "model")
