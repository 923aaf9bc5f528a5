"""``auto-rate``: any learning rate for the scale-invariant weights trains a BatchNorm net.

Arora, Li, Lyu, *Theoretical Analysis of Auto Rate-Tuning by Batch Normalization* (ICLR 2019).
A weight ``w`` that feeds a BatchNorm layer is scale-invariant (``L(c w) = L(w)``), so
``⟨∇L(w), w⟩ = 0`` and a plain GD/SGD step grows its norm, ``‖w_{t+1}‖² = ‖w_t‖² + η² ‖g_t‖²``. The step
moves the direction ``w/‖w‖`` with the effective rate ``η / ‖w_t‖²``: a too-large ``η`` inflates
``‖w‖`` until the effective rate is tame. The theorem: with the LR ``η_si`` of the scale-invariant
weights fixed to *any* constant and only the LR of the other parameters tuned, full-batch GD
reaches ``min_{t<T} ‖∇̃L(θ_t)‖ = Õ(T^{-1/2})``, i.e. ``min_{t<T} ‖∇̃L‖² = Õ(T^{-1})``, and SGD
``min_{t<T} E‖∇̃L‖ = Õ(T^{-1/4})``, i.e. ``Õ(T^{-1/2})`` for the square; no momentum, no weight decay.
*(check: the learning-rate schedule of the non-scale-invariant parameters in the SGD theorem was
not confirmed from the original text; here every learning rate is constant.)*

**Setting.** A fully-BN MLP (``mlp``: Linear without bias -> BN -> ReLU, ``depth`` times, then a
Linear classifier) on the 8x8 digits. :func:`bnlab.scale.find_scale_invariant` confirms which
parameters are scale-invariant; those invariant **per output channel** (the Linear/conv weights
feeding a BN) form the scale-invariant groups, one group per tensor, and get the swept ``η_si``;
all other parameters (BN's γ/β, the classifier) keep ``other_lr``. (At initialization BN's
``β = 0``, which makes a hidden BN's ``γ`` scale-invariant as a whole through the ReLU; that stops
as soon as ``β`` moves, so the per-channel test leaves ``γ`` out. Both lists are in the summary.)
``other_lr = 0.1`` was picked once for the quick profile: at ``η_si = 1``, ``{0.03, 0.1, 0.3, 1}`` all
gave a final test accuracy of 97.3-98.2% (GD and SGD), and 0.1, in the middle, is held fixed over
the whole sweep.

**Sweep.** ``η_si`` over ``si_lrs`` (quick: ``1e-2 … 1e3``, 6 points, 5 decades), full-batch GD
(``gd``) and minibatch SGD (``sgd``), no momentum, no weight decay. With ``fixed_batches`` (the
default) SGD visits one fixed partition of the training set into batches in a fresh random order
every epoch: it then samples the finite-sum objective ``L(θ) = Σ_k |B_k|/N · L_{B_k}(θ)`` without
bias (each ``L_{B_k}`` is scale-invariant), which is the theorem's setting and a function whose
gradient can be evaluated exactly. With ordinary reshuffling BN's batch statistics make SGD
minimize an expectation over random partitions instead, which no fixed set of batches evaluates
(the measured objective gradient then stalls at a floor; ``--set fixed_batches=False`` shows it).

**Baseline.** The same MLP without normalization (``norm="none"``: the Linear layers keep their
bias), trained with **one learning rate for every parameter, equal to the swept value** (a plain
net has no scale-invariant weights, so there is nothing to give a separate rate to). Divergence
(non-finite loss or weights) is recorded as data by :func:`bnlab.train.train`; that run stops.

**Measured.** :class:`~bnlab.probes.scale.ScaleInvariantStats` (per group and ``all``: weight norm,
effective LR ``η_si / ‖w‖²``, angular update, norm-identity residual) at log-spaced steps and at the
last step, and the squared norm of the **intrinsic gradient**, the gradient with respect to the
normalized parameters ``(w_1/‖w_1‖, …, w_m/‖w_m‖, g)`` (``g`` the other parameters)::

    ‖∇̃L(θ)‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L(θ)‖²  +  ‖∇_g L(θ)‖²,

which is what "stationary point" means in the theorem (``‖w‖ ∇_w L`` is the gradient at ``w/‖w‖``,
by ``∇L(c w) = ∇L(w)/c``). For GD it is read from every step's full-batch gradient; for SGD the
gradient of the objective above is recomputed at log-spaced steps (``objective_per_decade``) and
the running minimum is taken over those steps.

**Norm identity.** A separate short float64 run of plain full-batch GD at ``identity_lrs`` with
BN's ``eps`` set to ``identity_bn_eps`` (default 1e-30, zero in effect: the theory's BN has no
``eps``, and PyTorch's 1e-5 breaks the invariance by ``~eps/Var``), recording the relative residual
``(‖w_{t+1}‖² - ‖w_t‖² - η² ‖g_t‖²) / ‖w_t‖²`` of every group at every step. The same run with the
default ``eps = 1e-5`` is stored for comparison and not judged.

**Effective LRs.** For each pair of grid rates 100x apart with the smaller ``>= eff_lr_min_lr``
(default 1: the too-large rates the mechanism is about; a small ``η_si`` hardly grows ``‖w‖``, so
its effective rate stays ``η_si/‖w_0‖²`` by construction) the ratio of the final effective LRs.

**Rate fit.** ``m_T = min_{t<T} ‖∇̃L(θ_t)‖²`` sampled at log-spaced ``T`` over the last
``rate_fit_decades`` decades of the run, least-squares line of ``log10 m_T`` on ``log10 T``. The
theorem is an upper bound with constants and log factors: a fitted slope at or below the bound's
exponent (``-1`` for GD, ``-1/2`` for SGD, with ``rate_tolerance`` slack) is consistent with it; a
flatter one means the bound's rate is not seen at this scale and number of steps.

Settings (``--set key=value``): ``si_lrs`` the swept rates; ``other_lr``; ``modes`` (``gd``, ``sgd``);
``norms`` (``bn``, ``none``); ``gd_steps``, ``sgd_steps``, ``batch_size``; ``fixed_batches``;
``gd_subset``/``identity_subset`` (0 = the whole training set); ``stats_per_decade`` and
``objective_per_decade`` (probe schedules); ``eval_points`` (evaluations per run); ``identity_*``;
the verdict thresholds ``acc_tolerance``, ``bn_min_decades``, ``plain_max_decades``,
``eff_lr_min_lr``, ``eff_lr_max_factor``, ``rate_fit_decades``, ``rate_tolerance``.

Profiles: ``tiny`` (tests, seconds), ``quick`` (digits, a few minutes on a 2-core CPU), ``paper``
(VGG-16 with BN on CIFAR-10; for a GPU; GD on a 1000-image subset since BN's full-batch statistics
need the whole batch in one forward pass).
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from .. import models
from ..plotting import NORM_COLORS, STYLE, save, smooth
from ..probes.base import Probe, StepContext, log_spaced
from ..probes.scale import ScaleInvariantStats
from ..runs import RunDir
from ..scale import find_scale_invariant, split_param_groups
from ..train import train
from . import Claim, Experiment, Result, judge, register_experiment

_BASE = dict(
    data="digits", model="mlp", width=64, depth=3, affine=True,
    si_lrs=[1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0], other_lr=0.1,
    modes=["gd", "sgd"], norms=["bn", "none"],
    gd_steps=1000, sgd_steps=2000, batch_size=64, fixed_batches=True, gd_subset=0,
    stats_per_decade=20, objective_per_decade=10, eval_points=20,
    identity_lrs=[1e-2, 1.0, 100.0], identity_steps=30, identity_subset=0, identity_bn_eps=1e-30,
    identity_max_residual=1e-6,
    acc_tolerance=0.05, bn_min_decades=4.0, plain_max_decades=2.0,
    eff_lr_min_lr=1.0, eff_lr_max_factor=3.0,
    rate_fit_decades=1.0, rate_tolerance=0.2,
    seed=0,
)

_SRC = "Arora, Li, Lyu 2019"
_MODE_LABEL = {"gd": "full-batch GD", "sgd": "SGD"}
_THEORY_SLOPE = {"gd": -1.0, "sgd": -0.5}  # exponent of the bound on min_t ‖∇̃L‖² (squared norm)
_LOSS_CLIP = 100.0  # learning-curve plots: a diverging loss is drawn up to here and marked with an x


# ----------------------------------------------------------------------------- probe


class IntrinsicGradNorm(Probe):
    """Squared norm of the gradient with respect to the normalized parameters.

    ``‖∇̃L‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L‖² + Σ_j ‖∇_{g_j} L‖²`` over the scale-invariant tensors ``w_i``
    and the other trainable parameters ``g_j``; also its two parts ``si_grad_norm_sq`` and
    ``other_grad_norm_sq``. Recorded as ``grad_norm_sq``.

    Without ``objective`` (cost: cheap) it reads the step's own gradient at ``after_backward``:
    exact for full-batch GD, the minibatch value for SGD. With ``objective``, a list of ``(x, y)``
    batches partitioning the training set (cost: standard), it computes at ``before_step`` the
    gradient of ``Σ_k |B_k|/N · L_{B_k}`` at ``w_t`` with ``torch.autograd.grad`` (``.grad`` is not
    touched) in train mode, and restores the BN running statistics it updated.

    Args:
        si_params: ``{name: parameter}`` of the scale-invariant tensors.
        other_params: the other trainable parameters.
        objective: the fixed batches of the objective, or ``None``.
        every: schedule (``step -> bool``) or interval.
        name: metric prefix.
    """

    def __init__(self, si_params: dict, other_params: Iterable[torch.Tensor], *, objective=None, every=1, name="objective"):
        super().__init__(every)
        self.name = name
        self.cost = "cheap" if objective is None else "standard"
        self.si = list(si_params.values())
        self.other = [p for p in other_params if p.requires_grad]
        self.objective = objective

    @staticmethod
    def _sq(t: torch.Tensor) -> float:
        t = t.detach().to(torch.float64)
        return float(torch.sum(t * t))

    def _norms(self, si_grads, other_grads) -> dict:
        si = sum(self._sq(w) * (0.0 if g is None else self._sq(g)) for w, g in zip(self.si, si_grads))
        other = sum(0.0 if g is None else self._sq(g) for g in other_grads)
        return {"grad_norm_sq": si + other, "si_grad_norm_sq": si, "other_grad_norm_sq": other}

    def after_backward(self, ctx: StepContext) -> dict | None:
        if self.objective is not None:
            return None
        return self._norms([w.grad for w in self.si], [p.grad for p in self.other])

    def before_step(self, ctx: StepContext) -> dict | None:
        if self.objective is None:
            return None
        model = ctx.model
        buffers = [b.detach().clone() for b in model.buffers()]
        params = self.si + self.other
        total = sum(len(y) for _, y in self.objective)
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        try:
            with torch.enable_grad():
                for x, y in self.objective:
                    loss = F.cross_entropy(model(x), y) * (len(y) / total)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for a, g in zip(acc, grads):
                        if g is not None:
                            a.add_(g.to(torch.float64))
        finally:
            with torch.no_grad():
                for b, s in zip(model.buffers(), buffers):
                    b.copy_(s)
        n = len(self.si)
        return self._norms(acc[:n], acc[n:])


class FixedBatches(data_mod.ArrayData):
    """A training set cut once into fixed batches; each epoch visits them in a fresh random order.

    SGD over it is an unbiased sampler of the finite-sum objective ``L(θ) = Σ_k |B_k|/N · L_{B_k}(θ)``
    (each ``L_{B_k}`` scale-invariant in the BN weights), the setting of the SGD theorem. With
    ordinary reshuffling every epoch makes new batches, so BN's batch statistics make SGD minimize
    an expectation over random partitions, which no fixed set of batches evaluates exactly.

    Args:
        data: the training set.
        batch_size: examples per batch (the last batch may be smaller).
        seed: seeds the one partition.
    """

    def __init__(self, data: data_mod.ArrayData, batch_size: int, seed: int, _order: Optional[torch.Tensor] = None):
        super().__init__(data.x, data.y, data.num_classes, data.name, data.split)
        n = len(data)
        self.order = _order if _order is not None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.batch_size = int(batch_size)
        self.slices = [self.order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]

    def to(self, device=None, dtype=None) -> "FixedBatches":
        moved = data_mod.ArrayData(self.x, self.y, self.num_classes, self.name, self.split).to(device, dtype)
        return FixedBatches(moved, self.batch_size, 0, _order=self.order.to(moved.x.device))

    def fixed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches ``(x_k, y_k)`` of the partition, in partition order."""
        return [(self.x[i], self.y[i]) for i in self.slices]

    def batches(self, batch_size: int, *, shuffle: bool = True, generator=None, drop_last: bool = False):
        if batch_size != self.batch_size:  # evaluation passes use their own batch size: plain order
            yield from super().batches(batch_size, shuffle=False)
            return
        ks = torch.randperm(len(self.slices), generator=generator).tolist() if shuffle else range(len(self.slices))
        for k in ks:
            i = self.slices[k]
            yield self.x[i], self.y[i]

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self.slices) if batch_size == self.batch_size else super().steps_per_epoch(batch_size, drop_last)


