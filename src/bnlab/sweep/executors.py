"""Executors: how the sweep's groups of members are run (in this process, or in worker processes).

The unit of work is a *group* of members. With the default :class:`LocalExecutor` the whole grid
is one group (one vectorized loop); with :class:`ProcessExecutor` ``(n)`` the members are split
into ``n`` groups (or one group per member when not vectorizing), each run in its own spawned
process with ``torch`` limited to ``cpu_count // n`` threads. Any object with ``max_workers`` and
``map(fn, items)`` (the :class:`Executor` protocol) can stand in.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from ..errors import UserError

__all__ = ["Executor", "LocalExecutor", "ProcessExecutor"]


@runtime_checkable
class Executor(Protocol):
    """Maps a function over work items, in order. ``max_workers`` = how many run at once."""

    max_workers: int

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        """``[fn(item) for item in items]``, possibly concurrently; results in input order."""
        ...


class LocalExecutor:
    """Runs every item in this process, one after the other (the default)."""

    max_workers = 1

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        return [fn(item) for item in items]

    def __repr__(self) -> str:
        return "LocalExecutor()"


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class ProcessExecutor:
    """Runs items in ``max_workers`` separate processes (``ProcessPoolExecutor``, ``spawn`` start).

    ``fn`` and the items are pickled: a sweep's ``model_fn`` must then be a module-level function
    or a ``functools.partial`` of one (not a lambda or a closure). Each worker sets
    ``torch.set_num_threads(threads_per_worker)`` (default ``max(1, cpu_count // max_workers)``) so
    that the workers do not oversubscribe the cores.

    Args:
        max_workers: processes run at once (>= 1).
        threads_per_worker: torch intra-op threads in each worker.

    Example:
        >>> res = bnlab.sweep.sweep(partial(models.make, "convnet", in_shape=(1, 8, 8), num_classes=10),
        ...                         train_set, lrs=[0.01, 0.1], steps=100, executor=ProcessExecutor(2))
    """

    def __init__(self, max_workers: int = 2, *, threads_per_worker: Optional[int] = None):
        if not isinstance(max_workers, int) or max_workers < 1:
            raise UserError(f"ProcessExecutor: max_workers must be a positive integer, got {max_workers!r}")
        self.max_workers = max_workers
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // max_workers)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        items = list(items)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(self.max_workers, max(1, len(items))), mp_context=ctx, initializer=_init_worker, initargs=(self.threads_per_worker,)
        ) as pool:
            return list(pool.map(fn, items))

    def __repr__(self) -> str:
        return f"ProcessExecutor(max_workers={self.max_workers}, threads_per_worker={self.threads_per_worker})"
