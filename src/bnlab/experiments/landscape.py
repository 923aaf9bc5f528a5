"""``landscape``: with BatchNorm (and with ℓp normalization) the loss landscape along the gradient is smoother.

Santurkar, Tsipras, Ilyas, Madry, *How Does Batch Normalization Help Optimization?* (NeurIPS 2018),
section 3.1, figure 4 (CLAIMS.md S2, S3, S4), and section 3.3, ℓp normalization (S12).

**Arms.** The same convnet (for one seed: the same initial weights and batch order) trained with
SGD + momentum at the learning rate ``lr``, without normalization (``none``) and with each
normalization of ``norms``: BatchNorm (``bn``) and the ℓ1, ℓ2, ℓ∞ versions of BatchNorm (``l1``,
``l2``, ``linf``, :mod:`bnlab.models.lp_norm`: the standard deviation replaced by the average ℓp
norm of the centred batch activations of each channel; ``l2`` is BatchNorm in train mode). Every
arm is repeated for ``seeds`` seeds ``seed, seed+1, ...``, each setting the initialization and the
batch order (the train/test split is that of ``seed``). With ``large_lr`` set (the ``paper``
profile), the first seed also trains ``bn`` (probed) and ``none`` (learning curve only) at that
rate, for the figures.

**Measurements** every ``probe_every`` steps of every arm in the early and late windows (below) and
every ``mid_probe_every`` steps between them (:func:`probe_steps`), on the step's batch ``B`` along
the step's gradient ``g`` (:class:`bnlab.probes.LandscapeProbe`, step sizes ``s``: ``k`` points up
to ``max_lr_multiple · lr``)::

    loss band      [min_s, max_s] L_B(w_t - s g)             (including s = 0)   -> its width
    gradient band  [min_s, max_s] ‖∇L_B(w_t) - ∇L_B(w_t - s g)‖₂                -> its top
    β_eff          max_s ‖∇L_B(w_t) - ∇L_B(w_t - s g)‖₂ / ‖s g‖₂               -> η·β_eff

**η·β_eff (S4, scale-free).** β_eff has units of 1/‖w‖²: rescaling the weights of a scale-invariant
group by ``c`` (what BN's weights do by themselves as they grow) divides β_eff by ``c²`` and leaves
the function unchanged, and the learning rate that trains the rescaled net the same way is ``c²η``
(seed 001). ``η·β_eff`` (the learning rate the arm trains with times β_eff: the change of the
gradient over one training step, relative to the gradient) is unchanged by that reparameterization
with its learning rate, so it compares nets of different parameterizations. All arms here train at
the same ``η``, so the ratio of η·β_eff equals the ratio of the raw β_eff; the two differ when
arms at different learning rates are compared.

For the first seed of ``none`` and ``bn``, every ``hessian_every`` steps, also ``gᵀHg/‖g‖²``
(:class:`bnlab.probes.HessianQuadForm`) and the top Hessian eigenvalue by Lanczos
(:class:`bnlab.probes.TopHessianEigenvalue`, ``lanczos_iter`` HVPs at most): shown, not judged.

**Summary.** For each normalization ``n``, each quantity ``Q`` and each seed: the per-probe ratio
``Q(none) / Q(n)`` at the same step, its median over the *early* window (the first ``window``
fraction of the steps) and over the *late* window (the last ``window`` fraction), with both arms'
medians and the probe counts (:func:`bnlab.analysis.window_ratio`); per arm the final test
accuracy and whether it diverged.

**Claims** (rules fixed before the quick run; numbers in :class:`Thresholds`). Over the seeds where
neither net diverged and both windows hold at least ``min_probes`` probes (at least ``min_seeds``
of them, else inconclusive), the means over seeds of the early and late window ratios:

* ``loss-band-smaller`` (S2), ``gradient-band-smaller`` (S3): smaller with BN, especially early.
  Holds if early ≥ ``ratio_min`` (2), late ≥ ``late_ratio_min`` (1) and early > ``early_over_late``
  (1) × late; fails if early < ``fail_ratio`` (1) (not smaller where the paper finds the largest
  effect) or early ≤ ``early_over_late`` × late (not *especially* early); inconclusive otherwise.
* ``beta-smaller`` (S4): η·β_eff smaller with BN. Holds if early ≥ ``ratio_min`` and late ≥
  ``late_ratio_min``; fails if early < ``fail_ratio``; inconclusive otherwise.
* ``l1-…``, ``l2-…``, ``linf-…`` (S12): the same three rules for the ℓp nets against the plain
  net ("they smooth the landscape like BN").
* ``lp-trains-like-bn`` (S12): holds if every ℓp net's mean final test accuracy is at least BN's
  minus ``acc_tol``; fails otherwise; inconclusive if BN itself did not train (mean below
  ``trained_min_acc``, or a diverged seed).

**Setting and why.** Quick: ``convnet`` (3 conv stages of width 16, 32, 64, a linear classifier) on
MNIST-1D (4000 training sequences), ``lr = 0.05``, momentum 0.9, batch 128, 250 steps (8 epochs;
the windows are steps 0-62 and 188-249), 3 seeds, probes every 12 steps in the windows with 4 step
sizes (every 60 between them). The 8x8 digits are fitted to zero loss within ~100 steps, which
leaves nothing to compare late in training; 5 nets x 3 seeds of 250 steps fit the quick budget
(45 CPU seconds). Paper: VGG-11 on CIFAR-10 (``paper`` profile, for a GPU), with BN also at
``large_lr = 0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np

from .. import data as data_mod
from ..analysis import series, window_ratio
from ..models import check_norm
from ..models.lp_norm import LP_NORMS
from ..plotting import NORM_COLORS, STYLE, color_for, learning_curves, save
from ..probes import HessianQuadForm, LandscapeProbe, TopHessianEigenvalue
from ..runs import RunDir
from .base import Claim, Context, Experiment, fmt, register_experiment, seed_spread, verdict
from .common import SGDConfig, arm_records, make_net, train_arm

__all__ = ["Landscape", "Config", "Thresholds", "QUANTITIES", "CLAIM_KEYS", "arm_name", "seed_list", "probe_steps", "quantity",
           "ratio_verdict", "window_ratios", "curvature_ratios"]

SOURCE = "Santurkar et al. 2018"
LP = tuple(LP_NORMS)  # ("l1", "l2", "linf")
_LABEL = {"none": "no norm", "bn": "BN", "l1": "ℓ1 BN", "l2": "ℓ2 BN", "linf": "ℓ∞ BN"}
_COLOR = {"none": "#d62728", "bn": "#1f77b4", "l1": "#8c564b", "l2": "#e377c2", "linf": "#17becf"}


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``landscape`` trains and measures (hashed: names the run)."""

    data: str = "mnist1d"
    """Dataset (``bnlab list``)."""
    seed: int = 0
    """Seed of the train/test split and the first of the arms' seeds (``seeds``)."""
    lr: float = 0.05
    """The learning rate of every compared arm."""
    norms: tuple[str, ...] = ("bn", "l1", "l2", "linf")
    """The normalizations each compared with the plain net (``none``); the claims judge ``bn``, ``l1``, ``l2``, ``linf``."""
    seeds: int = 3
    """Seeds per arm: ``seed, seed+1, ...`` set the initialization and the batch order (the split stays that of ``seed``)."""
    large_lr: Optional[float] = None
    """If set, the first seed also trains BN (probed) and the plain net at this rate, for the figures (not judged)."""
    steps: int = 250
    """Optimizer steps per arm."""
    probe_every: int = 12
    """Steps between two landscape probes (loss band, gradient band, β_eff) in the early and late windows."""
    mid_probe_every: int = 60
    """Steps between two landscape probes between the windows (for the figures only; 0: none there)."""
    k: int = 4
    """Step sizes per landscape probe (evenly spaced up to ``max_lr_multiple`` × the arm's lr)."""
    max_lr_multiple: float = 4.0
    """The largest step size probed, in multiples of the arm's learning rate."""
    vectorize: bool = True
    """Evaluate the ``k`` step sizes in one ``vmap`` call (``False``: a loop; same numbers up to rounding)."""
    hessian_every: int = 100
    """Steps between two curvature probes (gᵀHg/‖g‖² and λ_max) of the first seed's plain and BN nets; 0: none."""
    lanczos_iter: int = 20
    """Hessian-vector products of the Lanczos estimate of λ_max, at most."""
    window: float = 0.25
    """Fraction of the steps in the early window (the first) and in the late window (the last)."""
    eval_every: int = 125
    """Steps between two test-set evaluations (one more at the end)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.seeds, int) and self.seeds >= 1):
            raise ValueError(f"landscape: seeds must be a positive integer, got {self.seeds!r}")
        if not self.norms or "none" in self.norms or len(set(self.norms)) != len(self.norms):
            raise ValueError(f"landscape: norms must be distinct normalizations other than 'none', got {list(self.norms)}")
        for n in self.norms:
            check_norm(n)
        if not 0 < self.window <= 0.5:
            raise ValueError(f"landscape: window must be in (0, 0.5], got {self.window!r}")
        for key in ("steps", "probe_every", "k", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"landscape: {key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("hessian_every", "mid_probe_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"landscape: {key} must be >= 0, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``landscape``'s decision rules (the same for every normalization)."""

    ratio_min: float = 2.0
    """"Smaller with the norm" needs the early-window ratio plain / normalized at least this: the paper's
    curves differ several-fold early on; 2 asks for a factor, not a difference of a few seeds' noise."""
    late_ratio_min: float = 1.0
    """Holds also needs the late-window ratio at least this: not larger with the norm late in training."""
    fail_ratio: float = 1.0
    """Fails when the early-window ratio is below this: not smaller with the norm where the paper finds the largest effect."""
    early_over_late: float = 1.0
    """"Especially early" (S2, S3): the early ratio must exceed this times the late ratio, else fails; 1 is
    the claim as stated (early ratio > late ratio)."""
    min_seeds: int = 3
    """Precondition: at least this many seeds where neither net diverged and each window has min_probes
    probes (CLAIMS.md: ≥ 3 seeds where curves are compared)."""
    min_probes: int = 3
    """Precondition per seed: probes in each window, so that a window median is not one noisy probe."""
    acc_tol: float = 0.02
    """ℓp nets "train like BN": mean test accuracy at least BN's minus this (2 points, ~3 standard errors
    of a difference of two 3-seed means on 1000 test examples at ~93%)."""
    trained_min_acc: float = 0.5
    """Precondition of lp-trains-like-bn: BN's mean test accuracy at least this (it trained; chance is 10%)."""


