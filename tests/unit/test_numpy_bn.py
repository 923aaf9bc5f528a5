"""The numpy BN net with a hand-written backward pass (exp-lr's float32 overflow run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab.numpy_bn import TinyBNNet


def test_tiny_bn_net_gradient_matches_autograd():
    net = TinyBNNet(3)
    W = net.W0.copy()
    grad = np.zeros_like(W)
    loss, finite = net.loss_grad(W, grad)
    assert finite
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(net.X, dtype=torch.float64) @ w.T
    z = (h - h.mean(0)) / h.var(0, unbiased=False).sqrt()
    ref = F.cross_entropy(torch.relu(z) @ torch.tensor(net.V, dtype=torch.float64).T, torch.tensor(net.onehot.argmax(1)))
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-5 * float(w.grad.abs().max()))
    # scale-invariant: the gradient scales as 1/c, exactly for powers of two
    grad2 = np.zeros_like(W)
    net.loss_grad(W * 4, grad2)
    assert np.array_equal(grad2 * 4, grad)


def test_overflowing_weights_are_reported_not_finite():
    net = TinyBNNet(0)
    grad = np.zeros_like(net.W0)
    with np.errstate(all="ignore"):
        _, finite = net.loss_grad(net.W0 * np.float32(2.0**100), grad)
    assert not finite
