"""bnlab.scale: detection of scale-invariant parameters, the lemma, optimizer groups, the math,
comparing runs in direction, making a network fully scale-invariant.

Every architecture is a hand-written ``nn.Module`` with its own ``forward``; the expected set of
scale-invariant tensors is derived by hand next to it, and the detector must return exactly it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.errors import UserError
from bnlab.scale import (
    PER_CHANNEL_SUFFIX,
    InvarianceCheck,
    ScaleInvariantGroup,
    angle_between,
    check_scale_invariance,
    compare_trajectories,
    effective_lr,
    find_scale_invariant,
    make_fully_scale_invariant,
    norm_identity_residual,
    split_param_groups,
)

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def randomize_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """γ ~ U(0.5, 1.5), β ~ N(0, 0.5²): generic values (β = 0 at init makes ReLU homogeneous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS) and getattr(m, "weight", None) is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    return model


def pool(h: torch.Tensor) -> torch.Tensor:
    return h.mean(dim=(2, 3))


# ----------------------------------------------------------------------------- architectures
# Expected: {parameter name: per_channel}. Parameters not listed must not be reported.


class ConvBN(nn.Module):
    """conv -> BN -> ReLU -> pool -> fc.

    conv.weight: BN normalizes each output channel over (N, H, W), so scaling filter i by c_i
    cancels: invariant per channel. With a bias, BN's mean subtraction removes the per-channel
    bias, so c·Wx + b still normalizes to the same output: invariant per channel as well; the bias
    itself is removed, the loss does not depend on it (excluded). BN's γ/β (β ≠ 0) feed a ReLU
    and the classifier: not. fc: the classifier, not.
    """

    def __init__(self, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(pool(F.relu(self.bn(self.conv(x)))))

    expected = {"conv.weight": True}


class LinearLN(nn.Module):
    """fc1 -> LayerNorm -> ReLU -> fc2.

    LayerNorm normalizes each sample across the 6 features. Without bias: fc1(c x) = c fc1(x) and
    LN removes c: fc1.weight invariant as a whole; scaling one row (feature) changes the
    features' relative sizes: not per channel. With bias: LN(c Wx + b) ≠ LN(Wx + b) (the bias is
    not removed across features): not invariant. LN's γ/β and fc2: not.
    """

    def __init__(self, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(5, 6, bias=bias)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.ln(self.fc1(x))))


class BNNoAffineThenLinear(nn.Module):
    """fc1 (bias) -> BN without affine -> ReLU -> fc2.

    fc1.weight: invariant per output feature (BN1d normalizes each feature over the batch);
    fc1.bias: removed by BN (excluded, loss independent of it). fc2, fed by the normalized
    features, is the classifier: its scale changes the logits, not invariant. No γ/β exist.
    """

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6, affine=False)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))

    expected = {"fc1.weight": True}


class PreActResidual(nn.Module):
    """h = conv0(x); r = conv2(relu(bn2(conv1(relu(bn1(h)))))); out = relu(bn3(h + r)) -> fc.

    conv1 -> bn2: invariant per channel. conv2's output is added to the skip h without a
    normalization in between: c·r + h is not a rescaling of r + h, not invariant. conv0 feeds
    both bn1 (invariant path) and the skip (h itself): scaling it changes h + r, not invariant.
    γ/β (β ≠ 0) each feed a ReLU: not. fc: not.
    """

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv0(x)
        r = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(h))))))
        return self.fc(pool(F.relu(self.bn3(h + r))))

    expected = {"conv1.weight": True}


class BasicResidual(nn.Module):
    """h = relu(bn0(conv0(x))); out = relu(bn2(conv2(relu(bn1(conv1(h))))) + h) -> fc.

    The post-activation (ResNet v1) block: every conv is followed by its own BN before the add,
    so conv0, conv1, conv2 are invariant per channel. γ/β and fc: not.
    """

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.conv0(x)))
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h))))) + h)
        return self.fc(pool(out))

    expected = {"conv0.weight": True, "conv1.weight": True, "conv2.weight": True}


