"""Drive probes from any training loop: ``bnlab.train`` uses it, and so can yours.

Example (a plain PyTorch loop)::

    monitor = Monitor(model, optimizer, probes=[GradNorm(), WeightNorm()], log=records)
    for x, y in loader:
        with monitor.step((x, y)) as s:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            s.loss = loss            # optional: recorded as "loss"
            optimizer.step()         # the monitor hooks the step: after_backward, then after_step

or, without the context manager, call ``before_step``, ``after_backward``, ``after_step`` yourself.

Example (a Hugging Face model, dict batches, the model's own loss)::

    monitor = Monitor(model, optimizer, probes=[GradNorm(), TopHessianEigenvalue(every=50)], log=records)
    for batch in loader:                      # {"input_ids": ..., "attention_mask": ..., "labels": ...}
        with monitor.step(batch) as s:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            s.loss = loss
            optimizer.step()

The batch is handed to the probes as it is; probes evaluate the model on it through
:mod:`bnlab.adapters` (``model(x)`` for ``(x, y)``, ``model(**batch)`` for a dict; logits from a
tensor, a dict or a ``ModelOutput``). Without ``loss_fn`` they use ``F.cross_entropy`` on ``(x, y)``
batches and the model's own ``output.loss`` on dict batches.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional

import torch

from .curvature import rng_snapshot
from .probes.base import Probe, StepContext


class _StepHandle:
    """Yielded by :meth:`Monitor.step`; set ``.loss`` after the backward pass."""

    def __init__(self) -> None:
        self.loss: Optional[torch.Tensor] = None
        self.record: dict = {}


class Monitor:
    """Calls each probe at the events of a training step and collects one record per step.

    Each probe call runs inside a guard that restores the global RNG state and, for probes that
    are not ``cheap``, the model's training modes, its buffers (BN running statistics) and every
    ``.grad``; probes must not change parameters or optimizer state. A probe is called only at the
    events it implements (overrides) and where its schedule is active, so a cheap probe costs
    little more than the reading it does (``benchmarks/probe_overhead.py``).

    Args:
        model: the model being trained.
        optimizer: its optimizer (probes read learning rates from it); may be ``None``.
        probes: the probes to run.
        log: where finished records go: a list (appended), a callable ``log(record)``, an object
            with ``.append_metrics(record)`` (a :class:`bnlab.runs.RunDir`) or ``.write(record)``,
            or ``None``.
        loss_fn: handed to probes that need to evaluate the loss themselves, as
            ``loss_fn(logits, labels)``; ``None``: ``F.cross_entropy`` for ``(x, y)`` batches, the
            model's own ``output.loss`` for dict batches (:func:`bnlab.adapters.default_loss_fn`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        probes: Iterable[Probe] = (),
        *,
        log: Any = None,
        loss_fn: Optional[Callable] = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.probes = list(probes)
        for p in self.probes:
            if not isinstance(p, Probe):
                raise TypeError(f"probes must be bnlab Probe instances, got {type(p).__name__}")
        self.loss_fn = loss_fn
        self._log = log
        self.step_index = 0
        self._ctx: Optional[StepContext] = None
        self._record: dict = {}
        self._backward_done = False

    # ---------------------------------------------------------------- events
    def before_step(self, batch: Any = None) -> None:
        """Start step ``self.step_index`` with its batch (weights are w_t)."""
        self._ctx = StepContext(
            step=self.step_index, model=self.model, optimizer=self.optimizer, batch=batch, loss_fn=self.loss_fn,
            rng=rng_snapshot(self.model),
        )
        self._record = {"step": self.step_index}
        self._backward_done = False
        self._run("before_step")

    def after_backward(self, loss: Optional[torch.Tensor] = None) -> None:
        """Call after ``loss.backward()`` and before ``optimizer.step()``."""
        ctx = self._require_ctx()
        if loss is not None:
            ctx.loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            self._record["loss"] = float(ctx.loss)
        self._backward_done = True
        self._run("after_backward")

    def after_step(self, extra: Optional[dict] = None) -> dict:
        """Call after ``optimizer.step()``; logs and returns this step's record."""
        self._require_ctx()
        self._run("after_step")
        if extra:
            self._record.update(extra)
        record = self._record
        self._emit(record)
        self.step_index += 1
        self._ctx = None
        return record

    def on_eval(self, metrics: dict, *, step: Optional[int] = None) -> dict:
        """Report evaluation metrics (e.g. ``{"test_acc": 0.97}``) and run the probes' ``on_eval``."""
        step = self.step_index if step is None else step
        ctx = StepContext(step=step, model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn, metrics=dict(metrics))
        record = {"step": step, "event": "eval", **metrics}
        for probe in self.probes:
            if probe.active(step):
                record.update(self._guarded(probe, "on_eval", ctx))
        self._emit(record)
        return record

    @contextlib.contextmanager
    def step(self, batch: Any = None):
        """Context manager around one training step; hooks ``optimizer.step`` for the inner events."""
        if self.optimizer is None:
            raise ValueError("Monitor.step() needs the optimizer; pass it to Monitor(...)")
        handle = _StepHandle()
        self.before_step(batch)

        def pre_hook(opt, args, kwargs):
            self.after_backward(handle.loss)

        stepped = []

        def post_hook(opt, args, kwargs):
            stepped.append(True)

        h1 = self.optimizer.register_step_pre_hook(pre_hook)
        h2 = self.optimizer.register_step_post_hook(post_hook)
        try:
            yield handle
        finally:
            h1.remove()
            h2.remove()
        if not stepped:
            raise RuntimeError("Monitor.step(): the block did not call optimizer.step()")
        if handle.loss is not None and "loss" not in self._record:
            self._record["loss"] = float(handle.loss.detach())
        handle.record = self.after_step()

    # ---------------------------------------------------------------- internals
    def _require_ctx(self) -> StepContext:
        if self._ctx is None:
            raise RuntimeError("Monitor: call before_step(batch) first")
        return self._ctx

    def _run(self, event: str) -> None:
        ctx = self._ctx
        for probe in self.probes:
            if _handles(probe, event) and probe.active(ctx.step):
                self._record.update(self._guarded(probe, event, ctx))

    def _guarded(self, probe: Probe, event: str, ctx: StepContext) -> dict:
        # A cheap probe only reads tensors: its guard restores the RNG (microseconds) and nothing
        # else; the others also get the training modes, the buffers and every .grad restored.
        model = self.model
        cheap = probe.cost == "cheap"
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        modes = None if cheap else [m.training for m in model.modules()]
        saved_buffers = saved_grads = None
        if not cheap:
            saved_buffers = [b.detach().clone() for b in model.buffers()]
            saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        try:
            out = getattr(probe, event)(ctx)
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            if modes is not None:
                for m, mode in zip(model.modules(), modes):
                    m.training = mode
            if saved_buffers is not None:
                with torch.no_grad():
                    for b, s in zip(model.buffers(), saved_buffers):
                        b.copy_(s)
                for p, g in zip(model.parameters(), saved_grads):
                    if g is None:
                        p.grad = None
                    elif p.grad is None:
                        p.grad = g
                    else:
                        p.grad.copy_(g)
        if not out:
            return {}
        return {f"{probe.name}/{k}": v for k, v in out.items()}

    def _emit(self, record: dict) -> None:
        emit(self._log, record)


def _handles(probe: Probe, event: str) -> bool:
    """Whether ``probe`` overrides the event method (the base class's ones return ``None``)."""
    return event in vars(probe) or getattr(type(probe), event) is not getattr(Probe, event)


def emit(log, record: dict) -> None:
    """Send one metrics record to ``log``: a list (appended), a :class:`~bnlab.runs.RunDir`
    (``append_metrics``), an object with ``write(record)`` (a sink), a callable, or ``None`` (dropped)."""
    if log is None:
        return
    if isinstance(log, list):
        log.append(record)
    elif hasattr(log, "append_metrics"):
        log.append_metrics(record)
    elif hasattr(log, "write"):
        log.write(record)
    else:
        log(record)
