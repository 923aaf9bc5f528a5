"""The lockstep trainer: several runs stepped side by side on the same minibatches.

Why: to show that two training procedures are *equivalent* (weight decay and an exponentially
growing learning rate on a scale-invariant net, Li & Arora 2020), or to see exactly where they
part, the runs must start from the same initialization and see the same batches in the same
order, and their weights must be compared *at every step*. Training them one after the other
would mean storing every step's weights; stepping them in one loop needs nothing stored, and a
hook can compare them while they are alive. The runs keep their own dtype (a float64 arm and a
float32 arm share the batch, cast once per dtype), optimizer and schedule.

- :class:`Arm`: one run (model, trained parameters, optimizer, schedule) and its per-step series.
- :func:`lockstep`: step all arms on one batch stream (:meth:`bnlab.data.ArrayData.stream`),
  calling hooks after every step.
- :class:`PairTracker`: the comparison hook: per-step angles between two arms' weights
  (:func:`bnlab.scale.compare_trajectories`) and the largest difference of their outputs on a
  fixed batch, evaluated statelessly (:func:`bnlab.functional.stateless_call`: BatchNorm's running
  statistics are not touched, so the comparison does not change the runs).
- :class:`AngularUpdateTracker`: a hook recording the angular update ``∠(w_t, w_{t+1})`` of each
  trained tensor of some arms, per step (the quantity of Wan et al.'s spherical motion dynamics).

Example:
    >>> from bnlab.data import ArrayData
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> def arm(name):
    ...     torch.manual_seed(0)
    ...     net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ...     return Arm(name, net, dict(net.named_parameters()), torch.optim.SGD(net.parameters(), lr=0.1))
    >>> arms = {"a": arm("a"), "b": arm("b")}
    >>> tracker = PairTracker(arms, {"ab": ("a", "b", 1)}, steps=5, fixed_x=x)
    >>> _ = lockstep(arms, ArrayData(x, y, 2), steps=5, batch_size=4, hooks=[tracker])
    >>> float(np.nanmax(tracker.series["ab"]["angle"])), float(np.nanmax(tracker.series["ab"]["outdiff"]))
    (0.0, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .functional import stateless_call
from .scale import angle_between, compare_trajectories

__all__ = ["Arm", "lockstep", "PairTracker", "AngularUpdateTracker", "joint_norm"]

#: The per-step series of an arm: ``loss``, ``lr``, ``opt_lr``, ``log2_scale`` have one entry per step
#: (index ``t``: step ``t``); ``norm`` and ``stored_norm`` one more (index 0: the initialization).
STEP_SERIES = ("loss", "lr", "opt_lr", "log2_scale")
STATE_SERIES = ("norm", "stored_norm")


def joint_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The Euclidean norm of all ``tensors`` concatenated, in float64 (``nan``/``inf`` if one is not finite)."""
    return float(torch.cat([p.detach().reshape(-1).to(torch.float64) for p in tensors]).norm())


@dataclass
class Arm:
    """One run of a lockstep group.

    Attributes:
        name: the arm's name (keys of the ``arms`` mapping should equal it).
        model: the network, already on its device and in its dtype.
        params: the trained tensors by name (what the optimizer updates; what is compared).
        optimizer: any torch optimizer over ``params``.
        scheduler: stepped after every optimizer step; may be ``None``. When it has
            ``unrescaled_lr()``, ``log2_scale`` and ``rescale_factor`` (as
            :class:`bnlab.schedules.ExpLR`/:class:`~bnlab.schedules.TEXP` have), the series record
            the un-rescaled learning rate and weight norm beside what the optimizer holds.
        lr_fn: if given, ``lr_fn(t)`` is set as every param group's LR before step ``t`` (a plain
            schedule such as step decay, without a scheduler object).
        dtype: the dtype the model computes in; each batch is cast to it.
        steps: the arm stops after this many steps (``None``: all steps of :func:`lockstep`).
        diverged_at: the step whose loss or resulting weights were not finite (the arm stopped).
        reason: why it stopped, in words.
        series: filled by :func:`lockstep` (see :data:`STEP_SERIES`, :data:`STATE_SERIES`); NaN
            where the arm did not run.
    """

    name: str
    model: nn.Module
    params: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    lr_fn: Optional[Callable[[int], float]] = None
    dtype: torch.dtype = torch.float32
    steps: Optional[int] = None
    diverged_at: Optional[int] = None
    reason: str = ""
    series: dict[str, np.ndarray] = field(default_factory=dict)

    def alive(self, t: int) -> bool:
        """Whether the arm's weights after ``t`` steps exist: it has not diverged and ``t ≤ steps``."""
        return self.diverged_at is None and (self.steps is None or t <= self.steps)

    def norms(self) -> tuple[float, float]:
        """``(un-rescaled, stored)`` joint norm of the trained tensors (equal without a rescaling schedule)."""
        stored = joint_norm(self.params.values())
        return stored * float(getattr(self.scheduler, "rescale_factor", 1.0)), stored


