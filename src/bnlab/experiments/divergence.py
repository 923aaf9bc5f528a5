"""``divergence``: without BatchNorm a large step increases the loss; BN's benefit is the large LRs it allows; SGD's noise grows as α²/|B|.

Bjorck, Gomes, Selman, Weinberger, *Understanding Batch Normalization* (NeurIPS 2018).

**Relative loss (B1).** For the same deep residual net with and without BatchNorm (``preresnet``,
He initialization, each of the initialization ``seeds``), on ``rl_batches`` minibatches ``B`` of
the training set, the loss after one plain gradient step of size ``α`` relative to the loss
before, on the same batch, for ``α`` on a log grid::

    r_B(α) = L_B(w - α ∇L_B(w)) / L_B(w)

(:func:`bnlab.landscape.relative_loss`: BN in train mode normalizes with the batch's statistics
at each point; the model is left unchanged). ``r > 1`` means the step diverged. ``α*`` is the
first grid value at which the median over all curves (seeds x batches) exceeds
``divergence_level`` (1; non-finite counts as exceeding). Measured at initialization **and**
after each of ``rl_steps`` updates of a training run of each net at ``small_lr`` (SGD with
momentum, the batch order of ``seed``), on the first ``rl_train_batches`` of those batches.
Bjorck et al. find ``α* ≈ 1e-3`` without BN (ResNet-110, CIFAR-10) and no divergence with BN
over a much wider range.

**Accuracy against learning rate (B2, B3).** Both nets trained with SGD + momentum over the LR
grid ``lrs`` x the initialization ``seeds`` for the same budget (``epochs``) on the same batch
sequence, all members of one net at once with :func:`bnlab.sweep.sweep` (vectorized). Final test
accuracy (mean and spread over the seeds) against LR; learning curves of the first seed at
``small_lr``, at the largest LR where the plain net trains and at ``large_lr``.

**SGD noise (B8).** The SGD step on a batch ``B`` of size ``b`` is ``−α g_B``; its squared distance
from the full-batch step ``−α ḡ``, averaged over batches drawn without replacement from the
``N`` training examples, is exactly (:mod:`bnlab.noise`) ::

    E‖α g_B − α ḡ‖² = α² · S/b · (N − b)/(N − 1),     S = (1/N) Σ_i ‖g_i − ḡ‖²

from the per-example gradients ``g_i`` (one ``vmap(grad)`` over the examples) at initialization,
for the plain net and for the BN net with its normalization frozen at the statistics of the
whole training set (so that its loss is a per-example mean), on the grid ``lrs`` x
``noise_batch_sizes``; the exponents of a least-squares power law ``c α^p_α b^p_b`` are judged.
``p_α = 2`` exactly by linearity of the step, and ``p_b`` departs from −1 only through the
finite-population factor, so this verdict checks the formula on the network rather than an
empirical law. The empirical question is the BN net **as trained**, in train mode, where each
batch normalizes with its own statistics and the loss is not a per-example mean: its step noise
is measured by sampling ``noise_sampled_batches`` batches per size
(:func:`bnlab.noise.sampled_batch_noise`) and judged by the same rule.

**Setting and why.** Quick: ``preresnet`` of depth 14 (1 + 12 + 1 weight layers), width 8, on
MNIST-1D (4000 training sequences of length 40), 3 seeds. A residual net is what Bjorck et al.
use (their plain net is ResNet-110 with the BN layers removed). Depth 14, not 26: with 3 seeds
the LR sweep of the depth-26 net does not fit the time budget, and at depth 26 the plain net
does not train at any LR of the grid within it (so B2 and B3 would compare BN with a net that
never learns); at depth 14 it does (about 56% at lr 1e-2, seed mean, in the quick budget). On the 8x8 digits the convolutions'
zero padding at 4x4 and 2x2 maps damps the growth of activations with depth; MNIST-1D's length-40
sequences keep the effect. ``small_lr`` = 1e-3 is the smallest LR of the grid (within this budget
1e-4 trains neither net); ``large_lr`` = 0.1 is Bjorck et al.'s. Paper: ResNet-110 (``preresnet``
depth 110, width 16) on CIFAR-10 with Bjorck et al.'s learning rates.

**Claims and thresholds** (:class:`Thresholds`, fixed before running):

* B1 ``plain-diverges-at-smaller-alpha-at-init``: ``α*_BN >= alpha_ratio_min · α*_plain`` at
  initialization (default: BN's stable range at least a decade wider). If BN's median never
  exceeds the level on the grid its ``α*`` is taken as beyond the grid (a lower bound).
  Inconclusive if the plain net's median never exceeds it either.
* B1 ``plain-diverges-at-smaller-alpha-during-training``: the same rule after each of
  ``rl_steps`` updates; fails if it fails at any step, inconclusive if it is undecided at one.
* B2 ``comparable-at-small-lr``: ``|mean acc_BN − mean acc_plain| <= comparable_tol`` at
  ``small_lr`` (means over the seeds); inconclusive when neither mean reaches chance + ``trains_margin``.
* B3 ``bn-benefit-from-large-lr``: BN's best mean accuracy over the grid exceeds the plain net's
  best by ``better_margin`` **and** BN's mean at ``large_lr`` exceeds its mean at ``small_lr`` by
  ``better_margin``; inconclusive when neither net trains anywhere on the grid.
* B8 ``step-noise-scales-as-alpha2-over-b`` and ``bn-step-noise-with-batch-statistics``:
  ``|p_α − 2| <= exponent_tol`` and ``|p_b + 1| <= exponent_tol``.

A run that diverges, or a net whose weights became non-finite, counts at chance accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from .. import models
from ..analysis import first_exceeding, median_curve
from ..probes.base import Probe
from ..runs import RunDir
from .base import Claim, Context, Experiment, fmt, register_experiment, seed_spread, verdict
from .runner import applied_thresholds
from .common import ResNetConfig, SGDConfig

SOURCE = "Bjorck et al. 2018"


@dataclass(frozen=True)
class Config(ResNetConfig, SGDConfig):
    """What ``divergence`` measures and trains (hashed: names the run)."""

    depth: int = 14
    """Model depth (weight layers)."""
    width: int = 8
    """Model width."""
    norms: tuple[str, ...] = ("bn", "none")
    """The normalizations compared; ``bn`` and ``none`` are the ones judged."""
    seed: int = 0
    """Seed of the split, the relative-loss batches, the batch order of every training run and the noise batches."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Initialization seeds: the relative loss, the training runs and the LR sweep are repeated from each."""
    alpha_min: float = 1e-6
    """Smallest step size α of the relative-loss grid."""
    alpha_max: float = 1e2
    """Largest step size α of the relative-loss grid."""
    n_alphas: int = 25
    """Number of α on the log grid from ``alpha_min`` to ``alpha_max``."""
    rl_batches: int = 4
    """Minibatches the relative loss is measured on at initialization, per seed (the median over seeds x batches is judged)."""
    rl_batch_size: int = 128
    """Examples per relative-loss minibatch."""
    rl_steps: tuple[int, ...] = (1, 4, 16)
    """Updates of a training run at ``small_lr`` after which the relative loss is measured again."""
    rl_train_batches: int = 2
    """Minibatches per seed for the relative loss during training (the first ones of the initialization's)."""
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    """The learning-rate grid of the accuracy sweep (and the step sizes α of the noise grid)."""
    small_lr: float = 1e-3
    """The small learning rate (one of ``lrs``), where both nets should be comparable."""
    large_lr: float = 0.1
    """The large learning rate (one of ``lrs``), where BN should be clearly better."""
    epochs: float = 5.0
    """Passes over the training set per run (the same budget for every LR and seed)."""
    noise_examples: int = 0
    """Training examples the SGD noise is measured on (the population batches are drawn from); 0: all of them."""
    noise_batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    """The batch sizes b of the noise grid."""
    noise_sampled_batches: int = 16
    """Batches sampled per batch size for the BN net in train mode (its step noise has no closed form)."""

    def __post_init__(self) -> None:
        for key in ("small_lr", "large_lr"):
            if getattr(self, key) not in self.lrs:
                raise ValueError(f"divergence: {key}={getattr(self, key)!r} must be one of lrs={list(self.lrs)}")
        if not self.seeds:
            raise ValueError("divergence: seeds must hold at least one seed")
        if any(t < 1 for t in self.rl_steps):
            raise ValueError(f"divergence: rl_steps must be >= 1 (step 0 is the initialization), got {list(self.rl_steps)}")
        if any(b < 1 for b in self.noise_batch_sizes):
            raise ValueError(f"divergence: noise_batch_sizes must be >= 1, got {list(self.noise_batch_sizes)}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``divergence``'s decision rules."""

    divergence_level: float = 1.0
    """A step diverges where the median relative loss exceeds this (α* is the first such α): 1 = the step raised the loss."""
    alpha_ratio_min: float = 10.0
    """B1 holds when α*_BN ≥ this × α*_plain: a decade ("much smaller"), three steps of the default 3-per-decade grid."""
    comparable_tol: float = 0.05
    """B2 holds when the seed-mean accuracies differ by at most this (5 points, fixed in advance; never scaled by the spread)."""
    trains_margin: float = 0.10
    """A net "trains" when its seed-mean accuracy reaches chance plus this (10 points above the 10% of 10 classes)."""
    better_margin: float = 0.10
    """B3's two gaps (best BN − best plain; BN at large_lr − BN at small_lr) must each reach this (10 points: clearly better)."""
    exponent_tol: float = 0.1
    """B8 holds when |p_α − 2| and |p_b + 1| are at most this (the finite-population factor alone moves p_b by ~0.03 over b ≤ N/8)."""


def _arm(norm: str, lr: float) -> str:
    return f"{norm}@{lr:g}"


def _label(norm: str) -> str:
    return "BN" if norm == "bn" else ("no norm" if norm == "none" else norm)


class _RelativeLossAt(Probe):
    """At ``before_step`` of the chosen steps (weights after that many updates): the relative-loss
    curve of each of ``batches`` (:func:`bnlab.landscape.relative_loss`; the model is left unchanged)."""

    name = "rl"
    cost = "standard"

    def __init__(self, steps, batches, alphas):
        super().__init__(lambda st, s=frozenset(steps): st in s)
        self.batches, self.alphas = batches, alphas
        self.curves: dict[int, np.ndarray] = {}

    def before_step(self, ctx) -> dict:
        from ..landscape import relative_loss

        self.curves[ctx.step] = np.stack([relative_loss(ctx.model, b, F.cross_entropy, self.alphas).numpy() for b in self.batches])
        return {}


@register_experiment
class Divergence(Experiment):
    name = "divergence"
    title = "Divergence: the one-step relative loss, accuracy against learning rate, and SGD's step noise, with and without BN"
    source = SOURCE
    description = (
        "The same deep residual net with and without BatchNorm: the relative loss L_B(w - α∇L_B)/L_B(w) of one "
        "gradient step against α at initialization and after a few training updates; test accuracy against learning "
        "rate over several seeds for one training budget, with learning curves at a small LR, at the largest LR where "
        "the plain net trains, and at a large LR; the variance of the SGD step around the full-batch step over a grid "
        "of step sizes and batch sizes, from per-example gradients."
    )
    claims = (
        Claim("plain-diverges-at-smaller-alpha-at-init",
              "At initialization the plain net's one-step relative loss exceeds 1 from a much smaller step size than the BN net's.",
              SOURCE, "α* = first α (log grid) where the median relative loss over seeds x batches exceeds 1, both nets",
              "holds if α*_BN >= alpha_ratio_min · α*_plain (default 10; BN beyond the grid: the grid end as a lower bound)", ref="B1"),
        Claim("plain-diverges-at-smaller-alpha-during-training",
              "Over the first updates of training the plain net's relative loss still exceeds 1 from a much smaller step size.",
              SOURCE, "α* after each of rl_steps updates at small_lr, both nets",
              "holds if the B1 rule holds after every measured update", ref="B1"),
        Claim("comparable-at-small-lr",
              "At a small learning rate the nets with and without BN reach comparable accuracy.",
              SOURCE, "seed-mean final test accuracy of both nets at small_lr, same budget",
              "holds if |difference| <= comparable_tol (default 5 points); inconclusive if neither net trains", ref="B2"),
        Claim("bn-benefit-from-large-lr",
              "BN's benefit comes from the large learning rates it allows: its best accuracy beats the plain net's best, "
              "and it is reached at a large, not a small, learning rate.",
              SOURCE, "seed-mean final test accuracy over the LR grid, both nets",
              "holds if best_BN − best_plain >= better_margin and BN(large_lr) − BN(small_lr) >= better_margin", ref="B3"),
        Claim("step-noise-scales-as-alpha2-over-b",
              "The variance of the SGD step around the full-batch step grows as α²/|B|.",
              SOURCE, "exact E‖αg_B − αḡ‖² from per-example gradients on the grid lrs x noise_batch_sizes: fitted exponents, "
              "plain net and BN net with frozen statistics",
              "holds if |p_α − 2| <= exponent_tol and |p_b + 1| <= exponent_tol for both nets", ref="B8"),
        Claim("bn-step-noise-with-batch-statistics",
              "The same law holds for the BN net as trained, where each batch normalizes with its own statistics.",
              SOURCE, "sampled E‖αg_B − αḡ‖² of the train-mode BN net: fitted exponents",
              "holds if |p_α − 2| <= exponent_tol and |p_b + 1| <= exponent_tol", ref="B8"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(data="digits", depth=8, width=4, seeds=(0, 1), alpha_min=1e-4, n_alphas=9, rl_batches=2, rl_batch_size=64,
                       rl_steps=(2,), rl_train_batches=1, lrs=(1e-3, 1e-1), small_lr=1e-3, epochs=1.0,
                       noise_examples=256, noise_batch_sizes=(8, 32), noise_sampled_batches=2),
        "quick": Config(),
        "paper": Config(data="cifar10", depth=110, width=16, rl_batches=8, n_alphas=33, rl_train_batches=4,
                        lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), small_lr=1e-4, epochs=100.0, noise_examples=10000,
                        noise_batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024)),
    }
    #: a smoke run (:func:`bnlab.paper.smoke_config`): one seed, the LR grid's two ends (``small_lr``, ``large_lr``)
    smoke_cuts = {"seeds": lambda v: v[:1], "lrs": lambda v: (v[0], v[-1])}

    # ------------------------------------------------------------------ measure
    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        from ..landscape import relative_loss
        from ..train import make_optimizer, resolve_device, train

        t_start = time.perf_counter()
        timings: dict = {}
        dev = resolve_device(ctx.device)
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        chance = 1.0 / tr.num_classes
        make = partial(models.make, cfg.model, in_shape=tr.in_shape, num_classes=tr.num_classes,
                       width=cfg.width, depth=cfg.depth)
        seeds = list(cfg.seeds)
        run.append_metrics({"event": "meta", "chance": chance, "num_classes": tr.num_classes,
                            "steps_per_epoch": tr.steps_per_epoch(cfg.batch_size)})

        # (1) relative loss at initialization: every seed, the same batches
        t0 = time.perf_counter()
        alphas = np.logspace(math.log10(cfg.alpha_min), math.log10(cfg.alpha_max), cfg.n_alphas)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        batches = []
        for x, y in tr.batches(cfg.rl_batch_size, shuffle=True, generator=gen, drop_last=True):
            batches.append((x.to(dev), y.to(dev)))
            if len(batches) == cfg.rl_batches:
                break
        rel, loss0, rl_summary = {}, {}, {}
        for norm in cfg.norms:
            per_seed, l0 = [], []
            for s in seeds:
                net = make(norm=norm, seed=s).to(dev).train()
                per_seed.append(np.stack([relative_loss(net, b, F.cross_entropy, alphas).numpy() for b in batches]))
                with torch.no_grad():
                    l0.append([float(F.cross_entropy(net(b[0]), b[1])) for b in batches])
            rel[norm], loss0[norm] = np.stack(per_seed), np.asarray(l0)  # [seeds, batches, alphas], [seeds, batches]
            rl_summary[norm] = {
                "median": median_curve(rel[norm].reshape(-1, len(alphas))).tolist(),
                "per_seed_median": [median_curve(r).tolist() for r in rel[norm]],
                "loss_at_init": [float(np.median(v)) for v in loss0[norm]],
            }
            run.append_metrics({"event": "relative_loss", "norm": norm, "step": 0,
                                "alpha_star": first_exceeding(alphas, rl_summary[norm]["median"])})
        timings["relative_loss_init"] = round(time.perf_counter() - t0, 1)

        # (1b) the same after the first updates of a training run at small_lr
        t0 = time.perf_counter()
        steps = sorted(set(cfg.rl_steps))
        rl_batches = batches[: max(1, cfg.rl_train_batches)]
        rl_train: dict = {"lr": cfg.small_lr, "steps": steps}
        rel_train = {}
        for norm in cfg.norms:
            cube = np.full((len(steps), len(seeds), len(rl_batches), len(alphas)), np.nan)
            losses = np.full((len(steps), len(seeds)), np.nan)
            for j, s in enumerate(seeds):
                net = make(norm=norm, seed=s)
                probe = _RelativeLossAt(steps, rl_batches, alphas)
                opt = make_optimizer(net.parameters(), lr=cfg.small_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                h = train(net, tr, opt, steps=steps[-1] + 1, batch_size=cfg.batch_size, eval_train=False, device=dev,
                          seed=cfg.seed, probes=[probe], progress=ctx.bar(f"{self.name} relative loss {norm} s{s}"))
                by_step = {r["step"]: r.get("loss") for r in h.records}
                for i, t in enumerate(steps):
                    if t in probe.curves:  # a run that stopped earlier has no curve there (NaN: counted as diverged)
                        cube[i, j] = probe.curves[t]
                    losses[i, j] = by_step.get(t, np.nan) if by_step.get(t) is not None else np.nan
            rel_train[norm] = cube
            rl_train[norm] = {str(t): {"median": median_curve(cube[i].reshape(-1, len(alphas))).tolist(),
                                       "per_seed_median": [median_curve(c).tolist() for c in cube[i]],
                                       "train_loss": losses[i].tolist()} for i, t in enumerate(steps)}
            for i, t in enumerate(steps):
                run.append_metrics({"event": "relative_loss", "norm": norm, "step": t,
                                    "alpha_star": first_exceeding(alphas, rl_train[norm][str(t)]["median"])})
        timings["relative_loss_training"] = round(time.perf_counter() - t0, 1)
        run.save_arrays("relative_loss.npz", alphas=alphas, steps=np.asarray(steps), seeds=np.asarray(seeds),
                        **{f"rel_{n}": rel[n] for n in cfg.norms}, **{f"loss0_{n}": loss0[n] for n in cfg.norms},
                        **{f"rel_train_{n}": rel_train[n] for n in cfg.norms})

        # (2) accuracy against learning rate: every LR x seed of one net at once
        t0 = time.perf_counter()
        arms, sweep_info = self._sweep(cfg, run, ctx, make, tr, te, dev)
        timings["sweep"] = round(time.perf_counter() - t0, 1)

        # (3) SGD noise at initialization
        t0 = time.perf_counter()
        noise = self._noise(cfg, make, tr, dev, seeds[0])
        timings["noise"] = round(time.perf_counter() - t0, 1)
        timings["total"] = round(time.perf_counter() - t_start, 1)
        return {
            "alphas": alphas.tolist(), "seeds": seeds, "rl_batches": len(batches), "relative_loss": rl_summary,
            "rl_train_batches": len(rl_batches), "relative_loss_training": rl_train, "sweep": sweep_info, "arms": arms,
            "chance": chance, "norms": list(cfg.norms), "lrs": list(cfg.lrs), "small_lr": cfg.small_lr,
            "large_lr": cfg.large_lr, "epochs": cfg.epochs, "noise": noise, "timings": timings,
        }

    def _sweep(self, cfg: Config, run: RunDir, ctx: Context, make, tr, te, dev) -> tuple[dict, dict]:
        from ..sweep import sweep

        steps_per_epoch = tr.steps_per_epoch(cfg.batch_size)
        arms: dict = {}
        info: dict = {}
        for norm in cfg.norms:
            res = sweep(partial(make, norm=norm), tr, lrs=list(cfg.lrs), seeds=list(cfg.seeds), epochs=cfg.epochs,
                        batch_size=cfg.batch_size, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        data_seed=cfg.seed, eval_data=te, eval_every=steps_per_epoch, eval_train=False,
                        device=str(dev), progress=bool(ctx.progress))
            info[norm] = {"seconds": round(res.seconds, 1), "vectorized": res.vectorized, "fallback_reason": res.fallback_reason}
            for i in range(len(res)):
                lr, s = res.lrs[i], res.seeds[i]
                arm = _arm(norm, lr)
                h = res.history(i)
                for r in h.records:
                    run.append_metrics({"arm": arm, "seed": s, **r})
                for e in h.evals:
                    run.append_metrics({"arm": arm, "seed": s, "event": "eval", **e})
                summ = {k: v for k, v in res.summary(i).items() if k != "seconds"}
                run.append_metrics({"arm": arm, "seed": s, "event": "arm_end", **summ})
                a = arms.setdefault(arm, {"norm": norm, "lr": lr, "seeds": [], "test_acc": [], "diverged": [], "diverged_at": [], "steps": []})
                a["seeds"].append(s)
                a["test_acc"].append(summ.get("test_acc", math.nan))
                a["diverged"].append(bool(summ["diverged"]))
                a["diverged_at"].append(summ["diverged_at"])
                a["steps"].append(summ["steps"])
        return arms, info

    def _noise(self, cfg: Config, make, tr, dev, seed: int) -> dict:
        from ..noise import fit_power_law, frozen_norm_copy, gradient_noise, sampled_batch_noise

        n_all = len(tr)
        n = n_all if cfg.noise_examples <= 0 else min(cfg.noise_examples, n_all)
        idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg.seed + 3))[:n] if n < n_all else torch.arange(n_all)
        x, y = tr.x[idx].to(dev), tr.y[idx].to(dev)
        bs = [b for b in cfg.noise_batch_sizes if b <= n]
        alphas = list(cfg.lrs)
        out: dict = {"n": n, "batch_sizes": bs, "alphas": alphas, "seed": seed}
        for norm in cfg.norms:
            net = make(norm=norm, seed=seed).to(dev).train()
            nz = gradient_noise(frozen_norm_copy(net, x), x, y, chunk_size=256)
            var = nz.step_variance(alphas, bs)
            out[norm] = {"trace_cov": nz.trace_cov, "full_grad_sq_norm": nz.full_grad_sq_norm, "variance": var.tolist(),
                         "fit": fit_power_law(alphas, bs, var)}
            # SGD's step noise as SGD sees it: sampled batches (for BN: in train mode, with batch statistics)
            sb = sampled_batch_noise(net, x, y, bs, cfg.noise_sampled_batches, generator=torch.Generator().manual_seed(cfg.seed + 4))
            v = np.outer(np.asarray(alphas) ** 2, sb["variance"])
            out[f"{norm}_sampled"] = {"per_batch": sb["per_batch"], "gradient_variance": sb["variance"], "variance": v.tolist(),
                                      "n_batches": sb["n_batches"], "full_grad_sq_norm": sb["full_grad_sq_norm"],
                                      "fit": fit_power_law(alphas, bs, v)}
        return out

    # ------------------------------------------------------------------ judge
    def judge(self, summary: dict, th: Thresholds) -> list:
        return [self._b1_init(summary, th), self._b1_training(summary, th), self._b2(summary, th), self._b3(summary, th),
                self._b8_exact(summary, th), self._b8_sampled(summary, th)]

    def _b1_init(self, summary: dict, th: Thresholds):
        cid = "plain-diverges-at-smaller-alpha-at-init"
        level, rmin = th.divergence_level, th.alpha_ratio_min
        rule = (f"α*_BN ≥ {rmin:g} · α*_plain, α* the first α where the median relative loss over seeds × batches > {level:g} "
                f"(BN never above it on the grid: α*_BN > the grid's end, enough if that already gives the ratio); "
                f"inconclusive if the plain net's never is, or the grid ends too soon to tell")
        rl = summary.get("relative_loss", {})
        if "bn" not in rl or "none" not in rl:
            return verdict(cid, None, None, "no relative-loss curves of both nets in the summary", rule)
        alphas = summary["alphas"]
        c = alpha_star_comparison(alphas, rl["none"]["median"], rl["bn"]["median"], level, rmin)
        per_seed = [alpha_star_comparison(alphas, p, b, level, rmin)["ratio"]
                    for p, b in zip(rl["none"]["per_seed_median"], rl["bn"]["per_seed_median"])]
        loss = lambda n: ", ".join(f"{v:.3g}" for v in rl[n]["loss_at_init"])
        detail = (f"median over {len(summary['seeds'])} seeds × {summary['rl_batches']} batches: {c['text']}; per seed "
                  f"α*_BN/α*_plain: {', '.join(fmt(r) for r in per_seed)}; loss at init per seed: no norm {loss('none')}, BN {loss('bn')}")
        return verdict(cid, c["ok"], c["ratio"], detail, rule, spread=seed_spread(per_seed))

    def _b1_training(self, summary: dict, th: Thresholds):
        cid = "plain-diverges-at-smaller-alpha-during-training"
        level, rmin = th.divergence_level, th.alpha_ratio_min
        rt = summary.get("relative_loss_training", {})
        steps = rt.get("steps", [])
        rule = (f"after every measured update t of a training run at lr {fmt(rt.get('lr'))}: α*_BN ≥ {rmin:g} · α*_plain (the rule at "
                f"initialization); fails if it fails after any update, inconclusive if undecided after one")
        if not steps or "bn" not in rt or "none" not in rt:
            return verdict(cid, None, None, "no relative-loss curves during training in the summary", rule)
        alphas = summary["alphas"]
        parts, oks, ratios = [], [], []
        for t in steps:
            p, b = rt["none"][str(t)], rt["bn"][str(t)]
            c = alpha_star_comparison(alphas, p["median"], b["median"], level, rmin)
            oks.append(c["ok"])
            ratios.append(c["ratio"])
            tl = lambda d: ", ".join(fmt(v) for v in d["train_loss"])
            parts.append(f"after {t} updates: {c['text']} (training loss per seed: no norm {tl(p)}; BN {tl(b)})")
        ok = False if any(o is False for o in oks) else (None if any(o is None for o in oks) else True)
        finite = [r for r in ratios if math.isfinite(r)]
        value = min(finite) if finite else math.nan
        detail = (f"median over {len(summary['seeds'])} seeds × {summary.get('rl_train_batches', '?')} batches; " + "; ".join(parts))
        return verdict(cid, ok, value, detail, rule, spread=f"smallest ratio over the updates: {fmt(value)}")

    def _b2(self, summary: dict, th: Thresholds):
        cid = "comparable-at-small-lr"
        arms, chance, small = summary["arms"], summary["chance"], summary["small_lr"]
        rule = (f"|mean acc_BN − mean acc_plain| ≤ {th.comparable_tol * 100:g} points at lr {small:g} (means over the seeds); "
                f"inconclusive if neither mean reaches chance + {th.trains_margin * 100:g} points")
        b, p = arms.get(_arm("bn", small)), arms.get(_arm("none", small))
        if b is None or p is None:
            return verdict(cid, None, None, f"no runs of both nets at lr {small:g} in the summary", rule)
        accs_b, accs_p = seed_accs(b, chance), seed_accs(p, chance)
        m_b, m_p = float(np.mean(accs_b)), float(np.mean(accs_p))
        diff = m_b - m_p
        trained = max(m_b, m_p) >= chance + th.trains_margin
        ok = None if not trained else abs(diff) <= th.comparable_tol
        note = "" if trained else f"; neither net reaches chance + {th.trains_margin * 100:g} points in this budget"
        detail = (f"lr {small:g}, {summary['epochs']:g} epochs, {len(accs_b)} seeds: BN {m_b:.1%} "
                  f"({_per_seed(accs_b)}), no norm {m_p:.1%} ({_per_seed(accs_p)}); difference {diff * 100:+.1f} points "
                  f"(threshold ±{th.comparable_tol * 100:g}){note}")
        spread = f"BN {seed_spread(accs_b, unit='%', scale=100)}; no norm {seed_spread(accs_p, unit='%', scale=100)}"
        return verdict(cid, ok, diff, detail, rule, spread=spread)

    def _b3(self, summary: dict, th: Thresholds):
        cid = "bn-benefit-from-large-lr"
        arms, chance = summary["arms"], summary["chance"]
        small, large, m = summary["small_lr"], summary["large_lr"], th.better_margin
        rule = (f"best seed-mean accuracy over the LR grid: BN − plain ≥ {m * 100:g} points, and BN at lr {large:g} − BN at lr "
                f"{small:g} ≥ {m * 100:g} points; inconclusive if neither net reaches chance + {th.trains_margin * 100:g} points anywhere")
        means = {n: {a["lr"]: float(np.mean(seed_accs(a, chance))) for a in arms.values() if a["norm"] == n} for n in ("bn", "none")}
        if not means["bn"] or not means["none"] or large not in means["bn"] or small not in means["bn"]:
            return verdict(cid, None, None, "no sweep of both nets over the LR grid in the summary", rule)
        best = {n: max(means[n].items(), key=lambda kv: kv[1]) for n in means}  # (lr, mean accuracy)
        gap_best = best["bn"][1] - best["none"][1]
        gap_lr = means["bn"][large] - means["bn"][small]
        trained = max(best["bn"][1], best["none"][1]) >= chance + th.trains_margin
        ok = None if not trained else (gap_best >= m and gap_lr >= m)
        value = min(gap_best, gap_lr)
        grid = lambda n: ", ".join(f"{lr:g}: {acc:.1%}" for lr, acc in sorted(means[n].items()))
        detail = (f"{summary['epochs']:g} epochs, {len(summary.get('seeds', []))} seeds; best BN {best['bn'][1]:.1%} at lr {best['bn'][0]:g}, "
                  f"best no norm {best['none'][1]:.1%} at lr {best['none'][0]:g} (gap {gap_best * 100:+.1f} points); BN at lr "
                  f"{large:g} {means['bn'][large]:.1%} vs at lr {small:g} {means['bn'][small]:.1%} (gap {gap_lr * 100:+.1f} points); "
                  f"seed means: BN [{grid('bn')}], no norm [{grid('none')}]"
                  + ("" if trained else "; neither net trains anywhere on the grid in this budget"))
        bb, bp = arms[_arm("bn", best["bn"][0])], arms[_arm("none", best["none"][0])]
        spread = (f"BN at its best lr {seed_spread(seed_accs(bb, chance), unit='%', scale=100)}; no norm at its best lr "
                  f"{seed_spread(seed_accs(bp, chance), unit='%', scale=100)}")
        return verdict(cid, ok, value, detail, rule, spread=spread)

    def _b8_exact(self, summary: dict, th: Thresholds):
        """B8 on the plain net: the measured (sampled) step noise against b; the closed form is the cross-check."""
        cid = "step-noise-scales-as-alpha2-over-b"
        tol = th.exponent_tol
        rule = (f"plain net: power law fitted to the step noise E‖αg_B − αḡ‖² measured on sampled batches over the α × b grid: "
                f"|p_b + 1| ≤ {tol:g} (p_α = 2 holds by the step's linearity and is reported, not judged); inconclusive if "
                f"the fit is undefined or fewer than 2 batches were sampled per size")
        nz = summary.get("noise", {})
        sm = nz.get("none_sampled")
        if sm is None:
            return verdict(cid, None, None, "the plain net's step noise was not sampled (no plain net in this run)", rule)
        f = sm["fit"]
        defined = math.isfinite(f["p_batch"]) and sm["n_batches"] >= 2
        ok = None if not defined else abs(f["p_batch"] + 1) <= tol
        exact = nz.get("none", {})
        cross = ""
        if exact.get("fit"):
            cross = (f"; the closed form α²·S/b·(N − b)/(N − 1) from the per-example gradients gives p_b = "
                     f"{exact['fit']['p_batch']:.4f} (S = {exact['trace_cov']:.3g})")
        detail = (f"plain net at initialization, {sm['n_batches']} sampled batches per size from N = {nz['n']}, b ∈ "
                  f"{{{', '.join(str(b) for b in nz['batch_sizes'])}}}: p_b = {f['p_batch']:.4f}, p_α = {f['p_alpha']:.4f} "
                  f"(rms residual {f['rms']:.2g}){cross}")
        return verdict(cid, ok, f["p_batch"], detail, rule)

    def _b8_sampled(self, summary: dict, th: Thresholds):
        cid = "bn-step-noise-with-batch-statistics"
        tol = th.exponent_tol
        rule = (f"power law fitted to the sampled E‖αg_B − αḡ‖² of the train-mode BN net: |p_α − 2| ≤ {tol:g} and |p_b + 1| ≤ {tol:g}; "
                f"inconclusive if the fit is undefined or fewer than 2 batches were sampled per size")
        nz = summary.get("noise", {})
        sb = nz.get("bn_sampled")
        if sb is None or "fit" not in sb:
            return verdict(cid, None, None, "the BN net's step noise was not sampled (no BN net in this run)", rule)
        f = sb["fit"]
        defined = math.isfinite(f["p_alpha"]) and math.isfinite(f["p_batch"]) and sb["n_batches"] >= 2
        ok = None if not defined else (abs(f["p_alpha"] - 2) <= tol and abs(f["p_batch"] + 1) <= tol)
        exact = nz.get("bn", {}).get("variance")
        cmp = ""
        if exact:  # every row (α) is α² × the same numbers per b: the first row's ratio is every row's
            ratios = [s / e if e > 0 else math.nan for s, e in zip(sb["variance"][0], exact[0])]
            cmp = ("; sampled / per-example closed form (frozen statistics) per b: " + ", ".join(f"{fmt(r)}" for r in ratios))
        detail = (f"BN net in train mode at initialization, {sb['n_batches']} batches per size from N = {nz['n']}, b ∈ "
                  f"{{{', '.join(str(b) for b in nz['batch_sizes'])}}}: p_α = {f['p_alpha']:.4f}, p_b = {f['p_batch']:.4f} (rms residual "
                  f"{f['rms']:.2g}); E‖g_B − ḡ‖² per b: {', '.join(fmt(v) for v in sb['gradient_variance'])}{cmp}")
        per_b = [np.std(r) / max(np.mean(r), 1e-300) / math.sqrt(len(r)) for r in sb["per_batch"]]
        spread = f"{sb['n_batches']} batches per size: relative standard error of each mean {fmt(min(per_b))}–{fmt(max(per_b))}"
        return verdict(cid, ok, f["p_batch"], detail, rule, spread=spread)

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        from ..plotting import STYLE, accuracy_vs_lr, learning_curves, plt, save

        cfg = run.read_json("config.json")["config"]
        summary = run.read_json("summary.json")
        th = applied_thresholds(self, run)
        arms, chance = summary["arms"], summary["chance"]
        paths = [_fig_relative_loss(cfg, summary, run.load_arrays("relative_loss.npz"), th.divergence_level,
                                    run.figure_path("relative_loss.png"))]
        # accuracy against learning rate: seed mean, band ± one standard deviation, × where a seed diverged
        series = []
        for norm in cfg["norms"]:
            pts = sorted((a["lr"], a) for a in arms.values() if a["norm"] == norm)
            if pts:
                accs = [seed_accs(a, chance) for _, a in pts]
                series.append({"label": f"{_label(norm)} (mean of {len(accs[0])} seeds, band ± std)", "norm": norm,
                               "lrs": [lr for lr, _ in pts], "acc": [float(np.mean(v)) for v in accs],
                               "spread": [float(np.std(v)) for v in accs], "diverged": [any(a["diverged"]) for _, a in pts]})
        with plt.rc_context(STYLE):
            fig, ax = plt.subplots(figsize=(6.0, 3.8))
            accuracy_vs_lr(ax, series, chance=chance, xlabel="learning rate (SGD, momentum %g)" % cfg["momentum"],
                           marks=((cfg["small_lr"], "small"), (cfg["large_lr"], "large")),
                           title=f"{cfg['model']}-{cfg['depth']} on {cfg['data']}, {cfg['epochs']:g} epochs per run (×: a seed diverged)")
            paths.append(save(fig, run.figure_path("accuracy_vs_lr.png")))
        # learning curves of the first seed at the small LR, the largest LR where the plain net trains, the large LR
        recs = run.metrics()
        seed0 = cfg["seeds"][0]
        lr_plain, _ = largest_trained_lr(cfg["lrs"], arms, "none", chance, th.trains_margin)
        chosen = [(cfg["small_lr"], ":", "small LR")]
        if lr_plain is not None and lr_plain not in (cfg["small_lr"], cfg["large_lr"]):
            chosen.append((lr_plain, "--", "largest LR where the plain net trains"))
        chosen.append((cfg["large_lr"], "-", "large LR"))
        curves = []
        for lr, ls, what in chosen:
            for norm in cfg["norms"]:
                arm = _arm(norm, lr)
                mine = [r for r in recs if r.get("arm") == arm and r.get("seed") == seed0]
                steps = [r for r in mine if r.get("event") is None and "loss" in r]
                evals = [r for r in mine if r.get("event") == "eval"]
                end = next((r for r in mine if r.get("event") == "arm_end"), {})
                curves.append({
                    "label": f"{_label(norm)}, lr {lr:g} ({what})", "norm": norm, "linestyle": ls,
                    "steps": [r["step"] for r in steps],
                    "loss": [r["loss"] if r["loss"] is not None else math.nan for r in steps],
                    "eval_steps": [r["step"] for r in evals],
                    "test_acc": [r["test_acc"] if r.get("test_acc") is not None else math.nan for r in evals],
                    "diverged_at": end.get("diverged_at"),
                })
        title = f"{cfg['model']}-{cfg['depth']} on {cfg['data']}, SGD momentum {cfg['momentum']:g}, seed {seed0}"
        paths.append(learning_curves(curves, run.figure_path("learning_curves.png"), title=title))
        paths.append(_fig_noise(cfg, summary["noise"], run.figure_path("step_noise.png")))
        return paths


