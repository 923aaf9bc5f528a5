"""The judges of ``divergence`` and ``activations`` as tables: plain summaries in, verdicts out (pure, no training).

Every claim has a row where it holds, one where it fails and one where its precondition is missing
(inconclusive)."""

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
    got = exp.judge(_roundtrip(summary), th)
    assert [v.claim for v in got] == [c.id for c in exp.claims]  # one verdict per claim, in order, always
    return {v.claim: v for v in got}


def _check(got: dict, expected: dict) -> None:
    for claim, (status, value) in expected.items():
        v = got[claim]
        assert v.status == status, (claim, v.detail)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            assert v.value is None or math.isnan(v.value), (claim, v.value)
        else:
            assert v.value == pytest.approx(value), claim
        assert v.rule and v.detail


# ----------------------------------------------------------------------------- divergence
ALPHAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
SMALL, MID, LARGE = 0.001, 0.01, 0.1


def _rl(curve):
    return {"median": curve, "per_seed_median": [curve, curve, curve]}


def _div_summary(init=None, train=None, accs=None, noise=None) -> dict:
    """``init``: (plain curve, BN curve) at initialization; ``train``: {step: (plain, BN)}; ``accs``:
    {(norm, lr): [per-seed accuracy]} (NaN: diverged); ``noise``: the ``noise`` block."""
    s = {"alphas": ALPHAS, "seeds": [0, 1, 2], "rl_batches": 2, "rl_train_batches": 1, "chance": 0.1,
         "small_lr": SMALL, "large_lr": LARGE, "lrs": [SMALL, MID, LARGE], "epochs": 5.0, "norms": ["bn", "none"],
         "relative_loss": {}, "relative_loss_training": {"lr": SMALL, "steps": []}, "arms": {}, "noise": noise or {}}
    if init is not None:
        s["relative_loss"] = {"none": {**_rl(init[0]), "loss_at_init": [5.0, 4.0, 6.0]},
                              "bn": {**_rl(init[1]), "loss_at_init": [2.3, 2.3, 2.4]}}
    if train is not None:
        rt = {"lr": SMALL, "steps": sorted(train), "none": {}, "bn": {}}
        for t, (p, b) in train.items():
            rt["none"][str(t)] = {**_rl(p), "train_loss": [3.0, 3.1, 2.9]}
            rt["bn"][str(t)] = {**_rl(b), "train_loss": [2.3, 2.2, 2.3]}
        s["relative_loss_training"] = rt
    for (norm, lr), vals in (accs or {}).items():
        s["arms"][f"{norm}@{lr:g}"] = {"norm": norm, "lr": lr, "seeds": [0, 1, 2], "test_acc": vals,
                                       "diverged": [v != v for v in vals], "diverged_at": [3 if v != v else None for v in vals]}
    return s


def _accs(bn_small, pl_small, bn_mid, pl_mid, bn_large, pl_large):
    return {("bn", SMALL): bn_small, ("none", SMALL): pl_small, ("bn", MID): bn_mid, ("none", MID): pl_mid,
            ("bn", LARGE): bn_large, ("none", LARGE): pl_large}


def _fit(pa, pb):
    return {"p_alpha": pa, "p_batch": pb, "log_c": 0.0, "rms": 0.01}


def _noise(p_plain, p_bn, p_sampled, n_batches=16):
    nb = {"n": 4000, "batch_sizes": [8, 512], "alphas": [SMALL, LARGE], "seed": 0}
    for norm, (pa, pb) in (("none", p_plain), ("bn", p_bn)):
        nb[norm] = {"trace_cov": 10.0, "full_grad_sq_norm": 1.0, "variance": [[1e-5, 1e-7], [0.1, 1e-3]], "fit": _fit(pa, pb)}
    # the plain net's step noise as measured on sampled batches (what B8 judges); the closed form above is the cross-check
    nb["none_sampled"] = {"per_batch": [[1.0, 1.2], [0.01, 0.012]], "gradient_variance": [1.1, 0.011],
                          "variance": [[5e-6, 5e-8], [0.05, 5e-4]], "n_batches": n_batches, "full_grad_sq_norm": 1.0,
                          "fit": _fit(*p_plain)}
    if p_sampled is not None:
        nb["bn_sampled"] = {"per_batch": [[1.0, 1.2], [0.01, 0.012]], "gradient_variance": [1.1, 0.011],
                            "variance": [[5e-6, 5e-8], [0.05, 5e-4]], "n_batches": n_batches, "full_grad_sq_norm": 1.0,
                            "fit": _fit(*p_sampled)}
    return nb


