"""``ics``: BatchNorm's success is not a reduction of internal covariate shift.

Santurkar, Tsipras, Ilyas, Madry, *How Does Batch Normalization Help Optimization?* (NeurIPS 2018),
section 2, figures 2 and 3.

**Arms.** The same convnet (same seed, same initial weights, same batch order), SGD with momentum at
one learning rate, with three normalizations: none (``none``), BatchNorm (``bn``) and "noisy"
BatchNorm (``bn-noisy``, :mod:`bnlab.models.noisy`: after every BN layer each activation is scaled
by about ``σ_c ~ U(1, noise_scale_max)`` and shifted by ``μ_c ~ U(-noise_mean_range,
noise_mean_range)`` per channel, with per-activation perturbations of relative size
``noise_jitter``, redrawn at every step; eval mode is plain BN).

**Measurements.**

* Training: the per-step (train-mode, i.e. noisy for ``bn-noisy``) loss, the train-mode accuracy of
  the step's batch every ``acc_every`` steps (:class:`bnlab.probes.accuracy.TrainModeAccuracy`, a
  replayed forward pass), and test accuracy (eval mode) once per epoch.
* Activation distribution of one layer over time: the output of the module after the
  ``act_conv``-th convolution (0-based: its norm layer's output, the convolution's output in the
  plain net; for ``bn-noisy`` after the noise), per channel, on the step's batch, every
  ``act_every`` steps: the 5/25/50/75/95 % quantiles, mean and standard deviation
  (:class:`bnlab.probes.ActivationQuantiles`).
* ICS per layer every ``ics_every`` steps (:class:`bnlab.probes.InternalCovariateShift`):
  ``‖G - G'‖₂``, ``cos(G, G')`` and ``‖G - G'‖₂ / ‖G‖₂``, with ``G`` the gradient of layer ``i`` at
  ``W^t`` and ``G'`` the same after the layers below it moved to ``W^{t+1}`` (same batch).

**Summary** (per net): the mean train-mode batch accuracy over the last ``final_frac`` of the
steps; the instability of the measured layer, the median over its channels and over consecutive
measurements of ``|Δ mean_c| / s_c + |Δ log std_c|`` (``s_c`` the channel's median standard
deviation over training: how far the channel's distribution moves between two measurements in
units of its spread; :func:`bnlab.analysis.instability`); and the ICS, the median over its
measurements and layers of ``‖G - G'‖/‖G‖`` (scale-free: BN changes the gradient's scale), with
the raw ``‖G - G'‖`` and the cosines, also per layer.

**Claims** (rules fixed before the quick run; numbers in :class:`Thresholds`):

* ``noisy-bn-trains-like-bn``: holds if noisy BN's train-mode accuracy is at least BN's minus
  ``acc_tol`` (5 points). Train mode is the optimization the claim is about (eval-mode accuracies
  are reported too).
* ``noisy-bn-less-stable``: holds if noisy BN's instability is at least ``unstable_ratio`` (2)
  times BN's and at least the plain net's; fails if it is not above BN's; else inconclusive.
* ``bn-ics-not-lower``: holds if BN's ICS is at least ``ics_tol`` (0.8) times the plain net's;
  fails otherwise (inconclusive if either net diverged).

**Setting and why.** Quick: ``convnet`` (3 conv stages of width 16/32/64 and a linear classifier, so
layers 2 to 4 have an ICS) on MNIST-1D, ``lr = 0.05``, momentum 0.9, batch 128, 400 steps: the
setting of the ``landscape`` experiment, within the quick budget. Paper: VGG on CIFAR-10
(``paper`` profile; the paper also uses a 25-layer deep linear network, not reproduced here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from .. import data as data_mod
from ..analysis import instability, series, tail_mean
from ..errors import UserError
from ..models.noisy import noise_config
from ..plotting import STYLE, color_for, save, smooth
from ..probes import ActivationQuantiles, InternalCovariateShift
from ..probes.accuracy import TrainModeAccuracy
from ..runs import RunDir
from .base import Claim, Context, Experiment, fmt, register_experiment, verdict
from .common import SGDConfig, arm_records, make_net, train_arm

__all__ = ["InternalCovariateShiftExperiment", "Config", "Thresholds", "NORMS", "QUANTILES", "activation_module",
           "activation_instability", "ics_layers_of", "ics_summary"]

SOURCE = "Santurkar et al. 2018"
NORMS = ("none", "bn", "bn-noisy")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_LABEL = {"none": "no norm", "bn": "BN", "bn-noisy": "noisy BN"}


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``ics`` trains and measures (hashed: names the run)."""

    data: str = "mnist1d"
    """Dataset (``bnlab list``)."""
    lr: float = 0.05
    """SGD learning rate of every net."""
    steps: int = 400
    """Optimizer steps per net."""
    noise_mean_range: float = 0.5
    """Noisy BN: the per-channel shift is drawn from U(-noise_mean_range, noise_mean_range)."""
    noise_scale_max: float = 1.25
    """Noisy BN: the per-channel scale is drawn from U(1, noise_scale_max)."""
    noise_jitter: float = 0.1
    """Noisy BN: relative size of the per-activation perturbations."""
    ics_every: int = 10
    """Steps between two ICS measurements."""
    act_every: int = 5
    """Steps between two measurements of the activation distribution."""
    acc_every: int = 5
    """Steps between two train-mode batch accuracies."""
    act_conv: int = 1
    """The activations measured are the output of the module after this convolution (0-based)."""
    act_channel: int = 0
    """The channel drawn in the activation-distribution figure."""
    final_frac: float = 0.1
    """The train-mode accuracy is averaged over this last fraction of the steps."""


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``ics``'s decision rules."""

    acc_tol: float = 0.05
    """Noisy BN "trains like BN" when its train-mode accuracy is at least BN's minus this."""
    unstable_ratio: float = 2.0
    """Noisy BN is "far less stable" when its instability is at least this times BN's (and ≥ the plain net's)."""
    ics_tol: float = 0.8
    """BN's ICS is "not lower" when it is at least this times the plain net's."""


