"""Loss landscape along the step's gradient: loss band, gradient predictiveness, β-smoothness.

A thin adapter of :func:`bnlab.landscape.probe_model_along_gradient` to the training loop. At the
``after_backward`` event of step ``t`` (weights ``w_t``, ``.grad = g = ∇L_B(w_t)`` on the step's
batch ``B``) it probes the points ``w_t - s g`` for the step sizes ``s`` of a grid and records::

    loss_min, loss_max   = [min, max] of L_B over {w_t} ∪ {w_t - s g}          (loss landscape)
    grad_diff_min/max    = [min_s, max_s] ‖∇L_B(w_t) - ∇L_B(w_t - s g)‖₂     (gradient predictiveness)
    beta                 = max_s ‖∇L_B(w_t) - ∇L_B(w_t - s g)‖₂ / ‖s g‖₂    (effective β-smoothness)

plus ``loss`` (``L_B(w_t)``), ``grad_norm`` (``‖g‖₂``) and ``s_max`` (the largest step size).

The probe evaluates the loss as a function of the parameters with
:func:`torch.func.functional_call` and copies of the buffers (train-mode BatchNorm normalizes each
probe point with the batch's own statistics, as the training step did, and updates no running
statistic; a ``bn-noisy`` layer replays the noise of the step), so the model, its buffers,
``.grad`` and the RNG are left exactly as they were.

Batches may be ``(x, y)`` or Hugging Face dicts (:mod:`bnlab.adapters`; without ``loss_fn`` a dict
batch uses the model's own ``output.loss``). With dropout in train mode every probe point replays
the training pass's masks: through ``Monitor`` the probe starts each evaluation from the RNG state
taken at ``before_step`` (``StepContext.rng``), before the step's forward pass, so ``g``,
``L_B(w_t)`` and the probe points are one deterministic function of the weights. This holds when
nothing draws random numbers between ``before_step`` and the forward pass, and the forward draws
them in the same order at every call (``nn.Dropout``; attention dropout only on the math
backend, which the probe uses). Called without a context (``ctx.rng`` is ``None``) the masks are
drawn from the RNG state at the probe, and ``grad_diff`` at small ``s`` then includes the
difference between two draws.

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, section 3.1 and figure 4.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from ..adapters import default_loss_fn

from ..errors import UserError
from ..landscape import probe_model_along_gradient
from .base import Probe, StepContext

__all__ = ["LandscapeProbe", "step_size_grid", "step_gradient"]


def step_size_grid(lr: float, k: int = 8, max_lr_multiple: float = 4.0) -> list[float]:
    """``k`` evenly spaced step sizes up to ``max_lr_multiple · lr``: ``s_j = j · max_lr_multiple · lr / k``.

    The default grid of :class:`LandscapeProbe`: for ``k = 8`` and 4x the learning rate,
    ``s = lr · (0.5, 1, 1.5, ..., 4)``. (Santurkar et al. move up to about 4x the training LR
    along the gradient; REFERENCES.md marks the exact range "(check)".)

    Example:
        >>> step_size_grid(0.1, k=4, max_lr_multiple=2.0)
        [0.05, 0.1, 0.15..., 0.2]
    """
    if not (lr > 0 and max_lr_multiple > 0):
        raise UserError(f"step-size grid needs lr > 0 and max_lr_multiple > 0, got {lr!r}, {max_lr_multiple!r}")
    if not (isinstance(k, int) and k >= 1):
        raise UserError(f"step-size grid needs k >= 1 points, got {k!r}")
    return [lr * max_lr_multiple * j / k for j in range(1, k + 1)]


def step_gradient(model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """``{name: p.grad}`` of the trainable parameters (zeros where ``.grad`` is ``None``), or
    ``None`` when no parameter has a gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(p.grad is not None for _, p in named):
        return None
    return {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p)) for n, p in named}


class LandscapeProbe(Probe):
    """Loss band, gradient-predictiveness band and β_eff along the step's gradient (cost: standard).

    At ``after_backward`` of a scheduled step: ``k`` loss-and-gradient evaluations at
    ``w_t - s g`` on the step's batch (one ``vmap`` call for small nets, see
    :mod:`bnlab.landscape`). Records ``loss``, ``loss_min``, ``loss_max``, ``grad_diff_min``,
    ``grad_diff_max``, ``beta``, ``grad_norm``, ``s_max`` (module docstring). With ``keep``,
    ``self.history`` holds ``(step, bnlab.landscape.GradientLineScan)`` with the per-point values.

    Args:
        every: steps to measure at (an int ``n``: steps 0, n, 2n, ...).
        step_sizes: fixed step sizes ``s``; default (``None``) the grid
            :func:`step_size_grid` of the optimizer's current learning rate (first group).
        k: points of the default grid.
        max_lr_multiple: the default grid reaches ``max_lr_multiple · lr``.
        vectorize: ``True``, ``False`` or ``"auto"`` (see :func:`bnlab.landscape.probe_along_gradient`).
        keep: keep the full results in ``history``.
        name: metric prefix.

    Example:
        >>> probe = LandscapeProbe(every=25)
        >>> h = train(net, data, opt, steps=500, probes=[probe])
        >>> h.series("landscape/beta")

    Reference:
        Santurkar et al., NeurIPS 2018, sec. 3.1, figure 4.
    """

    name = "landscape"
    cost = "standard"

    def __init__(
        self,
        every: Union[int, Callable[[int], bool]] = 10,
        step_sizes: Optional[Sequence[float]] = None,
        *,
        k: int = 8,
        max_lr_multiple: float = 4.0,
        vectorize: Union[bool, str] = "auto",
        keep: bool = False,
        name: str = "landscape",
    ):
        super().__init__(every)
        if step_sizes is not None:
            step_sizes = [float(s) for s in step_sizes]
            if not step_sizes:
                raise UserError("LandscapeProbe: step_sizes must hold at least one value")
        else:
            step_size_grid(1.0, k, max_lr_multiple)  # validates k and the multiple
        self.step_sizes = step_sizes
        self.k = k
        self.max_lr_multiple = max_lr_multiple
        self.vectorize = vectorize
        self.keep = keep
        self.name = name
        self.history: list = []

    def grid(self, ctx: StepContext) -> list[float]:
        """The step sizes used at this step."""
        if self.step_sizes is not None:
            return list(self.step_sizes)
        if ctx.optimizer is None:
            raise UserError("LandscapeProbe without step_sizes reads the learning rate from the optimizer; none was given")
        return step_size_grid(float(ctx.optimizer.param_groups[0]["lr"]), self.k, self.max_lr_multiple)

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        g = step_gradient(ctx.model)
        if g is None:
            return {}
        steps = self.grid(ctx)
        res = probe_model_along_gradient(
            ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), steps,
            grad=g, loss=ctx.loss, vectorize=self.vectorize, rng=ctx.rng,
        )
        if self.keep:
            self.history.append((ctx.step, res))
        return {
            "loss": res.loss0,
            "loss_min": res.loss_band[0],
            "loss_max": res.loss_band[1],
            "grad_diff_min": res.grad_band[0],
            "grad_diff_max": res.grad_band[1],
            "beta": res.beta_eff,
            "grad_norm": res.grad_norm,
            "s_max": max(steps),
        }
