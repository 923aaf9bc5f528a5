"""Unit tests of bnlab.schedules: the α root, the LR sequences, the buffer preset, validation,
renormalization bookkeeping, check_hparams."""

from __future__ import annotations

import math

import pytest
import torch

from bnlab.errors import UserError
from bnlab.scale import angle_between
from bnlab.schedules import (
    TEXP,
    ExpLR,
    check_hparams,
    step_decay_lr,
    texp_lr,
    wd_equivalent_alpha,
    wd_equivalent_buffer,
    wd_equivalent_lr,
)


def params64(seed=0, shapes=((4, 3), (6,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(True) for s in shapes]


def loss_si(ws):
    """A scale-invariant loss of the tensors jointly."""
    w = torch.cat([x.reshape(-1) for x in ws])
    u = w / w.norm()
    return torch.sin(3 * u).sum() + (u[:5] ** 2).sum() ** 2


def train(ws, opt, sched, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_si(ws).backward()
        opt.step()
        if sched is not None:
            sched.step()


# ----------------------------------------------------------------------------- alpha and the pure schedules


@pytest.mark.parametrize("lr,wd,mom", [(0.1, 5e-4, 0.9), (0.5, 0.01, 0.0), (0.05, 0.1, 0.5), (1.0, 0.0, 0.3)])
def test_alpha_is_the_larger_root(lr, wd, mom):
    a = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    assert a * a - (1 + mom - lr * wd) * a + mom == pytest.approx(0.0, abs=1e-15)
    assert a >= mom / a - 1e-15  # the other root is γ/α
    assert 0 < a <= 1


def test_alpha_closed_forms():
    assert wd_equivalent_alpha(lr=0.1, weight_decay=0.01, momentum=0.0) == pytest.approx(1 - 0.1 * 0.01, rel=1e-15)
    assert wd_equivalent_alpha(lr=0.3, weight_decay=0.0, momentum=0.9) == 1.0
    a = wd_equivalent_alpha(lr=0.1, weight_decay=5e-4, momentum=0.9)
    assert a == pytest.approx(1 - 0.1 * 5e-4 / (1 - 0.9), rel=1e-5)


def test_alpha_at_the_double_root():
    mom = 0.81
    a = wd_equivalent_alpha(lr=1.0, weight_decay=(1 - math.sqrt(mom)) ** 2, momentum=mom)
    assert a == pytest.approx(math.sqrt(mom), rel=1e-7)


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1, weight_decay=0.1, momentum=0.9),  # complex roots
        dict(lr=1.0, weight_decay=1.0, momentum=0.0),  # alpha = 0
        dict(lr=0.1, weight_decay=0.0, momentum=1.0),
        dict(lr=0.1, weight_decay=0.0, momentum=-0.1),
        dict(lr=0.0, weight_decay=0.0, momentum=0.0),
        dict(lr=-1.0, weight_decay=0.0, momentum=0.0),
        dict(lr=0.1, weight_decay=-1e-4, momentum=0.0),
        dict(lr=float("nan"), weight_decay=0.0, momentum=0.0),
        dict(lr=0.1, weight_decay=0.0, momentum=True),
        dict(lr="0.1", weight_decay=0.0, momentum=0.0),
    ],
)
def test_alpha_rejects_bad_values_with_one_line(kw):
    with pytest.raises(UserError) as info:
        wd_equivalent_alpha(**kw)
    assert "\n" not in str(info.value)


def test_wd_equivalent_lr_sequence():
    kw = dict(lr=0.1, weight_decay=0.01, momentum=0.9)
    a = wd_equivalent_alpha(**kw)
    assert wd_equivalent_lr(0, **kw) == pytest.approx(0.1 / a, rel=1e-15)
    for t in (1, 10, 1000):
        assert wd_equivalent_lr(t, **kw) / wd_equivalent_lr(t - 1, **kw) == pytest.approx(a**-2, rel=1e-12)
    assert wd_equivalent_lr(0, lr=0.1, weight_decay=0.0, momentum=0.9) == 0.1


