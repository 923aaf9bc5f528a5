"""The ``toy`` experiment: the tiny run's numbers, its figures, and a table test of the judge."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import bnlab.experiments.toy as toy_exp  # registers ``toy`` (also imported by bnlab.experiments once listed there)
from bnlab.errors import UserError
from bnlab.experiments import EXPERIMENTS, as_dict, from_dict, judge_record, resolve, resolve_config, run_experiment
from bnlab.experiments.base import PROFILES, field_docs, field_types

TH = toy_exp.Thresholds()
EXP = EXPERIMENTS["toy"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-tiny")
    run, reused = run_experiment("toy", profile="tiny", out=out, device="cpu", progress=False)
    assert not reused
    return run


def _verdicts(run):
    return {v["id"]: v for v in run.read_json("verdicts.json")["verdicts"]}


def test_registered_with_profiles_and_documented_fields():
    assert isinstance(EXP, toy_exp.Toy) and [c.id for c in EXP.claims] == ["T1", "T2", "T3"]
    assert [c.ref for c in EXP.claims] == ["T1", "T2", "T3"]  # the rows of CLAIMS.md
    assert set(EXP.profiles) == set(PROFILES) and EXP.profiles["quick"] == toy_exp.Config()
    assert EXP.profiles["tiny"].steps >= TH.agreement_min_steps  # the tiny run is long enough to judge T3
    for cls in (toy_exp.Config, toy_exp.Thresholds):
        assert not set(field_types(cls)) - set(field_docs(cls))  # every field documented in place
    for p in PROFILES:
        assert from_dict(toy_exp.Config, as_dict(EXP.profiles[p])) == EXP.profiles[p]  # survives JSON
    # the CLI flags of `bnlab toy` map onto these settings
    cfg, th = resolve("toy", "quick", ["steps=60", "lr=0.5", "weight_decay=0.01", "momentum=0.5", "dtype=float32",
                                       "deviation_tol=1e-7"])
    assert (cfg.steps, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.dtype) == (60, 0.5, 0.01, 0.5, "float32")
    assert th.deviation_tol == 1e-7
    assert resolve_config("toy", "quick", ["deviation_tol=1e-7"]) == resolve_config("toy", "quick")  # not hashed


@pytest.mark.parametrize("bad", ["dtype=float16", "steps=0", "frames=100", "w0=(0.0, 0.0)", "steps=5000",
                                 "weight_decay=2.0", "grad_radii=(0.0,)", "dpi=1"])
def test_bad_settings_are_user_errors_before_any_run(bad, tmp_path):
    with pytest.raises(UserError):
        run_experiment("toy", profile="tiny", out=tmp_path, overrides=[bad], device="cpu", progress=False)
    assert not any(tmp_path.iterdir())


def test_tiny_verdicts_hold_with_the_expected_numbers(tiny_run):
    v = _verdicts(tiny_run)
    assert [x["status"] for x in v.values()] == ["holds"] * 3
    assert v["T1"]["value"] < 1e-13
    assert v["T2"]["value"] == pytest.approx(0.8304696627964465, abs=1e-12)  # stalled in the local minimum
    assert v["T3"]["value"] <= 1e-9  # float64 agrees to round-off
    assert "departs (> 1e-06) at step 32" in v["T3"]["detail"]
    assert all(x["rule"] for x in v.values())


def test_tiny_summary_metrics_and_arrays_agree(tiny_run):
    s = tiny_run.read_json("summary.json")
    cfg = tiny_run.read_json("config.json")["config"]
    steps = cfg["steps"]
    assert s["steps"] == steps and len(s["loss_wd"]) == steps + 1
    assert all(len(s["deviation"][k]) == steps + 1 for k in ("float32", "float64"))
    assert s["gradient"]["points"] == len(cfg["grad_radii"]) * cfg["grad_angles"]
    assert s["wd_leaves_start_basin_at"] == 39 and s["no_wd_last_angular_step"] < 1e-12
    assert s["final_loss"]["wd"] < s["final_loss"]["no_wd"]
    assert s["final_loss"]["exp_lr"] == pytest.approx(s["final_loss"]["wd"], abs=1e-9)
    assert s["global_min_loss"] <= s["wd_min_loss"] + 0.05
    assert s["max_deviation_without_buffer_preset"] is None  # no momentum
    a = tiny_run.load_arrays("toy.npz")
    np.testing.assert_array_equal(a["dev_float32"], s["deviation"]["float32"])
    assert a["wd"].shape == (steps + 1, 2)
    recs = tiny_run.metrics()
    assert [r["step"] for r in recs] == list(range(steps + 1))
    assert recs[-1]["loss_wd"] == pytest.approx(s["final_loss"]["wd"])


def test_tiny_figures_are_drawn_from_the_run_directory(tiny_run):
    names = sorted(p.name for p in (tiny_run.path / "figures").iterdir())
    assert names == ["toy_deviation.png", "toy_surface.png", "toy_trajectories.png", "toy_zoom.gif"]
    assert all((tiny_run.path / "figures" / n).stat().st_size > 5000 for n in names)
    for p in tiny_run.path.joinpath("figures").iterdir():
        p.unlink()
    paths = EXP.figures(tiny_run)
    assert sorted(p.name for p in paths) == names and all(p.exists() for p in paths)


def test_judge_again_from_the_stored_summary(tiny_run):
    stored = tiny_run.read_json("verdicts.json")
    assert stored["thresholds"] == as_dict(TH) and stored["departures"] == {}
    s = json.loads((tiny_run.path / "summary.json").read_text())
    again = judge_record(EXP, "tiny", json.loads(json.dumps(s)), TH)
    assert json.dumps(again, sort_keys=True) == json.dumps(stored, sort_keys=True)
    assert [v.status for v in EXP.judge(s, TH)] == ["holds"] * 3
    strict = dataclasses.replace(TH, float64_tol=1e-13, grad_tol=1e-17)
    got = {v.claim: v for v in EXP.judge(s, strict)}
    assert got["T1"].status == "fails" and got["T3"].status == "fails"
    assert "1e-13" in got["T3"].rule
    assert EXP.judge(s, dataclasses.replace(TH, agreement_min_steps=1000))[2].status == "inconclusive"


# ----------------------------------------------------------------------------- judge table (plain dicts)


def _summary(**changes) -> dict:
    """A summary shaped like a quick run's, where every claim holds."""
    steps = 400
    d64 = [0.0] + [2e-16] * 30 + [1e-14, 1e-13, 1e-12, 5e-12] + [1e-13] * (steps - 34)
    d32 = [0.0] + [5e-8] * 30 + [1e-6, 1e-5, 1e-4, 8e-4] + [1e-5] * (steps - 34)
    s = {
        "steps": steps, "lr": 1.0, "weight_decay": 0.02, "momentum": 0.0, "dtype": "float64", "w0": [-0.7, 0.7],
        "alpha": 0.98,
        "gradient": {"points": 448, "orthogonality": 1e-16, "scaling": 2e-14, "analytic_gap": 3e-15,
                     "radii": [1e-3, 1e3], "angles": 64, "scales": [1e-3, 0.5, 7.0, 1e4]},
        "start_loss": 1.38, "start_basin_min_loss": 0.83, "global_min_loss": 0.51,
        "loss_wd": [1.3] * 41 + [0.52] * (steps - 40),
        "no_wd_min_loss": 0.83, "no_wd_final_loss": 0.83, "no_wd_last_angular_step": 1e-16, "no_wd_final_norm": 1.31,
        "wd_min_loss": 0.514, "wd_leaves_start_basin_at": 39,
        "final_loss": {"no_wd": 0.83, "wd": 0.52, "exp_lr": 0.52}, "final_norm": {"no_wd": 1.3, "wd": 0.5, "exp_lr": 1e3},
        "deviation": {"float64": d64, "float32": d32},
        "max_deviation_without_buffer_preset": None,
    }
    for key, value in changes.items():
        if key in ("orthogonality", "scaling", "points"):
            s["gradient"] = {**s["gradient"], key: value}
        elif key in ("float64", "float32"):
            s["deviation"] = {**s["deviation"], key: value}
        else:
            s[key] = value
    return s


