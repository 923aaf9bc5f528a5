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
* :func:`hessian_trace`: Hutchinson's estimate ``tr H = E[zᵀ H z]``, ``z`` Rademacher, or
  Hutch++ (a low-rank sketch plus Hutchinson on the rest; lower variance at equal cost).

Each function also takes an operator in place of ``(f, params)`` (the other arguments by
keyword: ``top_eigenvalues(op, k=3)``): a :class:`HessianOperator`, or the dataset-level
:class:`bnlab.dataset_curvature.DatasetHessianOperator` (the Hessian of the mean loss over a
list of batches, in one process or sharded over ``torch.distributed`` ranks).

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
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, NamedTuple, Optional, Protocol

import torch
from torch import Tensor, nn

from bnlab._batchnorm_second_order import second_order_batch_norm
from bnlab.adapters import compute_loss, math_attention
from bnlab.adapters import forward as adapter_forward
from bnlab.errors import UserError, check_positive

__all__ = [
    "LossClosure",
    "HessianOperator",
    "CurvatureOperator",
    "EigenInfo",
    "TraceEstimate",
    "loss_and_grad",
    "rng_snapshot",
    "flat_matvec",
    "check_keys",
    "hvp",
    "quadratic_form",
    "top_eigenvalues",
    "power_iteration",
    "hessian_trace",
    "model_loss_closure",
    "layer_output_closure",
    "model_state_preserved",
    "model_hvp",
    "model_quadratic_form",
    "model_top_eigenvalues",
    "model_hessian_trace",
]

LossClosure = Callable[[dict[str, Tensor]], Tensor]
"""``f(params: dict[str, Tensor]) -> scalar Tensor``."""


def __getattr__(name: str):
    # bnlab.curvature.spectral_density is bnlab.spectrum's (imported lazily: spectrum imports this module)
    if name in ("spectral_density", "SpectralDensity"):
        from bnlab import spectrum

        return getattr(spectrum, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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


def _flatten(d: dict[str, Tensor], keys: list[str], out: Optional[Tensor] = None) -> Tensor:
    """The tensors ``d[k]`` (in ``keys`` order) as one flat vector: ``out`` when given (one copy
    per tensor into the caller's buffer, no allocation), else a new tensor."""
    ts = [d[k] for k in keys]
    if out is not None:
        i = 0
        for t in ts:
            out[i : i + t.numel()].view(t.shape).copy_(t)
            i += t.numel()
        return out
    if all(t.is_contiguous() for t in ts) or len({t.dtype for t in ts}) > 1:
        return torch.cat([t.reshape(-1) for t in ts])
    # non-contiguous parts (e.g. some convolution gradients): one strided copy each, instead of
    # a contiguous copy by reshape and a second one by cat
    return _flatten(d, keys, torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=ts[0].device))


def _check_out(out: Tensor, vec: Tensor, numel: int) -> None:
    if out.shape != (numel,) or not out.is_contiguous():
        raise UserError(f"out must be a contiguous vector of {numel} entries; got shape {tuple(out.shape)}")
    if out.dtype != vec.dtype or out.device != vec.device:
        raise UserError(f"out must have vec's dtype and device ({vec.dtype}, {vec.device}); "
                        f"got {out.dtype}, {out.device}")
    def span(t: Tensor) -> tuple[int, int]:
        n = (t.numel() - 1) * (t.stride(0) if t.dim() else 1) + 1
        return t.data_ptr(), t.data_ptr() + n * t.element_size()

    (a0, a1), (b0, b1) = span(out), span(vec.reshape(-1) if vec.dim() != 1 else vec)
    if a0 < b1 and b0 < a1:
        raise UserError("out must not overlap vec")