def test_wd_equivalent_lr_overflows_to_inf_and_rejects_bad_steps():
    assert wd_equivalent_lr(10**7, lr=0.1, weight_decay=0.01, momentum=0.0) == math.inf
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(UserError):
            wd_equivalent_lr(bad, lr=0.1, weight_decay=0.01, momentum=0.0)


def test_texp_lr_growth_and_boundary_factor():
    phases = [(0, 0.1), (5, 0.01)]
    kw = dict(lr_phases=phases, weight_decay=0.01, momentum=0.5)
    a0 = wd_equivalent_alpha(lr=0.1, weight_decay=0.01, momentum=0.5)
    a1 = wd_equivalent_alpha(lr=0.01, weight_decay=0.01, momentum=0.5)
    for t in range(5):
        assert texp_lr(t, **kw) == wd_equivalent_lr(t, lr=0.1, weight_decay=0.01, momentum=0.5)
    assert texp_lr(5, **kw) / texp_lr(4, **kw) == pytest.approx((0.01 / 0.1) / (a0 * a1), rel=1e-13)
    assert texp_lr(9, **kw) / texp_lr(8, **kw) == pytest.approx(a1**-2, rel=1e-13)
    assert texp_lr(7, **kw) == pytest.approx(0.01 * a1 ** -(2 * 2 + 1) * a0 ** -(2 * 5), rel=1e-13)


