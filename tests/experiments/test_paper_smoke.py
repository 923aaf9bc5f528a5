"""The paper profile as a tested path: ``--profile paper --smoke`` (bnlab.paper, the runner).

The default run smoke-runs a subset of the experiments end to end through ``bnlab reproduce``
(the real architectures, optimizers, schedules, probes and figures; every training run capped at a
few steps; synthetic CIFAR-10-shaped data); ``test_full_paper_smoke`` (slow) runs all of them.
Every experiment's smoke config is checked generically, and the smoke verdict rule on a dummy
experiment whose judge holds, fails and is inconclusive.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from bnlab import paper
from bnlab.cli import main
from bnlab.experiments import EXPERIMENTS, INCONCLUSIVE, Claim, Experiment, judge_record, rejudge, resolve, verdict
from bnlab.experiments.base import NoThresholds
from bnlab.experiments.runner import SMOKE_STATUS, experiment_runs

SUBSET = ("large-lr", "toy")  # one vectorized sweep of the paper's VGG-11, one non-network experiment


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_smoke_config_keeps_the_paper_setting_and_caps_the_work(name):
    exp = EXPERIMENTS[name]
    p = exp.profiles["paper"]
    t = exp.profiles["tiny"]
    s, _ = resolve(name, "paper", smoke=True)
    for f in dataclasses.fields(p):
        v, pv, tv = getattr(s, f.name), getattr(p, f.name), getattr(t, f.name)
        arch = f.name in ("model", "width", "depth", "data") or f.name.endswith(("_width", "_depth", "_data"))
        cut = f.name in (getattr(exp, "smoke_cuts", None) or {})
        if cut and isinstance(pv, tuple) and ("lr" in f.name or "seeds" in f.name):  # fewer of the paper's values
            assert v and set(v) <= set(pv), f"{name}.{f.name}: the smoke run takes some of the paper's {pv!r}, has {v!r}"
            continue
        if arch or "lr" in f.name or "norm" in f.name or "momentum" in f.name or "weight_decay" in f.name:
            assert v == pv, f"{name}.{f.name}: the smoke run must keep the paper's {pv!r}, has {v!r}"
            continue
        numbers = isinstance(v, int) and not isinstance(v, bool) and isinstance(tv, int) and pv > 0 and tv > 0
        if numbers:  # never more than the paper's or the tiny profile's, and capped where the Config allows
            assert v <= min(pv, tv), f"{name}.{f.name} = {v}"
        if numbers and "steps" in f.name and min(pv, tv) > paper.SMOKE_STEPS and v > paper.SMOKE_STEPS:
            with pytest.raises(Exception):  # only a rule of the Config keeps it above the cap
                dataclasses.replace(s, **{f.name: paper.SMOKE_STEPS})
    assert resolve(name, "paper")[0] == p  # without --smoke: the profile as registered


@dataclasses.dataclass(frozen=True)
class _Cfg:
    x: int = 0


class _Dummy(Experiment):
    """An unregistered experiment whose judge reads the three outcomes from the summary."""

    name = "dummy"
    claims = (Claim("a", "A holds.", "Bjorck et al. 2018", "m", "rule a"), Claim("b", "B.", "Bjorck et al. 2018", "m", "rule b"),
              Claim("c", "C.", "Bjorck et al. 2018", "m", "rule c"))
    Config, Thresholds = _Cfg, NoThresholds
    profiles = {"tiny": _Cfg(), "quick": _Cfg(), "paper": _Cfg()}

    def measure(self, cfg, run, ctx):
        return {}

    def judge(self, summary, th):
        return [verdict("a", True, 1.0, "a ok", "r"), verdict("b", False, 2.0, "b bad", "r"), verdict("c", None, None, "c ?", "r")]


def test_smoke_verdicts_are_inconclusive_whatever_the_rule_gives():
    exp = _Dummy()
    normal = judge_record(exp, "paper", {}, NoThresholds())
    assert [v["status"] for v in normal["verdicts"]] == ["holds", "fails", "inconclusive"]
    assert not any(v.get("smoke") for v in normal["verdicts"])
    smoke = judge_record(exp, "paper", {"smoke": {"label": "smoke run: data: SYNTHETIC"}}, NoThresholds())
    for v, was in zip(smoke["verdicts"], ("holds", "fails", "inconclusive")):
        assert v["status"] == INCONCLUSIVE and v["smoke"] is True and v["label"] == SMOKE_STATUS
        assert v["detail"].startswith("smoke run: data: SYNTHETIC") and f"gives {was}:" in v["detail"]
    assert SMOKE_STATUS == "inconclusive (smoke run)"


@pytest.fixture(scope="module")
def smoke_subset(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper-smoke")
    root = tmp_path_factory.mktemp("no-cifar")
    rc = main(["reproduce", "--profile", "paper", "--smoke", "--only", ",".join(SUBSET), "--out", str(out),
               "--root", str(root), "--device", "cpu", "--quiet"])
    return rc, out


def test_paper_smoke_subset_runs_end_to_end(smoke_subset):
    rc, out = smoke_subset
    assert rc == 0
    runs = {r.read_json("config.json")["config"]["experiment"]: r for r in experiment_runs(out)}
    assert set(runs) == set(SUBSET)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "SYNTHETIC images with CIFAR-10" in html and "smoke run" in html  # the report says what the data were
    for name, run in runs.items():
        cfg = run.read_json("config.json")["config"]
        paper_cfg = dataclasses.asdict(EXPERIMENTS[name].profiles["paper"])
        for k in ("model", "width", "depth", "data"):
            if k in paper_cfg:
                assert cfg[k] == paper_cfg[k]  # the real architecture and data set
        assert cfg["smoke"]["steps"] == paper.SMOKE_STEPS and cfg["augment"] == "crop4+flip"
        verdicts = run.read_json("verdicts.json")["verdicts"]
        assert verdicts and all(v["status"] == "inconclusive" and v["label"] == SMOKE_STATUS for v in verdicts)
        assert sorted((run.path / "figures").glob("*.png"))
        if name == "large-lr":
            assert "SYNTHETIC" in cfg["smoke"]["data"] and all("SYNTHETIC" in v["detail"] for v in verdicts)
            steps = [r["step"] for r in run.metrics() if "loss" in r and "event" not in r]
            assert steps and max(steps) < paper.SMOKE_STEPS  # every training run capped


def test_rejudging_a_smoke_run_keeps_it_inconclusive(smoke_subset):
    _, out = smoke_subset
    _, rows = rejudge(out, build_report=False)
    assert rows and all(r["status"] == "inconclusive" and r.get("smoke") for r in rows)


def test_paper_profile_without_cifar10_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["run", "large-lr", "--profile", "paper", "--root", str(tmp_path / "empty"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "CIFAR-10" in err and "--download" in err and str(tmp_path / "empty") in err
    assert not out.exists()  # refused before anything was written
    rc = main(["reproduce", "--profile", "paper", "--only", "large-lr", "--root", str(tmp_path / "empty"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "CIFAR-10" in err and not out.exists()


def test_smoke_is_for_the_paper_profile_only(tmp_path, capsys):
    rc = main(["run", "toy", "--profile", "quick", "--smoke", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--smoke applies to --profile paper" in err


@pytest.mark.slow
def test_full_paper_smoke(tmp_path):
    """Every registered experiment's paper profile, smoke-sized (minutes on a CPU; see the README)."""
    rc = main(["reproduce", "--profile", "paper", "--smoke", "--out", str(tmp_path), "--root", str(tmp_path / "none"),
               "--device", "cpu", "--quiet"])
    assert rc == 0
    runs = experiment_runs(tmp_path)
    assert {r.read_json("config.json")["config"]["experiment"] for r in runs} == set(EXPERIMENTS)
    for run in runs:
        assert all(v["status"] == "inconclusive" and v.get("smoke") for v in run.read_json("verdicts.json")["verdicts"])
    assert json.loads((runs[0].path / "config.json").read_text())["config"]["smoke"]


