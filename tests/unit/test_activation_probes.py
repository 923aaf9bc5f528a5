"""bnlab.probes.activations: values against independent computations, and that training is untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnlab import models
from bnlab.data import ArrayData
from bnlab.errors import UserError
from bnlab.monitor import Monitor
from bnlab.probes.activations import (
    ActivationStats,
    ChannelStats,
    OutputGradients,
    UpdateInterpolation,
    activation_stats,
    gradient_alignment,
    output_gradients,
    select_layers,
)
from bnlab.probes.base import StepContext
from bnlab.train import make_optimizer, train


def _data(n=48, shape=(1, 8, 8), k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayData(torch.randn(n, *shape, generator=g), torch.randint(0, k, (n,), generator=g), k)


def _manual(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, population std and max |.| by brute force, channel by channel."""
    h = h.detach().double()
    c = h.shape[1]
    means, stds, maxs = [], [], []
    for j in range(c):
        v = h[:, j].reshape(-1)
        m = v.sum() / v.numel()
        means.append(m)
        stds.append(torch.sqrt(((v - m) ** 2).sum() / v.numel()))
        maxs.append(v.abs().max())
    return torch.stack(means), torch.stack(stds), torch.stack(maxs)


def _close(cs: ChannelStats, h: torch.Tensor, rtol=1e-9, atol=1e-12):
    m, s, a = _manual(h)
    assert torch.allclose(cs.mean, m, rtol=rtol, atol=atol)
    assert torch.allclose(cs.std, s, rtol=rtol, atol=atol)
    assert torch.allclose(cs.absmax, a, rtol=rtol, atol=atol)


def _mlp_outputs(model, x):
    """Run the bnlab mlp layer by layer (a copy, train mode); return {name: output} of Linear and norm layers."""
    model = copy.deepcopy(model)
    outs = {}
    h = x
    for i, layer in enumerate(model.features):
        h = layer(h)
        if isinstance(layer, (nn.Linear, nn.BatchNorm1d)):
            outs[f"features.{i}"] = h
    outs["classifier"] = model.classifier(torch.flatten(h, 1))
    return outs


# ----------------------------------------------------------------------------- layer selection
def test_layer_presets_pick_convs_linears_norms_and_residual_blocks():
    net = models.make("preresnet", norm="bn", in_shape=(1, 8, 8), num_classes=3, depth=8, width=4, seed=0)
    affine = [n for n, _ in select_layers(net, "affine")]
    assert affine[0] == "features.0" and affine[-1] == "classifier" and "features.2.shortcut" in affine
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in select_layers(net, "affine"))
    assert [n for n, _ in select_layers(net, "block")] == ["features.1", "features.2", "features.3"]
    assert all(isinstance(m, nn.BatchNorm2d) for _, m in select_layers(net, "norm"))
    assert [n for n, _ in select_layers(net, ["features.1.conv1", "classifier"])] == ["features.1.conv1", "classifier"]
    with pytest.raises(UserError, match="accepted"):
        select_layers(net, "convs")
    with pytest.raises(UserError, match="no module named"):
        select_layers(net, ["features.99"])


# ----------------------------------------------------------------------------- ActivationStats
def test_activation_stats_function_equals_layer_by_layer_statistics():
    net = models.make("mlp", norm="bn", in_shape=(1, 8, 8), num_classes=4, width=12, depth=3, seed=1)
    x = _data().x
    before = copy.deepcopy(net.state_dict())
    stats = activation_stats(net, x, ["features.1", "features.2", "features.4", "classifier"])
    outs = _mlp_outputs(net, x)
    assert list(stats) == ["features.1", "features.2", "features.4", "classifier"]
    for name, cs in stats.items():
        _close(cs, outs[name])
    # BN outputs in train mode are normalized: channel mean 0, std 1 (up to eps)
    assert stats["features.2"].mean.abs().max() < 1e-6 and (stats["features.2"].std - 1).abs().max() < 1e-3
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched


def test_block_outputs_of_a_residual_net_equal_running_the_blocks_by_hand():
    net = models.make("preresnet", norm="none", in_shape=(2, 12), num_classes=3, depth=8, width=4, seed=0)
    x = torch.randn(10, 2, 12, generator=torch.Generator().manual_seed(3))
    stats = activation_stats(net, x, "block")
    h = x
    hand = {}
    for i, layer in enumerate(net.features):
        h = layer(h)
        if f"features.{i}" in stats:
            hand[f"features.{i}"] = h
    assert list(stats) == list(hand)
    for name in stats:
        _close(stats[name], hand[name], rtol=1e-6, atol=1e-9)