def test_step_decay_lr():
    phases = [(0, 0.1), (10, 0.01), (20, 0.001)]
    assert [step_decay_lr(t, lr_phases=phases) for t in (0, 9, 10, 19, 20, 1000)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


@pytest.mark.parametrize(
    "phases",
    [[], [(1, 0.1)], [(0, 0.1), (0, 0.01)], [(0, 0.1), (5, -0.01)], [(0, 0.1), (5,)], "fast", [(0.5, 0.1)]],
)
def test_bad_phases(phases):
    with pytest.raises(UserError):
        texp_lr(0, lr_phases=phases, weight_decay=0.0, momentum=0.0)


# ----------------------------------------------------------------------------- ExpLR mechanics


def test_explr_presets_the_mapped_buffer():
    ws = params64()
    w0 = [w.detach().clone() for w in ws]
    lr, wd, mom = 0.1, 0.01, 0.9
    opt = torch.optim.SGD(ws, lr=lr, momentum=mom)
    ExpLR(opt, lr=lr, weight_decay=wd, momentum=mom)
    a = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    for w, p in zip(w0, ws):
        buf = opt.state[p]["momentum_buffer"]
        torch.testing.assert_close(buf, -(1 - a) / (lr * a) * w, rtol=1e-12, atol=0)
        torch.testing.assert_close(buf, wd_equivalent_buffer(w, lr=lr, weight_decay=wd, momentum=mom), rtol=0, atol=0)


def test_explr_without_momentum_creates_no_buffer():
    ws = params64()
    opt = torch.optim.SGD(ws, lr=0.1)
    ExpLR(opt, lr=0.1, weight_decay=0.01, momentum=0.0)
    assert all("momentum_buffer" not in opt.state[p] for p in ws)


def test_explr_sets_the_closed_form_lr_each_step():
    ws = params64()
    kw = dict(lr=0.1, weight_decay=0.01, momentum=0.9)
    opt = torch.optim.SGD(ws, lr=123.0, momentum=0.9)
    sched = ExpLR(opt, renormalize=False, **kw)
    for t in range(30):
        assert opt.param_groups[0]["lr"] == wd_equivalent_lr(t, **kw)
        assert sched.get_last_lr() == [wd_equivalent_lr(t, **kw)]
        train(ws, opt, sched, 1)


def test_first_step_matches_the_weight_decay_step():
    # The PyTorch detail the preset relies on: with a buffer present, step 0 uses γ·buf + g.
    lr, wd, mom = 0.2, 0.05, 0.5
    a_ws, b_ws = params64(), params64()
    a_opt = torch.optim.SGD(a_ws, lr=lr, momentum=mom, weight_decay=wd)
    b_opt = torch.optim.SGD(b_ws, lr=lr, momentum=mom)
    sched = ExpLR(b_opt, lr=lr, weight_decay=wd, momentum=mom)
    train(a_ws, a_opt, None, 1)
    train(b_ws, b_opt, sched, 1)
    a = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    for x, y in zip(a_ws, b_ws):
        torch.testing.assert_close(y.detach(), x.detach() / a, rtol=1e-14, atol=1e-15)  # w̃_1 = α^{-1} w_1


def test_explr_continues_a_weight_decay_run():
    lr, wd, mom = 0.1, 0.02, 0.9
    ref = params64()
    ref_opt = torch.optim.SGD(ref, lr=lr, momentum=mom, weight_decay=wd)
    train(ref, ref_opt, None, 60)
    ws = params64()
    opt = torch.optim.SGD(ws, lr=lr, momentum=mom, weight_decay=wd)
    train(ws, opt, None, 20)
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    sched = ExpLR(opt, lr=lr, weight_decay=wd, momentum=mom)  # reads the buffer as the WD run's
    train(ws, opt, sched, 40)
    assert angle_between(torch.cat([p.detach().reshape(-1) for p in ws]),
                         torch.cat([p.detach().reshape(-1) for p in ref])) < 1e-12


def test_rescale_factor_and_wd_run_factor_recover_both_runs():
    lr, wd, mom = 0.2, 0.2, 0.5
    ref = params64()
    ref_opt = torch.optim.SGD(ref, lr=lr, momentum=mom, weight_decay=wd)
    plain = params64()
    plain_opt = torch.optim.SGD(plain, lr=lr, momentum=mom)
    plain_sched = ExpLR(plain_opt, lr=lr, weight_decay=wd, momentum=mom, renormalize=False)
    ws = params64()
    opt = torch.optim.SGD(ws, lr=lr, momentum=mom)
    sched = ExpLR(opt, lr=lr, weight_decay=wd, momentum=mom, renorm_bound=2.0)
    for _ in range(50):
        train(ref, ref_opt, None, 1)
        train(plain, plain_opt, plain_sched, 1)
        train(ws, opt, sched, 1)
    assert sched.renormalizations > 0 and sched.log2_scale > 0
    assert sched.rescale_factor == 2.0**sched.log2_scale
    for p, q, r in zip(ws, plain, ref):
        assert torch.equal(p.detach() * sched.rescale_factor, q.detach())
        torch.testing.assert_close(p.detach() * sched.wd_run_factor(), r.detach(), rtol=1e-9, atol=1e-12)
    assert sched.unrescaled_lr() == plain_sched.get_last_lr()[0]
    assert opt.param_groups[0]["lr"] == plain_sched.get_last_lr()[0] / 4.0**sched.log2_scale


def test_renormalization_scales_weights_down_and_buffers_up_exactly():
    ws = params64()
    opt = torch.optim.SGD(ws, lr=0.1, momentum=0.9)
    sched = ExpLR(opt, lr=0.1, weight_decay=0.001, momentum=0.9, renorm_bound=4.0)
    train(ws, opt, sched, 1)
    with torch.no_grad():
        for p in ws:
            p.mul_(32.0)  # pretend the norm grew 32x
    before = [p.detach().clone() for p in ws]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in ws]
    lr_before = sched.unrescaled_lr(2)
    sched.step()
    assert sched.log2_scale == 5
    for p, b, v in zip(ws, before, bufs):
        assert torch.equal(p.detach(), b / 32.0)
        assert torch.equal(opt.state[p]["momentum_buffer"], v * 32.0)
    assert opt.param_groups[0]["lr"] == lr_before / 1024.0
    with torch.no_grad():
        for p in ws:
            p.mul_(1 / 64.0)  # and now shrink it: rescaled up again
    sched.step()
    assert sched.log2_scale == -1


