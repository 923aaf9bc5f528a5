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
  the step's batch every ``acc_every`` steps (replayed forward pass), and test accuracy (eval mode)
  once per epoch.
* Activation distribution of one layer over time: the output of the module after the
  ``act_conv``-th convolution (0-based: its norm layer's output, the convolution's output in the
  plain net; for ``bn-noisy`` after the noise), per channel, on the step's batch, every
  ``act_every`` steps: the 5/25/50/75/95 % quantiles, mean and standard deviation
  (:class:`bnlab.probes.ActivationQuantiles`).
* ICS per layer every ``ics_every`` steps (:class:`bnlab.probes.InternalCovariateShift`):
  ``‖G - G'‖₂``, ``cos(G, G')`` and ``‖G - G'‖₂ / ‖G‖₂``, with ``G`` the gradient of layer ``i`` at
  ``W^t`` and ``G'`` the same after the layers below it moved to ``W^{t+1}`` (same batch).

**Claims and thresholds** (fixed before the quick run):

* ``noisy-bn-trains-like-bn``: the mean train-mode batch accuracy over the last ``final_frac`` of
  the steps of the noisy-BN net is at least the BN net's minus ``acc_tol`` (5 points). Train mode
  is the optimization the claim is about (eval-mode accuracies are reported too).
* ``noisy-bn-less-stable``: instability of a net's layer = median over its channels and over
  consecutive measurements of ``|Δ mean_c| / s_c + |Δ log std_c|`` (``s_c`` the channel's median
  standard deviation over training): how far the channel's distribution moves between two
  measurements in units of its spread. Holds if noisy-BN's is at least ``unstable_ratio`` (2) times
  BN's and at least the plain net's; fails if it is not above BN's; else inconclusive.
* ``bn-ics-not-lower``: ICS of a net = median over its measurements and layers of
  ``‖G - G'‖/‖G‖`` (scale-free: BN changes the gradient's scale). Holds if BN's is at least
  ``ics_tol`` (0.8) times the plain net's; fails otherwise. The raw ``‖G - G'‖`` and the cosines
  are in the detail.

**Setting and why.** Quick: ``convnet`` (3 conv stages of width 16/32/64 and a linear classifier, so
layers 2 to 4 have an ICS) on MNIST-1D, ``lr = 0.05``, momentum 0.9, batch 128, 400 steps: the
setting of the ``landscape`` experiment, within the quick budget. Paper: VGG on CIFAR-10
(``paper`` profile; the paper also uses a 25-layer deep linear network, not reproduced here).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .. import data as data_mod
from .. import models
from ..errors import UserError
from ..models.noisy import noise_config
from ..plotting import STYLE, color_for, save, smooth
from ..probes import ActivationQuantiles, InternalCovariateShift
from ..probes.base import Probe, StepContext
from ..runs import RunDir
from ..train import make_optimizer, train
from . import Claim, Experiment, Result, judge, register_experiment
from .landscape import arm_records, series

__all__ = ["InternalCovariateShiftExperiment", "activation_module", "instability", "ics_summary"]

SOURCE = "Santurkar et al. 2018"
NORMS = ("none", "bn", "bn-noisy")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_LABEL = {"none": "no norm", "bn": "BN", "bn-noisy": "noisy BN"}

_QUICK = dict(
    data="mnist1d", model="convnet", width=16, depth=1, seed=0,
    lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=128, steps=400,
    noise_mean_range=0.5, noise_scale_max=1.25, noise_jitter=0.1,
    ics_every=10, act_every=5, acc_every=5, act_conv=1, act_channel=0,
    final_frac=0.1, acc_tol=0.05, unstable_ratio=2.0, ics_tol=0.8,
)


class _TrainModeAccuracy(Probe):
    """Accuracy of the step's batch in the model's training mode at ``w_t`` (replayed forward pass)."""

    name = "train_mode"
    cost = "standard"

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        x, y = ctx.batch
        model = ctx.model
        state = {**{n: p.detach() for n, p in model.named_parameters()}, **{n: b.detach().clone() for n, b in model.named_buffers()}}
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            z = functional_call(model, state, (x,))
        return {"acc": float((z.argmax(1) == y).double().mean())}


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


