"""Registered experiments: one per claim group of the source works (see REFERENCES.md).

An experiment declares its claims (id, statement, source work, metric, threshold) and three
profiles (``tiny``: seconds, for tests; ``quick``: minutes on a 2-core CPU with the embedded data;
``paper``: the source's original scale, for a GPU). ``run_experiment`` runs one into a run
directory with metrics, figures, ``summary.json`` and ``verdicts.json`` (``holds | fails |
inconclusive`` per claim, with the numbers behind it), and reuses a complete run with the same
configuration hash unless forced.
"""

from __future__ import annotations

import abc
import ast
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError, unknown_name
from ..runs import RunDir, env_info

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
PROFILES = ("tiny", "quick", "paper")

#: The source works; a claim's ``source`` is one of these keys (the report has a section per key).
SOURCES: dict[str, dict[str, str]] = {
    "Arora, Li, Lyu 2019": {
        "title": "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization",
        "venue": "ICLR 2019",
        "thesis": "Scale invariance lets a fixed learning rate tune itself: the weight norm grows until the "
                  "effective learning rate η/‖w‖² suits the problem, and GD converges at the rate of well-tuned GD.",
    },
    "Santurkar et al. 2018": {
        "title": "How Does Batch Normalization Help Optimization?",
        "venue": "NeurIPS 2018",
        "thesis": "BatchNorm makes the loss landscape smoother (loss, gradients and β-smoothness vary less "
                  "along the gradient), not internal covariate shift smaller.",
    },
    "Bjorck et al. 2018": {
        "title": "Understanding Batch Normalization",
        "venue": "NeurIPS 2018",
        "thesis": "BatchNorm is what allows large learning rates without divergence: without it, activations "
                  "grow with depth and a large step blows the loss up.",
    },
    "Li & Arora 2020": {
        "title": "An Exponential Learning Rate Schedule for Deep Learning",
        "venue": "ICLR 2020",
        "thesis": "With BatchNorm (a scale-invariant loss), weight decay is equivalent to an exponentially "
                  "growing learning rate without weight decay.",
    },
}


@dataclass(frozen=True)
class Claim:
    """A claim an experiment tests.

    Attributes:
        id: short identifier, unique within the experiment.
        statement: the claim in one sentence.
        source: the source work (authors, year).
        metric: what is measured.
        threshold: the rule that turns the measurement into a verdict.
    """

    id: str
    statement: str
    source: str
    metric: str
    threshold: str


@dataclass
class Verdict:
    """The outcome for one claim: ``status`` is ``holds``, ``fails`` or ``inconclusive``."""

    claim: str
    status: str
    value: Any = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in (HOLDS, FAILS, INCONCLUSIVE):
            raise ValueError(f"verdict status must be holds, fails or inconclusive, got {self.status!r}")


def judge(claim: str, ok: Optional[bool], value: Any, detail: str) -> Verdict:
    """``holds`` if ``ok``, ``fails`` if not, ``inconclusive`` if ``ok is None``."""
    return Verdict(claim, INCONCLUSIVE if ok is None else (HOLDS if ok else FAILS), value, detail)


@dataclass
class Result:
    """What :meth:`Experiment.run` returns: summary numbers and one verdict per claim."""

    summary: dict = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)


class Experiment(abc.ABC):
    """Base class. Subclasses set the class attributes and implement :meth:`run` and :meth:`figures`."""

    name: str = ""
    title: str = ""
    source: str = ""
    description: str = ""
    claims: tuple[Claim, ...] = ()
    profiles: dict[str, dict] = {}

    @abc.abstractmethod
    def run(self, cfg: dict, run: RunDir, *, device: str = "auto", progress: bool = True) -> Result:
        """Train and measure with configuration ``cfg``, streaming metrics into ``run``."""

    def figures(self, run: RunDir) -> list[Path]:
        """(Re)draw the figures from the stored metrics of ``run``; return their paths."""
        return []


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(cls):
    """Class decorator: instantiate and register under ``cls.name`` (the CLI name)."""
    inst = cls()
    unknown = [c.source for c in inst.claims if c.source not in SOURCES]
    if unknown:
        raise ValueError(f"experiment {inst.name!r}: claim sources {unknown} not in SOURCES ({', '.join(SOURCES)})")
    missing = [p for p in PROFILES if p not in inst.profiles]
    if missing:
        raise ValueError(f"experiment {inst.name!r} lacks profiles {missing}")
    EXPERIMENTS[inst.name] = inst
    return cls


