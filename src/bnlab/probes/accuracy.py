"""Accuracy of the step's batch in the model's training mode.

The accuracy that training itself sees: for a net whose training-mode forward pass differs from
its evaluation (train-mode BatchNorm normalizes with the batch's statistics; a ``bn-noisy`` layer
adds noise), eval-mode accuracies say little about the optimization. :class:`TrainModeAccuracy`
replays the step's forward pass at ``w_t`` on the step's batch with
:func:`bnlab.functional.stateless_call` (copies of the buffers, the RNG restored; a ``bn-noisy``
layer replays the step's noise) and records the fraction of the batch classified correctly.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from ..adapters import is_dict_batch, labels_of, logits_of, split_batch
from ..functional import stateless_call
from .base import Probe, StepContext

__all__ = ["TrainModeAccuracy", "LOGITS_KEY"]

#: The key under which a probe that replays the step's training-mode forward pass at ``w_t`` (at
#: ``after_backward``) leaves the logits in :attr:`StepContext.scratch`, for the next such probe of the
#: same step to reuse instead of running the same forward pass again
#: (:class:`bnlab.probes.ActivationQuantiles` does).
LOGITS_KEY = "train_mode_logits"


class TrainModeAccuracy(Probe):
    """Accuracy of the step's batch in the model's current (training) mode at ``w_t`` (cost: standard).

    At ``after_backward`` (before the optimizer step) the step's forward pass is replayed on its
    batch with :func:`bnlab.functional.stateless_call`: the model, its buffers, ``.grad`` and the
    RNG are left exactly as they were. Records ``"acc"``: the fraction of the batch whose
    largest logit is the label (a classifier's output of shape ``(N, classes)``). When a probe
    listed before it has already replayed that forward pass in this step (the logits under
    :data:`LOGITS_KEY` in the step's ``scratch``), those logits are used: the same numbers, one
    forward pass fewer.

    Args:
        every: steps to measure at (an int ``n``: every ``n``-th step).
        name: metric prefix (``"train_mode"``: the record key is ``"train_mode/acc"``).

    Example:
        >>> probe = TrainModeAccuracy(every=5)
        >>> train(net, data, opt, steps=400, probes=[probe])   # records "train_mode/acc"
    """

    name = "train_mode"
    cost = "standard"

    def __init__(self, every: Union[int, Callable[[int], bool]] = 1, *, name: str = "train_mode"):
        super().__init__(every)
        self.name = name

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        batch = ctx.batch
        z = ctx.scratch.get(LOGITS_KEY)
        if z is None:
            args, kwargs = split_batch(batch)  # (x, y) or a dict batch (bnlab.adapters)
            with torch.no_grad():
                z = logits_of(stateless_call(ctx.model, *args, **kwargs))
            ctx.scratch[LOGITS_KEY] = z
        y = labels_of(batch)
        if is_dict_batch(batch) and z.shape[:-1] == y.shape:
            # per example or per token; HF's ignore index -100 left out. A causal LM that shifts its
            # labels inside its loss is not shifted here: the accuracy is position-wise.
            keep = y != -100
            return {"acc": float((z.argmax(-1) == y)[keep].double().mean())}
        return {"acc": float((z.argmax(1) == y).double().mean())}
