"""SGD's step noise from per-example gradients (Bjorck et al. 2018: noise grows as α²/|B|).

For a loss that is a mean over ``N`` examples, ``L(w) = (1/N) Σ_i ℓ_i(w)``, with per-example
gradients ``g_i = ∇ℓ_i(w)`` (``P`` numbers each), the full-batch gradient ``ḡ = (1/N) Σ_i g_i``
and the population trace covariance ::

    S = (1/N) Σ_i ‖g_i − ḡ‖²

the SGD step on a batch ``B`` of ``b`` examples is ``−α g_B`` with ``g_B = (1/b) Σ_{i∈B} g_i``.
Its squared distance from the full-batch step ``−α ḡ``, averaged over the batches, is exactly ::

    E‖α g_B − α ḡ‖² = α² · S / b                       (B drawn with replacement)
    E‖α g_B − α ḡ‖² = α² · S / b · (N − b) / (N − 1)    (B drawn without replacement)

(the second is the finite-population correction of sampling without replacement: ``b = N``
gives 0, the full batch itself). These are Bjorck et al.'s ``E‖α∇ℓ − α∇_SGD‖² = (α²/|B|)·C``
(their Eq. for the SGD noise, REFERENCES §6), stated for a finite training set.

Functions:

* :func:`per_example_gradients`: ``[N, P]`` exactly, one ``torch.func.vmap(torch.func.grad)``
  over the examples (the model in eval mode: each example's loss must not depend on the others).
* :func:`frozen_norm_copy`: a copy of a network whose normalization layers use, as fixed
  statistics, exactly those a train-mode pass on a given set normalizes with, so that a BN net's
  loss becomes a per-example sum (the assumption of the formula above).
* :func:`gradient_noise` (streamed over chunks, ``O(P)`` memory) and :func:`noise_of` (from a
  ``[N, P]`` tensor): :class:`GradientNoise` (``N``, ``ḡ``, ``S``).
* :func:`step_noise`: the closed form above on a grid of ``α`` and ``b``.
* :func:`sampled_step_noise`: the same expectation by brute force (sampling batches), the
  independent check of the closed form.
* :func:`sampled_batch_noise`: ``E‖g_B − ḡ‖²`` by sampling batches and computing each batch's
  gradient as SGD does, in the model's current mode: for a train-mode BatchNorm net the loss is
  *not* a per-example mean (each batch normalizes with its own statistics), the closed form
  does not apply, and this measures the step noise that training actually has.
* :func:`fit_power_law`: least-squares exponents ``p_α``, ``p_b`` of
  ``log v = c + p_α log α + p_b log b`` over a grid.

Reference:
    Bjorck, Gomes, Selman, Weinberger, *Understanding Batch Normalization* (NeurIPS 2018),
    section 2 (SGD noise and the learning rate).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

__all__ = [
    "GradientNoise",
    "per_example_gradients",
    "frozen_norm_copy",
    "gradient_noise",
    "noise_of",
    "step_noise",
    "sampled_step_noise",
    "sampled_batch_noise",
    "fit_power_law",
]

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class GradientNoise:
    """The moments of the per-example gradients of ``N`` examples.

    Attributes:
        n: the number of examples ``N`` (the population batches are drawn from).
        mean: ``ḡ = (1/N) Σ_i g_i``, float64 ``[P]`` (the full-batch gradient).
        trace_cov: ``S = (1/N) Σ_i ‖g_i − ḡ‖²`` (float).
        mean_sq_norm: ``(1/N) Σ_i ‖g_i‖²`` (so ``S = mean_sq_norm − ‖ḡ‖²``).
    """

    n: int
    mean: torch.Tensor
    trace_cov: float
    mean_sq_norm: float

    @property
    def full_grad_sq_norm(self) -> float:
        """``‖ḡ‖²``."""
        return float(self.mean @ self.mean)

    def step_variance(self, alphas, batch_sizes, *, replacement: bool = False) -> np.ndarray:
        """:func:`step_noise` with this ``S`` and ``N``: ``[len(alphas), len(batch_sizes)]``."""
        return step_noise(self.trace_cov, self.n, alphas, batch_sizes, replacement=replacement)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise UserError(f"per-example gradients need as many labels as inputs (> 0), got {x.shape[0]} and {y.shape[0]}")


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy, *,
                          chunk_size: Optional[int] = None) -> torch.Tensor:
    """``G[i] = ∇_w loss_fn(model(x_i), y_i)``: one row per example, flattened over the trainable parameters.

    ``torch.func.vmap(torch.func.grad(...))`` over the examples, each as a batch of one, with the
    model in **eval mode** (normalization layers use their running statistics; see
    :func:`frozen_norm_copy`) and copies of its buffers: the model is left unchanged. The rows
    are exact per-example gradients (not an approximation); the columns follow
    ``model.named_parameters()`` (trainable ones), each flattened.

    Args:
        model: the network.
        x: inputs ``(N, ...)``.
        y: labels ``(N,)``.
        loss_fn: ``loss_fn(logits, y) -> scalar`` with mean reduction (of a batch of one).
        chunk_size: examples per vectorized chunk (``None``: all at once).

    Returns:
        ``[N, P]`` tensor (the parameters' dtype, on their device).

    Example:
        >>> G = per_example_gradients(net, x, y)
        >>> torch.allclose(G.mean(0), flat_grad_of_the_batch_mean_loss)
        True
    """
    _check_batch(x, y)
    params = _trainable(model)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        def loss_one(p, xi, yi):
            out = torch.func.functional_call(model, {**p, **buffers}, (xi[None],))
            return loss_fn(out, yi[None])

        g = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
    finally:
        for m, t in was:
            m.training = t
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], dim=1)


@torch.no_grad()
def frozen_norm_copy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm layers normalize with the statistics of ``x``.

    A train-mode pass on ``x`` normalizes each BN channel with the batch mean ``μ`` and the
    *biased* batch variance ``σ²`` of its input (``m`` values: examples × positions). The copy
    stores exactly these as its running statistics (the unbiased variance a cumulative pass
    records is multiplied back by ``(m − 1)/m``), so in eval mode it computes, for every example
    of ``x``, the same outputs as the train-mode pass on the whole ``x``, and its loss on ``x``
    is a mean of per-example losses (what :func:`step_noise` assumes). ``model`` is unchanged.
    LayerNorm, GroupNorm and InstanceNorm are per-example already and left as they are.

    Raises:
        UserError: another batch-dependent normalization (e.g. bnlab's ℓp or noisy BN, whose
            statistics are not a mean and a variance), or a BatchNorm without running statistics.

    Args:
        model: the network (any mode).
        x: the set whose statistics are frozen in (e.g. the whole training set).

    Returns:
        The copy, in eval mode.
    """
    from .models import is_norm_layer

    net = copy.deepcopy(model)
    norms = [m for m in net.modules() if type(m) in _PLAIN_BN and m.track_running_stats]
    other = [type(m).__name__ for m in net.modules() if is_norm_layer(m) and m not in norms
             and not isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))]
    if other:
        raise UserError(f"frozen_norm_copy: only torch BatchNorm layers with running statistics can be frozen, not {other[0]}")
    counts: dict[int, int] = {}
    handles = []
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one pass, exactly that pass's statistics
        handles.append(m.register_forward_pre_hook(
            lambda mod, args: counts.__setitem__(id(mod), args[0].numel() // args[0].shape[1])))
    net.train()
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    for m in norms:
        c = counts.get(id(m), 0)
        if c > 1:
            m.running_var.mul_((c - 1) / c)
    return net.eval()


def _moments(acc_sum: torch.Tensor, acc_sq: float, n: int) -> GradientNoise:
    mean = acc_sum / n
    msq = acc_sq / n
    return GradientNoise(n=n, mean=mean, trace_cov=max(msq - float(mean @ mean), 0.0), mean_sq_norm=msq)


def noise_of(grads: torch.Tensor) -> GradientNoise:
    """:class:`GradientNoise` of a ``[N, P]`` tensor of per-example gradients (float64 sums;
    ``S`` computed from the centred rows, not by subtraction of moments)."""
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise UserError(f"expected per-example gradients of shape [N, P], got {tuple(grads.shape)}")
    g = grads.detach().to(torch.float64)
    mean = g.mean(0)
    return GradientNoise(n=g.shape[0], mean=mean.cpu(), trace_cov=float(((g - mean) ** 2).sum(1).mean()),
                         mean_sq_norm=float((g * g).sum(1).mean()))


def gradient_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy, *,
                   chunk_size: int = 256) -> GradientNoise:
    """:class:`GradientNoise` of the per-example gradients of ``(x, y)``, streamed over chunks.

    :func:`per_example_gradients` on ``chunk_size`` examples at a time; only ``Σ_i g_i`` and
    ``Σ_i ‖g_i‖²`` (float64) are kept, so the memory is ``O(chunk_size · P)``, not ``O(N · P)``.
    ``S = (1/N) Σ‖g_i‖² − ‖ḡ‖²`` (float64; clipped at 0).

    Args:
        model: the network (evaluated in eval mode; see :func:`frozen_norm_copy` for BN).
        x, y: the ``N`` examples (the population the batches are drawn from).
        loss_fn: per-batch loss with mean reduction.
        chunk_size: examples per vectorized chunk.
    """
    _check_batch(x, y)
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    acc, sq = None, 0.0
    for i in range(0, x.shape[0], chunk_size):
        g = per_example_gradients(model, x[i:i + chunk_size], y[i:i + chunk_size], loss_fn).to(torch.float64)
        s = g.sum(0)
        acc = s if acc is None else acc + s
        sq += float((g * g).sum())
    return _moments(acc.cpu(), sq, x.shape[0])


def step_noise(trace_cov: float, n: int, alphas, batch_sizes, *, replacement: bool = False) -> np.ndarray:
    """``E‖α g_B − α ḡ‖²`` for each ``α`` and batch size ``b``: ``α² S / b`` (with replacement) or
    ``α² S / b · (N − b)/(N − 1)`` (without; the module docstring).

    Args:
        trace_cov: ``S``.
        n: ``N`` (each ``b`` must be in ``[1, N]`` without replacement).
        alphas: step sizes.
        batch_sizes: batch sizes.
        replacement: batches drawn with replacement.

    Returns:
        ``[len(alphas), len(batch_sizes)]`` float64 array.
    """
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    b = np.asarray(batch_sizes, dtype=np.float64).reshape(-1)
    if np.any(b < 1) or (not replacement and np.any(b > n)):
        raise UserError(f"batch sizes must lie in [1, {n}]{'' if replacement else ' (drawn without replacement)'}, got {b.tolist()}")
    fpc = np.ones_like(b) if replacement or n < 2 else (n - b) / (n - 1)
    return (a[:, None] ** 2) * trace_cov * (fpc / b)[None, :]


def sampled_step_noise(grads: torch.Tensor, alpha: float, batch_size: int, n_batches: int, *,
                       replacement: bool = False, generator: Optional[torch.Generator] = None) -> float:
    """``E‖α g_B − α ḡ‖²`` by brute force: the mean over ``n_batches`` sampled batches.

    Each batch is ``batch_size`` row indices of ``grads`` ([N, P]) drawn uniformly (without
    replacement: a random permutation's first ``b``); ``g_B`` is the mean of those rows.
    The independent check of :func:`step_noise`.
    """
    g = grads.detach().to(torch.float64)
    n = g.shape[0]
    if batch_size < 1 or (not replacement and batch_size > n):
        raise UserError(f"batch_size must lie in [1, {n}]{'' if replacement else ' (drawn without replacement)'}, got {batch_size}")
    full = g.mean(0)
    tot = 0.0
    for _ in range(n_batches):
        idx = (torch.randint(0, n, (batch_size,), generator=generator) if replacement
               else torch.randperm(n, generator=generator)[:batch_size])
        d = alpha * (g[idx].mean(0) - full)
        tot += float(d @ d)
    return tot / n_batches


def _flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    from .functional import stateless_call

    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        loss = loss_fn(stateless_call(model, x, params=params), y)
        grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)


def sampled_batch_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_sizes: Sequence[int], n_batches: int,
                        loss_fn: Callable = F.cross_entropy, *, generator: Optional[torch.Generator] = None) -> dict:
    """``E‖g_B − ḡ‖²`` over batches ``B`` of each size, with the gradients SGD computes (sampled).

    ``ḡ`` is the gradient of ``loss_fn`` on all of ``(x, y)`` (the full-batch step), ``g_B`` that
    on ``b`` examples drawn without replacement, both in the model's **current mode** (a
    train-mode BatchNorm normalizes each batch with its own statistics, as in training) through
    :func:`bnlab.functional.stateless_call` (model, buffers and RNG untouched). The step noise of
    SGD at step size ``α`` is ``α²`` times this. For a loss that is a mean of per-example losses
    this estimates :func:`step_noise`'s ``S/b · (N − b)/(N − 1)``; for a train-mode BN net it also
    holds the effect of the batch statistics (and the bias ``E g_B − ḡ``, which does not shrink
    with ``b`` as ``1/b`` does).

    Args:
        model: the network.
        x, y: the ``N`` examples (the population).
        batch_sizes: the sizes ``b`` (each in ``[1, N]``).
        n_batches: batches sampled per size (the mean over them is returned).
        loss_fn: per-batch loss with mean reduction.
        generator: draws the batches.

    Returns:
        ``{"batch_sizes": [..], "variance": [..] (the means), "per_batch": [[..] per size],
        "full_grad_sq_norm": ‖ḡ‖², "n": N, "n_batches": n_batches}``.
    """
    _check_batch(x, y)
    n = x.shape[0]
    bs = [int(b) for b in batch_sizes]
    if not bs or any(b < 1 or b > n for b in bs) or n_batches < 1:
        raise UserError(f"batch sizes must lie in [1, {n}] and n_batches >= 1, got {bs} and {n_batches}")
    full = _flat_grad(model, x, y, loss_fn)
    per = []
    for b in bs:
        row = []
        for _ in range(n_batches):
            idx = torch.randperm(n, generator=generator)[:b].to(x.device)
            d = _flat_grad(model, x[idx], y[idx], loss_fn) - full
            row.append(float(d @ d))
        per.append(row)
    return {"batch_sizes": bs, "variance": [float(np.mean(r)) for r in per], "per_batch": per,
            "full_grad_sq_norm": float(full @ full), "n": n, "n_batches": int(n_batches)}


def fit_power_law(alphas: Sequence[float], batch_sizes: Sequence[float], values) -> dict:
    """Least squares ``log v = c + p_α log α + p_b log b`` over the grid ``values[i, j]`` at ``(α_i, b_j)``.

    Returns:
        ``{"p_alpha", "p_batch", "log_c", "rms"}`` (``rms``: root mean square residual in natural
        log units); NaN exponents if a value is not finite and positive or either axis has fewer
        than two distinct values.
    """
    a = np.asarray(alphas, dtype=np.float64)
    b = np.asarray(batch_sizes, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).reshape(len(a), len(b))
    nan = {"p_alpha": math.nan, "p_batch": math.nan, "log_c": math.nan, "rms": math.nan}
    if len(set(a.tolist())) < 2 or len(set(b.tolist())) < 2 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        return nan
    A, Bm = np.meshgrid(np.log(a), np.log(b), indexing="ij")
    X = np.stack([np.ones(A.size), A.ravel(), Bm.ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(X, np.log(v).ravel(), rcond=None)
    res = np.log(v).ravel() - X @ coef
    return {"p_alpha": float(coef[1]), "p_batch": float(coef[2]), "log_c": float(coef[0]), "rms": float(np.sqrt(np.mean(res ** 2)))}
