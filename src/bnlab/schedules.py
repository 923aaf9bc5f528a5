"""Exponential learning rates that are exactly equivalent to weight decay (Li & Arora, ICLR 2020).

If the loss is scale-invariant in all trained parameters jointly (``L(c w) = L(w)`` for ``c > 0``,
e.g. every trained weight feeds a normalization layer and BN's affine parameters and the last
layer are frozen), then SGD with momentum ``γ``, learning rate ``η`` and weight decay ``λ``
(PyTorch convention)::

    v_t = γ v_{t-1} + ∇L(w_t) + λ w_t,      w_{t+1} = w_t - η v_t,      v_{-1} = 0

and SGD with the same ``γ``, **no** weight decay and the learning rate ``η̃_t = η α^{-2t-1}``::

    ṽ_t = γ ṽ_{t-1} + ∇L(w̃_t),             w̃_{t+1} = w̃_t - η̃_t ṽ_t,   ṽ_{-1} = -λ/(α-γ) · w_0

visit the same directions: ``w̃_t = α^{-t} w_t`` for every ``t``, where ``α`` is the larger root
of ``x² - (1 + γ - λη) x + γ = 0``.

Derivation (the one the code and tests follow). Eliminating the buffer, the weight-decay run is
``w_{t+1} = (1 + γ - ηλ) w_t - γ w_{t-1} - η ∇L(w_t)`` with the *virtual previous iterate*
``w_{-1} = w_0`` (that is what ``v_{-1} = 0`` means). The exponential run is
``w̃_{t+1} = (1 + γ ρ_t) w̃_t - γ ρ_t w̃_{t-1} - η̃_t ∇L(w̃_t)`` with ``ρ_t = η̃_t / η̃_{t-1}`` and
``w̃_{-1} = w̃_0 + η̃_{-1} ṽ_{-1}``. Substituting ``w̃_t = s_t w_t`` and ``∇L(s w) = ∇L(w)/s``
and matching coefficients gives ``η̃_t = η s_t s_{t+1}`` and ``s_t/s_{t+1} + γ s_t/s_{t-1} =
1 + γ - ηλ``, solved by ``s_t = α^{-t}`` with ``α + γ/α = 1 + γ - ηλ``. The initial condition
``w̃_{-1} = s_{-1} w_{-1} = α w_0`` with ``η̃_{-1} = η α`` gives the buffer preset
``ṽ_{-1} = -(1-α)/(ηα) · w_0``, which equals ``-λ/(α-γ) · w_0`` (from ``(1-α)(1-γ/α) = ηλ``;
this form has no cancellation when ``α ≈ 1``). PyTorch's SGD computes ``buf = γ·buf + g`` when
a buffer is already in ``optimizer.state[p]["momentum_buffer"]`` (it only clones ``g`` when there
is none), so presetting that state to ``ṽ_{-1}`` makes the first step exact. For ``γ = 0`` the
buffer does not exist and nothing is preset. With a zero buffer instead the exponential run is
the weight-decay run started from the buffer ``v_{-1} = λ/(α-γ) · w_0``: a different run.

More generally the map between the two runs is ``ṽ_t = (v_t - κ w_{t+1}) / s_{t+1}`` with
``κ = λ/(α-γ) = (1-α)/(ηα)``; in particular a weight-decay run can be *continued* exactly by an
exponential run: set the optimizer's ``weight_decay`` to 0 and attach :class:`ExpLR`; the existing
buffer ``v`` is then replaced by ``v - κ w``.

TEXP (piecewise-constant ``η_I`` from step ``T_I`` on, the equivalent of step decay with weight
decay): the same substitution with ``η̃_t = η_t s_t s_{t+1}`` and ``s_{t+1} = s_t / α(η_t)`` is exact
inside each phase; at a boundary ``τ = T_I`` the weight-decay recursion has the extra factor
``η_I/η_{I-1}`` on the momentum term, which the geometric growth ``s_{t+1} = s_t/α_I`` does not
absorb (only a transient, non-geometric ``s_t`` would). TEXP keeps the geometric schedule and
corrects the buffer instead: restarting the map at ``τ`` with the virtual previous iterate of
the new phase, ``w_τ + η_I v_{τ-1}``, gives the exact correction::

    ṽ_{τ-1}  ←  ṽ_{τ-1} + (κ_{I-1} - κ_I) · w̃_τ / s_τ²,        κ_J = λ/(α_J - γ)

and the learning rate ``η̃_t = η_I α_I^{-2 n_I - 1} ∏_{J<I} α_J^{-2 n_J}`` (``n_J`` = steps
already taken in phase ``J``). So at a boundary the LR is multiplied by
``(η_I/η_{I-1}) / (α_{I-1} α_I)`` and then grows by ``α_I^{-2}`` per step (a boundary factor
``(η_I/η_{I-1}) α_I^{-2}`` is not exact: it is a weight-decay run whose weights were rescaled at the
boundary, and weight decay is not scale-equivariant). The initial preset is the same formula
with ``κ_{-1} = 0``. Without momentum no correction is needed (``α = 1 - ηλ`` makes the map exact
step by step).

Renormalization. For scale-invariant parameters the state ``(w, v, η)`` can be replaced by
``(w/c, c v, η/c²)`` without changing any later direction; with ``c = 2^k`` every multiplication
by ``c`` is exact in binary floating point (barring overflow/subnormals), and so is every
quantity PyTorch computes from the rescaled state when the loss is computed scale-equivariantly
(sums, products, divisions and square roots of exactly scaled numbers), so the rescaled run is
*bit-identical* to the unrescaled one up to the factor ``2^k``. The schedulers rescale whenever the
joint norm leaves ``[ref/B, ref·B]`` (``ref`` = initial norm, ``B = renorm_bound``), keeping an
exponential schedule inside float32's range indefinitely.

Zero buffers (bnlab's extension, :class:`ExactExpLR`). The preset buffer can be avoided: with
both runs starting from PyTorch's zero (lazily created) buffer the map ``w_t = c_t w̃_t`` is exact
for ``c_0 = 1``, ``c_1 = 1 - λη_0``, ``c_{t+1} = (1 + γ r_t - λη_t) c_t - γ r_t c_{t-1}``
(``r_t = η_t/η_{t-1}``) and ``η̃_t = η_t/(c_t c_{t+1})``, for a constant LR and for step decay
alike (an exact TEXP without boundary corrections); see :class:`ExactExpLR`,
:func:`exact_exp_lr`, :func:`exact_scale_factors` (REFERENCES.md §6).

Making a network fully scale-invariant (:func:`bnlab.scale.make_fully_scale_invariant`) and
measuring how far two runs are apart in direction (:func:`bnlab.scale.compare_trajectories`) are in
:mod:`bnlab.scale`.

Reference:
    Z. Li, S. Arora. An Exponential Learning Rate Schedule for Deep Learning. ICLR 2020.
    https://arxiv.org/abs/1910.07454 (Theorem 2.1 and the TEXP schedule, Sec. 4; the buffer
    preset and the TEXP boundary correction above were derived here and are verified numerically
    in ``tests/property/test_schedules.py``).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from .errors import UserError

__all__ = [
    "wd_equivalent_alpha",
    "wd_equivalent_lr",
    "wd_equivalent_buffer",
    "texp_lr",
    "step_decay_lr",
    "ExpLR",
    "TEXP",
    "ExactExpLR",
    "exact_exp_lr",
    "exact_scale_factors",
    "check_hparams",
]

# math.pow is used directly while |exponent · log2(base)| stays below this (no overflow);
# beyond it the power is assembled from a mantissa and a binary exponent.
_DIRECT_POW_LOG2 = 960.0


# --------------------------------------------------------------------------- validation


def check_hparams(lr: float, weight_decay: float, momentum: float) -> tuple[float, float, float]:
    """Validate SGD hyperparameters ``(η, λ, γ)``: finite numbers, ``η > 0``, ``λ >= 0``, ``0 <= γ < 1``.

    Args:
        lr: ``η``.
        weight_decay: ``λ``.
        momentum: ``γ``.

    Returns:
        ``(lr, weight_decay, momentum)`` as floats.

    Raises:
        UserError: a value that is not a finite number (or is a bool), or is out of range.

    Example:
        >>> check_hparams(0.1, 5e-4, 0.9)
        (0.1, 0.0005, 0.9)
    """
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value!r}")
    if not lr > 0:
        raise UserError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise UserError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0 <= momentum < 1:
        raise UserError(f"momentum must be in [0, 1), got {momentum!r}")
    return float(lr), float(weight_decay), float(momentum)


def _alpha(lr: float, weight_decay: float, momentum: float) -> float:
    lr, weight_decay, momentum = check_hparams(lr, weight_decay, momentum)
    x, g = lr * weight_decay, momentum
    # Discriminant of x² - (1+γ-ηλ)x + γ, written without the cancellation of (1+γ)² - 4γ.
    disc = (1.0 - g) ** 2 - x * (2.0 * (1.0 + g) - x)
    limit = (1.0 - math.sqrt(g)) ** 2
    if -1e-15 < disc < 0:
        disc = 0.0  # a double root missed by round-off (ηλ given as (1-√γ)² in floating point)
    if disc < 0 or 1.0 + g - x <= 0 or (g == 0 and x >= 1):
        raise UserError(
            f"lr*weight_decay = {x:.6g} is too large for momentum {g:g}: the equivalent exponential "
            f"schedule needs a real root alpha > 0, i.e. lr*weight_decay <= (1 - sqrt(momentum))**2 "
            f"= {limit:.6g} (and < 1 without momentum)"
        )
    return (1.0 + g - x + math.sqrt(disc)) / 2.0


def _kappa(alpha: float, weight_decay: float, momentum: float) -> float:
    """κ = λ/(α-γ) = (1-α)/(ηα): the weight coefficient of the buffer map."""
    return weight_decay / (alpha - momentum)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"step must be an integer >= 0, got {step!r}")
    return step


def _check_phases(lr_phases: Any) -> list[tuple[int, float]]:
    try:
        phases = [(start, lr) for start, lr in lr_phases]
    except (TypeError, ValueError):
        raise UserError(f"lr_phases must be a list of (start_step, lr) pairs, got {lr_phases!r}") from None
    if not phases:
        raise UserError("lr_phases must contain at least one (start_step, lr) pair")
    out: list[tuple[int, float]] = []
    for start, lr in phases:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise UserError(f"lr_phases start steps must be integers >= 0, got {start!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise UserError(f"lr_phases learning rates must be finite and > 0, got {lr!r}")
        if out and start <= out[-1][0]:
            raise UserError(f"lr_phases start steps must be strictly increasing, got {[s for s, _ in phases]}")
        out.append((start, float(lr)))
    if out[0][0] != 0:
        raise UserError(f"the first phase of lr_phases must start at step 0, got {out[0][0]}")
    return out


# --------------------------------------------------------------------------- exact powers


def _frexp_pow(base: float, exponent: int) -> tuple[float, int]:
    """``base**exponent`` as ``(m, e)`` with ``m·2^e`` the value, without overflow.

    In range it is ``math.frexp(base ** exponent)`` (so results agree bit for bit with the plain
    power); far out of range it is assembled by binary exponentiation on ``(m, e)`` pairs
    (relative error ~1e-14, irrelevant there since the plain power would be ``inf`` or ``0``).
    """
    if exponent == 0 or base == 1.0:
        return 0.5, 1
    log2_size = abs(exponent * math.log2(base))
    if log2_size < _DIRECT_POW_LOG2:
        return math.frexp(base**exponent)
    chunk = max(1, int(_DIRECT_POW_LOG2 / abs(math.log2(base))))
    q, r = divmod(abs(exponent), chunk)
    sign = 1 if exponent > 0 else -1
    bm, be = math.frexp(base ** (sign * chunk))
    m, e = math.frexp(base ** (sign * r)) if r else (0.5, 1)
    while q:
        if q & 1:
            m, de = math.frexp(m * bm)
            e += be + de
        bm, de = math.frexp(bm * bm)
        be = 2 * be + de
        q >>= 1
    return m, e


def _ldexp(m: float, e: int) -> float:
    try:
        return math.ldexp(m, e)
    except OverflowError:
        return math.inf


class _Phase:
    """One constant-LR phase of the weight-decay run and its exponential counterpart."""

    __slots__ = ("start", "lr", "alpha", "kappa")

    def __init__(self, start: int, lr: float, weight_decay: float, momentum: float) -> None:
        self.start = start
        self.lr = lr
        self.alpha = _alpha(lr, weight_decay, momentum)
        self.kappa = _kappa(self.alpha, weight_decay, momentum)


def _make_phases(lr_phases, weight_decay, momentum) -> list[_Phase]:
    phases = _check_phases(lr_phases)
    check_hparams(phases[0][1], weight_decay, momentum)
    return [_Phase(start, lr, weight_decay, momentum) for start, lr in phases]


def _phase_index(phases: Sequence[_Phase], step: int) -> int:
    index = 0
    for i, phase in enumerate(phases):
        if phase.start <= step:
            index = i
    return index


def _steps_in(phases: Sequence[_Phase], j: int, step: int) -> int:
    """Steps of phase ``j`` taken before ``step``."""
    end = phases[j + 1].start if j + 1 < len(phases) else step
    return max(0, min(step, end) - phases[j].start)


def _lr_frexp(phases: Sequence[_Phase], step: int) -> tuple[float, int]:
    """``η̃_t = η_I α_I^{-2 n_I - 1} ∏_{J<I} α_J^{-2 n_J}`` as ``(m, e)``."""
    i = _phase_index(phases, step)
    m, e = _frexp_pow(phases[i].alpha, -(2 * _steps_in(phases, i, step) + 1))
    m = phases[i].lr * m  # exact scaling by 2^e keeps this equal to fl(η·α^p) when in range
    for j in range(i):
        pm, pe = _frexp_pow(phases[j].alpha, -2 * _steps_in(phases, j, step))
        m, de = math.frexp(m * pm)
        e += pe + de
    return m, e


def _inv_scale_sq_frexp(phases: Sequence[_Phase], step: int) -> tuple[float, int]:
    """``1/s_t² = ∏_J α_J^{2 n_J}`` as ``(m, e)``."""
    m, e = 0.5, 1
    for j in range(_phase_index(phases, step) + 1):
        pm, pe = _frexp_pow(phases[j].alpha, 2 * _steps_in(phases, j, step))
        m, de = math.frexp(m * pm)
        e += pe + de
    return m, e


# --------------------------------------------------------------------------- pure schedules


def wd_equivalent_alpha(*, lr: float, weight_decay: float, momentum: float) -> float:
    """Growth constant of the exponential schedule equivalent to weight decay.

    ``α`` is the larger root of ``x² - (1 + γ - λη) x + γ = 0``; ``α ≈ 1 - ηλ/(1-γ)``, and
    ``α = 1 - ηλ`` exactly for ``γ = 0``.

    Args:
        lr: ``η > 0`` of the weight-decay run.
        weight_decay: ``λ >= 0``.
        momentum: ``γ`` in ``[0, 1)``; the roots are real only for ``ηλ <= (1 - √γ)²``.

    Returns:
        ``α`` in ``(0, 1]``.

    Raises:
        UserError: for values outside these ranges.

    Example:
        >>> wd_equivalent_alpha(lr=0.1, weight_decay=0.01, momentum=0.0)
        0.999

    Reference:
        Li & Arora (ICLR 2020), Theorem 2.1.
    """
    return _alpha(lr, weight_decay, momentum)


def wd_equivalent_lr(step: int, *, lr: float, weight_decay: float, momentum: float) -> float:
    """Learning rate at ``step`` of the exponential schedule equivalent to weight decay.

    ``η̃_t = η · α^{-2t-1}`` with ``α`` from :func:`wd_equivalent_alpha`. SGD without weight decay,
    momentum ``γ``, this LR and the momentum buffer preset :func:`wd_equivalent_buffer` follows
    ``w̃_t = α^{-t} w_t`` where ``w_t`` is SGD with ``(η, λ, γ)``, provided the loss is
    scale-invariant in all trained parameters jointly.

    Args:
        step: ``t >= 0``, the number of optimizer steps already taken.
        lr: ``η`` of the weight-decay run.
        weight_decay: ``λ``.
        momentum: ``γ``.

    Returns:
        ``η̃_t`` as a float (``inf`` once it exceeds the float range; use :class:`ExpLR` with
        ``renormalize=True`` for long runs).

    Example:
        >>> wd_equivalent_lr(0, lr=0.1, weight_decay=0.0, momentum=0.9)
        0.1

    Reference:
        Li & Arora (ICLR 2020), Theorem 2.1.
    """
    phases = _make_phases([(0, lr)], weight_decay, momentum)
    return _ldexp(*_lr_frexp(phases, _check_step(step)))


def wd_equivalent_buffer(
    weight: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    wd_buffer: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Momentum buffer that makes an exponential-LR run continue a weight-decay run exactly.

    ``ṽ = v - κ w`` with ``κ = λ/(α-γ) = (1-α)/(ηα)``; for a fresh run (``v_{-1} = 0``) this is the
    preset ``ṽ_{-1} = -(1-α)/(ηα) · w_0`` to store in ``optimizer.state[p]["momentum_buffer"]``
    before the first step (PyTorch then computes ``γ ṽ_{-1} + g_0``).

    Args:
        weight: the current weights ``w`` (``w_0`` for a fresh run).
        lr: ``η``; weight_decay: ``λ``; momentum: ``γ`` (of the weight-decay run).
        wd_buffer: the weight-decay run's buffer ``v_{t-1}``, or ``None`` for ``0``.

    Returns:
        The buffer for the exponential run (a new tensor like ``weight``).

    Reference:
        Derived in this module's docstring (Li & Arora, ICLR 2020, map the momentum too).
    """
    alpha = _alpha(lr, weight_decay, momentum)
    out = weight.detach() * (-_kappa(alpha, weight_decay, momentum))
    if wd_buffer is not None:
        out = out + wd_buffer.detach()
    return out


