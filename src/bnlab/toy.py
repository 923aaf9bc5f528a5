"""The 2-D scale-invariant toy: weight decay ≡ exponential learning rate, seen on a plane.

The loss depends only on the angle ``θ = atan2(w_2, w_1)`` of ``w ∈ R²``::

    L(w) = F(θ),     F(θ) = c - Σ_k a_k cos(f_k θ - φ_k)              (a few sinusoids)

so it is constant along rays from the origin (``L(c w) = L(w)``) and has several local minima in
``θ``. Its gradient is ``∇L(w) = F'(θ) · (-w_2, w_1) / ‖w‖²``: perpendicular to ``w`` and of size
``|F'(θ)| / ‖w‖``, so it shrinks with the radius (Lemma 1 of Arora, Li, Lyu; the quiver plot of
the blog post). Plain GD therefore only ever grows ``‖w‖`` (Pythagoras) and slows down until it is
stuck; weight decay pulls ``w`` back towards the origin where steps are larger, and that lets it
leave a local minimum; SGD without weight decay and the exponentially growing LR
``η̃_t = η α^{-2t-1}`` (:func:`bnlab.schedules.wd_equivalent_lr`) visits the same directions as the
weight-decay run, ``w̃_t = α^{-t} w_t``, while its norm explodes.

All runs follow PyTorch's SGD convention (``v_t = γ v_{t-1} + g_t + λ w_t``, ``w_{t+1} = w_t - η_t v_t``,
``v_{-1} = 0``; the exponential run starts from the mapped buffer ``ṽ_{-1} = -λ/(α-γ) w_0``) in
numpy ``float64`` or ``float32``. :func:`simulate` runs them, :func:`toy_numbers` and
:func:`gradient_residuals` measure, :func:`draw_figures` draws the figures of the blog post, and
:func:`run_toy` does all three into a directory. The registered experiment ``toy``
(:mod:`bnlab.experiments.toy`, ``bnlab run toy``) judges the claims T1–T3 on them.

What the deviation shows (the blog saw the two runs drift apart and blamed numerical error): the
two runs agree to round-off (~1e-16 in float64) for thousands of steps *except* where the
dynamics amplify differences. The amplifier is the escape itself: weight decay raises the
effective LR ``η/‖w‖²`` until the local minimum becomes unstable. With the defaults
(``ηλ = 0.02``) the run has not converged to round-off level when that happens, the escape is
deterministic, and float64 stays below ~1e-11 while float32 (round-off ~1e-7) deviates at the
escape. With a small ``ηλ`` (e.g. ``lr=0.1, weight_decay=0.05``) the weight-decay run first
converges into the minimum to within round-off, so the escape is *seeded by round-off*: both
precisions deviate at the escape (float32 earlier) and the two runs may leave the minimum on
different sides, the drift the blog observed.

Reference:
    Z. Li, S. Arora. An Exponential Learning Rate Schedule for Deep Learning. ICLR 2020; the blog
    post "Exponentially Growing Learning Rate? Implications of Scale Invariance induced by Batch
    Normalization" (October 25, 2019; text in the project's seeds) for the toy and its figures.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .analysis import first_index_over
from .errors import UserError
from .schedules import check_hparams, wd_equivalent_alpha, wd_equivalent_lr

__all__ = [
    "ToyLoss",
    "TOY_LOSS",
    "toy_loss",
    "toy_grad",
    "check_settings",
    "run_gd",
    "run_exp_lr",
    "direction_deviation",
    "gradient_residuals",
    "simulate",
    "toy_numbers",
    "draw_figures",
    "plot_surface",
    "plot_trajectories",
    "plot_zoom_gif",
    "plot_deviation",
    "run_toy",
]

_DTYPES = {"float64": np.float64, "float32": np.float32}


def _as_dtype(dtype: Any) -> type:
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name in _DTYPES:
        return _DTYPES[name]
    raise UserError(f"unknown dtype {dtype!r}; accepted: float32, float64")


def _xp(w: Any):
    """numpy for arrays, torch for tensors (so the same formula can be differentiated by autograd)."""
    if type(w).__module__.startswith("torch"):
        import torch

        return torch
    return np


@dataclass(frozen=True)
class ToyLoss:
    """``L(w) = F(θ)``, ``F(θ) = offset - Σ a cos(f θ - φ)`` over ``terms = ((a, f, φ), ...)``.

    The default has a wide global minimum near ``θ ≈ -1.37`` and a narrow local minimum near
    ``θ ≈ 2.61``, next to the starting direction ``(-0.7, 0.7)`` of the blog post.
    """

    terms: tuple[tuple[float, int, float], ...] = ((0.36, 1, -0.46), (0.06, 3, -1.92), (0.08, 5, -2.12))
    offset: float = 1.0

    def of_angle(self, theta):
        """``F(θ)`` (numpy or torch)."""
        xp = _xp(theta)
        return self.offset - sum(a * xp.cos(f * theta - phi) for a, f, phi in self.terms)

    def dtheta(self, theta):
        """``F'(θ) = Σ a f sin(f θ - φ)``."""
        xp = _xp(theta)
        return sum(a * f * xp.sin(f * theta - phi) for a, f, phi in self.terms)

    def __call__(self, w):
        """``L(w)`` for ``w`` of shape ``(..., 2)`` (numpy array or torch tensor)."""
        xp = _xp(w)
        return self.of_angle(xp.arctan2(w[..., 1], w[..., 0]))

    def grad(self, w):
        """``∇L(w) = F'(θ) (-w_2, w_1) / ‖w‖²`` for ``w`` of shape ``(..., 2)``; same dtype as ``w``."""
        xp = _xp(w)
        x, y = w[..., 0], w[..., 1]
        r2 = x * x + y * y
        s = self.dtheta(xp.arctan2(y, x)) / r2
        return xp.stack([-y * s, x * s], axis=-1) if xp is np else xp.stack([-y * s, x * s], dim=-1)

    def critical_angles(self, n: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Angles of the local minima and maxima of ``F`` in ``[-π, π)`` (sign changes of ``F'``, bisected)."""
        # The grid is offset by an irrational fraction of a cell so that symmetric critical points
        # (θ = 0, ±π/2, ...) do not fall exactly on grid points.
        grid = np.linspace(-np.pi, np.pi, n + 1) + (2 * np.pi / n) * 0.6180339887
        d = self.dtheta(grid)
        minima, maxima = [], []
        for lo, hi, dlo, dhi in zip(grid[:-1], grid[1:], d[:-1], d[1:]):
            if dlo < 0 <= dhi or dlo > 0 >= dhi:
                a, b = lo, hi  # invariant: F'(a) has the sign of dlo, F'(b) not
                for _ in range(60):
                    mid = 0.5 * (a + b)
                    if (self.dtheta(mid) > 0) == (dlo > 0) and self.dtheta(mid) != 0:
                        a = mid
                    else:
                        b = mid
                angle = float(np.mod(0.5 * (a + b) + np.pi, 2 * np.pi) - np.pi)
                (minima if dlo < 0 else maxima).append(angle)
        return np.array(sorted(minima)), np.array(sorted(maxima))

    def basin(self, theta: float) -> tuple[float, float]:
        """The two maxima ``(left, right)`` around ``theta`` (angles, ``left < theta <= right`` mod 2π)."""
        _, maxima = self.critical_angles()
        rel = np.mod(maxima - theta, 2 * np.pi)
        right = theta + rel.min()
        left = theta - (2 * np.pi - rel.max())
        return left, right

    def in_basin(self, theta, basin: tuple[float, float]) -> np.ndarray:
        """Whether angles lie strictly inside ``basin`` (handles the wrap-around)."""
        left, right = basin
        rel = np.mod(np.asarray(theta) - left, 2 * np.pi)
        return (rel > 0) & (rel < right - left)


#: The default toy loss.
TOY_LOSS = ToyLoss()


def toy_loss(w):
    """The default toy loss ``L(w)`` (numpy or torch, ``w`` of shape ``(..., 2)``)."""
    return TOY_LOSS(w)


def toy_grad(w):
    """The analytic gradient of :func:`toy_loss`: ``F'(θ) (-w_2, w_1)/‖w‖²``."""
    return TOY_LOSS.grad(w)


# --------------------------------------------------------------------------- runs


def _check_run_args(w0, steps, lr, weight_decay, momentum) -> np.ndarray:
    w0 = np.asarray(w0, dtype=np.float64)
    if w0.shape != (2,) or not np.all(np.isfinite(w0)) or not np.any(w0 != 0):
        raise UserError(f"w0 must be a finite nonzero point of R^2, got {w0.tolist()}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")
    check_hparams(lr, weight_decay, momentum)
    return w0


def _check_exp_lr_range(w0: np.ndarray, steps: int, lr: float, weight_decay: float, momentum: float, dtype) -> None:
    """UserError if the exponential run would overflow ``dtype`` within ``steps`` (see :func:`run_exp_lr`)."""
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=weight_decay, momentum=momentum)
    # ‖w̃_T‖² ≈ α^{-2T} ‖w_T‖² and the LR α^{-2T} η must both stay representable (margin 2^16).
    log_max = math.log(float(np.finfo(dtype).max)) - 16 * math.log(2)
    growth = -2 * steps * math.log(alpha) + 2 * max(0.0, math.log(float(np.linalg.norm(w0)) + 1.0))
    if growth + max(0.0, math.log(lr)) > log_max:
        raise UserError(
            f"the exponential run overflows {np.dtype(dtype).name} within {steps} steps "
            f"(alpha^-2T = e^{-2 * steps * math.log(alpha):.0f}); use fewer steps or a smaller lr*weight_decay"
        )


def check_settings(
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    momentum: float = 0.0,
    w0: Sequence[float] = (-0.7, 0.7),
    dtype: Any = "float64",
    frames: int = 48,
    tol: float = 1e-6,
) -> None:
    """Validate the settings of :func:`run_toy` (and of the ``toy`` experiment) without running anything.

    Checks ``w0`` (a finite nonzero point of R²), ``steps >= 1``, ``(lr, weight_decay, momentum)``
    (:func:`bnlab.schedules.check_hparams`, and that the equivalent exponential schedule exists),
    ``dtype``, ``frames`` in [2, 60], ``tol > 0``, and that the exponential run stays inside
    float32's range for ``steps`` steps (both precisions are always run).

    Raises:
        UserError: the first bad setting, in one line.
    """
    w0 = _check_run_args(w0, steps, lr, weight_decay, momentum)
    _as_dtype(dtype)
    if isinstance(frames, bool) or not (isinstance(frames, int) and 2 <= frames <= 60):
        raise UserError(f"frames must be an integer in [2, 60], got {frames!r}")
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol > 0):
        raise UserError(f"tol must be > 0, got {tol!r}")
    _check_exp_lr_range(w0, steps, lr, weight_decay, momentum, np.float32)


