"""``bn-theory`` (S8–S11): the judge on hand-made summaries (holds / fails / inconclusive per claim),
and a tiny run whose measured identities hold to round-off."""

import copy
import json
import math

import numpy as np
import pytest

from bnlab.experiments import EXPERIMENTS, run_experiment
from bnlab.experiments.bn_theory import Thresholds

EXP = EXPERIMENTS["bn-theory"]
CLAIMS = [c.id for c in EXP.claims]


def _stats(mean, n=6):
    return {"n": n, "mean": mean, "median": mean, "min": mean / 2, "max": mean * 2}


def _arm(distance, acc=0.99, diverged=False):
    return {"train_acc": acc, "test_acc": acc - 0.02, "diverged": diverged, "euclid": distance * 1.2,
            "ray": distance * 0.9, "angle": 30.0, "distance": distance}


def _seed(seed, d_bn=0.6, d_plain=0.9, acc_bn=0.99, acc_plain=0.99, residual=1e-16):
    return {"seed": seed, "per_channel": ["features.0.weight"], "bn": _arm(d_bn, acc_bn), "plain": _arm(d_plain, acc_plain),
            "lemma": {"bound": 1.0, "line": 1.0, "c": 0.8, "premise": 1.0, "residual": residual, "dist_sq": 2.0}}


def _summary(**kw):
    s = {
        "layers": ["features.1", "features.5"], "steps": [0, 10, 19], "final": {}, "n_points": 6,
        "thm41": {"worst_gap_eps0": 3e-15, "worst_gap_eps": 4e-15, "reduction": _stats(0.7), "scale": _stats(0.72),
                  "share_mean": _stats(0.01), "share_dir": _stats(0.02), "per_layer_reduction": [0.7, 0.7]},
        "thm42": {"n_points": 6, "worst_gap_a": 1e-15, "worst_gap_a_eps": 2e-15, "condition_count": 4, "holds_b_count": 4,
                  "b_fails_under_condition": 0, "b_holds_without_condition": 0, "curv_in": _stats(0.01),
                  "curv_out": _stats(0.02)},
        "obs43": {"share": _stats(0.03), "per_layer_share": [0.01, 0.05]},
        "s11": [_seed(0), _seed(1), _seed(2)],
    }
    for path, value in kw.items():
        d = s
        keys = path.split("__")
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return s


def _judged(summary, th=Thresholds()):
    summary = json.loads(json.dumps(summary))  # as re-read from summary.json
    return {v.claim: v for v in EXP.judge(summary, th)}


NAN = math.nan


@pytest.mark.parametrize("kw, claim, status", [
    ({}, "thm41-identity", "holds"),
    ({"thm41__worst_gap_eps0": 2e-6}, "thm41-identity", "fails"),
    ({"thm41__worst_gap_eps": 3e-5}, "thm41-identity", "fails"),               # the ε-corrected form is off
    ({"n_points": 0, "thm41__worst_gap_eps0": NAN}, "thm41-identity", "inconclusive"),
    ({}, "thm42a-identity", "holds"),
    ({"thm42__worst_gap_a": 1e-3}, "thm42a-identity", "fails"),
    ({"thm42__n_points": 0, "thm42__worst_gap_a": NAN}, "thm42a-identity", "inconclusive"),
    ({}, "thm42b-under-condition", "holds"),
    ({"thm42__b_fails_under_condition": 1, "thm42__holds_b_count": 3}, "thm42b-under-condition", "fails"),
    ({"thm42__condition_count": 0, "thm42__holds_b_count": 0}, "thm42b-under-condition", "inconclusive"),
    ({}, "obs43-projection-share", "holds"),
    ({"obs43__share": _stats(0.004)}, "obs43-projection-share", "fails"),
    ({"obs43__share": _stats(NAN, n=0)}, "obs43-projection-share", "inconclusive"),
    ({}, "lemma45-identity", "holds"),
    ({"s11": [_seed(0), _seed(1, residual=1e-3), _seed(2)]}, "lemma45-identity", "fails"),
    ({"s11": []}, "lemma45-identity", "inconclusive"),
    ({}, "bn-closer-to-solution", "holds"),
    ({"s11": [_seed(0), _seed(1, d_bn=1.0), _seed(2)]}, "bn-closer-to-solution", "fails"),        # one seed: BN farther
    ({"s11": [_seed(0), _seed(1)]}, "bn-closer-to-solution", "inconclusive"),                     # < 3 seeds
    ({"s11": [_seed(0), _seed(1, acc_plain=0.5), _seed(2)]}, "bn-closer-to-solution", "inconclusive"),  # not solved
])
def test_bn_theory_judge_table(kw, claim, status):
    got = _judged(_summary(**copy.deepcopy(kw)))
    assert list(got) == CLAIMS
    v = got[claim]
    assert v.status == status, v.detail
    assert v.rule and v.detail


def test_bn_theory_rules_print_their_numbers_and_refs():
    got = _judged(_summary())
    assert "1e-06" in got["thm41-identity"].rule and "0.01" in got["obs43-projection-share"].rule
    assert "3 seeds" in got["bn-closer-to-solution"].spread
    refs = {c.id: c.ref for c in EXP.claims}
    assert refs == {"thm41-identity": "S8", "thm42a-identity": "S9", "thm42b-under-condition": "S9",
                    "obs43-projection-share": "S10", "lemma45-identity": "S11", "bn-closer-to-solution": "S11"}
    tight = Thresholds(share_min=0.05)
    assert _judged(_summary(), tight)["obs43-projection-share"].status == "fails"


def test_bn_theory_tiny_run_measures_the_identities_to_round_off(tmp_path):
    run, _ = run_experiment("bn-theory", profile="tiny", out=tmp_path, progress=False)
    s = run.read_json("summary.json")
    assert s["layers"] == ["features.1", "features.5", "features.9"] and s["n_points"] == 9
    assert s["thm41"]["worst_gap_eps0"] <= 1e-12 and s["thm41"]["worst_gap_eps"] <= 1e-12
    assert s["thm42"]["worst_gap_a"] <= 1e-12 and s["thm42"]["worst_gap_a_eps"] <= 1e-12
    assert s["thm42"]["b_fails_under_condition"] == 0 and s["thm42"]["b_holds_without_condition"] == 0
    assert len(s["s11"]) == 3 and all(r["lemma"]["residual"] < 1e-12 for r in s["s11"])
    a = run.load_arrays("theory.npz")
    np.testing.assert_allclose(a["lhs41"], a["rhs41"], rtol=1e-10)
    v = {x["id"]: x["status"] for x in run.read_json("verdicts.json")["verdicts"]}
    assert v["thm41-identity"] == v["thm42a-identity"] == v["lemma45-identity"] == "holds"
    assert sorted(p.name for p in (run.path / "figures").glob("*.png")) == [
        "theory_lhs_rhs.png", "theory_reduction.png", "theory_s11_distances.png", "theory_shares.png"]