def texp_lr(step: int, *, lr_phases, weight_decay: float, momentum: float) -> float:
    """Learning rate at ``step`` of TEXP, the exponential equivalent of step decay with weight decay.

    With phases ``(T_I, η_I)`` and ``n_J`` the steps already taken in phase ``J``::

        η̃_t = η_I · α_I^{-2 n_I - 1} · ∏_{J<I} α_J^{-2 n_J},    α_J = wd_equivalent_alpha(η_J, λ, γ)

    i.e. the LR grows by ``α_I^{-2}`` per step in phase ``I`` and is multiplied by
    ``(η_I/η_{I-1}) / (α_{I-1} α_I)`` at a boundary. Exact together with the buffer correction
    of :class:`TEXP` (see the module docstring).

    Args:
        step: ``t >= 0``.
        lr_phases: ``[(0, η_0), (T_1, η_1), ...]``, start steps strictly increasing.
        weight_decay: ``λ``; momentum: ``γ``.

    Returns:
        ``η̃_t`` (``inf`` past the float range).

    Reference:
        Li & Arora (ICLR 2020), Sec. 4 (TEXP); boundary factor derived here (the paper's exact
        boundary treatment was not confirmed, see REFERENCES.md §4).
    """
    phases = _make_phases(lr_phases, weight_decay, momentum)
    return _ldexp(*_lr_frexp(phases, _check_step(step)))


