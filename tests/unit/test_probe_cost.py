"""The fast paths behind the cheap probes, each against an independent float64 reference:
float64-accumulated norms and dots (bnlab.probes._reduce), the angle from three squared norms,
the activation moments of ActivationStats, the finite-weights check of bnlab.train, the cost presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnlab import models
from bnlab.data import ArrayData
from bnlab.errors import UserError
from bnlab.monitor import Monitor
from bnlab.probes import ActivationStats, GradNorm, LearningRate, Probe, WeightNorm
from bnlab.probes._reduce import DOT_CHUNK, EXACT_MAX, ROW, dot64, sumsq64
from bnlab.probes.activations import ChannelStats, _fast_moments
from bnlab.probes.registry import PRESETS, make_preset
from bnlab.probes.scale import _angle
from bnlab.scale import angle_between
from bnlab.train import _all_finite, make_optimizer, train


def _ref_sumsq(t):
    t = t.detach().double().reshape(-1)
    return float(torch.dot(t, t))


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(7, generator=g),                                   # small: exact
        torch.randn(EXACT_MAX, generator=g) * 3,                       # the largest exact one
        torch.randn(512, 128, 3, 3, generator=g) * 0.05 + 0.01,        # rows, no tail (589824 = 2304 * 256)
        torch.randn(300_001, generator=g) * 1e-3,                      # rows and a tail
        torch.randn(1_000_000, generator=g, dtype=torch.float64),      # float64: exact
        torch.randn(2 * DOT_CHUNK + 5, generator=g) + 4.0,             # several dot chunks, large mean
    ]


def test_sumsq64_matches_float64_and_beats_plain_float32():
    ts = _tensors()
    got = sumsq64(ts).tolist()
    for t, v in zip(ts, got):
        ref = _ref_sumsq(t)
        exact = t.numel() <= EXACT_MAX or t.dtype == torch.float64
        # float32 rows: ~1e-8; a plain float32 vector_norm is off by 1e-7 to 1e-4 on these
        assert v == pytest.approx(ref, rel=1e-13 if exact else 5e-8), t.shape
    assert ts[3].numel() % ROW != 0  # the tail path is exercised


def test_dot64_matches_float64_with_cancellation():
    xs = _tensors(1)
    g = torch.Generator().manual_seed(2)
    # y nearly orthogonal to x (as a gradient to a scale-invariant weight): the dot cancels
    ys = []
    for x in xs:
        r = torch.randn(x.shape, generator=g, dtype=x.dtype)
        xd, rd = x.double().reshape(-1), r.double().reshape(-1)
        ys.append((rd - (rd @ xd) / (xd @ xd) * xd).reshape(x.shape).to(x.dtype) * 1e-3)
    got = dot64(xs, ys).tolist()
    for x, y, v in zip(xs, ys, got):
        xd, yd = x.double().reshape(-1), y.double().reshape(-1)
        scale = float((xd * yd).abs().sum())
        assert abs(v - float(xd @ yd)) <= 5e-8 * scale, x.shape
    assert dot64([], []).numel() == 0 and sumsq64([]).numel() == 0
    with pytest.raises(ValueError):
        dot64(xs, ys[:-1])


def test_small_tensor_sums_reuse_work_buffers_without_aliasing_results():
    """The exact path reuses its float64 work buffers across calls: a result must not change when
    the next call overwrites them, and mixed sizes (shrinking, growing) stay exact."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, generator=g) for n in (3, 1000, EXACT_MAX)]
    ys = [torch.randn(n, generator=g) for n in (3, 1000, EXACT_MAX)]
    first = dot64(xs, ys)
    kept = first.clone()
    second = dot64(xs[:1], ys[:1])          # a smaller call overwrites the buffers' start
    third = dot64([x * 2 for x in xs] + [torch.randn(EXACT_MAX, generator=g)],
                  [y for y in ys] + [torch.randn(EXACT_MAX, generator=g)])  # a larger one grows them
    assert torch.equal(first, kept)
    for x, y, v in zip(xs, ys, kept.tolist()):
        assert v == pytest.approx(float(x.double() @ y.double()), rel=1e-13, abs=1e-13)
    assert second.item() == pytest.approx(float(xs[0].double() @ ys[0].double()), rel=1e-13)
    assert third[1].item() == pytest.approx(2 * float(xs[1].double() @ ys[1].double()), rel=1e-13)
    sq = sumsq64(xs).tolist()
    for x, v in zip(xs, sq):
        assert v == pytest.approx(_ref_sumsq(x), rel=1e-13)
    assert sumsq64([torch.zeros(10)]).item() == 0.0


