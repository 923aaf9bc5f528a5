"""Probing the loss landscape along the gradient: loss band, gradient predictiveness, β_eff.

At a training step with batch ``B`` fixed, ``w`` the weights and ``g = ∇L_B(w)``, Santurkar et
al. (2018) move along the gradient to ``w - s g`` for step sizes ``s`` on a grid and record

* the **loss landscape** (loss variation): the band ``[min_s, max_s] L_B(w - s g)``;
* the **gradient predictiveness**: the band of ``‖∇L_B(w) - ∇L_B(w - s g)‖₂``;
* the **effective β-smoothness**: ``β_eff = max_s ‖∇L_B(w) - ∇L_B(w - s g)‖₂ / ‖s g‖₂``.

Claim: with BatchNorm all three are much smaller, especially early in training. For a quadratic
``½ wᵀAw``, ``∇L(w) - ∇L(w - s g) = s A g`` so ``β_eff = ‖A g‖ / ‖g‖`` exactly (a unit test).

:func:`probe_along_gradient` works on a loss closure ``f(params) -> scalar`` (see
:mod:`bnlab.curvature`); :func:`probe_model_along_gradient` is the ``(model, batch, loss_fn)``
wrapper that leaves the model untouched. :func:`relative_loss` (Bjorck et al. 2018) is the loss
part alone, ``L(w - α g) / L(w)`` for step sizes ``α``, on the same closure.

Vectorized or loop (``vectorize``): the ``k`` points are ``k`` loss-and-gradient evaluations.
``True`` evaluates them in one ``torch.func.vmap`` call over the ``k`` stacked parameter sets
(``grad_and_value`` under ``vmap``: a convolution with stacked weights becomes one grouped
convolution, a linear layer one batched matmul); ``False`` loops with ``torch.autograd``.
``"auto"`` evaluates the first point with the loop and times it; if that took less than
``AUTO_VMAP_MAX_SECONDS`` (3 ms) the other ``k - 1`` points go in one ``vmap`` call, else the
loop goes on. ``vmap`` saves per-operator overhead (``k`` times fewer operator calls) but pays
for grouped convolutions, layout copies and ``k`` times the activation memory, so it only wins
when overhead dominates. Measured time of ``vmap`` / loop at k = 8 (BatchNorm nets, float32,
2-core CPU, one evaluation's time in brackets):

=================================  ============  ==================
model                              1 thread      2 threads, idle
=================================  ============  ==================
MLP 64-64-64, batch 32             0.62 (1 ms)
CNN 4-8 ch, 8x8, batch 32          0.68 (2 ms)
MLP 256-256, batch 128             1.04 (2 ms)   0.70 (2 ms)
CNN 8-16 ch, 8x8, batch 64         0.92 (3 ms)
CNN 16-32 ch, 8x8, batch 128       1.19 (8 ms)   1.10 (6 ms)
the same + avgpool, linear(512)    1.44 (13 ms)  1.36 (6 ms)
CNN 16-32 ch, 16x16, batch 128     1.98 (53 ms)  1.99 (17 ms)
CNN 32-64 ch, 16x16, batch 128     2.36 (98 ms)  2.35 (44 ms)
=================================  ============  ==================

(The CNNs end in global average pooling and a linear layer; the "+ avgpool" row is the model of
benchmarks/landscape.py.) One exception: on an *oversubscribed* CPU (more runnable threads than
cores, e.g. two multi-threaded jobs on 2 cores) every parallel operator can stall for a
scheduler time slice, everything runs 10-30x slower and ``vmap``, with fewer operators, came
out 2-5x faster than the loop; there ``torch.set_num_threads(1)`` helps far more. The choice
never changes the numbers beyond round-off (a test checks ``vmap`` against the loop).
If the ``vmap`` call fails, ``"auto"`` falls back to the loop
(``GradientLineScan.vectorized`` tells which ran): e.g. a custom layer that updates a buffer in
place, or dropout in train mode (random operations under ``vmap``).

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, section 3.2 and figure 4.
    Bjorck, Gomes, Selman, Weinberger, "Understanding Batch Normalization", NeurIPS 2018, figure 2
    (the relative loss of one step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from bnlab.curvature import (
    LossClosure,
    check_keys,
    loss_and_grad,
    model_loss_closure,
    model_state_preserved,
)
from bnlab.errors import UserError

__all__ = [
    "AUTO_VMAP_MAX_SECONDS",
    "GradientLineScan",
    "probe_along_gradient",
    "probe_model_along_gradient",
    "relative_loss",
    "relative_loss_of",
]

AUTO_VMAP_MAX_SECONDS = 0.003
"""``vectorize="auto"`` uses ``vmap`` when the first point's evaluation took less than this."""