def lockstep(arms: Mapping[str, Arm], data, *, steps: int, batch_size: int, seed: int = 0,
             hooks: Sequence[Callable[[int], None]] = (), loss_fn: Callable = F.cross_entropy,
             progress: bool | str = False) -> dict[str, dict[str, np.ndarray]]:
    """Train every arm on the same minibatches, one step each per batch, calling ``hooks`` after every step.

    The batches come from ``data.stream(batch_size, generator=torch.Generator().manual_seed(seed))``
    (shuffled epochs, the last batch of an epoch may be smaller), so every arm sees exactly the
    batches a run alone would see with that seed. Each arm runs in train mode; an arm stops after
    ``arm.steps`` steps or at its first non-finite loss or weights (``diverged_at``; it is never an
    error). Every hook is called as ``hook(t)`` with ``t = 0`` before the first step and ``t + 1``
    after step ``t`` of all arms, in order: it may read the arms (e.g. :class:`PairTracker`) but
    must not change their weights.

    Args:
        arms: the runs by name; their models are put in train mode.
        data: an :class:`bnlab.data.ArrayData` on the arms' device.
        steps: the number of steps.
        batch_size: examples per step.
        seed: seeds the batch order.
        hooks: callables ``hook(t)``.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        progress: a tqdm bar (a string is its description).

    Returns:
        ``{arm name: arm.series}``: per arm ``loss``, ``lr`` (the un-rescaled LR of step ``t``),
        ``opt_lr`` (what the optimizer used), ``log2_scale`` (length ``steps``) and ``norm``,
        ``stored_norm`` (length ``steps + 1``); NaN where the arm did not run.
    """
    T = int(steps)
    for arm in arms.values():
        if arm.steps is None:
            arm.steps = T
        arm.series = {k: np.full(T, np.nan) for k in STEP_SERIES}
        for k in STATE_SERIES:
            arm.series[k] = np.full(T + 1, np.nan)
        arm.series["norm"][0], arm.series["stored_norm"][0] = arm.norms()
        arm.model.train()
    dtypes = {arm.dtype for arm in arms.values()}
    batches = data.stream(batch_size, generator=torch.Generator().manual_seed(seed))
    for hook in hooks:
        hook(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, desc=progress if isinstance(progress, str) else "lockstep", unit="step", leave=False,
                   dynamic_ncols=True)
    try:
        for t in range(T):
            x, y = next(batches)
            xs = {dt: x.to(dt) for dt in dtypes}
            for arm in arms.values():
                if arm.diverged_at is None and t < arm.steps:
                    _step(arm, t, xs[arm.dtype], y, loss_fn)
            for hook in hooks:
                hook(t + 1)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {name: arm.series for name, arm in arms.items()}


