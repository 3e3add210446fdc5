"""The label autoencoder of the label generator: one-hot label maps <-> a small continuous latent.

The label generator makes new label maps (the fourth mask source, see ``docs/masks.md``) the
way the image pipeline makes images: a DiT (:class:`~medsynth.models.dit.DiT3D`, with
``attributes`` for organ-size quantiles and lesion counts) samples a latent, and this
autoencoder decodes it to per-class logits, whose argmax is the label map.

* ``encode``: one-hot ``(B, K, X, Y, Z)`` -> latent ``(B, L, X/f, Y/f, Z/f)`` (continuous: label
  maps are simple enough that a plain autoencoder with a few channels per latent voxel keeps
  them nearly lossless; no codebook is needed and diffusion works on the continuous latent);
* ``decode``: latent -> logits ``(B, K, X, Y, Z)``.

``K`` is the largest label value + 1, so channel ``k`` is label value ``k`` (the ControlNet's
convention); values the dataset does not use are masked out at decoding.

Pure torch: no Lightning, no file IO, no printing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsynth.errors import ConfigError
from medsynth.models.autoencoder_config import config_from_dict

# Names of the label DiT's attributes (DiTConfig.attributes): "volume:liver" is the case's size
# quantile of the liver among training cases, "lesions:liver_lesion" its lesion count.
VOLUME_PREFIX, LESION_PREFIX = "volume:", "lesions:"


@dataclass
class LabelAutoencoderConfig:
    """Shape of :class:`LabelAutoencoder`.

    Attributes:
        num_classes: K, one channel per label value ``0..K-1`` (largest label value + 1).
        channels: widths per resolution, the first at full resolution; each further entry
            halves every axis, so 3 entries give the factor 4 the label DiT expects.
        latent_channels: L, latent channels per latent voxel. 4 keeps a 4^3 block of up to ~10
            classes with room to spare; more makes the DiT's job harder.
        num_groups: GroupNorm groups; every width must be a multiple of it.
    """

    num_classes: int = 10
    channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    num_groups: int = 8

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        for name in ("num_classes", "latent_channels", "num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expects {name} to be an integer >= 1, but got {name}={value!r}")
        if self.num_classes < 2:
            raise ConfigError(f"expects num_classes >= 2 (background and one label), but got "
                              f"num_classes={self.num_classes}")
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise ConfigError(f"expects channels to be a non-empty list of positive integers, but got "
                              f"channels={list(self.channels)}")
        bad = [c for c in self.channels if c % self.num_groups]
        if bad:
            raise ConfigError(f"expects every channel width to be a multiple of num_groups, but got "
                              f"channels={list(self.channels)} and num_groups={self.num_groups}")

    @property
    def downsample_factor(self) -> int:
        """Image voxels per latent voxel along each axis: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "LabelAutoencoderConfig":
        """Inverse of :meth:`to_dict`; unknown keys (typos) raise :class:`ConfigError`."""
        return config_from_dict(cls, dict(data or {}), "autoencoder")