def step_decay_lr(step: int, *, lr_phases) -> float:
    """Piecewise-constant LR: ``η_t = η_I`` for ``T_I <= t < T_{I+1}`` (the weight-decay run of TEXP).

    Args:
        step: ``t >= 0``.
        lr_phases: ``[(0, η_0), (T_1, η_1), ...]``.

    Returns:
        ``η_t``.
    """
    phases = _check_phases(lr_phases)
    step = _check_step(step)
    return [lr for start, lr in phases if start <= step][-1]


# --------------------------------------------------------------------------- schedulers


def _resolve_managed(optimizer, params) -> tuple[list[int], list[torch.Tensor]]:
    groups = optimizer.param_groups
    if params is None:
        managed = list(range(len(groups)))
    else:
        wanted = {id(p): p for p in params}
        if not wanted:
            raise UserError("params is empty; pass the optimizer's scale-invariant parameters or None for all")
        seen: set[int] = set()
        managed = []
        for i, group in enumerate(groups):
            ids = [id(p) for p in group["params"]]
            inside = [pid in wanted for pid in ids]
            if all(inside):
                managed.append(i)
            elif any(inside):
                raise UserError(
                    f"optimizer param group {i} mixes parameters in params with others; the LR is "
                    "per group, so put the scale-invariant parameters in groups of their own"
                )
            seen.update(ids)
        missing = [pid for pid in wanted if pid not in seen]
        if missing:
            raise UserError(f"{len(missing)} tensor(s) in params are not in the optimizer; accepted: its parameters")
    tensors = [p for i in managed for p in groups[i]["params"]]
    if not tensors:
        raise UserError("the optimizer has no parameters to schedule")
    return managed, tensors


