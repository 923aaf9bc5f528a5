"""Executors: how the sweep's groups of members are run (in this process, or in worker processes).

The unit of work is a *group* of members. With the default :class:`LocalExecutor` the whole grid
is one group (one vectorized loop); with :class:`ProcessExecutor` ``(n)`` the members are split
into ``n`` groups (or one group per member when not vectorizing), each run in its own spawned
process with ``torch`` limited to ``cpu_count // n`` threads; with :class:`RayExecutor` each item
is a Ray task, on a local Ray instance started for the purpose or on a cluster. Any object with
``max_workers`` and ``map(fn, items)`` (the :class:`Executor` protocol) can stand in.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from ..errors import UserError

__all__ = ["Executor", "LocalExecutor", "ProcessExecutor", "RayExecutor"]


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


# ----------------------------------------------------------------------------- Ray


def _import_ray():
    """``ray``, or a one-line :class:`UserError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UserError("the Ray executor needs the ray package; install it with: pip install 'bnlab[ray]'") from None
    return ray


def _package_dir() -> Path:
    import bnlab

    return Path(bnlab.__file__).resolve().parent


_DIGESTS: dict[str, str] = {}


def code_digest(pkg_dir: Optional[Path] = None) -> str:
    """SHA-256 (16 hex digits) over the relative paths and bytes of the ``.py`` and ``.j2`` files of
    the bnlab package at ``pkg_dir`` (default: the one imported): equal digests = the same code."""
    pkg_dir = Path(pkg_dir or _package_dir())
    h = hashlib.sha256()
    for f in sorted(q for q in pkg_dir.rglob("*") if q.suffix in (".py", ".j2") and "__pycache__" not in q.parts):
        h.update(f.relative_to(pkg_dir).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _ray_call(fn: Callable[[Any], Any], item: Any, driver: dict) -> Any:
    """What a Ray task runs: check that this worker imports the same bnlab as the driver, then ``fn(item)``.

    The same checkout (same host and package directory) passes; elsewhere (another node, code
    shipped with the tasks) the digests of the source files must agree."""
    here = str(_package_dir())
    same_checkout = here == driver["path"] and socket.gethostname() == driver["host"]
    if not same_checkout and here not in _DIGESTS:
        _DIGESTS[here] = code_digest(Path(here))
    if not same_checkout and _DIGESTS[here] != driver["digest"]:
        raise UserError(f"the Ray worker on {socket.gethostname()} imports bnlab from {here}, whose code differs from the "
                        f"driver's ({driver['path']} on {driver['host']}); install the same bnlab on every node or use "
                        f"RayExecutor(ship_code=True)")
    return fn(item)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


class RayExecutor:
    """Runs each item as a Ray task: on a local Ray instance started here, or on a running cluster.

    ``map(fn, items)`` submits ``fn(item)`` for every item at once (``num_cpus_per_task`` CPUs and
    ``num_gpus_per_task`` GPUs each, so Ray runs ``floor(CPUs / num_cpus_per_task)`` at a time),
    waits for all of them and returns the results in input order. ``fn`` and the items are pickled
    (cloudpickle): a module-level function or a ``functools.partial`` of one is safest.

    * ``address=None``: start a local instance on first use (``num_cpus`` CPUs, default all;
      no dashboard; workers' output not copied here; usage statistics off unless the environment
      says otherwise) and shut it down in :meth:`close` (or at the end of a ``with`` block). If
      Ray is already initialized in this process, that instance is used and left running.
    * ``address="auto"`` or ``"ray://host:10001"`` / ``"host:6379"``: connect to that cluster
      (and disconnect in :meth:`close`).

    Same code everywhere: every task first checks that its worker imports bnlab from this
    checkout (same host, same package directory) or, elsewhere, the same code (a digest of the
    package's source files), and fails with one line if not. On a
    local instance the workers get this checkout's package directory on ``PYTHONPATH``; with
    ``ship_code`` (default: when connecting to an ``address``) the package directory is shipped to
    the cluster with the tasks (Ray ``runtime_env`` ``py_modules``); its other dependencies
    (torch, ...) must be installed on the nodes.

    Failures: a task whose worker process dies (killed, out of memory, node lost) is retried up to
    ``max_retries`` times; an exception raised by ``fn`` is not retried (it would be raised again).
    ``map`` waits for every task to end, then raises for the first failed item in input order: a
    :class:`~bnlab.errors.UserError` raised by ``fn`` as itself, a worker that died as a one-line
    ``UserError`` naming the item, any other exception of ``fn`` as Ray's ``RayTaskError`` (with the
    remote traceback). Ctrl-C cancels the tasks still running.

    Args:
        address: ``None`` (start a local instance) or a Ray cluster address.
        num_cpus_per_task: CPUs each task reserves (torch in a task uses that many threads).
        num_gpus_per_task: GPUs each task reserves.
        num_cpus: CPUs of a local instance (default ``os.cpu_count()``).
        max_retries: re-runs of a task whose worker died.
        object_store_memory: bytes of a local instance's object store (results travel through it).
        ship_code: ship this bnlab package to the workers (default: when ``address`` is given).
        runtime_env: a Ray ``runtime_env`` merged with the one described above.
        progress: show a progress bar of finished tasks.
        desc: the progress bar's label.

    Example:
        >>> with RayExecutor(num_cpus=2) as ex:
        ...     ex.map(math.sqrt, [1.0, 4.0, 9.0])
        [1.0, 2.0, 3.0]
    """

    def __init__(self, address: Optional[str] = None, *, num_cpus_per_task: float = 1, num_gpus_per_task: float = 0,
                 num_cpus: Optional[int] = None, max_retries: int = 1, object_store_memory: Optional[int] = 256 * 1024**2,
                 ship_code: Optional[bool] = None, runtime_env: Optional[dict] = None, progress: bool = False,
                 desc: str = "ray tasks"):
        if not isinstance(num_cpus_per_task, (int, float)) or isinstance(num_cpus_per_task, bool) or not num_cpus_per_task > 0:
            raise UserError(f"RayExecutor: num_cpus_per_task must be a number > 0, got {num_cpus_per_task!r}")
        if not isinstance(num_gpus_per_task, (int, float)) or isinstance(num_gpus_per_task, bool) or num_gpus_per_task < 0:
            raise UserError(f"RayExecutor: num_gpus_per_task must be a number >= 0, got {num_gpus_per_task!r}")
        if num_cpus is not None and (not isinstance(num_cpus, int) or isinstance(num_cpus, bool) or num_cpus < 1):
            raise UserError(f"RayExecutor: num_cpus must be a positive integer, got {num_cpus!r}")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise UserError(f"RayExecutor: max_retries must be an integer >= 0, got {max_retries!r}")
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise UserError(f"RayExecutor: address must be a Ray cluster address (e.g. 'auto', 'ray://host:10001'), "
                            f"got {address!r}")
        self.address = address.strip() if address else None
        self.num_cpus_per_task = num_cpus_per_task
        self.num_gpus_per_task = num_gpus_per_task
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.object_store_memory = object_store_memory
        self.ship_code = (self.address is not None) if ship_code is None else bool(ship_code)
        self.runtime_env = dict(runtime_env or {})
        self.progress = progress
        self.desc = desc
        self._owns = False  # this executor called ray.init (and so calls ray.shutdown)
        self._remote = None

    # -------------------------------------------------------------- lifecycle
    def _runtime_env(self) -> dict:
        env = dict(self.runtime_env)
        pkg = _package_dir()
        if self.ship_code:
            env["py_modules"] = [*env.get("py_modules", []), str(pkg)]
        else:
            env_vars = dict(env.get("env_vars", {}))
            if "PYTHONPATH" not in env_vars:  # the workers import this checkout's bnlab
                env_vars["PYTHONPATH"] = os.pathsep.join([str(pkg.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
            env["env_vars"] = env_vars
        return env

    def start(self) -> "RayExecutor":
        """Start the local instance or connect to ``address`` (done by the first :meth:`map`)."""
        if self._remote is not None:
            return self
        ray = _import_ray()
        if not ray.is_initialized():
            kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "runtime_env": self._runtime_env()}
            if self.address is None:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                kwargs.update(num_cpus=self.num_cpus or os.cpu_count() or 1, object_store_memory=self.object_store_memory)
            else:
                kwargs["address"] = self.address
                kwargs.pop("include_dashboard")
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                raise UserError(f"cannot connect to the Ray cluster at {self.address!r}: {_first_line(e)}") from None
            self._owns = True
        self._remote = ray.remote(_ray_call)
        self._driver = {"digest": code_digest(), "path": str(_package_dir()), "host": socket.gethostname()}
        return self

    def close(self) -> None:
        """Shut down the Ray instance this executor started (or disconnect from the cluster it joined)."""
        if self._owns:
            import ray

            ray.shutdown()
            self._owns = False
        self._remote = None

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def max_workers(self) -> int:
        """Tasks that run at once: the cluster's CPUs (``num_cpus`` before a local start) // ``num_cpus_per_task``."""
        if self._remote is None and self.address is None and self.num_cpus is not None:
            cpus = self.num_cpus
        else:
            import ray

            self.start()
            cpus = ray.cluster_resources().get("CPU", 1)
        return max(1, int(cpus // self.num_cpus_per_task))

    # -------------------------------------------------------------- work
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        """``[fn(item) for item in items]`` as Ray tasks, results in input order (see the class doc for failures)."""
        items = list(items)
        if not items:
            return []
        self.start()
        import ray
        from ray.exceptions import RayError, RayTaskError, TaskCancelledError

        opts = dict(num_cpus=self.num_cpus_per_task, num_gpus=self.num_gpus_per_task, max_retries=self.max_retries,
                    retry_exceptions=False)
        refs = [self._remote.options(**opts).remote(fn, item, self._driver) for item in items]
        index = {r: i for i, r in enumerate(refs)}
        results: list = [None] * len(items)
        errors: dict[int, BaseException] = {}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=self.desc, unit="task", dynamic_ncols=True)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    try:
                        results[index[r]] = ray.get(r)
                    except RayError as e:  # the task's exception, or its worker/node died
                        errors[index[r]] = e
                    if bar is not None:
                        bar.update(1)
        except BaseException:  # Ctrl-C: stop what still runs
            for r in pending:
                try:
                    ray.cancel(r, force=True)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            raise
        finally:
            if bar is not None:
                bar.close()
        if not errors:
            return results
        i = min(errors)
        e = errors[i]
        also = f" ({len(errors) - 1} other task(s) failed too)" if len(errors) > 1 else ""
        label = repr(items[i])
        label = label if len(label) <= 80 else label[:77] + "..."
        if isinstance(e, RayTaskError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(f"{cause}{also}") from None
            raise e
        if isinstance(e, TaskCancelledError):
            raise UserError(f"the Ray task for {label} was cancelled{also}") from None
        tries = f"after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}" if self.max_retries else "(no retries)"
        raise UserError(f"the Ray worker running {label} died {tries}: {type(e).__name__}: {_first_line(e)}{also}") from None

    def __repr__(self) -> str:
        where = self.address or "local"
        return f"RayExecutor(address={where!r}, num_cpus_per_task={self.num_cpus_per_task}, max_retries={self.max_retries})"
