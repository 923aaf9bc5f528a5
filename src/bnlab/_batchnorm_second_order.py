"""Train-mode BatchNorm with a closed-form second derivative, for double-backward HVPs.

PyTorch differentiates BatchNorm's backward (``native_batch_norm_backward``) with a generic
composite of about thirty full-size elementwise operations per layer; on the benchmark CNN of
``benchmarks/landscape.py`` that was ~40 % of a Hessian-vector product. :class:`_BatchNorm` runs
the same fused forward and backward kernels, and differentiates the backward with the closed form
below: five per-channel reductions and two fused outputs.

Per channel, over its ``n = N·∏spatial`` values, with ``μ``, ``σ²`` the batch mean and biased
variance, ``r = (σ² + ε)^(-1/2)``, ``x̂ = (x - μ) r``, ``y = γ x̂ + β``, the backward is::

    gβ = Σ gy,   gγ = Σ gy x̂,   gx = γ r (gy - m₁ - x̂ m₂),   m₁ = mean(gy), m₂ = mean(gy x̂)

Its derivative, for incoming cotangents ``(ggx, ggγ, ggβ)`` of ``(gx, gγ, gβ)``, with
``P = Σ ggx``, ``Q = Σ ggx x̂``, ``K = Σ ggx gy - m₁ P - m₂ Q`` (``= Σ ggx ĝ``), is::

    ∂/∂gy = γ r ggx + x̂ (ggγ - γ r Q/n) + (ggβ - γ r P/n)
    ∂/∂γ  = r K
    ∂/∂x  = r Π(c₁ gy + c₂ ggx) - (γ K r² / n) x̂,   c₁ = ggγ - γ r Q/n,   c₂ = -γ r m₂

where ``Π(u) = u - mean(u) - x̂ mean(x̂ u)`` is the (symmetric) Jacobian of ``x ↦ x̂`` divided
by ``r``: ``dx̂ = r Π(dx)``, ``dr = -r² mean(x̂ dx)``. The tests check it against PyTorch's own
double backward and by ``gradgradcheck`` in float64.

Only the interception of ``torch.nn.functional.batch_norm`` in train mode is affected, and only
inside :func:`second_order_batch_norm`, outside ``torch.func`` transforms and forward-mode AD
(those keep PyTorch's own rules); the running statistics, when given, are updated exactly as
``F.batch_norm`` does (the same kernel). The closed form is for second derivatives only: it is
``once_differentiable``, and a third derivative through it is not supported (PyTorch's own BN
third derivative is not reliable either).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten


def _channel(t: Tensor, dim: int) -> Tensor:
    """A per-channel vector ``[C]`` shaped to broadcast against ``(N, C, *spatial)`` of ``dim`` dims."""
    return t.view(1, -1, *([1] * (dim - 2)))


def _channel_sum(t: Tensor) -> Tensor:
    """``t.sum(dims other than 1)`` for ``(N, C, *)``: reduce the contiguous batch rows first
    (one vectorized pass), then the small ``(C, L)`` remainder; 1.5x faster than ``sum((0, 2, ...))``
    on the CPU for NCHW maps."""
    if t.dim() > 2 and t.is_contiguous():
        return t.view(t.shape[0], -1).sum(0).view(t.shape[1], -1).sum(1)
    return t.sum([0, *range(2, t.dim())])


class _BatchNormBackward(torch.autograd.Function):
    """``(gx, gγ, gβ)`` of train-mode BatchNorm from ``gy`` (PyTorch's fused kernel), with the
    closed-form derivative of the module docstring (11 full-size passes)."""

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor, eps: float):
        # γ's and β's gradients are Σ gy x̂ and Σ gy, the double backward reuses them
        gx, gw, gb = _aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        return gx, gw, gb  # γ's and β's gradients even without them: _BatchNorm drops what it has no use for

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx: Tensor, ggw: Tensor, ggb: Tensor):  # unused outputs' cotangents arrive as zeros
        gy, x, weight, mean, invstd, sum_gy_xh, sum_gy = ctx.saved_tensors
        d = x.dim()
        n = x.numel() // x.shape[1]
        r = invstd
        gr = r if weight is None else weight * r  # γ r
        m1, m2 = sum_gy / n, sum_gy_xh / n
        xh = torch.addcmul(_channel(-mean * r, d), x, _channel(r, d))  # x̂
        P = _channel_sum(ggx)
        Q = _channel_sum(ggx * xh)
        K = _channel_sum(ggx * gy) - m1 * P - m2 * Q
        c1 = ggw - gr * Q / n
        c2 = -gr * m2
        # ∂/∂gy = γ r ggx + x̂ c₁ + (ggβ - γ r P/n)
        g_gy = torch.addcmul(_channel(ggb - gr * P / n, d), xh, _channel(c1, d)).addcmul_(ggx, _channel(gr, d))
        # ∂/∂x = r c₁ gy + r c₂ ggx + x̂ (-γ K r²/n - r (c₁ m₂ + c₂ Q/n)) - r (c₁ m₁ + c₂ P/n)
        a_xh = -gr * K * r / n - r * (c1 * m2 + c2 * Q / n)
        const = -r * (c1 * m1 + c2 * P / n)
        g_x = torch.addcmul(_channel(const, d), xh, _channel(a_xh, d)).addcmul_(gy, _channel(r * c1, d))
        g_x.addcmul_(ggx, _channel(r * c2, d))
        g_w = None if weight is None else r * K
        return g_gy, g_x, g_w, None, None, None


class _BatchNorm(torch.autograd.Function):
    """Train-mode ``F.batch_norm`` (PyTorch's fused kernels; running statistics, when given,
    updated in place by the same kernel) whose backward is :class:`_BatchNormBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = _aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw if weight is not None else None, gb if ctx.has_bias else None, None, None, None, None


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = dict(zip(_BN_ARGS, args))
            a.update(kwargs)
            x = a["input"]
            if (
                a.get("training", False) and x.dim() >= 2 and x.numel() > x.shape[1] and x.is_floating_point()
                and not torch._C._are_functorch_transforms_active()  # vmap/grad/jvp: PyTorch's own rules
                and all(t is None or fwAD.unpack_dual(t).tangent is None for t in (x, a.get("weight"), a.get("bias")))
            ):
                return _BatchNorm.apply(
                    x, a.get("weight"), a.get("bias"), a.get("running_mean"), a.get("running_var"),
                    a.get("momentum", 0.1), a.get("eps", 1e-5),
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def second_order_batch_norm() -> Iterator[None]:
    """Within the block, train-mode ``F.batch_norm`` calls (every ``torch.nn`` BatchNorm layer)
    get the closed-form second derivative of :class:`_BatchNormBackward`; values and first
    derivatives are PyTorch's own kernels."""
    with _Mode():
        yield
