"""``auto-rate``: any learning rate for the scale-invariant weights trains a BatchNorm net.

Arora, Li, Lyu, *Theoretical Analysis of Auto Rate-Tuning by Batch Normalization* (ICLR 2019).
A weight ``w`` that feeds a BatchNorm layer is scale-invariant (``L(c w) = L(w)``), so
``⟨∇L(w), w⟩ = 0`` and ``∇L(c w) = ∇L(w)/c`` (the lemma), and a plain GD/SGD step grows its norm,
``‖w_{t+1}‖² = ‖w_t‖² + η² ‖g_t‖²``. The step moves the direction ``w/‖w‖`` with the effective rate
``η / ‖w_t‖²``: a too-large ``η`` inflates ``‖w‖`` until the effective rate is tame. The theorem:
with the LR ``η_w`` of the scale-invariant weights fixed to *any* constant and only the LR ``η_g``
of the other parameters tuned, full-batch GD reaches ``min_{t<T} ‖∇̃L(θ_t)‖² = Õ(1/T)`` (the rate of
well-tuned GD) and SGD with ``η_{w,t} = η_w/√(t+1)``, ``η_{g,t} = η_g/√(t+1)`` reaches
``min_{t<T} E‖∇̃L‖² = Õ(T^{-1/2})``; no momentum, no weight decay (REFERENCES §1, §6).

**Setting.** A fully-BN MLP (``mlp``: Linear without bias -> BN -> ReLU, ``depth`` times, then a
Linear classifier) on the 8x8 digits. :func:`bnlab.scale.find_scale_invariant` confirms which
parameters are scale-invariant; those invariant **per output channel** (the hidden weight matrices
feeding a BN) are the groups ``w_i`` (one per tensor) and get the swept ``η_w``; every other
parameter (BN's γ/β, the classifier) keeps the tuned ``η_g``. (At initialization ``β = 0`` makes a
hidden BN's ``γ`` invariant as a whole through the ReLU; that stops as soon as ``β`` moves, so the
per-channel test leaves ``γ`` out. Both lists are in the summary.)

**Sweep.** ``η_w`` over ``si_lrs`` (quick: ``1e-3 … 1e4``, 8 points, 7 decades) for each of the
``seeds`` (initializations; the data split, SGD's partition and batch order come from ``seed``),
full-batch GD (``gd``: constant LRs, ``η_g = other_lr``, on the first ``gd_subset`` training
examples) and SGD (``sgd``: the theorem's schedule ``sgd_schedule = "inv_sqrt"``, ``η_t = η/√(t+1)``
for both groups, ``η_g = sgd_other_lr``; *(check: the schedules of REFERENCES §6 were not
confirmed from the original text; ``"constant"`` is the alternative)*), no momentum, no weight
decay. ``η_g`` was tuned once, at ``η_w = 1``, seed 0, over ``{0.03, 0.1, 0.3, 1, 3}`` by final
test accuracy, and is held fixed over the sweep: GD 94.9-96.0% for every value (flat), so the
previous ``other_lr = 0.1`` is kept; SGD with the schedule 97.1-97.8%, best at
``sgd_other_lr = 1`` (0.1 decays to 0.002 by step 2000 and leaves the head under-trained). SGD visits
one fixed partition of the training set (trimmed to a multiple of ``batch_size``, so every batch
has the same size and uniform sampling of the batches is unbiased for
``L(θ) = (1/K) Σ_k L_{B_k}(θ)``) in a fresh order every epoch (:class:`bnlab.data.FixedBatches`):
the theorem's finite-sum objective, whose gradient is evaluated exactly at log-spaced steps.
``--set fixed_batches=False`` reshuffles instead (the objective is then only a proxy).

**Baseline and control.** The same MLP without normalization (``norm="none"``: the Linear layers
keep their bias) gets the **same split**: its hidden weight matrices (the tensors that feed a BN
in the BN net) at the swept ``η_w``, its biases and the classifier at the tuned ``η_g``. With
``control``, each net also runs at ``η_w = 0``: random hidden features, only the head (and the
biases / BN's γ, β) trained; BN "training at every η_w" means something only if that control is
clearly worse.

**How it runs.** All members of one net and optimizer (``len(si_lrs) · len(seeds)`` plus the
controls) are trained side by side by :func:`_train_members`: their parameters stacked, one
``torch.func.vmap`` forward/backward per step on the shared batch, and SGD applied per member and
per tensor with its own LR (what :func:`bnlab.sweep.sweep` cannot do: it has one LR per member,
no schedule and no in-loop measurements). Member ``i`` is exactly the run of ``torch.optim.SGD``
with the two parameter groups (``tests/experiments/test_auto_rate.py`` checks it). A member whose
loss or weights become non-finite is recorded as diverged and dropped from the stack.

**Measured** (per member): the loss at every step; test accuracy at ``eval_points`` steps; the
squared norm of every group at log-spaced steps; ``Σ_t η_t² ‖g_t‖²`` over the groups; and the
squared norm of the **intrinsic gradient** (the gradient with respect to the normalized
parameters ``(w_1/‖w_1‖, …, g)``, REFERENCES §6)::

    ‖∇̃L(θ)‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L(θ)‖²  +  ‖∇_g L(θ)‖²

at every step for GD (the full-batch gradient) and of the objective at log-spaced steps for SGD.

**Lemma and norm identity.** A separate short float64 run of plain full-batch GD at
``identity_lrs`` with BN's ``eps = identity_bn_eps`` (1e-30: zero in effect; the theory's BN has no
``eps``, PyTorch's 1e-5 breaks the invariance by ``~eps/Var``) records at every step and group the
relative residual ``(‖w_{t+1}‖² - ‖w_t‖² - η² ‖g_t‖²) / ‖w_t‖²``
(:class:`~bnlab.probes.scale.ScaleInvariantStats`) and, at log-spaced steps, the lemma's two
residuals ``|⟨∇L(w), w⟩| / (‖∇L‖‖w‖)`` and ``max_c ‖c ∇L(c w) − ∇L(w)‖ / ‖∇L‖`` for
``c ∈ lemma_scales`` (:class:`~bnlab.probes.intrinsic.ScaleLemma`). The same runs with the default
``eps = 1e-5`` are stored for comparison and not judged.

**Verdicts** (rules in :class:`Thresholds`, each with its CLAIMS.md id): A1 the lemma, A2 the norm
identity (worst residual), A3/A4 GD/SGD reach the rate of the best-tuned ``η_w`` **for every**
``η_w`` (``T^p · min_{t<T} ‖∇̃L‖²``, ``p = 1`` for GD and ``1/2`` for SGD, within ``(ln T)^k`` of the
best run's), A5 the LR band over which each net trains (with the control), A6 the effective LRs
of runs 100x apart, judged only where the measured growth ``Σ_t η_t²‖g_t‖²`` is at least
``eff_lr_growth_factor · ‖w_0‖²`` for both runs.

Profiles: ``tiny`` (tests, seconds), ``quick`` (digits, about a minute on one CPU thread),
``paper`` (VGG-16 with BN on CIFAR-10; for a GPU; GD on a 1000-image subset since BN's full-batch
statistics need the whole batch in one forward pass; the members in passes of ``members_per_pass``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .. import data as data_mod
from .. import models
from ..analysis import decades_span, geometric_mean
from ..errors import UserError
from ..plotting import STYLE, accuracy_vs_lr, save, smooth
from ..probes.base import log_spaced
from ..probes.intrinsic import ScaleLemma
from ..probes.scale import ScaleInvariantStats
from ..runs import RunDir
from ..scale import find_scale_invariant, split_param_groups
from ..train import resolve_device, train
from .base import Claim, Context, Experiment, fmt, register_experiment, seed_spread, verdict
from .runner import applied_thresholds

_SRC = "Arora, Li, Lyu 2019"
_MODES = ("gd", "sgd")
_SCHEDULES = ("constant", "inv_sqrt")
_MODE_LABEL = {"gd": "full-batch GD", "sgd": "SGD"}
_RATE_POWER = {"gd": 1.0, "sgd": 0.5}  # the bound on min_t ‖∇̃L‖² is Õ(T^-p): T^p·min is bounded
_PAIR_DECADES = 2.0  # the effective-LR claim compares runs whose η_w are 100x apart
_LOSS_CLIP = 100.0  # learning-curve plots: a diverging loss is drawn up to here


@dataclass(frozen=True)
class Config:
    """What ``auto-rate`` trains and measures (hashed: names the run)."""

    data: str = "digits"
    """Dataset (``bnlab list``)."""
    model: str = "mlp"
    """Model (``bnlab list``); with BN, the weights feeding a BN layer must be scale-invariant per output channel."""
    width: int = 32
    """Model width."""
    depth: int = 3
    """Model depth."""
    affine: bool = True
    """BN layers have the affine parameters γ/β (trained at the tuned LR η_g)."""
    si_lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
    """The swept learning rates η_w of the hidden weight matrices (scale-invariant in the BN net; the same tensors in the plain net)."""
    other_lr: float = 0.1
    """GD: the tuned learning rate η_g of every other parameter (biases, BN's γ/β, the classifier), fixed over the sweep."""
    sgd_other_lr: float = 1.0
    """SGD: the tuned η_g (at step t it is η_g·schedule(t)), fixed over the sweep."""
    sgd_schedule: str = "inv_sqrt"
    """SGD's schedule for both groups: ``inv_sqrt`` (η_t = η/√(t+1), the theorem's, REFERENCES §6 (check)) or ``constant``."""
    control: bool = True
    """Also train each net at η_w = 0 (random hidden features; only the head, biases and BN's γ/β trained)."""
    modes: tuple[str, ...] = ("gd", "sgd")
    """Optimizers swept: ``gd`` (full-batch GD, constant LRs) and/or ``sgd`` (minibatch SGD); no momentum, no weight decay."""
    norms: tuple[str, ...] = ("bn", "none")
    """Nets swept: ``bn`` and ``none`` (the plain baseline, the same split of the parameters)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Initialization seeds: every (net, optimizer, η_w) is trained once per seed."""
    gd_steps: int = 1000
    """Steps of each full-batch GD run (T of the GD verdict)."""
    sgd_steps: int = 2000
    """Steps of each SGD run (T of the SGD verdict)."""
    batch_size: int = 64
    """SGD examples per batch (the training set is trimmed to a multiple of it: equal batches)."""
    fixed_batches: bool = True
    """SGD visits one fixed partition of the training set in a fresh order each epoch (False: ordinary reshuffling)."""
    gd_subset: int = 512
    """Full-batch GD trains on the first n training examples (0: the whole training set)."""
    members_per_pass: int = 0
    """Members trained side by side in one vectorized pass (0: all of one net and optimizer at once)."""
    stats_per_decade: int = 20
    """Weight norms (and effective LRs) at about this many log-spaced steps per decade (and at the end)."""
    objective_per_decade: int = 10
    """SGD: the objective's intrinsic gradient norm at about this many log-spaced steps per decade (and at the last)."""
    eval_points: int = 10
    """Test evaluations per run (and one at the end)."""
    identity_lrs: tuple[float, ...] = (1e-2, 1.0, 100.0)
    """η_w of the float64 lemma / norm-identity runs (plain full-batch GD)."""
    identity_steps: int = 30
    """Steps of each lemma / norm-identity run."""
    identity_subset: int = 512
    """Lemma / norm-identity runs train on the first n training examples (0: the whole training set)."""
    identity_bn_eps: float = 1e-30
    """BN's eps in the judged lemma / norm-identity runs (the theory's BN has none; a default-eps run is stored beside)."""
    lemma_scales: tuple[float, ...] = (0.1, 10.0)
    """The factors c of the lemma's second residual ‖c∇L(cw) − ∇L(w)‖/‖∇L(w)‖."""
    lemma_per_decade: int = 10
    """Lemma residuals at about this many log-spaced steps per decade of the identity runs (and at the last)."""
    seed: int = 0
    """Seed of the data split, the SGD partition and the batch order (the same for every member)."""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in _MODES]
        if bad or not self.modes:
            raise ValueError(f"modes takes one or both of {', '.join(_MODES)}, got {list(self.modes)}")
        if self.sgd_schedule not in _SCHEDULES:
            raise ValueError(f"sgd_schedule takes one of {', '.join(_SCHEDULES)}, got {self.sgd_schedule!r}")
        if not self.si_lrs or not all(lr > 0 for lr in (*self.si_lrs, *self.identity_lrs, *self.lemma_scales)):
            raise ValueError("si_lrs must be non-empty and si_lrs, identity_lrs and lemma_scales positive")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be non-empty and distinct, got {list(self.seeds)}")
        if "bn" not in self.norms:
            raise ValueError(f"norms must include 'bn' (the net the claims are about), got {list(self.norms)}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``auto-rate``'s decision rules (A1-A6 of CLAIMS.md)."""

    lemma_max_residual: float = 1e-6
    """A1: the lemma holds when both float64 residuals are at most this at every measured step and group (round-off is ~1e-15; BN's default eps alone gives ~1e-5)."""
    identity_max_residual: float = 1e-6
    """A2: the norm identity holds when the float64 run's largest |relative residual| is at most this (same reasoning as A1)."""
    rate_min_decades: float = 4.0
    """A3/A4: the η_w grid must span at least this many decades (the claim's "≥ 4 decades"), else inconclusive."""
    rate_min_steps: int = 100
    """A3/A4: at least this many steps T (two decades of T for a rate to mean anything), else inconclusive."""
    polylog_power: float = 1.0
    """A3/A4: every η_w's T^p·min_(t<T)‖∇̃L‖² must be within (ln T)^this of the best η_w's: the Õ of the theorem hides log factors; one power of ln T (6.9 at T = 1000) is the smallest such factor."""
    acc_tolerance: float = 0.05
    """A5: a run "trains" when no seed diverged and its seed-mean test accuracy is within this of the best run of its optimizer."""
    control_margin: float = 0.10
    """A5: the η_w = 0 control must end at least this below the best run (twice acc_tolerance, so a run that trains beats it by ≥ 5 points), else inconclusive."""
    bn_min_decades: float = 4.0
    """A5: for every optimizer the BN net trains over a band of η_w at least this many decades wide (the claim's 4)."""
    plain_max_decades: float = 2.0
    """A5: ... and the plain net over a band at most this wide (a "narrow band"; half the BN requirement)."""
    eff_lr_growth_factor: float = 10.0
    """A6: a run meets "η²Σ‖g‖² ≫ ‖w_0‖²" when Σ_t η_t²‖g_t‖² ≥ this · ‖w_0‖² (then ‖w_0‖² is ≤ 1/11 of ‖w_T‖²)."""
    eff_lr_max_factor: float = 3.0
    """A6: every judged pair (η_w 100x apart, both meeting the condition) ends with effective LRs within this factor (they start 100x apart)."""


# ----------------------------------------------------------------------------- members side by side


def lr_factor(schedule: str, t: int) -> float:
    """The schedule's factor at step ``t``: 1 (``constant``) or ``1/√(t+1)`` (``inv_sqrt``)."""
    return 1.0 if schedule == "constant" else 1.0 / math.sqrt(t + 1)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """``[m]`` squared norm of each row of a stacked tensor, in float64."""
    return t.detach().to(torch.float64).pow(2).flatten(1).sum(1)


def _train_members(make: Callable[[int], nn.Module], members: Sequence[tuple[float, int]], *, swept: Sequence[str],
                   si: Sequence[str], other_lr: float, schedule: str, steps: int,
                   make_stream: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], eval_data, eval_at: set[int],
                   stat_at: set[int], objective: Optional[list] = None, objective_at: set[int] = frozenset(),
                   step_grad: bool = False, device="cpu") -> dict[str, np.ndarray]:
    """Train the members ``(η_w, seed)`` side by side, each with its own two learning rates.

    Member ``i`` is the model ``make(seed_i)`` trained by plain SGD (no momentum, no weight decay)
    on the batches of ``make_stream()`` (shared by all members)::

        w <- w - η_{w,i} · s(t) · ∇_w L_B       for the tensors named in ``swept``
        p <- p - η_g · s(t) · ∇_p L_B           for every other parameter

    with ``s(t)`` = :func:`lr_factor`. One ``vmap`` of ``functional_call`` over the stacked
    parameters and buffers computes every member's loss (BatchNorm's batch statistics and its
    running statistics per member, as in a separate run), one reverse pass their gradients.

    Measured, for the weights ``w_t`` before step ``t``: the squared norm of every tensor in ``si``
    at the steps ``stat_at`` and at ``steps`` (the end); test accuracy and loss (eval mode) at
    ``eval_at`` and at the end; with ``step_grad``, the intrinsic gradient norm of the step's own
    gradient ``Σ_{si} ‖w‖²‖∇_w L_B‖² + Σ_other ‖∇_p L_B‖²`` at every step; with ``objective``
    (batches ``(x_k, y_k)``), that of ``(1/N) Σ_k |B_k| L_{B_k}`` at ``objective_at`` (train mode,
    running statistics untouched); and ``Σ_t (η_{w,i} s(t))² ‖∇_{si} L_B‖²``, the growth of
    ``‖w‖²`` the norm identity predicts. A member whose loss or weights are not finite after step
    ``t`` stops there (``diverged_at = t``) and is dropped from the stack.

    Returns:
        numpy arrays: ``loss [M, steps]``, ``step_gsq [M, steps]`` (NaN without ``step_grad``),
        ``stat_steps [J]``, ``norm_sq [M, J, len(si)]``, ``objective_steps [K]``, ``objective_gsq [M, K]``,
        ``growth_sum [M]``, ``eval_steps [E]``, ``test_acc [M, E]``, ``test_loss [M, E]``,
        ``diverged_at [M]`` (-1: did not diverge); NaN where a member was no longer running.
    """
    dev = resolve_device(device)
    nets = [make(seed).to(dev).train() for _, seed in members]
    params, buffers = stack_module_state(nets)
    names = list(params)
    missing = [n for n in [*swept, *si] if n not in params]
    if missing:
        raise UserError(f"auto-rate: {missing} are not parameters of the model")
    template = copy.deepcopy(nets[0]).to("meta").train()
    M = len(members)
    P = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    B = {k: v.detach().clone() for k, v in buffers.items()}
    dtype = P[names[0]].dtype
    swept_set, si_set = set(swept), set(si)
    lr0 = {k: torch.tensor([lw if k in swept_set else other_lr for lw, _ in members], dtype=dtype, device=dev) for k in names}
    lw64 = torch.tensor([lw for lw, _ in members], dtype=torch.float64, device=dev)

    def member_loss(p, b, x, y):
        return F.cross_entropy(functional_call(template, (p, b), (x,)), y)

    def member_logits(p, b, x):
        return functional_call(template, (p, b), (x,))

    vloss = vmap(member_loss, in_dims=(0, 0, None, None))
    vlogits = vmap(member_logits, in_dims=(0, 0, None))

    nan = math.nan
    stat_steps = sorted({t for t in stat_at if 0 <= t < steps} | {steps})
    obj_steps = sorted({t for t in objective_at if 0 <= t < steps}) if objective is not None else []
    eval_steps = sorted({t for t in eval_at if 0 < t < steps} | {steps})
    out = {
        "loss": np.full((M, steps), nan, np.float32), "step_gsq": np.full((M, steps if step_grad else 0), nan),
        "stat_steps": np.array(stat_steps, np.int64), "norm_sq": np.full((M, len(stat_steps), len(si)), nan),
        "objective_steps": np.array(obj_steps, np.int64), "objective_gsq": np.full((M, len(obj_steps)), nan),
        "growth_sum": np.zeros(M), "eval_steps": np.array(eval_steps, np.int64),
        "test_acc": np.full((M, len(eval_steps)), nan), "test_loss": np.full((M, len(eval_steps)), nan),
        "diverged_at": np.full(M, -1, np.int64),
    }
    stat_j = {t: j for j, t in enumerate(stat_steps)}
    obj_j = {t: j for j, t in enumerate(obj_steps)}
    eval_j = {t: j for j, t in enumerate(eval_steps)}
    rows = np.arange(M)  # the member of each stacked row
    xe, ye = eval_data.x.to(dev), eval_data.y.to(dev)

    def intrinsic(grads: dict) -> np.ndarray:
        v = torch.zeros(len(rows), dtype=torch.float64, device=dev)
        for k in names:
            v += _sq(grads[k]) * (_sq(P[k]) if k in si_set else 1.0)
        return v.cpu().numpy()

    def measure(t: int) -> None:
        if t in stat_j and si:
            out["norm_sq"][rows, stat_j[t], :] = torch.stack([_sq(P[k]) for k in si], 1).cpu().numpy()
        if t in obj_j:
            total = sum(len(y) for _, y in objective)
            acc = {k: torch.zeros_like(P[k]) for k in names}
            for xk, yk in objective:
                bk = {k: v.clone() for k, v in B.items()}  # the objective leaves the running statistics alone
                lk = vloss(P, bk, xk, yk).sum() * (len(yk) / total)
                for k, g in zip(names, torch.autograd.grad(lk, [P[k] for k in names])):
                    acc[k] += g
            out["objective_gsq"][rows, obj_j[t]] = intrinsic(acc)
        if t in eval_j:
            template.eval()
            try:
                with torch.no_grad():
                    correct = torch.zeros(len(rows), dtype=torch.float64, device=dev)
                    loss_sum = torch.zeros(len(rows), dtype=torch.float64, device=dev)
                    for i in range(0, len(ye), 1000):
                        lg = vlogits(P, B, xe[i:i + 1000])  # [m, n, K]
                        yy = ye[i:i + 1000]
                        correct += (lg.argmax(-1) == yy).sum(1).double()
                        loss_sum += F.cross_entropy(lg.flatten(0, 1), yy.repeat(len(rows)), reduction="none").view(len(rows), -1).sum(1).double()
            finally:
                template.train()
            out["test_acc"][rows, eval_j[t]] = (correct / len(ye)).cpu().numpy()
            out["test_loss"][rows, eval_j[t]] = (loss_sum / len(ye)).cpu().numpy()

    stream = make_stream()
    for t in range(steps):
        if not len(rows):
            break
        measure(t)
        x, y = next(stream)
        losses = vloss(P, B, x.to(dev), y.to(dev))
        ld = losses.detach()
        out["loss"][rows, t] = ld.float().cpu().numpy()
        grads = dict(zip(names, torch.autograd.grad(losses.sum(), [P[k] for k in names])))
        s = lr_factor(schedule, t)
        with torch.no_grad():
            if step_grad:
                out["step_gsq"][rows, t] = intrinsic(grads)
            if si:
                lr_t = lw64[torch.as_tensor(rows, device=dev)] * s
                out["growth_sum"][rows] += (lr_t**2 * sum(_sq(grads[k]) for k in si)).cpu().numpy()
            for k in names:
                g = grads[k]
                P[k].sub_(g * (lr0[k] * s).view(-1, *([1] * (g.dim() - 1))))
            ok = torch.isfinite(ld)
            for k in names:
                ok &= torch.isfinite(P[k].detach()).flatten(1).all(1)
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten().cpu().numpy()
            out["diverged_at"][rows[bad]] = t
            keep = ok.nonzero().flatten()
            rows = rows[keep.cpu().numpy()]
            P = {k: v.detach()[keep].clone().requires_grad_(True) for k, v in P.items()}
            B = {k: v[keep].clone() for k, v in B.items()}
            lr0 = {k: v[keep] for k, v in lr0.items()}  # by row (lw64 is by member)
    if len(rows):
        measure(steps)
    return out


