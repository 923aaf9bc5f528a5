"""The Hessian's eigenvalue density by stochastic Lanczos quadrature, and its outlier summary.

For a symmetric ``H`` of dimension ``n`` with eigenpairs ``(λ_j, u_j)``, the spectral density is
``φ(t) = (1/n) Σ_j δ(t − λ_j)``. For a unit vector ``v``, ``vᵀ δ(t − H) v = Σ_j (vᵀu_j)² δ(t − λ_j)``
and ``E[(vᵀu_j)²] = 1/n`` for a random (Rademacher or Gaussian) ``v``, so the spectral measure of ``v``
is an unbiased estimate of ``φ``. ``m`` Lanczos steps from ``v`` give a tridiagonal ``T_m`` with
eigenpairs ``(θ_i, s_i)``: the Gauss quadrature of that measure has nodes ``θ_i`` (Ritz values) and
weights ``τ_i = (e_1ᵀ s_i)²``, exact for polynomials of degree ``≤ 2m − 1``. Averaged over ``k`` random
starts and smoothed with a Gaussian of width ``σ``::

    φ̂(t) = (1/k) Σ_l Σ_i τ_i^(l) N(t; θ_i^(l), σ²)

(Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao 2019; PyHessian). Lanczos runs with full
reorthogonalization (classical Gram–Schmidt applied twice), as in the paper.

The outlier summary (all from the same runs, see :func:`spectral_density`):

* top eigenvalues ``λ̂_1 ≥ λ̂_2 ≥ …``: the i-th largest Ritz value, largest over the runs (a Ritz
  value is a lower bound of the eigenvalue of the same rank: ``θ_i ≤ λ_i``, Cauchy interlacing);
* the **bulk edge** ``λ_b``: in each run, start at the largest Ritz value that stands for at least
  ``bulk_count`` eigenvalues (``n τ_i ≥ bulk_count``; an isolated eigenvalue converges to a Ritz
  value of weight ``(vᵀu_j)² ≈ 1/n``, about one eigenvalue, while a Ritz value inside a bulk
  stands for many) and move up through the next Ritz values while each is less than
  ``gap_frac × width`` above the previous one, ``width`` being the span of the Ritz values with
  ``n τ_i ≥ bulk_count`` (Gauss quadrature puts nodes of small weight at a bulk's edge: they count
  as bulk; a gap ends it). ``λ_b`` is the median of the runs' edges. Each run's own edge (for the
  outlier mass and the spread) is then found the same way starting at ``λ_b``, so that a run in
  which a cluster of outliers happened to stand for ``bulk_count`` eigenvalues is not misread;
* the outlier mass: each run's quadrature weight above its own edge, mean over runs, and the
  number of eigenvalues it stands for, ``n`` times that; the ratio ``λ̂_1 / λ_b``;
* the share of ``‖g‖²`` in the top-``k`` eigenspace, ``‖P_k g‖² / ‖g‖²``, and above the bulk edge:
  one more Lanczos run **started from** ``g/‖g‖`` gives the quadrature of the spectral measure of
  ``g``, ``Σ_j (ĝᵀu_j)² δ(t − λ_j)``; its weight above ``(λ̂_k + λ̂_{k+1})/2`` is the top-``k`` share
  once the top Ritz values have converged.

References:
    Ubaru, Chen, Saad, "Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature", SIAM J.
    Matrix Anal. Appl. 2017. Ghorbani, Krishnan, Xiao, "An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density", ICML 2019. Yao, Gholami, Keutzer, Mahoney,
    "PyHessian: Neural Networks Through the Lens of the Hessian", 2020. Golub & Meurant,
    *Matrices, Moments and Quadrature with Applications*, 2010.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .curvature import flat_matvec
from .errors import UserError

__all__ = ["SpectralDensity", "spectral_density", "gaussian_density", "lanczos_quadrature"]

#: Ghorbani et al. / PyHessian's smoothing: ``σ² = 1e-5 · max(1, λ_max − λ_min)``.
SIGMA_SQUARED_FACTOR = 1e-5


@dataclass
class SpectralDensity:
    """The estimated eigenvalue density of a Hessian and its outlier summary.

    Attributes:
        grid: points ``t`` (float64, increasing).
        density: ``φ̂(t)`` on ``grid``; integrates to 1 on the grid (trapezoid rule).
        sigma: the Gaussian's width ``σ``.
        nodes: Ritz values, shape ``(n_runs, n_steps)`` (NaN after a run that ended early at an
            invariant subspace, where its quadrature is already exact).
        weights: their weights ``τ`` (each row sums to 1; NaN where ``nodes`` is).
        n: the dimension (number of parameters).
        n_hvp: Hessian-vector products used (density runs and the gradient run).
        top_eigenvalues: ``λ̂_1 ≥ … ≥ λ̂_k`` (``top_k`` of them). Ranks are those of Ritz values: a
            repeated eigenvalue appears once per run in exact arithmetic, and round-off may add
            copies of zero weight, so with exact multiplicities the ranks (and the top-``k`` cut of
            the gradient share) are not those of the eigenvalues.
        bulk_edge: ``λ_b`` (module docstring); ``bulk_count`` is the rule's count.
        run_top, run_edge: the top Ritz value and the edge of each run (anchored at ``λ_b``).
        outlier_mass: the quadrature weight above each run's edge, mean over runs;
            ``n_outliers = n · outlier_mass``.
        top_to_edge: ``λ̂_1 / λ_b`` (NaN when ``λ_b ≤ 0``).
        ratio_spread: coefficient of variation over runs of ``run_top / run_edge`` (std / mean; the
            noise of the estimate).
        top_k: ``k`` of the gradient share.
        grad_norm: ``‖g‖`` (NaN when no gradient was available).
        gradient_share: ``‖P_k g‖² / ‖g‖²``, the share of ``‖g‖²`` in the top-``k`` eigenspace (NaN
            when ``n_steps ≤ k < n``: too few Ritz values to separate that space).
        gradient_share_outliers: the share of ``‖g‖²`` in the eigenspace above the bulk edge.
        gradient_nodes, gradient_weights: the quadrature of ``g``'s spectral measure.
        grid_mass: ``∫ φ̂`` on the grid before normalization (≈ 1 when the grid covers every node
            and resolves ``σ``).
        floor: the density's floor for log-scale plots, ``1e-7 · max φ̂`` (:meth:`log10_density`).
    """

    grid: np.ndarray
    density: np.ndarray
    sigma: float
    nodes: np.ndarray
    weights: np.ndarray
    n: int
    n_hvp: int
    top_eigenvalues: np.ndarray
    bulk_edge: float
    bulk_count: float
    run_top: np.ndarray
    run_edge: np.ndarray
    outlier_mass: float
    n_outliers: float
    top_to_edge: float
    ratio_spread: float
    top_k: int
    grad_norm: float = math.nan
    gradient_share: float = math.nan
    gradient_share_outliers: float = math.nan
    gradient_nodes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gradient_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grid_mass: float = 1.0
    floor: float = 0.0

    def log10_density(self, floor: Optional[float] = None) -> np.ndarray:
        """``log10(max(φ̂, floor))`` (``floor`` defaults to :attr:`floor`): the paper's log-scale plot
        without ``-inf`` where the Gaussians underflow."""
        f = self.floor if floor is None else float(floor)
        if not f > 0:
            f = np.finfo(float).tiny
        return np.log10(np.maximum(self.density, f))

    def mass_between(self, lo: float, hi: float) -> float:
        """``μ̂((lo, hi])``: the quadrature measure in an interval, mean over runs (unsmoothed)."""
        return _mass(self.nodes, self.weights, lo, hi)

    def outline(self) -> dict:
        """The scalar summary (what a probe records)."""
        return {
            "top": float(self.top_eigenvalues[0]) if len(self.top_eigenvalues) else math.nan,
            "bulk_edge": self.bulk_edge,
            "top_to_edge": self.top_to_edge,
            "outlier_mass": self.outlier_mass,
            "n_outliers": self.n_outliers,
            "ratio_spread": self.ratio_spread,
            "grad_share": self.gradient_share,
            "grad_share_outliers": self.gradient_share_outliers,
            "n_hvp": float(self.n_hvp),
        }

    def arrays(self) -> dict:
        """Everything as numpy arrays (for :meth:`bnlab.runs.RunDir.save_arrays`)."""
        return {
            "grid": self.grid, "density": self.density, "nodes": self.nodes, "weights": self.weights,
            "top_eigenvalues": self.top_eigenvalues, "run_top": self.run_top, "run_edge": self.run_edge,
            "gradient_nodes": self.gradient_nodes, "gradient_weights": self.gradient_weights,
            "scalars": np.array([self.sigma, self.n, self.floor, self.bulk_edge], dtype=float),
        }


def _mass(nodes: np.ndarray, weights: np.ndarray, lo: float, hi: float) -> float:
    sel = (nodes > lo) & (nodes <= hi)
    w = np.where(sel, np.nan_to_num(weights), 0.0)
    return float(w.sum(axis=-1).mean()) if w.ndim > 1 else float(w.sum())


# --------------------------------------------------------------------------------------------
# operators


def _flat_grad(op: Any) -> Optional[Tensor]:
    """The gradient of an operator as a flat vector, or ``None`` if it has none."""
    if hasattr(op, "flat_grad"):
        return op.flat_grad()
    g = getattr(op, "grad", None)
    keys = getattr(op, "keys", None)
    if isinstance(g, dict) and keys is not None:
        return torch.cat([g[k].reshape(-1) for k in keys])
    if isinstance(g, Tensor):
        return g.reshape(-1)
    return None


def _as_operator(f: Any, params: Optional[dict], method: str) -> Any:
    if hasattr(f, "matvec") and hasattr(f, "numel"):
        if params is not None:
            raise UserError("spectral_density: give either an operator or a closure with params, not both")
        return f
    if not callable(f) or params is None:
        raise UserError("spectral_density takes a loss closure f(params) with params, or an operator with "
                        ".numel, .matvec(flat) and .flat_params()")
    from .curvature import HessianOperator

    return HessianOperator(f, params, method=method)


# --------------------------------------------------------------------------------------------
# Lanczos quadrature


def lanczos_quadrature(matvec, v0: Tensor, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of the spectral measure of ``v0`` by ``n_steps`` Lanczos steps.

    Lanczos with full reorthogonalization (CGS2) builds ``T_m = Qᵀ H Q``, ``Q = [q_1 … q_m]``,
    ``q_1 = v0/‖v0‖``; with ``T_m = S diag(θ) Sᵀ`` the quadrature has nodes ``θ_i`` and weights
    ``τ_i = S_{1i}²`` (``Σ τ_i = 1``): ``Σ_i τ_i p(θ_i) = q_1ᵀ p(H) q_1`` for every polynomial of
    degree ``≤ 2m − 1``. A run stops early at an invariant subspace (``β_j ≤ 1e-10 ‖T‖``), where
    the quadrature is exact.

    Args:
        matvec: ``v ↦ H v`` on flat vectors. Its result is updated in place: return a new
            tensor, or a work buffer of your own that nothing else reads (one buffer for every
            product is how :func:`spectral_density` avoids a parameter-sized allocation per HVP).
        v0: the start vector (any norm > 0).
        n_steps: ``m``.

    Returns:
        ``(nodes, weights)``: float64 arrays of length ``≤ m``, nodes increasing.
    """
    n = v0.numel()
    m = min(n_steps, n)
    Q = torch.empty(m, n, dtype=v0.dtype, device=v0.device)
    alphas: list[float] = []
    betas: list[float] = []
    v0 = v0.detach().reshape(-1)
    torch.div(v0, v0.norm(), out=Q[0])
    for j in range(m):
        q = Q[j]
        w = matvec(q).detach()  # updated in place below: a new tensor, or a work buffer of the caller's
        if w.data_ptr() == q.data_ptr() or not w.is_contiguous() or w.dtype != Q.dtype:
            w = w.to(Q.dtype).clone()  # an operator that hands back its input, or a strided view
        Qj = Q[: j + 1]
        h = Qj @ w
        w.addmv_(Qj.T, h, alpha=-1.0)
        h2 = Qj @ w
        w.addmv_(Qj.T, h2, alpha=-1.0)
        alphas.append(float(h[j] + h2[j]))
        if j + 1 == m:
            break
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if not math.isfinite(beta) or beta <= 1e-10 * max(scale, 1e-300):
            break  # invariant subspace: the quadrature of v0's measure is exact
        betas.append(beta)
        torch.div(w, beta, out=Q[j + 1])
    T = np.diag(np.array(alphas, dtype=np.float64))
    if betas:
        b = np.array(betas, dtype=np.float64)
        T += np.diag(b, 1) + np.diag(b, -1)
    if not np.isfinite(T).all():
        k = len(alphas)
        return np.full(k, np.nan), np.full(k, np.nan)
    theta, S = np.linalg.eigh(T)
    return theta, S[0] ** 2


