"""The ``bn-noisy`` norm: BatchNorm followed by step-varying noise (Santurkar et al. 2018)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bnlab import models
from bnlab.curvature import model_loss_closure
from bnlab.errors import UserError
from bnlab.models import NORMS, is_norm_layer, make_norm
from bnlab.models.noisy import NOISE_DEFAULTS, NoisyBatchNorm, noise_config, noisy_layers, register_noisy_norm, reseed_noise


def _shape(spatial_dims, n=64, c=6):
    return (n, c) + (5,) * spatial_dims


def _plain_bn(spatial_dims, c):
    return make_norm("bn", c, spatial_dims=spatial_dims)


def test_bn_noisy_is_registered_and_a_bnlab_norm_layer():
    assert "bn-noisy" in NORMS
    layer = make_norm("bn-noisy", 8, spatial_dims=2)
    assert isinstance(layer, NoisyBatchNorm) and layer.is_bnlab_norm and is_norm_layer(layer)


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
def test_eval_mode_equals_plain_batchnorm_and_running_stats_ignore_the_noise(spatial_dims):
    torch.manual_seed(0)
    noisy = make_norm("bn-noisy", 6, spatial_dims=spatial_dims)
    plain = _plain_bn(spatial_dims, 6)
    with torch.no_grad():
        for m in (noisy, plain):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-0.3, 0.3, 6))
    for _ in range(3):  # train-mode passes update the running statistics from the noise-free input
        x = torch.randn(_shape(spatial_dims)) * 2 + 1
        noisy(x)
        plain(x)
    torch.testing.assert_close(noisy.running_mean, plain.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(noisy.running_var, plain.running_var, rtol=0, atol=0)
    noisy.eval()
    plain.eval()
    x = torch.randn(_shape(spatial_dims))
    assert torch.equal(noisy(x), plain(x))
    assert int(noisy.noise_step) == 3  # eval passes draw nothing


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
def test_train_mode_channel_moments_are_off_zero_one_and_change_every_step(spatial_dims):
    layer = NoisyBatchNorm(6, spatial_dims=spatial_dims, seed=3)
    x = torch.randn(_shape(spatial_dims, n=256))
    dims = [0] + list(range(2, 2 + spatial_dims))
    moments = []
    for _ in range(3):
        y = layer(x).detach()
        moments.append((y.mean(dims), y.std(dims)))
    mean0, std0 = moments[0]
    # non-zero mean: μ_c ~ U(-0.5, 0.5); non-unit variance: σ_c ~ U(1, 1.25) plus jitter
    assert mean0.abs().max() > 0.1
    assert (std0 - 1).abs().mean() > 0.02 and (std0 > 0.97).all()
    # the distribution changes between steps, on the same input
    assert (moments[1][0] - mean0).abs().max() > 0.1
    assert (moments[2][1] - moments[1][1]).abs().max() > 0.01
    # plain BN would give (0, 1) per channel
    ref = _plain_bn(spatial_dims, 6)(x).detach()
    torch.testing.assert_close(ref.mean(dims), torch.zeros(6), atol=1e-5, rtol=0)


def test_noise_matches_the_documented_equation():
    layer = NoisyBatchNorm(4, spatial_dims=0, seed=11, mean_range=0.7, scale_max=2.0, jitter=0.2)
    x = torch.randn(32, 4)
    y = layer(x)
    a, b = layer.noise(y.shape, step=1, dtype=y.dtype, device=y.device)
    yhat = F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    torch.testing.assert_close(y, a * yhat + b)
    # per-channel centers: b - jitter ζ has mean μ_c in [-0.7, 0.7]; a / (1 + jitter ξ) = σ_c in [1, 2]
    zero_jitter = NoisyBatchNorm(4, spatial_dims=0, seed=11, mean_range=0.7, scale_max=2.0, jitter=0.0)
    a0, b0 = zero_jitter.noise((32, 4), step=1, dtype=torch.float32, device=torch.device("cpu"))
    assert ((a0 >= 1) & (a0 <= 2)).all() and (b0.abs() <= 0.7).all()
    assert torch.equal(a0, a0[:1].expand_as(a0)) and torch.equal(b0, b0[:1].expand_as(b0))  # per channel only


def test_zero_noise_is_plain_batchnorm_in_train_mode():
    layer = NoisyBatchNorm(5, spatial_dims=2, seed=0, mean_range=0.0, scale_max=1.0, jitter=0.0)
    x = torch.randn(8, 5, 3, 3)
    torch.testing.assert_close(layer(x), _plain_bn(2, 5)(x))


def test_deterministic_for_a_seed_and_global_rng_untouched():
    x = torch.randn(16, 3, 4, 4)
    state = torch.get_rng_state()
    a, b = NoisyBatchNorm(3, spatial_dims=2, seed=5), NoisyBatchNorm(3, spatial_dims=2, seed=5)
    outs_a = [a(x) for _ in range(3)]
    outs_b = [b(x) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    for ya, yb in zip(outs_a, outs_b):
        assert torch.equal(ya, yb)
    assert not torch.equal(outs_a[0], NoisyBatchNorm(3, spatial_dims=2, seed=6)(x))


def test_models_of_one_seed_are_deterministic_share_bn_init_and_layers_differ():
    kw = dict(in_shape=(1, 8, 8), num_classes=10, width=4, seed=7)
    state = torch.get_rng_state()
    n1, n2 = models.make("convnet", norm="bn-noisy", **kw), models.make("convnet", norm="bn-noisy", **kw)
    bn = models.make("convnet", norm="bn", **kw)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q, r in zip(n1.parameters(), n2.parameters(), bn.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)  # same initial weights as the BN net
    seeds = [int(m.noise_seed) for m in noisy_layers(n1)]
    assert seeds == [int(m.noise_seed) for m in noisy_layers(n2)] and len(set(seeds)) == len(seeds) == 3
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(n1(x), n2(x))
    reseed_noise(n2, 123)
    assert [int(m.noise_step) for m in noisy_layers(n2)] == [0, 0, 0]
    assert len({int(m.noise_seed) for m in noisy_layers(n2)}) == 3


@pytest.mark.parametrize("model,in_shape", [("mlp", (1, 8, 8)), ("convnet", (1, 40)), ("convnet", (1, 8, 8)), ("preresnet", (1, 8, 8))])
def test_every_model_builds_and_trains_with_bn_noisy(model, in_shape):
    net = models.make(model, norm="bn-noisy", in_shape=in_shape, num_classes=3, width=4, seed=0, **({"depth": 8} if model == "preresnet" else {}))
    x, y = torch.randn(8, *in_shape), torch.randint(0, 3, (8,))
    F.cross_entropy(net(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    assert torch.isfinite(net(x)).all()


def test_functional_call_with_copied_buffers_replays_the_last_noise_and_does_not_advance():
    net = models.make("mlp", norm="bn-noisy", in_shape=(5,), num_classes=3, width=6, depth=2, seed=0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    z_train = net(x)  # the training forward: steps 0 -> 1
    steps = [int(m.noise_step) for m in noisy_layers(net)]
    state = lambda: {**dict(net.named_parameters()), **{k: v.clone() for k, v in net.named_buffers()}}
    z1 = functional_call(net, state(), (x,))
    z2 = functional_call(net, state(), (x,))
    assert torch.equal(z1, z_train) and torch.equal(z2, z_train)
    assert [int(m.noise_step) for m in noisy_layers(net)] == steps
    f, params = model_loss_closure(net, (x, y), F.cross_entropy)
    assert torch.equal(f(params), f(params))  # the loss closure is a deterministic function
    torch.testing.assert_close(f(params), F.cross_entropy(z_train, y))
    assert not torch.equal(net(x), z_train)  # the next training forward draws new noise


def test_state_dict_deepcopy_and_to_keep_the_noise_state():
    a = NoisyBatchNorm(3, spatial_dims=1, seed=9)
    x = torch.randn(10, 3, 4)
    a(x)
    b = NoisyBatchNorm(3, spatial_dims=1, seed=1)
    b.load_state_dict(a.state_dict())
    assert int(b.noise_seed) == int(a.noise_seed) and int(b.noise_step) == 1
    c = copy.deepcopy(a)
    assert torch.equal(c(x), b(x)) and int(c.noise_step) == 2 and int(a.noise_step) == 1
    a.to(torch.float64)
    a.to(torch.float32)
    a(x)
    assert int(a.noise_step) == 2  # still advances its own (moved) buffer
    d = NoisyBatchNorm(3, spatial_dims=1, seed=1)
    d.load_state_dict({k: v.clone() for k, v in a.state_dict().items()}, assign=True)
    assert torch.equal(d(x), a(x)) and int(d.noise_step) == 3  # the assigned buffer is its own


def test_noise_config_sets_and_restores_defaults_and_rejects_bad_values():
    before = dict(NOISE_DEFAULTS)
    with noise_config(mean_range=1.0, scale_max=2.0, jitter=0.0):
        layer = make_norm("bn-noisy", 4, spatial_dims=0)
    assert (layer.mean_range, layer.scale_max, layer.jitter) == (1.0, 2.0, 0.0)
    assert NOISE_DEFAULTS == before
    for bad in (dict(mean_range=-1.0), dict(scale_max=0.5), dict(jitter=-0.1)):
        with pytest.raises(UserError):
            with noise_config(**bad):
                pass
        with pytest.raises(UserError):
            NoisyBatchNorm(4, spatial_dims=0, **bad)
    with pytest.raises(UserError):
        NoisyBatchNorm(4, spatial_dims=5)
    with pytest.raises(ValueError):
        NoisyBatchNorm(4, spatial_dims=2)(torch.randn(3, 4))


def test_register_noisy_norm_adds_a_named_variant():
    register_noisy_norm("bn-noisy-test-strong", mean_range=2.0, scale_max=3.0)
    try:
        layer = make_norm("bn-noisy-test-strong", 4, spatial_dims=2)
        assert (layer.mean_range, layer.scale_max, layer.jitter) == (2.0, 3.0, NOISE_DEFAULTS["jitter"])
    finally:
        NORMS.pop("bn-noisy-test-strong", None)


def test_gradients_flow_through_the_noise():
    layer = NoisyBatchNorm(3, spatial_dims=2, seed=0)
    x = torch.randn(8, 3, 2, 2, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and layer.weight.grad.abs().sum() > 0
    assert isinstance(layer, nn.modules.batchnorm._NormBase)
