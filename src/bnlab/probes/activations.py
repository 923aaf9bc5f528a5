"""Activations and output gradients of a network: the quantities of Bjorck et al. (2018).

Three probes and the functions they are thin adapters over:

* :class:`ActivationStats` (cheap): per layer and per channel, the mean, standard deviation and
  largest magnitude of the outputs of chosen layers, read by forward hooks **during the training
  forward pass itself** (no extra pass).
* :class:`OutputGradients` (standard): ``G = ∂L_B/∂z`` (examples x classes, ``z`` the logits) from
  a separate forward pass on the probe batch, and the alignment of its rows
  ``Σ_k |Σ_i G_ik| / Σ_k Σ_i |G_ik|`` (1 when every example pushes each logit the same way).
* :class:`UpdateInterpolation` (standard): activation statistics and the batch loss along the
  segment ``w_t + s Δw``, ``s ∈ [0, 1]``, of one optimizer step ``Δw = w_{t+1} - w_t``.

Two functions measure the network's input-output map against depth (Bjorck et al.'s
explanation: products of random layers): :func:`jacobian_spectra`, the singular values of the
Jacobian ``∂h_ℓ(x)/∂x`` of each selected layer's output with respect to the input, per example;
and :func:`representation_cosine`, the mean pairwise cosine of the examples' representations.

**Channel statistics.** For a layer output ``h`` of shape ``(N, C, *spatial)`` (or ``(N, C)``), per
channel ``c``, over the ``N`` examples and all spatial positions::

    mean_c   = E[h_c]                       (signed)
    std_c    = sqrt(E[(h_c - mean_c)²])      (population standard deviation, correction 0)
    absmax_c = max |h_c|

A :class:`ChannelStats` holds these three ``(C,)`` tensors (float64, CPU). Its per-layer summary
(the numbers a probe records) is ``abs_mean = mean_c |mean_c|``, ``std = mean_c std_c`` and
``absmax = max_c absmax_c``: Bjorck et al.'s "average channel mean and standard deviation".

**Layer set.** ``layers`` chooses the modules whose outputs are measured:

* ``None`` (default): ``("affine", "block")``;
* ``"affine"``: every convolution and ``nn.Linear`` (the pre-normalization activations, and the
  logits through the classifier);
* ``"norm"``: every normalization layer (:func:`bnlab.models.is_norm_layer`);
* ``"block"``: composite modules held directly in an ``nn.Sequential``/``nn.ModuleList``
  (e.g. the residual blocks of ``preresnet``, whose output is the residual stream);
* a tuple of these names, an iterable of module names (``model.named_modules()`` names), or a
  callable ``(name, module) -> bool``.

Layers are reported in the order their outputs are computed in the forward pass (which is not
always registration order: a residual block's shortcut runs before its second conv). A module
called more than once in a pass is reported once per call, as ``name``, ``name#1``, ...

Reference:
    Bjorck, Gomes, Selman, Weinberger, Understanding Batch Normalization (NeurIPS 2018): the
    activations along a diverging update, channel moments against depth, and the gradients of
    the final outputs at initialization.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import batch_to, compute_loss, default_loss_fn, logits_and_output_grad, split_batch
from ..errors import UserError
from ..functional import stateless_call
from .base import Probe, StepContext

__all__ = [
    "ChannelStats",
    "LayerStats",
    "select_layers",
    "activation_stats",
    "output_gradients",
    "gradient_alignment",
    "jacobian_spectra",
    "representation_cosine",
    "ActivationStats",
    "OutputGradients",
    "UpdateInterpolation",
    "LAYER_PRESETS",
]

LayerSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
LAYER_PRESETS = ("affine", "norm", "block")
_STATS = ("abs_mean", "std", "absmax")


# ----------------------------------------------------------------------------- statistics
@dataclass
class ChannelStats:
    """Per-channel statistics of one layer's output: three float64 CPU tensors of shape ``(C,)``."""

    mean: torch.Tensor
    std: torch.Tensor
    absmax: torch.Tensor

    @classmethod
    def of(cls, h: torch.Tensor) -> "ChannelStats":
        """Statistics of an output ``h`` of shape ``(N, C, *spatial)``, ``(N, C)`` or ``(N,)``."""
        h = h.detach()
        if h.dim() == 1:
            h = h[:, None]
        h = h.transpose(0, 1).reshape(h.shape[1], -1).to(torch.float64)  # (C, N * positions)
        std, mean = torch.std_mean(h, dim=1, correction=0)
        return cls(mean.cpu(), std.cpu(), h.abs().amax(dim=1).cpu())

    def summary(self) -> dict[str, float]:
        """``abs_mean`` = mean over channels of ``|mean_c|``, ``std`` = mean of ``std_c``, ``absmax`` = max."""
        return {
            "abs_mean": float(self.mean.abs().mean()),
            "std": float(self.std.mean()),
            "absmax": float(self.absmax.max()),
        }


#: ``{layer name: ChannelStats}`` in forward order.
LayerStats = dict


