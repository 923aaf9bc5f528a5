"""``activations``: without BatchNorm activations grow with depth, blow up along a large step, and
the network answers alike for every input; is it the product of random layers?

Bjorck, Gomes, Selman, Weinberger, *Understanding Batch Normalization* (NeurIPS 2018).

**Network and why.** The same deep residual net with and without BatchNorm (``preresnet``, He
initialization, one seed). Bjorck et al.'s unnormalized net is ResNet-110 with its BN layers
removed, i.e. a *residual* net without BN, and that is what is used here (quick: depth 26 = the
stem conv, 24 convs in 12 pre-activation blocks, the classifier, width 16, on MNIST-1D; paper:
depth 110 on CIFAR-10). Why the residual net and not a plain stack: with He initialization a
plain conv/ReLU stack preserves the second moment layer to layer *in expectation*, so its
activations do not grow systematically with depth; in a residual net without BN each block adds
a branch of about the same variance as its input, ``Var(x + F(x)) ≈ 2 Var(x)``, so the moments
grow exponentially with depth (a factor of about ``√2`` per block in the standard deviation,
less where zero padding trims the branch). BN re-normalizes the input of every branch, so the
branch outputs stay at unit scale. MNIST-1D (length-40 sequences) rather than the 8x8 digits:
at 4x4 and 2x2 maps the zero padding of 3x3 convolutions removes much of each branch's variance
and hides the effect. The paper profile measures the moments on 2000 CIFAR-10 images (Bjorck et
al. use 10,000; one train-mode batch of that size through ResNet-110 takes several GB).

**Measured.**

1. *Moments against depth at initialization* (:func:`~bnlab.probes.activations.activation_stats`,
   train mode, ``n_init`` training examples): per layer the average over channels of the absolute
   channel mean and of the channel standard deviation (band: 10 %-90 % over channels), for the
   outputs of the layers on the main path (every conv and linear layer except the 1x1 shortcut
   convs), log scale. Growth is a least-squares line of ``log10(moment)`` against layer index over
   the *inner* layers (all but the stem conv, whose input is the data, and the classifier, whose
   input is average-pooled): ``factor`` per layer and ``total = factor^(inner layers - 1)``.
2. *A large-LR plain run that diverges*: SGD + momentum from the same initialization at the
   smallest LR of ``diverge_lrs`` that diverges within ``diverge_max_steps`` steps;
   :class:`~bnlab.probes.activations.ActivationStats` at every step (heat map: layer against
   step), and the BN net at the same LR for the same number of steps. Each update's relative loss
   on its own batch, ``L_B(w_{t+1}) / L_B(w_t)``, is read by
   :class:`~bnlab.probes.activations.UpdateInterpolation` at ``s ∈ {0, 1}``. The *diverging
   update* is the first update of the final streak of loss-increasing updates before the loss
   becomes non-finite (the start of the divergence; for a run that does not diverge, the first
   loss-increasing update). The first loss-increasing update can come earlier and be an
   overshoot the next steps recover from (at initialization the plain net's loss is huge); when
   it differs it is shown too. The run is repeated to those steps (training is bit-identical
   with and without probes) with ``UpdateInterpolation`` at ``s_points`` positions
   ``w_t + s Δw``: heat maps layer against ``s``.
3. *The random-initialization explanation, on the network itself*: at initialization, for each
   of ``init_seeds``, along the residual stream (the stem conv, the output of every residual
   block, the logits; :func:`stream_layers`): (a) the ratio of the largest to the mean singular
   value of the input-output Jacobian ``∂h_ℓ(x)/∂x`` (:func:`~bnlab.probes.activations.jacobian_spectra`,
   exact, all input directions, averaged over ``jac_examples`` examples; the BN net with its
   statistics frozen at those of the ``n_init`` examples, :func:`bnlab.noise.frozen_norm_copy`, so
   that each example's map stands alone: the train-mode map up to the ``O(1/n_init)`` effect of one
   example on the batch statistics); (b) the mean pairwise cosine of ``cos_examples`` examples'
   representations (:func:`~bnlab.probes.activations.representation_cosine`, train mode). Bjorck
   et al.'s argument: a product of random matrices has one dominant singular direction, so with
   depth every input is mapped close to it. Growth of (a): ``fit_growth`` over the blocks
   (``total``); of (b): the rise from the first to the last block.
   For reference (figure only) the same ratio for products ``W_k ... W_1`` of ``k`` independent
   ``n x n`` Gaussian matrices with He (``std = sqrt(2/n)``) and Xavier (``std = sqrt(1/n)``)
   scaling; the ratio of the largest to the mean singular value against ``k``, median over
   ``sv_trials``. The ratio is invariant to a scalar scale, so both scalings give the same
   distribution of ratios (independent draws are used, so the two curves are two estimates);
   the scalings differ in the overall size of the singular values, shown alongside. A growing
   ratio means the product maps every input close to the same top singular direction.
4. *Output gradients at initialization* (each of ``init_seeds``) (:func:`~bnlab.probes.activations.output_gradients`):
   ``G = ∂L_B/∂z`` for ``grad_examples`` training examples sorted by label (heat map examples x
   classes) and ``ratio = Σ_k |Σ_i G_ik| / Σ_k Σ_i |G_ik|`` (1: every example pushes each logit the
   same way, i.e. the net predicts alike for all inputs).

**Claims and thresholds** (:class:`Thresholds`, fixed before running):

Measurements at initialization are repeated for each of ``init_seeds``; the rules apply to the
mean over the seeds (geometric mean for growth factors) and the spread is reported.

* B4 ``moments-grow-without-bn``: the fitted total growth over the inner layers is at least
  ``grow_min`` (10x) for both the channel |mean| and the channel std of the plain net.
* B4 ``moments-flat-with-bn``: for the BN net both fitted totals lie within ``[1/flat_max, flat_max]`` (2x).
* B5 ``deep-layers-blow-up-along-diverging-update``: along the diverging update of a plain run
  **that diverged**, the growth ``std(s=1)/std(s=0)`` of the deepest third of the inner layers is at
  least ``deep_vs_shallow_min`` (10x) that of the shallowest third (geometric means; non-finite =
  ∞); inconclusive when no run diverged.
* B6 ``output-gradient-rows-alike-without-bn``: ``ratio >= ratio_alike_min`` (0.9) without BN and
  ``ratio <= ratio_bn_max`` (0.5) with BN.
* B7 ``jacobian-spread-grows-without-bn``: the plain net's fitted total growth of the Jacobian's
  largest/mean singular value over the blocks is at least ``jac_grow_min`` (2x), and BN's growth
  (in log) at most ``bn_share_max`` (half) of it.
* B7 ``representations-align-without-bn``: the plain net's mean pairwise cosine rises by at least
  ``cos_rise_min`` (0.3) from the first to the last block, and BN's rise is at most ``bn_share_max``
  (half) of it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from .. import data as data_mod
from .. import models
from ..models.convnets import PreActBlock
from ..analysis import deep_vs_shallow, diverging_updates, fit_growth, geometric_mean
from ..noise import frozen_norm_copy
from ..probes.activations import (ActivationStats, UpdateInterpolation, activation_stats, gradient_alignment, jacobian_spectra,
                                  output_gradients, representation_cosine)
from ..runs import RunDir
from ..train import make_optimizer, train
from .base import Claim, Context, Experiment, register_experiment, seed_spread, verdict
from .common import ResNetConfig

SOURCE = "Bjorck et al. 2018"


@dataclass(frozen=True)
class Config(ResNetConfig):
    """What ``activations`` measures and trains (hashed: names the run)."""
    seed: int = 0
    """Seed of the split, the example choice, the batch order, the diverging run's initialization and the random matrices."""
    init_seeds: tuple[int, ...] = (0, 1, 2)
    """Initialization seeds of the measurements at initialization (moments, output gradients, Jacobians, cosines)."""
    n_init: int = 1024
    """Training examples of the one train-mode pass that measures the moments at initialization."""
    grad_examples: int = 64
    """Training examples (sorted by label) of the output gradients at initialization."""
    diverge_lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    """Learning rates tried, smallest first, for the plain run that diverges (the first that does is used)."""
    momentum: float = 0.9
    """SGD momentum of the diverging run (and of the BN run at the same LR)."""
    batch_size: int = 128
    """Examples per training step."""
    diverge_max_steps: int = 40
    """Most steps of the diverging run."""
    s_points: int = 21
    """Positions s in [0, 1] along the diverging update ``w + sΔw`` (heat maps against s)."""
    jac_examples: int = 8
    """Examples whose input-output Jacobians are computed (the ratio is averaged over them)."""
    jac_directions: int = 0
    """Input directions of each Jacobian (0: all of them, exact; fewer: a random orthonormal subset, for large inputs)."""
    cos_examples: int = 256
    """Examples whose representations' pairwise cosines are averaged."""
    sv_n: int = 128
    """Size n of the random n x n Gaussian matrices."""
    sv_k_max: int = 50
    """Most matrices k in the random products."""
    sv_trials: int = 8
    """Independent random products per scaling (figure only: the random-matrix reference of B7)."""

    def __post_init__(self) -> None:
        if not self.init_seeds:
            raise ValueError("activations: init_seeds must hold at least one seed")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``activations``'s decision rules."""

    grow_min: float = 10.0
    """B4: the plain net's fitted total growth of both moments must reach this (a decade over the inner layers: "exponential")."""
    flat_max: float = 2.0
    """B4: the BN net's fitted totals must both lie within [1/this, this] (a factor 2 over the depth: "flat")."""
    deep_vs_shallow_min: float = 10.0
    """B5: the deep/shallow std growth ratio along the diverging update must reach this (a decade: "far more")."""
    ratio_alike_min: float = 0.9
    """B6: the plain net's alignment ratio must reach this (1: every example pushes each logit the same way)."""
    ratio_bn_max: float = 0.5
    """B6: the BN net's alignment ratio must stay at most this (examples' gradients largely cancel)."""
    jac_grow_min: float = 2.0
    """B7: the plain net's Jacobian largest/mean singular value must at least double over the blocks (a product of random layers spreads)."""
    cos_rise_min: float = 0.3
    """B7: the plain net's mean pairwise cosine must rise by at least this from the first to the last block (towards 1: alike)."""
    bn_share_max: float = 0.5
    """B7 "much less": BN's growth (log of the Jacobian total; the cosine's rise) is at most this share of the plain net's."""


