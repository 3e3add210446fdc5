"""3D VQ-GAN autoencoder: convolutional encoder, vector quantiser, convolutional decoder.

Read top to bottom: leaf blocks first (residual block, down/upsampling, attention), then the
encoder and decoder, then :class:`VQGAN`, which ties them to the quantiser.

Which latent the diffusion stage uses: the *continuous pre-quantisation* encoder output
(:meth:`VQGAN.encode`). Diffusion models a smooth density far better than a lattice of codebook
vectors, and small errors in a sample are snapped back onto the codebook by
:meth:`VQGAN.decode` (``quantize=True``), which is what makes the VQ bottleneck useful at
sampling time (the "VQ-regularised" latent of Rombach et al. 2022, also used by Medical
Diffusion). Quantised embeddings would give the diffusion model a discrete target with no
gradient between codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from medsynth.models.autoencoder_config import VQGANConfig
from medsynth.models.quantizer import GroupedVectorQuantizer, QuantizerOutput, VectorQuantizer


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # eps 1e-6 as in taming/LDM; GroupNorm is batch-size independent, which 3D needs (B=1-2).
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock3d(nn.Module):
    """Pre-activation residual block: GN-SiLU-Conv-GN-SiLU-Conv + (1x1 conv) skip.

    ``(B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample3d(nn.Module):
    """Strided 3x3x3 conv halving each axis: ``(B, C, X, Y, Z) -> (B, C, X/2, Y/2, Z/2)``.

    Learned downsampling keeps more detail than pooling; inputs are multiples of 2 by contract.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Nearest upsampling by 2 then a 3x3x3 conv: ``(B, C, X, Y, Z) -> (B, C, 2X, 2Y, 2Z)``.

    Nearest + conv instead of a transposed conv avoids checkerboard artefacts.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention3d(nn.Module):
    """Single-head self-attention over all voxels (used only at the lowest resolution).

    ``(B, C, X, Y, Z) -> (B, C, X, Y, Z)``; torch SDPA picks flash/memory-efficient kernels.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *s = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (t c) x y z -> t b 1 (x y z) c", t=3)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, N, C)
        h = rearrange(h, "b 1 (x y z) c -> b c x y z", x=s[0], y=s[1], z=s[2])
        return x + self.proj(h)


class Encoder3d(nn.Module):
    """``(B, in_channels, X, Y, Z) -> (B, latent_channels, X/f, Y/f, Z/f)``, f = 2^(levels-1)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, g = cfg.channels, cfg.norm_num_groups
        self.conv_in = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        prev = ch[0]
        for level, width in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3d(prev, width, g, cfg.dropout))
                prev = width
            if level < len(ch) - 1:
                blocks.append(Downsample3d(prev))
        self.down = nn.Sequential(*blocks)
        mid: list[nn.Module] = [ResBlock3d(prev, prev, g, cfg.dropout)]
        if cfg.attention:
            mid += [Attention3d(prev, g), ResBlock3d(prev, prev, g, cfg.dropout)]
        self.mid = nn.Sequential(*mid)
        self.norm_out = _norm(prev, g)
        self.conv_out = nn.Conv3d(prev, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder3d(nn.Module):
    """``(B, latent_channels, x, y, z) -> (B, in_channels, f*x, f*y, f*z)``; mirror of the encoder."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, g = tuple(reversed(cfg.channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        mid: list[nn.Module] = [ResBlock3d(ch[0], ch[0], g, cfg.dropout)]
        if cfg.attention:
            mid += [Attention3d(ch[0], g), ResBlock3d(ch[0], ch[0], g, cfg.dropout)]
        self.mid = nn.Sequential(*mid)
        blocks: list[nn.Module] = []
        prev = ch[0]
        for level, width in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3d(prev, width, g, cfg.dropout))
                prev = width
            if level < len(ch) - 1:
                blocks.append(Upsample3d(prev))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(prev, g)
        self.conv_out = nn.Conv3d(prev, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(nn.Module):
    """3D VQ-GAN generator (the discriminator lives in :mod:`medsynth.models.discriminator`).

    Images are expected in the model intensity space ``[-1, 1]`` (see
    :class:`medsynth.data.transforms.IntensityMapping`); outputs are unbounded (no tanh, so the
    loss sees saturation errors instead of vanishing gradients).
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        # One codebook keeps the original module (and state-dict keys), so exports made before
        # ``num_codebooks`` existed load unchanged.
        self.quantizer: VectorQuantizer | GroupedVectorQuantizer
        if config.num_codebooks == 1:
            self.quantizer = VectorQuantizer(config.num_embeddings, config.latent_channels,
                                             config.commitment_weight, config.ema_decay,
                                             config.dead_code_threshold)
        else:
            self.quantizer = GroupedVectorQuantizer(config.num_codebooks, config.num_embeddings,
                                                    config.latent_channels, config.commitment_weight,
                                                    config.ema_decay, config.dead_code_threshold)
        self.decoder = Decoder3d(config)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_decoder_weight(self) -> torch.Tensor:
        """Weight of the final conv; the adaptive adversarial weight compares gradients here."""
        return self.decoder.conv_out.weight

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem when ``x`` cannot be encoded."""
        f = self.downsample_factor
        if x.ndim != 5:
            raise ValueError(f"expects a (B, C, X, Y, Z) tensor, but got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"expects {self.config.in_channels} input channel(s), but got "
                             f"{x.shape[1]} (tensor shape {tuple(x.shape)})")
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"expects spatial size to be multiples of the downsampling factor {f}, "
                             f"but got {tuple(x.shape[2:])}; pad or use medsynth.models.tiling")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantisation latent: ``(B, C, X, Y, Z) -> (B, L, X/f, Y/f, Z/f)``."""
        self.check_input(x)
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        """Snap a latent ``(B, L, x, y, z)`` onto the codebook(s); ``indices`` is ``(B, x, y, z)``
        with one codebook and ``(B, G, x, y, z)`` with ``num_codebooks = G > 1``."""
        return self.quantizer(z)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """``(B, L, x, y, z) -> (B, C, f*x, f*y, f*z)``; quantises first unless told not to."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expects a (B, {self.config.latent_channels}, x, y, z) latent, "
                             f"but got shape {tuple(z.shape)}")
        if quantize:
            z = self.quantizer(z).quantized
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruct ``x`` ``(B, C, X, Y, Z)``; returns the reconstruction and quantiser output."""
        q = self.quantize(self.encode(x))
        return self.decoder(q.quantized), q


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