Vectorize = Union[bool, Literal["auto"]]


@dataclass(frozen=True)
class GradientLineScan:
    """The loss and gradient along ``w - s g`` at one training step.

    Tensors are float64 on the CPU; ``nan``/``inf`` mark points where the loss diverged.
    The bands use min/max that propagate ``nan``: a band over a ``nan`` value is ``(nan, nan)``,
    so a diverged probe cannot pass for a smooth one (``losses`` keeps the per-point values).

    Attributes:
        step_sizes: ``(k,)`` the step sizes ``s``.
        loss0: ``L(w)``.
        grad_norm: ``‖g‖₂``.
        losses: ``(k,)`` ``L(w - s g)``.
        grad_diff_norms: ``(k,)`` ``‖∇L(w) - ∇L(w - s g)‖₂``.
        loss_band: ``(min, max)`` of ``L`` over ``{w} ∪ {w - s g}``.
        grad_band: ``(min, max)`` of ``grad_diff_norms``.
        beta_eff: ``max_{s≠0} ‖∇L(w) - ∇L(w - s g)‖₂ / (|s| ‖g‖₂)`` (``nan`` if ``g = 0``).
        vectorized: whether ``vmap`` evaluated the points (with ``"auto"``: all but the first).
    """

    step_sizes: Tensor
    loss0: float
    grad_norm: float
    losses: Tensor
    grad_diff_norms: Tensor
    loss_band: tuple[float, float]
    grad_band: tuple[float, float]
    beta_eff: float
    vectorized: bool

    @property
    def relative_losses(self) -> Tensor:
        """``L(w - s g) / L(w)``, Bjorck et al.'s relative loss of one step (> 1: divergence)."""
        return self.losses / self.loss0

    def as_dict(self) -> dict:
        """Plain Python numbers and lists, for a metrics record."""
        return {
            "step_sizes": self.step_sizes.tolist(),
            "loss0": self.loss0,
            "grad_norm": self.grad_norm,
            "losses": self.losses.tolist(),
            "grad_diff_norms": self.grad_diff_norms.tolist(),
            "loss_band": list(self.loss_band),
            "grad_band": list(self.grad_band),
            "beta_eff": self.beta_eff,
            "vectorized": self.vectorized,
        }


def _band(t: Tensor) -> tuple[float, float]:
    # torch.amin/amax propagate nan, as documented on GradientLineScan.
    return float(torch.amin(t)), float(torch.amax(t))


def _as_step_sizes(step_sizes) -> Tensor:
    s = torch.as_tensor(step_sizes, dtype=torch.float64).detach().cpu().reshape(-1)
    if s.numel() == 0:
        raise UserError("step_sizes must hold at least one step size")
    if not torch.isfinite(s).all():
        raise UserError(f"step_sizes must be finite, got {s.tolist()}")
    return s


def _eval_loop(f: LossClosure, params, g, steps: list[float]):
    """Loss and ``‖∇L(w) - ∇L(w - s g)‖²`` at each step, one point at a time (float64)."""
    keys = list(params)
    p_list = [params[k] for k in keys]
    g_list = [g[k] for k in keys]
    losses, sq = [], []
    for s in steps:
        point = dict(zip(keys, torch._foreach_add(p_list, g_list, alpha=-s)))
        loss, gs = loss_and_grad(f, point)
        norms = torch._foreach_norm(torch._foreach_sub([gs[k] for k in keys], g_list))
        losses.append(loss.double())
        sq.append(torch.stack(norms).double().pow(2).sum())
    return torch.stack(losses), torch.stack(sq)


