"""Scale invariance and auto rate-tuning (Arora, Li, Lyu, ICLR 2019): find, check, use.

A parameter tensor ``w`` is **scale-invariant** when ``L(c w) = L(w)`` for every ``c > 0``. Weights
whose output is normalized (conv/linear before BatchNorm in train mode) are the standard case.
Then (the paper's lemma)::

    ⟨∇L(w), w⟩ = 0          and          ∇L(c w) = ∇L(w) / c,

so one plain SGD step ``w' = w - η g`` satisfies ``‖w'‖² = ‖w‖² + η² ‖g‖²`` and the step acts on the
direction ``w / ‖w‖`` with the **effective learning rate** ``η / ‖w‖²``.

This module:

* :func:`find_scale_invariant` finds the scale-invariant parameters of any ``nn.Module`` numerically
  (loss and gradient at several ``c`` against ``c = 1``, on a float64 train-mode copy);
* :func:`check_scale_invariance` measures the lemma on given groups;
* :func:`split_param_groups` builds optimizer parameter groups with a separate LR for the
  scale-invariant weights (the theorem's setting);
* :func:`effective_lr`, :func:`angle_between`, :func:`norm_identity_residual` are the pure math;
* :func:`compare_trajectories` measures how far two runs are apart in direction (e.g. a
  weight-decay run and its exponential-LR equivalent, :mod:`bnlab.schedules`);
* :func:`make_fully_scale_invariant` freezes what is not scale-invariant (Li & Arora's setting).

Reference:
    S. Arora, Z. Li, K. Lyu. Theoretical Analysis of Auto Rate-Tuning by Batch Normalization.
    ICLR 2019. https://arxiv.org/abs/1812.03981
    Z. Li, S. Arora. An Exponential Learning Rate Schedule for Deep Learning. ICLR 2020.
    https://arxiv.org/abs/1910.07454 (fully scale-invariant networks, comparing runs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .adapters import compute_loss, is_dict_batch
from .adapters import forward as adapter_forward
from .errors import UserError, check_positive
from .functional import stateless_call

__all__ = [
    "PER_CHANNEL_SUFFIX",
    "ScaleInvariantGroup",
    "InvarianceCheck",
    "find_scale_invariant",
    "check_scale_invariance",
    "split_param_groups",
    "effective_lr",
    "angle_between",
    "norm_identity_residual",
    "compare_trajectories",
    "make_fully_scale_invariant",
]

#: Appended to the parameter name of a group that is invariant per output channel.
PER_CHANNEL_SUFFIX = "[per_channel]"

# A parameter is rejected before the scaling checks when |⟨∇L(w), w⟩| / (‖∇L(w)‖ ‖w‖) exceeds
# this multiple of tol: the derivative of c -> L(c w) at c = 1 is then clearly nonzero, which
# disproves invariance. Generous, so that the scaling checks stay the arbiter.
_PREFILTER_FACTOR = 100.0
# The loss "depends" on a tensor when a random perturbation of its own size changes the loss by
# more than this (relative): well above float64 round-off, far below any real dependence.
_DEPENDENCE_TOL = 1e-10
# eps of torch's normalization layers on the detection copy: zero in effect (float64 variances
# are never this small), yet no 0/0 for a constant channel.
_DETECTION_NORM_EPS = 1e-30
_NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())
_TINY = torch.finfo(torch.float64).tiny


# --------------------------------------------------------------------------- results


@dataclass(eq=False)
class ScaleInvariantGroup:
    """A parameter tensor found scale-invariant: ``L(c w) = L(w)`` for all ``c > 0``.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``; with the suffix
            ``"[per_channel]"`` when the tensor is also invariant per output channel.
        param: the model's own parameter (not a copy).
        per_channel: ``True`` when every slice ``param[i]`` along dim 0 is scale-invariant on its
            own (``L`` unchanged when each slice is scaled by its own ``c_i > 0``): each filter of a
            conv before BatchNorm. Dim 0 is the output channel of ``Linear``/``Conv*d`` (for
            ``ConvTranspose*d`` it is the input channel). ``False`` for 0-d tensors.
        max_violation: the largest relative violation measured over the checks behind this group
            (whole-tensor scales, and per-channel trials when ``per_channel``): the larger of
            ``|L(c w) - L(w)| / |L(w)|`` and ``‖c ∇L(c w) - ∇L(w)‖ / ‖∇L(w)‖``.
    """

    name: str
    param: torch.Tensor = field(repr=False)
    per_channel: bool
    max_violation: float

    @property
    def param_name(self) -> str:
        """The parameter's name in ``model.named_parameters()`` (``name`` without the suffix)."""
        return self.name[: -len(PER_CHANNEL_SUFFIX)] if self.name.endswith(PER_CHANNEL_SUFFIX) else self.name


