"""The lockstep trainer: arms stepped side by side on one batch stream, compared by a hook."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.data import ArrayData
from bnlab.lockstep import AngularUpdateTracker, Arm, PairTracker, joint_norm, lockstep
from bnlab.scale import angle_between
from bnlab.schedules import ExpLR, wd_equivalent_alpha
from bnlab.train import train


def _data(n: int = 40, seed: int = 0) -> ArrayData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return ArrayData(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), 3)


def _net(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


def _arm(name: str, model: nn.Module, lr: float = 0.1, **kw) -> Arm:
    return Arm(name, model, dict(model.named_parameters()), torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), **kw)


def test_two_identical_arms_stay_bit_identical_and_the_tracker_leaves_them_untouched():
    data = _data()
    arms = {"a": _arm("a", _net()), "b": _arm("b", _net())}
    alone = {"c": _arm("c", _net())}
    tracker = PairTracker(arms, {"ab": ("a", "b", 1)}, steps=7, fixed_x=data.x[:16])
    series = lockstep(arms, data, steps=7, batch_size=16, seed=3, hooks=[tracker])
    lockstep(alone, data, steps=7, batch_size=16, seed=3)
    ser = tracker.series["ab"]
    assert ser["angle"].shape == (8,) and ser["per"].shape == (5, 8) and list(ser["names"]) == ["0.weight", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert (ser["angle"] == 0).all() and (ser["per"] == 0).all() and (ser["outdiff"] == 0).all()
    np.testing.assert_array_equal(series["a"]["loss"], series["b"]["loss"])
    # the comparison ran the models statelessly: BN running statistics as in an arm trained without it
    for m in ("a", "b"):
        for (n, t), (_, u) in zip(arms[m].model.state_dict().items(), alone["c"].model.state_dict().items()):
            assert torch.equal(t, u), n
    assert np.isfinite(series["a"]["loss"]).all() and len(series["a"]["norm"]) == 8
    assert series["a"]["norm"][-1] == pytest.approx(joint_norm(arms["a"].params.values()))


def test_an_arm_is_the_run_bnlab_train_makes_with_the_same_seed_and_batches():
    data = _data()
    ref = _net(1)
    h = train(ref, data, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), steps=9, batch_size=16, seed=5,
              eval_train=False, device="cpu")
    arms = {"x": _arm("x", _net(1))}
    series = lockstep(arms, data, steps=9, batch_size=16, seed=5)
    assert series["x"]["loss"].tolist() == h.series("loss")[1]
    for (n, t), (_, u) in zip(arms["x"].model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(t, u), n
    np.testing.assert_array_equal(series["x"]["lr"], 0.1)
    np.testing.assert_array_equal(series["x"]["log2_scale"], 0)


def test_arms_stop_at_their_steps_or_when_they_diverge():
    data = _data()
    arms = {"ok": _arm("ok", _net()), "short": _arm("short", _net(), steps=3), "blowup": _arm("blowup", _net(), lr=1e38)}
    seen = []
    series = lockstep(arms, data, steps=6, batch_size=8, hooks=[seen.append])
    assert seen == list(range(7))
    assert np.isfinite(series["ok"]["loss"]).all()
    assert np.isfinite(series["short"]["loss"][:3]).all() and np.isnan(series["short"]["loss"][3:]).all()
    assert arms["short"].alive(3) and not arms["short"].alive(4)
    b = arms["blowup"]
    assert b.diverged_at is not None and not b.alive(b.diverged_at + 1)
    assert np.isnan(series["blowup"]["loss"][b.diverged_at + 1:]).all()


def test_explr_arm_records_unrescaled_lr_and_norm_and_matches_weight_decay_in_direction():
    data = _data()
    lr, wd, mom = 0.1, 0.01, 0.9
    net_wd, net_exp = _net(2, torch.float64), _net(2, torch.float64)
    for net in (net_wd, net_exp):  # scale-invariant in the first layer (BN eps ~0): train just that one
        net[1].eps = 1e-30
    p_wd, p_exp = {"0.weight": net_wd[0].weight}, {"0.weight": net_exp[0].weight}
    opt_exp = torch.optim.SGD(p_exp.values(), lr=lr, momentum=mom)
    arms = {
        "wd": Arm("wd", net_wd, p_wd, torch.optim.SGD(p_wd.values(), lr=lr, momentum=mom, weight_decay=wd), dtype=torch.float64),
        "exp": Arm("exp", net_exp, p_exp, opt_exp,
                   ExpLR(opt_exp, lr=lr, weight_decay=wd, momentum=mom, renormalize=True, renorm_bound=2.0),
                   dtype=torch.float64),
    }
    tracker = PairTracker(arms, {"p": ("wd", "exp", 0)}, steps=30, subsets={"p": {"first": ["0.weight"]}})
    series = lockstep(arms, data, steps=30, batch_size=8, hooks=[tracker])
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    t = np.arange(31, dtype=float)
    np.testing.assert_allclose(series["exp"]["norm"] / series["wd"]["norm"], alpha ** -t, rtol=1e-10)
    assert arms["exp"].scheduler.renormalizations > 0  # the stored norm was rescaled, the recorded one was not
    assert series["exp"]["log2_scale"].max() > 0
    np.testing.assert_allclose(series["exp"]["opt_lr"] * 4.0 ** series["exp"]["log2_scale"], series["exp"]["lr"], rtol=0)
    assert np.nanmax(tracker.series["p"]["angle"]) < 1e-12
    np.testing.assert_array_equal(tracker.series["p"]["first"], tracker.series["p"]["angle"])
    assert np.isnan(tracker.series["p"]["outdiff"]).all()  # output_every = 0


def test_output_difference_in_eval_mode_restores_the_modes():
    data = _data()
    arms = {"a": _arm("a", _net(0)), "b": _arm("b", _net(1))}
    tracker = PairTracker(arms, {"ab": ("a", "b", 2)}, steps=4, fixed_x=data.x[:8])
    lockstep(arms, data, steps=4, batch_size=8, hooks=[tracker])
    d = tracker.series["ab"]["outdiff"]
    assert np.isfinite(d[::2]).all() and np.isnan(d[1::2]).all() and (d[::2] > 0).all()
    before = copy.deepcopy(arms["a"].model.state_dict())
    assert tracker.output_diff("a", "b", eval_mode=True) > 0
    assert arms["a"].model.training and arms["b"].model.training
    assert all(torch.equal(before[k], v) for k, v in arms["a"].model.state_dict().items())


def test_pair_tracker_checks_its_arguments():
    arms = {"a": _arm("a", _net()), "b": _arm("b", _net())}
    with pytest.raises(ValueError, match="fixed_x"):
        PairTracker(arms, {"ab": ("a", "b", 1)}, steps=3)
    with pytest.raises(ValueError, match="clashes"):
        PairTracker(arms, {"ab": ("a", "b", 0)}, steps=3, subsets={"ab": {"angle": ["0.weight"]}})


def test_docstring_examples():
    import doctest

    import bnlab.lockstep
    import bnlab.numpy_bn

    for mod in (bnlab.lockstep, bnlab.numpy_bn):
        assert doctest.testmod(mod).failed == 0


def test_angular_update_tracker_records_the_angle_of_each_step_per_tensor():
    data = _data()
    arm = _arm("a", _net(dtype=torch.float64), dtype=torch.float64)
    twin = {"b": _arm("b", _net(dtype=torch.float64), dtype=torch.float64)}  # the same run alone, its weights kept at every step
    names = list(arm.params)
    tracker = AngularUpdateTracker({"a": arm}, ["a"], steps=5)
    kept = {}
    lockstep({"a": arm}, data, steps=5, batch_size=16, seed=2, hooks=[tracker])
    lockstep(twin, data, steps=5, batch_size=16, seed=2,
             hooks=[lambda t: kept.__setitem__(t, [p.detach().clone() for p in twin["b"].params.values()])])
    upd = tracker.series["a"]["update"]
    assert upd.shape == (len(names), 6) and list(tracker.series["a"]["names"]) == names
    assert np.isnan(upd[:, 0]).all()
    ref = [[angle_between(kept[t - 1][i], kept[t][i]) for t in range(1, 6)] for i in range(len(names))]
    np.testing.assert_array_equal(upd[:, 1:], ref)  # NaN where undefined: the classifier's bias starts at 0
    assert (upd[0, 1:] > 0).all()


def test_angular_update_is_blind_to_a_power_of_two_rescaling_and_stops_with_the_arm():
    data = _data()

    def explr_arm(renormalize):
        net = _net(dtype=torch.float64)
        net[1].eps = 1e-30  # BN's eps breaks scale invariance (and so exact rescaling); 0 in effect
        for n, p in net.named_parameters():
            p.requires_grad_(n.startswith("0."))  # only the weight feeding BN is trained: scale-invariant
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD(params.values(), lr=0.5, momentum=0.9)
        sched = ExpLR(opt, lr=0.5, weight_decay=0.005, momentum=0.9, renormalize=renormalize, renorm_bound=2.0)
        return Arm("e", net, params, opt, sched, dtype=torch.float64, steps=30)

    ups = []
    for renormalize in (True, False):
        arm = explr_arm(renormalize)
        tracker = AngularUpdateTracker({"e": arm}, ["e"], steps=40)
        lockstep({"e": arm}, data, steps=40, batch_size=16, hooks=[tracker])
        assert (arm.scheduler.renormalizations > 0) == renormalize
        ups.append(tracker.series["e"]["update"][0])
    np.testing.assert_array_equal(ups[0], ups[1])  # rescaling by 2^k is exact and turns nothing
    assert np.isfinite(ups[0][1:31]).all() and np.isnan(ups[0][31:]).all()  # the arm stopped after 30 steps
