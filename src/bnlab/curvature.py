"""Second-order geometry of a loss: Hessian-vector products, quadratic form, top eigenvalues, trace.

Every math function takes a **loss closure of a parameter dict** ``f(params) -> scalar`` (the
``torch.func`` convention), so the same code measures a model, a pure function such as the
quadratic ``½ wᵀAw`` of the tests, or runs under ``torch.func.vmap``. Vectors in parameter space
are dicts with the keys of ``params``. The thin ``model_*`` wrappers build the closure of a
``(model, batch, loss_fn)`` triple with :func:`model_loss_closure` and leave the model untouched.

Quantities (Santurkar et al. 2018, section "second order"; REFERENCES.md section 2), with
``H = ∇²f(w)``:

* :func:`hvp`: ``H v``, exact (no finite differences).
* :func:`quadratic_form`: ``vᵀ H v / ‖v‖²`` (``v = g = ∇f(w)`` by default: the curvature along
  the gradient, the paper's second-order smoothness measure).
* :func:`top_eigenvalues`: the ``k`` largest eigenvalues of ``H`` by Lanczos with full
  reorthogonalization; :func:`power_iteration`: the dominant one by power iteration.
* :func:`hessian_trace`: Hutchinson's estimate ``tr H = E[zᵀ H z]``, ``z`` Rademacher.

How an HVP is computed (``method``):

* ``"reverse"`` (reverse-over-reverse, "double backward"): build the graph of ``g = ∇f(w)`` with
  ``create_graph=True`` and back-propagate ``⟨g, v⟩``. It is the default outside ``torch.func``
  transforms because it was the faster on CPU for the small BatchNorm CNN of
  benchmarks/landscape.py (about 25 % faster than forward-over-reverse, which pays for
  ``torch.func``'s wrappers and BatchNorm's decomposed backward), and the cheapest to repeat:
  several HVPs at one point reuse one forward/backward graph (:class:`HessianOperator`).
* ``"forward"`` (forward-over-reverse): ``torch.func.jvp(torch.func.grad(f), (w,), (v,))``. It
  composes with ``vmap``/``grad``; ``"auto"`` picks it whenever a ``torch.func`` transform is
  active (``torch.autograd.grad`` cannot run inside one).

Cost (benchmarks/landscape.py, BN CNN on 8x8 maps, batch 128, one CPU thread): an exact HVP of
a conv layer needs 3x the convolution FLOPs of its gradient (the tangent of each of the forward,
input-gradient and weight-gradient convolutions doubles them; 2x for a first layer, whose input
is data): 2.97x the gradient's FLOPs for the whole CNN, by either method. In time a standalone
double-backward HVP costs about 3.2-3.3x a gradient (3.5-4x before BatchNorm's second derivative
was given the closed form of :mod:`bnlab._batchnorm_second_order`, which PyTorch differentiates
with ~30 elementwise passes per layer) and each further HVP at the same point about 2.0-2.1x (FLOP
ratio 1.97).

Reference:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, NamedTuple, Optional

import torch
from torch import Tensor, nn

from bnlab._batchnorm_second_order import second_order_batch_norm
from bnlab.errors import UserError, check_positive

__all__ = [
    "LossClosure",
    "HessianOperator",
    "EigenInfo",
    "TraceEstimate",
    "loss_and_grad",
    "check_keys",
    "hvp",
    "quadratic_form",
    "top_eigenvalues",
    "power_iteration",
    "hessian_trace",
    "model_loss_closure",
    "model_state_preserved",
    "model_hvp",
    "model_quadratic_form",
    "model_top_eigenvalues",
    "model_hessian_trace",
]

LossClosure = Callable[[dict[str, Tensor]], Tensor]
"""``f(params: dict[str, Tensor]) -> scalar Tensor``."""

HvpMethod = Literal["auto", "reverse", "forward"]
_METHODS = ("auto", "reverse", "forward")


# --------------------------------------------------------------------------------------------
# small helpers on parameter dicts


def _transforms_active() -> bool:
    # True inside torch.func.vmap/grad/jvp...: torch.autograd.grad cannot be used there.
    # (Private but stable: torch.autograd.Function relies on it.)
    return bool(torch._C._are_functorch_transforms_active())


def _resolve_method(method: str) -> str:
    if method not in _METHODS:
        raise UserError(f"unknown HVP method {method!r}; accepted: {', '.join(_METHODS)}")
    if method == "auto":
        return "forward" if _transforms_active() else "reverse"
    return method


def _flatten(d: dict[str, Tensor], keys: list[str]) -> Tensor:
    return torch.cat([d[k].reshape(-1) for k in keys])


def _unflatten(vec: Tensor, like: dict[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[i : i + n].view_as(like[k])
        i += n
    return out


def _dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def check_keys(name: str, d: dict[str, Tensor], params: dict[str, Tensor]) -> None:
    """Check that a vector in parameter space (a dict) has exactly the keys of ``params``.

    Args:
        name: the argument's name, for the message.
        d: the dict to check (e.g. a direction ``v`` or a gradient).
        params: the parameter dict it must match.

    Raises:
        UserError: keys missing or unexpected (both listed).
    """
    if set(d) != set(params):
        missing = sorted(set(params) - set(d))
        extra = sorted(set(d) - set(params))
        raise UserError(
            f"{name} must have the keys of params; missing {missing}, unexpected {extra}"
        )


def loss_and_grad(f: LossClosure, params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and its gradient at ``params``: ``(f(w), ∇f(w))``.

    Uses ``torch.autograd.grad`` (the cheapest on CPU) unless a ``torch.func`` transform is
    active, then ``torch.func.grad_and_value``. Parameters ``f`` does not use get a zero gradient.
    A non-finite loss gives non-finite gradients, never an error.

    Args:
        f: loss closure ``f(params) -> scalar``.
        params: the point ``w``; not modified.

    Returns:
        ``(loss, grad)``: the detached scalar loss and a dict of detached gradients.

    Example:
        >>> loss, g = loss_and_grad(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(3)})
        >>> g["w"]
        tensor([2., 2., 2.])
    """
    if _transforms_active():
        g, loss = torch.func.grad_and_value(f)(params)
        return loss, g
    keys = list(params)
    leaves = {k: params[k].detach().requires_grad_(True) for k in keys}
    with torch.enable_grad():
        loss = f(leaves)
    if not loss.requires_grad:  # f does not depend on params
        return loss.detach(), {k: torch.zeros_like(leaves[k]) for k in keys}
    grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
    return loss.detach(), {
        k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(keys, grads)
    }