def _fast_moments(h: torch.Tensor, scratch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std, absmax)`` of ``h`` as tensors on ``h``'s device, in one call (the
    probe splits the same computation into :func:`_raw_moments_stacked`, run on several outputs at
    once, and :func:`_finish_all`, run once per step).

    The same quantities as :meth:`ChannelStats.of`, by fast vectorized reductions instead of a
    transposed float64 copy and Welford's ``std_mean`` (10x faster on CPU): partial sums per
    example and channel in ``h``'s dtype (float32 for float16/bfloat16), added in float64; the
    variance two-pass, from the output centred at the mean rounded to ``h``'s dtype, ``m'`` (``Var =
    E[(h - m')²] - (m - m')²``; exactly 0 where max = min, a constant channel, which the rounded mean
    would leave at ~1e-7·|mean|);
    ``absmax = max(max h, -min h)``. Relative error ~1e-7 for float32 outputs. ``scratch`` (a dict
    the caller keeps) holds a buffer reused for the centred output, so that no fresh memory is
    allocated (and page-faulted) per layer and step.
    """
    return _finish_moments([_raw_moments(h, {} if scratch is None else scratch)])[0]


def _raw_moments(h: torch.Tensor, scratch: dict) -> tuple:
    """The passes over ``h`` that :class:`ActivationStats` needs, the arithmetic left for later.

    Returns ``(mean, ex2, mx, mn, k)``, per channel (``C``): the mean (float64: per example and channel
    the sum over the positions in ``h``'s dtype, these partial sums added in float64), ``ex2 = E[(h -
    k)²]`` (float64, summed the same way) with ``k`` the mean rounded to ``h``'s dtype (any shift gives
    the exact identity ``Var = E[(h - k)²] - (E[h] - k)²``; the mean makes it well conditioned), the
    max ``mx`` and the min ``mn``. :func:`_finish_moments` turns a step's worth of these into ``(mean,
    std, absmax)`` with a few operations for all layers together. Five passes over ``h`` (sum,
    centring, norm, max, min); the max and min reduce over the positions first where there are at
    least :data:`_POS_FIRST` of them and over the examples first otherwise (a reduction over a short
    contiguous axis is slow: 7x on ResNet-18's 4x4 maps).
    """
    return _raw_moments_stacked(_as_ncl(h)[:, None], scratch)


def _as_ncl(h: torch.Tensor) -> torch.Tensor:
    """A layer output ``(N, C, *positions)``, ``(N, C)`` or ``(N,)`` viewed as ``N x C x L`` (detached)."""
    h = h.detach()
    if h.dim() == 1:
        h = h[:, None]
    return h.reshape(h.shape[0], h.shape[1], -1)


#: :func:`_raw_moments` takes the max and min over the positions first when a map has at least this many.
_POS_FIRST = 64


def _raw_moments_stacked(x: torch.Tensor, scratch: dict, *, positions_last: bool = True) -> tuple:
    """:func:`_raw_moments` of ``g`` outputs of one shape at once, each reduction run once for the ``g``
    layers instead of once per layer, and the result already in the form of ``g`` layers' results
    concatenated along the channels (``K = g·C`` of them, layer by layer), as :func:`_finish_all`
    takes it: no per-layer split and re-concatenation.

    ``x`` is ``(N, g, C, L)`` (the outputs viewed as ``N x C x L``, stacked along the second axis, as
    the staging buffers hold them) or, with ``positions_last=False``, ``(N, g, L, C)``: for maps of few
    positions the reductions over them then run along a middle axis, vectorized over the channels,
    instead of along a short contiguous one (8x faster at 2x2). ``x`` may be a strided view (the first
    ``g`` slots of a buffer). Returns ``(mean, ex2, mx, mn, k)`` of :func:`_raw_moments`, each of shape ``(K,)``."""
    if positions_last:
        n, g, c, npos = x.shape
        pos, bshape = 3, (1, g, c, 1)
    else:
        n, g, npos, c = x.shape
        pos, bshape = 2, (1, g, 1, c)
    count = n * npos
    # float16/bfloat16 outputs (too large to stage, where they would be float32) are summed in float32
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    s = x.select(pos, 0) if npos == 1 else x.sum(pos, dtype=acc)  # (N, g, C)
    mean = s.sum(0, dtype=torch.float64).div_(count)  # (g, C), never a view of the staging buffer
    k = mean.to(x.dtype)
    buf = scratch.get("buf")
    if buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype or buf.device != x.device:
        buf = scratch["buf"] = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    cen = torch.sub(x, k.view(bshape), out=buf[:x.numel()].view(x.shape))
    # per example and channel Σ (h - k)², then E[(h - k)²] in float64. The (N, g, C) norms are squared in
    # float64 (a square in h's dtype overflows past sqrt(max): float16 256, float32 1.8e19, and underflows);
    # the norm of a map in float32 at least overflows past 1.8e19, as does the square of a staged few-position
    # map (float32; a norm along their middle axis is 70x slower)
    if npos == 1:
        q2 = cen.select(pos, 0).to(torch.float64).square_()
    elif positions_last:
        q2 = torch.linalg.vector_norm(cen, dim=pos, dtype=acc).to(torch.float64).square_()  # one pass, contiguous
    else:
        q2 = cen.square_().sum(pos)
    ex2 = q2.sum(0, dtype=torch.float64).div_(count)  # (vector_norm(dim=0, dtype=float64) is 10x slower)
    if positions_last and npos >= _POS_FIRST:
        mx, mn = x.amax(3).amax(0), x.amin(3).amin(0)
    elif positions_last:
        mx, mn = x.amax(0).amax(2), x.amin(0).amin(2)
    else:
        mx, mn = x.amax(0).amax(1), x.amin(0).amin(1)  # not amax((0, 2)): 30x slower over two apart axes
    kk = g * c
    return (mean.reshape(kk), ex2.reshape(kk), mx.reshape(kk), mn.reshape(kk), k.reshape(kk))


#: Staged maps of at most this many positions are laid out ``N x L x C`` (see :func:`_raw_moments_stacked`).
_FEW_POSITIONS = 8


#: Layer outputs of at most this many elements are staged (copied while hot into a buffer per shape) and
#: reduced together with the outputs of their shape that come right before or after them (:meth:`_Recorder._staged`):
#: on small maps the cost is the number of tensor operations per layer, not the data (ResNet-18 at 32x32
#: input: 29 outputs, 0.15-0.4 ms each one by one inside a training step).
_STAGE_MAX = 1 << 18
#: Largest total size (bytes) of the staging buffers of one recorder; past it, outputs of a new shape are
#: reduced one by one, and a full buffer that cannot grow is reduced and reused. The reductions also use a
#: scratch buffer as large as the largest run of one shape (or the largest output reduced on its own).
_STAGE_BYTES = 64 << 20
#: Outputs of one shape waiting in a staging buffer are reduced once they reach this size (while in the cache).
_FLUSH_BYTES = 4 << 20


def _finish_moments(raws: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(mean, std, absmax)`` (float64, on the device) per entry of ``raws`` (from :func:`_raw_moments`)."""
    mean, std, absmax, sizes = _finish_all(raws)
    return list(zip(mean.split(sizes), std.split(sizes), absmax.split(sizes)))


def _finish_all(raws: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """:func:`_finish_moments` without the split: ``(mean, std, absmax, sizes)`` with the channels of all
    entries concatenated (one set of operations for all of them; ``sizes``: channels per entry)."""
    sizes = [r[0].shape[0] for r in raws]
    mean, ex2, mx, mn, k = (torch.cat([r[i] for r in raws]) for i in range(5))
    shift = mean - k.to(torch.float64)
    std = (ex2 - shift * shift).clamp_min_(0.0).sqrt_()
    # a constant channel: exactly 0, not the rounded mean's ~1e-7·|mean| (a channel all ±inf stays nan)
    std = torch.where((mx == mn) & mx.isfinite(), 0.0, std)
    absmax = torch.maximum(mx, mn.neg()).to(torch.float64)
    return mean, std, absmax, sizes


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _preset(name: str) -> Callable[[str, nn.Module, Optional[nn.Module]], bool]:
    from ..models import is_norm_layer

    if name == "affine":
        return lambda n, m, parent: isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    if name == "norm":
        return lambda n, m, parent: is_norm_layer(m)
    if name == "block":
        return lambda n, m, parent: (
            parent is not None and _is_container(parent) and not _is_container(m) and any(True for _ in m.children())
        )
    raise UserError(f"unknown layer set {name!r}; accepted: {', '.join(LAYER_PRESETS)}, a list of module names, or a callable")


def select_layers(model: nn.Module, layers: LayerSpec = None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` chosen by ``layers`` (see the module docstring).

    Raises:
        UserError: unknown preset or module name, or nothing selected.
    """
    named = [(n, m) for n, m in model.named_modules() if n]  # never the root itself
    parents = {}
    for pn, pm in model.named_modules():
        for cn, cm in pm.named_children():
            parents[f"{pn}.{cn}" if pn else cn] = pm
    if layers is None:
        layers = ("affine", "block")
    if isinstance(layers, str):
        layers = (layers,)
    if callable(layers):
        chosen = [(n, m) for n, m in named if layers(n, m)]
    elif all(isinstance(s, str) and s in LAYER_PRESETS for s in layers):
        preds = [_preset(s) for s in layers]
        chosen = [(n, m) for n, m in named if any(p(n, m, parents.get(n)) for p in preds)]
    else:
        by_name = dict(named)
        unknown = [s for s in layers if s not in by_name]
        if unknown:
            raise UserError(f"no module named {unknown[0]!r} in the model; accepted: {', '.join(LAYER_PRESETS)} or names like {named[0][0]!r}")
        chosen = [(s, by_name[s]) for s in layers]
    if not chosen:
        raise UserError(f"layer selection {layers!r} matches no module of {type(model).__name__}")
    return chosen


class _Recorder:
    """Forward hooks on the selected modules; they record only while ``active`` is true.

    The hooks read the outputs (detached, under ``no_grad``) and return ``None``: they never
    change the forward pass.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec, *, fast: bool = False):
        self.model = model
        self.layers = select_layers(model, layers)
        self.fast = fast  # reduce to a _Pass (device tensors) instead of ChannelStats per layer
        self._scratch: dict = {}
        self.active = False
        self.stats: LayerStats = {}
        self._handles: list = []
        # fast mode: small outputs staged per (shape, layout, dtype, device):
        # {key: [buffer (N, cap, C, L) or (N, cap, L, C), outputs waiting in it]}; {(shape, dtype, device): plan}
        self._stage: dict = {}
        self._plans: dict = {}
        self._start_pass()

    def _start_pass(self) -> None:
        self._entries: list = []  # tuples of _raw_moments_stacked, in the order they were reduced
        self._where: dict = {}  # layer -> (entry, first channel, channels)
        self._waiting: dict = {}  # stage key -> layer names staged in its buffer, not reduced yet
        self._last = None  # the stage key of the last staged output
        self.staged: dict = {}  # stage key -> outputs of this pass staged under it
        for entry in self._stage.values():
            entry[1] = 0

    def start(self) -> None:
        """Begin recording a pass: empty ``stats``, the staging buffers kept (emptied)."""
        self.stats = {}
        self._start_pass()
        self.active = True

    def _record_fast(self, name: str, out: torch.Tensor) -> None:
        if not self._staged(name, out):  # reduced now, on its own
            raw = _raw_moments(out if out.is_floating_point() else out.to(torch.float64), self._scratch)
            self._where[name] = (len(self._entries), 0, raw[0].shape[0])
            self._entries.append(raw)
        self.stats[name] = None  # the order of the layers

    def _staged(self, name: str, out: torch.Tensor) -> bool:
        """Copy a small output into its shape's staging buffer; ``False`` when it is not staged.

        The outputs waiting in a buffer are reduced together (:meth:`_flush`) as soon as the pass
        stages an output of another shape, or their size reaches :data:`_FLUSH_BYTES`, so that the
        buffers stay as small as the longest run of one shape (on ResNet-18 this measured the same as
        reducing every shape at the end of the pass: 1.055 against 1.057x a bare step)."""
        sig = (out.shape, out.dtype, out.device)
        plan = self._plans.get(sig)
        if plan is None and sig not in self._plans:  # once per kind of output: its key and layout, or None
            if len(self._plans) > 1024:  # shapes that keep changing (sequence lengths): start over
                self._plans.clear()
            plan = self._plans[sig] = self._plan(out)
        if plan is None:
            return False
        key, ncl, few = plan
        if self._last is not None and self._last != key:
            self._flush(self._last)
        hv = out.detach().reshape(ncl)
        if few:  # N x L x C: see _raw_moments_stacked
            hv = hv.transpose(1, 2)
        entry = self._stage.get(key)
        shape, dtype = key[0], key[2]
        if entry is None:
            if self._stage_bytes() + 4 * hv.numel() * dtype.itemsize > _STAGE_BYTES:
                return False
            entry = self._stage[key] = [torch.empty((shape[0], 4) + shape[1:], dtype=dtype, device=hv.device), 0]
        buf, i = entry
        if i == buf.shape[1]:  # grow (rare: the first pass that sees more outputs of this shape in a row)
            if self._stage_bytes() + buf.numel() * buf.element_size() > _STAGE_BYTES:
                self._flush(key)  # no room to grow: reduce what waits, and start the buffer over
                i = 0
            else:
                grown = torch.empty((shape[0], 2 * i) + shape[1:], dtype=dtype, device=hv.device)
                grown[:, :i].copy_(buf)
                buf = entry[0] = grown
        buf[:, i].copy_(hv)
        entry[1] = i + 1
        self._waiting.setdefault(key, []).append(name)
        self.staged[key] = self.staged.get(key, 0) + 1
        self._last = key
        if entry[1] * hv.numel() * dtype.itemsize >= _FLUSH_BYTES:
            self._flush(key)
        return True

    def _flush(self, key) -> None:
        """Reduce the outputs waiting in ``key``'s buffer together (one :func:`_raw_moments_stacked`)."""
        entry = self._stage[key]
        buf, n = entry
        if n:
            c = key[0][2] if key[1] else key[0][1]
            e = len(self._entries)
            self._entries.append(_raw_moments_stacked(buf[:, :n], self._scratch, positions_last=not key[1]))
            for j, name in enumerate(self._waiting.pop(key)):
                self._where[name] = (e, j * c, c)
            entry[1] = 0
        if self._last == key:
            self._last = None

    @staticmethod
    def _plan(out: torch.Tensor):
        """``(key, N x C x L shape, few)`` of an output that can be staged, else ``None``."""
        if out.numel() > _STAGE_MAX or not out.is_floating_point() or out.dim() == 0:
            return None
        ncl = tuple(_as_ncl(out).shape)
        few = 1 < ncl[2] <= _FEW_POSITIONS
        shape = (ncl[0], ncl[2], ncl[1]) if few else ncl
        # float16/bfloat16 outputs are staged in float32 (an exact upcast, free with the copy): their
        # squares would overflow or underflow in the reductions
        dtype = torch.promote_types(out.dtype, torch.float32)
        return (shape, few, dtype, out.device), ncl, few

    def _stage_bytes(self) -> int:
        return sum(e[0].numel() * e[0].element_size() for e in self._stage.values())

    def resolve(self) -> "_Pass":
        """The recorded pass as a :class:`_Pass`: the outputs still waiting in the staging buffers
        reduced (one :func:`_raw_moments_stacked` per waiting run), with those reduced during the pass."""
        for key in list(self._waiting):
            self._flush(key)
        # buffers of shapes this pass did not use are freed (shapes change, e.g. with the sequence length)
        self._stage = {k: e for k, e in self._stage.items() if k in self.staged}
        return _Pass(self._entries, {name: self._where[name] for name in self.stats})

    def attach(self) -> "_Recorder":
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = False

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.active or torch.is_inference_mode_enabled():  # an inference pass is never the one recorded
                return None
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, torch.Tensor) or out.dim() == 0:
                return None
            key, k = name, 0
            while key in self.stats:
                k += 1
                key = f"{name}#{k}"
            with torch.no_grad():
                if self.fast:
                    self._record_fast(key, out)
                else:
                    self.stats[key] = ChannelStats.of(out)
            return None

        return hook

    def __enter__(self):
        self.stats = {}
        self.attach()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.detach()


@torch.no_grad()
def _forward_stats(model: nn.Module, x, layers: LayerSpec, params=None, buffers=None) -> tuple[LayerStats, torch.Tensor]:
    args, kwargs = split_batch(x)  # an input tensor, an (x, y) batch or a dict batch (bnlab.adapters)
    with _Recorder(model, layers) as rec:
        out = stateless_call(model, *args, params=params, buffers=buffers, **kwargs)
    return rec.stats, out


def activation_stats(model: nn.Module, x: torch.Tensor, layers: LayerSpec = None, *, params: Optional[dict] = None) -> LayerStats:
    """Per-channel statistics of the selected layers' outputs for one forward pass on ``x``.

    The pass runs in the model's current mode (a train-mode BatchNorm normalizes with the
    statistics of ``x``, as in training) through :func:`bnlab.functional.stateless_call` (cloned
    buffers): the model, its buffers and the RNG are left exactly as they were.

    Args:
        model: the network.
        x: a batch of inputs ``(N, ...)``.
        layers: the layer set (see the module docstring).
        params: evaluate at these parameters ``{name: tensor}`` instead of the model's own.

    Returns:
        ``{layer name: ChannelStats}`` in forward order.

    Example:
        >>> stats = activation_stats(net, x, "affine")
        >>> [s.summary()["std"] for s in stats.values()]   # average channel std per layer
    """
    return _forward_stats(model, x, layers, params)[0]


def output_gradients(model: nn.Module, batch, loss_fn: Callable = F.cross_entropy, *, params: Optional[dict] = None) -> torch.Tensor:
    """``G = ∂L_B/∂z``: the gradient of the batch loss with respect to the network outputs.

    For cross-entropy with mean reduction ``G_i = (softmax(z_i) - onehot(y_i)) / N``. One forward
    pass (model's current mode, cloned buffers, RNG restored) and a backward pass through the
    loss only: nothing in the model changes and no ``.grad`` is written.

    Args:
        model: the network.
        batch: ``(x, y)``.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        params: evaluate at these parameters instead of the model's own.

    Returns:
        ``(N, K)`` tensor (detached).
    """
    return _logits_and_output_grad(model, batch, loss_fn, params)[1]


def _logits_and_output_grad(model: nn.Module, batch, loss_fn: Optional[Callable], params: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # (x, y) or a dict batch; loss_fn None: the model's own output.loss (bnlab.adapters)
    return logits_and_output_grad(model, batch, loss_fn, params=params)


def gradient_alignment(g: torch.Tensor) -> dict[str, float]:
    """How alike the rows (examples) of an output gradient ``G`` (N x K) are.

    ::

        abs_sum = Σ_k |Σ_i G_ik|        sum_abs = Σ_k Σ_i |G_ik|        ratio = abs_sum / sum_abs

    ``ratio`` is 1 when, for every class, all examples push its logit the same way (the network
    predicts alike for all inputs) and small when the examples' gradients cancel. Also
    ``row_cos``: the mean cosine similarity between distinct rows.
    """
    g = g.detach().to(torch.float64)
    abs_sum = float(g.sum(0).abs().sum())
    sum_abs = float(g.abs().sum())
    n = g.shape[0]
    u = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    s = u.sum(0)
    row_cos = float((s @ s - (u * u).sum()) / (n * (n - 1))) if n > 1 else float("nan")
    return {"abs_sum": abs_sum, "sum_abs": sum_abs, "ratio": abs_sum / sum_abs if sum_abs > 0 else float("nan"), "row_cos": row_cos}


def _batch_dependent_norms(model: nn.Module) -> list[str]:
    """Names of the train-mode batch normalization layers (their output couples the examples)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or not m.track_running_stats)]


def jacobian_spectra(model: nn.Module, x: torch.Tensor, layers: LayerSpec = None, *, directions: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """Singular values of the input-output Jacobian of each selected layer, per example.

    For example ``x_i`` (``D`` input numbers) and a layer with output ``h_ℓ`` (``D_ℓ`` numbers per
    example), ``J_ℓ(x_i) = ∂h_ℓ(x_i)/∂x_i`` (``D_ℓ x D``) is computed by forward-mode automatic
    differentiation along ``k`` orthonormal input directions ``Q`` (``D x k``): ``J_ℓ Q``, all
    layers in one forward pass of the ``N·k`` dual inputs. With ``k = D`` (the default) ``Q = I``
    and the singular values are exactly those of ``J_ℓ``; with ``directions < D`` ``Q`` is random
    (``generator``) and the values are those of ``J_ℓ`` restricted to ``span Q`` (they interlace
    with ``J_ℓ``'s: a proxy for large inputs).

    Bjorck et al.'s argument: without normalization the Jacobian of a deep network is a product
    of random matrices, whose largest singular value pulls away from the rest with depth (the
    ratio largest / mean grows), so every input is mapped close to one direction.

    The model runs in its current mode through :func:`bnlab.functional.stateless_call` (model,
    buffers and RNG untouched); each example must be processed on its own, so a train-mode
    BatchNorm (which normalizes with the batch's statistics, coupling the examples) is refused:
    freeze it first with :func:`bnlab.noise.frozen_norm_copy` (the statistics of a batch held
    fixed, the per-example map a train-mode pass on that batch computes).

    Args:
        model: the network.
        x: inputs ``(N, ...)``.
        layers: the layer set (module docstring).
        directions: ``k``, the number of input directions (default: all ``D``).
        generator: draws ``Q`` when ``k < D``.

    Returns:
        ``{layer name: [N, min(k, D_ℓ)] float64 singular values, descending}`` in forward order.

    Raises:
        UserError: a batch-dependent normalization layer in train mode, or ``directions < 1``.

    Example:
        >>> sv = jacobian_spectra(frozen_norm_copy(net, x), x[:8], "block")
        >>> {name: float((s[:, 0] / s.mean(1)).mean()) for name, s in sv.items()}   # largest / mean, per layer
    """
    import torch.autograd.forward_ad as fwAD

    bad = _batch_dependent_norms(model)
    if bad:
        raise UserError(f"jacobian_spectra: {bad[0]!r} normalizes with batch statistics, which couple the examples; "
                        "use bnlab.noise.frozen_norm_copy(model, x) first")
    n, d = x.shape[0], x[0].numel()
    k = d if directions is None else int(directions)
    if k < 1:
        raise UserError(f"directions must be >= 1, got {directions}")
    k = min(k, d)
    dtype = x.dtype
    if k == d:
        q = torch.eye(d, dtype=dtype, device=x.device)
    else:
        g = torch.randn(d, k, generator=generator, dtype=torch.float64)
        q = torch.linalg.qr(g).Q.to(dtype=dtype, device=x.device)
    primal = x.repeat_interleave(k, dim=0)  # example i's copies are rows i*k .. i*k + k - 1
    tangent = q.T.reshape(1, k, d).expand(n, k, d).reshape(n * k, *x.shape[1:]).contiguous()
    chosen = select_layers(model, layers)
    out: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            o = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(o, torch.Tensor):
                return None
            t = fwAD.unpack_dual(o).tangent
            if t is None:
                return None
            key, j = name, 0
            while key in out:
                j += 1
                key = f"{name}#{j}"
            out[key] = t.detach().reshape(n, k, -1)
            return None
        return hook

    handles = [m.register_forward_hook(hook_for(nm)) for nm, m in chosen]
    try:
        with torch.no_grad(), fwAD.dual_level():
            stateless_call(model, fwAD.make_dual(primal, tangent))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.linalg.svdvals(t.to(torch.float64).cpu()) for name, t in out.items()}


@torch.no_grad()
def representation_cosine(model: nn.Module, x: torch.Tensor, layers: LayerSpec = None) -> dict[str, float]:
    """Mean pairwise cosine similarity of the examples' representations at each selected layer.

    For a layer output ``h`` (``N`` examples, each flattened to a vector ``h_i``)::

        cos_ℓ = (1 / (N (N − 1))) Σ_{i ≠ j} ⟨h_i, h_j⟩ / (‖h_i‖ ‖h_j‖)

    1 when every input is mapped to the same direction (the network cannot tell its inputs
    apart), about 0 for unrelated representations. One forward pass in the model's current mode
    (a train-mode BatchNorm normalizes with the statistics of ``x``), through
    :func:`bnlab.functional.stateless_call`.

    Returns:
        ``{layer name: cos_ℓ}`` in forward order (NaN for a layer whose outputs are all zero).
    """
    chosen = select_layers(model, layers)
    out: dict[str, float] = {}

    def hook_for(name):
        def hook(module, args, output):
            o = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(o, torch.Tensor) or o.dim() == 0:
                return None
            h = o.detach().reshape(o.shape[0], -1).to(torch.float64)
            nrm = h.norm(dim=1, keepdim=True)
            u = h / nrm.clamp_min(1e-300)
            m = h.shape[0]
            s = u.sum(0)
            val = float((s @ s - (u * u).sum()) / (m * (m - 1))) if m > 1 and bool((nrm > 0).all()) else float("nan")
            key, j = name, 0
            while key in out:
                j += 1
                key = f"{name}#{j}"
            out[key] = val
            return None
        return hook

    handles = [m.register_forward_hook(hook_for(nm)) for nm, m in chosen]
    try:
        stateless_call(model, x)
    finally:
        for h in handles:
            h.remove()
    return out


def _flat(stats: LayerStats, per_channel: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for layer, cs in stats.items():
        for k, v in cs.summary().items():
            out[f"{layer}/{k}"] = v
        if per_channel:
            for c in range(cs.mean.numel()):
                out[f"{layer}/{c}/mean"] = float(cs.mean[c])
                out[f"{layer}/{c}/std"] = float(cs.std[c])
                out[f"{layer}/{c}/absmax"] = float(cs.absmax[c])
    return out


# ----------------------------------------------------------------------------- probes
def _flat_summaries(stats: LayerStats) -> dict[str, float]:
    """``_flat(stats, False)`` (each layer's :meth:`ChannelStats.summary`) for all layers in a few operations."""
    if not stats:
        return {}
    flat = torch.stack([torch.cat([getattr(cs, f) for cs in stats.values()]) for f in ("mean", "std", "absmax")])
    return _summaries(flat, [cs.mean.numel() for cs in stats.values()], list(stats))


def _summaries(flat: torch.Tensor, sizes: list[int], names: list[str]) -> dict[str, float]:
    """``{"<layer>/abs_mean|std|absmax": value}`` of layers whose channels lie one after another in
    ``flat`` (rows mean, std, absmax; ``sizes`` channels each), in the order of ``names``."""
    lengths = torch.tensor(sizes)
    rows = torch.stack([torch.segment_reduce(flat[0].abs(), "mean", lengths=lengths),
                        torch.segment_reduce(flat[1], "mean", lengths=lengths),
                        torch.segment_reduce(flat[2], "max", lengths=lengths)]).T.tolist()
    out: dict[str, float] = {}
    for layer, (am, sd, mx) in zip(names, rows):
        out[f"{layer}/abs_mean"], out[f"{layer}/std"], out[f"{layer}/absmax"] = am, sd, mx
    return out


@dataclass
class _Pass:
    """A pass recorded by :class:`ActivationStats`' fast path (:meth:`_Recorder.resolve`).

    ``entries``: tuples of :func:`_raw_moments_stacked`, one per reduction of staged outputs (a run of
    outputs of one shape: their channels one after another) and one per output reduced on its own; ``where``: per layer, in forward
    order, ``(entry, its first channel in the entry, its channels)``."""

    entries: list
    where: dict


def _pass_stats(p: _Pass, *, channels: bool = True, summaries: bool = False) -> tuple[LayerStats, dict[str, float]]:
    """``({layer: ChannelStats}, summaries)`` of a recorded pass (float64, CPU; layers in forward
    order): one finish for all entries (:func:`_finish_all`), one transfer, and per layer only
    views of the result. ``channels=False`` leaves the first empty, ``summaries=False`` the second."""
    if not p.where:
        return {}, {}
    mean, std, absmax, sizes = _finish_all(p.entries)
    flat = torch.stack([mean, std, absmax]).cpu()
    offsets = [0, *itertools.accumulate(sizes)]  # of each entry's first channel
    # the layers tile the channels: sorted by where they lie, they split ``flat`` in one call per row
    placed = sorted(p.where, key=lambda name: offsets[p.where[name][0]] + p.where[name][1])
    sizes = [p.where[name][2] for name in placed]
    stats: LayerStats = {}
    if channels:
        rows = [r.split(sizes) for r in flat.unbind(0)]
        by_name = {name: ChannelStats(m, s, a) for name, m, s, a in zip(placed, *rows)}
        stats = {name: by_name[name] for name in p.where}
    summ: dict[str, float] = {}
    if summaries:
        by = _summaries(flat, sizes, placed)
        summ = {f"{name}/{k}": by[f"{name}/{k}"] for name in p.where for k in _STATS}
    return stats, summ


def _same_input(a, x: torch.Tensor) -> bool:
    """Whether a forward pass's input is the step's batch (the same tensor, or an equal copy)."""
    if a is x:
        return True
    if not isinstance(a, torch.Tensor) or a.shape != x.shape:
        return False
    return a.device != x.device or bool(torch.equal(a, x))


class ActivationStats(Probe):
    """Channel mean, standard deviation and largest magnitude of each layer's output (cost: cheap).

    Forward hooks, registered at ``before_step`` of a scheduled step and removed at its
    ``after_backward`` (or ``after_step`` when the step stopped early), read the outputs of the
    **training forward pass** at ``w_t``: no extra pass. Step 0 is the initialization. The pass
    measured is the first forward of the root model after ``before_step`` that runs with gradients
    enabled, on the step's input tensor, with the model's own parameters (so passes of other
    probes through :func:`torch.func.functional_call` or under ``no_grad`` are ignored).

    The hooks compute the channel statistics on the output's device with fast reductions
    (:func:`_raw_moments_stacked`: per channel, float64 totals of per-example partial sums in the
    output's dtype, a variance from the output centred at its mean; relative error ~1e-7 for float32
    outputs, where :func:`activation_stats` is exact in float64), finished once per step for all
    layers together (:func:`_finish_all`), and the step's numbers reach the host in one transfer. An
    output of at most ``_STAGE_MAX`` (262,144) elements is only copied in its hook, while it is in
    the cache, into a buffer per shape (64 MiB at most, float32 for float16/bfloat16 outputs, kept
    between steps while the shape recurs, plus a scratch buffer as large as the largest run); the
    outputs of one shape that come one after another are reduced together when the pass moves on to
    another shape (or when they reach ``_FLUSH_BYTES``, 4 MiB), since on small maps the cost is the
    number of tensor operations per layer, not the data. On ResNet-18 (batch 32 of 32x32 images, CPU,
    one thread; 29 layers measured, maps 8x8 to 1x1, 7 reductions a step) it costs 1.05-1.07x a bare
    step (1.15x four versions ago), against 1.01-1.02x for merely reading the outputs once
    (``benchmarks/probe_overhead.py``'s floor); ``every=10`` makes it ~0.5%.

    Records ``"<layer>/abs_mean"``, ``"<layer>/std"``, ``"<layer>/absmax"`` per layer (see the
    module docstring) and, with ``per_channel``, ``"<layer>/<c>/mean|std|absmax"`` per channel.
    With ``keep`` the full per-channel statistics are kept in ``self.history`` as
    ``(step, {layer: ChannelStats})``.

    Args:
        every: steps to measure at (an int n: steps 0, n, 2n, ...).
        layers: the layer set (module docstring); default convolutions, linear layers and blocks.
        per_channel: also record every channel's numbers.
        keep: keep the per-channel tensors in ``history``.
        name: metric prefix.

    Example:
        >>> probe = ActivationStats(every=10, layers="affine")
        >>> train(net, data, opt, steps=100, probes=[probe])
        >>> step, stats = probe.history[0]          # at initialization
    """

    name = "act"
    cost = "cheap"

    def __init__(self, every: int | Callable[[int], bool] = 1, layers: LayerSpec = None, *, per_channel: bool = False,
                 keep: bool = True, name: str = "act"):
        super().__init__(every)
        self.layers = layers
        self.per_channel = per_channel
        self.keep = keep
        self.name = name
        self.history: list[tuple[int, LayerStats]] = []
        self._rec: Optional[_Recorder] = None
        self._root_handles: list = []
        self._x = None
        self._armed = False
        self._done = False
        self._own: Optional[tuple] = None

    # The root hooks decide which forward pass is the training pass.
    def _root_pre(self, module, args):
        if not self._armed or self._done or self._rec.active or not torch.is_grad_enabled():
            return None
        if self._x is not None and not (args and _same_input(args[0], self._x)):
            return None
        if self._own is not None:
            mod, pname, p = self._own
            if mod._parameters.get(pname) is not p:  # inside functional_call: not the model's own weights
                return None
        self._rec.start()
        return None

    def _root_post(self, module, args, output):
        # the pass _root_pre started runs with gradients (a pass that raised leaves ``active`` set until
        # the next before_step: an evaluation under no_grad/inference_mode meanwhile is not it)
        if self._rec is not None and self._rec.active and torch.is_grad_enabled():
            self._rec.active = False
            self._done = True
            with torch.no_grad():
                self._rec.stats = self._rec.resolve()  # while the staged outputs are still in the cache
        return None

    def before_step(self, ctx: StepContext) -> None:
        model = ctx.model
        if self._rec is None or self._rec.model is not model:
            self._release()
            self._rec = _Recorder(model, self.layers, fast=True)
            self._own = None
            for mod in model.modules():
                for pname, p in mod._parameters.items():
                    if p is not None:
                        self._own = (mod, pname, p)
                        break
                if self._own is not None:
                    break
        self._rec.attach()
        self._rec.active = False  # a pass that raised last step left it recording
        if not self._root_handles:
            self._root_handles = [model.register_forward_pre_hook(self._root_pre), model.register_forward_hook(self._root_post)]
        batch = ctx.batch
        self._x = batch[0] if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) else None
        self._armed, self._done = True, False
        return None

    def _finish(self, ctx: StepContext) -> dict:
        if not self._armed:
            return {}
        done, rec = self._done, self._rec
        self._armed = False
        self._x = None
        self._release()
        if not done or not rec.stats.where:
            return {}
        want_channels = self.keep or self.per_channel
        stats, summ = _pass_stats(rec.stats, channels=want_channels, summaries=not self.per_channel)
        if self.keep:
            self.history.append((ctx.step, stats))
        return _flat(stats, True) if self.per_channel else summ

    def _release(self) -> None:
        if self._rec is not None:
            self._rec.detach()
        for h in self._root_handles:
            h.remove()
        self._root_handles = []

    def after_backward(self, ctx: StepContext) -> dict:
        return self._finish(ctx)

    def after_step(self, ctx: StepContext) -> dict:
        return self._finish(ctx)  # only when after_backward did not run (a non-finite loss)


class OutputGradients(Probe):
    """The gradient of the batch loss with respect to the logits, ``G = ∂L_B/∂z`` (cost: standard).

    At ``before_step`` (weights ``w_t``; step 0 is the initialization) a separate forward pass on
    the probe batch (the step's batch, or a fixed ``batch``) in the model's current mode, with
    cloned buffers, then a backward pass through the loss only. Records ``ratio``
    (``Σ_k |Σ_i G_ik| / Σ_k Σ_i |G_ik|``), ``abs_sum``, ``sum_abs``, ``row_cos`` (see
    :func:`gradient_alignment`) and ``majority``, the fraction of examples predicted as the most
    predicted class. With ``keep``, ``self.history`` holds ``(step, G)`` with ``G`` of shape
    ``(N, K)``: the data of Bjorck et al.'s output-gradient heat map.

    Args:
        every: steps to measure at.
        batch: a fixed ``(x, y)`` probe batch; default the step's own batch.
        keep: keep ``G`` in ``history``.
        name: metric prefix.
    """

    name = "out_grad"
    cost = "standard"

    def __init__(self, every: int | Callable[[int], bool] = 1, batch=None, *, keep: bool = True, name: str = "out_grad"):
        super().__init__(every)
        self.batch = batch
        self.keep = keep
        self.name = name
        self.history: list[tuple[int, torch.Tensor]] = []

    def before_step(self, ctx: StepContext) -> dict:
        batch = self.batch if self.batch is not None else ctx.batch
        if batch is None:
            return {}
        dev = next((p.device for p in ctx.model.parameters()), None)
        if dev is not None:
            batch = batch_to(batch, dev)
        z, g = _logits_and_output_grad(ctx.model, batch, default_loss_fn(batch, ctx.loss_fn))
        if z.dim() > 2:  # token-level logits (N, T, K): every position counts as an example
            z, g = z.reshape(-1, z.shape[-1]), g.reshape(-1, g.shape[-1])
        g = g.detach().cpu()
        if self.keep:
            self.history.append((ctx.step, g))
        pred = z.argmax(1)
        majority = float(torch.bincount(pred).max()) / len(pred) if len(pred) else float("nan")
        return {**gradient_alignment(g), "majority": majority}


class UpdateInterpolation(Probe):
    """Loss and activations along one step, ``w_t + s Δw`` with ``Δw = w_{t+1} - w_t`` (cost: standard).

    ``w_t`` (parameters and buffers) is copied at ``before_step``; at ``after_step`` (weights
    ``w_{t+1}``, only when the step completed its backward pass) the batch of the step is sent
    through the network at ``w_t + s Δw`` for each ``s`` with :func:`bnlab.functional.stateless_call`
    (the model's parameters and buffers are never touched; the buffers used are clones of those
    at ``w_t``; in train mode a BatchNorm normalizes with the batch's statistics, as in
    training). ``s = 0`` reproduces the training forward pass at ``w_t`` and ``s = 1`` the pass at
    ``w_{t+1}`` on the same batch.

    Records ``rel_loss = L_B(w_{t+1}) / L_B(w_t)`` (the relative loss of the actual step), and per
    ``s`` (formatted ``s0.25``, ``s1``) ``"<s>/loss"`` and, with ``emit_layers``, ``"<s>/<layer>/abs_mean|std|absmax"``.
    With ``keep``, ``self.history`` holds ``(step, {"s": tensor, "loss": tensor, "stats": [LayerStats per s]})``.

    Args:
        every: steps to measure at.
        s: the positions along the update (default 11 points 0, 0.1, ..., 1).
        layers: the layer set (module docstring).
        emit_layers: record per-layer numbers (else only the losses).
        keep: keep the per-channel statistics in ``history``.
        name: metric prefix.
    """

    name = "interp"
    cost = "standard"

    def __init__(self, every: int | Callable[[int], bool] = 1, s: Sequence[float] | int = 11, layers: LayerSpec = None, *,
                 emit_layers: bool = True, keep: bool = True, name: str = "interp"):
        super().__init__(every)
        grid = torch.linspace(0.0, 1.0, s) if isinstance(s, int) else torch.as_tensor(list(s), dtype=torch.float64)
        if grid.numel() < 1:
            raise UserError("UpdateInterpolation needs at least one position s")
        self.s = [float(v) for v in grid]
        self.layers = layers
        self.emit_layers = emit_layers
        self.keep = keep
        self.name = name
        self.history: list[tuple[int, dict]] = []
        self._w: Optional[dict] = None
        self._buf: Optional[dict] = None
        self._stepped = False

    def before_step(self, ctx: StepContext) -> None:
        if ctx.batch is None:
            self._w = None
            return None
        self._w = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        self._buf = {n: b.detach().clone() for n, b in ctx.model.named_buffers()}
        self._stepped = False
        return None

    def after_backward(self, ctx: StepContext) -> None:
        self._stepped = True
        return None

    def after_step(self, ctx: StepContext) -> dict:
        w0, buf = self._w, self._buf
        self._w = self._buf = None
        if w0 is None or not self._stepped:
            return {}
        model = ctx.model
        batch = ctx.batch
        loss_fn = default_loss_fn(batch, ctx.loss_fn)
        w1 = {n: p.detach() for n, p in model.named_parameters()}
        losses, per_s, out = [], [], {}
        for s in self.s:
            params = {n: w0[n] + s * (w1[n] - w0[n]) for n in w0}
            if s == 0.0:
                params = w0
            elif s == 1.0:
                params = w1
            stats, z = _forward_stats(model, batch, self.layers, params, buf)
            with torch.no_grad():
                loss = float(compute_loss(z, batch, loss_fn))
            losses.append(loss)
            per_s.append(stats)
            key = f"s{s:g}"
            out[f"{key}/loss"] = loss
            if self.emit_layers:
                out.update({f"{key}/{k}": v for k, v in _flat(stats, False).items()})
        l0, l1 = losses[self.s.index(0.0)] if 0.0 in self.s else None, losses[self.s.index(1.0)] if 1.0 in self.s else None
        if l0 is not None and l1 is not None:
            out["rel_loss"] = l1 / l0 if l0 != 0 else float("nan")
        if self.keep:
            self.history.append((ctx.step, {"s": torch.tensor(self.s, dtype=torch.float64), "loss": torch.tensor(losses, dtype=torch.float64), "stats": per_s}))
        return out