def test_state_dict_holds_no_tensors():
    ws = params64()
    opt = torch.optim.SGD(ws, lr=0.1, momentum=0.9)
    sched = TEXP(opt, lr_phases=[(0, 0.1), (3, 0.01)], weight_decay=0.01, momentum=0.9)
    state = sched.state_dict()
    assert "_params" not in state and "optimizer" not in state
    assert not any(isinstance(v, torch.Tensor) for v in state.values())


def test_params_limits_the_schedule_to_their_groups():
    a, b = params64(1), params64(2)
    opt = torch.optim.SGD([{"params": a}, {"params": b, "lr": 0.05}], lr=0.1, momentum=0.9)
    sched = ExpLR(opt, lr=0.1, weight_decay=0.01, momentum=0.9, params=a)
    assert opt.param_groups[1]["lr"] == 0.05
    assert all("momentum_buffer" not in opt.state[p] for p in b)
    train(a + b, opt, sched, 1)
    assert opt.param_groups[1]["lr"] == 0.05
    assert opt.param_groups[0]["lr"] == wd_equivalent_lr(1, lr=0.1, weight_decay=0.01, momentum=0.9)


@pytest.mark.parametrize(
    "make_opt,kw,match",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), {}, "Nesterov"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), {}, "weight_decay=0"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), {}, "dampening"),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), {}, "SGD"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5), {}, "momentum"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"momentum": 1.2}, "momentum"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"renorm_bound": 1.5}, "renorm_bound"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"renormalize": "yes"}, "renormalize"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"params": [torch.zeros(2, requires_grad=True)]}, "not in the optimizer"),
    ],
)
def test_explr_refuses_what_it_cannot_make_equivalent(make_opt, kw, match):
    ws = params64()
    args = dict(lr=0.1, weight_decay=0.01, momentum=0.9)
    args.update(kw)
    with pytest.raises(UserError, match=match) as info:
        ExpLR(make_opt(ws), **args)
    assert "\n" not in str(info.value)


def test_refuses_mixed_groups_zero_weights_and_epoch_argument():
    a, b = params64(1), params64(2)
    opt = torch.optim.SGD([{"params": a + b[:1]}, {"params": b[1:]}], lr=0.1, momentum=0.9)
    with pytest.raises(UserError, match="mixes"):
        ExpLR(opt, lr=0.1, weight_decay=0.01, momentum=0.9, params=a)
    zero = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(UserError, match="nonzero"):
        ExpLR(torch.optim.SGD(zero, lr=0.1), lr=0.1, weight_decay=0.01, momentum=0.0)
    sched = ExpLR(torch.optim.SGD(a, lr=0.1), lr=0.1, weight_decay=0.01, momentum=0.0)
    with pytest.raises(UserError, match="epoch"):
        sched.step(3)


def test_texp_refuses_bad_phases_and_exposes_alphas():
    ws = params64()
    with pytest.raises(UserError):
        TEXP(torch.optim.SGD(ws, lr=0.1), lr_phases=[(2, 0.1)], weight_decay=0.01, momentum=0.0)
    sched = TEXP(torch.optim.SGD(ws, lr=0.1), lr_phases=[(0, 0.1), (5, 0.01)], weight_decay=0.01, momentum=0.0)
    assert sched.alphas == pytest.approx([1 - 0.1 * 0.01, 1 - 0.01 * 0.01], rel=1e-15)


def test_check_hparams_accepts_and_refuses():
    assert check_hparams(0.1, 0, 0.9) == (0.1, 0.0, 0.9)
    for bad in ((0.0, 0.0, 0.0), (0.1, -1e-3, 0.0), (0.1, 0.0, 1.0), (float("nan"), 0.0, 0.0), (True, 0.0, 0.0)):
        with pytest.raises(UserError):
            check_hparams(*bad)
