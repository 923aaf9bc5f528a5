"""``landscape``: with BatchNorm the loss landscape along the gradient is smoother.

Santurkar, Tsipras, Ilyas, Madry, *How Does Batch Normalization Help Optimization?* (NeurIPS 2018),
section 3.1, figure 4.

**Arms.** The same convnet (same seed, same batch order), SGD with momentum:

* ``bn@lr`` and ``none@lr``: with and without BatchNorm at the same learning rate ``lr``;
* ``bn@large_lr``: BatchNorm at a large learning rate where only BN trains;
* ``none@large_lr``: the plain net at that rate (learning curve only, no probes: it does not train).

**Measurements** every ``probe_every`` steps of the probed arms, on the step's batch ``B`` along the
step's gradient ``g`` (:class:`bnlab.probes.LandscapeProbe`, step sizes ``s`` = ``k`` points up to
``max_lr_multiple`` times the arm's learning rate)::

    loss band      [min_s, max_s] L_B(w_t - s g)            (including s = 0)
    gradient band  [min_s, max_s] ‖∇L_B(w_t) - ∇L_B(w_t - s g)‖₂
    β_eff          max_s ‖∇L_B(w_t) - ∇L_B(w_t - s g)‖₂ / ‖s g‖₂

and every ``hessian_every`` steps ``gᵀHg/‖g‖²`` (:class:`bnlab.probes.HessianQuadForm`) and the top
Hessian eigenvalue by Lanczos (:class:`bnlab.probes.TopHessianEigenvalue`, ``lanczos_iter`` HVPs
at most). The ``k`` points are evaluated in one ``torch.func.vmap`` call (``vectorize = True``; not
``"auto"``, whose timing-based choice between vmap and a loop would change the last digits of the
stored numbers from run to run).

**Summary.** For each of the three quantities ``Q`` = loss-band width ``max - min``, top of the
gradient band, ``β_eff``: the ratio ``Q(none@lr) / Q(bn@lr)`` at the same probe step, its median
over the *early* window (the first ``window`` fraction of training) and over the *late* window (the
last ``window`` fraction), with both arms' medians and the number of probe steps
(:func:`bnlab.analysis.window_ratio`); the same ratios for the two curvatures.

**Claims** (rules fixed before the quick run; numbers in :class:`Thresholds`):

* holds if the early ratio ≥ ``ratio_min`` (2: "much smaller") and the late ratio ≥
  ``late_ratio_min`` (1);
* fails if the early ratio < ``fail_ratio`` (1: not smaller with BN where the paper finds the
  largest effect);
* inconclusive otherwise (smaller early but by less than ``ratio_min``, or larger late), and
  whenever the plain net diverged at ``lr``.

**Setting and why.** Quick: ``convnet`` (3 conv stages of width 16, 32, 64, BN or not, a linear
classifier) on MNIST-1D (4000 training sequences), ``lr = 0.05``, ``large_lr = 0.5``, momentum 0.9,
batch 128, 400 steps (13 epochs); the 8x8 digits are fitted to zero loss within ~100 steps, which
leaves nothing to compare late in training. Paper: VGG on CIFAR-10 (``paper`` profile: ``vgg``
depth 11, width 64, for a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import data as data_mod
from ..analysis import series, window_ratio
from ..plotting import STYLE, learning_curves, save
from ..probes import HessianQuadForm, LandscapeProbe, TopHessianEigenvalue
from ..runs import RunDir
from .base import Claim, Context, Experiment, fmt, register_experiment, verdict
from .common import SGDConfig, arm_records, make_net, train_arm

__all__ = ["Landscape", "Config", "Thresholds", "ARMS", "QUANTITIES", "quantity", "ratio_verdict",
           "window_ratios"]

SOURCE = "Santurkar et al. 2018"


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``landscape`` trains and measures (hashed: names the run)."""

    data: str = "mnist1d"
    """Dataset (``bnlab list``)."""
    lr: float = 0.05
    """The learning rate of the compared arms ``bn@lr`` and ``none@lr``."""
    large_lr: float = 0.5
    """The large learning rate of ``bn@large_lr`` and ``none@large_lr`` (where only BN trains)."""
    steps: int = 400
    """Optimizer steps per arm."""
    probe_every: int = 10
    """Steps between two landscape probes (loss band, gradient band, β_eff)."""
    k: int = 8
    """Step sizes per landscape probe (evenly spaced up to ``max_lr_multiple`` × the arm's lr)."""
    max_lr_multiple: float = 4.0
    """The largest step size probed, in multiples of the arm's learning rate."""
    vectorize: bool = True
    """Evaluate the ``k`` step sizes in one ``vmap`` call (``False``: a loop; same numbers up to rounding)."""
    hessian_every: int = 20
    """Steps between two curvature probes (gᵀHg/‖g‖² and λ_max)."""
    lanczos_iter: int = 20
    """Hessian-vector products of the Lanczos estimate of λ_max, at most."""
    window: float = 0.25
    """Fraction of the steps in the early window (the first) and in the late window (the last)."""


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``landscape``'s decision rule (the same for its three claims)."""

    ratio_min: float = 2.0
    """Holds needs the early-window median ratio no norm / BN at least this ("much smaller" with BN)."""
    late_ratio_min: float = 1.0
    """Holds also needs the late-window median ratio at least this (BN's not larger late in training)."""
    fail_ratio: float = 1.0
    """Fails when the early-window median ratio is below this (not smaller with BN early on)."""