def activation_module(model: nn.Module, k: int) -> str:
    """The name of the module that follows the ``k``-th convolution (0-based) in ``model.named_modules()``."""
    named = list(model.named_modules())
    convs = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.modules.conv._ConvNd)]
    if not 0 <= k < len(convs):
        raise UserError(f"act_conv must be in [0, {len(convs) - 1}] for this model, got {k!r}")
    i = convs[k]
    prefix = named[i][0] + "."
    for name, _ in named[i + 1:]:
        if not name.startswith(prefix):
            return name
    raise UserError(f"no module follows convolution {k} ({named[i][0]})")


def activation_instability(recs: list[dict], prefix: str = "act_q") -> float:
    """:func:`bnlab.analysis.instability` of the channels recorded under ``prefix`` (``"<prefix>/<c>/mean"``, ``.../std``)."""
    chans = sorted({int(k.split("/")[1]) for r in recs for k in r if k.startswith(prefix + "/") and k.endswith("/mean")})
    means = [series(recs, f"{prefix}/{c}/mean")[1] for c in chans]
    stds = [series(recs, f"{prefix}/{c}/std")[1] for c in chans]
    return instability(means, stds)


def ics_layers_of(recs: list[dict]) -> list[str]:
    """Layer names with ICS records, in the order they appear."""
    out: list[str] = []
    for r in recs:
        for k in r:
            if k.startswith("ics/") and k.endswith("/rel"):
                name = k[len("ics/"):-len("/rel")]
                if name not in out:
                    out.append(name)
    return out


def ics_summary(recs: list[dict]) -> dict:
    """Medians over measurements and layers of ``rel``, ``l2``, ``cos``, and per layer."""
    layers = ics_layers_of(recs)
    out: dict = {"per_layer": {}}
    for k in ("rel", "l2", "cos"):
        allv = []
        for layer in layers:
            _, v = series(recs, f"ics/{layer}/{k}")
            v = v[np.isfinite(v)]
            allv.append(v)
            out["per_layer"].setdefault(layer, {})[k] = float(np.median(v)) if len(v) else math.nan
        cat = np.concatenate(allv) if allv else np.zeros(0)
        out[k] = float(np.median(cat)) if len(cat) else math.nan
    return out