def _sgd(w0, lrs, *, weight_decay, momentum, buffer0, dtype, loss) -> np.ndarray:
    """PyTorch-convention SGD on the toy; ``lrs[t]`` the LR of step ``t``; returns ``w_0..w_T``."""
    w = np.asarray(w0, dtype=dtype)
    wd = dtype(weight_decay)
    gamma = dtype(momentum)
    buf = None if buffer0 is None else np.asarray(buffer0, dtype=dtype)
    out = np.empty((len(lrs) + 1, 2), dtype=dtype)
    out[0] = w
    for t, lr in enumerate(lrs):
        d = loss.grad(w)
        if weight_decay:
            d = d + wd * w
        if momentum:
            buf = d.copy() if buf is None else gamma * buf + d  # torch: clone g_0, else γ·buf + g
            d = buf
        w = w - dtype(lr) * d
        out[t + 1] = w
    return out


def run_gd(
    w0: Sequence[float],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dtype: Any = np.float64,
    loss: ToyLoss = TOY_LOSS,
) -> np.ndarray:
    """(Momentum) GD with a constant LR and optional weight decay on the toy loss.

    ``v_t = γ v_{t-1} + ∇L(w_t) + λ w_t``, ``w_{t+1} = w_t - η v_t``, ``v_{-1} = 0`` (PyTorch's SGD).

    Args:
        w0: the starting point ``(x, y)``.
        steps: number of steps ``T``.
        lr: ``η``; weight_decay: ``λ`` (0: plain GD); momentum: ``γ``.
        dtype: ``float64`` or ``float32`` (all arithmetic in it).
        loss: the toy loss.

    Returns:
        ``w_0 … w_T``, shape ``(T + 1, 2)``, in ``dtype``.
    """
    w0 = _check_run_args(w0, steps, lr, weight_decay, momentum)
    dtype = _as_dtype(dtype)
    return _sgd(w0, [lr] * steps, weight_decay=weight_decay, momentum=momentum, buffer0=None, dtype=dtype, loss=loss)