# --------------------------------------------------------------------------------------------
# Hessian-vector products


class HessianOperator:
    """The linear map ``v ↦ H v`` with ``H = ∇²f(w)`` at a fixed point ``w``.

    With ``method="reverse"`` the forward pass and the first backward pass (``create_graph=True``)
    run once, at construction; each product is then one backward pass through the gradient's
    graph (``retain_graph=True``), so a Lanczos run of ``m`` HVPs pays for one forward/backward
    plus ``m`` double-backward passes; train-mode ``F.batch_norm`` calls in ``f`` (every
    ``torch.nn`` BatchNorm layer) get the closed-form second derivative of
    :mod:`bnlab._batchnorm_second_order` (same values and first derivatives). With ``method="forward"`` every product is a
    ``torch.func.jvp`` of ``torch.func.grad_and_value`` (works under ``vmap``); the loss and
    gradient come with the first product.

    Args:
        f: loss closure ``f(params) -> scalar``.
        params: the point ``w``; not modified.
        method: ``"reverse"`` (double backward), ``"forward"`` (forward-over-reverse) or
            ``"auto"`` (reverse unless a ``torch.func`` transform is active).

    Attributes:
        n_hvp: number of products computed so far.
        numel: dimension of the parameter space.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = HessianOperator(lambda p: 0.5 * p["w"] @ A @ p["w"], {"w": torch.ones(2)})
        >>> op({"w": torch.tensor([1.0, 0.0])})["w"]
        tensor([2., 1.])
    """

    def __init__(self, f: LossClosure, params: dict[str, Tensor], *, method: HvpMethod = "auto"):
        self.f = f
        self.params = params
        self.keys = list(params)
        self.method = _resolve_method(method)
        self.numel = sum(p.numel() for p in params.values())
        self.n_hvp = 0
        self._loss: Optional[Tensor] = None
        self._grad: Optional[dict[str, Tensor]] = None
        if self.method == "reverse":
            if _transforms_active():
                raise UserError(
                    "HVP method 'reverse' (torch.autograd double backward) cannot run inside a "
                    "torch.func transform; use method='forward' or 'auto'"
                )
            self._leaves = [params[k].detach().requires_grad_(True) for k in self.keys]
            with torch.enable_grad(), second_order_batch_norm():
                loss = f(dict(zip(self.keys, self._leaves)))
                if loss.requires_grad:
                    grads = torch.autograd.grad(
                        loss, self._leaves, create_graph=True, allow_unused=True
                    )
                else:
                    grads = [None] * len(self.keys)
            self._loss = loss.detach()
            self._grad = {
                k: (g.detach() if g is not None else torch.zeros_like(p))
                for k, g, p in zip(self.keys, grads, self._leaves)
            }
            # Only gradients that depend on the parameters have a non-zero derivative.
            self._live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    @property
    def loss(self) -> Tensor:
        """``f(w)`` (detached)."""
        if self._loss is None:
            self._forward_primal()
        return self._loss

    @property
    def grad(self) -> dict[str, Tensor]:
        """``∇f(w)`` (detached)."""
        if self._grad is None:
            self._forward_primal()
        return self._grad

    def _forward_primal(self) -> None:
        g, loss = torch.func.grad_and_value(self.f)(self.params)
        self._loss, self._grad = loss, g

    def __call__(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``H v`` as a dict with the keys of ``params``."""
        self.n_hvp += 1
        if self.method == "forward":
            v = {k: v[k] for k in self.keys}  # same pytree structure as params
            (g, loss), (hv, _) = torch.func.jvp(
                torch.func.grad_and_value(self.f), (self.params,), (v,)
            )
            if self._loss is None:
                self._loss, self._grad = loss, g
            return hv
        out = {k: torch.zeros_like(self.params[k]) for k in self.keys}
        if not self._live:
            return out
        idx = [i for i, _ in self._live]
        hv = torch.autograd.grad(
            [g for _, g in self._live],
            self._leaves,
            grad_outputs=[v[self.keys[i]] for i in idx],
            retain_graph=True,
            allow_unused=True,
        )
        for k, h in zip(self.keys, hv):
            if h is not None:
                out[k] = h.detach()
        return out

    def matvec(self, vec: Tensor) -> Tensor:
        """``H v`` on the flattened parameter vector (keys in the order of ``params``)."""
        hv = self(_unflatten(vec, self.params, self.keys))
        return _flatten(hv, self.keys)

    def flat_params(self) -> Tensor:
        """The point ``w`` as one flat vector."""
        return _flatten(self.params, self.keys)


def hvp(
    f: LossClosure,
    params: dict[str, Tensor],
    v: dict[str, Tensor],
    *,
    method: HvpMethod = "auto",
) -> dict[str, Tensor]:
    """Exact Hessian-vector product ``H v``, ``H = ∇²f(w)``.

    ``H v = ∇_w ⟨∇_w f(w), v⟩`` (Pearlmutter's trick): one forward pass, one backward pass with a
    graph, and one more backward pass, about 3.3 gradient evaluations on a small BatchNorm CNN
    (see the module docstring for the two methods and why double backward is the default on
    CPU). For several products at one point use :class:`HessianOperator`.

    Args:
        f: loss closure ``f(params) -> scalar``.
        params: the point ``w``; not modified.
        v: the vector, a dict with the keys (and shapes) of ``params``.
        method: ``"auto"``, ``"reverse"`` (double backward) or ``"forward"``
            (``torch.func.jvp`` over ``torch.func.grad``; composable with ``vmap``).

    Returns:
        ``H v`` as a dict with the keys of ``params``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hvp(lambda p: 0.5 * p["w"] @ A @ p["w"], {"w": torch.zeros(2)}, {"w": torch.ones(2)})
        {'w': tensor([3., 4.])}

    Reference:
        Pearlmutter, "Fast exact multiplication by the Hessian", 1994.
    """
    check_keys("v", v, params)
    return HessianOperator(f, params, method=method)(v)


def quadratic_form(
    f: LossClosure,
    params: dict[str, Tensor],
    v: Optional[dict[str, Tensor]] = None,
    *,
    method: HvpMethod = "auto",
) -> Tensor:
    """Curvature along a direction: ``vᵀ H v / ‖v‖²``.

    With ``v = None`` the direction is the gradient ``g = ∇f(w)``, giving ``gᵀ H g / ‖g‖²``: the
    second-order term of the loss change along a gradient step (``L(w - ηg) ≈ L - η‖g‖² +
    ½ η² gᵀHg``), Santurkar et al.'s second-order measure of smoothness. The gradient then
    comes from the same graph as the HVP (no extra pass). ``‖v‖ = 0`` gives ``nan``.

    Args:
        f: loss closure ``f(params) -> scalar``.
        params: the point ``w``; not modified.
        v: the direction (dict with the keys of ``params``), or ``None`` for ``∇f(w)``.
        method: HVP method, see :func:`hvp`.

    Returns:
        0-d tensor ``vᵀHv / ‖v‖²``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 4.0]))
        >>> quadratic_form(lambda p: 0.5 * p["w"] @ A @ p["w"], {"w": torch.zeros(2)},
        ...                {"w": torch.tensor([0.0, 2.0])})
        tensor(4.)

    Reference:
        Santurkar et al., "How Does Batch Normalization Help Optimization?", NeurIPS 2018, sec. 3.
    """
    op = HessianOperator(f, params, method=method)
    if v is None:
        v = op.grad  # "reverse": from the graph already built; "forward": one more gradient
    else:
        check_keys("v", v, params)
    hv = op(v)
    return _dot(v, hv) / _dot(v, v)


# --------------------------------------------------------------------------------------------
# eigenvalues


@dataclass
class EigenInfo:
    """Diagnostics of an eigenvalue solver.

    Attributes:
        n_hvp: Hessian-vector products used (the cost; one per iteration).
        n_iter: iterations run.
        converged: whether the stopping rule was met before ``max_iter``.
        rel_change: the last relative change of the estimates (the stopping statistic).
        history: the estimates after each iteration (a list of ``k`` floats per iteration),
            to study convergence against a reference value.
        residual_norms: Lanczos only: ``β_m |s_mi|`` per returned eigenvalue, the norm of
            ``H y_i - θ_i y_i`` for the Ritz pair ``(θ_i, y_i)`` (some eigenvalue lies within it).
        eigenvectors: the (Ritz) eigenvectors as parameter dicts when asked for, else ``None``.
    """

    n_hvp: int
    n_iter: int
    converged: bool
    rel_change: float
    history: list[list[float]] = field(default_factory=list)
    residual_norms: list[float] = field(default_factory=list)
    eigenvectors: Optional[list[dict[str, Tensor]]] = None


def _random_unit(n: int, like: Tensor, gen: torch.Generator) -> Tensor:
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=like.dtype, device=like.device)
    return q / q.norm()


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted Ritz values, best first."""
    key = theta if which == "largest" else theta.abs()
    return torch.argsort(key, descending=True)[:k]


