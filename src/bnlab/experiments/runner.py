"""Running experiments: measure → judge → figures into a run directory, and judging again.

``run_experiment`` runs one registered experiment (or reuses a complete run with the same
configuration hash); ``rejudge`` recomputes ``verdicts.json`` of stored runs from their
``summary.json`` alone, with the registered thresholds or changed ones.

``verdicts.json``::

    {"experiment": ..., "profile": ...,
     "thresholds": {...applied...}, "registered": {...registered for the profile...},
     "departures": {key: {"registered": r, "applied": a}, ...},
     "verdicts": [{"id", "statement", "source", "metric", "threshold",
                   "status", "value", "detail", "rule"}, ...]}
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional
from pathlib import Path

from ..errors import UserError, check_seed, unknown_name
from ..runs import COMPLETE, DAMAGED, RunDir, check_output_root, env_info, move_aside, unreadable_reason
from .base import (INCONCLUSIVE, PROFILES, Context, EXPERIMENTS, Experiment, Verdict, as_dict, field_types,
                   from_dict, get_experiment, parse_settings, replace)

VERDICTS = "verdicts.json"


def resolve(name: str, profile: str = "quick", overrides: list[str] | None = None, *, smoke: bool = False):
    """``(Config, Thresholds)`` of experiment ``name`` at ``profile`` with ``--set`` overrides applied.

    A key may name a ``Config`` field (changes the run, and its hash) or a ``Thresholds`` field
    (changes only the verdicts). ``smoke`` (paper profile only): the profile cut down by
    :func:`bnlab.paper.smoke_config` before the overrides.
    """
    exp = get_experiment(name)
    if profile not in PROFILES:
        raise unknown_name("profile", profile, PROFILES)
    check_smoke(profile, smoke)
    cfg_changes, th_changes = parse_settings(overrides, exp.Config, exp.Thresholds)
    base = exp.profiles[profile]
    if smoke:
        from .. import paper

        base = paper.smoke_config(base, exp.profiles["tiny"], getattr(exp, "smoke_cuts", None))
    return replace(base, cfg_changes), replace(exp.registered_thresholds(profile), th_changes)


def check_smoke(profile: str, smoke: bool) -> None:
    """``--smoke`` is for the paper profile only (the others are small already)."""
    if smoke and profile != "paper":
        raise UserError(f"--smoke applies to --profile paper only, got --profile {profile}")


SMOKE_STATUS = "inconclusive (smoke run)"
"""How a smoke run's verdicts read (their ``status`` is ``inconclusive``; ``smoke`` is true)."""


def config_record(name: str, profile: str, cfg, paper_settings=None) -> dict:
    """What is hashed and stored as the run's configuration. A paper run's also says whether the
    training set is augmented (``augment``) and, for a smoke run, ``smoke``: its step cap and data
    (a smoke run is never taken for a real one)."""
    record = {"experiment": name, "profile": profile, **as_dict(cfg)}
    if profile == "paper":
        from .. import paper

        settings, smoke_info = paper_run_settings(profile, paper_settings)
        record["augment"] = "crop4+flip" if settings.augment else "none"
        if smoke_info:
            record["smoke"] = {**smoke_info, "data": smoke_data_source(settings) if paper.uses_cifar10(cfg)
                               else "the profile's own"}
    return record


def resolve_config(name: str, profile: str = "quick", overrides: list[str] | None = None, paper_settings=None) -> dict:
    """The configuration record of ``name`` at ``profile`` with overrides (what names the run)."""
    smoke = bool(paper_settings is not None and paper_settings.smoke)
    cfg, _ = resolve(name, profile, overrides, smoke=smoke)
    return config_record(name, profile, cfg, paper_settings)


def judge_record(exp: Experiment, profile: str, summary: dict, th) -> dict:
    """The content of ``verdicts.json``: one verdict per declared claim, with the thresholds applied."""
    got = exp.judge(summary, th)
    by_claim: dict[str, Verdict] = {}
    for v in got:
        if v.claim in by_claim:
            raise ValueError(f"experiment {exp.name!r}: two verdicts for claim {v.claim!r}")
        by_claim[v.claim] = v
    unknown = set(by_claim) - {c.id for c in exp.claims}
    if unknown:
        raise ValueError(f"experiment {exp.name!r}: verdicts for undeclared claims {sorted(unknown)}")
    rows = []
    smoke = summary.get("smoke") if isinstance(summary, dict) else None
    for c in exp.claims:
        v = by_claim.get(c.id) or Verdict(c.id, INCONCLUSIVE, None, "not measured in this run", c.threshold)
        row = {**dataclasses.asdict(c), **{k: val for k, val in dataclasses.asdict(v).items() if k != "claim"}}
        if smoke:  # a smoke run tests the code path, never the claim: whatever the rule gave is only shown
            row.update(status=INCONCLUSIVE, smoke=True, label=SMOKE_STATUS,
                       detail=f"{smoke.get('label', 'smoke run')}; the rule on these numbers gives "
                              f"{v.status}: {v.detail}")
        rows.append(row)
    applied, registered = as_dict(th), as_dict(exp.registered_thresholds(profile))
    return {
        "experiment": exp.name, "profile": profile, "thresholds": applied, "registered": registered,
        "departures": {k: {"registered": registered[k], "applied": applied[k]} for k in applied if applied[k] != registered.get(k)},
        "verdicts": rows,
    }


