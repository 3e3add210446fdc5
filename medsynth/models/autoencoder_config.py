"""Configuration dataclasses for the stage-1 autoencoder (VQ-GAN) and its discriminator.

Each config validates itself on construction and names the offending value and what would be
valid, so a bad YAML file fails before any tensor is allocated. Presets live at the bottom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from medsynth.errors import ConfigError


def _tuple3(name: str, value: Any) -> tuple[int, int, int]:
    """Accept an int or a 3-sequence of ints (YAML lists) and return a 3-tuple."""
    if isinstance(value, int):
        return (value, value, value)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"expects {name} to be an int or 3 ints, but got {name}={value!r}") from None
    if len(out) != 3:
        raise ConfigError(f"expects {name} to have 3 values (X, Y, Z), but got {name}={value!r}")
    return out  # type: ignore[return-value]


def config_from_dict(cls: type, data: dict[str, Any] | None, section: str) -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys (typos) by name."""
    data = dict(data or {})
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section '{section}'; valid keys are {valid}")
    return cls(**data)


@dataclass
class VQGANConfig:
    """Shape and quantiser settings of :class:`medsynth.models.vqgan.VQGAN`.

    Attributes:
        in_channels: image channels (1 for a single CT/MR contrast).
        channels: feature width per resolution level, finest first. ``len(channels) - 1``
            downsamplings by 2 per axis, so (32, 64, 128) gives a 4x latent and four entries 8x.
        num_res_blocks: residual blocks per level (encoder; the decoder uses the same count).
        norm_num_groups: GroupNorm groups; every entry of ``channels`` must be a multiple.
        attention: self-attention at the lowest resolution. Off by default: at 3D latent grids
            of 16^3+ tokens it costs more memory than it buys in reconstruction quality.
        latent_channels: channels of the latent grid (= codebook vector dimension).
        num_embeddings: codebook size (codes per codebook when ``num_codebooks > 1``).
        num_codebooks: product quantisation: the latent channels are split into this many
            equal groups, each with its own codebook, so a latent voxel carries
            ``num_codebooks * log2(num_embeddings)`` bits. 1 (one codebook over all channels)
            is the original behaviour and the default for exports that lack the field; with
            one codebook a 4x latent has 10 bits per 4^3 voxels at K=1024, too few for fine
            detail. Must divide ``latent_channels``.
        commitment_weight: beta of the commitment loss ``||z - sg(q)||^2``.
        ema_decay: the codebook is updated by exponential moving averages of assigned encoder
            outputs (no codebook gradient): more stable than a learned codebook in bf16/fp16.
        dead_code_threshold: a code whose EMA usage count (assignments per step, smoothed)
            falls below this is "dead" and is restarted from a random encoder output of the
            current batch. With decay 0.99 a code unused for ~300 steps falls from 1 to 0.05;
            higher thresholds restart rarely-used but live codes and churn the codebook.
        patch_size: training patch / default inference window ``(X, Y, Z)``; every entry must
            be a multiple of the downsampling factor.
        dropout: dropout inside residual blocks (0 for reconstruction models).
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    attention: bool = False
    latent_channels: int = 8
    num_embeddings: int = 1024
    num_codebooks: int = 1
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.05
    patch_size: tuple[int, int, int] = (32, 32, 32)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.patch_size = _tuple3("patch_size", self.patch_size)
        if self.in_channels < 1:
            raise ConfigError(f"expects in_channels >= 1, but got in_channels={self.in_channels}")
        if len(self.channels) < 2:
            raise ConfigError(
                f"expects at least 2 entries in channels (one downsampling), but got channels={self.channels}")
        for c in self.channels:
            if c < 1 or c % self.norm_num_groups:
                raise ConfigError(
                    f"expects channels to be multiples of norm_num_groups, but got "
                    f"channels={self.channels} and norm_num_groups={self.norm_num_groups}")
        if self.num_res_blocks < 1:
            raise ConfigError(f"expects num_res_blocks >= 1, but got num_res_blocks={self.num_res_blocks}")
        if self.latent_channels < 1:
            raise ConfigError(f"expects latent_channels >= 1, but got latent_channels={self.latent_channels}")
        if self.num_embeddings < 2:
            raise ConfigError(f"expects num_embeddings >= 2, but got num_embeddings={self.num_embeddings}")
        if self.num_codebooks < 1 or self.latent_channels % self.num_codebooks:
            raise ConfigError(
                f"expects num_codebooks >= 1 dividing latent_channels, but got "
                f"num_codebooks={self.num_codebooks} and latent_channels={self.latent_channels}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"expects 0 < ema_decay < 1, but got ema_decay={self.ema_decay}")
        if self.dead_code_threshold < 0:
            raise ConfigError(f"expects dead_code_threshold >= 0, but got dead_code_threshold={self.dead_code_threshold}")
        if self.commitment_weight < 0:
            raise ConfigError(f"expects commitment_weight >= 0, but got commitment_weight={self.commitment_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"expects 0 <= dropout < 1, but got dropout={self.dropout}")
        f = self.downsample_factor
        if any(p < f or p % f for p in self.patch_size):
            raise ConfigError(
                f"expects every patch_size entry to be a positive multiple of the downsampling factor {f} "
                f"(2^(len(channels)-1)), but got patch_size={self.patch_size}")

    @property
    def downsample_factor(self) -> int:
        """Latent grid is ``input / downsample_factor`` along every axis."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "VQGANConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return config_from_dict(cls, data, "model")


