"""``divergence``: without BatchNorm a large step increases the loss; BN is what allows large LRs.

Bjorck, Gomes, Selman, Weinberger, *Understanding Batch Normalization* (NeurIPS 2018).

**Relative loss at initialization.** For the same deep residual net with and without BatchNorm
(``preresnet``, He initialization, same seed), on ``rl_batches`` minibatches ``B`` of the training
set, the loss after one gradient step of size ``α`` relative to the loss before, on the same
batch, for ``α`` on a log grid::

    r_B(α) = L_B(w_0 - α ∇L_B(w_0)) / L_B(w_0)

(:func:`bnlab.landscape.relative_loss`: BN in train mode normalizes with the batch's statistics
at each point; the model is left unchanged). ``r > 1`` means the step diverged. The median over
the batches and its spread (min to max) are drawn against ``α``; ``α*`` is the first grid value
at which the median exceeds ``divergence_level`` (1; non-finite counts as exceeding). Bjorck et
al. find ``α* ≈ 1e-3`` without BN (ResNet-110, CIFAR-10) and no divergence with BN over a much
wider range.

**Accuracy against learning rate.** Both nets trained with SGD + momentum over the LR grid
``lrs`` for the same budget (``epochs``) on the same batch sequence, all LRs of one net at once
with :func:`bnlab.sweep.sweep` (vectorized). Final test accuracy against LR; learning curves at
``small_lr``, at the largest LR where the plain net *trains* (not diverged and final test accuracy
at least ``trains_margin`` above chance) and at ``large_lr``.

**Setting and why.** Quick: ``preresnet`` of depth 26 (1 + 24 + 1 weight layers), width 8, on
MNIST-1D (4000 training sequences of length 40). A residual net is what Bjorck et al. use (their
plain net is ResNet-110 with the BN layers removed); depth 26 is the deepest that keeps the whole
LR sweep within a few minutes on two CPU cores. On the 8x8 digits the convolutions' zero padding
at 4x4 and 2x2 maps damps the growth of activations with depth; MNIST-1D's length-40 sequences
keep the effect. Paper: ResNet-110 (``preresnet`` depth 110, width 16) on CIFAR-10.

**Claims and thresholds** (:class:`Thresholds`, fixed before running):

* ``plain-diverges-at-smaller-alpha``: ``α*_BN >= alpha_ratio_min · α*_plain`` (default: BN's
  stable range is at least a decade wider). If BN's median never exceeds the level on the grid
  its ``α*`` is taken as beyond the grid (a lower bound). Inconclusive if the plain net's median
  never exceeds it either.
* ``comparable-at-small-lr``: ``|acc_BN - acc_plain| <= comparable_tol`` at ``small_lr``;
  inconclusive when neither net trains there (both below chance + ``trains_margin``).
* ``bn-better-at-large-lr``: ``acc_BN - acc_plain >= better_margin`` at ``large_lr``; a plain net
  whose weights became non-finite counts at chance.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from .. import models
from ..analysis import first_exceeding, median_curve
from ..runs import RunDir
from .base import Claim, Context, Experiment, from_dict, register_experiment, verdict
from .common import ResNetConfig, SGDConfig

SOURCE = "Bjorck et al. 2018"


@dataclass(frozen=True)
class Config(ResNetConfig, SGDConfig):
    """What ``divergence`` measures and trains (hashed: names the run)."""

    width: int = 8
    """Model width."""
    norms: tuple[str, ...] = ("bn", "none")
    """The normalizations compared; ``bn`` and ``none`` are the ones judged."""
    seed: int = 0
    """Seed of the split, the initialization, the relative-loss batches and the batch order."""
    alpha_min: float = 1e-6
    """Smallest step size α of the relative-loss grid."""
    alpha_max: float = 1e2
    """Largest step size α of the relative-loss grid."""
    n_alphas: int = 25
    """Number of α on the log grid from ``alpha_min`` to ``alpha_max``."""
    rl_batches: int = 8
    """Minibatches the relative loss is measured on (median and spread over them)."""
    rl_batch_size: int = 128
    """Examples per relative-loss minibatch."""
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    """The learning-rate grid of the accuracy sweep."""
    small_lr: float = 1e-4
    """The small learning rate (one of ``lrs``), where both nets should be comparable."""
    large_lr: float = 0.1
    """The large learning rate (one of ``lrs``), where BN should be clearly better."""
    epochs: float = 8.0
    """Passes over the training set per run (the same budget for every LR)."""

    def __post_init__(self) -> None:
        for key in ("small_lr", "large_lr"):
            if getattr(self, key) not in self.lrs:
                raise ValueError(f"divergence: {key}={getattr(self, key)!r} must be one of lrs={list(self.lrs)}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``divergence``'s decision rules."""

    divergence_level: float = 1.0
    """A step diverges where the median relative loss over the batches exceeds this (α* is the first such α)."""
    alpha_ratio_min: float = 10.0
    """``plain-diverges-at-smaller-alpha`` holds when α*_BN ≥ this × α*_plain."""
    comparable_tol: float = 0.05
    """``comparable-at-small-lr`` holds when the two final test accuracies differ by at most this."""
    better_margin: float = 0.10
    """``bn-better-at-large-lr`` holds when BN's final test accuracy exceeds the plain net's by at least this."""
    trains_margin: float = 0.10
    """A net "trains" when its final test accuracy is at least chance plus this (else the small-LR claim is inconclusive)."""


