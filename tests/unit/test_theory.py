"""Santurkar et al.'s §4 measured (bnlab.theory) and activation-space curvature (layer_output_closure).

References are independent of the code under test: gradients w.r.t. a layer's output/input from a
plain forward pass of a deep copy with a hook and ``retain_grad``; Hessian-vector products from
central finite differences of those gradients; the Thm 4.1 terms from numpy on the captured
tensors; Lemma 4.5 against a brute-force minimum over a grid.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import models, theory
from bnlab.curvature import hvp, layer_output_closure, loss_and_grad, quadratic_form
from bnlab.errors import UserError

SHAPES = [  # (model, input shape): BatchNorm2d, BatchNorm1d on (N, C, L), BatchNorm1d on (N, C)
    ("convnet", (1, 8, 8)),
    ("convnet", (2, 24)),
    ("mlp", (1, 6, 6)),
]


def _net(name, shape, seed=0, **kw):
    width = 5 if name == "convnet" else 12
    return models.make(name, norm="bn", in_shape=shape, num_classes=4, width=width, depth=1, seed=seed, **kw)


def _batch(shape, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * 1.5 + 0.3, torch.randint(0, 4, (n,), generator=g)


def _bns(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _ref_grad(model, batch, module_name, on, delta=None, eps=None):
    """(tensor, ∂L/∂tensor) from a plain float64 forward of a deep copy: the hook adds ``delta`` to
    the module's output (input), marks it retain_grad, and backward runs through the whole net."""
    net = copy.deepcopy(model).double()
    if eps is not None:
        for _, m in _bns(net):
            m.eps = eps
    mod = dict(net.named_modules())[module_name]
    box = {}

    def use(t):
        t = t + (0 if delta is None else delta)
        t.retain_grad()
        box["t"] = t
        return t

    if on == "output":
        h = mod.register_forward_hook(lambda m, i, o: use(o))
    else:
        h = mod.register_forward_pre_hook(lambda m, i: (use(i[0]),))
    x, y = batch
    loss = F.cross_entropy(net(x.double()), y)
    loss.backward()
    h.remove()
    return box["t"].detach(), box["t"].grad.detach()


# ----------------------------------------------------------------------------- layer_output_closure


