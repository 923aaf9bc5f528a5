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

import abc
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


class _SanturkarProbe(Probe, abc.ABC):
    """What both probes share: the schedule, the float64 copy's ``ε``, and one row per BN layer."""

    _keys: tuple[str, ...] = ()
    _worst_key: str = ""

    def __init__(self, every: Schedule = 10, *, eps: Optional[float] = 0.0, name: Optional[str] = None):
        super().__init__(every)
        self.eps = eps
        self.name = name or type(self).name

    @abc.abstractmethod
    def _terms(self, ctx: StepContext) -> dict:
        """``{layer: terms}`` of the step's batch (each with a ``summary()``)."""

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        rows = {layer: t.summary() for layer, t in self._terms(ctx).items()}
        out: dict = {"layers": float(len(rows))}
        for layer, row in rows.items():
            for k in self._keys:
                out[f"{layer}/{k}"] = float(row[k])
        if rows:
            for k in self._worst_key.split():
                out[f"{k}_max"] = _worst(float(r[k]) for r in rows.values())
            self._over_layers(rows, out)
        return out

    def _over_layers(self, rows: dict, out: dict) -> None:
        """More summaries over the layers' rows (none by default)."""


class SanturkarTerms(_SanturkarProbe):
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
    _keys = ("gap_eps0", "gap_eps", "reduction", "scale", "share_mean", "share_dir")
    _worst_key = "gap_eps0 gap_eps"

    def _terms(self, ctx: StepContext) -> dict:
        return gradient_terms(ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), eps=self.eps)


class SanturkarCurvature(_SanturkarProbe):
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
    _keys = ("lhs", "rhs_a", "gap_a", "gap_a_eps", "rhs_b", "condition_b", "holds_b", "curv_in", "curv_out")
    _worst_key = "gap_a"

    def _terms(self, ctx: StepContext) -> dict:
        return curvature_terms(ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), eps=self.eps)

    def _over_layers(self, rows: dict, out: dict) -> None:
        cond = [bool(r["condition_b"]) for r in rows.values()]
        holds = [bool(r["holds_b"]) for r in rows.values()]
        out["condition_b_count"] = float(sum(cond))
        out["holds_b_count"] = float(sum(holds))
        out["b_fails_under_condition"] = float(sum(c and not h for c, h in zip(cond, holds)))