def applied_thresholds(exp: Experiment, run: RunDir):
    """The ``Thresholds`` a run was last judged with (from its ``verdicts.json``), for figures that
    draw a threshold; the registered ones of the run's profile when they cannot be read."""
    try:
        return from_dict(exp.Thresholds, run.read_json(VERDICTS)["thresholds"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        try:
            profile = run.read_json("config.json")["config"]["profile"]
        except (OSError, ValueError, KeyError, TypeError):
            profile = "quick"
        return exp.registered_thresholds(profile)


def verdict_rows(run: RunDir) -> list[dict]:
    """The verdict rows of a finished experiment run."""
    return run.read_json(VERDICTS)["verdicts"]


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
    max_memory: Optional[str] = None,
    log=None,
    paper_settings=None,
) -> tuple[RunDir, bool]:
    """Run (or reuse) one experiment: measure → judge → figures. Returns ``(run_dir, reused)``.

    ``log`` names extra metrics sinks (``"tensorboard,wandb,mlflow"`` or a list, see
    :mod:`bnlab.sinks`): a new run sends every metrics record to them and then its figures;
    they write inside the run directory. ``metrics.jsonl`` is always written. A reused run sends
    its stored metrics and figures to each sink whose folder it does not have yet.

    ``paper_settings`` (a :class:`bnlab.paper.Settings`; for the paper profile): ``smoke`` runs the
    profile cut down (:func:`bnlab.paper.smoke_config`, every training run capped at a few steps,
    synthetic CIFAR-10-shaped data unless CIFAR-10 is in ``root``) and judges it ``inconclusive
    (smoke run)``; without it the paper profile needs CIFAR-10 in ``root`` (or ``download``) and is
    refused in one line otherwise. A paper run checkpoints every ``checkpoint_every`` steps
    (default :data:`PAPER_CHECKPOINT_EVERY`; 0: never) under ``<out>/.bnlab-checkpoints/`` and
    resumes from there when run again after a crash; the checkpoints are removed when it completes.

    A complete run with the same configuration hash under ``out`` is reused unless ``force``; if
    the thresholds asked for differ from those it was judged with, it is judged again (no
    training). A complete run whose files cannot be read back (truncated, empty, not UTF-8, not
    JSON) is moved aside as ``<run>.damaged-<time>`` with a warning, and run again. Any failure
    removes the unfinished run directory (and the directories this call created). On the CPU the
    run uses one torch thread unless ``single_thread=False`` (the experiments' nets are small: on
    a 2-core machine one thread was as fast or faster, and far steadier under load). A model whose
    estimated training memory (:func:`bnlab.models.memory.check_fits`, from the config's ``model``,
    ``width``, ``depth`` and ``batch_size``) exceeds ``max_memory`` (default: the device's memory)
    is refused in one line before anything is built.
    """
    from ..train import resolve_device

    from ..sinks import check_sinks, make_sinks, parse_sink_names, replay_run

    from .. import paper

    exp = get_experiment(name)
    settings, smoke_info = paper_run_settings(profile, paper_settings)
    cfg, th = resolve(name, profile, overrides, smoke=settings.smoke)
    record = config_record(name, profile, cfg, paper_settings)
    if smoke_info:
        smoke_info = {**record["smoke"], "label": paper.smoke_label(record["smoke"]["data"])}
    elif profile == "paper" and paper.uses_cifar10(cfg):
        paper.require_cifar10(settings.root, settings.download)  # one line saying where to put it, exit 2
    sink_names = parse_sink_names(log)
    check_sinks(sink_names)  # a missing package: one line, before anything is written
    dev = resolve_device(device)
    seed = getattr(cfg, "seed", None)
    if isinstance(seed, int):
        check_seed(seed)
    check_output_root(out)
    check_config_fits(cfg, dev, max_memory)
    if not force:
        prev = RunDir.find_complete(out, name, record)
        damaged = unreadable_reason(prev.path) if prev is not None else None
        if damaged:
            moved = move_aside(prev.path)
            print(f"bnlab: warning: {prev.path} is damaged ({damaged}); moved aside to {moved.name}, running it again",
                  file=sys.stderr)
        elif prev is not None:
            if prev.read_json(VERDICTS).get("thresholds") != as_dict(th):
                prev.write_json(VERDICTS, judge_record(exp, profile, prev.read_json("summary.json"), th))
                exp.figures(prev)  # figures that draw a threshold follow the one applied
            if sink_names:  # --log on a reused run: its stored metrics and figures, once per sink
                replay_run(prev, sink_names, name=f"{name}-{prev.path.name}", config=record)
            return prev, True
    import torch

    threads = torch.get_num_threads()
    if dev.type == "cpu" and single_thread:
        torch.set_num_threads(1)  # small nets: intra-op threads only add overhead, and stall on a busy machine
    try:
        with RunDir.new(out, name, record, env=env_info(device=dev, seed=seed)) as run:
            run.write_json("experiment.json", exp.metadata())
            if sink_names:
                run.attach_sinks(make_sinks(sink_names, run.path, name=f"{name}-{run.path.name}", config=record))
            ckdir = checkpoint_dir(out, name, record) if profile == "paper" and settings.checkpoint_every > 0 else None
            if ckdir is not None and ckdir.is_dir() and any(ckdir.glob("train-*.pt")):
                print(f"bnlab: resuming {name} from the checkpoints in {ckdir}", file=sys.stderr)
            with paper.use(settings, checkpoint_dir=ckdir):
                summary = exp.measure(cfg, run, Context(device=str(dev), progress=progress, profile=profile))
            if smoke_info:
                summary = {**summary, "smoke": smoke_info}
            run.close_metrics()
            run.write_json("summary.json", summary)
            run.write_json(VERDICTS, judge_record(exp, profile, run.read_json("summary.json"), th))
            exp.figures(run)
            run.finish()
        if ckdir is not None:
            import shutil

            shutil.rmtree(ckdir, ignore_errors=True)  # the run is complete: its checkpoints are spent
    finally:
        torch.set_num_threads(threads)
    return run, False


PAPER_CHECKPOINT_EVERY = 500
"""Steps between two checkpoints of a paper run's training calls (a few seconds of work to redo)."""
CHECKPOINTS = ".bnlab-checkpoints"


def checkpoint_dir(out, name: str, record: dict) -> Path:
    """Where a run's checkpoints go: ``<out>/.bnlab-checkpoints/<experiment>-<config hash>/``."""
    from ..runs import config_hash

    return Path(out) / CHECKPOINTS / f"{name}-{config_hash(record)}"


def paper_run_settings(profile: str, given=None):
    """``(settings, smoke_info)`` for a run: the paper settings in force during ``measure`` (the
    standard augmentation and checkpoints for the paper profile; nothing for the others) and, for a
    smoke run, what its verdicts and summary say about it."""
    from .. import paper

    s = given if given is not None else paper.Settings()
    check_smoke(profile, s.smoke)
    if profile != "paper":
        return dataclasses.replace(s, augment=False, checkpoint_every=0, bf16=False, speed=False), {}
    every = s.checkpoint_every if s.checkpoint_every is not None else (0 if s.smoke else PAPER_CHECKPOINT_EVERY)
    s = dataclasses.replace(s, augment=True, checkpoint_every=every, speed=True)
    if not s.smoke:
        return s, {}
    return s, {"steps": paper.SMOKE_STEPS, "batch": paper.SMOKE_BATCH}


def smoke_data_source(settings) -> str:
    """What a smoke run's CIFAR-10 is: a subset of the real set in ``root``, or the synthetic stand-in."""
    from .. import paper

    if paper.cifar10_present(settings.root):
        return f"CIFAR-10 from {paper.cifar10_root(settings.root)} ({paper.SMOKE_TRAIN}/{paper.SMOKE_TEST} images)"
    return (f"SYNTHETIC images with CIFAR-10's shape, format and normalization ({paper.SMOKE_TRAIN}/{paper.SMOKE_TEST} "
            f"uint8 3x32x32 images; CIFAR-10 is not in {paper.cifar10_root(settings.root)})")


def check_config_fits(cfg, device, max_memory: Optional[str] = None) -> None:
    """:func:`bnlab.models.memory.check_fits` for a ``Config`` that names a built-in dataset and a model."""
    from ..models import MODELS
    from ..models.memory import DATASET_SHAPES, check_fits

    data, model = getattr(cfg, "data", None), getattr(cfg, "model", None)
    if data not in DATASET_SHAPES or model not in MODELS:
        return
    in_shape, classes = DATASET_SHAPES[data]
    options = {k: getattr(cfg, k) for k in ("width", "depth") if isinstance(getattr(cfg, k, None), int)}
    check_fits(model, in_shape=in_shape, num_classes=classes, batch_size=getattr(cfg, "batch_size", 128), device=device,
               max_memory=max_memory, **options)


# ----------------------------------------------------------------------------- rejudge


def _threshold_changes(pairs: list[str] | None, exps: list[Experiment]) -> dict[str, dict]:
    """Split ``--set [experiment.]key=value`` pairs by experiment, parsed against each ``Thresholds``.

    An unqualified key applies to every experiment whose thresholds have it. A key no experiment
    under judgement has (or a ``Config`` key, which would need training) is a user error.
    """
    changes: dict[str, list[str]] = {e.name: [] for e in exps}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set takes [experiment.]key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip()
        target = None
        if "." in key and key.split(".", 1)[0] in changes:
            target, key = key.split(".", 1)
        hits = [e for e in exps if (target is None or e.name == target) and key in field_types(e.Thresholds)]
        if not hits:
            cfg_keys = [e.name for e in exps if (target is None or e.name == target) and key in field_types(e.Config)]
            accepted = sorted({f"{e.name}.{k}" for e in exps for k in field_types(e.Thresholds)})
            why = (f"{key!r} is a configuration setting of {', '.join(cfg_keys)}: changing it needs a new run "
                   f"(`bnlab run ... --set {key}=...`)" if cfg_keys else f"unknown threshold {key!r}")
            raise UserError(f"{why}; accepted thresholds: {', '.join(accepted) or 'none'}")
        for e in hits:
            changes[e.name].append(f"{key}={value}")
    return {name: parse_settings(p, next(e for e in exps if e.name == name).Thresholds)[0] for name, p in changes.items()}


def experiment_runs(runs_dir: str | Path) -> list[RunDir]:
    """Every complete experiment run under ``runs_dir`` (``<runs_dir>/<experiment>/<id>/``)."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"no such runs directory: {root}")
    found = []
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for p in sorted(exp_dir.iterdir()):
            if p.is_dir() and DAMAGED not in p.name and (p / COMPLETE).exists() and (p / "experiment.json").exists():
                found.append(RunDir(p))
    return found


def rejudge(runs_dir: str | Path, overrides: list[str] | None = None, *, build_report: bool = True):
    """Judge every complete run under ``runs_dir`` again from its stored summary, then rebuild the report.

    No training: each run's ``summary.json`` goes through its experiment's ``judge`` with the
    thresholds registered for the run's profile, changed by ``overrides`` (``[experiment.]key=value``).

    Returns:
        ``(report_path or None, rows)`` with one row per claim of every rejudged run.
    """
    runs = experiment_runs(runs_dir)
    if not runs:
        raise UserError(f"no complete experiment runs under {runs_dir} (run `bnlab reproduce --out {runs_dir}` first)")
    pending = []
    for run in runs:
        reason = unreadable_reason(run.path)
        if reason:
            print(f"bnlab: warning: skipped unreadable run {run.path}: {reason}", file=sys.stderr)
            continue
        rec = run.read_json("config.json")["config"]
        name, profile = rec.get("experiment"), rec.get("profile")
        if name not in EXPERIMENTS or profile not in PROFILES:
            print(f"bnlab: warning: skipped {run.path}: experiment {name!r} (profile {profile!r}) is not registered",
                  file=sys.stderr)
            continue
        pending.append((run, EXPERIMENTS[name], profile, run.read_json("summary.json")))
    exps = list({e.name: e for _, e, _, _ in pending}.values())
    changes = _threshold_changes(overrides, exps)
    rows = []
    for run, exp, profile, summary in pending:
        th = replace(exp.registered_thresholds(profile), changes[exp.name])
        try:
            record = judge_record(exp, profile, summary, th)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            print(f"bnlab: warning: skipped {run.path}: its summary.json does not fit {exp.name}'s judge "
                  f"({type(e).__name__}: {e}; written by another bnlab version?)", file=sys.stderr)
            continue
        changed = record["thresholds"] != run.read_json(VERDICTS).get("thresholds")
        run.write_json(VERDICTS, record)
        if changed:
            exp.figures(run)  # figures that draw a threshold follow the one applied (only then: rejudge stays fast)
        rows += [{**v, "experiment": exp.name, "run": str(run.path)} for v in record["verdicts"]]
    report = None
    if build_report:
        from ..report import build

        report = build(runs_dir)
    return report, rows


__all__ = ["applied_thresholds", "resolve", "resolve_config", "config_record", "judge_record", "verdict_rows", "run_experiment",
           "rejudge", "experiment_runs", "from_dict", "VERDICTS"]