#: (arm, norm, lr key, probed)
ARMS = (("bn@lr", "bn", "lr", True), ("none@lr", "none", "lr", True), ("bn@large_lr", "bn", "large_lr", True),
        ("none@large_lr", "none", "large_lr", False))
_ARM_STYLE = {"bn@lr": ("#1f77b4", "-"), "none@lr": ("#d62728", "-"), "bn@large_lr": ("#2ca02c", "--"), "none@large_lr": ("#ff9896", "--")}

#: claim id -> (metric key(s), description)
QUANTITIES = {
    "loss-band-smaller": ("loss_band", "loss-band width max_s L - min_s L"),
    "gradient-band-smaller": ("grad_band", "top of the gradient-change band max_s ‖∇L(w) - ∇L(w - s g)‖"),
    "beta-smaller": ("beta", "effective β-smoothness"),
}

_CLAIM_RULE = "holds if early ratio >= ratio_min and late ratio >= late_ratio_min; fails if early ratio < fail_ratio; else inconclusive"

#: the curvature series whose window ratios are in the summary (not judged)
CURVATURES = ("hess_quad/gHg", "hess_top/lambda_max")


def arm_label(cfg: dict, arm: str) -> str:
    norm, lr_key = arm.split("@")
    return f"{'BN' if norm == 'bn' else 'no norm'}, lr {cfg[lr_key]:g}"


