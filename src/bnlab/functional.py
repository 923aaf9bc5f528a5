"""Stateless evaluation: run a model on given parameters and *copies* of its buffers.

Probes, sweeps and experiments often need the model's output (or loss) at other weights, or at
its own weights without the side effects of a forward pass: a train-mode BatchNorm updates its
running statistics, and noisy layers draw from the RNG. :func:`stateless_call` runs
:func:`torch.func.functional_call` with the parameters given (default: the model's own, detached)
and clones of the buffers (default: the model's own), so the model, its buffers and (by default)
the RNG state are exactly as they were afterwards. The mode (train/eval) is the model's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["stateless_state", "stateless_call"]


def stateless_state(model: nn.Module, params: Optional[Mapping[str, torch.Tensor]] = None,
                    buffers: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict for :func:`torch.func.functional_call`: ``params`` (default:
    the model's own parameters, detached) and *clones* of ``buffers`` (default: the model's own),
    so that a train-mode BatchNorm updates the clones, not the model.

    Args:
        model: the module whose names the dict uses.
        params: parameters by name (may require grad; used as given). Missing names are not filled in.
        buffers: buffers by name; cloned.

    Returns:
        A new dict; the caller may pass it to ``functional_call`` (also under ``vmap``).
    """
    p = dict(params) if params is not None else {n: t.detach() for n, t in model.named_parameters()}
    src = buffers if buffers is not None else dict(model.named_buffers())
    return {**p, **{n: b.detach().clone() for n, b in src.items()}}


def stateless_call(model: nn.Module, *args: Any, params: Optional[Mapping[str, torch.Tensor]] = None,
                   buffers: Optional[Mapping[str, torch.Tensor]] = None, preserve_rng: bool = True, **kwargs: Any):
    """``model(*args, **kwargs)`` at ``params``, with cloned buffers; the model is left untouched.

    Gradients flow to ``params`` when they require grad (wrap in ``torch.no_grad()`` otherwise).
    With ``preserve_rng`` (the default) the CPU RNG state (and the current CUDA device's, when
    the inputs are on CUDA) is restored afterwards, so a random layer's draw does not shift the
    training's random stream.

    Args:
        model: any ``nn.Module``.
        *args: positional inputs of ``model``.
        params: parameters by name (default: the model's own, detached).
        buffers: buffers by name (default: the model's own), cloned before the call.
        preserve_rng: fork the RNG around the call.
        **kwargs: keyword inputs of ``model``.

    Returns:
        What ``model`` returns.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
        >>> before = net[1].running_mean.clone()
        >>> _ = stateless_call(net, torch.randn(8, 3))
        >>> bool(torch.equal(net[1].running_mean, before))
        True
    """
    state = stateless_state(model, params, buffers)
    if preserve_rng:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and any(
            isinstance(a, torch.Tensor) and a.is_cuda for a in args) else []
        ctx = torch.random.fork_rng(devices=devices)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        return functional_call(model, state, args, kwargs)
