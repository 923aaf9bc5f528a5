"""The intrinsic gradient norm: the gradient with respect to the normalized parameters.

For a net whose weights ``w_1, …, w_m`` are scale-invariant (``L(c w_i) = L(w_i)``, e.g. the
weights feeding a BatchNorm layer) and ``g`` its other parameters, the loss depends on ``w_i``
only through its direction ``w_i/‖w_i‖``. A stationary point is then one where the gradient with
respect to ``θ̃ = (w_1/‖w_1‖, …, w_m/‖w_m‖, g)`` vanishes; since ``∇L(c w) = ∇L(w)/c``, that
gradient at ``w_i/‖w_i‖`` is ``‖w_i‖ ∇_{w_i} L``, and its squared norm is::

    ‖∇̃L(θ)‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L(θ)‖²  +  Σ_j ‖∇_{g_j} L(θ)‖².

Reference:
    Arora, Li, Lyu, *Theoretical Analysis of Auto Rate-Tuning by Batch Normalization* (ICLR 2019),
    Sec. 2-3 (the convergence theorems bound ``min_{t<T} ‖∇̃L(θ_t)‖``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ..functional import stateless_call
from .base import Probe, StepContext

__all__ = ["IntrinsicGradNorm"]


class IntrinsicGradNorm(Probe):
    """Squared norm of the gradient with respect to the normalized parameters (Arora et al. 2019).

    Records, over the scale-invariant tensors ``w_i`` and the other trainable parameters ``g_j``::

        grad_norm_sq        ‖∇̃L‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L‖² + Σ_j ‖∇_{g_j} L‖²
        si_grad_norm_sq     Σ_i ‖w_i‖² ‖∇_{w_i} L‖²
        other_grad_norm_sq  Σ_j ‖∇_{g_j} L‖²

    (sums in float64; a parameter without a gradient counts as zero).

    Without ``objective`` (cost: cheap) it reads the step's own gradient at ``after_backward``:
    exact for full-batch GD, the minibatch value for SGD. With ``objective``, a list of ``(x, y)``
    batches partitioning the training set (cost: standard), it computes at ``before_step`` the
    gradient of the finite-sum objective ``L(θ) = Σ_k |B_k|/N · L_{B_k}(θ)`` at ``w_t`` with
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

    def _norms(self, si_grads, other_grads) -> dict:
        si = sum(self._sq(w) * (0.0 if g is None else self._sq(g)) for w, g in zip(self.si, si_grads))
        other = sum(0.0 if g is None else self._sq(g) for g in other_grads)
        return {"grad_norm_sq": si + other, "si_grad_norm_sq": si, "other_grad_norm_sq": other}

    def after_backward(self, ctx: StepContext) -> dict | None:
        if self.objective is not None:
            return None
        return self._norms([w.grad for w in self.si], [p.grad for p in self.other])

    def before_step(self, ctx: StepContext) -> dict | None:
        if self.objective is None:
            return None
        model = ctx.model
        live = dict(model.named_parameters())  # the parameters themselves: the gradient flows to them
        params = self.si + self.other
        total = sum(len(y) for _, y in self.objective)
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        with torch.enable_grad():
            for x, y in self.objective:
                loss = F.cross_entropy(stateless_call(model, x, params=live), y) * (len(y) / total)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.to(torch.float64))
        n = len(self.si)
        return self._norms(acc[:n], acc[n:])
