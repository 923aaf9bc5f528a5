"""``landscape``'s judge (Santurkar et al. 2018, CLAIMS.md S2, S3, S4, S12) on hand-written summaries:
for every claim a summary where it holds, one where it fails and one where its precondition is
missing, as the judge reads them back from JSON."""

import json
import math

import pytest

from bnlab.experiments import EXPERIMENTS
from bnlab.errors import UserError
from bnlab.experiments.base import replace
from bnlab.experiments.landscape import CLAIM_KEYS, LP, QUANTITIES, Config, Thresholds, probe_steps, ratio_verdict

NORMS = ("bn",) + LP
SEEDS = [0, 1, 2]
SMOOTHING = list(CLAIM_KEYS)
EARLY_JUDGED = [c for c, (_, q) in CLAIM_KEYS.items() if QUANTITIES[q][1]]  # S2, S3 and their ℓp versions
BETA = [c for c, (_, q) in CLAIM_KEYS.items() if not QUANTITIES[q][1]]  # S4 and its ℓp versions


def _per_seed(v):
    return list(v) if isinstance(v, (list, tuple)) else [v] * len(SEEDS)


def summary(early=3.0, late=1.5, *, n=5, diverged=None, acc=None):
    """A landscape summary: every net's window ratios ``early``/``late`` (a number or one per seed),
    ``n`` probes per window, ``diverged`` {norm: [per seed]} and ``acc`` {norm: [per seed]}."""
    e, lt = _per_seed(early), _per_seed(late)
    ratios = {norm: {q: {"early": e, "late": lt, "early_plain": [2.0 * x for x in e], "early_norm": [2.0] * 3,
                         "late_plain": lt, "late_norm": [1.0] * 3, "early_n": _per_seed(n), "late_n": _per_seed(n)}
                     for q in QUANTITIES} for norm in NORMS}
    div = {k: [False] * 3 for k in ("none",) + NORMS}
    div.update(diverged or {})
    accs = {"none": [0.90] * 3, "bn": [0.95] * 3, "l1": [0.945] * 3, "l2": [0.95] * 3, "linf": [0.94] * 3}
    accs.update(acc or {})
    return {"lr": 0.05, "steps": 400, "window": 0.25, "seeds": SEEDS, "norms": list(NORMS), "ratios": ratios,
            "curvature": {}, "arms": {}, "diverged": div, "test_acc": accs}


def judged(s, th=None):
    """``{claim: verdict}`` of the judge on the summary as re-read from JSON."""
    s = json.loads(json.dumps(s))
    return {v.claim: v for v in EXPERIMENTS["landscape"].judge(s, th or Thresholds())}


def test_claims_carry_their_claims_md_rows_and_every_claim_gets_a_verdict():
    exp = EXPERIMENTS["landscape"]
    refs = {c.id: c.ref for c in exp.claims}
    assert refs["loss-band-smaller"] == "S2" and refs["gradient-band-smaller"] == "S3" and refs["beta-smaller"] == "S4"
    assert {refs[c] for c in SMOOTHING if CLAIM_KEYS[c][0] != "bn"} == {"S12"} and refs["lp-trains-like-bn"] == "S12"
    assert list(judged(summary())) == [c.id for c in exp.claims]


@pytest.mark.parametrize("early, late, status_early_judged, status_beta", [
    (3.0, 1.5, "holds", "holds"),                  # much smaller early, smaller late, and more so early
    (2.0, 1.0, "holds", "holds"),                  # exactly at the thresholds (2 > 1 × 1)
    (0.9, 0.5, "fails", "fails"),                  # not smaller with the norm early on
    (3.0, 3.5, "fails", "holds"),                  # smaller throughout, but not especially early: S2/S3 fail, S4 needs no "early"
    (3.0, 3.0, "fails", "holds"),                  # early = late is not "early > late"
    (1.5, 1.2, "inconclusive", "inconclusive"),    # smaller early, but not by ratio_min
    (3.0, 0.8, "inconclusive", "inconclusive"),    # larger with the norm late
    (math.nan, 2.0, "inconclusive", "inconclusive"),
])
def test_smoothing_table(early, late, status_early_judged, status_beta):
    got = judged(summary(early, late))
    for c in EARLY_JUDGED:
        assert got[c].status == status_early_judged, c
        assert got[c].value == pytest.approx(early, nan_ok=True)
    for c in BETA:
        assert got[c].status == status_beta, c


def test_the_verdict_is_the_mean_over_seeds_with_its_spread():
    got = judged(summary(early=[3.0, 3.6, 0.3], late=[1.0, 1.2, 1.1]))  # mean early 2.3, late 1.1
    v = got["loss-band-smaller"]
    assert v.status == "holds" and v.value == pytest.approx(2.3)
    assert v.spread.startswith("3 seeds: 2.3 ±") and "min 0.3x" in v.spread
    assert "seeds [3, 3.6, 0.3]" in v.detail and "early / late 2.09" in v.detail
    assert "≥ 2" in v.rule and "early > 1 × late" in v.rule and "steps < 100" in v.rule


