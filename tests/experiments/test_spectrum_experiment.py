"""``spectrum`` (G1-G2): the judge as a table of summaries (holds / fails / inconclusive per claim), and the tiny run,
whose step-0 numbers are recomputed independently from the initialization."""

import json
import math

import numpy as np
import pytest
import torch.nn.functional as F

from bnlab import data as data_mod
from bnlab.dataset_curvature import DatasetHessianOperator
from bnlab.experiments import EXPERIMENTS, run_experiment
from bnlab.experiments.common import make_net
from bnlab.experiments.spectrum import Config, Thresholds
from bnlab.probes.spectrum import population_statistics
from bnlab.spectrum import spectral_density

EXP = EXPERIMENTS["spectrum"]
CPS = (0, 50, 200)


def _o(ratio, n_far, share, spread=0.1):
    return {"top": ratio, "bulk_edge": 1.0, "top_to_edge": ratio, "outlier_mass": 0.01, "n_outliers": 30.0,
            "n_far": n_far, "ratio_spread": spread, "grad_share": share, "grad_share_outliers": share, "n_hvp": 150.0,
            "sigma": 0.01}


def _summary(none=None, bn=None, ev=None, drop=(), seeds=(0, 1, 2), per_seed=None):
    """Per variant a list of (ratio, n_far, share[, spread]) per checkpoint, the same in every seed; ``drop``: (variant,
    step[, seed]) not measured; ``per_seed``: {(variant, step, seed): row} overrides."""
    none = none or [(10, 5, 0.8), (60, 9, 0.95), (120, 15, 0.9)]
    bn = bn or [(2, 0, 0.3), (9, 1.6, 0.4), (15, 5, 0.6)]
    ev = ev or [(8, 3, 0.4), (34, 7, 0.6), (44, 8.7, 0.9)]
    runs = []
    for sd in seeds:
        outline = {v: {str(c): _o(*row) for c, row in zip(CPS, rows)} for v, rows in (("none", none), ("bn-train", bn), ("bn-eval", ev))}
        for (v, c, s), row in (per_seed or {}).items():
            if s == sd:
                outline[v][str(c)] = _o(*row)
        for d in drop:
            if len(d) == 2 or d[2] == sd:
                outline[d[0]][str(d[1])] = None
        runs.append({"seed": sd, "outline": outline, "arms": {"none": {"diverged": False}, "bn": {"diverged": False}}})
    return {"checkpoints": list(CPS), "variants": ["none", "bn-train", "bn-eval"], "runs": runs, "seeds": list(seeds),
            "n_params": {"none": 3466, "bn": 3530}, "top_k": 10, "far_factor": 5.0, "operator": "dataset-level", "slq": {}}


def _judged(summary, th=Thresholds()):
    summary = json.loads(json.dumps(summary))  # as re-read from summary.json
    return {v.claim: v for v in EXP.judge(summary, th)}


G1, GRAD, G2 = "bn-suppresses-outliers", "bn-gradient-leaves-top-space", "eval-mode-outliers-return"
DIVERGED = [("none", 50), ("none", 200)]  # the plain net diverged after step 0

ROWS = [
    # G1 outliers: plain ratio >= 2 x BN's (geometric mean over seeds) and mean n_far(BN) <= plain's at every judged
    # checkpoint (value: the smallest factor)
    (dict(), G1, "holds", 5.0),
    (dict(bn=[(2, 0, 0.3), (40, 1.6, 0.4), (15, 5, 0.6)]), G1, "fails", 1.5),             # a factor 1.5 at step 50
    (dict(bn=[(20, 0, 0.3), (90, 1.6, 0.4), (150, 5, 0.6)]), G1, "fails", 0.5),           # the other way round
    (dict(bn=[(2, 0, 0.3), (9, 12, 0.4), (15, 5, 0.6)]), G1, "fails", 5.0),               # more far eigenvalues with BN
    (dict(drop=DIVERGED), G1, "inconclusive", 5.0),                                        # one judged checkpoint
    (dict(none=[(10, 5, 0.8, 0.9), (60, 9, 0.95, 0.9), (120, 15, 0.9)]), G1, "inconclusive", 8.0),  # too noisy
    (dict(none=[(10, 5, 0.8), (60, 9, 0.95, 0.9), (120, 15, 0.9)]), G1, "holds", 5.0),      # one noisy point left out
    # seeds: the geometric mean decides; (factors 6.67, 2, 1 at step 50: geometric mean 2.37) ...
    (dict(per_seed={("bn-train", 50, 1): (30, 1.6, 0.4), ("bn-train", 50, 2): (60, 1.6, 0.4)}), G1, "holds",
     (60 / 9 * 2) ** (1 / 3)),
    # ... (factors 6.67, 1, 1: 1.88)
    (dict(per_seed={("bn-train", 50, 1): (60, 1.6, 0.4), ("bn-train", 50, 2): (60, 1.6, 0.4)}), G1, "fails", (60 / 9) ** (1 / 3)),
    (dict(drop=[("none", 50, 0), ("none", 200, 0)]), G1, "holds", 5.0),                   # one seed diverged: the others judge
    # G1 gradient: mean share(plain) >= mean share(BN) + 0.1 at every judged checkpoint (value: smallest difference)
    (dict(), GRAD, "holds", 0.3),
    (dict(bn=[(2, 0, 0.3), (9, 1.6, 0.9), (15, 5, 0.6)]), GRAD, "fails", 0.05),
    (dict(bn=[(2, 0, 0.3), (9, 1.6, 0.4), (15, 5, 0.95)]), GRAD, "fails", -0.05),        # the other way round
    (dict(per_seed={("bn-train", 200, 0): (15, 5, 0.95)}), GRAD, "holds", (0.3 + 0.3 - 0.05) / 3),  # a mean over seeds
    (dict(drop=DIVERGED), GRAD, "inconclusive", 0.5),
    # G2: BN-eval ratio >= 2 x BN-train's and mean n_far(eval) >= n_far(train) (value: smallest factor)
    (dict(), G2, "holds", 44 / 15),
    (dict(ev=[(8, 3, 0.4), (12, 7, 0.6), (44, 8.7, 0.9)]), G2, "fails", 12 / 9),
    (dict(ev=[(8, 3, 0.4), (34, 1.0, 0.6), (44, 8.7, 0.9)]), G2, "fails", 44 / 15),       # fewer far eigenvalues
    (dict(ev=[(1, 3, 0.4), (5, 7, 0.6), (10, 8.7, 0.9)]), G2, "fails", 0.5),              # the other way round
    (dict(drop=[("bn-eval", 0), ("bn-train", 200)]), G2, "inconclusive", 34 / 9),
    (dict(drop=DIVERGED), G2, "holds", 44 / 15),                                           # G2 needs no plain net
    (dict(seeds=(0,)), G2, "holds", 44 / 15),                                              # one seed (the tiny profile)
]