# ----------------------------------------------------------------------------- verdict helpers
def alpha_star_comparison(alphas, plain, bn, level: float, ratio_min: float) -> dict:
    """B1's rule on two relative-loss curves over ``alphas``.

    ``α*`` is the first ``α`` whose value exceeds ``level`` (:func:`bnlab.analysis.first_exceeding`).
    ``ok``: ``α*_BN ≥ ratio_min · α*_plain``; ``None`` when the plain curve never exceeds the level,
    or when the BN curve never does and the grid's end is not yet ``ratio_min · α*_plain`` (the
    grid cannot tell). Returns ``a_plain``, ``a_bn``, ``bn_beyond``, ``ratio`` (with BN beyond the
    grid, the lower bound ``α_max / α*_plain``), ``ok`` and ``text``.
    """
    a_p = first_exceeding(alphas, plain, level)
    a_b = first_exceeding(alphas, bn, level)
    amax = float(alphas[-1])
    beyond = not math.isfinite(a_b)
    if not math.isfinite(a_p):
        ratio, ok = math.nan, None
    else:
        ratio = (amax if beyond else a_b) / a_p
        ok = (True if ratio >= ratio_min else None) if beyond else ratio >= ratio_min
    show = lambda a: f"never on the grid (> {amax:.0e})" if not math.isfinite(a) else f"{a:.2g}"
    text = f"α*_plain = {show(a_p)}, α*_BN = {show(a_b)} (ratio {'≥ ' if beyond and math.isfinite(ratio) else ''}{fmt(ratio)})"
    return {"a_plain": a_p, "a_bn": a_b, "bn_beyond": beyond, "ratio": ratio, "ok": ok, "text": text}


