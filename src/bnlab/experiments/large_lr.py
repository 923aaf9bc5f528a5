"""``large-lr``: BatchNorm lets the same net train at a learning rate where the plain net fails.

The same convnet, with and without BatchNorm, trained with SGD + momentum at a small and at a
large learning rate on the same data, from ``seeds`` initializations (seeds ``seed, seed+1, ...``;
the split and the batch order are those of ``seed``, shared by every run). Each net's two learning
rates and all its seeds are the members of one vectorized :func:`bnlab.sweep.sweep`. This is the
simplest face of the claims of Santurkar et al. (2018) ("BN tolerates larger LRs, e.g. 0.5 where the
plain net fails", CLAIMS.md S1) and Bjorck et al. (2018) ("BN is what allows large learning rates
without divergence"; at a small LR both nets reach comparable accuracy, B2).

**Claims** (rules fixed before the run; numbers in :class:`Thresholds`; a diverged run counts as
accuracy 0, and every comparison is of the mean over seeds, reported with its spread):

* ``bn-trains-at-large-lr`` (S1): holds if BN's mean final test accuracy at ``large_lr`` is at least
  ``bn_min_acc`` and no BN seed diverged; fails otherwise. Precondition (else inconclusive): the
  large LR is one where the plain net fails (every plain seed diverged or ended at or below
  ``plain_max_acc``).
* ``plain-fails-at-large-lr``: holds if every plain seed diverged or ended at or below
  ``plain_max_acc`` at ``large_lr``; fails otherwise. Precondition: the plain net trains at the
  small LR (mean ≥ ``bn_min_acc - small_lr_slack``), else inconclusive.
* ``comparable-at-small-lr`` (B2): holds if ``|mean BN − mean plain| ≤ parity_tol`` at ``small_lr``;
  fails otherwise; inconclusive only if neither net trains there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np

from .. import data as data_mod
from .. import models
from ..plotting import learning_curves
from ..runs import RunDir
from ..sweep import sweep
from .base import Claim, Context, Experiment, fmt, register_experiment, seed_spread, verdict
from .common import SGDConfig

__all__ = ["LargeLR", "Config", "Thresholds", "accuracies", "seed_list"]

LR_NAMES = ("small_lr", "large_lr")


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``large-lr`` trains (hashed: names the run)."""

    norms: tuple[str, ...] = ("bn", "none")
    """The normalizations compared; ``bn`` and ``none`` are the ones judged."""
    small_lr: float = 0.02
    """The small learning rate, where both nets should train."""
    large_lr: float = 0.5
    """The large learning rate, where only BN should train."""
    epochs: float = 10.0
    """Passes over the training set per run."""
    seeds: int = 3
    """Initializations per net and learning rate: seeds ``seed, seed+1, ...`` (the split and the batch order stay those of ``seed``)."""

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``large-lr``'s decision rules."""

    bn_min_acc: float = 0.9
    """A net "trains" when its mean final test accuracy reaches this: 10 classes (chance 10%), and a small convnet reaches ~97% on digits, so 90% separates training from a partial failure."""
    plain_max_acc: float = 0.5
    """The plain net "fails" at the large LR in a seed that diverges or ends at or below this accuracy: halfway between chance and training, far from both."""
    small_lr_slack: float = 0.1
    """The plain net "trains at the small LR" (the precondition of plain-fails-at-large-lr; B2's "trains") when its mean reaches ``bn_min_acc`` minus this (80%): a small LR may not have converged in the budget."""
    parity_tol: float = 0.03
    """B2's "comparable": the two nets' mean test accuracies at the small LR differ by at most 3 points (about 11 test images of digits' 360), a third of the gap that counts as failing to train."""


def seed_list(cfg) -> list[int]:
    """The initialization seeds of a ``Config``: ``seed, seed+1, ..., seed+seeds-1``."""
    return [cfg.seed + k for k in range(cfg.seeds)]


def accuracies(arm: dict) -> list[float]:
    """An arm's final test accuracy per seed, a diverged seed counted as 0 (NaN counted as 0 too)."""
    return [0.0 if d or not (isinstance(a, (int, float)) and math.isfinite(a)) else float(a)
            for a, d in zip(arm["test_acc"], arm["diverged"])]


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


