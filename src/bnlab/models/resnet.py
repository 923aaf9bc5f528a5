"""ResNet-18 in torchvision's published layout: ``resnet18``, registered in :data:`bnlab.models.MODELS`.

The layout, parameter names and parameter count are those of ``torchvision.models.resnet18``
(He et al. 2016, table 1, "18-layer"), so a user's torchvision model and this one are
interchangeable for bnlab's tools (11,689,512 parameters for 1000 classes with ``norm="bn"``):

* ``conv1`` 7x7 stride 2 (padding 3, no bias), ``bn1``, ``relu``, ``maxpool`` 3x3 stride 2 (padding 1);
* ``layer1`` .. ``layer4``: two :class:`BasicBlock` each with ``width * (1, 2, 4, 8)`` channels
  (64, 128, 256, 512 by default), the first block of ``layer2..4`` with stride 2;
  a block computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))`` with 3x3 convs, and
  ``downsample`` = 1x1 strided conv + norm when the shape changes (else the identity);
* ``avgpool`` (adaptive, to 1), flatten, ``fc``.

Initialization as torchvision: convs He-normal with ``mode="fan_out"``, norm ``γ = 1``, ``β = 0``,
``fc`` PyTorch's default uniform init; ``zero_init_residual=True`` zeroes the last ``γ`` of each block.

``norm`` swaps every norm layer (the names ``bn1``/``bn2`` stay, so parameter names match
torchvision's); with ``norm="none"`` the convs carry a bias, as everywhere in bnlab. 1-D inputs
``(C, L)`` use Conv1d/MaxPool1d. The model answers ``model.classifier`` (the ``fc`` layer, not a
second module: the parameter names are unchanged) so ``freeze_last`` works.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model
from .convnets import _avgpool, _check_positive_int, _conv, _maxpool, _spatial
from .norms import has_bias_before, make_norm

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``."""

    expansion = 1

    def __init__(self, norm: str, c_in: int, c_out: int, stride: int, spatial_dims: int, affine: bool):
        super().__init__()
        conv, bias = _conv(spatial_dims), has_bias_before(norm)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = make_norm(norm, c_out, spatial_dims=spatial_dims, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=bias)
        self.bn2 = make_norm(norm, c_out, spatial_dims=spatial_dims, affine=affine)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=bias),
                                            make_norm(norm, c_out, spatial_dims=spatial_dims, affine=affine))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with :class:`BasicBlock` s; ``layers`` blocks per stage."""

    def __init__(self, *, in_shape, num_classes: int, norm: str = "bn", affine: bool = True,
                 layers=(2, 2, 2, 2), width: int = 64, zero_init_residual: bool = False):
        super().__init__()
        sd = _spatial(in_shape, "resnet18")
        conv, bias = _conv(sd), has_bias_before(norm)
        self.conv1 = conv(in_shape[0], width, 7, stride=2, padding=3, bias=bias)
        self.bn1 = make_norm(norm, width, spatial_dims=sd, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = _maxpool(sd)(kernel_size=3, stride=2, padding=1)
        c = width
        for i, n in enumerate(layers):
            c_out = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(norm, c, c_out, 2 if (i > 0 and j == 0) else 1, sd, affine))
                c = c_out
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = _avgpool(sd)(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and getattr(m.bn2, "weight", None) is not None:
                    nn.init.zeros_(m.bn2.weight)

    @property
    def classifier(self) -> nn.Linear:
        """The last Linear layer (``fc``), under the name the rest of bnlab uses."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, *spatial) -> logits (N, K)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18")
def resnet18(*, in_shape=(3, 32, 32), num_classes=10, norm="bn", affine=True, width: int = 64,
             zero_init_residual: bool = False) -> nn.Module:
    """ResNet-18 in torchvision's layout (see the module docstring); ``width`` = channels of ``layer1``."""
    _check_positive_int("width", width, "resnet18")
    return ResNet(in_shape=tuple(int(s) for s in in_shape), num_classes=num_classes, norm=norm, affine=affine,
                  layers=(2, 2, 2, 2), width=width, zero_init_residual=bool(zero_init_residual))
