"""Santurkar et al.'s theory (§4 of "How Does Batch Normalization Help Optimization?"), measured.

Notation (REFERENCES.md §6), per channel ``c`` of a BatchNorm layer over its ``m`` batch values
(``m = N·∏spatial``): ``y`` the BN input, ``μ = ⟨1,y⟩/m``, ``σ²`` the biased batch variance,
``s² = σ² + ε``, ``ρ = σ²/s²``, ``ŷ = (y − μ)/s`` (``⟨1,ŷ⟩ = 0``, ``‖ŷ‖² = mρ``), ``z = γŷ + β``
the BN output, ``L̂(y) = L(z(y))`` and **``g = ∂L/∂z``**. The BN backward is::

    ∇_y L̂ = (γ/(m s)) (m g − ⟨1,g⟩ 1 − ⟨g,ŷ⟩ ŷ)

* **Thm 4.1** (:func:`gradient_terms`): ``‖∇_y L̂‖² = (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m)``,
  an identity at ``ε = 0`` (Pythagoras for the projector ``Π = I − 11ᵀ/m − ŷŷᵀ/m``); with
  ``ε > 0`` the exact form is ``‖∇_y L̂‖² = (γ²/s²)(‖g‖² − ⟨1,g⟩²/m − (2−ρ)⟨g,ŷ⟩²/m)``.
* **Obs. 4.3**: the two projection terms ``⟨1,g⟩²/m`` and ``⟨g,ŷ⟩²/m`` and their shares of
  ``‖g‖²``: what BN removes from the gradient besides the rescaling ``γ²/σ²`` (with ``γ = σ``
  the gradient still loses them).
* **Thm 4.2** (:func:`curvature_terms`), with ``v = ∇_y L̂`` and ``H = ∂²L/∂z²`` (activation-space
  Hessian-vector products, :func:`bnlab.curvature.layer_output_closure`):
  (a) ``vᵀ(∂²L̂/∂y²)v = (γ²/σ²) vᵀHv − (γ/(mσ²))⟨g,ŷ⟩‖v‖²`` at ``ε = 0``;
  (b) ``vᵀ(∂²L̂/∂y²)v ≤ (γ²/σ²)(gᵀHg − ⟨g,ŷ⟩‖v‖²/(mγ))``, which given (a) holds iff
  ``vᵀHv ≤ gᵀHg`` (the paper's "H preserves relative norms", in operative form).
  For a whole layer, ``γ/σ`` differs by channel: with ``D = diag(γ_c/σ_c)`` (per channel)
  the layer forms are (a) ``vᵀ∇²_y L̂ v = (Dv)ᵀH(Dv) − Σ_c γ_c⟨g_c,ŷ_c⟩‖v_c‖²/(mσ_c²)`` and (b) the
  same with ``Dg`` in place of ``Dv``, condition ``(Dv)ᵀH(Dv) ≤ (Dg)ᵀH(Dg)``; they reduce to the
  paper's for one channel. With ``ε > 0``, ``J = ∂z/∂y = (γ/s)(I − 11ᵀ/m − ŷŷᵀ/m)`` per channel,
  ``Jv ≠ (γ/s)v`` and ``ŷ`` has a further second derivative; the exact form is::

      vᵀ∇²_y L̂ v = (Jv)ᵀH(Jv) + Σ_c γ_c [ −2 a_c ⟨g_c,v_c⟩/s_c³ + ⟨g_c,ŷ_c⟩(3a_c²/s_c⁴ − ‖v_c‖²/(m s_c²)) ],
      a_c = s_c⟨ŷ_c,v_c⟩/m,

  (second derivative of ``ŷ(y + tv)`` at ``t = 0``: ``−2a v/s³ + ŷ(3a²/s⁴ − ‖v‖²/(ms²))``).
* **Lemma 4.5** (:func:`lemma45_sides`, :func:`ray_distance`, :func:`angle`,
  :func:`solution_distances`): ``‖W₀ − W*‖² − (‖W*‖² − ⟨W*,W₀⟩)²/‖W*‖² = min_c ‖W₀ − cW*‖²``,
  the squared distance from ``W₀`` to the line (for ``⟨W₀,W*⟩ > 0``, the ray) through ``W*``.

The measurements run on a float64 copy of the model (:func:`analysis_copy`), so the model, its
buffers, ``.grad`` and the RNG are untouched. ``eps=0.0`` sets every measured BatchNorm's ``ε``
to 0 in the copy (the theorems' setting; in practice the smallest normal float, since PyTorch
refuses 0, which rounds away). Degenerate channels (``σ² ≤ 1e-14·mean(y²)``: constant over the
batch) are excluded from the gaps and counted.

**Relative gap** of an identity ``LHS = Σ_k T_k``: ``|LHS − Σ T_k| / (|LHS| + Σ |T_k|)``, the
error relative to the size of the terms (cancellation among the terms cannot inflate it).

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, §4 (Thm 4.1, Thm 4.2, Obs. 4.3, Lemma 4.5); Dannemann & Junike, arXiv
    2502.17913 (on Lemma 4.5's premise).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import compute_loss, forward
from .curvature import HessianOperator, layer_output_closure
from .errors import UserError

__all__ = [
    "bn_layers", "analysis_copy", "relative_gap", "GradientTerms", "gradient_terms", "CurvatureTerms",
    "curvature_terms", "lemma45_sides", "ray_distance", "angle", "solution_distances",
]

DEGENERATE_VAR = 1e-14
"""A channel is degenerate (constant over the batch) when ``σ² ≤ DEGENERATE_VAR · mean(y²)``."""


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The train-mode ``torch.nn`` BatchNorm layers of ``model`` (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``), in module order; bnlab's own variants (noisy BN, which adds noise after
    normalizing) and eval-mode layers are not BN in the theorems' sense and are left out."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, "is_bnlab_norm", False) and m.training]


def _cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """``batch`` with its floating-point tensors in ``dtype`` (labels and masks unchanged)."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast_batch(v, dtype) for v in batch)
    if hasattr(batch, "keys") and hasattr(batch, "items"):  # BatchEncoding and other mappings
        return {k: _cast_batch(v, dtype) for k, v in batch.items()}
    return batch


