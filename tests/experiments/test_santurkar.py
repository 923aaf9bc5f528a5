"""The Santurkar et al. (2018) experiments, ``landscape`` and ``ics``: the stored numbers of the tiny
runs are consistent, and the judges are pure functions of the summary."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from bnlab.analysis import instability, series, tail_mean, window_ratio
from bnlab.experiments import EXPERIMENTS, rejudge, run_experiment
from bnlab.experiments.ics import NORMS, QUANTILES, activation_instability, ics_summary
from bnlab.experiments.ics import Thresholds as IcsThresholds
from bnlab.experiments.common import arm_records
from bnlab.experiments.landscape import ARMS, QUANTITIES, quantity, ratio_verdict
from bnlab.experiments.landscape import Thresholds as LandscapeThresholds
from bnlab.runs import RunDir

STATUS = {True: "holds", False: "fails", None: "inconclusive"}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("santurkar")
    runs = {}
    for name in ("landscape", "ics"):
        run, reused = run_experiment(name, profile="tiny", out=out, device="cpu", progress=False)
        assert not reused and run.complete
        runs[name] = run
    return out, runs


def _run(tiny_runs, name):
    run = tiny_runs[1][name]
    return run, run.read_json("config.json")["config"], run.metrics()


def _judged(name, summary, th):
    """``{claim: (status, value)}`` of the judge on a summary as re-read from JSON."""
    summary = json.loads(json.dumps(summary))
    return {v.claim: (v.status, v.value) for v in EXPERIMENTS[name].judge(summary, th)}


# ----------------------------------------------------------------------------- landscape
def test_landscape_tiny_numbers_are_consistent(tiny_runs):
    run, cfg, recs = _run(tiny_runs, "landscape")
    for arm, norm, lr_key, probed in ARMS:
        steps = arm_records(recs, arm)
        assert steps, arm
        probes = [r for r in steps if "landscape/beta" in r]
        if not probed:
            assert not probes
            continue
        assert [r["step"] for r in probes] == list(range(0, cfg["steps"], cfg["probe_every"]))
        for r in probes:
            assert r["landscape/loss_min"] <= r["landscape/loss"] <= r["landscape/loss_max"]
            assert r["landscape/loss"] == pytest.approx(r["loss"], rel=1e-6)  # the step's own loss
            assert 0 <= r["landscape/grad_diff_min"] <= r["landscape/grad_diff_max"]
            assert r["landscape/s_max"] == pytest.approx(cfg["max_lr_multiple"] * cfg[lr_key])
            # β_eff >= the top of the gradient band / (s_max ‖g‖)
            assert r["landscape/beta"] >= r["landscape/grad_diff_max"] / (r["landscape/s_max"] * r["landscape/grad_norm"]) * (1 - 1e-9)
        hess = [r for r in steps if "hess_top/lambda_max" in r]
        assert [r["step"] for r in hess] == list(range(0, cfg["steps"], cfg["hessian_every"]))
        for r in hess:
            assert math.isfinite(r["hess_quad/gHg"]) and r["hess_top/n_hvp"] <= cfg["lanczos_iter"]
            assert r["hess_top/lambda_max"] >= r["hess_quad/gHg"] - 1e-3 * abs(r["hess_top/lambda_max"])  # λ_max bounds the Rayleigh quotient
    # the verdicts are the stored numbers put through the stated rule
    summary = run.read_json("summary.json")
    record = run.read_json("verdicts.json")
    th = record["thresholds"]
    verdicts = {v["id"]: v for v in record["verdicts"]}
    for claim, (qname, _) in QUANTITIES.items():
        sb, vb = quantity(arm_records(recs, "bn@lr"), qname)
        sp, vp = quantity(arm_records(recs, "none@lr"), qname)
        early = window_ratio(sp, vp, sb, vb, 0, cfg["window"] * cfg["steps"])[0]
        late = window_ratio(sp, vp, sb, vb, (1 - cfg["window"]) * cfg["steps"], math.inf)[0]
        assert summary["ratios"][qname]["early_ratio"] == pytest.approx(early, nan_ok=True)
        assert summary["ratios"][qname]["late_ratio"] == pytest.approx(late, nan_ok=True)
        ok = ratio_verdict(early, late, th["ratio_min"], th["late_ratio_min"], th["fail_ratio"])
        assert verdicts[claim]["status"] == STATUS[ok]
        assert verdicts[claim]["rule"]


def test_window_ratio_and_verdict_rule():
    s = np.arange(0, 100, 10)
    a, b = np.full(10, 6.0), np.full(10, 2.0)
    assert window_ratio(s, a, s, b, 0, 30) == (3.0, 6.0, 2.0, 3)
    assert math.isnan(window_ratio(s, a, s, b, 200, 300)[0])
    assert ratio_verdict(3.0, 1.2, 2.0) is True
    assert ratio_verdict(0.9, 5.0, 2.0) is False
    assert ratio_verdict(1.5, 5.0, 2.0) is None and ratio_verdict(3.0, 0.8, 2.0) is None
    assert ratio_verdict(math.nan, 5.0, 2.0) is None
    assert ratio_verdict(3.0, 0.8, 2.0, late_ratio_min=0.5) is True and ratio_verdict(1.5, 5.0, 2.0, fail_ratio=1.6) is False


def _landscape_summary(early, late, diverged=False):
    ratios = {q: {"early_ratio": early, "late_ratio": late, "early_none": 2.0 * early, "early_bn": 2.0, "late_none": late,
                  "late_bn": 1.0, "early_n": 3, "late_n": 3} for q, _ in QUANTITIES.values()}
    return {"arms": {"bn@lr": {"diverged": False}, "none@lr": {"diverged": diverged, "diverged_at": 5 if diverged else None}},
            "ratios": ratios, "lr": 0.05, "steps": 400, "window": 0.25}


@pytest.mark.parametrize("early, late, diverged, status", [
    (3.0, 1.5, False, "holds"),           # much smaller early, still smaller late
    (2.0, 1.0, False, "holds"),           # both exactly at the thresholds
    (0.9, 5.0, False, "fails"),           # larger with BN early
    (1.5, 5.0, False, "inconclusive"),    # smaller early, but not by ratio_min
    (3.0, 0.8, False, "inconclusive"),    # larger with BN late
    (math.nan, 2.0, False, "inconclusive"),  # no probe in the early window
    (3.0, math.nan, False, "inconclusive"),
    (3.0, 1.5, True, "inconclusive"),     # the plain net diverged: no comparison
])
def test_landscape_judge_table(early, late, diverged, status):
    got = _judged("landscape", _landscape_summary(early, late, diverged), LandscapeThresholds())
    assert list(got) == list(QUANTITIES)
    for claim in QUANTITIES:
        assert got[claim][0] == status
        assert got[claim][1] == pytest.approx(early, nan_ok=True)


def test_landscape_thresholds_re_decide_without_training():
    s = _landscape_summary(1.5, 1.2)
    assert {v[0] for v in _judged("landscape", s, LandscapeThresholds()).values()} == {"inconclusive"}
    assert {v[0] for v in _judged("landscape", s, LandscapeThresholds(ratio_min=1.4)).values()} == {"holds"}
    assert {v[0] for v in _judged("landscape", s, LandscapeThresholds(fail_ratio=2.0)).values()} == {"fails"}
    assert {v[0] for v in _judged("landscape", s, LandscapeThresholds(ratio_min=1.4, late_ratio_min=1.5)).values()} == {"inconclusive"}


# ----------------------------------------------------------------------------- ics
def test_ics_tiny_numbers_are_consistent(tiny_runs):
    run, cfg, recs = _run(tiny_runs, "ics")
    summary = run.read_json("summary.json")
    for norm in NORMS:
        steps = arm_records(recs, norm)
        ics = [r for r in steps if "ics/mean_rel" in r]
        assert [r["step"] for r in ics] == list(range(0, cfg["steps"], cfg["ics_every"]))
        for r in ics:
            layers = [k[4:-4] for k in r if k.startswith("ics/") and k.endswith("/rel") and not k.startswith("ics/mean")]
            assert layers == ["features.4", "features.8", "classifier"]  # layers 2..4 of the convnet
            for layer in layers:
                assert -1 - 1e-9 <= r[f"ics/{layer}/cos"] <= 1 + 1e-9
                assert r[f"ics/{layer}/l2"] >= 0 and r[f"ics/{layer}/rel"] == pytest.approx(r[f"ics/{layer}/l2"] / r[f"ics/{layer}/g_norm"])
        acts = [r for r in steps if "act_q/0/q50" in r]
        assert [r["step"] for r in acts] == list(range(0, cfg["steps"], cfg["act_every"]))
        for r in acts:
            for c in range(cfg["width"] * 2):  # the second conv has 2 x width channels
                qs = [r[f"act_q/{c}/q{q * 100:g}"] for q in QUANTILES]
                assert qs == sorted(qs)
                assert r[f"act_q/{c}/std"] >= 0
        accs = [r["train_mode/acc"] for r in steps if "train_mode/acc" in r]
        assert accs and all(0 <= a <= 1 for a in accs)
        assert summary["instability"][norm] == pytest.approx(activation_instability(steps))
        assert summary["ics"][norm]["rel"] == pytest.approx(ics_summary(steps)["rel"])
        s, a = series(steps, "train_mode/acc")
        assert summary["train_mode_acc"][norm] == pytest.approx(tail_mean(s, a, (1 - cfg["final_frac"]) * cfg["steps"]))
    # BN's output channel has mean β and std γ on every batch: far steadier than noisy BN's
    assert summary["instability"]["bn-noisy"] > summary["instability"]["bn"]
    assert summary["arms"]["bn"]["act_layer"] == "features.5"


def test_instability_pools_channels_and_skips_flat_ones():
    assert instability([[0.0, 1.0, 1.0], [5.0]], [[2.0, 2.0, 2.0], [1.0]]) == pytest.approx(0.25)
    assert math.isnan(instability([[1.0, 2.0]], [[0.0, 0.0]]))  # no spread: not measurable
    recs = [{"step": i, "act_q/0/mean": m, "act_q/0/std": 2.0} for i, m in enumerate([0.0, 1.0, 1.0])]
    assert activation_instability(recs) == pytest.approx(0.25)
    assert tail_mean([0, 5, 10], [0.2, 0.4, 0.6], 5) == pytest.approx(0.5) and math.isnan(tail_mean([], [], 0))


def _ics_summary(acc=(0.9, 0.9, 0.88), ins=(0.05, 0.01, 0.1), rel=(0.2, 0.2), diverged=False):
    """``acc`` and ``ins``: (none, bn, bn-noisy); ``rel``: ICS of (none, bn)."""
    def ics(r):
        return {"rel": r, "l2": 0.1, "cos": 0.99, "per_layer": {"features.4": {"rel": r, "l2": 0.1, "cos": 0.99}}}
    arms = {n: {"diverged": diverged and n == "none", "train_acc": 0.9, "test_acc": 0.85, "act_layer": "features.5"} for n in NORMS}
    return {"arms": arms, "train_mode_acc": dict(zip(NORMS, acc)), "instability": dict(zip(NORMS, ins)),
            "ics": {"none": ics(rel[0]), "bn": ics(rel[1]), "bn-noisy": ics(0.15)}, "steps": 400, "final_frac": 0.1, "act_every": 5}


@pytest.mark.parametrize("summary, claim, status, value", [
    # noisy-bn-trains-like-bn: noisy >= BN - acc_tol (value: noisy - BN)
    (_ics_summary(acc=(0.9, 0.90, 0.88)), "noisy-bn-trains-like-bn", "holds", -0.02),
    (_ics_summary(acc=(0.9, 0.90, 0.80)), "noisy-bn-trains-like-bn", "fails", -0.10),
    (_ics_summary(acc=(0.9, 0.90, math.nan)), "noisy-bn-trains-like-bn", "inconclusive", math.nan),
    # noisy-bn-less-stable: noisy >= unstable_ratio x BN and >= plain (value: noisy / BN)
    (_ics_summary(ins=(0.05, 0.01, 0.10)), "noisy-bn-less-stable", "holds", 10.0),
    (_ics_summary(ins=(0.05, 0.10, 0.10)), "noisy-bn-less-stable", "fails", 1.0),
    (_ics_summary(ins=(0.05, 0.10, 0.15)), "noisy-bn-less-stable", "inconclusive", 1.5),   # above BN, not 2x
    (_ics_summary(ins=(0.50, 0.01, 0.10)), "noisy-bn-less-stable", "inconclusive", 10.0),  # below the plain net
    (_ics_summary(ins=(math.nan, 0.01, 0.10)), "noisy-bn-less-stable", "inconclusive", 10.0),
    (_ics_summary(ins=(0.05, 0.0, 0.10)), "noisy-bn-less-stable", "holds", math.inf),
    # bn-ics-not-lower: BN >= ics_tol x plain (value: BN / plain)
    (_ics_summary(rel=(0.2, 0.3)), "bn-ics-not-lower", "holds", 1.5),
    (_ics_summary(rel=(0.25, 0.2)), "bn-ics-not-lower", "holds", 0.8),    # at the threshold
    (_ics_summary(rel=(0.2, 0.1)), "bn-ics-not-lower", "fails", 0.5),
    (_ics_summary(rel=(0.0, 0.1)), "bn-ics-not-lower", "inconclusive", math.nan),
    (_ics_summary(rel=(0.2, 0.3), diverged=True), "bn-ics-not-lower", "inconclusive", 1.5),
])
def test_ics_judge_table(summary, claim, status, value):
    got = _judged("ics", summary, IcsThresholds())
    assert list(got) == [c.id for c in EXPERIMENTS["ics"].claims]
    assert got[claim][0] == status
    assert got[claim][1] == pytest.approx(value, nan_ok=True)


def test_ics_thresholds_re_decide_without_training():
    s = _ics_summary(acc=(0.9, 0.9, 0.8), ins=(0.05, 0.1, 0.15), rel=(0.2, 0.1))
    assert [v[0] for v in _judged("ics", s, IcsThresholds()).values()] == ["fails", "inconclusive", "fails"]
    th = IcsThresholds(acc_tol=0.15, unstable_ratio=1.4, ics_tol=0.5)
    assert [v[0] for v in _judged("ics", s, th).values()] == ["holds", "holds", "holds"]


# ----------------------------------------------------------------------------- both
@pytest.mark.parametrize("name", ["landscape", "ics"])
def test_judging_the_stored_summary_again_gives_the_stored_verdicts(tiny_runs, name):
    run, _, _ = _run(tiny_runs, name)
    exp = EXPERIMENTS[name]
    stored = run.read_json("verdicts.json")
    again = exp.judge(run.read_json("summary.json"), exp.registered_thresholds("tiny"))
    assert [(v.claim, v.status) for v in again] == [(v["id"], v["status"]) for v in stored["verdicts"]]
    assert all(v.rule for v in again)
    assert stored["thresholds"] == dataclasses.asdict(exp.registered_thresholds("tiny"))


def test_rejudge_with_a_changed_threshold_needs_no_training(tiny_runs, tmp_path):
    copy = tmp_path / "runs" / "landscape"
    shutil.copytree(tiny_runs[1]["landscape"].path, copy / tiny_runs[1]["landscape"].path.name)
    _, rows = rejudge(tmp_path / "runs", ["landscape.ratio_min=0.1", "landscape.fail_ratio=0.1"], build_report=False)
    summary = tiny_runs[1]["landscape"].read_json("summary.json")
    for row in rows:
        q = summary["ratios"][QUANTITIES[row["id"]][0]]
        assert row["status"] == STATUS[ratio_verdict(q["early_ratio"], q["late_ratio"], 0.1, 1.0, 0.1)]
        assert "≥ 0.1" in row["rule"]


@pytest.mark.parametrize("name", ["landscape", "ics"])
def test_figures_are_redrawn_from_the_stored_metrics_alone(tiny_runs, tmp_path, name):
    run, _, _ = _run(tiny_runs, name)
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    shutil.rmtree(copy / "figures")
    paths = EXPERIMENTS[name].figures(RunDir(copy))
    assert sorted(p.name for p in paths) == sorted(p.name for p in (run.path / "figures").glob("*.png"))
    assert all(p.stat().st_size > 5000 for p in paths)
