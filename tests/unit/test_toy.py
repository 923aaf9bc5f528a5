"""The 2-D toy: analytic gradient, scale invariance, WD ≡ exponential LR, run_toy's files and numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bnlab.analysis import first_index_over
from bnlab.errors import UserError
from bnlab.schedules import wd_equivalent_alpha
from bnlab.toy import (
    TOY_LOSS,
    ToyLoss,
    check_settings,
    direction_deviation,
    gradient_residuals,
    run_exp_lr,
    run_gd,
    run_toy,
    simulate,
    toy_grad,
    toy_loss,
    toy_numbers,
)

W0 = (-0.7, 0.7)


def random_points(n=50, seed=0):
    rng = np.random.default_rng(seed)
    r = np.exp(rng.uniform(-3, 3, n))
    th = rng.uniform(-np.pi, np.pi, n)
    return np.stack([r * np.cos(th), r * np.sin(th)], axis=-1)


def test_gradient_matches_torch_autograd():
    pts = random_points()
    w = torch.tensor(pts, dtype=torch.float64, requires_grad=True)
    toy_loss(w).sum().backward()
    np.testing.assert_allclose(toy_grad(pts), w.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_gradient_matches_central_differences():
    h = 1e-6
    for w in random_points(20, seed=1):
        fd = np.array([(toy_loss(w + h * e) - toy_loss(w - h * e)) / (2 * h) for e in np.eye(2)])
        np.testing.assert_allclose(toy_grad(w), fd, rtol=1e-6, atol=1e-8 / np.linalg.norm(w))


def test_gradient_is_perpendicular_and_shrinks_with_radius():
    pts = random_points()
    g = toy_grad(pts)
    cos = np.abs((g * pts).sum(-1)) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(pts, axis=-1) + 1e-300)
    assert cos.max() < 1e-14
    for c in (1e-3, 0.5, 7.0, 1e4):
        np.testing.assert_allclose(toy_grad(c * pts), toy_grad(pts) / c, rtol=1e-13)


def test_loss_is_scale_invariant_with_several_minima():
    pts = random_points()
    for c in (1e-3, 0.5, 7.0, 1e4):
        np.testing.assert_allclose(toy_loss(c * pts), toy_loss(pts), rtol=1e-15, atol=1e-15)
    minima, maxima = TOY_LOSS.critical_angles()
    assert len(minima) >= 2 and len(maxima) == len(minima)
    np.testing.assert_allclose(TOY_LOSS.dtheta(minima), 0.0, atol=1e-12)


def test_plain_gd_obeys_pythagoras():
    traj = run_gd(W0, steps=200, lr=0.5)
    n2 = (traj**2).sum(-1)
    g2 = (toy_grad(traj[:-1]) ** 2).sum(-1)
    np.testing.assert_allclose(n2[1:], n2[:-1] + 0.25 * g2, rtol=1e-14)


@pytest.mark.parametrize(
    "lr,wd,mom,steps",
    [
        (1.0, 0.02, 0.0, 3000),  # the run_toy default: escapes the local minimum, then bounces
        (0.1, 1e-3, 0.9, 2000),  # momentum: needs the mapped buffer
    ],
)
def test_exp_lr_run_has_the_weight_decay_directions_in_float64(lr, wd, mom, steps):
    ref = run_gd(W0, steps=steps, lr=lr, weight_decay=wd, momentum=mom)
    exp = run_exp_lr(W0, steps=steps, lr=lr, weight_decay=wd, momentum=mom)
    assert direction_deviation(ref, exp).max() <= 1e-9
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    t = np.arange(steps + 1)[:, None]
    np.testing.assert_allclose(exp * alpha**t, ref, rtol=1e-8, atol=1e-10)  # w̃_t = α^{-t} w_t
    if mom:
        ablated = run_exp_lr(W0, steps=steps, lr=lr, weight_decay=wd, momentum=mom, preset_buffer=False)
        assert direction_deviation(ref, ablated).max() > 1e-4


def test_float32_runs_stay_float32():
    assert run_gd(W0, steps=5, lr=0.1, weight_decay=0.01, dtype="float32").dtype == np.float32
    assert run_exp_lr(W0, steps=5, lr=0.1, weight_decay=0.01, dtype=np.float32).dtype == np.float32


def test_first_index_over_and_deviation():
    assert first_index_over(np.array([0.0, 1e-9, 1e-3, 0.0]), 1e-6) == 2
    assert first_index_over(np.array([0.0, 1e-9]), 1e-6) is None
    assert first_index_over(np.array([0.0, np.nan]), 1e-6) == 1
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(direction_deviation(a, 5 * a[::-1]), [math.pi / 2, math.pi / 2], rtol=1e-15)


@pytest.mark.parametrize(
    "call",
    [
        lambda: run_gd((0.0, 0.0), steps=5, lr=0.1),
        lambda: run_gd(W0, steps=0, lr=0.1),
        lambda: run_gd(W0, steps=5, lr=0.1, dtype="float16"),
        lambda: run_gd(W0, steps=5, lr=0.1, momentum=1.0),
        lambda: run_exp_lr(W0, steps=100000, lr=1.0, weight_decay=0.02, dtype="float32"),
        lambda: run_toy("unused", steps=10, frames=100),
        lambda: check_settings(steps=10, lr=1.0, weight_decay=0.02, tol=0.0),
        lambda: check_settings(steps=10, lr=1.0, weight_decay=0.02, w0=(1.0, 2.0, 3.0)),
        lambda: check_settings(steps=3000, lr=1.0, weight_decay=0.02),  # float32 exponential run overflows
        lambda: check_settings(steps=10, lr=1.0, weight_decay=1.5),  # no equivalent exponential schedule
        lambda: gradient_residuals(radii=(0.0, 1.0)),
        lambda: gradient_residuals(scales=()),
        lambda: gradient_residuals(angles=0),
    ],
)
def test_bad_input_is_a_user_error(call):
    with pytest.raises(UserError):
        call()


def test_run_toy_writes_the_figures_and_consistent_numbers(tmp_path):
    res = run_toy(tmp_path / "toy", steps=160, frames=6, dpi=40)
    for name in ("toy_surface.png", "toy_trajectories.png", "toy_zoom.gif", "toy_deviation.png"):
        path = tmp_path / "toy" / name
        assert path.stat().st_size > 0
    with Image.open(tmp_path / "toy" / "toy_zoom.gif") as gif:
        assert 1 < gif.n_frames <= 60
    assert not list((tmp_path / "toy").glob(".*"))  # no temporary files left behind
    json.dumps(res)  # plain numbers
    first = res["first_deviation_step"]
    assert set(first) == {"float32", "float64"}
    # float32 deviates first, or float64 not at all
    assert first["float64"] is None or (first["float32"] is not None and first["float32"] <= first["float64"])
    assert res["max_deviation"]["float64"] <= 1e-9 and first["float64"] is None  # the defaults are stable
    assert res["no_wd_stuck"] and res["wd_escaped"] and res["wd_escape_step"] > 0
    assert res["final_loss"]["wd"] < res["final_loss"]["no_wd"]
    assert res["final_loss"]["exp_lr"] == pytest.approx(res["final_loss"]["wd"], abs=1e-9)
    assert res["final_norm"]["exp_lr"] > 10 * res["final_norm"]["wd"]  # α^-160 ≈ 25
    assert res["global_min_loss"] <= res["min_loss_wd"] + 0.05


def test_run_toy_with_momentum_reports_the_ablation(tmp_path):
    res = run_toy(tmp_path, steps=30, lr=0.1, weight_decay=1e-3, momentum=0.9, frames=2, dpi=30, dtype="float32")
    assert res["dtype"] == "float32"
    assert res["max_deviation_without_buffer_preset"] > 1e-6
    assert res["max_deviation"]["float64"] < 1e-12


def test_custom_toy_loss():
    loss = ToyLoss(terms=((0.5, 2, 0.0),), offset=0.0)
    assert loss(np.array([1.0, 0.0])) == pytest.approx(-0.5)
    minima, _ = loss.critical_angles()
    np.testing.assert_allclose(np.abs(minima), [np.pi, 0.0], atol=1e-9)  # -π and 0


def test_check_settings_accepts_the_defaults_and_writes_nothing(tmp_path):
    check_settings(steps=400, lr=1.0, weight_decay=0.02)
    check_settings(steps=1800, lr=1.0, weight_decay=0.02, momentum=0.0, dtype="float32", frames=60, tol=1e-9)
    with pytest.raises(UserError):
        run_toy(tmp_path / "never", steps=10, frames=1)
    assert not (tmp_path / "never").exists()  # validated before anything is written


def test_gradient_residuals_are_round_off_and_can_fail():
    r = gradient_residuals()
    assert r["points"] == 7 * 64
    assert r["orthogonality"] < 1e-14 and r["scaling"] < 1e-13 and r["analytic_gap"] < 1e-13
    json.dumps(r)

    class Tilted(ToyLoss):  # not scale-invariant: L depends on the norm as well
        def __call__(self, w):
            return super().__call__(w) + 0.1 * (w**2).sum(-1)

    bad = gradient_residuals(Tilted(), radii=(0.5, 2.0), angles=8)
    assert bad["orthogonality"] > 1e-3 and bad["scaling"] > 1e-3


def test_simulate_and_toy_numbers_are_what_run_toy_reports(tmp_path):
    sim = simulate(steps=120, lr=1.0, weight_decay=0.02)
    assert set(sim["runs"]) == {"no_wd", "wd", "exp_lr"} and sim["ablation"] is None
    assert all(v.shape == (121, 2) for v in sim["runs"].values())
    assert all(v.shape == (121,) and v.dtype == np.float64 for v in sim["deviation"].values())
    nums = toy_numbers(sim, w0=W0, tol=1e-6)
    res = run_toy(tmp_path, steps=120, frames=2, dpi=30)
    for key, value in nums.items():
        assert res[key] == value, key
    assert nums["first_deviation_step"] == {"float64": None, "float32": 32}
    # the start basin's minimum is the local minimum the plain GD run stalls in
    assert nums["start_basin_min_loss"] == pytest.approx(nums["final_loss"]["no_wd"], abs=1e-12)
    assert nums["global_min_loss"] < nums["start_basin_min_loss"] - 0.3


def test_direction_deviation_is_the_batched_angle_between_with_its_convention():
    import math

    import numpy as np
    import torch

    from bnlab.scale import angle_between
    from bnlab.toy import direction_deviation

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 2)), rng.normal(size=(20, 2))
    a[3], b[3] = 0.0, 0.0  # both zero: 0
    a[5] = 0.0  # one zero: undefined
    b[7, 1] = np.inf
    got = direction_deviation(a, b)
    want = [angle_between(torch.tensor(x), torch.tensor(y)) for x, y in zip(a, b)]
    for g, w in zip(got, want):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-15)
    assert got[3] == 0.0 and math.isnan(got[5]) and math.isnan(got[7])