def run_exp_lr(
    w0: Sequence[float],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    momentum: float = 0.0,
    dtype: Any = np.float64,
    loss: ToyLoss = TOY_LOSS,
    preset_buffer: bool = True,
) -> np.ndarray:
    """GD without weight decay and the LR ``η̃_t = η α^{-2t-1}`` equivalent to :func:`run_gd` with ``λ``.

    The buffer starts at ``ṽ_{-1} = -λ/(α-γ) · w_0`` (``preset_buffer=False``: PyTorch's default
    start, for the ablation). Then ``w̃_t = α^{-t} w_t`` up to round-off. No rescaling: the norm
    grows like ``α^{-t}``, so ``T·(1-α)`` must stay well below ~40 in float32 (checked).

    Args:
        w0, steps, lr, weight_decay, momentum, dtype, loss: as :func:`run_gd` (``λ`` is the weight
            decay of the run it is equivalent to; none is applied).
        preset_buffer: start from the mapped momentum buffer (only matters for ``γ > 0``).

    Returns:
        ``w̃_0 … w̃_T``, shape ``(T + 1, 2)``.

    Raises:
        UserError: if the weights would overflow ``dtype`` within ``steps``.
    """
    w0 = _check_run_args(w0, steps, lr, weight_decay, momentum)
    dtype = _as_dtype(dtype)
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=weight_decay, momentum=momentum)
    _check_exp_lr_range(w0, steps, lr, weight_decay, momentum, dtype)
    lrs = [wd_equivalent_lr(t, lr=lr, weight_decay=weight_decay, momentum=momentum) for t in range(steps)]
    buffer0 = None
    if momentum and preset_buffer:
        buffer0 = -(weight_decay / (alpha - momentum)) * w0  # ṽ_{-1} = -(1-α)/(ηα) w_0
    return _sgd(w0, lrs, weight_decay=0.0, momentum=momentum, buffer0=buffer0, dtype=dtype, loss=loss)