@pytest.mark.parametrize("kwargs, claim, status, value", ROWS)
def test_judge_table(kwargs, claim, status, value):
    v = _judged(_summary(**kwargs))[claim]
    assert v.status == status, (v.detail, v.rule)
    assert v.value == pytest.approx(value)
    assert v.rule and v.detail


def test_rules_print_the_thresholds_applied_and_a_changed_threshold_changes_the_verdict():
    th = Thresholds(ratio_factor=6.0, share_margin=0.35, max_spread=0.05, min_checkpoints=3)
    v = _judged(_summary(), th)
    assert "≥ 6 and" in v[G1].rule and "+ 35 points" in v[GRAD].rule and "≤ 0.05" in v[G2].rule
    assert all(x.status == "inconclusive" for x in v.values())  # every spread (0.1) is above 0.05
    v = _judged(_summary(), Thresholds(ratio_factor=6.0, share_margin=0.35))
    assert v[G1].status == "fails" and v[GRAD].status == "fails" and v[G2].status == "fails"
    assert "not measured" in _judged(_summary(drop=DIVERGED))[G1].detail
    assert "3 seeds" in _judged(_summary())[G1].spread


def test_bad_configs_are_refused():
    for bad in (dict(checkpoints=()), dict(checkpoints=(50, 0)), dict(n_runs=1), dict(far_factor=0.5), dict(lr=0.0),
                dict(top_k=30)):
        with pytest.raises(ValueError):
            Config(**bad)


def test_tiny_run_records_three_densities_per_checkpoint_and_step_0_is_reproducible(tmp_path):
    run, reused = run_experiment("spectrum", profile="tiny", out=tmp_path, device="cpu", progress=False)
    assert not reused and run.complete
    summary = run.read_json("summary.json")
    cfg = EXP.profiles["tiny"]
    assert [v["id"] for v in run.read_json("verdicts.json")["verdicts"]] == [c.id for c in EXP.claims]
    assert [r["seed"] for r in summary["runs"]] == [cfg.seed]
    outline = summary["runs"][0]["outline"]
    for v in ("none", "bn-train", "bn-eval"):
        for c in cfg.checkpoints:
            o = outline[v][str(c)]
            assert o is not None and math.isfinite(o["top_to_edge"]) and 0 <= o["grad_share"] <= 1 + 1e-9
    arrays = run.load_arrays("spectrum.npz")
    g, d = arrays["none_0_grid"], arrays["none_0_density"]
    assert len(g) <= 2000 and (d >= 0).all()
    assert sorted(p.name for p in (run.path / "figures").glob("*.png")) == ["densities.png", "outline.png"]
    # step 0 independently: the initialization, the subset, spectral_density with the same settings
    tr, _ = data_mod.load_pair(cfg.data, seed=cfg.seed)
    batches = [(tr.x[:cfg.subset_batch_size], tr.y[:cfg.subset_batch_size])]
    kw = dict(n_runs=cfg.n_runs, n_steps=cfg.n_steps, top_k=cfg.top_k, bulk_count=cfg.bulk_count, gap_frac=cfg.gap_frac,
              seed=cfg.seed)
    for variant, norm in (("none", "none"), ("bn-train", "bn"), ("bn-eval", "bn")):
        net = make_net(cfg, norm, tr)
        if variant == "bn-eval":
            net = population_statistics(net, batches)
        sd = spectral_density(DatasetHessianOperator(net, batches, F.cross_entropy), **kw)
        o = outline[variant]["0"]
        assert o["top"] == pytest.approx(float(sd.top_eigenvalues[0]), rel=1e-4), variant
        assert o["bulk_edge"] == pytest.approx(sd.bulk_edge, rel=1e-4, abs=1e-6), variant
        assert o["grad_share"] == pytest.approx(sd.gradient_share, abs=1e-4), variant
        np.testing.assert_allclose(o["n_far"], sd.n * sd.mass_between(cfg.far_factor * sd.bulk_edge, math.inf),
                                   rtol=1e-4, atol=1e-4)