@pytest.mark.parametrize("name, shape", SHAPES)
@pytest.mark.parametrize("on", ["output", "input"])
def test_layer_output_closure_gradient_and_hvp_match_references(name, shape, on):
    net = _net(name, shape).double()
    batch = (_batch(shape)[0].double(), _batch(shape)[1])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    for mod_name, mod in _bns(net)[:2] + [("classifier", net.classifier)]:
        f, y = layer_output_closure(net, batch, F.cross_entropy, mod, on=on)
        t_ref, g_ref = _ref_grad(net, batch, mod_name, on)
        assert torch.allclose(y, t_ref, rtol=0, atol=1e-12)
        loss, g = loss_and_grad(f, {"y": y})
        assert torch.allclose(g["y"], g_ref, rtol=1e-10, atol=1e-14), mod_name
        with torch.no_grad():
            ref_loss = F.cross_entropy(copy.deepcopy(net)(batch[0]), batch[1])
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
        v = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        hv = hvp(f, {"y": y}, {"y": v})["y"]
        h = 1e-4
        fd = (_ref_grad(net, batch, mod_name, on, delta=h * v)[1] - _ref_grad(net, batch, mod_name, on, delta=-h * v)[1]) / (2 * h)
        assert float((hv - fd).norm() / fd.norm()) < 1e-6, mod_name
        # the tensor form and the dict form agree
        assert float(f(y)) == float(f({"y": y}))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_layer_output_closure_leaves_the_model_untouched_and_refuses_bad_input():
    net = _net("convnet", (1, 8, 8))
    batch = _batch((1, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bn = _bns(net)[0][1]
    f, z = layer_output_closure(net, batch, F.cross_entropy, bn)
    q = quadratic_form(f, {"y": z})
    assert math.isfinite(float(q))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not bn._forward_hooks and not bn._forward_pre_hooks
    assert all(m.training for m in net.modules())
    with pytest.raises(UserError, match="not a submodule"):
        layer_output_closure(net, batch, F.cross_entropy, nn.ReLU())
    with pytest.raises(UserError, match="'output' or 'input'"):
        layer_output_closure(net, batch, F.cross_entropy, bn, on="middle")
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(UserError, match="runs 2 times"):
        layer_output_closure(twice, (torch.randn(3, 4), torch.randint(0, 4, (3,))), F.cross_entropy, shared)


# ----------------------------------------------------------------------------- Thm 4.1, Obs. 4.3


@pytest.mark.parametrize("name, shape", SHAPES)
def test_thm41_is_an_identity_at_eps0_and_the_eps_form_is_exact(name, shape):
    net = _net(name, shape)
    batch = _batch(shape)
    t0 = theory.gradient_terms(net, batch, eps=0.0)
    te = theory.gradient_terms(net, batch, eps=None)
    assert list(t0) == [n for n, _ in _bns(net)] and t0
    for layer, t in t0.items():
        assert t.eps0 and t.summary()["gap_eps0"] <= 1e-8
        assert np.allclose(t.grad_y_sq, t.rhs_eps0, rtol=1e-8, atol=0)
        e = te[layer]
        assert not e.eps0 and e.eps == 1e-5
        assert e.summary()["gap_eps"] <= 1e-8
        # the ε = 0 formula with the default ε is off by O(ε/σ²): the check is sharp enough to see it
        worst = np.max(np.abs(e.rhs_eps0 - e.grad_y_sq) / e.grad_y_sq)
        assert 1e-8 < worst < 1e-2
        assert e.summary()["backward_gap"] < 1e-12


@pytest.mark.parametrize("name, shape", SHAPES)
def test_thm41_terms_against_an_independent_autograd_and_numpy_reference(name, shape):
    net = _net(name, shape, seed=3)
    batch = _batch(shape, seed=2)
    terms = theory.gradient_terms(net, batch, eps=None)
    for layer, t in terms.items():
        y, gy = _ref_grad(net, batch, layer, "input")
        _, gz = _ref_grad(net, batch, layer, "output")
        C = y.shape[1]
        yc = y.transpose(0, 1).reshape(C, -1).numpy()
        g = gz.transpose(0, 1).reshape(C, -1).numpy()
        v = gy.transpose(0, 1).reshape(C, -1).numpy()
        m = yc.shape[1]
        var = yc.var(axis=1)
        yhat = (yc - yc.mean(1, keepdims=True)) / np.sqrt(var + 1e-5)[:, None]
        assert t.m == m
        np.testing.assert_allclose(t.sigma2, var, rtol=1e-12)
        np.testing.assert_allclose(t.grad_y_sq, (v * v).sum(1), rtol=1e-10)
        np.testing.assert_allclose(t.g_sq, (g * g).sum(1), rtol=1e-10)
        np.testing.assert_allclose(t.proj_mean, g.sum(1) ** 2 / m, rtol=1e-8, atol=1e-22)
        np.testing.assert_allclose(t.proj_dir, (g * yhat).sum(1) ** 2 / m, rtol=1e-8, atol=1e-22)
        s = t.summary()
        assert s["share_mean"] == pytest.approx((g.sum(1) ** 2 / m).sum() / (g * g).sum(), rel=1e-8)
        assert 0 <= s["share_mean"] + s["share_dir"] <= 1


def test_obs43_with_gamma_equal_sigma_the_gradient_still_loses_the_projections():
    # γ = σ, β = μ: z = y at this batch, yet ‖∇_y L̂‖² = ‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m < ‖g‖²
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    with torch.no_grad():
        pre = net[0](x)
        net[1].weight.copy_(pre.var(0, unbiased=False).sqrt())
        net[1].bias.copy_(pre.mean(0))
    t = theory.gradient_terms(net, (x, y), eps=0.0)["1"]
    assert np.allclose(t.gamma ** 2 / t.sigma2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(t.grad_y_sq, t.g_sq - t.proj_mean - t.proj_dir, rtol=1e-10)
    assert np.all(t.grad_y_sq < t.g_sq) and t.summary()["share_mean"] + t.summary()["share_dir"] > 1e-3


def test_gradient_terms_of_a_net_without_bn_is_empty_and_unknown_layer_refused():
    net = models.make("convnet", norm="none", in_shape=(1, 8, 8), num_classes=4, width=4, seed=0)
    assert theory.gradient_terms(net, _batch((1, 8, 8))) == {}
    with pytest.raises(UserError, match="not train-mode BatchNorm"):
        theory.gradient_terms(_net("mlp", (1, 6, 6)), _batch((1, 6, 6)), layers=["nope"])


def test_a_constant_channel_is_excluded_not_nan():
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[1].zero_()  # channel 1 is constant (0) over the batch
    batch = (torch.randn(10, 4), torch.randint(0, 2, (10,)))
    t = theory.gradient_terms(net, batch, eps=0.0)["1"]
    assert t.degenerate.tolist() == [False, True, False]
    s = t.summary()
    assert s["degenerate"] == 1 and s["gap_eps0"] <= 1e-8 and math.isfinite(s["reduction"])


# ----------------------------------------------------------------------------- Thm 4.2


@pytest.mark.parametrize("name, shape", SHAPES)
def test_thm42a_is_an_identity_at_eps0_and_b_holds_iff_its_condition(name, shape):
    net = _net(name, shape, seed=1)
    batch = _batch(shape, seed=4)
    c0 = theory.curvature_terms(net, batch, eps=0.0)
    ce = theory.curvature_terms(net, batch, eps=None)
    assert list(c0) == [n for n, _ in _bns(net)]
    for layer, t in c0.items():
        assert t.eps0 and t.gap_a <= 1e-8, (layer, t.gap_a)
        assert t.holds_b == t.condition_b
        assert ce[layer].gap_a_eps <= 1e-8
        # with ε > 0 the ε = 0 form (a) is no identity: a first-order ε effect is visible
        assert abs(ce[layer].lhs - ce[layer].rhs_a) > 1e-12 * abs(ce[layer].lhs)


def test_thm42_lhs_against_finite_differences_of_an_independent_gradient():
    name, shape = "convnet", (1, 8, 8)
    net = _net(name, shape, seed=2)
    batch = _batch(shape, seed=5)
    terms = theory.curvature_terms(net, batch, eps=None)
    h = 1e-4
    for layer, t in terms.items():
        _, v = _ref_grad(net, batch, layer, "input")
        gp = _ref_grad(net, batch, layer, "input", delta=h * v)[1]
        gm = _ref_grad(net, batch, layer, "input", delta=-h * v)[1]
        ref = float((v * (gp - gm)).sum() / (2 * h))
        assert t.lhs == pytest.approx(ref, rel=1e-6)
        _, g = _ref_grad(net, batch, layer, "output")
        gp = _ref_grad(net, batch, layer, "output", delta=h * g)[1]
        gm = _ref_grad(net, batch, layer, "output", delta=-h * g)[1]
        assert t.curv_out == pytest.approx(float((g * (gp - gm)).sum() / (2 * h)) / float((g * g).sum()), rel=1e-6)


# ----------------------------------------------------------------------------- Lemma 4.5


def test_lemma45_right_side_is_the_distance_to_the_line_through_wstar():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        w0, ws = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
        d = theory.lemma45_sides(w0, ws)
        cs = np.linspace(-5, 5, 200001)
        brute = np.min(((w0.numpy()[None] - cs[:, None] * ws.numpy()[None]) ** 2).sum(1))
        assert d["bound"] == pytest.approx(brute, rel=1e-6, abs=1e-9)
        assert d["residual"] < 1e-14
        assert d["premise"] == float(w0 @ ws > 0)
        ray = theory.ray_distance(w0, ws)
        brute_ray = np.sqrt(np.min(((w0.numpy()[None] - cs[cs >= 0][:, None] * ws.numpy()[None]) ** 2).sum(1)))
        assert ray == pytest.approx(brute_ray, rel=1e-6, abs=1e-6)
        cos = float(w0 @ ws / (w0.norm() * ws.norm()))
        assert theory.angle(w0, ws) == pytest.approx(math.acos(cos), rel=1e-10)


def test_solution_distances_per_channel_rays():
    w0 = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([1.0, 1.0])}
    w = {"a": torch.tensor([[3.0, 0.0], [0.0, 0.5]]), "b": torch.tensor([1.0, 2.0])}
    d = theory.solution_distances(w0, w, per_channel=["a"])
    n0 = math.sqrt(4.0)
    assert d["ray"] == pytest.approx(1.0 / n0)  # rows of "a" are rescalings: only "b" counts
    assert d["euclid"] == pytest.approx(math.sqrt(4 + 0.25 + 1) / n0)
    assert d["angle"] == pytest.approx((0.0 + math.degrees(math.acos(3 / math.sqrt(10)))) / 2)


# ----------------------------------------------------------------------------- probes


def test_probes_record_the_identities_along_training():
    from bnlab.data import ArrayData
    from bnlab.probes.theory import SanturkarCurvature, SanturkarTerms
    from bnlab.train import make_optimizer, train

    g = torch.Generator().manual_seed(0)
    data = ArrayData(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g), 4)
    net = _net("convnet", (1, 8, 8))
    opt = make_optimizer(net.parameters(), lr=0.1, momentum=0.9)
    probes = [SanturkarTerms(every=2), SanturkarCurvature(every=3)]
    h = train(net, data, opt, steps=6, batch_size=32, probes=probes, device="cpu", seed=0)
    terms = [r for r in h.records if "santurkar/layers" in r]
    curv = [r for r in h.records if "santurkar_hess/layers" in r]
    assert [r["step"] for r in terms] == [0, 2, 4] and [r["step"] for r in curv] == [0, 3]
    for r in terms:
        assert r["santurkar/layers"] == 3 and r["santurkar/gap_eps0_max"] <= 1e-8
        share = r["santurkar/features.9/share_mean"] + r["santurkar/features.9/share_dir"]
        assert 0 < share < 1
    for r in curv:
        assert r["santurkar_hess/gap_a_max"] <= 1e-8 and r["santurkar_hess/b_fails_under_condition"] == 0
    plain = models.make("convnet", norm="none", in_shape=(1, 8, 8), num_classes=4, width=4, seed=0)
    h = train(plain, data, make_optimizer(plain.parameters(), lr=0.1), steps=1, batch_size=32,
              probes=[SanturkarTerms(every=1)], device="cpu", seed=0)
    assert h.records[0]["santurkar/layers"] == 0


@pytest.mark.parametrize("name, shape", SHAPES)
def test_thm42_single_channel_forms_the_papers_statement(name, shape):
    net = _net(name, shape, seed=5)
    batch = _batch(shape, seed=6)
    for eps in (0.0, None):
        terms = theory.curvature_terms(net, batch, eps=eps, per_channel=True)
        for layer, t in terms.items():
            ch = t.channels
            assert ch is not None and ch["lhs"].shape == (dict(net.named_modules())[layer].num_features,)
            if eps == 0.0:
                assert np.nanmax(ch["gap_a"]) <= 1e-8, layer
            assert np.nanmax(ch["gap_a_eps"]) <= 1e-8, layer
            np.testing.assert_array_equal(ch["holds_b"], ch["condition_b"])
    # one channel's lhs against finite differences of an independent gradient along v restricted to it
    layer = next(iter(terms))
    _, v = _ref_grad(net, batch, layer, "input")
    V = torch.zeros_like(v)
    V[:, 1] = v[:, 1]
    h = 1e-4
    fd = float((V * (_ref_grad(net, batch, layer, "input", delta=h * V)[1]
                     - _ref_grad(net, batch, layer, "input", delta=-h * V)[1])).sum() / (2 * h))
    assert terms[layer].channels["lhs"][1] == pytest.approx(fd, rel=1e-6)


def test_layer_output_closure_with_an_inplace_relu_downstream():
    """torchvision-style ReLU(inplace=True) after BN: the same gradient and HVP as an out-of-place ReLU."""
    from bnlab.curvature import hvp, layer_output_closure
    torch.manual_seed(0)

    def net(inplace):
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=inplace),
                                   torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).double()

    batch = (torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,)))
    out = {}
    for inplace in (False, True):
        m = net(inplace)
        f, y = layer_output_closure(m, batch, torch.nn.functional.cross_entropy, m[1])
        v = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
        yy = y.clone().requires_grad_(True)
        g = torch.autograd.grad(f({"y": yy}), yy)[0]
        out[inplace] = (g, hvp(f, {"y": y}, {"y": v})["y"], y)
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-12, atol=1e-15)
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-12, atol=1e-15)
    assert out[True][1].abs().max() > 0
