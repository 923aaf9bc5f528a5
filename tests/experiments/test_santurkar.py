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
from bnlab.experiments.ics import arm_name as ics_arm
from bnlab.experiments.common import arm_records
from bnlab.experiments.landscape import CLAIM_KEYS, QUANTITIES, arm_name, probe_steps, quantity, seed_list
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
# (the judge's table tests are in test_landscape_judge.py)
def test_landscape_tiny_numbers_are_consistent(tiny_runs):
    run, cfg, recs = _run(tiny_runs, "landscape")
    seeds = seed_list(cfg)
    assert len(seeds) >= 2
    for seed in seeds:
        for norm in ["none"] + cfg["norms"]:
            steps = arm_records(recs, arm_name(norm, seed))
            assert steps, (norm, seed)
            probes = [r for r in steps if "landscape/beta" in r]
            assert [r["step"] for r in probes] == probe_steps(cfg)
            for r in probes:
                assert r["landscape/loss_min"] <= r["landscape/loss"] <= r["landscape/loss_max"]
                assert r["landscape/loss"] == pytest.approx(r["loss"], rel=1e-6)  # the step's own loss
                assert 0 <= r["landscape/grad_diff_min"] <= r["landscape/grad_diff_max"]
                assert r["landscape/s_max"] == pytest.approx(cfg["max_lr_multiple"] * cfg["lr"])
                # β_eff >= the top of the gradient band / (s_max ‖g‖)
                assert r["landscape/beta"] >= r["landscape/grad_diff_max"] / (r["landscape/s_max"] * r["landscape/grad_norm"]) * (1 - 1e-9)
            hess = [r for r in steps if "hess_top/lambda_max" in r]
            if seed != seeds[0] or norm not in ("none", "bn"):
                assert not hess
                continue
            assert [r["step"] for r in hess] == list(range(0, cfg["steps"], cfg["hessian_every"]))
            for r in hess:
                assert math.isfinite(r["hess_quad/gHg"]) and r["hess_top/n_hvp"] <= cfg["lanczos_iter"]
                assert r["hess_top/lambda_max"] >= r["hess_quad/gHg"] - 1e-3 * abs(r["hess_top/lambda_max"])  # λ_max bounds the Rayleigh quotient
    # the summary's ratios are the stored metrics' window medians, seed by seed
    summary = run.read_json("summary.json")
    T, w = cfg["steps"], cfg["window"]
    for norm in cfg["norms"]:
        for q in QUANTITIES:
            for i, seed in enumerate(seeds):
                sp, vp = quantity(arm_records(recs, arm_name("none", seed)), q, cfg["lr"])
                sn, vn = quantity(arm_records(recs, arm_name(norm, seed)), q, cfg["lr"])
                got = summary["ratios"][norm][q]
                assert got["early"][i] == pytest.approx(window_ratio(sp, vp, sn, vn, 0, w * T)[0], nan_ok=True)
                assert got["late"][i] == pytest.approx(window_ratio(sp, vp, sn, vn, (1 - w) * T, math.inf)[0], nan_ok=True)
        assert summary["test_acc"][norm] == [summary["arms"][arm_name(norm, s)]["test_acc"] for s in seeds]
    # η·β_eff is the arm's learning rate times β_eff
    s, b = series(arm_records(recs, arm_name("bn", seeds[0])), "landscape/beta")
    assert np.allclose(quantity(arm_records(recs, arm_name("bn", seeds[0])), "eta_beta", cfg["lr"])[1], cfg["lr"] * b)
    record = run.read_json("verdicts.json")
    assert [v["id"] for v in record["verdicts"]] == list(CLAIM_KEYS) + ["lp-trains-like-bn"]
    assert all(v["rule"] for v in record["verdicts"])


def test_window_ratio():
    s = np.arange(0, 100, 10)
    a, b = np.full(10, 6.0), np.full(10, 2.0)
    assert window_ratio(s, a, s, b, 0, 30) == (3.0, 6.0, 2.0, 3)
    assert math.isnan(window_ratio(s, a, s, b, 200, 300)[0])


# ----------------------------------------------------------------------------- ics
def _same_ics(stored: dict, recomputed: dict) -> None:
    assert set(stored) == set(recomputed)
    for layer, d in recomputed.items():
        assert stored[layer] == pytest.approx(d, nan_ok=True), layer


