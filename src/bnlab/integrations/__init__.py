"""bnlab's probes inside other training frameworks (each an optional extra, imported only here).

* :mod:`bnlab.integrations.lightning` — ``ProbeCallback`` for ``lightning.Trainer``
  (``pip install 'bnlab[lightning]'``);
* :mod:`bnlab.integrations.hf` — ``ProbeCallback``, a ``transformers.TrainerCallback``
  (``pip install 'bnlab[hf]'``).

Both drive the probes through a :class:`bnlab.monitor.Monitor` (the same guards: a probe never
changes the training), at the same events: ``before_step`` when the step's batch is known (weights
w_t), ``after_backward`` when the gradient ∇L_B(w_t) is in ``.grad`` and the weights are still w_t,
``after_step`` once the optimizer has moved them to w_{t+1}. Each finished record goes to the
framework's own logging and to bnlab's sinks (:mod:`bnlab.sinks`). Importing this package imports
neither framework.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from ..monitor import Monitor
from ..probes.base import Probe

__all__ = ["ProbeDriver"]


class ProbeDriver:
    """What both callbacks share: a :class:`Monitor` built when training starts, the sinks, the records.

    Args:
        probes: the probes to run.
        sinks: :mod:`bnlab.sinks` objects that receive every record (closed by :meth:`close`).
        loss_fn: ``loss_fn(logits, labels)`` for probes that evaluate the loss themselves; ``None``:
            the model's own loss (a Hugging Face model computes it when the batch has labels).
        keep_records: keep every record in :attr:`records` (a list of dicts).
    """

    def __init__(self, probes: Iterable[Probe] = (), sinks: Iterable[Any] = (), *, loss_fn: Optional[Callable] = None,
                 keep_records: bool = True) -> None:
        self.probes = list(probes)
        for p in self.probes:
            if not isinstance(p, Probe):
                raise TypeError(f"probes must be bnlab Probe instances, got {type(p).__name__}")
        self.sinks = list(sinks)
        self.loss_fn = loss_fn
        self.keep_records = keep_records
        self.records: list[dict] = []
        self.monitor: Optional[Monitor] = None
        self.last: Optional[dict] = None

    def start(self, model, optimizer, step: int = 0) -> Monitor:
        """Build the monitor over ``model`` and ``optimizer``; its first step gets index ``step``."""
        self.monitor = Monitor(model, optimizer, self.probes, log=self._emit, loss_fn=self.loss_fn)
        self.monitor.step_index = int(step)
        return self.monitor

    @property
    def in_step(self) -> bool:
        """Whether a step was begun (``before_step``) and not yet finished."""
        return self.monitor is not None and self.monitor._ctx is not None

    @property
    def backward_done(self) -> bool:
        return self.monitor is not None and self.monitor._backward_done

    def drop_step(self) -> None:
        """Forget a begun step that ended without an optimizer step (nothing is recorded)."""
        if self.monitor is not None:
            self.monitor._ctx = None
            self.monitor._record = {}
            self.monitor._backward_done = False

    def _emit(self, record: dict) -> None:
        self.last = record
        if self.keep_records:
            self.records.append(record)
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        """Close every sink (each once, even if one fails)."""
        from ..sinks import FanOut

        sinks, self.sinks = self.sinks, []
        if sinks:
            FanOut(sinks).close()