def _concat_members(parts: list[dict]) -> dict[str, np.ndarray]:
    """Join the outputs of several :func:`_train_members` passes (same steps) along the member axis."""
    if len(parts) == 1:
        return parts[0]
    shared = ("stat_steps", "objective_steps", "eval_steps")
    return {k: (parts[0][k] if k in shared else np.concatenate([p[k] for p in parts], 0)) for k in parts[0]}


# ----------------------------------------------------------------------------- summary helpers


def _arm_name(norm: str, mode: str, lr: float) -> str:
    return f"{norm}/{mode}/{lr:g}" if lr > 0 else f"{norm}/{mode}/control"


def _select(recs: list[dict], arm: str, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in the step records of ``arm``."""
    pairs = [(r["step"], r[key]) for r in recs if r.get("arm") == arm and r.get("event") is None and key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _sweep(arms: dict, mode: str, norm: str) -> list[dict]:
    """The swept arms (no control) of ``mode`` and ``norm``, each with its name, by ``lr_si``."""
    return sorted(({**a, "arm": k} for k, a in arms.items()
                   if a.get("mode") == mode and a.get("norm") == norm and not a.get("control")),
                  key=lambda a: a["lr_si"])


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _mean_acc(a: dict) -> float:
    """Seed-mean final test accuracy; NaN if any seed diverged or has no accuracy."""
    accs = a.get("test_acc") or []
    if not accs or any(a.get("diverged") or []) or not all(_finite(v) for v in accs):
        return math.nan
    return float(np.mean(accs))


def _acc_text(a: dict) -> str:
    if any(a.get("diverged") or []):
        n = sum(bool(d) for d in a["diverged"])
        return f"diverged ({n}/{len(a['diverged'])} seeds)"
    m = _mean_acc(a)
    return f"{m:.1%}" if math.isfinite(m) else "nan"


def _t_points(steps: int, per_decade: int = 20) -> list[int]:
    """Log-spaced ``T`` in ``[1, steps]`` (and ``steps``): where the running-minimum curves are stored."""
    pts = {min(steps, max(1, int(round(10 ** (k / per_decade))))) for k in range(int(per_decade * math.log10(max(steps, 1))) + 1)}
    return sorted(pts | {steps})


def _running_min_at(steps_measured: np.ndarray, values: np.ndarray, T_points: list[int]) -> list[float]:
    """``min_{t < T}`` of ``values`` (measured at ``steps_measured``) at each ``T``; NaN before the first finite one."""
    v = np.where(np.isfinite(values), values, np.inf)
    out = []
    for T in T_points:
        sel = v[steps_measured < T]
        m = float(sel.min()) if sel.size else math.inf
        out.append(m if math.isfinite(m) else math.nan)
    return out


def _arm_results(res: dict, members: list[tuple[float, int]], *, norm: str, mode: str, steps: int, other_lr: float,
                 schedule: str, has_si: bool) -> tuple[dict, dict]:
    """Per arm (one ``η_w``, all seeds) the numbers the judge reads, and the running-minimum curves."""
    arms, curves = {}, {}
    T_points = _t_points(steps)
    for lr in dict.fromkeys(lr for lr, _ in members):
        idx = [i for i, (l, _) in enumerate(members) if l == lr]
        div = [int(res["diverged_at"][i]) for i in idx]
        a = {"norm": norm, "mode": mode, "lr_si": float(lr), "control": lr == 0, "other_lr": other_lr, "schedule": schedule,
             "steps": steps, "seeds": [members[i][1] for i in idx], "diverged": [d >= 0 for d in div],
             "diverged_at": [d if d >= 0 else None for d in div],
             "test_acc": [float(res["test_acc"][i, -1]) for i in idx]}
        if has_si:
            n0 = [float(res["norm_sq"][i, 0].sum()) for i in idx]
            nT = [float(res["norm_sq"][i, -1].sum()) for i in idx]
            gs = [float(res["growth_sum"][i]) for i in idx]
            a["eff_lr_first"] = [lr * lr_factor(schedule, 0) / n for n in n0]
            a["eff_lr_last"] = [lr * lr_factor(schedule, steps) / n if n > 0 else math.nan for n in nT]
            a["growth"] = [g / n for g, n in zip(gs, n0)]  # Σ_t η_t²‖g_t‖² / ‖w_0‖²
            a["norm_growth"] = [(b - n) / n for n, b in zip(n0, nT)]  # (‖w_T‖² − ‖w_0‖²) / ‖w_0‖²
            a["identity_drift"] = [abs(b - n - g) / b if b > 0 else math.nan for n, b, g in zip(n0, nT, gs)]
            if mode == "gd":
                meas, vals = np.arange(steps), res["step_gsq"]
            else:
                meas, vals = res["objective_steps"], res["objective_gsq"]
            per_seed = [_running_min_at(meas, vals[i], T_points) for i in idx]
            a["min_grad_norm_sq"] = [c[-1] if d < 0 else math.nan for c, d in zip(per_seed, div)]
            curves[_arm_name(norm, mode, lr)] = {"T": T_points, "m": per_seed}
        arms[_arm_name(norm, mode, lr)] = a
    return arms, curves


# ----------------------------------------------------------------------------- the experiment


@register_experiment
class AutoRate(Experiment):
    name = "auto-rate"
    title = "Auto rate-tuning: any LR for the scale-invariant weights trains a BN net"
    source = "Arora, Li, Lyu 2019"
    description = (
        "A fully-BN MLP whose scale-invariant weights (found numerically) get a learning rate η_w swept over seven "
        "decades while BN's affine parameters and the classifier keep one tuned rate; full-batch GD (constant LRs) and "
        "SGD (the theorem's 1/√(t+1) schedules), no momentum or weight decay, three initializations; the plain net with "
        "the same split, and η_w = 0 controls. The lemma and the norm identity in float64, T·min‖∇̃L‖² for every η_w "
        "against the best, the band of η_w that trains, and the effective learning rates where the norms grew."
    )
    claims = (
        Claim("scale-lemma", "For scale-invariant w: ⟨∇L(w), w⟩ = 0 and ∇L(cw) = ∇L(w)/c (the lemma).", _SRC,
              "max over groups, measured steps and LRs of |⟨∇L(w),w⟩|/(‖∇L‖‖w‖) and max_c ‖c∇L(cw) − ∇L(w)‖/‖∇L‖, "
              "float64 GD with BN eps ≈ 0",
              "holds if both ≤ lemma_max_residual (1e-6)", ref="A1"),
        Claim("norm-identity", "For plain GD on scale-invariant weights, ‖w_{t+1}‖² = ‖w_t‖² + η²‖g_t‖².", _SRC,
              "largest |relative residual| (‖w_{t+1}‖² - ‖w_t‖² - η²‖g_t‖²)/‖w_t‖² over all steps, groups and LRs of a float64 GD run with BN eps ≈ 0",
              "holds if ≤ identity_max_residual (1e-6)", ref="A2"),
        Claim("gd-any-lr-rate", "Full-batch GD with any fixed η_w reaches min_{t<T} ‖∇̃L‖² = Õ(1/T), like well-tuned GD.", _SRC,
              "for every η_w of the grid: T·min_{t<T} ‖∇̃L‖² (seed geometric mean) over the best η_w's, at T = gd_steps",
              "holds if every ratio ≤ (ln T)^polylog_power over a grid spanning ≥ rate_min_decades; a diverged run fails it",
              ref="A3"),
        Claim("sgd-any-lr-rate", "SGD with η_t = η/√(t+1) for both groups and any η_w reaches min_{t<T} E‖∇̃L‖² = Õ(T^-1/2).", _SRC,
              "for every η_w: √T·min_{t<T} ‖∇̃L_objective‖² (objective gradient at log-spaced steps) over the best η_w's, T = sgd_steps",
              "as gd-any-lr-rate", ref="A4"),
        Claim("lr-insensitive", "With BN the net trains for every η_w over ≥ 4 decades; without normalization only in a narrow band.", _SRC,
              "per optimizer, the widest band of grid η_w whose seed-mean final test accuracy is within acc_tolerance of the best, "
              "both nets with the same split; the η_w = 0 control",
              "holds if, for every judged optimizer, BN spans ≥ bn_min_decades and the plain net ≤ plain_max_decades; "
              "an optimizer is judged only when the control is ≥ control_margin below the best", ref="A5"),
        Claim("effective-lr-converges", "The effective LRs η/‖w_t‖² of runs started 100x apart draw together (the auto rate-tuning).", _SRC,
              "final ratio of the effective LRs of BN runs whose η_w are 100x apart, for the pairs where both runs grew "
              "Σ_t η_t²‖g_t‖² ≥ eff_lr_growth_factor·‖w_0‖² in every seed",
              "holds if every judged pair ends within eff_lr_max_factor (3); inconclusive if no pair meets the condition", ref="A6"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(si_lrs=(0.1, 10.0, 1000.0), seeds=(0, 1), gd_steps=12, sgd_steps=12, batch_size=256, width=16, depth=2,
                       gd_subset=256, identity_lrs=(1.0, 1000.0), identity_steps=4, identity_subset=256, eval_points=3),
        "quick": Config(),
        # VGG-16 with BN on CIFAR-10. Full-batch GD and the float64 runs use a subset: BN's full-batch
        # statistics need the whole batch in one forward pass.
        "paper": Config(data="cifar10", model="vgg", width=64, depth=16, si_lrs=(1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4),
                        gd_steps=2000, gd_subset=1000, sgd_steps=40000, sgd_other_lr=0.3, batch_size=128, identity_steps=20,
                        identity_subset=256, members_per_pass=8),  # η_g not tuned at this size; 8 VGG members: ~33 GiB (H200)
    }
    thresholds = {"tiny": Thresholds(rate_min_steps=10, rate_min_decades=4.0, bn_min_decades=2.0)}
    #: a smoke run (:func:`bnlab.paper.smoke_config`): the paper's VGG-16, optimizers, schedule, probes and
    #: figures on the fewest members (one seed; the grid's two ends and the control) and one float64 identity
    #: LR and lemma scale per eps (float64 VGG-16 passes are seconds each on a CPU)
    smoke_cuts = {"seeds": lambda v: v[:1], "si_lrs": lambda v: (v[0], v[-1]), "identity_lrs": lambda v: v[:1],
                  "lemma_scales": lambda v: v[-1:], "identity_subset": lambda v: min(v, 8) if v > 0 else 8,
                  "eval_points": lambda v: 1}

    # ------------------------------------------------------------------ measure

    @staticmethod
    def _make(cfg: Config, tr, norm: str, seed: int) -> torch.nn.Module:
        return models.make(cfg.model, norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                           affine=cfg.affine, width=cfg.width, depth=cfg.depth, seed=seed)

    @staticmethod
    def _find_groups(cfg: Config, net: torch.nn.Module, tr) -> tuple[list[str], list[dict]]:
        """Names of the scale-invariant groups used (the per-channel invariant tensors) and all found."""
        from ..paper import current

        smoke = current().smoke  # a smoke run: float64 passes of a few images, one factor c (the same tests)
        n = min(len(tr), 512 if not smoke else 4)
        batch = tr.subset(n).full_batch()
        found = find_scale_invariant(net, batch, F.cross_entropy, seed=cfg.seed, **({"scales": (2.0,)} if smoke else {}))
        listing = [{"name": g.param_name, "per_channel": g.per_channel, "max_violation": g.max_violation, "used": g.per_channel}
                   for g in found]
        return [g.param_name for g in found if g.per_channel], listing

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        t_start = time.perf_counter()
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        groups: dict[str, list[str]] = {}
        listings: dict[str, list[dict]] = {}
        for norm in dict.fromkeys(["bn", *cfg.norms]):
            groups[norm], listings[norm] = self._find_groups(cfg, self._make(cfg, tr, norm, cfg.seeds[0]), tr)
        if not groups["bn"]:
            raise UserError(f"model {cfg.model!r} with BN has no per-channel scale-invariant weights")
        swept = groups["bn"]  # the same tensors in every net: the split is by structure
        for norm in cfg.norms:
            shapes = dict((n, p.shape) for n, p in self._make(cfg, tr, norm, cfg.seeds[0]).named_parameters())
            if any(n not in shapes for n in swept):
                raise UserError(f"model {cfg.model!r} with norm {norm!r} lacks the tensors {swept} that the BN net's groups are")

        identity, lemma = self._identity_runs(cfg, tr, swept, run, ctx)
        arms: dict = {}
        curves: dict = {}
        drift: list[float] = []
        for mode in cfg.modes:
            for norm in cfg.norms:
                got_arms, got_curves = self._sweep_runs(cfg, tr, te, norm, mode, swept, run, ctx)
                arms.update(got_arms)
                curves.update(got_curves)
                drift += [v for a in got_arms.values() for v in a.get("identity_drift", []) if _finite(v)]
        eps0 = {k: v for k, v in identity.items() if "/eps0/" in k}
        eps_default = {k: v for k, v in identity.items() if "/eps_default/" in k}
        nanmax = lambda vals: max([v for v in vals if _finite(v)], default=math.nan)  # noqa: E731
        return {
            "groups": listings, "swept": swept, "identity": identity,
            "norm_identity": {"float64_eps0_max": nanmax(v["max_abs_rel_residual"] for v in eps0.values()),
                              "float64_eps_default_max": nanmax(v["max_abs_rel_residual"] for v in eps_default.values()),
                              "float32_sweep_drift_max": nanmax(drift)},
            "scale_lemma": lemma, "arms": arms, "min_grad_norm_sq": curves,
            "modes": list(cfg.modes), "norms": list(cfg.norms), "seeds": list(cfg.seeds), "si_lrs": list(cfg.si_lrs),
            "steps": {m: (cfg.gd_steps if m == "gd" else cfg.sgd_steps) for m in cfg.modes},
            "schedule": {m: ("constant" if m == "gd" else cfg.sgd_schedule) for m in cfg.modes},
            "other_lr": {m: (cfg.other_lr if m == "gd" else cfg.sgd_other_lr) for m in cfg.modes},
            "batch_size": cfg.batch_size, "fixed_batches": cfg.fixed_batches, "gd_subset": cfg.gd_subset,
            "identity_bn_eps": cfg.identity_bn_eps, "identity_lrs": list(cfg.identity_lrs), "identity_steps": cfg.identity_steps,
            "seconds": round(time.perf_counter() - t_start, 1),
        }

    def _identity_runs(self, cfg: Config, tr, swept: list[str], run: RunDir, ctx: Context) -> tuple[dict, dict]:
        """Float64 full-batch GD at ``identity_lrs`` with BN eps ≈ 0 (and the default eps): the norm
        identity at every step, the lemma's residuals at log-spaced steps."""
        tr64 = (tr.subset(cfg.identity_subset) if cfg.identity_subset else tr).to(dtype=torch.float64)
        identity: dict = {}
        lemma: dict = {}
        last = cfg.identity_steps - 1
        lemma_sched = log_spaced(1, cfg.lemma_per_decade)
        from ..paper import current

        smoke = current().smoke
        for eps_name, eps in (("eps0", cfg.identity_bn_eps), ("eps_default", None)):
            orth, homog, points = [], [], 0
            for lr in cfg.identity_lrs:
                arm = f"identity/{eps_name}/{lr:g}"
                net = self._make(cfg, tr, "bn", cfg.seeds[0]).to(torch.float64)
                eps_used = None
                for m in models.norm_layers(net):
                    if eps is not None:
                        m.eps = eps
                    eps_used = m.eps
                params = dict(net.named_parameters())
                si = {n: params[n] for n in swept}
                opt = torch.optim.SGD(split_param_groups(net, scale_invariant_lr=lr, other_lr=cfg.other_lr,
                                                         groups=list(si.values())), lr=lr)
                run.append_metrics({"arm": arm, "event": "arm", "kind": "identity", "eps": eps_used, "lr_si": lr,
                                    "dtype": "float64", "groups": list(si)})
                lemma_at = (lambda s: s == last) if smoke else (lambda s: lemma_sched(s) or s == last)
                # a smoke run: the lemma once, on the first and the last group (1 + 2 float64 passes, not 1 + 15)
                lemma_si = {k: si[k] for k in dict.fromkeys([swept[0], swept[-1]])} if smoke else si
                probes = [ScaleInvariantStats(si), ScaleLemma(lemma_si, scales=cfg.lemma_scales, every=lemma_at)]
                h = train(net, tr64, opt, steps=cfg.identity_steps, full_batch=True, probes=probes, eval_data=None,
                          eval_train=False, eval_every=cfg.identity_steps + 1, device=ctx.device, seed=cfg.seed,
                          log=lambda r, arm=arm: run.append_metrics({"arm": arm, **r}) if r.get("event") is None else None)
                res = [abs(r[f"scale/{g}/norm_identity_rel_residual"]) for r in h.records for g in si
                       if f"scale/{g}/norm_identity_rel_residual" in r]
                o = [r[f"lemma/{g}/orth_residual"] for r in h.records for g in si if f"lemma/{g}/orth_residual" in r]
                c = [r[f"lemma/{g}/homog_residual"] for r in h.records for g in si if f"lemma/{g}/homog_residual" in r]
                identity[arm] = {"eps": eps_used, "lr_si": lr, "max_abs_rel_residual": max(res) if res else math.nan,
                                 "lemma_orth_max": max(o, default=math.nan), "lemma_homog_max": max(c, default=math.nan),
                                 "diverged": h.diverged}
                orth += o
                homog += c
                points += len(o)
            fin = lambda vals: max([v for v in vals if _finite(v)], default=math.nan)  # noqa: E731
            entry = {"orth_max": fin(orth), "homog_max": fin(homog), "points": points,
                     "nonfinite": sum(not _finite(v) for v in orth + homog)}
            if eps_name == "eps0":
                lemma.update(entry, eps=cfg.identity_bn_eps, scales=list(cfg.lemma_scales), lrs=list(cfg.identity_lrs),
                             steps=cfg.identity_steps)
            else:
                lemma["default_eps"] = entry
        return identity, lemma

    def _sweep_runs(self, cfg: Config, tr, te, norm: str, mode: str, swept: list[str], run: RunDir, ctx: Context):
        """Train every member of one net and optimizer side by side; save the arrays; return arms and curves."""
        full = mode == "gd"
        steps = cfg.gd_steps if full else cfg.sgd_steps
        other_lr = cfg.other_lr if full else cfg.sgd_other_lr
        schedule = "constant" if full else cfg.sgd_schedule
        si = swept if norm == "bn" else []
        lrs = [*cfg.si_lrs, *([0.0] if cfg.control else [])]
        members = [(float(lr), s) for lr in lrs for s in cfg.seeds]
        dev = resolve_device(ctx.device)
        objective = None
        if full:
            train_set = (tr.subset(cfg.gd_subset) if cfg.gd_subset else tr).to(dev)
            make_stream = lambda: train_set.stream(len(train_set), full_batch=True)  # noqa: E731
        else:
            n = len(tr) // cfg.batch_size * cfg.batch_size
            if n == 0:
                raise UserError(f"batch_size {cfg.batch_size} is larger than the training set ({len(tr)})")
            parts = data_mod.FixedBatches(tr.subset(n), cfg.batch_size, seed=cfg.seed + 1).to(dev)
            train_set = parts if cfg.fixed_batches else tr.subset(n).to(dev)
            make_stream = lambda: train_set.stream(cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed))  # noqa: E731
            if si:
                objective = parts.fixed()
        stat_sched, obj_sched = log_spaced(1, cfg.stats_per_decade), log_spaced(1, cfg.objective_per_decade)
        from ..paper import current

        smoke = current().smoke  # a smoke run: the objective's gradient (a pass over the training set) at the last step only
        every = max(1, steps // max(1, cfg.eval_points))
        kw = dict(swept=swept, si=si, other_lr=other_lr, schedule=schedule, steps=steps, make_stream=make_stream, eval_data=te,
                  eval_at=set(range(every, steps, every)), stat_at={t for t in range(steps) if stat_sched(t)},
                  objective=objective, objective_at=({t for t in range(steps) if obj_sched(t) and not smoke} | {steps - 1}),
                  step_grad=full and bool(si), device=dev)
        chunk = cfg.members_per_pass or len(members)
        for lr, s in members:
            run.append_metrics({"arm": _arm_name(norm, mode, lr), "event": "arm", "kind": "sweep", "norm": norm, "mode": mode,
                                "lr_si": lr, "seed": s, "other_lr": other_lr, "schedule": schedule, "groups": list(si),
                                "swept": swept, "steps": steps, "train_size": len(train_set)})
        t0 = time.perf_counter()
        make = lambda seed: self._make(cfg, tr, norm, seed)  # noqa: E731
        res = _concat_members([_train_members(make, members[i:i + chunk], **kw) for i in range(0, len(members), chunk)])
        run.save_arrays(f"sweep_{norm}_{mode}.npz", **res, lrs=np.array([m[0] for m in members]),
                        seeds=np.array([m[1] for m in members]))
        for i, (lr, s) in enumerate(members):
            d = int(res["diverged_at"][i])
            run.append_metrics({"arm": _arm_name(norm, mode, lr), "event": "arm_end", "seed": s, "diverged": d >= 0,
                                "diverged_at": d if d >= 0 else None, "test_acc": float(res["test_acc"][i, -1]),
                                "seconds": round(time.perf_counter() - t0, 2)})
        return _arm_results(res, members, norm=norm, mode=mode, steps=steps, other_lr=other_lr, schedule=schedule,
                            has_si=bool(si))

    # ------------------------------------------------------------------ judge

    def judge(self, summary: dict, th: Thresholds) -> list:
        modes = summary["modes"]
        return [self._judge_lemma(summary, th), self._judge_identity(summary, th),
                *(self._judge_rate(claim, mode, summary, th) for claim, mode in (("gd-any-lr-rate", "gd"), ("sgd-any-lr-rate", "sgd"))
                  if mode in modes),
                self._judge_lr_span(summary, th), self._judge_eff_lr(summary, th)]

    @staticmethod
    def _judge_lemma(summary: dict, th: Thresholds):
        lem = summary.get("scale_lemma") or {}
        orth, homog, n = lem.get("orth_max", math.nan), lem.get("homog_max", math.nan), lem.get("points", 0)
        rule = (f"|⟨∇L(w),w⟩|/(‖∇L‖‖w‖) ≤ {th.lemma_max_residual:.0e} and max_c ‖c∇L(cw) − ∇L(w)‖/‖∇L‖ ≤ "
                f"{th.lemma_max_residual:.0e} at every measured step and group (float64, BN eps ≈ 0)")
        if not n or not (_finite(orth) and _finite(homog)):
            return verdict("scale-lemma", None, None, "no lemma residual was measured (no float64 identity run)", rule)
        worst = max(orth, homog)
        d = lem.get("default_eps") or {}
        bad = lem.get("nonfinite", 0)
        detail = (f"float64 full-batch GD, BN eps={lem.get('eps', math.nan):g}, η_w in {lem.get('lrs')}, {lem.get('steps')} steps; "
                  f"{n} measured (step, group) points: max |⟨∇L(w),w⟩|/(‖∇L‖‖w‖) = {orth:.1e}, "
                  f"max_c ‖c∇L(cw) − ∇L(w)‖/‖∇L‖ = {homog:.1e} (c in {lem.get('scales')})"
                  + (f"; {bad} residuals not finite (zero gradient)" if bad else "")
                  + f". For comparison, BN eps=1e-5: {d.get('orth_max', math.nan):.1e} and {d.get('homog_max', math.nan):.1e}.")
        return verdict("scale-lemma", worst <= th.lemma_max_residual, worst, detail, rule)

    @staticmethod
    def _judge_identity(summary: dict, th: Thresholds):
        ni = summary["norm_identity"]
        worst = ni["float64_eps0_max"]
        ok = None if not _finite(worst) else worst <= th.identity_max_residual
        return verdict("norm-identity", ok, worst,
                       f"float64 full-batch GD, BN eps={summary['identity_bn_eps']:g}, η_w in {summary['identity_lrs']}, "
                       f"{summary['identity_steps']} steps: max |relative residual| over steps and groups {worst:.1e}. "
                       f"For comparison: float64 with BN eps=1e-5 {ni['float64_eps_default_max']:.1e}; the float32 sweep "
                       f"(eps=1e-5), cumulative |‖w_T‖² − ‖w_0‖² − Σ_t η_t²‖g_t‖²|/‖w_T‖² up to {ni['float32_sweep_drift_max']:.1e}.",
                       f"max |relative residual| ≤ {th.identity_max_residual:.0e}")

    @staticmethod
    def _judge_rate(claim: str, mode: str, summary: dict, th: Thresholds):
        runs = _sweep(summary["arms"], mode, "bn")
        p = _RATE_POWER[mode]
        T = int(summary["steps"][mode])
        F_ = math.log(T) ** th.polylog_power if T > 1 else math.nan
        rule = (f"for every η_w of a grid spanning ≥ {fmt(th.rate_min_decades)} decades: T^{p:g}·min_(t<T) ‖∇̃L‖² "
                f"(geometric mean over seeds; a diverged run counts as ∞) ≤ (ln T)^{fmt(th.polylog_power)} = {fmt(F_)} × the best "
                f"η_w's, at T = {T} ≥ {th.rate_min_steps} steps")
        if not runs:
            return verdict(claim, None, None, f"no {mode.upper()} run of the BN net", rule)
        lrs = [a["lr_si"] for a in runs]
        span = math.log10(max(lrs) / min(lrs))
        if T < th.rate_min_steps:
            return verdict(claim, None, None, f"only T = {T} steps (< {th.rate_min_steps}): too few for a rate", rule)
        sched = summary.get("schedule", {}).get(mode)
        if mode == "sgd" and sched != "inv_sqrt":  # the theorem's SGD rate is for η_t = η/√(t+1)
            return verdict(claim, None, None, f"SGD ran with the {sched!r} schedule, not the theorem's η/√(t+1) "
                                              f"(sgd_schedule = 'inv_sqrt')", rule)
        if span < th.rate_min_decades - 1e-9:
            return verdict(claim, None, None, f"the η_w grid spans {span:.2g} decades (< {fmt(th.rate_min_decades)})", rule)

        def q(a: dict) -> list[float]:
            return [T**p * max(m, 1e-300) if _finite(m) and not d else math.inf
                    for m, d in zip(a.get("min_grad_norm_sq") or [math.nan], a.get("diverged") or [False])]

        per_run = [q(a) for a in runs]
        Q = [geometric_mean(v) for v in per_run]
        best = min(Q)
        if not math.isfinite(best):
            return verdict(claim, False, math.inf, f"no {mode.upper()} run of the BN net converged (all diverged or unmeasured)", rule)
        ratios = [v / best for v in Q]
        worst = max(ratios)
        n_seeds = min(len(v) for v in per_run)
        per_seed = []
        for s in range(n_seeds):
            qs = [v[s] for v in per_run]
            per_seed.append(max(qs) / min(qs) if math.isfinite(min(qs)) else math.inf)
        band, lo, hi = decades_span(lrs, [r <= F_ for r in ratios])
        i_best, i_worst = Q.index(best), ratios.index(worst)
        what = ("the full-batch loss, every step" if mode == "gd" else
                f"the objective over a fixed partition into batches of {summary['batch_size']}, at log-spaced steps; "
                f"schedule {summary['schedule'][mode]}" + ("" if summary["fixed_batches"] else " (SGD reshuffles: a proxy)"))
        detail = (f"T = {T}, intrinsic gradient of {what}; T^{p:g}·min_(t<T) ‖∇̃L‖² by η_w (× the best): "
                  + ", ".join(f"{lr:g}: {v:.3g} (×{r:.3g})" for lr, v, r in zip(lrs, Q, ratios))
                  + f". Best η_w {lrs[i_best]:g}; worst ×{worst:.3g} at η_w {lrs[i_worst]:g}; within ×{fmt(F_)}: "
                  + (f"η_w {lo:g} to {hi:g} ({band:.0f} decades) of the grid's {span:.0f}" if lo is not None else "none"))
        return verdict(claim, worst <= F_, worst, detail, rule, spread="worst ratio, seed by seed: " + seed_spread(per_seed, unit="×"))

    @staticmethod
    def _judge_lr_span(summary: dict, th: Thresholds):
        arms = summary["arms"]
        rule = (f"for every judged optimizer: BN trains (no seed diverged, seed-mean final test accuracy within "
                f"{th.acc_tolerance:.0%} of the optimizer's best) over ≥ {fmt(th.bn_min_decades)} decades of η_w, the plain "
                f"net with the same split over ≤ {fmt(th.plain_max_decades)}; judged only where the BN net's η_w = 0 control "
                f"ends ≥ {th.control_margin:.0%} below the best, and not where the plain band reaches the grid's edge within "
                f"the limit (its true width is then unknown)")
        parts, oks, bn_decs, seed_decs = [], [], [], []

        def band(lst: list[dict], ok: list[bool]) -> dict:
            span, lo, hi = decades_span([a["lr_si"] for a in lst], ok)
            return {"decades": span if lo is not None else 0.0, "lo": lo, "hi": hi}

        def words(b: dict) -> str:
            return "no η_w" if b["lo"] is None else f"{b['decades']:.0f} decades ({b['lo']:g} to {b['hi']:g})"

        for mode in summary["modes"]:
            bn, plain = _sweep(arms, mode, "bn"), _sweep(arms, mode, "none")
            ctrl = arms.get(f"bn/{mode}/control")
            best = max((_mean_acc(a) for a in bn + plain if math.isfinite(_mean_acc(a))), default=math.nan)
            head = f"{mode.upper()}: "
            if not (bn and plain):
                parts.append(head + "not judged: needs both nets")
                continue
            if not math.isfinite(best):
                parts.append(head + "not judged: no run has a final accuracy")
                continue
            accs = "BN " + ", ".join(f"{a['lr_si']:g}: {_acc_text(a)}" for a in bn)
            accs += "; plain " + ", ".join(f"{a['lr_si']:g}: {_acc_text(a)}" for a in plain)
            c_acc = _mean_acc(ctrl) if ctrl else math.nan
            pc = arms.get(f"none/{mode}/control")
            ctrl_text = f"η_w = 0 control: BN {c_acc:.1%}" + (f", plain {_mean_acc(pc):.1%}" if pc else "")
            if not math.isfinite(c_acc):
                parts.append(head + f"not judged: no η_w = 0 control. {accs}")
                continue
            if best - c_acc < th.control_margin - 1e-12:
                parts.append(head + f"not judged: the {ctrl_text} is within {best - c_acc:.1%} of the best {best:.1%}: "
                             f"accuracy cannot tell trained hidden weights from random ones. {accs}")
                continue
            b_bn = band(bn, [math.isfinite(_mean_acc(a)) and _mean_acc(a) >= best - th.acc_tolerance for a in bn])
            b_pl = band(plain, [math.isfinite(_mean_acc(a)) and _mean_acc(a) >= best - th.acc_tolerance for a in plain])
            grid = [a["lr_si"] for a in plain]
            edge = b_pl["lo"] is not None and (b_pl["lo"] == min(grid) or b_pl["hi"] == max(grid))
            if edge and b_pl["decades"] <= th.plain_max_decades + 1e-9 and b_bn["decades"] >= th.bn_min_decades - 1e-9:
                # (a BN band narrower than required fails whatever the plain net's true width)
                parts.append(head + f"not judged: the plain net trains at the grid's edge ({words(b_pl)}), so its band may be "
                             f"wider than the grid shows. BN trains over {words(b_bn)} (best {best:.1%}; {ctrl_text}). {accs}")
                continue
            ok = b_bn["decades"] >= th.bn_min_decades - 1e-9 and b_pl["decades"] <= th.plain_max_decades + 1e-9
            oks.append(ok)
            bn_decs.append(b_bn["decades"])
            parts.append(head + f"BN trains over {words(b_bn)}, plain over {words(b_pl)} (best {best:.1%}; {ctrl_text}). {accs}")
            # the same rule seed by seed (each seed's own best), for the spread
            n_seeds = min(len(a["test_acc"]) for a in bn + plain)
            for s in range(n_seeds):
                acc_s = lambda a: (a["test_acc"][s] if not a["diverged"][s] and _finite(a["test_acc"][s]) else math.nan)  # noqa: E731
                best_s = max((acc_s(a) for a in bn + plain if math.isfinite(acc_s(a))), default=math.nan)
                dec = band(bn, [math.isfinite(acc_s(a)) and acc_s(a) >= best_s - th.acc_tolerance for a in bn])["decades"]
                if len(seed_decs) <= s:
                    seed_decs.append(dec)
                else:
                    seed_decs[s] = min(seed_decs[s], dec)
        value = min(bn_decs) if bn_decs else None
        return verdict("lr-insensitive", all(oks) if oks else None, value, "; ".join(parts) or "no optimizer to judge", rule,
                       spread=("BN band, seed by seed: " + seed_spread(seed_decs, unit=" decades")) if seed_decs else "")

    @staticmethod
    def _judge_eff_lr(summary: dict, th: Thresholds):
        arms = summary["arms"]
        G = th.eff_lr_growth_factor
        rule = (f"every pair of BN runs with η_w 100x apart in which both runs grew Σ_t η_t²‖g_t‖² ≥ {fmt(G)}·‖w_0‖² in every "
                f"seed ends with effective LRs η_T/‖w_T‖² within a factor {fmt(th.eff_lr_max_factor)} (seed geometric mean); "
                f"inconclusive if no pair meets the condition")
        parts, factors, seed_worst = [], [], {}
        for mode in summary["modes"]:
            by_lr = {a["lr_si"]: a for a in _sweep(arms, mode, "bn")}
            judged, skipped = [], []
            for lr in sorted(by_lr):
                lr2 = next((x for x in by_lr if abs(math.log10(x / lr) - _PAIR_DECADES) < 1e-6), None)
                if lr2 is None:
                    continue
                a, b = by_lr[lr], by_lr[lr2]
                n = min(len(a.get("growth") or []), len(b.get("growth") or []))
                cond = n > 0 and all(not a["diverged"][s] and not b["diverged"][s] and _finite(a["growth"][s])
                                     and _finite(b["growth"][s]) and a["growth"][s] >= G and b["growth"][s] >= G for s in range(n))
                g_min = min([v for v in (a.get("growth") or []) if _finite(v)], default=math.nan)
                name = f"{lr:g}-{lr2:g}"
                if not cond:
                    skipped.append(f"{name} (growth of η_w {lr:g}: {g_min:.3g}·‖w_0‖²)")
                    continue
                fs = []
                for s in range(n):
                    r = b["eff_lr_last"][s] / a["eff_lr_last"][s]
                    f = max(r, 1 / r) if _finite(r) and r > 0 else math.inf
                    fs.append(f)
                    seed_worst[s] = max(seed_worst.get(s, 0.0), f)
                f = geometric_mean(fs)
                factors.append(f)
                r_mean = geometric_mean([b["eff_lr_last"][s] / a["eff_lr_last"][s] for s in range(n)])
                judged.append(f"{name}: final ratio {r_mean:.3g} (×{f:.3g}; growth ≥ {g_min:.3g}·‖w_0‖²)")
            parts.append(f"{mode.upper()}: judged " + ("; ".join(judged) or "none") + "; not judged (condition not met): "
                         + (", ".join(skipped) or "none"))
        worst = max(factors) if factors else None
        return verdict("effective-lr-converges", None if worst is None else worst <= th.eff_lr_max_factor, worst,
                       ". ".join(parts) + (f". Worst factor {worst:.3g} (the pairs start 100 apart)." if worst is not None
                                           else ". No pair of runs 100x apart meets the condition."),
                       rule, spread=("worst factor, seed by seed: " + seed_spread([seed_worst[s] for s in sorted(seed_worst)], unit="×"))
                       if seed_worst else "")

    # ------------------------------------------------------------------ figures

    def figures(self, run: RunDir):
        summary = run.read_json("summary.json")
        th = applied_thresholds(self, run)
        arrays = {(norm, mode): run.load_arrays(f"sweep_{norm}_{mode}.npz") for mode in summary["modes"] for norm in summary["norms"]}
        paths = []
        for mode in summary["modes"]:
            paths.append(_fig_learning_curves(summary, arrays, mode, run.figure_path(f"learning_curves_{mode}.png")))
        paths.append(_fig_norm_efflr(summary, arrays, th, run.figure_path("weight_norm_effective_lr.png")))
        paths.append(_fig_rate(summary, th, run.figure_path("grad_norm_rate.png")))
        paths.append(_fig_acc_vs_lr(summary, th, run.figure_path("accuracy_vs_lr.png")))
        paths.append(_fig_identity(summary, run.metrics(), th, run.figure_path("norm_identity.png")))
        return paths


# ----------------------------------------------------------------------------- figures


def _lr_colors(lrs) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    pos = sorted({float(v) for v in lrs if v > 0})
    if not pos:
        return {0.0: "grey"}
    lo, hi = math.log10(min(pos)), math.log10(max(pos))
    out = {lr: cmap(0.9 * (math.log10(lr) - lo) / (hi - lo) if hi > lo else 0.0) for lr in pos}
    out[0.0] = "grey"
    return out


def _loglog(ax, x: bool = True, y: bool = True) -> None:
    """Log axes without minor ticks (their layout dominates the drawing time of wide log ranges)."""
    if x:
        ax.set_xscale("log")
    if y:
        ax.set_yscale("log")
    ax.minorticks_off()


def _lr_label(lr: float) -> str:
    return "η_w = 0 (control)" if lr == 0 else f"η_w = {lr:g}"


def _by_lr(arr: dict) -> dict[float, np.ndarray]:
    """``{η_w: member indices}`` of a sweep's arrays (in the order of the members)."""
    lrs = np.asarray(arr["lrs"], float)
    return {float(lr): np.flatnonzero(lrs == lr) for lr in dict.fromkeys(lrs.tolist())}


def _band(ax, x, rows: np.ndarray, color, label=None, *, log=False, **kw):
    """Mean (geometric with ``log``) over the rows with a min–max band."""
    import warnings

    rows = np.asarray(rows, float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (every seed diverged) stay NaN
        if log:
            r = np.where(rows > 0, rows, np.nan)
            mid = np.exp(np.nanmean(np.log(r), 0))
        else:
            mid = np.nanmean(rows, 0)
        lo, hi = np.nanmin(rows, 0), np.nanmax(rows, 0)
    ax.plot(x, mid, color=color, label=label, **kw)
    if rows.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)


def _fig_learning_curves(summary, arrays, mode, path):
    import matplotlib.pyplot as plt

    colors = _lr_colors(summary["si_lrs"])
    norms = summary["norms"][:2]
    with plt.rc_context(STYLE), np.errstate(all="ignore"):
        fig, axes = plt.subplots(len(norms), 2, figsize=(10, 3.3 * len(norms)), squeeze=False, sharex=True)
        for row, norm in enumerate(norms):
            arr = arrays[(norm, mode)]
            loss = np.asarray(arr["loss"], float)
            steps = np.arange(loss.shape[1])
            for lr, idx in _by_lr(arr).items():
                y = np.minimum(loss[idx], _LOSS_CLIP)
                if mode == "sgd":
                    w = max(1, y.shape[1] // 50)
                    y = np.stack([smooth(r, w) for r in y])
                n_div = int((np.asarray(arr["diverged_at"])[idx] >= 0).sum())
                lab = _lr_label(lr) + (f" ({n_div}/{len(idx)} diverged)" if n_div else "")
                ls = "--" if lr == 0 else "-"
                _band(axes[row, 0], steps, y, colors[lr], lab, log=True, ls=ls)
                _band(axes[row, 1], np.asarray(arr["eval_steps"]), 100 * np.asarray(arr["test_acc"])[idx], colors[lr], lab,
                      marker="o", ms=2.5, ls=ls)
            name = ("BN: hidden weights at η_w, the rest at η_g = %g" if norm == "bn" else
                    "no norm: hidden weights at η_w, biases and head at η_g = %g") % summary["other_lr"][mode]
            axes[row, 0].set_title(f"{name}: training loss", fontsize=9)
            axes[row, 1].set_title("test accuracy (mean over seeds, band: min–max)", fontsize=9)
            _loglog(axes[row, 0], x=False)
            axes[row, 0].set_ylim(top=_LOSS_CLIP)
            axes[row, 0].set_ylabel("loss" + (" (moving avg)" if mode == "sgd" else "") + f", clipped at {_LOSS_CLIP:g}")
            axes[row, 1].set_ylabel("test accuracy (%)")
            axes[row, 1].set_ylim(0, 100)
            axes[row, 1].axhline(10, color="grey", lw=0.8, ls="--")
            axes[row, 1].legend(fontsize=6, loc="lower right")
        for ax in axes[-1]:
            ax.set_xlabel("step")
        sched = summary["schedule"][mode]
        fig.suptitle(f"{_MODE_LABEL[mode]}, {'constant LRs' if sched == 'constant' else 'LRs η/√(t+1)'}, "
                     f"{len(summary['seeds'])} seeds (no momentum, no weight decay)")
        fig.tight_layout()
        return save(fig, path)


def _fig_norm_efflr(summary, arrays, th: Thresholds, path):
    import matplotlib.pyplot as plt

    colors = _lr_colors(summary["si_lrs"])
    modes = summary["modes"]
    with plt.rc_context(STYLE), np.errstate(all="ignore"):
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
        for row, mode in enumerate(modes):
            arr = arrays[("bn", mode)]
            st = np.asarray(arr["stat_steps"], float)
            nsq = np.asarray(arr["norm_sq"], float).sum(2)  # [M, J]
            sched = summary["schedule"][mode]
            fac = np.array([lr_factor(sched, int(t)) for t in st])
            ax = axes[row, 0]
            for lr, idx in _by_lr(arr).items():
                if lr > 0:
                    _band(ax, st + 1, lr * fac / nsq[idx], colors[lr], _lr_label(lr), log=True)
            _loglog(ax)
            ax.set_xlabel("step + 1")
            ax.set_ylabel("effective LR  η_t / ‖w_t‖² (all groups)")
            ax.set_title(f"BN net, {_MODE_LABEL[mode]}: effective learning rate (geo. mean, min–max)", fontsize=9)
            ax.legend(fontsize=6)
            ax = axes[row, 1]
            for a in _sweep(summary["arms"], mode, "bn"):
                e = np.asarray(a.get("eff_lr_last") or [np.nan], float)
                if not np.isfinite(e).any():
                    continue
                grown = all(_finite(g) and g >= th.eff_lr_growth_factor for g in a.get("growth") or [np.nan])
                c = colors[a["lr_si"]]
                m = float(np.exp(np.nanmean(np.log(e))))
                ax.plot([a["lr_si"]] * 2, [np.nanmin(e), np.nanmax(e)], color=c, lw=2)
                ax.plot([a["lr_si"]], [m], marker="o", ms=6, color=c, mfc=c if grown else "white")
                ax.plot([a["lr_si"]], [np.nanmean(a.get("eff_lr_first") or [np.nan])], marker="_", ms=12, color="grey")
            _loglog(ax)
            ax.set_xlabel("η_w")
            ax.set_ylabel("final effective LR (grey: at step 0)")
            ax.set_title(f"filled: Σ η²‖g‖² ≥ {th.eff_lr_growth_factor:g}·‖w_0‖² in every seed; pairs 100x apart, "
                         "both filled, are judged", fontsize=8)
        fig.tight_layout()
        return save(fig, path)


def _fig_rate(summary, th: Thresholds, path):
    import matplotlib.pyplot as plt

    colors = _lr_colors(summary["si_lrs"])
    modes = summary["modes"]
    curves = summary["min_grad_norm_sq"]
    with plt.rc_context(STYLE), np.errstate(all="ignore"):
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.8 * len(modes)), squeeze=False)
        for row, mode in enumerate(modes):
            p = _RATE_POWER[mode]
            T = int(summary["steps"][mode])
            F_ = math.log(T) ** th.polylog_power if T > 1 else np.nan
            ax = axes[row, 0]
            runs = _sweep(summary["arms"], mode, "bn")
            finals = []
            for a in runs:
                c = curves.get(a["arm"])
                if not c:
                    continue
                Tp = np.asarray(c["T"], float)
                m = np.asarray(c["m"], float)
                _band(ax, Tp, Tp**p * m, colors[a["lr_si"]], _lr_label(a["lr_si"]), log=True)
                q = [T**p * v if _finite(v) and not d else np.inf for v, d in zip(a["min_grad_norm_sq"], a["diverged"])]
                finals.append((a["lr_si"], q))
            _loglog(ax)
            ax.set_xlabel("T (steps)")
            ax.set_ylabel(f"T^{p:g} · min_(t<T) ‖∇̃L‖²")
            what = "full-batch, every step" if mode == "gd" else "objective at log-spaced steps"
            ax.set_title(f"BN net, {_MODE_LABEL[mode]} ({what}); bounded if the rate holds", fontsize=9)
            ax.legend(fontsize=6)
            ax = axes[row, 1]
            if finals:
                Q = [geometric_mean(q) for _, q in finals]
                best = min(Q)
                for (lr, q), Qv in zip(finals, Q):
                    qs = np.asarray(q, float) / best
                    ax.plot([lr] * len(qs), np.where(np.isfinite(qs), qs, np.nan), ls="none", marker=".", color=colors[lr], alpha=0.6)
                    ax.plot([lr], [Qv / best], marker="o", ms=7, color=colors[lr])
                ax.plot([f[0] for f in finals], [v / best for v in Q], color="k", lw=0.8)
            ax.axhline(F_, color="tab:red", ls="--", lw=1, label=f"(ln T)^{th.polylog_power:g} = {F_:.3g}")
            ax.axhline(1, color="grey", lw=0.6)
            _loglog(ax)
            ax.set_xlabel("η_w")
            ax.set_ylabel("× the best η_w (dots: seeds, circles: geo. mean)")
            ax.set_title(f"T = {T}: every η_w against the best-tuned one", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return save(fig, path)


def _fig_acc_vs_lr(summary, th: Thresholds, path):
    import matplotlib.pyplot as plt

    modes = summary["modes"]
    arms = summary["arms"]
    with plt.rc_context(STYLE), np.errstate(all="ignore"):
        fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4), squeeze=False, sharey=True)
        for col, mode in enumerate(modes):
            series = []
            for norm, ls in (("bn", "-"), ("none", "--")):
                lst = _sweep(arms, mode, norm)
                if not lst:
                    continue
                acc = [np.asarray(a["test_acc"], float) for a in lst]
                series.append({
                    "label": "BN" if norm == "bn" else "no norm", "norm": norm, "linestyle": ls,
                    "lrs": [a["lr_si"] for a in lst], "acc": [_mean_acc(a) for a in lst],
                    "diverged": [any(a["diverged"]) for a in lst],
                    "spread": [(np.nanmax(v) - np.nanmin(v)) / 2 if np.isfinite(v).any() else np.nan for v in acc],
                })
            ax = axes[0, col]
            accuracy_vs_lr(ax, series, chance=0.1, xlabel="η_w of the hidden weights (the rest at the tuned η_g)",
                           title=f"{_MODE_LABEL[mode]} (mean of {len(summary['seeds'])} seeds, band: ± half range)")
            best = max((v for s in series for v in s["acc"] if np.isfinite(v)), default=np.nan)
            for norm, ls in (("bn", "-"), ("none", "--")):
                c = arms.get(f"{norm}/{mode}/control")
                if c:
                    ax.axhline(100 * _mean_acc(c), color="grey", ls=ls, lw=1)
                    ax.text(0.99, 100 * _mean_acc(c) + 1, f"{'BN' if norm == 'bn' else 'no norm'}: η_w = 0 control", ha="right",
                            transform=ax.get_yaxis_transform(), fontsize=7, color="grey")
            if np.isfinite(best):
                ax.axhline(100 * (best - th.acc_tolerance), color="tab:green", lw=0.8, ls=":")
                ax.text(0.01, 100 * (best - th.acc_tolerance) - 4, f"trains: ≥ best − {th.acc_tolerance:.0%}",
                        transform=ax.get_yaxis_transform(), fontsize=7, color="tab:green")
        for ax in axes[0, 1:]:
            ax.set_ylabel("")
        fig.suptitle("Final test accuracy against η_w, the same split in both nets (T: "
                     + ", ".join(f"{_MODE_LABEL[m]} {summary['steps'][m]} steps" for m in modes) + ")")
        fig.tight_layout()
        return save(fig, path)


