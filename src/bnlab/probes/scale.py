"""Probe of the scale-invariant parameter groups: norms, effective LR, angular update, norm identity."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch

from ..errors import UserError
from ..scale import ScaleInvariantGroup, effective_lr, norm_identity_residual
from ._reduce import dot64, norms_dot64, step_cache, sumsq64, want_dots
from .base import Probe, StepContext

__all__ = ["ScaleInvariantStats"]

_ALL = "all"


class ScaleInvariantStats(Probe):
    """The auto rate-tuning quantities of each scale-invariant group and of all of them (cost: cheap).

    With ``w_t`` and ``g_t = ∇L_B(w_t)`` read at ``after_backward`` (before the optimizer moves the
    weights), ``η_t`` the LR of the parameter's optimizer group and ``w_{t+1}`` read at
    ``after_step``, it records per group (keys ``"<group name>/<quantity>"``)::

        weight_norm                 ‖w_t‖
        grad_norm                   ‖g_t‖
        effective_lr                η_t / ‖w_t‖²
        cos_wg                      ⟨w_t, g_t⟩ / (‖w_t‖ ‖g_t‖)        (0 for scale-invariant w)
        normalized_grad_norm        ‖w_t‖ ‖g_t‖                       (the gradient w.r.t. w/‖w‖)
        angular_update              ∠(w_t, w_{t+1})                   (radians)
        norm_identity_rel_residual  (‖w_{t+1}‖² - ‖w_t‖² - η_t² ‖g_t‖²) / ‖w_t‖²

    and the same under ``"all/"`` for all groups together: norms, ``cos_wg`` and the angle of the
    concatenated vector; ``normalized_grad_norm = sqrt(Σ_i ‖w_i‖² ‖g_i‖²)`` (the gradient w.r.t. all
    the normalized groups ``w_i/‖w_i‖``); the residual ``Σ_i r_i / Σ_i ‖w_i‖²``; ``effective_lr`` only
    when all groups share one LR. The residual is zero (round-off and BatchNorm's ``eps``) for
    plain SGD without momentum or weight decay, and measures how far other optimizers are from
    that identity. Keys needing the LR are left out when the parameter is in no optimizer group;
    undefined ratios are ``nan``.

    The probe only reads: nothing in the model or optimizer is written, and no RNG is used. For
    ``torch.optim.SGD`` (momentum, dampening and weight decay of the parameter's group; not
    ``nesterov``, ``maximize`` or ``fused``) the update is known from the optimizer, so nothing is
    copied: ``w_{t+1} = w_t - η_t u`` with ``u = buf_{t+1} = μ buf_t + (1 - d)(g + λ w_t)``
    (``g + λ w_t`` on the first step) with momentum, ``u = g + λ w_t`` without, ``g`` the gradient as
    the step used it, hence ``‖w_t - w_{t+1}‖² = η_t² ‖u‖²``: read from the momentum buffer after the
    step, or, without momentum, from ``g`` and ``w_{t+1}`` (:func:`_sgd_modes`; it checks that the optimizer's update was the only in-place write to the
    parameter between the two events: a parameter it did not move has angle 0, one written again
    gives ``nan``; writes through ``.data`` are not seen). For other optimizers ``w_t`` is copied
    into the probe's own buffers (allocated once) and the difference taken after the step.

    **Cost and accuracy.** Sums of squares and dot products accumulate in float64 without float64
    copies (:mod:`bnlab.probes._reduce`: exact for float64 and small tensors, ~1e-8 relative for
    large float32 ones); the angle comes from ``‖w_t‖²``, ``‖w_{t+1}‖²`` and ``‖w_t - w_{t+1}‖²``
    (see :func:`_angle`); each event reads its numbers with one host sync. At ``before_step`` the
    probe announces the sums it will read (:func:`~bnlab.probes._reduce.want_sums`): whichever
    probe of the step reduces first (``GradNorm``, ``IntrinsicGradNorm`` or this one) takes
    ``‖w_t‖²``, ``‖g_t‖²`` and ``⟨w_t, g_t⟩`` in one sweep, and the others read the cache, as
    ``WeightNorm`` reads this probe's ``‖w_{t+1}‖²``. With SGD and momentum a step reads the
    scale-invariant weights' size four times (``w_t`` and ``g_t`` in the sweep; ``w_{t+1}`` and
    ``buf_{t+1}`` after the step), as often without momentum (``g`` again, a cache hit unless it
    was clipped; with weight decay also ``⟨w_{t+1}, g⟩``); the copy path reads and writes it nine times. On ResNet-18 (batch 32 of 32x32 images, CPU, one thread,
    ``benchmarks/probe_overhead.py``), where one read of the 11 M weights costs about 2-3 % of a
    step (memory bandwidth), that is 1.13x a bare step with SGD and momentum (it was 4.0x, then
    1.24x with the copy): run it every few steps (``every=10`` in the ``business`` preset) where
    that matters.

    Args:
        groups: the groups, e.g. from :func:`bnlab.scale.find_scale_invariant`, or a mapping
            ``{name: parameter}``. May be empty (then the probe records nothing).
        every: run at steps where ``every(step)`` is true; an int ``n`` means every n-th step.
        name: metric prefix.

    Example:
        >>> groups = find_scale_invariant(model, (x, y), F.cross_entropy)
        >>> monitor = Monitor(model, opt, probes=[ScaleInvariantStats(groups)], log=records)

    Reference:
        Arora, Li, Lyu, Theoretical Analysis of Auto Rate-Tuning by Batch Normalization
        (ICLR 2019), Lemma 2.4 and Sec. 2.
    """

    name = "scale"
    cost = "cheap"

    def __init__(
        self,
        groups: Iterable[ScaleInvariantGroup] | Mapping[str, torch.Tensor],
        every: int | Callable[[int], bool] = 1,
        *,
        name: str = "scale",
    ) -> None:
        super().__init__(every)
        self.name = name
        if isinstance(groups, Mapping):
            items = list(groups.items())
        else:
            items = []
            for g in groups:
                if not isinstance(g, ScaleInvariantGroup):
                    raise UserError(
                        f"ScaleInvariantStats takes ScaleInvariantGroup objects or a {{name: parameter}} dict, got {type(g).__name__}"
                    )
                items.append((g.name, g.param))
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise UserError(f"ScaleInvariantStats: duplicate group names in {names}")
        if _ALL in names:
            raise UserError(f"ScaleInvariantStats: {_ALL!r} is reserved for the totals; rename that group")
        for n, p in items:
            if not isinstance(p, torch.Tensor):
                raise UserError(f"ScaleInvariantStats: group {n!r} is not a tensor")
        self.groups: list[tuple[str, torch.Tensor]] = items
        self._saved: dict | None = None  # {"step": t, "groups": {name: (‖w_t‖², ‖g_t‖², η_t)}}
        self._bufs: list[torch.Tensor] | None = None  # w_t, then w_t - w_{t+1}

    # ---------------------------------------------------------------- events
    def before_step(self, ctx: StepContext) -> None:
        # a probe reading ‖w‖² and ‖g‖² before this one (IntrinsicGradNorm) then takes ⟨w, g⟩ in the same sweep
        want_dots(step_cache(ctx), [p for _, p in self.groups])
        return None

    def after_backward(self, ctx: StepContext) -> dict | None:
        if not self.groups:
            return None
        lrs = _by_param(ctx.optimizer, "lr")
        ws = [p for _, p in self.groups]  # the parameters themselves: keys of the step's shared cache
        with_grad = [i for i, (_, p) in enumerate(self.groups) if p.grad is not None]
        gs = [self.groups[i][1].grad for i in with_grad]
        cache = step_cache(ctx)
        # all sums in one float64 vector, read with one host sync
        if len(with_grad) == len(ws):  # ‖w_t‖², ‖g_t‖², ⟨w_t, g_t⟩ in one sweep over w_t and g_t
            w2l, g2l, dotl = norms_dot64(ws, gs, cache).tolist()
        else:
            w2s = sumsq64(ws, cache)
            g2s = torch.zeros_like(w2s)
            dots = torch.zeros_like(w2s)
            if with_grad:
                idx = torch.tensor(with_grad, device=w2s.device)
                g2s[idx] = sumsq64(gs, cache)
                dots[idx] = dot64([ws[i] for i in with_grad], gs, cache)
            w2l, g2l, dotl = torch.stack([w2s, g2s, dots]).tolist()
        modes = _sgd_modes(ctx.optimizer, ws)
        self._copy_weights([w.detach() for w, m in zip(ws, modes) if m == "copy"])
        out: dict = {}
        saved = {}
        tot_w2 = tot_g2 = tot_dot = tot_wg2 = 0.0
        for (name, p), w2, g2, dot in zip(self.groups, w2l, g2l, dotl):
            lr = lrs.get(id(p))
            saved[name] = (w2, g2, lr)
            tot_w2, tot_g2, tot_dot, tot_wg2 = tot_w2 + w2, tot_g2 + g2, tot_dot + dot, tot_wg2 + w2 * g2
            out.update(_stats(name, w2, g2, dot, math.sqrt(w2 * g2), lr))
        group_lrs = {lr for _, _, lr in saved.values()}
        shared_lr = group_lrs.pop() if len(group_lrs) == 1 else None
        out.update(_stats(_ALL, tot_w2, tot_g2, tot_dot, math.sqrt(tot_wg2), shared_lr))
        state = ctx.optimizer.state if ctx.optimizer is not None else {}
        before = []  # per parameter: (its version, its momentum buffer and that buffer's version) at w_t
        for p, m in zip(ws, modes):
            buf = state[p].get("momentum_buffer") if m == "buf" and p in state else None
            before.append((p._version, buf, None if buf is None else buf._version))
        self._saved = {"step": ctx.step, "groups": saved, "modes": modes, "before": before}
        return out

    def _copy_weights(self, ws: list[torch.Tensor]) -> None:
        """``w_t`` into the probe's own buffers (allocated once: no fresh allocation per step)."""
        bufs = self._bufs
        if bufs is None or len(bufs) != len(ws) or any(
                b.shape != w.shape or b.dtype != w.dtype or b.device != w.device for b, w in zip(bufs, ws)):
            bufs = self._bufs = [torch.empty_like(w, memory_format=torch.preserve_format) for w in ws]
        if ws:
            torch._foreach_copy_(bufs, ws)

    def after_step(self, ctx: StepContext) -> dict | None:
        saved, self._saved = self._saved, None
        if not saved or saved["step"] != ctx.step:
            return None
        ws = [p for _, p in self.groups]
        cache = step_cache(ctx)
        w2a = sumsq64(ws, cache)
        # ‖w_t - w_{t+1}‖² per parameter: from the probe's copy of w_t ("copy"), or from what plain SGD
        # applied, read after the step: Δ = -η buf_{t+1} ("buf") or Δ = -η (g + λ w_t) ("grad"; g as the
        # step used it, after any clipping, and w_t from w_{t+1}), see _sgd_modes
        modes, state = saved["modes"], (ctx.optimizer.state if ctx.optimizer is not None else {})
        copied = [w.detach() for w, m in zip(ws, modes) if m == "copy"]
        if copied:
            torch._foreach_sub_(self._bufs, copied)  # w_t - w_{t+1}, in place in the probe's buffers
        # per parameter, ‖w_t - w_{t+1}‖² = factor · ‖delta‖² (a tensor read now), or a known value
        deltas: list = []
        factors: list[float] = []
        known: list = []
        decayed: list = []  # (index, η, λ) of the "grad" parameters with weight decay
        wds = _by_param(ctx.optimizer, "weight_decay", 0.0)
        k = 0
        for i, ((name, p), m, (v0, buf0, bv0)) in enumerate(zip(self.groups, modes, saved["before"])):
            d, f, v = None, 1.0, None
            if m == "copy":
                d = self._bufs[k]
                k += 1
            elif p._version == v0:  # the optimizer did not move it (no gradient, a skipped step)
                v = 0.0
            else:
                lr = saved["groups"][name][2]
                buf = state[p].get("momentum_buffer") if p in state else None
                if p._version != v0 + 1 or (m == "buf" and (buf is None or (buf is buf0 and buf._version == bv0))) \
                        or (m == "grad" and p.grad is None):
                    v = math.nan  # written by something other than one plain SGD update: unknown
                elif m == "buf":  # Δ = -η buf_{t+1}
                    d, f = buf.detach(), lr * lr
                elif wds.get(id(p), 0.0) == 0.0:  # Δ = -η g, g the gradient the step used (read now)
                    d, f = p.grad.detach(), lr * lr
                else:  # Δ = -η (g + λ w_t), w_t = (w_{t+1} + η g)/(1 - ηλ): see below
                    decayed.append((i, lr, wds[id(p)]))
            deltas.append(d)
            factors.append(f)
            known.append(v)
        have = [i for i, d in enumerate(deltas) if d is not None]
        d2 = torch.zeros_like(w2a)
        if have:
            d2[torch.tensor(have, device=w2a.device)] = sumsq64([deltas[i] for i in have], cache).to(w2a.device)
        parts = [w2a, d2]
        if decayed:  # ‖g‖² and ⟨w_{t+1}, g⟩ of the gradients as the step used them (after any clipping)
            gs_now = [ws[i].grad for i, _, _ in decayed]
            parts += [sumsq64(gs_now, cache).to(w2a.device), dot64([ws[i] for i, _, _ in decayed], gs_now, cache).to(w2a.device)]
        vals = torch.cat(parts).tolist()
        n = len(ws)
        w2al, d2l = vals[:n], vals[n:2 * n]
        d2l = [v if v is not None else f * x for v, f, x in zip(known, factors, d2l)]
        for j, (i, lr, wd) in enumerate(decayed):
            # g + λ w_t = (g + λ w_{t+1}) / (1 - ηλ), so ‖Δ‖² = η² (‖g‖² + 2λ⟨w_{t+1}, g⟩ + λ²‖w_{t+1}‖²) / (1 - ηλ)²
            gg, wg = vals[2 * n + j], vals[2 * n + len(decayed) + j]
            c = 1.0 - lr * wd
            d2l[i] = lr * lr * max(gg + 2.0 * wd * wg + wd * wd * w2al[i], 0.0) / (c * c) if c != 0 else math.nan
        out: dict = {}
        res_sum, w2_sum, all_have_lr = 0.0, 0.0, True
        tot_b, tot_a, tot_d = 0.0, 0.0, 0.0
        for (name, _), w2_after, dd in zip(self.groups, w2al, d2l):
            w2, g2, lr = saved["groups"][name]
            tot_b, tot_a, tot_d = tot_b + w2, tot_a + w2_after, tot_d + dd
            out[f"{name}/angular_update"] = _angle(w2, w2_after, dd)
            if lr is None:
                all_have_lr = False
                continue
            r = norm_identity_residual(w2, w2_after, lr, g2)
            out[f"{name}/norm_identity_rel_residual"] = _div(r, w2)
            res_sum += r
            w2_sum += w2
        out[f"{_ALL}/angular_update"] = _angle(tot_b, tot_a, tot_d)
        if all_have_lr:
            out[f"{_ALL}/norm_identity_rel_residual"] = _div(res_sum, w2_sum)
        return out


