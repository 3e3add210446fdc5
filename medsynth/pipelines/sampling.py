"""The one denoising loop of medsynth: noise -> latent, for every objective and scheduler.

:func:`denoise` drives a DiT (or anything with its forward signature) with a diffusers
scheduler from :func:`medsynth.diffusion.make_scheduler`. The same loop serves rectified flow
(Euler), DDPM and DDIM, since each scheduler's ``step`` knows how to read its model's
prediction. Classifier-free guidance runs the conditional and the unconditional (null
embedding) branch as one batch of ``2B``. A ``block_residuals_fn`` hook lets a ControlNet add
its residuals to the DiT blocks at every step. With a separate ``mask_guidance_scale`` the
batch has three branches ``[full; mask only; unconditional]`` (``3B``), combined by
:func:`~medsynth.diffusion.guidance.dual_guidance`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from medsynth.diffusion.guidance import classifier_free_guidance, dual_guidance, guided_text
from medsynth.errors import ConfigError
from medsynth.models.text_encoder import TextEmbedding

try:  # diffusers >= 0.35 keeps it with its guiders; older releases only in the Stable Diffusion pipeline module
    from diffusers.guiders.guider_utils import rescale_noise_cfg
except ImportError:  # pragma: no cover - depends on the installed diffusers
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

BlockResidualsFn = Callable[[Tensor, Tensor], Sequence[Tensor] | None]
"""``(latent_model_input (N, C, X, Y, Z), timesteps (N,)) -> block residuals (N, T, D) or None``.

