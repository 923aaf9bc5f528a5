"""Paper-scale runs: the smoke mode, where CIFAR-10 lives, the augmentation, and CUDA speed settings.

A paper run (``bnlab run/reproduce --profile paper``) reads its run-wide settings from
:func:`current`, which the runner sets around an experiment's ``measure`` with :func:`use`. They
are read where they act, so every experiment, including ones written later, gets them without
passing anything around:

* ``smoke``: each training run is capped at :data:`SMOKE_STEPS` optimizer steps
  (:func:`cap_steps`, applied by :func:`bnlab.train.resolve_steps`, which :func:`bnlab.train.train`
  and :func:`bnlab.sweep.sweep` use); evaluations read at most :data:`SMOKE_EVAL` examples; the
  experiment's ``Config`` is cut down by :func:`smoke_config` (steps, seeds, example counts from the
  ``tiny`` profile, architecture, optimizer, learning rates and schedule from ``paper``); CIFAR-10 is
  a :data:`SMOKE_TRAIN`/:data:`SMOKE_TEST`-example subset of the real set when it is in ``root``,
  else a synthetic set with CIFAR-10's shape, format and normalization
  (:func:`bnlab.data.synthetic_cifar10`). Verdicts of a smoke run read ``inconclusive (smoke run)``.
* ``root``/``download``: where :func:`bnlab.data.load` finds ``cifar10`` (default: the data dir).
* ``augment``: the training split of ``cifar10`` is an :class:`bnlab.data.AugmentedData` (random
  4-pixel-padded crop and horizontal flip per batch, as tensor operations on the device).
* ``bf16``, ``compile``: CUDA-only speed-ups of plain training arms (:func:`speed_plan`).
* ``checkpoint_dir``/``checkpoint_every``: :mod:`bnlab.checkpoint`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

#: optimizer steps of one training run in a smoke run (``train``, ``sweep``, step-count settings)
SMOKE_STEPS = 3
#: the largest step interval (``*_every`` settings) in a smoke run: probes fire at least once
SMOKE_EVERY = 2
#: the largest batch (``*batch*`` settings) in a smoke run
SMOKE_BATCH = 16
#: the largest ``epochs`` in a smoke run (the step cap applies anyway)
SMOKE_EPOCHS = 1.0
#: the largest example count (``*subset*``, ``*_examples`` settings) in a smoke run
SMOKE_EXAMPLES = 32
#: CIFAR-10 examples in a smoke run (train, test) and at most per evaluation pass
SMOKE_TRAIN, SMOKE_TEST, SMOKE_EVAL = 128, 64, 64


@dataclass(frozen=True)
class Settings:
    """Run-wide settings of a paper run (see the module docstring)."""

    smoke: bool = False
    root: Optional[str] = None
    download: bool = False
    augment: bool = False
    speed: bool = False
    """CUDA speed-ups (:func:`speed_plan`); the runner turns them on for paper runs only."""
    bf16: bool = False
    compile: bool = True
    checkpoint_dir: Optional[Path] = None
    checkpoint_every: Optional[int] = None
    """Steps between checkpoints; ``None``: the runner's default for paper runs (0: never)."""


_CURRENT: contextvars.ContextVar[Settings] = contextvars.ContextVar("bnlab_paper_settings", default=Settings())


