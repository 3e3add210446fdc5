"""RadImageNet ResNet-50 (no head), as converted from the Keras release; pure torch.

The RadImageNet weights (Mei et al. 2022) were trained in Keras; the PyTorch conversion used by
MAISI's 2.5D FID keeps Keras' layout, which differs from torchvision's ResNet-50 in three ways
that matter for loading and for numbers:

* every convolution has a bias (Keras default), and BatchNorm uses ``eps=1.001e-5``;
* the stride of a down-sampling bottleneck sits on its first 1x1 convolution (Keras / Caffe
  "v1" placement), not on the 3x3 one as in torchvision;
* there is no classification head: the output is the last stage's ``(B, 2048, h, w)`` map.

Parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...) match
that conversion, so its state_dict loads with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

KERAS_BN_EPS = 1.001e-5
STAGES: tuple[tuple[int, int, int], ...] = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
"""(planes, blocks, stride) of the four ResNet-50 stages."""


class KerasBottleneck(nn.Module):
    """Bottleneck block, stride on the first 1x1 conv; ``(B, C_in, H, W) -> (B, 4 * planes, H/s, W/s)``."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=stride, bias=True)
        self.bn1 = nn.BatchNorm2d(planes, eps=KERAS_BN_EPS)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes, eps=KERAS_BN_EPS)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(out, eps=KERAS_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=True),
                                            nn.BatchNorm2d(out, eps=KERAS_BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class RadImageNetResNet50(nn.Module):
    """ResNet-50 backbone: ``(B, 3, H, W)`` -> ``(B, 2048, H/32, W/32)`` feature map."""

    feature_dim = 2048

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=KERAS_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        # Keras zero-pads then max-pools; after the ReLU all values are >= 0, so padding with
        # -inf (torch) gives the same result.
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (planes, blocks, stride) in enumerate(STAGES, start=1):
            layers = [KerasBottleneck(in_channels, planes, stride)]
            in_channels = planes * KerasBottleneck.expansion
            layers += [KerasBottleneck(in_channels, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, len(STAGES) + 1):
            x = getattr(self, f"layer{index}")(x)
        return x
