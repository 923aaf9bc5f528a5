"""bnlab probes in a ``lightning.Trainer`` fit (``pip install 'bnlab[lightning]'``).

Example::

    import lightning as L
    from bnlab.integrations.lightning import ProbeCallback
    from bnlab.probes import GradNorm, WeightNorm
    from bnlab.sinks import TensorBoardSink

    cb = ProbeCallback(probes=[GradNorm(), WeightNorm(every=10)], sinks=[TensorBoardSink("tb")])
    L.Trainer(max_steps=1000, callbacks=[cb]).fit(module, loader)
    # grad_norm/total, weight_norm/total: in the Trainer's logger (self.log) and in tb/

Events (automatic or manual optimization), for the optimizer step ``t``:

* ``before_step`` at ``on_train_batch_start`` of the step's first batch: the batch (moved to the
  device) is known, the weights are w_t;
* ``after_backward`` at ``on_before_optimizer_step``: ``.grad`` = ∇L_B(w_t) (summed over the
  micro-batches with ``accumulate_grad_batches``; before Lightning's gradient clipping, which
  comes right after this hook), weights still w_t; the loss is the one seen at
  ``on_before_backward`` (the first micro-batch's);
* ``after_step`` at ``on_train_batch_end``: the optimizer has moved the weights to w_{t+1}.

Each finished record goes to every sink, and its numbers (except ``loss``, which the module logs
itself) to ``pl_module.log(name, value, on_step=True, on_epoch=False)``: they appear in the
Trainer's logger at its own cadence (``log_every_n_steps``) and in ``trainer.callback_metrics``
(so ``ModelCheckpoint``/``EarlyStopping`` can monitor them). A step where the optimizer did not
step (a skipped step) is dropped. The sinks are closed when the fit ends.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from ..errors import UserError
from ..probes.base import Probe
from ..sinks import scalars
from . import ProbeDriver

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package has the same API
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise UserError("bnlab.integrations.lightning needs the lightning package, which is not installed; "
                        "install it with: pip install 'bnlab[lightning]'") from None

__all__ = ["ProbeCallback"]


class ProbeCallback(Callback):
    """Drives bnlab probes from a Lightning fit; values go to the Trainer's logger and to bnlab's sinks.

    Args:
        probes: bnlab probes (:mod:`bnlab.probes`).
        sinks: :mod:`bnlab.sinks` objects receiving every record; closed when the fit ends.
        loss_fn: ``loss_fn(logits, y)`` for probes that evaluate the loss themselves (curvature,
            landscape); the module's ``forward`` is called on the batch's inputs.
        log_to_trainer: also ``pl_module.log`` each value.
        prefix: put before the names given to ``pl_module.log`` (e.g. ``"bnlab/"``).

    Attributes:
        records: one dict per optimizer step (``step``, ``loss``, probe values).
    """

    def __init__(self, probes: Iterable[Probe] = (), sinks: Iterable[Any] = (), *, loss_fn: Optional[Callable] = None,
                 log_to_trainer: bool = True, prefix: str = "") -> None:
        super().__init__()
        self.driver = ProbeDriver(probes, sinks, loss_fn=loss_fn)
        self.log_to_trainer = log_to_trainer
        self.prefix = prefix
        self._loss = None
        self._stepped = False

    @property
    def records(self) -> list[dict]:
        return self.driver.records

    # ------------------------------------------------------------------ fit start / end
    def on_train_start(self, trainer, pl_module) -> None:
        opts = trainer.optimizers
        self.driver.start(pl_module, opts[0] if opts else None, step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.driver.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.driver.close()

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.driver.monitor is None:
            self.on_train_start(trainer, pl_module)
        if not self.driver.in_step:  # the first (micro-)batch of an optimizer step
            self._loss, self._stepped = None, False
            self.driver.monitor.before_step(batch)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.driver.in_step and self._loss is None:
            self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        d = self.driver
        if not d.in_step or d.backward_done:
            return
        if optimizer is not d.monitor.optimizer:  # manual optimization with several optimizers
            d.monitor.optimizer = d.monitor._ctx.optimizer = optimizer
        d.monitor.after_backward(self._loss)
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        d = self.driver
        if not d.in_step:
            return
        if not self._stepped:
            if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)) == 0:
                d.drop_step()  # the optimizer step was skipped (e.g. training_step returned None)
            return
        record = d.monitor.after_step()
        self._stepped = False
        if self.log_to_trainer:
            to_logger = bool(trainer.loggers)  # without one, the values still reach trainer.callback_metrics
            for k, v in scalars(record).items():
                if k != "loss":
                    pl_module.log(self.prefix + k, v, on_step=True, on_epoch=False, logger=to_logger, prog_bar=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.driver.in_step and not self.driver.backward_done:
            self.driver.drop_step()
