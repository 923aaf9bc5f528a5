"""bnlab.noise: per-example gradients against a loop of autograd calls, the closed-form step noise
against brute force (every batch enumerated, and many batches sampled), the frozen-BN copy, the fit."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab import models
from bnlab.errors import UserError
from bnlab.noise import (fit_power_law, frozen_norm_copy, gradient_noise, noise_of, per_example_gradients,
                         sampled_batch_noise, sampled_step_noise, step_noise)


def _net(norm="none", seed=0):
    return models.make("preresnet", norm=norm, in_shape=(1, 12), num_classes=3, width=2, depth=8, seed=seed).double()


def _data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _loop_grads(model, x, y):
    """One autograd call per example (eval mode): the independent reference."""
    model.eval()
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_per_example_gradients_match_one_autograd_call_per_example(norm):
    net = _net(norm)
    x, y = _data()
    net = frozen_norm_copy(net, x)  # BN: fixed statistics, so that every example's loss stands alone
    before = {k: v.clone() for k, v in net.state_dict().items()}
    G = per_example_gradients(net, x, y, chunk_size=3)
    assert G.shape == (10, sum(p.numel() for p in net.parameters()))
    assert torch.allclose(G, _loop_grads(net, x, y), rtol=1e-10, atol=1e-12)
    # the rows' mean is the gradient of the mean loss
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert torch.allclose(G.mean(0), torch.cat([p.grad.reshape(-1) for p in net.parameters()]), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_frozen_norm_copy_reproduces_the_train_mode_pass_and_leaves_the_model_alone():
    net = _net("bn").train()
    x, _ = _data(16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = frozen_norm_copy(net, x)
    assert not frozen.training
    with torch.no_grad():
        ref = net(x)  # train mode: batch statistics (this updates the model's running stats; compare before that)
        got = frozen(x)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k)
    # and each example alone in the frozen copy gives its row of the batch pass
    with torch.no_grad():
        assert torch.allclose(frozen(x[3:4]), ref[3:4], rtol=1e-9, atol=1e-10)


def test_streamed_noise_equals_the_one_from_all_rows():
    net = _net()
    x, y = _data(11)
    G = per_example_gradients(net, x, y)
    a, b = noise_of(G), gradient_noise(net, x, y, chunk_size=4)
    assert a.n == b.n == 11
    assert torch.allclose(a.mean, b.mean, rtol=1e-12, atol=1e-14)
    assert b.trace_cov == pytest.approx(a.trace_cov, rel=1e-9)
    assert a.trace_cov == pytest.approx(a.mean_sq_norm - a.full_grad_sq_norm, rel=1e-9)
    # S by its definition, row by row
    S = sum(float(((G[i] - G.mean(0)) ** 2).sum()) for i in range(11)) / 11
    assert a.trace_cov == pytest.approx(S, rel=1e-12)


def _rows(n=7, p=5, seed=1):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.3


@pytest.mark.parametrize("b", [1, 2, 3, 5, 7])
def test_closed_form_without_replacement_equals_the_average_over_every_batch(b):
    G = _rows()
    n, alpha = G.shape[0], 0.3
    full = G.mean(0)
    exact = np.mean([float(((alpha * (G[list(c)].mean(0) - full)) ** 2).sum()) for c in itertools.combinations(range(n), b)])
    got = step_noise(noise_of(G).trace_cov, n, [alpha], [b])[0, 0]
    assert got == pytest.approx(exact, rel=1e-12, abs=1e-15)


def test_closed_form_with_replacement_equals_the_average_over_every_ordered_draw():
    G = _rows(n=5)
    n, alpha, b = 5, 2.0, 3
    full = G.mean(0)
    exact = np.mean([float(((alpha * (G[list(c)].mean(0) - full)) ** 2).sum()) for c in itertools.product(range(n), repeat=b)])
    assert step_noise(noise_of(G).trace_cov, n, [alpha], [b], replacement=True)[0, 0] == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("replacement", [False, True])
def test_closed_form_agrees_with_sampling_many_batches(replacement):
    G = _rows(n=60, p=8, seed=2)
    nz = noise_of(G)
    gen = torch.Generator().manual_seed(0)
    for alpha, b in ((0.1, 4), (1.0, 16), (3.0, 40)):
        mc = sampled_step_noise(G, alpha, b, 4000, replacement=replacement, generator=gen)
        cf = nz.step_variance([alpha], [b], replacement=replacement)[0, 0]
        assert mc == pytest.approx(cf, rel=0.08), (alpha, b)  # 4000 batches: a few % statistical error


def test_fit_power_law_recovers_exponents_and_flags_bad_grids():
    a = np.array([1e-3, 1e-2, 1e-1])
    b = np.array([8, 32, 128, 512])
    v = 5.0 * a[:, None] ** 2 * b[None, :] ** -1.0
    f = fit_power_law(a, b, v)
    assert f["p_alpha"] == pytest.approx(2.0) and f["p_batch"] == pytest.approx(-1.0) and f["rms"] < 1e-12
    assert f["log_c"] == pytest.approx(math.log(5.0))
    # the finite-population correction steepens the batch exponent, a little for N ≫ b
    f = fit_power_law(a, b, step_noise(1.0, 4000, a, b))
    assert f["p_alpha"] == pytest.approx(2.0) and -1.1 < f["p_batch"] < -1.0
    assert math.isnan(fit_power_law(a, b, np.zeros((3, 4)))["p_batch"])
    assert math.isnan(fit_power_law([1e-3], b, v[:1])["p_alpha"])


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError):
        step_noise(1.0, 10, [0.1], [11])
    with pytest.raises(UserError):
        step_noise(1.0, 10, [0.1], [0])
    with pytest.raises(UserError):
        noise_of(torch.zeros(3))
    with pytest.raises(UserError):
        sampled_step_noise(_rows(), 0.1, 8, 10)
    net = _net()
    x, y = _data(4)
    with pytest.raises(UserError):
        per_example_gradients(net, x, y[:3])
    with pytest.raises(UserError):
        gradient_noise(net, x, y, chunk_size=0)


def test_sampled_batch_noise_of_a_per_example_loss_estimates_the_closed_form():
    """Without batch-dependent layers the SGD gradient's noise is the closed form's S/b·(N−b)/(N−1)."""
    net = _net()
    x, y = _data(40, seed=3)
    cf = gradient_noise(net, x, y).step_variance([1.0], [2, 8, 32])[0]
    got = sampled_batch_noise(net, x, y, [2, 8, 32], 300, generator=torch.Generator().manual_seed(0))
    assert got["batch_sizes"] == [2, 8, 32] and len(got["per_batch"][0]) == 300
    assert np.allclose(got["variance"], cf, rtol=0.2)
    # the whole set as the batch: no noise at all
    assert sampled_batch_noise(net, x, y, [40], 2)["variance"][0] == pytest.approx(0.0, abs=1e-20)


def test_sampled_batch_noise_runs_train_mode_bn_with_batch_statistics_and_leaves_the_model_alone():
    net = _net("bn").train()
    x, y = _data(24, seed=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = sampled_batch_noise(net, x, y, [4, 24], 3, generator=torch.Generator().manual_seed(0))
    # b = N in train mode is the full-batch pass itself: zero; b = 4 normalizes with 4 examples' statistics
    assert got["variance"][1] == pytest.approx(0.0, abs=1e-20) and got["variance"][0] > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