def _arm(norm: str, lr: float) -> str:
    return f"{norm}@{lr:g}"


def _label(norm: str) -> str:
    return "BN" if norm == "bn" else ("no norm" if norm == "none" else norm)


@register_experiment
class Divergence(Experiment):
    name = "divergence"
    title = "Divergence: the one-step relative loss and accuracy against learning rate, with and without BN"
    source = SOURCE
    description = (
        "The same deep residual net with and without BatchNorm: the relative loss L_B(w - α∇L_B)/L_B(w) of one "
        "gradient step at initialization against α over several batches, and test accuracy against learning rate "
        "for one training budget, with learning curves at a small LR, at the largest LR where the plain net "
        "trains, and at a large LR."
    )
    claims = (
        Claim("plain-diverges-at-smaller-alpha",
              "At initialization the plain net's one-step relative loss exceeds 1 from a much smaller step size than the BN net's.",
              SOURCE, "α* = first α (log grid) where the median relative loss over the batches exceeds 1, for both nets",
              "holds if α*_BN >= alpha_ratio_min · α*_plain (default 10; BN beyond the grid counts as larger)"),
        Claim("comparable-at-small-lr",
              "At a small learning rate the nets with and without BN reach comparable accuracy.",
              SOURCE, "final test accuracy of both nets at small_lr, same budget",
              "holds if |difference| <= comparable_tol (default 5 points); inconclusive if neither net trains"),
        Claim("bn-better-at-large-lr",
              "At a large learning rate the BN net is clearly more accurate than the plain net.",
              SOURCE, "final test accuracy of both nets at large_lr (plain net with non-finite weights counts at chance)",
              "holds if acc_BN - acc_plain >= better_margin (default 10 points)"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(data="digits", depth=8, width=4, alpha_min=1e-4, n_alphas=9, rl_batches=2, rl_batch_size=64,
                       lrs=(1e-3, 1e-1), small_lr=1e-3, epochs=1.0),
        "quick": Config(),
        "paper": Config(data="cifar10", depth=110, width=16, rl_batches=16, n_alphas=33, epochs=100.0),
    }

    # ------------------------------------------------------------------ measure
    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        from ..landscape import relative_loss
        from ..sweep import sweep
        from ..train import resolve_device

        t_start = time.perf_counter()
        dev = resolve_device(ctx.device)
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        chance = 1.0 / tr.num_classes
        make = partial(models.make, cfg.model, in_shape=tr.in_shape, num_classes=tr.num_classes,
                       width=cfg.width, depth=cfg.depth)

        # (1) relative loss at initialization, several batches
        alphas = np.logspace(math.log10(cfg.alpha_min), math.log10(cfg.alpha_max), cfg.n_alphas)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        batches = []
        for x, y in tr.batches(cfg.rl_batch_size, shuffle=True, generator=gen, drop_last=True):
            batches.append((x.to(dev), y.to(dev)))
            if len(batches) == cfg.rl_batches:
                break
        run.append_metrics({"event": "meta", "chance": chance, "num_classes": tr.num_classes,
                            "steps_per_epoch": tr.steps_per_epoch(cfg.batch_size)})
        rel, loss0, rl_summary = {}, {}, {}
        t0 = time.perf_counter()
        for norm in cfg.norms:
            net = make(norm=norm, seed=cfg.seed).to(dev).train()
            rows, l0 = [], []
            for b in batches:
                rows.append(relative_loss(net, b, F.cross_entropy, alphas).numpy())
                with torch.no_grad():
                    l0.append(float(F.cross_entropy(net(b[0]), b[1])))
            rel[norm] = np.stack(rows)
            loss0[norm] = np.asarray(l0)
            med = median_curve(rel[norm])
            rl_summary[norm] = {
                "alpha_star_median": first_exceeding(alphas, med),
                "alpha_star_per_batch": [first_exceeding(alphas, r) for r in rel[norm]],
                "loss_at_init_median": float(np.median(loss0[norm])),
                "min_median_relative_loss": float(np.min(med)),
                "alpha_at_min": float(alphas[int(np.argmin(med))]),
            }
            run.append_metrics({"event": "relative_loss", "norm": norm, **rl_summary[norm]})
            # the curves themselves, for the judge (α* at the level it applies)
            rl_summary[norm]["median"] = med.tolist()
            rl_summary[norm]["per_batch"] = rel[norm].tolist()
        rl_seconds = time.perf_counter() - t0
        run.save_arrays("relative_loss.npz", alphas=alphas, **{f"rel_{n}": rel[n] for n in cfg.norms},
                        **{f"loss0_{n}": loss0[n] for n in cfg.norms})

        # (2) accuracy against learning rate: all LRs of one net at once
        steps_per_epoch = tr.steps_per_epoch(cfg.batch_size)
        arms: dict = {}
        sweep_info = {}
        for norm in cfg.norms:
            res = sweep(partial(make, norm=norm), tr, lrs=list(cfg.lrs), seeds=[cfg.seed], epochs=cfg.epochs,
                        batch_size=cfg.batch_size, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        data_seed=cfg.seed, eval_data=te, eval_every=steps_per_epoch, eval_train=False,
                        device=str(dev), progress=bool(ctx.progress))
            sweep_info[norm] = {"seconds": round(res.seconds, 1), "vectorized": res.vectorized, "fallback_reason": res.fallback_reason}
            for i in range(len(res)):
                lr = res.lrs[i]
                arm = _arm(norm, lr)
                h = res.history(i)
                for r in h.records:
                    run.append_metrics({"arm": arm, **r})
                for e in h.evals:
                    run.append_metrics({"arm": arm, "event": "eval", **e})
                s = {**res.summary(i), "norm": norm}
                s.pop("seconds", None)
                run.append_metrics({"arm": arm, "event": "arm_end", **s})
                arms[arm] = s
        return {
            "alphas": alphas.tolist(), "rl_batches": cfg.rl_batches, "relative_loss": rl_summary,
            "relative_loss_seconds": round(rl_seconds, 1), "sweep": sweep_info, "arms": arms, "chance": chance,
            "norms": list(cfg.norms), "lrs": list(cfg.lrs), "small_lr": cfg.small_lr, "large_lr": cfg.large_lr,
            "epochs": cfg.epochs, "seconds": round(time.perf_counter() - t_start, 1),
        }

    # ------------------------------------------------------------------ judge
    def judge(self, summary: dict, th: Thresholds) -> list:
        out = []
        arms, chance, epochs = summary["arms"], summary["chance"], summary["epochs"]
        # (1) relative loss: α* at the divergence level, from the stored median (and per-batch) curves
        rl = summary["relative_loss"]
        if "bn" in rl and "none" in rl:
            alphas = summary["alphas"]
            level = th.divergence_level
            a_plain = first_exceeding(alphas, rl["none"]["median"], level)
            a_bn = first_exceeding(alphas, rl["bn"]["median"], level)
            bn_beyond = not math.isfinite(a_bn)
            amax = float(alphas[-1])
            show = lambda a: "never on the grid (> %.0e)" % amax if not math.isfinite(a) else f"{a:.2g}"
            ratio = (amax if bn_beyond else a_bn) / a_plain if math.isfinite(a_plain) else math.nan
            ok = None if not math.isfinite(a_plain) else (bn_beyond or a_bn >= th.alpha_ratio_min * a_plain)
            spread = lambda n: ", ".join(show(first_exceeding(alphas, r, level)) for r in rl[n]["per_batch"])
            out.append(verdict(
                "plain-diverges-at-smaller-alpha", ok, ratio,
                f"median relative loss over {summary['rl_batches']} batches first exceeds {level:g} at α = {show(a_plain)} "
                f"without BN and at α = {show(a_bn)} with BN (ratio {'>= ' if bn_beyond else ''}{ratio:.3g}; threshold "
                f"{th.alpha_ratio_min:g}); per batch: no norm [{spread('none')}], BN [{spread('bn')}]; loss at init (median) "
                f"{rl['none']['loss_at_init_median']:.3g} vs {rl['bn']['loss_at_init_median']:.3g}",
                f"α*_BN ≥ {th.alpha_ratio_min:g} · α*_plain, α* the first α where the median relative loss > {level:g} "
                f"(BN never above it on the grid counts as larger); inconclusive if the plain net's never is"))
        # (2) small LR
        small = summary["small_lr"]
        if all(_arm(n, small) in arms for n in ("bn", "none")):
            a_bn, a_pl = _acc(arms[_arm("bn", small)], chance), _acc(arms[_arm("none", small)], chance)
            diff = a_bn - a_pl
            trained = max(a_bn, a_pl) >= chance + th.trains_margin
            ok = None if not trained else abs(diff) <= th.comparable_tol
            note = "" if trained else f"; neither net reaches chance + {th.trains_margin:.0%} in this budget"
            best = {n: max(((_acc(a, chance), a["lr"]) for a in arms.values() if a["norm"] == n), default=(math.nan, None))
                    for n in ("bn", "none")}
            note += (f" (for scale, best over the LR grid: BN {best['bn'][0]:.1%} at lr {best['bn'][1]:g}, no norm "
                     f"{best['none'][0]:.1%} at lr {best['none'][1]:g})")
            out.append(verdict("comparable-at-small-lr", ok, diff,
                               f"lr {small:g}, {epochs:g} epochs: BN {a_bn:.1%}, no norm {a_pl:.1%} "
                               f"(difference {diff * 100:+.1f} points; threshold ±{th.comparable_tol * 100:.0f}){note}",
                               f"|acc_BN − acc_plain| ≤ {th.comparable_tol * 100:g} points at lr {small:g}; inconclusive "
                               f"if neither net reaches chance + {th.trains_margin * 100:g} points"))
        # (3) large LR
        large = summary["large_lr"]
        if all(_arm(n, large) in arms for n in ("bn", "none")):
            b, p = arms[_arm("bn", large)], arms[_arm("none", large)]
            a_bn, a_pl = _acc(b, chance), _acc(p, chance)
            diff = a_bn - a_pl
            how = lambda a: f"diverged at step {a['diverged_at']}" if a["diverged"] else "trained"
            out.append(verdict("bn-better-at-large-lr", (not b["diverged"]) and diff >= th.better_margin, diff,
                               f"lr {large:g}, {epochs:g} epochs: BN {a_bn:.1%} ({how(b)}), no norm {a_pl:.1%} "
                               f"({how(p)}) (difference {diff * 100:+.1f} points; threshold {th.better_margin * 100:.0f})",
                               f"BN not diverged and acc_BN − acc_plain ≥ {th.better_margin * 100:g} points at lr {large:g} "
                               f"(a net without a finite accuracy counts at chance)"))
        return out

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        from ..plotting import STYLE, accuracy_vs_lr, learning_curves, plt, save

        cfg = run.read_json("config.json")["config"]
        summary = run.read_json("summary.json")
        th = _applied_thresholds(run)
        arms, chance = summary["arms"], summary["chance"]
        paths = [_fig_relative_loss(cfg, run.load_arrays("relative_loss.npz"), th.divergence_level,
                                    run.figure_path("relative_loss.png"))]
        # accuracy against learning rate
        series = []
        for norm in cfg["norms"]:
            pts = sorted((a["lr"], a) for a in arms.values() if a["norm"] == norm)
            if pts:
                series.append({"label": _label(norm), "norm": norm, "lrs": [lr for lr, _ in pts],
                               "acc": [_acc(a, chance) for _, a in pts], "diverged": [bool(a["diverged"]) for _, a in pts]})
        with plt.rc_context(STYLE):
            fig, ax = plt.subplots(figsize=(6.0, 3.8))
            accuracy_vs_lr(ax, series, chance=chance, xlabel="learning rate (SGD, momentum %g)" % cfg["momentum"],
                           marks=((cfg["small_lr"], "small"), (cfg["large_lr"], "large")),
                           title=f"{cfg['model']}-{cfg['depth']} on {cfg['data']}, {cfg['epochs']:g} epochs per run")
            paths.append(save(fig, run.figure_path("accuracy_vs_lr.png")))
        # learning curves at the small LR, the largest LR where the plain net trains, the large LR
        recs = run.metrics()
        lr_plain, _ = largest_trained_lr(cfg["lrs"], arms, "none", chance, th.trains_margin)
        chosen = [(cfg["small_lr"], ":", "small LR")]
        if lr_plain is not None and lr_plain not in (cfg["small_lr"], cfg["large_lr"]):
            chosen.append((lr_plain, "--", "largest LR where the plain net trains"))
        chosen.append((cfg["large_lr"], "-", "large LR"))
        curves = []
        for lr, ls, what in chosen:
            for norm in cfg["norms"]:
                arm = _arm(norm, lr)
                steps = [r for r in recs if r.get("arm") == arm and r.get("event") is None and "loss" in r]
                evals = [r for r in recs if r.get("arm") == arm and r.get("event") == "eval"]
                curves.append({
                    "label": f"{_label(norm)}, lr {lr:g} ({what})", "norm": norm, "linestyle": ls,
                    "steps": [r["step"] for r in steps],
                    "loss": [r["loss"] if r["loss"] is not None else math.nan for r in steps],
                    "eval_steps": [r["step"] for r in evals],
                    "test_acc": [r["test_acc"] if r.get("test_acc") is not None else math.nan for r in evals],
                    "diverged_at": arms.get(arm, {}).get("diverged_at"),
                })
        title = f"{cfg['model']}-{cfg['depth']} on {cfg['data']}, SGD momentum {cfg['momentum']:g}"
        paths.append(learning_curves(curves, run.figure_path("learning_curves.png"), title=title))
        return paths


# ----------------------------------------------------------------------------- verdict helpers
def _applied_thresholds(run: RunDir) -> Thresholds:
    """The thresholds the run was last judged with (``verdicts.json``), else the defaults."""
    try:
        return from_dict(Thresholds, run.read_json("verdicts.json")["thresholds"])
    except (OSError, KeyError, TypeError, ValueError):  # not judged yet, or fields renamed since
        return Thresholds()


def _acc(a: Optional[dict], chance: float) -> float:
    """Final test accuracy; a net without a finite accuracy (non-finite weights) counts at chance."""
    if a is None:
        return math.nan
    v = a.get("test_acc")
    return float(v) if v is not None and math.isfinite(v) else chance


def largest_trained_lr(lrs, arms: dict, norm: str, chance: float, trains_margin: float):
    """``(lr, trains)``: the largest of ``lrs`` at which ``norm`` trains (its arm ``"<norm>@<lr>"``
    in ``arms`` did not diverge and reached accuracy >= chance + ``trains_margin``), with
    ``trains=True``; if none does, the largest LR at which it did not diverge, with
    ``trains=False``; ``(None, False)`` if all diverged."""
    lrs = sorted(lrs)
    ok = [lr for lr in lrs if (a := arms.get(_arm(norm, lr))) and not a["diverged"] and _acc(a, chance) >= chance + trains_margin]
    if ok:
        return ok[-1], True
    stable = [lr for lr in lrs if (a := arms.get(_arm(norm, lr))) and not a["diverged"]]
    return (stable[-1], False) if stable else (None, False)


# ----------------------------------------------------------------------------- figures
def _fig_relative_loss(cfg: dict, npz: dict, level: float, path):
    from ..plotting import STYLE, color_for, plt, save

    alphas = npz["alphas"]
    cap = 1e3
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, norm in enumerate(cfg["norms"]):
            rel = npz[f"rel_{norm}"]
            r = np.where(np.isfinite(rel), rel, np.inf)
            med = median_curve(rel)
            lo, hi = r.min(axis=0), r.max(axis=0)
            c = color_for(norm, i)
            clip = lambda v: np.minimum(v, cap)
            ax.fill_between(alphas, clip(lo), clip(hi), color=c, alpha=0.18, lw=0)
            ax.plot(alphas, clip(med), color=c, marker="o", ms=3, label=f"{_label(norm)}: median over {rel.shape[0]} batches (band: min–max)")
            over = med > cap
            if over.any():
                ax.plot(alphas[over], np.full(over.sum(), cap), ls="none", marker="^", color=c, ms=6)
            a_star = first_exceeding(alphas, med, level)
            if math.isfinite(a_star):
                ax.axvline(a_star, color=c, ls=":", lw=1.2)
                ax.annotate(f"α* = {a_star:.2g}", (a_star, 0.03 if norm == "bn" else 0.1), xycoords=("data", "axes fraction"),
                            color=c, fontsize=8, rotation=90, ha="right", va="bottom")
        ax.axhline(level, color="k", lw=0.9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(top=cap * 2)
        ax.set_xlabel("step size α")
        ax.set_ylabel("relative loss  L_B(w − α∇L_B) / L_B(w)")
        ax.set_title(f"One gradient step at initialization, {cfg['model']}-{cfg['depth']} on {cfg['data']}\n"
                     f"(▲: median above {cap:g} or not finite; > {level:g}: the step diverged)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        return save(fig, path)