@dataclass
class InvarianceCheck:
    """The lemma measured on one parameter tensor (see :func:`check_scale_invariance`).

    All numbers are relative and dimensionless; each is 0 for an exactly scale-invariant ``w``
    (up to round-off and BatchNorm's ``eps``), ``nan`` when undefined (0/0).

    Attributes:
        name: the group's name.
        grad_cosine: ``|⟨g, w⟩| / (‖g‖ ‖w‖)`` with ``g = ∇L(w)``.
        channel_grad_cosine: ``max_i |⟨g_i, w_i⟩| / (‖g_i‖ ‖w_i‖)`` over slices along dim 0
            (the per-channel lemma); ``nan`` for 0-d tensors.
        loss_change: ``max_c |L(c w) - L(w)| / |L(w)|``.
        grad_scaling_error: ``max_c ‖c ∇L(c w) - ∇L(w)‖ / ‖∇L(w)‖``.
        loss_change_by_scale: ``loss_change`` for each ``c``.
        grad_scaling_error_by_scale: ``grad_scaling_error`` for each ``c``.
    """

    name: str
    grad_cosine: float
    channel_grad_cosine: float
    loss_change: float
    grad_scaling_error: float
    loss_change_by_scale: dict = field(default_factory=dict)
    grad_scaling_error_by_scale: dict = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The largest of ``grad_cosine``, ``loss_change`` and ``grad_scaling_error`` (``nan`` if any is)."""
        values = (self.grad_cosine, self.loss_change, self.grad_scaling_error)
        return math.nan if any(math.isnan(v) for v in values) else max(values)


# --------------------------------------------------------------------------- helpers


def _ratio(num: float, den: float) -> float:
    """``num / den`` with 0/0 = nan and x/0 = inf."""
    if den > 0:
        return num / den
    return math.nan if num == 0 else math.inf


def _rel_error(num: float, den: float) -> float:
    """``num / den`` for an error ``num`` relative to a size ``den``; 0/0 = 0 (both exact), x/0 = inf."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _rel_change(value: float, ref: float) -> float:
    """``|value - ref| / |ref|`` (``inf`` when ``value`` is not finite)."""
    if not math.isfinite(value):
        return math.inf
    return abs(value - ref) / max(abs(ref), _TINY)


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    try:
        scales = tuple(float(c) for c in scales)
    except (TypeError, ValueError):
        raise UserError(f"scales must be a sequence of numbers > 0 other than 1, got {scales!r}") from None
    if not scales or any(not (math.isfinite(c) and c > 0 and c != 1) for c in scales):
        raise UserError(f"scales must be a non-empty sequence of numbers > 0 other than 1, got {scales!r}")
    return scales


def _to_float64(obj: Any) -> Any:
    """Floating tensors (also inside tuples, lists, dicts) converted to float64; the rest as is."""
    if isinstance(obj, torch.Tensor):  # a copy, so inference-mode inputs work with autograd
        return obj.detach().to(torch.float64, copy=True) if obj.is_floating_point() else obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float64(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_float64(v) for k, v in obj.items()}
    return obj