class _ScaleInvariantLR(LRScheduler, metaclass=abc.ABCMeta):
    """Shared machinery of the schedules that replace weight decay (:class:`ExpLR`, :class:`TEXP`,
    :class:`ExactExpLR`): validation of the optimizer, power-of-two renormalization, accessors.

    A subclass stores its own settings, implements :meth:`_setup` (called once the optimizer is
    checked), :meth:`_lr_frexp_at` (``η̃_t`` as ``(m, e)``) and :meth:`_wd_factor_frexp` (``f`` with
    ``w_t = f · w̃_t``), and may act before each optimizer step in :meth:`_before_step`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        weight_decay: float,
        momentum: float,
        renormalize: bool,
        params: Optional[Iterable[torch.Tensor]],
        renorm_bound: float,
        what: str,
    ) -> None:
        if not isinstance(optimizer, torch.optim.SGD):
            raise UserError(
                f"{what} needs torch.optim.SGD (with or without momentum), got {type(optimizer).__name__}"
            )
        self._weight_decay = float(weight_decay)
        self._momentum = float(momentum)
        self._setup()
        if not isinstance(renormalize, bool):
            raise UserError(f"renormalize must be True or False, got {renormalize!r}")
        if isinstance(renorm_bound, bool) or not isinstance(renorm_bound, (int, float)) or not 2 <= renorm_bound < math.inf:
            raise UserError(f"renorm_bound must be a number >= 2, got {renorm_bound!r}")
        self._renormalize = renormalize
        self._renorm_bound = float(renorm_bound)
        self._managed, self._params = _resolve_managed(optimizer, params)
        for i in self._managed:
            group = optimizer.param_groups[i]
            if group.get("nesterov", False):
                raise UserError(f"{what} cannot make Nesterov momentum equivalent to weight decay; use nesterov=False")
            if group.get("dampening", 0) != 0:
                raise UserError(f"{what} needs dampening=0 in the optimizer, got {group['dampening']!r}")
            if float(group.get("weight_decay", 0)) != 0:
                raise UserError(
                    f"{what} replaces weight decay: build the optimizer with weight_decay=0 "
                    f"(got {float(group['weight_decay'])!r}) and pass weight_decay={weight_decay!r} to {what}"
                )
            if float(group.get("momentum", 0)) != self._momentum:
                raise UserError(
                    f"the optimizer's momentum {float(group['momentum'])!r} differs from momentum="
                    f"{momentum!r} given to {what}; they must be equal"
                )
        self._check_state(optimizer, what)
        self._log2_scale = 0  # k: the optimizer holds w̃ / 2^k, buffers 2^k ṽ, LR η̃ / 4^k
        ref = self._joint_norm()
        if not (math.isfinite(ref) and ref > 0):
            raise UserError(f"{what} needs finite, nonzero parameters (their joint norm is {ref!r})")
        self._ref_norm = ref
        self.renormalizations = 0
        super().__init__(optimizer)

    # -- what a subclass provides ------------------------------------------------------

    def _setup(self) -> None:
        """Validate and store the subclass's schedule (``self._weight_decay``/``_momentum`` are set)."""

    def _check_state(self, optimizer, what: str) -> None:
        """Refuse optimizer state the schedule cannot start from (default: accept any)."""

    def _before_step(self, step: int) -> None:
        """Act on the optimizer state just before optimizer step ``step`` (after any rescaling)."""

    @abc.abstractmethod
    def _lr_frexp_at(self, step: int) -> tuple[float, int]:
        """``η̃_step`` of the un-rescaled run as ``(m, e)``."""

    @abc.abstractmethod
    def _wd_factor_frexp(self, step: int) -> tuple[float, int]:
        """``f`` with ``w_step = f · w̃_step`` (the weight-decay run from the un-rescaled one) as ``(m, e)``."""

    # -- torch LRScheduler protocol ---------------------------------------------------

    def step(self, epoch: Optional[int] = None) -> None:  # noqa: D401 - torch's signature
        """Advance one optimizer step: rescale if needed, adjust the buffers if the schedule asks, set the LR."""
        if epoch is not None:
            raise UserError(f"{type(self).__name__} counts optimizer steps itself; call step() without an epoch")
        upcoming = self.last_epoch + 1  # the index t of the optimizer step about to be taken
        with torch.no_grad():
            if self._renormalize:
                self._maybe_renormalize()
            self._before_step(upcoming)
        super().step()

    def get_lr(self) -> list[Any]:
        """Learning rates for step ``last_epoch``: ``η̃_t / 4^k`` on the managed groups."""
        m, e = self._lr_frexp_at(self.last_epoch)
        lr = _ldexp(m, e - 2 * self._log2_scale)
        managed = set(self._managed)
        return [lr if i in managed else group["lr"] for i, group in enumerate(self.optimizer.param_groups)]

    def state_dict(self) -> dict[str, Any]:
        """Scheduler state without the optimizer and the parameter tensors."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_params")}

    # -- the un-rescaled run ------------------------------------------------------------

    @property
    def log2_scale(self) -> int:
        """``k`` such that the un-rescaled exponential run's weights are ``w̃ = 2^k · p``."""
        return self._log2_scale

    @property
    def rescale_factor(self) -> float:
        """``c = 2^k``: multiply the optimizer's parameters by it to get the un-rescaled ``w̃``."""
        return _ldexp(1.0, self._log2_scale)

    def unrescaled_lr(self, step: Optional[int] = None) -> float:
        """The LR ``η̃_t`` of the un-rescaled run at ``step`` (default: the current step)."""
        step = self.last_epoch if step is None else _check_step(step)
        return _ldexp(*self._lr_frexp_at(step))

    def wd_run_factor(self) -> float:
        """``f`` with ``w_t = f · p``: maps the optimizer's parameters to the weight-decay run's weights.

        ``f = 2^k · w_t/w̃_t`` (``inf``/``0`` only in the unlikely event that it leaves the float
        range). Valid between steps, for ``t = last_epoch``.
        """
        m, e = self._wd_factor_frexp(self.last_epoch)
        return _ldexp(m, e + self._log2_scale)

    # -- internals ------------------------------------------------------------------------

    def _joint_norm(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for p in self._params:
            total = total + p.detach().to(torch.float64).pow(2).sum().cpu()
        return math.sqrt(float(total))

    def _buffers(self) -> list[Optional[torch.Tensor]]:
        return [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self._params]

    def _maybe_renormalize(self) -> None:
        norm = self._joint_norm()
        if not (math.isfinite(norm) and norm > 0):
            return  # diverged or zero: leave it to the caller to notice
        ratio = norm / self._ref_norm
        if 1.0 / self._renorm_bound <= ratio <= self._renorm_bound:
            return
        # |log2 ratio| > 1 here (bound >= 2), so j != 0 and the new ratio is within [2^-1/2, 2^1/2]
        j = round(math.log2(ratio))
        down, up = _ldexp(1.0, -j), _ldexp(1.0, j)
        for p, buf in zip(self._params, self._buffers()):
            p.mul_(down)
            if buf is not None:
                buf.mul_(up)
        self._log2_scale += j
        self.renormalizations += 1


class _WDEquivalentSchedule(_ScaleInvariantLR):
    """Shared machinery of :class:`ExpLR` and :class:`TEXP` (see the module docstring)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_phases,
        *,
        weight_decay: float,
        momentum: float,
        renormalize: bool,
        params: Optional[Iterable[torch.Tensor]],
        renorm_bound: float,
        what: str,
    ) -> None:
        self._lr_phases_arg = lr_phases
        super().__init__(optimizer, weight_decay=weight_decay, momentum=momentum, renormalize=renormalize,
                         params=params, renorm_bound=renorm_bound, what=what)

    def _setup(self) -> None:
        self._phases = _make_phases(self._lr_phases_arg, self._weight_decay, self._momentum)
        del self._lr_phases_arg

    def _before_step(self, step: int) -> None:
        for i, phase in enumerate(self._phases):
            if phase.start == step:
                self._correct_buffers(self._phases[i - 1].kappa if i else 0.0, phase.kappa, step)

    def _lr_frexp_at(self, step: int) -> tuple[float, int]:
        return _lr_frexp(self._phases, step)

    def _wd_factor_frexp(self, step: int) -> tuple[float, int]:
        """``1/s_t = ∏_J α_J^{n_J}``: the square root of :func:`_inv_scale_sq_frexp`."""
        m, e = _inv_scale_sq_frexp(self._phases, step)
        if e % 2:  # sqrt of m·2^e with e made even
            m, e = 2 * m, e - 1
        return math.sqrt(m), e // 2

    def _correct_buffers(self, kappa_before: float, kappa_after: float, step: int) -> None:
        """``ṽ += (κ_{I-1} - κ_I) · w / σ²`` in the optimizer's (rescaled) units, ``σ = s_t / 2^k``."""
        if self._momentum == 0:
            return  # SGD without momentum has no buffer; the equivalence needs none
        m, e = _inv_scale_sq_frexp(self._phases, step)
        coeff = _ldexp((kappa_before - kappa_after) * m, e + 2 * self._log2_scale)
        for p in self._params:
            state = self.optimizer.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["momentum_buffer"] = buf
            buf.add_(p.detach(), alpha=coeff)


class ExpLR(_WDEquivalentSchedule):
    """Exponentially growing LR that makes SGD without weight decay follow SGD with weight decay.

    ``η̃_t = η α^{-2t-1}`` with ``α`` the larger root of ``x² - (1 + γ - λη) x + γ = 0``; at
    construction the momentum buffer is preset to ``ṽ_{-1} = -λ/(α-γ) · w_0`` (= ``-(1-α)/(ηα) w_0``;
    added to an existing buffer, which is then read as the weight-decay run's buffer, so a
    weight-decay run can be continued). Then ``w̃_t = α^{-t} w_t``: the same directions ``w/‖w‖`` and
    the same network function as SGD with ``(η, λ, γ)`` at every step, up to round-off.

    With ``renormalize=True`` the state is rescaled by exact powers of two,
    ``(w, v, η) → (w/c, c v, η/c²)``, whenever the joint norm of the parameters leaves
    ``[ref/renorm_bound, ref·renorm_bound]``; this changes no direction (bit-exactly) and keeps
    the numbers in range. The optimizer then holds ``w̃ / 2^k`` and the LR ``η̃_t / 4^k``;
    :attr:`rescale_factor` (``2^k``) recovers ``w̃``, :meth:`wd_run_factor` the weight-decay run's
    ``w_t``, and :meth:`unrescaled_lr` ``η̃_t``.

    Assumptions: the loss is scale-invariant in all parameters the scheduler manages, jointly
    (see :func:`bnlab.scale.make_fully_scale_invariant`; BatchNorm's ``eps`` makes it approximate); one shared
    ``(η, λ, γ)``; ``dampening = 0``; no Nesterov. Call ``scheduler.step()`` after every
    ``optimizer.step()`` (steps, not epochs).

    Args:
        optimizer: a ``torch.optim.SGD`` built with ``weight_decay=0`` and ``momentum=γ``.
        lr: ``η`` of the weight-decay run it replaces.
        weight_decay: ``λ`` of that run.
        momentum: ``γ``; must equal the optimizer's.
        renormalize: rescale by powers of two to stay in range (default True).
        params: the parameters to manage (default: all of the optimizer's). Their param groups
            must contain nothing else; other groups keep their own LR (the equivalence then is
            only approximate).
        renorm_bound: the allowed drift factor ``B >= 2`` of the joint norm (default ``2^8``);
            a rescaling brings the norm back to within ``√2`` of its initial value.

    Raises:
        UserError: for another optimizer, nonzero optimizer weight decay, Nesterov, dampening,
            a momentum mismatch, or out-of-range hyperparameters.

    Example:
        >>> opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)   # no weight_decay
        >>> sched = ExpLR(opt, lr=0.1, weight_decay=5e-4, momentum=0.9)
        >>> for x, y in data:
        ...     opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()

    Reference:
        Z. Li, S. Arora. An Exponential Learning Rate Schedule for Deep Learning. ICLR 2020,
        Theorem 2.1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr: float,
        weight_decay: float,
        momentum: float,
        renormalize: bool = True,
        params: Optional[Iterable[torch.Tensor]] = None,
        renorm_bound: float = 2.0**8,
    ) -> None:
        check_hparams(lr, weight_decay, momentum)
        self.alpha = _alpha(lr, weight_decay, momentum)
        super().__init__(
            optimizer,
            [(0, lr)],
            weight_decay=weight_decay,
            momentum=momentum,
            renormalize=renormalize,
            params=params,
            renorm_bound=renorm_bound,
            what="ExpLR",
        )


class TEXP(_WDEquivalentSchedule):
    """Tapered exponential LR: the exact exponential equivalent of step decay with weight decay.

    For phases ``(T_I, η_I)`` (the weight-decay run uses ``η_I`` from step ``T_I`` on, with
    ``λ``, ``γ`` fixed)::

        η̃_t = η_I α_I^{-2 n_I - 1} ∏_{J<I} α_J^{-2 n_J}            (see texp_lr)

    so the LR grows by ``α_I^{-2}`` per step in phase ``I`` and is multiplied by
    ``(η_I/η_{I-1})/(α_{I-1} α_I)`` at a boundary; the buffer is preset like :class:`ExpLR` and
    at each boundary ``τ = T_I`` corrected by ``ṽ += (κ_{I-1} - κ_I) w̃_τ / s_τ²`` with
    ``κ = λ/(α-γ)`` and ``s_τ = ∏ α_J^{-n_J}``. Then ``w̃_t = s_t w_t`` exactly (the directions of
    step decay with weight decay). Without momentum no correction is needed.
    Renormalization and the accessors are those of :class:`ExpLR`.

    Args:
        optimizer: ``torch.optim.SGD`` with ``weight_decay=0`` and ``momentum=γ``.
        lr_phases: ``[(0, η_0), (T_1, η_1), ...]`` in optimizer steps, strictly increasing.
        weight_decay: ``λ``; momentum: ``γ``; renormalize, params, renorm_bound: as in ExpLR.

    Raises:
        UserError: as :class:`ExpLR`, or for malformed phases.

    Reference:
        Li & Arora (ICLR 2020), Sec. 4 (TEXP). REFERENCES.md marks the paper's momentum treatment
        at a boundary as unconfirmed; the correction here is derived in the module docstring and
        verified against step decay with weight decay in the tests.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr_phases,
        weight_decay: float,
        momentum: float,
        renormalize: bool = True,
        params: Optional[Iterable[torch.Tensor]] = None,
        renorm_bound: float = 2.0**8,
    ) -> None:
        super().__init__(
            optimizer,
            lr_phases,
            weight_decay=weight_decay,
            momentum=momentum,
            renormalize=renormalize,
            params=params,
            renorm_bound=renorm_bound,
            what="TEXP",
        )

    @property
    def alphas(self) -> list[float]:
        """``α_I`` of each phase."""
        return [p.alpha for p in self._phases]