#: quantity key -> (description, "especially early" judged)
QUANTITIES = {
    "loss_band": ("loss-band width max_s L(w - s g) - min_s L(w - s g)", True),
    "grad_band": ("top of the gradient-change band max_s ‖∇L(w) - ∇L(w - s g)‖₂", True),
    "eta_beta": ("η·β_eff, β_eff = max_s ‖∇L(w) - ∇L(w - s g)‖₂ / ‖s g‖₂ (scale-free)", False),
}
_CLAIM_STEM = {"loss_band": "loss-band-smaller", "grad_band": "gradient-band-smaller", "eta_beta": "beta-smaller"}
_REF = {"loss_band": "S2", "grad_band": "S3", "eta_beta": "S4"}

#: claim id -> (normalization, quantity key), in the claims' order
CLAIM_KEYS: dict[str, tuple[str, str]] = {
    **{_CLAIM_STEM[q]: ("bn", q) for q in QUANTITIES},
    **{f"{n}-{_CLAIM_STEM[q]}": (n, q) for n in LP for q in QUANTITIES},
}

#: the curvature series whose window ratios none / BN (first seed) are in the summary (not judged)
CURVATURES = ("hess_quad/gHg", "hess_top/lambda_max")


def seed_list(cfg) -> list[int]:
    """The seeds of the arms: ``seed, seed+1, ..., seed+seeds-1`` (``cfg`` a Config or its dict)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return [int(get("seed")) + i for i in range(int(get("seeds")))]


def probe_steps(cfg) -> list[int]:
    """The steps of the landscape probes: every ``probe_every`` steps in the early window ``[0, window·steps)``
    and the late window ``[(1 - window)·steps, steps)``, every ``mid_probe_every`` steps between them
    (``cfg`` a Config or its dict).

    Example:
        >>> probe_steps(Config(steps=400, window=0.25, probe_every=20, mid_probe_every=100))[:7]
        [0, 20, 40, 60, 80, 100, 200]
    """
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    T, w, every, mid = int(get("steps")), float(get("window")), int(get("probe_every")), int(get("mid_probe_every"))
    windows = {t for t in range(0, T, every) if t < w * T or t >= (1 - w) * T}
    return sorted(windows | (set(range(0, T, mid)) if mid else set()))


def _in(steps: frozenset, step: int) -> bool:
    return step in steps


def arm_name(norm: str, seed: int, lr_key: str = "lr") -> str:
    """The arm's name in the records: ``"bn@lr/s0"``."""
    return f"{norm}@{lr_key}/s{seed}"


