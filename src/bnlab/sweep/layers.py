"""The ``vmap`` rules of the stacked layers: ``M`` members folded into the channel dimension.

:func:`use_stacked_layers` routes a template module's plain layers through custom ``vmap`` rules
(:class:`_MemberRule`) that fold the members into the channel dimension,
``(N, M, C, *) -> (N, M·C, *)``, and call one kernel: ``Conv1d``/``Conv2d`` as one grouped
convolution (``M·groups`` groups; a shared input feeds all ``M·C_out`` filters at once),
``BatchNorm{1,2,3}d`` in train mode as one fused BatchNorm over ``M·C`` channels with the
flattened ``γ, β`` and running statistics (views of the stacked buffers, updated in place;
vmap's generic rule would apply ``γ, β`` as separate passes), and max/average pooling as one
call. Maps are kept **channels-last** (``N, H, W, M·C`` in memory; a 1-D convolution runs as
a 2-D one of height 1, so sequences are stored ``N, L, M·C``): on the CPU, grouped
convolutions with a few channels per group are 2.5-4x faster forward+backward in that layout
(1.4-3.5x in 1-D), max pooling ~15x, BatchNorm 1.5-12x (batch 128, 8x8 to 2x2 maps, one
thread), and the ``(N, M, C, *)`` view every rule returns is then free, with no layout copies
between layers. Other layers use vmap's own rules.

Used by the vectorized trainer (:mod:`bnlab.sweep.trainer`).
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["use_stacked_layers"]


class _MemberRule(torch.autograd.Function):
    """Run ``rule`` as the ``vmap`` rule of one layer call: ``_MemberRule.apply(rule, *args)``.

    Under ``torch.func.vmap`` over the ``M`` stacked members, ``rule(M, in_dims, *args)`` receives
    the physical (batched) tensors and their batch dimensions and returns ``(output, out_dim)``;
    the operations it runs are recorded by autograd as usual, so the outer reverse pass
    differentiates through them. Used only inside the sweep's vmapped calls (its ``forward`` is
    never reached).
    """

    generate_vmap_rule = False

    @staticmethod
    def forward(rule, *args):  # pragma: no cover
        raise RuntimeError("bnlab.sweep: the stacked layer rules run only under torch.func.vmap")

    @staticmethod
    def setup_context(ctx, inputs, output):  # pragma: no cover
        pass

    @staticmethod
    def vmap(info, in_dims, rule, *args):
        return rule(info.batch_size, in_dims[1:], *args)


def _members_first(t: Tensor, d: Optional[int], m: int) -> Tensor:
    """``t`` batched at ``d`` (or shared: ``d is None``) as ``[M, *shape]``, a view."""
    return t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(m, *t.shape)


def _members_in_channels(x: Tensor, d: Optional[int], m: int) -> Tensor:
    """``(N, C, *)`` per member, batched at ``d`` -> ``(N, M·C, *)`` (a view when ``d == 1`` already)."""
    return _members_first(x, d, m).movedim(0, 1).flatten(1, 2)


def _per_member(t: Optional[Tensor], d: Optional[int], m: int) -> Optional[Tensor]:
    """A per-member parameter ``[*shape]`` batched at ``d`` -> ``[M·shape[0], *shape[1:]]``."""
    return None if t is None else _members_first(t, d, m).flatten(0, 1)


def _channels_last(x: Tensor) -> Tensor:
    """A 4-D tensor in channels-last strides (``(N, C, H, W)`` stored as ``N, H, W, C``); those of a
    one-channel input count as contiguous too, so test the strides, as the kernels read them."""
    if x.dim() != 4:
        return x
    _, c, h, w = x.shape
    if x.stride() == (h * w * c, 1, w * c, c):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def _conv_rule(m, dims, x, weight, bias, stride, padding, dilation, groups):
    """Convolution of ``M`` members as one grouped convolution over ``M·C`` channels, channels-last
    (CPU kernels for grouped convolutions of a few channels per group are 1.4-4x faster in that
    layout, forward and backward; a 1-D convolution runs as a 2-D one of height 1)."""
    dx, dw, db = dims[:3]
    if dx is None and groups == 1:  # a shared input feeds every member's filters
        x_in, g = x, 1
    else:
        x_in, g = _members_in_channels(x, dx, m), groups * m
    w, b = _per_member(weight, dw, m), _per_member(bias, db, m)
    if x_in.dim() == 3:  # Conv1d, as a 2-D convolution of height 1, channels-last; the output is (N, M·C, L) stored as N, L, M·C
        if not isinstance(padding, str):
            padding = (0, padding[0])
        out = F.conv2d(_channels_last(x_in.unsqueeze(2)), w.unsqueeze(2), b, (1, stride[0]), padding, (1, dilation[0]), g).squeeze(2)
    else:
        out = F.conv2d(_channels_last(x_in), w, b, stride, padding, dilation, g)
    return out.unflatten(1, (m, -1)), 1


def _channelwise_rule(m, dims, x, fn):
    """A per-channel operation (pooling) of ``M`` members as one call over ``M·C`` channels (``x`` is
    batched: the module forwards call the rule only then)."""
    return fn(_members_in_channels(x, dims[0], m)).unflatten(1, (m, -1)), 1


def _batch_norm_rule(m, dims, x, weight, bias, running_mean, running_var, momentum, eps):
    """Train-mode BatchNorm of ``M`` members as *one* BatchNorm over ``M·C`` channels.

    ``torch.func.vmap``'s own rule for ``batch_norm`` with per-member γ, β normalizes without
    the affine part and then applies ``· γ + β`` as separate broadcast operations (two more passes
    over the activations forward, three backward). This folds the members into the channels,
    ``(N, M, C, *) -> (N, M·C, *)``, and calls the fused kernel with the flattened ``γ, β`` and
    running statistics (views of the stacked buffers, updated in place), which is exactly
    per-member BatchNorm.
    """
    dx, dw, db, drm, drv = dims[:5]
    x_in = _members_in_channels(x, dx, m)
    stats = [None if t is None else _members_first(t, d, m) for t, d in ((running_mean, drm), (running_var, drv))]
    flat = [None if t is None else t.reshape(-1) for t in stats]  # views of contiguous buffers
    sequence_cl = x_in.dim() == 3 and x_in.stride(1) == 1 and x_in.shape[2] > 1  # (N, C, L) stored as N, L, C
    out = F.batch_norm(x_in.unsqueeze(2) if sequence_cl else x_in, flat[0], flat[1], _per_member(weight, dw, m), _per_member(bias, db, m), True, momentum, eps)
    if sequence_cl:  # the kernel for 2-D channels-last maps is ~2x faster than for strided sequences
        out = out.squeeze(2)
    for t, f in zip(stats, flat):
        if t is not None and f.data_ptr() != t.data_ptr():  # reshape copied: write the update back
            t.copy_(f.view_as(t))
    return out.unflatten(1, (m, -1)), 1


def _batched(*ts: Optional[Tensor]) -> bool:
    """Whether a tensor is batched by the enclosing ``vmap``: with none batched, functorch would
    call ``_MemberRule.forward`` rather than the rule, so the layer runs its own ``forward``
    (e.g. a pooling layer on the shared input batch)."""
    return any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in ts)


def _stacked_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``forward`` of the template's BatchNorm layers: train mode through :func:`_batch_norm_rule`."""
    if not self.training or not _batched(x, self.weight, self.bias, self.running_mean, self.running_var):
        return type(self).forward(self, x)
    self._check_input_dim(x)
    if self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
    track = self.track_running_stats
    return _MemberRule.apply(
        _batch_norm_rule, x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
        self.momentum or 0.0, self.eps,
    )