# --------------------------------------------------------------------------- exact schedule with zero buffers


def _phases_arg(lr: Optional[float], lr_phases, weight_decay: float, momentum: float) -> list[tuple[int, float]]:
    """``lr_phases`` from exactly one of ``lr`` (a constant LR) and ``lr_phases``, validated."""
    if (lr is None) == (lr_phases is None):
        raise UserError("give exactly one of lr (a constant learning rate) and lr_phases ([(0, lr0), (T1, lr1), ...])")
    phases = _check_phases([(0, lr)] if lr_phases is None else lr_phases)
    for _, lr_i in phases:
        check_hparams(lr_i, weight_decay, momentum)
    return phases


class _ScaleRecursion:
    """The factors ``c_t`` of the exact zero-buffer map, advanced one step at a time.

    ``c_0 = 1``, ``c_1 = 1 - λη_0``, ``c_{t+1} = (1 + γ r_t - λη_t) c_t - γ r_t c_{t-1}`` with
    ``r_t = η_t/η_{t-1}``. The pair ``(c_t, c_{t+1})`` is held as ``(a·2^e, b·2^e)``: the recursion
    is linear and homogeneous, so rescaling both by a power of two is exact and keeps them in range
    for any number of steps (the values equal the plain float64 recursion bit for bit while it is in
    range).
    """

    __slots__ = ("phases", "weight_decay", "momentum", "t", "a", "b", "e")

    def __init__(self, phases: Sequence[tuple[int, float]], weight_decay: float, momentum: float) -> None:
        self.phases = list(phases)
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)
        self.reset()

    def reset(self) -> None:
        self.t, self.a, self.e = 0, 1.0, 0
        self.b = self._positive(1.0 - self.weight_decay * self.lr(0), 1)

    def lr(self, step: int) -> float:
        """``η_t`` of the weight-decay run."""
        return [lr for start, lr in self.phases if start <= step][-1]

    def _positive(self, c: float, index: int) -> float:
        if not c > 0:
            raise UserError(
                f"the exact exponential schedule needs c_t > 0, but c_{index} = {c:.6g} (times 2^{self.e}): "
                f"lr*weight_decay is too large for momentum {self.momentum:g} (real roots of "
                f"x² - (1+γ-λη)x + γ need λη <= (1 - sqrt(γ))²)"
            )
        return c

    def advance(self) -> None:
        """``(c_t, c_{t+1}) -> (c_{t+1}, c_{t+2})``."""
        t1 = self.t + 1
        eta, eta_prev = self.lr(t1), self.lr(self.t)
        gr = self.momentum * (eta / eta_prev)
        c = self._positive((1.0 + gr - self.weight_decay * eta) * self.b - gr * self.a, t1 + 1)
        self.t, self.a, self.b = t1, self.b, c
        k = math.frexp(c)[1]
        if abs(k) > 256:  # exact rescaling by 2^-k keeps both numbers far from under/overflow
            self.a, self.b, self.e = math.ldexp(self.a, -k), math.ldexp(self.b, -k), self.e + k

    def seek(self, step: int) -> None:
        """Advance (or restart) so that ``t == step``."""
        if step < self.t:
            self.reset()
        while self.t < step:
            self.advance()

    def c_frexp(self) -> tuple[float, int]:
        """``c_t`` as ``(m, e)``."""
        m, de = math.frexp(self.a)
        return m, de + self.e

    def lr_frexp(self) -> tuple[float, int]:
        """``η̃_t = η_t/(c_t c_{t+1})`` as ``(m, e)``."""
        m, de = math.frexp(self.lr(self.t) / (self.a * self.b))
        return m, de - 2 * self.e


