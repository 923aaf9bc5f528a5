"""``exp-lr`` at the tiny profile: the numbers behind its verdicts are what the theory says."""

from __future__ import annotations

import math
import shutil

import copy
import json

import numpy as np
import pytest

from bnlab.experiments import EXPERIMENTS, rejudge, run_experiment, verdict_rows
from bnlab.experiments.exp_lr import Thresholds, decay_phases
from bnlab.runs import RunDir
from bnlab.schedules import step_decay_lr, texp_lr, wd_equivalent_alpha, wd_equivalent_lr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp-lr-tiny")
    run, _ = run_experiment("exp-lr", profile="tiny", out=out, device="cpu", progress=False)
    cfg = run.read_json("config.json")["config"]
    with np.load(run.path / "series.npz", allow_pickle=False) as f:
        series = {k: f[k] for k in f.files}
    return run, cfg, run.read_json("summary.json"), series


def _verdicts(run):
    return {v["id"]: v for v in verdict_rows(run)}


def test_float64_weight_decay_and_explr_agree_in_direction_at_every_step(tiny_run):
    _, cfg, summary, S = tiny_run
    angle = S["A.pair.exact.angle"]
    assert len(angle) == cfg["equiv_steps"] + 1 and np.isfinite(angle).all()
    assert angle.max() <= 1e-9  # round-off only (the claim's tolerance is 1e-6)
    assert S["A.pair.exact.per"].max() <= 1e-9
    assert np.nanmax(S["A.pair.exact.outdiff"]) <= 1e-9  # the same function on the fixed batch
    assert summary["equivalence"]["pairs"]["exact"]["max_angle"] == pytest.approx(float(angle.max()))
    assert summary["joint_invariance_error"] <= 1e-12


def test_explr_weights_are_the_weight_decay_weights_times_alpha_to_the_minus_t(tiny_run):
    _, cfg, _, S = tiny_run
    alpha = wd_equivalent_alpha(lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=cfg["momentum"])
    t = np.arange(cfg["equiv_steps"] + 1)
    ratio = S["A.arm.exp.norm"] / S["A.arm.wd.norm"]
    np.testing.assert_allclose(ratio, alpha ** (-t.astype(float)), rtol=1e-10)


def test_without_the_buffer_mapping_the_runs_separate(tiny_run):
    run, _, summary, S = tiny_run
    pairs = summary["equivalence"]["pairs"]
    assert pairs["ablation"]["max_angle"] > 1e-6
    assert pairs["ablation"]["max_angle"] > 1e6 * pairs["exact"]["max_angle"]
    assert S["A.pair.ablation.angle"][1] > 1e-6  # from the first step on
    assert _verdicts(run)["buffer-mapping-needed"]["status"] == "holds"


def test_texp_follows_step_decay_with_weight_decay(tiny_run):
    _, _, summary, S = tiny_run
    assert S["A.pair.texp.angle"].max() <= 1e-9
    assert summary["equivalence"]["pairs"]["texp"]["max_angle"] <= 1e-9


def test_stored_lr_series_are_the_schedules_recomputed(tiny_run):
    _, cfg, _, S = tiny_run
    T = cfg["equiv_steps"]
    kw = dict(weight_decay=cfg["weight_decay"], momentum=cfg["momentum"])
    phases = decay_phases(cfg["lr"], cfg["decay_at"], cfg["decay_factor"], T)
    assert len(phases) == 3 and phases[1][0] == T // 2
    for t in range(T):
        assert S["A.arm.exp.lr"][t] == wd_equivalent_lr(t, lr=cfg["lr"], **kw)
        assert S["A.arm.texp.lr"][t] == texp_lr(t, lr_phases=phases, **kw)
        assert S["A.arm.sd.lr"][t] == step_decay_lr(t, lr_phases=phases)
        assert S["A.arm.wd.lr"][t] == cfg["lr"]
        # what the optimizer used is the un-rescaled LR / 4^k (k = 0 unless renormalized)
        k = S["A.arm.exp.log2_scale"][t]
        assert S["A.arm.exp.opt_lr"][t] * 4.0**k == S["A.arm.exp.lr"][t]


def test_approximate_settings_are_measured_and_float32_drifts(tiny_run):
    _, _, summary, _ = tiny_run
    pairs = summary["equivalence"]["pairs"]
    exact = pairs["exact"]["max_angle"]
    # BN's eps and the trainable non-scale-invariant parameters break the exact map: clearly larger angles
    assert pairs["bn_eps"]["max_angle"] > 100 * exact
    assert pairs["standard"]["max_angle"] > 100 * exact
    assert pairs["float32"]["max_angle"] > 100 * exact
    assert summary["standard_net_invariance_error"] > 1e-3  # the standard net is not scale-invariant