def _fig_identity(summary, recs, th: Thresholds, path):
    import matplotlib.pyplot as plt

    identity = summary["identity"]
    colors = _lr_colors([a["lr_si"] for a in identity.values()])
    panels = ((("scale/all/norm_identity_rel_residual", "-"),),
              (("lemma/all/orth_residual", "-"), ("lemma/all/homog_residual", ":")))
    with plt.rc_context(STYLE), np.errstate(all="ignore"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, keys in zip(axes, panels):
            for key, ls in keys:
                for arm, a in sorted(identity.items(), key=lambda kv: (kv[1]["eps"], kv[1]["lr_si"])):
                    s, v = _select(recs, arm, key)
                    if not s:
                        continue
                    v = np.maximum(np.abs(np.asarray(v, float)), 1e-20)
                    small = a["eps"] < 1e-10
                    what = {"orth_residual": "⟨∇L,w⟩, ", "homog_residual": "∇L(cw), "}.get(key.rsplit("/", 1)[1], "")
                    ax.plot(np.asarray(s), v, color=colors.get(a["lr_si"], "k"), ls=ls, marker="o" if small else "x", ms=3,
                            label=f"{what}η_w={a['lr_si']:g}, eps={a['eps']:g}")
            ax.axhline(th.identity_max_residual, color="k", lw=1, ls="--", label=f"threshold {th.identity_max_residual:.0e}")
            _loglog(ax, x=False)
            ax.set_xlabel("step")
            ax.legend(fontsize=6, ncol=2)
        axes[0].set_ylabel("|‖w_{t+1}‖² − ‖w_t‖² − η²‖g_t‖²| / ‖w_t‖²")
        axes[0].set_title("A2: norm identity, all scale-invariant weights (o: eps ≈ 0, x: eps 1e-5)", fontsize=9)
        axes[1].set_ylabel("relative residual, worst group")
        axes[1].set_title("A1: |⟨∇L(w),w⟩|/(‖∇L‖‖w‖) (solid), max_c ‖c∇L(cw) − ∇L(w)‖/‖∇L‖ (dotted)", fontsize=9)
        fig.suptitle("float64 full-batch GD")
        fig.tight_layout()
        return save(fig, path)