def _stacked_conv_forward(self: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``forward`` of the template's ``Conv1d``/``Conv2d`` layers: :func:`_conv_rule`."""
    if x.dim() != self.weight.dim() or not _batched(x, self.weight, self.bias):  # unbatched input, or nothing batched
        return type(self).forward(self, x)
    return _MemberRule.apply(_conv_rule, x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _stacked_pool_forward(self: nn.Module, x: Tensor) -> Tensor:
    """``forward`` of the template's pooling layers: :func:`_channelwise_rule`."""
    if x.dim() != _POOLS[type(self)] or not _batched(x):  # unbatched input, or the shared batch
        return type(self).forward(self, x)
    return _MemberRule.apply(_channelwise_rule, x, functools.partial(type(self).forward, self))


_POOLS = {  # pooling layer type -> dims of a batched input (N, C, *spatial)
    nn.MaxPool1d: 3, nn.MaxPool2d: 4, nn.AvgPool1d: 3, nn.AvgPool2d: 4,
    nn.AdaptiveAvgPool1d: 3, nn.AdaptiveAvgPool2d: 4, nn.AdaptiveMaxPool1d: 3, nn.AdaptiveMaxPool2d: 4,
}


def use_stacked_layers(template: nn.Module) -> None:
    """Route the private template's plain layers (exact types, not subclasses) through the
    member-folding ``vmap`` rules: ``BatchNorm{1,2,3}d`` (not ``momentum=None``, whose cumulative
    average vmap cannot express), ``Conv{1,2}d`` with zero padding, and max/average pooling
    without ``return_indices``. Every other layer keeps vmap's own rules.

    The module is changed in place (its layers' ``forward`` is replaced): call it on a private
    copy. Outside ``torch.func.vmap``, or when nothing a layer receives is batched, each layer runs
    its own ``forward``.

    Args:
        template: the module whose layers to route (e.g. a deep copy of one member).

    Example:
        >>> template = copy.deepcopy(model)
        >>> use_stacked_layers(template)
        >>> vmap(lambda st, x: functional_call(template, st, (x,)), in_dims=(0, None))(stacked, x)
    """
    for mod in template.modules():
        t = type(mod)
        if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and mod.momentum is not None:
            mod.forward = types.MethodType(_stacked_bn_forward, mod)
        elif t in (nn.Conv1d, nn.Conv2d) and mod.padding_mode == "zeros":
            mod.forward = types.MethodType(_stacked_conv_forward, mod)
        elif t in _POOLS and not getattr(mod, "return_indices", False):
            mod.forward = types.MethodType(_stacked_pool_forward, mod)
