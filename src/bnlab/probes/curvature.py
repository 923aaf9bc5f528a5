"""Second-order smoothness at a training step: ``gᵀHg/‖g‖²`` and the top Hessian eigenvalue.

Thin adapters of :func:`bnlab.curvature.model_quadratic_form` and
:func:`bnlab.curvature.model_top_eigenvalues`. Both run at ``after_backward`` of a scheduled step,
on the step's batch ``B`` at ``w_t``, with ``H = ∇²L_B(w_t)`` (exact Hessian-vector products, no
finite differences) over the trainable parameters; train-mode BatchNorm uses the batch's
statistics as in training. The model, its buffers, ``.grad`` and the RNG are left unchanged.
The batch may be ``(x, y)`` or a Hugging Face dict, the output a ``ModelOutput``
(:mod:`bnlab.adapters`); without a ``loss_fn`` the loss is ``F.cross_entropy`` for ``(x, y)``
batches and the model's ``output.loss`` for dict batches. Dropout in train mode keeps one set of
masks for the whole computation; attention runs on the math backend (double backward).

* :class:`HessianQuadForm`: ``gᵀ H g / ‖g‖²`` with ``g = ∇L_B(w_t)``, the curvature along the
  gradient (Santurkar et al.'s second-order smoothness; one HVP).
* :class:`TopHessianEigenvalue`: ``λ_max(H)`` by Lanczos with full reorthogonalization
  (``max_iter`` HVPs at most).

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, sec. 3.1 and 4; Ghorbani, Krishnan, Xiao, ICML 2019 (Lanczos).
"""

from __future__ import annotations

from typing import Callable, Union

from ..adapters import default_loss_fn

from ..curvature import model_quadratic_form, model_top_eigenvalues
from .base import Probe, StepContext

__all__ = ["HessianQuadForm", "TopHessianEigenvalue"]


class HessianQuadForm(Probe):
    """``gᵀ H g / ‖g‖²`` of the batch loss at ``w_t``, ``g`` the step's gradient (cost: expensive).

    Records ``gHg`` (the quadratic form divided by ``‖g‖²``). One forward pass, one backward
    pass with a graph and one double-backward pass per measurement.

    Args:
        every: steps to measure at.
        name: metric prefix.

    Example:
        >>> train(net, data, opt, steps=200, probes=[HessianQuadForm(every=20)])
    """

    name = "hess_quad"
    cost = "expensive"

    def __init__(self, every: Union[int, Callable[[int], bool]] = 10, *, name: str = "hess_quad"):
        super().__init__(every)
        self.name = name

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        q = model_quadratic_form(ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), rng=ctx.rng)
        return {"gHg": float(q)}


class TopHessianEigenvalue(Probe):
    """The largest eigenvalue of the batch-loss Hessian at ``w_t`` by Lanczos (cost: expensive).

    Records ``lambda_max``, ``n_hvp`` (the cost), ``converged`` (1.0 or 0.0) and ``residual``
    (an eigenvalue of ``H`` lies within it of ``lambda_max``).

    Args:
        every: steps to measure at.
        max_iter: at most this many Lanczos iterations (= HVPs).
        tol: relative bound on the Lanczos residual, ``β_m|s_m| ≤ tol·|λ|`` (an eigenvalue of ``H`` lies
            within ``tol·|λ|``; see :func:`bnlab.curvature.top_eigenvalues`).
        seed: seed of the Lanczos start vector (a private generator).
        name: metric prefix.

    Example:
        >>> train(net, data, opt, steps=200, probes=[TopHessianEigenvalue(every=50, max_iter=30)])
    """

    name = "hess_top"
    cost = "expensive"

    def __init__(self, every: Union[int, Callable[[int], bool]] = 10, *, max_iter: int = 30, tol: float = 1e-3, seed: int = 0,
                 name: str = "hess_top"):
        super().__init__(every)
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.name = name

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        lam, info = model_top_eigenvalues(ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), k=1, rng=ctx.rng,
                                          max_iter=self.max_iter, tol=self.tol, seed=self.seed)
        return {
            "lambda_max": float(lam[0]),
            "n_hvp": float(info.n_hvp),
            "converged": 1.0 if info.converged else 0.0,
            "residual": float(info.residual_norms[0]) if info.residual_norms else float("nan"),
        }
