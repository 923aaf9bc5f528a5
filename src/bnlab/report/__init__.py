"""The HTML report: built from run directories alone, never by training.

``build(runs_dir)`` picks the newest complete run of every experiment under ``runs_dir`` and
writes one self-contained ``report.html``. It reads the run directories only (``experiment.json``
carries each experiment's title, claims and source works; ``verdicts.json`` the verdicts, their
rules and the thresholds applied) and never imports experiment code, so a report can be rebuilt
anywhere the run directories are. It shows (figures embedded as data URIs, no assets from
elsewhere, every string escaped): the claims table first, then a section per source work with
what it claims, how bnlab measured it, the figures, the numbers, the verdict, the configuration
and the environment.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .._io import atomic_write_text
from ..errors import UserError
from ..runs import COMPLETE, DAMAGED, RunDir, unreadable_reason

STATUS_ORDER = {"fails": 0, "inconclusive": 1, "holds": 2}


@dataclass
class ExperimentRun:
    """What the report needs of one complete experiment run."""

    name: str
    path: Path
    meta: dict
    config: dict
    env: dict
    summary: dict
    verdicts: list[dict]
    thresholds: dict = field(default_factory=dict)
    departures: dict = field(default_factory=dict)  # threshold -> {"registered", "applied"}
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, data URI)

    @property
    def profile(self) -> str:
        return str(self.config.get("profile", ""))


def _complete_runs(exp_dir: Path) -> list[Path]:
    """The complete runs of one experiment, newest first (damaged runs moved aside are skipped)."""
    runs = [p for p in exp_dir.iterdir() if p.is_dir() and DAMAGED not in p.name and (p / COMPLETE).exists()]
    return sorted(runs, key=lambda p: ((p / COMPLETE).stat().st_mtime, p.name), reverse=True)


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def collect(runs_dir: str | Path, *, unreadable: Optional[list] = None) -> list[ExperimentRun]:
    """The newest readable complete run of each experiment under ``runs_dir`` (sorted by name).

    A complete run whose files cannot be read back is skipped; ``(path, reason)`` is appended to
    ``unreadable`` when a list is given.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"no such runs directory: {root}")
    found = []
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in _complete_runs(exp_dir):
            if not (path / "experiment.json").exists():
                continue  # a `bnlab train` run: no claims to report
            reason = unreadable_reason(path)
            if reason is None:
                run = RunDir(path)
                meta = run.read_json("experiment.json")
                judged = run.read_json("verdicts.json")
                try:
                    found.append(ExperimentRun(
                        name=meta["name"], path=path, meta=meta, config=run.read_json("config.json")["config"],
                        env=run.read_json("env.json"), summary=run.read_json("summary.json"), verdicts=judged["verdicts"],
                        thresholds=judged.get("thresholds", {}), departures=judged.get("departures", {}),
                        figures=[(f.name, _data_uri(f)) for f in sorted((path / "figures").glob("*.png"))]
                        if (path / "figures").is_dir() else [],
                    ))
                    break
                except (OSError, ValueError, KeyError, TypeError) as e:
                    reason = f"{type(e).__name__}: {e}"
            if unreadable is not None:
                unreadable.append((path, reason))
    if not found:
        raise UserError(f"no complete experiment runs under {root} (run `bnlab reproduce --out {root}` first)")
    return found


def claims_table(runs: list[ExperimentRun]) -> list[dict]:
    """One row per claim: id, statement, source, experiment, status, value, detail."""
    rows = []
    for r in runs:
        for v in r.verdicts:
            rows.append({"rule": "", "ref": "", "spread": "", **v, "experiment": r.name, "profile": r.profile,
                         "departures": r.departures})
    return rows


def _fmt_value(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}"
    if v is None:
        return "—"
    return str(v)


def _shorten(obj, keep: int = 12):
    """``obj`` with long lists cut to their first and last few items (the summaries hold raw series;
    ``summary.json`` in the run directory has them all)."""
    if isinstance(obj, dict):
        return {k: _shorten(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > keep:
            half = keep // 2
            return [_shorten(v, keep) for v in obj[:half]] + [f"… {len(obj) - 2 * half} more …"] + \
                   [_shorten(v, keep) for v in obj[-half:]]
        return [_shorten(v, keep) for v in obj]
    return obj


def render(runs: list[ExperimentRun], *, runs_dir: str | Path = "", unreadable: Optional[list] = None) -> str:
    """The report's HTML (a string)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bnlab", "report"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt_value
    env.filters["pretty"] = lambda obj: json.dumps(_shorten(obj), indent=2, sort_keys=True, default=str)
    rows = claims_table(runs)
    works: dict[str, dict] = {}  # the source works, as stored by each run (the report imports no experiment)
    for r in runs:
        for key, info in r.meta.get("sources", {}).items():
            works.setdefault(key, info)
    works = dict(sorted(works.items(), key=lambda kv: (kv[1].get("order", 99), kv[0])))
    sources = []
    shown: dict[str, str] = {}  # experiment -> anchor of the section that shows its figures
    known = list(works) + sorted({r["source"] for r in rows} - set(works))
    for key in known:
        claims = [r for r in rows if r["source"] == key]
        if not claims:
            continue
        exp_names = []
        for c in claims:
            if c["experiment"] not in exp_names:
                exp_names.append(c["experiment"])
        anchor = "src-" + "".join(ch if ch.isalnum() else "-" for ch in key.lower())
        exps = [r for r in runs if r.name in exp_names]
        sources.append({
            "key": key, "info": works.get(key, {"title": key, "venue": "", "thesis": ""}), "claims": claims,
            "experiments": [r for r in exps if r.name not in shown],
            "shown_elsewhere": [(r.name, shown[r.name]) for r in exps if r.name in shown],
            "anchor": anchor,
        })
        for r in exps:
            shown.setdefault(r.name, anchor)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("holds", "fails", "inconclusive")}
    profiles = sorted({r.profile for r in runs})
    departures = [(r.name, k, d) for r in runs for k, d in sorted(r.departures.items())]
    return env.get_template("report.html.j2").render(
        rows=rows, sources=sources, runs=runs, counts=counts, profiles=profiles, runs_dir=str(runs_dir), departures=departures,
        unreadable=[(str(p), reason) for p, reason in (unreadable or [])],
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def build(runs_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default: ``<runs_dir>/report.html``) from the run directories.

    Unreadable runs are listed in the report with the reason, and each gets a warning line on
    standard error; every readable run is rendered.
    """
    unreadable: list = []
    runs = collect(runs_dir, unreadable=unreadable)
    for path, reason in unreadable:
        print(f"bnlab: warning: unreadable run {path}: {reason} (listed in the report)", file=sys.stderr)
    out = Path(out) if out is not None else Path(runs_dir) / "report.html"
    atomic_write_text(out, render(runs, runs_dir=runs_dir, unreadable=unreadable))
    return out


__all__ = ["build", "collect", "render", "claims_table", "ExperimentRun"]
