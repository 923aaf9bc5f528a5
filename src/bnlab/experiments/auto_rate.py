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
every epoch (:class:`bnlab.data.FixedBatches`): it then samples the finite-sum objective
``L(θ) = Σ_k |B_k|/N · L_{B_k}(θ)`` without bias (each ``L_{B_k}`` is scale-invariant), which is the
theorem's setting and a function whose gradient can be evaluated exactly. With ordinary
reshuffling BN's batch statistics make SGD minimize an expectation over random partitions
instead, which no fixed set of batches evaluates (the measured objective gradient then stalls at a
floor; ``--set fixed_batches=False`` shows it).

**Baseline.** The same MLP without normalization (``norm="none"``: the Linear layers keep their
bias), trained with **one learning rate for every parameter, equal to the swept value** (a plain
net has no scale-invariant weights, so there is nothing to give a separate rate to). Divergence
(non-finite loss or weights) is recorded as data by :func:`bnlab.train.train`; that run stops.

**Measured.** :class:`~bnlab.probes.scale.ScaleInvariantStats` (per group and ``all``: weight norm,
effective LR ``η_si / ‖w‖²``, angular update, norm-identity residual) at log-spaced steps and at the
last step, and the squared norm of the **intrinsic gradient**
(:class:`~bnlab.probes.intrinsic.IntrinsicGradNorm`), the gradient with respect to the normalized
parameters ``(w_1/‖w_1‖, …, w_m/‖w_m‖, g)`` (``g`` the other parameters)::

    ‖∇̃L(θ)‖² = Σ_i ‖w_i‖² ‖∇_{w_i} L(θ)‖²  +  ‖∇_g L(θ)‖²,

which is what "stationary point" means in the theorem (``‖w‖ ∇_w L`` is the gradient at ``w/‖w‖``,
by ``∇L(c w) = ∇L(w)/c``). For GD it is read from every step's full-batch gradient; for SGD the
gradient of the objective above is recomputed at log-spaced steps (``objective_per_decade``) and
the running minimum is taken over those steps. The summary keeps, per BN run, the running-minimum
curve ``(T, m_T)`` and the first and last effective LR, so that every verdict can be recomputed
from it with other thresholds.

**Norm identity.** A separate short float64 run of plain full-batch GD at ``identity_lrs`` with
BN's ``eps`` set to ``identity_bn_eps`` (default 1e-30, zero in effect: the theory's BN has no
``eps``, and PyTorch's 1e-5 breaks the invariance by ``~eps/Var``), recording the relative residual
``(‖w_{t+1}‖² - ‖w_t‖² - η² ‖g_t‖²) / ‖w_t‖²`` of every group at every step. The same run with the
default ``eps = 1e-5`` is stored for comparison and not judged.

**Effective LRs.** For each pair of grid rates 100x apart with the smaller ``>= eff_lr_min_lr``
(a threshold, default 1: the too-large rates the mechanism is about; a small ``η_si`` hardly grows
``‖w‖``, so its effective rate stays ``η_si/‖w_0‖²`` by construction) the ratio of the final
effective LRs.

**Rate fit.** ``m_T = min_{t<T} ‖∇̃L(θ_t)‖²`` sampled at log-spaced ``T`` over the last
``rate_fit_decades`` decades of the run (a threshold: it selects the part of the stored curve that
is fitted), least-squares line of ``log10 m_T`` on ``log10 T`` (:func:`bnlab.analysis.fit_rate`).
The theorem is an upper bound with constants and log factors: a fitted slope at or below the
bound's exponent (``-1`` for GD, ``-1/2`` for SGD, with ``rate_tolerance`` slack) is consistent with
it; a flatter one means the bound's rate is not seen at this scale and number of steps.

Profiles: ``tiny`` (tests, seconds), ``quick`` (digits, a few minutes on a 2-core CPU), ``paper``
(VGG-16 with BN on CIFAR-10; for a GPU; GD on a 1000-image subset since BN's full-batch statistics
need the whole batch in one forward pass).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from .. import models
from ..analysis import decades_span, fit_rate, running_min_curve
from ..errors import UserError
from ..plotting import STYLE, accuracy_vs_lr, save, smooth
from ..probes.base import Probe, log_spaced
from ..probes.intrinsic import IntrinsicGradNorm
from ..probes.scale import ScaleInvariantStats
from ..runs import RunDir
from ..scale import find_scale_invariant, split_param_groups
from ..train import train
from .base import Claim, Context, Experiment, fmt, from_dict, register_experiment, verdict