def _step(arm: Arm, t: int, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> None:
    """One optimizer (and scheduler) step of ``arm`` on ``(x, y)``, recorded in its series."""
    s, opt, sched = arm.series, arm.optimizer, arm.scheduler
    if arm.lr_fn is not None:
        for g in opt.param_groups:
            g["lr"] = arm.lr_fn(t)
    s["opt_lr"][t] = opt.param_groups[0]["lr"]
    s["lr"][t] = sched.unrescaled_lr() if hasattr(sched, "unrescaled_lr") else s["opt_lr"][t]
    s["log2_scale"][t] = getattr(sched, "log2_scale", 0)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(arm.model(x), y)
    s["loss"][t] = float(loss.detach())
    if not math.isfinite(s["loss"][t]):
        arm.diverged_at, arm.reason = t, f"non-finite loss at step {t}"
        return
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    s["norm"][t + 1], s["stored_norm"][t + 1] = arm.norms()
    if not math.isfinite(s["stored_norm"][t + 1]):
        arm.diverged_at, arm.reason = t, f"non-finite weights after step {t}"


class PairTracker:
    """A :func:`lockstep` hook that compares pairs of arms after every step.

    At every ``t`` where both arms of a pair are alive: the angle between their trained tensors,
    all jointly and per tensor (:func:`bnlab.scale.compare_trajectories`; the tensors are paired
    by position in ``arm.params``), the joint angle of each named subset, and, every
    ``output_every`` steps (0: never), ``max |f_a(x) - f_b(x)|`` on the fixed batch ``fixed_x`` in
    the models' current mode (train mode: batch statistics), in float64, evaluated statelessly.

    Args:
        arms: the arms by name (the same mapping given to :func:`lockstep`).
        pairs: ``{pair name: (arm a, arm b, output_every)}``.
        steps: the number of lockstep steps (the series have ``steps + 1`` entries, index 0 the
            initialization).
        fixed_x: the input batch for output differences (cast to each arm's dtype); needed when
            an ``output_every`` is nonzero.
        subsets: ``{pair name: {key: [tensor names of arm a]}}``: also record the joint angle of
            these tensors alone under ``key``.

    Attributes:
        series: ``{pair: {"angle": (steps+1,), "outdiff": (steps+1,), "per": (n_tensors, steps+1),
            "names": tensor names, <subset key>: (steps+1,)}}``; NaN where not measured.
    """

    def __init__(self, arms: Mapping[str, Arm], pairs: Mapping[str, tuple[str, str, int]], *, steps: int,
                 fixed_x: Optional[torch.Tensor] = None,
                 subsets: Optional[Mapping[str, Mapping[str, Sequence[str]]]] = None) -> None:
        self.arms, self.pairs = arms, dict(pairs)
        self.subsets = {p: dict(v) for p, v in (subsets or {}).items()}
        self.fixed = {dt: fixed_x.to(dt) for dt in {a.dtype for a in arms.values()}} if fixed_x is not None else {}
        self.series: dict[str, dict[str, np.ndarray]] = {}
        for pname, (a, b, every) in self.pairs.items():
            if every and fixed_x is None:
                raise ValueError(f"pair {pname!r} asks for output differences but no fixed_x was given")
            names = list(arms[a].params)
            d = {"angle": np.full(steps + 1, np.nan), "outdiff": np.full(steps + 1, np.nan),
                 "per": np.full((len(names), steps + 1), np.nan), "names": np.array(names)}
            for key in self.subsets.get(pname, {}):
                if key in d:
                    raise ValueError(f"subset name {key!r} of pair {pname!r} clashes with a series name")
                d[key] = np.full(steps + 1, np.nan)
            self.series[pname] = d

    def outputs(self, arm: Arm) -> torch.Tensor:
        """``arm.model(fixed_x)`` in float64, in the model's current mode, leaving its buffers untouched."""
        with torch.no_grad():
            return stateless_call(arm.model, self.fixed[arm.dtype]).to(torch.float64)

    def output_diff(self, a: str, b: str, *, eval_mode: bool = False) -> float:
        """``max |f_a(x) - f_b(x)|`` on the fixed batch; with ``eval_mode`` both models are evaluated
        in eval mode (BatchNorm's running statistics) and put back in their modes afterwards."""
        A, B = self.arms[a], self.arms[b]
        modes = A.model.training, B.model.training
        if eval_mode:
            A.model.eval(), B.model.eval()
        try:
            return float((self.outputs(A) - self.outputs(B)).abs().max())
        finally:
            A.model.train(modes[0]), B.model.train(modes[1])

    def __call__(self, t: int) -> None:
        outs: dict[str, torch.Tensor] = {}
        for pname, (a, b, every) in self.pairs.items():
            A, B = self.arms[a], self.arms[b]
            if not (A.alive(t) and B.alive(t)):
                continue
            r = compare_trajectories(A.model, B.model, params_a=A.params, params_b=B.params)
            d = self.series[pname]
            d["angle"][t] = r["overall"]
            d["per"][:, t] = list(r["per_param"].values())
            if every and t % every == 0:
                for n, arm in ((a, A), (b, B)):
                    if n not in outs:
                        outs[n] = self.outputs(arm)
                d["outdiff"][t] = float((outs[a] - outs[b]).abs().max())
            for key, keep in self.subsets.get(pname, {}).items():
                d[key][t] = compare_trajectories(A.model, B.model, params_a={n: A.params[n] for n in keep},
                                                 params_b={n: B.params[n] for n in keep})["overall"]


class AngularUpdateTracker:
    """A :func:`lockstep` hook: the angle each trained tensor of an arm turns per step.

    ``Δ_t = ∠(w_t, w_{t+1})`` (:func:`bnlab.scale.angle_between`, float64) for every tensor of
    ``arm.params``. For a scale-invariant tensor trained with weight decay ``λ``, learning rate ``η``
    and momentum ``γ``, Wan et al. predict that ``Δ_t`` settles at ``√(2ηλ/(1+γ))``. A power-of-two
    renormalization between steps (:class:`bnlab.schedules.ExpLR`) changes no angle.

    Args:
        arms: the arms by name (the mapping given to :func:`lockstep`).
        names: the arms to track.
        steps: the number of lockstep steps.

    Attributes:
        series: ``{arm: {"update": (n_tensors, steps + 1), "names": tensor names}}``; index ``t``
            holds ``∠(w_{t-1}, w_t)`` (the update of step ``t - 1``), index 0 is NaN, and so is every
            step the arm did not take.

    Reference:
        R. Wan, Z. Zhu, X. Zhang, J. Sun. Spherical Motion Dynamics: Learning Dynamics of Normalized
        Neural Network using SGD and Weight Decay. NeurIPS 2021 (arXiv:2006.08419, 2020).
    """

    def __init__(self, arms: Mapping[str, Arm], names: Sequence[str], *, steps: int) -> None:
        self.arms, self.names = arms, list(names)
        self._prev: dict[str, list[torch.Tensor]] = {}
        self.series = {n: {"update": np.full((len(arms[n].params), steps + 1), np.nan),
                           "names": np.array(list(arms[n].params))} for n in self.names}

    def __call__(self, t: int) -> None:
        for n in self.names:
            arm = self.arms[n]
            if not arm.alive(t):
                self._prev.pop(n, None)
                continue
            cur = [p.detach().clone() for p in arm.params.values()]
            prev = self._prev.get(n)
            if prev is not None:
                self.series[n]["update"][:, t] = [angle_between(a, b) for a, b in zip(prev, cur)]
            self._prev[n] = cur
