"""MaskRefiner3D: a small image-resolution network that sharpens a decoded image where its label
map says the organs are.

Why it exists: the ControlNet conditions the DiT on the mask, but the DiT works on the latent
grid (1/f of the image per axis), and the autoencoder's decoder sees only latents. Whatever the
latent cannot hold, the decoded image cannot show: at 32^3 a spleen a few voxels thick loses
0.05 Dice in the autoencoder's round trip alone (docs/benchmarks/conditioning_ct_160x5_f2.md),
and a lesion of a few voxels comes out faint. When the label map is known (every mask-conditioned
generation), that detail need not travel through the latent: this network reads the decoded image
and the one-hot map at full resolution and adds a correction, trained to turn the autoencoder's
reconstructions of real images back into the real images (as SPADE-style decoders condition on
the layout at every scale, Park et al. 2019).

Shape: ``image (B, 1, X, Y, Z)`` + ``one-hot mask (B, K, X, Y, Z)`` -> refined image
``(B, 1, X, Y, Z)``: a two-level residual UNet (full and half resolution, sizes any multiple of
2) whose last convolution is zero-initialised, so a fresh refiner returns its input unchanged.

Pure torch: no Lightning, no file IO.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsynth.errors import ConfigError
from medsynth.models.autoencoder_config import config_from_dict
from medsynth.models.vqgan import Downsample3d, ResBlock3d, Upsample3d


@dataclass
class MaskRefinerConfig:
    """Shape of :class:`MaskRefiner3D`.

    Attributes:
        num_classes: label values the one-hot mask holds (``max label + 1``; the ControlNet's).
        channels: feature width at full resolution (doubled at half resolution).
        num_res_blocks: residual blocks per level, on the way down and on the way up.
        num_groups: GroupNorm groups; ``channels`` must be a multiple.
    """

    num_classes: int = 2
    channels: int = 16
    num_res_blocks: int = 1
    num_groups: int = 4

    def __post_init__(self) -> None:
        for name in ("num_classes", "channels", "num_res_blocks", "num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expects {name} to be a positive integer, but got {name}={value!r}")
        if self.num_classes < 2:
            raise ConfigError(f"expects num_classes >= 2 (background and one label), but got {self.num_classes}")
        if self.channels % self.num_groups:
            raise ConfigError(f"expects channels to be a multiple of num_groups={self.num_groups}, but got "
                              f"channels={self.channels}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "MaskRefinerConfig":
        return config_from_dict(cls, data, "refiner")


class MaskRefiner3D(nn.Module):
    """``forward(image (B, 1, X, Y, Z), onehot (B, K, X, Y, Z)) -> (B, 1, X, Y, Z)`` (see module
    docstring); ``X, Y, Z`` must be even."""

    def __init__(self, config: MaskRefinerConfig) -> None:
        super().__init__()
        self.config = config
        c, g = config.channels, config.num_groups
        self.stem = nn.Conv3d(1 + config.num_classes, c, 3, padding=1)
        self.down_blocks = nn.ModuleList(ResBlock3d(c, c, g) for _ in range(config.num_res_blocks))
        self.down = Downsample3d(c)
        self.mid_blocks = nn.ModuleList(ResBlock3d(c if i == 0 else 2 * c, 2 * c, g)
                                        for i in range(config.num_res_blocks + 1))
        self.up = Upsample3d(2 * c)
        self.up_blocks = nn.ModuleList(ResBlock3d(3 * c if i == 0 else c, c, g) for i in range(config.num_res_blocks))
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        self.conv_out = nn.Conv3d(c, 1, 3, padding=1)
        # Zero output: a fresh refiner is the identity, so training starts from the decoder's image.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def check_inputs(self, image: Tensor, onehot: Tensor) -> None:
        """ConfigError naming the offending shape when the pair cannot be refined."""
        if image.ndim != 5 or image.shape[1] != 1:
            raise ConfigError(f"expects an image of shape (B, 1, X, Y, Z), but got {tuple(image.shape)}")
        if onehot.shape != (image.shape[0], self.config.num_classes, *image.shape[2:]):
            raise ConfigError(f"expects a one-hot mask of shape {(image.shape[0], self.config.num_classes, *image.shape[2:])} "
                              f"(the refiner's {self.config.num_classes} classes on the image grid), but got "
                              f"{tuple(onehot.shape)}")
        if any(s % 2 for s in image.shape[2:]):
            raise ConfigError(f"expects even spatial sizes, but got {tuple(image.shape[2:])}")

    def forward(self, image: Tensor, onehot: Tensor) -> Tensor:
        self.check_inputs(image, onehot)
        skip = self.stem(torch.cat([image, onehot.to(image.dtype)], dim=1))
        for block in self.down_blocks:
            skip = block(skip)
        h = self.down(skip)
        for block in self.mid_blocks:
            h = block(h)
        h = torch.cat([self.up(h), skip], dim=1)
        for block in self.up_blocks:
            h = block(h)
        return image + self.conv_out(F.silu(self.norm_out(h)))


__all__ = ["MaskRefinerConfig", "MaskRefiner3D"]
