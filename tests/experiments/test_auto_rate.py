"""``auto-rate`` (Arora, Li, Lyu 2019): the numbers of a tiny run are the right numbers."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab import data, models
from bnlab.experiments import EXPERIMENTS, resolve_config, run_experiment
from bnlab.experiments.auto_rate import (
    FixedBatches,
    IntrinsicGradNorm,
    _decades_span,
    fit_rate,
    running_min_curve,
)
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
    verdict = {v["id"]: v for v in run.read_json("verdicts.json")}["norm-identity"]
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
    cfg = resolve_config("auto-rate", "quick")
    lrs = cfg["si_lrs"]
    assert len(lrs) >= 5 and math.log10(max(lrs) / min(lrs)) >= 5 - 1e-9
    assert set(cfg["modes"]) == {"gd", "sgd"} and set(cfg["norms"]) == {"bn", "none"}
    assert cfg["identity_bn_eps"] <= 1e-20 and cfg["identity_max_residual"] == 1e-6
    assert cfg["eff_lr_min_lr"] * 100 <= max(lrs)  # at least one judged pair of rates 100x apart
    for p in ("tiny", "quick", "paper"):
        assert EXPERIMENTS["auto-rate"].profiles[p]["si_lrs"]


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
    assert _decades_span(lrs, [True, False, True, True, True]) == (2.0, 1, 100)
    assert _decades_span(lrs, [False] * 5)[1] is None


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
    others = [p for n, p in net.named_parameters() if n not in si]
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