def test_work_buffers_above_the_cap_or_in_inference_mode_are_temporaries(monkeypatch):
    """Nothing larger than WORK_MAX stays allocated between calls (the exact path takes every tensor
    on a GPU, and float64 tensors of any size on the CPU); no buffer is kept from inference mode (it
    would refuse later writes); integer tensors still sum; the values stay exact."""
    import threading

    import bnlab.probes._reduce as R

    monkeypatch.setattr(R, "WORK_MAX", 500)
    monkeypatch.setattr(R, "_TLS", threading.local())
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(400, generator=g, dtype=torch.float64), torch.randn(300, generator=g, dtype=torch.float64)]
    ys = [torch.randn(400, generator=g, dtype=torch.float64), torch.randn(300, generator=g, dtype=torch.float64)]
    got = dot64(xs, ys).tolist()
    assert not getattr(R._TLS, "work", None)  # 700 elements > the cap: temporaries only
    for x, y, v in zip(xs, ys, got):
        assert v == pytest.approx(float(x @ y), rel=1e-13)
    with torch.inference_mode():
        inside = dot64(xs[1:], ys[1:]).item()
    assert not getattr(R._TLS, "work", None)
    assert dot64(xs[1:], ys[1:]).item() == inside == pytest.approx(float(xs[1] @ ys[1]), rel=1e-13)
    assert R._TLS.work and all(b.numel() <= 500 for b in R._TLS.work.values())  # 300 elements: kept
    assert sumsq64([torch.arange(5)]).item() == 30.0 and dot64([torch.arange(3)], [torch.arange(3)]).item() == 5.0


@pytest.mark.parametrize("case", ["tiny", "moderate", "large", "opposite", "zeros", "one_zero"])
def test_angle_from_norms_matches_angle_between(case):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(500, generator=g, dtype=torch.float64)
    step = torch.randn(500, generator=g, dtype=torch.float64)
    b = {"tiny": a + 1e-6 * step, "moderate": a + 0.3 * step, "large": a + 5 * step, "opposite": -2 * a + 1e-4 * step,
         "zeros": torch.zeros(500, dtype=torch.float64), "one_zero": torch.zeros(500, dtype=torch.float64)}[case]
    if case == "zeros":
        a = torch.zeros(500, dtype=torch.float64)
    got = _angle(float(a @ a), float(b @ b), float((a - b) @ (a - b)))
    ref = angle_between(a, b)
    if math.isnan(ref):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(ref, rel=1e-7, abs=1e-15)


