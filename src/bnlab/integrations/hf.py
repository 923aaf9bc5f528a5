"""bnlab probes in a Hugging Face ``transformers.Trainer`` (``pip install 'bnlab[hf]'``).

Example (a tiny BERT built from a config; nothing downloaded)::

    from transformers import Trainer, TrainingArguments
    from bnlab.integrations.hf import ProbeCallback
    from bnlab.probes import GradNorm, WeightNorm
    from bnlab.sinks import TensorBoardSink

    cb = ProbeCallback(probes=[GradNorm(), WeightNorm()], sinks=[TensorBoardSink("tb")])
    Trainer(model=model, args=TrainingArguments("out", report_to=[]), train_dataset=ds, callbacks=[cb]).train()
    # trainer.state.log_history holds {"grad_norm/total": ..., "weight_norm/total": ..., "step": ...} per step

Events, for the optimizer step ``t`` (HF's ``global_step`` goes from t to t + 1):

* ``before_step`` at the step's first forward call (a forward pre-hook armed by ``on_step_begin``;
  the callback events carry no batch): the batch is the keyword arguments the Trainer calls the
  model with (``input_ids``, ``attention_mask``, ``labels``, ...), weights are w_t;
* ``after_backward`` at ``on_pre_optimizer_step``: ``.grad`` = ∇L_B(w_t) summed over the
  micro-batches and *after* the Trainer's gradient clipping (``max_grad_norm``, 1.0 by default),
  i.e. the gradient the optimizer uses; weights still w_t. The loss is ``output.loss`` of that
  first forward (unscaled by gradient accumulation);
* ``after_step`` at ``on_step_end``: weights are w_{t+1} (``.grad`` was zeroed by the Trainer).

Probes evaluate the model on a dict batch through :mod:`bnlab.adapters` (``model(**batch)``, the
model's own loss unless ``loss_fn`` is given). Each finished record goes to the sinks, and its
numbers to ``trainer.state.log_history`` as ``{..., "step": global_step}`` (HF counts the step
just completed, t + 1; bnlab's records keep ``step = t``); ``eval`` metrics from
``Trainer.evaluate`` go to the sinks as an ``eval`` record (with the probes' ``on_eval``). The
sinks are closed when training ends.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from ..adapters import output_loss
from ..errors import UserError
from ..probes.base import Probe
from ..sinks import scalars
from . import ProbeDriver

try:
    from transformers import TrainerCallback
except ImportError:
    raise UserError("bnlab.integrations.hf needs the transformers package, which is not installed; "
                    "install it with: pip install 'bnlab[hf]'") from None

__all__ = ["ProbeCallback"]


class ProbeCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that drives bnlab probes; values go to the Trainer's
    ``state.log_history`` and to bnlab's sinks.

    Args:
        probes: bnlab probes (:mod:`bnlab.probes`).
        sinks: :mod:`bnlab.sinks` objects receiving every record; closed when training ends.
        loss_fn: ``loss_fn(logits, labels)`` for probes that evaluate the loss; ``None`` (default):
            the model's own ``output.loss`` (the batch carries ``labels``).
        log_history: append each step's values to ``state.log_history``.

    Attributes:
        records: one dict per optimizer step (``step``, ``loss``, probe values), plus eval records.
    """

    def __init__(self, probes: Iterable[Probe] = (), sinks: Iterable[Any] = (), *, loss_fn: Optional[Callable] = None,
                 log_history: bool = True) -> None:
        self.driver = ProbeDriver(probes, sinks, loss_fn=loss_fn)
        self.log_history = log_history
        self._hooks: list = []
        self._armed = False
        self._want_loss = False
        self._loss = None
        self._stepped = False

    @property
    def records(self) -> list[dict]:
        return self.driver.records

    # ------------------------------------------------------------------ training start / end
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("ProbeCallback: the Trainer passed no model to on_train_begin")
        self._remove_hooks()
        self.driver.start(model, optimizer, step=state.global_step)
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward, with_kwargs=True)]

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
        self.driver.close()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the step
    def on_step_begin(self, args, state, control, **kwargs):
        if self.driver.in_step:  # a step that never reached the optimizer
            self.driver.drop_step()
        self._armed, self._loss, self._stepped = True, None, False

    def _pre_forward(self, module, args, kwargs):
        if not self._armed:
            return None
        self._armed = False  # before the probes run: their own forward passes must not re-enter
        if kwargs:
            batch: Any = dict(kwargs)
        else:
            batch = args[0] if len(args) == 1 else tuple(args)
        self.driver.monitor.before_step(batch)
        self._want_loss = True
        return None

    def _post_forward(self, module, args, kwargs, output):
        if self._want_loss:
            self._want_loss = False
            loss = output_loss(output)
            if loss is not None:
                self._loss = loss.detach()
        return None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        d = self.driver
        if not d.in_step:  # no forward call was seen (a model called outside its own __call__)
            d.monitor.before_step(None)
        if d.backward_done:
            return
        d.monitor.after_backward(self._loss)
        self._stepped = True

    def on_step_end(self, args, state, control, **kwargs):
        d = self.driver
        if not (d.in_step and self._stepped):
            return
        record = d.monitor.after_step()
        self._stepped = False
        if self.log_history:
            values = {k: v for k, v in scalars(record).items() if k != "loss"}
            if values:
                state.log_history.append({**values, "step": state.global_step})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.driver.monitor is not None and metrics:
            self.driver.monitor.on_eval(dict(metrics), step=state.global_step)
