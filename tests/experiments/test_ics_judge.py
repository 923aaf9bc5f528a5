"""``ics``'s judge: a pure function of the summary, with a holds / fails / inconclusive row per claim
(S5 noisy BN, S6 stability, S12 ℓp stability, S7 ICS of the convnet and of the deep linear network)."""

import json
import math

import pytest

from bnlab.experiments import EXPERIMENTS
from bnlab.experiments.ics import NORMS, Thresholds, common_seeds, ics_comparison, on_seeds

CLAIMS = [c.id for c in EXPERIMENTS["ics"].claims]
LAYERS = ["features.4", "features.8", "classifier"]


def _ics_net(cos_bn, cos_pl, l2_bn, l2_pl, n=10, seeds=3, diverged=False):
    """An ``ics[<net>]`` block: per-layer values (the same in every seed), ``n`` measurements each."""
    def block(cos, l2):
        per = {k: {"cos": c, "l2": v, "rel": v, "n": n} for k, c, v in zip(LAYERS, cos, l2)}
        return {"layers": list(LAYERS), "per_seed": [per] * seeds, "diverged": [False] * seeds}
    out = {"bn": block(cos_bn, l2_bn), "none": block(cos_pl, l2_pl)}
    out["none"]["diverged"][-1] = diverged
    return out


def _summary(acc=((0.50, 0.60, 0.40), (0.98, 0.97, 0.99), (0.96, 0.95, 0.97)), noisy_ins=(0.04, 0.3), diverged_noisy=False,
             ins=None, lp_diverged=False, convnet=None, dln=None, lp_missing=()):
    """``acc``: train-mode accuracy per seed at noisy_lr of (none, bn, bn-noisy); ``noisy_ins``: instability of (bn, bn-noisy)
    there; ``ins``: instability at lr per net (seed 0; none and bn also seeds 1, 2)."""
    ins = {"none": 0.08, "bn": 0.01, "bn-noisy": 0.3, "l1": 0.10, "l2": 0.01, "linf": 0.2, **(ins or {})}
    noisy = {"train_mode_acc": dict(zip(NORMS, [list(a) for a in acc])),
             "instability": {"none": [math.nan] * 3, "bn": [noisy_ins[0]] * 3, "bn-noisy": [noisy_ins[1]] * 3},
             "diverged": {n: [diverged_noisy and n == "bn-noisy", False, False] for n in NORMS}}
    stability = {}
    for n, v in ins.items():
        if n in lp_missing:
            continue
        k = 3 if n in ("none", "bn") else 1
        stability[n] = {"seeds": list(range(k)), "instability": [v] * k, "train_mode_acc": [0.95] * k,
                        "diverged": [lp_diverged and n not in NORMS] * k}
    same = ((0.99, 0.98, 0.97), (0.99, 0.98, 0.97), (0.05, 0.04, 0.03), (0.05, 0.04, 0.03))
    return {"arms": {}, "noisy": noisy, "stability": stability,
            "ics": {"convnet": _ics_net(*same) if convnet is None else convnet, "dln": _ics_net(*same) if dln is None else dln},
            "lp_norms": ["l1", "l2", "linf"], "lp_missing": list(lp_missing), "seeds": [0, 1, 2], "ics_seeds": [0, 1, 2],
            "lr": 0.05, "noisy_lr": 0.3, "steps": 300, "final_frac": 0.2, "act_every": 10, "act_layer": "features.5",
            "dln": {"depth": 25, "width": 32, "lr": 0.01, "steps": 200, "data": "synthetic"}}


def _judged(summary, th=Thresholds()):
    summary = json.loads(json.dumps(summary))  # as re-read from summary.json
    return {v.claim: v for v in EXPERIMENTS["ics"].judge(summary, th)}


