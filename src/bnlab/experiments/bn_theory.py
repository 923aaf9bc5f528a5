"""``bn-theory``: Santurkar et al.'s §4 theory measured along training (CLAIMS.md S8–S11).

A BatchNorm network (``model``/``data`` of the config: a small convnet on the embedded digits by
default) is trained with SGD; at every ``measure_every``-th step (and the last) the terms of
:mod:`bnlab.theory` are measured at every BN layer on the step's batch, on a float64 copy with
BN ``ε = 0`` (the theorems' setting; PyTorch's smallest-normal stand-in, see
:func:`bnlab.theory.analysis_copy`) and, for the ε-corrected forms, with the layers' own ``ε``:

* **S8** (Thm 4.1): ``‖∇_y L̂‖² = (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m)`` per channel, the
  reduction factor ``‖∇_y L̂‖²/‖g‖²`` and the rescaling ``γ²/σ²``;
* **S9** (Thm 4.2): form (a) from activation-space HVPs; form (b) and its condition
  ``(Dv)ᵀH(Dv) ≤ (Dg)ᵀH(Dg)``;
* **S10** (Obs. 4.3): the share of ``‖g‖²`` the two projections remove, ``(⟨1,g⟩² + ⟨g,ŷ⟩²)/(m‖g‖²)``;
* **S11** (Lemma 4.5): the identity (its right side is the squared distance to the line through
  ``W*``) on the measured solutions; and empirically, from one ``W₀`` (the BN net's initial
  conv/linear weights, copied into the plain net), ``s11_seeds`` pairs of BN and plain runs of
  ``s11_steps`` steps: the distance travelled by each to its solution. For the BN net, the
  distance to the nearest point of its solution set that scale invariance gives (every
  per-channel rescaling of a weight before a BN is as good: :func:`bnlab.theory.ray_distance`
  per output channel) against the plain net's Euclidean distance, the lemma's comparison. The
  lemma's premise (every ``cW*`` is a BN optimum) is disputed (Dannemann & Junike 2025): this is
  measured, not assumed.

**Verdicts** (rules fixed in :class:`Thresholds`; every measured point = one BN layer at one
measured step):

* ``thm41-identity`` (S8): holds if the worst relative gap of Thm 4.1 at ε = 0 and of the
  ε-corrected form at the default ε are both ≤ ``gap_tol``; fails otherwise; inconclusive with no
  measured point.
* ``thm42a-identity`` (S9): the same for Thm 4.2(a) (ε = 0 and ε-corrected forms).
* ``thm42b-under-condition`` (S9): holds if (b) holds at every point where its condition holds;
  fails if it fails at one; inconclusive if the condition never holds. How often the condition
  holds is reported (it is the paper's assumption, not a consequence).
* ``obs43-projection-share`` (S10): holds if the mean over points of the share of ``‖g‖²``
  removed by the projections is ≥ ``share_min``; fails otherwise; inconclusive with no point.
* ``lemma45-identity`` (S11): holds if the lemma's right side equals the squared distance to the
  line through ``W*`` within ``lemma_tol`` (relative) for every seed's plain solution; fails
  otherwise; inconclusive with no seed.
* ``bn-closer-to-solution`` (S11): holds if in every seed the BN run's distance to its solution
  set is below the plain run's distance to its solution; fails otherwise; inconclusive with
  fewer than ``min_seeds`` seeds or if a run did not reach ``solved_acc`` training accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from .. import models
from ..probes.base import Probe, StepContext
from ..runs import RunDir
from ..theory import curvature_terms, gradient_terms, lemma45_sides, relative_gap, solution_distances
from ..train import make_optimizer, train
from .base import Claim, Context, Experiment, fmt, register_experiment, seed_spread, verdict
from .common import SGDConfig

__all__ = ["BNTheory", "Config", "Thresholds"]

_SRC = "Santurkar et al. 2018"
_ARRAYS = "theory.npz"
_CURV = ("lhs", "rhs_a", "rhs_b", "gap_a", "gap_a_eps", "condition_b", "holds_b", "curv_in", "curv_out", "quad_v",
         "correction")
_GRAD = ("gap_eps0", "gap_eps", "reduction", "scale", "share_mean", "share_dir")


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``bn-theory`` trains and measures (hashed: names the run)."""

    width: int = 8
    """Model width."""
    batch_size: int = 64
    """Examples per step (the ``m`` of a channel is this times the spatial size)."""
    lr: float = 0.05
    """Learning rate of every run."""
    steps: int = 120
    """SGD steps of the BN run along which the terms are measured."""
    measure_every: int = 20
    """Steps between measurements of the terms (the last step is measured too)."""
    curvature: bool = True
    """Measure Thm 4.2 (activation-space HVPs; the expensive part)."""
    eps_forms: bool = True
    """Also measure with the layers' own ε (the ε-corrected forms)."""
    s11_seeds: int = 3
    """S11: pairs of BN and plain runs from one W₀ (initialization seeds ``seed, seed+1, ...``)."""
    s11_steps: int = 300
    """S11: SGD steps of each of those runs (to a solution)."""

    def __post_init__(self):
        for k in ("steps", "measure_every", "s11_seeds", "s11_steps", "batch_size", "width"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``bn-theory``'s decision rules."""

    gap_tol: float = 1e-6
    """S8/S9(a): an identity holds when its worst relative gap (float64) is at most this (CLAIMS.md: 1e-6; round-off is ~1e-15, an O(ε/σ²) error of the wrong form ~1e-5)."""
    share_min: float = 0.01
    """S10: the projections matter when they remove on average at least 1% of ‖g‖² (far above round-off, a material change of the step beyond the rescaling)."""
    lemma_tol: float = 1e-10
    """S11: the lemma's right side equals the squared distance to the line through W* within this relative residual (float64 round-off is ~1e-16)."""
    min_seeds: int = 3
    """S11: the empirical comparison needs at least this many seeds (CLAIMS.md: ≥ 3)."""
    solved_acc: float = 0.9
    """S11: a run has reached a solution when its final training accuracy is at least this (10 classes)."""


class _Collector(Probe):
    """The experiment's measurement at scheduled steps: full per-channel terms kept in memory."""

    name = "theory"
    cost = "expensive"

    def __init__(self, every, *, curvature: bool, eps_forms: bool):
        super().__init__(every)
        self.curvature, self.eps_forms = curvature, eps_forms
        self.points: list[dict] = []

    def after_backward(self, ctx: StepContext) -> dict:
        batch, loss_fn = ctx.batch, ctx.loss_fn or F.cross_entropy
        g0 = gradient_terms(ctx.model, batch, loss_fn, eps=0.0)
        ge = gradient_terms(ctx.model, batch, loss_fn, eps=None) if self.eps_forms else {}
        c0 = curvature_terms(ctx.model, batch, loss_fn, eps=0.0) if self.curvature else {}
        ce = curvature_terms(ctx.model, batch, loss_fn, eps=None) if self.curvature and self.eps_forms else {}
        self.points.append({"step": ctx.step, "g0": g0, "ge": ge, "c0": c0, "ce": ce})
        out = {"layers": float(len(g0))}
        if g0:
            out["gap41_max"] = max(t.summary()["gap_eps0"] for t in g0.values())
        if c0:
            out["gap42a_max"] = max(t.gap_a for t in c0.values())
        return out


def _make(cfg: Config, norm: str, tr, seed: int):
    return models.make(cfg.model, norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes, width=cfg.width,
                       depth=cfg.depth, seed=seed)


def _nanmax(xs) -> float:
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return max(vals) if vals else math.nan


def _arrays_from(points: list[dict], layers: list[str]) -> dict:
    S, L = len(points), len(layers)
    a = {k: np.full((S, L), np.nan) for k in _GRAD}
    a["gap_eps_default"] = np.full((S, L), np.nan)
    a["eps0_form_at_default_eps"] = np.full((S, L), np.nan)
    for k in _CURV:
        a["c_" + k] = np.full((S, L), np.nan)
    a["c_gap_a_eps_default"] = np.full((S, L), np.nan)
    chan = {"lhs41": [], "rhs41": [], "chan_layer": [], "chan_step": []}
    for i, p in enumerate(points):
        for j, name in enumerate(layers):
            t = p["g0"].get(name)
            if t is not None:
                s = t.summary()
                for k in _GRAD:
                    a[k][i, j] = s[k]
                ok = ~t.degenerate
                chan["lhs41"].append(t.grad_y_sq[ok])
                chan["rhs41"].append(t.rhs_eps0[ok])
                chan["chan_layer"].append(np.full(int(ok.sum()), j))
                chan["chan_step"].append(np.full(int(ok.sum()), p["step"]))
            e = p["ge"].get(name)
            if e is not None:
                a["gap_eps_default"][i, j] = e.summary()["gap_eps"]
                ok = ~e.degenerate
                if ok.any():  # how far the ε = 0 formula is from the truth at the layers' own ε
                    a["eps0_form_at_default_eps"][i, j] = float(np.max(relative_gap(e.grad_y_sq[ok], [e.rhs_eps0[ok]])))
            c = p["c0"].get(name)
            if c is not None:
                s = c.summary()
                for k in _CURV:
                    a["c_" + k][i, j] = s[k]
            ce = p["ce"].get(name)
            if ce is not None:
                a["c_gap_a_eps_default"][i, j] = ce.gap_a_eps
    for k, v in chan.items():
        a[k] = np.concatenate(v) if v else np.zeros(0)
    a["steps"] = np.array([p["step"] for p in points], dtype=float)
    return a


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float).ravel()
    return x[np.isfinite(x)]


