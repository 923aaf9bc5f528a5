"""``exp-lr``: an exponentially growing learning rate is weight decay in disguise (Li & Arora 2020).

Li & Arora, *An Exponential Learning Rate Schedule for Deep Learning* (ICLR 2020), Theorem 2.1:
if the loss is scale-invariant in all trained parameters jointly, SGD with constant
``(η, λ, γ)`` (learning rate, weight decay, momentum) and SGD with **no** weight decay, the same
``γ`` and ``η̃_t = η α^{-2t-1}`` visit the same directions ``w/‖w‖`` at every step
(``w̃_t = α^{-t} w_t``), provided the momentum buffer is mapped too
(:class:`bnlab.schedules.ExpLR`; ``α`` the larger root of ``x² - (1+γ-λη)x + γ``). TEXP
(:class:`bnlab.schedules.TEXP`) is the same for step decay. Power-of-two renormalization keeps
the exponential schedule inside float32's range.

**Setting.** A fully scale-invariant BN net: ``models.make(model, norm="bn", affine=False,
freeze_last=True)`` (no BN γ/β, the classifier fixed), so every trained tensor is a conv/linear
weight feeding a BN layer (for ``preresnet`` this holds only jointly: residual sums mix convs;
``joint_invariance_error`` in the summary measures it: ``max |f(3w) - f(w)| / max |f(w)|`` on the
fixed batch, float64). Every arm of a comparison starts from the same initialization (the same
``seed``) and sees the same batches: the arms are stepped side by side in one loop
(:func:`_lockstep`), and after every step :func:`bnlab.schedules.compare_trajectories` measures the
angle between their weights (per tensor and all trained tensors jointly) and the largest
difference of their outputs (logits) on a fixed batch of test inputs, in train mode (batch
statistics; the BN running statistics are restored).

**Parts.**

* **A. Equivalence (claims 1, 2).** Float64 with BN's ``eps = exact_bn_eps`` (1e-30, zero in
  effect: PyTorch refuses 0; the theorem has no ``eps``), ``equiv_steps`` steps, three *main*
  pairs: weight decay (``wd``) vs :class:`ExpLR` (``exp``); the ablation ``exp_nopreset``: ExpLR
  with the momentum-buffer preset removed right after constructing it (ExpLR has no switch for
  this, so the preset buffers are popped from ``optimizer.state``: PyTorch's default start, where
  the first step's buffer is the gradient); step decay + weight decay (``sd``) vs :class:`TEXP`
  (``texp``). Output differences every ``output_every`` steps. Three *side* pairs for the first
  ``side_steps`` steps (output differences every ``side_output_every``): the ``wd``/``exp`` pair in
  float32 (round-off only), the same fully scale-invariant net in float64 with BN's default
  ``eps = 1e-5`` (``bn_eps``), and the **standard net** (BN with trainable γ/β, trainable
  classifier with bias, default ``eps``) with weight decay on every parameter vs ExpLR on every
  parameter (``standard``; ``renormalize=False`` there, since rescaling parameters that are not
  scale-invariant would change the function; the angle of its conv/linear weights alone is
  recorded too). Every ``equiv_eval_every`` steps the pairs are also compared in **eval mode**
  (BN running statistics): the running averages mix batch statistics of weights of different
  norms, which the map ``w̃ = α^{-t} w`` does not carry over, so eval-mode outputs differ even
  where the train-mode function is identical.
* **B. Accuracy (claim 3).** Float32, BN's default ``eps``, ``acc_steps`` steps of batch
  ``acc_batch_size`` on a ``acc_width`` net, for each seed in ``acc_seeds`` (initialization and
  batch order): ``wd``, ``exp``, ``sd``, ``texp`` on the fully scale-invariant net, and
  ``std_wd``/``std_exp`` on the standard net for the first ``acc_standard_seeds`` seeds. Train and
  test loss/accuracy (eval mode) every ``acc_eval_every`` steps. Step decay: the LR is multiplied
  by ``decay_factor`` at the fractions ``decay_at`` of the run.
* **C. Overflow (claim 4).** Float32, ``overflow_steps`` steps on a tiny scale-invariant net whose
  gradient is computed by hand in numpy (100k autograd steps would not fit the quick budget):
  ``X (32x8 fixed Gaussian batch) -> Linear 8->8 (trained, no bias) -> BN (no affine, eps = 0) ->
  ReLU -> Linear 8->4 (fixed) -> softmax cross-entropy`` with fixed random labels; the update is
  PyTorch's SGD with :class:`ExpLR` (``weight_decay = overflow_weight_decay``), once with
  ``renormalize=True`` (``renorm_bound``) and once without, in lockstep. Recorded for the plain
  run: the first step whose forward pass is not finite (BN's variance ``~‖w‖²`` overflows first),
  the first step whose LR exceeds float32's largest value, and the step at which the weights turn
  non-finite or PyTorch's SGD refuses the update (it raises when the LR cannot be converted to
  float32); for the renormalized run whether it stays finite; and whether its weights times
  ``2^k`` equal the plain run's bit for bit while the plain run is finite.

**Claims and verdicts.** (1) max angle of ``wd`` vs ``exp`` (float64, eps 0) over the first 1000
steps ``<= equiv_tol`` (1e-6 rad); (2) the ablation's max angle over the same steps ``>
equiv_tol``; (3) ``|mean final test acc(exp) - mean(wd)|`` and ``|mean(texp) - mean(sd)|`` over
the seeds both ``<= max(acc_tol, noise)``, ``noise`` the larger range over seeds of the two
baselines' final test accuracies; (4) the renormalized run finite for ``>= 100000`` steps while
the plain run overflows. A profile that runs fewer steps than a claim requires gets
``inconclusive`` with the numbers it did measure.

**Hyperparameters.** The paper's ``η = 0.1, γ = 0.9, λ = 5e-4`` in parts A and B at every
profile (``α^{-2} = 1.001`` per step: the LR grows 2.7x over 1000 steps). Part C uses
``overflow_weight_decay = 5e-3`` at quick (LR x1.011 per step, so the plain run overflows after
~8k steps instead of ~90k) and the paper's 5e-4 with 200k steps at paper. Try ``--set
weight_decay=5e-3`` to see the weight-norm equilibrium within the run; there the stale BN
running statistics of the exponential run cost test accuracy in eval mode (see the summary's
``max_eval_mode_output_diff``).

Settings (``--set key=value``): ``data``, ``model``, ``width``, ``depth`` (part A; ``depth`` also
B), ``acc_width`` (part B), ``lr``, ``momentum``, ``weight_decay``, ``decay_at``, ``decay_factor``,
``exact_bn_eps``, ``equiv_steps``, ``equiv_batch_size``, ``output_batch``, ``output_every``,
``equiv_eval_every``, ``side_steps`` (0: no side pairs), ``side_output_every``, ``acc_steps``,
``acc_batch_size``, ``acc_seeds``, ``acc_standard_seeds``, ``acc_eval_every``, ``acc_tol``,
``overflow_steps``, ``overflow_weight_decay``, ``overflow_log_every``, ``renorm_bound``,
``equiv_tol``, ``seed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import data as data_mod
from .. import models
from ..errors import UserError
from ..plotting import STYLE, save, smooth
from ..runs import RunDir
from ..schedules import TEXP, ExpLR, compare_trajectories, step_decay_lr, wd_equivalent_alpha
from ..train import evaluate, resolve_device
from . import Claim, Experiment, Result, judge, register_experiment

_SRC = "Li & Arora 2020"
_REQUIRED_EQUIV_STEPS = 1000
_REQUIRED_OVERFLOW_STEPS = 100_000
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SERIES = "series.npz"

_BASE = dict(
    data="digits", model="convnet", width=4, depth=1, acc_width=8,
    lr=0.1, momentum=0.9, weight_decay=5e-4, decay_at=[0.5, 0.75], decay_factor=0.1,
    exact_bn_eps=1e-30,
    equiv_steps=1000, equiv_batch_size=32, output_batch=64, output_every=1, equiv_eval_every=100,
    side_steps=300, side_output_every=10,
    acc_steps=400, acc_batch_size=64, acc_seeds=[0, 1, 2], acc_standard_seeds=1, acc_eval_every=42,
    acc_tol=0.02,
    overflow_steps=100_000, overflow_weight_decay=5e-3, overflow_log_every=100, renorm_bound=256.0,
    equiv_tol=1e-6, seed=0,
)

# The arms of part A: name -> (net, schedule, dtype, BN eps). net: "si" (fully scale-invariant) or
# "std" (affine BN, trainable classifier); eps None = BN's default.
_A_ARMS = {
    "wd": ("si", "wd", torch.float64, "exact"),
    "exp": ("si", "exp", torch.float64, "exact"),
    "exp_nopreset": ("si", "exp_nopreset", torch.float64, "exact"),
    "sd": ("si", "sd", torch.float64, "exact"),
    "texp": ("si", "texp", torch.float64, "exact"),
    "wd32": ("si", "wd", torch.float32, "exact"),
    "exp32": ("si", "exp", torch.float32, "exact"),
    "wd_eps": ("si", "wd", torch.float64, None),
    "exp_eps": ("si", "exp", torch.float64, None),
    "std_wd": ("std", "wd", torch.float64, None),
    "std_exp": ("std", "exp", torch.float64, None),
}
# pair -> (arm a, arm b, description)
_A_PAIRS = {
    "exact": ("wd", "exp", "WD vs ExpLR, float64, eps 0"),
    "ablation": ("wd", "exp_nopreset", "WD vs ExpLR without buffer preset"),
    "texp": ("sd", "texp", "step decay+WD vs TEXP, float64, eps 0"),
    "float32": ("wd32", "exp32", "WD vs ExpLR, float32, eps 0"),
    "bn_eps": ("wd_eps", "exp_eps", "WD vs ExpLR, float64, BN eps 1e-5"),
    "standard": ("std_wd", "std_exp", "standard net: WD vs ExpLR on all params"),
}
_MAIN_PAIRS = ("exact", "ablation", "texp")  # run for equiv_steps; the others (side pairs) for side_steps
_B_ARMS = {
    "wd": ("si", "wd"), "exp": ("si", "exp"), "sd": ("si", "sd"), "texp": ("si", "texp"),
    "std_wd": ("std", "wd"), "std_exp": ("std", "exp"),
}
_B_PAIRS = {"exact": ("wd", "exp"), "texp": ("sd", "texp"), "standard": ("std_wd", "std_exp")}

_COLORS = {
    "wd": "#1f77b4", "exp": "#ff7f0e", "exp_nopreset": "#7f7f7f", "sd": "#2ca02c", "texp": "#d62728",
    "std_wd": "#17becf", "std_exp": "#e377c2",
    "exact": "#ff7f0e", "ablation": "#7f7f7f", "float32": "#9467bd", "bn_eps": "#8c564b", "standard": "#e377c2",
    "conv": "#bcbd22",
}
_LABELS = {
    "wd": "const LR + WD", "exp": "ExpLR (no WD)", "exp_nopreset": "ExpLR, zero buffer", "sd": "step decay + WD",
    "texp": "TEXP (no WD)", "std_wd": "standard net, const LR + WD", "std_exp": "standard net, ExpLR",
}


# ----------------------------------------------------------------------------- building arms


def _set_bn_eps(model: nn.Module, eps: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = float(eps)


def _phases(cfg: dict, steps: int) -> list[tuple[int, float]]:
    """Step decay: ``lr`` from 0, times ``decay_factor`` at each fraction ``decay_at`` of ``steps``."""
    if any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 for f in cfg["decay_at"]):
        raise UserError(f"decay_at must be a list of fractions in (0, 1), got {cfg['decay_at']!r}")
    starts = sorted({int(round(f * steps)) for f in cfg["decay_at"]} - {0})
    return [(0, float(cfg["lr"]))] + [(s, float(cfg["lr"]) * float(cfg["decay_factor"]) ** (i + 1)) for i, s in enumerate(starts)]


@dataclass
class _Arm:
    """One training run of a lockstep group: its net, optimizer, schedule and per-step series."""

    name: str
    model: nn.Module
    named: dict
    opt: torch.optim.SGD
    sched: Any = None
    lr_fn: Optional[Callable[[int], float]] = None
    dtype: torch.dtype = torch.float32
    steps: int = 0
    diverged_at: Optional[int] = None
    reason: str = ""
    series: dict = field(default_factory=dict)


def _make_arm(name: str, cfg: dict, tr, *, net: str, schedule: str, dtype, eps, width: int, seed: int,
              steps: int, device) -> _Arm:
    standard = net == "std"
    model = models.make(cfg["model"], norm="bn", in_shape=tr.in_shape, num_classes=tr.num_classes, affine=standard,
                        freeze_last=not standard, seed=seed, width=width, depth=cfg["depth"])
    if eps is not None:
        _set_bn_eps(model, eps)
    model.to(device=device, dtype=dtype)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    lr, wd, mom = float(cfg["lr"]), float(cfg["weight_decay"]), float(cfg["momentum"])
    sched, lr_fn = None, None
    if schedule in ("wd", "sd"):
        opt = torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)
        if schedule == "sd":
            phases = _phases(cfg, steps)
            lr_fn = lambda t, phases=phases: step_decay_lr(t, lr_phases=phases)  # noqa: E731
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=mom)
        kw = dict(weight_decay=wd, momentum=mom, renormalize=not standard, renorm_bound=float(cfg["renorm_bound"]))
        if schedule == "texp":
            sched = TEXP(opt, lr_phases=_phases(cfg, steps), **kw)
        else:
            sched = ExpLR(opt, lr=lr, **kw)
        if schedule == "exp_nopreset":
            # Ablation: ExpLR has no switch for the buffer mapping; remove the preset it stored, so
            # the first step starts from PyTorch's default (no buffer: buf = g_0).
            for p in params:
                opt.state[p].pop("momentum_buffer", None)
    return _Arm(name, model, named, opt, sched, lr_fn, dtype, steps)


def _joint_norm(tensors) -> float:
    return float(torch.cat([p.detach().reshape(-1).to(torch.float64) for p in tensors]).norm())


def _si_names(named: dict) -> list[str]:
    """The conv/linear weights that feed a BN layer (all matrices except the classifier)."""
    return [n for n, p in named.items() if p.dim() > 1 and not n.startswith("classifier")]


def _joint_invariance_error(arm: _Arm, x: torch.Tensor, scale: float = 3.0) -> float:
    """``max |f(c w) - f(w)| / max |f(w)|`` with all trained tensors scaled by ``c`` (train mode, float64)."""
    import copy

    model = copy.deepcopy(arm.model).to(torch.float64).train()
    x = x.to(torch.float64)
    with torch.no_grad():
        out = model(x)
        for n, p in model.named_parameters():
            if n in arm.named:
                p.mul_(scale)
        out_c = model(x)
    return float((out_c - out).abs().max() / out.abs().max())


# ----------------------------------------------------------------------------- lockstep training


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in the model's current mode, leaving its buffers (BN running statistics) as they were."""
    saved = [b.clone() for b in model.buffers()]
    try:
        return model(x).to(torch.float64)
    finally:
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)