class _Float64Copy:
    """A float64, train-mode copy of a model and a fixed batch: evaluates ``L`` and ``∇L``.

    The user's model is never called, so its parameters, buffers, ``.grad``, mode and dtype stay
    as they are. With ``zero_norm_eps`` the ``eps`` of torch's normalization layers is set to
    ~0 on the copy, which makes the invariance exact. Each evaluation reseeds a forked RNG, so
    stochastic layers (dropout) draw the same masks every time and the global RNG is untouched.
    """

    def __init__(self, model: torch.nn.Module, batch: Any, loss_fn: Optional[Callable], seed: int,
                 zero_norm_eps: bool) -> None:
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise UserError(f"loss_fn must be callable as loss_fn(output, y), got {type(loss_fn).__name__}")
        if is_dict_batch(batch):
            if not batch:
                raise UserError("batch must be a pair (x, y) or a non-empty dict of model inputs, got an empty dict")
        elif not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise UserError(f"batch must be a pair (x, y) or a dict of model inputs, got {type(batch).__name__}")
        elif loss_fn is None:
            raise UserError("loss_fn is required with an (x, y) batch (None means the model's own output.loss, "
                            "for dict batches)")
        try:
            self.model = copy.deepcopy(model)
        except Exception as exc:  # noqa: BLE001 - any failure means we cannot work on a copy
            raise UserError(f"cannot copy the model with copy.deepcopy ({type(exc).__name__}: {exc})") from None
        self.model.to(torch.float64).train()
        if zero_norm_eps:
            for m in self.model.modules():
                if isinstance(m, _NORM_TYPES):
                    m.eps = _DETECTION_NORM_EPS
        for p in self.model.parameters():
            p.grad = None
            p.requires_grad_(True)
        self.params = dict(self.model.named_parameters())
        self.batch = _to_float64(dict(batch) if is_dict_batch(batch) else tuple(batch))
        self.loss_fn = loss_fn
        self.seed = seed
        inputs = self.batch.values() if isinstance(self.batch, dict) else self.batch
        devices = {p.device for p in self.params.values()} | {
            t.device for t in inputs if isinstance(t, torch.Tensor)
        }
        self._cuda = [d.index or 0 for d in devices if d.type == "cuda"]

    def loss(self, *, grad: bool) -> torch.Tensor:
        """``L`` at the copy's current parameters (with autograd on or off, whatever the caller's mode)."""
        with torch.random.fork_rng(devices=self._cuda), torch.set_grad_enabled(grad):
            torch.manual_seed(self.seed)
            out = compute_loss(adapter_forward(self.model, self.batch), self.batch, self.loss_fn)
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                raise UserError("loss_fn(model(x), y) must return a scalar tensor")
            return out.reshape(())

    def loss_value(self) -> float:
        return float(self.loss(grad=False))

    def grads(self) -> tuple[float, dict[str, Optional[torch.Tensor]]]:
        """``L(w)`` and ``∇L(w)`` for every parameter (``None`` where not in the graph)."""
        names = list(self.params)
        return self._grad([self.params[n] for n in names], names)

    def grad_of(self, name: str) -> tuple[float, Optional[torch.Tensor]]:
        """``L(w)`` and ``∇_name L(w)`` (``None`` when that parameter is not in the graph)."""
        loss, grads = self._grad([self.params[name]], [name])
        return loss, grads[name]

    def _grad(self, params: list, names: list) -> tuple[float, dict]:
        loss = self.loss(grad=True)
        if not loss.requires_grad:
            return float(loss), {n: None for n in names}
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss.detach()), dict(zip(names, grads))

    def set_(self, name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.params[name].copy_(value)


def _channel_factors(n: int, scales: tuple[float, ...], gen: torch.Generator) -> torch.Tensor:
    """``n`` per-channel factors, log-uniform over the range spanned by ``scales`` and ``1/scales``."""
    lo = min(min(scales), 1 / max(scales))
    hi = max(max(scales), 1 / min(scales))
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _resolve(
    model: torch.nn.Module, groups: Iterable, what: str
) -> list[tuple[str, torch.Tensor, Optional[ScaleInvariantGroup]]]:
    """``(param name, model's param, group or None)`` for groups given as groups, names or tensors."""
    by_name = dict(model.named_parameters())
    by_id = {id(p): n for n, p in by_name.items()}
    out = []
    for g in groups:
        if isinstance(g, ScaleInvariantGroup):
            name = g.param_name
            if by_name.get(name) is not g.param:
                name = by_id.get(id(g.param))
            if name is None:
                raise UserError(f"{what}: group {g.name!r} is not a parameter of this model")
            out.append((name, by_name[name], g))
        elif isinstance(g, str):
            if g not in by_name:
                raise UserError(f"{what}: no parameter named {g!r} in the model")
            out.append((g, by_name[g], None))
        elif isinstance(g, torch.Tensor):
            if id(g) not in by_id:
                raise UserError(f"{what}: a given tensor is not a parameter of this model")
            out.append((by_id[id(g)], g, None))
        else:
            raise UserError(
                f"{what}: groups must be ScaleInvariantGroup, parameter names or parameters, got {type(g).__name__}"
            )
    return out


# --------------------------------------------------------------------------- detection


def find_scale_invariant(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Optional[Callable] = None,
    *,
    scales: Sequence[float] = (0.5, 2.0, 7.3),
    tol: float = 1e-4,
    zero_norm_eps: bool = True,
    seed: int = 0,
) -> list[ScaleInvariantGroup]:
    """The parameter tensors whose scaling by any ``c > 0`` leaves the loss unchanged.

    A tensor ``w`` (all other parameters fixed) is reported when, on the batch, for every ``c`` in
    ``scales``::

        |L(c w) - L(w)| / |L(w)| <= tol    and    ‖c ∇L(c w) - ∇L(w)‖ / ‖∇L(w)‖ <= tol

    (the loss is unchanged, and so is its gradient as the lemma requires; the gradient test is
    the sharp one when the loss hardly depends on anything, e.g. cross-entropy ≈ log C at
    initialization). It is also reported ``per_channel`` when the same holds with every slice
    ``w[i]`` (dim 0) scaled by its own ``c_i`` (``max(len(scales), 2)`` random trials, ``c_i``
    log-uniform over the range of ``scales`` and ``1/scales``; the gradient test per slice is
    ``c_i ∇_i L(c ⊙ w) = ∇_i L(w)``). The numerical check decides; it works on any ``nn.Module``
    with its own ``forward``. Rules it recovers (BatchNorm in train mode):

    * conv/linear -> BatchNorm: invariant per channel, with or without bias (BN subtracts the
      per-channel mean, which removes the bias);
    * linear -> LayerNorm: invariant as a whole but not per channel without bias, not at all with
      bias (LayerNorm normalizes across features, so a bias is not removed);
    * conv -> GroupNorm: as a whole only; per channel when each group is one channel; a bias
      breaks it unless each group is one channel;
    * a layer whose output is added to a skip connection, the classifier, every layer of a net
      without normalization: not invariant;
    * BatchNorm's ``γ`` feeding a conv/linear -> BN through a positively homogeneous map (no
      ReLU, or a ReLU while ``β = 0``): invariant as a whole, not per channel; ``β``: never.

    Transformers (tested on tiny Hugging Face models, tests/integrations/test_transformers.py):

    * **QK-LayerNorm** (query and key projections without bias, each followed by a LayerNorm
      over the head dimension without bias, as in ViT-22B; RMSNorm behaves the same): the query and key
      projection weights are found, as a whole (not per row: LayerNorm mixes the rows of a
      head). ``q = LN(W_q x)`` does not change when ``W_q`` is scaled, and nothing else reads
      ``W_q``. In a block whose residual sum ``x + o(attn(x))`` goes straight into a LayerNorm,
      the token embedding is found too: with ``q``, ``k`` normalized, attention ignores the scale
      of ``x``, ``v`` and the output scale with it, and the LayerNorm removes that scale.
    * **Post-LN BERT** (``BertForSequenceClassification``): none. Every LayerNorm there
      normalizes ``x + F(x)``, the residual stream plus the sub-layer's output: scaling the
      weights of ``F`` scales only the second term, so the input of the norm changes direction,
      not just length. And every projection has a bias (``W x + b`` is not positively homogeneous
      in ``W``), the LayerNorms have a bias ``β``, and attention logits are quadratic in the
      query/key scale (softmax is not scale-invariant). The embedding LayerNorm normalizes a sum of
      three embeddings; its ``γ``/``β`` feed attention and the residual stream. A pre-LN GPT-2
      likewise has none.

    Excluded although ``L(c w) = L(w)`` holds trivially:

    * tensors the loss does not depend on: a bias right before BatchNorm, a ``β`` whose shift
      a later BN removes, parameters outside the graph. Their gradient is zero, no learning rate
      matters for them. Test: a random perturbation of the size of ``w`` changes the loss by no
      more than round-off (``1e-10`` relative);
    * all-zero tensors (e.g. BN's ``β`` at initialization): scaling them is a no-op.

    Detection runs on a float64 copy in **train mode**: BatchNorm in eval mode is an affine map
    with fixed running statistics, so nothing before it is scale-invariant there; the theory is
    about training. With ``zero_norm_eps`` (default) the ``eps`` of torch's normalization layers
    (BatchNorm*, InstanceNorm*, LayerNorm, GroupNorm, RMSNorm) is set to ~0 on the copy, which
    makes the invariance exact (the theory's BN has no ``eps``; with ``eps`` the loss changes by
    ~``eps / Var`` relative, large for small ``c`` or low-variance channels). Normalization
    written by hand keeps its ``eps``: raise ``tol`` if needed. The result holds at the given
    parameter values (``γ`` before a ReLU is invariant only while ``β = 0``). The user's model is
    not touched: parameters, buffers, ``.grad``, mode, dtype, global RNG. A tensor with
    ``|⟨∇L(w), w⟩| > 100 · tol · ‖∇L(w)‖ ‖w‖`` is rejected early (a nonzero derivative of
    ``c -> L(c w)`` disproves invariance). Cost: one forward-backward pass, then up to
    ``len(scales) + max(len(scales), 2)`` forward-backward passes and one forward pass per
    candidate.

    Args:
        model: any ``nn.Module``; ``model(x)`` gives the output ``loss_fn`` expects.
        batch: ``(x, y)``, or a dict of model inputs (``model(**batch)``, Hugging Face style, see
            :mod:`bnlab.adapters`); floating tensors are converted to float64.
        loss_fn: ``loss_fn(model(x), y) -> scalar tensor`` (a ``ModelOutput``'s ``logits`` are
            passed); ``None`` with a dict batch: the model's own ``output.loss``.
        scales: the factors ``c > 0`` (``!= 1``) to test.
        tol: the largest relative change of the loss and of the rescaled gradient accepted as
            "unchanged".
        zero_norm_eps: set the ``eps`` of torch normalization layers to ~0 on the copy.
        seed: seeds the per-channel factors, the perturbation and the RNG of stochastic layers
            (dropout draws the same mask at every evaluation).

    Returns:
        One :class:`ScaleInvariantGroup` per scale-invariant parameter, in
        ``model.named_parameters()`` order; ``param`` is the model's own parameter.

    Raises:
        UserError: bad ``scales``/``tol``/``batch``, a non-scalar or non-finite loss, or a model
            that cannot be copied with ``copy.deepcopy``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8),
        ...                           torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> [(g.name, g.per_channel) for g in find_scale_invariant(
        ...     net, (x, y), torch.nn.functional.cross_entropy)]
        [('0.weight[per_channel]', True)]

    Reference:
        Arora, Li, Lyu (ICLR 2019), Sec. 2 (scale-invariant parameters) and Lemma 2.4.
    """
    scales = _check_scales(scales)
    check_positive("tol", tol)
    probe = _Float64Copy(model, batch, loss_fn, seed, zero_norm_eps)
    user_params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)

    loss0, grads = probe.grads()
    if not math.isfinite(loss0):
        raise UserError(f"the loss is not finite ({loss0}) at the given parameters; cannot test scale invariance")

    def violation(name: str, w0: torch.Tensor, g0: torch.Tensor, factors) -> float:
        """max(relative loss change, relative gradient error) with w = factors * w0."""
        probe.set_(name, factors * w0)
        loss_c, g_c = probe.grad_of(name)
        probe.set_(name, w0)
        if g_c is None or not math.isfinite(loss_c):
            return math.inf
        return max(_rel_change(loss_c, loss0), _rel_error(float((factors * g_c - g0).norm()), float(g0.norm())))

    found = []
    for name, p in probe.params.items():
        g0 = grads[name]
        w0 = p.detach().clone()
        if w0.numel() == 0 or g0 is None or not bool(torch.any(w0 != 0)):
            continue  # not in the graph, or all zero: scaling cannot change anything
        if _rel_error(abs(float(torch.sum(g0 * w0))), float(g0.norm() * w0.norm())) > _PREFILTER_FACTOR * tol:
            continue  # dL(cw)/dc at c = 1 is clearly nonzero (or g is round-off: unused)

        worst = 0.0
        for c in scales:  # the whole tensor
            worst = max(worst, violation(name, w0, g0, c))
            if worst > tol:
                break
        if worst > tol:
            continue

        direction = torch.randn(w0.shape, generator=gen, dtype=torch.float64).to(w0.device)
        probe.set_(name, w0 + direction * (w0.norm() / direction.norm()))
        depends = _rel_change(probe.loss_value(), loss0) > _DEPENDENCE_TOL
        probe.set_(name, w0)
        if not depends:
            continue  # the loss does not depend on w: trivially, uselessly invariant

        per_channel = False
        if w0.dim() >= 1:
            per_channel, channel_worst = True, 0.0
            shape = (-1,) + (1,) * (w0.dim() - 1)
            for _ in range(max(len(scales), 2)):
                factors = _channel_factors(w0.shape[0], scales, gen).to(w0.device).reshape(shape)
                channel_worst = max(channel_worst, violation(name, w0, g0, factors))
                if channel_worst > tol:
                    per_channel = False
                    break
            if per_channel:
                worst = max(worst, channel_worst)

        found.append(
            ScaleInvariantGroup(
                name=name + (PER_CHANNEL_SUFFIX if per_channel else ""),
                param=user_params[name],
                per_channel=per_channel,
                max_violation=worst,
            )
        )
    return found