# -------------------------------------------------------------------- helpers


def _by_param(optimizer, key: str, default: float | None = None) -> dict[int, float]:
    """``{id(p): float(group[key])}`` over the optimizer's groups (``default`` where a group lacks it)."""
    if optimizer is None:
        return {}
    return {id(p): float(g.get(key, default)) for g in optimizer.param_groups for p in g["params"]}


def _sgd_modes(optimizer, params: list) -> list[str]:
    """How :class:`ScaleInvariantStats` gets ``‖w_t - w_{t+1}‖²`` for each parameter.

    For ``torch.optim.SGD`` itself (not a subclass) in its single-tensor or foreach form, without
    ``nesterov``, ``maximize`` or ``fused``, the update is known from the optimizer: with momentum
    ``μ``, dampening ``d`` and weight decay ``λ`` of the parameter's group, ``buf_{t+1} = μ buf_t +
    (1 - d)(g_t + λ w_t)`` (``g_t + λ w_t`` on the first step) and ``w_{t+1} = w_t - η buf_{t+1}``, so
    ``‖w_t - w_{t+1}‖² = η² ‖buf_{t+1}‖²``, read from the optimizer's state after the step
    (``"buf"``); without momentum ``w_{t+1} = w_t - η (g + λ w_t)`` with ``g`` the gradient as the step
    used it (after any clipping), and it is ``η² ‖g‖²`` without weight decay, else
    ``η² ‖g + λ w_{t+1}‖² / (1 - ηλ)²`` (``w_t = (w_{t+1} + η g)/(1 - ηλ)``), both read after the step
    (``"grad"``). Every other case (other optimizers, a parameter in no group) copies ``w_t``
    (``"copy"``). The SGD modes check at ``after_step`` that exactly one
    in-place write moved the parameter (its ``_version``) and, with momentum, that the buffer was
    written; an unmoved parameter has ``Δ = 0``, anything else gives ``nan``.
    """
    modes = ["copy"] * len(params)
    if optimizer is None or type(optimizer) is not torch.optim.SGD:
        return modes
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for i, p in enumerate(params):
        g = group_of.get(id(p))
        if g is None or g.get("nesterov") or g.get("maximize") or g.get("fused"):
            continue
        modes[i] = "buf" if g.get("momentum", 0) != 0 else "grad"
    return modes