def _eval_vmap(f: LossClosure, params, g, steps: Tensor, chunk_size: Optional[int]):
    """The same as :func:`_eval_loop`, all points in one ``vmap`` call."""
    points = {}
    for k, p in params.items():
        s = steps.to(dtype=p.dtype, device=p.device).view(-1, *([1] * p.dim()))
        points[k] = p.unsqueeze(0) - s * g[k].unsqueeze(0)
    gs, losses = torch.func.vmap(torch.func.grad_and_value(f), chunk_size=chunk_size)(points)
    sq = 0.0
    for k, gk in g.items():
        sq = sq + (gs[k] - gk.unsqueeze(0)).flatten(1).norm(dim=1).double().pow(2)
    return losses.double(), sq


def probe_along_gradient(
    f: LossClosure,
    params: dict[str, Tensor],
    step_sizes: Union[Sequence[float], Tensor],
    *,
    grad: Optional[dict[str, Tensor]] = None,
    loss: Optional[Union[float, Tensor]] = None,
    vectorize: Vectorize = "auto",
    chunk_size: Optional[int] = None,
) -> GradientLineScan:
    """Loss band, gradient predictiveness and β_eff along the gradient at ``w``.

    With ``g = ∇L(w)``, for each step size ``s``: ``L(w - s g)`` and
    ``Δ_s = ‖∇L(w) - ∇L(w - s g)‖₂``; then ``loss_band = [min, max]`` of ``L`` over ``w`` and the
    points, ``grad_band = [min_s, max_s] Δ_s``, and ``β_eff = max_{s≠0} Δ_s / (|s| ‖g‖₂)``.
    Cost: ``k`` gradient evaluations, plus one for ``∇L(w)`` unless ``grad`` is given, plus one
    forward pass for ``L(w)`` if ``grad`` is given but ``loss`` is not. Non-finite losses (large
    steps) come out as ``inf``/``nan`` entries, never as an error. ``f`` must be deterministic
    (the same function at every call); the global RNG is not touched by this function.

    Args:
        f: loss closure ``f(params) -> scalar`` (e.g. from
            :func:`bnlab.curvature.model_loss_closure`).
        params: the point ``w``; not modified.
        step_sizes: the ``k`` step sizes ``s`` (finite; usually positive, a grid up to a few
            times the learning rate).
        grad: ``∇L(w)`` if already known (e.g. ``.grad`` after the training step's backward);
            it is both the direction and the reference gradient. Default: computed.
        loss: ``L(w)`` if already known; only used when ``grad`` is given.
        vectorize: ``True`` (one ``vmap`` call), ``False`` (a loop) or ``"auto"`` (see the
            module docstring; falls back to the loop if ``vmap`` fails).
        chunk_size: with ``vmap``, evaluate at most this many points at once (bounds memory).

    Returns:
        A :class:`GradientLineScan`.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
        >>> f = lambda p: 0.5 * p["w"] @ A @ p["w"]
        >>> w = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
        >>> probe = probe_along_gradient(f, w, [0.01, 0.1, 0.2])
        >>> probe.beta_eff  # ‖A g‖ / ‖g‖ with g = A w
        9.95...

    Reference:
        Santurkar et al., "How Does Batch Normalization Help Optimization?", NeurIPS 2018,
        sec. 3.2 (figure 4).
    """
    if vectorize not in (True, False, "auto"):
        raise UserError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    steps = _as_step_sizes(step_sizes)
    if grad is None:
        loss0_t, g = loss_and_grad(f, params)
    else:
        check_keys("grad", grad, params)
        g = {k: grad[k].detach() for k in params}
        if loss is None:
            with torch.no_grad():
                loss0_t = f(params).detach()
        else:
            loss0_t = torch.as_tensor(loss).detach()
    loss0 = float(loss0_t)
    grad_norm = math.sqrt(float(sum(t.double().pow(2).sum() for t in g.values())))

    k = steps.numel()
    vectorized = False
    if vectorize is True:
        losses, sq = _eval_vmap(f, params, g, steps, chunk_size)
        vectorized = True
    elif vectorize is False or k == 1:
        losses, sq = _eval_loop(f, params, g, steps.tolist())
    else:
        # "auto": the first point by the loop, timed; the other k - 1 in one vmap call if that
        # evaluation was cheap (per-operator overhead worth amortizing), else by the loop.
        t0 = time.perf_counter()
        first_loss, first_sq = _eval_loop(f, params, g, steps[:1].tolist())
        seconds = time.perf_counter() - t0
        rest = None
        if seconds < AUTO_VMAP_MAX_SECONDS:
            try:
                rest = _eval_vmap(f, params, g, steps[1:], chunk_size)
                vectorized = True
            except Exception:  # e.g. in-place buffer updates or random ops under vmap
                rest = None
        if rest is None:
            rest = _eval_loop(f, params, g, steps[1:].tolist())
        losses = torch.cat([first_loss, rest[0]])
        sq = torch.cat([first_sq, rest[1]])
    losses = losses.detach().cpu()
    diffs = sq.detach().cpu().sqrt()
    nz = steps != 0
    if bool(nz.any()):
        beta = float(torch.amax(diffs[nz] / (steps[nz].abs() * grad_norm)))
    else:
        beta = math.nan
    return GradientLineScan(
        step_sizes=steps,
        loss0=loss0,
        grad_norm=grad_norm,
        losses=losses,
        grad_diff_norms=diffs,
        loss_band=_band(torch.cat([torch.tensor([loss0], dtype=torch.float64, device=losses.device), losses])),
        grad_band=_band(diffs),
        beta_eff=beta,
        vectorized=vectorized,
    )