def quantity(recs: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """One landscape quantity of an arm against step: ``loss_band`` (width), ``grad_band`` (top), ``beta``."""
    if name == "loss_band":
        s, lo = series(recs, "landscape/loss_min")
        _, hi = series(recs, "landscape/loss_max")
        return s, hi - lo
    if name == "grad_band":
        return series(recs, "landscape/grad_diff_max")
    return series(recs, "landscape/" + name)


def ratio_verdict(early: float, late: float, ratio_min: float, late_ratio_min: float = 1.0,
                  fail_ratio: float = 1.0) -> Optional[bool]:
    """``True`` (holds), ``False`` (fails) or ``None`` (inconclusive) by the rule of the module docstring.

    Example:
        >>> ratio_verdict(3.0, 1.2, 2.0), ratio_verdict(0.9, 5.0, 2.0), ratio_verdict(1.5, 5.0, 2.0)
        (True, False, None)
    """
    if not math.isfinite(early):
        return None
    if early < fail_ratio:
        return False
    if early >= ratio_min and math.isfinite(late) and late >= late_ratio_min:
        return True
    return None


@register_experiment
class Landscape(Experiment):
    name = "landscape"
    title = "Loss landscape along the gradient: loss band, gradient predictiveness and β-smoothness with and without BN"
    source = SOURCE
    description = (
        "The same convnet with and without BatchNorm at the same learning rate, and with BN at a large learning rate "
        "where only BN trains. Every few steps, along the step's gradient on its batch: the range of the loss, the range "
        "of the gradient change and the effective β-smoothness; every few more, gᵀHg/‖g‖² and the top Hessian eigenvalue."
    )
    claims = (
        Claim("loss-band-smaller", "With BatchNorm the loss varies much less along the gradient (a narrower loss band), especially early in training.",
              SOURCE, "median over the early / late window of width(none@lr) / width(bn@lr), width = max_s L(w - s g) - min_s L(w - s g), s = 0..max_lr_multiple·lr",
              _CLAIM_RULE),
        Claim("gradient-band-smaller", "With BatchNorm the gradient changes much less along the gradient (more predictive gradients), especially early.",
              SOURCE, "median over the early / late window of top(none@lr) / top(bn@lr), top = max_s ‖∇L(w) - ∇L(w - s g)‖₂",
              _CLAIM_RULE),
        Claim("beta-smaller", "With BatchNorm the effective β-smoothness is much smaller, especially early.",
              SOURCE, "median over the early / late window of β(none@lr) / β(bn@lr), β = max_s ‖∇L(w) - ∇L(w - s g)‖₂ / ‖s g‖₂",
              _CLAIM_RULE),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(data="digits", width=4, steps=30, probe_every=5, hessian_every=10, lanczos_iter=5, k=4),
        "quick": Config(),
        "paper": Config(data="cifar10", model="vgg", width=64, depth=11, lr=0.1, large_lr=0.5, steps=15000,
                        probe_every=100, hessian_every=500, lanczos_iter=50),
    }

    # ------------------------------------------------------------------ measure
    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        final: dict = {}
        for arm, norm, lr_key, probed in ARMS:
            net = make_net(cfg, norm, tr)
            probes = []
            if probed:
                probes = [LandscapeProbe(every=cfg.probe_every, k=cfg.k, max_lr_multiple=cfg.max_lr_multiple, vectorize=cfg.vectorize),
                          HessianQuadForm(every=cfg.hessian_every),
                          TopHessianEigenvalue(every=cfg.hessian_every, max_iter=cfg.lanczos_iter)]
            lr = getattr(cfg, lr_key)
            final[arm] = train_arm(cfg, run, ctx, self.name, arm, net, lr, tr, te, probes,
                                  {"norm": norm, "lr": lr, "probed": probed})
        return {"arms": final, "ratios": window_ratios(run.metrics(), cfg.steps, cfg.window, final),
                "lr": cfg.lr, "steps": cfg.steps, "window": cfg.window}

    # ------------------------------------------------------------------ judge
    def judge(self, summary: dict, th: Thresholds) -> list:
        T, w = summary["steps"], summary["window"]
        diverged = bool(summary["arms"].get("none@lr", {}).get("diverged"))
        rule = (f"holds if the early ratio (steps < {fmt(w * T)}) ≥ {fmt(th.ratio_min)} and the late ratio "
                f"(steps ≥ {fmt((1 - w) * T)}) ≥ {fmt(th.late_ratio_min)}; fails if the early ratio < {fmt(th.fail_ratio)}; "
                "otherwise, or if the plain net diverged, inconclusive")
        out = []
        for claim_id, (qname, desc) in QUANTITIES.items():
            q = summary["ratios"].get(qname)
            if q is None:
                continue
            ok = None if diverged else ratio_verdict(q["early_ratio"], q["late_ratio"], th.ratio_min, th.late_ratio_min, th.fail_ratio)
            detail = (f"{desc} at lr {summary['lr']:g}, median of the per-step ratio no norm / BN: early (steps < {w * T:g}, "
                      f"{q['early_n']} probes) {q['early_ratio']:.3g}x (medians: no norm {q['early_none']:.3g}, BN {q['early_bn']:.3g}); "
                      f"late (steps >= {(1 - w) * T:g}, {q['late_n']} probes) {q['late_ratio']:.3g}x "
                      f"(medians: no norm {q['late_none']:.3g}, BN {q['late_bn']:.3g})")
            if diverged:
                detail += "; the plain net diverged at this lr"
            out.append(verdict(claim_id, ok, q["early_ratio"], detail, rule))
        return out

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        recs = run.metrics()
        probed = [a for a, _, _, p in ARMS if p and arm_records(recs, a)]
        paths = [
            _band_figure(cfg, recs, probed, "landscape/loss_min", "landscape/loss_max", "loss L_B(w - s g)",
                         "Loss landscape: range of the loss along the gradient", run.figure_path("loss_landscape.png")),
            _band_figure(cfg, recs, probed, "landscape/grad_diff_min", "landscape/grad_diff_max", "‖∇L_B(w) - ∇L_B(w - s g)‖₂",
                         "Gradient predictiveness: range of the gradient change along the gradient", run.figure_path("gradient_predictiveness.png")),
            _lines_figure(cfg, recs, probed, [("landscape/beta", "effective β-smoothness")],
                          "Effective β-smoothness: max_s ‖∇L(w) - ∇L(w - s g)‖ / ‖s g‖", run.figure_path("beta_smoothness.png")),
            _lines_figure(cfg, recs, probed, [("hess_quad/gHg", "gᵀHg / ‖g‖²"), ("hess_top/lambda_max", "top Hessian eigenvalue λ_max")],
                          "Curvature of the batch loss at w_t", run.figure_path("curvature.png")),
        ]
        arms = []
        for arm, norm, lr_key, _ in ARMS:
            steps = arm_records(recs, arm)
            if not steps:
                continue
            evals = [r for r in recs if r.get("arm") == arm and r.get("event") == "eval"]
            end = next((r for r in recs if r.get("arm") == arm and r.get("event") == "arm_end"), {})
            col, ls = _ARM_STYLE[arm]
            arms.append({"label": arm_label(cfg, arm), "norm": norm, "linestyle": ls,
                         "steps": [r["step"] for r in steps if "loss" in r], "loss": [r["loss"] for r in steps if "loss" in r],
                         "eval_steps": [r["step"] for r in evals], "test_acc": [r.get("test_acc", math.nan) for r in evals],
                         "diverged_at": end.get("diverged_at")})
        paths.append(learning_curves(arms, run.figure_path("learning_curves.png"),
                                     title=f"{cfg['model']} on {cfg['data']}, SGD momentum {cfg['momentum']}"))
        return paths


def window_ratios(recs: list[dict], steps: int, window: float, final: dict) -> dict:
    """The summary's ``ratios``: per quantity, the early / late window ratios no norm / BN at ``lr``.

    For each quantity of :data:`QUANTITIES`: ``early_ratio``, ``late_ratio``, both arms' medians
    (``early_none``, ``early_bn``, ``late_none``, ``late_bn``) and the probe counts (``early_n``,
    ``late_n``), the early window being steps ``[0, window·steps)`` and the late one
    ``[(1 - window)·steps, ∞)``; for the curvatures of :data:`CURVATURES` the two ratios; and
    ``final_test_acc`` per arm.
    """
    T, w = steps, window
    bn, pl = arm_records(recs, "bn@lr"), arm_records(recs, "none@lr")
    numbers: dict = {}
    for qname, _ in QUANTITIES.values():
        sb, vb = quantity(bn, qname)
        sp, vp = quantity(pl, qname)
        early = window_ratio(sp, vp, sb, vb, 0, w * T)
        late = window_ratio(sp, vp, sb, vb, (1 - w) * T, math.inf)
        numbers[qname] = {"early_ratio": early[0], "late_ratio": late[0], "early_none": early[1], "early_bn": early[2],
                          "late_none": late[1], "late_bn": late[2], "early_n": early[3], "late_n": late[3]}
    for q in CURVATURES:
        sb, vb = series(bn, q)
        sp, vp = series(pl, q)
        numbers[q] = {"early_ratio": window_ratio(sp, vp, sb, vb, 0, w * T)[0],
                      "late_ratio": window_ratio(sp, vp, sb, vb, (1 - w) * T, math.inf)[0]}
    numbers["final_test_acc"] = {a: final[a].get("test_acc") for a in final}
    return numbers


def _window_shading(ax, cfg: dict) -> None:
    T, w = cfg["steps"], cfg["window"]
    ax.axvspan(0, w * T, color="0.9", zorder=0, lw=0)
    ax.axvspan((1 - w) * T, T, color="0.9", zorder=0, lw=0)


def _band_figure(cfg, recs, arms, key_lo, key_hi, ylabel, title, path):
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        _window_shading(ax, cfg)
        for arm in arms:
            r = arm_records(recs, arm)
            s, lo = series(r, key_lo)
            _, hi = series(r, key_hi)
            if not len(s):
                continue
            col, ls = _ARM_STYLE[arm]
            ax.fill_between(s, lo, hi, color=col, alpha=0.35, lw=0, label=arm_label(cfg, arm))
            ax.plot(s, lo, color=col, lw=0.8, ls=ls)
            ax.plot(s, hi, color=col, lw=0.8, ls=ls)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n(shaded: min to max over s in (0, {cfg['max_lr_multiple']:g}·lr]; grey: early / late windows)", fontsize=9)
        ax.legend(fontsize=8)
        return save(fig, path)


def _lines_figure(cfg, recs, arms, keys, title, path):
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(keys), figsize=(6.0 * len(keys), 3.8), squeeze=False)
        for ax, (key, ylabel) in zip(axes[0], keys):
            _window_shading(ax, cfg)
            allpos = True
            for arm in arms:
                s, v = series(arm_records(recs, arm), key)
                if not len(s):
                    continue
                allpos &= bool(np.all(v[np.isfinite(v)] > 0))
                col, ls = _ARM_STYLE[arm]
                ax.plot(s, v, color=col, ls=ls, marker="o", ms=2.5, lw=1.2, label=arm_label(cfg, arm))
            ax.set_yscale("log" if allpos else "symlog")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        return save(fig, path)