CURVE_PLAIN = [0.99, 3.0, INF, INF, INF]  # first above 1 at α = 1e-3
CURVE_BN_FAR = [0.99, 0.9, 0.5, 0.8, 1.5]  # first above 1 at α = 1 (ratio 1000)
CURVE_BN_NEAR = [0.99, 0.9, 2.0, INF, INF]  # at α = 1e-2 (ratio 10)
CURVE_BN_EARLY = [0.99, 2.0, INF, INF, INF]  # at α = 1e-3 (ratio 1)
CURVE_NEVER = [0.99, 0.9, 0.8, 0.7, 0.9]

DIV_ROWS = {
    "holds": _div_summary(
        init=(CURVE_PLAIN, CURVE_BN_FAR), train={1: (CURVE_PLAIN, CURVE_BN_FAR), 4: (CURVE_PLAIN, CURVE_BN_NEAR)},
        accs=_accs([0.30, 0.28, 0.32], [0.29, 0.27, 0.30], [0.70, 0.72, 0.71], [0.55, 0.50, 0.60], [0.90, 0.91, 0.92], [NAN, NAN, NAN]),
        noise=_noise((2.0, -1.03), (2.0, -1.03), (2.0, -1.05))),
    # BN diverges as early as the plain net (init), and later too (training); the plain net is 20 points better at the small
    # LR; it is as good as BN at its best; the fitted exponents are off
    "fails": _div_summary(
        init=(CURVE_PLAIN, CURVE_BN_EARLY), train={1: (CURVE_PLAIN, CURVE_BN_FAR), 4: (CURVE_PLAIN, CURVE_BN_EARLY)},
        accs=_accs([0.30, 0.30, 0.30], [0.50, 0.50, 0.50], [0.70, 0.70, 0.70], [0.88, 0.90, 0.86], [0.90, 0.90, 0.90], [NAN, NAN, NAN]),
        noise=_noise((2.0, -0.7), (2.0, -1.0), (2.0, -0.5))),
    # the plain net never exceeds 1 (init; and after one update); neither net trains anywhere; no noise measured
    "inconclusive": _div_summary(
        init=(CURVE_NEVER, CURVE_BN_FAR), train={1: (CURVE_PLAIN, CURVE_BN_FAR), 4: (CURVE_NEVER, CURVE_BN_FAR)},
        accs=_accs([0.12, 0.11, 0.13], [0.10, 0.12, 0.11], [0.15, 0.12, 0.10], [0.12, 0.10, NAN], [0.14, 0.12, 0.18], [NAN, NAN, NAN]),
        noise=None),
}
DIV_EXPECTED = {
    "holds": {"plain-diverges-at-smaller-alpha-at-init": ("holds", 1000.0),
              "plain-diverges-at-smaller-alpha-during-training": ("holds", 10.0),
              "comparable-at-small-lr": ("holds", 0.30 - 0.28666666666666667),
              # best BN 91% (lr 0.1) vs best plain 55% (lr 0.01): 36 points; BN 0.1 vs 0.001: 61 points
              "bn-benefit-from-large-lr": ("holds", 0.91 - 0.55),
              "step-noise-scales-as-alpha2-over-b": ("holds", -1.03),
              "bn-step-noise-with-batch-statistics": ("holds", -1.05)},
    "fails": {"plain-diverges-at-smaller-alpha-at-init": ("fails", 1.0),
              "plain-diverges-at-smaller-alpha-during-training": ("fails", 1.0),
              "comparable-at-small-lr": ("fails", -0.20),
              "bn-benefit-from-large-lr": ("fails", 0.90 - 0.88),  # the plain net diverged at 0.1, yet this fails
              "step-noise-scales-as-alpha2-over-b": ("fails", -0.7),
              "bn-step-noise-with-batch-statistics": ("fails", -0.5)},
    "inconclusive": {"plain-diverges-at-smaller-alpha-at-init": ("inconclusive", NAN),
                     "plain-diverges-at-smaller-alpha-during-training": ("inconclusive", 1000.0),
                     "comparable-at-small-lr": ("inconclusive", 0.12 - 0.11),
                     "bn-benefit-from-large-lr": ("inconclusive", (0.44 / 3 - 0.12)),
                     "step-noise-scales-as-alpha2-over-b": ("inconclusive", None),
                     "bn-step-noise-with-batch-statistics": ("inconclusive", None)},
}


