"""``--accelerator`` / ``--devices`` of the training commands (shared by dit, controlnet and labels fit)."""

from __future__ import annotations

import pytest
import torch

from medsynth.cli import main
from medsynth.cli.devices import runs_on_cpu, training_devices
from medsynth.errors import ConfigError


def test_auto_devices_on_the_cpu_is_one_process() -> None:
    assert training_devices("cpu", "auto") == 1
    assert training_devices("cpu", "3") == 3
    assert runs_on_cpu("cpu") and runs_on_cpu("auto") == (not torch.cuda.is_available())


@pytest.mark.parametrize("devices", ["0", "-2", "two"])
def test_bad_device_counts_name_the_value(devices: str) -> None:
    with pytest.raises(ConfigError, match="--devices"):
        training_devices("cpu", devices)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_without_cuda_is_refused() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        training_devices("gpu", "1")


@pytest.mark.parametrize("command", [["dit", "fit", "--cache", "c"], ["labels", "fit", "--data", "d"]])
def test_training_commands_refuse_bad_devices_before_any_work(command, tmp_path, capsys) -> None:
    config = {"dit": "configs/dit/tiny.yaml", "labels": "configs/labels/tiny.yaml"}[command[0]]
    args = [*command[:2], *[str(tmp_path) if a in ("c", "d") else a for a in command[2:]],
            "--config", config, "--out", str(tmp_path / "run"), "--devices", "two", "--accelerator", "cpu"]
    assert main(args) == 2
    assert "--devices must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
