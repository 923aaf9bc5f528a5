"""``bnlab reproduce``: every registered experiment, one report.

Each experiment runs into its own run directory, which is marked complete only at its end; a
rerun reuses every complete run with the same configuration hash, so an interrupted
``reproduce`` loses nothing that completed and redoes only what did not.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError
from .experiments import EXPERIMENTS, PROFILES, get_experiment, resolve, run_experiment, verdict_rows
from .runs import output_lock
from .report import build


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
) -> tuple[Path, list[dict]]:
    """Run (or reuse) the selected experiments, then build ``<out>/report.html``.

    Holds the lock of ``out`` (:func:`bnlab.runs.output_lock`): a second ``reproduce`` on the same
    directory refuses with one line naming this process.

    Returns:
        ``(report_path, rows)`` with one row per claim (experiment, id, statement, source, status,
        value, detail, reused, seconds).
    """
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; accepted: {', '.join(PROFILES)}")
    names = select(only)
    for name in names:
        resolve(name, profile)  # a profile that does not resolve: one line, before anything is written
    with output_lock(out):
        return _reproduce(names, profile=profile, out=out, force=force, device=device, progress=progress,
                          single_thread=single_thread, max_memory=max_memory)


def _reproduce(names, *, profile, out, force, device, progress, single_thread, max_memory):
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
                                         single_thread=single_thread, max_memory=max_memory)
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
             r["status"].upper() if r["status"] == "fails" else r["status"], fmt(r["value"]), r.get("rule", "")) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cols: "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
