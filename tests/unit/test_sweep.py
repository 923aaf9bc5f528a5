"""bnlab.sweep: vectorized grid = separate torch.optim.SGD runs; divergence masking; fallback;
executors; per-cell records; the member-folding vmap rules."""

import copy
import json
import math
import warnings
from functools import partial

import pytest
import torch
from torch import nn

from bnlab import data, models
from bnlab.errors import UserError
from bnlab.sweep import LocalExecutor, ProcessExecutor, sgd_step, sweep
from bnlab.train import train

STEPS, BATCH = 15, 32  # 256 examples / 32 = 8 steps per epoch: the run crosses an epoch boundary


@pytest.fixture(scope="module")
def sets():
    tr = data.load("synthetic", split="train", n=256, in_shape=(1, 8, 8), seed=1)
    te = data.load("synthetic", split="test", n=256, in_shape=(1, 8, 8), seed=1)
    return tr, te


def _net_fn(norm: str, width: int = 4, model: str = "convnet"):
    return partial(models.make, model, norm=norm, in_shape=(1, 8, 8), num_classes=10, width=width)


def _reference(norm, tr, te, lr, seed, *, momentum, weight_decay, data_seed, steps=STEPS, model="convnet"):
    """One separate run: bnlab.train.train with torch.optim.SGD."""
    net = _net_fn(norm, width=4 if model == "convnet" else 16, model=model)(seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    h = train(net, tr, opt, steps=steps, batch_size=BATCH, eval_data=te, eval_every=10**9, device="cpu", seed=data_seed)
    return h, net


@pytest.mark.parametrize("model,norm", [("convnet", "bn"), ("convnet", "none"), ("mlp", "bn")])
def test_sweep_equals_separate_sgd_runs(sets, model, norm):
    tr, te = sets
    lrs, seeds = [0.02, 0.2], [0, 1]
    res = sweep(_net_fn(norm, width=4 if model == "convnet" else 16, model=model), tr, lrs=lrs, seeds=seeds, steps=STEPS, batch_size=BATCH, momentum=0.9, weight_decay=5e-3,
                data_seed=3, eval_data=te, device="cpu", vectorize=True, keep_states=True)
    assert res.vectorized and len(res) == 4 and res.losses.shape == (4, STEPS)
    assert res.lrs == [0.02, 0.02, 0.2, 0.2] and res.seeds == [0, 1, 0, 1]
    for i, (lr, seed) in enumerate(zip(res.lrs, res.seeds)):
        h, net = _reference(norm, tr, te, lr, seed, momentum=0.9, weight_decay=5e-3, data_seed=3, model=model)
        assert not h.diverged and not res.diverged[i]
        ref_losses = torch.tensor([r["loss"] for r in h.records], dtype=torch.float64)
        torch.testing.assert_close(res.losses[i], ref_losses, rtol=1e-5, atol=1e-5)
        # final weights and BN running statistics (what evaluation uses)
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            torch.testing.assert_close(res.states[i][name], t.detach(), rtol=1e-5, atol=1e-5, msg=name)
        final = res.final[i]
        for key in ("train_loss", "test_loss"):
            assert final[key] == pytest.approx(h.final[key], rel=1e-5, abs=1e-5)
        for key in ("train_acc", "test_acc"):
            assert abs(final[key] - h.final[key]) <= 1.5 / 256  # at most one near-tie flips
    if norm == "bn":  # running statistics moved away from their initial values
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in res.states[0].items() if k.endswith("running_mean"))
        assert all(int(v) == STEPS for k, v in res.states[0].items() if k.endswith("num_batches_tracked"))


def test_grid_helpers_and_history(sets):
    tr, _ = sets
    res = sweep(_net_fn("bn"), tr, lrs=[0.01, 0.1, 0.3], seeds=[0, 5], steps=4, batch_size=BATCH, device="cpu")
    assert res.grid(res.metric("train_acc")).shape == (3, 2)
    assert res.grid(torch.tensor(res.lrs, dtype=torch.float64))[:, 0].tolist() == [0.01, 0.1, 0.3]
    assert res.grid(torch.tensor(res.seeds))[0].tolist() == [0, 5]
    assert res.grid(res.losses).shape == (3, 2, 4)
    h = res.history(3)
    assert [r["step"] for r in h.records] == [0, 1, 2, 3] and h.records[0]["lr"] == 0.1
    assert h.summary()["steps"] == 4 and res.member_steps_per_second > 0


