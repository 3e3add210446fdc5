"""MedicalNet 3D ResNet-10 / ResNet-50 backbones (Chen et al. 2019, "Med3D"); pure torch.

Architecture as in Tencent/MedicalNet ``models/resnet.py`` with shortcut type "B" (1x1x1
convolution + BatchNorm on down-sampling shortcuts), which is what the released
``resnet_10*.pth`` and ``resnet_50*.pth`` use: a 7^3 stride-2 stem, max-pool, four stages
where stages 3 and 4 keep the resolution and dilate by 2 and 4 instead of striding. The
segmentation head (``conv_seg``) is not built: features are the global average of the last
stage (the protocol replaces the head by pooling). Parameter names match the release, so its
state_dict (after stripping DataParallel's ``module.`` prefix) loads with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


class BasicBlock3d(nn.Module):
    """Two 3^3 convs; ``(B, C_in, X, Y, Z) -> (B, planes, X/s, Y/s, Z/s)``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck3d(nn.Module):
    """1-3-1 bottleneck, stride on the 3^3 conv; ``(B, C_in, ...) -> (B, 4 * planes, ...)``."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class MedicalNetResNet(nn.Module):
    """MedicalNet backbone: ``(B, 1, X, Y, Z)`` -> ``(B, C, X/8, Y/8, Z/8)``, C = 512 or 2048.

    Args:
        depth: 10 or 50.
    """

    def __init__(self, depth: int = 10) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"MedicalNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        kind, blocks = DEPTHS[depth]
        block: type[BasicBlock3d] | type[Bottleneck3d] = BasicBlock3d if kind == "basic" else Bottleneck3d
        self.depth = depth
        self.feature_dim = 512 * block.expansion
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        in_channels = 64
        # (planes, stride, dilation): stages 3-4 dilate instead of striding, as in the release.
        for index, (planes, stride, dilation) in enumerate(((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)), 1):
            out = planes * block.expansion
            downsample = None
            if stride != 1 or in_channels != out:
                downsample = nn.Sequential(nn.Conv3d(in_channels, out, 1, stride=stride, bias=False),
                                           nn.BatchNorm3d(out))
            layers = [block(in_channels, planes, stride, dilation, downsample)]
            layers += [block(out, planes, 1, dilation) for _ in range(blocks[index - 1] - 1)]
            in_channels = out
            self.add_module(f"layer{index}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        return x
