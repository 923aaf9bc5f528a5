"""Sanity of the stored numbers of the tiny ``landscape`` and ``ics`` runs (Santurkar et al. 2018)."""

import math
import shutil

import numpy as np
import pytest

from bnlab.experiments import EXPERIMENTS, resolve_config
from bnlab.experiments.ics import NORMS, QUANTILES, ics_summary, instability
from bnlab.experiments.landscape import ARMS, arm_records, quantity, ratio_verdict, window_ratio
from bnlab.runs import RunDir


def _run(out, name):
    run = RunDir.find_complete(out, name, resolve_config(name, "tiny"))
    assert run is not None
    return run, run.read_json("config.json")["config"], run.metrics()


def test_landscape_tiny_numbers_are_consistent(tiny_reproduce):
    run, cfg, recs = _run(tiny_reproduce[0], "landscape")
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
    verdicts = {v["id"]: v for v in run.read_json("verdicts.json")}
    for claim, qname in (("loss-band-smaller", "loss_band"), ("gradient-band-smaller", "grad_band"), ("beta-smaller", "beta")):
        sb, vb = quantity(arm_records(recs, "bn@lr"), qname)
        sp, vp = quantity(arm_records(recs, "none@lr"), qname)
        early = window_ratio(sp, vp, sb, vb, 0, cfg["window"] * cfg["steps"])[0]
        late = window_ratio(sp, vp, sb, vb, (1 - cfg["window"]) * cfg["steps"], math.inf)[0]
        assert summary["ratios"][qname]["early_ratio"] == pytest.approx(early, nan_ok=True)
        ok = ratio_verdict(early, late, cfg["ratio_min"])
        assert verdicts[claim]["status"] == {True: "holds", False: "fails", None: "inconclusive"}[ok]


def test_window_ratio_and_verdict_rule():
    s = np.arange(0, 100, 10)
    a, b = np.full(10, 6.0), np.full(10, 2.0)
    assert window_ratio(s, a, s, b, 0, 30) == (3.0, 6.0, 2.0, 3)
    assert math.isnan(window_ratio(s, a, s, b, 200, 300)[0])
    assert ratio_verdict(3.0, 1.2, 2.0) is True
    assert ratio_verdict(0.9, 5.0, 2.0) is False
    assert ratio_verdict(1.5, 5.0, 2.0) is None and ratio_verdict(3.0, 0.8, 2.0) is None


def test_ics_tiny_numbers_are_consistent(tiny_reproduce):
    run, cfg, recs = _run(tiny_reproduce[0], "ics")
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
        assert summary["instability"][norm] == pytest.approx(instability(steps)[0])
        assert summary["ics"][norm]["rel"] == pytest.approx(ics_summary(steps)["rel"])
    # BN's output channel has mean β and std γ on every batch: far steadier than noisy BN's
    assert summary["instability"]["bn-noisy"] > summary["instability"]["bn"]
    assert summary["arms"]["bn"]["act_layer"] == "features.5"


@pytest.mark.parametrize("name", ["landscape", "ics"])
def test_figures_are_redrawn_from_the_stored_metrics_alone(tiny_reproduce, tmp_path, name):
    run, _, _ = _run(tiny_reproduce[0], name)
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    shutil.rmtree(copy / "figures")
    paths = EXPERIMENTS[name].figures(RunDir(copy))
    assert sorted(p.name for p in paths) == sorted(p.name for p in (run.path / "figures").glob("*.png"))
    assert all(p.stat().st_size > 5000 for p in paths)