def test_probe_reads_the_training_forward_pass_and_matches_manual_stats():
    tr = _data()
    net = models.make("mlp", norm="bn", in_shape=(1, 8, 8), num_classes=4, width=12, depth=3, seed=1)
    init = copy.deepcopy(net)
    first_x = next(iter(tr.batches(16, shuffle=True, generator=torch.Generator().manual_seed(0))))[0]
    probe = ActivationStats(every=2, layers=["features.1", "features.2", "classifier"], per_channel=True)
    # OutputGradients runs its own forward pass in before_step, after ActivationStats armed its hooks:
    # that pass must not be the one measured.
    h = train(net, tr, make_optimizer(net.parameters(), lr=0.1, momentum=0.9), steps=5, batch_size=16,
              probes=[probe, OutputGradients(every=1)], device="cpu", seed=0, eval_train=False)
    assert [s for s, _ in probe.history] == [0, 2, 4]
    step0 = probe.history[0][1]
    outs = _mlp_outputs(init, first_x)
    for name in ("features.1", "features.2", "classifier"):
        _close(step0[name], outs[name], rtol=1e-6, atol=1e-7)
    rec = h.records[0]
    assert rec["act/classifier/std"] == pytest.approx(float(step0["classifier"].std.mean()))
    assert rec["act/classifier/absmax"] == pytest.approx(float(step0["classifier"].absmax.max()))
    assert rec["act/features.1/abs_mean"] == pytest.approx(float(step0["features.1"].mean.abs().mean()))
    assert rec["act/features.1/3/mean"] == pytest.approx(float(step0["features.1"].mean[3]))
    assert "act/classifier/std" not in h.records[1]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())  # hooks removed


