"""``auto-rate`` (Arora, Li, Lyu 2019): the numbers of a tiny run are the right numbers."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab import data, models
from bnlab.analysis import decades_span, fit_rate, running_min_curve
from bnlab.data import FixedBatches
from bnlab.experiments import EXPERIMENTS, resolve, run_experiment, verdict_rows
from bnlab.experiments.auto_rate import Thresholds
from bnlab.probes.intrinsic import IntrinsicGradNorm
from bnlab.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run, _ = run_experiment("auto-rate", profile="tiny", out=tmp_path_factory.mktemp("auto-rate"), device="cpu", progress=False)
    return run, run.read_json("config.json")["config"], run.metrics()


def _arms(recs, kind):
    return {r["arm"]: r for r in recs if r.get("event") == "arm" and r.get("kind") == kind}


def test_float64_norm_identity_residual_is_below_1e_6(tiny_run):
    run, cfg, recs = tiny_run
    ids = _arms(recs, "identity")
    exact = [a for a in ids.values() if a["eps"] < 1e-20]
    assert len(exact) == len(cfg["identity_lrs"]) and all(a["dtype"] == "float64" for a in exact)
    residuals = []
    for a in exact:
        for r in recs:
            if r.get("arm") == a["arm"] and r.get("event") is None:
                residuals += [abs(r[f"scale/{g}/norm_identity_rel_residual"]) for g in a["groups"]]
    assert len(residuals) == len(exact) * cfg["identity_steps"] * len(exact[0]["groups"])
    assert max(residuals) <= 1e-6
    verdict = {v["id"]: v for v in verdict_rows(run)}["norm-identity"]
    assert verdict["status"] == "holds" and verdict["value"] == pytest.approx(max(residuals))
    # BN's default eps breaks the identity by orders of magnitude more: the comparison is meaningful
    summary = run.read_json("summary.json")
    assert summary["norm_identity"]["float64_eps_default_max"] > 100 * max(residuals)


def test_recorded_effective_lr_is_lr_over_squared_weight_norm(tiny_run):
    _, cfg, recs = tiny_run
    arms = _arms(recs, "sweep")
    checked = 0
    for r in recs:
        a = arms.get(r.get("arm"))
        if a is None or a["norm"] != "bn" or r.get("event") is not None:
            continue
        for g in [*a["groups"], "all"]:
            key = f"scale/{g}/effective_lr"
            if key in r:
                assert r[key] == pytest.approx(a["lr_si"] / r[f"scale/{g}/weight_norm"] ** 2, rel=1e-12)
                checked += 1
    assert checked >= 2 * len(cfg["si_lrs"]) * len(cfg["modes"])


def test_scale_invariant_lr_goes_to_the_weights_feeding_bn_only(tiny_run):
    run, cfg, recs = tiny_run
    groups = run.read_json("summary.json")["groups"]
    used = [g["name"] for g in groups["bn"] if g["used"]]
    net = models.make(cfg["model"], norm="bn", in_shape=(1, 8, 8), num_classes=10, width=cfg["width"], depth=cfg["depth"])
    linear_before_bn = [f"features.{i}.weight" for i, m in enumerate(net.features) if isinstance(m, torch.nn.Linear)]
    assert used == linear_before_bn  # not the classifier, not BN's γ (invariant only while β = 0)
    assert not any(g["used"] for g in groups.get("none", []))
    for a in _arms(recs, "sweep").values():
        if a["norm"] == "bn":
            assert a["groups"] == used and a["other_lr"] == cfg["other_lr"]
        else:  # the baseline: the swept LR for every weight
            assert a["groups"] == [] and a["other_lr"] == a["lr_si"]


def test_every_arm_ends_and_divergence_is_recorded_not_raised(tiny_run):
    run, cfg, recs = tiny_run
    ends = {r["arm"]: r for r in recs if r.get("event") == "arm_end"}
    assert len(ends) == len(cfg["si_lrs"]) * len(cfg["modes"]) * len(cfg["norms"])
    for e in ends.values():
        assert isinstance(e["diverged"], bool)
        assert e["steps"] == (cfg["gd_steps"] if e["mode"] == "gd" else cfg["sgd_steps"]) or e["diverged"]


def test_figures_are_redrawn_from_stored_metrics_alone(tiny_run):
    run, _, _ = tiny_run
    shutil.rmtree(run.path / "figures")
    paths = EXPERIMENTS["auto-rate"].figures(run)
    names = {p.name for p in paths}
    assert {"learning_curves_gd.png", "learning_curves_sgd.png", "weight_norm_effective_lr.png", "grad_norm_rate.png",
            "accuracy_vs_lr.png", "norm_identity.png"} <= names
    assert all(p.stat().st_size > 5000 for p in paths)


def test_quick_profile_sweeps_five_decades_with_plain_gd_and_sgd():
    cfg, th = resolve("auto-rate", "quick")
    lrs = cfg.si_lrs
    assert len(lrs) >= 5 and math.log10(max(lrs) / min(lrs)) >= 5 - 1e-9
    assert set(cfg.modes) == {"gd", "sgd"} and set(cfg.norms) == {"bn", "none"}
    assert cfg.identity_bn_eps <= 1e-20 and th.identity_max_residual == 1e-6
    assert th.eff_lr_min_lr * 100 <= max(lrs)  # at least one judged pair of rates 100x apart
    for p in ("tiny", "quick", "paper"):
        assert EXPERIMENTS["auto-rate"].profiles[p].si_lrs


def test_stored_summary_is_enough_to_judge_again(tiny_run):
    run, _, _ = tiny_run
    exp = EXPERIMENTS["auto-rate"]
    summary = run.read_json("summary.json")
    stored = [(v["id"], v["status"], v["value"]) for v in verdict_rows(run)]
    again = [(v.claim, v.status, v.value) for v in exp.judge(summary, exp.registered_thresholds("tiny"))]
    assert again == stored
    # the analysis windows are thresholds: a wider fit window or judging every pair needs no training
    th = Thresholds(eff_lr_min_lr=0.01, rate_fit_decades=0.5)
    eff = {v.claim: v for v in exp.judge(summary, th)}["effective-lr-converges"]
    assert eff.value >= stored[2][2] and "≥ 0.01" in eff.rule


# ----------------------------------------------------------------------------- helpers


def test_fit_rate_recovers_an_exact_power_law():
    T = np.arange(1, 2001, dtype=float)
    f = fit_rate(T, 3.0 * T**-1.0, decades=1.0)
    assert f["slope"] == pytest.approx(-1.0, abs=1e-9) and f["r2"] == pytest.approx(1.0)
    assert f["t_lo"] == pytest.approx(200, rel=0.01) and f["t_hi"] == 2000


def test_running_min_is_monotone_and_skips_non_finite():
    T, m = running_min_curve([0, 1, 2, 3, 4], [5.0, 7.0, 2.0, float("nan"), 3.0])
    assert list(T) == [1, 2, 3, 5] and list(m) == [5.0, 5.0, 2.0, 2.0]


def test_decades_span_takes_the_widest_consecutive_band():
    lrs = [1e-2, 1e-1, 1, 10, 100]
    assert decades_span(lrs, [True, False, True, True, True]) == (2.0, 1, 100)
    assert decades_span(lrs, [False] * 5)[1] is None


def test_fixed_batches_visit_the_same_batches_in_a_new_order_each_epoch():
    tr = data.load("synthetic", split="train", n=50, in_shape=(1, 4, 4), seed=0)
    fb = FixedBatches(tr, 16, seed=1)
    gen = torch.Generator().manual_seed(0)
    e1 = [tuple(sorted(y.tolist())) for _, y in fb.batches(16, generator=gen)]
    e2 = [tuple(sorted(y.tolist())) for _, y in fb.batches(16, generator=gen)]
    parts = [tuple(sorted(y.tolist())) for _, y in fb.fixed()]
    assert sorted(e1) == sorted(e2) == sorted(parts) and len(parts) == fb.steps_per_epoch(16) == 4
    assert sum(len(y) for _, y in fb.fixed()) == 50
    assert len(list(fb.batches(1024, shuffle=False))) == 1  # evaluation passes see the plain set


def test_objective_grad_norm_matches_brute_force_and_changes_nothing(float64):
    tr = data.load("synthetic", split="train", n=48, in_shape=(1, 4, 4), seed=0).to(dtype=torch.float64)
    net = models.make("mlp", norm="bn", in_shape=(1, 4, 4), num_classes=10, width=8, depth=2, seed=0).double()
    si = {n: p for n, p in net.named_parameters() if n in ("features.1.weight", "features.4.weight")}
    parts = FixedBatches(tr, 16, seed=0).fixed()
    # brute force: ∇ of Σ_k |B_k|/N L_Bk, then Σ_i ‖w_i‖²‖∇_i‖² + ‖∇_g‖²
    loss = sum(F.cross_entropy(net(x), y) * len(y) / 48 for x, y in parts)
    grads = dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters()))))
    want = sum(float(si[n].detach().norm() ** 2 * grads[n].norm() ** 2) for n in si) + sum(
        float(g.norm() ** 2) for n, g in grads.items() if n not in si)
    # through training, the probe at step 0 must see w_0 and leave training bit-identical
    def run(with_probe):
        m = models.make("mlp", norm="bn", in_shape=(1, 4, 4), num_classes=10, width=8, depth=2, seed=0).double()
        s = {n: p for n, p in m.named_parameters() if n in si}
        o = [p for n, p in m.named_parameters() if n not in si]
        probes = [IntrinsicGradNorm(s, o, objective=parts)] if with_probe else []
        h = train(m, FixedBatches(tr, 16, seed=0), torch.optim.SGD(m.parameters(), lr=0.1), steps=3, batch_size=16,
                  probes=probes, eval_train=False, device="cpu")
        return h, [t.detach().clone() for t in [*m.parameters(), *m.buffers()]]

    h, with_p = run(True)
    _, without = run(False)
    assert h.records[0]["objective/grad_norm_sq"] == pytest.approx(want, rel=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(with_p, without))
    # the step mode on a full batch reads the same quantity from .grad (GD)
    full = [(tr.x, tr.y)]
    m = models.make("mlp", norm="bn", in_shape=(1, 4, 4), num_classes=10, width=8, depth=2, seed=0).double()
    s = {n: p for n, p in m.named_parameters() if n in si}
    o = [p for n, p in m.named_parameters() if n not in si]
    h2 = train(m, tr, torch.optim.SGD(m.parameters(), lr=0.1), steps=1, full_batch=True,
               probes=[IntrinsicGradNorm(s, o, name="step"), IntrinsicGradNorm(s, o, objective=full, name="obj")],
               eval_train=False, device="cpu")
    assert h2.records[0]["step/grad_norm_sq"] == pytest.approx(h2.records[0]["obj/grad_norm_sq"], rel=1e-10)


# ----------------------------------------------------------------------------- the judge, on plain summaries


def _curve(exponent: float, n: int = 100) -> dict:
    """A running-minimum curve m_T = T**exponent, T = 1..n, as stored in the summary."""
    return {"T": list(range(1, n + 1)), "m": [float(t) ** exponent for t in range(1, n + 1)]}


def _arm(norm, mode, lr, acc, *, diverged=False, eff=(math.nan, math.nan)) -> tuple[str, dict]:
    a = {"norm": norm, "mode": mode, "lr_si": lr, "other_lr": 0.1, "test_acc": acc, "diverged": diverged,
         "diverged_at": 3 if diverged else None, "steps": 100}
    if norm == "bn":
        a.update(eff_lr_first=eff[0], eff_lr_last=eff[1])
    return f"{norm}/{mode}/{lr:g}", a


def _summary(*, residual, bn_acc, plain_acc, plain_div, eff_last, slopes, lrs=(0.01, 0.1, 1.0, 10.0, 100.0),
             norms=("bn", "none")) -> dict:
    """A summary as ``measure`` writes it, reduced to what the judge reads."""
    arms, curves = {}, {}
    for mode in ("gd", "sgd"):
        for i, lr in enumerate(lrs):
            k, a = _arm("bn", mode, lr, bn_acc[i], eff=(lr, eff_last[i]))
            arms[k] = a
            curves[k] = _curve(slopes[mode]) if slopes[mode] is not None else {"T": [], "m": []}
            if "none" in norms:
                k, a = _arm("none", mode, lr, plain_acc[i], diverged=plain_div[i])
                arms[k] = a
    return {
        "norm_identity": {"float64_eps0_max": residual, "float64_eps_default_max": 1e-3, "float32_sweep_max": 1e-3},
        "identity": {}, "groups": {}, "arms": arms, "min_grad_norm_sq": curves,
        "modes": ["gd", "sgd"], "norms": list(norms), "other_lr": 0.1, "batch_size": 64, "fixed_batches": True,
        "identity_bn_eps": 1e-30, "identity_lrs": [1e-2, 1.0, 100.0], "identity_steps": 30,
    }


_NAN = math.nan
_JUDGE_ROWS = {
    # every claim holds: identity exact, BN trains over 4 decades and the plain net over 1, the
    # effective LRs of η_si = 1 and 100 end a factor 2 apart, the running minima fall as T^-1.5 and T^-0.7
    "holds": (_summary(residual=1e-12, bn_acc=[0.95] * 5, plain_acc=[0.95, 0.95, 0.1, _NAN, _NAN],
                       plain_div=[False, False, False, True, True], eff_last=[0.01, 0.01, 0.01, 0.015, 0.02],
                       slopes={"gd": -1.5, "sgd": -0.7}),
              {"norm-identity": ("holds", 1e-12), "lr-insensitive": ("holds", 4.0),
               "effective-lr-converges": ("holds", 2.0), "gd-rate": ("holds", -1.5), "sgd-rate": ("holds", -0.7)}),
    # every claim fails: the identity is broken, BN trains at one rate only (the plain net over 4
    # decades), the effective LRs stay 50x apart, the minima decay more slowly than the bounds
    "fails": (_summary(residual=1e-3, bn_acc=[0.3, 0.3, 0.95, 0.3, 0.3], plain_acc=[0.95] * 5, plain_div=[False] * 5,
                       eff_last=[1.0, 1.0, 1.0, 1.0, 50.0], slopes={"gd": -0.5, "sgd": -0.1}),
              {"norm-identity": ("fails", 1e-3), "lr-insensitive": ("fails", 0.0),
               "effective-lr-converges": ("fails", 50.0), "gd-rate": ("fails", -0.5), "sgd-rate": ("fails", -0.1)}),
    # nothing to judge: no residual, no plain net, no pair of rates 100x apart, no curve to fit
    "inconclusive": (_summary(residual=_NAN, bn_acc=[0.9, 0.9], plain_acc=[], plain_div=[], eff_last=[0.01, 0.01],
                              slopes={"gd": None, "sgd": None}, lrs=(0.1, 1.0), norms=("bn",)),
                     {"norm-identity": ("inconclusive", _NAN), "lr-insensitive": ("inconclusive", None),
                      "effective-lr-converges": ("inconclusive", None), "gd-rate": ("inconclusive", None),
                      "sgd-rate": ("inconclusive", None)}),
}


@pytest.mark.parametrize("row", list(_JUDGE_ROWS))
def test_judge_table(row):
    import json

    summary, want = _JUDGE_ROWS[row]
    summary = json.loads(json.dumps(summary))  # exactly as re-read from summary.json
    exp = EXPERIMENTS["auto-rate"]
    got = exp.judge(summary, Thresholds())
    assert [v.claim for v in got] == [c.id for c in exp.claims]
    for v in got:
        status, value = want[v.claim]
        assert v.status == status, (v.claim, v.detail)
        assert v.rule
        if value is None:
            assert v.value is None
        elif math.isnan(value):
            assert math.isnan(v.value)
        else:
            assert v.value == pytest.approx(value, rel=1e-6), v.claim


def test_judge_applies_changed_thresholds_without_training():
    summary = _JUDGE_ROWS["fails"][0]
    exp = EXPERIMENTS["auto-rate"]
    loose = Thresholds(identity_max_residual=1e-2, bn_min_decades=0.0, plain_max_decades=4.0, eff_lr_max_factor=100.0,
                       rate_tolerance=1.0)
    assert all(v.status == "holds" for v in exp.judge(summary, loose))
    # rate_fit_decades picks the part of the stored curve that is fitted
    c = {"T": list(range(1, 1001)), "m": [1.0 if t <= 100 else (t / 100) ** -2.0 for t in range(1, 1001)]}
    s = {**summary, "min_grad_norm_sq": {k: c for k in summary["min_grad_norm_sq"]}}
    last = {v.claim: v.value for v in exp.judge(s, Thresholds(rate_fit_decades=1.0))}["gd-rate"]
    all3 = {v.claim: v.value for v in exp.judge(s, Thresholds(rate_fit_decades=3.0))}["gd-rate"]
    assert last == pytest.approx(-2.0, abs=0.05) and all3 > -1.5
