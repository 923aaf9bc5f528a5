"""One readable training loop. Probes attach through :class:`bnlab.monitor.Monitor`.

Per step ``t`` (0-based) the loop does::

    monitor.before_step((x, y))          # weights w_t
    loss = loss_fn(model(x), y); loss.backward()
    monitor.after_backward(loss)         # .grad = ∇L_B(w_t)
    optimizer.step(); scheduler.step()
    monitor.after_step()                 # weights w_{t+1}
    non-finite loss or weights  ->  History.diverged = True, stop cleanly

and evaluates (train and test loss/accuracy, ``monitor.on_eval``) every ``eval_every`` steps and
at the end. Deterministic on CPU for a fixed seed: the batch order comes from a generator seeded
with ``seed`` and nothing else draws random numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from . import checkpoint
from .data import ArrayData
from .errors import UserError, check_positive
from .monitor import Monitor, emit
from .paper import apply_speed, restore_layout, speed_plan, to_channels_last
from .probes.base import Probe


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` are taken as is."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; accepted here: auto, cpu")
    return dev


def check_train_hyperparameters(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, in one line, optimizer settings that overflow the parameters' dtype.

    A learning rate of 1e308 is a finite Python float, but an SGD step multiplies float32
    tensors by it and PyTorch raises "value cannot be converted to type float without overflow".
    Every numeric hyper-parameter of every group (``lr``, ``weight_decay``, ``momentum``, ...) must
    be finite and no larger than the largest finite value of its parameters' dtype.

    Raises:
        UserError: naming the setting, its value and the dtype's limit.
    """
    for i, group in enumerate(optimizer.param_groups):
        dtypes = {p.dtype for p in group["params"] if p.is_floating_point()}
        if not dtypes:
            continue
        limit = min(torch.finfo(d).max for d in dtypes)
        name = min(dtypes, key=lambda d: torch.finfo(d).max)
        for key, value in group.items():
            if key == "params" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value) or abs(value) > limit:
                raise UserError(f"{key} {value!r} (parameter group {i}) overflows {str(name).replace('torch.', '')} "
                                f"(largest finite value {limit:.3g}); accepted: finite values up to that")


@dataclass
class History:
    """What a training run produced.

    Attributes:
        records: one dict per optimizer step (``step``, ``loss``, ``lr``, probe metrics).
        evals: one dict per evaluation (``step``, ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``).
        steps: optimizer steps taken.
        diverged: whether a non-finite loss or weight stopped the run.
        diverged_at: the step at which it was detected (``None`` if it did not diverge).
        reason: why it stopped early, if it did.
        seconds: wall time of the loop.
    """

    records: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    steps: int = 0
    diverged: bool = False
    diverged_at: Optional[int] = None
    reason: str = ""
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        """The last evaluation (empty if none)."""
        return dict(self.evals[-1]) if self.evals else {}

    def summary(self) -> dict:
        """Final metrics plus the divergence status, JSON-ready."""
        return {
            **{k: v for k, v in self.final.items() if k != "event"},
            "steps": self.steps,
            "diverged": self.diverged,
            "diverged_at": self.diverged_at,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
        }

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of a per-step metric, skipping steps where it is absent."""
        pairs = [(r["step"], r[key]) for r in self.records if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ArrayData, loss_fn: Callable = F.cross_entropy, *, batch_size: int = 1024, device=None) -> dict:
    """Mean loss and accuracy of ``model`` (in eval mode, restored afterwards) on ``data``."""
    from .paper import eval_cap

    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    if eval_cap(len(data)) < len(data):  # a smoke run (bnlab.paper) evaluates on a few examples
        data = data.subset(eval_cap(len(data)))
    try:
        for x, y in data.batches(batch_size, shuffle=False):
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(loss_fn(logits, y, reduction="sum")) if loss_fn is F.cross_entropy else float(loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}


def _all_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter entry is finite, with one read of the weights and one host sync.

    A sum containing a NaN or an infinity is never finite (IEEE: NaN propagates, inf + finite = inf,
    inf - inf = NaN), so finite sums prove every entry finite; only when some sum is not finite
    (non-finite entries, or finite ones so large that their float32 sum overflows) is the exact
    elementwise test run. This costs one reduction per tensor instead of a boolean copy of the
    weights (on ResNet-18 on CPU: ~1% of a step instead of ~10%).
    """
    params = [p.detach() for p in model.parameters()]
    if not params:
        return True
    if bool(torch.isfinite(torch.stack([p.sum() for p in params])).all()):
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def resolve_steps(data: ArrayData, *, epochs, steps, batch_size: int, full_batch: bool = False, drop_last: bool = False) -> tuple[int, int]:
    """``(steps, steps_per_epoch)``: ``steps`` if given, else ``ceil(epochs * steps_per_epoch)``, validated."""
    n_per_epoch = 1 if full_batch else data.steps_per_epoch(batch_size, drop_last)
    if steps is None:
        if epochs is None:
            raise UserError("give the number of epochs or steps")
        check_positive("epochs", epochs, allow_zero=True)
        steps = int(math.ceil(epochs * n_per_epoch))
    check_positive("steps", steps, allow_zero=True)
    from .paper import cap_steps

    return cap_steps(steps), n_per_epoch  # a smoke run (bnlab.paper) caps every training run


