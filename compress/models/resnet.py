"""CIFAR-10 ResNets (He et al. 2016, section 4.2) with option-A shortcuts: ResNet-20/32/44/56.

Module and parameter names match the published checkpoints of Idelbayev's
``pytorch_resnet_cifar10`` (``conv1``, ``bn1``, ``layer{1,2,3}.{0..n-1}``, ``linear``), so their
``state_dict`` loads as is once the ``module.`` prefix is stripped. A depth-``6n+2`` network has
``n`` basic blocks per stage; :data:`ARCHS` names the published ones.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; option-A shortcut (subsample + zero-pad channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes
        # activation slots: identities unless activations are fake-quantized (compress.actquant)
        self.act_in: nn.Module = nn.Identity()
        self.act_mid: nn.Module = nn.Identity()

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_in(x)
        out = self.act_mid(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: a 3x3 stem, three stages of ``depth`` basic blocks (16/32/64), linear head.

    ``compress_layers`` is its default layer selection (see :mod:`compress.selection`): every
    conv/linear weight is pruned; only the residual blocks' convolutions are quantized, the stem
    and the classifier staying full precision, as in the seed report; channel pruning removes
    only the channels inside each block (the first conv's outputs): the option-A shortcuts pad
    the residual stream, which keeps its width."""

    compress_layers = {"prune": {"types": ["Conv2d", "Linear"]},
                       "quant": {"types": ["Conv2d"], "include": [r"re:layer\d+\.\d+\.conv\d+"]},
                       "channel": {"types": ["Conv2d"], "include": [r"re:layer\d+\.\d+\.conv1"]}}

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks_per_stage = blocks_per_stage
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @property
    def arch(self) -> str:
        """The architecture's name, ``resnet<6n+2>``."""
        return f"resnet{6 * self.blocks_per_stage + 2}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> ResNet:
    """ResNet-20: 3 blocks per stage, about 0.27M parameters."""
    return ResNet(blocks_per_stage=3, num_classes=num_classes)


def resnet32(num_classes: int = 10) -> ResNet:
    """ResNet-32: 5 blocks per stage, about 0.46M parameters."""
    return ResNet(blocks_per_stage=5, num_classes=num_classes)


def resnet44(num_classes: int = 10) -> ResNet:
    """ResNet-44: 7 blocks per stage, about 0.66M parameters."""
    return ResNet(blocks_per_stage=7, num_classes=num_classes)


def resnet56(num_classes: int = 10) -> ResNet:
    """ResNet-56: 9 blocks per stage, about 0.85M parameters."""
    return ResNet(blocks_per_stage=9, num_classes=num_classes)


ARCHS = {f.__name__: f for f in (resnet20, resnet32, resnet44, resnet56)}


def build(arch: str, num_classes: int = 10) -> ResNet:
    """A fresh network by name (one of :data:`ARCHS`); ``ValueError`` naming the allowed ones."""
    if arch not in ARCHS:
        raise ValueError(f"architecture {arch!r} is not known: use one of {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes)


def arch_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The ``resnet<6n+2>`` whose parameter names ``state_dict`` has (counting the blocks of
    ``layer1``), or None if it is not such a ResNet."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"layer1\.(\d+)\.conv1\.weight", k))}
    if "linear.weight" not in state_dict or not blocks or blocks != set(range(len(blocks))):
        return None
    return f"resnet{6 * len(blocks) + 2}"
