"""``exp-lr`` at the tiny profile: the numbers behind its verdicts are what the theory says."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab.experiments import EXPERIMENTS, run_experiment
from bnlab.experiments.exp_lr import _TinyBNNet, _phases
from bnlab.runs import RunDir
from bnlab.schedules import step_decay_lr, texp_lr, wd_equivalent_alpha, wd_equivalent_lr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp-lr-tiny")
    run, _ = run_experiment("exp-lr", profile="tiny", out=out, device="cpu", progress=False)
    cfg = run.read_json("config.json")["config"]
    with np.load(run.path / "series.npz", allow_pickle=False) as f:
        series = {k: f[k] for k in f.files}
    return run, cfg, run.read_json("summary.json"), series


def _verdicts(run):
    return {v["id"]: v for v in run.read_json("verdicts.json")}


def test_float64_weight_decay_and_explr_agree_in_direction_at_every_step(tiny_run):
    _, cfg, summary, S = tiny_run
    angle = S["A.pair.exact.angle"]
    assert len(angle) == cfg["equiv_steps"] + 1 and np.isfinite(angle).all()
    assert angle.max() <= 1e-9  # round-off only (the claim's tolerance is 1e-6)
    assert S["A.pair.exact.per"].max() <= 1e-9
    assert np.nanmax(S["A.pair.exact.outdiff"]) <= 1e-9  # the same function on the fixed batch
    assert summary["equivalence"]["pairs"]["exact"]["max_angle"] == pytest.approx(float(angle.max()))
    assert summary["joint_invariance_error"] <= 1e-12


def test_explr_weights_are_the_weight_decay_weights_times_alpha_to_the_minus_t(tiny_run):
    _, cfg, _, S = tiny_run
    alpha = wd_equivalent_alpha(lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=cfg["momentum"])
    t = np.arange(cfg["equiv_steps"] + 1)
    ratio = S["A.arm.exp.norm"] / S["A.arm.wd.norm"]
    np.testing.assert_allclose(ratio, alpha ** (-t.astype(float)), rtol=1e-10)


def test_without_the_buffer_mapping_the_runs_separate(tiny_run):
    run, _, summary, S = tiny_run
    pairs = summary["equivalence"]["pairs"]
    assert pairs["ablation"]["max_angle"] > 1e-6
    assert pairs["ablation"]["max_angle"] > 1e6 * pairs["exact"]["max_angle"]
    assert S["A.pair.ablation.angle"][1] > 1e-6  # from the first step on
    assert _verdicts(run)["buffer-mapping-needed"]["status"] == "holds"


def test_texp_follows_step_decay_with_weight_decay(tiny_run):
    _, _, summary, S = tiny_run
    assert S["A.pair.texp.angle"].max() <= 1e-9
    assert summary["equivalence"]["pairs"]["texp"]["max_angle"] <= 1e-9


def test_stored_lr_series_are_the_schedules_recomputed(tiny_run):
    _, cfg, _, S = tiny_run
    T = cfg["equiv_steps"]
    kw = dict(weight_decay=cfg["weight_decay"], momentum=cfg["momentum"])
    phases = _phases(cfg, T)
    assert len(phases) == 3 and phases[1][0] == T // 2
    for t in range(T):
        assert S["A.arm.exp.lr"][t] == wd_equivalent_lr(t, lr=cfg["lr"], **kw)
        assert S["A.arm.texp.lr"][t] == texp_lr(t, lr_phases=phases, **kw)
        assert S["A.arm.sd.lr"][t] == step_decay_lr(t, lr_phases=phases)
        assert S["A.arm.wd.lr"][t] == cfg["lr"]
        # what the optimizer used is the un-rescaled LR / 4^k (k = 0 unless renormalized)
        k = S["A.arm.exp.log2_scale"][t]
        assert S["A.arm.exp.opt_lr"][t] * 4.0**k == S["A.arm.exp.lr"][t]


def test_approximate_settings_are_measured_and_float32_drifts(tiny_run):
    _, _, summary, _ = tiny_run
    pairs = summary["equivalence"]["pairs"]
    exact = pairs["exact"]["max_angle"]
    # BN's eps and the trainable non-scale-invariant parameters break the exact map: clearly larger angles
    assert pairs["bn_eps"]["max_angle"] > 100 * exact
    assert pairs["standard"]["max_angle"] > 100 * exact
    assert pairs["float32"]["max_angle"] > 100 * exact
    assert summary["standard_net_invariance_error"] > 1e-3  # the standard net is not scale-invariant


def test_renormalization_keeps_float32_finite_where_the_plain_run_overflows(tiny_run):
    run, cfg, summary, S = tiny_run
    ov = summary["overflow"]
    assert ov["renorm"]["finite_steps"] == cfg["overflow_steps"] and ov["renorm"]["forward_overflow_at"] is None
    assert ov["renorm"]["renormalizations"] > 0
    assert ov["plain"]["overflow_at"] is not None and ov["plain"]["overflow_at"] < cfg["overflow_steps"]
    # bit for bit the same run (times 2^k) until the plain run's BN variance overflows
    assert ov["first_mismatch_step"] is None or ov["first_mismatch_step"] >= ov["plain"]["forward_overflow_at"]
    assert np.isfinite(S["C.renorm.log2_norm"]).all()
    assert np.nanmax(np.abs(S["C.renorm.log2_norm"] - S["C.renorm.log2_norm"][0])) <= math.log2(cfg["renorm_bound"]) + 1
    # tiny runs fewer steps than the claim needs: not judged
    assert _verdicts(run)["rescaling-prevents-overflow"]["status"] == "inconclusive"
    assert _verdicts(run)["directions-agree"]["status"] == "inconclusive"


def test_tiny_bn_net_gradient_matches_autograd():
    net = _TinyBNNet(3)
    W = net.W0.copy()
    grad = np.zeros_like(W)
    loss, finite = net.loss_grad(W, grad)
    assert finite
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(net.X, dtype=torch.float64) @ w.T
    z = (h - h.mean(0)) / h.var(0, unbiased=False).sqrt()
    ref = F.cross_entropy(torch.relu(z) @ torch.tensor(net.V, dtype=torch.float64).T, torch.tensor(net.onehot.argmax(1)))
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-5 * float(w.grad.abs().max()))
    # scale-invariant: the gradient scales as 1/c, exactly for powers of two
    grad2 = np.zeros_like(W)
    net.loss_grad(W * 4, grad2)
    assert np.array_equal(grad2 * 4, grad)


def test_figures_are_redrawn_from_the_run_dir_alone(tiny_run, tmp_path):
    run, _, _, _ = tiny_run
    copy = RunDir(shutil.copytree(run.path, tmp_path / "copy"))
    shutil.rmtree(copy.path / "figures")
    paths = EXPERIMENTS["exp-lr"].figures(copy)
    assert {p.name for p in paths} == {
        "learning_curves.png", "angle_between_runs.png", "weight_norm.png", "lr_schedules.png", "standard_net.png",
        "float32_overflow.png",
    }
    assert all(p.exists() and p.stat().st_size > 5000 for p in paths)
