"""``--accelerator`` / ``--devices`` of the training commands, checked before any model is built."""

from __future__ import annotations

from medsynth.errors import ConfigError


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