def check_scale_invariance(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Optional[Callable],
    groups: Optional[Iterable] = None,
    *,
    scales: Sequence[float] = (0.5, 2.0),
    zero_norm_eps: bool = False,
    seed: int = 0,
) -> dict[str, InvarianceCheck]:
    """The lemma, measured: how far each group is from ``⟨∇L(w), w⟩ = 0`` and ``∇L(c w) = ∇L(w)/c``.

    For each group ``w`` (the others fixed), on a float64 train-mode copy of the model::

        grad_cosine        = |⟨g, w⟩| / (‖g‖ ‖w‖),                g = ∇L(w)
        loss_change        = max_c |L(c w) - L(w)| / |L(w)|
        grad_scaling_error = max_c ‖c ∇L(c w) - ∇L(w)‖ / ‖∇L(w)‖

    plus ``channel_grad_cosine``, the first quantity per slice along dim 0 (its maximum). All are
    ~0 for a scale-invariant ``w`` and O(1) otherwise; by default the model is measured as it is,
    so normalization ``eps`` shows (values ~``eps / Var``); ``zero_norm_eps=True`` sets it to ~0 as
    :func:`find_scale_invariant` does. Train mode, like detection. The user's model is not
    touched.

    Args:
        model: any ``nn.Module``.
        batch: ``(x, y)`` or a dict of model inputs (:mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(model(x), y) -> scalar tensor``; ``None`` with a dict batch: the
            model's own ``output.loss``.
        groups: :class:`ScaleInvariantGroup` s, parameter names or parameters of ``model``;
            ``None`` runs :func:`find_scale_invariant` first.
        scales: the factors ``c > 0`` (``!= 1``).
        zero_norm_eps: set the ``eps`` of torch normalization layers to ~0 on the copy.
        seed: seeds the RNG of stochastic layers (same masks at every evaluation).

    Returns:
        ``{group name: InvarianceCheck}`` (the name is the parameter name for names/tensors).

    Example:
        >>> checks = check_scale_invariance(net, (x, y), F.cross_entropy, ["0.weight", "3.weight"])
        >>> checks["0.weight"].grad_cosine < 1e-3 < checks["3.weight"].grad_cosine  # BN eps: ~1e-5
        True

    Reference:
        Arora, Li, Lyu (ICLR 2019), Lemma 2.4.
    """
    scales = _check_scales(scales)
    if groups is None:
        groups = find_scale_invariant(model, batch, loss_fn, seed=seed)
    resolved = _resolve(model, groups, "check_scale_invariance")
    probe = _Float64Copy(model, batch, loss_fn, seed, zero_norm_eps)
    results: dict[str, InvarianceCheck] = {}
    for name, _param, group in resolved:
        label = group.name if group is not None else name
        w0 = probe.params[name].detach().clone()
        loss0, g0 = probe.grad_of(name)
        if not math.isfinite(loss0):
            raise UserError(f"the loss is not finite ({loss0}) at the given parameters")
        g0 = torch.zeros_like(w0) if g0 is None else g0
        w_norm, g_norm = float(w0.norm()), float(g0.norm())
        grad_cos = _ratio(abs(float(torch.sum(g0 * w0))), g_norm * w_norm)
        if w0.dim() >= 1 and w0.numel() > 0:
            wf, gf = w0.reshape(w0.shape[0], -1), g0.reshape(g0.shape[0], -1)
            denom = wf.norm(dim=1) * gf.norm(dim=1)
            dots = (wf * gf).sum(dim=1).abs()
            ok = denom > 0
            channel_cos = float((dots[ok] / denom[ok]).max()) if bool(ok.any()) else math.nan
        else:
            channel_cos = math.nan
        loss_by, grad_by = {}, {}
        for c in scales:
            probe.set_(name, c * w0)
            loss_c, g_c = probe.grad_of(name)
            g_c = torch.zeros_like(w0) if g_c is None else g_c
            loss_by[c] = _rel_change(loss_c, loss0)
            grad_by[c] = _ratio(float((c * g_c - g0).norm()), g_norm)
        probe.set_(name, w0)
        results[label] = InvarianceCheck(
            name=label,
            grad_cosine=grad_cos,
            channel_grad_cosine=channel_cos,
            loss_change=max(loss_by.values()),
            grad_scaling_error=max(grad_by.values()),
            loss_change_by_scale=loss_by,
            grad_scaling_error_by_scale=grad_by,
        )
    return results


