"""Registered experiments: one per claim group of the source works (see REFERENCES.md).

Every experiment follows one contract (:mod:`bnlab.experiments.base`): a frozen ``Config``
dataclass (hashed; names the run; ``--set key=value`` parsed from its fields), a frozen
``Thresholds`` dataclass (every decision rule's numbers; not hashed), ``measure(cfg, run, ctx) ->
summary`` (trains and measures, computes no verdict), ``judge(summary, thresholds) -> [Verdict]``
(pure: no training, no I/O, no model) and ``figures(run)`` (reads the run directory only). Three
profiles each: ``tiny`` (tests, seconds), ``quick`` (minutes on a 2-core CPU with the embedded
data) and ``paper`` (the source's original scale, for a GPU).

:mod:`bnlab.experiments.runner` runs one (measure → judge → figures) into a run directory with
metrics, figures, ``summary.json`` and ``verdicts.json`` (``holds | fails | inconclusive`` per
claim with the rule and the thresholds applied), reuses a complete run with the same
configuration hash unless forced, and judges stored runs again (``bnlab rejudge``).
"""

from __future__ import annotations

from .base import (FAILS, HOLDS, INCONCLUSIVE, PROFILES, SOURCES, Claim, Context, EXPERIMENTS, Experiment,
                   NoThresholds, Verdict, as_dict, coerce, field_types, fmt, from_dict, get_experiment,
                   parse_settings, register_experiment, seed_spread, verdict)
from .runner import (VERDICTS, applied_thresholds, config_record, experiment_runs, judge_record, rejudge, resolve, resolve_config,
                     run_experiment, verdict_rows)

from . import large_lr as _large_lr  # noqa: E402,F401  (each import registers an experiment)
from . import auto_rate as _auto_rate  # noqa: E402,F401
from . import exp_lr as _exp_lr  # noqa: E402,F401
from . import divergence as _divergence  # noqa: E402,F401
from . import activations as _activations  # noqa: E402,F401
from . import landscape as _landscape  # noqa: E402,F401
from . import ics as _ics  # noqa: E402,F401
from . import toy as _toy  # noqa: E402,F401
from . import bn_theory as _bn_theory  # noqa: E402,F401
from . import spectrum as _spectrum  # noqa: E402,F401

__all__ = [
    "HOLDS", "FAILS", "INCONCLUSIVE", "PROFILES", "SOURCES", "EXPERIMENTS", "Claim", "Context", "Experiment",
    "NoThresholds", "Verdict", "verdict", "seed_spread", "register_experiment", "get_experiment", "parse_settings", "coerce",
    "field_types", "as_dict", "from_dict", "fmt", "resolve", "resolve_config", "config_record", "judge_record",
    "applied_thresholds", "run_experiment", "rejudge", "experiment_runs", "verdict_rows", "VERDICTS",
]