def test_diverging_member_is_masked_and_does_not_touch_the_others(sets):
    tr, te = sets
    kw = dict(seeds=[0], steps=STEPS, batch_size=BATCH, momentum=0.9, data_seed=1, eval_data=te, device="cpu", vectorize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN/overflow warnings from the masked member
        res = sweep(_net_fn("none"), tr, lrs=[0.05, 1e6, 0.1], **kw)
    base = sweep(_net_fn("none"), tr, lrs=[0.05, 0.1], **kw)
    assert res.diverged.tolist() == [False, True, False]
    t = res.diverged_at[1]
    assert t is not None and t < STEPS and "non-finite" in res.reasons[1]
    assert torch.isnan(res.losses[1, t + 1:]).all() and torch.isfinite(res.losses[1, :t]).all()
    assert math.isnan(res.final[1]["train_loss"])
    # the survivors: the same numbers as a sweep without the diverging member
    torch.testing.assert_close(res.losses[[0, 2]], base.losses, rtol=1e-6, atol=1e-7)
    for a, b in zip([res.final[0], res.final[2]], base.final):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    # and the divergence is recorded as the separate run records it
    h, _ = _reference("none", tr, te, 1e6, 0, momentum=0.9, weight_decay=0.0, data_seed=1)
    assert h.diverged and h.diverged_at == t and h.reason == res.reasons[1] and h.steps == res.steps_taken[1]


def test_every_member_diverging_stops_cleanly(sets):
    tr, _ = sets
    res = sweep(_net_fn("none"), tr, lrs=[1e6, 1e7], steps=20, batch_size=BATCH, device="cpu", vectorize=True)
    assert res.diverged.all() and all(t is not None and t < 20 for t in res.diverged_at)


class _Branchy(nn.Module):
    """A convnet whose forward branches on a tensor value: vmap cannot trace it."""

    def __init__(self, seed: int):
        super().__init__()
        self.net = models.make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, width=4, seed=seed)

    def forward(self, x):
        out = self.net(x)
        return out if out.abs().sum() >= 0 else -out  # data-dependent control flow


def _branchy(seed: int) -> nn.Module:
    return _Branchy(seed)


def test_fallback_loop_equals_vectorized_path(sets):
    tr, te = sets
    kw = dict(lrs=[0.03, 0.3], seeds=[2], steps=10, batch_size=BATCH, momentum=0.5, weight_decay=1e-3, eval_data=te,
              eval_every=4, device="cpu", keep_states=True)
    vec = sweep(_net_fn("bn"), tr, vectorize=True, **kw)
    loop = sweep(_net_fn("bn"), tr, vectorize=False, **kw)
    assert vec.vectorized and not loop.vectorized
    torch.testing.assert_close(vec.losses, loop.losses, rtol=1e-5, atol=1e-5)
    assert [[e["step"] for e in ev] for ev in vec.evals] == [[4, 8, 10]] * 2 == [[e["step"] for e in ev] for ev in loop.evals]
    for a, b in zip(vec.evals, loop.evals):
        for ea, eb in zip(a, b):
            assert ea["test_loss"] == pytest.approx(eb["test_loss"], rel=1e-5)
    for sa, sb in zip(vec.states, loop.states):
        assert list(sa) == list(sb)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-5)


def test_auto_falls_back_when_vmap_cannot_trace_the_model(sets):
    tr, _ = sets
    kw = dict(lrs=[0.05, 0.1], steps=5, batch_size=BATCH, device="cpu")
    auto = sweep(_branchy, tr, vectorize="auto", **kw)
    assert not auto.vectorized and auto.fallback_reason
    plain = sweep(_net_fn("bn"), tr, vectorize=False, seeds=[0], **kw)
    torch.testing.assert_close(auto.losses, plain.losses, rtol=0, atol=0)  # the same nets, the same loop
    with pytest.raises(RuntimeError):
        sweep(_branchy, tr, vectorize=True, **kw)