class GroupNormNet(nn.Module):
    """conv1 -> GN(4 groups of 2 channels) -> ReLU -> conv2 (bias) -> GN(8 groups of 1) -> ReLU -> fc.

    GN normalizes each sample over (channels of a group, H, W). conv1 without bias: the whole
    weight scaled by c cancels; two channels of one group scaled differently do not: invariant as
    a whole only. conv1 with bias: GN subtracts the group mean of the bias, leaving b_k - mean_group(b)
    ≠ 0, so c Wx + b is not a rescaling: not invariant. conv2: groups of one channel act per
    channel and remove that channel's bias: invariant per channel; conv2.bias removed (excluded).
    GN's γ/β feed ReLUs (β ≠ 0), fc: not.
    """

    def __init__(self, bias1: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.gn2 = nn.GroupNorm(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        return self.fc(pool(F.relu(self.gn2(self.conv2(h)))))


class PlainNet(nn.Module):
    """conv -> ReLU -> pool -> fc1 (no bias) -> ReLU -> fc2: no normalization.

    Even the bias-free fc1 is only positively homogeneous: fc1(c h) = c fc1(h) scales the logits.
    Nothing is invariant.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 6, bias=False)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(pool(F.relu(self.conv(x))))))

    expected: dict = {}


class BNAffineChain(nn.Module):
    """conv1 -> bn1 (affine) -> conv2 (no padding) -> bn2 (affine) -> ReLU -> pool -> fc.

    conv1, conv2: invariant per channel. bn1's γ: bn1 output γ⊙x̂ + β goes through the linear
    conv2 into bn2: conv2(c γ⊙x̂ + β) = c conv2(γ⊙x̂) + conv2(β), and conv2(β) is constant per
    channel over (N, H, W) (valid convolution of a constant map), which bn2 removes, as it
    removes c: γ invariant as a whole; scaling one channel of γ changes how conv2 mixes them:
    not per channel. β: removed by bn2, the loss does not depend on it (excluded). bn2's γ/β
    feed a ReLU and the classifier: not. fc: not.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(pool(F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))))

    expected = {"conv1.weight": True, "conv2.weight": True, "bn1.weight": False}


class BNGammaThroughReLU(nn.Module):
    """conv1 -> bn1 -> ReLU -> conv2 -> bn2 -> ReLU -> pool -> fc.

    bn1's γ reaches bn2 through relu(c γ⊙x̂ + β): positively homogeneous in c only while β = 0.
    At initialization (β = 0) γ is invariant as a whole (not per channel: conv2 mixes channels)
    and β (all zero) is not reported; with β ≠ 0 neither is invariant. conv1, conv2: per channel.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc(pool(F.relu(self.bn2(self.conv2(h)))))


class ConvBNDropout(nn.Module):
    """conv -> BN -> ReLU -> dropout -> fc: conv.weight per channel (dropout masks are held fixed)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(pool(F.relu(self.bn(self.conv(x))))))

    expected = {"conv.weight": True}