def quantity(recs: list[dict], name: str, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """One landscape quantity of an arm against step: ``loss_band`` (width), ``grad_band`` (top), ``eta_beta`` (lr × β_eff), or ``beta``."""
    if name == "loss_band":
        s, lo = series(recs, "landscape/loss_min")
        _, hi = series(recs, "landscape/loss_max")
        return s, hi - lo
    if name == "grad_band":
        return series(recs, "landscape/grad_diff_max")
    if name == "eta_beta":
        s, b = series(recs, "landscape/beta")
        return s, lr * b
    return series(recs, "landscape/" + name)


def ratio_verdict(early: float, late: float, ratio_min: float, late_ratio_min: float = 1.0, fail_ratio: float = 1.0,
                  early_over_late: Optional[float] = None) -> Optional[bool]:
    """``True`` (holds), ``False`` (fails) or ``None`` (inconclusive) by the rule of the module docstring.

    ``early_over_late`` given: the "especially early" part (early > early_over_late × late) is
    required to hold and its failure fails.

    Example:
        >>> ratio_verdict(3.0, 1.2, 2.0), ratio_verdict(0.9, 5.0, 2.0), ratio_verdict(1.5, 1.2, 2.0)
        (True, False, None)
        >>> ratio_verdict(3.0, 3.5, 2.0, early_over_late=1.0)  # smaller with BN, but not especially early
        False
    """
    if not (math.isfinite(early) and math.isfinite(late)):
        return None
    if early < fail_ratio:
        return False
    if early_over_late is not None and not early > early_over_late * late:
        return False
    if early >= ratio_min and late >= late_ratio_min:
        return True
    return None


def _mean(values) -> float:
    v = [float(x) for x in values]
    return sum(v) / len(v) if v else math.nan


def _ok(x) -> bool:
    return x is not None and math.isfinite(float(x))


@register_experiment
class Landscape(Experiment):
    name = "landscape"
    title = "Loss landscape along the gradient: loss band, gradient predictiveness and β-smoothness with and without BN (and ℓp BN)"
    source = SOURCE
    description = (
        "The same convnet without normalization, with BatchNorm and with ℓ1, ℓ2, ℓ∞ versions of BatchNorm, at one learning "
        "rate, over several seeds. Every few steps, along the step's gradient on its batch: the range of the loss, the "
        "range of the gradient change and the effective β-smoothness (scale-free: times the learning rate); early and late "
        "in training, their ratios plain / normalized. For the first seed, also gᵀHg/‖g‖² and the top Hessian eigenvalue."
    )
    claims = tuple(
        Claim(cid, statement, SOURCE, metric, rule, ref)
        for cid, statement, metric, rule, ref in (
            [(_CLAIM_STEM[q], {
                "loss_band": "With BatchNorm the loss varies less along the gradient (a narrower loss band), especially early in training.",
                "grad_band": "With BatchNorm the gradient changes less along the gradient (more predictive gradients), especially early in training.",
                "eta_beta": "With BatchNorm the effective β-smoothness is smaller, compared scale-free (η·β_eff).",
            }[q], f"mean over seeds of the per-seed early / late window median of {QUANTITIES[q][0]}(plain) / (BN)",
              ("holds if early ≥ ratio_min, late ≥ late_ratio_min and early > early_over_late × late; fails if early < fail_ratio "
               "or not early > early_over_late × late; else inconclusive") if QUANTITIES[q][1] else
              "holds if early ≥ ratio_min and late ≥ late_ratio_min; fails if early < fail_ratio; else inconclusive", _REF[q])
             for q in QUANTITIES]
            + [(f"{n}-{_CLAIM_STEM[q]}",
                f"With {_LABEL[n]} (§3.3) the {dict(loss_band='loss band', grad_band='gradient-change band', eta_beta='η·β_eff')[q]} "
                "is smaller than without normalization, as with BatchNorm.",
                f"as {_CLAIM_STEM[q]}, with the {_LABEL[n]} net in place of BN", f"the rule of {_CLAIM_STEM[q]}", "S12")
               for n in LP for q in QUANTITIES]
            + [("lp-trains-like-bn", "The ℓ1, ℓ2 and ℓ∞ versions of BatchNorm train about as well as BatchNorm (§3.3).",
                "mean over seeds of the final test accuracy of each ℓp net minus BN's",
                "holds if every ℓp net is ≥ BN − acc_tol; fails otherwise; inconclusive if BN did not train", "S12")]
        )
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(data="digits", width=4, seeds=2, steps=24, probe_every=6, mid_probe_every=12, hessian_every=12,
                       lanczos_iter=4, k=4, eval_every=24),
        "quick": Config(),
        "paper": Config(data="cifar10", model="vgg", width=64, depth=11, lr=0.1, large_lr=0.5, steps=15000, k=8,
                        probe_every=100, mid_probe_every=500, hessian_every=500, lanczos_iter=50, eval_every=500),
    }
    thresholds = {"tiny": Thresholds(min_seeds=2, min_probes=1)}
    #: a smoke run (:func:`bnlab.paper.smoke_config`): one seed of each net
    smoke_cuts = {"seeds": lambda v: 1}

    # ------------------------------------------------------------------ measure
    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        seeds = seed_list(cfg)
        final: dict = {}

        def one(norm: str, seed: int, lr_key: str, probed: bool, curvature: bool) -> None:
            probes = []
            if probed:
                probes.append(LandscapeProbe(every=partial(_in, frozenset(probe_steps(cfg))), k=cfg.k,
                                             max_lr_multiple=cfg.max_lr_multiple, vectorize=cfg.vectorize))
            if curvature and cfg.hessian_every:
                probes += [HessianQuadForm(every=cfg.hessian_every), TopHessianEigenvalue(every=cfg.hessian_every, max_iter=cfg.lanczos_iter)]
            lr = getattr(cfg, lr_key)
            arm = arm_name(norm, seed, lr_key)
            final[arm] = train_arm(cfg, run, ctx, self.name, arm, make_net(cfg, norm, tr, seed=seed), lr, tr, te, probes,
                                   {"norm": norm, "lr": lr, "seed": seed, "probed": probed}, seed=seed,
                                   eval_every=cfg.eval_every, eval_train=False)

        for seed in seeds:
            for norm in ("none",) + tuple(cfg.norms):
                one(norm, seed, "lr", True, seed == seeds[0] and norm in ("none", "bn"))
        if cfg.large_lr is not None:
            one("bn", seeds[0], "large_lr", True, False)
            one("none", seeds[0], "large_lr", False, False)
        recs = run.metrics()
        return {"lr": cfg.lr, "steps": cfg.steps, "window": cfg.window, "seeds": seeds, "norms": list(cfg.norms),
                "arms": final, "ratios": window_ratios(recs, cfg.steps, cfg.window, seeds, cfg.norms, cfg.lr),
                "curvature": curvature_ratios(recs, cfg.steps, cfg.window, seeds[0]),
                "diverged": {n: [bool(final[arm_name(n, s)]["diverged"]) for s in seeds] for n in ("none",) + tuple(cfg.norms)},
                "test_acc": {n: [final[arm_name(n, s)].get("test_acc") for s in seeds] for n in ("none",) + tuple(cfg.norms)}}

    # ------------------------------------------------------------------ judge
    def judge(self, summary: dict, th: Thresholds) -> list:
        if "seeds" not in summary:  # a run of the single-seed version of this experiment
            return [verdict(c.id, None, math.nan, "the stored summary predates the per-seed ratios; run the experiment again",
                            c.threshold) for c in self.claims]
        out = [self._smoothing(cid, norm, q, summary, th) for cid, (norm, q) in CLAIM_KEYS.items()]
        out.append(self._trains_like_bn(summary, th))
        return out

    @staticmethod
    def _smoothing(cid: str, norm: str, q: str, summary: dict, th: Thresholds):
        desc, early_judged = QUANTITIES[q]
        T, w = summary["steps"], summary["window"]
        label = _LABEL.get(norm, norm)
        eol = th.early_over_late if early_judged else None
        rule = (f"per seed, the median over the early window (steps < {fmt(w * T)}) and over the late window "
                f"(steps ≥ {fmt((1 - w) * T)}) of the per-probe ratio plain / {label}; their means over the ≥ {th.min_seeds} "
                f"seeds where neither net diverged and each window has ≥ {th.min_probes} probes: holds if early ≥ "
                f"{fmt(th.ratio_min)} and late ≥ {fmt(th.late_ratio_min)}"
                + (f" and early > {fmt(eol)} × late" if early_judged else "")
                + f"; fails if early < {fmt(th.fail_ratio)}"
                + (f" or early ≤ {fmt(eol)} × late" if early_judged else "")
                + "; otherwise (or with fewer usable seeds) inconclusive")
        r = summary["ratios"].get(norm, {}).get(q)
        if r is None:
            return verdict(cid, None, math.nan, f"no {label} arm in this run", rule)
        seeds = summary["seeds"]
        div = summary["diverged"]
        usable, why = [], []
        for i, s in enumerate(seeds):
            if div["none"][i] or div[norm][i]:
                why.append(f"seed {s}: {'the plain net' if div['none'][i] else label} diverged")
            elif min(r["early_n"][i], r["late_n"][i]) < th.min_probes:
                why.append(f"seed {s}: {r['early_n'][i]} / {r['late_n'][i]} probes in the early / late window")
            elif not (_ok(r["early"][i]) and _ok(r["late"][i])):
                why.append(f"seed {s}: no finite ratio")
            else:
                usable.append(i)
        if len(usable) < th.min_seeds:
            return verdict(cid, None, math.nan, f"{len(usable)} usable seed(s) of {len(seeds)}, fewer than {th.min_seeds}: " + "; ".join(why), rule)
        e = [r["early"][i] for i in usable]
        lt = [r["late"][i] for i in usable]
        early, late = _mean(e), _mean(lt)
        ok = ratio_verdict(early, late, th.ratio_min, th.late_ratio_min, th.fail_ratio, eol)
        per = lambda xs: "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"  # noqa: E731
        detail = (f"{desc} at lr {summary['lr']:g}, plain / {label}: early {early:.3g}x (seeds {per(e)}), late {late:.3g}x "
                  f"(seeds {per(lt)}); early / late {early / late:.3g}; window medians, mean over seeds: early plain "
                  f"{_mean(r['early_plain'][i] for i in usable):.3g} vs {_mean(r['early_norm'][i] for i in usable):.3g}, late plain "
                  f"{_mean(r['late_plain'][i] for i in usable):.3g} vs {_mean(r['late_norm'][i] for i in usable):.3g}; "
                  f"{min(r['early_n'][i] for i in usable)}+ probes per seed and window")
        if q == "eta_beta":
            detail += f"; every arm trains at lr {summary['lr']:g}, so this ratio is also that of the raw β_eff"
        if why:
            detail += "; left out: " + "; ".join(why)
        return verdict(cid, ok, early, detail, rule, spread=seed_spread(e, unit="x"))

    @staticmethod
    def _trains_like_bn(summary: dict, th: Thresholds):
        cid = "lp-trains-like-bn"
        rule = (f"mean final test accuracy over the seeds of each of ℓ1, ℓ2, ℓ∞ BN ≥ BN's − {fmt(th.acc_tol * 100)} points "
                f"(a diverged seed counts as accuracy 0): holds if all are, fails otherwise; inconclusive if BN's mean < "
                f"{fmt(th.trained_min_acc * 100)}% or a BN seed diverged")
        acc, div = summary["test_acc"], summary["diverged"]
        lps = [n for n in LP if n in acc]
        if "bn" not in acc or not lps:
            return verdict(cid, None, math.nan, "no BN or no ℓp arm in this run", rule)

        def accs(n):
            return [0.0 if (d or not _ok(a)) else float(a) for a, d in zip(acc[n], div[n])]

        bn = accs("bn")
        if any(div["bn"]) or _mean(bn) < th.trained_min_acc:
            return verdict(cid, None, math.nan, f"BN did not train: mean test accuracy {_mean(bn):.1%}"
                           + (", a seed diverged" if any(div["bn"]) else ""), rule)
        diffs = {n: [a - b for a, b in zip(accs(n), bn)] for n in lps}
        gaps = {n: _mean(d) for n, d in diffs.items()}
        worst = min(gaps, key=gaps.get)
        ok = all(g >= -th.acc_tol for g in gaps.values())
        detail = f"mean final test accuracy: BN {_mean(bn):.1%}; " + ", ".join(
            f"{_LABEL[n]} {_mean(accs(n)):.1%} ({gaps[n] * 100:+.2g} points" + (", diverged" if any(div[n]) else "") + ")" for n in lps)
        if "none" in acc:
            detail += f"; plain net {_mean(accs('none')):.1%}"
        return verdict(cid, ok, gaps[worst], detail, rule, spread=f"{_LABEL[worst]} − BN: " + seed_spread(diffs[worst], unit="%", scale=100))

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        recs = run.metrics()
        seeds = seed_list(cfg)
        norms = ["none"] + [n for n in cfg["norms"]]
        paths = [
            _landscape_figure(cfg, recs, seeds, norms, "loss_band", ("landscape/loss_min", "landscape/loss_max"),
                              "loss L_B(w - s g)", "loss-band width", "Loss landscape along the gradient",
                              run.figure_path("loss_landscape.png")),
            _landscape_figure(cfg, recs, seeds, norms, "grad_band", ("landscape/grad_diff_min", "landscape/grad_diff_max"),
                              "‖∇L_B(w) - ∇L_B(w - s g)‖₂", "top of the band", "Gradient predictiveness along the gradient",
                              run.figure_path("gradient_predictiveness.png")),
            _landscape_figure(cfg, recs, seeds, norms, "eta_beta", None, None, "η·β_eff",
                              "Effective β-smoothness, scale-free: η · max_s ‖∇L(w) - ∇L(w - s g)‖ / ‖s g‖",
                              run.figure_path("beta_smoothness.png")),
            _curvature_figure(cfg, recs, seeds[0], run.figure_path("curvature.png")),
            _ratios_figure(cfg, window_ratios(recs, cfg["steps"], cfg["window"], seeds, cfg["norms"], cfg["lr"]),
                           run.figure_path("window_ratios.png")),
        ]
        arms = []
        # plotting.learning_curves colours a norm it has no colour for by its position (C0, C1, ...): keep
        # the ℓp nets off positions 0 and 3 (C0 and C3 are BN's and the plain net's colours)
        others = [n for n in norms if n not in ("bn", "none")]
        order = [n for n in ["bn"] + others[:2] + ["none"] + others[2:] if n in norms]
        keys = [(n, "lr") for n in order] + ([("bn", "large_lr"), ("none", "large_lr")] if cfg.get("large_lr") is not None else [])
        for norm, lr_key in keys:
            arm = arm_name(norm, seeds[0], lr_key)
            steps = arm_records(recs, arm)
            if not steps:
                continue
            evals = [r for r in recs if r.get("arm") == arm and r.get("event") == "eval"]
            end = next((r for r in recs if r.get("arm") == arm and r.get("event") == "arm_end"), {})
            arms.append({"label": f"{_LABEL.get(norm, norm)}, lr {cfg[lr_key]:g}", "norm": norm,
                         "linestyle": "--" if lr_key != "lr" or norm == "l2" else "-",  # ℓ2 BN is BN in train mode: dashed over it
                         "steps": [r["step"] for r in steps if "loss" in r], "loss": [r["loss"] for r in steps if "loss" in r],
                         "eval_steps": [r["step"] for r in evals], "test_acc": [r.get("test_acc", math.nan) for r in evals],
                         "diverged_at": end.get("diverged_at")})
        paths.append(learning_curves(arms, run.figure_path("learning_curves.png"),
                                     title=f"{cfg['model']} on {cfg['data']}, SGD momentum {cfg['momentum']} (seed {seeds[0]})"))
        return paths


def window_ratios(recs: list[dict], steps: int, window: float, seeds: list[int], norms, lr: float) -> dict:
    """The summary's ``ratios``: ``{norm: {quantity: per-seed lists}}`` of the window ratios plain / ``norm``.

    For each normalization of ``norms``, each quantity of :data:`QUANTITIES` and each seed (in
    the order of ``seeds``): ``early`` and ``late`` (the median over the window of the per-probe
    ratio, :func:`bnlab.analysis.window_ratio`), both arms' window medians (``early_plain``,
    ``early_norm``, ``late_plain``, ``late_norm``) and the probe counts (``early_n``, ``late_n``),
    the early window being steps ``[0, window·steps)`` and the late one ``[(1 - window)·steps, ∞)``.
    """
    T, w = steps, window
    out: dict = {}
    for norm in norms:
        out[norm] = {}
        for q in QUANTITIES:
            cols: dict = {k: [] for k in ("early", "late", "early_plain", "early_norm", "late_plain", "late_norm", "early_n", "late_n")}
            for s in seeds:
                sp, vp = quantity(arm_records(recs, arm_name("none", s)), q, lr)
                sn, vn = quantity(arm_records(recs, arm_name(norm, s)), q, lr)
                for key, (lo, hi) in (("early", (0, w * T)), ("late", ((1 - w) * T, math.inf))):
                    ratio, a, b, n = window_ratio(sp, vp, sn, vn, lo, hi)
                    cols[key].append(ratio)
                    cols[f"{key}_plain"].append(a)
                    cols[f"{key}_norm"].append(b)
                    cols[f"{key}_n"].append(n)
            out[norm][q] = cols
    return out


def curvature_ratios(recs: list[dict], steps: int, window: float, seed: int) -> dict:
    """Early and late window ratios none / BN of the curvature series of :data:`CURVATURES` (seed ``seed``)."""
    T, w = steps, window
    bn, pl = arm_records(recs, arm_name("bn", seed)), arm_records(recs, arm_name("none", seed))
    out = {}
    for q in CURVATURES:
        sb, vb = series(bn, q)
        sp, vp = series(pl, q)
        out[q] = {"early_ratio": window_ratio(sp, vp, sb, vb, 0, w * T)[0],
                  "late_ratio": window_ratio(sp, vp, sb, vb, (1 - w) * T, math.inf)[0]}
    return out


# ------------------------------------------------------------------ figures
def _color(norm: str, i: int = 0) -> str:
    return NORM_COLORS.get(norm) or _COLOR.get(norm) or color_for(norm, i)


def _window_shading(ax, cfg: dict) -> None:
    T, w = cfg["steps"], cfg["window"]
    ax.axvspan(0, w * T, color="0.92", zorder=0, lw=0)
    ax.axvspan((1 - w) * T, T, color="0.92", zorder=0, lw=0)


def _across_seeds(recs, norm, seeds, q, lr):
    """Steps common to the seeds and the mean, min and max over seeds of quantity ``q``."""
    per = [dict(zip(*[a.tolist() for a in quantity(arm_records(recs, arm_name(norm, s)), q, lr)])) for s in seeds]
    per = [p for p in per if p]
    if not per:
        return None
    steps = sorted(set.intersection(*[set(p) for p in per]))
    m = np.array([[p[s] for s in steps] for p in per], float)
    with np.errstate(invalid="ignore"):
        return np.array(steps), np.nanmean(m, 0), np.nanmin(m, 0), np.nanmax(m, 0)


def _landscape_figure(cfg, recs, seeds, norms, q, band_keys, band_label, qlabel, title, path):
    """Left (bands only): the paper's picture for the first seed, plain and BN; right: the quantity of every net,
    mean over seeds with the min-max range shaded."""
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        ncol = 2 if band_keys else 1
        fig, axes = plt.subplots(1, ncol, figsize=(6.2 * ncol, 4.0), squeeze=False)
        axes = axes[0]
        if band_keys:
            ax = axes[0]
            _window_shading(ax, cfg)
            for norm in ("none", "bn"):
                r = arm_records(recs, arm_name(norm, seeds[0]))
                s, lo = series(r, band_keys[0])
                _, hi = series(r, band_keys[1])
                if not len(s):
                    continue
                ax.fill_between(s, lo, hi, color=_color(norm), alpha=0.35, lw=0, label=f"{_LABEL[norm]} (seed {seeds[0]})")
                ax.plot(s, lo, color=_color(norm), lw=0.8)
                ax.plot(s, hi, color=_color(norm), lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_ylabel(band_label)
            ax.set_title(f"range over s in (0, {cfg['max_lr_multiple']:g}·lr]", fontsize=9)
            ax.legend(fontsize=8)
        ax = axes[-1]
        _window_shading(ax, cfg)
        for i, norm in enumerate(norms):
            got = _across_seeds(recs, norm, seeds, q, cfg["lr"])
            if got is None:
                continue
            s, mean, lo, hi = got
            ax.fill_between(s, lo, hi, color=_color(norm, i), alpha=0.2, lw=0)
            ax.plot(s, mean, color=_color(norm, i), lw=1.3, marker="o", ms=2.5, label=_LABEL.get(norm, norm))
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(qlabel)
        ax.set_title(f"mean over {len(seeds)} seeds, shaded: min to max; grey: early / late windows", fontsize=9)
        ax.legend(fontsize=8)
        fig.suptitle(f"{title} (lr {cfg['lr']:g})")
        return save(fig, path)


def _curvature_figure(cfg, recs, seed, path):
    import matplotlib.pyplot as plt

    keys = [("hess_quad/gHg", "gᵀHg / ‖g‖²"), ("hess_top/lambda_max", "top Hessian eigenvalue λ_max")]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(12.0, 3.8))
        for ax, (key, ylabel) in zip(axes, keys):
            _window_shading(ax, cfg)
            allpos = True
            for norm in ("none", "bn"):
                s, v = series(arm_records(recs, arm_name(norm, seed)), key)
                if not len(s):
                    continue
                allpos &= bool(np.all(v[np.isfinite(v)] > 0))
                ax.plot(s, v, color=_color(norm), marker="o", ms=2.5, lw=1.2, label=_LABEL[norm])
            ax.set_yscale("log" if allpos else "symlog")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        fig.suptitle(f"Curvature of the batch loss at w_t (seed {seed}, lr {cfg['lr']:g})")
        return save(fig, path)


def _ratios_figure(cfg, ratios, path):
    """Early and late window ratios plain / normalized per net and quantity: mean over seeds, bars min to max."""
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(4.2 * len(QUANTITIES), 3.6), squeeze=False)
        norms = list(cfg["norms"])
        for ax, (q, (desc, _)) in zip(axes[0], QUANTITIES.items()):
            for j, norm in enumerate(norms):
                r = ratios.get(norm, {}).get(q)
                if r is None:
                    continue
                for k, key in enumerate(("early", "late")):
                    v = np.array([x if _ok(x) else np.nan for x in r[key]], float)
                    if not np.isfinite(v).any():
                        continue
                    m, lo, hi = np.nanmean(v), np.nanmin(v), np.nanmax(v)
                    x = j + (k - 0.5) * 0.35
                    ax.bar(x, m, width=0.33, color=_color(norm, j), alpha=1.0 if key == "early" else 0.45,
                           label=key if j == 0 else None)
                    ax.errorbar(x, m, yerr=[[m - lo], [hi - m]], color="k", lw=0.8, capsize=2)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.set_xticks(range(len(norms)), [_LABEL.get(n, n) for n in norms])
            ax.set_ylabel("plain / normalized")
            ax.set_title(desc.split(",")[0].split(" max")[0], fontsize=9)
            ax.legend(fontsize=8, title="window (dark: early)", title_fontsize=7)
        fig.suptitle(f"Window ratios over {cfg['seeds']} seeds (bar: mean, whiskers: min to max; > 1: smoother with the norm)")
        return save(fig, path)
