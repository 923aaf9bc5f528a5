"""``resnet18``: torchvision's layout, names and count, checked against an independent enumeration
and a functional re-implementation of the forward pass."""

import pytest
import torch
import torch.nn.functional as F

from bnlab.models import make


def _torchvision_resnet18_shapes(num_classes: int) -> dict[str, tuple]:
    """Parameter name -> shape of torchvision.models.resnet18, written out from the published layout."""
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
    c = 64
    for i, w in enumerate((64, 128, 256, 512)):
        for j in range(2):
            p = f"layer{i + 1}.{j}."
            c_in = c if j == 0 else w
            shapes[p + "conv1.weight"] = (w, c_in, 3, 3)
            shapes[p + "bn1.weight"] = shapes[p + "bn1.bias"] = (w,)
            shapes[p + "conv2.weight"] = (w, w, 3, 3)
            shapes[p + "bn2.weight"] = shapes[p + "bn2.bias"] = (w,)
            if j == 0 and i > 0:
                shapes[p + "downsample.0.weight"] = (w, c_in, 1, 1)
                shapes[p + "downsample.1.weight"] = shapes[p + "downsample.1.bias"] = (w,)
        c = w
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 512), (num_classes,)
    return shapes


def test_names_shapes_and_count_match_torchvision():
    net = make("resnet18", norm="bn", in_shape=(3, 224, 224), num_classes=1000)
    got = {n: tuple(p.shape) for n, p in net.named_parameters()}
    assert got == _torchvision_resnet18_shapes(1000)
    assert sum(p.numel() for p in net.parameters()) == 11_689_512  # torchvision's published count
    assert len(net.state_dict()) == 122  # + running_mean, running_var, num_batches_tracked per BN (20 BNs)
    assert net.classifier is net.fc


def _bn(x, sd, p):
    return F.batch_norm(x, None, None, sd[p + ".weight"], sd[p + ".bias"], training=True, eps=1e-5)


def _reference_forward(sd, x):
    """ResNet-18 with F.* ops only (train-mode BN), from the state dict."""
    x = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i in range(4):
        for j in range(2):
            p = f"layer{i + 1}.{j}."
            stride = 2 if (i > 0 and j == 0) else 1
            out = F.relu(_bn(F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1), sd, p + "bn1"))
            out = _bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), sd, p + "bn2")
            skip = x
            if p + "downsample.0.weight" in sd:
                skip = _bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), sd, p + "downsample.1")
            x = F.relu(out + skip)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize("size", [32, 8])
def test_forward_matches_functional_reference(size):
    torch.manual_seed(0)
    net = make("resnet18", in_shape=(3, size, size), num_classes=10, width=8, seed=1).double().train()
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    torch.testing.assert_close(net(x), _reference_forward(sd, x), rtol=1e-10, atol=1e-10)


def test_init_as_torchvision_and_zero_init_residual():
    net = make("resnet18", in_shape=(3, 32, 32), num_classes=10, seed=0)
    w = net.layer3[0].conv2.weight.detach()  # fan_out = 256 * 9
    assert abs(float(w.std()) / (2 / (256 * 9)) ** 0.5 - 1) < 0.02
    assert float(net.layer1[0].bn2.weight.detach().min()) == 1.0
    z = make("resnet18", in_shape=(3, 32, 32), num_classes=10, zero_init_residual=True)
    assert all(float(b.bn2.weight.detach().abs().max()) == 0.0 for lay in (z.layer1, z.layer4) for b in lay)


def test_norm_none_keeps_conv_biases_and_freeze_last():
    net = make("resnet18", norm="none", in_shape=(1, 40), num_classes=3, width=4, freeze_last=True)
    assert net.conv1.bias is not None and net.layer2[0].downsample[0].bias is not None
    assert net.fc.bias is None and not net.fc.weight.requires_grad
    assert net(torch.randn(2, 1, 40)).shape == (2, 3)
