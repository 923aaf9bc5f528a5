import math

import pytest
import torch
from torch import nn

from bnlab import models
from bnlab.errors import UserError
from bnlab.models import MODELS, NORMS, make, norm_layers
from bnlab.models.lp_norm import LpBatchNorm
from bnlab.models.noisy import NoisyBatchNorm

SHAPES = [(1, 8, 8), (1, 40), (3, 32, 32)]
SMALL = {"mlp": dict(width=16, depth=2), "convnet": dict(width=4), "vgg": dict(width=4, depth=11), "preresnet": dict(width=4, depth=8),
         "dln": dict(width=8, depth=3),
         "resnet18": dict(width=8)}  # models registered elsewhere (dln: by bnlab.models.linear) run with their defaults otherwise
NORM_TYPES = {"bn": (nn.BatchNorm1d, nn.BatchNorm2d), "ln": (nn.LayerNorm, nn.GroupNorm), "gn": (nn.GroupNorm,), "bn-noisy": (NoisyBatchNorm,),
              "l1": (LpBatchNorm,), "l2": (LpBatchNorm,), "linf": (LpBatchNorm,)}


def _weighted(model):
    """Conv/linear layers other than the classifier."""
    return [m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m is not model.classifier]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_every_norm_forward_backward(name, norm, shape):
    torch.manual_seed(0)
    net = make(name, norm=norm, in_shape=shape, num_classes=7, **SMALL.get(name, {}))
    x = torch.randn(6, *shape)
    out = net(x)
    assert out.shape == (6, 7) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    layers = norm_layers(net)
    if norm == "none":
        assert layers == []
        assert all(m.bias is not None for m in _weighted(net))  # nothing normalizes: keep biases
    else:
        assert layers and all(isinstance(m, NORM_TYPES[norm]) for m in layers)
        assert all(m.bias is None for m in _weighted(net))  # no bias in layers followed by a norm
        assert net.classifier.bias is not None


def test_bn_where_expected_in_convnet_and_preresnet():
    net = make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, width=4, depth=2, stages=3)
    seq = list(net.features)
    convs = [i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    assert all(isinstance(seq[i + 1], nn.BatchNorm2d) and isinstance(seq[i + 2], nn.ReLU) for i in convs)
    assert [seq[i + 1].num_features for i in convs] == [4, 4, 8, 8, 16, 16]
    res = make("preresnet", norm="bn", in_shape=(3, 32, 32), num_classes=10, depth=20)
    blocks = [m for m in res.modules() if isinstance(m, models.convnets.PreActBlock)]
    assert len(blocks) == 9
    assert len(norm_layers(res)) == 2 * 9 + 1  # two per block plus the final one
    assert res(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, nn.Conv2d) for m in res.modules()) == 1 + 18 + 2  # stem + blocks + 2 shortcuts


def test_1d_inputs_use_conv1d():
    net = make("convnet", norm="bn", in_shape=(1, 40), num_classes=10)
    assert any(isinstance(m, nn.Conv1d) for m in net.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert any(isinstance(m, nn.BatchNorm1d) for m in net.modules())


def test_affine_off_and_freeze_last_make_every_trained_weight_feed_a_bn():
    net = make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, affine=False, freeze_last=True)
    assert all(m.weight is None for m in norm_layers(net))
    assert net.classifier.bias is None and not net.classifier.weight.requires_grad
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("weight") and "classifier" not in n for n in trained)
    # every trained tensor is scale-invariant: scaling it leaves the (train-mode) output unchanged
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    net = net.double().train()
    for m in norm_layers(net):
        m.eps = 1e-12  # BN's eps is the only thing that breaks exact invariance
    ref = net(x)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad:
                p.mul_(3.7)
    torch.testing.assert_close(net(x), ref, rtol=1e-9, atol=1e-9)


def test_kaiming_initialization_scale():
    net = make("mlp", norm="none", in_shape=(1, 32, 32), num_classes=10, width=512, depth=2, seed=0)
    w = net.features[1].weight.detach()
    assert abs(float(w.std()) - math.sqrt(2 / 1024)) < 0.05 * math.sqrt(2 / 1024)
    assert float(net.features[1].bias.detach().abs().max()) == 0.0


def test_seed_gives_same_init_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, seed=3)
    c = make("convnet", norm="bn", in_shape=(1, 8, 8), num_classes=10, seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet"), "unknown model 'resnet'; accepted: convnet, (.+, )?mlp, preresnet, (.+, )?vgg"),
    (dict(name="convnet", norm="xn"), "unknown norm 'xn'; accepted: bn, bn-noisy, gn, l1, l2, linf, ln, none"),
    (dict(name="convnet", colour=1), "no option 'colour'"),
    (dict(name="preresnet", depth=21), "6n\\+2"),
    (dict(name="vgg", depth=12), "depth must be one of"),
    (dict(name="convnet", in_shape=(8,)), "shape \\(C, L\\) or \\(C, H, W\\)"),
])
def test_bad_model_requests(kwargs, match):
    kw = dict(norm="bn", in_shape=(1, 8, 8), num_classes=10)
    kw.update(kwargs)
    with pytest.raises(UserError, match=match):
        make(kw.pop("name"), **kw)


def test_norm_registry_is_open():
    @models.register_norm("test-scale-only")
    def _scale(c, *, spatial_dims, affine=True):
        return nn.Identity()

    try:
        net = make("mlp", norm="test-scale-only", in_shape=(4,), num_classes=2, width=3, depth=1)
        assert net(torch.randn(2, 4)).shape == (2, 2)
    finally:
        NORMS.pop("test-scale-only")
