"""Models with switchable normalization: ``make(name, norm=..., in_shape=..., num_classes=...)``.

=============  ===================================================================================
``mlp``        Flatten, ``depth`` x [Linear, norm, ReLU], Linear classifier.
``convnet``    small VGG-style net: ``stages`` x (``depth`` x [conv3, norm, ReLU], max-pool),
               global average pool, Linear. For 8x8, 1-D (length 40) and 32x32 inputs.
``vgg``        CIFAR-style VGG-11 / VGG-16 (``depth=11|16``), ``width`` = channels of the first stage.
``preresnet``  pre-activation ResNet of depth 6n+2 (20, 32, 56, 110), ``width`` = first stage.
``resnet18``   ResNet-18 in torchvision's layout and parameter names (:mod:`bnlab.models.resnet`).
=============  ===================================================================================

Common options: ``affine`` (norm γ/β on or off), ``freeze_last`` (the classifier is fixed:
no bias, ``requires_grad=False``; with ``affine=False`` and BN every trained weight is then
scale-invariant), ``seed`` (initialization). Layers followed by a norm have no bias; weights use
Kaiming (He) normal initialization, biases start at zero. 1-D inputs ``(C, L)`` use Conv1d, 2-D
inputs ``(C, H, W)`` use Conv2d.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from ..errors import UserError, unknown_name
from .norms import NORMS, check_norm, has_bias_before, is_norm_layer, make_norm, register_norm

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator adding ``builder(*, in_shape, num_classes, norm, affine, **options)`` to ``MODELS``."""

    def deco(fn):
        MODELS[name] = fn
        return fn

    return deco


def make(
    name: str,
    *,
    norm: str = "bn",
    in_shape,
    num_classes: int,
    affine: bool = True,
    freeze_last: bool = False,
    seed: int | None = None,
    **options,
) -> nn.Module:
    """Build model ``name`` with normalization ``norm``.

    Args:
        name: one of ``bnlab.models.MODELS``.
        norm: one of ``bnlab.models.NORMS`` (``none``, ``bn``, ``ln``, ``gn``, ...).
        in_shape: shape of one input, ``(C, L)`` or ``(C, H, W)`` (``mlp`` takes any shape).
        num_classes: outputs of the classifier.
        affine: learnable γ/β in the norm layers.
        freeze_last: fix the classifier (no bias, not trained).
        seed: if given, initialize under ``torch.manual_seed(seed)`` without touching the global RNG.
        **options: model-specific (``width``, ``depth``, ``stages``).

    Raises:
        UserError: unknown model, norm or option, or an input shape the model cannot take.

    Example:
        >>> net = make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10)
    """
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    check_norm(norm)
    builder = MODELS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("in_shape", "num_classes", "norm", "affine")]
    for k in options:
        if k not in accepted:
            raise UserError(f"model {name!r} has no option {k!r}; accepted: {', '.join(accepted)}")
    in_shape = tuple(int(s) for s in in_shape)
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if seed is None:
        model = builder(in_shape=in_shape, num_classes=num_classes, norm=norm, affine=affine, **options)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(in_shape=in_shape, num_classes=num_classes, norm=norm, affine=affine, **options)
    if freeze_last:
        freeze_classifier(model)
    return model


def freeze_classifier(model: nn.Module) -> None:
    """Fix ``model.classifier``: remove its bias and stop training its weight."""
    clf = model.classifier
    clf.bias = None
    clf.weight.requires_grad_(False)


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan-in, ReLU gain) weights for conv/linear layers, zero biases, norm γ=1, β=0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm_layer(m) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The normalization layers of ``model``, in order."""
    return [m for m in model.modules() if is_norm_layer(m)]


from . import convnets as _convnets  # noqa: E402,F401  (registers the models)
from . import noisy as _noisy  # noqa: E402,F401  (registers the bn-noisy norm)
from . import linear as _linear  # noqa: E402,F401  (registers the dln model)
from . import resnet as _resnet  # noqa: E402,F401  (registers resnet18, torchvision's layout)

__all__ = ["MODELS", "NORMS", "make", "register_model", "register_norm", "make_norm", "norm_layers", "kaiming_init", "freeze_classifier", "has_bias_before", "is_norm_layer"]