@register_experiment
class LargeLR(Experiment):
    name = "large-lr"
    title = "Large learning rates: BatchNorm trains where the plain net fails"
    source = "Santurkar et al. 2018; Bjorck et al. 2018"
    description = (
        "The same convnet with and without BatchNorm, SGD with momentum, at a small and at a large learning rate, "
        "from several initializations. Learning curves (mean and min-max over seeds); test accuracy at the end."
    )
    claims = (
        Claim("bn-trains-at-large-lr", "With BatchNorm the net trains at a large learning rate where the plain net fails.",
              "Santurkar et al. 2018", "mean over seeds of the BN net's final test accuracy at large_lr (diverged = 0)",
              "holds if mean >= bn_min_acc and no seed diverged; inconclusive unless every plain seed fails there",
              ref="S1"),
        Claim("plain-fails-at-large-lr", "Without normalization the same net fails at that learning rate.", "Bjorck et al. 2018",
              "final test accuracy of the plain net at large_lr, every seed (diverged counts as failed)",
              "holds if every seed diverged or <= plain_max_acc; inconclusive unless the plain net trains at small_lr"),
        Claim("comparable-at-small-lr", "At a small learning rate the BN and the plain net reach comparable accuracy.",
              "Bjorck et al. 2018", "difference of the mean final test accuracies at small_lr, BN - plain",
              "holds if |difference| <= parity_tol; inconclusive only if neither net trains", ref="B2"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(width=4, epochs=2.0, seeds=2),
        "quick": Config(),
        "paper": Config(data="cifar10", model="vgg", width=64, depth=11, small_lr=0.01, epochs=30.0),
    }
    thresholds = {"paper": Thresholds(bn_min_acc=0.8)}
    #: a smoke run (:func:`bnlab.paper.smoke_config`): one seed of each net
    smoke_cuts = {"seeds": lambda v: 1}

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        seeds = seed_list(cfg)
        lrs = [cfg.small_lr, cfg.large_lr]
        make = partial(models.make, cfg.model, in_shape=tr.in_shape, num_classes=tr.num_classes, width=cfg.width, depth=cfg.depth)
        arms: dict = {}
        info: dict = {}
        for norm in cfg.norms:
            res = sweep(partial(make, norm=norm), tr, lrs=lrs, seeds=seeds, epochs=cfg.epochs, batch_size=cfg.batch_size,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, data_seed=cfg.seed, eval_data=te,
                        eval_every=tr.steps_per_epoch(cfg.batch_size), eval_train=False, device=ctx.device, progress=bool(ctx.progress),
                        name=f"{self.name} {norm}")
            info[norm] = {"seconds": round(res.seconds, 1), "vectorized": res.vectorized, "fallback_reason": res.fallback_reason}
            for lr_name, lr in zip(LR_NAMES, lrs):
                arm = f"{norm}@{lr_name}"
                rows = []
                for i in range(len(res)):
                    if res.lrs[i] != lr:
                        continue
                    for r in res.metric_records(i):
                        run.append_metrics({"arm": arm, "seed": res.seeds[i], **r})
                    s = {k: v for k, v in res.summary(i).items() if k != "seconds"}
                    run.append_metrics({"event": "arm_end", "arm": arm, **s})
                    rows.append(s)
                arms[arm] = {"norm": norm, "lr": lr, "seeds": [r["seed"] for r in rows],
                             **{k: [r.get(k, math.nan) for r in rows] for k in ("test_acc", "diverged", "diverged_at", "steps")}}
        return {"arms": arms, "small_lr": cfg.small_lr, "large_lr": cfg.large_lr, "norms": list(cfg.norms), "seeds": seeds,
                "sweep": info}

    def judge(self, summary: dict, th: Thresholds) -> list:
        arms = summary["arms"]
        big_bn, big_plain = arms.get("bn@large_lr"), arms.get("none@large_lr")
        small_bn, small_plain = arms.get("bn@small_lr"), arms.get("none@small_lr")
        floor = th.bn_min_acc - th.small_lr_slack
        lr_s, lr_l = fmt(summary["small_lr"]), fmt(summary["large_lr"])
        out = []

        plain_small_ok = None if small_plain is None else _mean(accuracies(small_plain)) >= floor
        plain_small = ("no plain run at the small LR" if small_plain is None else
                       f"the plain net at lr {lr_s} reaches {_mean(accuracies(small_plain)):.1%} (mean)")
        plain_fails = None
        if big_plain is not None:
            accs = accuracies(big_plain)
            failed = [d or a <= th.plain_max_acc for a, d in zip(accs, big_plain["diverged"])]
            plain_fails = all(failed)
            how = ", ".join("diverged" if d else f"{a:.1%}" for a, d in zip(accs, big_plain["diverged"]))
            ok = None if not plain_small_ok else plain_fails
            why = "" if plain_small_ok else f"; inconclusive: {plain_small}, below {floor:.0%}: it fails at every LR"
            plain_verdict = verdict(
                "plain-fails-at-large-lr", ok, _mean(accs),
                f"plain net at lr {lr_l}: {sum(failed)} of {len(failed)} seeds failed (per seed: {how}){why}",
                f"every seed diverged or test accuracy ≤ {th.plain_max_acc:.0%}; inconclusive unless the plain net's mean at "
                f"lr {lr_s} ≥ {floor:.0%}", spread=seed_spread(accs, unit="%", scale=100))

        if big_bn is not None:
            accs = accuracies(big_bn)
            mean, n_div = _mean(accs), sum(bool(d) for d in big_bn["diverged"])
            trains = n_div == 0 and mean >= th.bn_min_acc
            missing = []
            if plain_fails is not True:
                missing.append("the plain net does not fail at this LR in every seed" if plain_fails is False else "no plain run at the large LR")
            detail = (f"BN net at lr {lr_l}: mean test accuracy {mean:.1%} over {len(accs)} seeds, {n_div} diverged; "
                      f"plain net there: {'fails' if plain_fails else 'does not fail' if plain_fails is False else '—'}; {plain_small}")
            if missing:
                detail += "; inconclusive: " + "; ".join(missing)
            out.append(verdict(
                "bn-trains-at-large-lr", None if missing else trains, mean, detail,
                f"no BN seed diverged and mean test accuracy ≥ {th.bn_min_acc:.0%}; inconclusive unless every plain seed fails "
                f"(diverged or ≤ {th.plain_max_acc:.0%}) at lr {lr_l}",
                spread=seed_spread(accs, unit="%", scale=100)))
        if big_plain is not None:
            out.append(plain_verdict)  # in the order of the claims

        if small_bn is not None and small_plain is not None:
            a_bn, a_pl = accuracies(small_bn), accuracies(small_plain)
            m_bn, m_pl = _mean(a_bn), _mean(a_pl)
            diff = m_bn - m_pl
            neither = not (m_bn >= floor) and not (m_pl >= floor)
            ok = None if neither else abs(diff) <= th.parity_tol
            paired = [b - p for b, p in zip(a_bn, a_pl)]
            out.append(verdict(
                "comparable-at-small-lr", ok, diff,
                f"at lr {lr_s}: BN {m_bn:.1%} ({seed_spread(a_bn, unit='%', scale=100)}), plain {m_pl:.1%} "
                f"({seed_spread(a_pl, unit='%', scale=100)}); BN − plain {100 * diff:+.1f} points"
                + ("; inconclusive: neither net trains" if neither else ""),
                f"|mean BN − mean plain| ≤ {fmt(100 * th.parity_tol)} points; inconclusive only if neither mean reaches {floor:.0%}",
                spread="BN − plain per seed: " + seed_spread(paired, unit=" points", scale=100)))
        return out

    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        return [_fig_curves(cfg, run.metrics(), run.figure_path("learning_curves.png"))]


def _band(records: list[dict], key: str, seeds: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps and the mean, min and max over seeds of ``key`` (NaN where a seed has no value)."""
    per = {}
    for r in records:
        if key in r and r[key] is not None:
            per.setdefault(r["step"], {})[r.get("seed")] = float(r[key])
    steps = np.array(sorted(per), dtype=float)
    vals = np.array([[per[s].get(sd, np.nan) for sd in seeds] for s in sorted(per)], dtype=float).reshape(len(steps), len(seeds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (a diverged seed's steps)
        return steps, np.nanmean(vals, 1), np.nanmin(vals, 1), np.nanmax(vals, 1)


def _fig_curves(cfg: dict, recs: list[dict], path):
    """Learning curves of every arm: the mean over seeds, shaded min–max, a dotted line where a seed diverged."""
    seeds = [cfg["seed"] + k for k in range(cfg.get("seeds", 1))]
    arms = []
    for lr_name, ls in (("small_lr", "--"), ("large_lr", "-")):
        for norm in cfg["norms"]:
            arm = f"{norm}@{lr_name}"
            steps = [r for r in recs if r.get("arm") == arm and "event" not in r and "loss" in r]
            evals = [r for r in recs if r.get("arm") == arm and r.get("event") == "eval"]
            if not steps:
                continue
            s, loss, loss_lo, loss_hi = _band(steps, "loss", seeds)
            e, acc, acc_lo, acc_hi = _band(evals, "test_acc", seeds)
            arms.append({"label": f"{'BN' if norm == 'bn' else norm}, lr {cfg[lr_name]}", "norm": norm, "linestyle": ls,
                         "steps": s, "loss": loss, "loss_lo": loss_lo, "loss_hi": loss_hi,
                         "eval_steps": e, "test_acc": acc, "acc_lo": acc_lo, "acc_hi": acc_hi,
                         "diverged_at": [r["step"] for r in steps if r.get("diverged")]})
    title = (f"{cfg['model']} on {cfg['data']}, SGD momentum {cfg['momentum']}: mean and min–max over "
             f"{len(seeds)} seeds (dotted: a seed diverged)")
    return learning_curves(arms, path, title=title)