def _angle(a2: float, b2: float, d2: float) -> float:
    """∠(a, b) from ``a2 = ‖a‖²``, ``b2 = ‖b‖²`` and ``d2 = ‖a - b‖²``, accurate for tiny angles.

    With ``â = a/‖a‖``, ``b̂ = b/‖b‖``: ``m = ‖â - b̂‖² = (‖a - b‖² - (‖a‖ - ‖b‖)²) / (‖a‖ ‖b‖)`` and
    ``θ = 2 atan2(√m, √(4 - m))``, the form of :func:`bnlab.scale.angle_between` (``‖a‖ - ‖b‖`` is
    taken as ``(a2 - b2)/(‖a‖ + ‖b‖)``). Two zero vectors give 0, one zero or a non-finite value ``nan``.
    """
    if a2 == 0 and b2 == 0:
        return 0.0
    if not (a2 > 0 and b2 > 0 and math.isfinite(a2) and math.isfinite(b2) and math.isfinite(d2)):
        return math.nan
    a, b = math.sqrt(a2), math.sqrt(b2)
    diff = (a2 - b2) / (a + b)
    m = min(4.0, max(0.0, (d2 - diff * diff) / (a * b)))
    return 2.0 * math.atan2(math.sqrt(m), math.sqrt(4.0 - m))


def _div(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _stats(prefix: str, w2: float, g2: float, dot: float, normalized_grad_norm: float, lr) -> dict:
    stats = {
        f"{prefix}/weight_norm": math.sqrt(w2),
        f"{prefix}/grad_norm": math.sqrt(g2),
        f"{prefix}/cos_wg": _div(dot, math.sqrt(w2) * math.sqrt(g2)),
        f"{prefix}/normalized_grad_norm": normalized_grad_norm,
    }
    if lr is not None:
        stats[f"{prefix}/effective_lr"] = effective_lr(lr, math.sqrt(w2)) if w2 > 0 else math.nan
    return stats