def _lockstep(arms: dict[str, _Arm], pairs: dict[str, tuple], data, *, steps: int, batch_size: int, seed: int,
              fixed_x: torch.Tensor, eval_every: int, eval_sets: Optional[dict], eval_pairs: bool, eval_train: bool,
              log: Callable, group: str, progress) -> dict:
    """Step all ``arms`` on the same batches (arm ``a`` stops after ``a.steps``); compare the ``pairs``.

    ``pairs``: ``{name: (arm_a, arm_b, output_every)}``. After every step the angles between the two
    arms' weights (:func:`compare_trajectories`: per tensor and all trained tensors jointly) and,
    every ``output_every`` steps (0: never), the largest difference of their outputs on ``fixed_x``
    (train mode, batch statistics, BN buffers restored).

    Returns ``{key: array}`` with keys ``{group}.arm.{arm}.{loss,lr,opt_lr,log2_scale}`` (length
    ``steps``: ``lr`` is the un-rescaled LR of step ``t``, ``opt_lr`` what the optimizer used),
    ``{group}.arm.{arm}.{norm,stored_norm}`` (length ``steps + 1``, index 0 the initialization:
    un-rescaled and as held by the optimizer), and ``{group}.pair.{pair}.{angle,outdiff,per,names}``
    (+ ``conv``, the conv/linear weights jointly, for a standard net); NaN where not measured.
    Evaluations (and, with ``eval_pairs``, eval-mode output differences) go to ``log``.
    """
    T = steps
    for arm in arms.values():
        arm.series = {k: np.full(T, np.nan) for k in ("loss", "lr", "opt_lr", "log2_scale")}
        arm.series["norm"] = np.full(T + 1, np.nan)
        arm.series["stored_norm"] = np.full(T + 1, np.nan)
        arm.series["norm"][0] = arm.series["stored_norm"][0] = _joint_norm(arm.named.values())
    pser: dict[str, dict] = {}
    for pname, (a, b, _) in pairs.items():
        names = list(arms[a].named)
        d = {"angle": np.full(T + 1, np.nan), "outdiff": np.full(T + 1, np.nan),
             "per": np.full((len(names), T + 1), np.nan), "names": np.array(names)}
        if any(n.startswith("classifier") for n in names):  # a standard net: also its conv/linear weights alone
            d["conv"] = np.full(T + 1, np.nan)
        pser[pname] = d
    fixed = {dt: fixed_x.to(dt) for dt in {arm.dtype for arm in arms.values()}}

    def alive(arm: _Arm, t: int) -> bool:
        return arm.diverged_at is None and t <= arm.steps

    def compare(t: int) -> None:
        outs: dict[str, torch.Tensor] = {}
        for pname, (a, b, every) in pairs.items():
            A, B = arms[a], arms[b]
            if not (alive(A, t) and alive(B, t)):
                continue
            r = compare_trajectories(A.model, B.model, params_a=A.named, params_b=B.named)
            d = pser[pname]
            d["angle"][t] = r["overall"]
            d["per"][:, t] = list(r["per_param"].values())
            if every and t % every == 0:
                for n, arm in ((a, A), (b, B)):
                    if n not in outs:
                        outs[n] = _outputs(arm.model, fixed[arm.dtype])
                d["outdiff"][t] = float((outs[a] - outs[b]).abs().max())
            if "conv" in d:
                keep = _si_names(A.named)
                d["conv"][t] = compare_trajectories(A.model, B.model, params_a={n: A.named[n] for n in keep},
                                                    params_b={n: B.named[n] for n in keep})["overall"]

    def do_eval(t: int) -> None:
        if eval_sets is None:
            return
        for name, arm in arms.items():
            if not alive(arm, t) or not (t % eval_every == 0 or t == arm.steps):
                continue
            tr_d, te_d = eval_sets[arm.dtype]
            rec = {"group": group, "arm": name, "event": "eval", "step": t}
            if eval_train:
                m_tr = evaluate(arm.model, tr_d)
                rec.update(train_loss=m_tr["loss"], train_acc=m_tr["acc"])
            m_te = evaluate(arm.model, te_d)
            rec.update(test_loss=m_te["loss"], test_acc=m_te["acc"])
            log(rec)
        if eval_pairs and t % eval_every == 0:
            for pname, (a, b, _) in pairs.items():
                A, B = arms[a], arms[b]
                if not (alive(A, t) and alive(B, t)):
                    continue
                A.model.eval(), B.model.eval()
                try:
                    diff = float((_outputs(A.model, fixed[A.dtype]) - _outputs(B.model, fixed[B.dtype])).abs().max())
                finally:
                    A.model.train(), B.model.train()
                log({"group": group, "pair": pname, "event": "eval_outdiff", "step": t, "eval_output_diff": diff})

    gen = torch.Generator().manual_seed(seed)

    def stream():
        while True:
            yield from data.batches(batch_size, shuffle=True, generator=gen)

    batches = stream()
    for arm in arms.values():
        arm.model.train()
    compare(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, desc=progress, unit="step", leave=False, dynamic_ncols=True)
    try:
        for t in range(T):
            x, y = next(batches)
            xs = {dt: x.to(dt) for dt in fixed}
            for name, arm in arms.items():
                if arm.diverged_at is not None or t >= arm.steps:
                    continue
                s = arm.series
                if arm.lr_fn is not None:
                    for g in arm.opt.param_groups:
                        g["lr"] = arm.lr_fn(t)
                s["opt_lr"][t] = arm.opt.param_groups[0]["lr"]
                s["lr"][t] = arm.sched.unrescaled_lr() if arm.sched is not None else s["opt_lr"][t]
                s["log2_scale"][t] = arm.sched.log2_scale if arm.sched is not None else 0
                arm.opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(arm.model(xs[arm.dtype]), y)
                s["loss"][t] = float(loss.detach())
                if not math.isfinite(s["loss"][t]):
                    arm.diverged_at, arm.reason = t, f"non-finite loss at step {t}"
                    continue
                loss.backward()
                arm.opt.step()
                if arm.sched is not None:
                    arm.sched.step()
                stored = _joint_norm(arm.named.values())
                s["stored_norm"][t + 1] = stored
                s["norm"][t + 1] = stored * (arm.sched.rescale_factor if arm.sched is not None else 1.0)
                if not math.isfinite(stored):
                    arm.diverged_at, arm.reason = t, f"non-finite weights after step {t}"
            compare(t + 1)
            if eval_every:
                do_eval(t + 1)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    out: dict[str, np.ndarray] = {}
    for name, arm in arms.items():
        for k, v in arm.series.items():
            out[f"{group}.arm.{name}.{k}"] = v
        out[f"{group}.arm.{name}.diverged_at"] = np.array(-1 if arm.diverged_at is None else arm.diverged_at)
    for pname, d in pser.items():
        for k, v in d.items():
            out[f"{group}.pair.{pname}.{k}"] = v
    return out