ROWS = [
    # S5 noisy-bn-trains-like-bn: noisy >= BN - 5 points and noisy - plain >= 3 points (value: noisy - BN, means over seeds)
    (dict(), "noisy-bn-trains-like-bn", "holds", -0.02),
    (dict(acc=((0.5, 0.6, 0.4), (0.98, 0.97, 0.99), (0.90, 0.91, 0.92))), "noisy-bn-trains-like-bn", "fails", -0.07),
    (dict(acc=((0.80, 0.80, 0.80), (0.98, 0.97, 0.99), (0.94, 0.92, 0.93))), "noisy-bn-trains-like-bn", "holds", -0.05),
    (dict(acc=((0.90, 0.91, 0.92), (0.98, 0.97, 0.99), (0.93, 0.93, 0.93))), "noisy-bn-trains-like-bn", "fails", -0.05),  # < plain + 3
    (dict(diverged_noisy=True), "noisy-bn-trains-like-bn", "fails", (0.95 + 0.97) / 3 - 0.98),  # a diverged seed counts as 0
    (dict(acc=((0.95, 0.96, 0.97), (0.98, 0.97, 0.99), (0.96, 0.95, 0.97))), "noisy-bn-trains-like-bn", "inconclusive", -0.02),  # BN does not help
    (dict(noisy_ins=(0.04, 0.06)), "noisy-bn-trains-like-bn", "inconclusive", -0.02),  # the noise is not visible
    (dict(acc=((), (), ())), "noisy-bn-trains-like-bn", "inconclusive", math.nan),
    # S6 noisy-bn-less-stable (value: noisy / BN)
    (dict(), "noisy-bn-less-stable", "holds", 30.0),
    (dict(ins={"bn-noisy": 0.01}), "noisy-bn-less-stable", "fails", 1.0),
    (dict(ins={"bn-noisy": 0.015}), "noisy-bn-less-stable", "fails", 1.5),   # above BN, but not "far": not 2x
    (dict(ins={"none": 0.5}), "noisy-bn-less-stable", "fails", 30.0),        # more stable than the plain net
    (dict(ins={"none": math.nan}), "noisy-bn-less-stable", "inconclusive", 30.0),
    # S12 l1/l2/linf-does-not-stabilize: lp >= 1 x plain (value: lp / plain)
    (dict(), "l1-does-not-stabilize", "holds", 1.25),
    (dict(ins={"l1": 0.04}), "l1-does-not-stabilize", "fails", 0.5),
    (dict(), "l2-does-not-stabilize", "fails", 0.125),
    (dict(ins={"l2": 0.08}), "l2-does-not-stabilize", "holds", 1.0),   # exactly at the plain net's
    (dict(), "linf-does-not-stabilize", "holds", 2.5),
    (dict(ins={"linf": 0.02}), "linf-does-not-stabilize", "fails", 0.25),
    (dict(ins={"none": 0.015}), "l2-does-not-stabilize", "inconclusive", 0.01 / 0.015),  # BN does not stabilize here
    (dict(lp_diverged=True), "linf-does-not-stabilize", "inconclusive", 2.5),
    (dict(lp_missing=("l1",)), "l1-does-not-stabilize", "inconclusive", math.nan),  # not registered
    # S7 convnet: BN's cos <= plain's + 0.02 in every layer (value: the worst BN - plain); l2 BN/plain >= 0.5 (value: smallest)
    (dict(), "bn-ics-cos-not-higher", "holds", 0.0),
    (dict(convnet=_ics_net((0.99, 0.99, 0.99), (0.99, 0.95, 0.99), (1, 1, 1), (1, 1, 1))), "bn-ics-cos-not-higher", "fails", 0.04),
    (dict(convnet=_ics_net((0.99, 0.99, 0.99), (0.99, 0.95, 0.99), (1, 1, 1), (1, 1, 1), diverged=True)),
     "bn-ics-cos-not-higher", "inconclusive", 0.04),
    (dict(convnet=_ics_net((0.99, 0.9, 0.8), (0.99, 0.95, 0.99), (1, 1, 1), (1, 1, 1), n=3)), "bn-ics-cos-not-higher", "inconclusive", 0.0),
    (dict(), "bn-ics-l2-not-lower", "holds", 1.0),
    (dict(convnet=_ics_net((1, 1, 1), (1, 1, 1), (0.1, 0.05, 0.2), (0.1, 0.2, 0.1))), "bn-ics-l2-not-lower", "fails", 0.25),
    (dict(convnet=_ics_net((1, 1, 1), (1, 1, 1), (0.1, 0.05, 0.2), (0.1, 0.2, 0.1), n=4)), "bn-ics-l2-not-lower", "inconclusive", 0.25),
    # S7 deep linear network: the same rules
    (dict(dln=_ics_net((0.5, 0.6, 0.7), (0.9, 0.9, 0.9), (3, 3, 3), (1, 1, 1))), "dln-bn-ics-cos-not-higher", "holds", -0.2),
    (dict(dln=_ics_net((0.95, 0.95, 0.95), (0.9, 0.9, 0.9), (3, 3, 3), (1, 1, 1))), "dln-bn-ics-cos-not-higher", "fails", 0.05),
    (dict(dln=_ics_net((0.95, 0.95, 0.95), (0.9, 0.9, 0.9), (3, 3, 3), (1, 1, 1), diverged=True)), "dln-bn-ics-cos-not-higher",
     "inconclusive", 0.05),
    (dict(dln=_ics_net((0.5, 0.6, 0.7), (0.9, 0.9, 0.9), (3, 3, 3), (1, 1, 1))), "dln-bn-ics-l2-not-lower", "holds", 3.0),
    (dict(dln=_ics_net((0.5, 0.6, 0.7), (0.9, 0.9, 0.9), (3, 0.3, 3), (1, 1, 1))), "dln-bn-ics-l2-not-lower", "fails", 0.3),
    (dict(dln=_ics_net((0.5, 0.6, 0.7), (0.9, 0.9, 0.9), (3, 0.3, 3), (1, 1, 1), n=0)), "dln-bn-ics-l2-not-lower", "inconclusive", 0.3),
]


