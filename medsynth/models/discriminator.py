"""3D patch discriminator (PatchGAN) for the VQ-GAN's adversarial term.

A thin wrapper around MONAI's :class:`~monai.networks.nets.PatchDiscriminator`: MONAI's network
is well tested; the wrapper pins the choices that matter for 3D medical volumes (instance norm
because batches are 1-2 patches, LeakyReLU 0.2) and returns logits only.
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator as _MonaiPatchDiscriminator
from torch import nn

from medsynth.models.autoencoder_config import DiscriminatorConfig


class PatchDiscriminator3d(nn.Module):
    """``(B, C, X, Y, Z) -> (B, 1, x, y, z)`` real/fake logits, one per receptive-field patch."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        norm: str | tuple = config.norm
        if config.norm == "GROUP":
            norm = ("GROUP", {"num_groups": 8})
        elif config.norm == "INSTANCE":
            # affine instance norm: the default has no learnable scale, which weakens D.
            norm = ("INSTANCE", {"affine": True})
        self.net = _MonaiPatchDiscriminator(
            spatial_dims=3, channels=config.channels, in_channels=config.in_channels,
            out_channels=1, num_layers_d=config.num_layers, norm=norm, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # MONAI returns every intermediate feature map (for feature matching); the last is logits.
        return self.net(x)[-1]