def top_eigenvalues(
    f: LossClosure,
    params: dict[str, Tensor],
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    which: Literal["largest", "magnitude"] = "largest",
    method: HvpMethod = "auto",
    return_eigenvectors: bool = False,
) -> tuple[Tensor, EigenInfo]:
    """The ``k`` top eigenvalues of the Hessian ``H = ∇²f(w)`` by Lanczos over HVPs.

    Lanczos builds an orthonormal basis ``Q_m = [q_1..q_m]`` of the Krylov space
    ``span{q_1, Hq_1, .., H^{m-1}q_1}`` (``q_1`` Gaussian, from ``seed``) and the tridiagonal
    ``T_m = Q_mᵀ H Q_m``; the eigenvalues of ``T_m`` (Ritz values) approach the extreme
    eigenvalues of ``H``. Every new vector is reorthogonalized against all previous ones
    (classical Gram-Schmidt applied twice), so no spurious copies appear in floating point. One
    HVP per iteration. Stops when the relative change of each of the ``k`` wanted Ritz values
    between two iterations is below ``tol``: ``max_i |θ_i^(m) - θ_i^(m-1)| / |θ_i^(m)| < tol``,
    or after ``max_iter`` iterations, or when the Krylov space is the whole space. If Lanczos
    breaks down (an invariant subspace, e.g. a repeated eigenvalue) it continues from a fresh
    random vector orthogonal to ``Q``, so multiple eigenvalues are found too. Memory: ``m``
    vectors of the parameter size.

    The stopping rule measures progress, not error: when convergence is slow the error at the
    stop can exceed ``tol`` (benchmarks/landscape.py measures the actual error).
    ``info.residual_norms`` bounds it: some eigenvalue of ``H`` lies within ``β_m |s_mi|`` of
    ``θ_i``.

    Args:
        f: loss closure ``f(params) -> scalar``.
        params: the point ``w``; not modified.
        k: number of eigenvalues.
        tol: relative-change tolerance of the stopping rule.
        max_iter: at most this many iterations (= HVPs).
        seed: seed of the start vector (a private ``torch.Generator``; the global RNG is untouched).
        which: ``"largest"`` (algebraic, the default: the sharpness) or ``"magnitude"``.
        method: HVP method, see :func:`hvp`.
        return_eigenvectors: also return the Ritz vectors in ``info.eigenvectors``.

    Returns:
        ``(eigenvalues, info)``: a float64 tensor of ``k`` values, largest first (fewer when
        ``max_iter`` or the dimension is below ``k``), and an :class:`EigenInfo` with
        ``info.n_hvp``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
        >>> lam, info = top_eigenvalues(lambda p: 0.5 * p["w"] @ A @ p["w"],
        ...                             {"w": torch.zeros(3, dtype=torch.float64)}, k=2)
        >>> lam  # exact here: the Krylov space is the whole 3-d space after 3 HVPs
        tensor([5.0000, 2.0000], dtype=torch.float64)

    Reference:
        Lanczos 1950; Golub & Van Loan, *Matrix Computations*, sec. 10.1 (full
        reorthogonalization); Ghorbani, Krishnan, Xiao, "An Investigation into Neural Net
        Optimization via Hessian Eigenvalue Density", ICML 2019.
    """
    check_positive("k", k)
    check_positive("tol", tol)
    check_positive("max_iter", max_iter)
    if which not in ("largest", "magnitude"):
        raise UserError(f"unknown which={which!r}; accepted: largest, magnitude")
    op = HessianOperator(f, params, method=method)
    n = op.numel
    like = op.flat_params()
    gen = torch.Generator().manual_seed(seed)
    m_max = min(max_iter, n)

    Q = torch.empty(m_max, n, dtype=like.dtype, device=like.device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    history: list[list[float]] = []
    prev: Optional[Tensor] = None
    rel_change = math.inf
    converged = False
    q = _random_unit(n, like, gen)
    theta = s = None
    m = 0
    for j in range(m_max):
        Q[j] = q
        w = op.matvec(q)
        # Full reorthogonalization (CGS2); h[j] is alpha_j, h[j-1] is beta_{j-1}.
        h = Q[: j + 1] @ w
        w = w - Q[: j + 1].T @ h
        h2 = Q[: j + 1] @ w
        w = w - Q[: j + 1].T @ h2
        alphas.append(float(h[j] + h2[j]))
        beta = float(w.norm())
        m = j + 1
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(T)
        sel = _select(theta, k, which)
        cur = theta[sel]
        history.append(cur.tolist())
        if prev is not None and len(prev) == len(cur):
            rel_change = float(((cur - prev).abs() / cur.abs().clamp_min(1e-300)).max())
            if rel_change < tol:
                converged = True
                break
        prev = cur
        if m == n:
            converged = True  # the Krylov space is the whole space: Ritz values are exact
            rel_change = 0.0
            break
        if j + 1 == m_max:
            break
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if beta <= 1e-10 * max(scale, 1e-300) or not math.isfinite(beta):
            # Invariant subspace: restart from a random vector orthogonal to Q (beta = 0).
            r = _random_unit(n, like, gen)
            for _ in range(2):
                r = r - Q[: j + 1].T @ (Q[: j + 1] @ r)
            q = r / r.norm()
            betas.append(0.0)
        else:
            q = w / beta
            betas.append(beta)

    sel = _select(theta, k, which)
    eigenvalues = theta[sel].clone()
    last_beta = beta if m < n else 0.0
    residuals = (last_beta * s[-1, sel].abs()).tolist()
    vectors = None
    if return_eigenvectors:
        Y = s[:, sel].T.to(like.dtype) @ Q[:m]
        vectors = [_unflatten(y.clone(), params, op.keys) for y in Y]
    info = EigenInfo(
        n_hvp=op.n_hvp,
        n_iter=m,
        converged=converged,
        rel_change=rel_change,
        history=history,
        residual_norms=residuals,
        eigenvectors=vectors,
    )
    return eigenvalues, info


def power_iteration(
    f: LossClosure,
    params: dict[str, Tensor],
    *,
    tol: float = 1e-3,
    max_iter: int = 1000,
    seed: int = 0,
    method: HvpMethod = "auto",
    return_eigenvector: bool = False,
) -> tuple[Tensor, EigenInfo]:
    """The dominant Hessian eigenvalue by power iteration over HVPs.

    ``v ← H v / ‖H v‖`` from a Gaussian ``v`` (from ``seed``); the estimate is the Rayleigh
    quotient ``θ = vᵀ H v`` (``‖v‖ = 1``), one HVP per iteration. Stops when
    ``|θ_t - θ_{t-1}| < tol · |θ_t|`` or after ``max_iter`` iterations. It converges to the
    eigenvalue of largest *magnitude* (signed), at the rate ``(|λ_2| / |λ_1|)^t`` that Lanczos
    beats; kept for comparison (benchmarks/landscape.py) and because it is the textbook method.

    Args:
        f: loss closure ``f(params) -> scalar``.
        params: the point ``w``; not modified.
        tol: relative-change tolerance.
        max_iter: at most this many iterations (= HVPs).
        seed: seed of the start vector (private generator).
        method: HVP method, see :func:`hvp`.
        return_eigenvector: also return ``v`` in ``info.eigenvectors``.

    Returns:
        ``(eigenvalue, info)``: a 0-d float64 tensor and an :class:`EigenInfo`.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
        >>> lam, info = power_iteration(lambda p: 0.5 * p["w"] @ A @ p["w"],
        ...                             {"w": torch.zeros(3, dtype=torch.float64)}, tol=1e-10)
        >>> round(lam.item(), 6)
        5.0

    Reference:
        Golub & Van Loan, *Matrix Computations*, sec. 7.3.1; Yao et al., "PyHessian", 2020.
    """
    check_positive("tol", tol)
    check_positive("max_iter", max_iter)
    op = HessianOperator(f, params, method=method)
    like = op.flat_params()
    gen = torch.Generator().manual_seed(seed)
    v = _random_unit(op.numel, like, gen)
    history: list[list[float]] = []
    theta = prev = math.nan
    rel_change = math.inf
    converged = False
    for _ in range(max_iter):
        w = op.matvec(v)
        theta = float(torch.dot(v.double(), w.double()))
        history.append([theta])
        if math.isfinite(prev):
            rel_change = abs(theta - prev) / max(abs(theta), 1e-300)
            if rel_change < tol:
                converged = True
                break
        prev = theta
        norm = float(w.norm())
        if norm == 0.0 or not math.isfinite(norm):
            converged = norm == 0.0  # v is in the null space: H v = 0 exactly
            break
        v = w / norm
    info = EigenInfo(
        n_hvp=op.n_hvp,
        n_iter=len(history),
        converged=converged,
        rel_change=rel_change,
        history=history,
        eigenvectors=[_unflatten(v.clone(), params, op.keys)] if return_eigenvector else None,
    )
    return torch.tensor(theta, dtype=torch.float64), info


# --------------------------------------------------------------------------------------------
# trace


class TraceEstimate(NamedTuple):
    """Hutchinson's trace estimate. Unpacks as ``(estimate, stderr, n_samples)``.

    Attributes:
        estimate: the mean of ``zᵀHz`` over the samples.
        stderr: its standard error, ``std(samples, ddof=1) / √n`` (``nan`` for ``n = 1``).
        n_samples: the number of samples (= HVPs).
    """

    estimate: float
    stderr: float
    n_samples: int


def hessian_trace(
    f: LossClosure,
    params: dict[str, Tensor],
    n_samples: int = 100,
    *,
    seed: int = 0,
    method: HvpMethod = "auto",
) -> TraceEstimate:
    """Hutchinson's estimate of the Hessian trace, ``tr H = E[zᵀ H z]``.

    ``z`` has i.i.d. Rademacher (±1) entries, so ``E[zzᵀ] = I``; the estimator is unbiased with
    variance ``2 Σ_{i≠j} H_ij²`` per sample (the diagonal contributes no noise). One HVP per
    sample; the samples share one forward/backward graph (see :class:`HessianOperator`).

    Args:
        f: loss closure ``f(params) -> scalar``.
        params: the point ``w``; not modified.
        n_samples: number of Rademacher vectors.
        seed: seed of the vectors (private generator; the global RNG is untouched).
        method: HVP method, see :func:`hvp`.

    Returns:
        A :class:`TraceEstimate` ``(estimate, stderr, n_samples)``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
        >>> est, se, n = hessian_trace(lambda p: 0.5 * p["w"] @ A @ p["w"],
        ...                            {"w": torch.zeros(3, dtype=torch.float64)}, 10)
        >>> est  # exact for a diagonal H
        8.0

    Reference:
        Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
        smoothing splines", 1989; Avron & Toledo, J. ACM 2011.
    """
    check_positive("n_samples", n_samples)
    op = HessianOperator(f, params, method=method)
    like = op.flat_params()
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_samples):
        z = torch.randint(0, 2, (op.numel,), generator=gen).to(like.dtype).mul_(2).sub_(1)
        samples.append(float(torch.dot(z.double(), op.matvec(z.to(like.device)).double())))
    t = torch.tensor(samples, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(n_samples)) if n_samples > 1 else math.nan
    return TraceEstimate(float(t.mean()), se, n_samples)


