"""One adapter between bnlab and the batches and outputs of any model.

Everything in bnlab that evaluates a model on a batch (``Monitor`` and the probes, the curvature
wrappers ``bnlab.curvature.model_*``, landscape probing, ``find_scale_invariant``) goes through
these few functions, so the same code works on

* a plain PyTorch batch ``(x, y)`` (a tuple or list; ``(x1, x2, ..., y)`` passes every element
  but the last to the model) with a model that returns a tensor of logits, and
* a Hugging Face batch, a dict ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``
  (or a ``BatchEncoding``), passed as ``model(**batch)``, with a model that returns a
  ``ModelOutput`` (or a dict, or a tuple whose first element is the logits).

The loss: with a ``loss_fn`` it is ``loss_fn(logits_of(output), labels_of(batch))``; without one
it is the loss the model computed itself, ``output["loss"]`` (Hugging Face models compute it
when the batch carries ``labels``). Probes given no ``loss_fn`` use :func:`default_loss_fn`:
``F.cross_entropy`` for ``(x, y)`` batches (bnlab's historical default), the model's own loss for
dict batches.

Also here: :func:`math_attention`, the context in which bnlab differentiates twice (the fused
``scaled_dot_product_attention`` kernels have no double backward), and
:func:`logits_and_output_grad`, ``∂L/∂logits`` also for a model that computes its own loss.

Example (plain PyTorch)::

    out = forward(net, (x, y))                      # net(x)
    loss = compute_loss(out, (x, y), F.cross_entropy)

Example (Hugging Face, a tiny BERT built from a config, nothing downloaded)::

    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3)
    model = BertForSequenceClassification(cfg)
    batch = {"input_ids": torch.randint(0, 100, (8, 12)),
             "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.randint(0, 3, (8,))}
    out = forward(model, batch)                     # model(**batch) -> SequenceClassifierOutput
    loss = compute_loss(out, batch)                 # out.loss, computed by the model
    loss = compute_loss(out, batch, F.cross_entropy)  # or cross_entropy(out.logits, batch["labels"])
    out = forward(model, batch, params={n: p.detach() for n, p in model.named_parameters()})
                                                    # torch.func.functional_call at those params
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = [
    "split_batch", "labels_of", "forward", "logits_of", "output_loss", "compute_loss", "model_loss",
    "batch_size", "batch_to", "is_dict_batch", "default_loss_fn", "math_attention",
    "logits_and_output_grad",
]

_LABEL_KEYS = ("labels", "label")


def is_dict_batch(batch: Any) -> bool:
    """Whether ``batch`` is a Hugging Face style mapping of model keyword arguments."""
    return isinstance(batch, Mapping)


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` the model is called with on ``batch``.

    * ``(x, y)`` or ``[x, y]`` → ``((x,), {})``; ``(x1, ..., xk, y)`` → ``((x1, ..., xk), {})``
      (the last element is the label); a 1-tuple ``(x,)`` → ``((x,), {})``;
    * a mapping (dict, ``BatchEncoding``) → ``((), dict(batch))``, i.e. ``model(**batch)``; the
      labels stay in, so a Hugging Face model computes its own loss;
    * a tensor ``x`` → ``((x,), {})``.
    """
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("empty batch: expected (x, y), a tensor, or a dict of model inputs")
        return (tuple(batch) if len(batch) == 1 else tuple(batch[:-1])), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise TypeError(f"batch must be a tuple/list (x, y), a tensor or a dict of model inputs, got {type(batch).__name__}")