@dataclass
class DiscriminatorConfig:
    """3D patch discriminator (PatchGAN) settings.

    Attributes:
        channels: width of the first conv; doubles per layer.
        num_layers: strided conv layers; the receptive field grows with each (3 -> ~70 voxels).
        norm: "INSTANCE", "GROUP" or "BATCH". Instance norm by default because batches of
            1-2 3D patches make batch statistics meaningless (and need syncing under DDP).
    """

    in_channels: int = 1
    channels: int = 32
    num_layers: int = 3
    norm: str = "INSTANCE"

    def __post_init__(self) -> None:
        valid = ("INSTANCE", "GROUP", "BATCH")
        self.norm = str(self.norm).upper()
        if self.norm not in valid:
            raise ConfigError(f"expects discriminator norm in {valid}, but got norm={self.norm!r}")
        if self.channels < 1 or self.channels % 8:
            raise ConfigError(f"expects discriminator channels to be a positive multiple of 8, but got channels={self.channels}")
        if not 1 <= self.num_layers <= 5:
            raise ConfigError(f"expects 1 <= num_layers <= 5, but got num_layers={self.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "DiscriminatorConfig":
        return config_from_dict(cls, data, "discriminator")


# Presets. tiny: tests and the CPU demo (4x, ~0.3 M params; full-resolution convolutions
# dominate CPU time, so the first level is kept narrow); base: one GPU, 128^3 patches, 4x;
# large: foundation scale (8 GPUs), 8x with attention at the lowest level.
PRESETS: dict[str, VQGANConfig] = {
    "tiny": VQGANConfig(channels=(8, 16, 32), num_res_blocks=1, norm_num_groups=8,
                        latent_channels=8, num_embeddings=256, num_codebooks=4, patch_size=(32, 32, 32)),
    "base": VQGANConfig(channels=(64, 128, 256), num_res_blocks=2, norm_num_groups=32,
                        latent_channels=8, num_embeddings=8192, patch_size=(128, 128, 128)),
    "large": VQGANConfig(channels=(64, 128, 256, 512), num_res_blocks=2, norm_num_groups=32,
                         attention=True, latent_channels=16, num_embeddings=16384,
                         patch_size=(128, 128, 128)),
}


def preset(name: str) -> VQGANConfig:
    """A copy of a named preset (``tiny``, ``base``, ``large``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown autoencoder preset {name!r}; valid presets are {sorted(PRESETS)}")
    return VQGANConfig.from_dict(PRESETS[name].to_dict())


__all__ = ["VQGANConfig", "DiscriminatorConfig", "PRESETS", "preset", "config_from_dict"]