@pytest.mark.parametrize("kwargs, why", [
    (dict(diverged={"none": [False, True, False]}), "seed 1: the plain net diverged"),
    (dict(diverged={n: [True, False, False] for n in NORMS}), "seed 0: "),
    (dict(n=[5, 2, 5]), "seed 1: 2 / 2 probes"),
    (dict(early=[3.0, math.nan, 3.0]), "seed 1: no finite ratio"),
])
def test_too_few_usable_seeds_is_inconclusive(kwargs, why):
    for c, v in judged(summary(**kwargs)).items():
        if c in SMOOTHING:
            assert v.status == "inconclusive" and "2 usable seed(s) of 3, fewer than 3" in v.detail and why in v.detail, c


def test_a_left_out_seed_is_fine_when_enough_remain():
    got = judged(summary(early=[3.0, 0.1, 3.0], diverged={"none": [False, True, False]}), Thresholds(min_seeds=2))
    assert got["loss-band-smaller"].status == "holds" and got["loss-band-smaller"].value == pytest.approx(3.0)
    assert "left out: seed 1: the plain net diverged" in got["loss-band-smaller"].detail


def test_a_missing_arm_is_inconclusive():
    s = summary()
    del s["ratios"]["l1"]
    got = judged(s)
    assert all(got[c].status == "inconclusive" and "no ℓ1 BN arm" in got[c].detail for c in SMOOTHING if c.startswith("l1-"))
    assert got["loss-band-smaller"].status == "holds"


@pytest.mark.parametrize("acc, diverged, status, value", [
    ({}, {}, "holds", -0.01),                                       # ℓ∞ BN 1 point below BN: within 2
    ({"l1": [0.935, 0.935, 0.935]}, {}, "holds", -0.015),           # 1.5 points below is allowed ...
    ({"l1": [0.92, 0.93, 0.92]}, {}, "fails", -0.0267),             # ... 2.7 points below is not
    ({"linf": [0.95, 0.95, 0.95]}, {"linf": [False, False, True]}, "fails", -0.3167),  # a diverged seed counts as 0
    ({"bn": [0.3, 0.3, 0.3]}, {}, "inconclusive", math.nan),        # BN did not train: no reference
    ({}, {"bn": [False, True, False]}, "inconclusive", math.nan),
])
def test_lp_trains_like_bn_table(acc, diverged, status, value):
    v = judged(summary(acc=acc, diverged=diverged))["lp-trains-like-bn"]
    assert v.status == status
    assert v.value == pytest.approx(value, abs=1e-3, nan_ok=True)
    if status != "inconclusive":
        assert v.spread and "%" in v.spread


def test_thresholds_re_decide_without_training():
    s = summary(1.5, 1.2)
    assert judged(s)["loss-band-smaller"].status == "inconclusive"
    assert judged(s, Thresholds(ratio_min=1.4))["loss-band-smaller"].status == "holds"
    assert judged(s, Thresholds(fail_ratio=2.0))["loss-band-smaller"].status == "fails"
    assert judged(s, Thresholds(ratio_min=1.4, early_over_late=1.3))["loss-band-smaller"].status == "fails"
    assert judged(s, Thresholds(ratio_min=1.4, early_over_late=1.3))["beta-smaller"].status == "holds"
    assert judged(summary(), Thresholds(min_seeds=4))["loss-band-smaller"].status == "inconclusive"


def test_ratio_verdict():
    assert ratio_verdict(3.0, 1.2, 2.0) is True
    assert ratio_verdict(0.9, 5.0, 2.0) is False
    assert ratio_verdict(1.5, 1.2, 2.0) is None and ratio_verdict(3.0, 0.8, 2.0) is None
    assert ratio_verdict(math.nan, 5.0, 2.0) is None and ratio_verdict(3.0, math.nan, 2.0) is None
    assert ratio_verdict(3.0, 4.0, 2.0) is True and ratio_verdict(3.0, 4.0, 2.0, early_over_late=1.0) is False
    assert ratio_verdict(3.0, 0.8, 2.0, late_ratio_min=0.5) is True and ratio_verdict(1.5, 1.2, 2.0, fail_ratio=1.6) is False


def test_a_summary_of_the_single_seed_version_is_inconclusive_not_an_error():
    old = {"arms": {}, "ratios": {"loss_band": {"early_ratio": 3.0, "late_ratio": 1.2}}, "lr": 0.05, "steps": 400, "window": 0.25}
    got = judged(old)
    assert list(got) == [c.id for c in EXPERIMENTS["landscape"].claims]
    assert all(v.status == "inconclusive" and "run the experiment again" in v.detail for v in got.values())


def test_probe_steps_and_config_checks():
    assert probe_steps(Config(steps=400, probe_every=20, mid_probe_every=100)) == [0, 20, 40, 60, 80, 100, 200, 300, 320, 340, 360, 380]
    assert probe_steps(Config()) == [0, 12, 24, 36, 48, 60, 120, 180, 192, 204, 216, 228, 240]
    assert probe_steps({"steps": 40, "window": 0.25, "probe_every": 5, "mid_probe_every": 0}) == [0, 5, 30, 35]
    for bad in ({"norms": ("none", "bn")}, {"norms": ()}, {"norms": ("xn",)}, {"seeds": 0}, {"window": 0.6}, {"k": 0}):
        with pytest.raises(UserError):
            replace(Config(), bad)