# ----------------------------------------------------------------------------- part C: overflow


class _TinyBNNet:
    """``softmax-CE(relu(BN(X Wᵀ)) Vᵀ, y)`` on a fixed batch, gradient by hand in numpy.

    ``X``: ``(n, d)`` Gaussian, ``y``: random labels, ``V``: ``(k, m)`` fixed; BN without affine and
    with ``eps = 0``, so the loss is exactly scale-invariant in ``W`` (``(m, d)``). Float32.
    """

    def __init__(self, seed: int, n: int = 32, d: int = 8, m: int = 8, k: int = 4) -> None:
        rng = np.random.default_rng(seed)
        self.X = rng.standard_normal((n, d)).astype(np.float32)
        self.onehot = np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
        self.V = (rng.standard_normal((k, m)) / math.sqrt(m)).astype(np.float32)
        self.W0 = (rng.standard_normal((m, d)) * math.sqrt(2.0 / d)).astype(np.float32)
        self.Vt = np.ascontiguousarray(self.V.T)
        self.inv_n = np.float32(1.0 / n)

    def loss_grad(self, W: np.ndarray, out: np.ndarray) -> tuple[float, bool]:
        """Write ``∇L(W)`` into ``out``; return ``(L(W), finite)``, ``finite`` False when the BN
        variance (~‖W‖²) or the loss left float32's range.

        Written for speed on tiny arrays (ufunc reductions, ``1/n`` with ``n`` a power of two) and
        so that a power-of-two scaling of ``W`` scales every intermediate exactly.
        """
        inv_n = self.inv_n
        h = self.X @ W.T                                           # (n, m)
        c = h - np.add.reduce(h, 0) * inv_n
        s = np.sqrt(np.add.reduce(c * c, 0) * inv_n)               # BN scale, eps = 0
        z = c / s
        pos = z > 0
        o = (z * pos) @ self.Vt                                    # (n, k) logits
        o -= np.maximum.reduce(o, 1, keepdims=True)
        e = np.exp(o)
        S = np.add.reduce(e, 1, keepdims=True)
        loss = float(np.add.reduce(np.log(S), None) * inv_n - np.add.reduce(o * self.onehot, None) * inv_n)
        dz = (((e / S - self.onehot) * inv_n) @ self.V) * pos
        dh = (dz - np.add.reduce(dz, 0) * inv_n - z * (np.add.reduce(dz * z, 0) * inv_n)) / s  # BN backward
        np.matmul(dh.T, self.X, out=out)
        return loss, bool(math.isfinite(loss) and np.isfinite(s).all())


