"""Unit tests of the exact zero-buffer exponential schedule (bnlab.schedules.ExactExpLR, exact_exp_lr,
exact_scale_factors): the c_t recursion against a closed form, the schedule against float64 SGD with
weight decay (torch.optim.SGD creating its momentum buffers lazily), long runs, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnlab.errors import UserError
from bnlab.scale import angle_between
from bnlab.schedules import (
    ExactExpLR,
    ExpLR,
    exact_exp_lr,
    exact_scale_factors,
    step_decay_lr,
    wd_equivalent_alpha,
    wd_equivalent_lr,
)


def params64(seed=0, shapes=((4, 3), (6,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(True) for s in shapes]


def loss_si(ws, seed=0):
    """A scale-invariant loss of the tensors jointly (a fixed smooth function of w/‖w‖)."""
    w = torch.cat([x.reshape(-1) for x in ws])
    u = w / w.norm()
    return torch.sin(3 * u).sum() + (u[:5] ** 2).sum() ** 2


def run(mode, *, lr_phases, weight_decay, momentum, steps, renormalize=False, renorm_bound=2.0**8, seed=0,
        init_scale=1.0):
    """``mode``: ``"wd"`` = torch SGD with weight decay (step decay by ``lr_phases``); ``"exact"`` = SGD
    without weight decay + ExactExpLR. Returns the weights after every step and the scheduler."""
    ws = params64(seed)
    with torch.no_grad():
        for p in ws:
            p.mul_(init_scale)
    if mode == "wd":
        opt = torch.optim.SGD(ws, lr=lr_phases[0][1], momentum=momentum, weight_decay=weight_decay)
        sched = None
    else:
        opt = torch.optim.SGD(ws, lr=lr_phases[0][1], momentum=momentum)
        sched = ExactExpLR(opt, lr_phases=lr_phases, weight_decay=weight_decay, momentum=momentum,
                           renormalize=renormalize, renorm_bound=renorm_bound)
        assert not any("momentum_buffer" in opt.state.get(p, {}) for p in ws)  # nothing preset: torch creates it
    out = []
    for t in range(steps):
        if sched is None:
            for g in opt.param_groups:
                g["lr"] = step_decay_lr(t, lr_phases=lr_phases)
        opt.zero_grad()
        loss_si(ws).backward()
        opt.step()
        if sched is not None:
            sched.step()
        out.append([p.detach().clone() for p in ws])
    return out, sched


# ----------------------------------------------------------------------------- c_t


@pytest.mark.parametrize("lr,wd,mom", [(0.1, 5e-4, 0.9), (0.1, 0.01, 0.9), (0.5, 0.01, 0.0), (0.05, 0.1, 0.5)])
def test_scale_factors_match_the_closed_form_for_a_constant_lr(lr, wd, mom):
    # c_t = A α^t + B β^t with α, β the roots of x² - (1+γ-λη)x + γ, A + B = c_0 = 1, Aα + Bβ = c_1 = 1 - λη
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    beta = mom / alpha
    A = (1 - lr * wd - beta) / (alpha - beta)
    B = 1 - A
    c = exact_scale_factors(600, lr=lr, weight_decay=wd, momentum=mom)
    t = np.arange(601)
    np.testing.assert_allclose(c, A * alpha**t + B * beta**t, rtol=1e-11)  # round-off of α^t, t ≤ 600
    assert c[0] == 1.0 and c[1] == 1 - wd * lr


def test_scale_factors_follow_the_recursion_for_step_decay():
    phases, wd, mom = [(0, 0.2), (7, 0.02), (15, 0.005)], 0.02, 0.8
    c = exact_scale_factors(30, lr_phases=phases, weight_decay=wd, momentum=mom)
    eta = [step_decay_lr(t, lr_phases=phases) for t in range(31)]
    ref = [1.0, 1.0 - wd * eta[0]]
    for t in range(1, 30):
        r = eta[t] / eta[t - 1]
        ref.append((1 + mom * r - wd * eta[t]) * ref[t] - mom * r * ref[t - 1])
    assert c == pytest.approx(ref, rel=1e-15, abs=0)


def test_exact_lr_is_eta_over_c_t_c_t_plus_1_and_tends_to_explr_growth():
    kw = dict(lr=0.1, weight_decay=5e-3, momentum=0.9)
    c = exact_scale_factors(3001, **kw)
    for t in (0, 1, 2, 10, 500, 3000):
        assert exact_exp_lr(t, **kw) == pytest.approx(0.1 / (c[t] * c[t + 1]), rel=1e-15)
    # c_t -> A α^t: the ratio to ExpLR's η α^(-2t-1) settles at a constant 1/A² (the transient (γ/α)^t dies out)
    ratio = [exact_exp_lr(t, **kw) / wd_equivalent_lr(t, **kw) for t in (1000, 2000, 3000)]
    assert ratio[1] == pytest.approx(ratio[2], rel=1e-10) and ratio[0] == pytest.approx(ratio[2], rel=1e-10)
    assert abs(ratio[2] - 1) > 1e-3  # but not ExpLR's schedule itself: that one needs the preset buffer
    # without momentum c_t = (1 - λη)^t exactly as ExpLR's α^t
    assert exact_exp_lr(50, lr=0.1, weight_decay=0.01, momentum=0.0) == pytest.approx(
        wd_equivalent_lr(50, lr=0.1, weight_decay=0.01, momentum=0.0), rel=1e-13)


def test_long_schedules_leave_the_float_range_gracefully():
    kw = dict(lr=0.1, weight_decay=0.01, momentum=0.9)
    # log2 η̃_t = log2 η - log2 c_t - log2 c_{t+1}, c_t ≈ A α^t: past ~35k steps the LR exceeds float64
    assert exact_exp_lr(100_000, **kw) == math.inf
    c = exact_scale_factors(100_000, **kw)
    assert c[-1] == 0.0 and all(x > 0 for x in c[:30_000])
    ws = params64()
    opt = torch.optim.SGD(ws, lr=0.1, momentum=0.9)
    sched = ExactExpLR(opt, renormalize=True, **kw)
    opt.step()  # no gradients: changes nothing (keeps torch from warning about the order of the calls)
    alpha = wd_equivalent_alpha(**kw)
    for t in range(40_000):
        if t % 4000 == 0:  # the weights stay in range: rescale them as if they had grown by 1/c_t
            with torch.no_grad():
                for p in ws:
                    p.mul_(2.0 ** 100)
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert math.isfinite(lr) and lr > 0 and sched.log2_scale > 0
    # the un-rescaled LR, assembled from mantissa and exponent, follows log2 η - 2 log2 A - (2t+1) log2 α
    t = sched.last_epoch
    m, e = sched._lr_frexp_at(t)
    ref = exact_exp_lr(3000, **kw) / wd_equivalent_lr(3000, **kw)  # 1/A²
    assert math.log2(m) + e == pytest.approx(math.log2(0.1 * ref) - (2 * t + 1) * math.log2(alpha), abs=1e-6)


# ----------------------------------------------------------------------------- against SGD with weight decay


# Weight decay shrinks the norm (by α^t) and so raises the effective LR η/‖w‖² until a deterministic run turns
# unstable and any two runs part by round-off (a property of the dynamics, not of the schedule); these settings
# keep the effective LR within ~10x of its start over the 2000 steps (the paper's η, λ, γ first).
@pytest.mark.parametrize("lr_phases,wd,mom", [
    ([(0, 0.1)], 5e-4, 0.9),  # constant LR, the paper's η, λ, γ
    ([(0, 0.2)], 1e-3, 0.5),
    ([(0, 0.1)], 2e-3, 0.0),  # no momentum: no buffer at all
    ([(0, 0.1), (800, 0.01), (1400, 0.001)], 5e-4, 0.9),  # step decay: an exact TEXP with no buffer correction
])
def test_follows_float64_sgd_with_weight_decay_from_zero_buffers(lr_phases, wd, mom):
    steps = 2000
    ref, _ = run("wd", lr_phases=lr_phases, weight_decay=wd, momentum=mom, steps=steps)
    got, sched = run("exact", lr_phases=lr_phases, weight_decay=wd, momentum=mom, steps=steps)
    assert max(angle_between(a, b) for a, b in zip(ref, got)) <= 1e-10
    # the map itself: w_t = c_t · w̃_t
    c = exact_scale_factors(steps, lr_phases=lr_phases, weight_decay=wd, momentum=mom)
    for t in (1, 10, 100, steps - 1):
        for a, b in zip(ref[t], got[t]):
            torch.testing.assert_close(a, c[t + 1] * b, rtol=1e-9, atol=0)
    assert sched.wd_run_factor() == pytest.approx(c[steps], rel=1e-15)
    assert sched.scale_factor() == pytest.approx(c[steps], rel=1e-15)


def test_renormalized_run_is_the_same_run_rescaled_bit_for_bit():
    # a small initial norm: a large effective LR, so the norm grows and is rescaled
    kw = dict(lr_phases=[(0, 0.2), (60, 0.05)], weight_decay=0.05, momentum=0.5, steps=120, init_scale=1 / 64)
    plain, s0 = run("exact", **kw)
    scaled, s1 = run("exact", renormalize=True, renorm_bound=2.0, **kw)
    assert s1.renormalizations > 0 and s0.renormalizations == 0
    for a, b in zip(plain[-1], scaled[-1]):
        assert torch.equal(b * s1.rescale_factor, a)
    assert s1.unrescaled_lr() == s0.unrescaled_lr() == exact_exp_lr(120, lr_phases=kw["lr_phases"],
                                                                      weight_decay=0.05, momentum=0.5)
    assert s1.wd_run_factor() == pytest.approx(s0.wd_run_factor() * s1.rescale_factor, rel=1e-15)  # w_t = f · p


def test_explr_without_its_preset_is_not_exact_but_this_schedule_is():
    # the contrast: ExpLR from the same zero buffers (its preset removed) departs at once
    ref, _ = run("wd", lr_phases=[(0, 0.1)], weight_decay=2e-3, momentum=0.9, steps=50)
    ws = params64()
    opt = torch.optim.SGD(ws, lr=0.1, momentum=0.9)
    ExpLR_sched = ExpLR(opt, lr=0.1, weight_decay=2e-3, momentum=0.9, renormalize=False)
    for p in ws:
        opt.state[p].pop("momentum_buffer")
    worst = 0.0
    for t in range(50):
        opt.zero_grad()
        loss_si(ws).backward()
        opt.step()
        ExpLR_sched.step()
        worst = max(worst, angle_between(ref[t], [p.detach() for p in ws]))
    assert worst > 1e-6


def test_the_lr_used_is_the_pure_function_and_earlier_steps_can_be_asked():
    kw = dict(lr_phases=[(0, 0.1), (5, 0.01)], weight_decay=0.01, momentum=0.9)
    ws = params64()
    opt = torch.optim.SGD(ws, lr=0.1, momentum=0.9)
    sched = ExactExpLR(opt, renormalize=False, **kw)
    for t in range(12):
        assert opt.param_groups[0]["lr"] == exact_exp_lr(t, **kw) == sched.unrescaled_lr()
        opt.zero_grad()
        loss_si(ws).backward()
        opt.step()
        sched.step()
    assert sched.unrescaled_lr(3) == exact_exp_lr(3, **kw)  # an earlier step: recomputed
    assert sched.get_last_lr()[0] == exact_exp_lr(12, **kw)
    assert not any(isinstance(v, torch.Tensor) for v in sched.state_dict().values())


# ----------------------------------------------------------------------------- validation


def test_refuses_bad_arguments_with_one_line():
    ws = params64()
    with pytest.raises(UserError, match="exactly one"):
        ExactExpLR(torch.optim.SGD(ws, lr=0.1), lr=0.1, lr_phases=[(0, 0.1)], weight_decay=0.01, momentum=0.0)
    with pytest.raises(UserError, match="exactly one"):
        exact_exp_lr(3, weight_decay=0.01, momentum=0.0)
    with pytest.raises(UserError, match="weight_decay=0"):
        ExactExpLR(torch.optim.SGD(ws, lr=0.1, weight_decay=0.1), lr=0.1, weight_decay=0.01, momentum=0.0)
    with pytest.raises(UserError, match="start step|step 0"):
        exact_exp_lr(0, lr_phases=[(3, 0.1)], weight_decay=0.01, momentum=0.0)
    # λη beyond (1-√γ)²: the roots are complex and c_t turns negative
    with pytest.raises(UserError, match="c_t > 0"):
        exact_exp_lr(200, lr=1.0, weight_decay=0.1, momentum=0.9)
    with pytest.raises(UserError, match="c_t > 0"):
        exact_scale_factors(3, lr=1.0, weight_decay=1.5, momentum=0.0)
    # the optimizer has stepped already: its buffers are not torch's zero start
    opt = torch.optim.SGD(ws, lr=0.1, momentum=0.9)
    loss_si(ws).backward()
    opt.step()
    with pytest.raises(UserError, match="already holds momentum buffers") as err:
        ExactExpLR(opt, lr=0.1, weight_decay=0.01, momentum=0.9)
    assert "\n" not in str(err.value)  # one line
