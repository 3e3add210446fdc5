"""Opt-in speed switches shared by the training configs: ``torch.compile`` and channels-last 3D.

Both are off in every preset. They help on GPUs (measure first with ``scripts/bench.py --compile``
/ ``--channels-last``); on a 2-core CPU the compile time alone exceeds a demo run.

``compile``: :meth:`torch.nn.Module.compile` compiles the module *in place*, so its
``state_dict`` keys (and therefore checkpoints, resumes and exports) are the same as without
compilation. Call it after any ``deepcopy`` of the module (EMA copies stay uncompiled: they only
run at export).

``channels_last``: 5-D convolution weights and activations in ``torch.channels_last_3d`` layout
(NDHWC), which cuDNN's 3D convolutions prefer under bf16/fp16. Only the convolutional models
(the VQ-GAN and its discriminator) use it; a transformer has no 5-D activations to reorder.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from medsynth.errors import ConfigError

ModuleT = TypeVar("ModuleT", bound=nn.Module)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def check_compile_options(compile_model: bool, backend: str, mode: str) -> None:
    """Validate the ``compile`` / ``compile_backend`` / ``compile_mode`` training keys.

    Raises:
        ConfigError: an unknown backend or mode (the message lists the valid ones).
    """
    if not isinstance(compile_model, bool):
        raise ConfigError(f"expects compile to be true or false, but got compile={compile_model!r}")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"expects compile_mode in {COMPILE_MODES}, but got compile_mode={mode!r}")
    if compile_model:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise ConfigError(f"expects compile_backend in {sorted(backends)}, but got compile_backend={backend!r}")


def compile_in_place(module: ModuleT, backend: str = "inductor", mode: str = "default") -> ModuleT:
    """``torch.compile`` ``module``'s forward in place (state_dict keys unchanged); returns it.

    Mode "default" is passed as None: torch rejects a mode for backends other than inductor.
    """
    module.compile(backend=backend, mode=None if mode == "default" else mode)
    return module


def to_channels_last(module: ModuleT) -> ModuleT:
    """Store ``module``'s 5-D parameters (3D conv kernels) in ``channels_last_3d`` layout; returns it."""
    return module.to(memory_format=torch.channels_last_3d)


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """A ``(B, C, X, Y, Z)`` batch in ``channels_last_3d`` layout (values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last_3d)


def is_compiled(module: nn.Module) -> bool:
    """True when :func:`compile_in_place` was applied to ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None


__all__ = ["COMPILE_MODES", "check_compile_options", "compile_in_place", "to_channels_last", "channels_last_input",
           "is_compiled"]
