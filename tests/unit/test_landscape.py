"""bnlab.landscape: closed forms on a quadratic, vmap against the loop on a BatchNorm convnet,
model state left alone, divergence as data; the relative loss of one step against a brute-force loop."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import data, landscape, models
from bnlab.landscape import GradientLineScan, probe_along_gradient, probe_model_along_gradient, relative_loss, relative_loss_of
from bnlab.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

DT = torch.float64


def _quadratic(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=DT)
    A = b @ b.T / n + 0.1 * torch.eye(n, dtype=DT)  # positive definite: small steps descend
    w = {"w": torch.randn(n, generator=g, dtype=DT)}
    return A, (lambda p: 0.5 * p["w"] @ A @ p["w"]), w


@pytest.mark.parametrize("vectorize", [True, False])
def test_quadratic_closed_forms(vectorize):
    A, f, w = _quadratic()
    g = A @ w["w"]
    steps = [0.01, 0.1, 0.5, 2.0]
    probe = probe_along_gradient(f, w, steps, vectorize=vectorize)
    assert probe.vectorized is vectorize
    # β_eff = ‖A g‖ / ‖g‖ exactly: ∇L(w) - ∇L(w - s g) = s A g
    assert probe.beta_eff == pytest.approx(((A @ g).norm() / g.norm()).item(), rel=1e-10, abs=0)
    for s, loss, diff in zip(steps, probe.losses, probe.grad_diff_norms):
        ws = w["w"] - s * g
        assert loss.item() == pytest.approx((0.5 * ws @ A @ ws).item(), rel=1e-12)
        assert diff.item() == pytest.approx((s * A @ g).norm().item(), rel=1e-10)
    assert probe.loss0 == pytest.approx(f(w).item(), rel=1e-15)
    assert probe.grad_norm == pytest.approx(g.norm().item(), rel=1e-12)
    all_losses = [probe.loss0] + probe.losses.tolist()
    assert probe.loss_band == (min(all_losses), max(all_losses))
    diffs = probe.grad_diff_norms
    assert probe.grad_band == (diffs.min().item(), diffs.max().item())
    assert probe.relative_losses[0].item() < 1.0


def test_loss_band_includes_the_starting_point():
    # Tiny steps descend, so L(w) is the band's maximum and no probe point reaches it.
    A, f, w = _quadratic(seed=1)
    probe = probe_along_gradient(f, w, [1e-3, 2e-3])
    assert probe.loss_band[1] == probe.loss0 > probe.losses.max().item()


def test_given_gradient_and_loss_are_used():
    A, f, w = _quadratic(seed=2)
    g = {"w": A @ w["w"]}
    ref = probe_along_gradient(f, w, [0.1, 0.3])
    given = probe_along_gradient(f, w, [0.1, 0.3], grad=g, loss=f(w))
    assert given.beta_eff == pytest.approx(ref.beta_eff, rel=1e-12)
    torch.testing.assert_close(given.losses, ref.losses, rtol=1e-12, atol=0)
    # a different direction changes the probed points: the given grad is the direction
    other = probe_along_gradient(f, w, [0.1, 0.3], grad={"w": 2 * g["w"]})
    assert not torch.allclose(other.losses, ref.losses)


def test_zero_step_is_in_the_band_but_not_in_beta():
    A, f, w = _quadratic(seed=3)
    probe = probe_along_gradient(f, w, [0.0, 0.2])
    assert probe.grad_diff_norms[0].item() == pytest.approx(0.0, abs=1e-12)
    g = A @ w["w"]
    assert probe.beta_eff == pytest.approx(((A @ g).norm() / g.norm()).item(), rel=1e-10)


@pytest.mark.parametrize("vectorize", [True, False])
def test_divergence_gives_non_finite_values_not_an_error(vectorize):
    w = {"w": torch.ones(6)}  # float32: a step of 1e30 overflows
    f = lambda p: (p["w"] ** 4).sum()  # noqa: E731
    probe = probe_along_gradient(f, w, [0.01, 1e30], vectorize=vectorize)
    assert probe.vectorized is vectorize
    assert math.isfinite(probe.losses[0].item()) and math.isinf(probe.losses[1].item())
    assert math.isinf(probe.grad_diff_norms[1].item())
    assert probe.loss_band[1] == math.inf and probe.beta_eff == math.inf
    json.loads(json.dumps(probe.as_dict()))  # still a valid metrics record (NaN/Infinity allowed)


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_nan_loss_makes_the_bands_nan(vectorize):
    def f(p):  # = Σ w⁴ while finite; inf · (1 + 0 · inf) = nan once it overflows
        q = (p["w"] ** 4).sum()
        return q * (1 + 0 * q)

    probe = probe_along_gradient(f, {"w": torch.ones(3)}, [0.01, 1e30], vectorize=vectorize)
    assert math.isnan(probe.losses[1].item())
    assert all(math.isnan(b) for b in probe.loss_band)
    assert math.isnan(probe.beta_eff) and all(math.isnan(b) for b in probe.grad_band)


def test_bad_arguments_are_user_errors():
    A, f, w = _quadratic()
    with pytest.raises(UserError):
        probe_along_gradient(f, w, [])
    with pytest.raises(UserError):
        probe_along_gradient(f, w, [0.1, float("nan")])
    with pytest.raises(UserError):
        probe_along_gradient(f, w, [0.1], vectorize="yes")
    with pytest.raises(UserError, match="keys"):
        probe_along_gradient(f, w, [0.1], grad={"v": w["w"]})


# ------------------------------------------------------------------------------------------
# a tiny BatchNorm convnet


class _TinyBNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def bn_conv():
    torch.manual_seed(0)
    model = _TinyBNConv().double()
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 6, 6, dtype=DT))  # non-trivial running statistics
    x = torch.randn(16, 3, 6, 6, dtype=DT)
    y = torch.randint(0, 5, (16,))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, (x, y)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.grad.clone() for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
    )


def _assert_unchanged(model, snap):
    state, grads, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), f"{n}.grad changed"
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("train", [True, False])
def test_vectorized_equals_loop_on_bn_convnet(bn_conv, train):
    model, batch = bn_conv
    model.train(train)
    steps = torch.tensor([0.01, 0.05, 0.2, 1.0, 5.0], dtype=DT)
    snap = _snapshot(model)
    rng = torch.get_rng_state()
    vec = probe_model_along_gradient(model, batch, F.cross_entropy, steps, vectorize=True)
    _assert_unchanged(model, snap)
    loop = probe_model_along_gradient(model, batch, F.cross_entropy, steps, vectorize=False)
    _assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    assert vec.vectorized and not loop.vectorized
    torch.testing.assert_close(vec.losses, loop.losses, rtol=1e-10, atol=1e-6)
    torch.testing.assert_close(vec.grad_diff_norms, loop.grad_diff_norms, rtol=1e-10, atol=1e-6)
    assert vec.beta_eff == pytest.approx(loop.beta_eff, rel=1e-10, abs=1e-6)
    assert vec.loss_band == pytest.approx(loop.loss_band, rel=1e-10, abs=1e-6)
    assert vec.grad_band == pytest.approx(loop.grad_band, rel=1e-10, abs=1e-6)


def test_train_mode_probe_uses_batch_statistics(bn_conv):
    # Reference: the model's own train-mode forward/backward on a deep copy, point by point.
    model, batch = bn_conv
    x, y = batch
    steps = [0.1, 0.7]
    probe = probe_model_along_gradient(model, batch, F.cross_entropy, steps)
    ref = _copy_model(model)
    ref.zero_grad()
    loss0 = F.cross_entropy(ref(x), y)
    loss0.backward()
    g0 = [p.grad.clone() for p in ref.parameters()]
    assert probe.loss0 == pytest.approx(loss0.item(), rel=1e-12)
    for s, loss, diff in zip(steps, probe.losses, probe.grad_diff_norms):
        moved = _copy_model(model)
        with torch.no_grad():
            for p, g in zip(moved.parameters(), g0):
                p -= s * g
        moved.zero_grad()
        ls = F.cross_entropy(moved(x), y)
        ls.backward()
        d = torch.cat([(a - p.grad).reshape(-1) for a, p in zip(g0, moved.parameters())])
        assert loss.item() == pytest.approx(ls.item(), rel=1e-10)
        assert diff.item() == pytest.approx(d.norm().item(), rel=1e-8)


def _copy_model(model):
    import copy

    m = copy.deepcopy(model)
    m.train(model.training)
    return m


def test_given_model_grad_matches_computed(bn_conv):
    model, batch = bn_conv
    x, y = batch
    ref = _copy_model(model)
    ref.zero_grad()
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    grad = {n: p.grad for n, p in ref.named_parameters()}
    a = probe_model_along_gradient(model, batch, F.cross_entropy, [0.1, 0.4], grad=grad, loss=loss)
    b = probe_model_along_gradient(model, batch, F.cross_entropy, [0.1, 0.4])
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-10, atol=0)
    assert a.beta_eff == pytest.approx(b.beta_eff, rel=1e-8)


class _InPlaceStat(nn.Module):
    """A custom layer that updates a buffer in place: cannot run under vmap."""

    def __init__(self):
        super().__init__()
        self.register_buffer("avg", torch.zeros(()))

    def forward(self, x):
        self.avg.mul_(0.9).add_(0.1 * x.mean())
        return x


def test_auto_falls_back_to_the_loop_and_protects_custom_buffers(bn_conv, monkeypatch):
    monkeypatch.setattr(landscape, "AUTO_VMAP_MAX_SECONDS", 1e9)  # auto tries vmap
    model, batch = bn_conv
    model = nn.Sequential(model, _InPlaceStat()).double()
    avg = model[1].avg.clone()
    with pytest.raises(Exception):
        probe_model_along_gradient(model, batch, F.cross_entropy, [0.1, 0.2], vectorize=True)
    probe = probe_model_along_gradient(model, batch, F.cross_entropy, [0.1, 0.2], vectorize="auto")
    assert not probe.vectorized
    assert torch.equal(model[1].avg, avg)
    ref = probe_model_along_gradient(model[0], batch, F.cross_entropy, [0.1, 0.2], vectorize=True)
    torch.testing.assert_close(probe.losses, ref.losses, rtol=1e-10, atol=0)


def test_auto_vectorizes_a_cheap_closure_and_loops_an_expensive_one(monkeypatch):
    # The rule compares the first point's time with the threshold; set the threshold so the
    # outcome does not depend on the machine's load.
    A, f, w = _quadratic()
    ref = probe_along_gradient(f, w, [0.1, 0.2, 0.3], vectorize=False)
    monkeypatch.setattr(landscape, "AUTO_VMAP_MAX_SECONDS", 1e9)
    cheap = probe_along_gradient(f, w, [0.1, 0.2, 0.3], vectorize="auto")
    assert cheap.vectorized
    assert not probe_along_gradient(f, w, [0.1], vectorize="auto").vectorized  # k = 1
    monkeypatch.setattr(landscape, "AUTO_VMAP_MAX_SECONDS", 0.0)
    expensive = probe_along_gradient(f, w, [0.1, 0.2, 0.3], vectorize="auto")
    assert not expensive.vectorized
    for probe in (cheap, expensive):  # the first point (loop) and the rest (vmap) in order
        torch.testing.assert_close(probe.losses, ref.losses, rtol=1e-12, atol=0)
        torch.testing.assert_close(probe.grad_diff_norms, ref.grad_diff_norms, rtol=1e-10, atol=0)


def test_chunked_vmap_equals_unchunked(bn_conv):
    model, batch = bn_conv
    steps = [0.01, 0.1, 0.3, 1.0, 3.0]
    a = probe_model_along_gradient(model, batch, F.cross_entropy, steps, vectorize=True)
    b = probe_model_along_gradient(
        model, batch, F.cross_entropy, steps, vectorize=True, chunk_size=2
    )
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-12, atol=0)
    assert isinstance(b, GradientLineScan)


# ------------------------------------------------------------------------------------ relative loss (Bjorck et al.)
def _relative_loss_loop(model, batch, alphas):
    """Brute force: a deepcopy in train mode, L(w - α g) / L(w) by in-place parameter moves."""
    x, y = batch
    net = copy.deepcopy(model).train()
    loss0 = F.cross_entropy(net(x), y)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss0, params)
    out = []
    for a in alphas:
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for p, g in zip([p for p in moved.parameters() if p.requires_grad], grads):
                p -= a * g
            out.append(float(F.cross_entropy(moved(x), y)) / float(loss0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_relative_loss_equals_loop_and_leaves_the_model_unchanged(norm):
    tr = data.load("synthetic", split="train", n=256, in_shape=(1, 8, 8), seed=1)
    net = models.make("convnet", norm=norm, in_shape=(1, 8, 8), num_classes=10, width=4, seed=0, freeze_last=True)
    batch = (tr.x[:64], tr.y[:64])
    F.cross_entropy(net(batch[0]), batch[1]).backward()  # BN stats move once, .grad is set
    net.eval()
    before = {k: v.clone() for k, v in list(net.state_dict().items())}
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    rng = torch.get_rng_state()
    alphas = [1e-3, 1e-2, 0.1, 1.0, 10.0]
    got = relative_loss(net, batch, F.cross_entropy, alphas)
    ref = _relative_loss_loop(net, batch, alphas)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    loop = relative_loss(net, batch, F.cross_entropy, alphas, vectorize=False)
    torch.testing.assert_close(got, loop, rtol=1e-6, atol=1e-7)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert not net.training and all(not m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in net.named_parameters() if p.grad is not None)
    assert torch.equal(rng, torch.get_rng_state())


def test_relative_loss_of_a_quadratic():
    a = torch.tensor([1.0, 10.0], dtype=torch.float64)
    f = lambda p: 0.5 * (a * p["w"] ** 2).sum()  # noqa: E731
    w = torch.ones(2, dtype=torch.float64)
    alphas = torch.tensor([0.0, 0.05, 0.1, 0.3])
    got = relative_loss_of(f, {"w": w}, alphas)
    expect = torch.stack([f({"w": w * (1 - s * a)}) for s in alphas.double()]) / f({"w": w})
    torch.testing.assert_close(got, expect)
    assert got[0] == 1.0 and got[-1] > 1.0  # a step past 2/λ_max increases the loss
    with pytest.raises(UserError):
        relative_loss_of(f, {"w": w}, [])