def _strip_times(obj):
    """Records without wall-clock numbers (seconds, timings), which differ between any two runs."""
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if "second" not in k and "timing" not in k}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


@pytest.mark.slow
def test_killed_paper_smoke_run_resumes_to_the_same_result(tmp_path):
    """`bnlab run ics --profile paper --smoke` (VGG-11 arms, noisy BN drawing random numbers at every
    forward pass) SIGKILLed after a few checkpoints, run again: the same metrics and summary as an
    uninterrupted run, and the checkpoints are removed once it completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["run", "ics", "--profile", "paper", "--smoke", "--checkpoint-every", "1", "--device", "cpu", "--quiet",
            "--root", str(tmp_path / "none"), "--set", "seeds=1", "--set", "ics_seeds=1", "--set", "lp_norms=linf"]
    cmd = [sys.executable, "-c", "import sys; from bnlab.cli import main; sys.exit(main(sys.argv[1:]))"]
    ref = subprocess.run(cmd + args + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=1200)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen(cmd + args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while not list(out.glob(".bnlab-checkpoints/*/train-0002.pt")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    assert p.wait(60) == -signal.SIGKILL
    ck = list(out.glob(".bnlab-checkpoints/*/train-*.pt"))
    assert len(ck) >= 3
    again = subprocess.run(cmd + args + ["--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr
    assert "resuming ics from the checkpoints" in again.stderr
    assert not list(out.glob(".bnlab-checkpoints/*/train-*.pt"))  # spent once the run completed
    (a,), (b,) = experiment_runs(tmp_path / "ref"), experiment_runs(out)
    assert _strip_times(a.metrics()) == _strip_times(b.metrics())
    assert _strip_times(a.read_json("summary.json")) == _strip_times(b.read_json("summary.json"))
    assert os.path.getsize(a.path / "metrics.jsonl") > 1000