def _overflow_runs(cfg: dict, log: Callable, progress) -> tuple[dict, dict]:
    """Part C: ExpLR in float32 with and without power-of-two renormalization, in lockstep."""
    steps, every = int(cfg["overflow_steps"]), max(1, int(cfg["overflow_log_every"]))
    lr, wd, mom = float(cfg["lr"]), float(cfg["overflow_weight_decay"]), float(cfg["momentum"])
    net = _TinyBNNet(int(cfg["seed"]))
    runs = {}
    for name, renorm in (("renorm", True), ("plain", False)):
        w = nn.Parameter(torch.from_numpy(net.W0.copy()))
        w.grad = torch.zeros_like(w)
        opt = torch.optim.SGD([w], lr=lr, momentum=mom, foreach=False)
        sched = ExpLR(opt, lr=lr, weight_decay=wd, momentum=mom, renormalize=renorm, renorm_bound=float(cfg["renorm_bound"]))
        # numpy views share the tensors' memory; SGD and the renormalization update them in place
        runs[name] = {"w": w, "wn": w.detach().numpy(), "gn": w.grad.numpy(), "opt": opt, "sched": sched,
                      "alive": True, "nonfinite_at": None, "how": None, "lr_over_at": None, "loss": math.nan,
                      "forward_over_at": None}
    n_log = steps // every + 1
    ser = {f"C.{name}.{k}": np.full(n_log, np.nan) for name in runs for k in ("log2_norm", "log2_scale", "log2_opt_lr", "loss")}
    ser["C.step"] = np.arange(n_log) * every
    mismatches, compared, first_mismatch = 0, 0, None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress, unit="step", leave=False, dynamic_ncols=True, miniters=1000)

    def record(i: int) -> None:
        for name, r in runs.items():
            if not r["alive"]:
                continue
            norm = float(np.linalg.norm(r["wn"].astype(np.float64)))
            ser[f"C.{name}.log2_norm"][i] = math.log2(norm) if norm > 0 else -math.inf
            ser[f"C.{name}.log2_scale"][i] = r["sched"].log2_scale
            ser[f"C.{name}.log2_opt_lr"][i] = math.log2(r["opt"].param_groups[0]["lr"])
            ser[f"C.{name}.loss"][i] = r["loss"]

    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        record(0)
        for t in range(steps):
            for name, r in runs.items():
                if not r["alive"]:
                    continue
                lr_t = r["opt"].param_groups[0]["lr"]
                if r["lr_over_at"] is None and not lr_t <= _FLOAT32_MAX:
                    r["lr_over_at"] = t
                r["loss"], finite = net.loss_grad(r["wn"], r["gn"])
                if not finite and r["forward_over_at"] is None:
                    r["forward_over_at"] = t
                    log({"event": "forward_overflow", "run": name, "step": t, "loss": r["loss"],
                         "reason": f"BN variance, loss or gradient not finite in float32 at step {t}"})
                try:
                    r["opt"].step()
                except RuntimeError as e:  # PyTorch refuses an LR beyond float32's range for float32 weights
                    if "overflow" not in str(e):
                        raise
                    r["alive"], r["nonfinite_at"], r["how"] = False, t, "lr"
                    log({"event": "overflow", "run": name, "step": t, "loss": r["loss"], "lr": lr_t, "kind": "lr",
                         "reason": f"SGD refuses LR {lr_t:.3g} (beyond float32) at step {t}: {e}"})
                    continue
                r["sched"].step()
                if not np.isfinite(r["wn"]).all():
                    r["alive"], r["nonfinite_at"], r["how"] = False, t, "weights"
                    log({"event": "overflow", "run": name, "step": t, "loss": r["loss"], "lr": lr_t, "kind": "weights",
                         "reason": f"non-finite weights after step {t}"})
            if runs["plain"]["alive"]:
                compared += 1
                k = runs["renorm"]["sched"].log2_scale
                if not np.array_equal(np.ldexp(runs["renorm"]["wn"], k), runs["plain"]["wn"]):
                    mismatches += 1
                    first_mismatch = t if first_mismatch is None else first_mismatch
            if (t + 1) % every == 0:
                record((t + 1) // every)
            if bar is not None and (t + 1) % 1000 == 0:
                bar.update(1000)
    if bar is not None:
        bar.close()
    rn, pl = runs["renorm"], runs["plain"]
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    summary = {
        "steps": steps, "weight_decay": wd, "alpha": alpha, "seconds": round(time.perf_counter() - t0, 2),
        "renorm": {"finite_steps": steps if rn["nonfinite_at"] is None else rn["nonfinite_at"],
                   "nonfinite_at": rn["nonfinite_at"], "renormalizations": rn["sched"].renormalizations,
                   "log2_scale": rn["sched"].log2_scale, "lr_over_float32_at": rn["lr_over_at"],
                   "final_log2_unrescaled_lr": math.log2(lr) - (2 * steps + 1) * math.log2(alpha),
                   "final_loss": rn["loss"], "forward_overflow_at": rn["forward_over_at"]},
        "plain": {"nonfinite_at": pl["nonfinite_at"], "how": pl["how"], "lr_over_float32_at": pl["lr_over_at"],
                  "forward_overflow_at": pl["forward_over_at"],
                  "overflow_at": min([v for v in (pl["nonfinite_at"], pl["forward_over_at"]) if v is not None], default=None),
                  "final_loss_before": pl["loss"]},
        "bit_identical_steps": compared - mismatches, "compared_steps": compared, "mismatched_steps": mismatches,
        "first_mismatch_step": first_mismatch,
    }
    return ser, summary


# ----------------------------------------------------------------------------- helpers for numbers


def _first_over(values: np.ndarray, tol: float) -> Optional[int]:
    idx = np.flatnonzero(~(values <= tol))  # NaN counts as over
    return int(idx[0]) if idx.size else None


def _nanmax(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmax(v)) if np.isfinite(v).any() else math.nan


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


# ----------------------------------------------------------------------------- the experiment


@register_experiment
class ExpLRExperiment(Experiment):
    name = "exp-lr"
    title = "Exponential learning rate ≡ weight decay on scale-invariant nets"
    source = _SRC
    description = (
        "A fully scale-invariant BN net (no BN affine, frozen classifier) trained with weight decay and with "
        "the equivalent exponential LR (ExpLR, no weight decay), and with step decay + WD against TEXP, from "
        "the same init on the same batches, stepped side by side. Per step: the angle between the runs' "
        "weights (per tensor and jointly) and the largest output difference on a fixed batch; float64 with "
        "BN eps 0 for exactness, ablations without the momentum-buffer mapping, with BN's eps, in float32, "
        "and on the standard net (affine BN, trainable classifier). Accuracy over seeds in float32. "
        "Float32 overflow of a 100k-step exponential schedule with and without power-of-two renormalization."
    )
    claims = (
        Claim("directions-agree",
              "On a fully scale-invariant BN net, SGD with weight decay and SGD with the exponential LR (no weight "
              "decay, mapped momentum buffer) visit the same directions w/‖w‖ at every step.", _SRC,
              "max over the first 1000 steps of the angle between the two runs' weights (all trained tensors "
              "jointly; float64, BN eps 1e-30, same init and batches)",
              "holds if <= equiv_tol (1e-6 rad) over >= 1000 steps; inconclusive if the profile runs fewer steps"),
        Claim("buffer-mapping-needed",
              "Without mapping the momentum buffer (ExpLR started from PyTorch's zero buffer) the two runs do not "
              "agree.", _SRC,
              "max angle between the weight-decay run and the ablation (ExpLR with the preset buffer removed) over "
              "the same steps",
              "holds if > equiv_tol (1e-6 rad)"),
        Claim("accuracy-matches",
              "ExpLR and TEXP reach the test accuracy of constant LR + weight decay and of step decay + weight "
              "decay.", _SRC,
              "|mean final test accuracy of ExpLR - that of WD| and |TEXP - step decay| over the seeds (float32, "
              "BN's default eps)",
              "holds if both <= max(acc_tol = 2 points, noise), noise = the largest range over seeds of the "
              "baselines' final test accuracy; fails if a run diverges"),
        Claim("rescaling-prevents-overflow",
              "With power-of-two renormalization an exponential LR schedule stays finite in float32; without it "
              "the weights or the LR overflow.", _SRC,
              "float32 steps with finite weights of ExpLR with renormalization; first non-finite step of ExpLR "
              "without it (tiny scale-invariant BN net)",
              "holds if the renormalized run is finite for >= 100000 steps and the plain run overflows; "
              "inconclusive if fewer steps are run or the plain run does not overflow"),
    )
    profiles = {
        "tiny": {**_BASE, "width": 2, "acc_width": 4, "equiv_steps": 24, "equiv_batch_size": 16, "output_batch": 32,
                 "equiv_eval_every": 12, "side_steps": 24, "side_output_every": 4, "acc_steps": 20, "acc_batch_size": 64,
                 "acc_seeds": [0, 1], "acc_eval_every": 10, "overflow_steps": 2000, "overflow_weight_decay": 0.02,
                 "overflow_log_every": 10},
        "quick": dict(_BASE),
        # PreResNet32 on CIFAR-10 (Li & Arora's setting); for a GPU. Step decay at 50%/75% of ~164 epochs.
        "paper": {**_BASE, "data": "cifar10", "model": "preresnet", "width": 16, "depth": 32, "acc_width": 16,
                  "equiv_steps": 2000, "equiv_batch_size": 128, "output_batch": 128, "equiv_eval_every": 500,
                  "side_steps": 2000, "side_output_every": 1, "acc_steps": 64000, "acc_batch_size": 128,
                  "acc_standard_seeds": 3, "acc_eval_every": 391,
                  "overflow_steps": 200_000, "overflow_weight_decay": 5e-4, "overflow_log_every": 200},
    }

    # ------------------------------------------------------------------ run
    def run(self, cfg: dict, run: RunDir, *, device: str = "auto", progress: bool = True) -> Result:
        dev = resolve_device(device)
        lr, wd, mom = float(cfg["lr"]), float(cfg["weight_decay"]), float(cfg["momentum"])
        alpha = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)  # validates the hyperparameters
        for key in ("equiv_steps", "acc_steps", "overflow_steps", "equiv_batch_size", "acc_batch_size", "output_batch"):
            if not isinstance(cfg[key], int) or cfg[key] < 1:
                raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")
        if not cfg["acc_seeds"]:
            raise UserError("acc_seeds must list at least one seed")
        tr, te = data_mod.load_pair(cfg["data"], seed=cfg["seed"])
        tr, te = tr.to(dev), te.to(dev)
        fixed_x = te.x[: cfg["output_batch"]]
        records: list[dict] = []  # what went to metrics.jsonl (run.write buffers; not readable back mid-run)

        def log(rec: dict) -> None:
            records.append(rec)
            run.write(rec)

        series: dict[str, np.ndarray] = {}
        summary: dict[str, Any] = {"alpha": alpha, "lr_growth_per_step": alpha ** -2,
                                   "norm_time_scale_steps": 1.0 / (1.0 - alpha)}
        timing = {}

        # ---------------- part A: equivalence in lockstep
        t0 = time.perf_counter()
        T = cfg["equiv_steps"]
        side = min(int(cfg["side_steps"]), T)
        pairs_a = {p: (a, b, int(cfg["output_every"]) if p in _MAIN_PAIRS else int(cfg["side_output_every"]))
                   for p, (a, b, _) in _A_PAIRS.items() if p in _MAIN_PAIRS or side > 0}
        arms_a = {}
        for n in dict.fromkeys(x for a, b, _ in pairs_a.values() for x in (a, b)):
            net, sch, dtype, eps = _A_ARMS[n]
            main = any(n in (a, b) for p, (a, b, _) in pairs_a.items() if p in _MAIN_PAIRS)
            arms_a[n] = _make_arm(n, cfg, tr, net=net, schedule=sch, dtype=dtype,
                                  eps=cfg["exact_bn_eps"] if eps == "exact" else None, width=cfg["width"],
                                  seed=cfg["seed"], steps=T if main else side, device=dev)
        summary["joint_invariance_error"] = _joint_invariance_error(arms_a["wd"], fixed_x)
        if "std_wd" in arms_a:
            summary["standard_net_invariance_error"] = _joint_invariance_error(arms_a["std_wd"], fixed_x)
        eval_sets_a = {dt: (None, te.to(dtype=dt)) for dt in (torch.float64, torch.float32)}  # test set only
        series.update(_lockstep(arms_a, pairs_a, tr, steps=T, batch_size=cfg["equiv_batch_size"], seed=cfg["seed"],
                                fixed_x=fixed_x, eval_every=cfg["equiv_eval_every"],
                                eval_sets=eval_sets_a, eval_pairs=True, eval_train=False, log=log, group="A",
                                progress=f"{self.name} A (equivalence)" if progress else False))
        timing["A_equivalence"] = round(time.perf_counter() - t0, 2)
        summary["equivalence"] = eq = {"steps": T, "side_steps": side, "pairs": {}}
        tol = float(cfg["equiv_tol"])
        for p in pairs_a:
            n_p = min(arms_a[pairs_a[p][0]].steps, arms_a[pairs_a[p][1]].steps)
            ang, od = series[f"A.pair.{p}.angle"][: n_p + 1], series[f"A.pair.{p}.outdiff"][: n_p + 1]
            per = series[f"A.pair.{p}.per"]
            names = [str(s) for s in series[f"A.pair.{p}.names"]]
            first = _first_over(ang, tol)
            eq["pairs"][p] = {
                "what": _A_PAIRS[p][2], "steps": n_p, "max_angle": _nanmax(ang), "final_angle": float(ang[-1]),
                "max_angle_first_1000": _nanmax(ang[: _REQUIRED_EQUIV_STEPS + 1]),
                "angle_at": {str(s): float(ang[s]) for s in (1, 10, 100, 300, 1000) if s <= n_p},
                "max_angle_per_param": {n: _nanmax(per[i]) for i, n in enumerate(names)},
                "max_output_diff": _nanmax(od), "first_step_angle_over_tol": first,
            }
            if f"A.pair.{p}.conv" in series:
                conv = series[f"A.pair.{p}.conv"][: n_p + 1]
                eq["pairs"][p]["max_angle_conv_weights"] = _nanmax(conv)
                eq["pairs"][p]["final_angle_conv_weights"] = float(conv[-1])
        evals = [r for r in records if r.get("group") == "A"]
        eod = {}
        for r in evals:
            if r.get("event") == "eval_outdiff":
                eod.setdefault(r["pair"], []).append(r["eval_output_diff"])
        for p, v in eod.items():
            eq["pairs"][p]["max_eval_mode_output_diff"] = _nanmax(v)
        final_a = {}
        for r in evals:
            if r.get("event") == "eval" and r["step"] == arms_a[r["arm"]].steps:
                final_a[r["arm"]] = {"step": r["step"], "test_acc": r["test_acc"], "test_loss": r["test_loss"]}
        eq["final_eval"] = final_a
        eq["diverged"] = {n: a.diverged_at for n, a in arms_a.items() if a.diverged_at is not None}
        eq["final_norms"] = {n: float(series[f"A.arm.{n}.norm"][a.steps]) for n, a in arms_a.items()}
        eq["renormalizations"] = {n: a.sched.renormalizations for n, a in arms_a.items() if a.sched is not None}
        del arms_a

        # ---------------- part B: accuracy over seeds
        t0 = time.perf_counter()
        TB = cfg["acc_steps"]
        acc: dict[str, dict] = {}
        angles_b: dict[str, dict] = {}
        for i_seed, sd in enumerate(cfg["acc_seeds"]):
            names_b = [n for n in _B_ARMS if i_seed < int(cfg["acc_standard_seeds"]) or not n.startswith("std")]
            arms_b = {n: _make_arm(n, cfg, tr, net=_B_ARMS[n][0], schedule=_B_ARMS[n][1], dtype=torch.float32, eps=None,
                                   width=cfg["acc_width"], seed=sd, steps=TB, device=dev) for n in names_b}
            pairs_b = {p: (*v, 0) for p, v in _B_PAIRS.items() if v[0] in arms_b and v[1] in arms_b}
            g = f"B{sd}"
            series.update(_lockstep(arms_b, pairs_b, tr, steps=TB, batch_size=cfg["acc_batch_size"], seed=sd,
                                    fixed_x=fixed_x, eval_every=cfg["acc_eval_every"],
                                    eval_sets={torch.float32: (tr, te)}, eval_pairs=False, eval_train=True, log=log, group=g,
                                    progress=f"{self.name} B seed {sd} (accuracy)" if progress else False))
            for n, a in arms_b.items():
                acc.setdefault(n, {})[str(sd)] = {"diverged_at": a.diverged_at}
            for p in pairs_b:
                angles_b.setdefault(p, {})[str(sd)] = {"max": _nanmax(series[f"{g}.pair.{p}.angle"]),
                                                       "final": float(series[f"{g}.pair.{p}.angle"][-1])}
            del arms_b
        for r in records:
            if r.get("event") == "eval" and str(r.get("group", "")).startswith("B") and r["step"] == TB:
                acc[r["arm"]][r["group"][1:]].update(test_acc=r["test_acc"], train_acc=r["train_acc"])
        timing["B_accuracy"] = round(time.perf_counter() - t0, 2)
        summary["accuracy"] = accs = {"steps": TB, "seeds": cfg["acc_seeds"], "arms": acc, "float32_angles": angles_b}
        stats = {}
        for n, per_seed in acc.items():
            vals = [v.get("test_acc", math.nan) for v in per_seed.values()]
            if not vals:
                continue
            vals = [math.nan if v is None else float(v) for v in vals]
            stats[n] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                        "spread": float(np.max(vals) - np.min(vals))}
        accs["test_acc_stats"] = stats

        # ---------------- part C: overflow
        t0 = time.perf_counter()
        ser_c, ovf = _overflow_runs(cfg, log, f"{self.name} C (float32 overflow)" if progress else False)
        series.update(ser_c)
        timing["C_overflow"] = round(time.perf_counter() - t0, 2)
        summary["overflow"] = ovf
        summary["seconds"] = timing
        run.save_arrays(_SERIES, **series)
        log({"event": "done", "seconds": timing})

        return Result(summary=summary, verdicts=self._verdicts(cfg, summary))

    # ------------------------------------------------------------------ verdicts
    @staticmethod
    def _verdicts(cfg: dict, s: dict) -> list:
        tol = float(cfg["equiv_tol"])
        eq = s["equivalence"]
        T = eq["steps"]
        out = []
        ex = eq["pairs"]["exact"]
        m = ex["max_angle_first_1000"]
        first = ex["first_step_angle_over_tol"]
        extra = [f"max output difference on the fixed batch {_fmt(ex['max_output_diff'])}"]
        per_t = ex["max_angle_per_param"]
        if len(per_t) <= 6:
            extra.append("per tensor max " + ", ".join(f"{k} {_fmt(v)}" for k, v in per_t.items()))
        else:
            worst_t = max(per_t, key=lambda k: per_t[k] if math.isfinite(per_t[k]) else math.inf)
            extra.append(f"per tensor max up to {_fmt(per_t[worst_t])} ({worst_t}, {len(per_t)} tensors)")
        if "texp" in eq["pairs"]:
            extra.append(f"TEXP vs step decay: max angle {_fmt(eq['pairs']['texp']['max_angle'])}")
        if "float32" in eq["pairs"]:
            f32 = eq["pairs"]["float32"]
            extra.append(f"same pair in float32 (round-off, amplified by the dynamics): first step over {tol:g} rad = "
                         f"{f32['first_step_angle_over_tol']}, max {_fmt(f32['max_angle'])} over {f32['steps']} steps")
        for p, what in (("bn_eps", "with BN's eps 1e-5 (float64)"), ("standard", "standard net, WD vs ExpLR on all params")):
            if p in eq["pairs"]:
                q = eq["pairs"][p]
                extra.append(f"{what}: first over {tol:g} at step {q['first_step_angle_over_tol']}, max {_fmt(q['max_angle'])} "
                             f"over {q['steps']} steps")
        if "max_eval_mode_output_diff" in ex:
            extra.append(f"eval mode (BN running stats) output difference up to {_fmt(ex['max_eval_mode_output_diff'])}")
        head = (f"float64, BN eps {cfg['exact_bn_eps']:g}, lr {cfg['lr']}, momentum {cfg['momentum']}, "
                f"WD {cfg['weight_decay']}: max angle {_fmt(m)} rad over {min(T, _REQUIRED_EQUIV_STEPS)} steps"
                + (f" (first over {tol:g} at step {first})" if first is not None else "")
                + f"; over all {T} steps {_fmt(ex['max_angle'])}")
        detail = head + "; " + "; ".join(extra)
        if "wd" in eq["diverged"] or "exp" in eq["diverged"]:
            out.append(judge("directions-agree", False, m, detail + f"; a run diverged: {eq['diverged']}"))
        elif T < _REQUIRED_EQUIV_STEPS:
            ok = None
            out.append(judge("directions-agree", ok, m,
                             f"only {T} steps run (the claim needs {_REQUIRED_EQUIV_STEPS}); " + detail))
        else:
            out.append(judge("directions-agree", bool(m <= tol), m, detail))

        ab = eq["pairs"]["ablation"]
        mab = ab["max_angle_first_1000"]
        ratio = mab / m if m and m > 0 else math.inf
        d2 = (f"ExpLR with the preset buffer popped right after construction (emulates no mapping): max angle "
              f"{_fmt(mab)} rad (first over {tol:g} at step {ab['first_step_angle_over_tol']}; after 1 step "
              f"{_fmt(ab['angle_at'].get('1'))}, 10 steps {_fmt(ab['angle_at'].get('10'))}), {_fmt(ratio)}x the mapped "
              f"run's; max output difference {_fmt(ab['max_output_diff'])}")
        out.append(judge("buffer-mapping-needed", bool(mab > tol), mab, d2))

        st = s["accuracy"]["test_acc_stats"]
        if all(k in st for k in ("wd", "exp", "sd", "texp")):
            noise = max(st["wd"]["spread"], st["sd"]["spread"])
            tol_acc = max(float(cfg["acc_tol"]), noise)
            d_exp = abs(st["exp"]["mean"] - st["wd"]["mean"])
            d_texp = abs(st["texp"]["mean"] - st["sd"]["mean"])
            worst = max(d_exp, d_texp)
            div = {n: [k for k, v in per.items() if v.get("diverged_at") is not None]
                   for n, per in s["accuracy"]["arms"].items() if n in ("wd", "exp", "sd", "texp")}
            div = {n: v for n, v in div.items() if v}
            nseeds = len(s["accuracy"]["seeds"])
            d3 = (f"mean final test accuracy over {nseeds} seeds ({s['accuracy']['steps']} steps, float32): "
                  f"WD {st['wd']['mean']:.2%} vs ExpLR {st['exp']['mean']:.2%} (diff {d_exp:.2%}); "
                  f"step decay {st['sd']['mean']:.2%} vs TEXP {st['texp']['mean']:.2%} (diff {d_texp:.2%}); "
                  f"tolerance {tol_acc:.2%} = max(acc_tol {float(cfg['acc_tol']):.0%}, seed range of the baselines "
                  f"{noise:.2%})")
            per_seed = "; ".join(
                f"{_LABELS[n]} " + "/".join(f"{v.get('test_acc', math.nan):.1%}" for v in s["accuracy"]["arms"][n].values())
                for n in ("wd", "exp", "sd", "texp"))
            d3 += f"; per seed: {per_seed}"
            if "std_wd" in st and "std_exp" in st:
                d3 += (f"; standard net (not judged): WD {st['std_wd']['mean']:.2%} vs ExpLR "
                       f"{st['std_exp']['mean']:.2%}")
            if div:
                out.append(judge("accuracy-matches", False, worst, d3 + f"; diverged: {div}"))
            elif not all(math.isfinite(v) for v in (d_exp, d_texp)):
                out.append(judge("accuracy-matches", None, worst, d3 + "; accuracies missing"))
            else:
                out.append(judge("accuracy-matches", bool(worst <= tol_acc), worst, d3))

        ov = s["overflow"]
        rn, pl = ov["renorm"], ov["plain"]
        rn_bad = rn["nonfinite_at"] is not None or rn["forward_overflow_at"] is not None
        plain_parts = []
        if pl["forward_overflow_at"] is not None:
            plain_parts.append(f"the BN variance (~‖w‖²) overflows float32 at step {pl['forward_overflow_at']} "
                               "(a non-finite forward pass)")
        if pl["lr_over_float32_at"] is not None:
            plain_parts.append(f"the LR exceeds float32's largest value at step {pl['lr_over_float32_at']}")
        if pl["nonfinite_at"] is not None:
            plain_parts.append(f"weights non-finite after step {pl['nonfinite_at']}" if pl["how"] == "weights" else
                               f"PyTorch's SGD refuses the float32 update at step {pl['nonfinite_at']} (LR out of range)")
        mism = (f"; while the plain run was alive, the renormalized weights x 2^k equalled its weights bit for bit at "
                f"{ov['bit_identical_steps']} of {ov['compared_steps']} steps"
                + (f" (first difference at step {ov['first_mismatch_step']})" if ov["first_mismatch_step"] is not None else ""))
        d4 = (f"float32, tiny BN net, lr {cfg['lr']}, momentum {cfg['momentum']}, WD-equivalent λ {ov['weight_decay']} "
              f"(LR x{ov['alpha'] ** -2:.4g} per step): with renormalization "
              + (f"finite for all {ov['steps']} steps" if not rn_bad else
                 f"NOT finite: forward overflow at {rn['forward_overflow_at']}, weights at {rn['nonfinite_at']}")
              + f" ({rn['renormalizations']} rescalings, weights held at 2^-{rn['log2_scale']} of the un-rescaled run, "
              f"whose LR would be 2^{rn['final_log2_unrescaled_lr']:.0f}); without: "
              + ("; ".join(plain_parts) if plain_parts else "no overflow") + mism)
        value = pl["overflow_at"]
        if rn_bad:
            out.append(judge("rescaling-prevents-overflow", False, value, d4))
        elif ov["steps"] < _REQUIRED_OVERFLOW_STEPS:
            out.append(judge("rescaling-prevents-overflow", None, value,
                             f"only {ov['steps']} steps run (the claim needs {_REQUIRED_OVERFLOW_STEPS}); " + d4))
        elif pl["overflow_at"] is None:
            out.append(judge("rescaling-prevents-overflow", None, value, "the plain run did not overflow either; " + d4))
        else:
            out.append(judge("rescaling-prevents-overflow", True, value, d4))
        return out

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        S = run.load_arrays(_SERIES)
        recs = run.metrics()
        return [
            _fig_learning_curves(cfg, S, recs, run.figure_path("learning_curves.png")),
            _fig_angles(cfg, S, recs, run.figure_path("angle_between_runs.png")),
            _fig_norms(cfg, S, run.figure_path("weight_norm.png")),
            _fig_lrs(cfg, S, run.figure_path("lr_schedules.png")),
            _fig_standard(cfg, S, recs, run.figure_path("standard_net.png")),
            _fig_overflow(cfg, S, recs, run.figure_path("float32_overflow.png")),
        ]