def exact_scale_factors(steps: int, *, lr: Optional[float] = None, lr_phases=None, weight_decay: float,
                        momentum: float) -> list[float]:
    """The factors ``c_0, ..., c_steps`` with ``w_t = c_t · w̃_t`` (weight-decay run = ``c_t`` × exact-ExpLR run).

    ``c_0 = 1``, ``c_1 = 1 - λη_0``, ``c_{t+1} = (1 + γ r_t - λη_t) c_t - γ r_t c_{t-1}``,
    ``r_t = η_t/η_{t-1}`` (see :class:`ExactExpLR`). For a constant LR, ``c_t → A α^t`` (``α`` of
    :func:`wd_equivalent_alpha`); float64 values underflow to 0 after ~``700/(1-α)`` steps (the
    schedulers never do: they hold ``c_t`` as a mantissa and a binary exponent).

    Args:
        steps: ``T >= 0``.
        lr: a constant ``η`` (give this or ``lr_phases``).
        lr_phases: ``[(0, η_0), (T_1, η_1), ...]``: step decay.
        weight_decay: ``λ``; momentum: ``γ``.

    Returns:
        ``[c_0, ..., c_T]`` as floats.

    Raises:
        UserError: bad values, or some ``c_t <= 0`` (``λη`` too large for ``γ``).

    Reference:
        REFERENCES.md §6 ("Li & Arora, exact for torch's SGD with both buffers at zero"),
        extending Li & Arora (ICLR 2020), Theorem 2.1.
    """
    wd, mom = float(weight_decay), float(momentum)
    rec = _ScaleRecursion(_phases_arg(lr, lr_phases, wd, mom), wd, mom)
    out = [_ldexp(*rec.c_frexp())]
    for _ in range(_check_step(steps)):
        rec.advance()
        out.append(_ldexp(*rec.c_frexp()))
    return out