def _channels(t: Tensor) -> Tensor:
    """``(N, C, *spatial)`` → ``(C, m)`` with ``m = N·∏spatial``."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def analysis_copy(model: nn.Module, *, eps: Optional[float] = 0.0,
                  dtype: torch.dtype = torch.float64) -> tuple[nn.Module, dict[str, bool]]:
    """A deep copy of ``model`` in ``dtype`` with the BatchNorm ``ε`` set for the theorems.

    PyTorch refuses ``ε = 0`` in train mode, so ``eps=0.0`` sets the smallest positive normal
    number of ``dtype`` (``2.2e-308`` in float64): ``σ² + ε`` then rounds to ``σ²`` for every
    channel with ``σ² > 1e-290`` or so, which is the ``ε = 0`` computation exactly, and a
    constant channel gives ``ŷ = 0`` instead of NaN.

    Args:
        model: the network (not modified; the global RNG is not advanced).
        eps: the ``ε`` of every layer of :func:`bn_layers` in the copy; ``None`` keeps each
            layer's own.
        dtype: the copy's floating-point type.

    Returns:
        ``(copy, eps0)``: the copy and, per BN layer name, whether its ``ε`` is (effectively) 0.
    """
    with torch.random.fork_rng(devices=[]):
        net = copy.deepcopy(model).to(dtype)
    for p in net.parameters():
        p.grad = None
    tiny = torch.finfo(dtype).tiny
    layers = bn_layers(net)
    if eps is not None:
        if eps < 0 or not math.isfinite(eps):
            raise UserError(f"eps must be a finite number >= 0, got {eps!r}")
        for _, mod in layers:
            mod.eps = float(eps) if eps > tiny else tiny
    return net, {name: mod.eps <= tiny for name, mod in layers}


def relative_gap(lhs, terms: Sequence) -> np.ndarray:
    """``|LHS − Σ_k T_k| / (|LHS| + Σ_k |T_k|)`` elementwise (0 where every term is 0).

    Example:
        >>> float(relative_gap(3.0, [1.0, 2.0]))
        0.0
    """
    lhs = np.asarray(lhs, dtype=np.float64)
    ts = [np.asarray(t, dtype=np.float64) for t in terms]
    rhs = sum(ts)
    scale = np.abs(lhs) + sum(np.abs(t) for t in ts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, np.abs(lhs - rhs) / np.where(scale > 0, scale, 1.0), 0.0)


@dataclass
class GradientTerms:
    """Thm 4.1 and Obs. 4.3 at one BN layer: per-channel arrays (float64 numpy).

    Attributes:
        name: the layer's module name.
        m: values per channel (``N·∏spatial``).
        eps: the layer's ``ε`` in the measured copy; ``eps0``: whether it is 0.
        gamma, sigma2: ``γ_c`` (1 without affine) and the biased batch variance ``σ_c²``.
        rho: ``σ²/(σ² + ε)``.
        grad_y_sq: ``‖∇_y L̂‖²`` by autograd through the whole network (the left side).
        g_sq: ``‖g‖²``, ``g = ∂L/∂z`` by autograd.
        proj_mean: ``⟨1,g⟩²/m``; proj_dir: ``⟨g,ŷ⟩²/m``.
        rhs_eps0: ``(γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m)`` (Thm 4.1 at ε = 0).
        rhs_eps: ``(γ²/s²)(‖g‖² − ⟨1,g⟩²/m − (2−ρ)⟨g,ŷ⟩²/m)`` (exact with the layer's ε).
        gap_eps0, gap_eps: the relative gaps of the two forms (:func:`relative_gap` over the
            expanded terms); ``gap_eps0`` is an identity check only where ``eps0``.
        backward_gap: ``‖∇_y L̂ − (γ/(ms))(mg − ⟨1,g⟩1 − ⟨g,ŷ⟩ŷ)‖ / ‖∇_y L̂‖`` (the BN backward
            formula against autograd).
        degenerate: channels with (numerically) zero variance, excluded from the summaries.
    """

    name: str
    m: int
    eps: float
    eps0: bool
    gamma: np.ndarray
    sigma2: np.ndarray
    rho: np.ndarray
    grad_y_sq: np.ndarray
    g_sq: np.ndarray
    proj_mean: np.ndarray
    proj_dir: np.ndarray
    rhs_eps0: np.ndarray
    rhs_eps: np.ndarray
    gap_eps0: np.ndarray
    gap_eps: np.ndarray
    backward_gap: np.ndarray
    degenerate: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def share_mean(self) -> np.ndarray:
        """``⟨1,g⟩²/(m‖g‖²)`` per channel (0 where ``g = 0``)."""
        return np.divide(self.proj_mean, self.g_sq, out=np.zeros_like(self.g_sq), where=self.g_sq > 0)

    @property
    def share_dir(self) -> np.ndarray:
        """``⟨g,ŷ⟩²/(m‖g‖²)`` per channel (0 where ``g = 0``)."""
        return np.divide(self.proj_dir, self.g_sq, out=np.zeros_like(self.g_sq), where=self.g_sq > 0)

    def summary(self) -> dict[str, float]:
        """Layer numbers over the non-degenerate channels.

        ``gap_eps0`` / ``gap_eps``: the worst channel's relative gap (``gap_eps0`` is NaN unless
        ``eps0``); ``reduction``: ``Σ‖∇_y L̂‖² / Σ‖g‖²``; ``scale``: ``Σ(γ²/σ²)‖g‖² / Σ‖g‖²`` (the
        rescaling alone); ``share_mean`` / ``share_dir``: ``Σ⟨1,g⟩²/m / Σ‖g‖²`` and
        ``Σ⟨g,ŷ⟩²/m / Σ‖g‖²`` (the layer's share removed by each projection); ``backward_gap``:
        the worst channel's; ``degenerate``: their number.
        """
        ok = ~self.degenerate
        G = float(self.g_sq[ok].sum())
        nan = math.nan

        def share(x):
            return float(x[ok].sum()) / G if G > 0 else nan

        def worst(x):
            return float(np.max(x[ok])) if ok.any() else nan

        scale = self.gamma ** 2 / np.where(self.sigma2 > 0, self.sigma2, np.inf)
        return {
            "gap_eps0": worst(self.gap_eps0) if self.eps0 else nan,
            "gap_eps": worst(self.gap_eps),
            "reduction": share(self.grad_y_sq),
            "scale": share(scale * self.g_sq),
            "share_mean": share(self.proj_mean),
            "share_dir": share(self.proj_dir),
            "backward_gap": worst(self.backward_gap),
            "degenerate": int(self.degenerate.sum()),
        }


def _layer_stats(y: Tensor, eps: float):
    """Per-channel ``(m, μ, σ², s, ŷ)`` of a BN input ``y`` (``ŷ`` as ``(C, m)``)."""
    yc = _channels(y)
    m = yc.shape[1]
    mu = yc.mean(dim=1, keepdim=True)
    var = yc.var(dim=1, unbiased=False)
    s = torch.sqrt(var + eps)
    yhat = (yc - mu) / s[:, None]
    degenerate = var <= DEGENERATE_VAR * (yc * yc).mean(dim=1).clamp_min(1e-300)
    return m, var, s, yhat, degenerate


def _gamma(mod: nn.Module, C: int, like: Tensor) -> Tensor:
    w = getattr(mod, "weight", None)
    return w.detach().to(like.dtype) if w is not None else torch.ones(C, dtype=like.dtype, device=like.device)


def gradient_terms(model: nn.Module, batch: Any, loss_fn: Optional[Callable] = F.cross_entropy, *,
                   eps: Optional[float] = 0.0, dtype: torch.dtype = torch.float64,
                   layers: Optional[Sequence[str]] = None) -> dict[str, GradientTerms]:
    """Both sides of Thm 4.1 and the Obs. 4.3 terms at every train-mode BN layer, per channel.

    One forward and one backward pass of a ``dtype`` copy of ``model`` (:func:`analysis_copy`,
    with BN ``ε = eps``) on ``batch``; at each BN layer a forward pre-hook passes a fresh alias of
    the input ``y`` (so ``∂L/∂y`` is the gradient through the BN only, even where ``y`` also feeds
    a skip connection) and the output ``z`` is kept; ``∇_y L̂`` and ``g = ∂L/∂z`` come from
    ``torch.autograd.grad``, the right sides from the formulas in the module docstring::

        ‖∇_y L̂‖² = (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m)                 (ε = 0)
        ‖∇_y L̂‖² = (γ²/s²)(‖g‖² − ⟨1,g⟩²/m − (2−ρ)⟨g,ŷ⟩²/m)            (any ε)

    Args:
        model: the network (left untouched); its BN layers must be in train mode to be measured.
        batch: ``(x, y)`` or a dict batch.
        loss_fn: ``loss_fn(logits, labels)``; ``None``: the model's own ``output.loss``.
        eps: the BN ``ε`` of the measured copy (``0.0``: the theorems' setting); ``None``: the
            layers' own.
        dtype: the copy's floating-point type (float64 for identity checks).
        layers: only these BN layer names (default: all of :func:`bn_layers`).

    Returns:
        ``{layer name: GradientTerms}`` (empty for a net without train-mode BatchNorm).

    Example:
        >>> terms = gradient_terms(net, (x, y))
        >>> max(t.summary()["gap_eps0"] for t in terms.values())  # ~1e-16 in float64
    """
    net, eps0 = analysis_copy(model, eps=eps, dtype=dtype)
    chosen = [(n, m) for n, m in bn_layers(net) if layers is None or n in layers]
    if layers is not None:
        unknown = sorted(set(layers) - {n for n, _ in bn_layers(net)})
        if unknown:
            raise UserError(f"not train-mode BatchNorm layers of the model: {unknown}; "
                            f"accepted: {', '.join(n for n, _ in bn_layers(net)) or 'none'}")
    if not chosen:
        return {}
    b = _cast_batch(batch, dtype)
    ys: dict[str, Tensor] = {}
    zs: dict[str, Tensor] = {}
    handles = []
    for name, mod in chosen:
        def pre(m, inp, name=name):
            alias = inp[0].view_as(inp[0])
            ys[name] = alias
            return (alias,) + tuple(inp[1:])

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(lambda m, inp, out, name=name: zs.__setitem__(name, out)))
    for p in net.parameters():
        p.requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            x_leaf = _cast_requires_grad(b)
            loss = compute_loss(forward(net, x_leaf), x_leaf, loss_fn)
            names = [n for n, _ in chosen if n in ys and ys[n].requires_grad]
            grads = torch.autograd.grad(loss, [ys[n] for n in names] + [zs[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, GradientTerms] = {}
    k = len(names)
    mods = dict(chosen)
    for i, name in enumerate(names):
        mod = mods[name]
        y, gy, gz = ys[name].detach(), grads[i], grads[k + i]
        gy = torch.zeros_like(y) if gy is None else gy
        gz = torch.zeros_like(y) if gz is None else gz
        out[name] = _terms_from(name, mod, y, gy, gz, eps0[name])
    return out


def _cast_requires_grad(batch: Any) -> Any:
    """``batch`` with its floating-point tensors as fresh leaves that require grad (so a BN input
    is in the graph even without a trainable layer before it)."""
    if isinstance(batch, Tensor):
        return batch.detach().requires_grad_(True) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_requires_grad(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast_requires_grad(v) for v in batch)
    return batch


def _terms_from(name: str, mod: nn.Module, y: Tensor, gy: Tensor, gz: Tensor, eps0: bool) -> GradientTerms:
    y, gy, gz = y.detach().cpu(), gy.detach().cpu(), gz.detach().cpu()  # per-channel sums are small: numpy on the CPU
    eps = float(mod.eps)
    m, var, s, yhat, degenerate = _layer_stats(y, eps)
    C = var.shape[0]
    gamma = _gamma(mod, C, y).cpu()
    g = _channels(gz)
    v = _channels(gy)
    G = (g * g).sum(1)
    a = g.sum(1)
    bb = (g * yhat).sum(1)
    A1 = a * a / m
    A2 = bb * bb / m
    lhs = (v * v).sum(1)
    rho = var / (var + eps)
    safe_var = torch.where(var > 0, var, torch.ones_like(var))
    c0 = gamma ** 2 / safe_var
    c1 = gamma ** 2 / (s * s)
    gap0 = relative_gap(lhs.numpy(), [(c0 * G).numpy(), (-c0 * A1).numpy(), (-c0 * A2).numpy()])
    gap1 = relative_gap(lhs.numpy(), [(c1 * G).numpy(), (-c1 * A1).numpy(), (-c1 * (2 - rho) * A2).numpy()])
    formula = (gamma / (m * s))[:, None] * (m * g - a[:, None] - bb[:, None] * yhat)
    vn = torch.sqrt(lhs)
    bgap = torch.where(vn > 0, (formula - v).norm(dim=1) / torch.where(vn > 0, vn, torch.ones_like(vn)),
                       (formula - v).norm(dim=1))
    deg = degenerate.numpy()
    return GradientTerms(
        name=name, m=int(m), eps=eps, eps0=bool(eps0), gamma=gamma.numpy().copy(), sigma2=var.numpy().copy(),
        rho=rho.numpy().copy(), grad_y_sq=lhs.numpy().copy(), g_sq=G.numpy().copy(), proj_mean=A1.numpy().copy(),
        proj_dir=A2.numpy().copy(), rhs_eps0=(c0 * (G - A1 - A2)).numpy().copy(),
        rhs_eps=(c1 * (G - A1 - (2 - rho) * A2)).numpy().copy(), gap_eps0=gap0, gap_eps=gap1,
        backward_gap=bgap.numpy().copy(), degenerate=deg.copy())


@dataclass
class CurvatureTerms:
    """Thm 4.2 at one BN layer (layer forms, see the module docstring); floats.

    Attributes:
        name: the layer's module name.
        eps: the layer's ``ε`` in the measured copy; eps0: whether it is 0.
        lhs: ``vᵀ(∂²L̂/∂y²)v``, ``v = ∇_y L̂``, by an HVP of the BN-input closure.
        quad_v: ``(Dv)ᵀH(Dv)``, ``H = ∂²L/∂z²`` (an HVP of the BN-output closure), ``D = γ/σ``.
        quad_g: ``(Dg)ᵀH(Dg)``.
        correction: ``Σ_c γ_c⟨g_c,ŷ_c⟩‖v_c‖²/(mσ_c²)`` (subtracted in (a) and (b)).
        rhs_a: ``quad_v − correction`` (Thm 4.2(a) at ε = 0); gap_a: its relative gap (an
            identity check only where ``eps0``).
        rhs_a_eps: the exact form with the layer's ε, ``(Jv)ᵀH(Jv) + Σ_c γ_c[...]``;
            gap_a_eps: its relative gap.
        rhs_b: ``quad_g − correction`` (Thm 4.2(b)'s bound).
        condition_b: ``quad_v ≤ quad_g`` (b's assumption); holds_b: ``lhs ≤ rhs_b`` up to
            ``1e-9·(|lhs| + |quad_g| + |correction|)``.
        positive_share: the share of channels with ``⟨g_c,ŷ_c⟩ > 0`` (where the correction term
            lowers the curvature).
        curv_in: ``lhs/‖v‖²`` (curvature along the BN input gradient); curv_out: ``gᵀHg/‖g‖²``
            (along the BN output gradient, unscaled).
        n_hvp: Hessian-vector products used.
        channels: with ``per_channel=True``, the paper's single-channel forms per channel ``c``
            (direction ``v`` restricted to channel ``c``, scalars ``γ_c/σ_c``): arrays ``lhs``,
            ``rhs_a``, ``gap_a``, ``rhs_a_eps``, ``gap_a_eps``, ``rhs_b``, ``condition_b``,
            ``holds_b`` (NaN for a degenerate channel); else ``None``.
    """

    name: str
    eps: float
    eps0: bool
    lhs: float
    quad_v: float
    quad_g: float
    correction: float
    rhs_a: float
    gap_a: float
    rhs_a_eps: float
    gap_a_eps: float
    rhs_b: float
    condition_b: bool
    holds_b: bool
    positive_share: float
    curv_in: float
    curv_out: float
    n_hvp: int
    channels: Optional[dict] = None

    def summary(self) -> dict[str, float]:
        """The numbers as a flat dict (booleans as 0/1; ``gap_a`` NaN unless ``eps0``)."""
        return {
            "lhs": self.lhs, "rhs_a": self.rhs_a, "rhs_b": self.rhs_b, "quad_v": self.quad_v, "quad_g": self.quad_g,
            "correction": self.correction, "gap_a": self.gap_a if self.eps0 else math.nan, "gap_a_eps": self.gap_a_eps,
            "condition_b": float(self.condition_b), "holds_b": float(self.holds_b), "positive_share": self.positive_share,
            "curv_in": self.curv_in, "curv_out": self.curv_out,
        }


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


def curvature_terms(model: nn.Module, batch: Any, loss_fn: Optional[Callable] = F.cross_entropy, *,
                    eps: Optional[float] = 0.0, dtype: torch.dtype = torch.float64,
                    layers: Optional[Sequence[str]] = None, b_tol: float = 1e-9,
                    per_channel: bool = False) -> dict[str, CurvatureTerms]:
    """Both sides of Thm 4.2(a) and (b) at every train-mode BN layer, from activation-space HVPs.

    On a ``dtype`` copy with BN ``ε = eps`` (:func:`analysis_copy`), per layer:
    ``L̂(y)`` = :func:`~bnlab.curvature.layer_output_closure` on the BN input and ``L(z)`` on the
    BN output; ``v = ∇_y L̂`` and ``g = ∇_z L`` are their gradients; one HVP of ``L̂`` gives
    ``vᵀ(∂²L̂/∂y²)v`` and two (three with ``ε > 0``) of ``L`` give ``(Dv)ᵀH(Dv)``, ``(Dg)ᵀH(Dg)``
    (and ``(Jv)ᵀH(Jv)``), sharing one graph (:class:`~bnlab.curvature.HessianOperator`)::

        (a) vᵀ∇²_y L̂ v = (Dv)ᵀH(Dv) − Σ_c γ_c⟨g_c,ŷ_c⟩‖v_c‖²/(mσ_c²)                (ε = 0)
        (b) vᵀ∇²_y L̂ v ≤ (Dg)ᵀH(Dg) − Σ_c γ_c⟨g_c,ŷ_c⟩‖v_c‖²/(mσ_c²)  iff  (Dv)ᵀH(Dv) ≤ (Dg)ᵀH(Dg)

    (``D = diag(γ_c/σ_c)``; for one channel these are the paper's forms with ``γ²/σ²``). With
    ``per_channel`` each channel's own single-channel forms are measured too (the direction ``v``
    restricted to channel ``c``, ``H`` the full output Hessian): 3 (4 with ``ε > 0``) more HVPs
    per channel.

    Args:
        model: the network (left untouched).
        batch: ``(x, y)`` or a dict batch.
        loss_fn: ``loss_fn(logits, labels)``; ``None``: the model's own ``output.loss``.
        eps: the BN ``ε`` of the measured copy (``0.0``: the theorems' setting); ``None``: own.
        dtype: the copy's floating-point type.
        layers: only these BN layer names (default: all).
        b_tol: relative round-off allowance of ``holds_b``.
        per_channel: also measure the single-channel forms (``CurvatureTerms.channels``).

    Returns:
        ``{layer name: CurvatureTerms}``.

    Example:
        >>> terms = curvature_terms(net, (x, y))
        >>> max(t.gap_a for t in terms.values())  # ~1e-14 in float64
    """
    net, eps0 = analysis_copy(model, eps=eps, dtype=dtype)
    all_bn = bn_layers(net)
    if layers is not None:
        unknown = sorted(set(layers) - {n for n, _ in all_bn})
        if unknown:
            raise UserError(f"not train-mode BatchNorm layers of the model: {unknown}; "
                            f"accepted: {', '.join(n for n, _ in all_bn) or 'none'}")
    b = _cast_batch(batch, dtype)
    out: dict[str, CurvatureTerms] = {}
    with torch.random.fork_rng(devices=[]):
        for name, mod in all_bn:
            if layers is not None and name not in layers:
                continue
            out[name] = _curvature_layer(net, b, loss_fn, name, mod, eps0[name], b_tol, per_channel)
    return out


def _curvature_layer(net, batch, loss_fn, name, mod, eps0: bool, b_tol: float, per_channel: bool = False) -> CurvatureTerms:
    f_y, y = layer_output_closure(net, batch, loss_fn, mod, on="input")
    f_z, z = layer_output_closure(net, batch, loss_fn, mod, on="output")
    op_y = HessianOperator(f_y, {"y": y}, method="reverse")
    v = op_y.grad["y"]
    lhs = _dot(v, op_y({"y": v})["y"])
    op_z = HessianOperator(f_z, {"y": z}, method="reverse")
    g = op_z.grad["y"]
    eps = float(mod.eps)
    m, var, s, yhat, degenerate = _layer_stats(y, eps)
    C = var.shape[0]
    gamma = _gamma(mod, C, y)
    shape = (1, C) + (1,) * (y.dim() - 2)
    sigma = torch.sqrt(var)
    d = torch.where(degenerate, torch.zeros_like(sigma), gamma / torch.where(sigma > 0, sigma, torch.ones_like(sigma)))
    gc, vc = _channels(g), _channels(v)
    bb = (gc * yhat).sum(1)
    vsq = (vc * vc).sum(1)
    inv_var = torch.where(degenerate | (var <= 0), torch.zeros_like(var), 1 / torch.where(var > 0, var, torch.ones_like(var)))
    corr = float((gamma * bb * vsq * inv_var).sum() / m)
    dv = d.view(shape) * v
    dg = d.view(shape) * g
    quad_v = _dot(dv, op_z({"y": dv})["y"])
    quad_g = _dot(dg, op_z({"y": dg})["y"])
    n_hvp = 3
    # exact form with the layer's ε: Jv = (γ/s)(v − ŷ⟨ŷ,v⟩/m) per channel, plus the second derivative of ŷ
    yv = (yhat * vc).sum(1)
    a = s * yv / m
    u = (gamma / s)[:, None] * (vc - yhat * (yv / m)[:, None])
    u = u.view(C, y.shape[0], -1).transpose(0, 1).reshape(y.shape)
    if eps0:  # s = σ to the last bit and ⟨ŷ,v⟩ = 0: Jv = Dv, no product to add
        quad_u = quad_v
    else:
        quad_u = _dot(u, op_z({"y": u})["y"])
        n_hvp += 1
    gv = (gc * vc).sum(1)
    t1 = gamma * (-2 * a * gv / s ** 3)
    t2 = gamma * bb * (3 * a * a / s ** 4)
    t3 = gamma * bb * (-vsq / (m * s * s))
    rhs_a_eps = quad_u + float((t1 + t2 + t3).sum())
    gap_a_eps = float(relative_gap(lhs, [quad_u, float(t1.sum()), float(t2.sum()), float(t3.sum())]))
    gap_a = float(relative_gap(lhs, [quad_v, -corr]))
    rhs_b = quad_g - corr
    holds_b = lhs <= rhs_b + b_tol * (abs(lhs) + abs(quad_g) + abs(corr))
    ok = ~degenerate
    pos = float(((bb > 0) & ok).sum()) / max(1, int(ok.sum()))  # channels where the correction lowers the curvature
    gsq = _dot(g, g)
    curv_out = _dot(g, op_z({"y": g})["y"]) / gsq if gsq > 0 else math.nan
    n_hvp += 1
    vv = _dot(v, v)
    channels = None
    if per_channel:
        channels = {k: np.full(C, np.nan) for k in ("lhs", "rhs_a", "gap_a", "rhs_a_eps", "gap_a_eps", "rhs_b",
                                                   "condition_b", "holds_b")}
        for c in range(C):
            if bool(degenerate[c]):
                continue
            mask = torch.zeros(shape, dtype=y.dtype, device=y.device)
            mask[0, c] = 1
            V, G = v * mask, g * mask
            lhs_c = _dot(V, op_y({"y": V})["y"])
            dc2 = float(d[c]) ** 2
            qv, qg = dc2 * _dot(V, op_z({"y": V})["y"]), dc2 * _dot(G, op_z({"y": G})["y"])
            U = u * mask
            qu = qv if eps0 else _dot(U, op_z({"y": U})["y"])
            n_hvp += 3 if eps0 else 4
            corr_c = float(gamma[c] * bb[c] * vsq[c] * inv_var[c]) / m
            ts = [float(t1[c]), float(t2[c]), float(t3[c])]
            rb = qg - corr_c
            channels["lhs"][c] = lhs_c
            channels["rhs_a"][c] = qv - corr_c
            channels["gap_a"][c] = float(relative_gap(lhs_c, [qv, -corr_c]))
            channels["rhs_a_eps"][c] = qu + sum(ts)
            channels["gap_a_eps"][c] = float(relative_gap(lhs_c, [qu] + ts))
            channels["rhs_b"][c] = rb
            channels["condition_b"][c] = float(qv <= qg)
            channels["holds_b"][c] = float(lhs_c <= rb + b_tol * (abs(lhs_c) + abs(qg) + abs(corr_c)))
    return CurvatureTerms(
        name=name, eps=eps, eps0=bool(eps0), lhs=lhs, quad_v=quad_v, quad_g=quad_g, correction=corr,
        rhs_a=quad_v - corr, gap_a=gap_a, rhs_a_eps=rhs_a_eps, gap_a_eps=gap_a_eps, rhs_b=rhs_b,
        condition_b=bool(quad_v <= quad_g), holds_b=bool(holds_b), positive_share=pos,
        curv_in=lhs / vv if vv > 0 else math.nan, curv_out=curv_out, n_hvp=n_hvp, channels=channels)


# ----------------------------------------------------------------------------- Lemma 4.5


def _flat(w) -> Tensor:
    if isinstance(w, dict):
        return torch.cat([t.detach().reshape(-1).double() for t in w.values()])
    return torch.as_tensor(w).detach().reshape(-1).double()


def lemma45_sides(w0, wstar) -> dict[str, float]:
    """Lemma 4.5's right side and the distance to the line through ``W*``, which it equals.

    ``bound = ‖W₀ − W*‖² − (‖W*‖² − ⟨W*,W₀⟩)²/‖W*‖²`` and ``line = min_c ‖W₀ − cW*‖² =
    ‖W₀‖² − ⟨W₀,W*⟩²/‖W*‖²`` at ``c* = ⟨W₀,W*⟩/‖W*‖²`` (on the ray when ``⟨W₀,W*⟩ > 0``, the
    lemma's premise). ``residual = |bound − line| / (‖W₀ − W*‖² + ‖W₀‖²)``.

    Args:
        w0, wstar: tensors (or dicts of tensors, flattened in key order), ``W* ≠ 0``.

    Returns:
        ``{"bound", "line", "c", "premise" (⟨W₀,W*⟩ > 0 as 0/1), "residual", "dist_sq" (‖W₀ − W*‖²)}``.

    Example:
        >>> d = lemma45_sides(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]))
        >>> d["bound"], d["line"], d["c"]
        (1.0, 1.0, 0.5)
    """
    a, b = _flat(w0), _flat(wstar)
    nb = float(b @ b)
    if nb == 0:
        raise UserError("lemma45_sides needs W* ≠ 0")
    ab = float(a @ b)
    dist_sq = float(((a - b) ** 2).sum())
    bound = dist_sq - (nb - ab) ** 2 / nb
    line = float(a @ a) - ab * ab / nb
    scale = dist_sq + float(a @ a)
    return {"bound": bound, "line": line, "c": ab / nb, "premise": float(ab > 0),
            "residual": abs(bound - line) / scale if scale > 0 else 0.0, "dist_sq": dist_sq}


def ray_distance(w0, w, *, per_row: bool = False) -> float:
    """``min_{c ≥ 0} ‖W₀ − cW‖``: the distance from ``W₀`` to the ray through ``W``.

    With ``per_row`` each slice along dim 0 (an output channel) gets its own ``c_i ≥ 0``: the
    distance to the set ``{diag(c)W}`` of a weight that BN makes scale-invariant per channel.
    ``c = max(0, ⟨W₀,W⟩/‖W‖²)`` (``0`` for ``W = 0``).

    Example:
        >>> ray_distance(torch.tensor([1.0, 1.0]), torch.tensor([5.0, 0.0]))
        1.0
    """
    a, b = torch.as_tensor(w0).detach().double(), torch.as_tensor(w).detach().double()
    if a.shape != b.shape:
        raise UserError(f"ray_distance: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    if per_row and a.dim() >= 1:
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    else:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    nb = (b * b).sum(1)
    c = torch.where(nb > 0, (a * b).sum(1) / torch.where(nb > 0, nb, torch.ones_like(nb)), torch.zeros_like(nb)).clamp_min(0)
    return float(((a - c[:, None] * b) ** 2).sum().sqrt())


def angle(a, b) -> float:
    """The angle (radians) between two tensors (flattened), ``atan2(‖a_⊥‖, ⟨a,b⟩/‖b‖)``; NaN if one is 0.

    Example:
        >>> round(angle(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])), 6)
        0.785398
    """
    x, y = _flat(a), _flat(b)
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0 or ny == 0:
        return math.nan
    along = float(x @ y) / ny
    perp = float((x - (x @ y) / (ny * ny) * y).norm())
    return math.atan2(perp, along)


def solution_distances(w0: dict[str, Tensor], w: dict[str, Tensor], per_channel: Sequence[str] = ()) -> dict[str, float]:
    """How far a run travelled from ``W₀`` to its solution ``W``, over the tensors of ``w0``.

    * ``euclid``: ``‖W − W₀‖ / ‖W₀‖``;
    * ``ray``: ``sqrt(Σ_t d_t²) / ‖W₀‖`` with ``d_t`` = :func:`ray_distance` per output channel
      for the tensors named in ``per_channel`` (a BN net's weights before a BN: every
      ``diag(c)W`` with ``c > 0`` is as good a solution) and ``‖W_t − W₀,t‖`` for the others:
      the distance to the nearest point of the set of solutions that scale invariance gives;
    * ``angle``: the mean over tensors of the angle (degrees) between ``W₀,t`` and ``W_t``; for a
      tensor in ``per_channel``, the mean of its rows' angles (scale-free per channel).

    Example:
        >>> w0 = {"a": torch.tensor([[1.0, 0.0]])}; w = {"a": torch.tensor([[3.0, 0.0]])}
        >>> solution_distances(w0, w, per_channel=["a"])["ray"]
        0.0
    """
    n0 = math.sqrt(sum(float((t.double() ** 2).sum()) for t in w0.values()))
    e2 = r2 = 0.0
    angles = []
    for k, t0 in w0.items():
        t = w[k]
        d = float(((t.double() - t0.double()) ** 2).sum())
        e2 += d
        r2 += ray_distance(t0, t, per_row=True) ** 2 if k in per_channel else d
        if k in per_channel and t0.dim() >= 1:
            rows = [angle(a, b) for a, b in zip(t0.reshape(t0.shape[0], -1), t.reshape(t.shape[0], -1))]
            angles.append(math.degrees(float(np.nanmean(rows))))
        else:
            angles.append(math.degrees(angle(t0, t)))
    return {"euclid": math.sqrt(e2) / n0 if n0 > 0 else math.nan, "ray": math.sqrt(r2) / n0 if n0 > 0 else math.nan,
            "angle": float(np.nanmean(angles)) if angles else math.nan}