# --------------------------------------------------------------------------- optimizer groups


def split_param_groups(
    model: torch.nn.Module,
    *,
    scale_invariant_lr: float,
    other_lr: float,
    groups: Optional[Iterable] = None,
    batch: Any = None,
    loss_fn: Optional[Callable] = None,
    **optimizer_kwargs: Any,
) -> list[dict]:
    """Optimizer parameter groups giving the scale-invariant weights their own learning rate.

    The theorem's setting: the LR of the scale-invariant weights is any constant (the effective
    rate ``η / ‖w_t‖²`` tunes itself), only the LR of the other parameters is tuned. Every
    parameter of ``model`` appears exactly once (as in ``model.parameters()``); the result works
    with any ``torch.optim`` optimizer::

        [{"params": [...], "lr": scale_invariant_lr, "name": "scale_invariant", **optimizer_kwargs},
         {"params": [...], "lr": other_lr,          "name": "other",           **optimizer_kwargs}]

    Both groups are always present (either may be empty). The theorem assumes no momentum and no
    weight decay; pass them in ``optimizer_kwargs`` to study other settings.

    Args:
        model: the model.
        scale_invariant_lr: LR of the scale-invariant parameters (``>= 0``).
        other_lr: LR of all other parameters (``>= 0``).
        groups: :class:`ScaleInvariantGroup` s, parameter names or parameters of ``model``;
            ``None`` runs :func:`find_scale_invariant` on ``batch`` and ``loss_fn``.
        batch: ``(x, y)``, needed only when ``groups`` is ``None``.
        loss_fn: ``loss_fn(model(x), y)``, needed only when ``groups`` is ``None``.
        **optimizer_kwargs: added to both groups (e.g. ``momentum=0.9``).

    Returns:
        A list of two parameter-group dicts for ``torch.optim.*``.

    Example:
        >>> pg = split_param_groups(net, scale_invariant_lr=0.3, other_lr=0.05, batch=(x, y),
        ...                         loss_fn=F.cross_entropy)
        >>> opt = torch.optim.SGD(pg, lr=0.05)

    Reference:
        Arora, Li, Lyu (ICLR 2019), Theorem 4.2 (GD) and 4.5 (SGD).
    """
    check_positive("scale_invariant_lr", scale_invariant_lr, allow_zero=True)
    check_positive("other_lr", other_lr, allow_zero=True)
    for key in ("params", "lr", "name"):
        if key in optimizer_kwargs:
            raise UserError(f"split_param_groups sets {key!r} itself; do not pass it")
    if groups is None:
        if batch is None or loss_fn is None:
            raise UserError("split_param_groups needs groups, or batch and loss_fn to find them")
        groups = find_scale_invariant(model, batch, loss_fn)
    invariant_ids = {id(p) for _, p, _ in _resolve(model, groups, "split_param_groups")}
    invariant, other = [], []
    for p in model.parameters():
        (invariant if id(p) in invariant_ids else other).append(p)
    return [
        {"params": invariant, "lr": scale_invariant_lr, "name": "scale_invariant", **optimizer_kwargs},
        {"params": other, "lr": other_lr, "name": "other", **optimizer_kwargs},
    ]