def labels_of(batch: Any) -> torch.Tensor:
    """The labels of ``batch``: ``batch[-1]`` of a tuple/list, ``batch["labels"]`` (or
    ``batch["label"]``) of a mapping."""
    if isinstance(batch, Mapping):
        for k in _LABEL_KEYS:
            if k in batch and batch[k] is not None:
                return batch[k]
        raise ValueError(f"the batch has no labels: expected a key {' or '.join(map(repr, _LABEL_KEYS))}, "
                         f"got keys {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    raise ValueError(f"the batch has no labels: expected (x, y) or a dict with 'labels', got {type(batch).__name__}")


def forward(model: nn.Module, batch: Any, params: Optional[Mapping[str, torch.Tensor]] = None) -> Any:
    """``model(*args, **kwargs)`` with ``(args, kwargs) = split_batch(batch)``.

    With ``params`` (a ``{name: tensor}`` dict, possibly partial, possibly including buffers, or
    a tuple of such dicts, as :func:`torch.func.functional_call` takes):
    ``torch.func.functional_call(model, params, args, kwargs)``, i.e. the model evaluated at those
    tensors, the missing ones taken from the model.
    """
    args, kwargs = split_batch(batch)
    if params is None:
        return model(*args, **kwargs)
    if not isinstance(params, (tuple, list)):
        params = dict(params)
    return torch.func.functional_call(model, params, args, kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor is itself; a mapping or ``ModelOutput`` gives
    ``output["logits"]``; an object with ``.logits`` gives that; a tuple/list gives ``output[0]``
    (note: a Hugging Face model called with ``return_dict=False`` *and* labels returns
    ``(loss, logits, ...)``; use the default ``return_dict=True``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise ValueError(f"the model output has no 'logits'; keys: {sorted(output)}")
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def output_loss(output: Any) -> Optional[torch.Tensor]:
    """The loss the model computed itself (``output["loss"]`` / ``output.loss``), or ``None``."""
    if isinstance(output, Mapping):
        return output.get("loss")
    return getattr(output, "loss", None)


def compute_loss(output: Any, batch: Any, loss_fn: Optional[Callable] = None) -> torch.Tensor:
    """The scalar loss of ``output`` on ``batch``.

    ``loss_fn`` given: ``loss_fn(logits_of(output), labels_of(batch))``.
    ``loss_fn`` is ``None``: the model's own loss, ``output["loss"]`` / ``output.loss`` (a Hugging
    Face model computes it when the batch has ``labels``); a :class:`~bnlab.errors.UserError`
    if there is none.
    """
    if loss_fn is not None:
        return loss_fn(logits_of(output), labels_of(batch))
    loss = output_loss(output)
    if loss is None:
        from .errors import UserError
        raise UserError("no loss: pass loss_fn=..., or give a model that returns .loss "
                        "(a Hugging Face model does when the batch has 'labels')")
    return loss


def default_loss_fn(batch: Any, loss_fn: Optional[Callable] = None) -> Optional[Callable]:
    """The loss function probes use when the user gave none: ``loss_fn`` if given; else ``None``
    (the model's own ``output.loss``) for a dict batch, and ``torch.nn.functional.cross_entropy``
    for an ``(x, y)`` batch."""
    if loss_fn is not None:
        return loss_fn
    if isinstance(batch, Mapping):
        return None
    return torch.nn.functional.cross_entropy


def model_loss(model: nn.Module, batch: Any, loss_fn: Optional[Callable] = None,
               params: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """``compute_loss(forward(model, batch, params), batch, loss_fn)``."""
    return compute_loss(forward(model, batch, params), batch, loss_fn)


def batch_size(batch: Any) -> int:
    """The number of examples: the leading dimension of the first input tensor (``x`` of
    ``(x, y)``; ``input_ids``, else the first tensor value, of a mapping)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for k in ("input_ids", "inputs_embeds", "pixel_values", "input_values"):
            v = batch.get(k)
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
        raise ValueError("cannot tell the batch size: the dict batch holds no tensor")
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def batch_to(batch: Any, device: Any) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists and mappings keep their type
    where it can be rebuilt from a dict/list; other objects are returned as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: batch_to(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except Exception:
            return moved
    if isinstance(batch, tuple):
        return tuple(batch_to(v, device) for v in batch)
    if isinstance(batch, list):
        return [batch_to(v, device) for v in batch]
    return batch


def math_attention():
    """Context manager: ``torch.nn.functional.scaled_dot_product_attention`` uses its math backend
    inside, and the user's backend choice is restored on exit.

    The fused kernels (flash attention on CPU and GPU, memory-efficient, cuDNN) have no double
    backward ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), so a Hessian-vector product through a model that calls SDPA (every Hugging
    Face transformer with ``attn_implementation="sdpa"``) fails with them. The math backend is
    written in differentiable ops; it gives the same values up to round-off, costs more memory
    on long sequences, and is what bnlab's second-order code runs inside
    (:func:`bnlab.curvature.model_loss_closure`). Implemented with
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, which saves and restores the global
    backend flags; a no-op context on a torch without it.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        import contextlib
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def logits_and_output_grad(model: nn.Module, batch: Any, loss_fn: Optional[Callable] = None, *,
                           params: Optional[Mapping[str, torch.Tensor]] = None,
                           buffers: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits ``z`` on ``batch`` and ``G = ∂L/∂z``, the gradient of the batch loss with respect
    to them (both detached).

    The model runs through :func:`bnlab.functional.stateless_call` (cloned buffers, the RNG
    restored: the model and the training's random stream are untouched), at ``params`` if given.
    With ``loss_fn``: ``L = loss_fn(z, labels)`` with ``z`` made a leaf. Without (the model's own
    ``output.loss``, e.g. a Hugging Face model whose loss shifts the labels of a causal LM):
    a first pass finds the module whose output *is* the logits (``classifier``, ``lm_head``); a
    second pass, drawing the same dropout masks, replaces that output by a leaf, so the model's
    own loss is differentiated with respect to it. A :class:`~bnlab.errors.UserError` if no
    module returns the logits (then pass ``loss_fn``).
    """
    from .functional import stateless_call

    args, kwargs = split_batch(batch)
    if loss_fn is not None:
        with torch.no_grad():
            z = logits_of(stateless_call(model, *args, params=params, buffers=buffers, **kwargs))
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(z, labels_of(batch)), z)
        return z.detach(), g.detach()

    calls: list = []  # (module, call index, output), kept alive so that identity is meaningful
    counts: dict = {}

    def record(mod, _args, out):
        counts[mod] = counts.get(mod, 0) + 1
        if isinstance(out, torch.Tensor):
            calls.append((mod, counts[mod] - 1, out))

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            z0 = logits_of(stateless_call(model, *args, params=params, buffers=buffers, **kwargs))
    finally:
        for h in handles:
            h.remove()
    target = next(((m, i) for m, i, out in calls if out is z0), None)
    calls.clear()
    if target is None:
        from .errors import UserError
        raise UserError("cannot find the module that returns the logits, to differentiate the model's own loss "
                        "with respect to them; pass loss_fn=...")
    leaf: list = []
    seen = {"n": 0}

    def swap(mod, _args, out):
        k = seen["n"]
        seen["n"] += 1
        if k == target[1]:
            leaf.append(out.detach().requires_grad_(True))
            return leaf[0]
        return None

    handle = target[0].register_forward_hook(swap)
    try:
        with torch.enable_grad():
            out = stateless_call(model, *args, params=params, buffers=buffers, **kwargs)
            loss = compute_loss(out, batch, None)
            (g,) = torch.autograd.grad(loss, leaf[0])
    finally:
        handle.remove()
    return leaf[0].detach(), g.detach()