def probe_model_along_gradient(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]],
    step_sizes: Union[Sequence[float], Tensor],
    *,
    grad: Optional[dict[str, Tensor]] = None,
    loss: Optional[Union[float, Tensor]] = None,
    vectorize: Vectorize = "auto",
    chunk_size: Optional[int] = None,
    rng: Optional[tuple] = None,
) -> GradientLineScan:
    """:func:`probe_along_gradient` for the batch loss of ``model``; the model is left unchanged.

    The loss is ``loss_fn(model(x), y)`` (or the model's ``output.loss`` on a dict batch) as a
    function of the trainable parameters, built by
    :func:`bnlab.curvature.model_loss_closure`: BatchNorm layers in train mode normalize each
    probe point with the batch's own statistics (as the training step does) and update no
    running statistic, also under ``vmap``. No parameter, buffer, ``.grad``, training flag or RNG
    state changes. Dropout in train mode draws the same masks at every probe point (the RNG state
    is fixed per call, see :func:`bnlab.curvature.model_loss_closure`); random layers cannot run
    under ``vmap``, so ``"auto"`` then loops. Batches may be dicts and outputs ``ModelOutput`` objects
    (:mod:`bnlab.adapters`); attention runs on the math backend.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict of model inputs (see :mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(logits, y) -> scalar``; ``None``: the model's own ``output.loss``.
        step_sizes: the step sizes ``s``.
        grad: ``∇L_B(w)`` keyed by trainable parameter name, if known; at the ``after_backward``
            event of a step it is ``{n: p.grad for n, p in model.named_parameters()
            if p.requires_grad}`` (when the loss has no extra terms).
        loss: ``L_B(w)``, if known (with ``grad``).
        vectorize: ``True``, ``False`` or ``"auto"``.
        chunk_size: see :func:`probe_along_gradient`.
        rng: the random-number state every probe point starts from
            (:func:`bnlab.curvature.rng_snapshot`, taken before the training forward pass: the
            training step's dropout masks, so that ``grad`` and the probe points share them);
            ``None``: the state now.

    Returns:
        A :class:`GradientLineScan`.

    Example:
        >>> probe = probe_model_along_gradient(model, (x, y), nn.functional.cross_entropy,
        ...                                    torch.linspace(0.05, 0.4, 8))
        >>> probe.loss_band, probe.grad_band, probe.beta_eff

    Reference:
        Santurkar et al., NeurIPS 2018, sec. 3.2.
    """
    with model_state_preserved(model):
        f, params = model_loss_closure(model, batch, loss_fn, rng=rng)
        return probe_along_gradient(
            f,
            params,
            step_sizes,
            grad=grad,
            loss=loss,
            vectorize=vectorize,
            chunk_size=chunk_size,
        )


# --------------------------------------------------------------------------------------------
# relative loss of one step (Bjorck et al.)