# ----------------------------------------------------------------------------- analysis helpers


def _arm_name(norm: str, mode: str, lr: float) -> str:
    return f"{norm}/{mode}/{lr:g}"


def _decades_span(lrs: list[float], ok: list[bool]) -> tuple[float, Optional[float], Optional[float]]:
    """The widest run of consecutive grid points (sorted by LR) that are ``ok``: (decades, lo, hi)."""
    order = sorted(range(len(lrs)), key=lambda i: lrs[i])
    best, cur_start = (0.0, None, None), None
    for k, i in enumerate(order):
        if ok[i]:
            if cur_start is None:
                cur_start = k
            lo, hi = lrs[order[cur_start]], lrs[i]
            span = math.log10(hi / lo)
            if best[1] is None or span > best[0]:
                best = (span, lo, hi)
        else:
            cur_start = None
    return best


def running_min_curve(steps: list[int], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(T, m_T)`` with ``T = t + 1`` for each measured step and ``m_T = min`` over measured ``t' <= t``.

    Non-finite values are skipped (a diverged step has no gradient).
    """
    pairs = sorted((s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v))
    if not pairs:
        return np.array([]), np.array([])
    t = np.array([p[0] + 1 for p in pairs], float)
    m = np.minimum.accumulate(np.array([p[1] for p in pairs], float))
    return t, m


def fit_rate(T: np.ndarray, m: np.ndarray, decades: float, n_points: int = 30) -> dict:
    """Least-squares slope of ``log10 m_T`` against ``log10 T`` over the last ``decades`` decades.

    ``m_T`` (a step function of ``T``) is sampled at ``n_points`` log-spaced ``T`` so late steps do
    not outweigh early ones. Returns ``slope``, ``intercept`` (log10 units), ``r2``, ``t_lo``,
    ``t_hi``; ``slope = nan`` when fewer than 3 distinct samples or any ``m_T <= 0``.
    """
    nan = {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "t_lo": math.nan, "t_hi": math.nan}
    if len(T) < 3:
        return nan
    t_hi = float(T[-1])
    t_lo = max(float(T[0]), t_hi / 10**decades)
    grid = np.unique(np.round(np.logspace(math.log10(t_lo), math.log10(t_hi), n_points)))
    idx = np.searchsorted(T, grid, side="right") - 1  # the running min at the last measured T <= grid point
    idx = np.unique(idx[idx >= 0])
    x, y = T[idx], m[idx]
    if len(x) < 3 or np.any(y <= 0):
        return {**nan, "t_lo": t_lo, "t_hi": t_hi}
    lx, ly = np.log10(x), np.log10(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    ss = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss if ss > 0 else math.nan
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "t_lo": float(x[0]), "t_hi": float(x[-1])}


def _select(recs: list[dict], arm: str, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in recs if r.get("arm") == arm and r.get("event") is None and key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ----------------------------------------------------------------------------- the experiment


@register_experiment
class AutoRate(Experiment):
    name = "auto-rate"
    title = "Auto rate-tuning: any LR for the scale-invariant weights trains a BN net"
    source = "Arora, Li, Lyu 2019"
    description = (
        "A fully-BN MLP whose scale-invariant weights (found numerically) get a learning rate swept over five "
        "decades while BN's affine parameters and the classifier keep one tuned rate; full-batch GD and SGD "
        "without momentum or weight decay; the same sweep for the net without normalization (one LR for all "
        "weights). Norm identity in float64, effective learning rates, accuracy against LR, and the decay "
        "rate of the smallest intrinsic gradient norm so far against the theorem's T^-1 (GD) and T^-1/2 (SGD)."
    )
    claims = (
        Claim("norm-identity", "For plain GD on scale-invariant weights, ‖w_{t+1}‖² = ‖w_t‖² + η²‖g_t‖² (the scale-invariance lemma: ⟨∇L(w), w⟩ = 0).",
              _SRC,
              "largest |relative residual| (‖w_{t+1}‖² - ‖w_t‖² - η²‖g_t‖²)/‖w_t‖² over all steps, groups and LRs of a float64 GD run with BN eps ≈ 0",
              "holds if <= identity_max_residual (default 1e-6)"),
        Claim("lr-insensitive", "With BN the net trains for every scale-invariant LR over >= 4 decades; without normalization only in a narrow band.",
              _SRC,
              "decades spanned by the widest run of grid LRs whose final test accuracy is within acc_tolerance of the best of that optimizer (GD, SGD)",
              "holds if, for every optimizer, BN spans >= bn_min_decades (default 4) and the plain net <= plain_max_decades (default 2)"),
        Claim("effective-lr-converges", "The effective LRs η/‖w_t‖² of runs started 100x apart draw together (the auto rate-tuning).",
              _SRC,
              "final ratio of the effective LRs η_si/‖w_T‖² (all scale-invariant weights together) of BN runs whose η_si are 100x apart, "
              "for every such pair of grid rates with the smaller >= eff_lr_min_lr (default 1), GD and SGD",
              "holds if every judged pair ends within a factor eff_lr_max_factor (default 3) of each other (it starts at 100)"),
        Claim("gd-rate", "Full-batch GD with any fixed η_si reaches min_{t<T} ‖∇̃L‖ = Õ(T^-1/2), i.e. slope -1 for the square (the paper's GD theorem).",
              _SRC,
              "median over the BN GD runs of the fitted log-log slope of min_{t<T} ‖∇̃L‖² against T over the last rate_fit_decades",
              "holds if median slope <= -1 + rate_tolerance (default 0.2); fails if flatter; inconclusive if no run can be fitted"),
        Claim("sgd-rate", "SGD with any fixed η_si reaches min_{t<T} E‖∇̃L‖ = Õ(T^-1/4), i.e. slope -1/2 for the square (the paper's SGD theorem).",
              _SRC,
              "median over the BN SGD runs of the fitted slope of min_{t<T} ‖∇̃L_objective‖² against T (objective gradient at log-spaced steps)",
              "holds if median slope <= -1/2 + rate_tolerance; fails if flatter; inconclusive if no run can be fitted"),
    )
    profiles = {
        "tiny": {**_BASE, "si_lrs": [0.1, 10.0, 1000.0], "gd_steps": 12, "sgd_steps": 12, "batch_size": 256,
                 "width": 16, "depth": 2, "identity_lrs": [1.0, 1000.0], "identity_steps": 4, "eval_points": 3,
                 "eff_lr_min_lr": 10.0, "bn_min_decades": 2.0},
        "quick": dict(_BASE),
        # VGG-16 with BN on CIFAR-10. Full-batch GD and the float64 identity run use a subset: BN's
        # full-batch statistics need the whole batch in one forward pass.
        "paper": {**_BASE, "data": "cifar10", "model": "vgg", "width": 64, "depth": 16,
                  "gd_steps": 2000, "gd_subset": 1000, "sgd_steps": 40000, "batch_size": 128,
                  "identity_steps": 20, "identity_subset": 256},
    }

    # ------------------------------------------------------------------ run

    @staticmethod
    def _make(cfg: dict, tr, norm: str) -> torch.nn.Module:
        return models.make(cfg["model"], norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                           affine=cfg["affine"], width=cfg["width"], depth=cfg["depth"], seed=cfg["seed"])

    @staticmethod
    def _find_groups(cfg: dict, net: torch.nn.Module, tr) -> tuple[list[str], list[dict]]:
        """Names of the scale-invariant groups used (the per-channel invariant tensors) and all found."""
        batch = tr.subset(min(len(tr), 512)).full_batch()
        found = find_scale_invariant(net, batch, F.cross_entropy, seed=cfg["seed"])
        listing = [{"name": g.param_name, "per_channel": g.per_channel, "max_violation": g.max_violation, "used": g.per_channel}
                   for g in found]
        return [g.param_name for g in found if g.per_channel], listing

    def run(self, cfg: dict, run: RunDir, *, device: str = "auto", progress: bool = True) -> Result:
        t_start = time.perf_counter()
        tr, te = data_mod.load_pair(cfg["data"], seed=cfg["seed"])
        recs: list[dict] = []  # everything written, kept for the verdicts (the metrics stream is buffered)

        def write(rec: dict) -> None:
            recs.append(rec)
            run.write(rec)

        # The groups depend on the architecture only (every arm starts from the same seed): find once.
        groups: dict[str, list[str]] = {}
        listings: dict[str, list[dict]] = {}
        for norm in dict.fromkeys(["bn", *cfg["norms"]]):
            groups[norm], listings[norm] = self._find_groups(cfg, self._make(cfg, tr, norm), tr)
        if not groups["bn"]:
            raise RuntimeError(f"model {cfg['model']!r} with BN has no per-channel scale-invariant weights")

        # -- 1. the norm identity: float64 plain GD, BN eps ~ 0 (and the default eps for comparison)
        tr64 = (tr.subset(cfg["identity_subset"]) if cfg["identity_subset"] else tr).to(dtype=torch.float64)
        identity: dict = {}
        for eps_name, eps in (("eps0", cfg["identity_bn_eps"]), ("eps_default", None)):
            for lr in cfg["identity_lrs"]:
                arm = f"identity/{eps_name}/{lr:g}"
                net = self._make(cfg, tr, "bn").to(torch.float64)
                for m in models.norm_layers(net):
                    if eps is not None:
                        m.eps = eps
                    eps_used = m.eps
                params = dict(net.named_parameters())
                si = {n: params[n] for n in groups["bn"]}
                opt = torch.optim.SGD(split_param_groups(net, scale_invariant_lr=lr, other_lr=cfg["other_lr"], groups=list(si.values())), lr=lr)
                write({"arm": arm, "event": "arm", "kind": "identity", "eps": eps_used, "lr_si": lr, "dtype": "float64", "groups": list(si)})
                h = train(net, tr64, opt, steps=cfg["identity_steps"], full_batch=True, probes=[ScaleInvariantStats(si)],
                          eval_data=None, eval_train=False, eval_every=cfg["identity_steps"] + 1, device=device, seed=cfg["seed"],
                          log=lambda r, arm=arm: write({"arm": arm, **r}) if r.get("event") is None else None)
                res = [abs(r[f"scale/{g}/norm_identity_rel_residual"]) for r in h.records for g in si
                       if f"scale/{g}/norm_identity_rel_residual" in r]
                identity[arm] = {"eps": eps_used, "lr_si": lr, "max_abs_rel_residual": max(res) if res else math.nan,
                                 "diverged": h.diverged}

        # -- 2. the sweep
        final: dict = {}
        for mode in cfg["modes"]:
            for norm in cfg["norms"]:
                for lr in cfg["si_lrs"]:
                    arm = _arm_name(norm, mode, lr)
                    final[arm] = self._train_arm(cfg, tr, te, arm, norm, mode, lr, groups[norm], write, device, progress)
        verdicts, numbers = _judge_all(cfg, recs, identity)
        summary = {"groups": listings, "identity": identity, "arms": final, **numbers,
                   "seconds": round(time.perf_counter() - t_start, 1)}
        return Result(summary=summary, verdicts=verdicts)

    def _train_arm(self, cfg, tr, te, arm, norm, mode, lr, group_names, write, device, progress) -> dict:
        """Train one arm of the sweep, streaming its records; return its final numbers."""
        full = mode == "gd"
        steps = cfg["gd_steps"] if full else cfg["sgd_steps"]
        net = self._make(cfg, tr, norm)
        params = dict(net.named_parameters())
        si = {n: params[n] for n in group_names}
        if si:
            pg = split_param_groups(net, scale_invariant_lr=lr, other_lr=cfg["other_lr"], groups=list(si.values()))
            other_lr = cfg["other_lr"]
        else:  # the baseline: one LR (the swept value) for every parameter
            pg = [{"params": list(net.parameters()), "lr": lr, "name": "all"}]
            other_lr = lr
        opt = torch.optim.SGD(pg, lr=lr, momentum=0.0, weight_decay=0.0)
        si_ids = {id(p) for p in si.values()}
        others = [p for p in net.parameters() if id(p) not in si_ids]
        last = steps - 1
        stats_sched = log_spaced(1, cfg["stats_per_decade"])
        obj_sched = log_spaced(1, cfg["objective_per_decade"])
        probes: list[Probe] = []
        if si:
            probes.append(ScaleInvariantStats(si, every=lambda s: stats_sched(s) or s == last))
        if full:
            train_set = tr.subset(cfg["gd_subset"]) if cfg["gd_subset"] else tr
            probes.append(IntrinsicGradNorm(si, others, name="objective"))  # the step's gradient is the objective's
        else:
            parts = FixedBatches(tr, cfg["batch_size"], seed=cfg["seed"] + 1)
            train_set = parts if cfg["fixed_batches"] else tr
            probes.append(IntrinsicGradNorm(si, others, name="minibatch", every=stats_sched))
            if si:
                probes.append(IntrinsicGradNorm(si, others, objective=parts.to(device).fixed(), name="objective",
                                                every=lambda s: obj_sched(s) or s == last))
        write({"arm": arm, "event": "arm", "kind": "sweep", "norm": norm, "mode": mode, "lr_si": lr, "other_lr": other_lr,
               "groups": list(si), "steps": steps, "train_size": len(train_set)})
        h = train(net, train_set, opt, steps=steps, batch_size=cfg["batch_size"], full_batch=full, probes=probes,
                  eval_data=te, eval_every=max(1, steps // max(1, cfg["eval_points"])), device=device, seed=cfg["seed"],
                  log=lambda r: write({"arm": arm, **r}), progress=f"{self.name} {arm}" if progress else False)
        out = {**h.summary(), "norm": norm, "mode": mode, "lr_si": lr, "other_lr": other_lr}
        write({"arm": arm, "event": "arm_end", **out})
        return out

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        recs = run.metrics()
        arms = _arms_from_metrics(recs)
        paths = []
        for mode in cfg["modes"]:
            paths.append(_fig_learning_curves(cfg, recs, arms, mode, run.figure_path(f"learning_curves_{mode}.png")))
        paths.append(_fig_norm_efflr(cfg, recs, arms, run.figure_path("weight_norm_effective_lr.png")))
        paths.append(_fig_rate(cfg, recs, arms, run.figure_path("grad_norm_rate.png")))
        paths.append(_fig_acc_vs_lr(cfg, arms, run.figure_path("accuracy_vs_lr.png")))
        paths.append(_fig_identity(cfg, recs, arms, run.figure_path("norm_identity.png")))
        return paths


# ----------------------------------------------------------------------------- verdicts


def _arms_from_metrics(recs: list[dict]) -> dict:
    """``{arm: meta}`` from the ``arm`` records, completed by the ``arm_end`` records."""
    arms: dict = {}
    for r in recs:
        if r.get("event") == "arm":
            arms[r["arm"]] = dict(r)
        elif r.get("event") == "arm_end" and r["arm"] in arms:
            arms[r["arm"]].update({k: v for k, v in r.items() if k not in ("event", "arm")})
    return arms


def _sweep(arms: dict, mode: str, norm: str) -> list[dict]:
    return sorted((a for a in arms.values() if a.get("kind") == "sweep" and a["mode"] == mode and a["norm"] == norm),
                  key=lambda a: a["lr_si"])


def _acc(a: dict) -> float:
    v = a.get("test_acc")
    return float(v) if v is not None and math.isfinite(v) else math.nan


def _trained(a: dict, best: float, tol: float) -> bool:
    acc = _acc(a)
    return (not a.get("diverged")) and math.isfinite(acc) and acc >= best - tol


def _rate_fits(cfg: dict, recs: list[dict], arms: dict, mode: str) -> dict:
    out = {}
    for a in _sweep(arms, mode, "bn"):
        steps, vals = _select(recs, a["arm"], "objective/grad_norm_sq")
        T, m = running_min_curve(steps, vals)
        out[a["arm"]] = {"lr_si": a["lr_si"], **fit_rate(T, m, cfg["rate_fit_decades"]), "diverged": bool(a.get("diverged"))}
    return out


def _first_last_eff_lr(recs: list[dict], arm: str) -> tuple[float, float]:
    steps, vals = _select(recs, arm, "scale/all/effective_lr")
    if not steps:
        return math.nan, math.nan
    return float(vals[0]), float(vals[-1])


def _fmt_acc(a: dict) -> str:
    acc = _acc(a)
    if a.get("diverged"):
        return f"diverged@{a.get('diverged_at')}"
    return f"{acc:.0%}" if math.isfinite(acc) else "nan"


def _acc_list(arms: list[dict]) -> str:
    return ", ".join(f"{a['lr_si']:g}: {_fmt_acc(a)}" for a in arms)


def _judge_all(cfg: dict, recs: list[dict], identity: dict):
    arms = _arms_from_metrics(recs)
    verdicts, numbers = [], {}

    # (1) norm identity
    judged = [v["max_abs_rel_residual"] for k, v in identity.items() if "/eps0/" in k]
    worst = max(judged, default=math.nan)
    default_eps = max((v["max_abs_rel_residual"] for k, v in identity.items() if "/eps_default/" in k), default=math.nan)
    f32 = [abs(v) for r in recs if r.get("event") is None and str(r.get("arm", "")).startswith("bn/")
           for k, v in r.items() if k.endswith("/norm_identity_rel_residual") and not k.startswith("scale/all/") and math.isfinite(v)]
    f32_max = max(f32, default=math.nan)
    numbers["norm_identity"] = {"float64_eps0_max": worst, "float64_eps_default_max": default_eps, "float32_sweep_max": f32_max}
    ok = None if not math.isfinite(worst) else worst <= cfg["identity_max_residual"]
    verdicts.append(judge("norm-identity", ok, worst,
                          f"float64 full-batch GD, BN eps={cfg['identity_bn_eps']:g}, η_si in {cfg['identity_lrs']}, {cfg['identity_steps']} steps: "
                          f"max |relative residual| over steps and groups {worst:.1e} (threshold {cfg['identity_max_residual']:.0e}). "
                          f"For comparison: float64 with BN eps=1e-5 {default_eps:.1e}; the float32 sweep (eps=1e-5) {f32_max:.1e}."))

    # (2) LR insensitivity
    spans, parts, oks = {}, [], []
    for mode in cfg["modes"]:
        bn, plain = _sweep(arms, mode, "bn"), _sweep(arms, mode, "none")
        best = max((_acc(a) for a in bn + plain if math.isfinite(_acc(a))), default=math.nan)
        if not (bn and plain and math.isfinite(best)):
            continue
        row: dict = {"best_acc": best}
        for label, lst in (("bn", bn), ("none", plain)):
            ok_list = [_trained(a, best, cfg["acc_tolerance"]) for a in lst]
            span, lo, hi = _decades_span([a["lr_si"] for a in lst], ok_list)
            row[label] = {"decades": span if lo is not None else None, "lo": lo, "hi": hi,
                          "test_acc": {f"{a['lr_si']:g}": (_acc(a) if math.isfinite(_acc(a)) else None) for a in lst},
                          "diverged": [a["lr_si"] for a in lst if a.get("diverged")]}
        spans[mode] = row

        def band(r: dict) -> str:
            return "no LR" if r["lo"] is None else f"{r['decades']:.0f} decades ({r['lo']:g} to {r['hi']:g})"

        bn_dec = row["bn"]["decades"] or 0.0
        pl_dec = row["none"]["decades"] if row["none"]["decades"] is not None else 0.0
        oks.append(bn_dec >= cfg["bn_min_decades"] - 1e-9 and pl_dec <= cfg["plain_max_decades"] + 1e-9)
        parts.append(f"{mode.upper()}: BN trains over {band(row['bn'])}, plain over {band(row['none'])} "
                     f"(within {cfg['acc_tolerance']:.0%} of the best, {best:.1%}). Final test accuracy by η: "
                     f"BN {_acc_list(bn)}; plain {_acc_list(plain)}")
    numbers["lr_span"] = spans
    bn_min = min((s["bn"]["decades"] or 0.0 for s in spans.values()), default=None)
    verdicts.append(judge("lr-insensitive", all(oks) if oks else None, bn_min,
                          ("; ".join(parts) or "needs both nets in the sweep")
                          + f". Thresholds: BN >= {cfg['bn_min_decades']:g} decades, plain <= {cfg['plain_max_decades']:g}."))

    # (3) effective LRs drawing together
    eff, parts, factors = {}, [], []
    for mode in cfg["modes"]:
        by_lr = {a["lr_si"]: a for a in _sweep(arms, mode, "bn") if not a.get("diverged")}
        ends = {lr: _first_last_eff_lr(recs, a["arm"]) for lr, a in by_lr.items()}
        pairs = {}
        for lr in sorted(by_lr):
            lr2 = next((x for x in by_lr if abs(math.log10(x / lr) - 2.0) < 1e-6), None)
            if lr2 is None:
                continue
            (s1, e1), (s2, e2) = ends[lr], ends[lr2]
            r = e2 / e1
            pairs[f"{lr:g}-{lr2:g}"] = {"start_ratio": s2 / s1, "final_ratio": r, "factor": max(r, 1 / r),
                                        "final_eff_lr": [e1, e2], "judged": lr >= cfg["eff_lr_min_lr"]}
        judged = {k: v for k, v in pairs.items() if v["judged"] and math.isfinite(v["factor"])}
        big = [e for lr, (_, e) in ends.items() if lr >= cfg["eff_lr_min_lr"] and math.isfinite(e) and e > 0]
        lrs_big = [lr for lr in ends if lr >= cfg["eff_lr_min_lr"]]
        spread = math.log10(max(big) / min(big)) if len(big) > 1 else math.nan
        eff[mode] = {"pairs": pairs, "final_eff_lr": {f"{lr:g}": e for lr, (_, e) in ends.items()},
                     "final_spread_decades": spread}
        if judged:
            factors.append(max(v["factor"] for v in judged.values()))
            lr_dec = math.log10(max(lrs_big) / min(lrs_big))
            parts.append(f"{mode.upper()}: pairs judged (η_si >= {cfg['eff_lr_min_lr']:g}), final ratio (start 100): "
                         + ", ".join(f"{k}: {v['final_ratio']:.3g}" for k, v in judged.items())
                         + f"; over η_si in [{min(lrs_big):g}, {max(lrs_big):g}] ({lr_dec:.0f} decades) the final effective LRs span "
                         f"{spread:.2f} decades"
                         + "; not judged: " + (", ".join(f"{k}: {v['final_ratio']:.3g}" for k, v in pairs.items() if not v["judged"]) or "none"))
    numbers["effective_lr"] = eff
    worst_factor = max(factors) if factors else None
    verdicts.append(judge("effective-lr-converges", None if worst_factor is None else worst_factor <= cfg["eff_lr_max_factor"],
                          worst_factor,
                          ("; ".join(parts) or "no pair of rates 100x apart in the sweep")
                          + f". Threshold: every judged pair within a factor {cfg['eff_lr_max_factor']:g}; worst factor "
                          + (f"{worst_factor:.3g}." if worst_factor is not None else "n/a.")))

    # (4), (5) rates
    numbers["rate_fits"] = {}
    for claim, mode in (("gd-rate", "gd"), ("sgd-rate", "sgd")):
        if mode not in cfg["modes"]:
            continue
        fits = _rate_fits(cfg, recs, arms, mode)
        numbers["rate_fits"][mode] = fits
        usable = [f for f in fits.values() if math.isfinite(f["slope"]) and not f["diverged"]]
        theory = _THEORY_SLOPE[mode]
        if not usable:
            verdicts.append(judge(claim, None, None, f"no {mode.upper()} run of the BN net could be fitted"))
            continue
        med = float(np.median([f["slope"] for f in usable]))
        per = ", ".join(f"η_si {f['lr_si']:g}: {f['slope']:+.2f} (R² {f['r2']:.2f})" for f in usable)
        win = usable[0]
        what = ("the full-batch loss, every step" if mode == "gd" else
                f"the objective Σ_k |B_k|/N L_B_k over a fixed partition into batches of {cfg['batch_size']}, at log-spaced steps"
                + ("" if cfg["fixed_batches"] else " (SGD itself reshuffles, so this is a proxy of its objective)"))
        ok = med <= theory + cfg["rate_tolerance"]
        verdicts.append(judge(claim, ok, med,
                              f"fitted slope of log10 min_(t<T) ‖∇̃L‖² (intrinsic gradient of {what}) on log10 T over T in "
                              f"[{win['t_lo']:.0f}, {win['t_hi']:.0f}]: median {med:+.2f}, against the theorem's bound {theory:+.1f} "
                              f"(holds if <= {theory + cfg['rate_tolerance']:+.1f}: the bound is an upper bound, a steeper decay is "
                              f"consistent with it); per run: {per}"))
    return verdicts, numbers


# ----------------------------------------------------------------------------- figures


def _lr_colors(lrs: list[float]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    lo, hi = math.log10(min(lrs)), math.log10(max(lrs))
    return {lr: cmap(0.9 * (math.log10(lr) - lo) / (hi - lo) if hi > lo else 0.0) for lr in lrs}


def _fig_learning_curves(cfg, recs, arms, mode, path):
    import matplotlib.pyplot as plt

    colors = _lr_colors(cfg["si_lrs"])
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
        for row, norm in enumerate(cfg["norms"][:2]):
            for a in _sweep(arms, mode, norm):
                arm, lr = a["arm"], a["lr_si"]
                steps = [r for r in recs if r.get("arm") == arm and r.get("event") is None and "loss" in r]
                evals = [r for r in recs if r.get("arm") == arm and r.get("event") == "eval"]
                x = [r["step"] for r in steps]
                loss = [r["loss"] for r in steps]
                lab = f"η={lr:g}" + (f" (diverged @{a.get('diverged_at')})" if a.get("diverged") else "")
                y = smooth(loss, max(1, len(loss) // 50) if mode == "sgd" else 1)
                axes[row, 0].plot(x, np.minimum(y, _LOSS_CLIP), color=colors[lr], label=lab)
                if a.get("diverged") and a.get("diverged_at") is not None:
                    finite = [(s, v) for s, v in zip(x, loss) if v is not None and math.isfinite(v)]
                    if finite:
                        axes[row, 0].plot(finite[-1][0], min(finite[-1][1], _LOSS_CLIP), marker="x", color=colors[lr], ms=8, mew=2,
                                          clip_on=False)
                axes[row, 1].plot([r["step"] for r in evals], [100 * r["test_acc"] if r.get("test_acc") is not None else np.nan for r in evals],
                                  color=colors[lr], marker="o", ms=2.5, label=lab)
            name = "BN, η_si swept, other LR %g" % cfg["other_lr"] if norm == "bn" else "no norm, every weight at η"
            axes[row, 0].set_title(f"{name}: training loss", fontsize=9)
            axes[row, 1].set_title(f"{name}: test accuracy", fontsize=9)
            axes[row, 0].set_yscale("log")
            axes[row, 0].set_ylim(top=_LOSS_CLIP)
            axes[row, 0].set_ylabel("loss" + (" (moving avg)" if mode == "sgd" else "") + f", clipped at {_LOSS_CLIP:g}")
            axes[row, 1].set_ylabel("test accuracy (%)")
            axes[row, 1].set_ylim(0, 100)
            axes[row, 1].axhline(10, color="grey", lw=0.8, ls="--")
            axes[row, 1].legend(fontsize=7, loc="center right")
        for ax in axes[1]:
            ax.set_xlabel("step")
        fig.suptitle(f"{cfg['model']} on {cfg['data']}, {_MODE_LABEL[mode]} (no momentum, no weight decay)")
        fig.tight_layout()
        return save(fig, path)


def _fig_norm_efflr(cfg, recs, arms, path):
    import matplotlib.pyplot as plt

    colors = _lr_colors(cfg["si_lrs"])
    modes = cfg["modes"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(modes), 2, figsize=(10.5, 3.3 * len(modes)), squeeze=False)
        for row, mode in enumerate(modes):
            firsts, lasts = [], []
            for a in _sweep(arms, mode, "bn"):
                lr = a["lr_si"]
                s, wn = _select(recs, a["arm"], "scale/all/weight_norm")
                s2, el = _select(recs, a["arm"], "scale/all/effective_lr")
                axes[row, 0].plot(np.asarray(s) + 1, wn, color=colors[lr], label=f"η_si = {lr:g}")
                axes[row, 1].plot(np.asarray(s2) + 1, el, color=colors[lr], label=f"η_si = {lr:g}")
                if el and math.isfinite(el[0]) and math.isfinite(el[-1]):
                    firsts.append(el[0])
                    lasts.append(el[-1])
            for ax in axes[row]:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("step + 1")
            axes[row, 0].set_ylabel("‖w‖, all scale-invariant weights")
            axes[row, 1].set_ylabel("effective LR  η_si / ‖w‖²")
            axes[row, 0].set_title(f"BN net, {_MODE_LABEL[mode]}: weight norm", fontsize=9)
            spread = ""
            if len(firsts) > 1:
                spread = (f"\nspread over the sweep: {math.log10(max(firsts) / min(firsts)):.1f} decades at step 0, "
                          f"{math.log10(max(lasts) / min(lasts)):.1f} at the end")
            axes[row, 1].set_title(f"BN net, {_MODE_LABEL[mode]}: effective learning rate{spread}", fontsize=9)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, title="η_si", title_fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.88, 1))
        return save(fig, path)


def _fig_rate(cfg, recs, arms, path):
    import matplotlib.pyplot as plt

    colors = _lr_colors(cfg["si_lrs"])
    modes = cfg["modes"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), squeeze=False)
        for col, mode in enumerate(modes):
            ax = axes[0, col]
            slopes = []
            anchor = None
            for a in _sweep(arms, mode, "bn"):
                lr = a["lr_si"]
                steps, vals = _select(recs, a["arm"], "objective/grad_norm_sq")
                T, m = running_min_curve(steps, vals)
                if not len(T):
                    continue
                f = fit_rate(T, m, cfg["rate_fit_decades"])
                lab = f"η_si={lr:g}: slope {f['slope']:+.2f}" if math.isfinite(f["slope"]) else f"η_si={lr:g}"
                ax.plot(T, m, color=colors[lr], label=lab, drawstyle="steps-post" if mode == "gd" else "default",
                        marker=None if mode == "gd" else ".", ms=3)
                if math.isfinite(f["slope"]):
                    slopes.append(f["slope"])
                    tt = np.array([f["t_lo"], f["t_hi"]])
                    ax.plot(tt, 10 ** (f["intercept"]) * tt ** f["slope"], color="k", lw=0.8, ls="--")
                    if anchor is None or lr == 1.0:
                        anchor = (f["t_lo"], 10 ** f["intercept"] * f["t_lo"] ** f["slope"], f["t_hi"])
            th = _THEORY_SLOPE[mode]
            if anchor is not None:
                t0, y0, t1 = anchor
                tt = np.array([t0, t1])
                ax.plot(tt, y0 * 3 * (tt / t0) ** th, color="grey", lw=2, alpha=0.6, label=f"theory bound: slope {th:+.1f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("T (steps)")
            what = "full-batch" if mode == "gd" else "objective (fixed batches)"
            ax.set_ylabel(f"min_(t<T) ‖∇̃L‖², {what}")
            med = f", median fitted slope {np.median(slopes):+.2f}" if slopes else ""
            ax.set_title(f"BN net, {_MODE_LABEL[mode]}{med}\n(dashed: fit over the last {cfg['rate_fit_decades']:g} decade(s))", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return save(fig, path)


def _fig_acc_vs_lr(cfg, arms, path):
    import matplotlib.pyplot as plt

    modes = cfg["modes"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.8), squeeze=False, sharey=True)
        for col, mode in enumerate(modes):
            ax = axes[0, col]
            for norm, ls in (("bn", "-"), ("none", "--")):
                lst = _sweep(arms, mode, norm)
                if not lst:
                    continue
                lrs = [a["lr_si"] for a in lst]
                acc = [100 * _acc(a) for a in lst]
                c = NORM_COLORS.get(norm, "k")
                label = f"BN (η_si; other LR {cfg['other_lr']:g})" if norm == "bn" else "no norm (one LR for all)"
                ax.plot(lrs, acc, color=c, ls=ls, marker="o", label=label)
                div = [a for a in lst if a.get("diverged")]
                if div:
                    ax.plot([a["lr_si"] for a in div], [2] * len(div), ls="none", marker="x", ms=9, mew=2, color=c,
                            label=f"{'BN' if norm == 'bn' else 'no norm'} diverged")
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.axhline(10, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("learning rate η (swept)")
            ax.set_title(_MODE_LABEL[mode], fontsize=9)
            ax.legend(fontsize=7, loc="lower left")
        axes[0, 0].set_ylabel("final test accuracy (%)")
        fig.suptitle(f"Final accuracy against the learning rate ({cfg['model']} on {cfg['data']})")
        fig.tight_layout()
        return save(fig, path)


def _fig_identity(cfg, recs, arms, path):
    import matplotlib.pyplot as plt

    ids = [a for a in arms.values() if a.get("kind") == "identity"]
    lrs = sorted({a["lr_si"] for a in ids})
    colors = _lr_colors(lrs) if lrs else {}
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for a in sorted(ids, key=lambda a: (a["eps"], a["lr_si"])):
            s, v = _select(recs, a["arm"], "scale/all/norm_identity_rel_residual")
            v = np.maximum(np.abs(np.asarray(v, float)), 1e-20)
            small = a["eps"] < 1e-10
            ax.plot(np.asarray(s), v, color=colors[a["lr_si"]], ls="-" if small else "--", marker="o" if small else None, ms=2.5,
                    label=f"η_si={a['lr_si']:g}, BN eps={a['eps']:g}")
        ax.axhline(cfg["identity_max_residual"], color="k", lw=1, ls=":", label=f"threshold {cfg['identity_max_residual']:.0e}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|‖w_{t+1}‖² − ‖w_t‖² − η²‖g_t‖²| / ‖w_t‖²")
        ax.set_title("Norm identity, float64 full-batch GD (all scale-invariant weights)", fontsize=9)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        fig.tight_layout()
        return save(fig, path)