@pytest.mark.parametrize("shape, offset", [((16, 8, 5, 5), 0.0), ((16, 8, 5, 5), 100.0), ((32, 6), 3.0), ((20,), 0.5), ((4, 3, 7), -2.0)])
def test_fast_moments_match_channel_stats(shape, offset):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(shape, generator=g) * 0.7 + offset
    mean, std, absmax = _fast_moments(h)
    ref = ChannelStats.of(h)
    torch.testing.assert_close(mean, ref.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(std, ref.std, rtol=1e-5, atol=1e-7)  # offset/std = 140: the two-pass variance holds
    torch.testing.assert_close(absmax.double(), ref.absmax, rtol=0, atol=0)


def test_deferred_moments_and_batched_summaries_match_channel_stats():
    from bnlab.probes.activations import _finish_moments, _flat, _flat_summaries, _raw_moments

    g = torch.Generator().manual_seed(6)
    hs = [torch.randn(16, 8, 5, 5, generator=g) * 0.5 + 30.0, torch.randn(16, 6, generator=g) - 1, torch.randn(16, 3, 7, generator=g),
          torch.randn(16, 5, 9, 9, generator=g) * 2 - 3]  # maps of 1, 7, 25 positions (max over examples first) and 81
    scratch: dict = {}
    got = _finish_moments([_raw_moments(h, scratch) for h in hs])  # one batch size: all layers together
    odd = _finish_moments([_raw_moments(hs[0], scratch), _raw_moments(torch.randn(5, 4, generator=g), scratch)])  # two sizes
    for (mean, std, absmax), h in zip(got + odd[:1], hs + hs[:1]):
        ref = ChannelStats.of(h)
        torch.testing.assert_close(mean, ref.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(std, ref.std, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(absmax, ref.absmax, rtol=0, atol=0)
    stats = {f"l{i}": ChannelStats(*m) for i, m in enumerate(got)}
    fast, slow = _flat_summaries(stats), _flat(stats, False)
    assert fast.keys() == slow.keys() and all(fast[k] == pytest.approx(slow[k], rel=1e-12) for k in slow)


def test_fast_moments_propagate_non_finite():
    h = torch.randn(4, 3, 2)
    h[1, 2, 0] = float("nan")
    h[0, 0, 1] = -float("inf")
    mean, std, absmax = _fast_moments(h)
    assert math.isnan(float(mean[2])) and math.isnan(float(absmax[2]))
    assert float(absmax[0]) == float("inf") and torch.isfinite(mean[1])


def test_all_finite_is_exact_including_overflowing_sums():
    net = models.make("mlp", norm="none", in_shape=(4,), num_classes=3, width=8, depth=1)
    assert _all_finite(net)
    w = net.features[1].weight
    with torch.no_grad():
        w.fill_(3e38)  # finite entries whose float32 sum overflows: the exact test decides
        assert _all_finite(net)
        for bad in (float("nan"), float("inf"), -float("inf")):
            w.fill_(1.0)
            w[0, 0] = bad
            assert not _all_finite(net)


class _Counter(Probe):
    """A cheap probe that implements only after_step and draws random numbers (the guard undoes it)."""

    name = "counter"

    def __init__(self):
        super().__init__(every=1)
        self.calls = 0
        self.seen = []

    def active(self, step):
        self.calls += 1
        return True

    def after_step(self, ctx):
        torch.rand(3)
        self.seen.append(ctx.step)
        return {"n": float(len(self.seen))}


def test_monitor_calls_a_probe_only_at_the_events_it_implements_and_restores_the_rng():
    net = models.make("mlp", norm="bn", in_shape=(4,), num_classes=3, width=8, depth=1, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    probe = _Counter()
    records = []
    mon = Monitor(net, opt, [probe, GradNorm(), LearningRate()], log=records)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        state = torch.get_rng_state()
        with mon.step((x, y)) as s:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            s.loss = loss
            opt.step()
        assert torch.equal(state, torch.get_rng_state())
    assert probe.calls == 3 and probe.seen == [0, 1, 2]  # not asked at before_step / after_backward
    assert [r["counter/n"] for r in records] == [1.0, 2.0, 3.0]
    assert all("grad_norm/total" in r and "lr/0" in r for r in records)


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    return ArrayData(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g), 5)


def test_presets_build_their_schedules_and_train_takes_a_preset_name():
    data = _data()
    net = models.make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=5, width=4, seed=3)
    assert {"economy", "business", "full"} <= set(PRESETS)
    probes = make_preset("business", net, data.full_batch())
    assert [type(p).__name__ for p in probes][:3] == [type(p).__name__ for p in (GradNorm(), WeightNorm(), LearningRate())]
    act = next(p for p in probes if isinstance(p, ActivationStats))
    assert act.active(0) and act.active(10) and not act.active(5) and not act.keep
    with pytest.raises(UserError, match="unknown preset 'cheapest'; accepted: .*economy"):
        make_preset("cheapest", net, data.full_batch())
    with pytest.raises(UserError, match="needs a sample batch"):
        make_preset("business", net)
    assert len(make_preset("economy", net)) == 4  # needs no batch
    # bnlab.train takes a preset name and builds it for the model and the data
    opt = make_optimizer(net.parameters(), lr=0.05)
    h = train(net, data, opt, steps=3, batch_size=16, probes="economy", device="cpu", eval_train=False)
    assert all({"grad_norm/total", "weight_norm/total", "lr/0"} <= set(r) for r in h.records)
    with pytest.raises(UserError, match="unknown preset"):
        train(net, data, opt, steps=1, batch_size=16, probes="nope", device="cpu")


def test_step_cache_shares_values_and_never_serves_a_stale_one():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(100_000, generator=g)
    v = torch.randn(300, generator=g)
    cache: dict = {}
    first = sumsq64([w, v], cache)
    assert torch.equal(sumsq64([v, w], cache), first.flip(0))  # served from the cache
    with torch.no_grad():
        w.mul_(2.0)  # an in-place write (as the optimizer's) bumps the version: recomputed
    again = sumsq64([w, v], cache).tolist()
    assert again[0] == pytest.approx(4 * first[0].item(), rel=1e-7) and again[1] == first[1].item()
    y = v.repeat(334)[:100_000]
    d = dot64([w], [y], cache).item()
    assert abs(d - float(w.double() @ y.double())) <= 5e-8 * float((w.double() * y.double()).abs().sum())


def test_norms_dot64_equals_the_separate_reductions_bit_for_bit():
    """One sweep gives exactly sumsq64/dot64's values (the same partial sums), shares them through the
    step cache both ways, and matches float64."""
    from bnlab.probes._reduce import FUSE_CHUNK, norms_dot64

    g = torch.Generator().manual_seed(9)
    n_big = FUSE_CHUNK + 3 * DOT_CHUNK + 5 * ROW  # several sweep chunks, a partial last one
    xs = [torch.randn(n_big, generator=g), torch.randn(300, generator=g), torch.randn(EXACT_MAX + 7, generator=g),
          torch.randn(70_000, generator=g, dtype=torch.float64)]
    ys = [torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e-2 for x in xs]
    got = norms_dot64(xs, ys)
    sep = torch.stack([sumsq64(xs), sumsq64(ys), dot64(xs, ys)])
    assert torch.equal(got, sep)
    for i, (x, y) in enumerate(zip(xs, ys)):
        xd, yd = x.double(), y.double()
        assert got[0, i].item() == pytest.approx(float(xd @ xd), rel=5e-8)
        assert got[1, i].item() == pytest.approx(float(yd @ yd), rel=5e-8)
        assert abs(got[2, i].item() - float(xd @ yd)) <= 5e-8 * float((xd * yd).abs().sum())
    cache: dict = {}
    first = norms_dot64(xs, ys, cache)
    assert torch.equal(first, sep) and len(cache) == 3 * len(xs)
    assert torch.equal(sumsq64(ys, cache), sep[1]) and torch.equal(dot64(xs, ys, cache), sep[2])
    cache2: dict = {}
    sumsq64(ys, cache2)  # ‖y‖² first (GradNorm before ScaleInvariantStats): the sweep is still exact
    assert torch.equal(norms_dot64(xs, ys, cache2), sep)
    with torch.no_grad():
        xs[0].mul_(3.0)
    assert norms_dot64(xs, ys, cache)[0, 0].item() == pytest.approx(9 * sep[0, 0].item(), rel=1e-7)
    assert norms_dot64([], []).shape == (3, 0)


def test_intrinsic_grad_norm_with_the_dot_hint_gives_the_same_values():
    """With ScaleInvariantStats's hint IntrinsicGradNorm reads ‖w‖², ‖g‖² (and ⟨w, g⟩, left in the
    step cache) in one sweep: the same numbers to the bit, and float64's to 5e-8."""
    from bnlab.probes._reduce import want_dots, wants_dots
    from bnlab.probes.intrinsic import IntrinsicGradNorm

    g = torch.Generator().manual_seed(4)
    si = {"a": torch.randn(512, 64, 3, 3, generator=g), "b": torch.randn(40, generator=g)}
    other = [torch.randn(300_000, generator=g)]
    grads = [torch.randn(w.shape, generator=g) * 1e-2 for w in si.values()]
    og = [torch.randn(300_000, generator=g)]
    probe = IntrinsicGradNorm(si, other)
    plain = probe._norms(grads, og, {})
    cache: dict = {}
    want_dots(cache, list(si.values()))
    assert wants_dots(cache, list(si.values())) and not wants_dots({}, list(si.values()))
    hinted = probe._norms(grads, og, cache)
    assert hinted == plain
    assert dot64(list(si.values()), grads, cache).tolist() == dot64(list(si.values()), grads).tolist()
    ref = sum(float(w.double().square().sum() * gg.double().square().sum()) for w, gg in zip(si.values(), grads))
    assert hinted["si_grad_norm_sq"] == pytest.approx(ref, rel=5e-8)
    assert hinted["other_grad_norm_sq"] == pytest.approx(float(og[0].double().square().sum()), rel=5e-8)


def test_constant_channel_has_exactly_zero_std_in_the_fast_moments():
    """A constant channel (a dead ReLU, a saturated unit): std exactly 0, as ChannelStats.of gives,
    not the rounded mean's ~1e-7·|mean|; the other channels agree with the float64 reference."""
    from bnlab.probes.activations import ChannelStats, _fast_moments, _finish_moments, _raw_moments
    h = torch.randn(32, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    h[:, 1] = 0.3  # not representable exactly in binary: a rounded float32 mean differs from it
    h[:, 3] = 1e4 / 3
    ref = ChannelStats.of(h)
    for mean, std, absmax in (_fast_moments(h, {}), _finish_moments([_raw_moments(h, {})])[0]):
        assert std[1].item() == 0.0 and std[3].item() == 0.0
        assert torch.allclose(std.cpu(), torch.as_tensor(ref.std, dtype=torch.float64), rtol=1e-5)


@pytest.mark.parametrize("order", ["grad-norm first", "scale first"])
def test_the_step_plan_reads_each_weight_and_gradient_once_whatever_the_order(order, monkeypatch):
    """ScaleInvariantStats announces ‖w‖², ‖g‖², ⟨w, g⟩ at before_step; whichever probe reduces first
    (GradNorm for ‖g‖², IntrinsicGradNorm, the scale probe) takes all three in one sweep, and the
    others read the cache: at after_backward each large weight and gradient is read once. The
    values equal float64 references in either order."""
    from bnlab.probes import _reduce
    from bnlab.probes.intrinsic import IntrinsicGradNorm
    from bnlab.probes.scale import ScaleInvariantStats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3, bias=False), torch.nn.BatchNorm2d(128), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 5))
    conv = model[0].weight
    assert _reduce._is_rows(conv) and conv.numel() % ROW == 0  # the fused path
    si = {"conv": conv}
    others = [p for p in model.parameters() if p is not conv]
    probes = [GradNorm(), IntrinsicGradNorm(si, others), ScaleInvariantStats(si), WeightNorm()]
    if order == "scale first":
        probes = probes[2:3] + probes[:2] + probes[3:]
    reads: list = []
    real_fused, real_reduce = _reduce._fused, _reduce._reduce
    monkeypatch.setattr(_reduce, "_fused", lambda ts, pairs: reads.extend(t.data_ptr() for t in ts) or real_fused(ts, pairs))
    monkeypatch.setattr(_reduce, "_reduce", lambda xs, ys: reads.extend(
        x.data_ptr() for x in list(xs) + list(ys or []) if x.numel() > EXACT_MAX) or real_reduce(xs, ys))
    records = []
    mon = Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), probes, log=records.append)
    x, y = torch.randn(4, 64, 6, 6), torch.randint(0, 5, (4,))
    opt = mon.optimizer
    mon.before_step((x, y))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    mon.after_backward()
    w, g = conv.detach().double().clone(), conv.grad.double().clone()
    assert reads.count(conv.data_ptr()) == 1 and reads.count(conv.grad.data_ptr()) == 1
    grads = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
    opt.step()
    rec = mon.after_step()
    assert rec["grad_norm/total"] == pytest.approx(float(grads.norm()), rel=5e-8)
    assert rec["scale/conv/weight_norm"] == pytest.approx(float(w.norm()), rel=5e-8)
    assert rec["scale/conv/grad_norm"] == pytest.approx(float(g.norm()), rel=5e-8)
    # ⟨w, g⟩ cancels (w is scale-invariant): the bound of dot64, 5e-8 of Σ|w·g|
    bound = 5e-8 * float((w * g).abs().sum() / (w.norm() * g.norm()))
    assert abs(rec["scale/conv/cos_wg"] - float(torch.dot(w.flatten(), g.flatten()) / (w.norm() * g.norm()))) <= bound
    other_sq = sum(float(p.grad.double().square().sum()) for p in others)
    assert rec["objective/grad_norm_sq"] == pytest.approx(float(w.norm() ** 2 * g.norm() ** 2) + other_sq, rel=5e-8)
    assert rec["weight_norm/total"] == pytest.approx(
        float(torch.cat([p.detach().double().reshape(-1) for p in model.parameters()]).norm()), rel=5e-8)


def test_the_plan_waits_for_this_steps_gradient():
    """Announced before the backward pass, while last step's gradient is still there: a reduction
    at that time does not spend the plan on the old gradient; after the backward pass the first
    reduction takes the fused sweep of the new one (its dot product is then in the cache)."""
    from bnlab.probes._reduce import _key, want_sums

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128, 3, 3))
    w.grad = torch.randn_like(w)  # last step's
    cache: dict = {}
    want_sums(cache, [w])
    sumsq64([w], cache)  # e.g. a probe reading ‖w‖² at before_step
    assert _key("dot", w, w.grad) not in cache  # the plan was not run on the old gradient
    w.grad = None
    (w * torch.randn_like(w)).sum().backward()  # this step's gradient
    g2 = sumsq64([w.grad], cache)
    assert _key("dot", w, w.grad) in cache  # the sweep ran now, on the new gradient
    assert g2.item() == pytest.approx(_ref_sumsq(w.grad), rel=5e-8)
    prod = w.detach().double() * w.grad.double()
    assert abs(dot64([w], [w.grad], cache).item() - float(prod.sum())) <= 5e-8 * float(prod.abs().sum())