def flat_matvec(op: "CurvatureOperator") -> Callable[[Tensor, Tensor], Tensor]:
    """``(vec, buf) ↦ H vec`` for the solvers: written into ``buf`` when ``op.matvec`` takes
    ``out=`` (no 40 MB allocation per product on a ResNet-18, whose first touch costs as much as a
    tenth of the product), else ``op.matvec(vec)``, a new tensor. The caller owns the result and
    may update it in place; it is ``buf`` or a tensor no one else holds, unless an operator hands
    back its input (the identity), which the caller checks."""
    try:
        takes_out = "out" in inspect.signature(op.matvec).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        takes_out = False
    if takes_out:
        return lambda vec, buf: op.matvec(vec, out=buf)
    return lambda vec, buf: op.matvec(vec)


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
        if not self._live:
            return {k: torch.zeros_like(self.params[k]) for k in self.keys}
        idx = [i for i, _ in self._live]
        hv = torch.autograd.grad(
            [g for _, g in self._live],
            self._leaves,
            grad_outputs=[v[self.keys[i]] for i in idx],
            retain_graph=True,
            allow_unused=True,
        )
        # zeros only where the product does not reach a parameter (no per-call memset otherwise)
        return {
            k: (h.detach() if h is not None else torch.zeros_like(self.params[k]))
            for k, h in zip(self.keys, hv)
        }

    def matvec(self, vec: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``H v`` on the flattened parameter vector (keys in the order of ``params``).

        Args:
            vec: ``v``, flat, of length :attr:`numel`.
            out: a contiguous buffer of the same length, dtype and device, not sharing memory
                with ``vec``, to write ``H v`` into (the solvers pass one, so a run of products
                allocates no parameter-sized vector); ``None``: a new tensor.
        """
        if out is not None:
            _check_out(out, vec, self.numel)
        hv = self(_unflatten(vec, self.params, self.keys))
        return _flatten(hv, self.keys, out)

    def flat_params(self) -> Tensor:
        """The point ``w`` as one flat vector."""
        return _flatten(self.params, self.keys)


class CurvatureOperator(Protocol):
    """What the solvers need of an operator ``v ↦ H v`` (:class:`HessianOperator`,
    :class:`bnlab.dataset_curvature.DatasetHessianOperator`).

    Attributes:
        numel: dimension of the parameter space.
        n_hvp: products computed so far.
        keys: parameter names, in the order of the flat vectors.
        params: the point ``w`` (a dict; gives shapes and dtype).
    """

    numel: int
    n_hvp: int
    keys: list[str]
    params: dict[str, Tensor]

    def __call__(self, v: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def matvec(self, vec: Tensor) -> Tensor:
        """``H v`` on flat vectors, as a new tensor (the solvers update the result in place). An
        operator may also take ``out=`` (a buffer to write ``H v`` into, as
        :meth:`HessianOperator.matvec` does): the solvers look for it in the signature
        (:func:`flat_matvec`) and then pass one work buffer for every product."""

    def flat_params(self) -> Tensor: ...


def _is_operator(f) -> bool:
    return hasattr(f, "matvec") and hasattr(f, "numel") and not isinstance(f, nn.Module)


def _operator(f, params: Optional[dict[str, Tensor]], method: str) -> CurvatureOperator:
    """``f`` itself when it is an operator, else ``HessianOperator(f, params, method)``."""
    if _is_operator(f):
        if params is not None:
            raise UserError(
                "with an operator in place of (f, params), pass the other arguments by keyword, "
                "e.g. top_eigenvalues(op, k=3) or hvp(op, v=v)"
            )
        if method != "auto":
            raise UserError("the HVP method is set on the operator; leave method='auto' here")
        return f
    if params is None:
        raise UserError("params is required with a loss closure f: call f(params) or pass an operator")
    return HessianOperator(f, params, method=method)


def hvp(
    f: "LossClosure | CurvatureOperator",
    params: Optional[dict[str, Tensor]] = None,
    v: Optional[dict[str, Tensor]] = None,
    *,
    method: HvpMethod = "auto",
) -> dict[str, Tensor]:
    """Exact Hessian-vector product ``H v``, ``H = ∇²f(w)``.

    ``H v = ∇_w ⟨∇_w f(w), v⟩`` (Pearlmutter's trick): one forward pass, one backward pass with a
    graph, and one more backward pass, about 3.3 gradient evaluations on a small BatchNorm CNN
    (see the module docstring for the two methods and why double backward is the default on
    CPU). For several products at one point use :class:`HessianOperator`.

    Args:
        f: loss closure ``f(params) -> scalar``, or an operator (``hvp(op, v=v)``).
        params: the point ``w``; not modified (``None`` with an operator).
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
    op = _operator(f, params, method)
    if v is None:
        raise UserError("hvp needs the vector v")
    check_keys("v", v, op.params)
    return op(v)


def quadratic_form(
    f: "LossClosure | CurvatureOperator",
    params: Optional[dict[str, Tensor]] = None,
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
        f: loss closure ``f(params) -> scalar``, or an operator with a ``grad``
            (``quadratic_form(op)``, ``quadratic_form(op, v=v)``).
        params: the point ``w``; not modified (``None`` with an operator).
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
    op = _operator(f, params, method)
    if v is None:
        v = op.grad  # "reverse": from the graph already built; "forward": one more gradient
    else:
        check_keys("v", v, op.params)
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
        converged: whether the stopping rule was met before ``max_iter`` (Lanczos: every
            wanted Ritz residual ``β_m |s_mi| ≤ tol·|θ_i|``, or the Krylov space is the whole
            space; power iteration: relative change below ``tol``).
        rel_change: the last relative change of the estimates between two iterations (the
            stopping statistic of power iteration; reported by Lanczos for comparison).
        history: the estimates after each iteration (a list of ``k`` floats per iteration),
            to study convergence against a reference value.
        residual_norms: Lanczos only: ``β_m |s_mi|`` per returned eigenvalue, the norm of
            ``H y_i - θ_i y_i`` for the Ritz pair ``(θ_i, y_i)`` (some eigenvalue lies within it).
        eigenvectors: the (Ritz) eigenvectors as parameter dicts when asked for, else ``None``.
        tol: the tolerance the solver was run with.
        error_estimates: Lanczos only: ``min(r_i, r_i² / gap_i)`` with ``r_i`` the residual
            bound and ``gap_i`` the distance from ``θ_i`` to the nearest other Ritz value: the
            Kato–Temple error for a well-separated eigenvalue, an estimate (the true gap is
            unknown); ``residual_norms`` is the guaranteed bound.
    """

    n_hvp: int
    n_iter: int
    converged: bool
    rel_change: float
    history: list[list[float]] = field(default_factory=list)
    residual_norms: list[float] = field(default_factory=list)
    eigenvectors: Optional[list[dict[str, Tensor]]] = None
    tol: float = math.nan
    error_estimates: list[float] = field(default_factory=list)


def _random_unit(n: int, like: Tensor, gen: torch.Generator) -> Tensor:
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=like.dtype, device=like.device)
    return q / q.norm()


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted Ritz values, best first."""
    key = theta if which == "largest" else theta.abs()
    return torch.argsort(key, descending=True)[:k]


def top_eigenvalues(
    f: "LossClosure | CurvatureOperator",
    params: Optional[dict[str, Tensor]] = None,
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
    ``T_m = Q_mᵀ H Q_m``; the eigenvalues ``θ_i`` of ``T_m = S Θ Sᵀ`` (Ritz values) approach the
    extreme eigenvalues of ``H``. Every new vector is reorthogonalized against all previous ones
    (after the three-term recurrence, one classical Gram-Schmidt pass against all of ``Q_m``,
    a second when the first removed most of the vector), so no spurious copies appear in
    floating point. One HVP per iteration; memory: ``m`` vectors of the parameter size.

    **Stopping rule (an error bound).** With ``β_m`` the norm of the next Lanczos vector before
    normalization, the Ritz pair ``(θ_i, y_i = Q_m s_i)`` has the residual
    ``‖H y_i − θ_i y_i‖ = β_m |s_mi|`` (``s_mi`` the last component of ``s_i``). The run stops
    as soon as **each** of the ``k`` wanted Ritz values satisfies

        ``β_m |s_mi| ≤ tol · |θ_i|``

    (or when the Krylov space is the whole space: exact; or after ``max_iter``:
    ``info.converged`` is then ``False``). What this guarantees, for a symmetric ``H``:

    * some eigenvalue ``λ`` of ``H`` lies within ``β_m |s_mi|`` of ``θ_i``, hence within
      ``tol · |θ_i|`` at a converged stop (``min_λ |λ − θ_i| ≤ ‖H y − θ y‖`` for any unit
      ``y``; to round-off, which full reorthogonalization keeps at the level of the HVP's own
      error);
    * if the other eigenvalues of ``H`` are at distance ``≥ gap`` from ``θ_i`` (a
      well-separated eigenvalue), the error is second order: ``|λ − θ_i| ≤ (β_m s_mi)² / gap``
      (Kato–Temple; Parlett, *The Symmetric Eigenvalue Problem*, Thm 11.7.1).
      ``info.error_estimates`` evaluates it with the gap to the nearest other Ritz value, an
      estimate (the true gap is unknown), never above the guaranteed bound.

    Not guaranteed (by any Krylov method): that ``λ`` is the ``i``-th largest eigenvalue,
    i.e. that no eigenvalue was missed because the start vector is (numerically) orthogonal to
    its eigenvector. A Ritz value close to 0 cannot meet a relative tolerance and runs to
    ``max_iter``. If Lanczos breaks down (an invariant subspace, e.g. a repeated eigenvalue) it
    continues from a fresh random vector orthogonal to ``Q``, and then also waits until the
    restarted run's own top Ritz value meets the tolerance (relative to the ``k``-th wanted
    value), so multiple eigenvalues are found too. The earlier rule (relative change between
    iterations below ``tol``) measured progress, not error, and stopped short on slowly
    converging spectra; ``info.rel_change`` still reports that statistic.

    Args:
        f: loss closure ``f(params) -> scalar``, or an operator (:class:`HessianOperator`,
            :class:`bnlab.dataset_curvature.DatasetHessianOperator`) with the other arguments
            by keyword: ``top_eigenvalues(op, k=3)``.
        params: the point ``w``; not modified (``None`` with an operator).
        k: number of eigenvalues.
        tol: relative bound on the Ritz residual, see above (default 1e-3).
        max_iter: at most this many iterations (= HVPs).
        seed: seed of the start vector (a private ``torch.Generator``; the global RNG is untouched).
        which: ``"largest"`` (algebraic, the default: the sharpness) or ``"magnitude"``.
        method: HVP method, see :func:`hvp` (fixed by the operator when one is given).
        return_eigenvectors: also return the Ritz vectors in ``info.eigenvectors``.

    Returns:
        ``(eigenvalues, info)``: a float64 tensor of ``k`` values, largest first (fewer when
        ``max_iter`` or the dimension is below ``k``), and an :class:`EigenInfo` with the HVPs
        used, the iterations, the residual bounds and whether the rule was met.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
        >>> lam, info = top_eigenvalues(lambda p: 0.5 * p["w"] @ A @ p["w"],
        ...                             {"w": torch.zeros(3, dtype=torch.float64)}, k=2)
        >>> lam  # exact here: the Krylov space is the whole 3-d space after 3 HVPs
        tensor([5.0000, 2.0000], dtype=torch.float64)

    Reference:
        Lanczos 1950; Golub & Van Loan, *Matrix Computations*, sec. 10.1 (full
        reorthogonalization); Parlett 1998, ch. 11 (residual and gap bounds); Ghorbani,
        Krishnan, Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
        Density", ICML 2019.
    """
    check_positive("k", k)
    check_positive("tol", tol)
    check_positive("max_iter", max_iter)
    if which not in ("largest", "magnitude"):
        raise UserError(f"unknown which={which!r}; accepted: largest, magnitude")
    op = _operator(f, params, method)
    n = op.numel
    like = op.flat_params()
    gen = torch.Generator().manual_seed(seed)
    m_max = min(max_iter, n)
    hvp0 = op.n_hvp

    Q = torch.empty(m_max, n, dtype=like.dtype, device=like.device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    history: list[list[float]] = []
    prev: Optional[Tensor] = None
    rel_change = math.inf
    converged = False
    block = 0  # first index of the current Lanczos run (after the last restart)
    Q[0] = _random_unit(n, like, gen)
    theta = s = None
    beta = 0.0
    m = 0
    mv, work = flat_matvec(op), torch.empty_like(Q[0])
    for j in range(m_max):
        q = Q[j]
        w = mv(q, work)  # the work buffer (or a new tensor): updated in place below
        if w.data_ptr() == q.data_ptr() or not w.is_contiguous() or w.dtype != Q.dtype:
            w = w.to(Q.dtype).clone()  # an operator that hands back its input (the identity) or a strided view
        # The three-term recurrence, then full reorthogonalization against all of Q: one
        # classical Gram-Schmidt pass, and a second one only when the first removed more than
        # half of the vector (the DGKS "twice is enough" test). Each pass reads Q twice, the
        # cost that grows with the iterations; the local step makes one pass enough almost always.
        alpha = float(torch.dot(q, w))
        w.sub_(q, alpha=alpha)
        if j > 0 and betas[-1] != 0.0:
            w.sub_(Q[j - 1], alpha=betas[-1])
        before = float(w.norm())
        for _ in range(2):
            h = Q[: j + 1] @ w
            w.addmv_(Q[: j + 1].T, h, alpha=-1.0)
            alpha += float(h[j])
            beta = float(w.norm())
            if not beta < 0.5 * before:
                break
            before = beta
        alphas.append(alpha)
        m = j + 1
        T = _tridiag(alphas, betas)
        theta, s = torch.linalg.eigh(T)
        sel = _select(theta, k, which)
        cur = theta[sel]
        history.append(cur.tolist())
        if prev is not None and len(prev) == len(cur):
            rel_change = float(((cur - prev).abs() / cur.abs().clamp_min(1e-300)).max())
        prev = cur
        if m == n:
            converged = True  # the Krylov space is the whole space: Ritz values are exact
            break
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        breakdown = beta <= 1e-10 * max(scale, 1e-300) or not math.isfinite(beta)
        if not breakdown and len(sel) == k:
            res = beta * s[-1, sel].abs()
            ok = bool((res <= tol * cur.abs()).all())
            if ok and block > 0:
                # After a restart: the restarted run's top Ritz value must have converged too
                # (it is the candidate for an eigenvalue the first run could not see).
                tb, sb = torch.linalg.eigh(T[block:, block:])
                ib = _select(tb, 1, which)
                ref = max(float(tb[ib].abs()), float(cur.abs().min()))
                ok = float(beta * sb[-1, ib].abs()) <= tol * ref
            if ok:
                converged = True
                break
        if j + 1 == m_max:
            break
        if breakdown:
            # Invariant subspace: restart from a random vector orthogonal to Q (beta = 0).
            r = _random_unit(n, like, gen)
            for _ in range(2):
                r = r - Q[: j + 1].T @ (Q[: j + 1] @ r)
            torch.div(r, r.norm(), out=Q[j + 1])
            betas.append(0.0)
            block = j + 1
        else:
            torch.div(w, beta, out=Q[j + 1])
            betas.append(beta)

    sel = _select(theta, k, which)
    eigenvalues = theta[sel].clone()
    last_beta = beta if m < n else 0.0
    res_all = last_beta * s[-1].abs()
    residuals = res_all[sel]
    estimates = []
    for i in sel.tolist():
        others = torch.cat([theta[:i], theta[i + 1 :]])
        r_i = float(res_all[i])
        gap = float((others - theta[i]).abs().min()) if len(others) else math.inf
        estimates.append(min(r_i, r_i * r_i / gap) if gap > 0 else r_i)
    vectors = None
    if return_eigenvectors:
        Y = s[:, sel].T.to(like.dtype) @ Q[:m]
        vectors = [_unflatten(y.clone(), op.params, op.keys) for y in Y]
    info = EigenInfo(
        n_hvp=op.n_hvp - hvp0,
        n_iter=m,
        converged=converged,
        rel_change=rel_change,
        history=history,
        residual_norms=residuals.tolist(),
        eigenvectors=vectors,
        tol=tol,
        error_estimates=estimates,
    )
    return eigenvalues, info


def _tridiag(alphas: list[float], betas: list[float]) -> Tensor:
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T


def power_iteration(
    f: "LossClosure | CurvatureOperator",
    params: Optional[dict[str, Tensor]] = None,
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
        f: loss closure ``f(params) -> scalar``, or an operator (other arguments by keyword).
        params: the point ``w``; not modified (``None`` with an operator).
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
    op = _operator(f, params, method)
    hvp0 = op.n_hvp
    like = op.flat_params()
    gen = torch.Generator().manual_seed(seed)
    v = _random_unit(op.numel, like, gen)
    history: list[list[float]] = []
    theta = prev = math.nan
    rel_change = math.inf
    converged = False
    mv, work, vbuf = flat_matvec(op), torch.empty_like(v), torch.empty_like(v)
    for _ in range(max_iter):
        w = mv(v, work)
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
        v = torch.div(w, norm, out=vbuf)  # the next iterate, in its own buffer (never the work buffer)
    info = EigenInfo(
        n_hvp=op.n_hvp - hvp0,
        n_iter=len(history),
        converged=converged,
        rel_change=rel_change,
        history=history,
        eigenvectors=[_unflatten(v.clone(), op.params, op.keys)] if return_eigenvector else None,
    )
    return torch.tensor(theta, dtype=torch.float64), info


# --------------------------------------------------------------------------------------------
# trace


class TraceEstimate(NamedTuple):
    """A stochastic trace estimate. Unpacks as ``(estimate, stderr, n_samples)``.

    Attributes:
        estimate: Hutchinson: the mean of ``zᵀHz`` over the samples; Hutch++: the exact trace
            on the sketched subspace plus the mean over the residual samples.
        stderr: the standard error of the sample mean, ``std(samples, ddof=1) / √n_res``
            (``nan`` for one sample).
        n_samples: the HVPs used.
    """

    estimate: float
    stderr: float
    n_samples: int


_ESTIMATORS = ("hutchinson", "hutch++")


def _rademacher(n: int, like: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(like.dtype).mul_(2).sub_(1).to(like.device)


def _dot64(a: Tensor, b: Tensor) -> float:
    # float64 vectors: a BLAS dot; lower precision: a product and torch's cascade summation
    # (accurate to ~eps·log n of Σ|a_i b_i|, no float64 copies of two parameter-sized vectors)
    if a.dtype == torch.float64:
        return float(torch.dot(a, b))
    return float((a * b).sum())


def hessian_trace(
    f: "LossClosure | CurvatureOperator",
    params: Optional[dict[str, Tensor]] = None,
    n_samples: int = 100,
    *,
    seed: int = 0,
    method: HvpMethod = "auto",
    estimator: Literal["hutchinson", "hutch++"] = "hutchinson",
) -> TraceEstimate:
    """Stochastic estimate of the Hessian trace ``tr H`` from ``n_samples`` HVPs.

    ``estimator="hutchinson"`` (the default): ``tr H = E[zᵀ H z]`` with i.i.d. Rademacher (±1)
    entries, ``E[zzᵀ] = I``; the mean of ``n`` samples is unbiased with variance
    ``2 Σ_{i≠j} H_ij² / n`` (the diagonal contributes no noise).

    ``estimator="hutch++"`` (Meyer, Musco, Musco, Woodruff 2021) spends the same ``n`` HVPs in
    three parts: ``n_s = ⌊n/3⌋`` on a sketch ``Y = H S`` (``S`` Gaussian), orthonormalized
    into ``Q`` (Gram-Schmidt twice; directions of ``Y`` that are numerically dependent are
    dropped, so ``r = rank Q ≤ n_s``); ``r`` on ``tr(QᵀHQ) = Σ_i q_iᵀ H q_i``, exact; and the
    rest, ``n − n_s − r ≥ n/3``, on Hutchinson's estimate of ``tr((I−QQᵀ) H (I−QQᵀ))`` with
    projected Rademacher vectors. Since ``tr H = tr(QᵀHQ) + tr((I−QQᵀ)H(I−QQᵀ))`` for any
    orthonormal ``Q``, it is unbiased, and **exact when** ``rank H ≤ n_s`` (then ``Q`` spans
    the range of ``H``, almost surely for a Gaussian ``S``). When a few eigenvalues carry most of
    ``‖H‖_F²`` (e.g. the outliers of a network's Hessian), the sketch captures them and the
    variance drops: error ``O(1/n)`` instead of ``O(1/√n)`` for PSD ``H``. On a flat spectrum
    the residual part has only ``~n/3`` samples and the spread can be up to ``√3`` times
    Hutchinson's (on a randomly initialized ResNet-18, benchmarks/peers.py, the two were about
    equal). It stores ``n_s`` vectors of the parameter size. With ``n < 3`` it is Hutchinson's.

    One HVP per sample; the samples share one forward/backward graph (see
    :class:`HessianOperator`).

    Args:
        f: loss closure ``f(params) -> scalar``, or an operator with the other arguments by
            keyword: ``hessian_trace(op, n_samples=60)``.
        params: the point ``w``; not modified (``None`` with an operator).
        n_samples: the HVP budget.
        seed: seed of the random vectors (private generator; the global RNG is untouched).
        method: HVP method, see :func:`hvp` (fixed by the operator when one is given).
        estimator: ``"hutchinson"`` or ``"hutch++"``.

    Returns:
        A :class:`TraceEstimate` ``(estimate, stderr, n_samples)``; for Hutch++ the standard
        error is that of the residual part given the sketch (the exact part has none), and
        ``n_samples`` counts all HVPs.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
        >>> est, se, n = hessian_trace(lambda p: 0.5 * p["w"] @ A @ p["w"],
        ...                            {"w": torch.zeros(3, dtype=torch.float64)}, 10)
        >>> est  # exact for a diagonal H
        8.0

    Reference:
        Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
        smoothing splines", 1989; Avron & Toledo, J. ACM 2011; Meyer, Musco, Musco, Woodruff,
        "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021.
    """
    check_positive("n_samples", n_samples)
    if estimator not in _ESTIMATORS:
        raise UserError(f"unknown trace estimator {estimator!r}; accepted: {', '.join(_ESTIMATORS)}")
    op = _operator(f, params, method)
    like = op.flat_params()
    N = op.numel
    gen = torch.Generator().manual_seed(seed)
    mv, work = flat_matvec(op), torch.empty_like(like)
    n_sketch = n_samples // 3 if estimator == "hutch++" else 0
    exact = 0.0
    Q = None
    if n_sketch:
        Y = torch.empty(n_sketch, N, dtype=like.dtype, device=like.device)
        for i in range(n_sketch):  # Gaussian sketch: H S has the rank of H almost surely
            y = mv(_random_unit(N, like, gen), Y[i])
            if y.data_ptr() != Y[i].data_ptr():
                Y[i] = y
        # Orthonormalize the rows in place (CGS2), dropping numerically dependent ones.
        drop = 1e3 * torch.finfo(like.dtype).eps
        r = 0
        for i in range(n_sketch):
            y = Y[i].clone()
            n0 = float(y.norm())
            for _ in range(2):
                if r:
                    y -= Y[:r].T @ (Y[:r] @ y)
            n1 = float(y.norm())
            if n0 > 0 and math.isfinite(n1) and n1 > drop * n0:
                Y[r] = y / n1
                r += 1
        Q = Y[:r]
        for qi in Q:
            exact += _dot64(qi, mv(qi, work))
        n_res = n_samples - n_sketch - r
    else:
        n_res = n_samples
    samples = []
    for _ in range(n_res):
        z = _rademacher(N, like, gen)
        if Q is not None and len(Q):
            z = z - Q.T @ (Q @ z)
        samples.append(_dot64(z, mv(z, work)))
    t = torch.tensor(samples, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(n_res)) if n_res > 1 else math.nan
    return TraceEstimate(exact + float(t.mean()), se, n_samples)


# --------------------------------------------------------------------------------------------
# models


_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def model_loss_closure(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    *,
    rng: Optional[tuple] = None,
) -> tuple[LossClosure, dict[str, Tensor]]:
    """The loss of ``model`` on one batch as a closure of its trainable parameters.

    ``f(params) = loss_fn(model(x; params), y)`` evaluated with
    ``torch.func.functional_call(model, (params, constants), (x,))``; through
    :mod:`bnlab.adapters` the batch may also be a dict (``model(**batch)``, Hugging Face style),
    the output a ``ModelOutput``/dict (its ``logits`` go to ``loss_fn``), and without ``loss_fn``
    the loss is the one the model returns (``output.loss``). The model is never
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

    * **Fixed randomness.** The RNG state (CPU, and the CUDA devices holding the model) is
      captured when the closure is built, and every call of ``f`` runs from that same state on a
      forked RNG: a stochastic layer (dropout in train mode) draws the *same* masks at every
      evaluation, so ``f`` is one deterministic function of the parameters (its Hessian is the
      Hessian of the loss with those masks), and calling ``f`` never advances the global RNG.
      With ``rng`` (from :func:`rng_snapshot`) every call runs from that state instead: taken
      just before the training forward pass, it gives the masks that pass drew (as
      :class:`bnlab.probes.LandscapeProbe` does through ``Monitor``).
      Two closures built from the same RNG state give the same masks; the ``model_*`` wrappers
      also restore the RNG, so repeated calls give identical results.
    * **Attention.** ``f`` runs inside :func:`bnlab.adapters.math_attention`:
      ``scaled_dot_product_attention`` uses its math backend, which (unlike the fused flash /
      memory-efficient kernels) supports double backward, so HVPs work on transformers. The
      user's backend choice is restored after each call.

    The training mode is read at each call (it is never set).

    Args:
        model: any ``nn.Module``.
        batch: ``(x, y)`` (``model(x)`` gives the logits) or a dict of keyword inputs
            (``model(**batch)``); see :func:`bnlab.adapters.split_batch`.
        loss_fn: ``loss_fn(logits, y) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``;
            ``None``: the model's own loss (``output.loss``, e.g. a Hugging Face model given
            ``labels``).
        rng: the random-number state every call starts from (:func:`rng_snapshot`); ``None``:
            the state now.

    Returns:
        ``(f, params)``: the closure and the current trainable parameters (detached copies).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> f, params = model_loss_closure(model, batch, nn.functional.cross_entropy)
        >>> loss = f(params)  # the model's BN running statistics are unchanged
    """
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

    devices = _cuda_devices(model)
    if rng is None:
        rng = rng_snapshot(model)
    rng_cpu = rng[0]
    cuda_states = dict(rng[1])
    rng_cuda = [cuda_states[d] if d in cuda_states else torch.cuda.get_rng_state(d) for d in devices]

    def f(p: dict[str, Tensor]) -> Tensor:
        consts = dict(frozen)
        consts.update(buffers)
        for full, mod in norm_stats:
            if mod.training:
                consts[full] = None  # batch statistics, no running-stat update
        with torch.random.fork_rng(devices=devices), math_attention():
            torch.set_rng_state(rng_cpu)  # the same dropout masks at every evaluation
            for d, state in zip(devices, rng_cuda):
                torch.cuda.set_rng_state(state, d)
            out = adapter_forward(model, batch, (p, consts))
            return compute_loss(out, batch, loss_fn)

    return f, params


def layer_output_closure(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]],
    module: nn.Module,
    *,
    on: str = "output",
) -> tuple[LossClosure, Tensor]:
    """The loss as a function of one layer's activations: curvature in activation space.

    ``y`` is ``module``'s output on ``batch`` (``on="input"``: its first input), detached;
    ``f({"y": y'}) = L(y')`` is the loss when that tensor is replaced by ``y'`` (a forward hook
    returns the replacement; a forward pre-hook for ``on="input"``), every parameter fixed at its
    current value and the rest of the network unchanged. It is built on
    :func:`model_loss_closure` and shares its rules: BatchNorm in train mode (also downstream of
    ``module``) uses the batch's statistics and updates no running statistic, randomness is fixed
    at construction, the training mode is read at each call, and the model is left untouched (the
    replacing hook exists only during a call of ``f``). ``f`` takes a dict with the single key
    ``"y"`` (the ``torch.func`` convention of every function here) or the tensor itself, so::

        f, y = layer_output_closure(model, batch, F.cross_entropy, model.features[1])
        g = loss_and_grad(f, {"y": y})[1]["y"]            # ∂L/∂y
        Hv = hvp(f, {"y": y}, {"y": v})["y"]              # (∂²L/∂y²) v
        lam, _ = top_eigenvalues(f, {"y": y}, k=3)        # top of the activation-space Hessian

    With ``on="input"`` on a BatchNorm layer, ``f`` is Santurkar et al.'s ``L̂(y)`` of the BN
    input; with ``on="output"`` it is ``L(z)`` of the BN output ``z = γŷ + β``
    (:mod:`bnlab.theory`). The module must run exactly once per forward pass (a shared module
    is refused). Only the path through ``module`` depends on ``y'``: a skip connection that
    reads the module's input directly still sees the original tensor.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict batch (:func:`bnlab.adapters.split_batch`).
        loss_fn: ``loss_fn(logits, labels)``, or ``None`` for the model's own ``output.loss``.
        module: a submodule of ``model`` (the identical object).
        on: ``"output"`` (default) or ``"input"`` (the module's first positional input).

    Returns:
        ``(f, y)``: the closure and the activation tensor at which it is evaluated.

    Raises:
        UserError: ``module`` is not a submodule of ``model``, runs other than once per forward
            pass, gives a non-tensor, or ``on`` is not ``"output"``/``"input"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> f, z = layer_output_closure(net, batch, nn.functional.cross_entropy, net[1])
        >>> q = quadratic_form(f, {"y": z})  # gᵀHg/‖g‖² w.r.t. the BN output
    """
    if on not in ("output", "input"):
        raise UserError(f"on must be 'output' or 'input', got {on!r}")
    if not any(m is module for m in model.modules()):
        raise UserError(f"module {type(module).__name__} is not a submodule of the model")
    f_params, params = model_loss_closure(model, batch, loss_fn)
    consts = {k: v.detach() for k, v in params.items()}

    def _hook(action):
        if on == "output":
            return module.register_forward_hook(lambda mod, inp, out: action(out))
        return module.register_forward_pre_hook(lambda mod, inp: action(inp[0] if inp else None))

    seen: list = []
    handle = _hook(lambda t: seen.append(t))
    try:
        with torch.no_grad():
            f_params(consts)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise UserError(f"module {type(module).__name__} runs {len(seen)} times in a forward pass; "
                        "layer_output_closure needs a module that runs exactly once")
    if not isinstance(seen[0], Tensor):
        raise UserError(f"the {on} of module {type(module).__name__} is a {type(seen[0]).__name__}, not a tensor")
    y0 = seen[0].detach().clone()

    def f(new) -> Tensor:
        y_new = new["y"] if isinstance(new, dict) else new
        # A copy, not the tensor itself: a downstream in-place op (ReLU(inplace=True), as in
        # torchvision's ResNets) must neither fail on a leaf nor change the caller's tensor.
        y_new = y_new.clone()
        if on == "output":
            h = module.register_forward_hook(lambda mod, inp, out: y_new)
        else:
            h = module.register_forward_pre_hook(lambda mod, inp: (y_new,) + tuple(inp[1:]))
        try:
            return f_params(consts)
        finally:
            h.remove()

    return f, y0


def rng_snapshot(model: nn.Module) -> tuple:
    """The random-number state now: ``(CPU state, [(device, state), ...])`` for the CUDA devices
    holding ``model``'s parameters and buffers. Pass it as ``rng=`` to :func:`model_loss_closure`
    to evaluate the loss with the masks a forward pass from this state draws."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return torch.get_rng_state(), []  # no CUDA state to keep (and no walk over the model)
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices(model)]


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
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]],
    v: dict[str, Tensor],
    *,
    method: HvpMethod = "auto",
    rng: Optional[tuple] = None,
) -> dict[str, Tensor]:
    """:func:`hvp` of the batch loss of ``model``; the model is left unchanged.

    ``H v`` with ``H`` the Hessian of ``loss_fn(model(x), y)`` with respect to the trainable
    parameters (names from ``model.named_parameters()``). Train-mode BatchNorm uses the batch's
    statistics; no parameter, buffer (running statistics, ``num_batches_tracked``), ``.grad``,
    training flag or RNG state changes (see :func:`model_loss_closure`). Dropout in train mode
    draws one set of masks (from the current RNG state) used by every evaluation, and ``H`` is
    the Hessian of the loss with those masks; the attention math backend is used inside.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict of model inputs (:mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(logits, y) -> scalar``; ``None``: the model's own ``output.loss``.
        v: direction, a dict keyed by trainable parameter name.
        method: HVP method, see :func:`hvp`.
        rng: the random-number state every evaluation starts from (:func:`rng_snapshot`, e.g.
            ``StepContext.rng``: the training step's dropout masks); ``None``: the state now.

    Returns:
        ``H v`` as a dict keyed by parameter name.

    Example:
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> hv = model_hvp(model, (x, y), nn.functional.cross_entropy, v)

    Reference:
        Pearlmutter 1994.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn, rng=rng)
        return hvp(f, params, v, method=method)


def model_quadratic_form(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    v: Optional[dict[str, Tensor]] = None,
    *,
    method: HvpMethod = "auto",
    rng: Optional[tuple] = None,
) -> Tensor:
    """:func:`quadratic_form` ``vᵀHv/‖v‖²`` of the batch loss (default ``v = g``: ``gᵀHg/‖g‖²``).

    The model is left unchanged (parameters, buffers, ``.grad``, training flags, RNG); see
    :func:`model_loss_closure`.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict of model inputs (:mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(logits, y) -> scalar``; ``None``: the model's own ``output.loss``.
        v: direction keyed by trainable parameter name, or ``None`` for the batch gradient.
        method: HVP method, see :func:`hvp`.
        rng: the random-number state every evaluation starts from (:func:`rng_snapshot`, e.g.
            ``StepContext.rng``: the training step's dropout masks); ``None``: the state now.

    Returns:
        0-d tensor.

    Example:
        >>> q = model_quadratic_form(model, (x, y), nn.functional.cross_entropy)

    Reference:
        Santurkar et al., NeurIPS 2018, sec. 3.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn, rng=rng)
        return quadratic_form(f, params, v, method=method)


def model_top_eigenvalues(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    k: int = 1,
    *,
    rng: Optional[tuple] = None,
    **kwargs,
) -> tuple[Tensor, EigenInfo]:
    """:func:`top_eigenvalues` of the Hessian of the batch loss; the model is left unchanged.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict of model inputs (:mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(logits, y) -> scalar``; ``None``: the model's own ``output.loss``.
        k: number of eigenvalues.
        **kwargs: ``tol``, ``max_iter``, ``seed``, ``which``, ``method``,
            ``return_eigenvectors`` as in :func:`top_eigenvalues`.
        rng: the random-number state every evaluation starts from (:func:`rng_snapshot`, e.g.
            ``StepContext.rng``: the training step's dropout masks); ``None``: the state now.

    Returns:
        ``(eigenvalues, info)``.

    Example:
        >>> lam, info = model_top_eigenvalues(model, (x, y), nn.functional.cross_entropy, k=1)

    Reference:
        Lanczos 1950; Ghorbani et al., ICML 2019.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn, rng=rng)
        return top_eigenvalues(f, params, k, **kwargs)


def model_hessian_trace(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    n_samples: int = 100,
    *,
    rng: Optional[tuple] = None,
    **kwargs,
) -> TraceEstimate:
    """:func:`hessian_trace` of the batch loss; the model is left unchanged.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict of model inputs (:mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(logits, y) -> scalar``; ``None``: the model's own ``output.loss``.
        n_samples: number of Rademacher vectors.
        **kwargs: ``seed``, ``method`` as in :func:`hessian_trace`.
        rng: the random-number state every evaluation starts from (:func:`rng_snapshot`, e.g.
            ``StepContext.rng``: the training step's dropout masks); ``None``: the state now.

    Returns:
        A :class:`TraceEstimate`.

    Example:
        >>> est, se, n = model_hessian_trace(model, (x, y), nn.functional.cross_entropy, 50)

    Reference:
        Hutchinson 1989.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn, rng=rng)
        return hessian_trace(f, params, n_samples, **kwargs)
