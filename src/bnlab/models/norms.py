"""The one registry of normalization layers, chosen by name: ``none | bn | ln | gn | l1 | l2 | linf`` (open to more).

A factory takes ``(num_channels, *, spatial_dims, affine)`` where ``spatial_dims`` is 0 for the
features of a linear layer ``(N, C)``, 1 for ``(N, C, L)`` and 2 for ``(N, C, H, W)``.

* ``bn``: BatchNorm over the batch (and spatial positions) per channel.
* ``ln``: LayerNorm over all features of one example: ``nn.LayerNorm(C)`` on ``(N, C)``;
  ``GroupNorm(1, C)`` on feature maps (normalizes over C and space, per-channel affine).
* ``gn``: GroupNorm with groups of about 4 channels, at most 32 groups.
* ``l1``, ``l2``, ``linf``: BatchNorm with the standard deviation replaced by the average ℓ1, ℓ2,
  ℓ∞ norm of the centred batch activations of each channel (Santurkar et al. 2018, sec. 3.3;
  :mod:`bnlab.models.lp_norm`).
* ``bn-noisy``: BatchNorm followed by per-step noise (:mod:`bnlab.models.noisy`).
* ``none``: ``nn.Identity``; layers before it keep their bias.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import unknown_name

NormFactory = Callable[..., nn.Module]
NORMS: dict[str, NormFactory] = {}


def register_norm(name: str):
    """Decorator adding ``factory(num_channels, *, spatial_dims, affine) -> nn.Module`` to ``NORMS``."""

    def deco(fn: NormFactory) -> NormFactory:
        NORMS[name] = fn
        return fn

    return deco


def check_norm(name: str) -> None:
    """Raise a UserError listing the accepted names unless ``name`` is registered."""
    if name not in NORMS:
        raise unknown_name("norm", name, NORMS)


def make_norm(name: str, num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
    """Build the norm layer ``name`` for ``num_channels`` channels."""
    check_norm(name)
    return NORMS[name](num_channels, spatial_dims=spatial_dims, affine=affine)


def has_bias_before(name: str) -> bool:
    """Whether a layer followed by norm ``name`` should carry a bias (only when nothing normalizes)."""
    return name == "none"


def is_norm_layer(module: nn.Module) -> bool:
    """True for the normalization layers bnlab builds (BatchNorm, LayerNorm, GroupNorm, and registered ones)."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or getattr(module, "is_bnlab_norm", False)


@register_norm("none")
def _none(num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
    return nn.Identity()


@register_norm("bn")
def _bn(num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    return cls(num_channels, affine=affine)


@register_norm("ln")
def _ln(num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
    if spatial_dims == 0:
        return nn.LayerNorm(num_channels, elementwise_affine=affine)
    return nn.GroupNorm(1, num_channels, affine=affine)


def _num_groups(c: int) -> int:
    g = max(1, min(32, c // 4))
    while c % g:
        g -= 1
    return g


@register_norm("gn")
def _gn(num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
    return nn.GroupNorm(_num_groups(num_channels), num_channels, affine=affine)


from . import lp_norm as _lp_norm  # noqa: E402,F401  (registers l1, l2, linf; imports register_norm from here)
