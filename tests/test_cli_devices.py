"""Device and scale-out options of the training commands (``medsynth.cli.devices``, shared by
autoencoder, dit, controlnet and labels fit): parsing, validation, and what reaches the Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medsynth.cli import build_parser, main
from medsynth.cli.devices import runs_on_cpu, scale_options, training_devices
from medsynth.errors import ConfigError
from tests.test_cli import assert_user_error, run_cli


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


# ---------------------------------------------------------------------------------------------
# --num-nodes / --strategy / --precision / --resume of the four fit commands
# ---------------------------------------------------------------------------------------------

FIT_COMMANDS = ("autoencoder", "dit", "controlnet", "labels")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _StopAtTrainer(Exception):
    """Raised by the stand-in Trainer once it has recorded its arguments."""


@pytest.fixture(scope="module")
def fit_inputs(tmp_path_factory) -> dict[str, Path]:
    """A phantom dataset, its latent cache, a tiny DiT export, and configs that fit them."""
    from tests.pipelines.test_pipeline import build_components
    from tests.test_autoencoder_cli import TINY as AE_TINY
    from tests.test_labels_cli import OVERRIDES as LABEL_OVERRIDES

    root = tmp_path_factory.mktemp("scale")
    _, dit_dir, cache = build_components(root)
    dit = yaml.safe_load((CONFIGS / "dit" / "tiny.yaml").read_text())
    del dit["model"]["in_channels"]  # taken from the cache (4 channels here)
    cn = yaml.safe_load((CONFIGS / "controlnet" / "tiny.yaml").read_text())
    cn["controlnet"].update(num_blocks=1, embed_channels=[4, 8])  # the test DiT has one block
    labels = yaml.safe_load((CONFIGS / "labels" / "tiny.yaml").read_text())
    for section, values in LABEL_OVERRIDES.items():
        labels[section] = values if section in ("dit", "text_encoder") else {**labels[section], **values}
    for name, config in {"ae": AE_TINY, "dit": dit, "cn": cn, "labels": labels}.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "data": root / "data", "cache": cache, "dit": dit_dir}


def _fit_argv(command: str, inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    root = inputs["root"]
    head = {"autoencoder": ["autoencoder", "fit", "--config", root / "ae.yaml", "--data", inputs["data"]],
            "dit": ["dit", "fit", "--config", root / "dit.yaml", "--cache", inputs["cache"]],
            "controlnet": ["controlnet", "fit", "--config", root / "cn.yaml", "--dit", inputs["dit"],
                           "--cache", inputs["cache"]],
            "labels": ["labels", "fit", "--config", root / "labels.yaml", "--data", inputs["data"]]}[command]
    return [*map(str, head), "--out", str(out), "--accelerator", "cpu", *extra]


@pytest.fixture()
def trainer_kwargs(monkeypatch) -> list[dict]:
    """Replace ``lightning.Trainer`` (every fit builds it as ``L.Trainer``): record the keyword
    arguments, then stop the command before any training."""
    import lightning

    seen: list[dict] = []

    def fake_trainer(**kwargs):
        seen.append(kwargs)
        raise _StopAtTrainer

    monkeypatch.setattr(lightning, "Trainer", fake_trainer)
    return seen


def _trainer_kwargs_of(argv: list[str], seen: list[dict]) -> dict:
    args = build_parser().parse_args(argv)
    with pytest.raises(_StopAtTrainer):
        args.func(args)
    return seen[-1]


@pytest.mark.parametrize("command", FIT_COMMANDS)
def test_scale_options_parse_alike_for_every_fit_command(command, tmp_path) -> None:
    argv = _fit_argv(command, {"root": tmp_path, "data": tmp_path, "cache": tmp_path, "dit": tmp_path},
                     tmp_path / "out", "--num-nodes", "2", "--strategy", "ddp", "--devices", "4",
                     "--precision", "bf16-mixed", "--resume", "run.ckpt")
    args = build_parser().parse_args(argv)
    assert (args.num_nodes, args.strategy, args.devices, args.precision, args.resume) == \
        ("2", "ddp", "4", "bf16-mixed", "run.ckpt")
    defaults = build_parser().parse_args(_fit_argv(command, {"root": tmp_path, "data": tmp_path,
                                                             "cache": tmp_path, "dit": tmp_path}, tmp_path / "o"))
    assert (defaults.num_nodes, defaults.strategy, defaults.resume) == ("1", None, None)
    # The autoencoder keeps its own default; the others leave precision to their config.
    assert defaults.precision == ("32" if command == "autoencoder" else None)


@pytest.mark.parametrize("value, shown", [("0", "got 0"), ("-3", "got -3"), ("two", "got 'two'")])
def test_bad_num_nodes_names_the_value(value, shown) -> None:
    args = build_parser().parse_args(["dit", "fit", "--config", "c", "--cache", "c", "--out", "o",
                                      "--accelerator", "cpu", "--num-nodes", value])
    with pytest.raises(ConfigError, match=f"--num-nodes must be an integer >= 1, {shown}"):
        scale_options(args)


def test_scale_options_validation() -> None:
    parse = build_parser().parse_args
    base = ["autoencoder", "fit", "--config", "c", "--data", "d", "--out", "o", "--accelerator", "cpu"]
    scale = scale_options(parse([*base, "--num-nodes", "3", "--strategy", "DDP", "--devices", "auto"]))
    assert (scale.num_nodes, scale.strategy, scale.devices, scale.multi_process) == (3, "ddp", 1, True)
    assert not scale_options(parse(base)).multi_process
    with pytest.raises(ConfigError, match=r"--strategy 'ddpp' is not a Lightning strategy; valid names are auto, ddp"):
        scale_options(parse([*base, "--strategy", "ddpp"]))
    with pytest.raises(ConfigError, match="--precision 16-mixed needs a GPU; on CPU use bf16-mixed or 32-true"):
        scale_options(parse([*base, "--precision", "16-mixed"]))
    # `last` is Lightning's own keyword for the autoencoder's checkpoint folder; any other value is a file.
    assert scale_options(parse([*base, "--resume", "last"]), resume_keywords=("last",)).resume == "last"
    with pytest.raises(ConfigError, match="--resume checkpoint last does not exist"):
        scale_options(parse([*base, "--resume", "last"]))


@pytest.mark.parametrize("command", FIT_COMMANDS)
@pytest.mark.parametrize("extra, message", [
    (["--num-nodes", "0"], "--num-nodes must be an integer >= 1, got 0"),
    (["--strategy", "warp"], "--strategy 'warp' is not a Lightning strategy"),
    (["--precision", "16-mixed"], "--precision 16-mixed needs a GPU"),
    (["--resume", "missing.ckpt"], "--resume checkpoint missing.ckpt does not exist"),
])
def test_fit_commands_refuse_bad_scale_options_before_any_work(command, extra, message, fit_inputs, tmp_path,
                                                               capsys) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *_fit_argv(command, fit_inputs, out, *extra))
    assert_user_error(code, err, message)
    assert not out.exists()


@pytest.mark.parametrize("command", FIT_COMMANDS)
def test_num_nodes_strategy_and_precision_reach_the_trainer(command, fit_inputs, tmp_path, trainer_kwargs) -> None:
    kwargs = _trainer_kwargs_of(_fit_argv(command, fit_inputs, tmp_path / "a", "--num-nodes", "2",
                                          "--strategy", "ddp", "--precision", "bf16-mixed"), trainer_kwargs)
    # labels fit: the first Trainer is the label autoencoder's, which always trains in 32-true.
    precision = "32-true" if command == "labels" else "bf16-mixed"
    assert (kwargs["num_nodes"], kwargs["strategy"], kwargs["precision"]) == (2, "ddp", precision)
    assert (kwargs["accelerator"], kwargs["devices"]) == ("cpu", 1)


@pytest.mark.parametrize("command", FIT_COMMANDS)
def test_default_trainer_settings_are_unchanged(command, fit_inputs, tmp_path, trainer_kwargs) -> None:
    kwargs = _trainer_kwargs_of(_fit_argv(command, fit_inputs, tmp_path / "a"), trainer_kwargs)
    assert (kwargs["num_nodes"], kwargs["strategy"], kwargs["devices"]) == (1, "auto", 1)
    assert kwargs["precision"] == ("32" if command == "autoencoder" else "32-true")


def test_autoencoder_searches_unused_parameters_on_several_nodes(fit_inputs, tmp_path, trainer_kwargs) -> None:
    # One device per node on two nodes is still DDP: the idle discriminator needs the search.
    kwargs = _trainer_kwargs_of(_fit_argv("autoencoder", fit_inputs, tmp_path / "a", "--num-nodes", "2"),
                                trainer_kwargs)
    assert (kwargs["num_nodes"], kwargs["strategy"]) == (2, "ddp_find_unused_parameters_true")
    kwargs = _trainer_kwargs_of(_fit_argv("autoencoder", fit_inputs, tmp_path / "b", "--num-nodes", "2",
                                          "--strategy", "fsdp"), trainer_kwargs)
    assert kwargs["strategy"] == "fsdp"
