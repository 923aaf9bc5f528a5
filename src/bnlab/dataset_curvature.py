"""Dataset-level curvature: the Hessian of the loss over a fixed list of batches, in one process
or with the batches sharded over ``torch.distributed`` ranks.

The probes measure the Hessian of one batch's loss (the default, and what a training step sees).
The papers on the Hessian's spectrum (Ghorbani, Krishnan, Xiao 2019; Yao et al. 2020) measure it
over a fixed subset of the training set. With batches ``b = 1..B`` of ``n_b`` examples
(``N = Σ_b n_b`` over all batches on all ranks) and ``L_b`` the loss of batch ``b`` as the model
computes it (a mean over its examples for the usual ``reduction="mean"``),

    ``L_D(w) = Σ_b (n_b / N) L_b(w)``,    ``H_D = ∇²L_D = Σ_b (n_b / N) H_b``,

the mean loss over the examples of the subset (**weighting: by examples**, so batches of unequal
size count by their size). Train-mode BatchNorm normalizes each batch with its own statistics,
as in training; in eval mode it uses the running statistics and ``L_D`` is the plain mean loss
of the subset.

:class:`DatasetHessianOperator` is the map ``v ↦ H_D v``: per HVP, one exact HVP per local batch
(:class:`bnlab.curvature.HessianOperator`), summed with the weights ``n_b / N``; with
``torch.distributed`` initialized, each rank sums its own batches and one ``all_reduce`` (sum)
adds the ranks' partial sums. The collective hands every rank the same sum, so the solvers of
:mod:`bnlab.curvature` (``hvp``, ``quadratic_form``, ``top_eigenvalues``, ``power_iteration``,
``hessian_trace``) and :func:`bnlab.spectrum.spectral_density`, given the operator and the same
seed on every rank, run the same iterations everywhere and return the same values, without any
other communication. In one process the same code loops over all the batches.

Example (one process)::

    op = DatasetHessianOperator(model, batches[:8], F.cross_entropy)
    lam, info = top_eigenvalues(op, k=3)
    est, se, n = hessian_trace(op, n_samples=60, estimator="hutch++")

Example (``torchrun --nproc-per-node 4 script.py``, every rank runs the same code)::

    torch.distributed.init_process_group("gloo")          # or "nccl"
    mine = shard(batches, torch.distributed.get_rank(), torch.distributed.get_world_size())
    lam, info = dataset_top_eigenvalues(model, mine, F.cross_entropy, k=1)   # same on all ranks

Cost per dataset HVP: by default (``retain_graphs=False``) each batch's forward and
first backward pass is recomputed, about 3.3 gradient evaluations per batch, with the memory of
one batch's graph; ``retain_graphs=True`` keeps every local batch's graph and pays about 2
gradient evaluations per batch and product after the first.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from bnlab.curvature import (
    EigenInfo,
    HessianOperator,
    HvpMethod,
    TraceEstimate,
    _check_out,
    _flatten,
    _unflatten,
    hessian_trace,
    hvp,
    loss_and_grad,
    model_loss_closure,
    model_state_preserved,
    quadratic_form,
    top_eigenvalues,
)
from bnlab.errors import UserError

__all__ = [
    "DatasetHessianOperator",
    "shard",
    "dataset_hvp",
    "dataset_quadratic_form",
    "dataset_top_eigenvalues",
    "dataset_hessian_trace",
]


def _batch_size(batch: Any) -> int:
    try:
        from bnlab.adapters import batch_size
    except ImportError:  # pragma: no cover - the adapter ships with bnlab
        return int(batch[0].shape[0])
    return batch_size(batch)


def shard(batches: Iterable[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of ``batches``: ``batches[rank::world_size]`` (round robin).

    Args:
        batches: the full list of batches (the same on every rank).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of ranks.

    Returns:
        A list of batches; the shares of all ranks partition ``batches``.
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise UserError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return list(batches)[rank::world_size]


def _resolve_distributed(distributed: Optional[bool]) -> bool:
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        return available
    if distributed and not available:
        raise UserError(
            "distributed=True needs torch.distributed initialized (init_process_group) first"
        )
    return bool(distributed)


class DatasetHessianOperator:
    """The Hessian of the mean loss over a fixed list of batches, ``v ↦ H_D v``.

    ``H_D = Σ_b (n_b / N) H_b``: ``H_b`` the Hessian of batch ``b``'s loss with respect to the
    trainable parameters, ``n_b`` its number of examples (:func:`bnlab.adapters.batch_size`),
    ``N`` the total over all batches of all ranks (see the module docstring). It has the
    interface of :class:`bnlab.curvature.HessianOperator` (``numel``, ``keys``, ``params``,
    ``n_hvp``, ``__call__`` on dicts, ``matvec`` on flat vectors, ``flat_params``, ``loss``,
    ``grad``), so every solver of :mod:`bnlab.curvature` and
    :func:`bnlab.spectrum.spectral_density` accepts it in place of ``(f, params)``.

    The model is never changed: each batch's loss is a :func:`bnlab.curvature.model_loss_closure`
    (parameters and buffers copied; train-mode BatchNorm on the batch's statistics, no running
    statistic updated; the model's current training flags are used).

    Args:
        model: the network, with the same parameters on every rank.
        batches: this process's batches: ``(x, y)`` tuples or dicts (see
            :mod:`bnlab.adapters`). In a distributed run, each rank's share (see :func:`shard`);
            a rank may have none.
        loss_fn: ``loss_fn(logits, y) -> scalar`` (a mean over the batch), or ``None`` for the
            model's own loss (``output.loss``).
        method: the per-batch HVP method, see :func:`bnlab.curvature.hvp`.
        distributed: ``None`` (default): sum over ranks iff ``torch.distributed`` is
            initialized; ``False``: this process's batches only; ``True``: require it.
        process_group: the ``torch.distributed`` group to reduce over (default: the world).
        retain_graphs: keep every local batch's forward/backward graph between products
            (faster, memory of all local batches' graphs) instead of recomputing it.
        batch_weights: the ``n_b`` to use instead of the batch sizes, one per local batch (e.g.
            the token counts of a language model whose loss is a mean over tokens); normalized
            by their sum over all ranks.

    Attributes:
        n_hvp: dataset-level products computed so far.
        n_batch_hvp: per-batch HVPs computed so far on this rank.
        n_examples: ``N``, the examples (or the sum of ``batch_weights``) over all ranks.
        n_batches: the local number of batches.

    Raises:
        UserError: no example on any rank, or parameters that differ across ranks.

    Example:
        >>> op = DatasetHessianOperator(model, [(x1, y1), (x2, y2)], F.cross_entropy)
        >>> lam, info = top_eigenvalues(op, k=1, tol=1e-4)
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        *,
        method: HvpMethod = "auto",
        distributed: Optional[bool] = None,
        process_group: Any = None,
        retain_graphs: bool = False,
        batch_weights: Optional[Iterable[float]] = None,
    ):
        batches = list(batches)
        self.model = model
        self.method = method
        self.retain_graphs = retain_graphs
        self._distributed = _resolve_distributed(distributed)
        self._group = process_group
        self._closures = []
        sizes = []
        params: Optional[dict[str, Tensor]] = None
        with model_state_preserved(model):
            for batch in batches:
                f, p = model_loss_closure(model, batch, loss_fn)
                params = p if params is None else params
                self._closures.append(f)
                sizes.append(_batch_size(batch))
        if batch_weights is not None:
            sizes = [float(w) for w in batch_weights]
            if len(sizes) != len(batches) or not all(w >= 0 and w < float("inf") for w in sizes):
                raise UserError(f"batch_weights needs one finite weight >= 0 per batch ({len(batches)}), "
                                f"got {len(sizes)}")
        if params is None:
            params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.params = params
        self.keys = list(params)
        self.numel = sum(p.numel() for p in params.values())
        self.n_hvp = 0
        self.n_batch_hvp = 0
        self.n_batches = len(batches)
        like = self.flat_params()
        # on the parameters' device: NCCL reduces CUDA tensors only, gloo either
        n_total = torch.tensor([float(sum(sizes))], dtype=torch.float64, device=like.device)
        if self._distributed:
            self._all_reduce(n_total)
            self._check_same_params(like)
        self.n_examples = float(n_total.item()) if batch_weights is not None else int(n_total.item())
        if self.n_examples <= 0:
            raise UserError("the dataset operator has no examples: every batch list is empty")
        self._weights = [s / self.n_examples for s in sizes]
        self._ops: Optional[list[HessianOperator]] = None
        self._loss: Optional[Tensor] = None
        self._grad: Optional[dict[str, Tensor]] = None

    # -- communication ------------------------------------------------------------------------

    def _all_reduce(self, t: Tensor, op=None) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self._group)

    def _check_same_params(self, flat: Tensor) -> None:
        import torch.distributed as dist

        x = flat.double()
        c = torch.stack([x.sum(), (x * x).sum()])
        both = torch.cat([c, -c])
        self._all_reduce(both, op=dist.ReduceOp.MAX)
        if not torch.equal(both[:2], -both[2:]):
            raise UserError(
                "the model's parameters differ across ranks; a dataset-level Hessian needs the "
                "same point w on every rank (broadcast the state dict first)"
            )

    # -- the operator ---------------------------------------------------------------------------

    def _batch_ops(self):
        if self._ops is not None:
            yield from zip(self._weights, self._ops)
            return
        kept = [] if self.retain_graphs else None
        for wgt, f in zip(self._weights, self._closures):
            op = HessianOperator(f, self.params, method=self.method)
            if kept is not None:
                kept.append(op)
            yield wgt, op
        if kept is not None:
            self._ops = kept

    def matvec(self, vec: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``H_D v`` on the flattened parameter vector (keys in the order of ``params``).

        Args:
            vec: ``v``, flat, of length :attr:`numel`.
            out: a contiguous buffer of that length, dtype and device, not overlapping ``vec``,
                to accumulate ``H_D v`` in (no parameter-sized allocation per product); ``None``:
                a new tensor.
        """
        if out is None:
            out = torch.zeros(self.numel, dtype=vec.dtype, device=vec.device)
        else:
            _check_out(out, vec, self.numel)
            out.zero_()
        v = _unflatten(vec, self.params, self.keys)
        acc = _unflatten(out, self.params, self.keys)  # views into out
        for wgt, op in self._batch_ops():
            hv = op(v)
            for k in self.keys:
                acc[k].add_(hv[k], alpha=wgt)
            self.n_batch_hvp += 1
        if self._distributed:
            self._all_reduce(out)
        self.n_hvp += 1
        return out

    def __call__(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``H_D v`` as a dict with the keys of ``params``."""
        return _unflatten(self.matvec(_flatten(v, self.keys)), self.params, self.keys)

    def flat_params(self) -> Tensor:
        """The point ``w`` as one flat vector."""
        return _flatten(self.params, self.keys)

    def _primal(self) -> None:
        like = self.flat_params()
        acc = torch.zeros(self.numel + 1, dtype=like.dtype, device=like.device)
        if self._ops is not None:
            pairs = [(w, op.loss, op.grad) for w, op in zip(self._weights, self._ops)]
        else:
            pairs = [(w, *loss_and_grad(f, self.params)) for w, f in zip(self._weights, self._closures)]
        for wgt, loss, grad in pairs:
            acc[0] += wgt * loss.to(acc.dtype)
            acc[1:].add_(_flatten(grad, self.keys), alpha=wgt)
        if self._distributed:
            self._all_reduce(acc)
        self._loss = acc[0].clone()
        self._grad = _unflatten(acc[1:].clone(), self.params, self.keys)

    @property
    def loss(self) -> Tensor:
        """``L_D(w)``, the example-weighted mean loss (detached)."""
        if self._loss is None:
            self._primal()
        return self._loss

    @property
    def grad(self) -> dict[str, Tensor]:
        """``∇L_D(w)`` (detached), a dict with the keys of ``params``."""
        if self._grad is None:
            self._primal()
        return self._grad


# --------------------------------------------------------------------------------------------
# model-level wrappers


def _op(model, batches, loss_fn, op_kwargs) -> DatasetHessianOperator:
    return DatasetHessianOperator(model, batches, loss_fn, **op_kwargs)


def dataset_hvp(model: nn.Module, batches: Iterable[Any], loss_fn, v: dict[str, Tensor], **op_kwargs) -> dict[str, Tensor]:
    """``H_D v`` for the dataset-level Hessian (see :class:`DatasetHessianOperator`).

    Args:
        model, batches, loss_fn: as for :class:`DatasetHessianOperator`.
        v: the direction, keyed by trainable parameter name.
        **op_kwargs: ``method``, ``distributed``, ``process_group``, ``retain_graphs``.

    Returns:
        ``H_D v`` as a dict keyed by parameter name (the same on every rank).
    """
    with model_state_preserved(model):
        return hvp(_op(model, batches, loss_fn, op_kwargs), v=v)


def dataset_quadratic_form(model: nn.Module, batches: Iterable[Any], loss_fn, v: Optional[dict[str, Tensor]] = None,
                           **op_kwargs) -> Tensor:
    """``vᵀ H_D v / ‖v‖²``; by default ``v = ∇L_D``, the curvature along the dataset gradient.

    Args:
        model, batches, loss_fn: as for :class:`DatasetHessianOperator`.
        v: the direction, or ``None`` for the dataset gradient.
        **op_kwargs: ``method``, ``distributed``, ``process_group``, ``retain_graphs``.

    Returns:
        A 0-d tensor.
    """
    with model_state_preserved(model):
        return quadratic_form(_op(model, batches, loss_fn, op_kwargs), v=v)


_OP_KEYS = ("method", "distributed", "process_group", "retain_graphs", "batch_weights")


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    op_kw = {k: kwargs.pop(k) for k in _OP_KEYS if k in kwargs}
    return op_kw, kwargs


def dataset_top_eigenvalues(model: nn.Module, batches: Iterable[Any], loss_fn=None, k: int = 1,
                            **kwargs) -> tuple[Tensor, EigenInfo]:
    """:func:`bnlab.curvature.top_eigenvalues` of the dataset-level Hessian ``H_D``.

    Args:
        model, batches, loss_fn: as for :class:`DatasetHessianOperator`.
        k: number of eigenvalues.
        **kwargs: the operator's ``method``, ``distributed``, ``process_group``,
            ``retain_graphs``, and the solver's ``tol``, ``max_iter``, ``seed``, ``which``,
            ``return_eigenvectors``. Use the same ``seed`` on every rank.

    Returns:
        ``(eigenvalues, info)``; ``info.n_hvp`` counts dataset-level products.
    """
    op_kw, solver_kw = _split_kwargs(dict(kwargs))
    with model_state_preserved(model):
        return top_eigenvalues(_op(model, batches, loss_fn, op_kw), k=k, **solver_kw)


def dataset_hessian_trace(model: nn.Module, batches: Iterable[Any], loss_fn=None, n_samples: int = 100,
                          **kwargs) -> TraceEstimate:
    """:func:`bnlab.curvature.hessian_trace` of the dataset-level Hessian ``H_D``.

    Args:
        model, batches, loss_fn: as for :class:`DatasetHessianOperator`.
        n_samples: the budget of dataset-level HVPs.
        **kwargs: the operator's ``method``, ``distributed``, ``process_group``,
            ``retain_graphs``, and the estimator's ``seed``, ``estimator``.

    Returns:
        A :class:`bnlab.curvature.TraceEstimate`.
    """
    op_kw, est_kw = _split_kwargs(dict(kwargs))
    with model_state_preserved(model):
        return hessian_trace(_op(model, batches, loss_fn, op_kw), n_samples=n_samples, **est_kw)