def direction_deviation(traj_a: np.ndarray, traj_b: np.ndarray) -> np.ndarray:
    """Angle between ``w_a/‖w_a‖`` and ``w_b/‖w_b‖`` per step, in float64 radians.

    The batched (one angle per row) form of :func:`bnlab.scale.angle_between`, with its formula
    ``2 atan2(‖â - b̂‖, ‖â + b̂‖)`` (accurate down to ~1e-16; float32 inputs are converted exactly)
    and its convention: two zero vectors give 0, one zero or non-finite vector gives NaN.
    """
    a = np.asarray(traj_a, dtype=np.float64)
    b = np.asarray(traj_b, dtype=np.float64)
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = a / na, b / nb
        theta = 2.0 * np.arctan2(np.linalg.norm(a - b, axis=-1), np.linalg.norm(a + b, axis=-1))
    na, nb = na[..., 0], nb[..., 0]
    ok = (na > 0) & (nb > 0) & np.isfinite(na) & np.isfinite(nb)
    return np.where((na == 0) & (nb == 0), 0.0, np.where(ok, theta, np.nan))


# --------------------------------------------------------------------------- figures


def _atomic_path(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (same suffix, so writers pick the format); the
    caller renames it over ``path`` when complete, so readers never see a half-written figure."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def _surface(ax, loss: ToyLoss, lim: float, n: int = 241, cmap: str = "viridis"):
    xs = np.linspace(-lim, lim, n)
    X, Y = np.meshgrid(xs, xs)
    Z = loss(np.stack([X, Y], axis=-1))
    return ax.imshow(Z, extent=(-lim, lim, -lim, lim), origin="lower", cmap=cmap, alpha=0.9, interpolation="bilinear")


def plot_surface(path: Path, loss: ToyLoss, w0: Sequence[float], dpi: int) -> Path:
    """The loss surface with the field of ``-∇L`` (left) and ``F(θ)`` along the circle (right)."""
    import matplotlib.pyplot as plt

    from .plotting import save

    w0 = np.asarray(w0, dtype=np.float64)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.4), gridspec_kw={"width_ratios": [1, 1.15]}, dpi=dpi)
    lim = 1.5
    im = _surface(ax, loss, lim)
    fig.colorbar(im, ax=ax, shrink=0.8, label="L(w)")
    # Quiver of -∇L: perpendicular to w, length |F'(θ)|/‖w‖; the innermost ring is left out (it explodes).
    rs = np.linspace(0.35, 1.45, 6)
    ths = np.linspace(-np.pi, np.pi, 36, endpoint=False)
    R, T = np.meshgrid(rs, ths)
    P = np.stack([R * np.cos(T), R * np.sin(T)], axis=-1)
    G = loss.grad(P)
    ax.quiver(P[..., 0], P[..., 1], -G[..., 0], -G[..., 1], color="white", angles="xy", scale_units="xy", scale=8, width=0.004)
    ax.plot(*w0, "o", color="red", label="start w0")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="w1", ylabel="w2",
           title="toy loss L(w) = F(angle of w); arrows: -grad L")
    ax.legend(loc="lower left", fontsize=8)
    theta = np.linspace(-np.pi, np.pi, 721)
    ax2.plot(theta, loss.of_angle(theta), color="k")
    mins, _ = loss.critical_angles()
    ax2.plot(mins, loss.of_angle(mins), "v", color="tab:blue", label="local minima")
    ax2.axvline(math.atan2(w0[1], w0[0]), color="red", ls=":", label="start angle")
    ax2.set(xlabel="angle θ (rad)", ylabel="F(θ)", title="loss along the circle (any radius)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_trajectories(path: Path, loss: ToyLoss, runs: dict, alpha: float, dpi: int) -> Path:
    """The three runs (``runs``: ``no_wd``, ``wd``, ``exp_lr`` trajectories), the exponential one
    mapped back by ``α^t`` onto the weight-decay run, and their norms and losses against the step."""
    import matplotlib.pyplot as plt

    from .plotting import save

    no_wd, wd, exp = runs["no_wd"], runs["wd"], runs["exp_lr"]
    steps = len(wd) - 1
    fig, axes = plt.subplots(2, 2, figsize=(10, 9), dpi=dpi)
    ax = axes[0, 0]
    lim = 1.05 * max(np.abs(no_wd).max(), np.abs(wd).max(), 1.0)
    _surface(ax, loss, lim)
    ax.plot(no_wd[:, 0], no_wd[:, 1], "-", color="white", lw=1.2, label="GD, no weight decay")
    ax.plot(wd[:, 0], wd[:, 1], "-", color="orange", lw=0.8, label="GD + weight decay")
    ax.plot(*no_wd[-1], "s", color="white")
    ax.plot(*wd[-1], "s", color="orange")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title="no WD: the norm grows and it gets stuck;\nWD: pulled inwards, it escapes")
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[0, 1]
    lim_e = 1.05 * np.abs(exp).max()
    _surface(ax, loss, lim_e)
    ax.plot(exp[:, 0], exp[:, 1], "-", color="red", lw=1.0, label="exponential LR, no WD")
    ax.set(xlim=(-lim_e, lim_e), ylim=(-lim_e, lim_e), aspect="equal", title=f"exponential LR: ‖w‖ blows up (×{np.linalg.norm(exp[-1]) / np.linalg.norm(exp[0]):.3g})")
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1, 0]
    mapped = exp * (alpha ** np.arange(steps + 1))[:, None]  # w_t = α^t w̃_t (Theorem 2.1's map)
    lim_w = 1.05 * max(np.abs(wd).max(), 1e-12)
    _surface(ax, loss, lim_w)
    ax.plot(wd[:, 0], wd[:, 1], "-", color="orange", lw=3, alpha=0.7, label="GD + weight decay")
    ax.plot(mapped[:, 0], mapped[:, 1], "--", color="red", lw=1, label="exp. LR run × α^t")
    ax.set(xlim=(-lim_w, lim_w), ylim=(-lim_w, lim_w), aspect="equal", title="exp. LR run rescaled by α^t onto the WD run")
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1, 1]
    t = np.arange(steps + 1)
    for name, traj, color in (("no WD", no_wd, "k"), ("WD", wd, "orange"), ("exp. LR", exp, "red")):
        ax.semilogy(t, np.linalg.norm(traj.astype(np.float64), axis=1), color=color, label=f"‖w‖ {name}")
    ax2 = ax.twinx()
    for name, traj, color in (("no WD", no_wd, "k"), ("WD", wd, "orange")):
        ax2.plot(t, loss(traj.astype(np.float64)), color=color, ls=":", lw=0.8)
    ax2.set_ylabel("loss (dotted)")
    ax.set(xlabel="step", ylabel="‖w‖ (log)", title="norms (solid) and losses (dotted)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save(fig, path)


def plot_zoom_gif(path: Path, loss: ToyLoss, runs: dict, frames: int, dpi: int) -> Path:
    """An animated GIF: the weight-decay run next to the exponential run seen through a view that
    zooms out by ``‖w̃_t‖/‖w_t‖`` (at most ``frames`` frames, denser early on). Written atomically."""
    import matplotlib.pyplot as plt
    from matplotlib.animation import PillowWriter

    wd, exp = runs["wd"].astype(np.float64), runs["exp_lr"].astype(np.float64)
    steps = len(wd) - 1
    # denser early on, where the escape happens: t_k = 1 + (T-1)(k/(n-1))^1.7
    idx = np.unique((1 + (steps - 1) * np.linspace(0, 1, frames) ** 1.7).round().astype(int))
    fig, (ax_w, ax_e) = plt.subplots(1, 2, figsize=(6.0, 3.2))
    lim_w = 1.1 * max(np.abs(wd).max(), 1e-12)
    # The surface looks the same at every zoom (scale invariance): draw it once, rescale its extent.
    xs = np.linspace(-1, 1, 161)
    X, Y = np.meshgrid(xs, xs)
    Z = loss(np.stack([X, Y], axis=-1))
    cmap = plt.get_cmap("viridis", 10)  # flat bands: the GIF stays small
    for ax in (ax_w, ax_e):
        ax.imshow(Z, extent=(-lim_w, lim_w, -lim_w, lim_w), origin="lower", cmap=cmap, interpolation="nearest")
    (line_w,) = ax_w.plot([], [], color="orange", lw=1)
    (dot_w,) = ax_w.plot([], [], "o", color="orange", ms=4)
    (line_e,) = ax_e.plot([], [], color="red", lw=1)
    (dot_e,) = ax_e.plot([], [], "o", color="red", ms=4)
    for ax in (ax_w, ax_e):
        ax.set(xlim=(-lim_w, lim_w), ylim=(-lim_w, lim_w), aspect="equal")
        ax.set_xticks([])  # tick labels of a zooming axis cost most of the drawing time
        ax.set_yticks([])
        ax.plot([0], [0], "+", color="white", ms=6)
    title_w = ax_w.set_title("", fontsize=8)
    title_e = ax_e.set_title("", fontsize=8)
    fig.tight_layout()
    tmp = _atomic_path(path)
    try:
        writer = PillowWriter(fps=10)
        with writer.saving(fig, str(tmp), dpi):
            for t in idx:
                line_w.set_data(wd[: t + 1, 0], wd[: t + 1, 1])
                dot_w.set_data([wd[t, 0]], [wd[t, 1]])
                # zoom out by ‖w̃_t‖/‖w_t‖ (= α^{-t}): the view of the exponential run is ±lim_w·zoom,
                # drawn by scaling its coordinates into the fixed axes (the surface looks the same at any zoom)
                zoom = np.linalg.norm(exp[t]) / max(np.linalg.norm(wd[t]), 1e-300)
                lim = lim_w * zoom
                line_e.set_data(exp[: t + 1, 0] / zoom, exp[: t + 1, 1] / zoom)
                dot_e.set_data([exp[t, 0] / zoom], [exp[t, 1] / zoom])
                title_w.set_text(f"weight decay  (step {t}, view ±{lim_w:.2g})")
                title_e.set_text(f"exp. LR  (view ±{lim:.3g}, zoom ×{zoom:.3g})")
                writer.grab_frame()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    plt.close(fig)
    return path


def plot_deviation(path: Path, devs: dict, tol: float, ablation: Optional[np.ndarray], dpi: int) -> Path:
    """The angle between the directions of the two equivalent runs per step (``devs``: one series
    per precision), log scale, with the first step above ``tol`` marked; ``ablation`` (optional):
    the float64 series without the momentum-buffer preset."""
    import matplotlib.pyplot as plt

    from .plotting import save

    firsts = {name: first_index_over(dev, tol) for name, dev in devs.items()}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=dpi)
    floor = 1e-18  # exact agreement (deviation 0) is drawn at this floor
    colors = {"float32": "tab:red", "float64": "tab:blue"}
    for name, dev in devs.items():
        t = np.arange(len(dev))
        first = firsts[name]
        when = "never > tol" if first is None else f"> tol from step {first}"
        ax.semilogy(t, np.maximum(dev, floor), color=colors[name], lw=0.9, label=f"{name}: WD run vs exp. LR run ({when})")
        if first is not None:
            ax.axvline(first, color=colors[name], ls="--", lw=0.8)  # the step is in the legend
    if ablation is not None:
        ax.semilogy(np.arange(len(ablation)), np.maximum(ablation, floor), color="gray", lw=0.8, ls=":",
                    label="float64, momentum buffer not preset")
    ax.axhline(tol, color="k", ls=":", lw=0.8, label=f"tol = {tol:g}")
    ax.set(xlabel="step", ylabel="angle between directions (rad)", title="deviation of w/‖w‖ between the two equivalent runs")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save(fig, path)