def seed_accs(a: dict, chance: float) -> list[float]:
    """An arm's final test accuracy per seed; a seed without a finite accuracy (diverged) counts at chance."""
    vals = a.get("test_acc")
    vals = vals if isinstance(vals, list) else [vals]
    return [float(v) if v is not None and math.isfinite(v) else chance for v in vals]


def _per_seed(accs) -> str:
    return " / ".join(f"{v:.1%}" for v in accs)


def largest_trained_lr(lrs, arms: dict, norm: str, chance: float, trains_margin: float):
    """``(lr, trains)``: the largest of ``lrs`` at which ``norm`` trains (its arm ``"<norm>@<lr>"`` in
    ``arms`` has a seed-mean accuracy >= chance + ``trains_margin``, diverged seeds at chance), with
    ``trains=True``; if none does, the largest LR at which no seed diverged, with ``trains=False``;
    ``(None, False)`` if every LR had a diverged seed."""
    lrs = sorted(lrs)
    ok = [lr for lr in lrs if (a := arms.get(_arm(norm, lr))) and np.mean(seed_accs(a, chance)) >= chance + trains_margin]
    if ok:
        return ok[-1], True
    stable = [lr for lr in lrs if (a := arms.get(_arm(norm, lr))) and not any(_as_list(a["diverged"]))]
    return (stable[-1], False) if stable else (None, False)


