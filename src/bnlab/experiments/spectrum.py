"""``spectrum``: the Hessian's eigenvalue density with and without BatchNorm (Ghorbani, Krishnan, Xiao 2019).

The same network with BatchNorm and without normalization, from the same initialization, is
trained with SGD + momentum on the same batches, from ``seeds`` initializations (seeds ``seed,
seed+1, ...``; the data split, the subset and the batch order stay those of ``seed``). At each
step of ``checkpoints`` (0 is the initialization) the eigenvalue density of the **dataset-level**
Hessian is estimated by stochastic Lanczos quadrature (:func:`bnlab.spectrum.spectral_density`,
start vectors from the initialization's seed): the Hessian of the mean loss over a fixed subset,
the first ``subset_batches × subset_batch_size`` training examples cut into fixed batches
(:class:`bnlab.dataset_curvature.DatasetHessianOperator`; train-mode BatchNorm normalizes each
batch with its own statistics, as in training). Three densities per checkpoint and seed:

* ``none``: the plain network;
* ``bn-train``: the BN network, BatchNorm in train mode (batch statistics);
* ``bn-eval``: the same BN network with BatchNorm on population statistics (the running statistics
  recomputed as the plain average over the subset's batches, then eval mode;
  :func:`bnlab.probes.spectrum.population_statistics`).

Each density's outline (:class:`bnlab.probes.spectrum.SpectrumProbe`): the top eigenvalue ``λ̂_1``,
the bulk edge ``λ_b`` and the ratio ``λ̂_1/λ_b``; the number of eigenvalues above ``far_factor · λ_b``
(``n_far``, the mass of the outliers far from the bulk, in eigenvalues); the share of ``‖g‖²`` (the
subset's gradient) in the top-``top_k`` eigenspace; the spread of the ratio over the Lanczos runs.

**Claims** (rules fixed before the run; numbers in :class:`Thresholds`). For a comparison of
variant ``a`` against ``b``, a seed counts at a checkpoint when both densities were measured (the
arm had not diverged), are finite, and the ratio's spread over Lanczos runs (coefficient of
variation) is at most ``max_spread`` in both; a checkpoint is judged when at least one seed counts,
on the **geometric mean over those seeds** of ``ratio(a)/ratio(b)``, the mean of ``n_far`` and the
mean of the share difference. Each claim is inconclusive with fewer than ``min_checkpoints``
judged checkpoints; the spread over seeds is reported.

* ``bn-suppresses-outliers`` (G1): holds if at every judged checkpoint the plain net's ``λ̂_1/λ_b``
  is at least ``ratio_factor`` times BN-train's (geometric mean over seeds) and BN-train's mean
  ``n_far`` is at most the plain net's; fails otherwise.
* ``bn-gradient-leaves-top-space`` (G1): holds if at every judged checkpoint the plain net's share
  of ``‖g‖²`` in the top-``top_k`` eigenspace exceeds BN-train's by at least ``share_margin``
  (mean over seeds); fails otherwise.
* ``eval-mode-outliers-return`` (G2): holds if at every judged checkpoint BN-eval's ``λ̂_1/λ_b`` is
  at least ``ratio_factor`` times BN-train's (geometric mean over seeds) and BN-eval's mean
  ``n_far`` at least BN-train's; fails otherwise.

Figures: the densities of the first seed on a log scale, one panel per checkpoint, a line for each
of none, BN-train and BN-eval (as the paper's figures; each stored on 2 000 points, the largest
value of the density in each bin, so an outlier's narrow peak keeps its height); the outline
against the step (geometric mean over seeds, bars from the smallest to the largest seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import data as data_mod
from ..errors import UserError
from ..runs import RunDir
from .base import Claim, Context, Experiment, fmt, register_experiment, seed_spread, verdict
from .common import SGDConfig, make_net

__all__ = ["Spectrum", "Config", "Thresholds", "VARIANTS", "judged_checkpoints"]

_SRC = "Ghorbani, Krishnan, Xiao 2019"
_ARRAYS = "spectrum.npz"
_POINTS = 2000  # points per stored density
VARIANTS = ("none", "bn-train", "bn-eval")
_LABELS = {"none": "no norm", "bn-train": "BN, train mode", "bn-eval": "BN, population statistics"}
_COLORS = {"none": "#d62728", "bn-train": "#1f77b4", "bn-eval": "#ff7f0e"}


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``spectrum`` trains and measures (hashed: names the run)."""

    model: str = "mlp"
    """Model (``bnlab list``)."""
    width: int = 32
    """Model width."""
    depth: int = 2
    """Model depth."""
    lr: float = 0.05
    """SGD learning rate of both nets."""
    checkpoints: tuple[int, ...] = (0, 50, 200)
    """Steps at which the densities are measured (0: the initialization); training runs to the last."""
    subset_batches: int = 2
    """Fixed batches of the dataset-level Hessian."""
    subset_batch_size: int = 128
    """Examples per fixed batch (the subset is the first subset_batches × subset_batch_size training examples)."""
    n_runs: int = 4
    """Lanczos runs (random start vectors) per density."""
    n_steps: int = 25
    """Lanczos steps per run."""
    top_k: int = 10
    """Dimension of the top eigenspace of the gradient's share (Ghorbani et al.: the number of classes)."""
    bulk_count: float = 10.0
    """The bulk edge starts at the largest Ritz value standing for at least this many eigenvalues (bnlab.spectrum)."""
    gap_frac: float = 0.1
    """... and extends through Ritz values less than this fraction of the bulk's width apart."""
    far_factor: float = 5.0
    """``n_far`` counts the eigenvalues above this multiple of the bulk edge."""
    seeds: int = 3
    """Initializations per net: seeds ``seed, seed+1, ...`` (the split, the subset and the batch order stay those of ``seed``)."""

    def __post_init__(self):
        cps = self.checkpoints
        if not cps or any((not isinstance(c, int)) or c < 0 for c in cps) or list(cps) != sorted(set(cps)):
            raise ValueError(f"checkpoints must be increasing integers >= 0, got {cps}")
        for name in ("subset_batches", "subset_batch_size", "n_steps", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k >= self.n_steps:
            raise ValueError(f"top_k must be < n_steps (Lanczos must see past the top-k space), got {self.top_k} >= {self.n_steps}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.n_runs < 2:
            raise ValueError(f"n_runs must be >= 2 (the spread over runs is judged), got {self.n_runs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (self.far_factor >= 1 and math.isfinite(self.far_factor)):
            raise ValueError(f"far_factor must be a finite number >= 1, got {self.far_factor}")
        if not (self.bulk_count > 0 and self.gap_frac >= 0):
            raise ValueError("bulk_count must be > 0 and gap_frac >= 0")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``spectrum``'s decision rules."""

    ratio_factor: float = 2.0
    """Outliers are suppressed (G1) / return (G2) when the top/bulk-edge ratio differs by at least this factor: Ghorbani et al. see outliers one to two orders of magnitude from the bulk without BN and almost none with it; a factor 2 is a clear separation, a judged density's run-to-run spread being at most max_spread, and its edge a median over runs."""
    share_margin: float = 0.1
    """G1's gradient part: the plain net's share of ‖g‖² in the top eigenspace exceeds BN's by at least this (10 points of ‖g‖²; Ghorbani et al. report most of ‖g‖² there without BN and little with it)."""
    max_spread: float = 0.5
    """A density is too noisy to judge when the coefficient of variation of the top/edge ratio over its Lanczos runs exceeds this (a 50 % run-to-run spread would blur a factor-2 difference)."""
    min_checkpoints: int = 2
    """A claim is judged on at least this many checkpoints (the paper: at initialization and during training)."""


def _usable(o, th: Thresholds) -> bool:
    if o is None:
        return False
    vals = [o.get("top_to_edge"), o.get("grad_share"), o.get("n_far"), o.get("ratio_spread")]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals) and o["ratio_spread"] <= th.max_spread


def judged_checkpoints(summary: dict, a: str, b: str, th: Thresholds) -> tuple[dict, list[str]]:
    """``{checkpoint key: [(outline a, outline b) per seed that counts]}`` for the checkpoints with at least one such
    seed, and why the other seeds or checkpoints do not count."""
    out, why = {}, []
    for c in summary["checkpoints"]:
        key = str(c)
        pairs, bad = [], []
        for r in summary["runs"]:
            oa, ob = r["outline"].get(a, {}).get(key), r["outline"].get(b, {}).get(key)
            if oa is None or ob is None:
                bad.append(f"seed {r['seed']} not measured (diverged before it)")
            elif not (_usable(oa, th) and _usable(ob, th)):
                bad.append(f"seed {r['seed']} not finite or too noisy (ratio spread over runs "
                           f"{fmt(oa.get('ratio_spread'))}, {fmt(ob.get('ratio_spread'))} > {fmt(th.max_spread)})")
            else:
                pairs.append((oa, ob))
        if pairs:
            out[key] = pairs
        if bad:
            why.append(f"step {c}: " + ", ".join(bad))
    return out, why


def _gmean(xs) -> float:
    xs = [float(x) for x in xs]
    if not xs or any(not x > 0 for x in xs):
        return math.nan if not xs else (0.0 if all(x >= 0 for x in xs) else math.nan)
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _pooled(grid: np.ndarray, density: np.ndarray, points: int = _POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The density on at most ``points`` points: the largest value in each of ``points`` bins of the grid, at the
    bin's centre (a Ritz value's narrow peak keeps its height; what the log-scale figure shows)."""
    if len(grid) <= points:
        return grid, density
    edges = np.linspace(0, len(grid), points + 1).astype(int)
    dens = np.maximum.reduceat(density, edges[:-1])
    centres = 0.5 * (grid[edges[:-1]] + grid[edges[1:] - 1])
    return centres, dens


@register_experiment
class Spectrum(Experiment):
    name = "spectrum"
    title = "The Hessian's eigenvalue density: outliers without BatchNorm, none with it, back in eval mode"
    source = _SRC
    description = (
        "The same net with BatchNorm and without normalization, trained with SGD on the same batches. At initialization "
        "and at several steps, the eigenvalue density of the Hessian of the loss over a fixed training subset, by "
        "stochastic Lanczos quadrature: the plain net, the BN net in train mode, and the BN net on population statistics. "
        "Outliers: top eigenvalue over the bulk edge, eigenvalues far above the edge, and the gradient's share in the "
        "top eigenspace."
    )
    claims = (
        Claim("bn-suppresses-outliers",
              "Without BatchNorm the Hessian has isolated outlier eigenvalues far from the bulk; BatchNorm (train mode) "
              "suppresses them.", _SRC,
              "per checkpoint: λ_top/λ_edge of the plain net over BN-train's, and the eigenvalues above far_factor·λ_edge",
              "holds if at every judged checkpoint plain ratio ≥ ratio_factor × BN ratio and BN's n_far ≤ plain's; "
              "inconclusive with fewer than min_checkpoints judged checkpoints", ref="G1"),
        Claim("bn-gradient-leaves-top-space",
              "Without BatchNorm the gradient concentrates in the top (outlier) eigenspace; with BatchNorm much less.", _SRC,
              "per checkpoint: share of ‖g‖² in the top-k eigenspace, plain net − BN-train",
              "holds if at every judged checkpoint plain share ≥ BN share + share_margin; inconclusive with fewer than "
              "min_checkpoints judged checkpoints", ref="G1"),
        Claim("eval-mode-outliers-return",
              "With BatchNorm on population statistics (eval mode) the outliers return.", _SRC,
              "per checkpoint: λ_top/λ_edge of BN-eval over BN-train's, and the eigenvalues above far_factor·λ_edge",
              "holds if at every judged checkpoint eval ratio ≥ ratio_factor × train ratio and eval n_far ≥ train n_far; "
              "inconclusive with fewer than min_checkpoints judged checkpoints", ref="G2"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(width=8, depth=1, checkpoints=(0, 10), subset_batches=1, subset_batch_size=64, n_runs=2,
                       n_steps=10, top_k=3, batch_size=64, seeds=1),
        "quick": Config(),
        "paper": Config(data="mnist1d", model="convnet", width=32, depth=2, checkpoints=(0, 100, 1000, 4000),
                        subset_batches=8, n_runs=10, n_steps=80),
    }

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        from ..probes.spectrum import SpectrumProbe
        from ..train import make_optimizer, train

        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        n_sub = cfg.subset_batches * cfg.subset_batch_size
        if n_sub > len(tr):
            raise UserError(f"the subset (subset_batches × subset_batch_size = {n_sub} examples) is larger than the "
                            f"training set of {cfg.data} ({len(tr)}); accepted: at most {len(tr)}")
        batches = [(tr.x[i:i + cfg.subset_batch_size], tr.y[i:i + cfg.subset_batch_size])
                   for i in range(0, n_sub, cfg.subset_batch_size)]
        cps = set(cfg.checkpoints)
        steps = max(cfg.checkpoints) + 1
        arrays: dict = {}
        runs: list = []
        n_params: dict = {}
        for seed in [cfg.seed + i for i in range(cfg.seeds)]:
            kw = dict(every=lambda s: s in cps, batches=batches, n_runs=cfg.n_runs, n_steps=cfg.n_steps, top_k=cfg.top_k,
                      bulk_count=cfg.bulk_count, gap_frac=cfg.gap_frac, far_factor=cfg.far_factor, seed=seed, keep=True)
            outline: dict = {v: {} for v in VARIANTS}
            arms: dict = {}
            for norm in ("none", "bn"):
                net = make_net(cfg, norm, tr, seed=seed)
                n_params[norm] = sum(p.numel() for p in net.parameters() if p.requires_grad)
                probes = {"none": SpectrumProbe(name="spectrum", **kw)} if norm == "none" else {
                    "bn-train": SpectrumProbe(name="spectrum", **kw),
                    "bn-eval": SpectrumProbe(name="spectrum_eval", eval_mode=True, **kw)}
                arm = f"{norm}/seed{seed}"
                opt = make_optimizer(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                h = train(net, tr, opt, steps=steps, batch_size=cfg.batch_size, eval_data=te, eval_every=steps,
                          eval_train=False, device=ctx.device, seed=cfg.seed, probes=list(probes.values()),
                          log=lambda r, arm=arm, seed=seed: run.append_metrics({"arm": arm, "seed": seed, **r}),
                          progress=ctx.bar(f"{self.name} {arm}"))
                final = h.evals[-1] if h.evals else {}
                arms[norm] = {"diverged": bool(h.diverged), "diverged_at": h.diverged_at, "steps": h.steps,
                              "test_acc": final.get("test_acc", math.nan)}
                run.append_metrics({"event": "arm_end", "arm": arm, "seed": seed, **arms[norm]})
                for variant, probe in probes.items():
                    for step, sd in probe.results:
                        outline[variant][str(step)] = probe.outline(sd) if sd is not None else None
                        if sd is None:
                            continue
                        outline[variant][str(step)]["sigma"] = sd.sigma
                        if seed == cfg.seed:  # the figures draw the first seed's densities
                            g, d = _pooled(sd.grid, sd.density)
                            arrays[f"{variant}_{step}_grid"], arrays[f"{variant}_{step}_density"] = g, d
                            arrays[f"{variant}_{step}_floor"] = np.array(sd.floor)
            runs.append({"seed": seed, "outline": outline, "arms": arms})
        run.save_arrays(_ARRAYS, **arrays)
        return {
            "checkpoints": list(cfg.checkpoints), "variants": list(VARIANTS), "runs": runs, "seeds": [r["seed"] for r in runs],
            "n_params": n_params, "top_k": cfg.top_k, "far_factor": cfg.far_factor,
            "operator": (f"dataset-level: the mean loss over the first {n_sub} training examples in "
                         f"{cfg.subset_batches} fixed batches of {cfg.subset_batch_size} (DatasetHessianOperator)"),
            "slq": {"n_runs": cfg.n_runs, "n_steps": cfg.n_steps, "bulk_count": cfg.bulk_count, "gap_frac": cfg.gap_frac},
        }

    def judge(self, summary: dict, th: Thresholds) -> list:
        k = summary.get("top_k", "k")
        far = fmt(summary.get("far_factor"))
        n_seeds = len(summary["runs"])
        judged_rule = (f"a seed counts at a checkpoint when both densities are measured, finite and their ratio spread over "
                       f"Lanczos runs ≤ {fmt(th.max_spread)}; inconclusive with fewer than {th.min_checkpoints} judged checkpoints")
        out = []
        for claim, a, name_a in (("bn-suppresses-outliers", "none", "plain"), ("eval-mode-outliers-return", "bn-eval", "BN-eval")):
            pairs, why = judged_checkpoints(summary, a, "bn-train", th)
            parts, oks, factors, spreads = [], [], [], []
            for key, ps in pairs.items():
                per_seed = [oa["top_to_edge"] / ob["top_to_edge"] if ob["top_to_edge"] > 0 else math.inf for oa, ob in ps]
                factor = _gmean(per_seed)
                far_a = float(np.mean([oa["n_far"] for oa, _ in ps]))
                far_b = float(np.mean([ob["n_far"] for _, ob in ps]))
                ok = factor >= th.ratio_factor and far_a >= far_b
                oks.append(ok)
                factors.append(factor)
                spreads.append(f"step {key}, factor over {seed_spread(per_seed)}")
                ra = _gmean([oa["top_to_edge"] for oa, _ in ps])
                rb = _gmean([ob["top_to_edge"] for _, ob in ps])
                parts.append(f"step {key} ({len(ps)} of {n_seeds} seeds): λ_top/λ_edge {name_a} {fmt(ra)} vs BN-train {fmt(rb)} "
                             f"(×{fmt(factor)}), eigenvalues > {far}·λ_edge {fmt(far_a)} vs {fmt(far_b)}{'' if ok else ' ✗'}")
            out.append(self._verdict(
                claim, oks, min(factors) if factors else math.nan, parts, why, th,
                f"at every judged checkpoint, geometric mean over seeds of λ_top/λ_edge({name_a}) / λ_top/λ_edge(BN-train) ≥ "
                f"{fmt(th.ratio_factor)} and mean n_far({name_a}) ≥ mean n_far(BN-train); " + judged_rule,
                "; ".join(spreads)))
            if claim == "bn-suppresses-outliers":  # the claims' order: outliers, gradient, eval mode
                pairs, why = judged_checkpoints(summary, "none", "bn-train", th)
                parts, oks, diffs, spreads = [], [], [], []
                for key, ps in pairs.items():
                    per_seed = [oa["grad_share"] - ob["grad_share"] for oa, ob in ps]
                    sa, sb = np.mean([oa["grad_share"] for oa, _ in ps]), np.mean([ob["grad_share"] for _, ob in ps])
                    diff = float(sa - sb)
                    ok = diff >= th.share_margin
                    oks.append(ok)
                    diffs.append(diff)
                    spreads.append(f"step {key}, plain − BN over {seed_spread(per_seed, unit=' points', scale=100)}")
                    parts.append(f"step {key} ({len(ps)} of {n_seeds} seeds): plain {fmt(100 * sa)}% vs BN-train "
                                 f"{fmt(100 * sb)}%{'' if ok else ' ✗'}")
                out.append(self._verdict(
                    "bn-gradient-leaves-top-space", oks, min(diffs) if diffs else math.nan,
                    [f"share of ‖g‖² in the top-{k} eigenspace (mean over seeds)"] + parts, why, th,
                    f"at every judged checkpoint mean share(plain) ≥ mean share(BN-train) + {fmt(100 * th.share_margin)} "
                    f"points; " + judged_rule, "; ".join(spreads)))
        return out

    @staticmethod
    def _verdict(claim, oks, value, parts, why, th, rule, spread):
        enough = len(oks) >= th.min_checkpoints
        detail = "; ".join(parts) if len(oks) else "no checkpoint judged"
        if not enough:
            detail += f"; inconclusive: {len(oks)} judged checkpoint(s), fewer than {th.min_checkpoints}"
        if why:
            detail += "; left out: " + "; ".join(why)
        return verdict(claim, all(oks) if enough else None, value, detail, rule, spread=spread)

    def figures(self, run: RunDir):
        summary = run.read_json("summary.json")
        arrays = run.load_arrays(_ARRAYS) if (run.path / _ARRAYS).exists() else {}
        cfg = run.read_json("config.json")["config"]
        return [_fig_densities(summary, arrays, cfg, run.figure_path("densities.png")),
                _fig_outline(summary, cfg, run.figure_path("outline.png"))]


def _fig_densities(summary: dict, arrays: dict, cfg: dict, path):
    """One panel per checkpoint: the densities on a log scale (floored at 1e-7 of each one's peak)."""
    from ..plotting import STYLE, plt, save

    cps = summary["checkpoints"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(cps), figsize=(3.6 * len(cps), 3.2), squeeze=False)
        for ax, c in zip(axes[0], cps):
            floors = [float(arrays[f"{v}_{c}_floor"]) for v in VARIANTS if f"{v}_{c}_floor" in arrays]
            floor = max(min(floors), 1e-300) if floors else 1e-300  # one floor per panel
            for v in VARIANTS:
                g, d = arrays.get(f"{v}_{c}_grid"), arrays.get(f"{v}_{c}_density")
                if g is None or d is None:
                    continue
                o = summary["runs"][0]["outline"][v].get(str(c)) or {}
                ax.semilogy(g, np.maximum(d, floor), color=_COLORS[v], lw=0.9,
                            label=f"{_LABELS[v]} (λ_top/λ_edge {fmt(o.get('top_to_edge'))})")
                if o.get("bulk_edge") is not None and math.isfinite(o["bulk_edge"]):
                    ax.axvline(o["bulk_edge"], color=_COLORS[v], ls=":", lw=0.8)
            if floors:
                ax.set_ylim(bottom=floor)
            ax.set_title(f"step {c}" + (" (initialization)" if c == 0 else ""))
            ax.set_xlabel("eigenvalue")
            ax.legend(fontsize=6, loc="upper right")
        axes[0][0].set_ylabel("density (log scale)")
        fig.suptitle(f"Hessian eigenvalue density (SLQ), {cfg['model']} on {cfg['data']}, dotted: bulk edge\n"
                     f"{summary['operator']}", fontsize=8, y=1.06)
        return save(fig, path)


def _fig_outline(summary: dict, cfg: dict, path):
    """λ_top/λ_edge and the gradient's share in the top eigenspace against the step, per variant: the geometric
    (ratio) or arithmetic (share) mean over the seeds measured, bars from the smallest to the largest seed."""
    from ..plotting import STYLE, plt, save

    cps = summary["checkpoints"]
    with plt.rc_context(STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.0))
        for i, v in enumerate(VARIANTS):
            for ax, key, mean in ((a1, "top_to_edge", _gmean), (a2, "grad_share", lambda xs: float(np.mean(xs)))):
                xs, ys, lo, hi = [], [], [], []
                for c in cps:
                    vals = [r["outline"][v].get(str(c)) for r in summary["runs"]]
                    vals = [o[key] for o in vals if o is not None and math.isfinite(o[key])]
                    if not vals:
                        continue
                    m = mean(vals)
                    xs.append(max(c, 0.5) * (1 + 0.04 * (i - 1)))  # step 0 drawn at 0.5; variants side by side
                    ys.append(m)
                    lo.append(max(m - min(vals), 0.0))  # ≥ 0: exp(log x) may round below x
                    hi.append(max(max(vals) - m, 0.0))
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=_COLORS[v], label=_LABELS[v], capsize=2, lw=1.2)
        for ax in (a1, a2):
            ax.set_xscale("log")
            ax.set_xlabel("step (0 drawn at 0.5)")
        a1.set_yscale("log")
        a1.set_ylabel("λ_top / λ_edge (geometric mean)")
        a2.set_ylabel(f"share of ‖g‖² in the top-{summary.get('top_k')} eigenspace")
        a2.set_ylim(0, 1.02)
        a1.legend(fontsize=7)
        fig.suptitle(f"{cfg['model']} on {cfg['data']}, {len(summary['runs'])} seed(s): outliers and the gradient "
                     f"(bars: smallest to largest seed)", fontsize=9)
        return save(fig, path)
