"""Sampling schedulers: the only file that names diffusers scheduler classes.

Objective and sampler go together: rectified flow samples with the flow-matching Euler
scheduler; epsilon and v prediction share one DDPM noise schedule and sample with DDPM
(ancestral, ~1000 steps) or DDIM (deterministic, 25-100 steps). Everything else in medsynth asks
this module for a scheduler by name, so swapping a class is a one-file change.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from medsynth.errors import ConfigError

OBJECTIVES: tuple[str, ...] = ("rectified_flow", "epsilon", "v_prediction")
SAMPLERS: dict[str, tuple[str, ...]] = {
    "rectified_flow": ("euler",),
    "epsilon": ("ddim", "ddpm"),
    "v_prediction": ("ddim", "ddpm"),
}
NUM_TRAIN_TIMESTEPS = 1000
# The latent-diffusion noise schedule (Rombach et al. 2022): gentler than linear at the noisy
# end, which suits unit-variance latents better than pixel-space schedules.
BETA_SCHEDULE = "scaled_linear"
BETA_START, BETA_END = 0.00085, 0.012


def check_objective(objective: str) -> str:
    """Return ``objective`` if known, else ConfigError naming the valid ones."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown diffusion objective {objective!r}; valid objectives are {list(OBJECTIVES)}")
    return objective


def default_sampler(objective: str) -> str:
    """``euler`` for rectified flow, ``ddim`` for epsilon / v prediction."""
    return SAMPLERS[check_objective(objective)][0]


def _ddpm_kwargs(objective: str, num_train_timesteps: int) -> dict[str, Any]:
    return {"num_train_timesteps": num_train_timesteps, "beta_schedule": BETA_SCHEDULE,
            "beta_start": BETA_START, "beta_end": BETA_END, "clip_sample": False,
            "prediction_type": objective}


def make_scheduler(objective: str = "rectified_flow", sampler: str | None = None,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = 1.0) -> Any:
    """A fresh diffusers scheduler for sampling a model trained with ``objective``.

    Args:
        objective: "rectified_flow", "epsilon" or "v_prediction".
        sampler: "euler" (rectified flow), "ddim" or "ddpm" (epsilon / v); None picks the default.
        num_train_timesteps: the training time scale (the model sees timesteps in [0, this)).
        shift: rectified flow only: ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``;
            > 1 spends more steps at high noise, which helps larger grids (SD3 uses 3).

    Raises:
        ConfigError: unknown objective, or a sampler that does not fit it.
    """
    check_objective(objective)
    sampler = default_sampler(objective) if sampler is None else sampler
    if sampler not in SAMPLERS[objective]:
        raise ConfigError(f"sampler {sampler!r} does not fit objective {objective!r}; valid samplers for it "
                          f"are {list(SAMPLERS[objective])}")
    if shift <= 0:
        raise ConfigError(f"expects shift > 0, but got shift={shift}")
    if objective == "rectified_flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    if sampler == "ddpm":
        return DDPMScheduler(**_ddpm_kwargs(objective, num_train_timesteps))
    # set_alpha_to_one=False: the last DDIM step lands on alpha_bar(0), not on a noise-free
    # value the model was never trained at.
    return DDIMScheduler(**_ddpm_kwargs(objective, num_train_timesteps), set_alpha_to_one=False)


def training_alphas_cumprod(objective: str, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``alpha_bar_t`` ``(num_train_timesteps,)`` of the DDPM schedule that epsilon / v training uses.

    Taken from the same scheduler class that samples, so training and sampling cannot disagree.
    """
    if check_objective(objective) == "rectified_flow":
        raise ConfigError("rectified flow has no alpha_bar schedule; use sigma = t / num_train_timesteps")
    return DDPMScheduler(**_ddpm_kwargs(objective, num_train_timesteps)).alphas_cumprod.clone()


__all__ = ["OBJECTIVES", "SAMPLERS", "NUM_TRAIN_TIMESTEPS", "make_scheduler", "default_sampler",
           "check_objective", "training_alphas_cumprod"]