def relative_loss_of(f: LossClosure, params: dict[str, Tensor], alphas: Any, *, vectorize: Vectorize = "auto") -> Tensor:
    """The relative loss of one gradient step, ``L(w - α ∇L(w)) / L(w)``, for each ``α``.

    Above 1 the step of size ``α`` increases the loss (Bjorck et al.: without BN this happens
    once ``α`` exceeds about 1e-3; with BN only at much larger ``α``).

    Args:
        f: loss closure of a parameter dict, ``f(params) -> scalar``.
        params: the point ``w`` (a dict of tensors; not modified).
        alphas: step sizes ``α`` (a sequence or 1-D tensor).
        vectorize: ``True``: evaluate all ``α`` in one ``torch.func.vmap`` call; ``False``: loop;
            ``"auto"``: vmap, looping if vmap fails (random ops, data-dependent control flow).

    Returns:
        ``[len(alphas)]`` float64 tensor on the CPU (``inf``/``nan`` where the loss diverged).

    Raises:
        UserError: no step size, or a non-finite one.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 10.0]))
        >>> f = lambda p: 0.5 * p["w"] @ A @ p["w"]
        >>> relative_loss_of(f, {"w": torch.ones(2)}, [0.01, 0.1, 0.3])

    Reference:
        Bjorck, Gomes, Selman, Weinberger, "Understanding Batch Normalization", NeurIPS 2018,
        figure 2 (relative loss against step size).
    """
    a = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu().reshape(-1)
    if a.numel() == 0:
        raise UserError("alphas must hold at least one step size")
    if not torch.isfinite(a).all():
        raise UserError(f"alphas must be finite, got {a.tolist()}")
    grads, loss0 = torch.func.grad_and_value(f)(params)
    ref = next(iter(params.values()))
    a = a.to(device=ref.device, dtype=ref.dtype)

    def at(alpha: Tensor) -> Tensor:
        return f({k: p - alpha * grads[k] for k, p in params.items()})

    vals = None
    if vectorize is not False:
        try:
            vals = torch.func.vmap(at)(a)
        except (RuntimeError, NotImplementedError):
            if vectorize is True:
                raise
    if vals is None:
        vals = torch.stack([at(a[j]) for j in range(a.numel())])
    return (vals.detach().double() / loss0.detach().double()).cpu()


def relative_loss(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]],
    alphas: Any,
    *,
    train_mode: bool = True,
    vectorize: Vectorize = "auto",
) -> Tensor:
    """``L_B(w - α ∇L_B(w)) / L_B(w)`` of ``model`` on one batch for each ``α``; the model is unchanged.

    ``L_B(w) = loss_fn(model(x; w), y)`` (or a dict batch, :mod:`bnlab.adapters`) on the same batch at every point, the closure
    of :func:`bnlab.curvature.model_loss_closure`. With ``train_mode`` (default) the loss is
    taken in training mode whatever the model's current mode: BatchNorm normalizes with the
    statistics of the batch under the weights being evaluated (``w`` or ``w - α g``), as during
    training; its running statistics are neither used nor updated. Parameters, buffers,
    ``.grad``, every module's training flag and the RNG state are the same afterwards. Frozen
    parameters (``requires_grad=False``) do not move. Stochastic layers (dropout in train mode)
    draw the same masks at every evaluation (the RNG state is fixed per call, see
    :func:`bnlab.curvature.model_loss_closure`) and cannot run under ``vmap`` (``"auto"`` then
    loops); use ``train_mode=False`` on a model in eval mode to measure without them.

    Args:
        model: the network.
        batch: ``(x, y)`` or a dict of model inputs (see :mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(logits, y) -> scalar``, e.g. ``F.cross_entropy``; ``None``: the
            model's own ``output.loss`` (a Hugging Face model given ``labels``).
        alphas: step sizes ``α``.
        train_mode: evaluate in training mode (BN batch statistics); ``False`` keeps the model's
            current modes.
        vectorize: see :func:`relative_loss_of`.

    Returns:
        ``[len(alphas)]`` float64 CPU tensor.

    Example:
        >>> net = models.make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> relative_loss(net, (x, y), F.cross_entropy, torch.logspace(-4, 1, 11))

    Reference:
        Bjorck et al., NeurIPS 2018, section 3 and figure 2.
    """
    with model_state_preserved(model):
        if train_mode:
            model.train()
        f, params = model_loss_closure(model, batch, loss_fn)
        return relative_loss_of(f, params, alphas, vectorize=vectorize)