def test_renormalization_keeps_float32_finite_where_the_plain_run_overflows(tiny_run):
    run, cfg, summary, S = tiny_run
    ov = summary["overflow"]
    assert ov["renorm"]["finite_steps"] == cfg["overflow_steps"] and ov["renorm"]["forward_overflow_at"] is None
    assert ov["renorm"]["renormalizations"] > 0
    assert ov["plain"]["overflow_at"] is not None and ov["plain"]["overflow_at"] < cfg["overflow_steps"]
    # bit for bit the same run (times 2^k) until the plain run's BN variance overflows
    assert ov["first_mismatch_step"] is None or ov["first_mismatch_step"] >= ov["plain"]["forward_overflow_at"]
    assert np.isfinite(S["C.renorm.log2_norm"]).all()
    assert np.nanmax(np.abs(S["C.renorm.log2_norm"] - S["C.renorm.log2_norm"][0])) <= math.log2(cfg["renorm_bound"]) + 1
    # tiny runs fewer steps than the claim needs: not judged
    assert _verdicts(run)["rescaling-prevents-overflow"]["status"] == "inconclusive"
    assert _verdicts(run)["directions-agree"]["status"] == "inconclusive"


def test_figures_are_redrawn_from_the_run_dir_alone(tiny_run, tmp_path):
    run, _, _, _ = tiny_run
    copy = RunDir(shutil.copytree(run.path, tmp_path / "copy"))
    shutil.rmtree(copy.path / "figures")
    paths = EXPERIMENTS["exp-lr"].figures(copy)
    assert {p.name for p in paths} == {
        "learning_curves.png", "angle_between_runs.png", "weight_norm.png", "lr_schedules.png", "standard_net.png",
        "float32_overflow.png",
    }
    assert all(p.exists() and p.stat().st_size > 5000 for p in paths)


def test_judging_again_with_the_steps_the_tiny_run_has_decides_without_training(tiny_run, tmp_path):
    run, _, summary, _ = tiny_run
    exp = EXPERIMENTS["exp-lr"]
    # the judge is a pure function of the stored summary: the stored verdicts come back
    stored = {v["id"]: (v["status"], v["value"]) for v in verdict_rows(run)}
    assert {v.claim: (v.status, v.value) for v in exp.judge(summary, Thresholds())} == stored
    runs = tmp_path / "runs"
    shutil.copytree(run.path, runs / "exp-lr" / run.path.name)
    _, rows = rejudge(runs, ["required_equiv_steps=24", "exp-lr.required_overflow_steps=2000"], build_report=False)
    got = {r["id"]: r for r in rows}
    assert got["directions-agree"]["status"] == "holds" and got["directions-agree"]["value"] == stored["directions-agree"][1]
    assert got["rescaling-prevents-overflow"]["status"] == "holds"
    assert "≥ 2000 steps" in got["rescaling-prevents-overflow"]["rule"]


# ----------------------------------------------------------------------------- the judge, on plain summaries


def _pair(angle: list, **extra) -> dict:
    return {"steps": len(angle) - 1, "angle": angle, "max_angle": max(angle), "max_output_diff": 1e-12,
            "max_angle_per_param": {"features.0.weight": max(angle)}, "angle_at": {"1": angle[1], "10": angle[10]},
            **extra}


def _summary() -> dict:
    """A summary where every claim holds (numbers like the quick profile's)."""
    def arms(accs):
        return {str(i): {"diverged_at": None, "test_acc": a} for i, a in enumerate(accs)}

    accs = {"wd": [0.98, 0.97, 0.975], "exp": [0.975, 0.97, 0.98], "sd": [0.98, 0.98, 0.97], "texp": [0.98, 0.98, 0.975]}
    return {
        "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "exact_bn_eps": 1e-30,
        "equivalence": {"steps": 1000, "diverged": {}, "pairs": {
            "exact": _pair([0.0] + [1e-13] * 1000, max_eval_mode_output_diff=0.2),
            "ablation": _pair([0.0] + [1e-5] * 9 + [0.05] * 991),
            "texp": _pair([0.0] + [2e-13] * 1000),
            "float32": _pair([0.0] + [1e-7] * 50 + [2e-6] * 250),
        }},
        "accuracy": {"steps": 400, "seeds": [0, 1, 2], "arms": {n: arms(a) for n, a in accs.items()},
                     "test_acc_stats": {n: {"mean": float(np.mean(a)), "spread": max(a) - min(a)} for n, a in accs.items()}},
        "overflow": {"steps": 100_000, "weight_decay": 5e-3, "alpha": 0.995,
                     "renorm": {"nonfinite_at": None, "forward_overflow_at": None, "renormalizations": 30,
                                "log2_scale": 300, "final_log2_unrescaled_lr": 1400.0},
                     "plain": {"forward_overflow_at": 8213, "lr_over_float32_at": 8500, "nonfinite_at": 8600,
                               "how": "lr", "overflow_at": 8213},
                     "bit_identical_steps": 8213, "compared_steps": 8213, "first_mismatch_step": None},
    }


