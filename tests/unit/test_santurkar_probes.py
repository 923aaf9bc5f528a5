"""Santurkar et al.'s probes: landscape along the gradient, gᵀHg/‖g‖², λ_max, ICS, activation quantiles,
train-mode accuracy.

Each probe's numbers are checked against an independent brute-force computation, and each probe is
checked to leave training exactly as it was (weights, buffers, .grad, RNG, modes).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bnlab import models
from bnlab.data import ArrayData
from bnlab.errors import UserError
from bnlab.landscape import probe_model_along_gradient
from bnlab.models.noisy import noisy_layers
from bnlab.probes import (ActivationQuantiles, HessianQuadForm, InternalCovariateShift, LandscapeProbe, StepContext,
                          TopHessianEigenvalue)
from bnlab.probes.accuracy import LOGITS_KEY, TrainModeAccuracy
from bnlab.probes.ics import ics_layers, internal_covariate_shift
from bnlab.probes.landscape import step_size_grid
from bnlab.train import make_optimizer, train


def _net(norm="bn", width=4, seed=0, **kw):
    return models.make("convnet", norm=norm, in_shape=(1, 8, 8), num_classes=5, width=width, seed=seed, **kw)


def _batch(n=32, seed=0, in_shape=(1, 8, 8), classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *in_shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _backward(net, batch):
    net.train()
    net.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(batch[0]), batch[1])
    loss.backward()
    return loss.detach()


def _ctx(net, batch, loss, opt=None, step=0):
    return StepContext(step=step, model=net, optimizer=opt, batch=batch, loss=loss, loss_fn=F.cross_entropy)


def _snapshot(net):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in net.parameters()],
            torch.get_rng_state(), [m.training for m in net.modules()])


def _assert_same(net, snap):
    sd, grads, rng, modes = snap
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for p, g in zip(net.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in net.modules()] == modes


# ----------------------------------------------------------------------------- landscape
def test_step_size_grid_is_k_points_up_to_a_multiple_of_the_lr():
    assert step_size_grid(0.1, 8, 4.0) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    with pytest.raises(UserError):
        step_size_grid(0.1, 0)
    with pytest.raises(UserError):
        LandscapeProbe(step_sizes=[])


@pytest.mark.parametrize("norm", ["bn", "none", "bn-noisy"])
def test_landscape_probe_equals_probe_along_gradient_and_a_brute_force_loop(norm):
    net, batch = _net(norm), _batch()
    loss = _backward(net, batch)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    probe = LandscapeProbe(every=1, keep=True)
    snap = _snapshot(net)
    out = probe.after_backward(_ctx(net, batch, loss, opt))
    _assert_same(net, snap)
    steps = step_size_grid(0.05, 8, 4.0)
    g = {n: p.grad.clone() for n, p in net.named_parameters()}
    ref = probe_model_along_gradient(net, batch, F.cross_entropy, steps, grad=g, loss=loss)
    # ("auto" may pick vmap in one call and the loop in the other: equal up to float rounding)
    assert out["loss_min"] == pytest.approx(ref.loss_band[0], rel=1e-6) and out["loss_max"] == pytest.approx(ref.loss_band[1], rel=1e-6)
    assert out["grad_diff_max"] == pytest.approx(ref.grad_band[1], rel=1e-5) and out["beta"] == pytest.approx(ref.beta_eff, rel=1e-5)
    assert out["loss"] == float(loss) and out["s_max"] == pytest.approx(0.2)
    # brute force: a deep copy moved to w - s g, a train-mode forward and backward (noisy BN: the
    # copy's noise counter is set back so it redraws the step's noise)
    losses, diffs = [], []
    for s in steps:
        m = copy.deepcopy(net)
        for lay in noisy_layers(m):
            lay.noise_step.sub_(1)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.sub_(s * g[n])
        m.zero_grad(set_to_none=True)
        lo = F.cross_entropy(m(batch[0]), batch[1])
        lo.backward()
        losses.append(float(lo.detach()))
        diffs.append(math.sqrt(sum(float((p.grad - g[n]).double().pow(2).sum()) for n, p in m.named_parameters())))
    gn = math.sqrt(sum(float(v.double().pow(2).sum()) for v in g.values()))
    assert out["loss_max"] == pytest.approx(max(losses + [float(loss)]), rel=1e-4)
    assert out["loss_min"] == pytest.approx(min(losses + [float(loss)]), rel=1e-4)
    assert out["grad_diff_max"] == pytest.approx(max(diffs), rel=1e-3)
    assert out["grad_diff_min"] == pytest.approx(min(diffs), rel=1e-3, abs=1e-6)
    assert out["beta"] == pytest.approx(max(d / (s * gn) for d, s in zip(diffs, steps)), rel=1e-3)
    assert probe.history and probe.history[0][0] == 0


# ----------------------------------------------------------------------------- curvature
def _tiny_bn_mlp():
    torch.manual_seed(0)
    net = models.make("mlp", norm="bn", in_shape=(3,), num_classes=3, width=4, depth=1, seed=1).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return net, (x, y)


def _dense_hessian(net, batch):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    buffers = {k: v.clone() for k, v in net.named_buffers()}

    def f(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(net, {**params, **{k: v.clone() for k, v in buffers.items()}}, (batch[0],)), batch[1])

    H = torch.autograd.functional.hessian(f, flat0)
    g = torch.autograd.functional.jacobian(f, flat0)
    return H, g


def test_hessian_quad_form_equals_a_dense_hessian_in_float64():
    net, batch = _tiny_bn_mlp()
    loss = _backward(net, batch)
    H, g = _dense_hessian(net, batch)
    g_model = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(g, g_model)
    snap = _snapshot(net)
    out = HessianQuadForm(every=1).after_backward(_ctx(net, batch, loss))
    _assert_same(net, snap)
    assert out["gHg"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-8)


def test_top_hessian_eigenvalue_equals_the_dense_spectrum():
    net, batch = _tiny_bn_mlp()
    loss = _backward(net, batch)
    H, _ = _dense_hessian(net, batch)
    n = H.shape[0]
    snap = _snapshot(net)
    out = TopHessianEigenvalue(every=1, max_iter=n, tol=1e-12).after_backward(_ctx(net, batch, loss))
    _assert_same(net, snap)
    assert out["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H).max()), rel=1e-6)
    assert out["n_hvp"] <= n


# ----------------------------------------------------------------------------- ICS
_GROUPS = {"features.0": 0, "features.1": 0, "features.4": 1, "features.5": 1, "features.8": 2, "features.9": 2, "classifier": 3}
_LAYERS = ["features.0", "features.4", "features.8", "classifier"]


def test_ics_layers_are_in_forward_order_and_norms_move_with_their_conv():
    net, batch = _net("bn"), _batch()
    layers, group = ics_layers(net, batch[0])
    assert layers == _LAYERS
    for name, g in group.items():
        assert g == _GROUPS[name.rsplit(".", 1)[0]], name


@pytest.mark.parametrize("norm", ["bn", "none", "bn-noisy"])
def test_ics_equals_a_manual_recomputation_with_deep_copied_models(norm):
    net, batch = _net(norm), _batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    # one step to fill the momentum buffer, so the next update is not just -lr * g
    _backward(net, batch)
    opt.step()
    before = copy.deepcopy(net)  # W^t and the buffers before the step's forward
    probe = InternalCovariateShift(every=1, keep=True)
    loss = _backward(net, batch)
    grads_t = {n: p.grad.clone() for n, p in net.named_parameters()}
    ctx = _ctx(net, batch, loss, opt, step=1)
    probe.before_step(ctx)
    probe.after_backward(ctx)
    opt.step()
    snap = _snapshot(net)
    out = probe.after_step(ctx)
    _assert_same(net, snap)
    after = dict(net.named_parameters())
    for i, layer in enumerate(_LAYERS[1:], start=1):
        m = copy.deepcopy(before)  # same buffers as the step's forward (noisy BN: the same noise)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if _GROUPS[n.rsplit(".", 1)[0]] < i:
                    p.copy_(after[n])
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        g2 = dict(m.named_parameters())[f"{layer}.weight"].grad.double().flatten()
        g1 = grads_t[f"{layer}.weight"].double().flatten()  # G is the step's own gradient
        assert out[f"{layer}/g_norm"] == pytest.approx(float(g1.norm()), rel=1e-5)
        assert out[f"{layer}/l2"] == pytest.approx(float((g1 - g2).norm()), rel=1e-4, abs=1e-7)
        assert out[f"{layer}/cos"] == pytest.approx(float(g1 @ g2 / (g1.norm() * g2.norm())), abs=1e-6)
        assert out[f"{layer}/rel"] == pytest.approx(out[f"{layer}/l2"] / out[f"{layer}/g_norm"])
    assert "features.0/l2" not in out  # the first layer has no layer below it
    assert out["mean_cos"] == pytest.approx(sum(out[f"{n}/cos"] for n in _LAYERS[1:]) / 3)
    assert probe.history[0][0] == 1


def test_ics_is_zero_when_nothing_moved():
    net, batch = _net("bn"), _batch()
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    res = internal_covariate_shift(net, batch, F.cross_entropy, w, w)
    assert all(d["l2"] == 0.0 and d["cos"] == pytest.approx(1.0) for d in res.values())
    with pytest.raises(UserError):
        internal_covariate_shift(net, batch, F.cross_entropy, w, {})


# ----------------------------------------------------------------------------- activation quantiles
@pytest.mark.parametrize("norm", ["bn", "none", "bn-noisy"])
def test_activation_quantiles_equal_those_of_the_training_forward(norm):
    net, batch = _net(norm), _batch()
    seen = []
    h = dict(net.named_modules())["features.5"].register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    loss = _backward(net, batch)
    h.remove()
    probe = ActivationQuantiles("features.5", every=1, channels=[0, 3])
    snap = _snapshot(net)
    out = probe.after_backward(_ctx(net, batch, loss))
    _assert_same(net, snap)
    act = seen[0]
    for c in (0, 3):
        v = act[:, c].reshape(-1).double()
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            assert out[f"{c}/q{q * 100:g}"] == pytest.approx(float(torch.quantile(v, q)), rel=1e-6, abs=1e-7)
        assert out[f"{c}/mean"] == pytest.approx(float(v.mean()), abs=1e-6)
        assert out[f"{c}/std"] == pytest.approx(float(v.std(correction=0)), rel=1e-6)
    assert "1/mean" not in out
    with pytest.raises(UserError):
        ActivationQuantiles("nope").after_backward(_ctx(net, batch, loss))


# ----------------------------------------------------------------------------- train-mode accuracy
@pytest.mark.parametrize("norm", ["bn", "none", "bn-noisy"])
def test_train_mode_accuracy_is_that_of_the_training_forward(norm):
    net, batch = _net(norm), _batch(n=64)
    seen = []
    h = net.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    loss = _backward(net, batch)
    h.remove()
    probe = TrainModeAccuracy(every=1)
    snap = _snapshot(net)
    out = probe.after_backward(_ctx(net, batch, loss))
    _assert_same(net, snap)
    # the same logits as the step's forward (train-mode BN: batch statistics; noisy BN: the step's noise)
    assert out == {"acc": float((seen[0].argmax(1) == batch[1]).double().mean())}
    assert 0.0 <= out["acc"] <= 1.0 and probe.name == "train_mode" and probe.cost == "standard"
    assert probe.after_backward(StepContext(step=0, model=net, optimizer=None)) == {}


def test_train_mode_accuracy_reuses_the_forward_pass_of_activation_quantiles():
    net, batch = _net("bn-noisy"), _batch(n=64)
    loss = _backward(net, batch)
    alone = TrainModeAccuracy(every=1).after_backward(_ctx(net, batch, loss))
    ctx = _ctx(net, batch, loss)
    ActivationQuantiles("features.5", every=1).after_backward(ctx)
    assert LOGITS_KEY in ctx.scratch  # the replayed forward's logits, left for the next probe
    calls = []
    h = net.register_forward_hook(lambda m, a, o: calls.append(1))
    shared = TrainModeAccuracy(every=1).after_backward(ctx)
    h.remove()
    assert shared == alone and not calls  # the same number, no second forward pass
    # the logits in scratch are what it reads: a planted perfect prediction gives accuracy 1
    planted = _ctx(net, batch, loss)
    planted.scratch[LOGITS_KEY] = F.one_hot(batch[1], 5).float()
    assert TrainModeAccuracy(every=1).after_backward(planted) == {"acc": 1.0}


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_ics_of_a_deep_linear_network_equals_a_manual_recomputation(norm):
    net = models.make("dln", norm=norm, in_shape=(1, 8, 8), num_classes=5, width=6, depth=5, seed=0)
    batch = _batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    before = copy.deepcopy(net)
    layers, group = ics_layers(net, batch[0])
    assert len(layers) == 5
    loss = _backward(net, batch)
    grads_t = {n: p.grad.clone() for n, p in net.named_parameters()}
    probe = InternalCovariateShift(every=1)
    ctx = _ctx(net, batch, loss, opt)
    probe.before_step(ctx)
    probe.after_backward(ctx)
    opt.step()
    out = probe.after_step(ctx)
    after = dict(net.named_parameters())
    for i, layer in enumerate(layers[1:], start=1):
        m = copy.deepcopy(before)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if group[n] < i:
                    p.copy_(after[n])
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        g2 = dict(m.named_parameters())[f"{layer}.weight"].grad.double().flatten()
        g1 = grads_t[f"{layer}.weight"].double().flatten()
        assert out[f"{layer}/l2"] == pytest.approx(float((g1 - g2).norm()), rel=1e-4, abs=1e-7)
        assert out[f"{layer}/cos"] == pytest.approx(float(g1 @ g2 / (g1.norm() * g2.norm())), abs=1e-6)


# ----------------------------------------------------------------------------- never change training
def _all_probes(every=1):
    return [LandscapeProbe(every=every), HessianQuadForm(every=every), TopHessianEigenvalue(every=every, max_iter=4),
            InternalCovariateShift(every=every), ActivationQuantiles("features.1", every=every), TrainModeAccuracy(every=every)]


@pytest.mark.parametrize("norm", ["bn", "none", "bn-noisy"])
def test_training_is_bit_identical_with_and_without_all_probes(norm):
    g = torch.Generator().manual_seed(1)
    data = ArrayData(torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 5, (96,), generator=g), 5)

    def run(probes):
        net = _net(norm, seed=3)
        opt = make_optimizer(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        torch.manual_seed(0)
        h = train(net, data, opt, steps=7, batch_size=32, probes=probes, device="cpu", seed=0, eval_train=False)
        return net, opt, h, torch.get_rng_state()

    net_a, opt_a, h_a, rng_a = run([])
    net_b, opt_b, h_b, rng_b = run(_all_probes(every=2))
    for (k, v), (k2, v2) in zip(net_a.state_dict().items(), net_b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
    assert torch.equal(rng_a, rng_b)
    assert [r["loss"] for r in h_a.records] == [r["loss"] for r in h_b.records]
    keys = set().union(*h_b.records[::2])
    assert {"landscape/beta", "hess_quad/gHg", "hess_top/lambda_max", "ics/mean_rel", "act_q/0/q50", "train_mode/acc"} <= keys


@pytest.mark.parametrize("norm", ["bn", "bn-noisy"])
def test_each_probe_restores_everything_it_touches_on_its_own(norm):
    """Without the Monitor's safety net: the probes' own code leaves the model as it was."""
    net, batch = _net(norm), _batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loss = _backward(net, batch)
    for probe in _all_probes():
        ctx = _ctx(net, batch, loss, opt)
        snap = _snapshot(net)
        probe.before_step(ctx)
        probe.after_backward(ctx)
        _assert_same(net, snap)
        out = probe.after_step(ctx)
        _assert_same(net, snap)
        assert out is None or all(isinstance(v, float) for v in out.values())
    assert net.training


def test_probe_costs_and_schedules():
    assert [p.cost for p in _all_probes()] == ["standard", "expensive", "expensive", "standard", "standard", "standard"]
    p = LandscapeProbe(every=5)
    assert [s for s in range(12) if p.active(s)] == [0, 5, 10]
    with pytest.raises(UserError):
        LandscapeProbe(every=1).grid(StepContext(step=0, model=_net(), optimizer=None))