def parse_overrides(pairs: list[str] | None, base: dict) -> dict:
    """Parse ``--set key=value`` pairs against a profile's config (values as Python literals)."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set takes key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in base:
            raise UserError(f"unknown setting {key!r}; accepted: {', '.join(sorted(base))}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(base[key], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if base[key] is not None and type(value) is not type(base[key]) and not (isinstance(base[key], (list, tuple)) and isinstance(value, (list, tuple))):
            raise UserError(f"setting {key!r} takes a {type(base[key]).__name__}, got {raw!r}")
        out[key] = value
    return out


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise unknown_name("experiment", name, EXPERIMENTS)
    return EXPERIMENTS[name]


def resolve_config(name: str, profile: str = "quick", overrides: list[str] | None = None) -> dict:
    """The full configuration of ``name`` at ``profile`` with ``--set`` overrides applied."""
    exp = get_experiment(name)
    if profile not in PROFILES:
        raise unknown_name("profile", profile, PROFILES)
    base = dict(exp.profiles[profile])
    base.update(parse_overrides(overrides, base))
    return {"experiment": name, "profile": profile, **base}


def run_experiment(
    name: str,
    *,
    profile: str = "quick",
    out: str | Path = "runs",
    overrides: list[str] | None = None,
    force: bool = False,
    device: str = "auto",
    progress: bool = True,
    single_thread: bool = True,
) -> tuple[RunDir, bool]:
    """Run (or reuse) one experiment. Returns ``(run_dir, reused)``.

    A complete run with the same configuration hash under ``out`` is reused unless ``force``.
    A user error raised during the run removes the unfinished run directory. On the CPU the run
    uses one torch thread unless ``single_thread=False`` (the experiments' nets are small: on this
    2-core machine one thread was as fast or faster, and far steadier under load).
    """
    from ..train import resolve_device

    exp = get_experiment(name)
    cfg = resolve_config(name, profile, overrides)
    dev = resolve_device(device)
    if not force:
        prev = RunDir.find_complete(out, name, cfg)
        if prev is not None:
            return prev, True
    if isinstance(cfg.get("seed"), int):
        from ..errors import check_seed

        check_seed(cfg["seed"])
    # what this call creates, so that a failure leaves nothing behind
    created = [p for p in (Path(out), Path(out) / name) if not p.exists()]
    run = RunDir.create(out, name, cfg, env=env_info(device=dev, seed=cfg.get("seed")))
    run.write_json("experiment.json", {
        "name": exp.name, "title": exp.title, "source": exp.source, "description": exp.description,
        "claims": [asdict(c) for c in exp.claims],
    })
    import torch

    threads = torch.get_num_threads()
    if dev.type == "cpu" and single_thread:
        torch.set_num_threads(1)  # small nets: intra-op threads only add overhead, and stall on a busy machine
    try:
        result = exp.run(cfg, run, device=str(dev), progress=progress)
        run._close_metrics()
        exp.figures(run)
    except BaseException:  # a user error, a crash or Ctrl-C: an unfinished run is never kept
        run._close_metrics()
        shutil.rmtree(run.path, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()  # only if empty
            except OSError:
                pass
        raise
    finally:
        torch.set_num_threads(threads)
    by_claim = {v.claim: v for v in result.verdicts}
    verdicts = []
    for c in exp.claims:
        v = by_claim.get(c.id) or Verdict(c.id, INCONCLUSIVE, None, "not measured in this run")
        verdicts.append({**asdict(c), **asdict(v)})
    run.write_json("verdicts.json", verdicts)
    run.finish(result.summary)
    return run, False


from . import large_lr as _large_lr  # noqa: E402,F401  (registers)
from . import auto_rate as _auto_rate  # noqa: E402,F401  (registers)
from . import exp_lr as _exp_lr  # noqa: E402,F401
from . import divergence as _divergence  # noqa: E402,F401  (registers)
from . import activations as _activations  # noqa: E402,F401  (registers)
from . import landscape as _landscape  # noqa: E402,F401  (registers)
from . import ics as _ics  # noqa: E402,F401  (registers)