@pytest.mark.parametrize("kw, claim, status, value", ROWS)
def test_ics_judge_table(kw, claim, status, value):
    got = _judged(_summary(**kw))
    assert list(got) == CLAIMS
    v = got[claim]
    assert v.status == status, v.detail
    assert v.value == pytest.approx(value, abs=1e-9, rel=1e-6, nan_ok=True)
    assert v.rule
    if status == "inconclusive":
        assert "inconclusive" in v.detail or "no " in v.detail


def test_every_claim_has_a_holds_a_fails_and_an_inconclusive_row():
    seen = {}
    for _, claim, status, _ in ROWS:
        seen.setdefault(claim, set()).add(status)
    assert set(seen) == set(CLAIMS)
    assert all(s == {"holds", "fails", "inconclusive"} for s in seen.values()), seen


def test_ics_claims_carry_their_claims_md_ids():
    refs = {c.id: c.ref for c in EXPERIMENTS["ics"].claims}
    assert refs["noisy-bn-trains-like-bn"] == "S5" and refs["noisy-bn-less-stable"] == "S6"
    assert {refs[f"{p}-does-not-stabilize"] for p in ("l1", "l2", "linf")} == {"S12"}
    assert {refs[c] for c in CLAIMS if "ics" in c} == {"S7"}


def test_s5_reports_mean_and_spread_over_seeds():
    v = _judged(_summary())["noisy-bn-trains-like-bn"]
    assert v.spread.startswith("noisy − BN per seed: 3 seeds: -2 ± ")
    assert "noisy BN 96.0%, BN 98.0%, no norm 50.0%" in v.detail and "3 seeds" in v.detail


def test_ics_thresholds_re_decide_without_training():
    s = _summary(acc=((0.5, 0.6, 0.4), (0.98, 0.97, 0.99), (0.90, 0.91, 0.92)), ins={"bn-noisy": 0.015, "none": 0.012},
                 convnet=_ics_net((0.99, 0.99, 0.99), (0.99, 0.95, 0.99), (0.1, 0.05, 0.2), (0.1, 0.2, 0.1)))
    got = _judged(s)
    assert [got[c].status for c in ("noisy-bn-trains-like-bn", "noisy-bn-less-stable", "bn-ics-cos-not-higher", "bn-ics-l2-not-lower")] \
        == ["fails", "fails", "fails", "fails"]
    th = Thresholds(acc_tol=0.08, unstable_ratio=1.4, cos_slack=0.05, l2_ratio_min=0.2)
    got = _judged(s, th)
    assert [got[c].status for c in ("noisy-bn-trains-like-bn", "noisy-bn-less-stable", "bn-ics-cos-not-higher", "bn-ics-l2-not-lower")] \
        == ["holds", "holds", "holds", "holds"]
    assert "+ 0.05" in got["bn-ics-cos-not-higher"].rule and "0.2 ×" in got["bn-ics-l2-not-lower"].rule


def test_stability_is_compared_on_the_seeds_both_nets_ran():
    st = {"none": {"seeds": [0, 1, 2], "instability": [1.0, 2.0, 3.0]}, "l1": {"seeds": [1], "instability": [5.0]}}
    assert common_seeds(st, ("none", "l1")) == [1] and common_seeds(st, ("none", "l2")) == []
    assert on_seeds(st, "none", "instability", [1]) == [2.0] and on_seeds(st, "l1", "instability", [0, 1]) == [5.0]


def test_ics_comparison_pairs_layers_in_forward_order_and_seeds_by_index():
    net = _ics_net((0.9, 0.8, 0.7), (0.95, 0.9, 0.5), (2.0, 1.0, 4.0), (1.0, 2.0, 1.0), seeds=2)
    net["bn"]["per_seed"] = [net["bn"]["per_seed"][0], {k: {**v, "cos": v["cos"] - 0.1} for k, v in net["bn"]["per_seed"][0].items()}]
    c = ics_comparison(json.loads(json.dumps(net, sort_keys=True)))  # summary.json sorts keys: the order comes from "layers"
    assert c["layers"] == LAYERS
    assert c["cos_diff"]["classifier"] == pytest.approx(0.7 - 0.05 - 0.5)
    assert c["l2_ratio"] == pytest.approx({"features.4": 2.0, "features.8": 0.5, "classifier": 4.0})
    assert c["cos_diff_seed"] == pytest.approx([0.2, 0.1]) and c["l2_ratio_seed"] == pytest.approx([0.5, 0.5]) and c["n_min"] == 10
    assert ics_comparison({"bn": {"per_seed": []}, "none": {"per_seed": []}})["layers"] == []