_NAN = float("nan")
_CASES = [
    # claim, changes, expected status
    ("T1", {}, "holds"),
    ("T1", {"orthogonality": 1e-3}, "fails"),
    ("T1", {"scaling": 1e-9}, "fails"),
    ("T1", {"scaling": _NAN}, "inconclusive"),
    ("T1", {"points": 0}, "inconclusive"),
    ("T2", {}, "holds"),
    ("T2", {"no_wd_min_loss": 0.6}, "fails"),  # the plain run escaped as well
    ("T2", {"no_wd_last_angular_step": 1e-2}, "fails"),  # still moving: not stalled
    ("T2", {"loss_wd": [1.3] * 401}, "fails"),  # the WD run never escaped: "with WD it escapes" is refuted
    ("T2", {"loss_wd": [1.3] * 200 + [0.52] * 201}, "inconclusive"),  # escaped at 200: 400 steps < 3 × 200
    ("T3", {}, "holds"),
    ("T3", {"float64": [0.0] + [1e-3] * 400}, "fails"),  # float64 deviates too: an error, not round-off
    ("T3", {"float32": [0.0] + [1e-3] * 400}, "fails"),  # a systematic offset from the first step
    ("T3", {"float32": [0.0] + [5e-8] * 30 + [2e-6] * 370}, "fails"),  # departs but hardly amplified (×40)
    ("T3", {"float64": [0.0] + [_NAN] * 400}, "fails"),  # undefined angles are not agreement
    ("T3", {"float32": [0.0] + [5e-8] * 400}, "inconclusive"),  # no drift to explain
    ("T3", {"steps": 100, "float64": [0.0] * 101, "float32": [0.0] + [1e-4] * 100}, "inconclusive"),  # too short
]


def test_every_claim_has_a_holds_a_fails_and_an_inconclusive_row():
    seen = {c: {e for k, _, e in _CASES if k == c} for c in ("T1", "T2", "T3")}
    assert all(v == {"holds", "fails", "inconclusive"} for v in seen.values()), seen


@pytest.mark.parametrize("claim,changes,expected", _CASES)
def test_judge_table(claim, changes, expected):
    got = {v.claim: v for v in EXP.judge(_summary(**changes), TH)}
    assert list(got) == ["T1", "T2", "T3"]
    v = got[claim]
    assert v.status == expected, v.detail
    assert v.detail and v.rule
    json.dumps(v.value)  # plain numbers (or None)


def test_judge_rules_spell_out_the_numbers():
    t1, t2, t3 = EXP.judge(_summary(), TH)
    assert "≤ 1e-12" in t1.rule
    assert "0.73" in t2.rule and "3·t" in t2.rule and "0.0001" in t2.rule
    assert "150 steps" in t3.rule and "1e-09" in t3.rule and "100 ×" in t3.rule
    assert "at step 32" in t3.detail and math.isclose(t3.value, 5e-12)
    assert "from step 41" in t2.detail