class _Maps(nn.Module):
    """Outputs of every staging layout: 1x1, 2x2 (staged N x L x C), 4x4 (staged N x C x L) maps,
    five of one shape (past the staging buffer's first capacity, 4), and a map too large to stage."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 2, 1)                                                      # 2 x 400 x 400 per example
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.c4 = nn.ModuleList([nn.Conv2d(3 if i == 0 else 6, 6, 1) for i in range(5)])  # 4x4 maps, 5 of them
        self.c2 = nn.Conv2d(6, 5, 2, stride=2)                                             # 2x2
        self.c1 = nn.Conv2d(5, 7, 2)                                                       # 1x1
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        h = self.pool(self.big(x).mean(1, keepdim=True).expand(-1, 3, -1, -1) + x)
        for c in self.c4:
            h = torch.relu(c(h)) + 2.0
        return self.fc(self.c1(self.c2(h)).flatten(1))


@pytest.mark.parametrize("stage_bytes", [None, 2000])
def test_staged_outputs_match_float64_statistics_in_every_layout(stage_bytes, monkeypatch):
    """Small outputs are copied into per-shape staging buffers and reduced together after the forward
    pass (two layouts by map size, a buffer that grows); the statistics equal the float64 ones
    layer by layer, also when the staging budget runs out and the rest is reduced one by one."""
    import bnlab.probes.activations as A

    if stage_bytes is not None:
        monkeypatch.setattr(A, "_STAGE_BYTES", stage_bytes)
    torch.manual_seed(0)
    net = _Maps()
    x = torch.randn(4, 3, 400, 400)
    layers = ["big", "c4.0", "c4.1", "c4.2", "c4.3", "c4.4", "c2", "c1", "fc"]
    ref, _ = A._forward_stats(net, x, layers)
    probe = ActivationStats(layers=layers)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    mon = Monitor(net, opt, [probe], log=None)
    for _ in range(2):  # the second step reuses the staging buffers
        with mon.step((x, torch.zeros(4, dtype=torch.long))) as s:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), torch.zeros(4, dtype=torch.long))
            loss.backward()
            s.loss = loss
            opt.step()
    rec = probe._rec
    staged = {k[0]: n for k, n in rec.staged.items()}
    if stage_bytes is None:
        assert staged == {(4, 6, 16): 5, (4, 4, 5): 1, (4, 7, 1): 1, (4, 3, 1): 1}  # 2x2 maps as N x L x C
        assert {k[0]: v[0].shape[1] for k, v in rec._stage.items()}[(4, 6, 16)] == 8  # (N, capacity, ...): grown from 4
    else:
        assert sum(staged.values()) < 8  # the budget ran out: some outputs were reduced one by one
    _assert_history_matches(probe, ref, layers)


def _assert_history_matches(probe, ref, layers):
    """Every step the probe kept equals the float64 statistics ``ref``, layer by layer, in forward order."""
    for _, got in probe.history:
        assert list(got) == layers
        for name in layers:
            torch.testing.assert_close(got[name].mean, ref[name].mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[name].std, ref[name].std, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[name].absmax, ref[name].absmax, rtol=0, atol=0)


def _monitored(net, x, probe, steps=1, opt=None):
    opt = opt or torch.optim.SGD(net.parameters(), lr=0.0)
    mon = Monitor(net, opt, [probe], log=None)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(steps):
        with mon.step((x, y)) as s:
            opt.zero_grad()
            loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            s.loss = loss
            opt.step()


def test_staged_half_precision_outputs_neither_overflow_nor_underflow():
    """A float16 output on a 2x2 map (staged N x L x C) is staged in float32: squares of deviations
    ~400 would overflow float16 (65504), squares of ~1e-4 would underflow it."""
    import bnlab.probes.activations as A

    for scale in (400.0, 1e-4):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.Flatten(), nn.Linear(32, 3)).half()
        x = (torch.randn(16, 3, 4, 4) * scale).half()
        with torch.no_grad():
            net[0].weight.copy_(torch.eye(3).repeat(3, 1)[:8, :, None, None].expand(8, 3, 2, 2) / 4)
            net[0].bias.zero_()
        ref, _ = A._forward_stats(net, x, ["0"])
        probe = ActivationStats(layers=["0"])
        _monitored(net, x, probe)
        got = probe.history[0][1]["0"]
        assert torch.isfinite(got.std).all()
        torch.testing.assert_close(got.std, ref["0"].std, rtol=2e-3, atol=0)
        torch.testing.assert_close(got.mean, ref["0"].mean, rtol=2e-3, atol=1e-9)


def test_staging_buffers_follow_the_shapes_of_the_last_pass():
    """Buffers of a shape the last pass did not use are freed (a sequence length or batch size that
    changes would otherwise pile them up)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.LazyLinear(2))
    probe = ActivationStats(layers=["0"])
    for n in (8, 5, 5, 8):
        x = torch.randn(n, 3, 4, 4)
        net(x)  # materialize the lazy layer
        _monitored(net, x, probe)
        assert [k[0] for k in probe._rec._stage] == [(n, 4, 16)]
        ref, _ = __import__("bnlab.probes.activations", fromlist=["_forward_stats"])._forward_stats(net, x, ["0"])
        torch.testing.assert_close(probe.history[-1][1]["0"].std, ref["0"].std, rtol=1e-5, atol=1e-7)


def test_a_forward_that_raised_does_not_spoil_the_next_step_or_an_inference_pass():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(3, 2)
            self.fail = False

        def forward(self, x):
            h = self.a(x)
            if self.fail:
                raise RuntimeError("boom")
            return self.b(h)

    torch.manual_seed(3)
    net = Flaky()
    x = torch.randn(6, 4)
    probe = ActivationStats(layers=["a", "b"])
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    mon = Monitor(net, opt, [probe], log=None)
    net.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        with mon.step((x, torch.zeros(6, dtype=torch.long))):
            net(x)
    net.fail = False
    with torch.inference_mode():
        net(torch.randn(6, 4))  # an evaluation between the steps: the hooks must not record or allocate
    _monitored(net, x, probe, opt=opt)
    step, got = probe.history[-1]
    assert list(got) == ["a", "b"]
    ref, _ = __import__("bnlab.probes.activations", fromlist=["_forward_stats"])._forward_stats(net, x, ["a", "b"])
    for k in ("a", "b"):
        torch.testing.assert_close(got[k].mean, ref[k].mean, rtol=1e-6, atol=1e-7)


