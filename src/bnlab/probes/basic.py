"""Cheap probes every run can afford: norms of weights and gradients, the learning rate."""

from __future__ import annotations

import torch

from .base import Probe, StepContext


def _global_norm(tensors) -> float:
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach()) for t in tensors])))


class GradNorm(Probe):
    """‖∇L_B(w_t)‖₂ over all trainable parameters, read at ``after_backward`` (cost: cheap)."""

    name = "grad_norm"

    def after_backward(self, ctx: StepContext) -> dict:
        return {"total": _global_norm(p.grad for p in ctx.model.parameters() if p.requires_grad)}


class WeightNorm(Probe):
    """‖w_{t+1}‖₂ over all trainable parameters, read at ``after_step`` (cost: cheap)."""

    name = "weight_norm"

    def after_step(self, ctx: StepContext) -> dict:
        return {"total": _global_norm(p for p in ctx.model.parameters() if p.requires_grad)}


class LearningRate(Probe):
    """The learning rate of each optimizer parameter group at this step (cost: cheap)."""

    name = "lr"

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.optimizer is None:
            return {}
        return {str(i): float(g["lr"]) for i, g in enumerate(ctx.optimizer.param_groups)}