_SRC = "Arora, Li, Lyu 2019"
_MODES = ("gd", "sgd")
_MODE_LABEL = {"gd": "full-batch GD", "sgd": "SGD"}
_THEORY_SLOPE = {"gd": -1.0, "sgd": -0.5}  # exponent of the bound on min_t ‖∇̃L‖² (squared norm)
_PAIR_DECADES = 2.0  # the effective-LR claim compares runs whose η_si are 100x apart
_LOSS_CLIP = 100.0  # learning-curve plots: a diverging loss is drawn up to here and marked with an x


@dataclass(frozen=True)
class Config:
    """What ``auto-rate`` trains and measures (hashed: names the run)."""

    data: str = "digits"
    """Dataset (``bnlab list``)."""
    model: str = "mlp"
    """Model (``bnlab list``); with BN, the weights feeding a BN layer must be scale-invariant per output channel."""
    width: int = 64
    """Model width."""
    depth: int = 3
    """Model depth."""
    affine: bool = True
    """BN layers have the affine parameters γ/β (trained at ``other_lr``)."""
    si_lrs: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    """The swept learning rates η_si of the scale-invariant weights (the plain net: of every weight)."""
    other_lr: float = 0.1
    """Learning rate of the BN net's other parameters (BN's γ/β, the classifier), fixed over the sweep."""
    modes: tuple[str, ...] = ("gd", "sgd")
    """Optimizers swept: ``gd`` (full-batch GD) and/or ``sgd`` (minibatch SGD); no momentum, no weight decay."""
    norms: tuple[str, ...] = ("bn", "none")
    """Nets swept: ``bn`` (scale-invariant weights at η_si) and ``none`` (the plain baseline, η for every weight)."""
    gd_steps: int = 1000
    """Steps of each full-batch GD run."""
    sgd_steps: int = 2000
    """Steps of each SGD run."""
    batch_size: int = 64
    """SGD examples per batch (also the batches of the fixed partition whose objective is measured)."""
    fixed_batches: bool = True
    """SGD visits one fixed partition of the training set in a fresh order each epoch (False: ordinary reshuffling)."""
    gd_subset: int = 0
    """Full-batch GD trains on the first n training examples (0: the whole training set)."""
    stats_per_decade: int = 20
    """Scale-invariant statistics (and SGD's minibatch gradient norm) at about this many log-spaced steps per decade."""
    objective_per_decade: int = 10
    """SGD: the objective's intrinsic gradient norm at about this many log-spaced steps per decade (and at the last)."""
    eval_points: int = 20
    """Test evaluations per run."""
    identity_lrs: tuple[float, ...] = (1e-2, 1.0, 100.0)
    """η_si of the float64 norm-identity runs (plain full-batch GD)."""
    identity_steps: int = 30
    """Steps of each norm-identity run."""
    identity_subset: int = 0
    """Norm-identity runs train on the first n training examples (0: the whole training set)."""
    identity_bn_eps: float = 1e-30
    """BN's eps in the judged norm-identity runs (the theory's BN has none; a default-eps run is stored beside)."""
    seed: int = 0
    """Seed of the split, the initializations, the SGD partition and the batch order."""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in _MODES]
        if bad or not self.modes:
            raise ValueError(f"modes takes one or both of {', '.join(_MODES)}, got {list(self.modes)}")
        if not self.si_lrs or not all(lr > 0 for lr in (*self.si_lrs, *self.identity_lrs)):
            raise ValueError("si_lrs must be non-empty and si_lrs and identity_lrs positive")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``auto-rate``'s decision rules."""

    identity_max_residual: float = 1e-6
    """The norm identity holds when the float64 run's largest |relative residual| is at most this."""
    acc_tolerance: float = 0.05
    """A run "trains" when it has not diverged and ends within this test accuracy of its optimizer's best run."""
    bn_min_decades: float = 4.0
    """LR-insensitivity: for every optimizer the BN net trains over a band of η_si at least this many decades wide."""
    plain_max_decades: float = 2.0
    """LR-insensitivity: ... and the plain net over a band at most this many decades wide."""
    eff_lr_min_lr: float = 1.0
    """Effective LRs: only pairs of rates 100x apart whose smaller rate is at least this are judged."""
    eff_lr_max_factor: float = 3.0
    """Effective LRs: every judged pair ends within this factor of each other (they start 100x apart)."""
    rate_fit_decades: float = 1.0
    """Rates: the slope is fitted over the last this-many decades of T of the running-minimum curve."""
    rate_tolerance: float = 0.2
    """Rates: holds when the median fitted slope is at most the theorem's exponent (-1 GD, -1/2 SGD) plus this."""