# ----------------------------------------------------------------------------- figures

_FLOOR = 1e-18


def _floor(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return np.where(v > _FLOOR, v, np.where(np.isnan(v), np.nan, _FLOOR))


def _evals(recs: list[dict], group: str, arm: str, key: str) -> tuple[list, list]:
    rs = [r for r in recs if r.get("event") == "eval" and r.get("group") == group and r.get("arm") == arm]
    return [r["step"] for r in rs], [r.get(key, math.nan) for r in rs]


def _b_groups(cfg: dict, S: dict) -> list[str]:
    return [f"B{sd}" for sd in cfg["acc_seeds"] if f"B{sd}.arm.wd.loss" in S]


def _fig_learning_curves(cfg, S, recs, path):
    import matplotlib.pyplot as plt

    groups = _b_groups(cfg, S)
    arms = [a for a in _B_ARMS if f"{groups[0]}.arm.{a}.loss" in S] if groups else []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for a in arms:
            c, ls = _COLORS[a], ("--" if a.startswith("std") else "-")
            loss = S[f"{groups[0]}.arm.{a}.loss"]
            axes[0].plot(np.arange(len(loss)), smooth(loss, max(1, len(loss) // 40)), color=c, ls=ls, label=_LABELS[a])
            for ax, key in ((axes[1], "train_acc"), (axes[2], "test_acc")):
                curves = [_evals(recs, g, a, key) for g in groups]
                curves = [cv for cv in curves if cv[0]]
                if not curves:
                    continue
                n = min(len(cv[0]) for cv in curves)
                steps = np.asarray(curves[0][0][:n])
                vals = np.array([np.asarray(cv[1][:n], float) for cv in curves]) * 100
                ax.plot(steps, vals.mean(0), color=c, ls=ls, marker="o", ms=2.5, label=_LABELS[a])
                if len(curves) > 1:
                    ax.fill_between(steps, vals.min(0), vals.max(0), color=c, alpha=0.15, lw=0)
        for t0, _ in _phases(cfg, cfg["acc_steps"])[1:]:
            for ax in axes:
                ax.axvline(t0, color="#2ca02c", lw=0.7, ls=":")
        axes[0].set_yscale("log")
        axes[0].set_ylabel(f"training loss (seed {cfg['acc_seeds'][0]}, moving average)")
        axes[1].set_ylabel("train accuracy (%)")
        axes[2].set_ylabel("test accuracy (%)")
        lo = 100 * min([min(_evals(recs, g, a, "test_acc")[1] or [1]) for g in groups for a in arms] or [0.5])
        for ax in axes[1:]:
            ax.set_ylim(max(0, min(lo, 90) - 5), 100.5)
        for ax in axes:
            ax.set_xlabel("step")
        axes[2].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{cfg['model']} (width {cfg['acc_width']}) on {cfg['data']}, float32: lr {cfg['lr']}, momentum "
                     f"{cfg['momentum']}, WD {cfg['weight_decay']} (accuracy: mean over {len(groups)} seeds, band = "
                     f"min..max; dotted: step-decay boundaries)", fontsize=9)
        return save(fig, path)


def _fig_angles(cfg, S, recs, path):
    import matplotlib.pyplot as plt

    T = cfg["equiv_steps"]
    x = np.arange(T + 1)
    pairs = [p for p in _A_PAIRS if f"A.pair.{p}.angle" in S]
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.0))
        for p in pairs:
            c = _COLORS["texp"] if p == "texp" else _COLORS[p]
            lw = 1.8 if p == "exact" else 1.1
            ax1.plot(x, _floor(S[f"A.pair.{p}.angle"]), color=c, lw=lw, label=_A_PAIRS[p][2])
            if p == "exact":
                for i, n in enumerate(S[f"A.pair.{p}.names"]):
                    ax1.plot(x, _floor(S[f"A.pair.{p}.per"][i]), color=c, lw=0.5, alpha=0.5,
                             label="  same, per tensor" if i == 0 else None)
            od = S[f"A.pair.{p}.outdiff"]
            ok = np.isfinite(od)
            ax2.plot(x[ok], _floor(od[ok]), color=c, lw=lw, label=_A_PAIRS[p][2])
            ev = [(r["step"], r["eval_output_diff"]) for r in recs
                  if r.get("event") == "eval_outdiff" and r.get("group") == "A" and r.get("pair") == p]
            if ev and p in ("exact", "texp"):
                ax2.plot(*zip(*[(s, max(v, _FLOOR)) for s, v in ev]), color=c, ls="none", marker="s", ms=4, mfc="none",
                         label=("WD vs ExpLR" if p == "exact" else "step decay vs TEXP") + ": eval mode (running stats)")
        for ax in (ax1, ax2):
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylim(_FLOOR / 3, 10)
        ax1.axhline(float(cfg["equiv_tol"]), color="k", lw=0.8, ls="--")
        ax1.text(0.01, float(cfg["equiv_tol"]) * 1.6, f"tolerance {float(cfg['equiv_tol']):g} rad", transform=ax1.get_yaxis_transform(), fontsize=7)
        if cfg["decay_at"]:
            for t0, _ in _phases(cfg, T)[1:]:
                ax1.axvline(t0, color=_COLORS["sd"], lw=0.6, ls=":")
        ax1.set_ylabel(f"angle between the runs' weights (rad; 0 drawn at {_FLOOR:g})")
        ax2.set_ylabel(f"max |logit difference| on {cfg['output_batch']} fixed inputs (train-mode BN)")
        handles, labels = ax1.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        extra = [(h, l) for h, l in zip(h2, l2) if l not in labels]
        fig.legend(handles + [h for h, _ in extra], labels + [l for _, l in extra], fontsize=7, ncol=4,
                   loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False)
        fig.suptitle(f"Same init, same batches, stepped side by side ({cfg['model']} width {cfg['width']} on {cfg['data']}, "
                     f"lr {cfg['lr']}, momentum {cfg['momentum']}, WD {cfg['weight_decay']})", fontsize=9)
        return save(fig, path)


def _fig_norms(cfg, S, path):
    import matplotlib.pyplot as plt

    T = cfg["equiv_steps"]
    x = np.arange(T + 1)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 4))
        for a in ("wd", "exp", "sd", "texp"):
            if f"A.arm.{a}.norm" in S:
                ax.plot(x, S[f"A.arm.{a}.norm"], color=_COLORS[a], label=_LABELS[a] + (" (un-rescaled)" if a in ("exp", "texp") else ""))
        for a in ("exp", "texp"):
            key = f"A.arm.{a}.stored_norm"
            if key in S and not np.allclose(S[key], S[f"A.arm.{a}.norm"], equal_nan=True):
                ax.plot(x, S[key], color=_COLORS[a], ls=":", label=_LABELS[a] + " as stored (renormalized)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("‖w‖ of the trained weights (jointly)")
        ax.legend(fontsize=7)
        alpha = wd_equivalent_alpha(lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=cfg["momentum"])
        ax.set_title(f"Weight norm (float64): bounded under WD; without WD it is α^-t (α = {alpha:.5f}) times the WD run's",
                     fontsize=9)
        return save(fig, path)


def _fig_lrs(cfg, S, path):
    import matplotlib.pyplot as plt

    T = cfg["equiv_steps"]
    x = np.arange(T)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 4))
        for a in ("wd", "exp", "sd", "texp"):
            if f"A.arm.{a}.lr" in S:
                ax.plot(x, S[f"A.arm.{a}.lr"], color=_COLORS[a], lw=1.6 if a in ("exp", "texp") else 1.2, label=_LABELS[a])
        for a in ("exp", "texp"):
            key = f"A.arm.{a}.opt_lr"
            if key in S and not np.allclose(S[key], S[f"A.arm.{a}.lr"], equal_nan=True):
                ax.plot(x, S[key], color=_COLORS[a], ls=":", label=_LABELS[a] + " as used (renormalized)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.legend(fontsize=7)
        ax.set_title("LR schedules: ExpLR η̃_t = η α^(-2t-1); TEXP tapers it at the step-decay boundaries", fontsize=9)
        return save(fig, path)


def _fig_standard(cfg, S, recs, path):
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        if "A.pair.standard.angle" in S:
            T = cfg["equiv_steps"]
            x = np.arange(T + 1)
            names = [str(n) for n in S["A.pair.standard.names"]]
            per = S["A.pair.standard.per"]
            bn = {n for n in names if not n.startswith("classifier") and _is_bn_name(n, names)}
            kinds = {"conv/linear weights (each)": ("#bcbd22", lambda n: not n.startswith("classifier") and n not in bn),
                     "BN γ/β (each)": ("#8c564b", lambda n: n in bn),
                     "classifier weight/bias": ("#9467bd", lambda n: n.startswith("classifier"))}
            for label, (c, sel) in kinds.items():
                first = True
                for i, n in enumerate(names):
                    if sel(n):
                        ax1.plot(x, _floor(per[i]), color=c, lw=0.6, alpha=0.6, label=label if first else None)
                        first = False
            ax1.plot(x, _floor(S["A.pair.standard.angle"]), color=_COLORS["standard"], lw=1.8, label="all trained params jointly")
            ax1.plot(x, _floor(S["A.pair.standard.conv"]), color="#bcbd22", lw=1.8, label="conv/linear weights jointly")
            ax1.plot(x, _floor(S["A.pair.exact.angle"]), color=_COLORS["exact"], lw=1.2, ls="--", label="fully scale-invariant net (eps 0)")
            ax1.plot(x, _floor(S["A.pair.bn_eps.angle"]), color=_COLORS["bn_eps"], lw=1.2, ls="--", label="fully scale-invariant net, BN eps 1e-5")
            ax1.set_yscale("log")
            ax1.set_ylim(_FLOOR / 3, 10)
            ax1.set_xlim(0, min(T, max(1, int(cfg["side_steps"]))))
            ax1.set_xlabel("step")
            ax1.set_ylabel("angle WD run vs ExpLR run (rad)")
            ax1.legend(fontsize=6.5)
            ax1.set_title("float64, same init and batches", fontsize=9)
        else:
            ax1.text(0.5, 0.5, "standard-net pair not run (side_steps=0)", ha="center", transform=ax1.transAxes)
        groups = _b_groups(cfg, S)
        for a in ("wd", "exp", "std_wd", "std_exp"):
            for j, g in enumerate(groups):
                st, v = _evals(recs, g, a, "test_acc")
                if st:
                    ax2.plot(st, np.asarray(v, float) * 100, color=_COLORS[a], ls="--" if a.startswith("std") else "-",
                             lw=1.0, alpha=0.8, label=_LABELS[a] if j == 0 else None)
        ax2.set_xlabel("step")
        ax2.set_ylabel("test accuracy (%)")
        vals = [v for g in groups for a in ("wd", "exp", "std_wd", "std_exp") for v in _evals(recs, g, a, "test_acc")[1]]
        lo = 100 * min(vals) if vals else 50
        ax2.set_ylim(max(0, min(lo, 90) - 5), 100.5)
        ax2.legend(fontsize=7, loc="lower right")
        n_std = sum(1 for g in groups if _evals(recs, g, "std_wd", "test_acc")[0])
        ax2.set_title(f"test accuracy, float32, one line per seed ({len(groups)} seeds; standard net: {n_std})", fontsize=9)
        fig.suptitle("Standard net (BN with trainable γ/β, trainable classifier): WD on all parameters vs ExpLR on all "
                     "parameters (no renormalization)", fontsize=9)
        return save(fig, path)


def _is_bn_name(name: str, names: list[str]) -> bool:
    """Whether ``name`` is a BN γ/β: in bnlab's models a BN layer has ``.weight`` and ``.bias``, while
    a conv/linear layer before a BN has no bias (the stored per-tensor angles keep no shapes)."""
    stem = name.rsplit(".", 1)[0]
    return f"{stem}.bias" in names


def _fig_overflow(cfg, S, recs, path):
    import matplotlib.pyplot as plt

    x = S["C.step"]
    ovf = {r["run"]: r for r in recs if r.get("event") == "overflow"}
    fwd = {r["run"]: r for r in recs if r.get("event") == "forward_overflow"}
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        k = S["C.renorm.log2_scale"]
        ax1.plot(x, S["C.plain.log2_norm"], color="#d62728", lw=1.6, label="no renormalization")
        ax1.plot(x, S["C.renorm.log2_norm"] + k, color="#1f77b4", lw=1.2, ls="--", label="renormalized: un-rescaled ‖w̃‖ = 2^k ‖w‖")
        ax1.plot(x, S["C.renorm.log2_norm"], color="#1f77b4", lw=1.6, label="renormalized: ‖w‖ as stored")
        ax2.plot(x, S["C.plain.log2_opt_lr"], color="#d62728", lw=1.6, label="no renormalization")
        ax2.plot(x, S["C.renorm.log2_opt_lr"] + 2 * k, color="#1f77b4", lw=1.2, ls="--", label="renormalized: un-rescaled η̃ = 4^k · LR")
        ax2.plot(x, S["C.renorm.log2_opt_lr"], color="#1f77b4", lw=1.6, label="renormalized: LR as used")
        fmax = math.log2(_FLOAT32_MAX)
        for ax in (ax1, ax2):
            ax.axhline(fmax, color="k", lw=0.8, ls="--")
            ax.text(0.01, fmax + 4, "float32 max (2^128)", transform=ax.get_yaxis_transform(), fontsize=7)
            notes = []
            if "plain" in fwd:
                notes.append(f"step {fwd['plain']['step']}: BN variance overflows")
            if "plain" in ovf:
                notes.append(f"step {ovf['plain']['step']}: " + ("weights non-finite" if ovf["plain"].get("kind") == "weights"
                                                                 else "LR beyond float32, SGD refuses"))
                ax.axvline(ovf["plain"]["step"], color="#d62728", lw=0.8, ls=":")
            if notes:
                ax.text(0.03, 0.5, "plain run:\n" + "\n".join(notes), color="#d62728", fontsize=7, transform=ax.transAxes)
            ax.set_xlabel("step")
            ax.legend(fontsize=7, loc="upper left")
        ax1.set_ylabel("log2 ‖w‖ (trained weights)")
        ax2.set_ylabel("log2 learning rate")
        alpha = wd_equivalent_alpha(lr=cfg["lr"], weight_decay=cfg["overflow_weight_decay"], momentum=cfg["momentum"])
        fig.suptitle(f"ExpLR in float32 on a tiny BN net: lr {cfg['lr']}, momentum {cfg['momentum']}, λ "
                     f"{cfg['overflow_weight_decay']} (LR ×{alpha ** -2:.4f} per step), renorm bound {cfg['renorm_bound']:g}",
                     fontsize=9)
        return save(fig, path)
