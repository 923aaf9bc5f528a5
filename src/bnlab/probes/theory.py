"""Santurkar et al.'s §4 terms during training: Thm 4.1 / Obs. 4.3 and Thm 4.2 at every BN layer.

Thin adapters of :func:`bnlab.theory.gradient_terms` and :func:`bnlab.theory.curvature_terms`,
run at ``after_backward`` of a scheduled step on the step's batch at ``w_t``, on a float64 copy of
the model with BatchNorm ``ε = 0`` (by default), so the model, its buffers, ``.grad`` and the RNG
are untouched. Keys are ``<layer>/<quantity>`` per train-mode ``torch.nn`` BatchNorm layer, plus
the worst case over layers; a net without one records ``layers = 0``.

* :class:`SanturkarTerms` (standard: one forward and one backward pass):
  ``‖∇_y L̂‖² = (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m)`` (Thm 4.1) and the shares of ``‖g‖²`` of the
  two projection terms (Obs. 4.3).
* :class:`SanturkarCurvature` (expensive: per layer two activation-space Hessian graphs and 4–5
  HVPs): ``vᵀ∇²_y L̂ v = (Dv)ᵀH(Dv) − Σ_c γ_c⟨g_c,ŷ_c⟩‖v_c‖²/(mσ_c²)`` (Thm 4.2(a)) and the bound (b)
  with its condition ``(Dv)ᵀH(Dv) ≤ (Dg)ᵀH(Dg)``.

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, §4.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

from ..adapters import default_loss_fn
from ..theory import curvature_terms, gradient_terms
from .base import Probe, StepContext

__all__ = ["SanturkarTerms", "SanturkarCurvature"]

Schedule = Union[int, Callable[[int], bool]]


def _worst(values) -> float:
    vals = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return max(vals) if vals else math.nan


class SanturkarTerms(Probe):
    """Thm 4.1 and Obs. 4.3 at every BN layer (cost: standard).

    Records per layer ``<layer>/gap_eps0`` (worst channel's relative gap of Thm 4.1 at ε = 0),
    ``gap_eps`` (of the ε-corrected form; the same as ``gap_eps0`` when ``eps=0``),
    ``reduction`` (``Σ‖∇_y L̂‖²/Σ‖g‖²``), ``scale`` (``Σ(γ²/σ²)‖g‖²/Σ‖g‖²``, the rescaling alone),
    ``share_mean`` and ``share_dir`` (``Σ⟨1,g⟩²/m`` and ``Σ⟨g,ŷ⟩²/m`` over ``Σ‖g‖²``); and over
    layers ``gap_eps0_max``, ``gap_eps_max``, ``layers``.

    Args:
        every: steps to measure at.
        eps: BatchNorm ``ε`` of the measured float64 copy (0: the theorem's setting; ``None``:
            the layers' own).
        name: metric prefix.

    Example:
        >>> train(net, data, opt, steps=200, probes=[SanturkarTerms(every=20)])
    """

    name = "santurkar"
    cost = "standard"

    def __init__(self, every: Schedule = 10, *, eps: Optional[float] = 0.0, name: str = "santurkar"):
        super().__init__(every)
        self.eps = eps
        self.name = name

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        terms = gradient_terms(ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), eps=self.eps)
        out: dict = {"layers": float(len(terms))}
        rows = {}
        for layer, t in terms.items():
            s = t.summary()
            rows[layer] = s
            for k in ("gap_eps0", "gap_eps", "reduction", "scale", "share_mean", "share_dir"):
                out[f"{layer}/{k}"] = float(s[k])
        if rows:
            out["gap_eps0_max"] = _worst(r["gap_eps0"] for r in rows.values())
            out["gap_eps_max"] = _worst(r["gap_eps"] for r in rows.values())
        return out


class SanturkarCurvature(Probe):
    """Thm 4.2(a) and (b) at every BN layer from activation-space HVPs (cost: expensive).

    Records per layer ``<layer>/lhs`` (``vᵀ∇²_y L̂ v``), ``rhs_a``, ``gap_a`` (relative, at ε = 0),
    ``gap_a_eps`` (the ε-corrected form), ``rhs_b``, ``condition_b`` and ``holds_b`` (1/0),
    ``curv_in`` (``vᵀ∇²_y L̂ v/‖v‖²``) and ``curv_out`` (``gᵀHg/‖g‖²``); over layers
    ``gap_a_max``, ``condition_b_count``, ``holds_b_count``, ``b_fails_under_condition`` (layers
    where the condition holds and (b) does not) and ``layers``.

    Args:
        every: steps to measure at.
        eps: BatchNorm ``ε`` of the measured float64 copy.
        name: metric prefix.

    Example:
        >>> train(net, data, opt, steps=200, probes=[SanturkarCurvature(every=50)])
    """

    name = "santurkar_hess"
    cost = "expensive"

    def __init__(self, every: Schedule = 10, *, eps: Optional[float] = 0.0, name: str = "santurkar_hess"):
        super().__init__(every)
        self.eps = eps
        self.name = name

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        terms = curvature_terms(ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), eps=self.eps)
        out: dict = {"layers": float(len(terms))}
        for layer, t in terms.items():
            s = t.summary()
            for k in ("lhs", "rhs_a", "gap_a", "gap_a_eps", "rhs_b", "condition_b", "holds_b", "curv_in", "curv_out"):
                out[f"{layer}/{k}"] = float(s[k])
        if terms:
            out["gap_a_max"] = _worst(float(t.summary()["gap_a"]) for t in terms.values())
            out["condition_b_count"] = float(sum(t.condition_b for t in terms.values()))
            out["holds_b_count"] = float(sum(t.holds_b for t in terms.values()))
            out["b_fails_under_condition"] = float(sum(t.condition_b and not t.holds_b for t in terms.values()))
        return out