@pytest.mark.parametrize("row", list(DIV_ROWS))
def test_divergence_judge_table(row):
    _check(_judge("divergence", DIV_ROWS[row]), DIV_EXPECTED[row])


def test_divergence_judge_applies_the_thresholds_it_is_given():
    s = DIV_ROWS["holds"]
    assert _judge("divergence", s, alpha_ratio_min=2000.0)["plain-diverges-at-smaller-alpha-at-init"].status == "fails"
    assert _judge("divergence", s, alpha_ratio_min=11.0)["plain-diverges-at-smaller-alpha-during-training"].status == "fails"
    assert _judge("divergence", s, comparable_tol=0.01)["comparable-at-small-lr"].status == "fails"
    assert _judge("divergence", s, trains_margin=0.85)["comparable-at-small-lr"].status == "inconclusive"
    assert _judge("divergence", s, better_margin=0.4)["bn-benefit-from-large-lr"].status == "fails"
    assert _judge("divergence", s, exponent_tol=0.02)["step-noise-scales-as-alpha2-over-b"].status == "fails"
    assert _judge("divergence", s, exponent_tol=0.04)["bn-step-noise-with-batch-statistics"].status == "fails"
    # a higher divergence level moves α*: the plain net's median (3 at 1e-3, ∞ beyond) first exceeds 5 at 1e-2,
    # BN's never does: beyond the grid, the lower bound 1 / 1e-2 = 100 ≥ 10
    v = _judge("divergence", s, divergence_level=5.0)["plain-diverges-at-smaller-alpha-at-init"]
    assert v.status == "holds" and v.value == pytest.approx(100.0)
    assert "> 5" in v.rule and "2000" not in v.rule and "≥ 10 · α*_plain" in v.rule
    # ... but a lower bound below the threshold cannot decide
    assert _judge("divergence", s, divergence_level=5.0, alpha_ratio_min=200.0)[
        "plain-diverges-at-smaller-alpha-at-init"].status == "inconclusive"


def test_divergence_b3_cannot_hold_just_because_the_plain_net_diverges_at_the_large_lr():
    s = copy.deepcopy(DIV_ROWS["holds"])
    s["arms"]["none@0.01"]["test_acc"] = [0.90, 0.92, 0.91]  # the plain net is as good as BN's best at a smaller LR
    v = _judge("divergence", s)["bn-benefit-from-large-lr"]
    assert v.status == "fails" and "best no norm 91.0% at lr 0.01" in v.detail
    s = copy.deepcopy(DIV_ROWS["holds"])
    s["arms"]["bn@0.001"]["test_acc"] = [0.88, 0.90, 0.92]  # BN is as good at the small LR: the benefit is not the large LR
    assert _judge("divergence", s)["bn-benefit-from-large-lr"].status == "fails"


def test_divergence_seed_means_and_spread():
    v = _judge("divergence", DIV_ROWS["holds"])["comparable-at-small-lr"]
    assert "3 seeds" in v.spread and "BN" in v.spread and "no norm" in v.spread
    assert "30.0% / 28.0% / 32.0%" in v.detail
    # a diverged seed counts at chance
    s = copy.deepcopy(DIV_ROWS["holds"])
    s["arms"]["none@0.001"]["test_acc"] = [0.29, NAN, 0.30]
    assert _judge("divergence", s)["comparable-at-small-lr"].value == pytest.approx(0.30 - (0.29 + 0.1 + 0.30) / 3)


