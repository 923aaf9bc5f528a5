"""The intrinsic gradient norm: the gradient with respect to the normalized parameters.

For a net whose weights ``w_1, …, w_m`` are scale-invariant (``L(c w_i) = L(w_i)``, e.g. the
weights feeding a BatchNorm layer) and ``g`` its other parameters, the loss depends on ``w_i``
only through its direction ``w_i/‖w_i‖``. A stationary point is then one where the gradient with
respect to ``θ̃ = (w_1/‖w_1‖, …, w_m/‖w_m‖, g)`` vanishes; since ``∇L(c w) = ∇L(w)/c``, that
gradient at ``w_i/‖w_i‖`` is ``‖w_i‖ ∇_{w_i} L``, and its squared norm is::

    ‖∇̃L(θ)‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L(θ)‖²  +  Σ_j ‖∇_{g_j} L(θ)‖².

The same module checks the lemma behind it, ``⟨∇L(w), w⟩ = 0`` and ``∇L(c w) = ∇L(w)/c``, at
given weights (:func:`scale_lemma_residuals`) and during training (:class:`ScaleLemma`).

Reference:
    Arora, Li, Lyu, *Theoretical Analysis of Auto Rate-Tuning by Batch Normalization* (ICLR 2019),
    Lemma 2.4 and Sec. 2-3 (the convergence theorems bound ``min_{t<T} ‖∇̃L(θ_t)‖``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..adapters import batch_size, compute_loss, default_loss_fn, split_batch
from ..errors import UserError
from ..functional import stateless_call
from .base import Probe, StepContext

__all__ = ["IntrinsicGradNorm", "ScaleLemma", "scale_lemma_residuals"]


class IntrinsicGradNorm(Probe):
    """Squared norm of the gradient with respect to the normalized parameters (Arora et al. 2019).

    Records, over the scale-invariant tensors ``w_i`` and the other trainable parameters ``g_j``::

        grad_norm_sq        ‖∇̃L‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L‖² + Σ_j ‖∇_{g_j} L‖²
        si_grad_norm_sq     Σ_i ‖w_i‖² ‖∇_{w_i} L‖²
        other_grad_norm_sq  Σ_j ‖∇_{g_j} L‖²

    (sums in float64; a parameter without a gradient counts as zero).

    Without ``objective`` (cost: cheap) it reads the step's own gradient at ``after_backward``:
    exact for full-batch GD, the minibatch value for SGD. With ``objective``, a list of ``(x, y)``
    (or dict) batches partitioning the training set (cost: standard), it computes at ``before_step`` the
    gradient of the finite-sum objective ``L(θ) = Σ_k |B_k|/N · L_{B_k}(θ)`` (``L_{B_k}`` with the
    monitor's ``loss_fn``: default ``F.cross_entropy``, the model's own loss on dict batches) at ``w_t`` with
    :func:`torch.autograd.grad` (``.grad`` is not touched), in the model's mode (train mode: each
    ``L_{B_k}`` uses the batch statistics of ``B_k``), through
    :func:`bnlab.functional.stateless_call`: the model, its BN running statistics and the RNG
    are left exactly as they were.

    Args:
        si_params: ``{name: parameter}`` of the scale-invariant tensors (may be empty).
        other_params: the other parameters; those that do not require grad are left out.
        objective: the fixed batches of the objective, or ``None`` (read the step's gradient).
        every: schedule (``step -> bool``) or interval.
        name: metric prefix.

    Example:
        >>> si = {n: p for n, p in net.named_parameters() if n in scale_invariant_names}
        >>> others = [p for n, p in net.named_parameters() if n not in si]
        >>> probes = [IntrinsicGradNorm(si, others, objective=FixedBatches(tr, 64, seed=1).fixed())]
    """

    def __init__(self, si_params: Mapping[str, torch.Tensor], other_params: Iterable[torch.Tensor], *,
                 objective: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None, every=1,
                 name: str = "objective"):
        super().__init__(every)
        self.name = name
        self.cost = "cheap" if objective is None else "standard"
        self.si = list(si_params.values())
        self.other = [p for p in other_params if p.requires_grad]
        self.objective = objective

    @staticmethod
    def _sq(t: torch.Tensor) -> float:
        t = t.detach().to(torch.float64)
        return float(torch.sum(t * t))

    def _norms(self, si_grads, other_grads, cache=None) -> dict:
        # float64 sums of squares without float64 copies, read with one host sync (bnlab.probes._reduce)
        from ._reduce import norms_dot64, sumsq64, wants_dots

        pairs = [(w, g) for w, g in zip(self.si, si_grads) if g is not None]
        others = [g for g in other_grads if g is not None]
        k = len(pairs)
        ws, gs = [w for w, _ in pairs], [g for _, g in pairs]
        if wants_dots(cache, ws):  # ScaleInvariantStats will ask for ⟨w, g⟩: one sweep gives all three
            wg = norms_dot64(ws, gs, cache)
            sq = torch.cat([wg[0], wg[1], sumsq64(others, cache).to(wg.device)]).cpu()
        else:
            sq = sumsq64(ws + gs + others, cache).cpu()
        si = float((sq[:k] * sq[k:2 * k]).sum()) if k else 0.0
        other = float(sq[2 * k:].sum()) if others else 0.0
        return {"grad_norm_sq": si + other, "si_grad_norm_sq": si, "other_grad_norm_sq": other}

    def after_backward(self, ctx: StepContext) -> dict | None:
        if self.objective is not None:
            return None
        from ._reduce import step_cache

        return self._norms([w.grad for w in self.si], [p.grad for p in self.other], step_cache(ctx))

    def before_step(self, ctx: StepContext) -> dict | None:
        if self.objective is None:
            return None
        model = ctx.model
        live = dict(model.named_parameters())  # the parameters themselves: the gradient flows to them
        params = self.si + self.other
        total = sum(batch_size(b) for b in self.objective)
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        with torch.enable_grad():
            for b in self.objective:
                loss_fn = default_loss_fn(b, ctx.loss_fn)
                loss = _batch_loss(model, b, loss_fn, live) * (batch_size(b) / total)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.to(torch.float64))
        n = len(self.si)
        return self._norms(acc[:n], acc[n:])


def _batch_loss(model, batch, loss_fn, params) -> torch.Tensor:
    """The loss on ``batch`` (``(x, y)`` or a dict, :mod:`bnlab.adapters`) at ``params``, through
    :func:`bnlab.functional.stateless_call` (copies of the buffers; the RNG restored, so every
    evaluation draws the same dropout masks)."""
    args, kwargs = split_batch(batch)
    return compute_loss(stateless_call(model, *args, params=params, **kwargs), batch, loss_fn)


# ----------------------------------------------------------------------------- the scale-invariance lemma


def scale_lemma_residuals(model: nn.Module, batch,
                          params: Mapping[str, torch.Tensor], *, scales: Sequence[float] = (0.1, 10.0),
                          loss_fn: Optional[Callable] = None) -> dict[str, tuple[float, float]]:
    """The two residuals of the scale-invariance lemma for each tensor ``w`` of ``params``.

    For a scale-invariant ``w`` (``L(c w) = L(w)`` for every ``c > 0``, all other parameters
    fixed) Arora, Li, Lyu (2019, Lemma 2.4) give ``⟨∇_w L(w), w⟩ = 0`` and
    ``∇_w L(c w) = ∇_w L(w) / c``. This returns, per tensor, the relative residuals::

        orth  = |⟨∇_w L(θ), w⟩| / (‖∇_w L(θ)‖ ‖w‖)
        homog = max_{c in scales} ‖c ∇_w L(θ with w -> c w) − ∇_w L(θ)‖ / ‖∇_w L(θ)‖

    (in float64 from the model's own dtype; ``nan`` where ``∇_w L = 0``). Each is zero for a
    scale-invariant tensor up to round-off and BatchNorm's ``eps`` (``~eps/Var`` with PyTorch's 1e-5),
    and of order one for a tensor that is not. The loss is evaluated on ``batch`` in the model's
    mode through :func:`bnlab.functional.stateless_call`: the model, its buffers and the RNG are
    left exactly as they were. Cost: ``1 + len(params) · len(scales)`` forward/backward passes.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict of model inputs (:mod:`bnlab.adapters`).
        params: ``{key: parameter}``: tensors of ``model`` (matched by identity); the keys name the result.
        scales: the factors ``c`` (positive).
        loss_fn: ``loss_fn(logits, y) -> scalar``; default ``F.cross_entropy`` for ``(x, y)``
            batches, the model's own ``output.loss`` for dict batches.

    Returns:
        ``{key: (orth, homog)}``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3, eps=1e-30), nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> orth, homog = scale_lemma_residuals(net, (x, y), {"w": net[0].weight})["w"]
        >>> orth < 1e-12 and homog < 1e-12
        True
    """
    if any(not (c > 0) for c in scales):
        raise UserError(f"scale_lemma_residuals: scales must be positive, got {list(scales)}")
    live = dict(model.named_parameters())
    by_id = {id(p): n for n, p in live.items()}
    missing = [k for k, p in params.items() if id(p) not in by_id]
    if missing:
        raise UserError(f"scale_lemma_residuals: {missing} are not parameters of the model")
    loss_fn = default_loss_fn(batch, loss_fn)
    keys = list(params)
    names = [by_id[id(params[k])] for k in keys]
    out: dict[str, tuple[float, float]] = {}
    with torch.enable_grad():
        base = {n: p.detach().requires_grad_(n in names) for n, p in live.items()}
        loss = _batch_loss(model, batch, loss_fn, base)
        grads = torch.autograd.grad(loss, [base[n] for n in names])
        for key, n, g in zip(keys, names, grads):
            w = base[n].detach()
            g64, w64 = g.detach().to(torch.float64), w.to(torch.float64)
            gn, wn = float(g64.norm()), float(w64.norm())
            orth = abs(float(torch.sum(g64 * w64))) / (gn * wn) if gn > 0 and wn > 0 else math.nan
            homog = 0.0 if gn > 0 else math.nan
            for c in scales:
                scaled = {m: t.detach() for m, t in base.items()}
                scaled[n] = (c * w).requires_grad_(True)
                (gc,) = torch.autograd.grad(_batch_loss(model, batch, loss_fn, scaled), scaled[n])
                if gn > 0:
                    homog = max(homog, float((c * gc.detach().to(torch.float64) - g64).norm()) / gn)
            out[key] = (orth, homog)
    return out


class ScaleLemma(Probe):
    """Residuals of the scale-invariance lemma at ``w_t`` on the step's batch (cost: standard).

    Records, at ``before_step`` (the weights are ``w_t``; ``.grad`` is not touched), for each tensor
    ``w_i`` of ``params`` the two relative residuals of :func:`scale_lemma_residuals` and their
    largest value over the tensors::

        <key>/orth_residual    |⟨∇L(w), w⟩| / (‖∇L(w)‖ ‖w‖)
        <key>/homog_residual   max_c ‖c ∇L(c w) − ∇L(w)‖ / ‖∇L(w)‖
        all/orth_residual, all/homog_residual   the largest over the tensors (NaN ignored)

    Args:
        params: ``{key: parameter}``, e.g. the scale-invariant groups (may be empty: nothing is recorded).
        scales: the factors ``c`` of the second residual.
        every: schedule (``step -> bool``) or interval.
        name: metric prefix.

    Reference:
        Arora, Li, Lyu, *Theoretical Analysis of Auto Rate-Tuning by Batch Normalization* (ICLR 2019), Lemma 2.4.
    """

    cost = "standard"

    def __init__(self, params: Mapping[str, torch.Tensor], *, scales: Sequence[float] = (0.1, 10.0), every=1,
                 name: str = "lemma"):
        super().__init__(every)
        if "all" in params:
            raise UserError("ScaleLemma: 'all' is reserved for the largest residual; rename that tensor")
        self.name = name
        self.params = dict(params)
        self.scales = tuple(float(c) for c in scales)

    def before_step(self, ctx: StepContext) -> dict | None:
        if not self.params or ctx.batch is None:
            return None
        res = scale_lemma_residuals(ctx.model, ctx.batch, self.params, scales=self.scales,
                                    loss_fn=ctx.loss_fn)
        out: dict = {}
        for key, (orth, homog) in res.items():
            out[f"{key}/orth_residual"] = orth
            out[f"{key}/homog_residual"] = homog
        for kind, i in (("orth", 0), ("homog", 1)):
            vals = [v[i] for v in res.values() if math.isfinite(v[i])]
            out[f"all/{kind}_residual"] = max(vals) if vals else math.nan
        return out
