"""Cheap probes every run can afford: norms of weights and gradients, the learning rate.

The norms are sums of squares accumulated in float64 (:func:`bnlab.probes._reduce.sumsq64`: no
float64 copy of a large tensor, one host synchronization per record, values shared with the other
probes of the step): one read of the tensors. Measured on ResNet-18 (batch 32, CPU, one thread;
``benchmarks/probe_overhead.py``): ``GradNorm`` and ``WeightNorm`` 1.03-1.045x a bare step each,
``LearningRate`` within the noise (the monitor alone: 1.00-1.014x).
"""

from __future__ import annotations

import math

from ._reduce import step_cache, sumsq64
from .base import Probe, StepContext


def _global_norm(tensors, cache: dict | None = None) -> float:
    """``sqrt(Σ_t ‖t‖²)`` over the tensors that are not ``None`` (0 for none), accumulated in float64."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return 0.0
    return math.sqrt(float(sumsq64(tensors, cache).sum()))


class GradNorm(Probe):
    """‖∇L_B(w_t)‖₂ = sqrt(Σ_p ‖∂L_B/∂p‖²) over all trainable parameters, read at ``after_backward`` (cost: cheap)."""

    name = "grad_norm"

    def after_backward(self, ctx: StepContext) -> dict:
        return {"total": _global_norm((p.grad for p in ctx.model.parameters() if p.requires_grad), step_cache(ctx))}


class WeightNorm(Probe):
    """‖w_{t+1}‖₂ = sqrt(Σ_p ‖p‖²) over all trainable parameters, read at ``after_step`` (cost: cheap)."""

    name = "weight_norm"

    def after_step(self, ctx: StepContext) -> dict:
        return {"total": _global_norm((p for p in ctx.model.parameters() if p.requires_grad), step_cache(ctx))}


class LearningRate(Probe):
    """The learning rate of each optimizer parameter group at this step (cost: cheap)."""

    name = "lr"

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.optimizer is None:
            return {}
        return {str(i): float(g["lr"]) for i, g in enumerate(ctx.optimizer.param_groups)}