def test_probe_records_the_step_whose_loss_is_not_finite():
    tr = _data(n=16)
    tr.x[0, 0, 0, 0] = float("inf")
    net = models.make("mlp", norm="none", in_shape=(1, 8, 8), num_classes=4, width=8, depth=2, seed=0)
    probe = ActivationStats(layers="affine")
    h = train(net, tr, make_optimizer(net.parameters(), lr=0.1), steps=3, batch_size=16, probes=[probe], device="cpu")
    assert h.diverged and h.diverged_at == 0
    assert [s for s, _ in probe.history] == [0] and not math.isfinite(h.records[0]["act/classifier/absmax"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


# ----------------------------------------------------------------------------- OutputGradients
def test_output_gradients_equal_softmax_minus_onehot_over_batch_size():
    tr = _data(n=20, k=5)
    net = models.make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=5, width=4, seed=2)
    g = output_gradients(net, (tr.x, tr.y))
    ref = copy.deepcopy(net)
    expected = (F.softmax(ref(tr.x), dim=1) - F.one_hot(tr.y, 5)) / len(tr.y)
    assert g.shape == (20, 5)
    assert torch.allclose(g, expected.detach(), atol=1e-7)
    assert all(p.grad is None for p in net.parameters())


def test_gradient_alignment_of_identical_and_cancelling_rows():
    row = torch.tensor([[0.7, -0.2, -0.5]])
    same = gradient_alignment(row.repeat(6, 1))
    assert same["ratio"] == pytest.approx(1.0) and same["row_cos"] == pytest.approx(1.0)
    assert same["abs_sum"] == pytest.approx(6 * 1.4)
    cancel = gradient_alignment(torch.cat([row, -row]))
    assert cancel["ratio"] == pytest.approx(0.0) and cancel["row_cos"] == pytest.approx(-1.0)
    g = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    ref = float(g.sum(0).abs().sum() / g.abs().sum())
    assert gradient_alignment(g)["ratio"] == pytest.approx(ref)


def test_output_gradients_probe_records_the_heat_map_and_ratio():
    tr = _data(n=32, k=4)
    net = models.make("mlp", norm="none", in_shape=(1, 8, 8), num_classes=4, width=8, depth=2, seed=0)
    fixed = (tr.x[:12], tr.y[:12])
    probe = OutputGradients(every=3, batch=fixed)
    init = copy.deepcopy(net)
    h = train(net, tr, make_optimizer(net.parameters(), lr=0.05), steps=4, batch_size=8, probes=[probe], device="cpu")
    assert [s for s, _ in probe.history] == [0, 3]
    g0 = probe.history[0][1]
    assert torch.allclose(g0, output_gradients(init, fixed), atol=0)
    assert h.records[0]["out_grad/ratio"] == pytest.approx(gradient_alignment(g0)["ratio"])
    assert 0 < h.records[0]["out_grad/majority"] <= 1


# ----------------------------------------------------------------------------- UpdateInterpolation
def test_interpolation_endpoints_equal_stats_at_w_t_and_w_t_plus_1():
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(3)]
    net = models.make("preresnet", norm="bn", in_shape=(1, 8, 8), num_classes=4, depth=8, width=4, seed=0)
    opt = make_optimizer(net.parameters(), lr=0.2, momentum=0.9)
    interp = UpdateInterpolation(every=1, s=[0.0, 0.5, 1.0], layers=("affine", "block"))
    act = ActivationStats(every=1, layers=("affine", "block"))
    records: list = []
    snapshots = []
    mon = Monitor(net, opt, probes=[act, interp], log=records, loss_fn=F.cross_entropy)
    for x, y in batches:
        snapshots.append(copy.deepcopy(net))  # w_t (with the buffers before the step)
        with mon.step((x, y)) as s:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            s.loss = loss
            opt.step()
    snapshots.append(copy.deepcopy(net))
    assert [t for t, _ in interp.history] == [0, 1, 2]
    for t, (x, y) in enumerate(batches):
        h = interp.history[t][1]
        at_s0, at_s1 = h["stats"][0], h["stats"][2]
        at_wt = activation_stats(snapshots[t], x, ("affine", "block"))
        at_wt1 = activation_stats(snapshots[t + 1], x, ("affine", "block"))
        assert list(at_s0) == list(at_wt) == list(act.history[t][1])
        for name in at_wt:
            for field in ("mean", "std", "absmax"):
                assert torch.equal(getattr(at_s0[name], field), getattr(at_wt[name], field))
                assert torch.equal(getattr(at_s1[name], field), getattr(at_wt1[name], field))
                # ... and s = 0 is the training forward pass itself
                assert torch.allclose(getattr(at_s0[name], field), getattr(act.history[t][1][name], field), rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            l0 = float(F.cross_entropy(copy.deepcopy(snapshots[t])(x), y))
            l1 = float(F.cross_entropy(copy.deepcopy(snapshots[t + 1])(x), y))
        assert float(h["loss"][0]) == pytest.approx(l0, rel=1e-6) and records[t]["loss"] == pytest.approx(l0, rel=1e-6)
        assert float(h["loss"][2]) == pytest.approx(l1, rel=1e-6)
        assert records[t]["interp/rel_loss"] == pytest.approx(l1 / l0, rel=1e-6)
        assert records[t]["interp/s0.5/loss"] == pytest.approx(float(h["loss"][1]))
        assert "interp/s1/classifier/absmax" in records[t]


# ----------------------------------------------------------------------------- never changes training
def _run(probes, norm="bn", steps=6):
    tr = _data(n=64)
    net = models.make("preresnet", norm=norm, in_shape=(1, 8, 8), num_classes=4, depth=8, width=4, seed=0)
    opt = make_optimizer(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    h = train(net, tr, opt, steps=steps, batch_size=16, probes=probes, device="cpu", seed=0, eval_every=3)
    return net, opt, h


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_training_is_bit_identical_with_and_without_the_probes(norm):
    ref_net, ref_opt, ref_h = _run([], norm)
    rng_before = torch.get_rng_state()
    probes = [ActivationStats(every=1, per_channel=True), OutputGradients(every=2), UpdateInterpolation(every=1, s=5)]
    net, opt, h = _run(probes, norm)
    for (k, a), (_, b) in zip(ref_net.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), k  # weights and BN running statistics, bit for bit
    for p, q in zip(ref_net.parameters(), net.parameters()):
        assert torch.equal(p.grad, q.grad)
    for sa, sb in zip(ref_opt.state.values(), opt.state.values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["loss"] for r in ref_h.records] == [r["loss"] for r in h.records]
    assert [e["test_acc"] if "test_acc" in e else e["train_acc"] for e in ref_h.evals] == [e["test_acc"] if "test_acc" in e else e["train_acc"] for e in h.evals]
    assert len(probes[0].history) == 6 and len(probes[1].history) == 3 and len(probes[2].history) == 6
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_each_probe_restores_state_by_itself_without_the_monitor_guard():
    """Call the events directly: buffers, .grad, RNG and the parameters must be exactly as before."""
    tr = _data(n=16)
    x, y = tr.x, tr.y
    net = models.make("preresnet", norm="bn", in_shape=(1, 8, 8), num_classes=4, depth=8, width=4, seed=0)
    opt = make_optimizer(net.parameters(), lr=0.1)
    net.train()
    F.cross_entropy(net(x), y).backward()
    snap = lambda: ([t.clone() for t in net.state_dict().values()], [p.grad.clone() for p in net.parameters()], torch.get_rng_state())
    state0 = snap()
    for probe in (OutputGradients(), UpdateInterpolation(s=3), ActivationStats()):
        ctx = StepContext(step=0, model=net, optimizer=opt, batch=(x, y), loss_fn=F.cross_entropy)
        probe.before_step(ctx)
        probe.after_backward(ctx)
        probe.after_step(ctx)
        now = snap()
        assert all(torch.equal(a, b) for a, b in zip(state0[0], now[0]))
        assert all(torch.equal(a, b) for a, b in zip(state0[1], now[1]))
        assert torch.equal(state0[2], now[2])
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


# ----------------------------------------------------------------------------- Jacobian spectra and representation cosine
def _hooked_output(model, name):
    """x -> the output of module ``name`` for a batch of one (eval mode): the reference map."""
    mod = dict(model.named_modules())[name]

    def f(xi):
        box = {}
        h = mod.register_forward_hook(lambda m, a, o: box.__setitem__("o", o))
        try:
            model(xi[None])
        finally:
            h.remove()
        return box["o"].reshape(-1)

    return f


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_jacobian_spectra_are_the_singular_values_of_autograds_jacobian(norm):
    from bnlab.noise import frozen_norm_copy
    from bnlab.probes.activations import jacobian_spectra

    net = models.make("preresnet", norm=norm, in_shape=(1, 10), num_classes=3, width=2, depth=8, seed=1).double().train()
    x = torch.randn(6, 1, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    frozen = frozen_norm_copy(net, x)
    names = ["features.0", "features.2", "classifier"]
    sv = jacobian_spectra(frozen, x[:3], names)
    assert list(sv) == names
    for name in names:
        f = _hooked_output(frozen, name)
        for i in range(3):
            J = torch.autograd.functional.jacobian(f, x[i])  # (D_out, 1, 10)
            ref = torch.linalg.svdvals(J.reshape(J.shape[0], -1))
            got = sv[name][i]
            assert got.shape == (min(10, J.shape[0]),)
            assert torch.allclose(got, ref[: got.numel()], rtol=1e-9, atol=1e-12), name
    # fewer directions: a restriction of J, whose singular values interlace with J's
    part = jacobian_spectra(frozen, x[:3], names, directions=4, generator=torch.Generator().manual_seed(0))
    assert part["classifier"].shape == (3, 3) and part["features.2"].shape == (3, 4)
    assert torch.all(part["features.2"] <= sv["features.2"][:, :4] * (1 + 1e-9) + 1e-12)


def test_jacobian_spectra_refuse_batch_statistics():
    from bnlab.probes.activations import jacobian_spectra

    net = models.make("preresnet", norm="bn", in_shape=(1, 10), num_classes=3, width=2, depth=8, seed=1).train()
    with pytest.raises(UserError, match="frozen_norm_copy"):
        jacobian_spectra(net, torch.randn(2, 1, 10), "block")
    with pytest.raises(UserError):
        jacobian_spectra(net.eval(), torch.randn(2, 1, 10), "block", directions=0)


def test_representation_cosine_is_the_mean_over_pairs():
    from bnlab.probes.activations import representation_cosine

    net = models.make("preresnet", norm="bn", in_shape=(1, 10), num_classes=3, width=2, depth=8, seed=1).double().train()
    x = torch.randn(5, 1, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = representation_cosine(net, x, ["features.1", "classifier"])
    ref_net = copy.deepcopy(net)  # the same train-mode pass (batch statistics) on a copy
    captured = {}
    for n in got:
        dict(ref_net.named_modules())[n].register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, o.detach()))
    with torch.no_grad():
        ref_net(x)
    for name, val in got.items():
        h = captured[name].reshape(5, -1)
        cs = [float(F.cosine_similarity(h[i], h[j], dim=0)) for i in range(5) for j in range(5) if i != j]
        assert val == pytest.approx(sum(cs) / len(cs), rel=1e-10)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class _Alternating(nn.Module):
    """Outputs whose shapes alternate (4x4, 2x2, 4x4, 1x1, 4x4, ...): every change of shape reduces the
    outputs waiting in the staging buffers, and a shape that recurs fills its buffer again."""

    def __init__(self):
        super().__init__()
        self.a = nn.ModuleList([nn.Conv2d(3, 3, 1) for _ in range(4)])   # 4x4 maps, 3 channels
        self.b = nn.ModuleList([nn.Conv2d(3, 5, 2, stride=2) for _ in range(2)])  # 2x2 maps
        self.c = nn.Conv2d(3, 4, 4)  # 1x1
        self.fc = nn.Linear(3 * 16, 2)

    def forward(self, x):
        h = torch.relu(self.a[0](x)) + 1.0
        self.b[0](h)
        h = self.a[1](h)
        h = self.a[2](h)
        self.c(h)
        self.b[1](h)
        h = self.a[3](h)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("flush_bytes, stage_bytes", [(None, None), (1, None), (500, None), (None, 1000)])
def test_outputs_reduced_as_they_are_staged_match_float64_statistics(flush_bytes, stage_bytes, monkeypatch):
    """Staged outputs are reduced when the pass moves to another shape, when they reach _FLUSH_BYTES, or
    when a buffer has no room to grow: whatever the split, each layer's statistics equal the float64
    ones, in forward order, and a second step (buffers reused) gives the same."""
    import bnlab.probes.activations as A

    if flush_bytes is not None:
        monkeypatch.setattr(A, "_FLUSH_BYTES", flush_bytes)
    if stage_bytes is not None:
        monkeypatch.setattr(A, "_STAGE_BYTES", stage_bytes)
    torch.manual_seed(3)
    net = _Alternating()
    x = torch.randn(6, 3, 4, 4) * 3 + 0.5
    layers = ["a.0", "b.0", "a.1", "a.2", "c", "b.1", "a.3", "fc"]
    ref, _ = A._forward_stats(net, x, layers)
    probe = ActivationStats(layers=layers)
    _monitored(net, x, probe, steps=2)
    rec = probe._rec
    if stage_bytes is None:
        assert sum(rec.staged.values()) == 8
    if flush_bytes is None and stage_bytes is None:
        assert {k[0]: n for k, n in rec.staged.items()} == {(6, 3, 16): 4, (6, 4, 5): 2, (6, 4, 1): 1, (6, 2, 1): 1}
    _assert_history_matches(probe, ref, layers)
    # how the last pass was split: with no limit, a run of one shape is reduced together (a.1 with a.2)
    # and each change of shape ends a run: 7 reductions for 8 outputs; flushed at every output: 8
    where = rec._where
    if flush_bytes is None and stage_bytes is None:
        assert len(rec._entries) == 7 and where["a.1"][0] == where["a.2"][0] and where["a.2"][1:] == (3, 3)
    elif flush_bytes == 1:
        assert len(rec._entries) == 8 and len({w[0] for w in where.values()}) == 8


class _Extremes(nn.Module):
    """Outputs at the edges of the float ranges: a float32 (N, C) layer of ~1e20 (a diverging run) and one
    of ~1e-21, an integer (quantizing) layer on a map and on (N, C), and a float16 map too large to stage."""

    def __init__(self):
        super().__init__()
        self.huge = nn.Linear(10, 4)
        self.tiny = nn.Linear(10, 4)
        self.q_map = nn.Identity()
        self.q_flat = nn.Identity()
        self.half_map = nn.Identity()
        self.fc = nn.Linear(10, 2)
        with torch.no_grad():
            self.huge.weight.mul_(1e20)
            self.huge.bias.mul_(1e20)
            self.tiny.weight.mul_(1e-21)
            self.tiny.bias.mul_(1e-21)

    def forward(self, x):
        self.huge(x)
        self.tiny(x)
        self.q_map(torch.round(x[:, :8].reshape(-1, 2, 4) * 4).long())
        self.q_flat(torch.round(x * 4).long())
        self.half_map((x[:, :3, None, None] * 400).expand(-1, -1, 300, 300).half() + torch.arange(300).half())
        return self.fc(x)


def test_extreme_integer_and_half_outputs_match_float64_statistics():
    """Per-example squared deviations are formed in float64: a float32 (N, C) output of ~1e20 has a finite
    std (its square would overflow float32), one of ~1e-21 an accurate one (it would underflow); integer
    outputs are measured as float64 (no crash in the training step); a float16 map too large to stage
    (270,000 elements a channel) is summed in float32 (its per-example norms, ~1e5, overflow float16)."""
    import bnlab.probes.activations as A

    torch.manual_seed(4)
    net = _Extremes()
    x = torch.randn(3, 10)
    layers = ["huge", "tiny", "q_map", "q_flat", "half_map"]
    ref, _ = A._forward_stats(net, x, layers)
    probe = ActivationStats(layers=layers)
    _monitored(net, x, probe)
    got = probe.history[0][1]
    assert list(got) == layers
    for name in layers:
        rtol = 2e-3 if name == "half_map" else 1e-5
        assert torch.isfinite(got[name].std).all(), name
        torch.testing.assert_close(got[name].mean, ref[name].mean, rtol=rtol, atol=0)
        torch.testing.assert_close(got[name].std, ref[name].std, rtol=rtol, atol=0)
        torch.testing.assert_close(got[name].absmax, ref[name].absmax, rtol=0, atol=0)


def test_a_channel_of_infinities_has_std_nan_not_zero():
    """max == min gives std exactly 0 for a constant channel, but not for a channel that is all +inf:
    its spread is undefined (nan, as the float64 reference gives)."""
    from bnlab.probes.activations import ChannelStats, _fast_moments

    h = torch.randn(8, 3, 5)
    h[:, 1] = float("inf")
    h[:, 2] = 2.5
    mean, std, absmax = _fast_moments(h)
    ref = ChannelStats.of(h)
    assert math.isnan(float(std[1])) and math.isnan(float(ref.std[1]))
    assert float(std[2]) == 0.0 and float(absmax[1]) == float("inf")