# --------------------------------------------------------------------------- measurements


def gradient_residuals(
    loss: ToyLoss = TOY_LOSS,
    *,
    radii: Sequence[float] = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3),
    angles: int = 64,
    scales: Sequence[float] = (1e-3, 0.5, 7.0, 1e4),
) -> dict:
    """Lemma 1 of Arora, Li, Lyu on the toy: how far ``∇L`` is from ``⟨∇L(w), w⟩ = 0`` and ``∇L(cw) = ∇L(w)/c``.

    ``∇L`` is taken by torch autograd of ``loss`` in float64 (independent of the hand-written
    :meth:`ToyLoss.grad` the runs use, which is compared to it as well), at the points of a polar
    grid: every radius in ``radii`` times ``angles`` angles, offset by an irrational fraction of a
    cell so that no point sits on a critical angle (where ``∇L = 0``).

    Args:
        loss: the toy loss.
        radii: the radii of the grid (> 0).
        angles: angles per radius (>= 1).
        scales: the factors ``c`` (> 0).

    Returns:
        ``points`` (how many), ``orthogonality`` = max ``|⟨∇L(w),w⟩| / (‖∇L(w)‖ ‖w‖)``,
        ``scaling`` = max over ``c`` and points of ``‖c ∇L(cw) - ∇L(w)‖ / ‖∇L(w)‖``,
        ``analytic_gap`` = max ``‖ToyLoss.grad(w) - ∇L(w)‖ / ‖∇L(w)‖``, and the grid
        (``radii``, ``angles``, ``scales``). Plain floats; NaN where undefined.

    Example:
        >>> r = gradient_residuals(radii=(0.5, 2.0), angles=8, scales=(3.0,))
        >>> r["points"], r["orthogonality"] < 1e-12, r["scaling"] < 1e-12
        (16, True, True)
    """
    import torch

    radii = [float(r) for r in radii]
    scales = [float(c) for c in scales]
    if not radii or not all(math.isfinite(r) and r > 0 for r in radii):
        raise UserError(f"radii must be finite and > 0, got {radii}")
    if not scales or not all(math.isfinite(c) and c > 0 for c in scales):
        raise UserError(f"scales must be finite and > 0, got {scales}")
    if isinstance(angles, bool) or not isinstance(angles, int) or angles < 1:
        raise UserError(f"angles must be an integer >= 1, got {angles!r}")
    theta = np.linspace(-np.pi, np.pi, angles, endpoint=False) + (2 * np.pi / angles) * 0.6180339887
    R, T = np.meshgrid(np.array(radii), theta)
    pts = np.stack([R * np.cos(T), R * np.sin(T)], axis=-1).reshape(-1, 2)

    def autograd(p: np.ndarray) -> np.ndarray:
        w = torch.tensor(p, dtype=torch.float64, requires_grad=True)
        loss(w).sum().backward()
        return w.grad.numpy()

    g = autograd(pts)
    gn = np.linalg.norm(g, axis=-1)
    wn = np.linalg.norm(pts, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ortho = np.abs((g * pts).sum(-1)) / (gn * wn)
        scaling = [np.linalg.norm(c * autograd(c * pts) - g, axis=-1) / gn for c in scales]
        gap = np.linalg.norm(loss.grad(pts) - g, axis=-1) / gn

    def worst(v) -> float:
        v = np.asarray(v, dtype=np.float64)
        return float(np.max(v)) if v.size and not np.isnan(v).any() else math.nan

    return {
        "points": int(len(pts)),
        "orthogonality": worst(ortho),
        "scaling": worst(np.concatenate(scaling)),
        "analytic_gap": worst(gap),
        "radii": radii,
        "angles": int(angles),
        "scales": scales,
    }


def simulate(
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    momentum: float = 0.0,
    dtype: Any = "float64",
    w0: Sequence[float] = (-0.7, 0.7),
    loss: ToyLoss = TOY_LOSS,
) -> dict:
    """The runs of the toy, without figures.

    From ``w0``: GD without weight decay, GD with weight decay ``λ`` and GD without weight decay
    with the equivalent LR ``η α^{-2t-1}``, in ``dtype``; the last two again in float32 and float64
    to measure ``dev_t = ∠(w_t, w̃_t)``; with ``γ > 0`` also the exponential run without the
    momentum-buffer preset (float64).

    Returns:
        ``alpha``; ``runs``: ``{"no_wd", "wd", "exp_lr"}`` trajectories in ``dtype``, shape
        ``(steps + 1, 2)``; ``deviation``: ``{"float64", "float32"}`` float64 series of ``dev_t``;
        ``ablation``: the float64 ``dev_t`` without the buffer preset, or ``None``.

    Raises:
        UserError: bad settings.
    """
    dt = _as_dtype(dtype)
    w0 = _check_run_args(w0, steps, lr, weight_decay, momentum)
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=weight_decay, momentum=momentum)
    kw = dict(steps=steps, lr=lr, momentum=momentum, loss=loss)
    pairs = {}
    for name, d in _DTYPES.items():
        pairs[name] = (
            run_gd(w0, weight_decay=weight_decay, dtype=d, **kw),
            run_exp_lr(w0, weight_decay=weight_decay, dtype=d, **kw),
        )
    runs = {
        "no_wd": run_gd(w0, weight_decay=0.0, dtype=dt, **kw),
        "wd": pairs[np.dtype(dt).name][0],
        "exp_lr": pairs[np.dtype(dt).name][1],
    }
    ablation = None
    if momentum > 0:
        no_preset = run_exp_lr(w0, weight_decay=weight_decay, dtype=np.float64, preset_buffer=False, **kw)
        ablation = direction_deviation(pairs["float64"][0], no_preset)
    return {
        "alpha": alpha,
        "runs": runs,
        "deviation": {name: direction_deviation(a, b) for name, (a, b) in pairs.items()},
        "ablation": ablation,
    }


