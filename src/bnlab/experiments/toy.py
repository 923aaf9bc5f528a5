"""``toy``: the 2-D scale-invariant toy of the blog post on Li & Arora (2020), with verdicts.

The loss ``L(w) = F(θ)`` of ``w ∈ R²`` depends only on the angle ``θ`` of ``w`` (a few sinusoids:
a wide global minimum and a local one next to the start ``w0 = (-0.7, 0.7)``); see
:mod:`bnlab.toy`. Three runs from ``w0``, PyTorch's SGD convention, numpy: GD without weight decay,
GD with weight decay ``λ``, and GD without weight decay with the equivalent exponentially growing
LR ``η α^{-2t-1}`` (Li & Arora, Theorem 2.1; :func:`bnlab.schedules.wd_equivalent_lr`). The last
two run in float64 and in float32, and the angle ``dev_t`` between their directions is recorded
per step.

**Claims.**

* **T1** (Lemma 1 of Arora, Li, Lyu 2019, as drawn in the blog): the gradient of a scale-invariant
  loss is orthogonal to ``w`` and shrinks as ``1/‖w‖``. Measured by torch autograd in float64 on a
  polar grid (``grad_radii`` × ``grad_angles``, factors ``grad_scales``): the largest
  ``|⟨∇L(w),w⟩|/(‖∇L‖‖w‖)`` and the largest ``‖c∇L(cw) − ∇L(w)‖/‖∇L(w)‖``; holds if both are at
  most ``grad_tol``.
* **T2**: GD without weight decay stalls in the local minimum (the norm only grows, the steps
  vanish); with weight decay it escapes. Level: the loss at the start basin's minimum minus
  ``escape_margin``. Inconclusive if the WD run never gets below the level (nothing to contrast)
  or if the run is shorter than ``stall_factor`` times the WD run's escape step; holds if the no-WD
  run never gets below the level and its last angular step is at most ``stall_max_step``.
* **T3**: the drift between the two equivalent runs that the blog blamed on numerical error is
  round-off amplified by the dynamics, not an error of the equivalence. Inconclusive if the run
  is shorter than ``agreement_min_steps`` or if the float32 pair never deviates by more than
  ``deviation_tol`` (no drift to explain); holds if the float64 pair agrees to within
  ``float64_tol`` at every step, the float32 deviation starts at round-off (at most
  ``roundoff_max`` over steps 1..``roundoff_steps``) and is amplified at least
  ``min_amplification`` times. The float32 departure step and the growth rate of the deviation
  (float32 and float64, over its rise to the peak) are reported.

With the defaults (``ηλ = 0.02``) the weight-decay run escapes at step ~40: that escape is the
amplifier (float32 departs at ~32, float64 rises from ~1e-16 to ~5e-12 at the same steps and the
same rate). With a small ``ηλ`` (``--set lr=0.1 --set weight_decay=0.05 --set steps=1500``) the run
first converges to round-off inside the minimum, so even float64 departs at the escape and T3
fails by its rule: the drift is still round-off, but it is no longer small in float64.

Figures: the loss surface with the field of ``-∇L``; the three runs (with the exponential one
mapped back by ``α^t``, norms and losses); the float32/float64 deviation; an animated GIF of the
zoom-out (``figures/toy_zoom.gif``; the report embeds the PNGs only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis import first_index_over, fit_growth, nanmax
from ..runs import RunDir
from ..toy import TOY_LOSS, check_settings, draw_figures, gradient_residuals, simulate, toy_numbers
from .base import Claim, Context, Experiment, fmt, register_experiment, verdict
from .runner import applied_thresholds

_SRC = "Li & Arora 2020"
_ARRAYS = "toy.npz"


@dataclass(frozen=True)
class Config:
    """What ``toy`` runs (hashed: names the run)."""

    steps: int = 400
    """GD steps of every run."""
    lr: float = 1.0
    """Learning rate ``η`` of every run (the exponential run's LR starts at ``η/α``)."""
    weight_decay: float = 0.02
    """Weight decay ``λ`` of the weight-decay run (and the ``λ`` the exponential run is equivalent to)."""
    momentum: float = 0.0
    """Momentum ``γ`` (the exponential run's buffer is preset; with ``γ > 0`` the run without the preset is drawn too)."""
    w0: tuple[float, ...] = (-0.7, 0.7)
    """The starting point ``(x, y)`` of every run."""
    dtype: str = "float64"
    """Precision of the trajectories drawn and of the runs T2 judges (``float64`` or ``float32``); T3 uses both."""
    grad_radii: tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3)
    """Radii of the polar grid on which T1's residuals are measured."""
    grad_angles: int = 64
    """Angles per radius of T1's grid."""
    grad_scales: tuple[float, ...] = (1e-3, 0.5, 7.0, 1e4)
    """The factors ``c`` of T1's check ``∇L(cw) = ∇L(w)/c``."""
    frames: int = 48
    """Frames of the zoom-out GIF (2 to 60)."""
    dpi: int = 80
    """Resolution of the figures (the GIF uses 0.7 of it)."""

    def __post_init__(self) -> None:
        check_settings(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum,
                       w0=self.w0, dtype=self.dtype, frames=self.frames)
        if not self.grad_radii or not all(math.isfinite(r) and r > 0 for r in self.grad_radii):
            raise ValueError(f"grad_radii must be finite and > 0, got {self.grad_radii}")
        if not self.grad_scales or not all(math.isfinite(c) and c > 0 for c in self.grad_scales):
            raise ValueError(f"grad_scales must be finite and > 0, got {self.grad_scales}")
        if self.grad_angles < 1:
            raise ValueError(f"grad_angles must be >= 1, got {self.grad_angles}")
        if not 10 <= self.dpi <= 600:
            raise ValueError(f"dpi must be in [10, 600], got {self.dpi}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``toy``'s decision rules."""

    grad_tol: float = 1e-12
    """T1 holds when both gradient residuals (float64) are at most this: autograd's round-off is ~1e-16–1e-14 over
    radii 1e-3–1e3, while a gradient with a radial part or the wrong 1/‖w‖ scaling is off by O(1)."""
    escape_margin: float = 0.1
    """T2: a run has escaped when its loss is below the start basin's minimum loss minus this (a tenth of the ~0.3
    gap between the local and the global minimum: clearly in the other basin, not noise)."""
    stall_factor: float = 3.0
    """T2 is judged only if the no-WD run ran at least this many times the WD run's escape step (given three times
    as long, a run that could escape at the same pace would have)."""
    stall_max_step: float = 1e-4
    """T2: the no-WD run has stalled when its last angular step (rad) is at most this (the WD run moves 1e-2 to 0.75 rad
    per step while escaping)."""
    deviation_tol: float = 1e-6
    """T3: the two equivalent runs "deviate" when the angle between their directions exceeds this (rad): ten times
    float32's round-off (~6e-8), far above float64's."""
    float64_tol: float = 1e-9
    """T3: the float64 pair agrees to round-off when its angle stays at most this (rad) at every step (float64
    round-off amplified by the escape peaks near 5e-12, so 1e-9 leaves a 200x margin)."""
    agreement_min_steps: int = 150
    """T3 is judged only on runs of at least this many steps (the escape, the amplifier, is at ~40: well past it)."""
    roundoff_steps: int = 10
    """T3: the float32 round-off level is the largest deviation over steps 1 to this (before any amplification)."""
    roundoff_max: float = 1e-6
    """T3: the float32 deviation starts at round-off when that level is at most this (rad) (float32's round-off
    over the first steps is ~7e-8, so a level 14x that is not round-off)."""
    min_amplification: float = 100.0
    """T3: the float32 deviation is amplified when its peak is at least this many times its round-off level (two
    decades: growth by the dynamics, not accumulation of round-off, which would grow ~√t)."""


def _rise(values, level: float) -> dict:
    """The rise of a deviation series from ``level`` to its peak: the peak, its step, the last step
    before it at or below ``level``, and the growth per step fitted over that window."""
    v = np.asarray(values, dtype=float)
    if not np.isfinite(v).any():
        return {"peak": math.nan, "peak_step": None, "start": None, "factor": math.nan}
    peak_step = int(np.nanargmax(v))
    below = np.flatnonzero(v[:peak_step] <= level)
    start = int(below[-1]) if below.size else None
    factor = math.nan
    if start is not None and peak_step - start >= 1:
        factor = fit_growth(v[: peak_step + 1], first=start, last_excluded=0)["factor"]
    return {"peak": float(v[peak_step]), "peak_step": peak_step, "start": start, "factor": factor}


@register_experiment
class Toy(Experiment):
    name = "toy"
    title = "The 2-D scale-invariant toy: weight decay vs an exponential learning rate"
    source = _SRC
    description = (
        "A 2-D loss that depends only on the angle of w: its gradient field, GD without and with weight decay, "
        "and the equivalent exponentially growing learning rate, in float64 and float32."
    )
    claims = (
        Claim("T1", "On a scale-invariant loss the gradient is orthogonal to w and shrinks as 1/‖w‖.", _SRC,
              "max |⟨∇L(w),w⟩|/(‖∇L‖‖w‖) and max ‖c∇L(cw) − ∇L(w)‖/‖∇L(w)‖ over a polar grid and several c "
              "(float64 autograd)",
              "holds if both ≤ grad_tol; inconclusive if the residuals are undefined (no grid point)", ref="T1"),
        Claim("T2", "GD without weight decay stalls in the local minimum; with weight decay it escapes.", _SRC,
              "loss of both runs against the step: the WD run's escape step, the no-WD run's lowest loss and last "
              "angular step",
              "inconclusive if the WD run never falls below the escape level or the run is shorter than "
              "stall_factor × its escape step; holds if the no-WD run never falls below it and its last angular "
              "step ≤ stall_max_step", ref="T2"),
        Claim("T3", "The drift between the two equivalent runs (weight decay vs exponential LR) is round-off "
              "amplified by the dynamics, not an error.", _SRC,
              "angle between the directions of the two runs per step, float64 and float32: float64 maximum, "
              "float32 round-off level, departure step, amplification and growth per step",
              "inconclusive if fewer than agreement_min_steps steps or float32 never deviates > deviation_tol; "
              "holds if float64 ≤ float64_tol at every step, float32 starts ≤ roundoff_max and is amplified "
              "≥ min_amplification times", ref="T3"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(steps=160, grad_angles=16, frames=6, dpi=60),
        "quick": Config(),
        "paper": Config(steps=1500, frames=60, dpi=110),
    }

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        loss = TOY_LOSS
        grad = gradient_residuals(loss, radii=cfg.grad_radii, angles=cfg.grad_angles, scales=cfg.grad_scales)
        sim = simulate(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                       dtype=cfg.dtype, w0=cfg.w0, loss=loss)
        nums = toy_numbers(sim, w0=cfg.w0, tol=Thresholds().deviation_tol, loss=loss)
        runs = {k: v.astype(np.float64) for k, v in sim["runs"].items()}
        losses = {k: loss(v) for k, v in runs.items()}
        norms = {k: np.linalg.norm(v, axis=1) for k, v in runs.items()}
        dev = sim["deviation"]
        for t in range(cfg.steps + 1):
            run.append_metrics({"step": t, **{f"loss_{k}": float(v[t]) for k, v in losses.items()},
                                **{f"norm_{k}": float(v[t]) for k, v in norms.items()},
                                **{f"dev_{k}": float(v[t]) for k, v in dev.items()}})
        arrays = {**sim["runs"], **{f"dev_{k}": v for k, v in dev.items()}}
        if sim["ablation"] is not None:
            arrays["ablation"] = sim["ablation"]
        run.save_arrays(_ARRAYS, **arrays)
        return {
            "steps": cfg.steps, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "momentum": cfg.momentum,
            "dtype": cfg.dtype, "w0": list(cfg.w0), "alpha": sim["alpha"],
            "gradient": grad,
            "start_loss": float(loss(np.asarray(cfg.w0, dtype=np.float64))),
            "start_basin_min_loss": nums["start_basin_min_loss"],
            "global_min_loss": nums["global_min_loss"],
            "loss_wd": [float(x) for x in losses["wd"]],
            "no_wd_min_loss": float(np.min(losses["no_wd"])),
            "no_wd_final_loss": float(losses["no_wd"][-1]),
            "no_wd_last_angular_step": nums["no_wd_last_angular_step"],
            "no_wd_final_norm": float(norms["no_wd"][-1]),
            "wd_min_loss": nums["min_loss_wd"],
            "wd_leaves_start_basin_at": nums["wd_escape_step"],
            "final_loss": nums["final_loss"],
            "final_norm": nums["final_norm"],
            "deviation": {k: [float(x) for x in v] for k, v in dev.items()},
            "max_deviation_without_buffer_preset": nums["max_deviation_without_buffer_preset"],
        }

    def judge(self, summary: dict, th: Thresholds) -> list:
        return [self._t1(summary, th), self._t2(summary, th), self._t3(summary, th)]

    @staticmethod
    def _t1(summary: dict, th: Thresholds):
        g = summary["gradient"]
        o, s = g["orthogonality"], g["scaling"]
        rule = f"max |⟨∇L(w),w⟩|/(‖∇L‖‖w‖) ≤ {fmt(th.grad_tol)} and max ‖c∇L(cw) − ∇L(w)‖/‖∇L(w)‖ ≤ {fmt(th.grad_tol)} (float64)"
        where = (f"{g['points']} points (radii {fmt(min(g['radii']))}–{fmt(max(g['radii']))}), "
                 f"c ∈ {{{', '.join(fmt(c) for c in g['scales'])}}}")
        if not g["points"] or not (math.isfinite(o) and math.isfinite(s)):
            return verdict("T1", None, None, f"residuals undefined on {where} (orthogonality {fmt(o)}, scaling {fmt(s)})", rule)
        detail = (f"over {where}, float64 autograd: orthogonality residual {fmt(o)}, scaling residual {fmt(s)} "
                  f"(the hand-written gradient the runs use agrees to {fmt(g['analytic_gap'])})")
        return verdict("T1", o <= th.grad_tol and s <= th.grad_tol, max(o, s), detail, rule)

    @staticmethod
    def _t2(summary: dict, th: Thresholds):
        steps = summary["steps"]
        level = summary["start_basin_min_loss"] - th.escape_margin
        loss_wd = np.asarray(summary["loss_wd"], dtype=float)
        below = np.flatnonzero(loss_wd < level)
        escape = int(below[0]) if below.size else None
        rule = (f"the WD run's loss falls below {fmt(level)} (start basin's minimum {fmt(summary['start_basin_min_loss'])} "
                f"− {fmt(th.escape_margin)}) at step t; over ≥ {fmt(th.stall_factor)}·t steps the no-WD run's loss stays "
                f"≥ {fmt(level)} and its last angular step ≤ {fmt(th.stall_max_step)} rad")
        no_min, move = summary["no_wd_min_loss"], summary["no_wd_last_angular_step"]
        no_wd = (f"no WD: lowest loss {fmt(no_min, 4)} (final {fmt(summary['no_wd_final_loss'], 4)}, ‖w‖ "
                 f"{fmt(summary['no_wd_final_norm'])}), last angular step {fmt(move)} rad")
        if escape is None:  # "with WD it escapes" is half the claim: a WD run that never escapes refutes it
            return verdict("T2", False, None, f"the WD run never fell below {fmt(level)} in {steps} steps (lowest "
                           f"{fmt(summary['wd_min_loss'], 4)}); {no_wd}", rule)
        wd = f"WD: below {fmt(level)} from step {escape} (lowest {fmt(summary['wd_min_loss'], 4)})"
        if steps < th.stall_factor * escape:
            return verdict("T2", None, no_min, f"{wd}; the runs are {steps} steps long, fewer than "
                           f"{fmt(th.stall_factor)} × {escape}: too short to call the no-WD run stalled; {no_wd}", rule)
        ok = no_min >= level and move <= th.stall_max_step
        return verdict("T2", ok, no_min, f"{wd}; {no_wd}, after {steps} steps", rule)

    @staticmethod
    def _t3(summary: dict, th: Thresholds):
        steps = summary["steps"]
        d64 = np.asarray(summary["deviation"]["float64"], dtype=float)
        d32 = np.asarray(summary["deviation"]["float32"], dtype=float)
        rule = (f"over ≥ {th.agreement_min_steps} steps: float64 angle ≤ {fmt(th.float64_tol)} rad at every step; "
                f"float32 angle ≤ {fmt(th.roundoff_max)} over steps 1–{th.roundoff_steps} and peak ≥ "
                f"{fmt(th.min_amplification)} × that level (judged if float32 exceeds {fmt(th.deviation_tol)})")
        max64 = float(np.max(d64)) if d64.size else math.nan  # NaN (undefined angle) propagates: not agreement
        first64 = first_index_over(d64, th.float64_tol)
        first32 = first_index_over(d32, th.deviation_tol)
        base32 = nanmax(d32[1 : th.roundoff_steps + 1])
        base64 = nanmax(d64[1 : th.roundoff_steps + 1])
        r32, r64 = _rise(d32, base32), _rise(d64, base64)
        f64 = (f"float64: max {fmt(max64)} rad over {steps} steps"
               + ("" if first64 is None else f", above {fmt(th.float64_tol)} from step {first64}")
               + f", rising ×{fmt(r64['factor'])} per step to its peak at step {r64['peak_step']}")
        if steps < th.agreement_min_steps:
            return verdict("T3", None, max64, f"only {steps} steps (< {th.agreement_min_steps}); {f64}", rule)
        if max64 > th.float64_tol:  # float64 past its tolerance refutes "round-off", whatever float32 did
            return verdict("T3", False, max64, f"{f64}; float64 should agree to round-off", rule)
        if first32 is None:
            return verdict("T3", None, max64, f"float32 never deviates by more than {fmt(th.deviation_tol)} "
                           f"(max {fmt(nanmax(d32))}): no drift to explain; {f64}", rule)
        amp = r32["peak"] / base32 if base32 > 0 else math.inf
        f32 = (f"float32: round-off level {fmt(base32)} (steps 1–{th.roundoff_steps}), departs (> {fmt(th.deviation_tol)}) "
               f"at step {first32}, peaks at {fmt(r32['peak'])} at step {r32['peak_step']} (×{fmt(amp)}), "
               f"rising ×{fmt(r32['factor'])} per step")
        ok = bool(max64 <= th.float64_tol and base32 <= th.roundoff_max and amp >= th.min_amplification)
        return verdict("T3", ok, max64, f"{f64}; {f32}; the weight-decay run leaves the start basin at step "
                       f"{summary.get('wd_leaves_start_basin_at')}", rule)

    def figures(self, run: RunDir) -> list[Path]:
        cfg = run.read_json("config.json")["config"]
        a = run.load_arrays(_ARRAYS)
        tol = applied_thresholds(self, run).deviation_tol  # the tolerance the verdicts applied
        sim = {
            "alpha": run.read_json("summary.json")["alpha"],
            "runs": {k: a[k] for k in ("no_wd", "wd", "exp_lr")},
            "deviation": {"float64": a["dev_float64"], "float32": a["dev_float32"]},
            "ablation": a.get("ablation"),
        }
        files = draw_figures(run.figure_path("toy_surface.png").parent, sim, w0=cfg["w0"], tol=tol,
                             frames=cfg["frames"], dpi=cfg["dpi"], loss=TOY_LOSS)
        return list(files.values())
