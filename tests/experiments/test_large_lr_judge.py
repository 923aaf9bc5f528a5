"""``large-lr``'s judge: a pure function of the summary, with a holds / fails / inconclusive row per claim."""

import json
import math

import pytest

from bnlab.experiments import EXPERIMENTS
from bnlab.experiments.large_lr import Thresholds, accuracies, seed_list, Config

CLAIMS = [c.id for c in EXPERIMENTS["large-lr"].claims]


def _arm(accs, diverged=None):
    diverged = diverged or [False] * len(accs)
    return {"norm": "?", "lr": 0.0, "seeds": list(range(len(accs))), "test_acc": list(accs), "diverged": list(diverged),
            "diverged_at": [3 if d else None for d in diverged], "steps": [100] * len(accs)}


def _summary(bn_small=(0.98, 0.97, 0.99), plain_small=(0.97, 0.96, 0.97), bn_large=(0.95, 0.94, 0.96),
             plain_large=(0.10, 0.10, 0.10), bn_large_div=None, plain_large_div=None):
    return {"arms": {"bn@small_lr": _arm(bn_small), "none@small_lr": _arm(plain_small),
                     "bn@large_lr": _arm(bn_large, bn_large_div), "none@large_lr": _arm(plain_large, plain_large_div)},
            "small_lr": 0.02, "large_lr": 0.5, "norms": ["bn", "none"], "seeds": [0, 1, 2]}


def _judged(summary, th=Thresholds()):
    summary = json.loads(json.dumps(summary))  # as re-read from summary.json
    return {v.claim: v for v in EXPERIMENTS["large-lr"].judge(summary, th)}


@pytest.mark.parametrize("kw, claim, status, value", [
    # bn-trains-at-large-lr (S1): BN's mean >= 90% and no seed diverged, where every plain seed fails
    ({}, "bn-trains-at-large-lr", "holds", 0.95),
    (dict(bn_large=(0.95, 0.80, 0.80)), "bn-trains-at-large-lr", "fails", 0.85),
    (dict(bn_large=(0.95, 0.95, math.nan), bn_large_div=[False, False, True]), "bn-trains-at-large-lr", "fails", 0.95 * 2 / 3),
    (dict(plain_large=(0.10, 0.92, 0.10)), "bn-trains-at-large-lr", "inconclusive", 0.95),   # the plain net trains there
    (dict(plain_large=(math.nan, 0.6, 0.1), plain_large_div=[True, False, False]), "bn-trains-at-large-lr", "inconclusive", 0.95),
    (dict(plain_small=(0.5, 0.6, 0.4)), "bn-trains-at-large-lr", "holds", 0.95),  # the plain net's small-LR run is not S1's concern
    # plain-fails-at-large-lr: every seed diverged or <= 50%
    ({}, "plain-fails-at-large-lr", "holds", 0.10),
    (dict(plain_large=(math.nan, math.nan, 0.3), plain_large_div=[True, True, False]), "plain-fails-at-large-lr", "holds", 0.1),
    (dict(plain_large=(0.10, 0.92, 0.10)), "plain-fails-at-large-lr", "fails", (0.10 + 0.92 + 0.10) / 3),
    (dict(plain_small=(0.5, 0.6, 0.4)), "plain-fails-at-large-lr", "inconclusive", 0.10),
    # comparable-at-small-lr (B2): |BN - plain| <= 3 points; inconclusive only if neither trains
    ({}, "comparable-at-small-lr", "holds", 0.98 - 0.9667),
    (dict(plain_small=(0.90, 0.91, 0.92)), "comparable-at-small-lr", "fails", 0.98 - 0.91),
    (dict(plain_small=(0.5, 0.6, 0.4)), "comparable-at-small-lr", "fails", 0.98 - 0.5),          # only one trains
    (dict(plain_small=(0.5, 0.6, 0.4), bn_small=(0.5, 0.5, 0.5)), "comparable-at-small-lr", "inconclusive", 0.0),
])
def test_large_lr_judge_table(kw, claim, status, value):
    got = _judged(_summary(**kw))
    assert list(got) == CLAIMS
    assert got[claim].status == status, got[claim].detail
    assert got[claim].value == pytest.approx(value, abs=2e-3, nan_ok=True)
    assert got[claim].rule and got[claim].spread.startswith(("3 seeds", "BN − plain per seed: 3 seeds"))


def test_large_lr_claims_carry_their_claims_md_ids():
    refs = {c.id: c.ref for c in EXPERIMENTS["large-lr"].claims}
    assert refs == {"bn-trains-at-large-lr": "S1", "plain-fails-at-large-lr": "", "comparable-at-small-lr": "B2"}


def test_large_lr_thresholds_re_decide_without_training():
    s = _summary(bn_large=(0.85, 0.86, 0.87), plain_small=(0.93, 0.94, 0.95))
    assert [v.status for v in _judged(s).values()] == ["fails", "holds", "fails"]
    assert [v.status for v in _judged(s, Thresholds(bn_min_acc=0.8, parity_tol=0.05)).values()] == ["holds", "holds", "holds"]
    assert "≥ 80%" in _judged(s, Thresholds(bn_min_acc=0.8))["bn-trains-at-large-lr"].rule


def test_accuracies_count_a_diverged_seed_as_zero_and_seeds_follow_the_config():
    assert accuracies(_arm([0.9, math.nan, 0.5], [False, True, False])) == [0.9, 0.0, 0.5]
    assert seed_list(Config(seed=4, seeds=3)) == [4, 5, 6]
    with pytest.raises(ValueError):
        Config(seeds=0)
    assert EXPERIMENTS["large-lr"].profiles["quick"].seeds >= 3 and EXPERIMENTS["large-lr"].profiles["paper"].seeds >= 3
