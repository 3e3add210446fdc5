"""Device and scale-out options of the training commands, checked before any model is built.

``autoencoder fit``, ``dit fit``, ``controlnet fit`` and ``labels fit`` take the same
``--accelerator``, ``--devices``, ``--num-nodes``, ``--strategy``, ``--precision`` and ``--resume``:
:func:`add_scale_arguments` defines them once and :func:`scale_options` validates them into a
:class:`ScaleOptions` for ``lightning.Trainer``. Only the defaults that differ between the
commands (the autoencoder's precision default and strategy, ``--resume last``) are parameters.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from medsynth.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning precision strings. "32" is Lightning's alias of "32-true": `autoencoder fit` has
# always taken (and defaulted to) it, so it stays valid everywhere.
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class ScaleOptions:
    """Validated ``--accelerator/--devices/--num-nodes/--strategy/--precision/--resume``.

    Attributes:
        accelerator: as given (one of :data:`ACCELERATORS`).
        devices: devices per node for Lightning (``"auto"`` on the CPU already became 1).
        num_nodes: nodes (>= 1); Lightning checks ``devices x num_nodes`` against a launcher.
        strategy: a Lightning strategy name in lower case, or None for the command's default.
        precision: a Lightning precision string, or None to keep the config's.
        resume: a checkpoint file (or an allowed keyword such as ``"last"``), or None.
    """

    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str | None
    precision: str | None
    resume: str | None

    @property
    def multi_process(self) -> bool:
        """Whether more than one training process may run (several devices, ``auto`` or several nodes)."""
        return self.num_nodes > 1 or self.devices == "auto" or (isinstance(self.devices, int) and self.devices > 1)


def add_scale_arguments(parser: argparse.ArgumentParser, *, precision_default: str | None = None,
                        precision_help: str = "overrides the config's training.precision",
                        strategy_help: str = "Lightning strategy, e.g. ddp or fsdp (default: Lightning's "
                                             "choice, DDP when several processes train)",
                        resume_help: str = "Lightning checkpoint to resume from (e.g. OUT/checkpoints/last.ckpt)"
                        ) -> None:
    """Add the shared device and scale-out options to a training command's parser.

    ``--devices`` and ``--num-nodes`` are read as strings so that :func:`scale_options` can
    answer a bad value with a :class:`ConfigError` naming it, like every other user error.
    """
    parser.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="default auto")
    parser.add_argument("--devices", default="1",
                        help="devices per node (or 'auto'); more than one process uses DDP unless --strategy "
                             "says otherwise (default 1)")
    parser.add_argument("--num-nodes", default="1", metavar="N",
                        help="nodes (default 1); under SLURM or torchrun it must match the launcher's node count")
    parser.add_argument("--strategy", default=None, metavar="NAME", help=strategy_help)
    parser.add_argument("--precision", default=precision_default, choices=PRECISIONS, help=precision_help)
    parser.add_argument("--resume", default=None, metavar="CKPT", help=resume_help)


def scale_options(args: argparse.Namespace, resume_keywords: tuple[str, ...] = ()) -> ScaleOptions:
    """Validate the options :func:`add_scale_arguments` added; call it before any work.

    Args:
        args: the parsed command line.
        resume_keywords: ``--resume`` values Lightning resolves itself (``("last",)`` for the
            autoencoder, whose checkpoint folder Lightning knows); anything else must be a file.

    Raises:
        ConfigError: bad ``--devices`` or ``--num-nodes``, an unknown ``--strategy``,
            ``--precision 16-mixed`` on the CPU, a ``--resume`` file that does not exist, or a GPU
            accelerator without CUDA. The message names the value and what is valid.
    """
    devices = training_devices(args.accelerator, str(args.devices))
    num_nodes = _num_nodes(args.num_nodes)
    strategy = _strategy(args.strategy)
    if args.precision == "16-mixed" and runs_on_cpu(args.accelerator):
        raise ConfigError("--precision 16-mixed needs a GPU; on CPU use bf16-mixed or 32-true")
    resume = None if args.resume is None else str(args.resume)
    if resume is not None and resume not in resume_keywords and not Path(resume).is_file():
        keywords = "".join(f" or {k!r}" for k in resume_keywords)
        raise ConfigError(f"--resume checkpoint {resume} does not exist; give a Lightning .ckpt file{keywords}")
    return ScaleOptions(args.accelerator, devices, num_nodes, strategy, args.precision, resume)


def training_devices(accelerator: str, devices: str) -> int | str:
    """The Lightning ``devices`` value for ``--accelerator`` and ``--devices``.

    ``"auto"`` on a CPU-only run becomes 1 (Lightning's "auto" would start one process per core).

    Raises:
        ConfigError: ``--devices`` that is not a positive integer or "auto", or a GPU accelerator
            on a machine without CUDA.
    """
    import torch

    try:
        count: int | str = devices if devices == "auto" else int(devices)
    except ValueError:
        raise ConfigError(f"--devices must be a positive integer or 'auto', got {devices!r}") from None
    if isinstance(count, int) and count < 1:
        raise ConfigError(f"--devices must be >= 1, got {count}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {accelerator} is not available: torch sees no CUDA GPU; use --accelerator cpu")
    return 1 if runs_on_cpu(accelerator) and count == "auto" else count


def runs_on_cpu(accelerator: str) -> bool:
    """Whether ``--accelerator`` means the CPU here ("auto" without a CUDA GPU)."""
    import torch

    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def _num_nodes(value: str | int) -> int:
    try:
        count = int(str(value))
    except ValueError:
        raise ConfigError(f"--num-nodes must be an integer >= 1, got {value!r}") from None
    if count < 1:
        raise ConfigError(f"--num-nodes must be an integer >= 1, got {count}")
    return count


def _strategy(name: str | None) -> str | None:
    """A Lightning strategy name in lower case (Lightning lower-cases it too), or None."""
    if name is None:
        return None
    # Lightning only on demand: the registry import costs seconds, and most runs give no --strategy.
    from lightning.pytorch.strategies import StrategyRegistry

    valid = ["auto", *StrategyRegistry.available_strategies()]
    if name.lower() not in valid:
        raise ConfigError(f"--strategy {name!r} is not a Lightning strategy; valid names are {', '.join(valid)}")
    return name.lower()
