"""Where metrics records go: JSON lines, TensorBoard, Weights & Biases, MLflow.

Every sink takes the records a :class:`~bnlab.monitor.Monitor`, ``bnlab.train`` or an experiment
writes (one dict per step or evaluation, e.g. ``{"step": 3, "loss": 0.41, "grad_norm/total": 2.1}``)
and has the same three methods::

    sink.log(record, step=None)              # one metrics record
    sink.log_image(name, path_or_array, step=None)   # a figure (sinks that take images; others ignore it)
    sink.close()                             # flush and release; no background process is left running

A sink is also accepted wherever bnlab takes ``log=`` (it has ``write(record)``), and is a context
manager. ``JsonlSink`` is what ``metrics.jsonl`` always was; the others need an optional package,
imported only when such a sink is made (a missing one is a :class:`~bnlab.errors.UserError`
naming the extra to install, e.g. ``pip install 'bnlab[tensorboard]'``).

How a record becomes scalars (:func:`scalars`): every number (int, float, bool, a numpy scalar, a
one-element tensor; NaN and ±inf kept) except ``step`` is logged under its key; nested dicts are
flattened with ``/``; strings, lists and ``None`` are not scalars and are skipped. Records that
carry context keys (``arm``, ``norm``, ``kind``, ``event``, ``seed``, as experiments write them)
get those values as a tag prefix, so that the arms of one experiment (which restart at step 0) do
not overwrite each other: ``{"arm": "bn", "seed": 1, "step": 5, "loss": 0.2}`` becomes the tag
``bn/seed1/loss`` at step 5. The step is the record's ``step`` when it has one, else the number of
records the sink has taken so far.

On the command line, ``bnlab train|run|reproduce --log tensorboard,wandb,mlflow`` adds these sinks
to each run (``metrics.jsonl`` is always written); by default they write inside the run directory:
``<run>/tensorboard/``, ``<run>/wandb/`` (offline), ``<run>/mlruns/`` (an MLflow file store).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import numbers
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from ._io import to_jsonable
from .errors import UserError

__all__ = ["Sink", "JsonlSink", "TensorBoardSink", "WandbSink", "MLflowSink", "SINKS", "CONTEXT_KEYS", "scalars",
           "record_step", "parse_sink_names", "check_sinks", "make_sinks", "require", "log_figures", "replay_run", "FanOut"]

#: record keys whose values name what a record belongs to; they prefix the scalar tags
CONTEXT_KEYS = ("arm", "norm", "kind", "event", "seed")
#: sink names accepted by ``--log`` -> (module that must be importable, extra that installs it)
SINKS = {"jsonl": (None, None), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "mlflow": ("mlflow", "mlflow")}


def require(module: str, extra: str, what: Optional[str] = None):
    """Import ``module`` or raise a one-line :class:`UserError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what or module} needs the {module} package, which is not installed; "
                        f"install it with: pip install 'bnlab[{extra}]'") from None


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if type(v).__module__ == "numpy" and getattr(v, "shape", None) == () and getattr(v.dtype, "kind", "") in "biuf":
        return float(v)
    if type(v).__module__.startswith("torch") and hasattr(v, "numel") and v.numel() == 1 and not v.is_complex():
        return float(v.detach().reshape(()))
    return None


def _prefix(record: dict) -> str:
    parts = []
    for k in CONTEXT_KEYS:
        v = record.get(k)
        if isinstance(v, str) and v:
            parts.append(v)
        elif k == "seed" and isinstance(v, int) and not isinstance(v, bool):
            parts.append(f"seed{v}")
    return "".join(p + "/" for p in parts)


def scalars(record: dict) -> dict[str, float]:
    """The ``{tag: value}`` scalars a sink logs for ``record`` (see the module docstring)."""
    out: dict[str, float] = {}
    prefix = _prefix(record)

    def walk(d: dict, base: str) -> None:
        for k, v in d.items():
            if base == prefix and (k == "step" or k in CONTEXT_KEYS):
                continue
            if isinstance(v, dict):
                walk(v, f"{base}{k}/")
                continue
            x = _number(v)
            if x is not None:
                out[f"{base}{k}"] = x

    walk(record, prefix)
    return out


def record_step(record: dict, step: Optional[int], fallback: int) -> int:
    """The step a record is logged at: ``step`` if given, else ``record["step"]``, else ``fallback``."""
    if step is not None:
        return int(step)
    s = record.get("step")
    if isinstance(s, numbers.Integral) and not isinstance(s, bool):
        return int(s)
    return fallback


def _read_image(image: Any):
    """An ``H x W x 3`` float array in [0, 1] from a PNG path or an array (``H x W``, ``H x W x C``)."""
    import numpy as np

    if isinstance(image, (str, Path)):
        import matplotlib.image

        arr = matplotlib.image.imread(str(image))
    else:
        arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image must be H x W or H x W x (1|3|4), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.clip(arr[:, :, :3], 0.0, 1.0)


class Sink:
    """Base class and protocol of a metrics sink: ``log``, ``log_image``, ``close``.

    Subclasses implement :meth:`_log_scalars` (and :meth:`log_image` if ``takes_images``).
    """

    takes_images = False

    def __init__(self) -> None:
        self._count = 0
        self.closed = False

    def log(self, record: dict, step: Optional[int] = None) -> None:
        """Log one metrics record (its numbers, see :func:`scalars`) at ``step`` (default: ``record["step"]``)."""
        s = record_step(record, step, self._count)
        self._count += 1
        values = scalars(record)
        if values:
            self._log_scalars(values, s)

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        # the contract, not a stub: a sink overrides either ``log`` (JsonlSink, FanOut) or this
        raise TypeError(f"{type(self).__name__} must override log() or _log_scalars()")

    def log_image(self, name: str, image: Any, step: Optional[int] = None) -> None:
        """Log a figure (a PNG path or an ``H x W [x C]`` array); a sink that takes no images ignores it."""

    def close(self) -> None:
        """Flush and release (idempotent)."""
        self.closed = True

    # accepted as ``log=`` by Monitor and train (``emit`` calls ``write``)
    def write(self, record: dict) -> None:
        self.log(record)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlSink(Sink):
    """One JSON line per record, flushed per line (what ``metrics.jsonl`` holds).

    Records are written whole (not only their numbers), with NaN/inf as ``NaN``/``Infinity`` and
    numpy/torch values converted as :func:`bnlab._io.to_jsonable` does.
    """

    def __init__(self, path: str | Path, *, mode: str = "a") -> None:
        super().__init__()
        self.path = Path(path)
        self._mode = mode
        self._fh = None

    def log(self, record: dict, step: Optional[int] = None) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, self._mode, encoding="utf-8")
            self._mode = "a"  # reopened after close(): append
        if step is not None and record.get("step") != step:
            record = {**record, "step": int(step)}
        self._fh.write(json.dumps(record, default=to_jsonable, allow_nan=True, separators=(",", ":")) + "\n")
        self._fh.flush()
        self._count += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()


class TensorBoardSink(Sink):
    """Scalars and figures as a TensorBoard event file in ``logdir`` (``tensorboard --logdir ...``).

    Uses ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
    ``pip install 'bnlab[tensorboard]'``). Scalars are stored as float32 (TensorBoard's
    ``simple_value``); figures as images.
    """

    takes_images = True

    def __init__(self, logdir: str | Path, *, flush_secs: int = 30) -> None:
        super().__init__()
        require("tensorboard", "tensorboard", "the tensorboard sink")
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=flush_secs)

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)

    def log_image(self, name: str, image: Any, step: Optional[int] = None) -> None:
        self.writer.add_image(name, _read_image(image), global_step=0 if step is None else int(step), dataformats="HWC")

    def close(self) -> None:
        if not self.closed:
            self.writer.flush()
            self.writer.close()
        super().close()


@contextlib.contextmanager
def _env(**values: Optional[str]):
    """Set environment variables for the duration (``None``: leave the variable as it is)."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if values[k] is None:
                continue
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class WandbSink(Sink):
    """A Weights & Biases run, offline by default (nothing leaves the machine).

    Offline runs are written under ``<dir>/wandb/offline-run-*/`` (``wandb sync`` uploads them
    later). Each record is one ``run.log`` call with its scalars and the record's step under the
    key ``step``, which is declared the x-axis of every metric (``define_metric``): W&B's own step
    must increase, while bnlab's restarts in each arm of an experiment. Figures become
    ``wandb.Image``. ``close()`` finishes the run and, when no other W&B run is active in the
    process, shuts down W&B's background service, so no process is left running.

    Args:
        project: the W&B project.
        mode: ``"offline"`` (default; or the ``WANDB_MODE`` environment variable when set),
            ``"online"``, ``"disabled"``.
        dir: where the ``wandb/`` folder goes (default: the current directory); W&B's service
            log goes there too (``<dir>/wandb/cache``) unless ``WANDB_CACHE_DIR`` is set.
        name: the run's display name.
        config: the run's configuration (shown in the W&B UI).
        **init_kwargs: passed to ``wandb.init``.
    """

    takes_images = True

    def __init__(self, project: str = "bnlab", *, mode: Optional[str] = None, dir: str | Path = ".",
                 name: Optional[str] = None, config: Optional[dict] = None, **init_kwargs) -> None:
        super().__init__()
        self._wandb = wandb = require("wandb", "wandb", "the wandb sink")
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in ("offline", "online", "disabled"):
            raise UserError(f"unknown W&B mode {mode!r}; accepted: offline, online, disabled")
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                  save_code=False, disable_job_creation=True)
        cache = None if os.environ.get("WANDB_CACHE_DIR") else str(self.dir / "wandb" / "cache")
        with _env(WANDB_CACHE_DIR=cache, WANDB_SILENT="true"):
            self.run = wandb.init(project=project, mode=mode, dir=str(self.dir), name=name,
                                  config=json.loads(json.dumps(config, default=to_jsonable)) if config else None, settings=settings,
                                  reinit="create_new", **init_kwargs)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def log_image(self, name: str, image: Any, step: Optional[int] = None) -> None:
        import numpy as np

        img = self._wandb.Image(str(image)) if isinstance(image, (str, Path)) else self._wandb.Image(
            (np.asarray(_read_image(image)) * 255).round().astype("uint8"))
        self.run.log({name: img, **({} if step is None else {"step": int(step)})})

    @property
    def run_dir(self) -> Path:
        """The run's folder (``<dir>/wandb/offline-run-*``), holding the ``.wandb`` file."""
        return Path(self.run.settings.sync_dir)

    def close(self) -> None:
        if not self.closed:
            self.run.finish()
            if not _other_wandb_runs(self._wandb):  # no other run of this process: stop the service
                self._wandb.teardown()
        super().close()


def _other_wandb_runs(wandb) -> bool:
    """Whether another W&B run of this process is still active (then W&B's service must stay)."""
    try:
        from wandb.sdk import wandb_setup

        active = wandb_setup.singleton().most_recent_active_run
        return active is not None
    except (ImportError, AttributeError):  # another W&B version: the public view
        return getattr(wandb, "run", None) is not None


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


class MLflowSink(Sink):
    """An MLflow run: scalars as metrics (with their step), figures as artifacts under ``figures/``.

    Args:
        tracking_uri: where runs are stored; default ``file:./mlruns`` (the ``MLFLOW_TRACKING_URI``
            environment variable when set). A ``file:`` store is MLflow's file backend, which
            MLflow 3 only opens when ``MLFLOW_ALLOW_FILE_STORE=true``; the sink sets that for the
            process when it is given such a URI. ``sqlite:///path.db`` works as well.
        experiment: the MLflow experiment (created when missing).
        run_name: the run's name.
        params: logged as the run's parameters (flattened, values as strings).

    Metric names keep letters, digits, ``_ - . /`` and space; any other character becomes ``_``.
    In a ``file:`` store ``/`` becomes ``.`` as well: the file store keeps a metric ``a/b`` as the
    file ``a/b``, which cannot coexist with a metric ``a`` (bnlab logs both ``lr`` and ``lr/0``).
    """

    takes_images = True

    def __init__(self, tracking_uri: Optional[str] = None, *, experiment: str = "bnlab", run_name: Optional[str] = None,
                 params: Optional[dict] = None) -> None:
        super().__init__()
        require("mlflow", "mlflow", "the mlflow sink")
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"file:{Path('mlruns').resolve()}"
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store was asked for
        self.tracking_uri = uri
        self._file_store = uri.startswith("file:") or "://" not in uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        if params:
            from mlflow.entities import Param

            flat = {k: v for k, v in _flatten(params).items()}
            items = [Param(_MLFLOW_BAD.sub("_", k)[:250], str(v)[:6000]) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metric_name(self, tag: str) -> str:
        """The MLflow metric name of a scalar tag."""
        name = _MLFLOW_BAD.sub("_", tag)
        return name.replace("/", ".") if self._file_store else name

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(self.metric_name(k), v, ts, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_image(self, name: str, image: Any, step: Optional[int] = None) -> None:
        if isinstance(image, (str, Path)):
            self.client.log_artifact(self.run_id, str(image), artifact_path="figures")
        else:
            self.client.log_image(self.run_id, _read_image(image), artifact_file=f"figures/{name}.png")

    def close(self) -> None:
        if not self.closed:
            self.client.set_terminated(self.run_id)
        super().close()


def _flatten(d: dict, base: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{base}{k}."))
        else:
            out[f"{base}{k}"] = v
    return out


class FanOut(Sink):
    """Several sinks as one: each call goes to every sink; ``close`` closes them all (even if one fails)."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        super().__init__()
        self.sinks = list(sinks)
        self.takes_images = any(s.takes_images for s in self.sinks)

    def log(self, record: dict, step: Optional[int] = None) -> None:
        for s in self.sinks:
            s.log(record, step)

    def log_image(self, name: str, image: Any, step: Optional[int] = None) -> None:
        for s in self.sinks:
            if s.takes_images:
                s.log_image(name, image, step)

    def close(self) -> None:
        errors = []
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # noqa: BLE001 - close the others, then report
                errors.append(e)
        super().close()
        if errors:
            raise errors[0]


# ----------------------------------------------------------------------------- the --log option


def parse_sink_names(spec: str | Iterable[str] | None) -> list[str]:
    """The sink names of ``--log a,b`` (duplicates and ``jsonl``, which is always written, dropped).

    Raises:
        UserError: for an unknown name, listing the accepted ones.
    """
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in SINKS:
                raise UserError(f"unknown sink {name!r} in --log; accepted: {', '.join(sorted(SINKS))} "
                                f"(comma-separated; jsonl is always written)")
            if name != "jsonl" and name not in names:
                names.append(name)
    return names


def check_sinks(names: Iterable[str]) -> None:
    """Import the package of each named sink now, so a missing one is reported before anything runs."""
    for name in names:
        module, extra = SINKS[name]
        if module is not None:
            require(module, extra, f"--log {name}")


def make_sinks(names: Iterable[str], run_dir: str | Path, *, name: Optional[str] = None,
               config: Optional[dict] = None) -> list[Sink]:
    """Build the named sinks for one run, writing inside ``run_dir`` unless told otherwise
    (``WANDB_MODE``, ``WANDB_DIR``, ``MLFLOW_TRACKING_URI``): ``<run>/tensorboard/``,
    ``<run>/wandb/`` (offline), ``<run>/mlruns/`` (file store, experiment ``bnlab``)."""
    run_dir = Path(run_dir)
    made: list[Sink] = []
    try:
        for n in names:
            if n == "tensorboard":
                made.append(TensorBoardSink(run_dir / "tensorboard"))
            elif n == "wandb":
                made.append(WandbSink(project=os.environ.get("WANDB_PROJECT") or "bnlab",
                                      dir=os.environ.get("WANDB_DIR") or run_dir, name=name or run_dir.name, config=config))
            elif n == "mlflow":
                made.append(MLflowSink(os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(run_dir / 'mlruns').resolve()}",
                                       run_name=name or run_dir.name, params=config))
            elif n != "jsonl":
                raise UserError(f"unknown sink {n!r}; accepted: {', '.join(sorted(SINKS))}")
    except BaseException:
        for s in made:
            with contextlib.suppress(Exception):
                s.close()
        raise
    return made


def log_figures(sinks: Iterable[Sink], figures_dir: str | Path, *, step: Optional[int] = None) -> int:
    """Send every PNG under ``figures_dir`` to the sinks that take images; return how many were sent."""
    sinks = [s for s in sinks if s.takes_images]
    d = Path(figures_dir)
    if not sinks or not d.is_dir():
        return 0
    n = 0
    for f in sorted(d.glob("*.png")):
        for s in sinks:
            s.log_image(f.stem, f, step)
        n += 1
    return n


#: the folder each sink writes inside a run directory by default
SINK_DIRS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}


def replay_run(run, names: Iterable[str], *, name: Optional[str] = None, config: Optional[dict] = None) -> list[str]:
    """Send a finished run's stored ``metrics.jsonl`` and figures to the named sinks, skipping each
    sink whose folder the run already has (it was logged before); return the names replayed."""
    todo = [n for n in names if n in SINK_DIRS and not (Path(run.path) / SINK_DIRS[n]).exists()]
    if not todo:
        return []
    sinks = make_sinks(todo, run.path, name=name, config=config)
    fan = FanOut(sinks)
    try:
        for record in run.metrics():
            fan.log(record)
        log_figures(sinks, Path(run.path) / "figures")
    finally:
        fan.close()
    return todo