def toy_numbers(sim: dict, *, w0: Sequence[float], tol: float, loss: ToyLoss = TOY_LOSS) -> dict:
    """The plain numbers of a :func:`simulate` result (what :func:`run_toy` returns, less the settings).

    Returns:
        ``alpha``, ``first_deviation_step`` and ``max_deviation`` per precision (``None`` = never
        above ``tol``), ``max_deviation_without_buffer_preset``, ``final_loss`` and ``final_norm``
        per run, ``no_wd_stuck`` (ends at a non-global local minimum, not moving),
        ``no_wd_last_angular_step``, ``wd_escaped`` and ``wd_escape_step`` (the WD run leaves the
        start's basin), ``min_loss_wd``, ``global_min_loss`` and ``start_basin_min_loss`` (the loss
        at the local minimum of the start's basin).
    """
    w0 = np.asarray(w0, dtype=np.float64)
    devs, ablation = sim["deviation"], sim["ablation"]
    theta0 = math.atan2(w0[1], w0[0])
    start_basin = loss.basin(theta0)
    mins, _ = loss.critical_angles()
    global_min = float(mins[np.argmin(loss.of_angle(mins))])
    in_start = mins[loss.in_basin(mins, start_basin)]
    f = {k: v.astype(np.float64) for k, v in sim["runs"].items()}
    th_no = np.arctan2(f["no_wd"][:, 1], f["no_wd"][:, 0])
    th_wd = np.arctan2(f["wd"][:, 1], f["wd"][:, 0])
    last_move = float(direction_deviation(f["no_wd"][-2], f["no_wd"][-1])) if len(th_no) > 1 else math.nan
    ends_in_global = bool(loss.in_basin(th_no[-1], loss.basin(global_min)))
    no_wd_stuck = (not ends_in_global) and last_move < 1e-4
    outside = ~loss.in_basin(th_wd, start_basin)
    escape = int(np.argmax(outside)) if outside.any() else None
    return {
        "alpha": sim["alpha"],
        "first_deviation_step": {k: first_index_over(v, tol) for k, v in devs.items()},
        "max_deviation": {k: float(np.nanmax(v)) if np.isfinite(v).any() else math.inf for k, v in devs.items()},
        "max_deviation_without_buffer_preset": None if ablation is None else float(np.nanmax(ablation)),
        "final_loss": {k: float(loss(v[-1])) for k, v in f.items()},
        "final_norm": {k: float(np.linalg.norm(v[-1])) for k, v in f.items()},
        "no_wd_stuck": bool(no_wd_stuck),
        "no_wd_last_angular_step": last_move,
        "wd_escaped": escape is not None,
        "wd_escape_step": escape,
        "min_loss_wd": float(loss(f["wd"]).min()),
        "global_min_loss": float(loss.of_angle(global_min)),
        "start_basin_min_loss": float(loss.of_angle(in_start).min()) if in_start.size else math.nan,
    }