def exact_exp_lr(step: int, *, lr: Optional[float] = None, lr_phases=None, weight_decay: float,
                 momentum: float) -> float:
    """Learning rate at ``step`` of the exact exponential schedule that needs no preset momentum buffer.

    ``η̃_t = η_t / (c_t c_{t+1})`` with ``c_t`` from :func:`exact_scale_factors`: SGD with no
    weight decay, momentum ``γ``, this LR and PyTorch's default (lazily created) momentum buffer
    follows ``w̃_t = w_t / c_t`` where ``w_t`` is SGD with ``(η_t, λ, γ)`` (constant LR or step
    decay), on a loss scale-invariant in all trained parameters jointly. Costs ``O(step)``.

    Args:
        step: ``t >= 0``.
        lr: a constant ``η`` (give this or ``lr_phases``).
        lr_phases: ``[(0, η_0), (T_1, η_1), ...]``: step decay (the exact TEXP).
        weight_decay: ``λ``; momentum: ``γ``.

    Returns:
        ``η̃_t`` (``inf`` past the float range).

    Example:
        >>> exact_exp_lr(0, lr=0.1, weight_decay=0.01, momentum=0.9) == 0.1 / (1 - 0.1 * 0.01)
        True

    Reference:
        REFERENCES.md §6, extending Li & Arora (ICLR 2020), Theorem 2.1.
    """
    wd, mom = float(weight_decay), float(momentum)
    rec = _ScaleRecursion(_phases_arg(lr, lr_phases, wd, mom), wd, mom)
    rec.seek(_check_step(step))
    return _ldexp(*rec.lr_frexp())