@register_experiment
class InternalCovariateShiftExperiment(Experiment):
    name = "ics"
    title = "Internal covariate shift: noisy BN trains like BN, and BN does not reduce ICS"
    source = SOURCE
    description = (
        "The same convnet without normalization, with BatchNorm and with 'noisy' BatchNorm (non-zero-mean, non-unit-variance "
        "noise after every BN layer, redrawn at every step). Training curves, the distribution of one layer's activations "
        "over training, and Santurkar et al.'s internal covariate shift per layer: the change of a layer's gradient when "
        "the layers below it take their step first."
    )
    claims = (
        Claim("noisy-bn-trains-like-bn", "A BN net with step-varying noise after every BN layer trains about as well as the BN net.",
              SOURCE, "mean train-mode batch accuracy over the last final_frac (10%) of the steps, noisy BN vs BN",
              "holds if noisy >= BN - acc_tol"),
        Claim("noisy-bn-less-stable", "Noisy BN's activation distributions are far less stable than BN's (and the plain net's).",
              SOURCE, "instability of one layer: median over channels and consecutive measurements of |Δ mean_c|/s_c + |Δ log std_c|",
              "holds if noisy >= unstable_ratio x BN and noisy >= plain; fails if noisy <= BN; else inconclusive"),
        Claim("bn-ics-not-lower", "BatchNorm does not reduce internal covariate shift: the BN net's ICS is not lower than the plain net's.",
              SOURCE, "median over measurements and layers 2..L of ‖G - G'‖₂/‖G‖₂ (G: layer gradient at W^t; G': after the layers below moved to W^{t+1})",
              "holds if BN >= ics_tol x plain; fails otherwise"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(data="digits", width=4, steps=30, ics_every=5, act_every=3, acc_every=3),
        "quick": Config(),
        "paper": Config(data="cifar10", model="vgg", width=64, depth=11, lr=0.05, steps=15000,
                        ics_every=100, act_every=50, acc_every=50, act_conv=2),
    }

    # ------------------------------------------------------------------ measure
    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        final: dict = {}
        for norm in NORMS:
            with noise_config(mean_range=cfg.noise_mean_range, scale_max=cfg.noise_scale_max, jitter=cfg.noise_jitter):
                net = make_net(cfg, norm, tr)
            layer = activation_module(net, cfg.act_conv)
            probes = [InternalCovariateShift(every=cfg.ics_every),
                      ActivationQuantiles(layer, every=cfg.act_every, quantiles=QUANTILES),
                      TrainModeAccuracy(every=cfg.acc_every)]
            final[norm] = train_arm(cfg, run, ctx, self.name, norm, net, cfg.lr, tr, te, probes,
                                    {"norm": norm, "act_layer": layer})
        recs = run.metrics()
        per = {n: arm_records(recs, n) for n in NORMS}
        start = (1 - cfg.final_frac) * cfg.steps
        return {
            "arms": final,
            "train_mode_acc": {n: tail_mean(*series(per[n], "train_mode/acc"), start) for n in NORMS},
            "instability": {n: activation_instability(per[n]) for n in NORMS},
            "ics": {n: ics_summary(per[n]) for n in NORMS},
            "steps": cfg.steps, "final_frac": cfg.final_frac, "act_every": cfg.act_every,
        }

    # ------------------------------------------------------------------ judge
    def judge(self, summary: dict, th: Thresholds) -> list:
        final, T = summary["arms"], summary["steps"]
        ev = lambda n, k: final.get(n, {}).get(k, math.nan)  # noqa: E731
        verdicts = []

        acc = summary["train_mode_acc"]
        ok = None if not math.isfinite(acc["bn"]) or not math.isfinite(acc["bn-noisy"]) else acc["bn-noisy"] >= acc["bn"] - th.acc_tol
        verdicts.append(verdict(
            "noisy-bn-trains-like-bn", ok, acc["bn-noisy"] - acc["bn"],
            f"train-mode batch accuracy over the last {summary['final_frac']:.0%} of {T} steps: noisy BN {acc['bn-noisy']:.1%}, "
            f"BN {acc['bn']:.1%} (difference {100 * (acc['bn-noisy'] - acc['bn']):+.1f} points), "
            f"no norm {acc['none']:.1%}; eval mode (noise off): train accuracy {ev('bn-noisy', 'train_acc'):.1%} / {ev('bn', 'train_acc'):.1%} / "
            f"{ev('none', 'train_acc'):.1%}, test accuracy {ev('bn-noisy', 'test_acc'):.1%} / {ev('bn', 'test_acc'):.1%} / {ev('none', 'test_acc'):.1%} "
            f"(noisy BN / BN / no norm)",
            f"noisy BN's train-mode accuracy ≥ BN's − {fmt(100 * th.acc_tol)} points; inconclusive if either is undefined"))

        ins = summary["instability"]
        if not all(math.isfinite(ins[n]) for n in NORMS):
            ok = None
        elif ins["bn-noisy"] <= ins["bn"]:
            ok = False
        elif ins["bn-noisy"] >= th.unstable_ratio * ins["bn"] and ins["bn-noisy"] >= ins["none"]:
            ok = True
        else:
            ok = None
        ratio = ins["bn-noisy"] / ins["bn"] if ins["bn"] > 0 else math.inf
        verdicts.append(verdict(
            "noisy-bn-less-stable", ok, ratio,
            f"instability of the output of layer {final.get('bn', {}).get('act_layer', '?')} (median |Δmean|/s + |Δlog std| between "
            f"measurements {summary['act_every']} steps apart, over all channels): noisy BN {ins['bn-noisy']:.3g}, BN {ins['bn']:.3g}, "
            f"no norm {ins['none']:.3g} (noisy/BN = {ratio:.3g}x)",
            f"holds if noisy BN's instability ≥ {fmt(th.unstable_ratio)} × BN's and ≥ the plain net's; fails if ≤ BN's; "
            "else (or if any is undefined) inconclusive"))

        ics = summary["ics"]
        rb, rp = ics["bn"]["rel"], ics["none"]["rel"]
        ok = None if not (math.isfinite(rb) and math.isfinite(rp) and rp > 0) else rb >= th.ics_tol * rp
        if final.get("none", {}).get("diverged") or final.get("bn", {}).get("diverged"):
            ok = None
        value = rb / rp if rp > 0 else math.nan
        layers = ", ".join(f"{k} {ics['bn']['per_layer'][k]['rel']:.3g}/{ics['none']['per_layer'].get(k, {}).get('rel', math.nan):.3g}"
                           for k in ics["bn"]["per_layer"])
        verdicts.append(verdict(
            "bn-ics-not-lower", ok, value,
            f"median ‖G - G'‖/‖G‖: BN {rb:.3g}, no norm {rp:.3g} (BN/plain = {value:.3g}); noisy BN {ics['bn-noisy']['rel']:.3g}; "
            f"per layer BN/plain: {layers}; raw ‖G - G'‖: BN {ics['bn']['l2']:.3g}, no norm {ics['none']['l2']:.3g}, noisy BN {ics['bn-noisy']['l2']:.3g}; "
            f"cos(G, G'): BN {ics['bn']['cos']:.4f}, no norm {ics['none']['cos']:.4f}, noisy BN {ics['bn-noisy']['cos']:.4f}",
            f"holds if BN's ICS ≥ {fmt(th.ics_tol)} × the plain net's; fails otherwise; inconclusive if either is undefined "
            "or either net diverged"))
        return verdicts

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        recs = run.metrics()
        norms = [n for n in NORMS if arm_records(recs, n)]
        ends = {r["arm"]: r for r in recs if r.get("event") == "arm_end"}
        return [
            _fig_training(cfg, recs, norms, run.figure_path("training_curves.png")),
            _fig_activations(cfg, recs, norms, ends, run.figure_path("activation_distribution.png")),
            _fig_ics(cfg, recs, norms, run.figure_path("ics_per_layer.png")),
        ]


def _fig_training(cfg, recs, norms, path):
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for i, n in enumerate(norms):
            r = arm_records(recs, n)
            c = color_for(n, i)
            s, loss = series(r, "loss")
            axes[0].plot(s, smooth(loss, max(1, len(loss) // 40)), color=c, label=_LABEL.get(n, n))
            s, a = series(r, "train_mode/acc")
            axes[1].plot(s, smooth(a * 100, max(1, len(a) // 20)), color=c, label=_LABEL.get(n, n))
            ev = [x for x in recs if x.get("arm") == n and x.get("event") == "eval"]
            axes[2].plot([x["step"] for x in ev], [100 * x.get("test_acc", math.nan) for x in ev], color=c, marker="o", ms=3, label=_LABEL.get(n, n))
        axes[0].set_yscale("log")
        axes[0].set_ylabel("training loss (train mode, moving average)")
        axes[1].set_ylabel("batch accuracy in train mode (%)")
        axes[2].set_ylabel("test accuracy (eval mode, %)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        axes[1].set_ylim(0, 100)
        axes[2].set_ylim(0, 100)
        fig.suptitle(f"{cfg['model']} on {cfg['data']}, SGD lr {cfg['lr']:g}, momentum {cfg['momentum']:g}")
        return save(fig, path)


def _fig_activations(cfg, recs, norms, ends, path):
    import matplotlib.pyplot as plt

    c = cfg["act_channel"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(norms), figsize=(4.4 * len(norms), 3.6), squeeze=False, sharey=True)
        for i, (ax, n) in enumerate(zip(axes[0], norms)):
            r = arm_records(recs, n)
            col = color_for(n, i)
            s, q5 = series(r, f"act_q/{c}/q5")
            _, q25 = series(r, f"act_q/{c}/q25")
            _, q50 = series(r, f"act_q/{c}/q50")
            _, q75 = series(r, f"act_q/{c}/q75")
            _, q95 = series(r, f"act_q/{c}/q95")
            if len(s):
                ax.fill_between(s, q5, q95, color=col, alpha=0.25, lw=0, label="5-95 %")
                ax.fill_between(s, q25, q75, color=col, alpha=0.5, lw=0, label="25-75 %")
                ax.plot(s, q50, color=col, lw=1.2, label="median")
            ins = activation_instability(r)
            ax.set_title(f"{_LABEL.get(n, n)}: instability {ins:.3g}", fontsize=9)
            ax.set_xlabel("step")
            if i == 0:
                ax.set_ylabel(f"activation of channel {c}")
            ax.legend(fontsize=7, loc="upper right")
        layer = ends.get("bn", ends.get(norms[0], {})).get("act_layer", "?") if norms else "?"
        fig.suptitle(f"Distribution of one channel's activations over training (output of layer {layer}, after the norm and noise)")
        return save(fig, path)


def _fig_ics(cfg, recs, norms, path):
    import matplotlib.pyplot as plt

    layers = []
    for n in norms:
        for layer in ics_layers_of(arm_records(recs, n)):
            if layer not in layers:
                layers.append(layer)
    ncol = max(1, len(layers))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, ncol, figsize=(3.8 * ncol, 6.0), squeeze=False)
        for j, layer in enumerate(layers):
            for i, n in enumerate(norms):
                r = arm_records(recs, n)
                col = color_for(n, i)
                s, l2 = series(r, f"ics/{layer}/l2")
                _, cos = series(r, f"ics/{layer}/cos")
                axes[0, j].plot(s, l2, color=col, marker="o", ms=2, lw=1, label=_LABEL.get(n, n))
                axes[1, j].plot(s, cos, color=col, marker="o", ms=2, lw=1, label=_LABEL.get(n, n))
            axes[0, j].set_yscale("log")
            axes[0, j].set_title(f"layer {j + 2}: {layer}", fontsize=9)
            axes[1, j].set_xlabel("step")
        axes[0, 0].set_ylabel("‖G - G'‖₂")
        axes[1, 0].set_ylabel("cos(G, G')")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle("Internal covariate shift per layer: change of the layer's gradient after the layers below it step")
        return save(fig, path)