def current() -> Settings:
    """The settings in force (defaults outside :func:`use`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(settings: Optional[Settings] = None, **changes) -> Iterator[Settings]:
    """Put ``settings`` (or the current ones with ``changes``) in force for the ``with`` body."""
    s = dataclasses.replace(settings or current(), **changes)
    token = _CURRENT.set(s)
    from . import checkpoint

    counter = checkpoint._COUNTER.set([0])  # train() calls are numbered afresh inside each use()
    try:
        yield s
    finally:
        checkpoint._COUNTER.reset(counter)
        _CURRENT.reset(token)


def cap_steps(steps: int) -> int:
    """``steps``, or at most :data:`SMOKE_STEPS` in a smoke run."""
    return min(int(steps), SMOKE_STEPS) if current().smoke else int(steps)


def eval_cap(n: int) -> int:
    """Examples an evaluation pass reads: ``n``, or at most :data:`SMOKE_EVAL` in a smoke run."""
    return min(int(n), SMOKE_EVAL) if current().smoke else int(n)


# ------------------------------------------------------------------------------ smoke configs

#: names (or name parts) of Config fields that define the architecture, data, optimizer and schedule:
#: a smoke run keeps the paper profile's values of these
_KEEP_EXACT = {"model", "width", "depth", "seed", "dtype", "affine", "fixed_batches", "modes", "control"}
_KEEP_PARTS = ("data", "lr", "norm", "momentum", "weight_decay", "decay", "schedule", "_width", "_depth", "_eps", "bound")


def _keeps_paper_value(name: str) -> bool:
    return name in _KEEP_EXACT or any(p in name for p in _KEEP_PARTS)


def _cap_value(name: str, value: Any) -> Any:
    """The smoke cap of one setting (steps, intervals, batch sizes, epochs), by its name."""
    def cap(v, limit):
        return min(v, limit) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else v

    if "steps" in name:
        limit = SMOKE_STEPS
    elif name.endswith("_every"):
        limit = SMOKE_EVERY
    elif "batch" in name and "batches" not in name:
        limit = SMOKE_BATCH
    elif "subset" in name or name.endswith("_examples"):
        limit = SMOKE_EXAMPLES
    elif "epochs" in name and isinstance(value, float):
        return min(value, SMOKE_EPOCHS) if value > 0 else value
    else:
        return value
    if isinstance(value, tuple):
        return tuple(sorted({cap(v, limit) for v in value}))
    return cap(value, limit)


def _smaller(paper_value: Any, tiny_value: Any) -> Any:
    """The smaller of a setting's paper and tiny values: numbers by size (where both are positive;
    0 or a negative number often means "all" or "off", whose cost at paper scale the tiny profile
    says nothing about, so the paper value stays), sequences by length; anything else: paper's."""
    num = (int, float)
    if isinstance(paper_value, bool) or isinstance(tiny_value, bool):
        return paper_value
    if isinstance(paper_value, num) and isinstance(tiny_value, num):
        return min(paper_value, tiny_value) if paper_value > 0 and tiny_value > 0 else paper_value
    if isinstance(paper_value, tuple) and isinstance(tiny_value, tuple):
        return tiny_value if len(tiny_value) <= len(paper_value) else paper_value
    return paper_value


def smoke_config(paper_cfg, tiny_cfg, cuts=None):
    """The ``Config`` of a smoke run: the paper profile's architecture, data, optimizer, learning
    rates and schedule; the smaller of the paper's and the ``tiny`` profile's counts (seeds,
    examples, probe sizes; :func:`_smaller`); and step counts, step intervals, batch sizes,
    example counts and epochs capped (:data:`SMOKE_STEPS`, :data:`SMOKE_EVERY`, :data:`SMOKE_BATCH`,
    :data:`SMOKE_EXAMPLES`, :data:`SMOKE_EPOCHS`).

    Which fields are which is read from their names (``*lr*``, ``*norm*``, ``*momentum*``, ``data``,
    ``model``, ``width``, ``depth`` ... keep the paper value; ``*steps*``, ``*_every``, ``*batch*``,
    ``*subset*``, ``*_examples``, ``*epochs*`` are capped), so an experiment needs nothing declared to have a smoke run. If the
    combination fails the Config's own validation, the caps are applied one by one, each where the
    Config accepts it (the run-time cap of :func:`cap_steps` holds anyway).

    ``cuts`` (an experiment's ``smoke_cuts``, ``{field: value -> smoke value}``) are applied last:
    the few settings where the generic rules leave work that only repeats the same code path at
    paper scale (more grid points, seeds or float64 records of the same run).
    """
    cfg = _smoke_config(paper_cfg, tiny_cfg)
    if cuts:
        cfg = dataclasses.replace(cfg, **{n: f(getattr(cfg, n)) for n, f in cuts.items()})
    return cfg


def _smoke_config(paper_cfg, tiny_cfg):
    """:func:`smoke_config` by the field-name rules alone."""
    def pick(name):
        p, t = getattr(paper_cfg, name), getattr(tiny_cfg, name)
        return p if _keeps_paper_value(name) else _smaller(p, t)

    names = [f.name for f in dataclasses.fields(paper_cfg)]
    try:
        return dataclasses.replace(paper_cfg, **{n: _cap_value(n, pick(n)) for n in names})
    except (ValueError, TypeError):  # the caps together break a rule of the Config: as many as it allows
        cfg = dataclasses.replace(paper_cfg, **{n: pick(n) for n in names})
        for n in names:
            try:
                cfg = dataclasses.replace(cfg, **{n: _cap_value(n, getattr(cfg, n))})
            except (ValueError, TypeError):
                pass
        return cfg


def uses_cifar10(cfg) -> bool:
    """Whether a ``Config`` names CIFAR-10 in any of its ``*data*`` fields."""
    return any("data" in f.name and getattr(cfg, f.name) == "cifar10" for f in dataclasses.fields(cfg))


# -------------------------------------------------------------------------------- CIFAR-10


def cifar10_root(root=None) -> Path:
    """The directory CIFAR-10 is read from: ``root``, the settings' ``root``, else ``<data dir>/cifar10``
    (the default of :func:`bnlab._cifar.load_cifar10`)."""
    from ._paths import data_dir

    r = root if root is not None else current().root
    return Path(r).expanduser() if r is not None else data_dir() / "cifar10"


