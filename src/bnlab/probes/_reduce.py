"""Fast float64-accumulated sums of squares and dot products of many tensors, for the cheap probes.

``sumsq64(ts)[i] = Σ_j ts[i]_j²`` and ``dot64(xs, ys)[i] = Σ_j xs[i]_j ys[i]_j`` as one float64
tensor (on the tensors' device), computed without a float64 copy of any large tensor and without
a host synchronization (read the result with one ``.tolist()``):

* float64 tensors, tensors off the CPU (a GPU converts at memory speed) and tensors of at most
  :data:`EXACT_MAX` elements: exact float64 arithmetic
  (small tensors are concatenated and converted together: one conversion, one segment sum);
* larger float32 tensors (other dtypes take the exact path): the elements are cut into rows of :data:`ROW`
  consecutive elements; each row's sum of squares is taken in float32 by a vectorized reduction
  and the row sums are added in float64; dot products are BLAS dot products of
  :data:`DOT_CHUNK` elements added in float64. The error is that of a short float32 sum (and of
  the float32 square root ``vector_norm`` rounds each row to) averaged over the rows: a few 1e-8
  relative at most (1e-8 of ``Σ|x·y|`` for a dot product), where a plain float32 ``vector_norm``
  of the same tensor is off by 1e-7 to 1e-4 (ResNet-18's largest filter bank); at the speed of
  one float32 pass.

Exact float64 for every tensor (converting it) costs ~5x a float32 pass: on ResNet-18 that alone
would exceed the 5% budget of a cheap probe.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: Tensors with at most this many elements are summed exactly in float64.
EXACT_MAX = 65536
#: Elements per float32 partial sum of squares for larger tensors.
ROW = 256
#: Elements per float32 partial dot product (one BLAS call each) for larger tensors.
DOT_CHUNK = 65536

__all__ = ["sumsq64", "dot64", "EXACT_MAX", "ROW", "DOT_CHUNK"]


def _split(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(flat view, number of elements in whole rows)``; 0 rows for small or float64 tensors."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= EXACT_MAX or flat.dtype != torch.float32 or flat.device.type != "cpu":
        return flat, 0
    return flat, n - n % ROW


def _reduce(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None) -> torch.Tensor:
    k = len(xs)
    if k == 0:
        return torch.zeros(0, dtype=torch.float64)
    dev = xs[0].device
    out = torch.zeros(k, dtype=torch.float64, device=dev)
    rows, row_ids, exact_x, exact_y, exact_ids = [], [], [], [], []
    for i in range(k):
        fx, m = _split(xs[i])
        fy = None if ys is None else ys[i].detach().reshape(-1)
        if m and fy is None:
            r = torch.linalg.vector_norm(fx[:m].view(-1, ROW), dim=1).to(torch.float64).square()
            rows.append(r)
            row_ids.append((i, r.numel()))
        elif m:  # BLAS dot products of DOT_CHUNK elements (no product temporary), added in float64
            m = fx.numel()
            r = torch.stack([torch.dot(fx[j:j + DOT_CHUNK], fy[j:j + DOT_CHUNK]) for j in range(0, m, DOT_CHUNK)])
            rows.append(r.to(torch.float64))
            row_ids.append((i, r.numel()))
        if m < fx.numel():
            exact_x.append(fx[m:])
            if fy is not None:
                exact_y.append(fy[m:])
            exact_ids.append((i, fx.numel() - m))
    if rows:
        _segment_add(out, torch.cat(rows) if len(rows) > 1 else rows[0], row_ids)
    if exact_x:
        x64 = (torch.cat(exact_x) if len(exact_x) > 1 else exact_x[0]).to(torch.float64)
        if ys is None:
            prod = x64 * x64
        else:
            prod = x64 * (torch.cat(exact_y) if len(exact_y) > 1 else exact_y[0]).to(torch.float64)
        _segment_add(out, prod, exact_ids)
    return out


_IDX_CACHE: dict = {}


def _segment_add(out: torch.Tensor, values: torch.Tensor, segments: list[tuple[int, int]]) -> None:
    """``out[i] += sum of the next n values`` for each ``(i, n)`` in ``segments`` (in order)."""
    if len(segments) == 1:
        i, _ = segments[0]
        out[i] += values.sum()
        return
    key = (tuple(segments), str(out.device))
    idx = _IDX_CACHE.get(key)
    if idx is None:
        if len(_IDX_CACHE) > 64:
            _IDX_CACHE.clear()
        ids = torch.tensor([i for i, _ in segments], dtype=torch.long)
        counts = torch.tensor([n for _, n in segments], dtype=torch.long)
        idx = _IDX_CACHE[key] = torch.repeat_interleave(ids, counts).to(out.device)
    out.index_add_(0, idx, values)


def sumsq64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[Σ t²  for t in tensors]`` as a float64 tensor (see the module docstring for the accuracy)."""
    return _reduce(list(tensors), None)


def dot64(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[Σ x·y  for x, y in zip(xs, ys)]`` as a float64 tensor (pairs of equal size)."""
    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys):
        raise ValueError(f"dot64: {len(xs)} tensors against {len(ys)}")
    return _reduce(xs, ys)
