"""Kill `bnlab reproduce` with SIGKILL at random moments, again and again, then let it finish.

The final verdicts and summaries must equal those of an uninterrupted run (timings aside), no
unfinished or half-written run may be left, and every kill must have been a real interruption.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bnlab.reproduce import reproduce
from bnlab.runs import COMPLETE, LOCK

KILLS = int(os.environ.get("BNLAB_SOAK_KILLS", "20"))


def _untimed(obj):
    """``obj`` without wall-time fields (``seconds``, ``*_seconds``, ``timings``), which differ between any two runs."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not (k in ("seconds", "timings") or k.endswith("_seconds"))}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _diff(a, b, path="") -> list[str]:
    """The paths where two JSON values differ (NaN equals NaN), for a readable failure."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in
                (_diff(a.get(k), b.get(k), f"{path}/{k}") if k in a and k in b else [f"{path}/{k} only on one side"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _diff(u, v, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{path}: {str(a)[:60]} != {str(b)[:60]}"]


def _summaries(out: Path) -> dict:
    found = {}
    for p in out.glob(f"*/*/{COMPLETE}"):
        found[p.parent.parent.name] = _untimed(json.loads((p.parent / "summary.json").read_text()))
    return found


def test_repeated_sigkill_then_resume_equals_an_uninterrupted_run(tiny_reproduce, tmp_path):
    ref_out, _, reference = tiny_reproduce
    out = tmp_path / "runs"
    rng = random.Random(2026)
    cmd = [str(Path(sys.executable).with_name("bnlab")), "reproduce", "--profile", "tiny", "--out", str(out),
           "--device", "cpu", "--quiet"]
    interrupted = 0
    deadline = time.time() + 420  # bounded: the kills stop after 7 minutes whatever happens
    while interrupted < KILLS and time.time() < deadline:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.2, 6.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            interrupted += 1
        proc.wait(timeout=60)
        if (out / "report.html").exists():  # it finished before this kill: start again from scratch
            shutil.rmtree(out)
    assert interrupted >= KILLS
    report, rows = reproduce(profile="tiny", out=out, device="cpu", progress=False)
    key = lambda rs: [(r["experiment"], r["id"], r["status"], json.dumps(r["value"])) for r in rs]
    assert key(rows) == key(reference)
    got, want = _summaries(out), _summaries(ref_out)
    assert got.keys() == want.keys()
    assert not {n: d for n in got if (d := _diff(got[n], want[n]))}
    # nothing unfinished or half-written is left
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    unfinished = [p for p in out.glob("*/*") if p.is_dir() and not (p / COMPLETE).exists()]
    assert not leftovers and not unfinished
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [LOCK, "report.html"]
