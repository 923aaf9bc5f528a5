"""The judges of ``divergence`` and ``activations`` as tables: plain summaries in, verdicts out (pure, no training)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest

from bnlab._io import dumps_json
from bnlab.experiments import get_experiment

NAN, INF = math.nan, math.inf


def _roundtrip(summary: dict) -> dict:
    """The summary as the judge sees it: re-read from JSON (NaN/Infinity allowed)."""
    return json.loads(dumps_json(summary))


def _judge(name: str, summary: dict, **changes) -> dict:
    exp = get_experiment(name)
    th = dataclasses.replace(exp.Thresholds(), **changes)
    return {v.claim: v for v in exp.judge(_roundtrip(summary), th)}


# ----------------------------------------------------------------------------- divergence
ALPHAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def _arm(norm, lr, acc, diverged=False, at=None):
    return {"norm": norm, "lr": lr, "test_acc": acc, "diverged": diverged, "diverged_at": at}


def _div_summary(plain_curve, bn_curve, small, large) -> dict:
    """``small``/``large``: ``(bn arm kwargs, plain arm kwargs)`` at lr 0.001 / 0.1."""
    arms = {}
    for lr, (bn, pl) in ((0.001, small), (0.1, large)):
        arms[f"bn@{lr:g}"] = _arm("bn", lr, **bn)
        arms[f"none@{lr:g}"] = _arm("none", lr, **pl)
    rl = {n: {"median": c, "per_batch": [c, c], "loss_at_init_median": l0}
          for n, c, l0 in (("none", plain_curve, 50.0), ("bn", bn_curve, 2.3))}
    return {"alphas": ALPHAS, "rl_batches": 2, "relative_loss": rl, "arms": arms, "chance": 0.1,
            "small_lr": 0.001, "large_lr": 0.1, "epochs": 1.0}


DIV_ROWS = {
    # plain net's median first above 1 at α = 1e-3, BN's at α = 1 (ratio 1000); comparable at the small LR;
    # the plain net diverges at the large LR (non-finite accuracy counts at chance)
    "holds": _div_summary([0.99, 3.0, INF, INF, INF], [0.99, 0.9, 0.5, 0.8, 1.5],
                          ({"acc": 0.90}, {"acc": 0.88}), ({"acc": 0.90}, {"acc": NAN, "diverged": True, "at": 2})),
    # both first above 1 at α = 1e-2; 40 points apart at the small LR; BN diverges at the large LR
    "fails": _div_summary([0.99, 0.9, 2.0, INF, INF], [0.99, 0.9, NAN, INF, INF],
                          ({"acc": 0.90}, {"acc": 0.50}), ({"acc": NAN, "diverged": True, "at": 1}, {"acc": 0.20})),
    # the plain net never exceeds 1 on the grid; neither net trains at the small LR (chance 10% + 10 points)
    "inconclusive": _div_summary([0.99, 0.9, 0.8, 0.7, 0.9], [0.99, 0.9, 0.5, 0.8, 0.9],
                                 ({"acc": 0.12}, {"acc": 0.15}), ({"acc": 0.5}, {"acc": 0.45})),
}
DIV_EXPECTED = {
    "holds": {"plain-diverges-at-smaller-alpha": ("holds", 1.0 / 1e-3), "comparable-at-small-lr": ("holds", 0.90 - 0.88),
              "bn-better-at-large-lr": ("holds", 0.90 - 0.1)},
    "fails": {"plain-diverges-at-smaller-alpha": ("fails", 1.0), "comparable-at-small-lr": ("fails", 0.40),
              "bn-better-at-large-lr": ("fails", 0.1 - 0.20)},
    "inconclusive": {"plain-diverges-at-smaller-alpha": ("inconclusive", NAN), "comparable-at-small-lr": ("inconclusive", 0.12 - 0.15),
                     "bn-better-at-large-lr": ("fails", 0.5 - 0.45)},
}


def _check(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for claim, (status, value) in expected.items():
        v = got[claim]
        assert v.status == status, (claim, v.detail)
        if isinstance(value, float) and math.isnan(value):
            assert v.value is None or math.isnan(v.value)
        else:
            assert v.value == pytest.approx(value), claim
        assert v.rule and v.detail


@pytest.mark.parametrize("row", list(DIV_ROWS))
def test_divergence_judge_table(row):
    _check(_judge("divergence", DIV_ROWS[row]), DIV_EXPECTED[row])


def test_divergence_judge_applies_the_thresholds_it_is_given():
    s = DIV_ROWS["holds"]
    assert _judge("divergence", s, alpha_ratio_min=2000.0)["plain-diverges-at-smaller-alpha"].status == "fails"
    assert _judge("divergence", s, comparable_tol=0.01)["comparable-at-small-lr"].status == "fails"
    assert _judge("divergence", s, better_margin=0.9)["bn-better-at-large-lr"].status == "fails"
    assert _judge("divergence", s, trains_margin=0.85)["comparable-at-small-lr"].status == "inconclusive"
    # a higher divergence level moves α*: the plain net's median (3 at 1e-3, ∞ beyond) first exceeds 5 at 1e-2,
    # and BN's never does (counted as beyond the grid: ratio 1 / 1e-2)
    v = _judge("divergence", s, divergence_level=5.0)["plain-diverges-at-smaller-alpha"]
    assert v.status == "holds" and v.value == pytest.approx(100.0)
    assert "exceeds 5" in v.detail and "> 5" in v.rule and "2000" not in v.rule
    assert "≥ 10 · α*_plain" in _judge("divergence", s)["plain-diverges-at-smaller-alpha"].rule


def test_divergence_judge_leaves_out_claims_whose_arms_are_missing():
    s = copy.deepcopy(DIV_ROWS["holds"])
    del s["arms"]["none@0.1"], s["relative_loss"]["bn"]
    assert list(_judge("divergence", s)) == ["comparable-at-small-lr"]


# ----------------------------------------------------------------------------- activations
def _fit(total, factor=1.1):
    return {"total": total, "factor": factor, "first": 1, "last": 6}


def _act_summary(grow_none, grow_bn, interp, ratio_none, ratio_bn, sv_growth) -> dict:
    div = {"lr": 1.0, "diverged": True, "diverged_at": 5, "tried": [{"lr": 1.0, "diverged": True, "diverged_at": 5}]}
    if interp is not None:
        div["interp"] = {"step": 3, "loss_s0": 2.0, "loss_s1": 50.0,
                         "deep_vs_shallow": {"shallow": 2.0, "deep": 2.0 * interp, "ratio": interp}}
        div["interp_first"] = {"step": 0, "loss_s0": 60.0, "loss_s1": 70.0, "deep_vs_shallow": {"shallow": 1.1, "deep": 1.3}}
    og = lambda r: {"ratio": r, "row_cos": 0.5, "majority": 0.9, "abs_sum": r, "sum_abs": 1.0}
    sv = lambda g: {"ratio_k1": 2.0, "ratio_kmax": 2.0 * g, "growth": g, "smax_kmax": 10.0, "smean_kmax": 1.0}
    return {"grad_examples": 32, "sv_n": 16, "sv_k_max": 8, "sv_trials": 2,
            "growth_none": {"abs_mean": _fit(grow_none[0]), "std": _fit(grow_none[1])},
            "growth_bn": {"abs_mean": _fit(grow_bn[0]), "std": _fit(grow_bn[1])},
            "diverging_run": div, "output_gradients_none": og(ratio_none), "output_gradients_bn": og(ratio_bn),
            "sv_he": sv(sv_growth[0]), "sv_xavier": sv(sv_growth[1])}


ACT_ROWS = {
    "holds": _act_summary((50.0, 20.0), (0.8, 1.5), INF, 0.95, 0.3, (4.0, 3.0)),
    "fails": _act_summary((50.0, 5.0), (0.8, 3.0), 0.9, 0.95, 0.6, (4.0, 1.5)),
    # fits undefined (NaN totals), no loss-increasing update; the last two claims cannot be inconclusive
    "inconclusive": _act_summary((NAN, 20.0), (0.8, NAN), None, 0.5, 0.3, (NAN, 3.0)),
}
ACT_EXPECTED = {
    "holds": {"moments-grow-without-bn": ("holds", 20.0), "moments-flat-with-bn": ("holds", 1.5),
              "deep-layers-blow-up-along-diverging-update": ("holds", INF),
              "output-gradient-rows-alike-without-bn": ("holds", 0.95), "singular-value-ratio-grows": ("holds", 3.0)},
    "fails": {"moments-grow-without-bn": ("fails", 5.0), "moments-flat-with-bn": ("fails", 3.0),
              "deep-layers-blow-up-along-diverging-update": ("fails", 0.9),
              "output-gradient-rows-alike-without-bn": ("fails", 0.95), "singular-value-ratio-grows": ("fails", 1.5)},
    "inconclusive": {"moments-grow-without-bn": ("inconclusive", NAN), "moments-flat-with-bn": ("inconclusive", NAN),
                     "deep-layers-blow-up-along-diverging-update": ("inconclusive", NAN),
                     "output-gradient-rows-alike-without-bn": ("fails", 0.5), "singular-value-ratio-grows": ("fails", NAN)},
}


@pytest.mark.parametrize("row", list(ACT_ROWS))
def test_activations_judge_table(row):
    _check(_judge("activations", ACT_ROWS[row]), ACT_EXPECTED[row])


def test_activations_judge_applies_the_thresholds_it_is_given():
    s = ACT_ROWS["holds"]
    assert _judge("activations", s, grow_min=30.0)["moments-grow-without-bn"].status == "fails"
    assert _judge("activations", s, flat_max=1.4)["moments-flat-with-bn"].status == "fails"
    assert _judge("activations", s, ratio_alike_min=0.99)["output-gradient-rows-alike-without-bn"].status == "fails"
    assert _judge("activations", s, ratio_bn_max=0.2)["output-gradient-rows-alike-without-bn"].status == "fails"
    assert _judge("activations", s, sv_growth_min=3.5)["singular-value-ratio-grows"].status == "fails"
    f = ACT_ROWS["fails"]
    v = _judge("activations", f, deep_vs_shallow_min=0.5)["deep-layers-blow-up-along-diverging-update"]
    assert v.status == "holds" and "≥ 0.5" in v.rule and "the first loss-increasing update (step 0" in v.detail
    nan_ratio = _act_summary((50.0, 20.0), (0.8, 1.5), NAN, 0.95, 0.3, (4.0, 3.0))
    assert _judge("activations", nan_ratio)["deep-layers-blow-up-along-diverging-update"].status == "inconclusive"
