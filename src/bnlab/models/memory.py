"""How much memory a model would take, estimated before anything is built.

A depth of a million or a width of a billion is a valid integer, and building it either hangs
(millions of Python modules) or exhausts the machine. :func:`estimate` answers from the settings
alone: it builds the model on PyTorch's ``meta`` device (shapes, no storage) and runs one forward
pass there to count activations; for a deep model it builds two shallow versions and extrapolates
linearly in depth (every family here adds the same layers per unit of depth), so even a depth of
10⁹ is answered in milliseconds. :func:`check_fits` turns the estimate into a one-line refusal.

Training memory is estimated as::

    bytes ≈ element_size · (4 · parameters + 2 · batch_size · activations_per_example)

(weights, gradients, a momentum buffer and a spare copy; each layer's output kept for the
backward pass and its gradient). It is an estimate, deliberately on the generous side, not a
measurement; the limit can be raised with ``--max-memory`` or ``BNLAB_MAX_MEMORY``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError

#: deeper than this, the estimate extrapolates from two shallow builds instead of building the model
DIRECT_DEPTH = 64
#: the shallow depths each family is built at for the extrapolation (valid depths of that family)
_PROXY_DEPTHS = {"preresnet": (8, 14)}
#: input shapes of the built-in datasets, so that an experiment's settings can be checked before loading
DATASET_SHAPES = {"digits": ((1, 8, 8), 10), "mnist1d": ((1, 40), 10), "cifar10": ((3, 32, 32), 10)}


@dataclass(frozen=True)
class MemoryEstimate:
    """Parameters and per-example activations of a model, and the training memory they imply."""

    parameters: int
    activations_per_example: int
    batch_size: int
    element_size: int

    @property
    def training_bytes(self) -> int:
        return self.element_size * (4 * self.parameters + 2 * self.batch_size * self.activations_per_example)


@contextlib.contextmanager
def _no_init():
    """Skip ``torch.nn.init``'s fills while building on the meta device: there is no storage to fill,
    and the meta path of some initializers (``kaiming_normal_``) costs about a second to set up."""
    import torch.nn.init as init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


#: below this many parameters the activations are counted with a real forward pass on the CPU (fast);
#: above it on the meta device (no storage, but its first use imports ~1.5 s of PyTorch machinery)
_CPU_COUNT_PARAMS = 4_000_000


def _count(name: str, in_shape, num_classes: int, norm: str, batch: int, options: dict) -> tuple[int, int]:
    from . import make

    with torch.device("meta"), _no_init():
        model = make(name, norm=norm, in_shape=in_shape, num_classes=num_classes, **options)
    params = sum(p.numel() for p in model.parameters())
    device = "meta"
    if params <= _CPU_COUNT_PARAMS:
        with _no_init():  # uninitialized weights: the values are never looked at, only the shapes
            model = make(name, norm=norm, in_shape=in_shape, num_classes=num_classes, **options)
        device = "cpu"
    acts = 0

    def hook(module, inputs, output):
        nonlocal acts
        if isinstance(output, torch.Tensor):
            acts += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros(batch, *in_shape, device=device))
    except (RuntimeError, NotImplementedError, TypeError):
        acts = -1  # a layer without a meta kernel: activations unknown
    finally:
        for h in handles:
            h.remove()
    return params, (acts // batch if acts >= 0 else -1)


def estimate(name: str, *, in_shape, num_classes: int, norm: str = "bn", batch_size: int = 128,
             dtype: torch.dtype = torch.float32, **options) -> MemoryEstimate:
    """Estimate the parameters and activations of model ``name`` without allocating it.

    Args:
        name, in_shape, num_classes, norm, **options: as for :func:`bnlab.models.make`.
        batch_size: examples per training step.
        dtype: the training dtype (its element size).

    Returns:
        A :class:`MemoryEstimate` (``activations_per_example`` is -1 when a layer cannot run on
        the meta device; then only parameters count).

    Example:
        >>> e = estimate("mlp", in_shape=(1, 8, 8), num_classes=10, width=128, depth=10**9)
        >>> e.parameters > 10**13
        True
    """
    in_shape = tuple(int(s) for s in in_shape)
    depth = options.get("depth")
    if isinstance(depth, int) and not isinstance(depth, bool) and depth > DIRECT_DEPTH and name != "vgg":
        d1, d2 = _PROXY_DEPTHS.get(name, (1, 2))
        p1, a1 = _count(name, in_shape, num_classes, norm, 2, {**options, "depth": d1})
        p2, a2 = _count(name, in_shape, num_classes, norm, 2, {**options, "depth": d2})
        k = (depth - d1) / (d2 - d1)
        params = int(p1 + k * (p2 - p1))
        acts = int(a1 + k * (a2 - a1)) if a1 >= 0 and a2 >= 0 else -1
    else:
        params, acts = _count(name, in_shape, num_classes, norm, 2, options)
    return MemoryEstimate(params, acts, int(batch_size), torch.empty(0, dtype=dtype).element_size())


def parse_size(text: str) -> int:
    """Bytes from a size such as ``512M``, ``16G``, ``2T`` or a plain number (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not m:
        raise UserError(f"memory limit {text!r} is not a size; accepted: e.g. 512M, 16G, 2T or a number of bytes")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def memory_limit(device: str | torch.device = "cpu", override: Optional[str] = None) -> int:
    """The memory a run may use: ``override`` (e.g. ``"64G"``), else ``BNLAB_MAX_MEMORY``, else the
    device's memory (physical RAM on the CPU, the GPU's total memory on CUDA)."""
    text = override if override is not None else os.environ.get("BNLAB_MAX_MEMORY")
    if text:
        return parse_size(text)
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 2**62


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def check_fits(name: str, *, in_shape, num_classes: int, norm: str = "bn", batch_size: int = 128,
               device: str | torch.device = "cpu", max_memory: Optional[str] = None, dtype: torch.dtype = torch.float32,
               **options) -> MemoryEstimate:
    """Refuse, in one line and before anything is built, a model that would not fit in memory.

    Raises:
        UserError: the estimate (:func:`estimate`) exceeds :func:`memory_limit`, naming both and how
            to override.
    """
    est = estimate(name, in_shape=in_shape, num_classes=num_classes, norm=norm, batch_size=batch_size, dtype=dtype,
                   **options)
    limit = memory_limit(device, max_memory)
    if est.training_bytes > limit:
        shown = ", ".join(f"{k} {v}" for k, v in options.items())
        raise UserError(
            f"model {name!r} ({shown}) would need about {_human(est.training_bytes)} to train at batch size "
            f"{batch_size} ({est.parameters:.3g} parameters), more than the {_human(limit)} available; use smaller "
            f"settings, or raise the limit with --max-memory SIZE or BNLAB_MAX_MEMORY")
    return est


__all__ = ["MemoryEstimate", "estimate", "check_fits", "memory_limit", "parse_size", "DATASET_SHAPES"]