# --------------------------------------------------------------------------------------------
# models


_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def model_loss_closure(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> tuple[LossClosure, dict[str, Tensor]]:
    """The loss of ``model`` on one batch as a closure of its trainable parameters.

    ``f(params) = loss_fn(model(x; params), y)`` evaluated with
    ``torch.func.functional_call(model, (params, constants), (x,))``. The model is never
    changed by calling ``f``:

    * ``params`` are detached copies of the trainable parameters (``requires_grad=True``);
      frozen parameters are constants.
    * Normalization layers (every ``torch.nn`` BatchNorm/InstanceNorm, i.e. subclasses of
      ``_NormBase``) that are in **train mode** get ``None`` for ``running_mean``,
      ``running_var`` and ``num_batches_tracked``: they normalize with the probe batch's
      statistics, as in training, and update no running statistic. This is also what makes
      ``f`` work under ``torch.func.vmap`` (an in-place update of an unbatched buffer with
      batched statistics is an error there; passing copies of the buffers does *not* fix
      that). In eval mode they use (copies of) their running statistics.
    * Every other buffer is passed as a copy, so a custom layer that updates a buffer in
      place updates the copy. (Such a layer cannot run under ``vmap``;
      :func:`bnlab.landscape.probe_along_gradient` then falls back to a loop.)

    The training mode is read at each call (it is never set). Stochastic layers (dropout in
    train mode) make ``f`` stochastic and consume the global RNG; put the model in eval mode or
    use the ``model_*`` wrappers, which restore the RNG state.

    Args:
        model: any ``nn.Module``.
        batch: ``(x, y)``; ``model(x)`` gives the logits.
        loss_fn: ``loss_fn(logits, y) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.

    Returns:
        ``(f, params)``: the closure and the current trainable parameters (detached copies).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> f, params = model_loss_closure(model, batch, nn.functional.cross_entropy)
        >>> loss = f(params)  # the model's BN running statistics are unchanged
    """
    x, y = batch
    params: dict[str, Tensor] = {}
    frozen: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[name] = p.detach().clone()
        else:
            frozen[name] = p.detach()
    norm_stats: list[tuple[str, nn.Module]] = []
    buffers: dict[str, Tensor] = {}
    norm_types = (nn.modules.batchnorm._NormBase,)
    for mod_name, mod in model.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            full = f"{mod_name}.{b_name}" if mod_name else b_name
            if isinstance(mod, norm_types) and b_name in _NORM_STATS:
                norm_stats.append((full, mod))
            buffers[full] = b.detach().clone()

    def f(p: dict[str, Tensor]) -> Tensor:
        consts = dict(frozen)
        consts.update(buffers)
        for full, mod in norm_stats:
            if mod.training:
                consts[full] = None  # batch statistics, no running-stat update
        out = torch.func.functional_call(model, (p, consts), (x,))
        return loss_fn(out, y)

    return f, params


def _cuda_devices(model: nn.Module) -> list[int]:
    devs = {t.device.index for t in model.parameters() if t.device.type == "cuda"}
    devs |= {t.device.index for t in model.buffers() if t.device.type == "cuda"}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devs)


