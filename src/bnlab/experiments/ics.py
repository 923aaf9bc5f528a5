"""``ics``: BatchNorm's success is not a reduction of internal covariate shift.

Santurkar, Tsipras, Ilyas, Madry, *How Does Batch Normalization Help Optimization?* (NeurIPS 2018),
section 2 (figures 2 and 3) and section 3.3 (ℓp normalizations). CLAIMS.md rows S5, S6, S7 and
S12's S6 part.

**Arms.** Every arm starts from the initialization of its seed (seeds ``seed, seed+1, ...``; the
batch order follows the seed, the data split is that of ``seed``) and trains with SGD + momentum
for ``steps`` steps.

1. *Noisy BN* (S5), at ``noisy_lr``, an LR where BatchNorm clearly helps (the plain net trains
   clearly worse there: a precondition checked on the run): ``none``, ``bn`` and ``bn-noisy``
   (:mod:`bnlab.models.noisy`: after every BN layer each activation is scaled by about
   ``σ_c ~ U(1, noise_scale_max)`` and shifted by ``μ_c ~ U(-noise_mean_range, noise_mean_range)``
   per channel, with per-activation perturbations of relative size ``noise_jitter``, all redrawn at
   every step), ``seeds`` seeds each.
2. *Stability and ICS* (S6, S7, S12), at ``lr``, where every net trains: ``none`` and ``bn``
   (``ics_seeds`` seeds, with the ICS measured), ``bn-noisy`` and the ℓp normalizations ``lp_norms``
   (:mod:`bnlab.models.lp_norm`) (the first ``stability_seeds`` of those seeds). Instabilities are
   compared over the seeds both nets ran.
3. *Deep linear network* (S7): the paper's second network, a ``dln_depth``-layer linear net
   (:mod:`bnlab.models.linear`) of width ``dln_width`` on synthetic Gaussian data (``synthetic``:
   Gaussian inputs labelled by a random teacher), with and without BN, plain SGD at ``dln_lr``,
   ``dln_steps`` steps, ``ics_seeds`` seeds; the same ICS measurement on all its layers. The
   paper's width, learning rate, loss and data details are not confirmed *(check)*: cross-entropy
   on 10 classes here, all configurable.

**Measurements.**

* Train-mode batch accuracy every ``acc_every`` steps (:class:`bnlab.probes.accuracy.TrainModeAccuracy`:
  the step's forward pass replayed, noise included), averaged over the last ``final_frac`` of the
  steps: the optimization the claim is about (eval mode turns the noise off). A diverged run counts
  as accuracy 0. Test accuracy (eval mode) once, at the end, for the record.
* Activation distribution of one layer (``act_conv``: the module after that convolution: its norm
  layer's output, after the noise for ``bn-noisy``; the convolution's output in the plain net), per
  channel, every ``act_every`` steps (:class:`bnlab.probes.ActivationQuantiles`); its *instability*
  (:func:`bnlab.analysis.instability`): the median over channels and consecutive measurements of
  ``|Δ mean_c| / s_c + |Δ log std_c|`` (``s_c`` the channel's median standard deviation): how far a
  channel's distribution moves between two measurements, in units of its spread.
* ICS per layer every ``ics_every`` (``dln_ics_every``) steps (:class:`bnlab.probes.InternalCovariateShift`,
  Definition 2.1): ``‖G − G'‖₂`` (raw) and ``cos(G, G')``, with ``G`` the gradient of layer ``i`` at
  ``W^t`` and ``G'`` the same after the layers below it moved to ``W^{t+1}`` (same batch). Per seed and
  layer the median over the measurements; per layer the mean of those over seeds.

**Claims** (rules fixed before the quick run; numbers in :class:`Thresholds`; means over seeds,
reported with their spread):

* ``noisy-bn-trains-like-bn`` (S5), at ``noisy_lr``: holds if noisy BN ≥ BN − ``acc_tol`` **and** noisy
  BN − plain ≥ ``margin`` (train-mode accuracy); fails otherwise. Preconditions (else inconclusive):
  BN clearly helps (BN − plain ≥ ``help_min``) and the noise is visible (noisy BN's instability ≥
  ``unstable_ratio`` × BN's, measured on these runs).
* ``noisy-bn-less-stable`` (S6), at ``lr``: holds if noisy BN's instability ≥ ``unstable_ratio`` × BN's
  and ≥ the plain net's; fails otherwise; inconclusive if an instability is undefined.
* ``l1-does-not-stabilize``, ``l2-...``, ``linf-...`` (S12, its S6 part), at ``lr``: holds if the ℓp net's
  instability ≥ ``lp_plain_ratio`` × the plain net's (the paper: "larger distributional shift than the
  vanilla network"); fails otherwise. Precondition: BN does stabilize here (plain ≥ ``unstable_ratio``
  × BN), the ℓp norm is registered and its net did not diverge.
* ``bn-ics-cos-not-higher`` / ``dln-bn-ics-cos-not-higher`` (S7): in every layer, BN's mean cosine ≤ the
  plain net's + ``cos_slack``. ``bn-ics-l2-not-lower`` / ``dln-bn-ics-l2-not-lower`` (S7): in every
  layer, BN's raw ``‖G − G'‖`` ≥ ``l2_ratio_min`` × the plain net's. Inconclusive if a net diverged or
  a layer has fewer than ``min_ics_points`` measurements.

**Setting and why.** Quick: ``convnet`` (3 conv stages of width 16/32/64 and a linear classifier, so
layers 2 to 4 have an ICS) on MNIST-1D, momentum 0.9, batch 128, 250 steps per arm. ``lr = 0.05``:
every net trains (the setting of the ``landscape`` experiment). ``noisy_lr = 0.3``: BN still trains
while the plain net is clearly worse or dead (at 0.05 BN's lead is only ~2 points, too little to
tell whether noisy BN keeps it). Three seeds for the noisy-BN comparison and for the ICS (plain and
BN nets, deep linear nets); one for the noisy-BN and ℓp nets at ``lr`` (a stability statistic, not
an accuracy). The DLN at the paper's depth 25, width 32, plain SGD at lr 0.01 for 200 steps (fast on
a CPU). Paper: VGG on CIFAR-10 (noisy_lr, the DLN's width and its schedule *(check)*).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from .. import data as data_mod
from .. import models
from ..analysis import instability, series, tail_mean
from ..errors import UserError
from ..models.noisy import noise_config
from ..plotting import STYLE, color_for, save, smooth
from ..probes import ActivationQuantiles, InternalCovariateShift
from ..probes.accuracy import TrainModeAccuracy
from ..runs import RunDir
from ..train import make_optimizer, train
from .base import Claim, Context, Experiment, fmt, register_experiment, seed_spread, verdict
from .common import SGDConfig, arm_records, make_net

__all__ = ["InternalCovariateShiftExperiment", "Config", "Thresholds", "NORMS", "QUANTILES", "activation_module",
           "activation_instability", "ics_layers_of", "ics_summary", "arm_name", "ics_comparison", "common_seeds", "on_seeds"]

SOURCE = "Santurkar et al. 2018"
#: The nets of the noisy-BN comparison (S5) and of the stability comparison (S6); ICS on the first two.
NORMS = ("none", "bn", "bn-noisy")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
LP_NORMS = ("l1", "l2", "linf")
_LABEL = {"none": "no norm", "bn": "BN", "bn-noisy": "noisy BN", "l1": "ℓ1", "l2": "ℓ2", "linf": "ℓ∞"}
#: The phases of the run: (key in arm names, what it serves).
PHASES = {"noisy_lr": "noisy BN at noisy_lr (S5)", "lr": "stability and ICS at lr (S6, S7, S12)", "dln": "deep linear net (S7)"}


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``ics`` trains and measures (hashed: names the run)."""

    data: str = "mnist1d"
    """Dataset (``bnlab list``)."""
    lr: float = 0.05
    """SGD learning rate of the stability and ICS arms, where every net trains."""
    noisy_lr: float = 0.3
    """SGD learning rate of the noisy-BN comparison (S5): one where BN clearly helps (a precondition checked on the run)."""
    steps: int = 250
    """Optimizer steps per convnet arm."""
    seeds: int = 3
    """Seeds of the noisy-BN comparison (S5): ``seed, seed+1, ...``."""
    ics_seeds: int = 3
    """Seeds of the ICS arms (the plain and the BN net at lr) and of the deep linear nets: ``seed, seed+1, ...``."""
    stability_seeds: int = 1
    """Seeds of the noisy-BN and ℓp nets at lr (the first of the ICS seeds): their instability is compared on the seeds both nets ran."""
    lp_norms: tuple[str, ...] = LP_NORMS
    """ℓp normalizations whose stability is judged (S12); a name not in the norm registry is skipped (inconclusive)."""
    noise_mean_range: float = 0.5
    """Noisy BN: the per-channel shift is drawn from U(-noise_mean_range, noise_mean_range)."""
    noise_scale_max: float = 1.25
    """Noisy BN: the per-channel scale is drawn from U(1, noise_scale_max)."""
    noise_jitter: float = 0.1
    """Noisy BN: relative size of the per-activation perturbations."""
    ics_every: int = 30
    """Steps between two ICS measurements (convnet)."""
    act_every: int = 10
    """Steps between two measurements of the activation distribution."""
    acc_every: int = 10
    """Steps between two train-mode batch accuracies (on the steps of an activation measurement, its forward pass is reused)."""
    act_conv: int = 1
    """The activations measured are the output of the module after this convolution (0-based)."""
    act_channel: int = 0
    """The channel drawn in the activation-distribution figure."""
    final_frac: float = 0.2
    """The train-mode accuracy is averaged over this last fraction of the steps."""
    dln_depth: int = 25
    """Deep linear network: weight layers (the paper's 25)."""
    dln_width: int = 32
    """Deep linear network: hidden width (check: the paper's is not confirmed; small to stay fast on a CPU)."""
    dln_lr: float = 0.01
    """Deep linear network: SGD learning rate (check)."""
    dln_momentum: float = 0.0
    """Deep linear network: SGD momentum (plain SGD)."""
    dln_steps: int = 200
    """Deep linear network: optimizer steps."""
    dln_ics_every: int = 20
    """Deep linear network: steps between two ICS measurements."""
    dln_data: str = "synthetic"
    """Deep linear network: dataset (``synthetic``: Gaussian inputs, labels of a random teacher)."""

    def __post_init__(self):
        for k in ("seeds", "ics_seeds", "stability_seeds", "steps", "dln_steps", "ics_every", "act_every", "acc_every", "dln_ics_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0 < self.final_frac <= 1:
            raise ValueError(f"final_frac must be in (0, 1], got {self.final_frac}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``ics``'s decision rules."""

    acc_tol: float = 0.05
    """S5: noisy BN "trains about as well as BN" when its mean train-mode accuracy is at least BN's minus 5 points (the paper's curves overlap within a few points)."""
    margin: float = 0.03
    """S5: noisy BN must beat the plain net by at least 3 points: most of BN's advantage (≥ help_min = 5 points) survives the noise."""
    help_min: float = 0.05
    """S5's precondition: BN "clearly helps" at noisy_lr when its mean train-mode accuracy exceeds the plain net's by ≥ 5 points (several times a seed's spread of ~1 point)."""
    unstable_ratio: float = 2.0
    """S6: noisy BN is "far less stable" at ≥ 2x BN's instability; also S5's "noise visible" precondition, and S12's "BN stabilizes" precondition (plain ≥ 2x BN)."""
    lp_plain_ratio: float = 1.0
    """S12: an ℓp net "does not stabilize" when its instability is at least this times the plain net's (1: the paper's "larger distributional shift than the vanilla network")."""
    cos_slack: float = 0.02
    """S7: BN's cosine is "no better" when it exceeds the plain net's by at most 0.02 in every layer (cosines this close to each other are the same direction to within ~10 degrees near 1)."""
    l2_ratio_min: float = 0.5
    """S7: BN's raw ‖G − G'‖ is "not lower" when it is at least half the plain net's in every layer (raw gradient scales differ between parameterizations by O(1) factors)."""
    min_ics_points: int = 5
    """S7: a layer's median needs at least 5 ICS measurements per seed, else inconclusive."""


def arm_name(phase: str, norm: str, seed: int) -> str:
    """The ``arm`` of a run's records: ``"<norm>@<phase>/s<seed>"`` (phase: a key of :data:`PHASES`)."""
    return f"{norm}@{phase}/s{seed}"


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
            if k.startswith("ics/") and k.endswith("/l2") and not k.startswith("ics/mean_"):
                name = k[len("ics/"):-len("/l2")]
                if name not in out:
                    out.append(name)
    return out


def ics_summary(recs: list[dict]) -> dict:
    """Per layer: the medians over the measurements of ``l2`` (raw ``‖G − G'‖``), ``cos`` and ``rel``, and
    ``n`` (the finite measurements); the medians pooled over layers; ``layers``: the names in forward order."""
    layers = ics_layers_of(recs)
    out: dict = {"layers": layers, "per_layer": {}}
    for k in ("l2", "cos", "rel"):
        allv = []
        for layer in layers:
            _, v = series(recs, f"ics/{layer}/{k}")
            v = v[np.isfinite(v)]
            allv.append(v)
            d = out["per_layer"].setdefault(layer, {})
            d[k] = float(np.median(v)) if len(v) else math.nan
            d["n"] = min(d.get("n", len(v)), len(v))
        cat = np.concatenate(allv) if allv else np.zeros(0)
        out[k] = float(np.median(cat)) if len(cat) else math.nan
    return out


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return float(np.mean(xs)) if xs else math.nan


def _finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def common_seeds(stability: dict, norms) -> list[int]:
    """The seeds every net in ``norms`` ran (``stability[norm]["seeds"]``), in order."""
    if not all(n in stability for n in norms):
        return []
    first = stability[norms[0]]["seeds"]
    return [sd for sd in first if all(sd in stability[n]["seeds"] for n in norms)]


def on_seeds(stability: dict, norm: str, key: str, seeds: list[int]) -> list:
    """``stability[norm][key]`` at ``seeds`` (in that order)."""
    st = stability.get(norm, {})
    by = dict(zip(st.get("seeds", []), st.get(key, [])))
    return [by[sd] for sd in seeds if sd in by]


def ics_comparison(net: dict) -> dict:
    """BN against the plain net per layer, from a summary's ``ics[<network>]`` entry.

    ``net[norm]`` holds ``layers`` (forward order), ``per_seed`` (per seed ``{layer: {"l2", "cos", "n"}}``)
    and ``diverged``. Returns ``{"layers": [...], "cos_diff": {layer: mean cos_BN − mean cos_plain}, "l2_ratio": {layer:
    mean l2_BN / mean l2_plain}, "cos_diff_seed": [per seed: max over layers], "l2_ratio_seed": [per seed:
    min over layers], "n_min": fewest measurements of a layer in a seed}`` (means over seeds of the
    per-seed medians; seeds paired by index)."""
    bn, pl = net.get("bn", {}), net.get("none", {})
    runs = bn.get("per_seed", []) + pl.get("per_seed", [])
    order = bn.get("layers") or (list(bn["per_seed"][0]) if bn.get("per_seed") else [])
    layers = [k for k in order if all(k in s for s in runs)] if bn.get("per_seed") and pl.get("per_seed") else []
    out = {"layers": layers, "cos_diff": {}, "l2_ratio": {}, "cos_bn": {}, "cos_plain": {}, "l2_bn": {}, "l2_plain": {},
           "cos_diff_seed": [], "l2_ratio_seed": [], "n_min": 0}
    if not layers:
        return out
    for layer in layers:
        cb = _mean(s[layer]["cos"] for s in bn["per_seed"])
        cp = _mean(s[layer]["cos"] for s in pl["per_seed"])
        lb = _mean(s[layer]["l2"] for s in bn["per_seed"])
        lp = _mean(s[layer]["l2"] for s in pl["per_seed"])
        out["cos_bn"][layer], out["cos_plain"][layer], out["l2_bn"][layer], out["l2_plain"][layer] = cb, cp, lb, lp
        out["cos_diff"][layer] = cb - cp
        out["l2_ratio"][layer] = lb / lp if lp > 0 else math.nan
    for sb, sp in zip(bn["per_seed"], pl["per_seed"]):
        out["cos_diff_seed"].append(max(sb[k]["cos"] - sp[k]["cos"] for k in layers))
        out["l2_ratio_seed"].append(min(sb[k]["l2"] / sp[k]["l2"] if sp[k]["l2"] > 0 else math.nan for k in layers))
    out["n_min"] = min(int(s[k].get("n", 0)) for s in bn["per_seed"] + pl["per_seed"] for k in layers)
    return out


@register_experiment
class InternalCovariateShiftExperiment(Experiment):
    name = "ics"
    title = "Internal covariate shift: noisy BN trains like BN, ℓp norms and noisy BN are unstable, and BN does not reduce ICS"
    source = SOURCE
    description = (
        "The same convnet without normalization, with BatchNorm and with 'noisy' BatchNorm (non-zero-mean, non-unit-variance "
        "noise after every BN layer, redrawn at every step), several seeds, at a learning rate where BN clearly helps; "
        "the distribution of one layer's activations over training, also for ℓ1/ℓ2/ℓ∞ normalization; and Santurkar et al.'s "
        "internal covariate shift per layer (the change of a layer's gradient when the layers below it take their step first), "
        "in the convnet and in a 25-layer deep linear network."
    )
    claims = (
        Claim("noisy-bn-trains-like-bn", "A BN net with step-varying noise after every BN layer trains about as well as the BN net, "
              "and clearly better than the plain net.", SOURCE,
              "mean over seeds of the train-mode batch accuracy over the last final_frac of the steps at noisy_lr: noisy BN vs BN and vs plain",
              "holds if noisy >= BN - acc_tol and noisy - plain >= margin; inconclusive unless BN - plain >= help_min and "
              "noisy BN's instability >= unstable_ratio x BN's", ref="S5"),
        Claim("noisy-bn-less-stable", "Noisy BN's activation distributions are far less stable than BN's (and the plain net's).",
              SOURCE, "instability of one layer: median over channels and consecutive measurements of |Δ mean_c|/s_c + |Δ log std_c|",
              "holds if noisy >= unstable_ratio x BN and noisy >= plain; fails otherwise", ref="S6"),
        *(Claim(f"{p}-does-not-stabilize", f"{_LABEL[p]} normalization does not stabilize the activation distributions: "
                "they shift at least as much as the plain net's.", SOURCE,
                f"instability of the {_LABEL[p]} net's measured layer against the plain net's (and BN's)",
                "holds if lp >= lp_plain_ratio x plain; inconclusive unless plain >= unstable_ratio x BN", ref="S12")
          for p in LP_NORMS),
        Claim("bn-ics-cos-not-higher", "BatchNorm does not reduce internal covariate shift: in every layer of the convnet, "
              "cos(G, G') is no higher with BN than without.", SOURCE,
              "per layer, mean over seeds of the median cos(G, G') (Definition 2.1), BN - plain",
              "holds if BN - plain <= cos_slack in every layer", ref="S7"),
        Claim("bn-ics-l2-not-lower", "BatchNorm does not reduce internal covariate shift: in every layer of the convnet, "
              "‖G − G'‖ is not lower with BN.", SOURCE, "per layer, mean over seeds of the median raw ‖G − G'‖₂, BN / plain",
              "holds if BN / plain >= l2_ratio_min in every layer", ref="S7"),
        Claim("dln-bn-ics-cos-not-higher", "In a deep linear network (the paper's has 25 layers) too, cos(G, G') is no higher with BN in any layer.",
              SOURCE, "as bn-ics-cos-not-higher, on the deep linear network", "holds if BN - plain <= cos_slack in every layer", ref="S7"),
        Claim("dln-bn-ics-l2-not-lower", "In a deep linear network (the paper's has 25 layers) too, ‖G − G'‖ is not lower with BN in any layer.",
              SOURCE, "as bn-ics-l2-not-lower, on the deep linear network", "holds if BN / plain >= l2_ratio_min in every layer", ref="S7"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(data="digits", width=4, steps=20, seeds=2, ics_seeds=1, lp_norms=("linf",), ics_every=4, act_every=3, acc_every=3,
                       dln_depth=6, dln_width=8, dln_steps=30, dln_ics_every=5),
        "quick": Config(),
        "paper": Config(data="cifar10", model="vgg", width=64, depth=11, lr=0.05, noisy_lr=0.5, steps=15000, stability_seeds=3,
                        ics_every=100, act_every=50, acc_every=50, act_conv=2, dln_width=256, dln_steps=5000,
                        dln_ics_every=100),
    }
    #: a smoke run (:func:`bnlab.paper.smoke_config`): one seed of each net
    smoke_cuts = {"seeds": lambda v: 1}

    # ------------------------------------------------------------------ measure
    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        seeds = [cfg.seed + k for k in range(cfg.seeds)]
        ics_seeds = [cfg.seed + k for k in range(cfg.ics_seeds)]
        steps_from = (1 - cfg.final_frac) * cfg.steps
        arms: dict = {}
        ics: dict = {net: {n: {"layers": [], "per_seed": [], "diverged": []} for n in ("none", "bn")} for net in ("convnet", "dln")}

        def add_ics(net, norm, f, recs):
            summ = ics_summary(recs)
            f["ics"] = summ["per_layer"]
            block = ics[net][norm]
            block["layers"] = block["layers"] or summ["layers"]
            block["per_seed"].append(summ["per_layer"])
            block["diverged"].append(f["diverged"])

        def run_arm(phase, norm, seed, lr, *, with_ics=False, act=True, acc=True):
            scfg = dataclasses.replace(cfg, seed=seed)
            with noise_config(mean_range=cfg.noise_mean_range, scale_max=cfg.noise_scale_max, jitter=cfg.noise_jitter):
                net = make_net(scfg, norm, tr)
            layer = activation_module(net, cfg.act_conv)
            probes = ([InternalCovariateShift(every=cfg.ics_every)] if with_ics else []) + \
                     ([ActivationQuantiles(layer, every=cfg.act_every, quantiles=QUANTILES)] if act else []) + \
                     ([TrainModeAccuracy(every=cfg.acc_every)] if acc else [])
            arm = arm_name(phase, norm, seed)
            final, recs = self._train(scfg, run, ctx, arm, net, lr, tr, te, probes, cfg.steps, cfg.momentum,
                                      {"norm": norm, "seed": seed, "lr": lr, "phase": phase, "act_layer": layer})
            final["train_mode_acc"] = tail_mean(*series(recs, "train_mode/acc"), steps_from) if acc else math.nan
            final["instability"] = activation_instability(recs) if act else math.nan
            if with_ics:
                add_ics("convnet", norm, final, recs)
            arms[arm] = final
            return final

        # (1) noisy BN at noisy_lr, seeds
        noisy = {k: {n: [] for n in NORMS} for k in ("train_mode_acc", "instability", "diverged")}
        for seed in seeds:
            for norm in NORMS:
                f = run_arm("noisy_lr", norm, seed, cfg.noisy_lr, act=norm != "none")
                for k in noisy:
                    noisy[k][norm].append(f[k])
        # (2) stability and ICS at lr
        registered = [p for p in cfg.lp_norms if p in models.NORMS]
        stab_norms = list(NORMS) + registered
        stability = {n: {k: [] for k in ("seeds", "instability", "train_mode_acc", "diverged")} for n in stab_norms}
        for i, seed in enumerate(ics_seeds):
            for norm in stab_norms:
                if norm not in ("none", "bn") and i >= cfg.stability_seeds:
                    continue
                f = run_arm("lr", norm, seed, cfg.lr, with_ics=norm in ("none", "bn"))
                for k in ("instability", "train_mode_acc", "diverged"):
                    stability[norm][k].append(f[k])
                stability[norm]["seeds"].append(seed)
        # (3) the deep linear network
        dtr, dte = data_mod.load_pair(cfg.dln_data, seed=cfg.seed)
        for seed in ics_seeds:
            for norm in ("none", "bn"):
                net = models.make("dln", norm=norm, in_shape=dtr.in_shape, num_classes=dtr.num_classes, width=cfg.dln_width,
                                  depth=cfg.dln_depth, seed=seed)
                arm = arm_name("dln", norm, seed)
                f, recs = self._train(dataclasses.replace(cfg, seed=seed), run, ctx, arm, net, cfg.dln_lr, dtr, dte,
                                      [InternalCovariateShift(every=cfg.dln_ics_every)], cfg.dln_steps, cfg.dln_momentum,
                                      {"norm": norm, "seed": seed, "lr": cfg.dln_lr, "phase": "dln"})
                add_ics("dln", norm, f, recs)
                arms[arm] = f
        return {
            "arms": arms, "noisy": noisy, "stability": stability, "ics": ics,
            "lp_norms": list(cfg.lp_norms), "lp_missing": [p for p in cfg.lp_norms if p not in registered],
            "seeds": seeds, "ics_seeds": ics_seeds, "lr": cfg.lr, "noisy_lr": cfg.noisy_lr, "steps": cfg.steps,
            "final_frac": cfg.final_frac, "act_every": cfg.act_every,
            "act_layer": next((a["act_layer"] for a in arms.values() if a.get("norm") == "bn" and "act_layer" in a), "?"),
            "dln": {"depth": cfg.dln_depth, "width": cfg.dln_width, "lr": cfg.dln_lr, "steps": cfg.dln_steps, "data": cfg.dln_data},
        }

    def _train(self, cfg, run, ctx, arm, net, lr, tr, te, probes, steps, momentum, info) -> tuple[dict, list[dict]]:
        """SGD for ``steps`` steps in the batch order of ``cfg.seed``, test accuracy once at the end; records tagged
        ``arm`` go to the run. Returns the arm's summary and its per-step records."""
        recs: list[dict] = []

        def log(r):
            rec = {"arm": arm, **r}
            run.append_metrics(rec)
            if "event" not in r:
                recs.append(rec)

        opt = make_optimizer(net.parameters(), lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)
        h = train(net, tr, opt, steps=steps, batch_size=cfg.batch_size, eval_data=te, eval_every=steps, eval_train=False,
                  device=ctx.device, seed=cfg.seed, probes=probes, log=log, progress=ctx.bar(f"{self.name} {arm}"))
        final = {k: v for k, v in h.summary().items() if k != "seconds"}
        final.update(info)
        run.append_metrics({"event": "arm_end", "arm": arm, **final})
        return final, recs

    # ------------------------------------------------------------------ judge
    def judge(self, summary: dict, th: Thresholds) -> list:
        return [self._judge_noisy(summary, th), self._judge_stable(summary, th), *self._judge_lp(summary, th),
                *self._judge_ics(summary, th, "convnet", "bn-ics"), *self._judge_ics(summary, th, "dln", "dln-bn-ics")]

    @staticmethod
    def _accs(block: dict, norm: str) -> list[float]:
        """Per seed train-mode accuracy, a diverged seed (or an undefined accuracy) counted as 0."""
        return [0.0 if d or not _finite(a) else float(a) for a, d in zip(block["train_mode_acc"][norm], block["diverged"][norm])]

    def _judge_noisy(self, s: dict, th: Thresholds):
        b = s["noisy"]
        acc = {n: self._accs(b, n) for n in NORMS}
        m = {n: _mean(acc[n]) for n in NORMS}
        ins = {n: _mean(b["instability"][n]) for n in ("bn", "bn-noisy")}
        help_, d_bn, d_pl = m["bn"] - m["none"], m["bn-noisy"] - m["bn"], m["bn-noisy"] - m["none"]
        missing = []
        if not _finite(*m.values()):
            missing.append("an accuracy is undefined")
        elif not help_ >= th.help_min:
            missing.append(f"BN does not clearly help at lr {fmt(s['noisy_lr'])}: BN − plain {100 * help_:+.1f} points < "
                           f"{fmt(100 * th.help_min)}")
        if not (_finite(ins["bn"], ins["bn-noisy"]) and ins["bn-noisy"] >= th.unstable_ratio * ins["bn"]):
            missing.append(f"the noise is not visible: noisy BN's instability {fmt(ins['bn-noisy'])} < {fmt(th.unstable_ratio)} × "
                           f"BN's {fmt(ins['bn'])}")
        ok = None if missing else (d_bn >= -th.acc_tol and d_pl >= th.margin)
        per = "; ".join(f"{_LABEL[n]} {seed_spread(acc[n], unit='%', scale=100)}" for n in NORMS)
        detail = (f"train-mode batch accuracy over the last {s['final_frac']:.0%} of {s['steps']} steps at lr {fmt(s['noisy_lr'])} "
                  f"(mean over seeds): noisy BN {m['bn-noisy']:.1%}, BN {m['bn']:.1%}, no norm {m['none']:.1%}; noisy − BN "
                  f"{100 * d_bn:+.1f} points, noisy − plain {100 * d_pl:+.1f}, BN − plain {100 * help_:+.1f}; instability noisy BN "
                  f"{fmt(ins['bn-noisy'])}, BN {fmt(ins['bn'])}; per net: {per}")
        if missing:
            detail += "; inconclusive: " + "; ".join(missing)
        paired = [a - c for a, c in zip(acc["bn-noisy"], acc["bn"])]
        return verdict("noisy-bn-trains-like-bn", ok, d_bn, detail,
                       f"noisy BN ≥ BN − {fmt(100 * th.acc_tol)} points and noisy BN − plain ≥ {fmt(100 * th.margin)} points; "
                       f"inconclusive unless BN − plain ≥ {fmt(100 * th.help_min)} points and noisy BN's instability ≥ "
                       f"{fmt(th.unstable_ratio)} × BN's (a diverged seed counts as 0)",
                       spread="noisy − BN per seed: " + seed_spread(paired, unit=" points", scale=100))

    def _judge_stable(self, s: dict, th: Thresholds):
        st = s["stability"]
        seeds = common_seeds(st, NORMS)
        ins = {n: _mean(on_seeds(st, n, "instability", seeds)) for n in NORMS}
        if not seeds or not _finite(*ins.values()):
            ok = None
        else:  # "far less stable": at least unstable_ratio × BN's, and no more stable than the plain net
            ok = ins["bn-noisy"] >= th.unstable_ratio * ins["bn"] and ins["bn-noisy"] >= ins["none"]
        ratio = ins["bn-noisy"] / ins["bn"] if ins["bn"] > 0 else math.inf
        per_seed = [a / b if b > 0 else math.inf
                    for a, b in zip(on_seeds(st, "bn-noisy", "instability", seeds), on_seeds(st, "bn", "instability", seeds))]
        return verdict(
            "noisy-bn-less-stable", ok, ratio,
            f"instability of the output of layer {s.get('act_layer', '?')} at lr {fmt(s['lr'])} (median |Δmean|/s + |Δlog std| between "
            f"measurements {s['act_every']} steps apart, over all channels; mean over seed(s) {seeds}): noisy BN "
            f"{fmt(ins['bn-noisy'])}, BN {fmt(ins['bn'])}, no norm {fmt(ins['none'])} (noisy/BN = {fmt(ratio)}x)"
            + ("" if seeds else "; inconclusive: no seed ran for all three nets"),
            f"holds if noisy BN's instability ≥ {fmt(th.unstable_ratio)} × BN's and ≥ the plain net's, fails otherwise; "
            "inconclusive if any is undefined", spread="noisy/BN per seed: " + seed_spread(per_seed))

    def _judge_lp(self, s: dict, th: Thresholds):
        st = s["stability"]
        out = []
        for p in LP_NORMS:
            claim = f"{p}-does-not-stabilize"
            rule = (f"holds if the {_LABEL[p]} net's instability ≥ {fmt(th.lp_plain_ratio)} × the plain net's; fails otherwise; "
                    f"inconclusive unless the plain net's ≥ {fmt(th.unstable_ratio)} × BN's (BN stabilizes here), the norm is "
                    "registered and its net did not diverge (means over the seeds all three nets ran)")
            if p not in st:
                why = "not registered in bnlab.models.NORMS" if p in s.get("lp_missing", []) else "not in this run's lp_norms"
                out.append(verdict(claim, None, math.nan, f"no {_LABEL[p]} arm: {why}", rule))
                continue
            seeds = common_seeds(st, ("none", "bn", p))
            v, pl, bn = (_mean(on_seeds(st, n, "instability", seeds)) for n in (p, "none", "bn"))
            missing = []
            if not seeds:
                missing.append("no seed ran for all three nets")
            if any(st[p]["diverged"]):
                missing.append(f"the {_LABEL[p]} net diverged")
            if not _finite(v, pl, bn):
                missing.append("an instability is undefined")
            elif not pl >= th.unstable_ratio * bn:
                missing.append(f"BN does not stabilize here: plain {fmt(pl)} < {fmt(th.unstable_ratio)} × BN {fmt(bn)}")
            ratio = v / pl if _finite(v, pl) and pl > 0 else math.nan
            acc = {n: 100 * _mean(on_seeds(st, n, "train_mode_acc", seeds)) for n in (p, "bn", "none")}
            detail = (f"instability at lr {fmt(s['lr'])}, seed(s) {seeds}: {_LABEL[p]} {fmt(v)}, no norm {fmt(pl)}, BN {fmt(bn)} "
                      f"({_LABEL[p]}/plain = {fmt(ratio)}, {_LABEL[p]}/BN = {fmt(v / bn if _finite(v, bn) and bn > 0 else math.nan)}); "
                      f"train-mode accuracy {_LABEL[p]} {fmt(acc[p])}%, BN {fmt(acc['bn'])}%, no norm {fmt(acc['none'])}%")
            if missing:
                detail += "; inconclusive: " + "; ".join(missing)
            per_seed = [a / b if b > 0 else math.nan
                        for a, b in zip(on_seeds(st, p, "instability", seeds), on_seeds(st, "none", "instability", seeds))]
            out.append(verdict(claim, None if missing else v >= th.lp_plain_ratio * pl, ratio, detail, rule,
                               spread=f"{_LABEL[p]}/plain per seed: " + seed_spread(per_seed)))
        return out

    def _judge_ics(self, s: dict, th: Thresholds, net: str, prefix: str):
        block = s["ics"][net]
        c = ics_comparison(block)
        what = "the convnet" if net == "convnet" else f"the {s['dln']['depth']}-layer deep linear network"
        missing = []
        if any(block["bn"]["diverged"]) or any(block["none"]["diverged"]):
            missing.append("a net diverged")
        if not c["layers"]:
            missing.append("no layer measured in both nets")
        elif c["n_min"] < th.min_ics_points:
            missing.append(f"a layer has only {c['n_min']} measurement(s) in a seed (< {th.min_ics_points})")
        why = ("; inconclusive: " + "; ".join(missing)) if missing else ""
        L = c["layers"]
        cos_bad = [k for k in L if not c["cos_diff"][k] <= th.cos_slack]
        l2_bad = [k for k in L if not c["l2_ratio"][k] >= th.l2_ratio_min]
        worst_cos = max(c["cos_diff"].values()) if L else math.nan
        worst_l2 = min(c["l2_ratio"].values()) if L else math.nan
        n_seeds = len(block["bn"]["per_seed"])

        def layers_text(key_b, key_p, fmt_):
            shown = L if len(L) <= 6 else L[:2] + L[len(L) // 2: len(L) // 2 + 1] + L[-2:]
            return ", ".join(f"{k} {fmt_(c[key_b][k])}/{fmt_(c[key_p][k])}" for k in shown) + ("" if len(L) <= 6 else f" (5 of {len(L)} layers shown)")

        cos_detail = (f"{what}, {n_seeds} seed(s), {len(L)} layers: cos(G, G') BN/plain per layer: "
                      f"{layers_text('cos_bn', 'cos_plain', lambda x: f'{x:.4f}')}; worst BN − plain {worst_cos:+.4f}"
                      + (f" ({len(cos_bad)} layer(s) above {fmt(th.cos_slack)}: {', '.join(cos_bad[:4])})" if cos_bad else "") + why)
        l2_detail = (f"{what}, {n_seeds} seed(s), {len(L)} layers: ‖G − G'‖ BN/plain per layer: "
                     f"{layers_text('l2_bn', 'l2_plain', fmt)}; smallest BN/plain ratio {fmt(worst_l2)}"
                     + (f" ({len(l2_bad)} layer(s) below {fmt(th.l2_ratio_min)}: {', '.join(l2_bad[:4])})" if l2_bad else "") + why)
        return [
            verdict(f"{prefix}-cos-not-higher", None if missing else not cos_bad, worst_cos, cos_detail,
                    f"in every layer, BN's cos(G, G') ≤ the plain net's + {fmt(th.cos_slack)} (medians over ≥ {th.min_ics_points} "
                    "measurements, mean over seeds); inconclusive if a net diverged",
                    spread="worst layer's BN − plain per seed: " + seed_spread(c["cos_diff_seed"], digits=3)),
            verdict(f"{prefix}-l2-not-lower", None if missing else not l2_bad, worst_l2, l2_detail,
                    f"in every layer, BN's ‖G − G'‖ ≥ {fmt(th.l2_ratio_min)} × the plain net's (medians over ≥ {th.min_ics_points} "
                    "measurements, mean over seeds); inconclusive if a net diverged",
                    spread="smallest BN/plain per seed: " + seed_spread(c["l2_ratio_seed"], digits=3)),
        ]

    # ------------------------------------------------------------------ figures
    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        recs = run.metrics()
        return [
            _fig_noisy_training(cfg, recs, run.figure_path("training_curves.png")),
            _fig_activations(cfg, recs, run.figure_path("activation_distribution.png")),
            _fig_ics(cfg, recs, run.figure_path("ics_per_layer.png")),
            _fig_ics_dln(cfg, recs, run.figure_path("ics_deep_linear.png")),
        ]


def _color(norm: str, i: int) -> str:
    return color_for(norm, {"l1": 5, "l2": 6, "linf": 9}.get(norm, i))


def _seeds(cfg: dict, key: str) -> list[int]:
    return [cfg["seed"] + k for k in range(cfg.get(key, 1))]


def _band(per_seed: list[tuple[np.ndarray, np.ndarray]]):
    """Common steps and the mean, min and max over seeds (seeds aligned on the steps they share)."""
    per_seed = [(s, v) for s, v in per_seed if len(s)]
    if not per_seed:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in per_seed)))
    m = np.array([[dict(zip(s.tolist(), v.tolist()))[t] for t in common] for s, v in per_seed], dtype=float)
    return np.asarray(common, float), m.mean(0), m.min(0), m.max(0)


def _fig_noisy_training(cfg, recs, path):
    import matplotlib.pyplot as plt

    seeds = _seeds(cfg, "seeds")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for i, n in enumerate(NORMS):
            c = color_for(n, i)
            per = {k: [series(arm_records(recs, arm_name("noisy_lr", n, sd)), k) for sd in seeds] for k in ("loss", "train_mode/acc")}
            s, mean, lo, hi = _band(per["loss"])
            w = max(1, len(s) // 40)
            axes[0].plot(s, smooth(mean, w), color=c, label=_LABEL[n])
            axes[0].fill_between(s, smooth(lo, w), smooth(hi, w), color=c, alpha=0.15, lw=0)
            s, mean, lo, hi = _band(per["train_mode/acc"])
            w = max(1, len(s) // 20)
            axes[1].plot(s, 100 * smooth(mean, w), color=c, label=_LABEL[n])
            axes[1].fill_between(s, 100 * smooth(lo, w), 100 * smooth(hi, w), color=c, alpha=0.15, lw=0)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("training loss (train mode, moving average)")
        axes[1].set_ylabel("batch accuracy in train mode (%)")
        axes[1].set_ylim(0, 100)
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.suptitle(f"{cfg['model']} on {cfg['data']}, SGD lr {cfg['noisy_lr']:g}, momentum {cfg['momentum']:g}: mean and min–max "
                     f"over {len(seeds)} seeds")
        return save(fig, path)


def _fig_activations(cfg, recs, path):
    import matplotlib.pyplot as plt

    c = cfg["act_channel"]
    seed = cfg["seed"]
    norms = [n for n in list(NORMS) + list(cfg.get("lp_norms", [])) if arm_records(recs, arm_name("lr", n, seed))]
    ncol = min(3, max(1, len(norms)))
    nrow = max(1, -(-len(norms) // ncol))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.4 * nrow), squeeze=False, sharey=True, layout="constrained")
        for i, n in enumerate(norms):
            ax = axes[i // ncol, i % ncol]
            r = arm_records(recs, arm_name("lr", n, seed))
            col = _color(n, i)
            s, q5 = series(r, f"act_q/{c}/q5")
            _, q25 = series(r, f"act_q/{c}/q25")
            _, q50 = series(r, f"act_q/{c}/q50")
            _, q75 = series(r, f"act_q/{c}/q75")
            _, q95 = series(r, f"act_q/{c}/q95")
            if len(s):
                ax.fill_between(s, q5, q95, color=col, alpha=0.25, lw=0, label="5-95 %")
                ax.fill_between(s, q25, q75, color=col, alpha=0.5, lw=0, label="25-75 %")
                ax.plot(s, q50, color=col, lw=1.2, label="median")
            ax.set_title(f"{_LABEL.get(n, n)}: instability {activation_instability(r):.3g}", fontsize=9)
            ax.set_xlabel("step")
            if i % ncol == 0:
                ax.set_ylabel(f"activation of channel {c}")
            ax.legend(fontsize=7, loc="upper right")
        for j in range(len(norms), nrow * ncol):
            axes[j // ncol, j % ncol].set_visible(False)
        fig.suptitle(f"Distribution of one channel's activations over training (lr {cfg['lr']:g}, seed {seed}; the module after "
                     f"convolution {cfg['act_conv']}, after the norm and the noise)")
        return save(fig, path)


def _fig_ics(cfg, recs, path):
    import matplotlib.pyplot as plt

    seeds = _seeds(cfg, "ics_seeds")
    layers = []
    for n in ("none", "bn"):
        for layer in ics_layers_of(arm_records(recs, arm_name("lr", n, seeds[0]))):
            if layer not in layers:
                layers.append(layer)
    ncol = max(1, len(layers))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, ncol, figsize=(3.8 * ncol, 6.0), squeeze=False)
        for j, layer in enumerate(layers):
            for i, n in enumerate(("none", "bn")):
                col = color_for(n, i)
                for k, row in (("l2", 0), ("cos", 1)):
                    s, mean, lo, hi = _band([series(arm_records(recs, arm_name("lr", n, sd)), f"ics/{layer}/{k}") for sd in seeds])
                    axes[row, j].plot(s, mean, color=col, marker="o", ms=2, lw=1, label=_LABEL[n])
                    if len(seeds) > 1:
                        axes[row, j].fill_between(s, lo, hi, color=col, alpha=0.15, lw=0)
            axes[0, j].set_yscale("log")
            axes[0, j].set_title(f"layer {j + 2}: {layer}", fontsize=9)
            axes[1, j].set_xlabel("step")
        axes[0, 0].set_ylabel("‖G − G'‖₂")
        axes[1, 0].set_ylabel("cos(G, G')")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"Internal covariate shift per layer of the {cfg['model']} (lr {cfg['lr']:g}"
                     + (f", mean and min–max over {len(seeds)} seeds" if len(seeds) > 1 else f", seed {seeds[0]}") + ")")
        return save(fig, path)


def _fig_ics_dln(cfg, recs, path):
    import matplotlib.pyplot as plt

    seeds = _seeds(cfg, "ics_seeds")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for i, n in enumerate(("none", "bn")):
            col = color_for(n, i)
            per = [ics_summary(arm_records(recs, arm_name("dln", n, sd)))["per_layer"] for sd in seeds]
            order = ics_layers_of(arm_records(recs, arm_name("dln", n, seeds[0])))
            layers = [k for k in order if all(k in p for p in per)]
            x = np.arange(2, len(layers) + 2)
            for ax, k in ((axes[0], "l2"), (axes[1], "cos")):
                v = np.array([[p[layer][k] for layer in layers] for p in per], dtype=float).reshape(len(per), len(layers))
                if not v.size:
                    continue
                mean = v.mean(0)
                ax.errorbar(x, mean, yerr=[mean - v.min(0), v.max(0) - mean], color=col, marker="o", ms=3, lw=1, capsize=2,
                            label=_LABEL[n])
        axes[0].set_yscale("log")
        axes[0].set_ylabel("median ‖G − G'‖₂")
        axes[1].set_ylabel("median cos(G, G')")
        for ax in axes:
            ax.set_xlabel("layer (1 = first; the first has no ICS)")
            ax.legend(fontsize=8)
        fig.suptitle(f"Internal covariate shift of a {cfg['dln_depth']}-layer deep linear network (width {cfg['dln_width']}, "
                     f"{cfg['dln_data']} data, SGD lr {cfg['dln_lr']:g}; median over training, "
                     + (f"mean and min–max over {len(seeds)} seeds)" if len(seeds) > 1 else f"seed {seeds[0]})"))
        return save(fig, path)
