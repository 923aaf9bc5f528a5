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

**Claims and thresholds** (fixed before the quick run). For each of the three quantities
``Q`` = loss-band width ``max - min``, top of the gradient band, ``β_eff``, the ratio
``Q(none@lr) / Q(bn@lr)`` at the same probe step, its median over the *early* window (the first
``window`` fraction of training) and over the *late* window (the last ``window`` fraction):

* holds if the early ratio ≥ ``ratio_min`` (default 2: "much smaller") and the late ratio ≥ 1;
* fails if the early ratio < 1 (not smaller with BN where the paper finds the largest effect);
* inconclusive otherwise (smaller early but by less than ``ratio_min``, or larger late).

**Setting and why.** Quick: ``convnet`` (3 conv stages of width 16, 32, 64, BN or not, a linear
classifier) on MNIST-1D (4000 training sequences), ``lr = 0.05``, ``large_lr = 0.5``, momentum 0.9,
batch 128, 400 steps (13 epochs); the 8x8 digits are fitted to zero loss within ~100 steps, which
leaves nothing to compare late in training. Paper: VGG on CIFAR-10 (``paper`` profile: ``vgg``
depth 11, width 64, for a GPU).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np

from .. import data as data_mod
from .. import models
from ..plotting import STYLE, learning_curves, save
from ..probes import HessianQuadForm, LandscapeProbe, TopHessianEigenvalue
from ..runs import RunDir
from ..train import make_optimizer, train
from . import Claim, Experiment, Result, judge, register_experiment

__all__ = ["Landscape", "ARMS", "QUANTITIES", "series", "quantity", "window_ratio", "ratio_verdict", "arm_records"]

SOURCE = "Santurkar et al. 2018"

_QUICK = dict(
    data="mnist1d", model="convnet", width=16, depth=1, seed=0,
    lr=0.05, large_lr=0.5, momentum=0.9, weight_decay=0.0, batch_size=128, steps=400,
    probe_every=10, k=8, max_lr_multiple=4.0, vectorize=True, hessian_every=20, lanczos_iter=20,
    window=0.25, ratio_min=2.0,
)

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


def arm_label(cfg: dict, arm: str) -> str:
    norm, lr_key = arm.split("@")
    return f"{'BN' if norm == 'bn' else 'no norm'}, lr {cfg[lr_key]:g}"


def arm_records(recs: list[dict], arm: str) -> list[dict]:
    """The per-step records of ``arm`` (no eval or bookkeeping events)."""
    return [r for r in recs if r.get("arm") == arm and "event" not in r]


