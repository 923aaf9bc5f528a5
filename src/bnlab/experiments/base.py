"""The experiment contract: typed ``Config`` and ``Thresholds``, ``measure → judge → figures``.

Every registered experiment is a subclass of :class:`Experiment` with

- ``Config``: a frozen dataclass, one documented field per setting. Its values (with the
  experiment name and profile) are hashed and name the run; ``--set key=value`` is parsed from
  the field types (:func:`parse_settings`).
- ``Thresholds``: a second frozen dataclass with every number a decision rule uses. It is **not**
  hashed: changing a threshold never asks for a new training run. The thresholds applied are
  written into ``verdicts.json`` beside the verdicts.
- ``measure(cfg, run, ctx) -> summary``: trains and measures; writes metrics, arrays and figures'
  inputs into ``run``; returns the summary (stored as ``summary.json``). It computes no verdict.
- ``judge(summary, th) -> list[Verdict]``: a pure function of the stored summary and the
  thresholds. No training, no I/O, no model; each verdict carries its rule written out with the
  numbers it applied. ``bnlab rejudge`` calls it again on stored summaries.
- ``figures(run) -> list[Path]``: draws from the run directory alone.

The runner (:mod:`bnlab.experiments.runner`) calls measure → judge → figures.
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from ..errors import UserError, unknown_name
from ..runs import RunDir

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
PROFILES = ("tiny", "quick", "paper")

#: The source works; a claim's ``source`` is one of these keys (the report has a section per key).
#: The runner copies the entries an experiment cites into its run directory (``experiment.json``),
#: so the report reads them from there and never imports this module.
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
    "Wan et al. 2020": {
        "title": "Spherical Motion Dynamics: Learning Dynamics of Neural Network with Normalization, Weight Decay, "
                 "and SGD",
        "venue": "a follow-up result, beyond the four sources",
        "thesis": "With weight decay, the angular update per step of a scale-invariant weight settles at an "
                  "equilibrium √(2ηλ/(1+γ)).",
    },
    "Ghorbani, Krishnan, Xiao 2019": {
        "title": "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density",
        "venue": "ICML 2019",
        "thesis": "Without BatchNorm the Hessian has isolated outlier eigenvalues far from the bulk and the gradient "
                  "concentrates in their eigenspace; BatchNorm in train mode suppresses them; with population statistics "
                  "(eval mode) they return.",
    },
}


@dataclass(frozen=True)
class Claim:
    """A claim an experiment tests.

    Attributes:
        id: short identifier, unique within the experiment.
        statement: the claim in one sentence.
        source: the source work (a key of :data:`SOURCES`).
        metric: what is measured.
        threshold: the rule in words (the verdict's ``rule`` gives it with the numbers applied).
        ref: the claim's id in ``shared/CLAIMS.md`` (``A3``, ``S2``, ``B7``, ``L4``, ``T1``, ``W1``, ...),
            by which the report lets a reader find every row of that table; empty for a claim of
            bnlab's own that has no row there.
    """

    id: str
    statement: str
    source: str
    metric: str
    threshold: str
    ref: str = ""


@dataclass
class Verdict:
    """The outcome for one claim.

    Attributes:
        claim: the claim id.
        status: ``holds``, ``fails`` or ``inconclusive``.
        value: the key number.
        detail: the numbers behind it, in words.
        rule: the decision rule with the threshold values it applied, e.g. ``"acc ≥ 0.9"``.
        spread: where the claim rests on several seeds, their number and spread in words, e.g.
            ``"3 seeds: 95.1 ± 0.4% (min 94.7%)"``; empty otherwise.
    """

    claim: str
    status: str
    value: Any = None
    detail: str = ""
    rule: str = ""
    spread: str = ""

    def __post_init__(self) -> None:
        if self.status not in (HOLDS, FAILS, INCONCLUSIVE):
            raise ValueError(f"verdict status must be holds, fails or inconclusive, got {self.status!r}")


def verdict(claim: str, ok: Optional[bool], value: Any, detail: str, rule: str = "", spread: str = "") -> Verdict:
    """``holds`` if ``ok``, ``fails`` if not, ``inconclusive`` if ``ok is None``."""
    return Verdict(claim, INCONCLUSIVE if ok is None else (HOLDS if ok else FAILS), value, detail, rule, spread)


def seed_spread(values, *, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    """``"n seeds: mean ± std (min .., max ..)"`` for a verdict's ``spread`` (NaN values are counted as such).

    Example:
        >>> seed_spread([0.95, 0.96, 0.94], unit="%", scale=100)
        '3 seeds: 95 ± 0.816% (min 94%, max 96%)'
    """
    vals = [float(v) * scale for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    n, bad = len(vals), len(vals) - len(finite)
    if not finite:
        return f"{n} seeds: no finite value"
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
    text = (f"{n} seeds: {fmt(mean, digits)} ± {fmt(std, digits)}{unit} "
            f"(min {fmt(min(finite), digits)}{unit}, max {fmt(max(finite), digits)}{unit})")
    return text + (f"; {bad} not finite" if bad else "")


@dataclass(frozen=True)
class Context:
    """What ``measure`` may use besides the config: the device, progress bars, the profile."""

    device: str = "cpu"
    progress: bool = True
    profile: str = "quick"

    def bar(self, label: str):
        """The ``progress`` argument for :func:`bnlab.train.train` etc.: ``label`` or ``False``."""
        return label if self.progress else False


@dataclass(frozen=True)
class NoThresholds:
    """An experiment whose claims need no number to decide (or that has none yet)."""


class Experiment(abc.ABC):
    """Base class of a registered experiment: see the module docstring for the contract.

    Subclasses set the class attributes and implement :meth:`measure`, :meth:`judge` and
    :meth:`figures`. ``profiles`` maps each of :data:`PROFILES` to a ``Config`` instance;
    ``thresholds`` maps a profile to its registered ``Thresholds`` where they differ from the
    dataclass defaults.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    source: ClassVar[str] = ""
    description: ClassVar[str] = ""
    claims: ClassVar[tuple[Claim, ...]] = ()
    Config: ClassVar[type] = type(None)
    Thresholds: ClassVar[type] = NoThresholds
    profiles: ClassVar[dict[str, Any]] = {}
    thresholds: ClassVar[dict[str, Any]] = {}

    @abc.abstractmethod
    def measure(self, cfg, run: RunDir, ctx: Context) -> dict:
        """Train and measure with ``cfg``, streaming into ``run``; return the summary (no verdicts)."""

    @abc.abstractmethod
    def judge(self, summary: dict, th) -> list[Verdict]:
        """The verdicts: a pure function of the stored ``summary`` and the thresholds ``th``."""

    def figures(self, run: RunDir) -> list[Path]:
        """(Re)draw the figures from the run directory alone; return their paths."""
        return []

    def registered_thresholds(self, profile: str):
        """The ``Thresholds`` registered for ``profile``."""
        return self.thresholds.get(profile) or self.Thresholds()

    def metadata(self) -> dict:
        """What the report needs to know about this experiment, stored in every run."""
        cited = {c.source for c in self.claims}
        return {
            "name": self.name, "title": self.title, "source": self.source, "description": self.description,
            "claims": [dataclasses.asdict(c) for c in self.claims],
            "sources": {k: {**v, "order": i} for i, (k, v) in enumerate(SOURCES.items()) if k in cited},
        }


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(cls):
    """Class decorator: check the contract, instantiate and register under ``cls.name`` (the CLI name)."""
    inst = cls()
    where = f"experiment {inst.name!r}"
    unknown = [c.source for c in inst.claims if c.source not in SOURCES]
    if unknown:
        raise ValueError(f"{where}: claim sources {unknown} not in SOURCES ({', '.join(SOURCES)})")
    for attr in ("Config", "Thresholds"):
        t = getattr(inst, attr)
        if not (dataclasses.is_dataclass(t) and t.__dataclass_params__.frozen):
            raise ValueError(f"{where}: {attr} must be a frozen dataclass")
    missing = [p for p in PROFILES if not isinstance(inst.profiles.get(p), inst.Config)]
    if missing:
        raise ValueError(f"{where}: profiles {missing} missing or not a {inst.Config.__name__}")
    bad = [p for p, t in inst.thresholds.items() if p not in PROFILES or not isinstance(t, inst.Thresholds)]
    if bad:
        raise ValueError(f"{where}: thresholds for {bad} are not {inst.Thresholds.__name__} of a known profile")
    clash = {f.name for f in dataclasses.fields(inst.Config)} & {f.name for f in dataclasses.fields(inst.Thresholds)}
    if clash:
        raise ValueError(f"{where}: names in both Config and Thresholds: {sorted(clash)}")
    if len({c.id for c in inst.claims}) != len(inst.claims):
        raise ValueError(f"{where}: claim ids are not unique")
    EXPERIMENTS[inst.name] = inst
    return cls


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise unknown_name("experiment", name, EXPERIMENTS)
    return EXPERIMENTS[name]


# ----------------------------------------------------------------------------- typed settings


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or None"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"tuple of {type_name(args[0])}" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, *, key: str = "value"):
    """``value`` as type ``tp`` (``int``, ``float``, ``bool``, ``str``, ``tuple[T, ...]``,
    ``Optional[T]``), or :class:`TypeError`. Ints are accepted for floats and integral floats
    for ints (``1e3``); lists, and comma-separated strings (``bn,none``), for tuples. No setting
    accepts NaN; ``inf`` is a float like any other (an experiment's ``__post_init__`` refuses it
    where it makes no sense)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key=key)
            except TypeError:
                pass
        raise TypeError(key)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str) and value.strip():  # --set norms=bn,none  or  lrs=0.1,1
            parts = [v.strip() for v in value.split(",") if v.strip()]
            value = parts if args and args[0] is str else [_literal(v) for v in parts]
        if not isinstance(value, (list, tuple)):
            raise TypeError(key)
        elem = args[0] if args else Any
        return tuple(value if elem is Any else (coerce(v, elem, key=key) for v in value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
            return int(value)  # --set steps=1e3
        raise TypeError(key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
        raise TypeError(key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(key)
    if tp is Any:
        return value
    raise TypeError(key)


def _literal(raw: str):
    """A ``--set`` value: a Python literal (``1e-3``, ``True``, ``(0.1, 1.0)``, ``'bn'``), else the string."""
    text = raw.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def field_docs(cls) -> dict[str, str]:
    """``{field name: its docstring}``: the string literal written under each field of a dataclass
    (or, for a field it inherits or redeclares without one, under the field in a base class)."""
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for prev, node in zip(body, body[1:]):
            if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                docs.setdefault(prev.target.id, " ".join(node.value.value.split()))
    return docs


def field_types(cls) -> dict[str, Any]:
    """``{field name: resolved type}`` of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_settings(pairs: list[str] | None, *classes: type) -> list[dict]:
    """Parse ``--set key=value`` pairs against the fields of the dataclasses ``classes``.

    Returns one ``{key: value}`` dict per class. An unknown key or a value of the wrong type
    raises a one-line :class:`UserError` that lists what is accepted.
    """
    fields = [field_types(c) for c in classes]
    out: list[dict] = [{} for _ in classes]
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set takes key=value, got {pair!r}")
        key, raw = (s.strip() for s in pair.split("=", 1))
        owner = next((i for i, f in enumerate(fields) if key in f), None)
        if owner is None:
            accepted = sorted(k for f in fields for k in f)
            raise UserError(f"unknown setting {key!r}; accepted: {', '.join(accepted)}")
        tp = fields[owner][key]
        try:
            out[owner][key] = coerce(_literal(raw), tp, key=key)
        except TypeError:
            name = type_name(tp)
            article = "an" if name[:1] in "aeiou" else "a"
            raise UserError(f"setting {key!r} takes {article} {name}, got {raw!r}") from None
    return out


def replace(obj, changes: dict):
    """``dataclasses.replace`` that re-runs the class's validation (``__post_init__``) as a user error."""
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def as_dict(obj) -> dict:
    """A dataclass's fields as plain JSON-ready values (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def from_dict(cls, values: dict):
    """Rebuild a ``Config``/``Thresholds`` from stored values (unknown keys are an error)."""
    types_ = field_types(cls)
    extra = set(values) - set(types_)
    if extra:
        raise UserError(f"{cls.__qualname__}: unknown fields {sorted(extra)}")
    return cls(**{k: coerce(v, types_[k], key=k) for k, v in values.items()})


def fmt(x, digits: int = 3) -> str:
    """A number for a verdict's text: ``%g`` with ``digits`` significant digits; ``nan``/``inf`` spelled."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(xf):
        return "nan"
    if math.isinf(xf):
        return "∞" if xf > 0 else "-∞"
    return f"{xf:.{digits}g}"