def test_ics_tiny_numbers_are_consistent(tiny_runs):
    run, cfg, recs = _run(tiny_runs, "ics")
    summary = run.read_json("summary.json")
    seeds = [cfg["seed"] + k for k in range(cfg["seeds"])]
    ics_seeds = [cfg["seed"] + k for k in range(cfg["ics_seeds"])]
    start = (1 - cfg["final_frac"]) * cfg["steps"]

    def check_acts(steps):
        acts = [r for r in steps if "act_q/0/q50" in r]
        assert [r["step"] for r in acts] == list(range(0, cfg["steps"], cfg["act_every"]))
        for r in acts:
            for c in range(cfg["width"] * 2):  # the second conv has 2 x width channels
                qs = [r[f"act_q/{c}/q{q * 100:g}"] for q in QUANTILES]
                assert qs == sorted(qs)
                assert r[f"act_q/{c}/std"] >= 0

    # (1) noisy BN at noisy_lr, every seed: the train-mode accuracy and the instability in the summary are the records'
    for norm in NORMS:
        for i, sd in enumerate(seeds):
            steps = arm_records(recs, ics_arm("noisy_lr", norm, sd))
            assert [r["step"] for r in steps if "loss" in r] == list(range(cfg["steps"]))
            accs = [r["train_mode/acc"] for r in steps if "train_mode/acc" in r]
            assert len(accs) == len(range(0, cfg["steps"], cfg["acc_every"])) and all(0 <= a <= 1 for a in accs)
            assert summary["noisy"]["train_mode_acc"][norm][i] == pytest.approx(tail_mean(*series(steps, "train_mode/acc"), start))
            if norm == "none":
                assert not any("act_q/0/mean" in r for r in steps) and math.isnan(summary["noisy"]["instability"][norm][i])
            else:
                check_acts(steps)
                assert summary["noisy"]["instability"][norm][i] == pytest.approx(activation_instability(steps))
    # (2) at lr: the plain and BN nets on every ICS seed (with the ICS), the others on the first stability_seeds
    stab = summary["stability"]
    assert set(stab) == set(NORMS) | set(cfg["lp_norms"])
    for norm, st in stab.items():
        assert st["seeds"] == (ics_seeds if norm in ("none", "bn") else ics_seeds[:cfg["stability_seeds"]])
        for sd, ins in zip(st["seeds"], st["instability"]):
            steps = arm_records(recs, ics_arm("lr", norm, sd))
            check_acts(steps)
            assert ins == pytest.approx(activation_instability(steps))
            ics = [r for r in steps if "ics/mean_rel" in r]
            if norm not in ("none", "bn"):
                assert not ics
                continue
            assert [r["step"] for r in ics] == list(range(0, cfg["steps"], cfg["ics_every"]))
            for r in ics:
                layers = [k[4:-3] for k in r if k.startswith("ics/") and k.endswith("/l2") and not k.startswith("ics/mean")]
                assert layers == ["features.4", "features.8", "classifier"]  # layers 2..4 of the convnet
                for layer in layers:
                    assert -1 - 1e-9 <= r[f"ics/{layer}/cos"] <= 1 + 1e-9
                    assert r[f"ics/{layer}/l2"] >= 0 and r[f"ics/{layer}/rel"] == pytest.approx(r[f"ics/{layer}/l2"] / r[f"ics/{layer}/g_norm"])
            i = st["seeds"].index(sd)
            _same_ics(summary["ics"]["convnet"][norm]["per_seed"][i], ics_summary(steps)["per_layer"])
            assert summary["ics"]["convnet"][norm]["layers"] == ["features.4", "features.8", "classifier"]
    # (3) the deep linear network: every layer from the second has an ICS
    for norm in ("none", "bn"):
        block = summary["ics"]["dln"][norm]
        assert len(block["layers"]) == cfg["dln_depth"] - 1 and block["layers"][-1] == "classifier"
        for i, sd in enumerate(ics_seeds):
            steps = arm_records(recs, ics_arm("dln", norm, sd))
            assert [r["step"] for r in steps if "ics/mean_l2" in r] == list(range(0, cfg["dln_steps"], cfg["dln_ics_every"]))
            _same_ics(block["per_seed"][i], ics_summary(steps)["per_layer"])
    # BN's output channel has mean β and std γ on every batch: far steadier than noisy BN's
    assert stab["bn-noisy"]["instability"][0] > stab["bn"]["instability"][0]
    assert summary["arms"][ics_arm("lr", "bn", cfg["seed"])]["act_layer"] == "features.5"
    # the stored verdicts are the judge's on the stored summary, one per claim, each with its CLAIMS.md id
    verdicts = run.read_json("verdicts.json")["verdicts"]
    assert [v["id"] for v in verdicts] == [c.id for c in EXPERIMENTS["ics"].claims]


def test_instability_pools_channels_and_skips_flat_ones():
    assert instability([[0.0, 1.0, 1.0], [5.0]], [[2.0, 2.0, 2.0], [1.0]]) == pytest.approx(0.25)
    assert math.isnan(instability([[1.0, 2.0]], [[0.0, 0.0]]))  # no spread: not measurable
    recs = [{"step": i, "act_q/0/mean": m, "act_q/0/std": 2.0} for i, m in enumerate([0.0, 1.0, 1.0])]
    assert activation_instability(recs) == pytest.approx(0.25)
    assert tail_mean([0, 5, 10], [0.2, 0.4, 0.6], 5) == pytest.approx(0.5) and math.isnan(tail_mean([], [], 0))


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
    exp = EXPERIMENTS["landscape"]
    th = dataclasses.replace(exp.registered_thresholds("tiny"), ratio_min=0.1, fail_ratio=0.1)
    again = exp.judge(tiny_runs[1]["landscape"].read_json("summary.json"), th)
    assert [(r["id"], r["status"]) for r in rows] == [(v.claim, v.status) for v in again]
    assert all("≥ 0.1" in r["rule"] for r in rows if r["id"] in CLAIM_KEYS)


@pytest.mark.parametrize("name", ["landscape", "ics"])
def test_figures_are_redrawn_from_the_stored_metrics_alone(tiny_runs, tmp_path, name):
    run, _, _ = _run(tiny_runs, name)
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    shutil.rmtree(copy / "figures")
    paths = EXPERIMENTS[name].figures(RunDir(copy))
    assert sorted(p.name for p in paths) == sorted(p.name for p in (run.path / "figures").glob("*.png"))
    assert all(p.stat().st_size > 5000 for p in paths)
