"""Checkpoints of training runs, so that a killed paper run resumes where it stopped.

A paper run takes hours; losing one to a crash is not acceptable. Inside
:func:`bnlab.paper.use` with a ``checkpoint_dir`` and ``checkpoint_every = N``, every call of
:func:`bnlab.train.train` gets a file ``<checkpoint_dir>/train-<k>.pt`` (``k``: the call's number
in the run, counted from 0: an experiment's ``measure`` is deterministic, so a rerun makes the same
calls in the same order). It is written atomically every ``N`` steps and once more when the call
returns (``finished``), and holds everything the rest of the call depends on:

* the model's ``state_dict``, the optimizer's (momentum buffers) and the scheduler's;
* the step ``t`` reached; the batch stream is replayed from the call's seed to step ``t`` on
  resume (index draws and augmentation draws alike: a generator's state alone cannot say where in a
  shuffled epoch the stream is);
* torch's global RNG state (CPU and every CUDA device), numpy's and Python's;
* every record the call has emitted (in order: the run's metrics get them again on resume), the
  :class:`~bnlab.train.History` so far, the monitor's step counter and each probe's plain state
  (its attributes that pickle and do not refer to the model's parameters, modules or hooks).

On resume, a finished call returns at once with its final state and records; an unfinished one
continues from its last checkpoint. The result is the uninterrupted run's, bit for bit on the CPU
(``tests/unit/test_checkpoint.py`` kills a run with SIGKILL and compares).

The runner removes a run's checkpoints when the run completes.
"""

from __future__ import annotations

import contextvars
import os
import pickle
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .monitor import emit

_COUNTER: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("bnlab_train_calls", default=None)

FORMAT = 1


def _holds_parameter(v: Any, depth: int = 0) -> bool:
    if isinstance(v, (torch.nn.Parameter, torch.nn.Module)):
        return True
    if depth > 3:
        return False
    if isinstance(v, (list, tuple, set)):
        return any(_holds_parameter(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return any(_holds_parameter(x, depth + 1) for x in v.values())
    return False


def probe_state(probe) -> dict:
    """The plain state of a probe: its attributes that pickle and hold no parameter, module,
    callable or hook (those are rebuilt with the probe and refer to the live model)."""
    out = {}
    for k, v in vars(probe).items():
        if callable(v) and not isinstance(v, torch.Tensor) or _holds_parameter(v):
            continue
        try:
            pickle.dumps(v)
        except Exception:  # noqa: BLE001 - handles, weak references, generators: not state
            continue
        out[k] = v
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(model: torch.nn.Module, steps: int, batch_size: int, seed: int) -> list:
    return [steps, batch_size, seed, [(k, tuple(v.shape)) for k, v in model.state_dict().items()]]


class TrainCheckpoint:
    """The checkpoint file of one :func:`bnlab.train.train` call (see the module docstring).

    ``train`` calls :meth:`resume` before its loop, :meth:`record` for every record it emits,
    :meth:`step_done` after each step and :meth:`finish` when it returns.
    """

    def __init__(self, path: Path, every: int, *, model, optimizer, scheduler, monitor, history, log,
                 steps: int, batch_size: int, seed: int):
        self.path, self.every = Path(path), int(every)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.monitor, self.history, self.log = monitor, history, log
        self.fingerprint = _fingerprint(model, steps, batch_size, seed)
        self.emitted: list[dict] = []
        self.finished = False
        self.resumed_from: Optional[int] = None

    # ------------------------------------------------------------------ writing
    def record(self, rec: dict) -> None:
        """Keep a record the call emitted (it is emitted again on resume)."""
        self.emitted.append(rec)

    def _state(self, step: int, finished: bool) -> dict:
        h = self.history
        return {
            "format": FORMAT, "fingerprint": self.fingerprint, "step": step, "finished": finished,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if hasattr(self.scheduler, "state_dict") else None,
            "rng": _rng_state(), "monitor_step": self.monitor.step_index,
            "probes": [probe_state(p) for p in self.monitor.probes],
            "history": {"records": h.records, "evals": h.evals, "steps": h.steps, "diverged": h.diverged,
                        "diverged_at": h.diverged_at, "reason": h.reason, "seconds": h.seconds},
            "emitted": self.emitted,
        }

    def save(self, step: int, finished: bool = False) -> None:
        """Write the checkpoint atomically (a temporary file renamed over the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(self._state(step, finished), tmp)
        os.replace(tmp, self.path)

    def step_done(self, step: int) -> None:
        """After step ``step - 1`` (and its evaluation): save every ``every`` steps."""
        if self.every > 0 and step % self.every == 0:
            self.save(step)

    def finish(self) -> None:
        """The call is returning: save its final state as finished."""
        self.save(self.history.steps, finished=True)

    # ------------------------------------------------------------------ reading
    def resume(self, stream) -> int:
        """Restore the last checkpoint, if any; return the step to continue from (0: none).

        Re-emits the records the call had emitted, restores the history, the model, optimizer,
        scheduler, monitor and probe states, replays ``stream`` to the step and restores the RNG
        states. A file of another call (different steps, batch size, seed or model) is ignored.
        """
        if not self.path.is_file():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a damaged checkpoint: start the call again
            return 0
        if state.get("format") != FORMAT or state.get("fingerprint") != self.fingerprint:
            return 0
        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group_state in self.optimizer.state.values():  # load_state_dict keeps the saved device
            for k, v in list(group_state.items()):
                if isinstance(v, torch.Tensor) and v.device != dev and v.dim() > 0:
                    group_state[k] = v.to(dev)
        if state["scheduler"] is not None and hasattr(self.scheduler, "load_state_dict"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.monitor.step_index = state["monitor_step"]
        for probe, ps in zip(self.monitor.probes, state["probes"]):
            for k, v in ps.items():
                setattr(probe, k, v)
        h = state["history"]
        self.history.records[:] = h["records"]
        self.history.evals[:] = h["evals"]
        for k in ("steps", "diverged", "diverged_at", "reason", "seconds"):
            setattr(self.history, k, h[k])
        self.emitted = list(state["emitted"])
        for rec in self.emitted:
            emit(self.log, rec)
        step = int(state["step"])
        self.finished = bool(state["finished"])
        if not self.finished:
            for _ in range(step):
                next(stream)
        _set_rng_state(state["rng"])
        self.resumed_from = step
        return step


def for_train_call(**kwargs) -> Optional[TrainCheckpoint]:
    """The checkpoint of the next :func:`bnlab.train.train` call when the paper settings ask for
    checkpoints (``checkpoint_dir`` and ``checkpoint_every > 0``), else ``None``. ``kwargs``: see
    :class:`TrainCheckpoint`."""
    from . import paper

    s = paper.current()
    if s.checkpoint_dir is None or not s.checkpoint_every or s.checkpoint_every <= 0:
        return None
    counter = _COUNTER.get()
    if counter is None:
        counter = [0]
        _COUNTER.set(counter)
    k = counter[0]
    counter[0] += 1
    return TrainCheckpoint(Path(s.checkpoint_dir) / f"train-{k:04d}.pt", s.checkpoint_every, **kwargs)