# ----------------------------------------------------------------------------- helpers


def _arm_name(norm: str, mode: str, lr: float) -> str:
    return f"{norm}/{mode}/{lr:g}"


def _select(recs: list[dict], arm: str, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in the step records of ``arm``."""
    pairs = [(r["step"], r[key]) for r in recs if r.get("arm") == arm and r.get("event") is None and key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _sweep(arms: dict, mode: str, norm: str) -> list[dict]:
    """The sweep arms of ``mode`` and ``norm`` (``{arm: numbers}``), each with its name, by ``lr_si``."""
    return sorted(({**a, "arm": k} for k, a in arms.items() if a.get("mode") == mode and a.get("norm") == norm),
                  key=lambda a: a["lr_si"])


def _acc(a: dict) -> float:
    v = a.get("test_acc")
    return float(v) if v is not None and math.isfinite(v) else math.nan


def _trained(a: dict, best: float, tol: float) -> bool:
    acc = _acc(a)
    return (not a.get("diverged")) and math.isfinite(acc) and acc >= best - tol


def _fmt_acc(a: dict) -> str:
    acc = _acc(a)
    if a.get("diverged"):
        return f"diverged@{a.get('diverged_at')}"
    return f"{acc:.0%}" if math.isfinite(acc) else "nan"


def _acc_list(arms: list[dict]) -> str:
    return ", ".join(f"{a['lr_si']:g}: {_fmt_acc(a)}" for a in arms)


def _series_from_records(recs: list[dict], arms: dict) -> dict:
    """What the judge needs from the step records, reduced: per BN sweep arm of ``arms`` the first
    and last effective LR (all scale-invariant weights) and the running minimum of the intrinsic
    gradient norm of the objective ``(T, m_T)``; and the largest float32 identity residual.

    Returns:
        ``{"eff_lr": {arm: [first, last]}, "min_grad_norm_sq": {arm: {"T": [...], "m": [...]}},
        "float32_sweep_max": x}``.
    """
    eff, curves = {}, {}
    for arm, a in arms.items():
        if a.get("norm") != "bn":
            continue
        steps, vals = _select(recs, arm, "scale/all/effective_lr")
        eff[arm] = [float(vals[0]), float(vals[-1])] if steps else [math.nan, math.nan]
        T, m = running_min_curve(*_select(recs, arm, "objective/grad_norm_sq"))
        curves[arm] = {"T": [int(t) for t in T], "m": [float(v) for v in m]}
    f32 = [abs(v) for r in recs if r.get("event") is None and str(r.get("arm", "")).startswith("bn/")
           for k, v in r.items() if k.endswith("/norm_identity_rel_residual") and not k.startswith("scale/all/") and math.isfinite(v)]
    return {"eff_lr": eff, "min_grad_norm_sq": curves, "float32_sweep_max": max(f32, default=math.nan)}


def _identity_maxima(identity: dict, float32_sweep_max: float) -> dict:
    """The largest residuals of the norm-identity runs (``eps0``: judged; ``eps_default``: for comparison)."""
    judged = [v["max_abs_rel_residual"] for k, v in identity.items() if "/eps0/" in k]
    default_eps = [v["max_abs_rel_residual"] for k, v in identity.items() if "/eps_default/" in k]
    return {"float64_eps0_max": max(judged, default=math.nan), "float64_eps_default_max": max(default_eps, default=math.nan),
            "float32_sweep_max": float32_sweep_max}


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
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(si_lrs=(0.1, 10.0, 1000.0), gd_steps=12, sgd_steps=12, batch_size=256, width=16, depth=2,
                       identity_lrs=(1.0, 1000.0), identity_steps=4, eval_points=3),
        "quick": Config(),
        # VGG-16 with BN on CIFAR-10. Full-batch GD and the float64 identity run use a subset: BN's
        # full-batch statistics need the whole batch in one forward pass.
        "paper": Config(data="cifar10", model="vgg", width=64, depth=16, gd_steps=2000, gd_subset=1000, sgd_steps=40000,
                        batch_size=128, identity_steps=20, identity_subset=256),
    }
    thresholds = {"tiny": Thresholds(eff_lr_min_lr=10.0, bn_min_decades=2.0)}

    # ------------------------------------------------------------------ measure

    @staticmethod
    def _make(cfg: Config, tr, norm: str) -> torch.nn.Module:
        return models.make(cfg.model, norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                           affine=cfg.affine, width=cfg.width, depth=cfg.depth, seed=cfg.seed)

    @staticmethod
    def _find_groups(cfg: Config, net: torch.nn.Module, tr) -> tuple[list[str], list[dict]]:
        """Names of the scale-invariant groups used (the per-channel invariant tensors) and all found."""
        batch = tr.subset(min(len(tr), 512)).full_batch()
        found = find_scale_invariant(net, batch, F.cross_entropy, seed=cfg.seed)
        listing = [{"name": g.param_name, "per_channel": g.per_channel, "max_violation": g.max_violation, "used": g.per_channel}
                   for g in found]
        return [g.param_name for g in found if g.per_channel], listing

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        t_start = time.perf_counter()
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        recs: list[dict] = []  # every step record written, reduced into the summary at the end

        def write(rec: dict) -> None:
            recs.append(rec)
            run.append_metrics(rec)

        # The groups depend on the architecture only (every arm starts from the same seed): find once.
        groups: dict[str, list[str]] = {}
        listings: dict[str, list[dict]] = {}
        for norm in dict.fromkeys(["bn", *cfg.norms]):
            groups[norm], listings[norm] = self._find_groups(cfg, self._make(cfg, tr, norm), tr)
        if not groups["bn"]:
            raise UserError(f"model {cfg.model!r} with BN has no per-channel scale-invariant weights")

        # -- 1. the norm identity: float64 plain GD, BN eps ~ 0 (and the default eps for comparison)
        tr64 = (tr.subset(cfg.identity_subset) if cfg.identity_subset else tr).to(dtype=torch.float64)
        identity: dict = {}
        for eps_name, eps in (("eps0", cfg.identity_bn_eps), ("eps_default", None)):
            for lr in cfg.identity_lrs:
                arm = f"identity/{eps_name}/{lr:g}"
                net = self._make(cfg, tr, "bn").to(torch.float64)
                for m in models.norm_layers(net):
                    if eps is not None:
                        m.eps = eps
                    eps_used = m.eps
                params = dict(net.named_parameters())
                si = {n: params[n] for n in groups["bn"]}
                opt = torch.optim.SGD(split_param_groups(net, scale_invariant_lr=lr, other_lr=cfg.other_lr, groups=list(si.values())), lr=lr)
                write({"arm": arm, "event": "arm", "kind": "identity", "eps": eps_used, "lr_si": lr, "dtype": "float64", "groups": list(si)})
                h = train(net, tr64, opt, steps=cfg.identity_steps, full_batch=True, probes=[ScaleInvariantStats(si)],
                          eval_data=None, eval_train=False, eval_every=cfg.identity_steps + 1, device=ctx.device, seed=cfg.seed,
                          log=lambda r, arm=arm: write({"arm": arm, **r}) if r.get("event") is None else None)
                res = [abs(r[f"scale/{g}/norm_identity_rel_residual"]) for r in h.records for g in si
                       if f"scale/{g}/norm_identity_rel_residual" in r]
                identity[arm] = {"eps": eps_used, "lr_si": lr, "max_abs_rel_residual": max(res) if res else math.nan,
                                 "diverged": h.diverged}

        # -- 2. the sweep
        final: dict = {}
        for mode in cfg.modes:
            for norm in cfg.norms:
                for lr in cfg.si_lrs:
                    arm = _arm_name(norm, mode, lr)
                    final[arm] = self._train_arm(cfg, tr, te, arm, norm, mode, lr, groups[norm], write, ctx)

        # -- 3. the summary: everything the judge reads, reduced from the records
        reduced = _series_from_records(recs, final)
        for arm, (first, last) in reduced["eff_lr"].items():
            final[arm].update(eff_lr_first=first, eff_lr_last=last)
        return {
            "groups": listings, "identity": identity,
            "norm_identity": _identity_maxima(identity, reduced["float32_sweep_max"]),
            "arms": final, "min_grad_norm_sq": reduced["min_grad_norm_sq"],
            "modes": list(cfg.modes), "norms": list(cfg.norms), "other_lr": cfg.other_lr, "batch_size": cfg.batch_size,
            "fixed_batches": cfg.fixed_batches, "identity_bn_eps": cfg.identity_bn_eps,
            "identity_lrs": list(cfg.identity_lrs), "identity_steps": cfg.identity_steps,
            "seconds": round(time.perf_counter() - t_start, 1),
        }

    def _train_arm(self, cfg: Config, tr, te, arm, norm, mode, lr, group_names, write, ctx: Context) -> dict:
        """Train one arm of the sweep, streaming its records; return its final numbers."""
        full = mode == "gd"
        steps = cfg.gd_steps if full else cfg.sgd_steps
        net = self._make(cfg, tr, norm)
        params = dict(net.named_parameters())
        si = {n: params[n] for n in group_names}
        if si:
            pg = split_param_groups(net, scale_invariant_lr=lr, other_lr=cfg.other_lr, groups=list(si.values()))
            other_lr = cfg.other_lr
        else:  # the baseline: one LR (the swept value) for every parameter
            pg = [{"params": list(net.parameters()), "lr": lr, "name": "all"}]
            other_lr = lr
        opt = torch.optim.SGD(pg, lr=lr, momentum=0.0, weight_decay=0.0)
        si_ids = {id(p) for p in si.values()}
        others = [p for p in net.parameters() if id(p) not in si_ids]
        last = steps - 1
        stats_sched = log_spaced(1, cfg.stats_per_decade)
        obj_sched = log_spaced(1, cfg.objective_per_decade)
        probes: list[Probe] = []
        if si:
            probes.append(ScaleInvariantStats(si, every=lambda s: stats_sched(s) or s == last))
        if full:
            train_set = tr.subset(cfg.gd_subset) if cfg.gd_subset else tr
            probes.append(IntrinsicGradNorm(si, others, name="objective"))  # the step's gradient is the objective's
        else:
            parts = data_mod.FixedBatches(tr, cfg.batch_size, seed=cfg.seed + 1)
            train_set = parts if cfg.fixed_batches else tr
            probes.append(IntrinsicGradNorm(si, others, name="minibatch", every=stats_sched))
            if si:
                probes.append(IntrinsicGradNorm(si, others, objective=parts.to(ctx.device).fixed(), name="objective",
                                                every=lambda s: obj_sched(s) or s == last))
        write({"arm": arm, "event": "arm", "kind": "sweep", "norm": norm, "mode": mode, "lr_si": lr, "other_lr": other_lr,
               "groups": list(si), "steps": steps, "train_size": len(train_set)})
        h = train(net, train_set, opt, steps=steps, batch_size=cfg.batch_size, full_batch=full, probes=probes,
                  eval_data=te, eval_every=max(1, steps // max(1, cfg.eval_points)), device=ctx.device, seed=cfg.seed,
                  log=lambda r: write({"arm": arm, **r}), progress=ctx.bar(f"{self.name} {arm}"))
        out = {**h.summary(), "norm": norm, "mode": mode, "lr_si": lr, "other_lr": other_lr}
        write({"arm": arm, "event": "arm_end", **out})
        return out

    # ------------------------------------------------------------------ judge

    def judge(self, summary: dict, th: Thresholds) -> list:
        arms, modes = summary["arms"], summary["modes"]
        return [self._judge_identity(summary, th), self._judge_lr_span(arms, modes, th),
                self._judge_eff_lr(arms, modes, th),
                *(self._judge_rate(claim, mode, summary, th) for claim, mode in (("gd-rate", "gd"), ("sgd-rate", "sgd"))
                  if mode in modes)]

    @staticmethod
    def _judge_identity(summary: dict, th: Thresholds):
        ni = summary["norm_identity"]
        worst = ni["float64_eps0_max"]
        ok = None if not math.isfinite(worst) else worst <= th.identity_max_residual
        return verdict("norm-identity", ok, worst,
                       f"float64 full-batch GD, BN eps={summary['identity_bn_eps']:g}, η_si in {summary['identity_lrs']}, "
                       f"{summary['identity_steps']} steps: max |relative residual| over steps and groups {worst:.1e}. "
                       f"For comparison: float64 with BN eps=1e-5 {ni['float64_eps_default_max']:.1e}; "
                       f"the float32 sweep (eps=1e-5) {ni['float32_sweep_max']:.1e}.",
                       f"max |relative residual| ≤ {th.identity_max_residual:.0e}")

    @staticmethod
    def _judge_lr_span(arms: dict, modes: list, th: Thresholds):
        spans, parts, oks = {}, [], []
        for mode in modes:
            bn, plain = _sweep(arms, mode, "bn"), _sweep(arms, mode, "none")
            best = max((_acc(a) for a in bn + plain if math.isfinite(_acc(a))), default=math.nan)
            if not (bn and plain and math.isfinite(best)):
                continue
            row: dict = {}
            for label, lst in (("bn", bn), ("none", plain)):
                span, lo, hi = decades_span([a["lr_si"] for a in lst], [_trained(a, best, th.acc_tolerance) for a in lst])
                row[label] = {"decades": span if lo is not None else None, "lo": lo, "hi": hi}
            spans[mode] = row

            def band(r: dict) -> str:
                return "no LR" if r["lo"] is None else f"{r['decades']:.0f} decades ({r['lo']:g} to {r['hi']:g})"

            bn_dec = row["bn"]["decades"] or 0.0
            pl_dec = row["none"]["decades"] if row["none"]["decades"] is not None else 0.0
            oks.append(bn_dec >= th.bn_min_decades - 1e-9 and pl_dec <= th.plain_max_decades + 1e-9)
            parts.append(f"{mode.upper()}: BN trains over {band(row['bn'])}, plain over {band(row['none'])} "
                         f"(best {best:.1%}). Final test accuracy by η: BN {_acc_list(bn)}; plain {_acc_list(plain)}")
        bn_min = min((s["bn"]["decades"] or 0.0 for s in spans.values()), default=None)
        return verdict("lr-insensitive", all(oks) if oks else None, bn_min,
                       "; ".join(parts) or "needs both nets in the sweep",
                       f"for every optimizer: BN trains (not diverged, final test accuracy within {th.acc_tolerance:.0%} "
                       f"of the optimizer's best) over ≥ {fmt(th.bn_min_decades)} decades of η_si, the plain net over "
                       f"≤ {fmt(th.plain_max_decades)}")

    @staticmethod
    def _judge_eff_lr(arms: dict, modes: list, th: Thresholds):
        parts, factors = [], []
        for mode in modes:
            by_lr = {a["lr_si"]: a for a in _sweep(arms, mode, "bn") if not a.get("diverged")}
            ends = {lr: (a.get("eff_lr_first", math.nan), a.get("eff_lr_last", math.nan)) for lr, a in by_lr.items()}
            pairs = {}
            for lr in sorted(by_lr):
                lr2 = next((x for x in by_lr if abs(math.log10(x / lr) - _PAIR_DECADES) < 1e-6), None)
                if lr2 is None:
                    continue
                e1, e2 = ends[lr][1], ends[lr2][1]
                r = e2 / e1
                pairs[f"{lr:g}-{lr2:g}"] = {"final_ratio": r, "factor": max(r, 1 / r), "judged": lr >= th.eff_lr_min_lr}
            judged = {k: v for k, v in pairs.items() if v["judged"] and math.isfinite(v["factor"])}
            big = [e for lr, (_, e) in ends.items() if lr >= th.eff_lr_min_lr and math.isfinite(e) and e > 0]
            lrs_big = [lr for lr in ends if lr >= th.eff_lr_min_lr]
            spread = math.log10(max(big) / min(big)) if len(big) > 1 else math.nan
            if judged:
                factors.append(max(v["factor"] for v in judged.values()))
                lr_dec = math.log10(max(lrs_big) / min(lrs_big))
                parts.append(f"{mode.upper()}: final ratio (start 100) of the judged pairs: "
                             + ", ".join(f"{k}: {v['final_ratio']:.3g}" for k, v in judged.items())
                             + f"; over η_si in [{min(lrs_big):g}, {max(lrs_big):g}] ({lr_dec:.0f} decades) the final effective LRs span "
                             f"{spread:.2f} decades"
                             + "; not judged: " + (", ".join(f"{k}: {v['final_ratio']:.3g}" for k, v in pairs.items() if not v["judged"]) or "none"))
        worst = max(factors) if factors else None
        return verdict("effective-lr-converges", None if worst is None else worst <= th.eff_lr_max_factor, worst,
                       ("; ".join(parts) or "no judged pair of rates 100x apart in the sweep")
                       + (f". Worst factor {worst:.3g}." if worst is not None else "."),
                       f"every pair of BN runs with η_si 100x apart, the smaller ≥ {fmt(th.eff_lr_min_lr)}, ends with "
                       f"effective LRs within a factor {fmt(th.eff_lr_max_factor)} of each other")

    @staticmethod
    def _judge_rate(claim: str, mode: str, summary: dict, th: Thresholds):
        theory = _THEORY_SLOPE[mode]
        rule = (f"median fitted slope of log10 min_(t<T) ‖∇̃L‖² on log10 T over the last {fmt(th.rate_fit_decades)} "
                f"decade(s) of T ≤ {theory + th.rate_tolerance:+.2f} (the bound {theory:+.1f} + {fmt(th.rate_tolerance)})")
        curves = summary["min_grad_norm_sq"]
        fits = []
        for a in _sweep(summary["arms"], mode, "bn"):
            c = curves.get(a["arm"], {"T": [], "m": []})
            fits.append({"lr_si": a["lr_si"], **fit_rate(c["T"], c["m"], th.rate_fit_decades), "diverged": bool(a.get("diverged"))})
        usable = [f for f in fits if math.isfinite(f["slope"]) and not f["diverged"]]
        if not usable:
            return verdict(claim, None, None, f"no {mode.upper()} run of the BN net could be fitted", rule)
        med = float(np.median([f["slope"] for f in usable]))
        per = ", ".join(f"η_si {f['lr_si']:g}: {f['slope']:+.2f} (R² {f['r2']:.2f})" for f in usable)
        win = usable[0]
        what = ("the full-batch loss, every step" if mode == "gd" else
                f"the objective Σ_k |B_k|/N L_B_k over a fixed partition into batches of {summary['batch_size']}, at log-spaced steps"
                + ("" if summary["fixed_batches"] else " (SGD itself reshuffles, so this is a proxy of its objective)"))
        return verdict(claim, med <= theory + th.rate_tolerance, med,
                       f"fitted slope of log10 min_(t<T) ‖∇̃L‖² (intrinsic gradient of {what}) on log10 T over T in "
                       f"[{win['t_lo']:.0f}, {win['t_hi']:.0f}]: median {med:+.2f}, against the theorem's bound {theory:+.1f} "
                       f"(an upper bound: a steeper decay is consistent with it); per run: {per}", rule)

    # ------------------------------------------------------------------ figures

    def _applied_thresholds(self, run: RunDir, profile: str) -> Thresholds:
        """The thresholds the run was judged with (``verdicts.json``), else the registered ones."""
        try:
            return from_dict(Thresholds, run.read_json("verdicts.json")["thresholds"])
        except (OSError, KeyError, TypeError, ValueError):
            return self.registered_thresholds(profile)

    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        summary = run.read_json("summary.json")
        th = self._applied_thresholds(run, cfg.get("profile", "quick"))
        recs = run.metrics()
        arms = summary["arms"]
        paths = []
        for mode in cfg["modes"]:
            paths.append(_fig_learning_curves(cfg, recs, arms, mode, run.figure_path(f"learning_curves_{mode}.png")))
        paths.append(_fig_norm_efflr(cfg, recs, arms, run.figure_path("weight_norm_effective_lr.png")))
        paths.append(_fig_rate(cfg, summary, th, run.figure_path("grad_norm_rate.png")))
        paths.append(_fig_acc_vs_lr(cfg, arms, run.figure_path("accuracy_vs_lr.png")))
        paths.append(_fig_identity(summary["identity"], recs, th, run.figure_path("norm_identity.png")))
        return paths


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


def _fig_rate(cfg, summary, th: Thresholds, path):
    import matplotlib.pyplot as plt

    colors = _lr_colors(cfg["si_lrs"])
    modes = cfg["modes"]
    curves = summary["min_grad_norm_sq"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), squeeze=False)
        for col, mode in enumerate(modes):
            ax = axes[0, col]
            slopes = []
            anchor = None
            for a in _sweep(summary["arms"], mode, "bn"):
                lr = a["lr_si"]
                c = curves.get(a["arm"], {"T": [], "m": []})
                T, m = np.asarray(c["T"], float), np.asarray(c["m"], float)
                if not len(T):
                    continue
                f = fit_rate(T, m, th.rate_fit_decades)
                lab = f"η_si={lr:g}: slope {f['slope']:+.2f}" if math.isfinite(f["slope"]) else f"η_si={lr:g}"
                ax.plot(T, m, color=colors[lr], label=lab, drawstyle="steps-post" if mode == "gd" else "default",
                        marker=None if mode == "gd" else ".", ms=3)
                if math.isfinite(f["slope"]):
                    slopes.append(f["slope"])
                    tt = np.array([f["t_lo"], f["t_hi"]])
                    ax.plot(tt, 10 ** (f["intercept"]) * tt ** f["slope"], color="k", lw=0.8, ls="--")
                    if anchor is None or lr == 1.0:
                        anchor = (f["t_lo"], 10 ** f["intercept"] * f["t_lo"] ** f["slope"], f["t_hi"])
            bound = _THEORY_SLOPE[mode]
            if anchor is not None:
                t0, y0, t1 = anchor
                tt = np.array([t0, t1])
                ax.plot(tt, y0 * 3 * (tt / t0) ** bound, color="grey", lw=2, alpha=0.6, label=f"theory bound: slope {bound:+.1f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("T (steps)")
            what = "full-batch" if mode == "gd" else "objective (fixed batches)"
            ax.set_ylabel(f"min_(t<T) ‖∇̃L‖², {what}")
            med = f", median fitted slope {np.median(slopes):+.2f}" if slopes else ""
            ax.set_title(f"BN net, {_MODE_LABEL[mode]}{med}\n(dashed: fit over the last {th.rate_fit_decades:g} decade(s))", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return save(fig, path)


def _fig_acc_vs_lr(cfg, arms, path):
    import matplotlib.pyplot as plt

    modes = cfg["modes"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.8), squeeze=False, sharey=True)
        for col, mode in enumerate(modes):
            series = []
            for norm, ls in (("bn", "-"), ("none", "--")):
                lst = _sweep(arms, mode, norm)
                if lst:
                    series.append({
                        "label": f"BN (η_si; other LR {cfg['other_lr']:g})" if norm == "bn" else "no norm (one LR for all)",
                        "lrs": [a["lr_si"] for a in lst], "acc": [_acc(a) for a in lst],
                        "diverged": [bool(a.get("diverged")) for a in lst], "norm": norm, "linestyle": ls,
                    })
            accuracy_vs_lr(axes[0, col], series, chance=0.1, xlabel="learning rate η (swept)", title=_MODE_LABEL[mode])
        for ax in axes[0, 1:]:
            ax.set_ylabel("")
        fig.suptitle(f"Final accuracy against the learning rate ({cfg['model']} on {cfg['data']})")
        fig.tight_layout()
        return save(fig, path)


def _fig_identity(identity: dict, recs, th: Thresholds, path):
    import matplotlib.pyplot as plt

    lrs = sorted({a["lr_si"] for a in identity.values()})
    colors = _lr_colors(lrs) if lrs else {}
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for arm, a in sorted(identity.items(), key=lambda kv: (kv[1]["eps"], kv[1]["lr_si"])):
            s, v = _select(recs, arm, "scale/all/norm_identity_rel_residual")
            v = np.maximum(np.abs(np.asarray(v, float)), 1e-20)
            small = a["eps"] < 1e-10
            ax.plot(np.asarray(s), v, color=colors[a["lr_si"]], ls="-" if small else "--", marker="o" if small else None, ms=2.5,
                    label=f"η_si={a['lr_si']:g}, BN eps={a['eps']:g}")
        ax.axhline(th.identity_max_residual, color="k", lw=1, ls=":", label=f"threshold {th.identity_max_residual:.0e}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|‖w_{t+1}‖² − ‖w_t‖² − η²‖g_t‖²| / ‖w_t‖²")
        ax.set_title("Norm identity, float64 full-batch GD (all scale-invariant weights)", fontsize=9)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        fig.tight_layout()
        return save(fig, path)
