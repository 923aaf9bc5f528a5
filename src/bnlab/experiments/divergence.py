"""``divergence``: without BatchNorm a large step increases the loss; BN is what allows large LRs.

Bjorck, Gomes, Selman, Weinberger, *Understanding Batch Normalization* (NeurIPS 2018).

**Relative loss at initialization.** For the same deep residual net with and without BatchNorm
(``preresnet``, He initialization, same seed), on ``rl_batches`` minibatches ``B`` of the training
set, the loss after one gradient step of size ``α`` relative to the loss before, on the same
batch, for ``α`` on a log grid::

    r_B(α) = L_B(w_0 - α ∇L_B(w_0)) / L_B(w_0)

(:func:`bnlab.sweep.relative_loss`: BN in train mode normalizes with the batch's statistics at
each point; the model is left unchanged). ``r > 1`` means the step diverged. The median over the
batches and its spread (min to max) are drawn against ``α``; ``α*`` is the first grid value at
which the median exceeds 1 (non-finite counts as exceeding). Bjorck et al. find ``α* ≈ 1e-3``
without BN (ResNet-110, CIFAR-10) and no divergence with BN over a much wider range.

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

**Claims and thresholds** (fixed before running):

* ``plain-diverges-at-smaller-alpha``: ``α*_BN >= alpha_ratio_min · α*_plain`` (default: BN's
  stable range is at least a decade wider). If BN's median never exceeds 1 on the grid its
  ``α*`` is taken as beyond the grid (a lower bound). Inconclusive if the plain net's median
  never exceeds 1 either.
* ``comparable-at-small-lr``: ``|acc_BN - acc_plain| <= comparable_tol`` at ``small_lr``;
  inconclusive when neither net trains there (both below chance + ``trains_margin``).
* ``bn-better-at-large-lr``: ``acc_BN - acc_plain >= better_margin`` at ``large_lr``; a plain net
  whose weights became non-finite counts at chance.
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from .. import models
from ..runs import RunDir
from . import Claim, Experiment, Result, judge, register_experiment

SOURCE = "Bjorck et al. 2018"

_QUICK = dict(
    data="mnist1d", model="preresnet", depth=26, width=8, norms=["bn", "none"], seed=0,
    alpha_min=1e-6, alpha_max=1e2, n_alphas=25, rl_batches=8, rl_batch_size=128,
    lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], small_lr=1e-4, large_lr=0.1,
    momentum=0.9, weight_decay=0.0, batch_size=128, epochs=8.0,
    alpha_ratio_min=10.0, comparable_tol=0.05, better_margin=0.10, trains_margin=0.10,
)


def first_exceeding(alphas: np.ndarray, rel: np.ndarray, level: float = 1.0) -> float:
    """The first ``α`` at which ``rel`` exceeds ``level`` (non-finite counts); ``nan`` if none."""
    bad = ~np.isfinite(rel) | (rel > level)
    idx = np.flatnonzero(bad)
    return float(alphas[idx[0]]) if idx.size else math.nan


def median_curve(rel: np.ndarray) -> np.ndarray:
    """Median over batches (rows), with non-finite values counted as +inf (a diverged step)."""
    r = np.where(np.isfinite(rel), rel, np.inf)
    return np.median(r, axis=0)


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
    profiles = {
        "tiny": {**_QUICK, "data": "digits", "depth": 8, "width": 4, "alpha_min": 1e-4, "n_alphas": 9, "rl_batches": 2,
                 "rl_batch_size": 64, "lrs": [1e-3, 1e-1], "small_lr": 1e-3, "epochs": 1.0},
        "quick": dict(_QUICK),
        "paper": {**_QUICK, "data": "cifar10", "depth": 110, "width": 16, "rl_batches": 16, "n_alphas": 33, "epochs": 100.0},
    }

    # ------------------------------------------------------------------ run
    def run(self, cfg: dict, run: RunDir, *, device: str = "auto", progress: bool = True) -> Result:
        from ..sweep import relative_loss, sweep
        from ..train import resolve_device

        t_start = time.perf_counter()
        for key in ("small_lr", "large_lr"):
            if cfg[key] not in cfg["lrs"]:
                from ..errors import UserError

                raise UserError(f"divergence: {key}={cfg[key]!r} must be one of lrs={cfg['lrs']}")
        dev = resolve_device(device)
        tr, te = data_mod.load_pair(cfg["data"], seed=cfg["seed"])
        chance = 1.0 / tr.num_classes
        make = partial(models.make, cfg["model"], in_shape=tr.in_shape, num_classes=tr.num_classes,
                       width=cfg["width"], depth=cfg["depth"])

        # (1) relative loss at initialization, several batches
        alphas = np.logspace(math.log10(cfg["alpha_min"]), math.log10(cfg["alpha_max"]), cfg["n_alphas"])
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        batches = []
        for x, y in tr.batches(cfg["rl_batch_size"], shuffle=True, generator=gen, drop_last=True):
            batches.append((x.to(dev), y.to(dev)))
            if len(batches) == cfg["rl_batches"]:
                break
        run.write({"event": "meta", "chance": chance, "num_classes": tr.num_classes, "steps_per_epoch": tr.steps_per_epoch(cfg["batch_size"])})
        rel, loss0, rl_summary = {}, {}, {}
        t0 = time.perf_counter()
        for norm in cfg["norms"]:
            net = make(norm=norm, seed=cfg["seed"]).to(dev).train()
            rows, l0 = [], []
            for b in batches:
                rows.append(relative_loss(net, b, F.cross_entropy, alphas).numpy())
                with torch.no_grad():
                    l0.append(float(F.cross_entropy(net(b[0]), b[1])))
            rel[norm] = np.stack(rows)
            loss0[norm] = np.asarray(l0)
            med = median_curve(rel[norm])
            per_batch = [first_exceeding(alphas, r) for r in rel[norm]]
            rl_summary[norm] = {
                "alpha_star_median": first_exceeding(alphas, med),
                "alpha_star_per_batch": per_batch,
                "loss_at_init_median": float(np.median(loss0[norm])),
                "min_median_relative_loss": float(np.min(med)),
                "alpha_at_min": float(alphas[int(np.argmin(med))]),
            }
            run.write({"event": "relative_loss", "norm": norm, **rl_summary[norm]})
        rl_seconds = time.perf_counter() - t0
        run.save_arrays("relative_loss.npz", alphas=alphas, **{f"rel_{n}": rel[n] for n in cfg["norms"]},
                 **{f"loss0_{n}": loss0[n] for n in cfg["norms"]})

        # (2) accuracy against learning rate: all LRs of one net at once
        steps_per_epoch = tr.steps_per_epoch(cfg["batch_size"])
        arms: dict = {}
        sweep_info = {}
        for norm in cfg["norms"]:
            res = sweep(partial(make, norm=norm), tr, lrs=cfg["lrs"], seeds=[cfg["seed"]], epochs=cfg["epochs"],
                        batch_size=cfg["batch_size"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                        data_seed=cfg["seed"], eval_data=te, eval_every=steps_per_epoch, eval_train=False,
                        device=str(dev), progress=bool(progress))
            sweep_info[norm] = {"seconds": round(res.seconds, 1), "vectorized": res.vectorized, "fallback_reason": res.fallback_reason}
            for i in range(len(res)):
                lr = res.lrs[i]
                arm = _arm(norm, lr)
                h = res.history(i)
                for r in h.records:
                    run.write({"arm": arm, **r})
                for e in h.evals:
                    run.write({"arm": arm, "event": "eval", **e})
                s = {**res.summary(i), "norm": norm}
                s.pop("seconds", None)
                run.write({"arm": arm, "event": "arm_end", **s})
                arms[arm] = s
        summary = {
            "relative_loss": rl_summary, "relative_loss_seconds": round(rl_seconds, 1), "sweep": sweep_info,
            "arms": arms, "chance": chance,
        }
        verdicts, numbers = _judge(cfg, alphas, rl_summary, arms, chance)
        summary.update(numbers)
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        return Result(summary=summary, verdicts=verdicts)

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        recs = run.metrics()
        arms = {r["arm"]: r for r in recs if r.get("event") == "arm_end"}
        chance = next((r["chance"] for r in recs if r.get("event") == "meta"), 0.1)
        paths = [
            _fig_relative_loss(cfg, run.load_arrays("relative_loss.npz"), run.figure_path("relative_loss.png")),
            _fig_acc_vs_lr(cfg, arms, chance, run.figure_path("accuracy_vs_lr.png")),
            _fig_learning_curves(cfg, recs, arms, chance, run.figure_path("learning_curves.png")),
        ]
        return paths


# ----------------------------------------------------------------------------- verdicts
def _acc(a: dict | None, chance: float) -> float:
    """Final test accuracy; a net without a finite accuracy (non-finite weights) counts at chance."""
    if a is None:
        return math.nan
    v = a.get("test_acc")
    return float(v) if v is not None and math.isfinite(v) else chance


def largest_trained_lr(cfg: dict, arms: dict, norm: str, chance: float):
    """The largest LR at which ``norm`` trains (not diverged, accuracy >= chance + trains_margin);
    if none does, the largest LR at which it did not diverge; ``None`` if all diverged."""
    lrs = sorted(cfg["lrs"])
    ok = [lr for lr in lrs if (a := arms.get(_arm(norm, lr))) and not a["diverged"] and _acc(a, chance) >= chance + cfg["trains_margin"]]
    if ok:
        return ok[-1], True
    stable = [lr for lr in lrs if (a := arms.get(_arm(norm, lr))) and not a["diverged"]]
    return (stable[-1], False) if stable else (None, False)


def _judge(cfg: dict, alphas: np.ndarray, rl: dict, arms: dict, chance: float):
    verdicts, numbers = [], {}
    # (1) relative loss
    if "bn" in rl and "none" in rl:
        a_plain, a_bn = rl["none"]["alpha_star_median"], rl["bn"]["alpha_star_median"]
        bn_beyond = not math.isfinite(a_bn)
        amax = float(alphas[-1])
        fmt = lambda a: "never on the grid (> %.0e)" % amax if not math.isfinite(a) else f"{a:.2g}"
        ratio = (amax if bn_beyond else a_bn) / a_plain if math.isfinite(a_plain) else math.nan
        numbers["alpha_star"] = {"none": a_plain, "bn": a_bn, "ratio": ratio, "bn_beyond_grid": bn_beyond}
        ok = None if not math.isfinite(a_plain) else (bn_beyond or a_bn >= cfg["alpha_ratio_min"] * a_plain)
        spread = lambda n: ", ".join(fmt(v) for v in rl[n]["alpha_star_per_batch"])
        verdicts.append(judge(
            "plain-diverges-at-smaller-alpha", ok, ratio,
            f"median relative loss over {cfg['rl_batches']} batches first exceeds 1 at α = {fmt(a_plain)} without BN and at "
            f"α = {fmt(a_bn)} with BN (ratio {'>= ' if bn_beyond else ''}{ratio:.3g}; threshold {cfg['alpha_ratio_min']:g}); "
            f"per batch: no norm [{spread('none')}], BN [{spread('bn')}]; loss at init (median) "
            f"{rl['none']['loss_at_init_median']:.3g} vs {rl['bn']['loss_at_init_median']:.3g}"))
    # (2) small LR
    if all(_arm(n, cfg["small_lr"]) in arms for n in ("bn", "none")):
        a_bn, a_pl = _acc(arms[_arm("bn", cfg["small_lr"])], chance), _acc(arms[_arm("none", cfg["small_lr"])], chance)
        diff = a_bn - a_pl
        trained = max(a_bn, a_pl) >= chance + cfg["trains_margin"]
        ok = None if not trained else abs(diff) <= cfg["comparable_tol"]
        note = "" if trained else f"; neither net reaches chance + {cfg['trains_margin']:.0%} in this budget"
        best = {n: max(((_acc(a, chance), a["lr"]) for a in arms.values() if a["norm"] == n), default=(math.nan, None)) for n in ("bn", "none")}
        note += (f" (for scale, best over the LR grid: BN {best['bn'][0]:.1%} at lr {best['bn'][1]:g}, no norm "
                 f"{best['none'][0]:.1%} at lr {best['none'][1]:g})")
        numbers["small_lr"] = {"lr": cfg["small_lr"], "acc_bn": a_bn, "acc_none": a_pl, "diff": diff}
        verdicts.append(judge("comparable-at-small-lr", ok, diff,
                              f"lr {cfg['small_lr']:g}, {cfg['epochs']:g} epochs: BN {a_bn:.1%}, no norm {a_pl:.1%} "
                              f"(difference {diff * 100:+.1f} points; threshold ±{cfg['comparable_tol'] * 100:.0f}){note}"))
    # (3) large LR
    if all(_arm(n, cfg["large_lr"]) in arms for n in ("bn", "none")):
        b, p = arms[_arm("bn", cfg["large_lr"])], arms[_arm("none", cfg["large_lr"])]
        a_bn, a_pl = _acc(b, chance), _acc(p, chance)
        diff = a_bn - a_pl
        how = lambda a: f"diverged at step {a['diverged_at']}" if a["diverged"] else "trained"
        numbers["large_lr"] = {"lr": cfg["large_lr"], "acc_bn": a_bn, "acc_none": a_pl, "diff": diff,
                               "bn_diverged_at": b["diverged_at"], "none_diverged_at": p["diverged_at"]}
        verdicts.append(judge("bn-better-at-large-lr", (not b["diverged"]) and diff >= cfg["better_margin"], diff,
                              f"lr {cfg['large_lr']:g}, {cfg['epochs']:g} epochs: BN {a_bn:.1%} ({how(b)}), no norm {a_pl:.1%} "
                              f"({how(p)}) (difference {diff * 100:+.1f} points; threshold {cfg['better_margin'] * 100:.0f})"))
    # the LRs of the learning curves
    lr_plain, trains = largest_trained_lr(cfg, arms, "none", chance)
    lr_bn, _ = largest_trained_lr(cfg, arms, "bn", chance)
    numbers["largest_lr_plain_trains"] = lr_plain if trains else None
    numbers["largest_stable_lr_plain"] = lr_plain
    numbers["largest_lr_bn_trains"] = lr_bn
    numbers["best_acc"] = {n: max((_acc(a, chance) for a in arms.values() if a["norm"] == n), default=math.nan) for n in cfg["norms"]}
    return verdicts, numbers


# ----------------------------------------------------------------------------- figures
def _fig_relative_loss(cfg: dict, npz: dict, path):
    from ..plotting import STYLE, color_for, plt, save

    alphas = npz["alphas"]
    cap = 1e3
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, norm in enumerate(cfg["norms"]):
            rel = npz[f"rel_{norm}"]
            r = np.where(np.isfinite(rel), rel, np.inf)
            med = np.median(r, axis=0)
            lo, hi = r.min(axis=0), r.max(axis=0)
            c = color_for(norm, i)
            clip = lambda v: np.minimum(v, cap)
            ax.fill_between(alphas, clip(lo), clip(hi), color=c, alpha=0.18, lw=0)
            ax.plot(alphas, clip(med), color=c, marker="o", ms=3, label=f"{_label(norm)}: median over {rel.shape[0]} batches (band: min–max)")
            over = med > cap
            if over.any():
                ax.plot(alphas[over], np.full(over.sum(), cap), ls="none", marker="^", color=c, ms=6)
            a_star = first_exceeding(alphas, med)
            if math.isfinite(a_star):
                ax.axvline(a_star, color=c, ls=":", lw=1.2)
                ax.annotate(f"α* = {a_star:.2g}", (a_star, 0.03 if norm == "bn" else 0.1), xycoords=("data", "axes fraction"),
                            color=c, fontsize=8, rotation=90, ha="right", va="bottom")
        ax.axhline(1.0, color="k", lw=0.9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(top=cap * 2)
        ax.set_xlabel("step size α")
        ax.set_ylabel("relative loss  L_B(w − α∇L_B) / L_B(w)")
        ax.set_title(f"One gradient step at initialization, {cfg['model']}-{cfg['depth']} on {cfg['data']}\n"
                     f"(▲: median above {cap:g} or not finite; > 1: the step increased the loss)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        return save(fig, path)


def _fig_acc_vs_lr(cfg: dict, arms: dict, chance: float, path):
    from ..plotting import STYLE, color_for, plt, save

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
        for i, norm in enumerate(cfg["norms"]):
            pts = sorted((a["lr"], a) for a in arms.values() if a["norm"] == norm)
            if not pts:
                continue
            lrs = [p[0] for p in pts]
            acc = [_acc(p[1], chance) * 100 for p in pts]
            c = color_for(norm, i)
            ax.plot(lrs, acc, color=c, marker="o", ms=4, label=_label(norm))
            div = [(lr, a) for lr, a, p in zip(lrs, acc, pts) if p[1]["diverged"]]
            if div:
                ax.plot([d[0] for d in div], [d[1] for d in div], ls="none", marker="x", ms=9, mew=2, color=c,
                        label=f"{_label(norm)}: diverged")
        ax.axhline(chance * 100, color="grey", lw=0.8, ls="--")
        ax.text(0.01, chance * 100 + 1, "chance", transform=ax.get_yaxis_transform(), color="grey", fontsize=7)
        for lr, txt in ((cfg["small_lr"], "small"), (cfg["large_lr"], "large")):
            ax.axvline(lr, color="grey", lw=0.6, ls=":")
            ax.text(lr, 101, txt, ha="center", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_ylim(0, 105)
        ax.set_xlabel("learning rate (SGD, momentum %g)" % cfg["momentum"])
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{cfg['model']}-{cfg['depth']} on {cfg['data']}, {cfg['epochs']:g} epochs per run", fontsize=9)
        ax.legend(fontsize=7)
        return save(fig, path)


def _fig_learning_curves(cfg: dict, recs: list[dict], arms: dict, chance: float, path):
    from ..plotting import STYLE, color_for, plt, save, smooth

    lr_plain, _ = largest_trained_lr(cfg, arms, "none", chance)
    chosen = [(cfg["small_lr"], ":", "small LR")]
    if lr_plain is not None and lr_plain not in (cfg["small_lr"], cfg["large_lr"]):
        chosen.append((lr_plain, "--", "largest LR where the plain net trains"))
    chosen.append((cfg["large_lr"], "-", "large LR"))
    cap = 50.0
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
        first_losses = []
        for lr, ls, what in chosen:
            for i, norm in enumerate(cfg["norms"]):
                arm = _arm(norm, lr)
                c = color_for(norm, i)
                steps = [r for r in recs if r.get("arm") == arm and r.get("event") is None and "loss" in r]
                evals = [r for r in recs if r.get("arm") == arm and r.get("event") == "eval"]
                label = f"{_label(norm)}, lr {lr:g} ({what})"
                loss = np.array([r["loss"] if r["loss"] is not None and math.isfinite(r["loss"]) else np.nan for r in steps])
                if len(loss):
                    first_losses.append((label, loss[0]))
                x = [r["step"] for r in steps]
                ax1.plot(x, np.minimum(smooth(loss, max(1, len(loss) // 40)), cap), color=c, ls=ls, lw=1.4, label=label)
                div = arms.get(arm, {}).get("diverged_at")
                if div is not None:
                    ax1.plot([div], [cap], marker="x", ms=8, mew=2, color=c, ls="none")
                ax2.plot([r["step"] for r in evals], [100 * (r.get("test_acc") if r.get("test_acc") is not None else np.nan) for r in evals],
                         color=c, ls=ls, marker="o", ms=3, label=label)
        ax1.set_yscale("log")
        ax1.set_ylim(top=cap * 1.5)
        ax1.set_xlabel("step")
        ax1.set_ylabel(f"training loss (moving average, cut at {cap:g})")
        ax1.set_title("x: diverged (non-finite loss or weights)", fontsize=8)
        ax2.set_xlabel("step")
        ax2.set_ylabel("test accuracy (%)")
        ax2.set_ylim(0, 100)
        ax2.axhline(chance * 100, color="grey", lw=0.8, ls="--")
        ax2.text(0.01, chance * 100 + 1, "chance", transform=ax2.get_yaxis_transform(), color="grey", fontsize=7)
        handles, labels = ax1.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.02))
        start = max((l for _, l in first_losses if math.isfinite(l)), default=math.nan)
        fig.suptitle(f"{cfg['model']}-{cfg['depth']} on {cfg['data']}, SGD momentum {cfg['momentum']:g} "
                     f"(largest loss at step 0: {start:.3g})", fontsize=9)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        return save(fig, path)