def instability(recs: list[dict], prefix: str = "act_q") -> tuple[float, dict]:
    """Median over channels and consecutive measurements of ``|Δ mean_c| / s_c + |Δ log std_c|``."""
    chans = sorted({int(k.split("/")[1]) for r in recs for k in r if k.startswith(prefix + "/") and k.endswith("/mean")})
    vals, per = [], {}
    for c in chans:
        _, m = series(recs, f"{prefix}/{c}/mean")
        _, s = series(recs, f"{prefix}/{c}/std")
        if len(m) < 2:
            continue
        sc = float(np.median(s))
        if not sc > 0:
            continue
        d = np.abs(np.diff(m)) / sc + np.abs(np.diff(np.log(np.maximum(s, 1e-12))))
        per[c] = float(np.median(d))
        vals.append(d)
    if not vals:
        return math.nan, per
    return float(np.median(np.concatenate(vals))), per


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
              "holds if noisy >= BN - acc_tol (5 points)"),
        Claim("noisy-bn-less-stable", "Noisy BN's activation distributions are far less stable than BN's (and the plain net's).",
              SOURCE, "instability of one layer: median over channels and consecutive measurements of |Δ mean_c|/s_c + |Δ log std_c|",
              "holds if noisy >= unstable_ratio (2) x BN and noisy >= plain; fails if noisy <= BN; else inconclusive"),
        Claim("bn-ics-not-lower", "BatchNorm does not reduce internal covariate shift: the BN net's ICS is not lower than the plain net's.",
              SOURCE, "median over measurements and layers 2..L of ‖G - G'‖₂/‖G‖₂ (G: layer gradient at W^t; G': after the layers below moved to W^{t+1})",
              "holds if BN >= ics_tol (0.8) x plain; fails otherwise"),
    )
    profiles = {
        "tiny": {**_QUICK, "data": "digits", "width": 4, "steps": 30, "ics_every": 5, "act_every": 3, "acc_every": 3},
        "quick": dict(_QUICK),
        "paper": {**_QUICK, "data": "cifar10", "model": "vgg", "width": 64, "depth": 11, "lr": 0.05, "steps": 15000,
                  "ics_every": 100, "act_every": 50, "acc_every": 50, "act_conv": 2},
    }

    # ------------------------------------------------------------------ run
    def run(self, cfg: dict, run: RunDir, *, device: str = "auto", progress: bool = True) -> Result:
        tr, te = data_mod.load_pair(cfg["data"], seed=cfg["seed"])
        final: dict = {}
        for norm in NORMS:
            with noise_config(mean_range=cfg["noise_mean_range"], scale_max=cfg["noise_scale_max"], jitter=cfg["noise_jitter"]):
                net = models.make(cfg["model"], norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                                  width=cfg["width"], depth=cfg["depth"], seed=cfg["seed"])
            layer = activation_module(net, cfg["act_conv"])
            opt = make_optimizer(net.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
            probes = [InternalCovariateShift(every=cfg["ics_every"]),
                      ActivationQuantiles(layer, every=cfg["act_every"], quantiles=QUANTILES),
                      _TrainModeAccuracy(every=cfg["acc_every"])]
            h = train(net, tr, opt, steps=cfg["steps"], batch_size=cfg["batch_size"], eval_data=te, device=device, seed=cfg["seed"],
                      probes=probes, log=lambda r, norm=norm: run.write({"arm": norm, **r}),
                      progress=f"{self.name} {norm}" if progress else False)
            final[norm] = {**h.summary(), "norm": norm, "act_layer": layer}
            run.write({"event": "arm_end", "arm": norm, **final[norm]})
        verdicts, numbers = self._judge(cfg, run.metrics(), final)
        return Result(summary={"arms": final, **numbers}, verdicts=verdicts)

    def _judge(self, cfg: dict, recs: list[dict], final: dict):
        T = cfg["steps"]
        per = {n: arm_records(recs, n) for n in NORMS}
        numbers: dict = {"train_mode_acc": {}, "instability": {}, "ics": {}}
        for n in NORMS:
            s, a = series(per[n], "train_mode/acc")
            sel = s >= (1 - cfg["final_frac"]) * T
            numbers["train_mode_acc"][n] = float(np.mean(a[sel])) if sel.any() else (float(a[-1]) if len(a) else math.nan)
            numbers["instability"][n] = instability(per[n])[0]
            numbers["ics"][n] = ics_summary(per[n])
        verdicts = []
        acc = numbers["train_mode_acc"]
        ev = lambda n, k: final.get(n, {}).get(k, math.nan)
        ok = None if not math.isfinite(acc["bn"]) or not math.isfinite(acc["bn-noisy"]) else acc["bn-noisy"] >= acc["bn"] - cfg["acc_tol"]
        verdicts.append(judge(
            "noisy-bn-trains-like-bn", ok, acc["bn-noisy"] - acc["bn"],
            f"train-mode batch accuracy over the last {cfg['final_frac']:.0%} of {T} steps: noisy BN {acc['bn-noisy']:.1%}, "
            f"BN {acc['bn']:.1%} (difference {100 * (acc['bn-noisy'] - acc['bn']):+.1f} points, tolerance {100 * cfg['acc_tol']:g}), "
            f"no norm {acc['none']:.1%}; eval mode (noise off): train accuracy {ev('bn-noisy', 'train_acc'):.1%} / {ev('bn', 'train_acc'):.1%} / "
            f"{ev('none', 'train_acc'):.1%}, test accuracy {ev('bn-noisy', 'test_acc'):.1%} / {ev('bn', 'test_acc'):.1%} / {ev('none', 'test_acc'):.1%} "
            f"(noisy BN / BN / no norm)"))
        ins = numbers["instability"]
        if not all(math.isfinite(ins[n]) for n in NORMS):
            ok = None
        elif ins["bn-noisy"] <= ins["bn"]:
            ok = False
        elif ins["bn-noisy"] >= cfg["unstable_ratio"] * ins["bn"] and ins["bn-noisy"] >= ins["none"]:
            ok = True
        else:
            ok = None
        ratio = ins["bn-noisy"] / ins["bn"] if ins["bn"] > 0 else math.inf
        verdicts.append(judge(
            "noisy-bn-less-stable", ok, ratio,
            f"instability of the output of layer {final['bn'].get('act_layer', '?')} (median |Δmean|/s + |Δlog std| between measurements "
            f"{cfg['act_every']} steps apart, over all channels): noisy BN {ins['bn-noisy']:.3g}, BN {ins['bn']:.3g}, no norm {ins['none']:.3g} "
            f"(noisy/BN = {ratio:.3g}x, threshold {cfg['unstable_ratio']:g}x and >= no norm)"))
        ics = numbers["ics"]
        rb, rp = ics["bn"]["rel"], ics["none"]["rel"]
        ok = None if not (math.isfinite(rb) and math.isfinite(rp) and rp > 0) else rb >= cfg["ics_tol"] * rp
        if final["none"].get("diverged") or final["bn"].get("diverged"):
            ok = None
        layers = ", ".join(f"{k} {ics['bn']['per_layer'][k]['rel']:.3g}/{ics['none']['per_layer'].get(k, {}).get('rel', math.nan):.3g}"
                           for k in ics["bn"]["per_layer"])
        verdicts.append(judge(
            "bn-ics-not-lower", ok, rb / rp if rp > 0 else math.nan,
            f"median ‖G - G'‖/‖G‖: BN {rb:.3g}, no norm {rp:.3g} (BN/plain = {rb / rp:.3g}, threshold {cfg['ics_tol']:g}); noisy BN {ics['bn-noisy']['rel']:.3g}; "
            f"per layer BN/plain: {layers}; raw ‖G - G'‖: BN {ics['bn']['l2']:.3g}, no norm {ics['none']['l2']:.3g}, noisy BN {ics['bn-noisy']['l2']:.3g}; "
            f"cos(G, G'): BN {ics['bn']['cos']:.4f}, no norm {ics['none']['cos']:.4f}, noisy BN {ics['bn-noisy']['cos']:.4f}"))
        return verdicts, numbers

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
            ins, _ = instability(r)
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
