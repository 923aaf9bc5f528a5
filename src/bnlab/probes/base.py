"""The probe interface: measurements read at fixed events of a training step, never changing it.

Events of one optimizer step ``t`` (0-based), in order::

    before_step      the batch is known, weights are w_t, .grad is stale
    after_backward   loss and .grad = ∇L_B(w_t) are known, weights still w_t
    after_step       the optimizer has moved the weights to w_{t+1}
    on_eval          after an evaluation pass (train/test loss and accuracy)

A probe returns a dict of numbers from any event (or ``None``); the :class:`~bnlab.monitor.Monitor`
prefixes the keys with the probe's ``name`` and writes them into that step's metrics record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

COST_CLASSES = ("cheap", "standard", "expensive")


@dataclass
class StepContext:
    """What a probe may read at an event.

    Attributes:
        step: index of the optimizer step (0-based).
        model: the model being trained.
        optimizer: its optimizer (read ``param_groups`` for the learning rate).
        batch: the batch of this step as the loop gave it, or ``None`` when unknown: ``(x, y)``
            (the model is called as ``model(x)``) or a dict of model inputs, Hugging Face style
            (``model(**batch)``, labels under ``"labels"``). Probes read it only through
            :mod:`bnlab.adapters` (``split_batch``, ``forward``, ``labels_of``, ``batch_size``).
        loss: the loss of this step as a detached tensor, once known.
        loss_fn: ``loss_fn(logits, y) -> scalar``, for probes that evaluate the loss elsewhere;
            ``None``: :func:`bnlab.adapters.default_loss_fn` (``F.cross_entropy`` on ``(x, y)``,
            the model's own ``output.loss`` on a dict batch). The logits are
            :func:`bnlab.adapters.logits_of` the output (a tensor, a dict, a ``ModelOutput``).
        metrics: at ``on_eval``, the evaluation metrics (e.g. ``test_acc``).
        scratch: per-step storage shared by the probes (cleared at each ``before_step``).
        rng: the random-number state at ``before_step``, when the step's forward pass has not
            run yet: ``(CPU state, [(CUDA device, its state), ...])``, or ``None``. A probe that
            re-evaluates the step's loss (``LandscapeProbe``) replays it, so that dropout draws
            the masks the training pass drew.
    """

    step: int
    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    batch: Any = None
    loss: Optional[torch.Tensor] = None
    loss_fn: Optional[Callable] = None
    metrics: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)
    rng: Optional[tuple] = None


def every_n(n: int) -> Callable[[int], bool]:
    """Schedule that fires at steps 0, n, 2n, ..."""
    if n < 1:
        raise ValueError(f"probe interval must be >= 1, got {n}")
    return lambda step: step % n == 0


def log_spaced(first: int = 1, per_decade: int = 10) -> Callable[[int], bool]:
    """Schedule that fires at step 0 and at about ``per_decade`` log-spaced steps per decade."""
    import math

    def _fires(step: int) -> bool:
        if step < first:
            return step == 0
        k = math.floor(math.log10(step) * per_decade)
        return math.floor(math.log10(step + 1) * per_decade) > k or step == first

    return _fires


class Probe:
    """Base class of every measurement.

    Subclasses set ``name`` (the metric prefix) and ``cost`` (``cheap``: no extra forward pass;
    ``standard``: extra forward/backward passes; ``expensive``: Hessian-vector products), and
    override any of the four event methods. A probe must leave the model, its buffers, ``.grad``,
    the optimizer state and every RNG exactly as it found them; the monitor restores the RNG and
    (for non-cheap probes) the training modes, buffers and ``.grad`` as a safety net, calls a probe
    only at the events it overrides, and a test checks bit-identical weights with and without
    probes. A ``cheap`` probe only reads tensors and should cost at most a few percent of a step
    (``benchmarks/probe_overhead.py`` measures each registered probe).

    Args:
        every: run at steps where ``every(step)`` is true; an int ``n`` means every n-th step
            (:func:`every_n`).
    """

    name: str = "probe"
    cost: str = "cheap"

    def __init__(self, every: int | Callable[[int], bool] = 1):
        self.schedule = every_n(every) if isinstance(every, int) else every

    def active(self, step: int) -> bool:
        """Whether the probe measures at this step."""
        return bool(self.schedule(step))

    def before_step(self, ctx: StepContext) -> dict | None:
        return None

    def after_backward(self, ctx: StepContext) -> dict | None:
        return None

    def after_step(self, ctx: StepContext) -> dict | None:
        return None

    def on_eval(self, ctx: StepContext) -> dict | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, cost={self.cost!r})"