def gaussian_density(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """``Σ_i w_i N(t; θ_i, σ²)`` on ``grid``, averaged over the rows of ``nodes``/``weights`` (NaN
    entries skipped). Also the exact smoothed density of a matrix: ``nodes`` its eigenvalues,
    ``weights`` ``1/n`` each."""
    grid = np.asarray(grid, dtype=np.float64)
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    out = np.zeros_like(grid)
    c = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for th, w in zip(nodes, weights):
        ok = np.isfinite(th) & np.isfinite(w)
        th, w = th[ok], w[ok]
        for start in range(0, len(th), 64):
            d = (grid[:, None] - th[None, start:start + 64]) / sigma
            out += (np.exp(-0.5 * d * d) * w[None, start:start + 64]).sum(1) * c
    return out / max(len(nodes), 1)


def _check_int(name: str, v: Any, lo: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise UserError(f"{name} must be an integer >= {lo}, got {v!r}")


def spectral_density(
    f: Any,
    params: Optional[dict[str, Tensor]] = None,
    *,
    n_runs: int = 10,
    n_steps: int = 80,
    sigma: Optional[float] = None,
    seed: int = 0,
    grid: Any = None,
    top_k: int = 10,
    bulk_count: float = 10.0,
    gap_frac: float = 0.1,
    gradient: Any = None,
    method: str = "auto",
    progress: Any = False,
) -> SpectralDensity:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature, with its outlier summary.

    ``φ̂(t) = (1/k) Σ_l Σ_i τ_i^(l) N(t; θ_i^(l), σ²)`` from ``k = n_runs`` Lanczos runs of
    ``m = n_steps`` steps (full reorthogonalization) from Rademacher start vectors ``v_l/‖v_l‖``;
    see the module docstring for the quadrature and for the definitions of the top eigenvalues,
    the bulk edge, the outlier mass and the gradient's share. Cost: ``k·m`` Hessian-vector
    products, plus ``m`` for the gradient's share (a run started from ``g``), on one forward and
    backward graph per operator.

    Accuracy: for an isolated eigenvalue of multiplicity ``r`` the mass at its Ritz value is a mean
    over runs of ``‖P v‖²``, ``≈ χ²_r / n``: expectation ``r/n``, relative standard deviation
    ``≈ √(2/(r k))`` (45 % for one eigenvalue and 10 runs).

    Args:
        f: a loss closure ``f(params) -> scalar`` (with ``params``) or an operator: anything with
            ``.numel``, ``.matvec(flat)`` and ``.flat_params()`` (:class:`bnlab.curvature.HessianOperator`,
            :class:`bnlab.dataset_curvature.DatasetHessianOperator` for a dataset-level Hessian), then
            ``params=None``.
        params: the point ``w`` (with a closure); not modified.
        n_runs: ``k``, random start vectors.
        n_steps: ``m``, Lanczos steps per run (capped at the dimension).
        sigma: the Gaussian's width; default ``√(1e-5 · max(1, λ_max − λ_min))`` over the Ritz values
            (Ghorbani et al., PyHessian).
        seed: seed of the start vectors (a private generator: the global RNG is untouched).
        grid: the points ``t``: an array, an int (that many points), or ``None`` (the Ritz values'
            range padded by 1 % and ``5σ``, spacing ``≤ σ/4``, 1 000 to 200 000 points).
        top_k: the dimension of the top eigenspace of the gradient's share, and how many top
            eigenvalues are reported.
        bulk_count: the bulk edge starts at the largest Ritz value that stands for at least this
            many eigenvalues (``n τ ≥ bulk_count``); the edge (and what depends on it) is NaN when
            none does, which needs ``n`` below about ``bulk_count · n_steps``.
        gap_frac: ... and extends up through Ritz values less than this fraction of the bulk's width
            above the previous one.
        gradient: ``g`` (flat tensor or dict keyed like ``params``); default: the operator's own
            gradient (``HessianOperator.grad``, ``flat_grad()``); without one the shares are NaN.
        method: HVP method of a closure (:func:`bnlab.curvature.hvp`).
        progress: a tqdm bar over the runs (``True`` or its description).

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        UserError: a setting out of range, or neither a closure with params nor an operator.

    Example:
        >>> A = torch.diag(torch.cat([torch.linspace(0, 1, 97), torch.tensor([5., 8., 12.])])).double()
        >>> sd = spectral_density(lambda p: 0.5 * p["w"] @ A @ p["w"], {"w": torch.ones(100).double()},
        ...                       n_runs=20, n_steps=40, top_k=3)
        >>> sd.top_eigenvalues  # doctest: +SKIP
        array([12., 8., 5.])

    References:
        Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao, ICML 2019, sec. 2.
    """
    _check_int("n_runs", n_runs)
    _check_int("n_steps", n_steps)
    _check_int("top_k", top_k)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (math.isfinite(bulk_count) and bulk_count > 0):
        raise UserError(f"bulk_count must be a finite number > 0, got {bulk_count!r}")
    if not (math.isfinite(gap_frac) and gap_frac >= 0):
        raise UserError(f"gap_frac must be a finite number >= 0, got {gap_frac!r}")
    op = _as_operator(f, params, method)
    n = int(op.numel)
    like = op.flat_params().detach()
    gen = torch.Generator().manual_seed(seed)
    m = min(n_steps, n)
    nodes = np.full((n_runs, m), np.nan)
    weights = np.full((n_runs, m), np.nan)
    runs = range(n_runs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(runs, desc=progress if isinstance(progress, str) else "spectral density", unit="run", leave=False)
        runs = bar
    n_hvp = 0
    mv, work = flat_matvec(op), torch.empty(n, dtype=like.dtype, device=like.device)
    count = _Counter(lambda v: mv(v, work))  # every product into one buffer: no allocation per HVP
    for l in runs:
        v = torch.randint(0, 2, (n,), generator=gen).to(dtype=like.dtype).mul_(2).sub_(1).to(like.device)
        th, tau = lanczos_quadrature(count, v, m)
        nodes[l, : len(th)] = th
        weights[l, : len(tau)] = tau
    if bar is not None:
        bar.close()
    n_hvp = count.n

    # the gradient's spectral measure: one run started from g
    g = _gradient(op, gradient, params)
    g_nodes = g_weights = np.zeros(0)
    grad_norm = math.nan
    if g is not None:
        g = g.detach().to(dtype=like.dtype, device=like.device).reshape(-1)
        if g.numel() != n:
            raise UserError(f"gradient has {g.numel()} entries, the Hessian's dimension is {n}")
        grad_norm = float(g.norm())
        if grad_norm > 0 and math.isfinite(grad_norm):
            g_nodes, g_weights = lanczos_quadrature(count, g, m)
            n_hvp = count.n

    finite = nodes[np.isfinite(nodes)]
    if finite.size == 0:
        raise UserError("spectral_density: the Hessian-vector products are not finite")
    lo, hi = float(finite.min()), float(finite.max())
    if sigma is None:
        sigma = math.sqrt(SIGMA_SQUARED_FACTOR * max(1.0, hi - lo))
    t = _make_grid(grid, lo, hi, sigma)
    dens = gaussian_density(t, nodes, weights, sigma)
    grid_mass = float(np.trapezoid(dens, t)) if len(t) > 1 else 1.0
    if grid_mass > 0 and math.isfinite(grid_mass):
        dens = dens / grid_mass

    # outlier summary
    ranked = -np.sort(-np.where(np.isfinite(nodes), nodes, -np.inf), axis=1)  # each run, largest first
    kk = min(top_k + 1, ranked.shape[1])
    top = ranked[:, :kk].max(axis=0)
    top = top[np.isfinite(top)]
    run_top = ranked[:, 0]
    first = np.array([_run_edge(th, tau, n, bulk_count, gap_frac) for th, tau in zip(nodes, weights)])
    edge = float(np.nanmedian(first)) if np.isfinite(first).any() else math.nan
    # each run's edge, anchored at the median: up from λ_b through its nodes closer than gap_frac × width
    run_edge = np.full(n_runs, math.nan)
    widths = []
    if math.isfinite(edge):
        for l, (th, tau) in enumerate(zip(nodes, weights)):
            ths, _, width = _sorted_run(th, tau, n, bulk_count)
            width = width if width > 0 else max(abs(edge), 1e-300)
            widths.append(width)
            if ths.size:
                run_edge[l] = _extend(ths, edge, gap_frac * width)
    per_mass = [_mass(th, tau, b, math.inf) for th, tau, b in zip(nodes, weights, run_edge) if math.isfinite(b)]
    out_mass = float(np.mean(per_mass)) if per_mass else math.nan
    top1 = float(top[0]) if len(top) else math.nan
    ratio = top1 / edge if edge > 0 else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        per_run = np.where(run_edge > 0, run_top / run_edge, np.nan)
    per_run = per_run[np.isfinite(per_run)]
    spread = float(per_run.std() / per_run.mean()) if len(per_run) > 1 and per_run.mean() > 0 else math.nan

    share = share_out = math.nan
    if len(g_nodes):
        if len(top) > top_k:
            share = float(np.nan_to_num(g_weights[g_nodes > 0.5 * (top[top_k - 1] + top[top_k])]).sum())
        elif m == n:  # the whole space is the top-k eigenspace
            share = 1.0
        # else: fewer than top_k + 1 Ritz values cannot separate the top-k space: NaN
        if math.isfinite(edge):  # the gradient run's own edge, anchored at λ_b as the runs' edges
            g_edge = _extend(np.sort(g_nodes[np.isfinite(g_nodes)]), edge, gap_frac * float(np.median(widths)))
            share_out = float(np.nan_to_num(g_weights[g_nodes > g_edge]).sum())
    elif g is not None and grad_norm == 0.0:
        share = share_out = 0.0
    return SpectralDensity(
        grid=t, density=dens, sigma=float(sigma), nodes=nodes, weights=weights, n=n, n_hvp=n_hvp,
        top_eigenvalues=np.asarray(top[:top_k], dtype=float), bulk_edge=edge, bulk_count=float(bulk_count),
        run_top=run_top, run_edge=run_edge, outlier_mass=out_mass, n_outliers=n * out_mass,
        top_to_edge=ratio, ratio_spread=spread, top_k=top_k, grad_norm=grad_norm, gradient_share=share,
        gradient_share_outliers=share_out, gradient_nodes=np.asarray(g_nodes), gradient_weights=np.asarray(g_weights),
        grid_mass=grid_mass, floor=1e-7 * float(dens.max()) if dens.size else 0.0,
    )


class _Counter:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, v):
        self.n += 1
        return self.fn(v)


def _sorted_run(th: np.ndarray, tau: np.ndarray, n: int, bulk_count: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A run's finite nodes and weights in increasing order, and the bulk's width (the span of the
    nodes standing for ``≥ bulk_count`` eigenvalues; the span of all nodes if fewer than two do)."""
    ok = np.isfinite(th) & np.isfinite(tau)
    order = np.argsort(th[ok])
    th, tau = th[ok][order], tau[ok][order]
    heavy = th[n * tau >= bulk_count]
    span = heavy if heavy.size > 1 else th
    width = float(span[-1] - span[0]) if span.size else math.nan
    return th, tau, width


def _extend(th: np.ndarray, start: float, step: float) -> float:
    """From ``start`` up through the sorted nodes ``th`` while each is at most ``step`` above the last."""
    cur = start
    for t in th[th > start]:
        if t - cur > step:
            break
        cur = float(t)
    return cur


def _run_edge(th: np.ndarray, tau: np.ndarray, n: int, bulk_count: float, gap_frac: float) -> float:
    """One run's bulk edge: from the largest node standing for ``≥ bulk_count`` eigenvalues, up through
    the nodes closer than ``gap_frac × width`` to the previous one."""
    th, tau, width = _sorted_run(th, tau, n, bulk_count)
    heavy = np.flatnonzero(n * tau >= bulk_count)
    if not heavy.size:
        return math.nan
    start = float(th[heavy[-1]])
    if not width > 0:
        width = max(abs(start), np.finfo(float).tiny)
    return _extend(th, start, gap_frac * width)


def _gradient(op: Any, gradient: Any, params: Optional[dict]) -> Optional[Tensor]:
    if gradient is None:
        return _flat_grad(op)
    if isinstance(gradient, dict):
        keys = list(params) if params is not None else getattr(op, "keys", None)
        if keys is None:
            raise UserError("a gradient dict needs params (or an operator with keys) to fix the order")
        return torch.cat([gradient[k].reshape(-1) for k in keys])
    return torch.as_tensor(gradient).reshape(-1)


def _make_grid(grid: Any, lo: float, hi: float, sigma: float) -> np.ndarray:
    if grid is not None and not isinstance(grid, int):
        t = np.asarray(grid, dtype=np.float64).reshape(-1)
        if t.size < 2 or not np.isfinite(t).all() or (np.diff(t) <= 0).any():
            raise UserError("grid must be an increasing array of at least 2 finite points (or a number of points)")
        return t
    pad = 0.01 * (hi - lo) + 5.0 * sigma
    a, b = lo - pad, hi + pad
    if isinstance(grid, int) and not isinstance(grid, bool):
        _check_int("grid", grid, 2)
        points = grid
    else:
        points = int(min(200_000, max(1_000, math.ceil((b - a) / (sigma / 4.0)) + 1)))
    return np.linspace(a, b, points)