@contextlib.contextmanager
def model_state_preserved(model: nn.Module) -> Iterator[None]:
    """Context manager: restore the RNG state and every module's training flag on exit.

    The RNG states are the CPU generator's and those of the CUDA devices holding the model. The
    ``model_*`` wrappers already leave parameters, buffers and ``.grad`` untouched by
    construction (:func:`model_loss_closure`); this covers what a user-supplied ``loss_fn`` or
    a stochastic layer (dropout draws from the global RNG) could still change.

    Args:
        model: the module whose flags (and devices) to guard.

    Example:
        >>> with model_state_preserved(model):
        ...     f, params = model_loss_closure(model, batch, loss_fn)
        ...     lam, _ = top_eigenvalues(f, params)
    """
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        try:
            yield
        finally:
            for m, t in modes:
                m.training = t


def model_hvp(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    v: dict[str, Tensor],
    *,
    method: HvpMethod = "auto",
) -> dict[str, Tensor]:
    """:func:`hvp` of the batch loss of ``model``; the model is left unchanged.

    ``H v`` with ``H`` the Hessian of ``loss_fn(model(x), y)`` with respect to the trainable
    parameters (names from ``model.named_parameters()``). Train-mode BatchNorm uses the batch's
    statistics; no parameter, buffer (running statistics, ``num_batches_tracked``), ``.grad``,
    training flag or RNG state changes (see :func:`model_loss_closure`).

    Args:
        model: the network.
        batch: ``(x, y)``.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        v: direction, a dict keyed by trainable parameter name.
        method: HVP method, see :func:`hvp`.

    Returns:
        ``H v`` as a dict keyed by parameter name.

    Example:
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> hv = model_hvp(model, (x, y), nn.functional.cross_entropy, v)

    Reference:
        Pearlmutter 1994.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn)
        return hvp(f, params, v, method=method)


def model_quadratic_form(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    v: Optional[dict[str, Tensor]] = None,
    *,
    method: HvpMethod = "auto",
) -> Tensor:
    """:func:`quadratic_form` ``vᵀHv/‖v‖²`` of the batch loss (default ``v = g``: ``gᵀHg/‖g‖²``).

    The model is left unchanged (parameters, buffers, ``.grad``, training flags, RNG); see
    :func:`model_loss_closure`.

    Args:
        model: the network.
        batch: ``(x, y)``.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        v: direction keyed by trainable parameter name, or ``None`` for the batch gradient.
        method: HVP method, see :func:`hvp`.

    Returns:
        0-d tensor.

    Example:
        >>> q = model_quadratic_form(model, (x, y), nn.functional.cross_entropy)

    Reference:
        Santurkar et al., NeurIPS 2018, sec. 3.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn)
        return quadratic_form(f, params, v, method=method)