@register_experiment
class BNTheory(Experiment):
    name = "bn-theory"
    title = "Santurkar et al.'s theory, measured: Thm 4.1, Thm 4.2, Obs. 4.3, Lemma 4.5"
    source = _SRC
    description = (
        "At every BatchNorm layer of a BN network, along training, in float64: both sides of Thm 4.1 (the gradient "
        "w.r.t. the BN input is the output gradient projected and rescaled) and of Thm 4.2 (curvature along it, from "
        "activation-space Hessian-vector products), the share of the gradient the projections remove (Obs. 4.3); and "
        "Lemma 4.5's identity with the distance BN and plain runs travel from one initialization to their solutions."
    )
    claims = (
        Claim("thm41-identity", "The gradient w.r.t. a BN layer's input is the output gradient projected and rescaled: "
              "‖∇_y L̂‖² = (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m).", _SRC,
              "worst relative gap over every BN channel and measured step, float64, ε = 0; and of the ε-corrected form "
              "at the default ε; the reduction factor ‖∇_y L̂‖²/‖g‖² and the shares reported",
              "holds if both worst gaps ≤ gap_tol; inconclusive with no measured point", ref="S8"),
        Claim("thm42a-identity", "The curvature along the BN-input gradient equals the rescaled output-side curvature "
              "minus (γ/(mσ²))⟨g,ŷ⟩‖v‖² (Thm 4.2(a)).", _SRC,
              "worst relative gap over every BN layer and measured step, activation-space HVPs, float64, ε = 0; and of "
              "the ε-corrected form at the default ε",
              "holds if both worst gaps ≤ gap_tol; inconclusive with no measured point", ref="S9"),
        Claim("thm42b-under-condition", "Under the paper's assumption vᵀHv ≤ gᵀHg, the curvature along the BN-input "
              "gradient is bounded by the output-side curvature along the output gradient (Thm 4.2(b)).", _SRC,
              "at every BN layer and measured step: whether the condition holds and whether (b) holds",
              "holds if (b) holds wherever its condition does; inconclusive if the condition never holds", ref="S9"),
        Claim("obs43-projection-share", "BN's effect on the gradient is more than a rescaling: the projections remove "
              "part of it (Obs. 4.3).", _SRC,
              "mean over BN layers and measured steps of (⟨1,g⟩² + ⟨g,ŷ⟩²)/(m‖g‖²)",
              "holds if the mean share ≥ share_min; inconclusive with no measured point", ref="S10"),
        Claim("lemma45-identity", "Lemma 4.5's right side, ‖W₀ − W*‖² − (‖W*‖² − ⟨W*,W₀⟩)²/‖W*‖², is the squared "
              "distance from W₀ to the line through W*.", _SRC,
              "relative residual of the identity at each seed's W₀ and plain solution W*, float64",
              "holds if every residual ≤ lemma_tol; inconclusive with no seed", ref="S11"),
        Claim("bn-closer-to-solution", "BN gives a better-placed initialization: from the same W₀, the BN net's "
              "solution is nearer than the plain net's (Lemma 4.5, measured).", _SRC,
              "per seed: BN run's distance from W₀ to its solution set (per-channel rays of the weights before BN) "
              "against the plain run's distance to its solution, both relative to ‖W₀‖",
              "holds if BN's is smaller in every seed; inconclusive with fewer than min_seeds seeds or a run below "
              "solved_acc training accuracy", ref="S11"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(width=4, steps=8, measure_every=4, s11_seeds=3, s11_steps=20, batch_size=32),
        "quick": Config(),
        "paper": Config(data="mnist1d", width=32, steps=2000, measure_every=100, s11_seeds=5, s11_steps=3000,
                        batch_size=128),
    }

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        # ---- S8-S10: the terms along training of the BN net
        net = _make(cfg, "bn", tr, cfg.seed)
        last = cfg.steps - 1
        col = _Collector(lambda s: s % cfg.measure_every == 0 or s == last, curvature=cfg.curvature,
                         eps_forms=cfg.eps_forms)
        opt = make_optimizer(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        h = train(net, tr, opt, steps=cfg.steps, batch_size=cfg.batch_size, eval_data=te, eval_every=cfg.steps,
                  device=ctx.device, seed=cfg.seed, probes=[col], log=lambda r: run.append_metrics({"arm": "theory", **r}),
                  progress=ctx.bar(f"{self.name} terms"))
        layers = list(col.points[0]["g0"]) if col.points else []
        arr = _arrays_from(col.points, layers)

        # ---- S11: BN and plain runs from one W0
        s11 = []
        for k in range(cfg.s11_seeds):
            seed = cfg.seed + k
            bn = _make(cfg, "bn", tr, seed)
            plain = _make(cfg, "none", tr, seed)
            bn_p, pl_p = dict(bn.named_parameters()), dict(plain.named_parameters())
            common = [n for n in bn_p if n in pl_p and bn_p[n].shape == pl_p[n].shape]
            with torch.no_grad():
                for n in common:
                    pl_p[n].copy_(bn_p[n])
            w0 = {n: bn_p[n].detach().clone().double() for n in common}
            per_channel = _before_bn(bn, common)
            row = {"seed": seed, "common": common, "per_channel": per_channel}
            for arm, m in (("bn", bn), ("plain", plain)):
                o = make_optimizer(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                hh = train(m, tr, o, steps=cfg.s11_steps, batch_size=cfg.batch_size, eval_data=te,
                           eval_every=cfg.s11_steps, device=ctx.device, seed=seed,
                           log=lambda r, arm=arm, seed=seed: run.append_metrics({"arm": f"s11-{arm}", "seed": seed, **r}),
                           progress=ctx.bar(f"{self.name} S11 {arm} seed {seed}"))
                fin = hh.final
                w = {n: dict(m.named_parameters())[n].detach().cpu().double() for n in common}
                d = solution_distances({n: t.cpu() for n, t in w0.items()}, w, per_channel if arm == "bn" else ())
                d_ray = solution_distances({n: t.cpu() for n, t in w0.items()}, w, per_channel)
                row[arm] = {"train_acc": float(fin.get("train_acc", math.nan)), "test_acc": float(fin.get("test_acc", math.nan)),
                            "diverged": bool(hh.summary().get("diverged", False)),
                            "euclid": d["euclid"], "ray": d_ray["ray"], "angle": d_ray["angle"],
                            "distance": d["ray"] if arm == "bn" else d["euclid"]}
                if arm == "plain":
                    row["lemma"] = lemma45_sides({n: t.cpu() for n, t in w0.items()}, w)
            s11.append(row)
            run.append_metrics({"event": "s11_seed", **{k: v for k, v in row.items() if k not in ("common",)}})
        run.save_arrays(_ARRAYS, **arr)

        def pts(key):
            return _finite(arr[key])

        share = _finite(arr["share_mean"] + arr["share_dir"])
        cond, holds = arr["c_condition_b"], arr["c_holds_b"]
        cmask = np.isfinite(cond)
        return {
            "layers": layers, "steps": [int(s) for s in arr["steps"]], "final": {k: v for k, v in h.summary().items() if k != "seconds"},
            "n_points": int(np.isfinite(arr["gap_eps0"]).sum()),
            "thm41": {"worst_gap_eps0": _nanmax(pts("gap_eps0")), "worst_gap_eps": _nanmax(pts("gap_eps_default")),
                      "eps0_form_at_default_eps": _nanmax(pts("eps0_form_at_default_eps")),
                      "reduction": _stats(pts("reduction")), "scale": _stats(pts("scale")),
                      "share_mean": _stats(pts("share_mean")), "share_dir": _stats(pts("share_dir")),
                      "per_layer_reduction": [float(np.nanmean(arr["reduction"][:, j])) for j in range(len(layers))]},
            "thm42": {"n_points": int(cmask.sum()), "worst_gap_a": _nanmax(pts("c_gap_a")),
                      "worst_gap_a_eps": _nanmax(pts("c_gap_a_eps_default")),
                      "condition_count": int(np.nansum(cond[cmask])), "holds_b_count": int(np.nansum(holds[cmask])),
                      "b_fails_under_condition": int(np.sum((cond[cmask] == 1) & (holds[cmask] == 0))),
                      "b_holds_without_condition": int(np.sum((cond[cmask] == 0) & (holds[cmask] == 1))),
                      "curv_in": _stats(pts("c_curv_in")), "curv_out": _stats(pts("c_curv_out")),
                      # "smaller whenever ⟨g,ŷ⟩ > 0": the BN-input curvature below the rescaled output-side one
                      "reduced_count": int(np.sum(arr["c_lhs"][cmask] < arr["c_quad_v"][cmask])),
                      "correction_positive_count": int(np.sum(arr["c_correction"][cmask] > 0))},
            "obs43": {"share": _stats(share),
                      "per_layer_share": [float(np.nanmean((arr["share_mean"] + arr["share_dir"])[:, j]))
                                          for j in range(len(layers))]},
            "s11": s11,
        }

    def judge(self, summary: dict, th: Thresholds) -> list:
        out = []
        t41, t42, o43 = summary["thm41"], summary["thm42"], summary["obs43"]
        n = summary["n_points"]
        layers = summary["layers"]

        g0, ge = t41["worst_gap_eps0"], t41["worst_gap_eps"]
        worst = _nanmax([g0, ge])
        none = n == 0 or not math.isfinite(g0)
        ok = None if none else (g0 <= th.gap_tol and (not math.isfinite(ge) or ge <= th.gap_tol))
        red, sc = t41["reduction"], t41["scale"]
        out.append(verdict(
            "thm41-identity", ok, worst,
            f"{n} points ({len(layers)} BN layers × {len(summary['steps'])} steps): worst relative gap {fmt(g0)} at ε = 0, "
            f"{fmt(ge)} for the ε-corrected form at the default ε (the ε = 0 formula there is off by up to "
            f"{fmt(t41.get('eps0_form_at_default_eps'))}); reduction factor ‖∇_y L̂‖²/‖g‖² median {fmt(red['median'])} "
            f"(min {fmt(red['min'])}, max {fmt(red['max'])}), rescaling γ²/σ² alone median {fmt(sc['median'])}; shares of ‖g‖²: "
            f"⟨1,g⟩²/m mean {fmt(t41['share_mean']['mean'])}, ⟨g,ŷ⟩²/m mean {fmt(t41['share_dir']['mean'])}"
            + ("; inconclusive: no measured point" if none else ""),
            f"worst gap at ε = 0 ≤ {fmt(th.gap_tol)} and worst gap of the ε-corrected form ≤ {fmt(th.gap_tol)}"))

        a0, ae = t42["worst_gap_a"], t42["worst_gap_a_eps"]
        none = t42["n_points"] == 0 or not math.isfinite(a0)
        ok = None if none else (a0 <= th.gap_tol and (not math.isfinite(ae) or ae <= th.gap_tol))
        out.append(verdict(
            "thm42a-identity", ok, _nanmax([a0, ae]),
            f"{t42['n_points']} points: worst relative gap of (a) {fmt(a0)} at ε = 0, {fmt(ae)} for the ε-corrected form; "
            f"curvature along the BN-input gradient vᵀ∇²v/‖v‖² median {fmt(t42['curv_in']['median'])}, along the output "
            f"gradient gᵀHg/‖g‖² median {fmt(t42['curv_out']['median'])}; the correction Σγ⟨g,ŷ⟩‖v‖²/(mσ²) was positive "
            f"(the input-side curvature below the rescaled output side, vᵀ∇²v < (Dv)ᵀH(Dv)) at "
            f"{t42.get('correction_positive_count', '—')} ({t42.get('reduced_count', '—')}) of {t42['n_points']} points"
            + ("; inconclusive: no measured point" if none else ""),
            f"worst gap at ε = 0 ≤ {fmt(th.gap_tol)} and worst gap of the ε-corrected form ≤ {fmt(th.gap_tol)}"))

        nc, npts = t42["condition_count"], t42["n_points"]
        bad = t42["b_fails_under_condition"]
        ok = None if nc == 0 else bad == 0
        out.append(verdict(
            "thm42b-under-condition", ok, (nc - bad) / nc if nc else math.nan,
            f"the condition (Dv)ᵀH(Dv) ≤ (Dg)ᵀH(Dg) held at {nc} of {npts} points; (b) held at {nc - bad} of them and at "
            f"{t42['b_holds_without_condition']} of the {npts - nc} others; (b) held at {t42['holds_b_count']} of {npts} overall"
            + ("" if nc else "; inconclusive: Thm 4.2 not measured" if npts == 0 else "; inconclusive: the condition never held"),
            "(b) holds at every point where its condition holds; inconclusive if the condition never holds"))

        sh = o43["share"]
        none = sh["n"] == 0
        per = ", ".join(f"{l} {fmt(s)}" for l, s in zip(layers, o43["per_layer_share"]))
        out.append(verdict(
            "obs43-projection-share", None if none else sh["mean"] >= th.share_min, sh["mean"],
            f"share of ‖g‖² removed by the two projections over {sh['n']} points: mean {fmt(sh['mean'])}, median "
            f"{fmt(sh['median'])}, max {fmt(sh['max'])}; per layer (mean): {per or '—'}"
            + ("; inconclusive: no measured point" if none else ""),
            f"mean share ≥ {fmt(th.share_min)}"))

        rows = summary["s11"]
        res = [r["lemma"]["residual"] for r in rows if "lemma" in r]
        prem = sum(r["lemma"]["premise"] for r in rows if "lemma" in r)
        out.append(verdict(
            "lemma45-identity", None if not res else max(res) <= th.lemma_tol, _nanmax(res),
            f"{len(res)} seeds: largest relative residual {fmt(_nanmax(res))} between the lemma's right side and "
            f"min_c ‖W₀ − cW*‖²; premise ⟨W₀,W*⟩ > 0 at {int(prem)} of {len(res)}"
            + ("; inconclusive: no seed" if not res else ""),
            f"every residual ≤ {fmt(th.lemma_tol)}"))

        missing = []
        if len(rows) < th.min_seeds:
            missing.append(f"{len(rows)} seeds < {th.min_seeds}")
        unsolved = [f"{arm} seed {r['seed']} ({r[arm]['train_acc']:.1%})" for r in rows for arm in ("bn", "plain")
                    if not (r[arm]["train_acc"] >= th.solved_acc) or r[arm]["diverged"]]
        if unsolved:
            missing.append("not solved: " + ", ".join(unsolved))
        d_bn = [r["bn"]["distance"] for r in rows]
        d_pl = [r["plain"]["distance"] for r in rows]
        closer = [b < p for b, p in zip(d_bn, d_pl)]
        per_seed = "; ".join(
            f"seed {r['seed']}: BN {fmt(r['bn']['distance'])} (Euclidean {fmt(r['bn']['euclid'])}, angle "
            f"{fmt(r['bn']['angle'])}°) vs plain {fmt(r['plain']['distance'])} (to its per-channel rays "
            f"{fmt(r['plain']['ray'])}, angle {fmt(r['plain']['angle'])}°)" for r in rows)
        out.append(verdict(
            "bn-closer-to-solution", None if missing else all(closer), _mean(d_pl) - _mean(d_bn),
            f"distance from W₀ to the solution relative to ‖W₀‖, BN closer in {sum(closer)} of {len(rows)} seeds; {per_seed}"
            + ("; inconclusive: " + "; ".join(missing) if missing else ""),
            f"BN's distance to its solution set < the plain net's distance to its solution in every seed; inconclusive with "
            f"< {th.min_seeds} seeds or a run below {th.solved_acc:.0%} training accuracy",
            spread=f"plain − BN per seed: {seed_spread([p - b for b, p in zip(d_bn, d_pl)])}" if rows else ""))
        return out

    def figures(self, run: RunDir) -> list[Path]:
        return _figures(run)


def _before_bn(net, names: list[str]) -> list[str]:
    """The weight tensors among ``names`` whose module is directly followed by a BatchNorm in its
    ``nn.Sequential`` (their output channels are scale-invariant one by one)."""
    out = []
    for parent_name, parent in net.named_modules():
        kids = list(parent.named_children())
        for (n1, m1), (_, m2) in zip(kids, kids[1:]):
            if isinstance(m2, torch.nn.modules.batchnorm._BatchNorm):
                full = f"{parent_name}.{n1}.weight" if parent_name else f"{n1}.weight"
                if full in names:
                    out.append(full)
    return out


def _stats(x) -> dict:
    x = _finite(x)
    if not x.size:
        return {"n": 0, "mean": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)), "min": float(x.min()),
            "max": float(x.max())}


def _mean(xs) -> float:
    v = _finite(xs)
    return float(v.mean()) if v.size else math.nan


def _figures(run: RunDir) -> list[Path]:
    from ..plotting import plt, save

    a = run.load_arrays(_ARRAYS)
    summary = run.read_json("summary.json")
    layers = summary["layers"]
    steps = a["steps"]
    paths = []

    # 1. LHS against RHS
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    ax = axes[0]
    if a["lhs41"].size:
        for j, name in enumerate(layers):
            sel = a["chan_layer"] == j
            ax.scatter(a["rhs41"][sel], a["lhs41"][sel], s=8, label=name)
        pos = np.concatenate([a["lhs41"][a["lhs41"] > 0], a["rhs41"][a["rhs41"] > 0]])
        if pos.size:
            ax.plot([pos.min(), pos.max()], [pos.min(), pos.max()], "k--", lw=1, label="y = x")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("(γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m)")
    ax.set_ylabel("‖∇_y L̂‖² (autograd)")
    ax.set_title(f"Thm 4.1 per channel, ε = 0 (worst gap {fmt(summary['thm41']['worst_gap_eps0'])})", fontsize=9)
    ax = axes[1]
    lhs, rhs = a["c_lhs"].ravel(), a["c_rhs_a"].ravel()
    ok = np.isfinite(lhs) & np.isfinite(rhs)
    if ok.any():
        for j, name in enumerate(layers):
            ax.scatter(a["c_rhs_a"][:, j], a["c_lhs"][:, j], s=14, label=name)
        lo, hi = min(lhs[ok].min(), rhs[ok].min()), max(lhs[ok].max(), rhs[ok].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "Thm 4.2 not measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel("(Dv)ᵀH(Dv) − Σ γ⟨g,ŷ⟩‖v‖²/(mσ²)")
    ax.set_ylabel("vᵀ(∂²L̂/∂y²)v (HVP)")
    ax.set_title(f"Thm 4.2(a) per layer, ε = 0 (worst gap {fmt(summary['thm42']['worst_gap_a'])})", fontsize=9)
    fig.tight_layout()
    paths.append(save(fig, run.figure_path("theory_lhs_rhs.png")))

    # 2. the reduction factor and the rescaling
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j, name in enumerate(layers):
        line, = ax.plot(steps, a["reduction"][:, j], "o-", label=f"{name}: ‖∇_y L̂‖²/‖g‖²")
        ax.plot(steps, a["scale"][:, j], "--", color=line.get_color(), label=f"{name}: γ²/σ² (rescaling alone)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("factor")
    ax.set_title("Thm 4.1: the reduction factor, and the rescaling it would be without the projections", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save(fig, run.figure_path("theory_reduction.png")))

    # 3. shares of each term over steps and layers
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "share_mean", "⟨1,g⟩²/(m‖g‖²)"), (axes[1], "share_dir", "⟨g,ŷ⟩²/(m‖g‖²)")):
        for j, name in enumerate(layers):
            ax.plot(steps, np.maximum(a[key][:, j], 1e-18), "o-", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"Obs. 4.3: share of ‖g‖² removed, {title}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of ‖g‖²")
    fig.tight_layout()
    paths.append(save(fig, run.figure_path("theory_shares.png")))

    # 4. S11 distances
    rows = summary["s11"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(rows))
    wdt = 0.2
    for k, (arm, key, label) in enumerate((("bn", "ray", "BN: to its per-channel rays"), ("bn", "euclid", "BN: Euclidean"),
                                           ("plain", "euclid", "plain: Euclidean"), ("plain", "ray", "plain: to its rays"))):
        axes[0].bar(x + (k - 1.5) * wdt, [r[arm][key] for r in rows], wdt, label=label)
    axes[0].set_xticks(x, [f"seed {r['seed']}" for r in rows])
    axes[0].set_ylabel("distance from W₀ / ‖W₀‖")
    axes[0].set_title("Lemma 4.5, measured: distance travelled to the solution", fontsize=9)
    axes[0].legend(fontsize=7)
    for k, arm in enumerate(("bn", "plain")):
        axes[1].bar(x + (k - 0.5) * 0.35, [r[arm]["angle"] for r in rows], 0.35, label=arm)
    axes[1].set_xticks(x, [f"seed {r['seed']}" for r in rows])
    axes[1].set_ylabel("mean angle W₀ → W (°)")
    axes[1].set_title("angle travelled (per channel for weights before BN)", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(save(fig, run.figure_path("theory_s11_distances.png")))
    return paths
