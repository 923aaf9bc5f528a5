"""The Bjorck et al. (2018) experiments, ``divergence`` and ``activations``: the numbers make sense at tiny size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnlab import models
from bnlab.analysis import deep_vs_shallow, diverging_updates, first_exceeding, fit_growth, median_curve
from bnlab.experiments import run_experiment
from bnlab.experiments.activations import main_path_layers, singular_value_products, stream_layers


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bjorck")
    runs = {}
    for name in ("divergence", "activations"):
        run, reused = run_experiment(name, profile="tiny", out=out, device="cpu", progress=False)
        assert not reused and run.complete
        runs[name] = run
    return runs


# ----------------------------------------------------------------------------- pure functions
def test_singular_value_ratio_grows_with_k_for_xavier_products():
    n = 32
    sv = singular_value_products(n, 24, 4, math.sqrt(1.0 / n), seed=0)
    med = np.median(sv["ratio"], axis=0)
    assert med[0] > 1.0
    assert med[5] > med[0] and med[11] > med[5] and med[23] > med[11]
    assert med[23] > 3 * med[0]
    # the largest singular value of a Xavier product grows, the mean one does not keep up
    assert np.median(sv["smax"][:, -1]) > np.median(sv["smax"][:, 0])


def test_the_ratio_does_not_depend_on_the_scaling():
    """He and Xavier differ by a scalar per matrix: with the same draws the ratios agree."""
    he = singular_value_products(16, 10, 2, math.sqrt(2 / 16), seed=3)
    xa = singular_value_products(16, 10, 2, math.sqrt(1 / 16), seed=3)
    assert np.allclose(he["ratio"], xa["ratio"], rtol=1e-9)
    assert np.allclose(he["smax"], xa["smax"] * np.sqrt(2.0) ** np.arange(1, 11), rtol=1e-9)


def test_fit_growth_recovers_an_exponential_over_the_inner_layers():
    v = 3.0 * 1.2 ** np.arange(10)
    v[0], v[-1] = 100.0, 1e-3  # first and last layers are excluded from the fit
    f = fit_growth(v)
    assert f["factor"] == pytest.approx(1.2) and f["total"] == pytest.approx(1.2**7) and (f["first"], f["last"]) == (1, 8)
    assert math.isnan(fit_growth([1.0, 2.0, 3.0])["factor"])  # one inner layer: no fit


def test_first_alpha_above_one_counts_non_finite_values():
    a = np.array([1e-3, 1e-2, 1e-1, 1.0])
    assert first_exceeding(a, np.array([0.9, 0.8, 1.5, 2.0])) == 1e-1
    assert first_exceeding(a, np.array([0.9, np.nan, 0.5, 0.5])) == 1e-2
    assert math.isnan(first_exceeding(a, np.array([0.9, 0.8, 0.7, 1.0])))
    rel = np.array([[0.9, np.inf, 2.0, np.nan], [0.8, 0.5, 3.0, 5.0], [0.7, 0.6, 0.5, np.nan]])
    assert median_curve(rel).tolist() == [0.8, 0.6, 2.0, np.inf]


def test_deep_vs_shallow_growth():
    std = np.ones((3, 8))
    std[-1] = [1, 2, 2, 3, 5, 40, 40, 1]  # inner layers 1..6; thirds: [1, 2] and [5, 6]
    d = deep_vs_shallow(std)
    assert d["shallow"] == pytest.approx(2.0) and d["deep"] == pytest.approx(40.0) and d["ratio"] == pytest.approx(20.0)
    std[-1, 6] = np.inf
    assert deep_vs_shallow(std)["ratio"] == math.inf
    # a layer dead at both ends (std 0) has no growth and is left out; one coming alive grew without bound
    std = np.ones((2, 8))
    std[:, 1] = 0.0
    std[-1, 2:7] = [4, 1, 1, 9, 9]
    d = deep_vs_shallow(std)
    assert d["shallow"] == pytest.approx(4.0) and d["deep"] == pytest.approx(9.0)
    std[0, 5] = 0.0
    assert deep_vs_shallow(std)["deep"] == math.inf


def test_stream_layers_are_the_stem_the_blocks_and_the_classifier():
    net = models.make("preresnet", norm="none", in_shape=(1, 40), num_classes=10, depth=14, width=4, seed=0)
    names = [n for n, m in net.named_modules() if stream_layers(n, m)]
    assert names == ["features.0", *[f"features.{i}" for i in range(1, 7)], "classifier"]


def test_main_path_layers_skip_shortcuts():
    net = models.make("preresnet", norm="none", in_shape=(1, 8, 8), num_classes=10, depth=26, width=4, seed=0)
    names = [n for n, m in net.named_modules() if main_path_layers(n, m)]
    assert len(names) == 26 and not any("shortcut" in n for n in names) and names[-1] == "classifier"


# ----------------------------------------------------------------------------- the tiny runs
def test_divergence_relative_loss_at_small_alpha_is_below_one_for_both_nets(tiny_runs):
    run = tiny_runs["divergence"]
    npz = run.load_arrays("relative_loss.npz")
    cfg = run.read_json("config.json")["config"]
    alphas = npz["alphas"]
    assert np.all(np.diff(alphas) > 0)
    n_seeds, n_steps = len(cfg["seeds"]), len(cfg["rl_steps"])
    for norm in ("bn", "none"):
        rel = npz[f"rel_{norm}"]
        assert rel.shape == (n_seeds, cfg["rl_batches"], len(alphas))
        assert np.all(rel[..., 0] < 1.0) and np.all(rel[..., 0] > 0.9)  # a tiny gradient step lowers the loss, a little
        assert np.all(npz[f"loss0_{norm}"] > 0)
        tr = npz[f"rel_train_{norm}"]
        assert tr.shape == (n_steps, n_seeds, cfg["rl_train_batches"], len(alphas)) and np.all(tr[..., 0] < 1.0)
        # different weights after training: not the curves at initialization
        assert not np.allclose(tr[0, :, 0], rel[:, 0])
    s = run.read_json("summary.json")
    # the judged curve is the median over seeds x batches of the stored curves
    for norm in ("bn", "none"):
        med = median_curve(npz[f"rel_{norm}"].reshape(-1, len(alphas)))
        assert np.allclose(med, s["relative_loss"][norm]["median"], equal_nan=True)
    a_plain = first_exceeding(alphas, s["relative_loss"]["none"]["median"])
    a_bn = first_exceeding(alphas, s["relative_loss"]["bn"]["median"])
    assert any(np.isclose(a_plain, alphas)) and (math.isnan(a_bn) or a_plain <= a_bn)


def test_divergence_sweep_covers_every_lr_seed_and_both_nets(tiny_runs):
    run = tiny_runs["divergence"]
    s = run.read_json("summary.json")
    cfg = run.read_json("config.json")["config"]
    assert sorted(s["arms"]) == sorted(f"{n}@{lr:g}" for n in cfg["norms"] for lr in cfg["lrs"])
    for a in s["arms"].values():
        assert a["seeds"] == list(cfg["seeds"]) and len(a["test_acc"]) == len(cfg["seeds"]) == len(a["diverged"])
        for acc, div in zip(a["test_acc"], a["diverged"]):
            assert div or 0.0 <= acc <= 1.0
    assert s["sweep"]["bn"]["vectorized"] and s["sweep"]["none"]["vectorized"]
    recs = run.metrics()
    for seed in cfg["seeds"]:
        steps = [r for r in recs if r.get("arm") == "bn@0.001" and r.get("seed") == seed and r.get("event") is None]
        i = s["arms"]["bn@0.001"]["seeds"].index(seed)
        assert [r["step"] for r in steps] == list(range(len(steps))) and len(steps) == s["arms"]["bn@0.001"]["steps"][i]
    # the seeds are different initializations: different accuracies or losses
    losses = {seed: [r["loss"] for r in recs if r.get("arm") == "bn@0.1" and r.get("seed") == seed and r.get("event") is None]
              for seed in cfg["seeds"]}
    assert losses[cfg["seeds"][0]][0] != losses[cfg["seeds"][1]][0]


def test_divergence_noise_is_the_closed_form_of_its_own_trace_covariance(tiny_runs):
    run = tiny_runs["divergence"]
    nz = run.read_json("summary.json")["noise"]
    n, bs, alphas = nz["n"], np.asarray(nz["batch_sizes"], float), np.asarray(nz["alphas"], float)
    for norm in ("none", "bn"):
        want = alphas[:, None] ** 2 * nz[norm]["trace_cov"] * ((n - bs) / (n - 1) / bs)[None, :]
        assert np.allclose(nz[norm]["variance"], want, rtol=1e-10)
        assert nz[norm]["fit"]["p_alpha"] == pytest.approx(2.0)
    sb = nz["bn_sampled"]
    assert len(sb["per_batch"]) == len(bs) and all(len(r) == sb["n_batches"] for r in sb["per_batch"])
    assert np.allclose(np.asarray(sb["variance"]), alphas[:, None] ** 2 * np.asarray(sb["gradient_variance"])[None, :])


def test_activations_init_statistics_and_output_gradients(tiny_runs):
    run = tiny_runs["activations"]
    a = run.load_arrays("activations.npz")
    cfg = run.read_json("config.json")["config"]
    assert len(a["init_none_layers"]) == cfg["depth"] == len(a["init_bn_layers"])
    for norm in ("none", "bn"):
        assert np.all(a[f"init_{norm}_std"] > 0)
        assert np.all(a[f"init_{norm}_std_q10"] <= a[f"init_{norm}_std"] * (1 + 1e-9))
        assert a[f"init_{norm}_std_seeds"].shape == (len(cfg["init_seeds"]), cfg["depth"])
        assert np.allclose(a[f"init_{norm}_std_seeds"][0], a[f"init_{norm}_std"])
        g = a[f"grad_{norm}"]
        n = len(a["grad_labels"])
        assert g.shape == (n, 10)
        # cross-entropy, mean reduction: each row is (softmax - onehot) / N: sums to 0, true class negative
        assert np.allclose(g.sum(1), 0.0, atol=1e-7)
        assert np.all(g[np.arange(n), a["grad_labels"]] < 0) and np.all(g[np.arange(n), a["grad_labels"]] >= -1.0 / n - 1e-7)
    s = run.read_json("summary.json")
    for norm in ("none", "bn"):
        assert all(0 <= og["ratio"] <= 1 for og in s[f"init_{norm}"]["output_gradients"])
        assert len(s[f"init_{norm}"]["growth"]) == len(cfg["init_seeds"])
    assert s["sv_xavier"]["ratio_kmax"] > s["sv_xavier"]["ratio_k1"] > 1.0


def test_activations_jacobian_and_cosine_along_the_residual_stream(tiny_runs):
    run = tiny_runs["activations"]
    a = run.load_arrays("activations.npz")
    s = run.read_json("summary.json")
    cfg = run.read_json("config.json")["config"]
    n_blocks = (cfg["depth"] - 2) // 2
    names = list(a["stream_layers"])
    assert names[0] == "features.0" and names[-1] == "classifier" and len(names) == n_blocks + 2
    for norm in ("none", "bn"):
        r, c = a[f"jac_{norm}_ratio"], a[f"cos_{norm}"]
        assert r.shape == c.shape == (len(cfg["init_seeds"]), len(names))
        assert np.all(r >= 1.0) and np.all(np.abs(c) <= 1.0 + 1e-9)
        rise = s[f"init_{norm}"]["cosine_rise"]
        assert rise == pytest.approx(list(c[:, -2] - c[:, 1]))
        assert [f["total"] for f in s[f"init_{norm}"]["jacobian_growth"]] == pytest.approx([fit_growth(v)["total"] for v in r])


def test_activations_interpolation_endpoints_agree_with_the_training_run(tiny_runs):
    run = tiny_runs["activations"]
    a = run.load_arrays("activations.npz")
    div = run.read_json("summary.json")["diverging_run"]
    assert "interp_s" in a, "the tiny plain run (deterministic) has a diverging update to interpolate along"
    assert a["interp_s"][0] == 0.0 and a["interp_s"][-1] == 1.0
    t = int(a["interp_step"])
    assert t == div["diverging_update"]
    recs = [r for r in run.metrics() if r.get("kind") == "diverging_run"]
    # the repeated run reproduces the first one: s=0 is that step's training loss, s=1/s=0 its relative loss
    assert a["interp_loss"][0] == pytest.approx(recs[t]["loss"], rel=1e-6)
    assert a["interp_loss"][-1] / a["interp_loss"][0] == pytest.approx(recs[t]["interp/rel_loss"], rel=1e-6)
    assert recs[t]["interp/rel_loss"] > 1.0
    assert a["interp_std"].shape == (len(a["interp_s"]), len(a["train_layers"]))
    assert np.allclose(a["interp_std"][0], a["train_none_std"][t], rtol=1e-5)


def test_diverging_update_is_the_start_of_the_final_loss_increasing_streak():
    rels = [(0, 4.0), (1, 0.2), (2, 0.04), (3, 199.0), (4, 3.6e4), (5, float("nan"))]
    assert diverging_updates(rels, diverged=True) == (0, 3)
    assert diverging_updates(rels[:3], diverged=False) == (0, 0)
    assert diverging_updates([(0, 0.5), (1, 0.9)], diverged=False) == (None, None)
    assert diverging_updates([(0, 0.5), (1, 2.0)], diverged=True) == (1, 1)


def test_judging_the_stored_summary_again_gives_the_stored_verdicts(tiny_runs):
    from bnlab.experiments import get_experiment

    for name, run in tiny_runs.items():
        exp = get_experiment(name)
        stored = run.read_json("verdicts.json")
        got = exp.judge(run.read_json("summary.json"), exp.Thresholds(**stored["thresholds"]))
        assert [(v.claim, v.status) for v in got] == [(r["id"], r["status"]) for r in stored["verdicts"]]
        for v, r in zip(got, stored["verdicts"]):
            assert v.value == r["value"] or (v.value != v.value and r["value"] != r["value"]), (name, v.claim)
            assert v.rule == r["rule"] and v.rule
