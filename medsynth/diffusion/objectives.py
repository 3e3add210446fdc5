"""Training objectives: how clean latents are noised, what the model must predict, and the loss.

* ``rectified_flow`` (default): ``x_t = (1 - sigma) x_0 + sigma * noise`` with
  ``sigma = t / 1000``; the model predicts the velocity ``noise - x_0``. Straight paths make
  few-step Euler sampling work (Liu et al. 2022; Esser et al. 2024). These are the conventions of
  the flow-matching Euler scheduler, so a trained model samples with it unchanged.
* ``epsilon``: DDPM noise prediction, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise``.
* ``v_prediction``: ``v = sqrt(a_t) noise - sqrt(1 - a_t) x_0`` (Salimans & Ho 2022).

Timesteps are on the ``[0, 1000)`` scale for all three. The loss is a per-sample MSE, so it can be
logged per timestep bucket (:func:`bucket_losses`): a flat total can hide a model that learns
low-noise steps and ignores high-noise ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medsynth.diffusion.schedulers import NUM_TRAIN_TIMESTEPS, check_objective, training_alphas_cumprod
from medsynth.errors import ConfigError

TIMESTEP_SAMPLING: tuple[str, ...] = ("logit_normal", "uniform")


@dataclass
class LossOutput:
    """Loss of one batch.

    Attributes:
        loss: scalar mean over the batch (what is optimised).
        per_sample: ``(B,)`` MSE of each sample.
        timesteps: ``(B,)`` the timesteps they were drawn at.
    """

    loss: Tensor
    per_sample: Tensor
    timesteps: Tensor


def region_weights(label: Tensor, values: Sequence[int], factor: Sequence[int], weight: float) -> Tensor:
    """Per-latent-voxel loss weights ``(B, 1, x, y, z)``: ``weight`` where any image voxel of
    ``label (B, X, Y, Z)`` in the latent voxel has one of ``values``, 1 elsewhere.

    Why: a lesion a few image voxels across is a fraction of one latent voxel, so an unweighted
    MSE barely notices whether it is drawn, and a model learns to leave it out.
    ``factor`` is the image-to-latent downsampling per axis (``X = x * factor[0]``).
    """
    inside = torch.zeros_like(label, dtype=torch.float32)
    for v in values:
        inside = torch.maximum(inside, (label == v).float())
    pooled = F.max_pool3d(inside[:, None], kernel_size=tuple(factor), stride=tuple(factor))
    return 1.0 + (weight - 1.0) * pooled


def check_region_weighting(classes: Sequence[str], weight: float) -> list[str]:
    """Validate a ``region_classes`` / ``region_loss_weight`` pair; returns the class names as strings."""
    if weight < 1:
        raise ConfigError(f"expects region_loss_weight >= 1, but got region_loss_weight={weight}")
    return [str(c) for c in classes]


# In region_classes, this entry stands for every lesion class of the dataset
# (medsynth.evaluation.label_statistics.lesion_classes), so one config serves CT (liver_lesion) and
# MR (tumour_core, ...) datasets.
LESION_CLASSES_ENTRY = "lesions"


def expand_region_classes(classes: Sequence[str], labels: Mapping[str, int]) -> list[str]:
    """``region_classes`` with :data:`LESION_CLASSES_ENTRY` replaced by the lesion classes of
    ``labels`` (kept as is when the table has a label of that very name; dropped when it has no
    lesion class); duplicates removed, order kept."""
    from medsynth.evaluation.label_statistics import lesion_classes

    out: list[str] = []
    for name in classes:
        expanded = lesion_classes(labels) if name == LESION_CLASSES_ENTRY and name not in labels else [name]
        out += [n for n in expanded if n not in out]
    return out


def region_label_values(classes: Sequence[str], labels: Mapping[str, int] | None) -> list[int]:
    """The label values of ``classes`` in ``labels`` (name -> value), with :data:`LESION_CLASSES_ENTRY`
    expanded (:func:`expand_region_classes`); ConfigError naming the known labels."""
    labels = dict(labels or {})
    if classes and not labels:
        raise ConfigError(f"training.region_classes {list(classes)} needs a label table, but none was given; "
                          "encode a labelled dataset (its stats.json records the labels)")
    classes = expand_region_classes(classes, labels)
    unknown = [c for c in classes if c not in labels]
    if unknown:
        raise ConfigError(f"training.region_classes names {unknown}, which are not labels; known labels are "
                          f"{sorted(labels, key=labels.get)} (or {LESION_CLASSES_ENTRY!r} for every lesion class)")
    return [int(labels[c]) for c in classes]


def bucket_losses(per_sample: Tensor, timesteps: Tensor, num_buckets: int = 4,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> dict[str, Tensor]:
    """Mean loss per timestep bucket, e.g. ``{"t000-250": ..., "t250-500": ...}``; empty buckets are left out.

    Args:
        per_sample: ``(B,)`` losses.
        timesteps: ``(B,)`` timesteps on ``[0, num_train_timesteps)``.
    """
    width = num_train_timesteps / num_buckets
    index = (timesteps.detach().float() / width).long().clamp(0, num_buckets - 1)  # (B,)
    out = {}
    for k in range(num_buckets):
        chosen = index == k
        if bool(chosen.any()):
            out[f"t{round(k * width):03d}-{round((k + 1) * width):03d}"] = per_sample.detach()[chosen].mean()
    return out


class Objective:
    """Base class: subclasses define the noising path and the prediction target."""

    name: str = ""

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        if num_train_timesteps < 2:
            raise ConfigError(f"expects num_train_timesteps >= 2, but got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        """``(B,)`` training timesteps on ``[0, num_train_timesteps)``."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Noisy latents ``x_t``, same shape as ``x0 (B, C, X, Y, Z)``."""
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the model should output at ``x_t``, same shape as ``x0``."""
        raise NotImplementedError

    def loss(self, prediction: Tensor, x0: Tensor, noise: Tensor, timesteps: Tensor,
             weights: Tensor | None = None) -> LossOutput:
        """MSE between ``prediction`` and :meth:`target`, averaged per sample, in float32.

        ``weights`` (broadcastable to the latents, e.g. ``(B, 1, x, y, z)`` from
        :func:`region_weights`) scale each element's squared error before the mean.
        """
        error = (prediction.float() - self.target(x0, noise, timesteps).float()) ** 2
        if weights is not None:
            error = error * weights.float()
        per_sample = error.flatten(1).mean(dim=1)  # (B,)
        return LossOutput(per_sample.mean(), per_sample, timesteps)

    @staticmethod
    def _noise_like(x0: Tensor, generator: torch.Generator | None) -> Tensor:
        gen_device = generator.device if generator is not None else x0.device
        return torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x0)

    def training_inputs(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Draw noise and timesteps for clean latents: returns ``(x_t, timesteps (B,), noise)``."""
        noise = self._noise_like(x0, generator)
        timesteps = self.sample_timesteps(x0.shape[0], generator, x0.device)
        return self.add_noise(x0, noise, timesteps), timesteps, noise


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1, 1)`` (as many ones as ``like`` has trailing dims)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class RectifiedFlow(Objective):
    """Rectified flow / flow matching with velocity target ``noise - x0``.

    Args:
        timestep_sampling: "logit_normal" (SD3's default: more training at mid noise, where
            the velocity is hardest to predict) or "uniform".
        shift: the same sigma shift as the sampler's (``make_scheduler(shift=...)``), so that
            training sees the noise levels sampling visits.
    """

    name = "rectified_flow"

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, timestep_sampling: str = "logit_normal",
                 shift: float = 1.0) -> None:
        super().__init__(num_train_timesteps)
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ConfigError(f"unknown timestep_sampling {timestep_sampling!r}; valid values are "
                              f"{list(TIMESTEP_SAMPLING)}")
        if shift <= 0:
            raise ConfigError(f"expects shift > 0, but got shift={shift}")
        self.timestep_sampling, self.shift = timestep_sampling, float(shift)

    def sigmas(self, timesteps: Tensor) -> Tensor:
        return timesteps.float() / self.num_train_timesteps

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        if self.timestep_sampling == "logit_normal":
            sigma = torch.sigmoid(torch.randn(batch_size, generator=generator, device=gen_device))
        else:
            sigma = torch.rand(batch_size, generator=generator, device=gen_device)
        sigma = self.shift * sigma / (1 + (self.shift - 1) * sigma)
        return (sigma * self.num_train_timesteps).to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        sigma = _expand(self.sigmas(timesteps), x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return noise - x0


class _DDPMObjective(Objective):
    """Shared DDPM noising for epsilon and v prediction (the schedule of the DDPM/DDIM samplers)."""

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        super().__init__(num_train_timesteps)
        self.alphas_cumprod = training_alphas_cumprod(self.name, num_train_timesteps)  # (T,)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator,
                             device=gen_device).to(device)

    def _coefficients(self, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)``, broadcastable to ``like``."""
        alpha_bar = self.alphas_cumprod.to(like.device)[timesteps.long().to(like.device)]  # (B,)
        return _expand(alpha_bar.sqrt(), like), _expand((1 - alpha_bar).sqrt(), like)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        signal, sigma = self._coefficients(timesteps, x0)
        return signal * x0 + sigma * noise


class EpsilonPrediction(_DDPMObjective):
    """Predict the added noise (Ho et al. 2020)."""

    name = "epsilon"

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return noise


class VPrediction(_DDPMObjective):
    """Predict ``v = sqrt(a) noise - sqrt(1 - a) x0``: well-scaled at every noise level."""

    name = "v_prediction"

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        signal, sigma = self._coefficients(timesteps, x0)
        return signal * noise - sigma * x0


def make_objective(name: str = "rectified_flow", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                   **kwargs: object) -> Objective:
    """Objective by name: "rectified_flow" (kwargs: ``timestep_sampling``, ``shift``), "epsilon", "v_prediction"."""
    check_objective(name)
    if name == "rectified_flow":
        return RectifiedFlow(num_train_timesteps, **kwargs)  # type: ignore[arg-type]
    if kwargs:
        raise ConfigError(f"objective {name!r} takes no options, but got {sorted(kwargs)}")
    cls = EpsilonPrediction if name == "epsilon" else VPrediction
    return cls(num_train_timesteps)


__all__ = ["Objective", "RectifiedFlow", "EpsilonPrediction", "VPrediction", "LossOutput", "make_objective",
           "bucket_losses", "TIMESTEP_SAMPLING"]