def train(
    model: torch.nn.Module,
    data: ArrayData,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: Optional[float] = None,
    steps: Optional[int] = None,
    batch_size: int = 128,
    full_batch: bool = False,
    scheduler: Any = None,
    probes: Iterable[Probe] | str = (),
    eval_data: Optional[ArrayData] = None,
    eval_every: Optional[int] = None,
    eval_train: bool = True,
    loss_fn: Callable = F.cross_entropy,
    device: str | torch.device = "auto",
    seed: int = 0,
    log: Any = None,
    progress: bool | str = False,
    drop_last: bool = False,
) -> History:
    """Train ``model`` on ``data`` with ``optimizer``; return a :class:`History`.

    Args:
        model: the network; moved to ``device``.
        data: the training set (in memory).
        optimizer: any torch optimizer over ``model``'s parameters.
        epochs: passes over ``data`` (fractions allowed); give this or ``steps``.
        steps: optimizer steps; takes precedence over ``epochs``.
        batch_size: examples per step (ignored with ``full_batch``).
        full_batch: every step uses the whole set: gradient descent, not SGD.
        scheduler: stepped after every optimizer step (an ``LRScheduler`` or anything with ``.step()``).
        probes: measurements run by a :class:`Monitor` at each step's events, or the name of a cost
            preset (``"economy"``, ``"business"``, ``"full"``: :data:`bnlab.probes.registry.PRESETS`).
        eval_data: the test set; ``test_loss``/``test_acc`` are evaluated on it.
        eval_every: steps between evaluations (default: once per epoch); one more at the end.
        eval_train: also evaluate on the training set.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``.
        seed: seeds the batch order.
        log: where step and eval records go: a list, a callable, or an object with
            ``.append_metrics(record)`` (a :class:`bnlab.runs.RunDir`) or ``.write(record)``.
        progress: show a tqdm bar (``True``, or a string used as its description).
        drop_last: drop the last incomplete batch of each epoch.

    Returns:
        History with per-step records, evaluations and divergence status. A non-finite loss or
        weight marks the run diverged at that step and stops it; it never raises.
    """
    check_positive("batch size", batch_size)
    steps, n_per_epoch = resolve_steps(data, epochs=epochs, steps=steps, batch_size=batch_size, full_batch=full_batch, drop_last=drop_last)
    dev = resolve_device(device)
    model.to(dev)
    data = data.to(dev)
    eval_data = eval_data.to(dev) if eval_data is not None else None
    eval_every = eval_every or n_per_epoch
    history = History()
    records: list[dict] = history.records

    ckpt = None

    def sink(rec: dict) -> None:
        if rec.get("event") == "eval":
            history.evals.append(rec)
        else:
            records.append(rec)
        if ckpt is not None:
            ckpt.record(rec)
        emit(log, rec)

    check_train_hyperparameters(optimizer)
    if isinstance(probes, str):  # a cost preset by name, built for this model on a batch of the data
        from .probes.registry import make_preset

        probes = make_preset(probes, model, data.subset(min(len(data), batch_size)).full_batch(), loss_fn)
    monitor = Monitor(model, optimizer, probes, log=sink, loss_fn=loss_fn)
    gen = torch.Generator().manual_seed(seed)
    # CUDA only (bnlab.paper.speed_plan): channels-last, cudnn.benchmark; bf16/compile for plain arms
    plan = speed_plan(dev, plain=not monitor.probes, spatial=data.x.dim() == 4, steps=steps)
    forward, autocast = apply_speed(model, plan)

    def do_eval(step: int) -> None:
        metrics: dict = {}
        if eval_train:
            m = evaluate(model, data, loss_fn)
            metrics.update(train_loss=m["loss"], train_acc=m["acc"])
        if eval_data is not None:
            m = evaluate(model, eval_data, loss_fn)
            metrics.update(test_loss=m["loss"], test_acc=m["acc"])
        monitor.on_eval(metrics, step=step)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress if isinstance(progress, str) else "train", unit="step", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    stream = data.stream(batch_size, generator=gen, drop_last=drop_last, full_batch=full_batch)
    # a paper run's checkpoints (bnlab.checkpoint): resume where a killed run stopped
    ckpt = checkpoint.for_train_call(model=model, optimizer=optimizer, scheduler=scheduler, monitor=monitor,
                                     history=history, log=log, steps=steps, batch_size=batch_size, seed=seed)
    start = ckpt.resume(stream) if ckpt is not None else 0
    if ckpt is not None and ckpt.finished:  # this call had finished before the crash: its stored result
        if bar is not None:
            bar.close()
        restore_layout(model, plan)
        return history
    if bar is not None and start:
        bar.update(start)
    try:
        for t in range(start, steps):
            x, y = next(stream)
            monitor.before_step((x, y))
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(forward(to_channels_last(x, plan)), y)
            if not torch.isfinite(loss):
                history.diverged, history.diverged_at, history.reason = True, t, f"non-finite loss ({float(loss.detach())}) at step {t}"
                monitor.after_step({"loss": float(loss.detach()), "diverged": True})
                break
            loss.backward()
            monitor.after_backward(loss)
            lr = optimizer.param_groups[0]["lr"]
            try:
                optimizer.step()
            except RuntimeError as e:  # a hyper-parameter (e.g. a scheduled LR) overflowed the dtype: divergence
                if "overflow" not in str(e):
                    raise
                history.diverged, history.diverged_at, history.reason = True, t, f"optimizer step overflowed at step {t}: {e}"
                monitor.after_step({"lr": float(lr), "diverged": True})
                break
            if scheduler is not None:
                scheduler.step()
            monitor.after_step({"lr": float(lr)})
            history.steps = t + 1
            if not _all_finite(model):
                history.diverged, history.diverged_at, history.reason = True, t, f"non-finite weights after step {t}"
                break
            if bar is not None:
                bar.update(1)
                if t % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
            if (t + 1) % eval_every == 0 and t + 1 < steps:
                do_eval(t + 1)
            if ckpt is not None:
                ckpt.step_done(t + 1)
    finally:
        if bar is not None:
            bar.close()
    history.seconds = time.perf_counter() - t0
    if not history.diverged:
        do_eval(history.steps)
    else:
        nan = float("nan")
        final = {"train_loss": nan, "train_acc": nan} if eval_train else {}
        if eval_data is not None:
            final.update(test_loss=nan, test_acc=nan)
        with torch.no_grad():  # accuracy of a diverged net is still defined when weights are finite
            if _all_finite(model):
                if eval_data is not None:
                    m = evaluate(model, eval_data, loss_fn)
                    final.update(test_acc=m["acc"], test_loss=m["loss"])
        monitor.on_eval(final, step=history.steps)
    restore_layout(model, plan)
    if ckpt is not None:
        ckpt.finish()
    return history


def make_optimizer(
    params, *, name: str = "sgd", lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> torch.optim.Optimizer:
    """``sgd`` (PyTorch convention: v = γ v + g + λ w, w -= η v) or ``adam``/``adamw``, with checks."""
    check_positive("learning rate", lr)
    check_positive("weight decay", weight_decay, allow_zero=True)
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"momentum must be in [0, 1), got {momentum!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; accepted: adam, adamw, sgd")


OPTIMIZERS = ("sgd", "adam", "adamw")
