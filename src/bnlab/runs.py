"""Run directories: ``<root>/<name>/<id>/`` with everything a report needs, written atomically.

Layout::

    config.json      what was asked for (the config hash names the run)
    env.json         versions, device, seed, git commit when there is one
    metrics.jsonl    one JSON line per logged step/eval (streamed to metrics.jsonl.partial,
                     renamed when the run ends)
    summary.json     final numbers
    verdicts.json    experiments only: one verdict per declared claim
    figures/*.png    experiments only
    complete         written last: a run without it is unfinished and is never reused
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ._io import atomic_write_bytes, atomic_write_json, atomic_write_text, to_jsonable
from .errors import UserError

COMPLETE = "complete"
LOCK = ".bnlab.lock"
DAMAGED = ".damaged-"  # a damaged run moved aside: <run>.damaged-<time>
#: the files a finished run must have readable (JSON, UTF-8), and metrics.jsonl (JSON lines)
_REQUIRED_JSON = ("config.json", "summary.json")


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    out = []
    p = Path(path)
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        out.append(p)
        p = p.parent
    return out[::-1]


def check_output_root(root: str | Path) -> Path:
    """Check that ``root`` (``--out``) is a directory, or can be created as one, and is writable.

    Nothing is created. Raises a one-line :class:`~bnlab.errors.UserError` when ``root`` is a
    file, lies below a file, or lies in a place that cannot be written (permissions, a read-only
    file system).
    """
    p = Path(root)
    if str(root) == "":
        raise UserError("--out is empty; give a directory")
    try:
        missing = _missing_ancestors(p)
        existing = missing[0].parent if missing else p
        if not existing.is_dir():
            what = "is a file" if existing.exists() else "is not a directory"
            if missing:
                raise UserError(f"--out {root} cannot be created: {existing} {what}")
            raise UserError(f"--out {root} {what}; give a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"--out {root} is not writable (no write permission on {existing})")
        if hasattr(os, "statvfs") and os.statvfs(existing).f_flag & getattr(os, "ST_RDONLY", 1):
            raise UserError(f"--out {root} is on a read-only file system ({existing})")
    except OSError as e:  # a symlink loop, a name too long, ...
        raise UserError(f"--out {root} cannot be used: {e.strerror or e}") from None
    return p


@contextlib.contextmanager
def output_lock(root: str | Path, *, cleanup: bool = True) -> Iterator[None]:
    """Hold ``<root>/.bnlab.lock`` for the duration: a second bnlab on the same ``--out`` refuses.

    The lock is an ``flock`` on the file, released by the kernel when the process ends (even by
    SIGKILL), so a killed run never leaves a stale lock. The refusal names the other process.
    With ``cleanup``, runs left unfinished by a killed process are removed
    (:func:`remove_unfinished`). A lock file in a directory this call created, with nothing else
    written, is removed again while still held (a process that then locks the removed file notices
    and takes the new one).
    """
    import fcntl

    root = check_output_root(root)
    created = _missing_ancestors(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            try:
                other = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            except OSError:
                other = "unknown"
            os.close(fd)
            raise UserError(f"another bnlab process ({other}) is using --out {root}; wait for it to finish "
                            f"or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a lock file removed meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover - twenty removals in a row
        raise UserError(f"could not lock --out {root}: its lock file keeps being replaced")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {' '.join(sys.argv[:3])}".encode(), 0)
        if cleanup:
            for p in remove_unfinished(root):
                print(f"bnlab: note: removed {p}, an unfinished run left by an interrupted process", file=sys.stderr)
        yield
    finally:
        try:
            if created and [q.name for q in root.iterdir()] == [LOCK]:  # nothing else written: leave no trace
                with contextlib.suppress(OSError):
                    path.unlink()  # still holding the lock: a waiter re-checks the inode and retries
                    for q in reversed(created):
                        q.rmdir()
        finally:
            os.close(fd)  # releases the lock


_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{12}(-\d+)?")  # the names RunDir.create gives (time stamp, hash, -k)


def remove_unfinished(root: str | Path) -> list[Path]:
    """Delete the run directories under ``root`` that bnlab started but never finished (no
    ``complete`` marker), e.g. left by a process killed with SIGKILL; return them. Only
    ``<root>/<name>/<run id>/`` directories that are empty or hold the ``config.json`` bnlab writes
    first (with its ``config_hash``) are touched, so nothing a user put there is removed. Call only
    while holding :func:`output_lock`, so that no live bnlab process is writing them."""
    removed = []
    root = Path(root)
    for exp_dir in (p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for p in exp_dir.iterdir():
            if not (p.is_dir() and not p.is_symlink() and _RUN_ID.fullmatch(p.name) and not (p / COMPLETE).exists()):
                continue
            if not any(p.iterdir()):
                with contextlib.suppress(OSError):
                    p.rmdir()
                    removed.append(p)
                continue
            try:
                ours = "config_hash" in json.loads((p / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError, TypeError, AttributeError):
                ours = False
            if ours:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def unreadable_reason(run_path: str | Path) -> Optional[str]:
    """Why a finished run directory cannot be read back (``None`` if it can).

    Checks that ``config.json``, ``summary.json``, ``verdicts.json`` (experiments) and every line
    of ``metrics.jsonl`` are UTF-8 JSON, and that ``config.json`` has the run's ``config``.
    """
    p = Path(run_path)
    names = list(_REQUIRED_JSON) + (["verdicts.json"] if (p / "experiment.json").exists() else [])
    for name in names + (["experiment.json"] if (p / "experiment.json").exists() else []):
        f = p / name
        try:
            obj = json.loads(f.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return f"{name} is missing"
        except UnicodeDecodeError:
            return f"{name} is not UTF-8"
        except ValueError as e:
            return f"{name} is not JSON ({e.msg} at line {e.lineno})" if hasattr(e, "msg") else f"{name} is not JSON"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
        if not isinstance(obj, (dict, list)) or (name == "config.json" and not isinstance(obj.get("config"), dict)):
            return f"{name} does not hold what bnlab wrote"
        if name == "verdicts.json" and not (isinstance(obj, dict) and isinstance(obj.get("verdicts"), list)):
            return "verdicts.json does not hold verdicts"
    for f in sorted(p.glob("*.npz")):
        try:
            import numpy as np

            with np.load(f, allow_pickle=False) as z:
                for key in z.files:
                    z[key]
        except Exception as e:  # noqa: BLE001 - a damaged archive can raise anything zipfile/numpy has
            return f"{f.name} cannot be read ({type(e).__name__})"
    m = p / "metrics.jsonl"
    try:
        with open(m, "rb") as fh:
            for k, line in enumerate(fh, 1):
                if line.strip():
                    json.loads(line.decode("utf-8"))
    except FileNotFoundError:
        return "metrics.jsonl is missing"
    except UnicodeDecodeError:
        return f"metrics.jsonl line {k} is not UTF-8"
    except ValueError:
        return f"metrics.jsonl line {k} is not JSON"
    except OSError as e:
        return f"metrics.jsonl cannot be read ({e.strerror})"
    return None


def move_aside(run_path: str | Path) -> Path:
    """Rename a damaged run to ``<run>.damaged-<time>`` (kept for inspection, never reused); return the new path."""
    p = Path(run_path)
    dest = p.with_name(f"{p.name}{DAMAGED}{time.strftime('%Y%m%d-%H%M%S')}")
    k = 1
    while dest.exists():
        k += 1
        dest = p.with_name(f"{p.name}{DAMAGED}{time.strftime('%Y%m%d-%H%M%S')}-{k}")
    os.replace(p, dest)
    return dest


def config_hash(config: dict) -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of ``config``."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def git_commit(path: Path | None = None) -> Optional[str]:
    """The git commit of the bnlab source tree, or ``None`` outside a checkout."""
    here = Path(path or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def env_info(*, device: Any = None, seed: Any = None) -> dict:
    """Versions and machine facts recorded with every run."""
    import numpy
    import torch

    import bnlab

    return {
        "bnlab": bnlab.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": str(device) if device is not None else None,
        "seed": seed,
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunDir:
    """One run's directory. Create with :meth:`create`; end with :meth:`finish`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics = None
        #: extra sinks (:mod:`bnlab.sinks`: TensorBoard, W&B, MLflow) that receive every metrics record
        self.sinks: list = []

    # -------------------------------------------------------------- creation / lookup
    @classmethod
    def create(cls, root: str | Path, name: str, config: dict, *, env: Optional[dict] = None, run_id: Optional[str] = None) -> "RunDir":
        """Make ``root/name/<id>/`` (id = time stamp + config hash) and write config.json, env.json."""
        h = config_hash(config)
        base = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{h}"
        path = Path(root) / name / base
        k = 1
        while path.exists():
            k += 1
            path = Path(root) / name / f"{base}-{k}"
        path.mkdir(parents=True)
        run = cls(path)
        atomic_write_json(path / "config.json", {"name": name, "config_hash": h, "config": config})
        atomic_write_json(path / "env.json", env if env is not None else env_info())
        return run

    @staticmethod
    def find_complete(root: str | Path, name: str, config: dict) -> Optional["RunDir"]:
        """The newest complete run of ``name`` under ``root`` with the same config hash, if any."""
        h = config_hash(config)
        d = Path(root) / name
        if not d.is_dir():
            return None
        for p in sorted(d.iterdir(), reverse=True):
            if DAMAGED not in p.name and (p / COMPLETE).exists():
                try:
                    if json.loads((p / "config.json").read_text())["config_hash"] == h:
                        return RunDir(p)
                except (OSError, ValueError, KeyError):
                    continue
        return None

    @classmethod
    @contextlib.contextmanager
    def new(cls, root: str | Path, name: str, config: dict, *, env: Optional[dict] = None) -> Iterator["RunDir"]:
        """:meth:`create` a run for the duration of a ``with`` block; on any failure (an error, Ctrl-C,
        a full disk) the unfinished run and every directory this call created are removed.

        Example::

            with RunDir.new("runs", "my-run", config) as run:
                ...  # train, run.append_metrics(...)
                run.finish(summary)
        """
        check_output_root(root)
        created = _missing_ancestors(Path(root) / name)
        run = cls.create(root, name, config, env=env)
        try:
            yield run
        except BaseException:
            run.close_metrics()
            if run.sinks:  # close them (no background process left), without sending figures
                from .sinks import FanOut

                sinks, run.sinks = run.sinks, []
                with contextlib.suppress(Exception):
                    FanOut(sinks).close()
            shutil.rmtree(run.path, ignore_errors=True)
            for p in reversed(created):
                try:
                    p.rmdir()  # only if empty
                except OSError:
                    pass
            raise

    # -------------------------------------------------------------- writing
    def append_metrics(self, record: dict) -> None:
        """Append one metrics record (a JSON line) to the streaming metrics file (flushed per line)."""
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl.partial", "a", encoding="utf-8")
        self._metrics.write(json.dumps(record, default=to_jsonable, allow_nan=True, separators=(",", ":")) + "\n")
        self._metrics.flush()  # readable while the run goes on (tail -f, run.metrics())
        for sink in self.sinks:
            sink.log(record)

    def attach_sinks(self, sinks) -> None:
        """Send every later metrics record to ``sinks`` too (:mod:`bnlab.sinks`); they are closed by
        :meth:`finish` (or :meth:`close_sinks`), after the figures are sent to those that take images."""
        self.sinks.extend(sinks)

    def close_sinks(self) -> None:
        """Send the figures to the sinks that take images, then close every sink (idempotent)."""
        sinks, self.sinks = self.sinks, []
        if not sinks:
            return
        from .sinks import FanOut, log_figures

        fan = FanOut(sinks)
        try:
            log_figures(sinks, self.path / "figures")
        finally:
            fan.close()

    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically write ``obj`` as ``<run>/<name>``."""
        p = self.path / name
        atomic_write_json(p, obj)
        return p

    def save_arrays(self, name: str, **arrays) -> Path:
        """Atomically write numpy arrays as ``<run>/<name>`` (a compressed ``.npz``)."""
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(self.path / name, buf.getvalue())
        return self.path / name

    def load_arrays(self, name: str) -> dict:
        """The arrays of ``<run>/<name>`` written by :meth:`save_arrays` (no pickles)."""
        import numpy as np

        with np.load(self.path / name, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def figure_path(self, name: str) -> Path:
        """Path for a figure file under ``<run>/figures/``."""
        d = self.path / "figures"
        d.mkdir(exist_ok=True)
        return d / name

    def finish(self, summary: Optional[dict] = None) -> None:
        """Close the metrics stream and the sinks, write ``summary`` (if given) as summary.json, then the
        ``complete`` marker (last)."""
        self.close_metrics()
        self.close_sinks()
        partial = self.path / "metrics.jsonl.partial"
        if partial.exists():
            os.replace(partial, self.path / "metrics.jsonl")
        elif not (self.path / "metrics.jsonl").exists():
            atomic_write_text(self.path / "metrics.jsonl", "")
        if summary is not None:
            atomic_write_json(self.path / "summary.json", summary)
        atomic_write_text(self.path / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")

    def close_metrics(self) -> None:
        """Close the streaming metrics file (idempotent); :meth:`append_metrics` reopens it."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    # -------------------------------------------------------------- reading
    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).exists()

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def metrics(self) -> list[dict]:
        """All metrics records (from the final file, or the partial one of an unfinished run)."""
        for fname in ("metrics.jsonl", "metrics.jsonl.partial"):
            p = self.path / fname
            if p.exists():
                with open(p, encoding="utf-8") as f:
                    return [json.loads(line) for line in f if line.strip()]
        return []

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