def draw_figures(
    outdir,
    sim: dict,
    *,
    w0: Sequence[float],
    tol: float,
    frames: int,
    dpi: int,
    loss: ToyLoss = TOY_LOSS,
    prefix: str = "toy_",
) -> dict[str, Path]:
    """Draw the four figures of a :func:`simulate` result into ``outdir``; returns ``{kind: path}``.

    ``<prefix>surface.png``, ``<prefix>trajectories.png``, ``<prefix>zoom.gif`` (``0.7 · dpi``) and
    ``<prefix>deviation.png`` (see :func:`run_toy`).
    """
    import matplotlib

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = {k: outdir / f"{prefix}{k}{'.gif' if k == 'zoom' else '.png'}" for k in ("surface", "trajectories", "zoom", "deviation")}
    with matplotlib.rc_context({"font.size": 9}):
        plot_surface(files["surface"], loss, w0, dpi)
        plot_trajectories(files["trajectories"], loss, sim["runs"], sim["alpha"], dpi)
        plot_zoom_gif(files["zoom"], loss, sim["runs"], frames, max(30, int(0.7 * dpi)))
        plot_deviation(files["deviation"], sim["deviation"], tol, sim["ablation"], dpi)
    return files


# --------------------------------------------------------------------------- the library entry point


def run_toy(
    outdir,
    *,
    steps: int = 400,
    lr: float = 1.0,
    weight_decay: float = 0.02,
    momentum: float = 0.0,
    dtype: Any = "float64",
    tol: float = 1e-6,
    w0: Sequence[float] = (-0.7, 0.7),
    frames: int = 48,
    dpi: int = 80,
    loss: ToyLoss = TOY_LOSS,
) -> dict:
    """Run the 2-D toy and write its four figures (the registered experiment ``toy`` does the same
    into a run directory, with verdicts: ``bnlab run toy``).

    Runs from ``w0``: GD without weight decay, GD with weight decay ``λ``, and GD without weight
    decay with the equivalent LR ``η α^{-2t-1}`` (in ``dtype``); the last two again in float32 and
    float64 to measure ``dev_t = ∠(w_t, w̃_t)``, the angle between their directions
    (:func:`simulate`).

    Files written to ``outdir``: ``toy_surface.png`` (loss and gradient field), ``toy_trajectories.png``
    (the three runs, the exponential one also mapped back by ``α^t`` onto the WD run, norms),
    ``toy_zoom.gif`` (WD run next to the exponential run with a view that zooms out; at most
    ``frames`` frames) and ``toy_deviation.png`` (``dev_t`` in both precisions, log scale, with the
    first step above ``tol`` marked).

    Args:
        outdir: directory for the figures (created).
        steps: number of steps ``T``.
        lr: ``η``; weight_decay: ``λ``; momentum: ``γ`` (the buffer of the exponential run is
            preset; with ``γ > 0`` the deviation plot also shows the run without the preset).
        dtype: precision of the trajectory figures, ``"float64"`` or ``"float32"``.
        tol: tolerance on the angle for "the runs deviate".
        w0: starting point.
        frames: GIF frames (2..60).
        dpi: resolution of the figures (the GIF uses ``0.7 · dpi``).
        loss: the toy loss.

    Returns:
        A dict of plain numbers (:func:`toy_numbers`): ``alpha``, ``first_deviation_step`` and
        ``max_deviation`` per precision (``None`` = never above ``tol``), ``final_loss`` and
        ``final_norm`` per run, ``no_wd_stuck`` (ends at a non-global local minimum, not moving),
        ``wd_escaped`` and ``wd_escape_step`` (the WD run leaves the start's basin),
        ``min_loss_wd``, ``global_min_loss``, the settings, and ``files``.

    Raises:
        UserError: bad settings.
    """
    check_settings(steps=steps, lr=lr, weight_decay=weight_decay, momentum=momentum, w0=w0, dtype=dtype,
                   frames=frames, tol=tol)
    sim = simulate(steps=steps, lr=lr, weight_decay=weight_decay, momentum=momentum, dtype=dtype, w0=w0, loss=loss)
    files = draw_figures(outdir, sim, w0=w0, tol=tol, frames=frames, dpi=dpi, loss=loss)
    return {
        "steps": int(steps),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "momentum": float(momentum),
        "dtype": np.dtype(_as_dtype(dtype)).name,
        "tol": float(tol),
        **toy_numbers(sim, w0=w0, tol=tol, loss=loss),
        "files": {k: str(v) for k, v in files.items()},
    }