class ExactExpLR(_ScaleInvariantLR):
    """Exact exponential LR from PyTorch's zero momentum buffer: no preset buffer needed (bnlab's extension).

    :class:`ExpLR` is exact only with the momentum buffer preset to ``ṽ_{-1} = -λ/(α-γ) w_0``. This
    schedule instead takes the transient of the map into the LR. With ``η_t`` the weight-decay run's
    LR (constant, or step decay) and both runs starting from PyTorch's default buffer
    (``v_0 = g_0 + λw_0``, ``ṽ_0 = g̃_0``)::

        c_0 = 1,   c_1 = 1 - λη_0,   c_{t+1} = (1 + γ r_t - λη_t) c_t - γ r_t c_{t-1},   r_t = η_t/η_{t-1}

        η̃_t = η_t / (c_t c_{t+1})

    and then ``w_t = c_t w̃_t`` for every ``t`` (same directions, same network function). Derivation:
    eliminating the buffer, torch's SGD with weight decay is ``w_{t+1} = (1 + γ r_t - λη_t) w_t -
    γ r_t w_{t-1} - η_t ∇L(w_t)`` (``w_1 = (1 - λη_0) w_0 - η_0 ∇L(w_0)``) and without it
    ``w̃_{t+1} = (1 + γ r̃_t) w̃_t - γ r̃_t w̃_{t-1} - η̃_t ∇L(w̃_t)``; substituting ``w_t = c_t w̃_t``
    and ``∇L(c w) = ∇L(w)/c`` and matching the coefficients of ``∇L(w̃_t)``, ``w̃_t``, ``w̃_{t-1}``
    gives ``η̃_t = η_t/(c_t c_{t+1})``, the recursion, and ``c_{t+1} r̃_t = r_t c_{t-1}`` (implied).
    For a constant LR ``c_t = A α^t + B (γ/α)^t``: the schedule tends to ExpLR's ``α^{-2t}`` growth, the
    transient ``(γ/α)^t`` is what ExpLR's buffer preset absorbs. For step decay it is an exact TEXP
    with no buffer correction at the boundaries. It needs ``c_t > 0`` (``λη_t <= (1-√γ)²`` in practice);
    a ``c_t <= 0`` raises :class:`~bnlab.errors.UserError` at the step it occurs.

    ``c_t`` is held as a mantissa and a binary exponent (exact power-of-two rescaling of the linear
    recursion), so the schedule runs for any number of steps; with ``renormalize=True`` the state is
    rescaled by powers of two as in :class:`ExpLR` (the optimizer then holds ``w̃/2^k`` and the LR
    ``η̃_t/4^k``; :attr:`rescale_factor`, :meth:`unrescaled_lr`, :meth:`wd_run_factor` as there).

    Assumptions: the loss is scale-invariant in all managed parameters jointly; one shared
    ``(η_t, λ, γ)``; ``dampening = 0``; no Nesterov; the optimizer has taken no step yet (no momentum
    buffers: they are created lazily by ``torch.optim.SGD`` at its first step). Call
    ``scheduler.step()`` after every ``optimizer.step()``.

    Args:
        optimizer: a fresh ``torch.optim.SGD`` with ``weight_decay=0`` and ``momentum=γ``.
        lr: the constant ``η`` of the weight-decay run (give this or ``lr_phases``).
        lr_phases: ``[(0, η_0), (T_1, η_1), ...]``: the step decay of the weight-decay run.
        weight_decay: ``λ``; momentum: ``γ`` (equal to the optimizer's).
        renormalize, params, renorm_bound: as in :class:`ExpLR`.

    Raises:
        UserError: as :class:`ExpLR`; both or neither of ``lr``/``lr_phases``; momentum buffers already
            in the optimizer's state (continue a run with :class:`ExpLR` instead); ``c_t <= 0``.

    Example:
        >>> opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)   # no weight_decay, fresh
        >>> sched = ExactExpLR(opt, lr_phases=[(0, 0.1), (500, 0.01)], weight_decay=5e-4, momentum=0.9)
        >>> for x, y in data:
        ...     opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()

    Reference:
        REFERENCES.md §6 ("Li & Arora, exact for torch's SGD with both buffers at zero"); extends
        Z. Li, S. Arora, An Exponential Learning Rate Schedule for Deep Learning, ICLR 2020,
        Theorem 2.1 and TEXP (Sec. 4). Verified against float64 SGD with weight decay in
        ``tests/unit/test_exact_explr.py``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr: Optional[float] = None,
        lr_phases=None,
        weight_decay: float,
        momentum: float,
        renormalize: bool = True,
        params: Optional[Iterable[torch.Tensor]] = None,
        renorm_bound: float = 2.0**8,
    ) -> None:
        self._lr_args = (lr, lr_phases)
        super().__init__(optimizer, weight_decay=weight_decay, momentum=momentum, renormalize=renormalize,
                         params=params, renorm_bound=renorm_bound, what="ExactExpLR")

    def _setup(self) -> None:
        lr, lr_phases = self._lr_args
        del self._lr_args
        self.lr_phases = _phases_arg(lr, lr_phases, self._weight_decay, self._momentum)
        self._rec = _ScaleRecursion(self.lr_phases, self._weight_decay, self._momentum)

    def _check_state(self, optimizer, what: str) -> None:
        if any(optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in self._params):
            raise UserError(f"{what} starts from PyTorch's zero momentum buffer, but the optimizer already holds "
                            "momentum buffers; use ExpLR to continue a run")

    def _lr_frexp_at(self, step: int) -> tuple[float, int]:
        if step == self._rec.t or step > self._rec.t:
            self._rec.seek(step)
            return self._rec.lr_frexp()
        rec = _ScaleRecursion(self.lr_phases, self._weight_decay, self._momentum)  # an earlier step: recompute
        rec.seek(step)
        return rec.lr_frexp()

    def _wd_factor_frexp(self, step: int) -> tuple[float, int]:
        """``c_t``: ``w_t = c_t w̃_t``."""
        self._rec.seek(step)
        return self._rec.c_frexp()

    def scale_factor(self) -> float:
        """``c_t`` at ``t = last_epoch`` (``w_t = c_t w̃_t``; ``0.0`` once it underflows float64)."""
        self._rec.seek(self.last_epoch)
        return _ldexp(*self._rec.c_frexp())