def series(recs: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key`` over the records that have it."""
    pairs = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
    if not pairs:
        return np.zeros(0, int), np.zeros(0)
    s, v = zip(*pairs)
    return np.asarray(s), np.asarray(v, dtype=float)


def quantity(recs: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """One landscape quantity of an arm against step: ``loss_band`` (width), ``grad_band`` (top), ``beta``."""
    if name == "loss_band":
        s, lo = series(recs, "landscape/loss_min")
        _, hi = series(recs, "landscape/loss_max")
        return s, hi - lo
    if name == "grad_band":
        return series(recs, "landscape/grad_diff_max")
    return series(recs, "landscape/" + name)


def window_ratio(steps_a, a, steps_b, b, lo: float, hi: float) -> tuple[float, float, float, int]:
    """Median of ``a/b`` over the probe steps both have in ``[lo, hi)``; also both medians and the count."""
    common = sorted(set(steps_a.tolist()) & set(steps_b.tolist()))
    ia = {s: i for i, s in enumerate(steps_a.tolist())}
    ib = {s: i for i, s in enumerate(steps_b.tolist())}
    sel = [s for s in common if lo <= s < hi]
    va = np.array([a[ia[s]] for s in sel], float)
    vb = np.array([b[ib[s]] for s in sel], float)
    ok = np.isfinite(va) & np.isfinite(vb) & (vb > 0)
    if not ok.any():
        return math.nan, math.nan, math.nan, 0
    return float(np.median(va[ok] / vb[ok])), float(np.median(va[ok])), float(np.median(vb[ok])), int(ok.sum())


def ratio_verdict(early: float, late: float, ratio_min: float) -> Optional[bool]:
    """``True`` (holds), ``False`` (fails) or ``None`` (inconclusive) by the rule of the module docstring."""
    if not math.isfinite(early):
        return None
    if early < 1.0:
        return False
    if early >= ratio_min and math.isfinite(late) and late >= 1.0:
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
              "holds if early ratio >= ratio_min (2) and late ratio >= 1; fails if early ratio < 1; else inconclusive"),
        Claim("gradient-band-smaller", "With BatchNorm the gradient changes much less along the gradient (more predictive gradients), especially early.",
              SOURCE, "median over the early / late window of top(none@lr) / top(bn@lr), top = max_s ‖∇L(w) - ∇L(w - s g)‖₂",
              "holds if early ratio >= ratio_min (2) and late ratio >= 1; fails if early ratio < 1; else inconclusive"),
        Claim("beta-smaller", "With BatchNorm the effective β-smoothness is much smaller, especially early.",
              SOURCE, "median over the early / late window of β(none@lr) / β(bn@lr), β = max_s ‖∇L(w) - ∇L(w - s g)‖₂ / ‖s g‖₂",
              "holds if early ratio >= ratio_min (2) and late ratio >= 1; fails if early ratio < 1; else inconclusive"),
    )
    profiles = {
        "tiny": {**_QUICK, "data": "digits", "width": 4, "steps": 30, "probe_every": 5, "hessian_every": 10, "lanczos_iter": 5, "k": 4},
        "quick": dict(_QUICK),
        "paper": {**_QUICK, "data": "cifar10", "model": "vgg", "width": 64, "depth": 11, "lr": 0.1, "large_lr": 0.5,
                  "steps": 15000, "probe_every": 100, "hessian_every": 500, "lanczos_iter": 50},
    }

    # ------------------------------------------------------------------ run
    def run(self, cfg: dict, run: RunDir, *, device: str = "auto", progress: bool = True) -> Result:
        tr, te = data_mod.load_pair(cfg["data"], seed=cfg["seed"])
        final: dict = {}
        for arm, norm, lr_key, probed in ARMS:
            net = models.make(cfg["model"], norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                              width=cfg["width"], depth=cfg["depth"], seed=cfg["seed"])
            opt = make_optimizer(net.parameters(), lr=cfg[lr_key], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
            probes = []
            if probed:
                probes = [LandscapeProbe(every=cfg["probe_every"], k=cfg["k"], max_lr_multiple=cfg["max_lr_multiple"], vectorize=cfg["vectorize"]),
                          HessianQuadForm(every=cfg["hessian_every"]),
                          TopHessianEigenvalue(every=cfg["hessian_every"], max_iter=cfg["lanczos_iter"])]
            h = train(net, tr, opt, steps=cfg["steps"], batch_size=cfg["batch_size"], eval_data=te, device=device, seed=cfg["seed"],
                      probes=probes, log=lambda r, arm=arm: run.write({"arm": arm, **r}),
                      progress=f"{self.name} {arm}" if progress else False)
            final[arm] = {**h.summary(), "norm": norm, "lr": cfg[lr_key], "probed": probed}
            run.write({"event": "arm_end", "arm": arm, **final[arm]})
        verdicts, numbers = self._judge(cfg, run.metrics(), final)
        return Result(summary={"arms": final, "ratios": numbers}, verdicts=verdicts)

    def _judge(self, cfg: dict, recs: list[dict], final: dict):
        T = cfg["steps"]
        w = cfg["window"]
        bn, pl = arm_records(recs, "bn@lr"), arm_records(recs, "none@lr")
        numbers: dict = {}
        verdicts = []
        for claim_id, (qname, desc) in QUANTITIES.items():
            sb, vb = quantity(bn, qname)
            sp, vp = quantity(pl, qname)
            early = window_ratio(sp, vp, sb, vb, 0, w * T)
            late = window_ratio(sp, vp, sb, vb, (1 - w) * T, math.inf)
            numbers[qname] = {"early_ratio": early[0], "late_ratio": late[0], "early_none": early[1], "early_bn": early[2],
                              "late_none": late[1], "late_bn": late[2], "early_n": early[3], "late_n": late[3]}
            ok = ratio_verdict(early[0], late[0], cfg["ratio_min"])
            if final.get("none@lr", {}).get("diverged"):
                ok = None
            detail = (f"{desc} at lr {cfg['lr']:g}, median of the per-step ratio no norm / BN: early (steps < {w * T:g}, {early[3]} probes) "
                      f"{early[0]:.3g}x (medians: no norm {early[1]:.3g}, BN {early[2]:.3g}); late (steps >= {(1 - w) * T:g}, {late[3]} probes) "
                      f"{late[0]:.3g}x (medians: no norm {late[1]:.3g}, BN {late[2]:.3g}); thresholds: early >= {cfg['ratio_min']:g}, late >= 1")
            if final.get("none@lr", {}).get("diverged"):
                detail += "; the plain net diverged at this lr"
            verdicts.append(judge(claim_id, ok, early[0], detail))
        # second order and the large-lr arm, for the summary
        for q in ("hess_quad/gHg", "hess_top/lambda_max"):
            sb, vb = series(bn, q)
            sp, vp = series(pl, q)
            numbers[q] = {"early_ratio": window_ratio(sp, vp, sb, vb, 0, w * T)[0], "late_ratio": window_ratio(sp, vp, sb, vb, (1 - w) * T, math.inf)[0]}
        numbers["final_test_acc"] = {a: final[a].get("test_acc") for a in final}
        return verdicts, numbers

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
