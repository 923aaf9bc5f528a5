"""Killing `bnlab reproduce` midway loses nothing that completed; the rerun equals an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bnlab.runs import COMPLETE


def _bnlab():
    return [str(Path(sys.executable).with_name("bnlab"))]


def _key(rows):
    return [(r["experiment"], r["id"], r["status"], r["value"]) for r in rows]


def test_killed_reproduce_resumes_to_the_same_results(tiny_reproduce, tmp_path):
    from bnlab.reproduce import reproduce

    _, _, reference = tiny_reproduce
    out = tmp_path / "runs"
    proc = subprocess.Popen(_bnlab() + ["reproduce", "--profile", "tiny", "--out", str(out), "--device", "cpu", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # kill as soon as some work is under way but the whole job is not done: the first metrics
    # streamed by an experiment, or the first complete experiment
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            started = list(out.glob("*/*/metrics.jsonl.partial"))
            if any(p.stat().st_size > 0 for p in started) or list(out.glob(f"*/*/{COMPLETE}")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "reproduce finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = {p.parent for p in out.glob(f"*/*/{COMPLETE}")}
    assert not (out / "report.html").exists()
    report, rows = reproduce(profile="tiny", out=out, device="cpu", progress=False)
    assert _key(rows) == _key(reference)
    # what had completed was reused, not redone
    reused_runs = {Path(r["run"]) for r in rows if r["reused"]}
    assert done_before <= reused_runs
    assert report.exists()