class ResBlock3d(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus the input: ``(B, C, X, Y, Z)`` -> same shape."""

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(num_groups, channels), nn.SiLU(),
                                  nn.Conv3d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(num_groups, channels), nn.SiLU(),
                                  nn.Conv3d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class LabelAutoencoder(nn.Module):
    """One-hot label maps ``(B, K, X, Y, Z)`` <-> latents ``(B, L, X/f, Y/f, Z/f)`` <-> logits ``(B, K, X, Y, Z)``."""

    def __init__(self, config: LabelAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        ch, groups = config.channels, config.num_groups
        encoder: list[nn.Module] = [nn.Conv3d(config.num_classes, ch[0], 3, padding=1), ResBlock3d(ch[0], groups)]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            encoder += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), ResBlock3d(c_out, groups)]
        encoder += [nn.GroupNorm(groups, ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], config.latent_channels, 1)]
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.Conv3d(config.latent_channels, ch[-1], 3, padding=1), ResBlock3d(ch[-1], groups)]
        for c_in, c_out in zip(ch[::-1][:-1], ch[::-1][1:]):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(c_in, c_out, 3, padding=1),
                        ResBlock3d(c_out, groups)]
        decoder += [nn.GroupNorm(groups, ch[0]), nn.SiLU(), nn.Conv3d(ch[0], config.num_classes, 1)]
        self.decoder = nn.Sequential(*decoder)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def check_spatial(self, shape: Sequence[int]) -> None:
        """ConfigError unless every axis of ``(X, Y, Z)`` is a positive multiple of the factor."""
        f = self.downsample_factor
        if len(shape) != 3 or any(s < f or s % f for s in shape):
            fitting = tuple(max(f, -(-int(s) // f) * f) for s in shape)
            raise ConfigError(f"label grid {tuple(shape)} is not a multiple of the label autoencoder factor {f} "
                              f"per axis; pad it to {fitting}")

    def one_hot(self, label: Tensor) -> Tensor:
        """Integer labels ``(B, X, Y, Z)`` -> float one-hot ``(B, K, X, Y, Z)``.

        Raises:
            ConfigError: a value outside ``0..K-1`` (a label the model never saw).
        """
        if label.dtype.is_floating_point or label.dtype == torch.bool or label.ndim != 4:
            raise ConfigError(f"expects integer labels of shape (B, X, Y, Z), but got dtype {label.dtype} "
                              f"and shape {tuple(label.shape)}")
        k = self.config.num_classes
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or hi >= k:
            raise ConfigError(f"label values must lie in 0..{k - 1} (the classes the label autoencoder knows), "
                              f"but got values {lo}..{hi}")
        dtype = self.encoder[0].weight.dtype
        return F.one_hot(label.long(), k).permute(0, 4, 1, 2, 3).to(dtype)  # (B, K, X, Y, Z)

    def encode(self, onehot: Tensor) -> Tensor:
        """``(B, K, X, Y, Z)`` one-hot -> ``(B, L, X/f, Y/f, Z/f)`` latent."""
        if onehot.ndim != 5 or onehot.shape[1] != self.config.num_classes:
            raise ConfigError(f"expects one-hot labels (B, {self.config.num_classes}, X, Y, Z), but got "
                              f"{tuple(onehot.shape)}")
        self.check_spatial(onehot.shape[2:])
        return self.encoder(onehot)

    def decode(self, latent: Tensor) -> Tensor:
        """``(B, L, x, y, z)`` latent -> ``(B, K, x*f, y*f, z*f)`` logits."""
        if latent.ndim != 5 or latent.shape[1] != self.config.latent_channels:
            raise ConfigError(f"expects latents (B, {self.config.latent_channels}, x, y, z), but got "
                              f"{tuple(latent.shape)}")
        return self.decoder(latent)

    def forward(self, onehot: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, K, X, Y, Z)`` -> ``(logits (B, K, X, Y, Z), latent (B, L, X/f, Y/f, Z/f))``."""
        latent = self.encode(onehot)
        return self.decode(latent), latent

    def allowed_logits(self, logits: Tensor, allowed: Sequence[int] | None = None,
                       class_offsets: Sequence[float] | Tensor | None = None) -> Tensor:
        """Logits ``(B, K, X, Y, Z)`` as :meth:`decode_labels` takes their argmax.

        Args:
            allowed: label values that may appear (the dataset's table); the logits of the other
                channels are set to -inf, so the map never holds a value the dataset does not define.
            class_offsets: ``K`` values added to the logits of each class (the volume calibration
                of :func:`medsynth.training.label_generator.fit_class_offsets`); None adds nothing.
        """
        if class_offsets is not None:
            offsets = torch.as_tensor(class_offsets, dtype=logits.dtype, device=logits.device)
            if offsets.shape != (self.config.num_classes,):
                raise ConfigError(f"expects {self.config.num_classes} class offsets (one per label value), but got "
                                  f"shape {tuple(offsets.shape)}")
            logits = logits + offsets[None, :, None, None, None]
        if allowed is not None:
            keep = torch.zeros(self.config.num_classes, dtype=torch.bool, device=logits.device)
            keep[[int(v) for v in allowed]] = True
            logits = logits.masked_fill(~keep[None, :, None, None, None], float("-inf"))
        return logits

    @torch.no_grad()
    def decode_labels(self, latent: Tensor, allowed: Sequence[int] | None = None,
                      class_offsets: Sequence[float] | Tensor | None = None) -> Tensor:
        """Latent ``(B, L, x, y, z)`` -> integer label map ``(B, X, Y, Z)`` (argmax of the logits).

        Args:
            allowed: label values that may appear (see :meth:`allowed_logits`).
            class_offsets: per-class logit offsets (see :meth:`allowed_logits`).
        """
        return self.allowed_logits(self.decode(latent), allowed, class_offsets).argmax(dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


PRESETS: dict[str, LabelAutoencoderConfig] = {
    # tests and the CPU demo: 32^3 label maps -> 4 x 8^3 latents, ~0.19 M parameters (K = 10)
    "tiny": LabelAutoencoderConfig(channels=(8, 16, 32), latent_channels=4, num_groups=4),
    "base": LabelAutoencoderConfig(channels=(32, 64, 128), latent_channels=8, num_groups=16),
}


def preset(name: str, **overrides: Any) -> LabelAutoencoderConfig:
    """A copy of a named preset (``tiny``, ``base``) with ``overrides`` (e.g. ``num_classes``)."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown label autoencoder preset {name!r}; valid presets are {sorted(PRESETS)}")
    return LabelAutoencoderConfig.from_dict({**PRESETS[key].to_dict(), **overrides})


__all__ = ["LabelAutoencoderConfig", "LabelAutoencoder", "ResBlock3d", "PRESETS", "preset", "VOLUME_PREFIX",
           "LESION_PREFIX"]