def test_divergence_judge_is_inconclusive_where_the_summary_lacks_a_measurement():
    s = copy.deepcopy(DIV_ROWS["holds"])
    del s["arms"]["none@0.001"], s["relative_loss"]["bn"], s["noise"]["bn_sampled"]
    s["relative_loss_training"] = {"lr": SMALL, "steps": []}
    got = _judge("divergence", s)
    assert {k: v.status for k, v in got.items()} == {
        "plain-diverges-at-smaller-alpha-at-init": "inconclusive", "plain-diverges-at-smaller-alpha-during-training": "inconclusive",
        "comparable-at-small-lr": "inconclusive", "bn-benefit-from-large-lr": "holds",
        "step-noise-scales-as-alpha2-over-b": "holds", "bn-step-noise-with-batch-statistics": "inconclusive"}
    s["noise"] = _noise((2.0, NAN), (2.0, -1.0), (2.0, -1.0), n_batches=1)
    got = _judge("divergence", s)
    assert got["step-noise-scales-as-alpha2-over-b"].status == "inconclusive"
    assert got["bn-step-noise-with-batch-statistics"].status == "inconclusive"  # one batch per size: no mean to fit


# ----------------------------------------------------------------------------- activations
def _fit_g(total, factor=1.1):
    return {"total": total, "factor": factor, "first": 1, "last": 6}


def _og(r):
    return {"ratio": r, "row_cos": 0.5, "majority": 0.9, "abs_sum": r, "sum_abs": 1.0}


def _init(moments, grad_ratio, jac_total, cos_rise):
    """Three seeds alike: ``moments`` (|mean| total, std total), the output-gradient ratio, the Jacobian's fitted total,
    the cosine's rise from the first to the last block."""
    cos = [0.0, 0.2, 0.3, 0.2 + cos_rise, 0.9]
    return {"growth": [{"abs_mean": _fit_g(moments[0]), "std": _fit_g(moments[1])}] * 3,
            "output_gradients": [_og(grad_ratio)] * 3,
            "jacobian_ratio": [[1.0, 1.5, 2.0, 3.0, 2.0]] * 3, "jacobian_growth": [_fit_g(jac_total)] * 3,
            "cosine": [cos] * 3, "cosine_rise": [cos_rise] * 3}


def _act_summary(none, bn, interp, diverged=True) -> dict:
    div = {"lr": 1.0, "diverged": diverged, "diverged_at": 5 if diverged else None, "steps_recorded": 6,
           "tried": [{"lr": 1.0, "diverged": diverged, "diverged_at": 5 if diverged else None}]}
    if interp is not None:
        div["interp"] = {"step": 3, "loss_s0": 2.0, "loss_s1": 50.0,
                         "deep_vs_shallow": {"shallow": 2.0, "deep": 2.0 * interp, "ratio": interp}}
        div["interp_first"] = {"step": 0, "loss_s0": 60.0, "loss_s1": 70.0, "deep_vs_shallow": {"shallow": 1.1, "deep": 1.3}}
    return {"grad_examples": 32, "init_seeds": [0, 1, 2], "jac_examples": 4, "cos_examples": 32, "sv_n": 16, "sv_k_max": 8,
            "sv_trials": 2, "init_none": none, "init_bn": bn, "diverging_run": div}