def _set(s: dict, path: str, value) -> dict:
    s = copy.deepcopy(s)
    *keys, last = path.split(".")
    d = s
    for k in keys:
        d = d[k]
    d[last] = value
    return s


_HOLDS = _summary()
_TABLE = [
    # (summary, thresholds, {claim: expected status}, {claim: expected value})
    (_HOLDS, Thresholds(),
     {"directions-agree": "holds", "buffer-mapping-needed": "holds", "accuracy-matches": "holds",
      "rescaling-prevents-overflow": "holds"},
     {"directions-agree": 1e-13, "buffer-mapping-needed": 0.05, "rescaling-prevents-overflow": 8213}),
    # fails: the directions part, the ablation agrees too, ExpLR loses 20 points, the renormalized run overflows
    (_set(_set(_set(_set(_HOLDS, "equivalence.pairs.exact", _pair([0.0] + [1e-3] * 1000)),
                    "equivalence.pairs.ablation", _pair([0.0] + [1e-9] * 1000)),
               "accuracy.test_acc_stats.exp", {"mean": 0.77, "spread": 0.01}),
          "overflow.renorm.nonfinite_at", 50_000), Thresholds(),
     {"directions-agree": "fails", "buffer-mapping-needed": "fails", "accuracy-matches": "fails",
      "rescaling-prevents-overflow": "fails"},
     {"directions-agree": 1e-3, "buffer-mapping-needed": 1e-9}),
    # a diverged run fails both the direction and the accuracy claims
    (_set(_set(_HOLDS, "equivalence.diverged", {"exp": 17}), "accuracy.arms.texp.1.diverged_at", 12), Thresholds(),
     {"directions-agree": "fails", "accuracy-matches": "fails"}, {}),
    # inconclusive: too few steps, accuracies missing, the plain run does not overflow
    (_set(_set(_set(_HOLDS, "equivalence.steps", 24), "accuracy.test_acc_stats.texp.mean", float("nan")),
          "overflow.plain.overflow_at", None), Thresholds(),
     {"directions-agree": "inconclusive", "buffer-mapping-needed": "holds", "accuracy-matches": "inconclusive",
      "rescaling-prevents-overflow": "inconclusive"}, {"rescaling-prevents-overflow": None}),
    (_set(_HOLDS, "overflow.steps", 2000), Thresholds(),
     {"rescaling-prevents-overflow": "inconclusive"}, {"rescaling-prevents-overflow": 8213}),
    # the thresholds decide: the max angle is taken over the first required_equiv_steps steps only
    (_set(_HOLDS, "equivalence.pairs.exact", _pair([0.0] + [1e-13] * 500 + [1e-3] * 500)), Thresholds(),
     {"directions-agree": "fails"}, {"directions-agree": 1e-3}),
    (_set(_HOLDS, "equivalence.pairs.exact", _pair([0.0] + [1e-13] * 500 + [1e-3] * 500)),
     Thresholds(required_equiv_steps=400), {"directions-agree": "holds"}, {"directions-agree": 1e-13}),
    (_HOLDS, Thresholds(equiv_tol=1e-14), {"directions-agree": "fails", "buffer-mapping-needed": "holds"}, {}),
    # accuracy: the tolerance is max(acc_tol, the baselines' seed range)
    (_set(_HOLDS, "accuracy.test_acc_stats.exp", {"mean": 0.95, "spread": 0.01}), Thresholds(),
     {"accuracy-matches": "fails"}, {}),
    (_set(_set(_HOLDS, "accuracy.test_acc_stats.exp", {"mean": 0.95, "spread": 0.01}),
          "accuracy.test_acc_stats.wd.spread", 0.05), Thresholds(), {"accuracy-matches": "holds"}, {}),
    (_set(_HOLDS, "accuracy.test_acc_stats.exp", {"mean": 0.95, "spread": 0.01}), Thresholds(acc_tol=0.05),
     {"accuracy-matches": "holds"}, {}),
]


@pytest.mark.parametrize("summary,th,statuses,values", _TABLE)
def test_judge_table(summary, th, statuses, values):
    got = {v.claim: v for v in EXPERIMENTS["exp-lr"].judge(json.loads(json.dumps(summary)), th)}
    assert list(got) == [c.id for c in EXPERIMENTS["exp-lr"].claims]
    assert {k: got[k].status for k in statuses} == statuses
    for k, v in values.items():
        assert got[k].value == (pytest.approx(v) if v is not None else None)
    assert all(v.rule and v.detail for v in got.values())
