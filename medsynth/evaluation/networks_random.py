"""The weight-free default feature network: a fixed-seed random convolutional projection.

Random convolutional features are a known, if weak, perceptual embedding (they respond to
edges, texture and contrast at several scales). They need no download, are bit-for-bit
deterministic from their seed on CPU, and cost little. Their numbers are comparable only
between medsynth reports made with the same seed and widths, never with published FIDs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
DEFAULT_SEED = 20240601


class RandomProjectionNet(nn.Module):
    """Stride-2 conv + ReLU stages with random He-normal weights drawn from a fixed seed.

    Output: the spatial mean of every stage concatenated, ``(B, sum(widths))``; several scales
    make the embedding sensitive to both global intensity layout and fine texture.

    Args:
        spatial_dims: 2 (slices) or 3 (volumes).
        in_channels: input channels.
        widths: channels per stage.
        seed: weight seed (recorded in reports).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, widths: tuple[int, ...] = DEFAULT_WIDTHS,
                 seed: int = DEFAULT_SEED) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims, self.seed, self.widths = spatial_dims, seed, tuple(widths)
        self.feature_dim = sum(widths)
        # Weights come from our own generator, not the global RNG, so nothing else in the
        # process (or torch's default-init code, which may change between versions) moves them.
        generator = torch.Generator().manual_seed(seed)
        weights = []
        channels = in_channels
        for width in widths:
            shape = (width, channels) + (3,) * spatial_dims
            fan_in = channels * 3 ** spatial_dims
            weights.append(nn.Parameter(torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in),
                                        requires_grad=False))
            channels = width
        self.weights = nn.ParameterList(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, sum(widths))``."""
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        pooled = []
        for weight in self.weights:
            if min(x.shape[2:]) < 2:  # too small to stride again: reuse the last map
                pooled.append(torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype))
                continue
            x = F.relu(conv(x, weight, stride=2, padding=1))
            pooled.append(x.mean(dim=tuple(range(2, x.ndim))))
        return torch.cat(pooled, dim=1)