``N`` is ``B`` without guidance, ``2B`` under classifier-free guidance ([conditional;
unconditional]) and ``3B`` under dual guidance ([full; mask only; unconditional]: text and
metadata are dropped in the last two, the hook drops the mask in the last one)."""


@dataclass
class Conditions:
    """What a batch is conditioned on; None fields mean "not given" (the null embedding is used).

    Attributes:
        text: encoded prompts, batch B.
        metadata: tensors from ``DiT3D.encode_metadata``, batch B.
        negative_text: encoded negative prompts, batch B: under guidance they stand where the
            null text embedding would (diffusers' ``negative_prompt``), so guidance pushes from
            what they describe towards ``text``. Needs ``text``; no effect without guidance.
    """

    text: TextEmbedding | None = None
    metadata: Mapping[str, Tensor] | None = None
    negative_text: TextEmbedding | None = None


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A torch device that exists here; ConfigError naming what is available otherwise."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {str(device)!r} is not available: torch sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {str(device)!r} is not available: torch sees {count} CUDA GPU(s) "
                              f"(cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    return dev


def _model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter (CPU float32 for a parameter-free model)."""
    param = next(model.parameters(), None)
    return (torch.device("cpu"), torch.float32) if param is None else (param.device, param.dtype)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when one of them has no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _batched_for_guidance(conditions: Conditions, batch: int, copies: int, device: torch.device
                          ) -> tuple[TextEmbedding | None, dict[str, Tensor] | None, Tensor, Tensor]:
    """Conditions repeated ``copies`` times and the ``(copies * B,)`` drop masks of text and of
    metadata: only the first copy keeps them ([conditional; unconditional] or [full; mask only;
    unconditional]). With a negative prompt the other copies hold it instead of the null text."""
    metadata = None if conditions.metadata is None else {
        k: torch.cat([v] * copies).to(device) for k, v in conditions.metadata.items()}
    drop = torch.tensor([False] + [True] * (copies - 1)).repeat_interleave(batch).to(device)
    text, drop_text = guided_text(conditions.text, conditions.negative_text, copies, drop)
    return None if text is None else text.to(device), metadata, drop_text, drop


@torch.no_grad()
def denoise(model: nn.Module, scheduler: object, latents_shape: Sequence[int], conditions: Conditions | None = None,
            num_inference_steps: int = 30, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
            *, latents: Tensor | None = None, device: torch.device | str | None = None,
            block_residuals_fn: BlockResidualsFn | None = None, progress: bool = False,
            mask_guidance_scale: float | None = None, autocast_dtype: torch.dtype | None = None,
            guidance_rescale: float = 0.0) -> Tensor:
    """Sample latents by running ``scheduler`` over ``model``'s predictions.

    Args:
        model: called as ``model(x, timesteps, text, metadata, drop_text=..., drop_metadata=...,
            block_residuals=...)`` (the :class:`~medsynth.models.dit.DiT3D` signature).
        scheduler: a scheduler from :func:`medsynth.diffusion.make_scheduler` that matches the
            model's training objective.
        latents_shape: ``(B, C, X, Y, Z)`` of the latents to make.
        conditions: text and metadata for the batch; None samples unconditionally.
        num_inference_steps: scheduler steps (rectified flow: ~10-30; DDIM: ~50; DDPM: up to 1000).
        guidance_scale: classifier-free guidance; 1 disables it (one model call per step). The
            unconditional branch drops text and metadata together.
        generator: seeds the initial noise (and DDPM's per-step noise); the same seed gives the
            same sample on the same device. Noise is drawn on the generator's device, so a CPU
            generator gives the same starting noise for CPU and GPU runs.
        latents: start from these instead of fresh noise (e.g. to resume or to test).
        device: where to run; defaults to the model's device, which must match it.
        block_residuals_fn: extra conditioning residuals per step (ControlNet hook).
        progress: show a tqdm bar.
        mask_guidance_scale: separate guidance for the ControlNet's mask (needs
            ``block_residuals_fn``). Three branches [full; mask only; unconditional] run as one
            batch of ``3B`` and are combined with :func:`dual_guidance`
            (``guidance_scale`` is then the text scale). None: the two-branch loop above. Both
            scales 1: one branch, the plain conditional prediction.
        autocast_dtype: run the model calls (DiT and ControlNet hook) under ``torch.autocast`` with
            this dtype, e.g. ``torch.bfloat16`` on a GPU: about half the activation memory and
            tensor-core speed, with fp32 weights kept. The latents and the scheduler's update stay
            float32, so rounding does not accumulate over the steps. None: no autocast.
        guidance_rescale: in ``[0, 1]``; under guidance, mix the guided prediction with itself
            rescaled to the standard deviation of the conditional (``full``) prediction, per
            sample (Lin et al. 2024, Sect. 3.4; diffusers' ``rescale_noise_cfg``). Guidance
            extrapolates past the conditional prediction and brightens what it draws; on the CT
            phantoms mask guidance 3 made organs up to 42 HU too bright, 0.7 removes most of it at
            the same organ Dice (docs/benchmarks/conditioning_ct_160x5_f2_long_recipe.md).
            0: off. No effect without guidance.

    Returns:
        ``(B, C, X, Y, Z)`` float32 latents (still multiplied by the cache's scale factor).

    Raises:
        ConfigError: an unavailable device, a model on another device, bad steps, scales or
            shape, or a mask guidance scale without a ControlNet hook.
    """
    model_device, dtype = _model_placement(model)
    device = model_device if device is None else resolve_device(device)
    if not _same_device(device, model_device):
        raise ConfigError(f"the model is on {model_device}, but sampling was asked to run on {device}; "
                          f"move the model first (model.to({str(device)!r}))")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ConfigError(f"expects num_inference_steps >= 1, but got num_inference_steps={num_inference_steps!r}")
    if guidance_scale < 0:
        raise ConfigError(f"expects guidance_scale >= 0, but got guidance_scale={guidance_scale}")
    if not 0.0 <= float(guidance_rescale) <= 1.0:
        raise ConfigError(f"expects guidance_rescale in [0, 1], but got guidance_rescale={guidance_rescale}")
    if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"expects autocast_dtype torch.bfloat16, torch.float16 or None, but got "
                          f"autocast_dtype={autocast_dtype}")
    if mask_guidance_scale is not None:
        if mask_guidance_scale < 0:
            raise ConfigError(f"expects mask_guidance_scale >= 0, but got mask_guidance_scale={mask_guidance_scale}")
        if block_residuals_fn is None:
            raise ConfigError("mask_guidance_scale needs a ControlNet (block_residuals_fn); without a mask there "
                              "is nothing to guide towards")
    shape = tuple(int(s) for s in latents_shape)
    if len(shape) != 5:
        raise ConfigError(f"expects latents_shape (B, C, X, Y, Z), but got {shape}")
    conditions = conditions or Conditions()
    batch = shape[0]
    if conditions.negative_text is not None:
        if conditions.text is None:
            raise ConfigError("a negative prompt needs a prompt: it replaces the null text embedding under guidance, "
                              "and there is no text to guide towards")
        if len(conditions.negative_text) != len(conditions.text):
            raise ConfigError(f"got {len(conditions.negative_text)} negative prompts for {len(conditions.text)} "
                              "prompts; give one per prompt")

    if latents is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
        x = x * float(getattr(scheduler, "init_noise_sigma", 1.0))
    else:
        if tuple(latents.shape) != shape:
            raise ConfigError(f"latents have shape {tuple(latents.shape)}, but latents_shape is {shape}")
        x = latents.to(device=device, dtype=torch.float32)

    if mask_guidance_scale is not None and (guidance_scale != 1.0 or mask_guidance_scale != 1.0):
        copies = 3  # [full; mask only; unconditional]
    else:
        copies = 2 if mask_guidance_scale is None and guidance_scale != 1.0 else 1
    if copies > 1:
        text, metadata, drop_text, drop = _batched_for_guidance(conditions, batch, copies, device)
    else:
        text = None if conditions.text is None else conditions.text.to(device)
        metadata = None if conditions.metadata is None else {k: v.to(device) for k, v in conditions.metadata.items()}
        drop_text = drop = None

    scheduler.set_timesteps(num_inference_steps, device=device)
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="denoising", leave=False):
        model_input = torch.cat([x] * copies) if copies > 1 else x  # (N, C, X, Y, Z), N = copies * B
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, t)
        timesteps = t.to(device=device, dtype=torch.float32).expand(model_input.shape[0])  # (N,)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            residuals = None if block_residuals_fn is None else block_residuals_fn(model_input.to(dtype), timesteps)
            prediction = model(model_input.to(dtype), timesteps, text, metadata, drop_text=drop_text,
                               drop_metadata=drop, block_residuals=residuals).float()
        if copies == 2:
            conditional, unconditional = prediction.chunk(2)
            prediction = classifier_free_guidance(conditional, unconditional, guidance_scale)
        elif copies == 3:
            conditional, mask_only, unconditional = prediction.chunk(3)
            prediction = dual_guidance(conditional, mask_only, unconditional, guidance_scale,
                                       float(mask_guidance_scale))
        if copies > 1 and guidance_rescale > 0:
            prediction = rescale_noise_cfg(prediction, conditional, guidance_rescale=float(guidance_rescale))
        x = scheduler.step(prediction, t, x, generator=generator).prev_sample
    return x


__all__ = ["denoise", "Conditions", "resolve_device", "BlockResidualsFn"]