# --------------------------------------------------------------------------- pure math


def effective_lr(lr, weight_norm):
    """Effective learning rate of a scale-invariant group: ``η_eff = η / ‖w‖²``.

    A step ``w - η ∇L(w)`` moves the direction ``w/‖w‖`` like a step of size ``η/‖w‖²`` on the
    unit sphere (since ``∇L(w) = ∇L(w/‖w‖) / ‖w‖``).

    Args:
        lr: the learning rate ``η`` (number or tensor).
        weight_norm: ``‖w‖`` (not squared), ``> 0`` (number or tensor).

    Returns:
        ``lr / weight_norm**2`` (a tensor if either input is one).

    Example:
        >>> effective_lr(0.1, 2.0)
        0.025

    Reference:
        Arora, Li, Lyu (ICLR 2019), Sec. 2.
    """
    if not isinstance(weight_norm, torch.Tensor):
        check_positive("weight_norm", weight_norm)
    return lr / weight_norm**2


def angle_between(a, b) -> float:
    """The angle between two tensors (or two lists of tensors, as if concatenated), in radians.

    Mathematically ``θ = arccos(⟨a, b⟩ / (‖a‖ ‖b‖))``; computed in float64 as
    ``θ = 2 · atan2(‖â - b̂‖, ‖â + b̂‖)`` with ``â = a/‖a‖``, ``b̂ = b/‖b‖``, which stays accurate
    for tiny angles (where ``arccos`` of a rounded cosine loses half the digits) and near ``π``.
    With lists, the tensors are flattened and taken jointly without concatenating them.

    Convention (the one bnlab uses everywhere): two zero tensors give ``0.0`` (nothing to turn,
    e.g. BN biases fixed at 0); one zero tensor, or a non-finite one, gives ``nan`` (undefined).

    Args:
        a: a tensor, or a list of tensors (e.g. ``w_t`` per parameter).
        b: the same, with as many elements (per tensor, for lists).

    Returns:
        ``θ`` in ``[0, π]``, or ``nan`` as above.

    Raises:
        UserError: different sizes.

    Example:
        >>> angle_between(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))  # π/4
        0.7853981633974483
        >>> angle_between(torch.zeros(2), torch.zeros(2))
        0.0

    Reference:
        Arora, Li, Lyu (ICLR 2019) (the angular update ``∠(w_t, w_{t+1})``); W. Kahan, "How futile are
        mindless assessments of roundoff in floating-point computation?" (2006), for the atan2 form.
    """
    xs = [a] if isinstance(a, torch.Tensor) else list(a)
    ys = [b] if isinstance(b, torch.Tensor) else list(b)
    if len(xs) != len(ys) or any(x.numel() != y.numel() for x, y in zip(xs, ys)):
        raise UserError(f"angle_between needs tensors of the same sizes, got {[x.numel() for x in xs]} and "
                        f"{[y.numel() for y in ys]} elements")
    us = [x.detach().reshape(-1).to(torch.float64) for x in xs]
    vs = [y.detach().reshape(-1).to(device=u.device, dtype=torch.float64) for u, y in zip(us, ys)]
    if len(us) == 1:  # one tensor: torch's norms (the list form below sums the same terms in another order)
        u, v = us[0], vs[0]
        nu, nv = float(u.norm()), float(v.norm())
    else:
        nu = math.sqrt(sum(float(torch.sum(u * u)) for u in us))
        nv = math.sqrt(sum(float(torch.sum(v * v)) for v in vs))
    if nu == 0 and nv == 0:
        return 0.0
    if not (nu > 0 and nv > 0 and math.isfinite(nu) and math.isfinite(nv)):
        return math.nan
    if len(us) == 1:
        u, v = u / nu, v / nv
        return float(2.0 * torch.atan2((u - v).norm(), (u + v).norm()))
    diff2 = sum2 = 0.0
    for u, v in zip(us, vs):
        u, v = u / nu, v / nv
        diff2 += float(torch.sum((u - v) ** 2))
        sum2 += float(torch.sum((u + v) ** 2))
    return 2.0 * math.atan2(math.sqrt(diff2), math.sqrt(sum2))


