"""Internal covariate shift (Santurkar et al.'s gradient definition) and one layer's activation
distribution over training.

**ICS of layer i at step t.** With ``W^t`` the weights before the optimizer step and ``W^{t+1}``
after it, on the step's batch ``B``::

    G_i  = ∇_{W_i} L_B(W_1^t,     ..., W_{i-1}^t,     W_i^t, ..., W_k^t)
    G'_i = ∇_{W_i} L_B(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

``G_i`` is the gradient the step used; ``G'_i`` the gradient layer ``i`` would see had the layers
below it already moved (the shift of its input distribution caused by their updates, measured by
what matters for optimization). Reported: ``‖G_i - G'_i‖₂``, ``cos(G_i, G'_i)`` and the relative
size ``‖G_i - G'_i‖₂ / ‖G_i‖₂``.

**Layers.** Layer ``i`` is the ``i``-th convolution or linear layer (``nn.Linear``, Hugging Face's
``Conv1D``) with a trainable weight in the
order of the forward pass (found with hooks during the ``G`` pass); ``W_i`` is its weight. The
parameters of the modules run after it up to the next such layer (its normalization's ``γ, β``)
move with it. The first layer has no layer below it (``G'_1 = G_1``) and is not reported, nor is a
layer whose weight is tied to a module that runs before it (a language model's output layer tied
to its token embedding). Batches may be ``(x, y)`` or dicts, outputs ``ModelOutput`` objects
(:mod:`bnlab.adapters`; without ``loss_fn`` on a dict batch the model's own ``output.loss``).

**How.** ``W^t`` and the buffers are copied at ``after_backward``; at ``after_step`` every
gradient is computed with :func:`bnlab.functional.stateless_call` over a parameter dict mixing
``W^{t+1}`` (layers below ``i``) and ``W^t`` (the rest), with fresh copies of the buffers of step
``t`` (train-mode BatchNorm normalizes with the batch's statistics, as in the step; a ``bn-noisy``
layer replays the step's noise). The model, its buffers, ``.grad`` and the RNG are untouched.
Cost: one forward/backward pass per layer.

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, section 2.2 (definition 2.1) and figure 3.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..adapters import compute_loss, default_loss_fn, logits_of, split_batch
from ..errors import UserError
from ..functional import stateless_call
from .accuracy import LOGITS_KEY
from .base import Probe, StepContext

__all__ = ["InternalCovariateShift", "ActivationQuantiles", "ics_layers", "internal_covariate_shift"]


# Modules whose output has its features (channels) in the last dimension, e.g. (N, tokens, C).
_FEATURES_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_weight_layer(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    # Hugging Face's Conv1D (GPT-2's projections) is a linear layer with a transposed weight
    affine = isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or type(m).__name__ == "Conv1D"
    return affine and isinstance(w, torch.Tensor) and w.requires_grad


def _stateless_forward(model: nn.Module, batch, params: Optional[dict] = None, buffers: Optional[dict] = None):
    """:func:`bnlab.functional.stateless_call` on a batch (``x``, ``(x, y)`` or a dict, see
    :func:`bnlab.adapters.split_batch`)."""
    args, kwargs = split_batch(batch)
    return stateless_call(model, *args, params=params, buffers=buffers, **kwargs)


def ics_layers(model: nn.Module, x, params: Optional[dict] = None, buffers: Optional[dict] = None) -> tuple[list[str], dict[str, int]]:
    """The layers of the ICS definition and the layer each trainable parameter moves with.

    Runs one forward pass (:func:`bnlab.functional.stateless_call`: copies of the buffers, the RNG
    restored, no gradient) with hooks to find the order in which modules run. ``x`` is the input
    tensor, or a whole batch (``(x, y)`` or a dict of model inputs, :mod:`bnlab.adapters`).

    Returns:
        ``(layers, group)``: the module names of the weight layers in forward order, and for every
        trainable parameter name the index of its layer (the last weight layer that ran before or
        at its module; -1 for modules that run before the first layer, which move with every
        layer's predecessors, and ``len(layers)`` for modules that never run).
    """
    order: list[str] = []
    handles = []
    for mname, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_pre_hook(lambda m, a, mname=mname: order.append(mname) if mname not in order else None))
    try:
        with torch.no_grad():
            _stateless_forward(model, x, params, buffers)
    finally:
        for h in handles:
            h.remove()
    mods = dict(model.named_modules())
    layers = [n for n in order if _is_weight_layer(mods[n])]
    pos = {n: i for i, n in enumerate(order)}
    lpos = [pos[n] for n in layers]
    group: dict[str, int] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mname = pname.rsplit(".", 1)[0] if "." in pname else ""
        if mname not in pos:
            group[pname] = len(layers)  # never runs: stays at W^t (its gradient is zero anyway)
            continue
        g = -1
        for i, lp in enumerate(lpos):
            if lp <= pos[mname]:
                g = i
        group[pname] = g
    return layers, group


def _grads(model, batch, loss_fn, params: dict, buffers: dict, wrt: list[str]) -> list[torch.Tensor]:
    # stateless_call restores the RNG after each pass: every pass draws the same dropout masks
    leaves = {n: params[n].detach().requires_grad_(True) if n in wrt else params[n].detach() for n in params}
    with torch.enable_grad():
        loss = compute_loss(_stateless_forward(model, batch, leaves, buffers), batch, loss_fn)
        gs = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True)
    return [torch.zeros_like(leaves[n]) if g is None else g.detach() for n, g in zip(wrt, gs)]


def internal_covariate_shift(
    model: nn.Module,
    batch,
    loss_fn: Callable,
    w_before: dict[str, torch.Tensor],
    w_after: dict[str, torch.Tensor],
    buffers: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, dict[str, float]]:
    """ICS of every layer but the first for one update ``w_before -> w_after`` (module docstring).

    Args:
        model: the network (only its structure and frozen parameters are used).
        batch: ``(x, y)``, the step's batch, or a dict of model inputs (:mod:`bnlab.adapters`).
        loss_fn: ``loss_fn(logits, y) -> scalar``; ``None``: the model's own ``output.loss``.
        w_before: ``W^t``, ``{name: tensor}`` of every trainable parameter.
        w_after: ``W^{t+1}``, the same keys.
        buffers: the buffers at step ``t`` (copied before every pass); default the model's.

    Returns:
        ``{layer name: {"l2", "cos", "rel", "g_norm"}}`` in forward order from the second layer.
    """
    if set(w_before) != set(w_after):
        raise UserError("internal_covariate_shift: w_before and w_after must have the same keys")
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in w_before}
    buffers = {n: b.detach().clone() for n, b in (buffers if buffers is not None else dict(model.named_buffers())).items()}
    layers, group = ics_layers(model, batch, {**frozen, **w_before}, buffers)
    pname_of = {id(p): n for n, p in model.named_parameters()}
    mods = dict(model.named_modules())
    wnames = [pname_of[id(mods[n].weight)] for n in layers]  # tied weights go by their first name
    base = {**frozen, **w_before}
    G = dict(zip(wnames, _grads(model, batch, loss_fn, base, buffers, wnames)))
    out: dict[str, dict[str, float]] = {}
    for i in range(1, len(layers)):
        if group.get(wnames[i]) != i:
            continue  # a weight tied to a module that runs earlier (GPT-2's lm_head and its embedding)
        mixed = {**frozen, **{n: (w_after[n] if group.get(n, len(layers)) < i else w_before[n]) for n in w_before}}
        (g2,) = _grads(model, batch, loss_fn, mixed, buffers, [wnames[i]])
        g1 = G[wnames[i]]
        a, b = g1.double().flatten(), g2.double().flatten()
        gn, l2 = float(a.norm()), float((a - b).norm())
        denom = gn * float(b.norm())
        out[layers[i]] = {
            "l2": l2,
            "cos": float(a @ b) / denom if denom > 0 else math.nan,
            "rel": l2 / gn if gn > 0 else math.nan,
            "g_norm": gn,
        }
    return out


class InternalCovariateShift(Probe):
    """Santurkar et al.'s ICS per layer: ``‖G - G'‖₂`` and ``cos(G, G')`` (cost: standard).

    ``W^t`` and the buffers are copied at ``after_backward``, the gradients computed at
    ``after_step`` (see the module docstring and :func:`internal_covariate_shift`). Records
    ``"<layer>/l2"``, ``"<layer>/cos"``, ``"<layer>/rel"`` (``‖G - G'‖/‖G‖``),
    ``"<layer>/g_norm"`` per layer from the second, and their means over layers ``mean_l2``,
    ``mean_cos``, ``mean_rel``. With ``keep``, ``self.history`` holds ``(step, per-layer dict)``.

    Args:
        every: steps to measure at.
        keep: keep the per-layer numbers in ``history``.
        name: metric prefix.

    Example:
        >>> probe = InternalCovariateShift(every=20)
        >>> train(net, data, opt, steps=400, probes=[probe])

    Reference:
        Santurkar et al., NeurIPS 2018, definition 2.1, figure 3.
    """

    name = "ics"
    cost = "standard"

    def __init__(self, every: Union[int, Callable[[int], bool]] = 10, *, keep: bool = False, name: str = "ics"):
        super().__init__(every)
        self.keep = keep
        self.name = name
        self.history: list[tuple[int, dict]] = []
        self._w0: Optional[dict] = None
        self._buf: Optional[dict] = None

    def before_step(self, ctx: StepContext) -> None:
        self._w0 = self._buf = None
        return None

    def after_backward(self, ctx: StepContext) -> None:
        if ctx.batch is None:
            return None
        self._w0 = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
        self._buf = {n: b.detach().clone() for n, b in ctx.model.named_buffers()}
        return None

    def after_step(self, ctx: StepContext) -> dict:
        w0, buf = self._w0, self._buf
        self._w0 = self._buf = None
        if w0 is None or ctx.batch is None:
            return {}
        w1 = {n: p.detach() for n, p in ctx.model.named_parameters() if n in w0}
        res = internal_covariate_shift(ctx.model, ctx.batch, default_loss_fn(ctx.batch, ctx.loss_fn), w0, w1, buf)
        if self.keep:
            self.history.append((ctx.step, res))
        out: dict[str, float] = {}
        for layer, d in res.items():
            for k, v in d.items():
                out[f"{layer}/{k}"] = v
        for k in ("l2", "cos", "rel"):
            vals = [d[k] for d in res.values() if math.isfinite(d[k])]
            out[f"mean_{k}"] = sum(vals) / len(vals) if vals else math.nan
        return out


class ActivationQuantiles(Probe):
    """Per-channel quantiles, mean and standard deviation of one module's output (cost: standard).

    At ``after_backward`` (weights ``w_t``) the step's forward pass is replayed on its batch with
    :func:`bnlab.functional.stateless_call` (copies of the buffers, the RNG restored: train-mode
    BatchNorm uses the batch's statistics; a ``bn-noisy`` layer replays the step's noise), and the
    output of module ``layer`` of shape ``(N, C, *spatial)`` (``(N, *, C)`` for a linear layer,
    LayerNorm or embedding, e.g. ``(N, tokens, C)`` in a transformer) is summarized per channel over
    examples and positions.
    Records ``"<c>/q<p>"`` for each quantile ``p`` (in percent), ``"<c>/mean"`` and ``"<c>/std"``
    for each channel ``c`` of ``channels``. The data of Santurkar et al.'s figure 2 (the
    distribution of one layer's activations over training). The replayed forward's logits are left
    in the step's ``scratch`` under :data:`bnlab.probes.accuracy.LOGITS_KEY` (a
    :class:`~bnlab.probes.accuracy.TrainModeAccuracy` listed after it reuses them).

    Args:
        layer: module name (as in ``model.named_modules()``).
        every: steps to measure at.
        quantiles: in ``[0, 1]``.
        channels: channel indices (default all).
        name: metric prefix.
    """

    name = "act_q"
    cost = "standard"

    def __init__(self, layer: str, every: Union[int, Callable[[int], bool]] = 10, *,
                 quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95), channels: Optional[Sequence[int]] = None,
                 name: str = "act_q"):
        super().__init__(every)
        if not all(0.0 <= q <= 1.0 for q in quantiles) or not quantiles:
            raise UserError(f"ActivationQuantiles: quantiles must lie in [0, 1], got {list(quantiles)}")
        self.layer = layer
        self.quantiles = [float(q) for q in quantiles]
        self.channels = None if channels is None else [int(c) for c in channels]
        self.name = name

    def after_backward(self, ctx: StepContext) -> dict:
        if ctx.batch is None:
            return {}
        model = ctx.model
        mods = dict(model.named_modules())
        if self.layer not in mods:
            raise UserError(f"ActivationQuantiles: no module named {self.layer!r}; e.g. {next(n for n in mods if n)!r}")
        seen: list[torch.Tensor] = []
        h = mods[self.layer].register_forward_hook(lambda m, a, out: seen.append(out.detach()) if not seen else None)
        try:
            with torch.no_grad():
                logits = logits_of(_stateless_forward(model, ctx.batch))
        finally:
            h.remove()
        ctx.scratch.setdefault(LOGITS_KEY, logits)  # the replayed forward's output, for TrainModeAccuracy
        out = seen[0]
        if isinstance(mods[self.layer], _FEATURES_LAST) and out.dim() > 2:
            out = out.movedim(-1, 1)  # (N, tokens, C) -> (N, C, tokens): a transformer's channels are last
        flat = (out[:, None] if out.dim() == 1 else out).transpose(0, 1).reshape(out.shape[1], -1).double()  # (C, N * positions)
        chans = self.channels if self.channels is not None else range(flat.shape[0])
        q = torch.quantile(flat, torch.tensor(self.quantiles, dtype=torch.float64, device=flat.device), dim=1)  # (Q, C)
        std, mean = torch.std_mean(flat, dim=1, correction=0)
        rec: dict[str, float] = {}
        for c in chans:
            for j, p in enumerate(self.quantiles):
                rec[f"{c}/q{p * 100:g}"] = float(q[j, c])
            rec[f"{c}/mean"] = float(mean[c])
            rec[f"{c}/std"] = float(std[c])
        return rec
