"""``bnlab reproduce``: every registered experiment, one report.

Each experiment runs into its own run directory, which is marked complete only at its end; a
rerun reuses every complete run with the same configuration hash, so an interrupted
``reproduce`` loses nothing that completed and redoes only what did not.

With an executor other than the local one (``--executor ray``), each experiment that is not
reused is one task: the worker runs it with :func:`~bnlab.experiments.run_experiment` into the
same ``--out`` (which must then be on a file system every worker sees at the same path; each
task checks that it sees the lock this process holds). The run directories, the rows and the
report are the same as a local run's. A task whose worker died mid-run leaves an unfinished run
directory; once every task has ended, this process (still holding the lock) removes it, as the
next ``reproduce`` would.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from .errors import UserError
from .experiments import EXPERIMENTS, PROFILES, get_experiment, resolve, resolve_config, run_experiment, verdict_rows
from .runs import LOCK, RunDir, output_lock, remove_unfinished, unreadable_reason
from .report import build
from .sweep.executors import LocalExecutor


def select(only: str | list[str] | None) -> list[str]:
    """Experiment names to run: all registered ones, or those named in ``only`` (comma-separated)."""
    if only is None:
        return sorted(EXPERIMENTS)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    if not names:
        raise UserError(f"--only names no experiment; accepted: {', '.join(sorted(EXPERIMENTS))}")
    for n in names:
        get_experiment(n)  # raises a UserError listing the accepted names
    return names


def reproduce(
    *,
    profile: str = "quick",
    only: str | list[str] | None = None,
    out: str | Path = "runs",
    force: bool = False,
    device: str = "auto",
    progress: bool = True,
    single_thread: bool = True,
    max_memory: str | None = None,
    log=None,
    executor=None,
    paper_settings=None,
) -> tuple[Path, list[dict]]:
    """Run (or reuse) the selected experiments, then build ``<out>/report.html``.

    ``log`` names extra metrics sinks for each new run (``"tensorboard,wandb,mlflow"``, see
    :mod:`bnlab.sinks`); ``metrics.jsonl`` is always written.

    Holds the lock of ``out`` (:func:`bnlab.runs.output_lock`): a second ``reproduce`` on the same
    directory refuses with one line naming this process.

    ``executor``: ``None`` or a :class:`~bnlab.sweep.executors.LocalExecutor` runs the experiments
    here one after the other; another executor (:class:`~bnlab.sweep.executors.RayExecutor`) gets
    one item per experiment that is not reused (see the module doc).

    ``paper_settings``: a :class:`bnlab.paper.Settings` for the paper profile (``smoke``, CIFAR-10's
    ``root``/``download``, ``bf16``, ``compile``, ``checkpoint_every``; see
    :func:`~bnlab.experiments.run_experiment`). Without ``smoke`` a missing CIFAR-10 is refused in
    one line before anything runs.

    Returns:
        ``(report_path, rows)`` with one row per claim (experiment, id, statement, source, status,
        value, detail, reused, seconds).
    """
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; accepted: {', '.join(PROFILES)}")
    names = select(only)
    smoke = bool(paper_settings is not None and paper_settings.smoke)
    for name in names:
        cfg, _ = resolve(name, profile, smoke=smoke)  # a profile that does not resolve: one line, before anything is written
        if profile == "paper" and not smoke:
            from . import paper

            if paper.uses_cifar10(cfg):
                s = paper_settings or paper.Settings()
                paper.require_cifar10(s.root, s.download)  # where to put CIFAR-10, how to fetch it: one line
    from .sinks import check_sinks, parse_sink_names

    check_sinks(parse_sink_names(log))  # an unknown sink or a missing package: one line, before anything runs
    with output_lock(out):
        if executor is not None and not isinstance(executor, LocalExecutor):
            return _reproduce_distributed(names, executor, profile=profile, out=out, force=force, device=device,
                                          single_thread=single_thread, max_memory=max_memory, log=log,
                                          paper_settings=paper_settings)
        return _reproduce(names, profile=profile, out=out, force=force, device=device, progress=progress,
                          single_thread=single_thread, max_memory=max_memory, log=log, paper_settings=paper_settings)


def _run_task(task: dict) -> dict:
    """One experiment in a worker (module level: pickled by reference). Checks first that the worker
    sees the ``--out`` whose lock the driver holds (same file system, same path)."""
    out = Path(task["out"])
    try:
        seen = (out / LOCK).read_text(encoding="utf-8", errors="replace")
    except OSError:
        seen = None
    if seen != task["lock"]:
        raise UserError(f"the worker on {socket.gethostname()} does not see --out {out} as the driver on {task['host']} "
                        f"does (its lock file is {'missing' if seen is None else 'another one'}); with a remote executor "
                        f"--out must be on a file system every worker shares, at the same path")
    t0 = time.perf_counter()
    run, reused = run_experiment(task["name"], profile=task["profile"], out=out, force=task["force"], device=task["device"],
                                 progress=False, single_thread=task["single_thread"], max_memory=task["max_memory"],
                                 log=task["log"], paper_settings=task.get("paper_settings"))
    return {"name": task["name"], "run": str(run.path), "reused": reused, "seconds": time.perf_counter() - t0}


def _reusable(name: str, profile: str, out, paper_settings=None) -> bool:
    """A complete, readable run of ``name`` at ``profile`` is under ``out`` (``run_experiment`` would reuse it)."""
    prev = RunDir.find_complete(out, name, resolve_config(name, profile, paper_settings=paper_settings))
    return prev is not None and unreadable_reason(prev.path) is None


def _reproduce_distributed(names, executor, *, profile, out, force, device, single_thread, max_memory, log=None,
                           paper_settings=None):
    """The experiments as tasks of ``executor``; reused ones are taken here, without a task (no start-up cost)."""
    root = Path(out).resolve()  # the workers' working directory is not ours
    lock = (root / LOCK).read_text(encoding="utf-8", errors="replace")
    done: dict[str, dict] = {}
    todo = []
    for name in names:
        if not force and _reusable(name, profile, out, paper_settings):
            t0 = time.perf_counter()
            run, reused = run_experiment(name, profile=profile, out=out, device=device, progress=False,
                                         single_thread=single_thread, max_memory=max_memory, log=log,
                                         paper_settings=paper_settings)  # reuse (re-judge if asked)
            done[name] = {"name": name, "run": str(run.path), "reused": reused, "seconds": time.perf_counter() - t0}
        else:
            todo.append({"name": name, "profile": profile, "out": str(root), "force": force, "device": device,
                         "single_thread": single_thread, "max_memory": max_memory, "log": log, "lock": lock,
                         "paper_settings": paper_settings,
                         "host": socket.gethostname()})
    try:
        for res in executor.map(_run_task, todo) if todo else []:
            res["run"] = str(Path(out) / Path(res["run"]).resolve().relative_to(root))  # as a local run names it
            done[res["name"]] = res
    finally:  # every task has ended: what a worker that died left unfinished goes now
        for p in remove_unfinished(root):
            print(f"bnlab: note: removed {p}, an unfinished run left by a worker that died", file=sys.stderr)
    rows: list[dict] = []
    for name in names:
        res = done[name]
        for v in verdict_rows(RunDir(res["run"])):
            rows.append({**v, "experiment": name, "reused": res["reused"], "seconds": res["seconds"], "run": res["run"]})
    return build(out), rows


def _reproduce(names, *, profile, out, force, device, progress, single_thread, max_memory, log=None, paper_settings=None):
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), desc="reproduce", unit="experiment", position=0, dynamic_ncols=True)
    try:
        for name in names:
            if bar is not None:
                bar.set_postfix_str(name)
            t0 = time.perf_counter()
            run, reused = run_experiment(name, profile=profile, out=out, force=force, device=device, progress=progress,
                                         single_thread=single_thread, max_memory=max_memory, log=log,
                                         paper_settings=paper_settings)
            seconds = time.perf_counter() - t0
            for v in verdict_rows(run):
                rows.append({**v, "experiment": name, "reused": reused, "seconds": seconds, "run": str(run.path)})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report = build(out)
    return report, rows


def format_table(rows: list[dict]) -> str:
    """The claims table for the terminal."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    head = ("id", "claim", "source", "verdict", "key number", "rule")
    body = [(r.get("ref") or "—", f"{r['experiment']}/{r['id']}", r["source"],
             r.get("label") or (r["status"].upper() if r["status"] == "fails" else r["status"]), fmt(r["value"]),
             r.get("rule", "")) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cols: "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