def model_top_eigenvalues(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    k: int = 1,
    **kwargs,
) -> tuple[Tensor, EigenInfo]:
    """:func:`top_eigenvalues` of the Hessian of the batch loss; the model is left unchanged.

    Args:
        model: the network.
        batch: ``(x, y)``.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        k: number of eigenvalues.
        **kwargs: ``tol``, ``max_iter``, ``seed``, ``which``, ``method``,
            ``return_eigenvectors`` as in :func:`top_eigenvalues`.

    Returns:
        ``(eigenvalues, info)``.

    Example:
        >>> lam, info = model_top_eigenvalues(model, (x, y), nn.functional.cross_entropy, k=1)

    Reference:
        Lanczos 1950; Ghorbani et al., ICML 2019.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn)
        return top_eigenvalues(f, params, k, **kwargs)


def model_hessian_trace(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    n_samples: int = 100,
    **kwargs,
) -> TraceEstimate:
    """:func:`hessian_trace` of the batch loss; the model is left unchanged.

    Args:
        model: the network.
        batch: ``(x, y)``.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        n_samples: number of Rademacher vectors.
        **kwargs: ``seed``, ``method`` as in :func:`hessian_trace`.

    Returns:
        A :class:`TraceEstimate`.

    Example:
        >>> est, se, n = model_hessian_trace(model, (x, y), nn.functional.cross_entropy, 50)

    Reference:
        Hutchinson 1989.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn)
        return hessian_trace(f, params, n_samples, **kwargs)