def norm_identity_residual(norm_sq_before, norm_sq_after, lr, grad_norm_sq):
    """Residual of the norm identity: ``r = ‖w_{t+1}‖² - ‖w_t‖² - η² ‖g_t‖²``.

    For a scale-invariant ``w`` and a plain SGD/GD step ``w_{t+1} = w_t - η g_t`` (no momentum,
    no weight decay), ``⟨g_t, w_t⟩ = 0`` gives ``‖w_{t+1}‖² = ‖w_t‖² + η² ‖g_t‖²``, so ``r = 0`` up to
    round-off and BatchNorm's ``eps``. In general ``r = -2 η ⟨g_t, w_t⟩`` for plain SGD; momentum
    and weight decay make it nonzero. Divide by ``‖w_t‖²`` for a relative residual.

    Args:
        norm_sq_before: ``‖w_t‖²``.
        norm_sq_after: ``‖w_{t+1}‖²``.
        lr: ``η`` of the step.
        grad_norm_sq: ``‖g_t‖²``.

    Returns:
        ``r`` (a tensor if any input is one).

    Example:
        >>> norm_identity_residual(1.0, 1.25, 0.5, 1.0)
        0.0

    Reference:
        Arora, Li, Lyu (ICLR 2019), Lemma 2.4 and its consequence ‖w_{t+1}‖² = ‖w_t‖² + η²‖g_t‖².
    """
    return norm_sq_after - norm_sq_before - lr**2 * grad_norm_sq


# --------------------------------------------------------------------------- comparing runs


def _named_tensors(model: nn.Module, params, which: str) -> list[tuple[str, torch.Tensor]]:
    if params is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elif isinstance(params, Mapping):
        named = [(str(n), p) for n, p in params.items()]
    else:
        named = [(str(i), p) for i, p in enumerate(params)]
    if not named:
        raise UserError(f"no parameters to compare in {which} (pass params_{which[-1]} or unfreeze some)")
    return named


