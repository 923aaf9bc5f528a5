"""bnlab._batchnorm_second_order: BatchNorm with a closed-form second derivative (used by the
double-backward HVPs).

References: ``torch.autograd.gradgradcheck`` (finite differences of the first derivative) and
PyTorch's own double backward of ``F.batch_norm``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab._batchnorm_second_order import _BatchNorm, second_order_batch_norm
from bnlab.curvature import hvp, model_loss_closure


@pytest.mark.parametrize("shape,affine", [((5, 3, 4, 4), True), ((6, 4), True), ((5, 3, 7), False), ((4, 2, 3, 3), False)])
def test_second_derivative_passes_gradgradcheck(shape, affine):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    c = shape[1]
    if affine:
        w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_()

        def fn(x, w, b):
            return _BatchNorm.apply(x, w, b, None, None, 0.1, 1e-3)

        inputs = (x, w, b)
    else:

        def fn(x):
            return _BatchNorm.apply(x, None, None, None, None, 0.1, 1e-3)

        inputs = (x,)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    ).double().train()


def test_hvp_equals_pytorchs_own_double_backward(monkeypatch):
    """The same HVP of a BN net (2-D, affine and not, and 1-D BN) with and without the closed form."""
    from bnlab import _batchnorm_second_order as bn2nd

    calls = []
    closed_form = bn2nd._BatchNormBackward.backward
    monkeypatch.setattr(bn2nd._BatchNormBackward, "backward", staticmethod(lambda ctx, *g: (calls.append(1), closed_form(ctx, *g))[1]))
    model = _cnn()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    ours = hvp(f, params, v, method="reverse")  # HessianOperator enters second_order_batch_norm()
    assert len(calls) == 3  # the closed form ran, once per BN layer
    leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
    g = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
    ref = torch.autograd.grad(g, list(leaves.values()), grad_outputs=[v[k] for k in leaves])
    for (k, r) in zip(leaves, ref):
        torch.testing.assert_close(ours[k], r, rtol=1e-10, atol=1e-12, msg=k)
        assert r.abs().max() > 1e-3  # every parameter's block is exercised


def test_values_first_derivatives_and_running_stats_are_pytorchs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 4, 4, generator=gen)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    gy = torch.randn(8, 3, 4, 4, generator=gen)
    outs = []
    for use in (False, True):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(3), torch.ones(3)
        with second_order_batch_norm() if use else torch.enable_grad():
            y = F.batch_norm(xi, rm, rv, wi, bi, True, 0.3, 1e-5)
            y_eval = F.batch_norm(xi, rm, rv, wi, bi, False, 0.3, 1e-5)  # eval mode: PyTorch's path
        grads = torch.autograd.grad(y, (xi, wi, bi), gy)
        outs.append((y, y_eval, rm, rv, grads, y.grad_fn.name()))
    (y0, e0, rm0, rv0, g0, n0), (y1, e1, rm1, rv1, g1, n1) = outs
    assert "_BatchNorm" in n1 and "_BatchNorm" not in n0  # the closed form was used, and only inside the block
    for a, b_ in [(y0, y1), (e0, e1), (rm0, rm1), (rv0, rv1), *zip(g0, g1)]:
        assert torch.equal(a, b_)  # the same kernels: bit-identical


@pytest.mark.parametrize("which", ["weight only", "bias only"])
def test_a_batch_norm_call_with_only_a_weight_or_only_a_bias(which):
    """Custom layers may pass one affine parameter. Reference: the HVP of BatchNorm written with
    elementary operations (PyTorch's own double backward fails for a bias without a weight)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 4, generator=gen, dtype=torch.float64)
    params = {"x": x, "p": torch.rand(3, generator=gen, dtype=torch.float64) + 0.5}
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in params.items()}
    c = torch.randn(8, 3, 4, generator=gen, dtype=torch.float64)

    def f(p, bn=F.batch_norm):
        w, b = (p["p"], None) if which == "weight only" else (None, p["p"])
        return (bn(p["x"], None, None, w, b, True) ** 3 * c).sum()

    def elementary_bn(x, rm, rv, w, b, training, eps=1e-5):
        var, mean = torch.var_mean(x, (0, 2), correction=0, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps)
        y = y if w is None else y * w.view(1, -1, 1)
        return y if b is None else y + b.view(1, -1, 1)

    leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
    g = torch.autograd.grad(f(leaves, elementary_bn), list(leaves.values()), create_graph=True)
    ref = torch.autograd.grad(g, list(leaves.values()), grad_outputs=[v[k] for k in leaves])
    ours = hvp(f, params, v, method="reverse")
    for k, r in zip(leaves, ref):
        torch.testing.assert_close(ours[k], r, rtol=1e-10, atol=1e-12, msg=k)
        assert r.abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's BN decomposition
def test_torch_func_transforms_inside_the_block_keep_pytorchs_rules():
    """A closure that vmaps or uses forward-mode AD over BN still works inside the block."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5

    def bn(xb, ww):
        return F.batch_norm(xb, None, None, ww, None, True)

    ref_v = torch.func.vmap(bn, in_dims=(0, None))(x, w)
    ref_j = torch.func.jvp(lambda ww: bn(x[0], ww), (w,), (torch.ones_like(w),))
    with second_order_batch_norm():
        got_v = torch.func.vmap(bn, in_dims=(0, None))(x, w)
        got_j = torch.func.jvp(lambda ww: bn(x[0], ww), (w,), (torch.ones_like(w),))
    assert torch.equal(got_v, ref_v)
    assert all(torch.equal(a, b) for a, b in zip(got_j, ref_j))