ACT_ROWS = {
    "holds": _act_summary(_init((50.0, 20.0), 0.95, 4.0, 0.6), _init((0.8, 1.5), 0.3, 1.5, 0.2), INF),
    # moments grow too little / BN not flat; deep layers no worse; BN's gradients alike too; BN's Jacobian and cosine grow
    # as much as the plain net's
    "fails": _act_summary(_init((50.0, 5.0), 0.95, 4.0, 0.6), _init((0.8, 3.0), 0.6, 4.0, 0.5), 0.9),
    # fits undefined (NaN totals), the plain run did not diverge (an update that increased the loss is not enough)
    "inconclusive": _act_summary(_init((NAN, 20.0), NAN, NAN, NAN), _init((0.8, NAN), 0.3, 1.5, 0.2), 50.0, diverged=False),
}
ACT_EXPECTED = {
    "holds": {"moments-grow-without-bn": ("holds", 20.0), "moments-flat-with-bn": ("holds", 1.5),
              "deep-layers-blow-up-along-diverging-update": ("holds", INF),
              "output-gradient-rows-alike-without-bn": ("holds", 0.95),
              "jacobian-spread-grows-without-bn": ("holds", 4.0), "representations-align-without-bn": ("holds", 0.6)},
    "fails": {"moments-grow-without-bn": ("fails", 5.0), "moments-flat-with-bn": ("fails", 3.0),
              "deep-layers-blow-up-along-diverging-update": ("fails", 0.9),
              "output-gradient-rows-alike-without-bn": ("fails", 0.95),
              "jacobian-spread-grows-without-bn": ("fails", 4.0), "representations-align-without-bn": ("fails", 0.6)},
    "inconclusive": {"moments-grow-without-bn": ("inconclusive", NAN), "moments-flat-with-bn": ("inconclusive", NAN),
                     "deep-layers-blow-up-along-diverging-update": ("inconclusive", None),
                     "output-gradient-rows-alike-without-bn": ("inconclusive", NAN),
                     "jacobian-spread-grows-without-bn": ("inconclusive", NAN),
                     "representations-align-without-bn": ("inconclusive", NAN)},
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
    assert _judge("activations", s, jac_grow_min=5.0)["jacobian-spread-grows-without-bn"].status == "fails"
    assert _judge("activations", s, cos_rise_min=0.7)["representations-align-without-bn"].status == "fails"
    # BN's Jacobian total 1.5 against 4.0: log share 0.29; its cosine rise 0.2 against 0.6: share 0.33
    assert _judge("activations", s, bn_share_max=0.3)["jacobian-spread-grows-without-bn"].status == "holds"
    assert _judge("activations", s, bn_share_max=0.3)["representations-align-without-bn"].status == "fails"
    assert _judge("activations", s, bn_share_max=0.25)["jacobian-spread-grows-without-bn"].status == "fails"
    f = ACT_ROWS["fails"]
    v = _judge("activations", f, deep_vs_shallow_min=0.5)["deep-layers-blow-up-along-diverging-update"]
    assert v.status == "holds" and "≥ 0.5" in v.rule and "the first loss-increasing update (step 0" in v.detail
    nan_ratio = _act_summary(_init((50.0, 20.0), 0.95, 4.0, 0.6), _init((0.8, 1.5), 0.3, 1.5, 0.2), NAN)
    assert _judge("activations", nan_ratio)["deep-layers-blow-up-along-diverging-update"].status == "inconclusive"


def test_activations_b5_is_judged_only_on_a_run_that_diverged():
    got = _judge("activations", ACT_ROWS["inconclusive"])["deep-layers-blow-up-along-diverging-update"]
    assert got.status == "inconclusive" and "no plain run diverged" in got.detail
    diverged = copy.deepcopy(ACT_ROWS["inconclusive"])
    diverged["diverging_run"]["diverged"] = True
    assert _judge("activations", diverged)["deep-layers-blow-up-along-diverging-update"].status == "holds"


def test_activations_seed_means_and_spread():
    s = copy.deepcopy(ACT_ROWS["holds"])
    s["init_none"]["output_gradients"] = [_og(1.0), _og(0.9), _og(0.8)]
    v = _judge("activations", s)["output-gradient-rows-alike-without-bn"]
    assert v.status == "holds" and v.value == pytest.approx(0.9) and v.spread.startswith("no norm 3 seeds: 0.9 ±")
    # growth factors: geometric mean over the seeds
    s["init_none"]["growth"] = [{"abs_mean": _fit_g(t), "std": _fit_g(t)} for t in (4.0, 16.0, 64.0)]
    v = _judge("activations", s)["moments-grow-without-bn"]
    assert v.value == pytest.approx(16.0) and v.status == "holds"