def _as_list(v):
    return v if isinstance(v, list) else [v]


# ----------------------------------------------------------------------------- figures
def _fig_relative_loss(cfg: dict, summary: dict, npz: dict, level: float, path):
    from ..plotting import STYLE, color_for, plt, save

    alphas = npz["alphas"]
    cap = 1e3
    clip = lambda v: np.minimum(v, cap)
    with plt.rc_context(STYLE):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.0), gridspec_kw={"width_ratios": [1.4, 1]})
        for i, norm in enumerate(cfg["norms"]):
            rel = npz[f"rel_{norm}"].reshape(-1, len(alphas))
            r = np.where(np.isfinite(rel), rel, np.inf)
            med = median_curve(rel)
            c = color_for(norm, i)
            ax.fill_between(alphas, clip(r.min(axis=0)), clip(r.max(axis=0)), color=c, alpha=0.18, lw=0)
            ax.plot(alphas, clip(med), color=c, marker="o", ms=3,
                    label=f"{_label(norm)}: median over {len(cfg['seeds'])} seeds × {npz[f'rel_{norm}'].shape[1]} batches (band: min–max)")
            over = med > cap
            if over.any():
                ax.plot(alphas[over], np.full(over.sum(), cap), ls="none", marker="^", color=c, ms=6)
            a_star = first_exceeding(alphas, med, level)
            if math.isfinite(a_star):
                ax.axvline(a_star, color=c, ls=":", lw=1.2)
                ax.annotate(f"α* = {a_star:.2g}", (a_star, 0.03 if norm == "bn" else 0.1), xycoords=("data", "axes fraction"),
                            color=c, fontsize=8, rotation=90, ha="right", va="bottom")
            # α* against the number of updates: the pooled median, and each seed's
            steps = [0] + [int(t) for t in npz["steps"]]
            curves = [rel] + [npz[f"rel_train_{norm}"][k].reshape(-1, len(alphas)) for k in range(len(npz["steps"]))]
            seeds_c = [npz[f"rel_{norm}"]] + [npz[f"rel_train_{norm}"][k] for k in range(len(npz["steps"]))]
            xs = np.arange(len(steps))
            ax2.plot(xs, [first_exceeding(alphas, median_curve(cv), level) for cv in curves], color=c, marker="o", label=_label(norm))
            for j in range(seeds_c[0].shape[0]):
                ys = [first_exceeding(alphas, median_curve(sc[j]), level) for sc in seeds_c]
                ax2.plot(xs + 0.06 * (j - 1), ys, ls="none", marker=".", color=c, alpha=0.6)
            ax2.set_xticks(xs)
            ax2.set_xticklabels([str(t) for t in steps])
        ax.axhline(level, color="k", lw=0.9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(top=cap * 2)
        ax.set_xlabel("step size α")
        ax.set_ylabel("relative loss  L_B(w − α∇L_B) / L_B(w)")
        ax.set_title(f"One gradient step at initialization, {cfg['model']}-{cfg['depth']} on {cfg['data']}\n"
                     f"(▲: median above {cap:g} or not finite; > {level:g}: the step diverged)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax2.set_yscale("log")
        ax2.set_xlabel(f"updates of a training run at lr {cfg['small_lr']:g}")
        ax2.set_ylabel(f"α* (first α with relative loss > {level:g})")
        ax2.set_title("α* during training (line: median over all curves; dots: each seed;\nmissing: never above on the grid)", fontsize=9)
        ax2.legend(fontsize=7)
        fig.tight_layout()
        return save(fig, path)


def _fig_noise(cfg: dict, nz: dict, path):
    from ..plotting import STYLE, color_for, plt, save

    bs = np.asarray(nz["batch_sizes"], float)
    alphas = np.asarray(nz["alphas"], float)
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 5.0))
        pick = sorted({0, len(alphas) - 1})
        for i, norm in enumerate(n for n in ("none", "bn") if n in nz):
            c = color_for(norm, i)
            v = np.asarray(nz[norm]["variance"])
            f = nz[norm]["fit"]
            for k, ls in zip(pick, ("--", "-")):
                ax1.plot(bs, v[k], color=c, ls=ls, label=f"{_label(norm)}{' (frozen stats)' if norm == 'bn' else ''}, α = {alphas[k]:g}"
                         + (f": p_b = {f['p_batch']:.3f}" if k == pick[-1] else ""))
            j = int(np.argmin(np.abs(bs - 128))) if len(bs) else 0
            ax2.plot(alphas, v[:, j], color=c, marker="o", ms=3, label=f"{_label(norm)}, b = {bs[j]:g}: p_α = {f['p_alpha']:.3f}")
        if "bn_sampled" in nz:
            s = nz["bn_sampled"]
            per = np.asarray(s["per_batch"], float)
            for k in pick:
                sc = alphas[k] ** 2
                ax1.errorbar(bs, sc * per.mean(1), yerr=sc * per.std(1), ls="none", marker="s", ms=4, color="k", capsize=2,
                             label=(f"BN in train mode, sampled ({s['n_batches']} batches; ± std): p_b = {s['fit']['p_batch']:.3f}"
                                    if k == pick[-1] else None))
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")
        ax1.set_xlabel("batch size b")
        ax1.set_ylabel("E‖α g_B − α ḡ‖²")
        ax1.set_title(f"Step noise against batch size (N = {nz['n']}; slope −1: 1/b)", fontsize=9)
        ax1.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("step size α")
        ax2.set_ylabel("E‖α g_B − α ḡ‖²")
        ax2.set_title("Step noise against step size (slope 2: α²)", fontsize=9)
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        fig.suptitle(f"SGD noise at initialization, {cfg['model']}-{cfg['depth']} on {cfg['data']} (per-example gradients)", fontsize=9)
        fig.tight_layout()
        return save(fig, path)
