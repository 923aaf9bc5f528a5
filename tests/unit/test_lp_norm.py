"""The ℓp normalization layers ``l1``, ``l2``, ``linf`` (Santurkar et al. 2018, sec. 3.3) against a
direct NumPy formula, BatchNorm (``l2`` is BN in train mode), finite differences of the gradient
(HVPs through the layer), and the bnlab machinery that treats normalization layers specially."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab.curvature import model_hvp
from bnlab.data import ArrayData
from bnlab.errors import UserError
from bnlab.landscape import probe_model_along_gradient
from bnlab.models import NORMS, is_norm_layer, make, make_norm
from bnlab.models.lp_norm import LP_NORMS, LpBatchNorm, lp_scale, register_lp_norm
from bnlab.sweep import sweep

P = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
SHAPES = {0: (9, 3), 1: (5, 3, 7), 2: (4, 3, 3, 5)}  # (N, C, *spatial) for spatial_dims 0, 1, 2


def _reference(x: np.ndarray, p: float, gamma, beta, eps: float, per: str = "channel"):
    """y = γ (x - μ) / sqrt(s² + ε) + β, μ the per-channel mean, s the power mean of |x - μ| (max for p = ∞),
    written out channel by channel."""
    y = np.empty_like(x)
    xc = np.empty_like(x)
    for c in range(x.shape[1]):
        v = x[:, c].ravel()
        xc[:, c] = x[:, c] - v.mean()
    for c in range(x.shape[1]):
        d = xc[:, c].ravel() if per == "channel" else xc.ravel()
        s = np.abs(d).max() if math.isinf(p) else np.mean(np.abs(d) ** p) ** (1 / p)
        y[:, c] = gamma[c] * xc[:, c] / math.sqrt(s * s + eps) + beta[c]
    return y


def test_the_registry_has_l1_l2_linf():
    assert LP_NORMS == P
    for name, p in P.items():
        layer = make_norm(name, 6, spatial_dims=2)
        assert isinstance(layer, LpBatchNorm) and layer.p == p and layer.per == "channel" and is_norm_layer(layer)


@pytest.mark.parametrize("per", ["channel", "layer"])
@pytest.mark.parametrize("sd", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(P))
def test_train_mode_matches_the_formula(name, sd, per):
    g = torch.Generator().manual_seed(sd)
    x = torch.randn(SHAPES[sd], generator=g, dtype=torch.float64) * 3 + 1
    layer = LpBatchNorm(3, P[name], spatial_dims=sd, per=per).double().train()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    y = layer(x)
    ref = _reference(x.numpy(), P[name], layer.weight.detach().numpy(), layer.bias.detach().numpy(), layer.eps, per)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sd", [0, 1, 2])
def test_l2_is_batchnorm_in_train_mode(sd):
    x = torch.randn(SHAPES[sd], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    bn = make_norm("bn", 3, spatial_dims=sd).double().train()
    l2 = make_norm("l2", 3, spatial_dims=sd).double().train()
    torch.testing.assert_close(l2(x), bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l2.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(P))
def test_normalized_channels_have_unit_lp_scale(name):
    x = torch.randn(64, 4, 6, 6, dtype=torch.float64) * 5 - 2
    y = make_norm(name, 4, spatial_dims=2, affine=False).double().train()(x)
    s = lp_scale(y, P[name], (0, 2, 3))
    torch.testing.assert_close(s.flatten(), torch.ones(4, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", sorted(P))
def test_running_statistics_and_eval_mode(name, momentum):
    p = P[name]
    layer = LpBatchNorm(3, p, spatial_dims=1, momentum=momentum).double()
    xs = [torch.randn(8, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) + i for i in range(3)]
    rm, rv = np.zeros(3), np.ones(3)
    for t, x in enumerate(xs, start=1):
        layer.train()(x)
        a = x.numpy()
        mu = a.mean((0, 2))
        xc = a - mu[None, :, None]
        s = np.abs(xc).max((0, 2)) if math.isinf(p) else (np.abs(xc) ** p).mean((0, 2)) ** (1 / p)
        f = 0.1 if momentum is not None else 1.0 / t
        rm, rv = (1 - f) * rm + f * mu, (1 - f) * rv + f * s**2
    np.testing.assert_allclose(layer.running_mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), rv, rtol=1e-12)
    assert int(layer.num_batches_tracked) == 3
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 1.0]))
    y = layer.eval()(x)
    ref = (x.numpy() - rm[None, :, None]) / np.sqrt(rv[None, :, None] + layer.eps) * np.array([1.5, -0.5, 1.0])[None, :, None]
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(P))
def test_twice_differentiable(name):
    """gradcheck and gradgradcheck (finite differences of the gradient: what an HVP needs) in float64."""
    layer = LpBatchNorm(3, P[name], spatial_dims=1).double().train()
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.tensor([0.7, 1.3, -0.4], dtype=torch.float64, requires_grad=True)

    def f(x, w):
        y = torch.func.functional_call(layer, {"weight": w, "bias": layer.bias.detach(), "running_mean": None,
                                               "running_var": None, "num_batches_tracked": None}, (x,))
        return (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).pow(2).sum()  # a non-linear read-out

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("name", sorted(P))
def test_hvp_through_a_model_matches_finite_differences(name):
    torch.manual_seed(0)
    net = make("convnet", norm=name, in_shape=(1, 12), num_classes=3, width=3, seed=0).double().train()
    x, y = torch.randn(10, 1, 12, dtype=torch.float64), torch.randint(0, 3, (10,))
    params = {n: p.detach() for n, p in net.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    hv = model_hvp(net, (x, y), F.cross_entropy, v)

    def grad_at(shift):
        st = {n: (p + shift * v[n]).requires_grad_() for n, p in params.items()}
        loss = F.cross_entropy(torch.func.functional_call(net, {**st, **{n: None for n, _ in net.named_buffers()}}, (x,)), y)
        return torch.autograd.grad(loss, list(st.values()))

    h = 1e-5
    fd = [(a - b) / (2 * h) for a, b in zip(grad_at(h), grad_at(-h))]
    got = torch.cat([hv[n].flatten() for n in params])
    want = torch.cat([t.flatten() for t in fd])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(net.features[1].running_var, torch.ones(3, dtype=torch.float64))  # the HVP left the buffers alone


@pytest.mark.parametrize("name", sorted(P))
def test_landscape_probe_vmap_equals_loop(name):
    net = make("convnet", norm=name, in_shape=(1, 8, 8), num_classes=4, width=3, seed=1).train()
    batch = (torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,)))
    before = {n: b.clone() for n, b in net.named_buffers()}
    a = probe_model_along_gradient(net, batch, F.cross_entropy, [0.05, 0.1, 0.2], vectorize=True)
    b = probe_model_along_gradient(net, batch, F.cross_entropy, [0.05, 0.1, 0.2], vectorize=False)
    assert a.vectorized and not b.vectorized
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad_diff_norms, b.grad_diff_norms, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(before[n], t) for n, t in net.named_buffers())


@pytest.mark.parametrize("name", ["l1", "linf"])
def test_sweep_vectorized_equals_separate_runs(name):
    g = torch.Generator().manual_seed(0)
    data = ArrayData(torch.randn(64, 1, 12, generator=g), torch.randint(0, 3, (64,), generator=g), 3)

    def model_fn(seed):
        return make("convnet", norm=name, in_shape=(1, 12), num_classes=3, width=3, seed=seed)

    kw = dict(lrs=[0.05, 0.2], seeds=[0, 1], steps=6, batch_size=16, momentum=0.9, device="cpu", eval_train=False, keep_states=True)
    vec = sweep(model_fn, data, vectorize=True, **kw)
    loop = sweep(model_fn, data, vectorize=False, **kw)
    assert vec.vectorized and not loop.vectorized
    torch.testing.assert_close(vec.losses, loop.losses, rtol=1e-4, atol=1e-6)
    sa, sb = vec.states[0], loop.states[0]
    torch.testing.assert_close(sa["features.1.running_var"], sb["features.1.running_var"], rtol=1e-4, atol=1e-6)


def test_bad_arguments_raise_user_errors():
    with pytest.raises(UserError, match="p must be"):
        LpBatchNorm(3, 0.5)
    with pytest.raises(UserError, match="p must be"):
        LpBatchNorm(3, float("nan"))
    with pytest.raises(UserError, match="per must be"):
        LpBatchNorm(3, 1, per="group")
    with pytest.raises(UserError, match="spatial_dims"):
        LpBatchNorm(3, 1, spatial_dims=4)
    with pytest.raises(ValueError, match="expects 4-D input"):
        LpBatchNorm(3, 1, spatial_dims=2)(torch.randn(2, 3))


def test_register_a_variant():
    register_lp_norm("test-l3-layer", 3, per="layer")
    try:
        layer = make_norm("test-l3-layer", 4, spatial_dims=0)
        assert layer.p == 3.0 and layer.per == "layer"
        assert make("mlp", norm="test-l3-layer", in_shape=(5,), num_classes=2, width=4, depth=1)(torch.randn(3, 5)).shape == (3, 2)
    finally:
        NORMS.pop("test-l3-layer")