def _outputs_max_diff(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            raise UserError("the two models' outputs differ in type or shape")
        if a.numel() == 0:
            return 0.0
        return float((a.detach().to(torch.float64) - b.detach().to(torch.float64).to(a.device)).abs().max())
    if isinstance(a, Mapping):
        return max((_outputs_max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list)):
        return max((_outputs_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    raise UserError(f"cannot compare model outputs of type {type(a).__name__}; accepted: tensors, tuples, dicts")


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _forward_preserving_state(model: nn.Module, batch: Any, rng_devices: list) -> Any:
    """Run the model on the batch without changing it (cloned buffers, RNG restored), under no_grad."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, torch.Tensor):
        x = x.to(_device_of(model))
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
        return stateless_call(model, x, preserve_rng=False)


def compare_trajectories(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    params_a=None,
    params_b=None,
    batch: Any = None,
) -> dict:
    """How far two runs are apart in direction (and, given a batch, in output).

    For each pair of parameter tensors the angle ``∠(a, b) = 2 atan2(‖â - b̂‖, ‖â + b̂‖)`` between
    the normalized weights, and the same for all of them concatenated. For scale-invariant
    parameters only the directions matter, so two equivalent runs (e.g. weight decay and
    :class:`bnlab.schedules.ExpLR`) have all angles ≈ 0 although their norms differ by ``α^{-t}``.

    Args:
        model_a, model_b: the two models (same architecture).
        params_a, params_b: the tensors to compare, as a list (paired by position) or a dict
            ``name -> tensor``; default: each model's parameters with ``requires_grad``.
        batch: optional input tensor, or a tuple/list whose first element is the input. Both models
            are run on it in their current mode (train or eval) under ``no_grad``, each from the
            same RNG state; their buffers (BatchNorm statistics) and the RNG state are restored,
            so the models are left exactly as they were.

    Returns:
        ``{"per_param": {name: angle}, "overall": angle, "max_abs_output_diff": float | None}``
        with angles in radians (names from ``params_a``/``model_a``); the angle of two zero tensors
        is 0, and NaN when only one is zero or a tensor is not finite (a diverged run).

    Raises:
        UserError: different numbers or sizes of tensors, incomparable outputs.
    """
    named_a = _named_tensors(model_a, params_a, "model_a")
    named_b = _named_tensors(model_b, params_b, "model_b")
    if len(named_a) != len(named_b):
        raise UserError(f"model_a has {len(named_a)} tensors to compare but model_b has {len(named_b)}")
    per: dict[str, float] = {}
    for (name, a), (_, b) in zip(named_a, named_b):
        if a.shape != b.shape:
            raise UserError(f"parameter {name!r} has shape {tuple(a.shape)} in model_a but {tuple(b.shape)} in model_b")
        per[name] = angle_between(a, b)
    cat_a = torch.cat([a.detach().reshape(-1).to(torch.float64).cpu() for _, a in named_a])
    cat_b = torch.cat([b.detach().reshape(-1).to(torch.float64).cpu() for _, b in named_b])
    result: dict[str, Any] = {"per_param": per, "overall": angle_between(cat_a, cat_b), "max_abs_output_diff": None}
    if batch is not None:
        devices = sorted({d for m in (model_a, model_b) for d in [_device_of(m)] if d.type == "cuda"}, key=str)
        rng_devices = [d.index if d.index is not None else 0 for d in devices]
        out_a = _forward_preserving_state(model_a, batch, rng_devices)
        out_b = _forward_preserving_state(model_b, batch, rng_devices)
        result["max_abs_output_diff"] = _outputs_max_diff(out_a, out_b)
    return result


# --------------------------------------------------------------------------- making a net fully scale-invariant

# The normalization layers a trained weight may feed (without RMSNorm, unlike _NORM_TYPES above).
_FEEDS_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
_WEIGHT_TYPES: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)


def make_fully_scale_invariant(model: nn.Module) -> list[nn.Parameter]:
    """Freeze what is not scale-invariant so the loss is scale-invariant in all trained parameters.

    The setting of Li & Arora's experiments (needed for :class:`bnlab.schedules.ExpLR` and
    :class:`bnlab.schedules.TEXP` to be
    exact): every normalization layer's affine parameters are fixed to ``weight = 1``,
    ``bias = 0`` with ``requires_grad = False``; the last ``nn.Linear`` (the classifier) is frozen
    as it is; every other ``nn.Linear``/``nn.Conv*`` must feed a normalization layer and have no
    trainable bias (BN would remove it anyway, and a trained bias breaks nothing but the check).
    Then ``L(c w) = L(w)`` for the remaining trained weights ``w`` jointly (exactly with BN's
    ``eps = 0``; BN's ``eps`` makes it approximate at small norms).

    "Feeds" is decided by inspection: modules are visited in registration order
    (``model.modules()``), which is the forward order for ``nn.Sequential`` and for most networks;
    the next Linear/Conv/normalization module after a Linear/Conv must be a normalization layer
    (BatchNorm, InstanceNorm, GroupNorm or LayerNorm). Verify unusual networks numerically (e.g.
    with :func:`check_scale_invariance`).

    Args:
        model: any ``nn.Module``; modified in place.

    Returns:
        The parameters that still require gradients (in ``model.parameters()`` order): pass them
        to the optimizer.

    Raises:
        UserError: a Linear/Conv with a trainable bias before a normalization layer, one not
            followed by a normalization layer, or trainable parameters in other module types.

    Reference:
        Li & Arora (ICLR 2020), Sec. 5 (fixed BN affine parameters, fixed last layer).
    """
    named = list(model.named_modules())
    linears = [m for _, m in named if isinstance(m, nn.Linear)]
    last_linear = linears[-1] if linears else None
    with torch.no_grad():
        for _, module in named:
            if isinstance(module, _FEEDS_NORM_TYPES):
                for pname, value in (("weight", 1.0), ("bias", 0.0)):
                    p = getattr(module, pname, None)
                    if isinstance(p, nn.Parameter):
                        p.fill_(value)
                        p.requires_grad_(False)
        if last_linear is not None:
            for p in last_linear.parameters(recurse=False):
                p.requires_grad_(False)
    order = [(name, m) for name, m in named if isinstance(m, _WEIGHT_TYPES + _FEEDS_NORM_TYPES)]
    for k, (name, module) in enumerate(order):
        if not isinstance(module, _WEIGHT_TYPES) or module is last_linear:
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue  # frozen already: not trained, nothing to check
        following = order[k + 1][1] if k + 1 < len(order) else None
        label = name or type(module).__name__
        if not isinstance(following, _FEEDS_NORM_TYPES):
            raise UserError(
                f"{label} ({type(module).__name__}) is not followed by a normalization layer, so its weight "
                "is not scale-invariant; accepted: every Linear/Conv except the last Linear feeds a "
                "BatchNorm/GroupNorm/LayerNorm/InstanceNorm"
            )
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            raise UserError(
                f"{label} has a trainable bias before a normalization layer; accepted: bias=False "
                "(or a frozen bias)"
            )
    known = {id(m) for _, m in order}
    for name, module in named:
        if id(module) in known:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                full = f"{name}.{pname}" if name else pname
                raise UserError(
                    f"parameter {full} of {type(module).__name__} is trained but not known to be "
                    "scale-invariant; accepted: Linear/Conv weights before normalization layers "
                    "(freeze the others)"
                )
    return [p for p in model.parameters() if p.requires_grad]
