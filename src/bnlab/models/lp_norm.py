"""``l1``, ``l2``, ``linf``: BatchNorm with the standard deviation replaced by an ℓp average.

Santurkar et al. (2018, sec. 3.3, "Is BatchNorm the best (only?) way to smoothen the landscape?")
keep BatchNorm's centring and replace its division by the standard deviation with a division by
an average ℓp norm of the centred activations, p = 1, 2, ∞. The distributions of the normalized
activations are then no longer controlled (their variance is not fixed for p ≠ 2), yet the
landscape is as smooth and training as fast as with BatchNorm: the paper's evidence that
distributional stability is not what BN's benefit rests on.

**Definition** (per channel ``c``, as BatchNorm; REFERENCES.md §6 marks per-channel versus
per-layer *(check)*, so both are available, see ``per``). Let ``x`` have shape
``(N, C, *spatial)``, ``m = N·|spatial|`` the activations of one channel in the batch, and::

    μ_c   = (1/m) Σ_i x_ic                               (the batch mean, as BN)
    s_c^p = (1/m) Σ_i |x_ic - μ_c|^p                     (p < ∞: the power mean of order p)
    s_c   = max_i |x_ic - μ_c|                           (p = ∞)
    y_ic  = γ_c (x_ic - μ_c) / √(s_c² + ε) + β_c

The "average ℓp norm" is the norm divided by ``m^{1/p}`` (the power mean), so that ``s`` does not
grow with the batch size for p < ∞ and p = 2 is exactly BatchNorm's biased standard deviation
(``l2`` equals ``bn`` in train mode, up to round-off: a unit test). ``ε`` enters as BN's does, under
the square root, for every p. With ``per="layer"`` the average runs over all channels too (one
``μ`` per channel still, one ``s`` per layer), the other reading of the paper: the relative scales
of the channels are then kept and nothing fixes a channel's spread.

**Running statistics.** In train mode (with ``track_running_stats``) the layer keeps running
averages, as BatchNorm's ``momentum`` does, of ``μ`` in ``running_mean`` and of ``s²`` in
``running_var`` (the names BatchNorm uses, so that every bnlab tool that treats BN's buffers
specially treats these the same way: :func:`bnlab.curvature.model_loss_closure` gives them
``None`` in train mode, the sweep stacks them). ``running_var`` holds the plain batch value of
``s²`` (no Bessel correction, which has no analogue for p ≠ 2; so ``l2``'s eval mode differs from
BN's by the factor ``m/(m-1)`` inside the root). In eval mode, and in train mode when the buffers
are ``None``, the layer normalizes with them / with the batch statistics exactly as
:class:`torch.nn.BatchNorm2d` does.

**Differentiability.** Every operation is an autograd primitive (mean, abs, pow, amax, rsqrt), so
Hessian-vector products (double backward) and ``torch.func`` transforms (``vmap``, ``grad``) go
through the layer. ``|·|`` (p = 1) and ``max`` (p = ∞) are differentiable almost everywhere (the
gradient of ``max`` goes to the extreme activation; ties share it evenly, as ``amax`` does).

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, section 3.3 and appendix (ℓp normalization).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import UserError
from .norms import register_norm

__all__ = ["LpBatchNorm", "lp_scale", "register_lp_norm", "LP_NORMS"]

#: The registered ℓp norms: name -> p.
LP_NORMS: dict[str, float] = {"l1": 1.0, "l2": 2.0, "linf": math.inf}

_PER = ("channel", "layer")


def _check_p(p) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise UserError(f"lp norm: p must be a number >= 1 or inf, got {p!r}") from None
    if not p >= 1:  # also rejects nan
        raise UserError(f"lp norm: p must be a number >= 1 or inf, got {p!r}")
    return p


def lp_scale(xc: Tensor, p: float, dims: tuple[int, ...]) -> Tensor:
    """The average ℓp norm of ``xc`` over ``dims`` (kept, size 1): ``((1/m) Σ |xc|^p)^{1/p}``, or ``max |xc|`` for p = ∞.

    ``m`` is the number of entries reduced. For p = 2 this is the biased standard deviation of
    centred data.

    Example:
        >>> lp_scale(torch.tensor([[1.0], [-3.0]]), 1.0, (0,))
        tensor([[2.]])
    """
    if math.isinf(p):
        return xc.abs().amax(dim=dims, keepdim=True)
    if p == 2.0:
        return xc.pow(2).mean(dim=dims, keepdim=True).sqrt()
    if p == 1.0:
        return xc.abs().mean(dim=dims, keepdim=True)
    return xc.abs().pow(p).mean(dim=dims, keepdim=True).pow(1.0 / p)


def _scale_sq(xc: Tensor, p: float, dims: tuple[int, ...]) -> Tensor:
    """``s²`` of :func:`lp_scale` (for p = 2 without the square root, so twice differentiable at any ``xc``)."""
    if p == 2.0:
        return xc.pow(2).mean(dim=dims, keepdim=True)
    return lp_scale(xc, p, dims).pow(2)


class LpBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the standard deviation replaced by the average ℓp norm of the centred batch.

    ``y = γ (x - μ) / √(s² + ε) + β`` with ``μ`` the batch mean per channel and ``s`` the power mean
    of order ``p`` of ``|x - μ|`` (the maximum for p = ∞) over the batch and spatial positions of
    each channel (``per="channel"``) or of the whole layer (``per="layer"``); see the module
    docstring for the equations, the running statistics and the eval mode.

    Args:
        num_features: channels ``C``.
        p: the order, a number ``>= 1`` or ``math.inf``.
        spatial_dims: 0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``, 3 for volumes.
        affine: learnable ``γ, β``.
        per: ``"channel"`` (one ``s`` per channel, as BN's σ) or ``"layer"`` (one ``s`` per layer).
        eps, momentum, track_running_stats: as in :class:`torch.nn.BatchNorm2d`.

    Raises:
        UserError: ``p < 1``, an unknown ``per`` or ``spatial_dims``.

    Example:
        >>> norm = LpBatchNorm(8, p=1, spatial_dims=2)
        >>> y = norm(torch.randn(16, 8, 4, 4))   # each channel: mean 0, mean |y| ≈ 1
    """

    is_bnlab_norm = True

    def __init__(
        self,
        num_features: int,
        p: float = 2.0,
        *,
        spatial_dims: int = 2,
        affine: bool = True,
        per: str = "channel",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        track_running_stats: bool = True,
    ):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
        if spatial_dims not in (0, 1, 2, 3):
            raise UserError(f"lp norm: spatial_dims must be 0, 1, 2 or 3, got {spatial_dims!r}")
        if per not in _PER:
            raise UserError(f"lp norm: per must be one of {', '.join(_PER)}, got {per!r}")
        self.p = _check_p(p)
        self.spatial_dims = spatial_dims
        self.per = per

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != self.spatial_dims + 2:
            raise ValueError(f"LpBatchNorm(spatial_dims={self.spatial_dims}) expects {self.spatial_dims + 2}-D input, got {input.dim()}-D")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p:g}, spatial_dims={self.spatial_dims}, per={self.per}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        c = self.num_features
        view = (1, c) + (1,) * (input.dim() - 2)
        if batch_stats:
            # channel-major (C, m): the reductions run over contiguous rows (~1.4x faster on the CPU
            # than reducing dims (0, 2, ...) in place, forward and backward)
            xt = input.transpose(0, 1).reshape(c, -1)
            mu = xt.mean(1, keepdim=True)
            s2 = _scale_sq(xt - mu, self.p, (1,) if self.per == "channel" else (0, 1)).expand(c, 1)
            mu, s2 = mu.view(c), s2.reshape(c)
            if self.training and self.running_mean is not None and self.running_var is not None:
                with torch.no_grad():
                    self.running_mean.mul_(1.0 - factor).add_(mu.detach(), alpha=factor)
                    self.running_var.mul_(1.0 - factor).add_(s2.detach(), alpha=factor)
        else:
            mu, s2 = self.running_mean, self.running_var
        # y = γ (x - μ)/√(s² + ε) + β = x·a + (β - μ·a) with a = γ/√(s² + ε): one pass over x
        a = torch.rsqrt(s2 + self.eps)
        if self.weight is not None:
            a = a * self.weight
        shift = -mu * a
        if self.bias is not None:
            shift = shift + self.bias
        return torch.addcmul(shift.view(view), input, a.view(view))


def register_lp_norm(name: str, p: float, *, per: str = "channel"):
    """Register the ℓp batch normalization of order ``p`` as norm ``name`` (e.g. ``"l3"``, or ``"l1-layer"`` with ``per="layer"``)."""
    p = _check_p(p)
    if per not in _PER:
        raise UserError(f"lp norm: per must be one of {', '.join(_PER)}, got {per!r}")

    @register_norm(name)
    def _factory(num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
        return LpBatchNorm(num_channels, p, spatial_dims=spatial_dims, affine=affine, per=per)

    return _factory


for _name, _p in LP_NORMS.items():
    register_lp_norm(_name, _p)
