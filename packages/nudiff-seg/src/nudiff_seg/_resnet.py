"""ResNet-18/50 in torchvision's layout (parameter names and shapes), without torchvision.

torchvision's wheels on PyPI do not load beside the CPU build of torch this project pins
(``operator torchvision::nms does not exist``), and only the architecture is needed: a user's
ImageNet weights file saved by torchvision (``resnet50-*.pth``, a plain state dict) loads
into :class:`ResNet` unchanged. HoVer-Net's encoder is this network (issue: nudiff-seg).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ._weights_file import read_state_dict

__all__ = ["ResNet", "resnet18", "resnet50", "load_resnet_weights"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet: ``forward`` gives the 1000 ImageNet logits, :meth:`features`
    the global-average-pooled last stage, (N, 512 * expansion) float.

    Input: (N, 3, H, W) float, ImageNet-normalised RGB, H and W at least 32.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, 1000)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int):  # type: ignore[no-untyped-def]
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the stem and the four stages (strides 4, 4, 8, 16, 32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.stages(x)[-1]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18() -> ResNet:
    """ResNet-18 (11,689,512 parameters, as torchvision's)."""
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50() -> ResNet:
    """ResNet-50 (25,557,032 parameters, as torchvision's)."""
    return ResNet(Bottleneck, (3, 4, 6, 3))


def load_resnet_weights(model: ResNet, path: str | os.PathLike[str]) -> ResNet:
    """Load a torchvision-layout state dict into ``model`` (in place; returns it).

    ``path``: ``.safetensors``, or ``.pth`` / ``.pt`` read with ``weights_only=True`` (a
    file never runs code). A missing, unexpected or misshapen tensor raises an error naming
    the file; ``fc.*`` (backbone-only files) and BatchNorm's ``num_batches_tracked``
    (files from before PyTorch 0.4.1) may be absent.
    """
    return _fit_resnet_state(model, read_state_dict(path), path)


def _fit_resnet_state(model: ResNet, state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> ResNet:
    """:func:`load_resnet_weights` of a file's tensors already read (``path`` names them)."""
    expected = model.state_dict()
    # torchvision files saved before PyTorch 0.4.1 (resnet50-19c8e357.pth) have no BatchNorm
    # step counters, which load_state_dict itself also lets pass
    missing = sorted(
        k for k in set(expected) - set(state) if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")
    )
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"'{path}' is not a torchvision {type(model).__name__} of this depth: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    model.load_state_dict(state, strict=False)
    return model