def test_per_cell_config_records_and_summary(sets):
    """What a caller needs to record each cell as a run (the sweep itself writes nothing)."""
    tr, te = sets
    res = sweep(_net_fn("bn"), tr, lrs=[0.05, 1e6], seeds=[0], steps=6, batch_size=BATCH, eval_data=te, eval_every=3,
                device="cpu", name="grid", config={"model": "convnet"})
    assert not hasattr(res, "run_dirs")
    for i in range(len(res)):
        cfg = json.loads(json.dumps(res.cell_config(i)))
        assert cfg["cell"] == i and cfg["lr"] == res.lrs[i] and cfg["seed"] == 0 and cfg["model"] == "convnet"
        assert cfg["momentum"] == 0.0 and cfg["sweep"] == "grid"
        summary = json.loads(json.dumps(res.summary(i)))
        assert summary["diverged"] == bool(res.diverged[i]) and summary["lr"] == res.lrs[i]
        lines = json.loads(json.dumps(res.metric_records(i)))
        steps = [r for r in lines if r.get("event") != "eval"]
        assert len(steps) == res.steps_taken[i] + (1 if res.diverged_at[i] == res.steps_taken[i] else 0)
        evals = [r["step"] for r in lines if r.get("event") == "eval"]
        assert evals[-1] == res.steps_taken[i] and evals == sorted(evals)
        for k, r in enumerate(lines):  # a periodic evaluation follows the step record that precedes it
            if r.get("event") == "eval" and k + 1 < len(lines):
                assert lines[k - 1]["step"] == r["step"] - 1
    assert [r.get("event") for r in res.metric_records(0)].count("eval") == 2  # steps 3 and 6


def test_local_executor_groups_and_bad_inputs(sets):
    tr, _ = sets
    assert LocalExecutor().map(lambda v: v * 2, [1, 2]) == [2, 4]
    for bad in (dict(lrs=[]), dict(lrs=[0.0]), dict(lrs=[float("nan")]), dict(lrs=[0.1], seeds=[1.5]), dict(lrs=[0.1], vectorize="yes"),
                dict(lrs=[0.1], momentum=1.0), dict(lrs=[0.1], steps=None)):
        kw = {"steps": 2, **bad}
        with pytest.raises(UserError):
            sweep(_net_fn("bn"), tr, **kw)
    with pytest.raises(UserError, match="picklable"):
        sweep(lambda seed: _net_fn("bn")(seed=seed), tr, lrs=[0.1], steps=1, executor=ProcessExecutor(2))


@pytest.mark.slow
def test_process_executor_gives_the_local_results(sets):
    tr, te = sets
    kw = dict(lrs=[0.05, 0.2], seeds=[0], steps=6, batch_size=BATCH, momentum=0.9, eval_data=te, device="cpu")
    local = sweep(_net_fn("bn"), tr, vectorize=False, **kw)
    procs = sweep(_net_fn("bn"), tr, vectorize=False, executor=ProcessExecutor(2, threads_per_worker=1), **kw)
    assert torch.equal(local.losses, procs.losses) and local.final == procs.final
    vec_procs = sweep(_net_fn("bn"), tr, vectorize=True, executor=ProcessExecutor(2, threads_per_worker=1), **kw)
    assert vec_procs.vectorized
    torch.testing.assert_close(vec_procs.losses, local.losses, rtol=1e-5, atol=1e-5)


def test_sgd_step_equals_torch_sgd():
    torch.manual_seed(0)
    w0 = torch.randn(3, 5)
    lrs = torch.tensor([[0.1], [0.01], [0.5]])
    W, V = w0.clone(), None  # None: the first step starts the buffer, v_0 = d_0
    refs = [torch.nn.Parameter(w0[i].clone()) for i in range(3)]
    opts = [torch.optim.SGD([p], lr=float(lrs[i]), momentum=0.9, weight_decay=0.1) for i, p in enumerate(refs)]
    for _ in range(4):
        g = torch.randn(3, 5)
        V = sgd_step(W, g, V, lr=lrs, momentum=0.9, weight_decay=0.1)
        for i, (p, o) in enumerate(zip(refs, opts)):
            p.grad = g[i].clone()
            o.step()
    torch.testing.assert_close(W, torch.stack([p.detach() for p in refs]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ the member-folding vmap rules
_LAYERS = {
    "conv2d+bias": (lambda: nn.Conv2d(3, 6, 3, padding=1), (3, 6, 6)),
    "conv2d stride/groups": (lambda: nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False), (4, 7, 7)),
    "conv2d one channel": (lambda: nn.Conv2d(1, 5, 3, padding=1, bias=False), (1, 5, 5)),
    "conv1d dilation": (lambda: nn.Conv1d(2, 4, 5, padding=4, dilation=2), (2, 11)),
    "maxpool2d": (lambda: nn.MaxPool2d(2), (3, 6, 6)),
    "avgpool2d": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (3, 7, 7)),
    "adaptive avg1d": (lambda: nn.AdaptiveAvgPool1d(1), (3, 9)),
    "adaptive max2d": (lambda: nn.AdaptiveMaxPool2d(2), (3, 5, 5)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), (3, 4, 4)),
    "batchnorm1d on (N, C)": (lambda: nn.BatchNorm1d(5), (5,)),
    "batchnorm1d on (N, C, L)": (lambda: nn.BatchNorm1d(3, affine=False), (3, 7)),
}


