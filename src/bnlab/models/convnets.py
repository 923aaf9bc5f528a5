"""The model builders registered in :data:`bnlab.models.MODELS`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from . import kaiming_init, register_model
from .norms import has_bias_before, make_norm


def _spatial(in_shape: tuple[int, ...], model: str) -> int:
    if len(in_shape) not in (2, 3):
        raise UserError(f"model {model!r} takes inputs of shape (C, L) or (C, H, W), got {in_shape}")
    return len(in_shape) - 1


def _conv(spatial_dims: int):
    return {1: nn.Conv1d, 2: nn.Conv2d}[spatial_dims]


def _maxpool(spatial_dims: int):
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d}[spatial_dims]


def _avgpool(spatial_dims: int):
    return {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[spatial_dims]


class Classifier(nn.Module):
    """A feature extractor followed by ``classifier`` (the last Linear layer)."""

    def __init__(self, features: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, *spatial) -> logits (N, K)
        return self.classifier(torch.flatten(self.features(x), 1))


def _check_positive_int(name: str, value, model: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"model {model!r}: {name} must be a positive integer, got {value!r}")
    return value


@register_model("mlp")
def mlp(*, in_shape, num_classes, norm="bn", affine=True, width: int = 128, depth: int = 3) -> nn.Module:
    """``depth`` hidden layers [Linear(no bias if normalized), norm, ReLU] of ``width`` units."""
    _check_positive_int("width", width, "mlp")
    _check_positive_int("depth", depth, "mlp")
    d_in = math.prod(in_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(d_in, width, bias=has_bias_before(norm)), make_norm(norm, width, spatial_dims=0, affine=affine), nn.ReLU()]
        d_in = width
    model = Classifier(nn.Sequential(*layers), nn.Linear(d_in, num_classes))
    kaiming_init(model)
    return model


def _conv_block(norm: str, c_in: int, c_out: int, spatial_dims: int, affine: bool) -> list[nn.Module]:
    conv = _conv(spatial_dims)(c_in, c_out, 3, padding=1, bias=has_bias_before(norm))
    return [conv, make_norm(norm, c_out, spatial_dims=spatial_dims, affine=affine), nn.ReLU()]


@register_model("convnet")
def convnet(*, in_shape, num_classes, norm="bn", affine=True, width: int = 16, depth: int = 1, stages: int = 3) -> nn.Module:
    """Small VGG-style net: ``stages`` stages of ``depth`` [conv3, norm, ReLU] with ``width * 2**i``
    channels, each stage closed by a 2x max-pool while the spatial size allows, then global
    average pooling and a Linear classifier."""
    sd = _spatial(in_shape, "convnet")
    for k, v in (("width", width), ("depth", depth), ("stages", stages)):
        _check_positive_int(k, v, "convnet")
    c, size = in_shape[0], min(in_shape[1:])
    layers: list[nn.Module] = []
    for i in range(stages):
        c_out = width * 2**i
        for _ in range(depth):
            layers += _conv_block(norm, c, c_out, sd, affine)
            c = c_out
        if size >= 2:
            layers.append(_maxpool(sd)(2))
            size //= 2
    layers.append(_avgpool(sd)(1))
    model = Classifier(nn.Sequential(*layers), nn.Linear(c, num_classes))
    kaiming_init(model)
    return model


_VGG_CFG = {
    11: [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    13: [1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    16: [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"],
    19: [1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"],
}


@register_model("vgg")
def vgg(*, in_shape, num_classes, norm="bn", affine=True, depth: int = 11, width: int = 64) -> nn.Module:
    """CIFAR-style VGG (``depth`` 11, 13, 16 or 19): channel multiples of ``width`` (64 = the
    original 64-128-256-512-512), max-pools skipped once the map is 1 wide, one Linear classifier."""
    sd = _spatial(in_shape, "vgg")
    if depth not in _VGG_CFG:
        raise UserError(f"model 'vgg': depth must be one of {sorted(_VGG_CFG)}, got {depth!r}")
    _check_positive_int("width", width, "vgg")
    c, size = in_shape[0], min(in_shape[1:])
    layers: list[nn.Module] = []
    for item in _VGG_CFG[depth]:
        if item == "M":
            if size >= 2:
                layers.append(_maxpool(sd)(2))
                size //= 2
        else:
            layers += _conv_block(norm, c, width * item, sd, affine)
            c = width * item
    layers.append(_avgpool(sd)(1))
    model = Classifier(nn.Sequential(*layers), nn.Linear(c, num_classes))
    kaiming_init(model)
    return model


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x + conv(relu(norm(conv(relu(norm(x))))))``.

    The shortcut is a strided 1x1 conv when the shape changes.
    """

    def __init__(self, norm: str, c_in: int, c_out: int, stride: int, spatial_dims: int, affine: bool):
        super().__init__()
        conv = _conv(spatial_dims)
        bias = has_bias_before(norm)
        self.norm1 = make_norm(norm, c_in, spatial_dims=spatial_dims, affine=affine)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm2 = make_norm(norm, c_out, spatial_dims=spatial_dims, affine=affine)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=bias)
        self.shortcut = conv(c_in, c_out, 1, stride=stride, bias=bias) if (stride != 1 or c_in != c_out) else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.norm2(out)))
        return out + skip


@register_model("preresnet")
def preresnet(*, in_shape, num_classes, norm="bn", affine=True, depth: int = 20, width: int = 16) -> nn.Module:
    """Pre-activation ResNet (He et al. 2016) of depth 6n+2: a conv, three stages of n blocks
    with ``width``, ``2 width``, ``4 width`` channels (stride 2 between stages while the map is at
    least 2 wide), a final norm + ReLU, global average pooling and a Linear classifier."""
    sd = _spatial(in_shape, "preresnet")
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise UserError(f"model 'preresnet': depth must be 6n+2 (e.g. 20, 32, 56, 110), got {depth!r}")
    _check_positive_int("width", width, "preresnet")
    n = (depth - 2) // 6
    size = min(in_shape[1:])
    layers: list[nn.Module] = [_conv(sd)(in_shape[0], width, 3, padding=1, bias=has_bias_before(norm))]
    c = width
    for stage in range(3):
        c_out = width * 2**stage
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0 and size >= 2) else 1
            if stride == 2:
                size = (size + 1) // 2
            layers.append(PreActBlock(norm, c, c_out, stride, sd, affine))
            c = c_out
    layers += [make_norm(norm, c, spatial_dims=sd, affine=affine), nn.ReLU(), _avgpool(sd)(1)]
    model = Classifier(nn.Sequential(*layers), nn.Linear(c, num_classes))
    kaiming_init(model)
    return model