def cifar10_present(root=None) -> bool:
    """Whether the official python-version files are in ``root`` (or ``root/cifar-10-batches-py``)."""
    from ._cifar import _TEST_FILES, _TRAIN_FILES, _locate

    return _locate(cifar10_root(root), _TRAIN_FILES + _TEST_FILES) is not None


def require_cifar10(root=None, download: bool = False) -> None:
    """Make sure CIFAR-10 is in ``root`` before a paper run starts: fetch it with ``download``,
    else raise a one-line :class:`~bnlab.errors.UserError` saying where to put it and how to fetch it."""
    from ._cifar import CIFAR10_SUBDIR, CIFAR10_URL, load_cifar10
    from .errors import UserError

    where = cifar10_root(root)
    if cifar10_present(where):
        return
    if download or current().download:
        load_cifar10(where, "test", download=True)
        return
    raise UserError(
        f"the paper profile needs CIFAR-10, not found in {where}: put the official python-version files "
        f"(data_batch_1..5, test_batch) there or in {where / CIFAR10_SUBDIR}, from {CIFAR10_URL} "
        f"(unpack it there), or add --download to fetch them (or --root DIR to read them elsewhere; "
        f"--smoke runs without them)"
    )


# --------------------------------------------------------------------------------- CUDA speed


@dataclass(frozen=True)
class SpeedPlan:
    """What :func:`bnlab.train.train` applies for speed on this device (nothing on the CPU)."""

    channels_last: bool = False
    cudnn_benchmark: bool = False
    bf16: bool = False
    compile: bool = False


#: ``torch.compile`` takes tens of seconds per model: it pays only on runs at least this long
COMPILE_MIN_STEPS = 2000


def speed_plan(device, *, plain: bool, settings: Optional[Settings] = None, spatial: bool = True,
               steps: Optional[int] = None) -> SpeedPlan:
    """The speed-ups for one training run: CUDA only, never on the CPU, and only inside a paper run
    (``settings.speed``, which the runner sets for ``--profile paper``):

    * ``cudnn.benchmark`` on every CUDA run (the kernels' choice, not the arithmetic's meaning);
    * channels-last memory format for plain arms (no probes) of image models: probes read weights
      with ``view``s that assume the default layout, so probed arms keep it; ``train`` gives the
      weights back in the default layout when it returns;
    * bf16 autocast for plain arms when ``settings.bf16`` (probes and curvature measure in float32;
      the exp-lr equivalence runs go through :mod:`bnlab.lockstep`, never through here);
    * ``torch.compile`` for plain arms of at least :data:`COMPILE_MIN_STEPS` steps unless
      ``settings.compile`` is off (``--no-compile``).

    Args:
        device: the training device.
        plain: a plain training arm (no probes).
        settings: default :func:`current`.
        spatial: the model takes image-shaped ``(N, C, H, W)`` inputs (channels-last applies).
        steps: the run's steps (``None``: long enough to compile).
    """
    import torch

    s = settings or current()
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type != "cuda" or not s.speed:
        return SpeedPlan()
    long_enough = steps is None or steps >= COMPILE_MIN_STEPS
    return SpeedPlan(channels_last=bool(spatial and plain), cudnn_benchmark=True, bf16=bool(s.bf16 and plain),
                     compile=bool(s.compile and plain and long_enough and hasattr(torch, "compile")))


def restore_layout(model, plan: SpeedPlan) -> None:
    """Give ``model``'s weights back in the default (contiguous) layout after a channels-last run."""
    import torch

    if plan.channels_last:
        model.to(memory_format=torch.contiguous_format)


def apply_speed(model, plan: SpeedPlan):
    """Apply ``plan`` to ``model`` (already on its device). Returns ``(forward, autocast)``: the
    callable to use for training forward passes (the compiled module or ``model`` itself) and a
    context-manager factory for them (bf16 autocast, or a no-op)."""
    import torch

    if plan.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = model
    if plan.compile:
        try:
            forward = torch.compile(model)
        except Exception:  # noqa: BLE001 - a backend that cannot compile: run eager
            forward = model
    if plan.bf16:
        return forward, lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return forward, contextlib.nullcontext


def to_channels_last(x, plan: SpeedPlan):
    """A batch in channels-last layout when the plan asks for it (4-D inputs only)."""
    import torch

    if plan.channels_last and getattr(x, "dim", lambda: 0)() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def smoke_label(data_source: str) -> str:
    """The line a smoke run puts in its verdicts and in the terminal."""
    return (f"smoke run: every training run capped at {SMOKE_STEPS} steps, batches of at most {SMOKE_BATCH}, "
            f"data: {data_source}; no verdict is drawn from it")