_PARAMETER_FREE = {"maxpool2d", "avgpool2d", "adaptive avg1d", "adaptive max2d"}  # nothing batched with a shared input


@pytest.mark.parametrize(
    "layer,shared_input",
    [(k, True) for k in _LAYERS if k not in _PARAMETER_FREE] + [(k, False) for k in _LAYERS],
    ids=lambda v: ("shared x" if v else "x per member") if isinstance(v, bool) else v,
)
def test_stacked_layer_rules_equal_per_member_calls(layer, shared_input):
    """The custom vmap rules (members folded into channels, channels-last maps) give each member's
    own module output, input gradient, parameter gradients and BN running statistics."""
    from torch.func import functional_call, vmap

    from bnlab.sweep.layers import use_stacked_layers

    make, shape = _LAYERS[layer]
    M, N = 3, 6
    gen = torch.Generator().manual_seed(0)
    mods = []
    for i in range(M):
        torch.manual_seed(10 + i)
        mod = make().double().train()
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        mods.append(mod)
    x = torch.randn((N, *shape) if shared_input else (M, N, *shape), generator=gen, dtype=torch.float64)
    names = [n for n, _ in mods[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in mods]).requires_grad_() for n in names}
    buffers = {n: torch.stack([dict(m.named_buffers())[n].detach() for m in mods]).clone() for n, _ in mods[0].named_buffers()}
    template = copy.deepcopy(mods[0])
    use_stacked_layers(template)
    xs = x.clone().requires_grad_()
    out = vmap(lambda st, xi: functional_call(template, st, (xi,)), in_dims=(0, None if shared_input else 0))({**params, **buffers}, xs)
    weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (out * weights).sum().backward()
    xr = x.clone().requires_grad_()
    for i, mod in enumerate(mods):
        ref = mod(xr if shared_input else xr[i])
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        (ref * weights[i]).sum().backward()
        for n, p in mod.named_parameters():
            torch.testing.assert_close(params[n].grad[i], p.grad, rtol=1e-10, atol=1e-12, msg=n)
        for n, b in mod.named_buffers():
            torch.testing.assert_close(buffers[n][i], b, rtol=1e-12, atol=1e-12, msg=n)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)


def test_sweep_equals_separate_runs_for_a_1d_preresnet():
    """Strided 1-D convolutions, pre-activation residual blocks and global average pooling."""
    tr = data.load("synthetic", split="train", n=128, in_shape=(1, 24), seed=2)
    fn = partial(models.make, "preresnet", norm="bn", in_shape=(1, 24), num_classes=10, width=4, depth=8)
    res = sweep(fn, tr, lrs=[0.01, 0.1], seeds=[0, 1], steps=10, batch_size=32, momentum=0.9, weight_decay=5e-4,
                data_seed=0, eval_train=False, device="cpu", vectorize=True, keep_states=True)
    assert res.vectorized
    for i, (lr, seed) in enumerate(zip(res.lrs, res.seeds)):
        net = fn(seed=seed)
        h = train(net, tr, torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4), steps=10, batch_size=32,
                  eval_every=10**9, eval_train=False, device="cpu", seed=0)
        torch.testing.assert_close(res.losses[i], torch.tensor([r["loss"] for r in h.records], dtype=torch.float64), rtol=1e-5, atol=1e-5)
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            torch.testing.assert_close(res.states[i][name], t.detach(), rtol=1e-5, atol=1e-5, msg=name)


def test_layers_on_the_shared_input_batch_still_vectorize():
    """A pooling layer and a parameter-free BatchNorm applied to the (unbatched) data batch run the
    module's own forward inside vmap; the sweep still equals separate runs."""

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.BatchNorm2d(1, affine=False, track_running_stats=False), nn.AvgPool2d(2),
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10),
        )

    tr = data.load("synthetic", split="train", n=64, in_shape=(1, 8, 8), seed=2)
    res = sweep(net, tr, lrs=[0.05, 0.2], steps=4, batch_size=32, data_seed=0, eval_train=False, device="cpu", vectorize=True)
    assert res.vectorized
    for i, lr in enumerate(res.lrs):
        model = net(0)
        h = train(model, tr, torch.optim.SGD(model.parameters(), lr=lr), steps=4, batch_size=32, eval_every=10**9,
                  eval_train=False, device="cpu", seed=0)
        torch.testing.assert_close(res.losses[i], torch.tensor([r["loss"] for r in h.records], dtype=torch.float64), rtol=1e-5, atol=1e-5)
