"""Deep linear networks: ``dln``, registered in :data:`bnlab.models.MODELS`.

Santurkar et al. (2018, sec. 2.2, figure 3b) measure internal covariate shift not only on VGG but
on a 25-layer deep linear network (DLN) trained on synthetic Gaussian data, with and without
BatchNorm. A DLN computes ``f(x) = W_L N_{L-1}(W_{L-1} ⋯ N_1(W_1 x))``: ``depth`` weight layers and
no nonlinearity (with ``norm="none"`` the net is the linear map ``W_L ⋯ W_1``; with ``bn`` each
hidden layer is followed by BatchNorm: for a fixed batch still affine in each example, but no
longer a product of matrices and a nonlinear function of the weights).

**Initialization.** LeCun normal, ``W_ij ~ N(0, 1/fan_in)`` (gain 1, the gain that preserves the
expected squared norm of a vector through a *linear* layer; the He gain √2 of the ReLU models
would grow it by ``2^{(depth-1)/2}``), biases zero, norm ``γ = 1``, ``β = 0``. The paper's width and
initialization are not confirmed *(check)*; ``width`` is configurable.

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, figure 3 (b) (deep linear network).
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import UserError
from . import register_model
from .convnets import Classifier
from .norms import has_bias_before, is_norm_layer, make_norm

__all__ = ["deep_linear", "lecun_init"]


def lecun_init(model: nn.Module) -> None:
    """``W ~ N(0, 1/fan_in)`` for every ``nn.Linear`` (gain 1), zero biases, norm ``γ = 1, β = 0``."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm_layer(m) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("dln")
def deep_linear(*, in_shape, num_classes, norm="none", affine=True, width: int = 32, depth: int = 25) -> nn.Module:
    """Deep linear network: Flatten, ``depth - 1`` x [Linear(``width``; no bias if normalized), norm],
    then the Linear classifier: ``depth`` weight layers, no nonlinearity, LeCun-normal weights.

    Args:
        in_shape: one input's shape (flattened).
        num_classes: outputs.
        norm: the norm after every hidden linear layer (``none``: a plain product of matrices).
        affine: learnable ``γ, β`` in the norm layers.
        width: units of every hidden layer.
        depth: weight layers in total, the classifier included (the paper's DLN has 25), ``>= 2``.

    Example:
        >>> net = bnlab.models.make("dln", norm="bn", in_shape=(1, 8, 8), num_classes=10, width=32, depth=25)
    """
    for k, v in (("width", width), ("depth", depth)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"model 'dln': {k} must be a positive integer, got {v!r}")
    if depth < 2:
        raise UserError(f"model 'dln': depth counts every weight layer (the classifier too) and must be >= 2, got {depth}")
    d_in = math.prod(in_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth - 1):
        layers += [nn.Linear(d_in, width, bias=has_bias_before(norm)), make_norm(norm, width, spatial_dims=0, affine=affine)]
        d_in = width
    model = Classifier(nn.Sequential(*layers), nn.Linear(d_in, num_classes))
    lecun_init(model)
    return model
