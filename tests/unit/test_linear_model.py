"""The deep linear network ``dln`` (bnlab.models.linear): structure, linearity, initialization, errors."""

import math

import pytest
import torch
from torch import nn

from bnlab import models
from bnlab.errors import UserError
from bnlab.probes.ics import ics_layers


def _dln(norm="none", **kw):
    return models.make("dln", norm=norm, in_shape=(1, 4, 4), num_classes=3, seed=0, **{"width": 6, "depth": 5, **kw})


def test_the_plain_dln_is_the_product_of_its_matrices():
    net = _dln("none")
    lins = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(lins) == 5 and not any(isinstance(m, (nn.ReLU, nn.Tanh)) for m in net.modules())
    with torch.no_grad():
        for m in lins:  # non-zero biases: the net is then affine, x -> A x + b with b from the biases
            m.bias.normal_()
        x = torch.randn(7, 1, 4, 4, dtype=torch.float32)
        a, b = torch.eye(16), torch.zeros(16)
        for m in lins:  # compose the affine maps independently of the module
            a, b = m.weight @ a, m.weight @ b + m.bias
        expect = x.flatten(1) @ a.T + b
        assert torch.allclose(net(x), expect, atol=1e-5)


def test_bn_dln_normalizes_every_hidden_layer_and_has_no_bias_before_it():
    net = _dln("bn", depth=25, width=8)
    lins = [m for m in net.modules() if isinstance(m, nn.Linear)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(lins) == 25 and len(bns) == 24
    assert all(m.bias is None for m in lins[:-1]) and lins[-1].bias is not None
    layers, _ = ics_layers(net, torch.randn(8, 1, 4, 4))
    assert len(layers) == 25 and layers[-1] == "classifier"  # the ICS sees all 25 weight layers


def test_lecun_initialization_has_variance_one_over_fan_in():
    net = models.make("dln", norm="none", in_shape=(400,), num_classes=3, width=400, depth=3, seed=1)
    w = net.features[1].weight  # 400 x 400 hidden layer
    assert w.var().item() == pytest.approx(1 / 400, rel=0.05) and abs(w.mean().item()) < 1e-3
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in net.modules() if isinstance(m, nn.Linear))
    # a linear net keeps the expected squared norm of its input through every layer (gain 1, not He's sqrt 2)
    x = torch.randn(2000, 400)
    h = x
    with torch.no_grad():
        for m in net.features:
            h = m(h)
    assert (h.pow(2).sum(1).mean() / x.pow(2).sum(1).mean()).item() == pytest.approx(1.0, rel=0.1)


def test_same_seed_same_weights_and_bad_options_raise():
    a, b = _dln("bn"), _dln("bn")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for kw in ({"depth": 1}, {"width": 0}, {"depth": 2.5}):
        with pytest.raises(UserError):
            _dln(**kw)
    assert math.prod((1, 4, 4)) == _dln().features[1].in_features