def main_path_layers(name: str, module: nn.Module) -> bool:
    """Every convolution and linear layer except residual shortcuts (1x1 convs named ``shortcut``)."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not name.split(".")[-1].startswith("shortcut")


def stream_layers(name: str, module: nn.Module) -> bool:
    """The residual stream of ``preresnet``: the stem conv (``features.0``), every residual block's output, the classifier."""
    return name in ("features.0", "classifier") or isinstance(module, PreActBlock)


def singular_value_products(n: int, k_max: int, trials: int, std: float, seed: int) -> dict:
    """Singular values of products ``W_k ... W_1`` of i.i.d. ``N(0, std²)`` ``n x n`` matrices, ``k = 1..k_max``.

    Returns:
        ``ratio`` (largest / mean singular value), ``smax``, ``smean``: arrays ``[trials, k_max]``.
    """
    rng = np.random.default_rng(seed)
    ratio, smax, smean = (np.empty((trials, k_max)) for _ in range(3))
    with _one_blas_thread():
        _products(rng, n, k_max, trials, std, ratio, smax, smean)
    return {"ratio": ratio, "smax": smax, "smean": smean}


def _one_blas_thread():
    """Small SVDs run faster on one BLAS thread (and much faster on a loaded machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _products(rng, n, k_max, trials, std, ratio, smax, smean) -> None:
    for t in range(trials):
        p = np.eye(n)
        for k in range(k_max):
            p = (rng.standard_normal((n, n)) * std) @ p
            s = np.linalg.svd(p, compute_uv=False)
            smax[t, k], smean[t, k] = s[0], s.mean()
            ratio[t, k] = s[0] / s.mean()


def _summaries(stats: dict) -> dict:
    """Per-layer arrays from ``{layer: ChannelStats}``: averages and 10/90 % quantiles over channels."""
    names = list(stats)
    out = {"layers": np.array(names)}
    for key, get in (("abs_mean", lambda c: c.mean.abs()), ("std", lambda c: c.std)):
        vals = [get(stats[n]).numpy() for n in names]
        out[key] = np.array([v.mean() for v in vals])
        out[key + "_q10"] = np.array([np.quantile(v, 0.1) for v in vals])
        out[key + "_q90"] = np.array([np.quantile(v, 0.9) for v in vals])
    out["absmax"] = np.array([float(stats[n].absmax.max()) for n in names])
    return out


def _history_matrix(history: list, layers: list[str]) -> dict:
    """``(steps, {stat: [T, L]})`` from an ActivationStats history (missing layers: nan)."""
    steps = np.array([s for s, _ in history], dtype=int)
    mats = {k: np.full((len(history), len(layers)), np.nan) for k in ("abs_mean", "std", "absmax")}
    for i, (_, st) in enumerate(history):
        for j, name in enumerate(layers):
            if name in st:
                sm = st[name].summary()
                for k in mats:
                    mats[k][i, j] = sm[k]
    return steps, mats




def _label(norm: str) -> str:
    return "BN" if norm == "bn" else "no norm"


def geo_mean(values) -> float:
    """:func:`bnlab.analysis.geometric_mean` over the seeds, but NaN when any value is not finite and positive (or there
    are none): a seed whose fit is undefined leaves the rule undecided rather than being dropped."""
    v = [float(x) for x in values]
    return geometric_mean(v) if v and all(math.isfinite(x) and x > 0 for x in v) else math.nan


@register_experiment
class Activations(Experiment):
    name = "activations"
    title = "Activations: moments against depth, a diverging update, output gradients, and the Jacobian along depth"
    source = SOURCE
    description = (
        "A deep residual net with and without BatchNorm: channel means and standard deviations against depth at "
        "initialization (several seeds); activation magnitudes during a large-LR plain run that diverges and along its "
        "diverging update; the gradient of the loss with respect to the outputs at initialization; along the residual "
        "stream, the largest-to-mean singular value ratio of the input-output Jacobian and the pairwise cosine of the "
        "examples' representations (with products of random Gaussian matrices for reference)."
    )
    claims = (
        Claim("moments-grow-without-bn", "Without BN the channel means and standard deviations grow exponentially with depth at initialization.",
              SOURCE, "fitted growth of log10(average channel |mean|) and log10(average channel std) over the inner layers, plain net",
              "holds if the fitted total growth is >= grow_min (default 10x) for both", ref="B4"),
        Claim("moments-flat-with-bn", "With BN the channel means and standard deviations stay flat with depth.",
              SOURCE, "fitted growth over the inner layers, BN net",
              "holds if both fitted totals lie within [1/flat_max, flat_max] (default 2x)", ref="B4"),
        Claim("deep-layers-blow-up-along-diverging-update",
              "Along a diverging update of the plain net the activations of the deep layers blow up far more than those of the shallow layers.",
              SOURCE, "growth std(s=1)/std(s=0) of the deepest vs the shallowest third of the inner layers along the update that starts the final loss-increasing streak",
              "holds if deep/shallow >= deep_vs_shallow_min (default 10); inconclusive if no plain run diverged", ref="B5"),
        Claim("output-gradient-rows-alike-without-bn",
              "At initialization the output gradients of all examples are alike without BN (the net predicts alike for every input) and not with BN.",
              SOURCE, "ratio = Σ_k |Σ_i ∂ℓ_i/∂z_k| / Σ_k Σ_i |∂ℓ_i/∂z_k| on one batch, both nets",
              "holds if ratio >= ratio_alike_min (0.9) without BN and <= ratio_bn_max (0.5) with BN", ref="B6"),
        Claim("jacobian-spread-grows-without-bn",
              "The explosion comes from random initialization: along the depth of the network the largest singular value of the "
              "input-output Jacobian pulls away from the rest without BN (a product of random layers), and much less with BN.",
              SOURCE, "fitted growth over the residual blocks of the Jacobian's largest/mean singular value at initialization, both nets",
              "holds if the plain total >= jac_grow_min (2x) and log(BN total) <= bn_share_max (0.5) × log(plain total)", ref="B7"),
        Claim("representations-align-without-bn",
              "Without BN the network maps all inputs closer and closer to one direction with depth; with BN much less.",
              SOURCE, "mean pairwise cosine of the examples' representations: rise from the first to the last residual block, both nets",
              "holds if the plain rise >= cos_rise_min (0.3) and BN's rise <= bn_share_max (0.5) × the plain rise", ref="B7"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(data="digits", depth=8, width=4, init_seeds=(0, 1), n_init=128, grad_examples=32, diverge_lrs=(1.0,),
                       diverge_max_steps=4, s_points=3, jac_examples=4, cos_examples=32, sv_n=16, sv_k_max=8, sv_trials=2),
        "quick": Config(),
        "paper": Config(data="cifar10", depth=110, n_init=2000, grad_examples=128, diverge_max_steps=100,
                        jac_directions=64, sv_n=1000, sv_k_max=100, sv_trials=10),
    }
    #: a smoke run (:func:`bnlab.paper.smoke_config`): one initialization seed, the LR list's two ends, fewer
    #: Jacobian directions and moment examples (the same passes, fewer of them)
    smoke_cuts = {"init_seeds": lambda v: v[:1], "diverge_lrs": lambda v: (v[0], v[-1]),
                  "jac_directions": lambda v: min(v, 8) if v > 0 else 8, "n_init": lambda v: min(v, 32)}

    # ------------------------------------------------------------------ measure
    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        from ..train import resolve_device

        t_start = time.perf_counter()
        dev = resolve_device(ctx.device)
        tr = data_mod.load(cfg.data, split="train", seed=cfg.seed)
        make = partial(models.make, cfg.model, in_shape=tr.in_shape, num_classes=tr.num_classes, width=cfg.width,
                       depth=cfg.depth, seed=cfg.seed)
        perm = torch.randperm(len(tr), generator=torch.Generator().manual_seed(cfg.seed + 2))
        x_init = tr.x[perm[: cfg.n_init]].to(dev)
        gi = perm[: cfg.grad_examples]
        order = torch.argsort(tr.y[gi], stable=True)
        x_g, y_g = tr.x[gi][order].to(dev), tr.y[gi][order].to(dev)
        x_jac = tr.x[perm[: cfg.jac_examples]].to(dev)
        x_cos = tr.x[perm[: cfg.cos_examples]].to(dev)
        seeds = list(cfg.init_seeds)
        summary: dict = {"grad_examples": cfg.grad_examples, "init_seeds": seeds, "jac_examples": int(x_jac.shape[0]),
                         "cos_examples": int(x_cos.shape[0]), "sv_n": cfg.sv_n, "sv_k_max": cfg.sv_k_max,
                         "sv_trials": cfg.sv_trials, "timings": {}}
        arrays: dict = {}

        # (1) moments against depth, (4) output gradients, (3) Jacobians and cosines: at initialization, every seed
        t0 = time.perf_counter()
        for norm in ("none", "bn"):
            per: dict = {"growth": [], "output_gradients": [], "jacobian_ratio": [], "jacobian_growth": [], "cosine": [],
                         "cosine_rise": []}
            moments = {k: [] for k in ("abs_mean", "std")}
            for i, s in enumerate(seeds):
                net = make(norm=norm, seed=s).to(dev).train()
                st = _summaries(activation_stats(net, x_init, main_path_layers))
                g = output_gradients(net, (x_g, y_g)).cpu()
                if i == 0:
                    arrays.update({f"init_{norm}_{k}": v for k, v in st.items()})
                    arrays[f"grad_{norm}"] = g.numpy()
                for k in moments:
                    moments[k].append(st[k])
                with torch.no_grad():
                    pred = net(x_g).argmax(1)
                al = gradient_alignment(g)
                al["majority"] = float(torch.bincount(pred).max()) / len(pred)
                per["output_gradients"].append(al)
                per["growth"].append({k: fit_growth(st[k]) for k in ("abs_mean", "std")})
                # along the residual stream: the Jacobian's spread (frozen statistics) and the representations' cosine
                frozen = frozen_norm_copy(net, x_init)
                sv = jacobian_spectra(frozen, x_jac, stream_layers, directions=cfg.jac_directions or None)
                ratio = [float((v[:, 0] / v.mean(1)).mean()) for v in sv.values()]
                cos = list(representation_cosine(net, x_cos, stream_layers).values())
                per["jacobian_ratio"].append(ratio)
                per["jacobian_growth"].append(fit_growth(ratio))
                per["cosine"].append(cos)
                per["cosine_rise"].append(cos[-2] - cos[1] if len(cos) >= 4 else math.nan)
                if i == 0:
                    summary["stream_layers"] = list(sv)
                run.append_metrics({"event": "init", "norm": norm, "seed": s, "layers": list(st["layers"]), "abs_mean": st["abs_mean"],
                                    "std": st["std"], "growth": per["growth"][-1], "output_gradients": al,
                                    "jacobian_ratio": ratio, "cosine": cos})
            for k in moments:
                arrays[f"init_{norm}_{k}_seeds"] = np.stack(moments[k])
            arrays[f"jac_{norm}_ratio"] = np.asarray(per["jacobian_ratio"])
            arrays[f"cos_{norm}"] = np.asarray(per["cosine"])
            summary[f"init_{norm}"] = per
        arrays["grad_labels"] = y_g.cpu().numpy()
        arrays["stream_layers"] = np.array(summary["stream_layers"])
        summary["timings"]["init"] = round(time.perf_counter() - t0, 2)

        # (3) random products
        t0 = time.perf_counter()
        n = cfg.sv_n
        for scheme, std, off in (("he", math.sqrt(2.0 / n), 11), ("xavier", math.sqrt(1.0 / n), 12)):
            sv = singular_value_products(n, cfg.sv_k_max, cfg.sv_trials, std, cfg.seed + off)
            arrays.update({f"sv_{scheme}_{k}": v for k, v in sv.items()})
            med = np.median(sv["ratio"], axis=0)
            summary[f"sv_{scheme}"] = {"ratio_k1": float(med[0]), "ratio_kmax": float(med[-1]), "growth": float(med[-1] / med[0]),
                                       "smax_kmax": float(np.median(sv["smax"][:, -1])), "smean_kmax": float(np.median(sv["smean"][:, -1]))}
        summary["timings"]["singular_values"] = round(time.perf_counter() - t0, 2)

        # (2) a large-LR plain run that diverges, its first diverging update, and BN at the same LR
        t0 = time.perf_counter()
        summary["diverging_run"] = self._diverging_run(cfg, tr, make, run, dev, arrays, ctx)
        summary["timings"]["diverging_run"] = round(time.perf_counter() - t0, 2)

        run.save_arrays("activations.npz", **arrays)
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        return summary

    def _diverging_run(self, cfg: Config, tr, make, run: RunDir, dev, arrays: dict, ctx: Context) -> dict:
        kw = dict(batch_size=cfg.batch_size, eval_train=False, device=dev, seed=cfg.seed)
        chosen = None
        tried = []
        for lr in sorted(cfg.diverge_lrs):
            net = make(norm="none")
            act = ActivationStats(every=1, layers=main_path_layers, keep=True)
            rel = UpdateInterpolation(every=1, s=[0.0, 1.0], layers=main_path_layers, emit_layers=False, keep=False)
            h = train(net, tr, make_optimizer(net.parameters(), lr=lr, momentum=cfg.momentum), steps=cfg.diverge_max_steps,
                      probes=[act, rel], progress=ctx.bar(f"{self.name} none@{lr:g}"), **kw)
            tried.append({"lr": lr, "diverged": h.diverged, "diverged_at": h.diverged_at})
            chosen = (lr, h, act)
            if h.diverged:
                break
        lr, h, act = chosen
        layers = list(act.history[0][1]) if act.history else []
        for r in h.records:
            run.append_metrics({"arm": f"none@{lr:g}", "kind": "diverging_run", **{k: v for k, v in r.items() if not k.startswith("act/")}})
        steps, mats = _history_matrix(act.history, layers)
        arrays["diverge_lr"] = np.float64(lr)
        arrays.update({"train_none_steps": steps, "train_layers": np.array(layers), "train_none_loss": np.array([r.get("loss", np.nan) for r in h.records]),
                       **{f"train_none_{k}": v for k, v in mats.items()}})
        # which update: the first loss-increasing one, and the one that starts the final streak of
        # loss-increasing updates before the run diverges
        rels = [(r["step"], r["interp/rel_loss"]) for r in h.records if "interp/rel_loss" in r]
        t_first, t_div = diverging_updates(rels, h.diverged)
        info = {"lr": lr, "tried": tried, "diverged": h.diverged, "diverged_at": h.diverged_at, "steps_recorded": len(steps),
                "first_loss_increasing_update": t_first, "diverging_update": t_div,
                "relative_loss_per_step": [r.get("interp/rel_loss", math.nan) for r in h.records]}
        # BN at the same LR for the same number of steps
        net = make(norm="bn")
        act_bn = ActivationStats(every=1, layers=main_path_layers, keep=True)
        n_steps = max(1, len(steps))
        hb = train(net, tr, make_optimizer(net.parameters(), lr=lr, momentum=cfg.momentum), steps=n_steps, probes=[act_bn],
                   progress=ctx.bar(f"{self.name} bn@{lr:g}"), **kw)
        for r in hb.records:
            run.append_metrics({"arm": f"bn@{lr:g}", "kind": "bn_same_lr", **{k: v for k, v in r.items() if not k.startswith("act/")}})
        bn_layers = list(act_bn.history[0][1]) if act_bn.history else []
        steps_bn, mats_bn = _history_matrix(act_bn.history, bn_layers)
        arrays.update({"train_bn_steps": steps_bn, "train_bn_layers": np.array(bn_layers), "train_bn_loss": np.array([r.get("loss", np.nan) for r in hb.records]),
                       **{f"train_bn_{k}": v for k, v in mats_bn.items()}})
        info["bn_same_lr"] = {"diverged": hb.diverged, "diverged_at": hb.diverged_at, "final_loss": hb.records[-1]["loss"] if hb.records else math.nan}
        targets = sorted({t for t in (t_first, t_div) if t is not None})
        if not targets:
            return info
        # repeat the plain run (bit-identical: probes never change training) with the fine interpolation at those steps
        net = make(norm="none")
        interp = UpdateInterpolation(every=lambda st, ts=tuple(targets): st in ts, s=cfg.s_points, layers=main_path_layers,
                                     emit_layers=False, keep=True)
        train(net, tr, make_optimizer(net.parameters(), lr=lr, momentum=cfg.momentum), steps=targets[-1] + 1, probes=[interp], **kw)
        by_step = dict(interp.history)
        for prefix, t in (("interp", t_div), ("interp_first", t_first)):
            if t is None or (prefix == "interp_first" and t == t_div):
                continue
            rec = by_step[t]
            s_grid, loss = rec["s"].numpy(), rec["loss"].numpy()
            _, mats_s = _history_matrix(list(enumerate(rec["stats"])), layers)
            arrays.update({f"{prefix}_step": np.int64(t), f"{prefix}_s": s_grid, f"{prefix}_loss": loss,
                           **{f"{prefix}_{k}": v for k, v in mats_s.items()}})
            info[prefix] = {"step": t, "loss_s0": float(loss[0]), "loss_s1": float(loss[-1]), "relative_loss": float(loss[-1] / loss[0]),
                            "deep_vs_shallow": deep_vs_shallow(mats_s["std"])}
        return info

    # ------------------------------------------------------------------ judge
    def judge(self, summary: dict, th: Thresholds) -> list:
        return [*self._b4(summary, th), self._b5(summary, th), self._b6(summary, th), *self._b7(summary, th)]

    def _b4(self, summary: dict, th: Thresholds) -> list:
        n_seeds = len(summary["init_seeds"])
        out = []
        for norm, cid in (("none", "moments-grow-without-bn"), ("bn", "moments-flat-with-bn")):
            fits = summary[f"init_{norm}"]["growth"]
            tot = {k: geo_mean([f[k]["total"] for f in fits]) for k in ("abs_mean", "std")}
            f0 = fits[0]["std"]
            where = f"layers {f0.get('first')}-{f0.get('last')}"
            show = (f"{_label(norm)}, geometric mean over {n_seeds} seeds of the fitted total over the inner layers ({where}): "
                    f"channel |mean| x{tot['abs_mean']:.3g}, channel std x{tot['std']:.3g}; per layer x"
                    f"{geo_mean([f['std']['factor'] for f in fits]):.3f} (std)")
            spread = (f"|mean| total {seed_spread([f['abs_mean']['total'] for f in fits])}; "
                      f"std total {seed_spread([f['std']['total'] for f in fits])}")
            vals = list(tot.values())
            defined = all(math.isfinite(t) and t > 0 for t in vals)
            if norm == "none":
                ok = None if not defined else min(vals) >= th.grow_min
                out.append(verdict(cid, ok, min(vals) if defined else math.nan, f"{show} (threshold x{th.grow_min:g})",
                                   f"fitted total growth over the inner layers ≥ x{th.grow_min:g} for both the channel |mean| and "
                                   f"the channel std (geometric mean over the seeds); inconclusive if a fit is undefined", spread))
            else:
                ok = None if not defined else all(1 / th.flat_max <= t <= th.flat_max for t in vals)
                worst = max(vals, key=lambda t: abs(math.log(t)) if t > 0 and math.isfinite(t) else math.inf)
                out.append(verdict(cid, ok, worst if defined else math.nan, f"{show} (threshold within x{th.flat_max:g} either way)",
                                   f"both fitted totals (geometric mean over the seeds) within [1/{th.flat_max:g}, {th.flat_max:g}]; "
                                   f"inconclusive if a fit is undefined", spread))
        return out

    def _b5(self, summary: dict, th: Thresholds):
        cid = "deep-layers-blow-up-along-diverging-update"
        div = summary["diverging_run"]
        rule = (f"deep/shallow growth of the channel std along the diverging update ≥ {th.deep_vs_shallow_min:g}; judged only on a "
                f"plain run that diverged (else inconclusive), and inconclusive if the ratio is undefined")
        if not div.get("diverged"):
            return verdict(cid, None, None, f"no plain run diverged (lrs tried: {[t['lr'] for t in div['tried']]}, at most "
                                            f"{div.get('steps_recorded', '?')} steps): there is no diverging update to judge", rule)
        if "interp" not in div:
            return verdict(cid, None, None, f"the plain run at lr {div['lr']:g} diverged at step {div['diverged_at']} but no update "
                                            f"increased its batch loss before", rule)
        it = div["interp"]
        d = it["deep_vs_shallow"]
        ok = None if d["ratio"] is None or math.isnan(d["ratio"]) else d["ratio"] >= th.deep_vs_shallow_min
        first = ""
        if "interp_first" in div:
            f = div["interp_first"]
            first = (f"; the first loss-increasing update (step {f['step']}, {f['loss_s0']:.3g} -> {f['loss_s1']:.3g}) is a different "
                     f"update: there std changes x{f['deep_vs_shallow']['shallow']:.3g} (shallow) vs x{f['deep_vs_shallow']['deep']:.3g} (deep)")
        return verdict(cid, ok, d["ratio"],
                       f"plain net, lr {div['lr']:g}, diverged at step {div['diverged_at']}; update of step {it['step']} (start of the "
                       f"final loss-increasing streak; batch loss {it['loss_s0']:.3g} -> {it['loss_s1']:.3g}): channel std grows "
                       f"x{d['shallow']:.3g} in the shallowest third of the inner layers vs x{d['deep']:.3g} in the deepest (geometric "
                       f"means): ratio {d['ratio']:.3g} (threshold {th.deep_vs_shallow_min:g}){first}", rule)

    def _b6(self, summary: dict, th: Thresholds):
        on, ob = summary["init_none"]["output_gradients"], summary["init_bn"]["output_gradients"]
        rn, rb = [a["ratio"] for a in on], [a["ratio"] for a in ob]
        mn, mb = float(np.mean(rn)), float(np.mean(rb))
        ok = None if not (math.isfinite(mn) and math.isfinite(mb)) else (mn >= th.ratio_alike_min and mb <= th.ratio_bn_max)
        avg = lambda xs, k: float(np.mean([a[k] for a in xs]))
        detail = (f"{summary['grad_examples']} examples at initialization, mean over {len(rn)} seeds: ratio {mn:.3f} without BN (threshold ≥ "
                  f"{th.ratio_alike_min:g}; mean row cosine {avg(on, 'row_cos'):.2f}; {avg(on, 'majority'):.0%} predicted as one class), "
                  f"{mb:.3f} with BN (threshold ≤ {th.ratio_bn_max:g}; row cosine {avg(ob, 'row_cos'):.2f}; {avg(ob, 'majority'):.0%} as "
                  f"one class); per seed: no norm {', '.join(f'{v:.3f}' for v in rn)}, BN {', '.join(f'{v:.3f}' for v in rb)}")
        return verdict("output-gradient-rows-alike-without-bn", ok, mn, detail,
                       f"seed-mean ratio ≥ {th.ratio_alike_min:g} without BN and ≤ {th.ratio_bn_max:g} with BN; inconclusive if undefined",
                       f"no norm {seed_spread(rn)}; BN {seed_spread(rb)}")

    def _b7(self, summary: dict, th: Thresholds) -> list:
        n_seeds = len(summary["init_seeds"])
        share = th.bn_share_max
        # (a) the Jacobian's spread
        tn = geo_mean([f["total"] for f in summary["init_none"]["jacobian_growth"]])
        tb = geo_mean([f["total"] for f in summary["init_bn"]["jacobian_growth"]])
        defined = all(math.isfinite(t) and t > 0 for t in (tn, tb))
        ok = None if not defined else (tn >= th.jac_grow_min and math.log(tb) <= share * math.log(tn))
        ends = lambda n: " -> ".join(f"{float(np.mean([r[k] for r in summary[f'init_{n}']['jacobian_ratio']])):.3g}" for k in (1, -2))
        jac = verdict(
            "jacobian-spread-grows-without-bn", ok, tn if defined else math.nan,
            f"largest/mean singular value of ∂h/∂x (mean over {summary['jac_examples']} examples, BN statistics frozen), "
            f"fitted total over the residual blocks, geometric mean over {n_seeds} seeds: no norm x{tn:.3g}, BN x{tb:.3g} "
            f"(log share {math.log(tb) / math.log(tn) if defined and tn != 1 else math.nan:.2f}; thresholds: no norm ≥ x{th.jac_grow_min:g}, "
            f"share ≤ {share:g}); first -> last block (seed mean): no norm {ends('none')}, BN {ends('bn')}",
            f"no norm: fitted total of the Jacobian's largest/mean singular value over the blocks ≥ x{th.jac_grow_min:g}, and "
            f"log(BN total) ≤ {share:g} × log(no-norm total); inconclusive if a fit is undefined",
            f"no norm {seed_spread([f['total'] for f in summary['init_none']['jacobian_growth']])}; "
            f"BN {seed_spread([f['total'] for f in summary['init_bn']['jacobian_growth']])}")
        # (b) the representations' cosine
        rn = summary["init_none"]["cosine_rise"]
        rb = summary["init_bn"]["cosine_rise"]
        mn, mb = float(np.mean(rn)), float(np.mean(rb))
        defined = math.isfinite(mn) and math.isfinite(mb)
        ok = None if not defined else (mn >= th.cos_rise_min and mb <= share * mn)
        ends = lambda n: " -> ".join(f"{float(np.mean([c[k] for c in summary[f'init_{n}']['cosine']])):.2f}" for k in (1, -2))
        cos = verdict(
            "representations-align-without-bn", ok, mn,
            f"mean pairwise cosine of {summary['cos_examples']} examples' representations, first -> last residual block (seed mean): "
            f"no norm {ends('none')} (rise {mn:+.3f}), BN {ends('bn')} (rise {mb:+.3f}); thresholds: no-norm rise ≥ {th.cos_rise_min:g}, "
            f"BN rise ≤ {share:g} × it = {share * mn:.3f}",
            f"no-norm rise of the mean pairwise cosine from the first to the last block ≥ {th.cos_rise_min:g}, and BN's rise ≤ "
            f"{share:g} × the no-norm rise (seed means); inconclusive if undefined",
            f"no norm {seed_spread(rn)}; BN {seed_spread(rb)}")
        return [jac, cos]

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        a = run.load_arrays("activations.npz")
        return [
            _fig_moments(cfg, a, run.figure_path("moments_vs_depth.png")),
            _fig_training_heatmaps(cfg, a, run.figure_path("activations_during_training.png")),
            _fig_interp(cfg, a, run.figure_path("diverging_update.png")),
            _fig_depth(cfg, a, run.figure_path("jacobian_vs_depth.png")),
            _fig_output_gradients(cfg, a, run.figure_path("output_gradients.png")),
        ]


# ----------------------------------------------------------------------------- figures
_FLOOR = 1e-6  # a dead layer's std is exactly 0: heat maps show log10 of magnitudes floored here
_LAYERS = "layer (0 = first conv)"


def _fig_moments(cfg, a, path):
    from ..plotting import STYLE, color_for, plt, save

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, what in ((axes[0], "abs_mean", "average |channel mean|"), (axes[1], "std", "average channel std")):
            for i, norm in enumerate(("none", "bn")):
                c = color_for(norm, i)
                v = a[f"init_{norm}_{key}"]
                idx = np.arange(len(v))
                ax.fill_between(idx, a[f"init_{norm}_{key}_q10"], a[f"init_{norm}_{key}_q90"], color=c, alpha=0.15, lw=0)
                f = fit_growth(v)
                ax.plot(idx, v, color=c, marker="o", ms=3, label=f"{_label(norm)} (x{f['factor']:.3f}/layer fitted; thin: other seeds)")
                for other in a.get(f"init_{norm}_{key}_seeds", np.empty((0, len(v))))[1:]:
                    ax.plot(idx, other, color=c, lw=0.7, alpha=0.6)
                if math.isfinite(f["slope"]):
                    xs = np.arange(f["first"], f["last"] + 1)
                    ax.plot(xs, 10 ** (f["intercept"] + f["slope"] * xs), color=c, ls="--", lw=1)
            ax.set_yscale("log")
            ax.set_xlabel("layer (conv/linear outputs on the main path, input -> logits)")
            ax.set_ylabel(what)
            ax.legend(fontsize=7)
        fig.suptitle(f"At initialization: {cfg['model']}-{cfg['depth']} (width {cfg['width']}) on {cfg['data']}, "
                     f"{cfg['n_init']} examples (band: 10-90 % over channels; dashed: fit over the inner layers; seed {cfg['init_seeds'][0]} bold)", fontsize=9)
        return save(fig, path)


def _fig_training_heatmaps(cfg, a, path):
    from ..plotting import STYLE, heatmap, plt, save

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
        for row, norm in enumerate(("none", "bn")):
            steps = a.get(f"train_{norm}_steps")
            if steps is None or len(steps) == 0:
                for ax in axes[row]:
                    ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
                continue
            loss = a[f"train_{norm}_loss"]
            for col, (key, what) in enumerate((("abs_mean", "average |channel mean|"), ("std", "average channel std"))):
                title = f"{_label(norm)}: {what}"
                heatmap(axes[row, col], fig, a[f"train_{norm}_{key}"], steps, title=title, xlabel="training step", ylabel=_LAYERS, log_floor=_FLOOR)
            lt = ", ".join(f"{v:.3g}" for v in loss[:8]) + (" ..." if len(loss) > 8 else "")
            axes[row, 0].text(0.0, -0.32, f"loss per step: {lt}", transform=axes[row, 0].transAxes, fontsize=7, va="top")
        lr = float(a["diverge_lr"]) if "diverge_lr" in a else None
        fig.suptitle(f"Activation magnitudes during training at a large LR{' ' + format(lr, 'g') if lr else ''} "
                     f"(grey: not finite; the plain run stops when its loss is not finite)", fontsize=9)
        fig.tight_layout()
        return save(fig, path)


def _fig_interp(cfg, a, path):
    from ..plotting import STYLE, heatmap, plt, save

    rows = [(p, w) for p, w in (("interp", "the diverging update (start of the final loss-increasing streak)"),
                                 ("interp_first", "the first loss-increasing update")) if f"{p}_s" in a]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(max(1, len(rows)), 3, figsize=(13, 3.9 * max(1, len(rows))), gridspec_kw={"width_ratios": [1, 1, 0.8]},
                                 squeeze=False)
        if not rows:
            for ax in axes[0]:
                ax.text(0.5, 0.5, "no update increased the loss", ha="center", transform=ax.transAxes)
            return save(fig, path)
        for row, (prefix, what_update) in enumerate(rows):
            s = a[f"{prefix}_s"]
            step = int(a[f"{prefix}_step"])
            for ax, (key, what) in zip(axes[row, :2], (("abs_mean", "average |channel mean|"), ("std", "average channel std"))):
                heatmap(ax, fig, a[f"{prefix}_{key}"], s, title=f"step {step}: {what} along w + sΔw",
                        xlabel="s (fraction of the update applied)", ylabel=_LAYERS, log_floor=_FLOOR)
            loss = a[f"{prefix}_loss"]
            ax = axes[row, 2]
            ax.plot(s, np.where(np.isfinite(loss), loss, np.nan), color="#d62728", marker="o", ms=3)
            ax.set_yscale("log")
            ax.set_xlabel("s")
            ax.set_ylabel("batch loss L_B(w + sΔw)")
            ax.set_title(f"{what_update}:\nloss along it (relative loss {loss[-1] / loss[0]:.3g})", fontsize=8)
        fig.suptitle(f"Updates of the plain run at lr {float(a['diverge_lr']):g} ({cfg['model']}-{cfg['depth']} on {cfg['data']})", fontsize=9)
        fig.tight_layout()
        return save(fig, path)


def _fig_depth(cfg, a, path):
    """B7: along the residual stream, the Jacobian's largest/mean singular value and the representations' cosine (mean over
    the seeds, band min-max), with products of random Gaussian matrices for reference."""
    from ..plotting import STYLE, color_for, plt, save

    names = [str(n) for n in a["stream_layers"]]
    short = ["stem" if n == "features.0" else ("logits" if n == "classifier" else n.split(".")[-1]) for n in names]
    idx = np.arange(len(names))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
        for i, norm in enumerate(("none", "bn")):
            c = color_for(norm, i)
            for ax, key in ((axes[0], f"jac_{norm}_ratio"), (axes[1], f"cos_{norm}")):
                v = np.asarray(a[key], float)
                ax.fill_between(idx, v.min(0), v.max(0), color=c, alpha=0.15, lw=0)
                ax.plot(idx, v.mean(0), color=c, marker="o", ms=3, label=f"{_label(norm)} (mean of {v.shape[0]} seeds, band min–max)")
        for ax, ylab, title in ((axes[0], "largest / mean singular value of ∂h/∂x",
                                 f"Input-output Jacobian along the depth ({cfg['jac_examples']} examples; BN statistics frozen)"),
                                (axes[1], "mean pairwise cosine of representations", f"How alike the representations are ({cfg['cos_examples']} examples)")):
            ax.set_xticks(idx)
            ax.set_xticklabels(short, fontsize=6, rotation=90)
            ax.set_xlabel("residual stream: stem, blocks, logits")
            ax.set_ylabel(ylab)
            ax.set_title(title, fontsize=8)
            ax.legend(fontsize=7)
        ax = axes[2]
        colors = {"he": "#1f77b4", "xavier": "#ff7f0e"}
        for scheme, lab in (("he", "He, std √(2/n)"), ("xavier", "Xavier, std √(1/n)")):
            r = a[f"sv_{scheme}_ratio"]
            k = np.arange(1, r.shape[1] + 1)
            ax.fill_between(k, r.min(0), r.max(0), color=colors[scheme], alpha=0.15, lw=0)
            ax.plot(k, np.median(r, 0), color=colors[scheme], label=lab)
        ax.set_yscale("log")
        ax.set_xlabel("k (number of matrices in the product)")
        ax.set_ylabel("largest / mean singular value")
        ax.set_title(f"Reference: products of k random {cfg['sv_n']}x{cfg['sv_n']} Gaussian matrices ({cfg['sv_trials']} trials)", fontsize=8)
        ax.legend(fontsize=7)
        fig.suptitle(f"At initialization, {cfg['model']}-{cfg['depth']} (width {cfg['width']}) on {cfg['data']}", fontsize=9)
        fig.tight_layout()
        return save(fig, path)


def _fig_output_gradients(cfg, a, path):
    from ..plotting import STYLE, plt, save

    labels = a["grad_labels"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9, 5.2))
        for ax, norm in zip(axes, ("none", "bn")):
            g = a[f"grad_{norm}"]
            al = gradient_alignment(torch.from_numpy(g))
            lim = float(np.abs(g).max()) or 1.0
            im = ax.imshow(g, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.scatter(labels, np.arange(len(labels)), s=4, c="k", marker="o", label="true class")
            ax.set_xlabel("class k")
            ax.set_ylabel("example i (sorted by label)")
            ax.set_xticks(range(g.shape[1]))
            ax.set_title(f"{_label(norm)}: ∂L/∂z_ik\n|Σ_i| / Σ_i|·| summed over k = {al['ratio']:.3f}", fontsize=8)
            ax.grid(False)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"Gradient of the loss with respect to the outputs at initialization ({len(labels)} examples)", fontsize=9)
        fig.tight_layout()
        return save(fig, path)