def image_batch(seed: int = 0, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def vector_batch(seed: int = 0, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


CASES = {
    "conv_bn_bias": (lambda: ConvBN(bias=True), image_batch, {"conv.weight": True}),
    "conv_bn_nobias": (lambda: ConvBN(bias=False), image_batch, {"conv.weight": True}),
    "linear_ln_bias": (lambda: LinearLN(bias=True), vector_batch, {}),
    "linear_ln_nobias": (lambda: LinearLN(bias=False), vector_batch, {"fc1.weight": False}),
    "bn_noaffine_linear": (BNNoAffineThenLinear, vector_batch, BNNoAffineThenLinear.expected),
    "preact_residual": (PreActResidual, image_batch, PreActResidual.expected),
    "basic_residual": (BasicResidual, image_batch, BasicResidual.expected),
    "groupnorm_nobias": (lambda: GroupNormNet(bias1=False), image_batch, {"conv1.weight": False, "conv2.weight": True}),
    "groupnorm_bias": (lambda: GroupNormNet(bias1=True), image_batch, {"conv2.weight": True}),
    "no_norm": (PlainNet, image_batch, PlainNet.expected),
    "bn_affine_chain": (BNAffineChain, image_batch, BNAffineChain.expected),
    "bn_gamma_relu_generic_beta": (BNGammaThroughReLU, image_batch, {"conv1.weight": True, "conv2.weight": True}),
    "conv_bn_dropout": (ConvBNDropout, image_batch, ConvBNDropout.expected),
}


def build(case: str, seed: int = 0, randomize: bool = True):
    make, batch_fn, expected = CASES[case]
    torch.manual_seed(seed)
    model = make()
    if randomize:
        randomize_affine(model, seed)
    return model, batch_fn(seed), expected


def detected(groups):
    return {g.param_name: g.per_channel for g in groups}


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_detection_matches_hand_derived_set(case, seed):
    model, batch, expected = build(case, seed)
    groups = find_scale_invariant(model, batch, F.cross_entropy)
    assert detected(groups) == expected
    params = dict(model.named_parameters())
    for g in groups:
        assert isinstance(g, ScaleInvariantGroup)
        assert g.param is params[g.param_name]  # the user's parameter, not the copy's
        assert g.name == g.param_name + (PER_CHANNEL_SUFFIX if g.per_channel else "")
        assert 0.0 <= g.max_violation <= 1e-4


def test_gamma_before_relu_is_invariant_only_while_beta_is_zero():
    """At initialization (β = 0), relu(c γ x̂) = c relu(γ x̂): γ is invariant as a whole; β = 0 is not reported."""
    model, batch, _ = build("bn_gamma_relu_generic_beta", randomize=False)
    groups = find_scale_invariant(model, batch, F.cross_entropy)
    assert detected(groups) == {"conv1.weight": True, "conv2.weight": True, "bn1.weight": False}


def test_tensors_the_loss_ignores_are_not_reported():
    """conv bias before BN and bn1.β before bn2: scaling them changes nothing, yet they are excluded."""
    model, batch, _ = build("bn_affine_chain")
    checks = check_scale_invariance(model, batch, F.cross_entropy, ["bn1.bias"])
    assert checks["bn1.bias"].loss_change < 1e-12  # trivially "invariant"...
    assert "bn1.bias" not in detected(find_scale_invariant(model, batch, F.cross_entropy))  # ...but not reported
    model, batch, _ = build("conv_bn_bias")
    assert model.conv.bias.abs().sum() > 0
    assert "conv.bias" not in detected(find_scale_invariant(model, batch, F.cross_entropy))


def test_parameters_with_exactly_zero_gradient_or_outside_the_graph_are_not_reported():
    """L(c w) = L(w) holds exactly for both, with ∇L = 0 exactly (no round-off to reject them by)."""

    class WithIdleParams(ConvBN):
        def __init__(self):
            super().__init__(bias=False)
            self.dead = nn.Parameter(torch.randn(3))  # relu(-|w| - 1) = 0 for every w
            self.idle = nn.Parameter(torch.randn(3))  # never used in forward

        def forward(self, x):
            return super().forward(x) + F.relu(-self.dead.abs() - 1.0).sum()

    torch.manual_seed(0)
    model = WithIdleParams()
    assert detected(find_scale_invariant(model, image_batch(), F.cross_entropy)) == {"conv.weight": True}


def test_classifier_after_bn_is_not_invariant_even_per_row():
    model, batch, _ = build("bn_noaffine_linear")
    checks = check_scale_invariance(model, batch, F.cross_entropy, ["fc2.weight", "fc1.weight"], zero_norm_eps=True)
    assert checks["fc2.weight"].loss_change > 1e-3 and checks["fc2.weight"].grad_scaling_error > 1e-2
    assert checks["fc1.weight"].max_error < 1e-12


def test_detection_uses_train_mode_and_eval_mode_bn_is_not_invariant():
    model, batch, expected = build("conv_bn_nobias")
    x, y = batch
    with torch.no_grad():  # give BN running statistics, then switch to eval
        for _ in range(3):
            model(x)
    model.eval()
    assert detected(find_scale_invariant(model, batch, F.cross_entropy)) == expected
    # In eval mode BN divides by fixed running statistics: scaling the conv weight changes the loss.
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
        w = model.conv.weight.clone()
        model.conv.weight.mul_(2.0)
        scaled = F.cross_entropy(model(x), y).item()
        model.conv.weight.copy_(w)
    assert abs(scaled - base) / base > 1e-3


def test_detection_with_real_norm_eps_needs_a_looser_tolerance():
    """With BN's eps kept (zero_norm_eps=False) invariance is inexact at the ~eps/Var level."""
    model, batch, expected = build("conv_bn_nobias")
    exact = find_scale_invariant(model, batch, F.cross_entropy)
    assert exact[0].max_violation < 1e-12
    loose = find_scale_invariant(model, batch, F.cross_entropy, zero_norm_eps=False, tol=1e-2)
    assert detected(loose) == expected
    assert 1e-12 < loose[0].max_violation < 1e-2


def test_shared_parameter_is_reported_once():
    """fc1 is applied twice, each time followed by a per-feature BN: scaling a row of fc1 scales one
    feature of each BN's input, which that BN removes: invariant per channel, one group."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(5, 5, bias=False)
            self.bn1 = nn.BatchNorm1d(5, affine=False)
            self.bn2 = nn.BatchNorm1d(5, affine=False)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.bn2(self.fc1(F.relu(self.bn1(self.fc1(x))))))

    torch.manual_seed(0)
    model = Tied()
    groups = find_scale_invariant(model, vector_batch(), F.cross_entropy)
    assert detected(groups) == {"fc1.weight": True} and len(groups) == 1


# ----------------------------------------------------------------------------- the lemma


def _lemma_net() -> nn.Module:
    torch.manual_seed(3)
    model = BNAffineChain()
    randomize_affine(model, 3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12  # BN's eps breaks invariance at the ~eps/Var level; the lemma is for eps -> 0
    return model.double().train()


def test_lemma_with_plain_autograd_float64():
    """⟨∇L(w), w⟩ = 0 and ∇L(c w) = ∇L(w)/c, for whole tensors and per filter, to 1e-6."""
    model = _lemma_net()
    x, y = image_batch(3)
    x = x.double()

    def loss_and_grad(p):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [p])
        return g

    for name in ("conv1.weight", "conv2.weight", "bn1.weight"):
        p = dict(model.named_parameters())[name]
        w = p.detach().clone()
        g = loss_and_grad(p)
        assert abs(torch.sum(g * w)) / (g.norm() * w.norm()) < 1e-6
        for c in (0.5, 3.0, 11.0):
            with torch.no_grad():
                p.copy_(c * w)
            g_c = loss_and_grad(p)
            with torch.no_grad():
                p.copy_(w)
            assert (g_c * c - g).norm() / g.norm() < 1e-6
        if name != "bn1.weight":  # per filter
            dots = (g * w).flatten(1).sum(1).abs() / (g.flatten(1).norm(dim=1) * w.flatten(1).norm(dim=1))
            assert dots.max() < 1e-6
    # the negative control: the classifier violates both
    p = model.fc.weight
    w, g = p.detach().clone(), loss_and_grad(p)
    assert abs(torch.sum(g * w)) / (g.norm() * w.norm()) > 1e-3


def test_check_scale_invariance_agrees_with_plain_autograd():
    model = _lemma_net()
    x, y = image_batch(3)
    checks = check_scale_invariance(model, (x, y), F.cross_entropy, ["conv2.weight", "fc.weight"], scales=(0.5, 2.0))
    assert set(checks) == {"conv2.weight", "fc.weight"}
    inv = checks["conv2.weight"]
    assert isinstance(inv, InvarianceCheck)
    assert max(inv.grad_cosine, inv.channel_grad_cosine, inv.loss_change, inv.grad_scaling_error) < 1e-6
    # reference values for the classifier, by plain autograd on a float64 copy
    ref = _lemma_net()
    xd = x.double()
    p = ref.fc.weight
    w = p.detach().clone()
    loss0 = F.cross_entropy(ref(xd), y)
    (g,) = torch.autograd.grad(loss0, [p])
    with torch.no_grad():
        p.copy_(2.0 * w)
    loss2 = F.cross_entropy(ref(xd), y)
    (g2,) = torch.autograd.grad(loss2, [p])
    loss0, loss2 = loss0.detach(), loss2.detach()
    cls = checks["fc.weight"]
    assert cls.grad_cosine == pytest.approx(float(abs(torch.sum(g * w)) / (g.norm() * w.norm())), rel=1e-9)
    assert cls.loss_change_by_scale[2.0] == pytest.approx(float(abs(loss2 - loss0) / loss0), rel=1e-9)
    assert cls.grad_scaling_error_by_scale[2.0] == pytest.approx(float((2.0 * g2 - g).norm() / g.norm()), rel=1e-9)
    assert cls.grad_scaling_error > 1e-2


def test_check_scale_invariance_defaults_to_detected_groups_and_real_eps():
    model, batch, _ = build("conv_bn_nobias")
    checks = check_scale_invariance(model, batch, F.cross_entropy)
    assert list(checks) == ["conv.weight" + PER_CHANNEL_SUFFIX]
    real_eps = checks["conv.weight" + PER_CHANNEL_SUFFIX]
    exact = check_scale_invariance(model, batch, F.cross_entropy, ["conv.weight"], zero_norm_eps=True)["conv.weight"]
    assert exact.max_error < 1e-12 < real_eps.max_error < 1e-2


# ----------------------------------------------------------------------------- the user's model


def _snapshot(model: nn.Module):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "dtypes": {n: t.dtype for n, t in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
    }


def _assert_same(before, after):
    assert before["modes"] == after["modes"]
    assert before["dtypes"] == after["dtypes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["ids"] == after["ids"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, n
        else:
            assert torch.equal(g, after["grads"][n]), n


def test_users_model_is_unchanged():
    model, (x, y), _ = build("preact_residual")
    model.train()
    F.cross_entropy(model(x), y).backward()  # .grad set, running stats moved
    model.eval()
    model.bn1.train()  # mixed modes must survive
    model.conv0.weight.requires_grad_(False)
    model.conv0.weight.grad = None
    before = _snapshot(model)
    rng = torch.get_rng_state()
    groups = find_scale_invariant(model, (x, y), F.cross_entropy)
    check_scale_invariance(model, (x, y), F.cross_entropy, groups)
    split_param_groups(model, scale_invariant_lr=0.1, other_lr=0.01, batch=(x, y), loss_fn=F.cross_entropy)
    _assert_same(before, _snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())
    assert detected(groups) == PreActResidual.expected  # frozen parameters are still examined


def test_works_under_no_grad_and_with_inference_mode_inputs():
    model, (x, y), expected = build("conv_bn_nobias")
    with torch.inference_mode():
        xi = x.clone()
    with torch.no_grad():
        assert detected(find_scale_invariant(model, (xi, y), F.cross_entropy)) == expected
        assert check_scale_invariance(model, (xi, y), F.cross_entropy, ["conv.weight"])["conv.weight"].max_error < 1e-3


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs",
    [{"scales": ()}, {"scales": (0.0, 2.0)}, {"scales": (-1.0,)}, {"scales": (1.0,)}, {"scales": (float("nan"),)}, {"tol": 0.0}],
)
def test_bad_arguments_raise_user_error(kwargs):
    model, batch, _ = build("conv_bn_nobias")
    with pytest.raises(UserError):
        find_scale_invariant(model, batch, F.cross_entropy, **kwargs)


def test_bad_batch_and_loss_raise_user_error():
    model, (x, y), _ = build("conv_bn_nobias")
    with pytest.raises(UserError):
        find_scale_invariant(model, x, F.cross_entropy)
    with pytest.raises(UserError):
        find_scale_invariant(model, (x, y), lambda out, y: out.sum(dim=1))  # not a scalar
    with pytest.raises(UserError):
        find_scale_invariant(model, (x, y), lambda out, y: out.sum() * float("nan"))
    with pytest.raises(UserError):
        check_scale_invariance(model, (x, y), F.cross_entropy, ["no.such.param"])


def test_user_error_is_one_line():
    model, batch, _ = build("conv_bn_nobias")
    with pytest.raises(UserError) as info:
        find_scale_invariant(model, batch, F.cross_entropy, scales=(0.0,))
    assert "\n" not in str(info.value) and "scales" in str(info.value)


# ----------------------------------------------------------------------------- optimizer groups


def _ids(params):
    return [id(p) for p in params]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_split_param_groups_with_torch_optimizers(opt_cls):
    model, batch, expected = build("basic_residual")
    pg = split_param_groups(model, scale_invariant_lr=0.3, other_lr=0.01, batch=batch, loss_fn=F.cross_entropy)
    assert [g["name"] for g in pg] == ["scale_invariant", "other"]
    assert [g["lr"] for g in pg] == [0.3, 0.01]
    params = dict(model.named_parameters())
    assert sorted(_ids(pg[0]["params"])) == sorted(id(params[n]) for n in expected)
    all_ids = _ids(pg[0]["params"]) + _ids(pg[1]["params"])
    assert sorted(all_ids) == sorted(_ids(model.parameters()))  # each parameter exactly once
    opt = opt_cls(pg, lr=0.5)
    x, y = batch
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.01]
    assert [g["name"] for g in opt.param_groups] == ["scale_invariant", "other"]


def test_split_param_groups_given_groups_names_and_kwargs():
    model, batch, _ = build("conv_bn_nobias")
    groups = find_scale_invariant(model, batch, F.cross_entropy)
    a = split_param_groups(model, scale_invariant_lr=0.1, other_lr=0.2, groups=groups, momentum=0.9)
    b = split_param_groups(model, scale_invariant_lr=0.1, other_lr=0.2, groups=["conv.weight"], momentum=0.9)
    for pg in (a, b):
        assert _ids(pg[0]["params"]) == [id(model.conv.weight)]
        assert all(g["momentum"] == 0.9 for g in pg)
    opt = torch.optim.SGD(a, lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.9
    empty = split_param_groups(model, scale_invariant_lr=0.1, other_lr=0.2, groups=[])
    assert empty[0]["params"] == [] and len(empty[1]["params"]) == len(list(model.parameters()))
    torch.optim.SGD(empty, lr=0.1)  # an empty group is accepted by torch


def test_split_param_groups_bad_input():
    model, batch, _ = build("conv_bn_nobias")
    other, _, _ = build("conv_bn_nobias", seed=1)
    foreign = find_scale_invariant(other, batch, F.cross_entropy)
    with pytest.raises(UserError):
        split_param_groups(model, scale_invariant_lr=0.1, other_lr=0.1)  # no groups, no batch
    with pytest.raises(UserError):
        split_param_groups(model, scale_invariant_lr=0.1, other_lr=0.1, groups=foreign)
    with pytest.raises(UserError):
        split_param_groups(model, scale_invariant_lr=-0.1, other_lr=0.1, groups=[])
    with pytest.raises(UserError):
        split_param_groups(model, scale_invariant_lr=0.1, other_lr=0.1, groups=[], lr=0.3)


# ----------------------------------------------------------------------------- the math


def test_effective_lr():
    assert effective_lr(0.1, 2.0) == pytest.approx(0.025)
    t = effective_lr(0.3, torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert torch.allclose(t, torch.tensor([0.3, 0.3 / 9], dtype=torch.float64))
    with pytest.raises(UserError):
        effective_lr(0.1, 0.0)


def test_angle_between_known_angles():
    assert angle_between(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(math.pi / 4, rel=1e-12)
    assert angle_between(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(math.pi / 2, rel=1e-12)
    assert angle_between(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])) == pytest.approx(math.pi, rel=1e-12)
    assert angle_between(torch.ones(3, 4), torch.ones(3, 4) * 7) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("t", [1e-4, 1e-9, 1e-13])
def test_angle_between_is_accurate_for_tiny_angles(t):
    """w and w + t·u with u ⟂ w: the angle is exactly atan(t ‖u‖/‖w‖); arccos of the cosine is not."""
    w = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    u = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    expected = math.atan(t / 5.0)
    assert angle_between(w, w + t * u) == pytest.approx(expected, rel=1e-9, abs=0.0)
    if t <= 1e-9:  # the naive formula loses it entirely
        cos = float(torch.dot(w, w + t * u) / (w.norm() * (w + t * u).norm()))
        assert math.acos(min(cos, 1.0)) != pytest.approx(expected, rel=1e-3, abs=0.0)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-10, 10), min_size=3, max_size=3),
    st.lists(st.floats(-10, 10), min_size=3, max_size=3),
    st.floats(0.1, 10),
    st.floats(0.1, 10),
)
def test_angle_between_matches_arccos_and_ignores_scale(a, b, ca, cb):
    u, v = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if u.norm() < 1e-3 or v.norm() < 1e-3:
        return
    cos = float(torch.dot(u, v) / (u.norm() * v.norm()))
    angle = angle_between(u, v)
    assert 0.0 <= angle <= math.pi
    if abs(cos) < 0.99:  # arccos is accurate away from 0 and π
        assert angle == pytest.approx(math.acos(cos), abs=1e-10)
    assert angle_between(ca * u, cb * v) == pytest.approx(angle, abs=1e-10)
    assert angle_between(v, u) == pytest.approx(angle, abs=1e-12)


def test_angle_between_bad_input():
    assert math.isnan(angle_between(torch.zeros(3), torch.ones(3)))  # undefined: the documented convention
    with pytest.raises(UserError):
        angle_between(torch.ones(3), torch.ones(4))


def test_norm_identity_residual():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(50, generator=gen, dtype=torch.float64)
    g = torch.randn(50, generator=gen, dtype=torch.float64)
    g_perp = g - torch.dot(g, w) / torch.dot(w, w) * w  # ⟨g, w⟩ = 0: the scale-invariant case
    lr = 0.7
    for grad, expected in ((g_perp, 0.0), (g, float(-2 * lr * torch.dot(g, w)))):
        w_next = w - lr * grad
        r = norm_identity_residual(float(w @ w), float(w_next @ w_next), lr, float(grad @ grad))
        assert r == pytest.approx(expected, abs=1e-12)
    assert norm_identity_residual(1.0, 1.25, 0.5, 1.0) == 0.0


# ----------------------------------------------------------------------------- angles and comparing runs


def test_angle_between_known_and_tiny_angles():
    assert angle_between(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(math.pi / 2, rel=1e-15)
    assert angle_between(torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])) == pytest.approx(math.pi, rel=1e-15)
    assert angle_between(torch.tensor([2.0, 2.0]), torch.tensor([5.0, 5.0])) == 0.0
    for eps in (1e-6, 1e-10, 1e-14):
        a = torch.tensor([1.0, 0.0], dtype=torch.float64)
        b = torch.tensor([math.cos(eps), math.sin(eps)], dtype=torch.float64) * 7.0
        assert angle_between(a, b) == pytest.approx(eps, rel=1e-6)  # arccos would return 0 or ~1e-8 here
    x = torch.randn(3, 4, dtype=torch.float64)
    assert angle_between(x, 1e30 * x) < 1e-15


def test_angle_between_convention_for_zero_and_mismatched():
    assert angle_between(torch.zeros(3), torch.zeros(3)) == 0.0  # nothing to turn
    assert math.isnan(angle_between(torch.zeros(3), torch.ones(3)))  # undefined
    assert math.isnan(angle_between(torch.ones(3), torch.tensor([1.0, float("inf"), 0.0])))
    with pytest.raises(UserError):
        angle_between(torch.ones(3), torch.ones(4))


def test_angle_between_lists_equals_the_concatenation():
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    b = [x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in a]
    cat = lambda ts: torch.cat([t.reshape(-1) for t in ts])
    ref = math.acos(float(torch.dot(cat(a), cat(b)) / (cat(a).norm() * cat(b).norm())))
    assert angle_between(a, b) == pytest.approx(ref, rel=1e-10)
    assert angle_between(a, b) == angle_between(cat(a), cat(b)) or abs(angle_between(a, b) - angle_between(cat(a), cat(b))) < 1e-15


def bn_net(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8, eps=1e-30), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8, eps=1e-30), nn.ReLU(), nn.Linear(8, 3),
    ).double()


def test_compare_trajectories_of_a_rescaled_copy():
    a, b = bn_net(), bn_net()
    make_fully_scale_invariant(a)
    make_fully_scale_invariant(b)
    with torch.no_grad():
        for p in b.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    x = torch.randn(16, 4, dtype=torch.float64)
    res = compare_trajectories(a, b, batch=(x, None))
    assert set(res) == {"per_param", "overall", "max_abs_output_diff"}
    assert set(res["per_param"]) == {"0.weight", "4.weight"}
    assert res["overall"] < 1e-15 and max(res["per_param"].values()) < 1e-15
    assert res["max_abs_output_diff"] < 1e-12
    json.dumps(res)


def test_compare_trajectories_leaves_models_untouched_and_shares_rng():
    a, b = bn_net(dropout=0.5), bn_net(dropout=0.5)
    b.eval()
    stats = {k: v.clone() for k, v in a.state_dict().items()}
    x = torch.randn(16, 4, dtype=torch.float64)
    rng = torch.get_rng_state()
    res = compare_trajectories(a, b, batch=x)
    assert res["per_param"]["1.bias"] == 0.0  # two zero tensors: angle 0, not an error
    assert a.training and not b.training
    assert all(torch.equal(stats[k], v) for k, v in a.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert res["max_abs_output_diff"] > 0  # train-mode (dropout, batch stats) vs eval mode
    c = bn_net(dropout=0.5)
    assert compare_trajectories(a, c, batch=x)["max_abs_output_diff"] == 0.0  # same dropout mask


def test_compare_trajectories_with_explicit_params_and_errors():
    a, b = bn_net(0), bn_net(1)
    res = compare_trajectories(a, b, params_a={"w": a[0].weight}, params_b=[b[0].weight])
    assert set(res["per_param"]) == {"w"} and res["max_abs_output_diff"] is None
    assert res["overall"] == pytest.approx(res["per_param"]["w"], rel=1e-12)
    with pytest.raises(UserError):
        compare_trajectories(a, b, params_a=[a[0].weight], params_b=[b[4].weight, b[0].weight])
    with pytest.raises(UserError):
        compare_trajectories(a, b, params_a=[a[0].weight], params_b=[b[7].weight])


# ----------------------------------------------------------------------------- make_fully_scale_invariant


def test_make_fully_scale_invariant_freezes_and_returns_the_weights():
    model = bn_net()
    trained = make_fully_scale_invariant(model)
    assert [id(p) for p in trained] == [id(model[0].weight), id(model[4].weight)]
    for bn in (model[1], model[5]):
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert not model[7].weight.requires_grad and not model[7].bias.requires_grad
    # jointly scale-invariant: L(c w) == L(w) (train mode, BN eps negligible)
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    before = nn.functional.cross_entropy(model(x), y).detach()
    with torch.no_grad():
        for p in trained:
            p.mul_(3.7)
    after = nn.functional.cross_entropy(model(x), y).detach()
    assert float(after) == pytest.approx(float(before), rel=1e-13)


def test_make_fully_scale_invariant_on_a_convnet():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    )
    trained = make_fully_scale_invariant(model)
    assert [id(p) for p in trained] == [id(model[0].weight), id(model[3].weight)]


@pytest.mark.parametrize(
    "model,match",
    [
        (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), "bias"),
        (nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2)), "not followed"),
        (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), "Embedding"),
    ],
)
def test_make_fully_scale_invariant_refuses(model, match):
    with pytest.raises(UserError, match=match) as info:
        make_fully_scale_invariant(model)
    assert "\n" not in str(info.value)
