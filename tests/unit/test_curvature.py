"""bnlab.curvature against independent references: a quadratic with a known matrix, and a dense
Hessian of a small BatchNorm MLP written with plain functional ops."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.curvature import (
    HessianOperator,
    hessian_trace,
    hvp,
    loss_and_grad,
    model_hessian_trace,
    model_hvp,
    model_loss_closure,
    model_quadratic_form,
    model_top_eigenvalues,
    power_iteration,
    quadratic_form,
    top_eigenvalues,
)
from bnlab.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

DT = torch.float64
METHODS = ["reverse", "forward"]


# ------------------------------------------------------------------------------------------
# a quadratic ½ wᵀAw: ∇ = A w, H = A


def _sym(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=DT)
    return (b + b.T) / 2


def _with_spectrum(eigs, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=DT))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=DT)) @ q.T


def _quadratic(A: torch.Tensor):
    """f(params) = ½ wᵀAw with w split over two keys, to exercise dict handling."""
    n1 = A.shape[0] // 3

    def f(p):
        w = torch.cat([p["a"].reshape(-1), p["b"].reshape(-1)])
        return 0.5 * w @ A @ w

    def split(vec):
        return {"a": vec[:n1].clone(), "b": vec[n1:].reshape(-1, 1).clone()}

    return f, split


def _flat(d):
    return torch.cat([d["a"].reshape(-1), d["b"].reshape(-1)])


@pytest.fixture
def quad():
    A = _sym(24, seed=1)
    f, split = _quadratic(A)
    g = torch.Generator().manual_seed(2)
    w = split(torch.randn(24, generator=g, dtype=DT))
    v = split(torch.randn(24, generator=g, dtype=DT))
    return A, f, w, v


@pytest.mark.parametrize("method", METHODS)
def test_hvp_of_quadratic_is_A_v(quad, method):
    A, f, w, v = quad
    hv = hvp(f, w, v, method=method)
    assert set(hv) == {"a", "b"} and hv["b"].shape == w["b"].shape
    torch.testing.assert_close(_flat(hv), A @ _flat(v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_quadratic_form_of_quadratic(quad, method):
    A, f, w, v = quad
    vv = _flat(v)
    q = quadratic_form(f, w, v, method=method)
    assert q.item() == pytest.approx((vv @ A @ vv / (vv @ vv)).item(), rel=1e-12)
    # default direction: the gradient g = A w
    g = A @ _flat(w)
    q_g = quadratic_form(f, w, method=method)
    assert q_g.item() == pytest.approx((g @ A @ g / (g @ g)).item(), rel=1e-12)


def test_hessian_operator_reuses_graph_and_counts(quad):
    A, f, w, v = quad
    op = HessianOperator(f, w, method="reverse")
    torch.testing.assert_close(_flat(op.grad), A @ _flat(w), rtol=0, atol=1e-12)
    for _ in range(3):  # the retained graph can be used repeatedly
        torch.testing.assert_close(op.matvec(_flat(v)), A @ _flat(v), rtol=0, atol=1e-12)
    assert op.n_hvp == 3


def test_hvp_and_quadratic_form_under_vmap(quad):
    A, f, w, _ = quad
    V = torch.randn(5, 24, dtype=DT, generator=torch.Generator().manual_seed(3))
    n1 = 24 // 3
    batched = {"a": V[:, :n1], "b": V[:, n1:].reshape(5, -1, 1)}
    hv = torch.func.vmap(lambda v: hvp(f, w, v))(batched)
    flat = torch.cat([hv["a"], hv["b"].reshape(5, -1)], dim=1)
    torch.testing.assert_close(flat, V @ A, rtol=0, atol=1e-12)
    q = torch.func.vmap(lambda v: quadratic_form(f, w, v))(batched)
    ref = torch.einsum("bi,ij,bj->b", V, A, V) / (V * V).sum(1)
    torch.testing.assert_close(q, ref, rtol=1e-12, atol=0)


def test_reverse_method_inside_vmap_is_a_clear_error(quad):
    A, f, w, v = quad
    with pytest.raises(UserError, match="forward"):
        torch.func.vmap(lambda a: hvp(f, w, {"a": a, "b": v["b"]}, method="reverse"))(
            v["a"][None]
        )


@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_match_eigvalsh(quad, k):
    A, f, w, _ = quad
    ref = np.linalg.eigvalsh(A.numpy())[::-1][:k]
    lam, info = top_eigenvalues(f, w, k=k, tol=1e-10, max_iter=24)
    assert lam.dtype == DT and lam.shape == (k,)
    np.testing.assert_allclose(lam.numpy(), ref, rtol=1e-8)
    assert info.converged and info.n_hvp == info.n_iter <= 24
    assert len(info.history) == info.n_iter


def test_top_eigenvalues_default_tol_is_close_and_cheap():
    # a spectrum with a gap: the top eigenvalue converges in a few iterations
    eigs = np.concatenate([[10.0, 6.0], np.linspace(-2, 3, 198)])
    A = _with_spectrum(eigs, seed=4)
    f, split = _quadratic(A)
    w = split(torch.zeros(200, dtype=DT))
    lam, info = top_eigenvalues(f, w, k=1)
    assert info.converged and info.n_hvp < 30
    assert lam.item() == pytest.approx(10.0, rel=1e-3)
    assert info.residual_norms[0] >= 0


def test_top_eigenvalues_finds_a_repeated_eigenvalue():
    # Lanczos from one vector sees one copy of a multiple eigenvalue; the restart finds both.
    eigs = [5.0, 5.0, 3.0, 1.0, 0.5, 0.25, -1.0, -2.0]
    A = _with_spectrum(eigs, seed=5)
    f, split = _quadratic(A)
    w = split(torch.zeros(8, dtype=DT))
    lam, info = top_eigenvalues(f, w, k=3, tol=1e-12)
    np.testing.assert_allclose(lam.numpy(), [5.0, 5.0, 3.0], rtol=1e-9)


def test_top_eigenvalues_by_magnitude():
    eigs = [4.0, 1.0, 0.5, -7.0, -0.1, 2.0]
    A = _with_spectrum(eigs, seed=6)
    f, split = _quadratic(A)
    w = split(torch.zeros(6, dtype=DT))
    lam, _ = top_eigenvalues(f, w, k=2, which="magnitude", tol=1e-12)
    np.testing.assert_allclose(lam.numpy(), [-7.0, 4.0], rtol=1e-9)


def test_top_eigenvalues_eigenvectors_are_eigenvectors(quad):
    A, f, w, _ = quad
    lam, info = top_eigenvalues(f, w, k=2, tol=1e-12, return_eigenvectors=True)
    for value, vec in zip(lam, info.eigenvectors):
        y = _flat(vec)
        assert y.norm().item() == pytest.approx(1.0, abs=1e-8)
        torch.testing.assert_close(A @ y, value * y, rtol=0, atol=1e-7)


def test_power_iteration_dominant_eigenvalue_and_lanczos_is_cheaper():
    eigs = np.concatenate([[10.0, 9.0], np.linspace(0, 8, 58)])
    A = _with_spectrum(eigs, seed=7)
    f, split = _quadratic(A)
    w = split(torch.zeros(60, dtype=DT))
    lam_p, info_p = power_iteration(f, w, tol=1e-9, max_iter=2000)
    assert info_p.converged
    assert lam_p.item() == pytest.approx(10.0, rel=1e-6)
    lam_l, info_l = top_eigenvalues(f, w, k=1, tol=1e-9, max_iter=60)
    assert lam_l.item() == pytest.approx(10.0, rel=1e-9)
    assert info_l.n_hvp < info_p.n_hvp / 3


def test_solvers_are_seeded_and_leave_the_global_rng_alone(quad):
    A, f, w, _ = quad
    state = torch.get_rng_state()
    a = top_eigenvalues(f, w, k=2, tol=1e-4, seed=3)
    b = top_eigenvalues(f, w, k=2, tol=1e-4, seed=3)
    p = power_iteration(f, w, tol=1e-3, seed=3)
    t1 = hessian_trace(f, w, 10, seed=3)
    t2 = hessian_trace(f, w, 10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and a[1].history == b[1].history
    assert t1 == t2
    assert p[1].n_hvp >= 2


def test_hutchinson_trace_within_standard_errors(quad):
    A, f, w, _ = quad
    est, se, n = hessian_trace(f, w, n_samples=400, seed=0)
    assert n == 400 and se > 0
    # the estimator's exact per-sample variance for Rademacher z is 2 Σ_{i≠j} A_ij²
    off = A - torch.diag(torch.diag(A))
    exact_se = (2 * (off**2).sum() / 400).sqrt().item()
    assert se == pytest.approx(exact_se, rel=0.25)
    assert abs(est - A.trace().item()) < 4 * se


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    d = torch.tensor([3.0, -1.0, 0.5, 7.0], dtype=DT)
    f = lambda p: 0.5 * (d * p["w"] ** 2).sum()  # noqa: E731
    est, se, n = hessian_trace(f, {"w": torch.ones(4, dtype=DT)}, 5)
    assert est == pytest.approx(9.5, abs=1e-12) and se == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments_are_user_errors(quad):
    A, f, w, v = quad
    with pytest.raises(UserError):
        top_eigenvalues(f, w, k=0)
    with pytest.raises(UserError):
        top_eigenvalues(f, w, which="smallest")
    with pytest.raises(UserError):
        hessian_trace(f, w, 0)
    with pytest.raises(UserError):
        hvp(f, w, v, method="finite-difference")
    with pytest.raises(UserError, match="keys"):
        hvp(f, w, {"a": v["a"]})


# ------------------------------------------------------------------------------------------
# a small BatchNorm MLP in train mode against a dense Hessian written with plain F ops


class _BNMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7, momentum=None)  # cumulative average: uses num_batches_tracked
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def _reference_loss(p, x, y, train: bool, stats=None):
    """The MLP's loss written out by hand (no functional_call, no module)."""
    h = x @ p["fc1.weight"].T + p["fc1.bias"]
    if train:
        mean = h.mean(0)
        var = h.var(0, unbiased=False)
    else:
        mean, var = stats
    h = (h - mean) / torch.sqrt(var + 1e-5) * p["bn.weight"] + p["bn.bias"]
    out = F.relu(h) @ p["fc2.weight"].T + p["fc2.bias"]
    return F.cross_entropy(out, y)


@pytest.fixture
def bn_mlp():
    torch.manual_seed(0)
    model = _BNMLP().double()
    with torch.no_grad():  # non-trivial BN affine and running statistics
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(16, 5, dtype=DT))
    x = torch.randn(16, 5, dtype=DT)
    y = torch.randint(0, 3, (16,))
    for p in model.parameters():  # stale .grad that must survive
        p.grad = torch.randn_like(p)
    return model, (x, y)


def _dense_hessian(model, batch, train=True):
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())

    def unflat(vec):
        return {n: t.view(s) for n, t, s in zip(names, vec.split(sizes), shapes)}

    def flat_loss(vec):
        return _reference_loss(unflat(vec), x, y, train, stats)

    H = torch.autograd.functional.hessian(flat_loss, w0)
    w = w0.clone().requires_grad_()
    g = torch.autograd.grad(flat_loss(w), w)[0]
    return H, g, unflat, flat_loss(w0)


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
    }


def _assert_unchanged(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["state"][k]), f"{k} changed"
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, snap["grad"][n]), f"{n}.grad changed"
    assert [m.training for m in model.modules()] == snap["modes"]


def _flat_model(d, model):
    return torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])


@pytest.mark.parametrize("train", [True, False])
def test_closure_is_the_model_loss_with_batch_or_running_statistics(bn_mlp, train):
    model, batch = bn_mlp
    model.train(train)
    snap = _snapshot(model)
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    ref = _reference_loss(
        params, *batch, train, (model.bn.running_mean.clone(), model.bn.running_var.clone())
    )
    assert f(params).item() == pytest.approx(ref.item(), rel=1e-12)
    loss, _ = loss_and_grad(f, params)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("method", METHODS)
def test_bn_mlp_hvp_and_quadratic_form_match_dense_hessian(bn_mlp, method):
    model, batch = bn_mlp
    H, g, unflat, _ = _dense_hessian(model, batch, train=True)
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    snap = _snapshot(model)
    hv = model_hvp(model, batch, F.cross_entropy, unflat(v), method=method)
    _assert_unchanged(model, snap)
    torch.testing.assert_close(_flat_model(hv, model), H @ v, rtol=1e-5, atol=1e-8)
    q = model_quadratic_form(model, batch, F.cross_entropy, method=method)
    _assert_unchanged(model, snap)
    assert q.item() == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-5)


def test_bn_mlp_eigenvalues_and_trace_match_dense_hessian(bn_mlp):
    model, batch = bn_mlp
    H, _, _, _ = _dense_hessian(model, batch, train=True)
    ref = np.linalg.eigvalsh(H.numpy())[::-1]
    snap = _snapshot(model)
    lam, info = model_top_eigenvalues(model, batch, F.cross_entropy, k=2, tol=1e-9)
    _assert_unchanged(model, snap)
    np.testing.assert_allclose(lam.numpy(), ref[:2], rtol=1e-5)
    est, se, _ = model_hessian_trace(model, batch, F.cross_entropy, 200)
    _assert_unchanged(model, snap)
    assert abs(est - H.trace().item()) < 4 * se


def test_bn_mlp_eval_mode_hessian_uses_running_statistics(bn_mlp):
    model, batch = bn_mlp
    model.eval()
    H, _, unflat, _ = _dense_hessian(model, batch, train=False)
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(2))
    snap = _snapshot(model)
    hv = model_hvp(model, batch, F.cross_entropy, unflat(v))
    _assert_unchanged(model, snap)
    torch.testing.assert_close(_flat_model(hv, model), H @ v, rtol=1e-5, atol=1e-8)


def test_wrappers_restore_rng_and_handle_frozen_params_and_missing_grad(bn_mlp):
    model, batch = bn_mlp
    model.fc1.bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = None
    state = torch.get_rng_state()
    before = copy.deepcopy(model.state_dict())
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    assert "fc1.bias" not in params
    v = {n: torch.ones_like(p) for n, p in params.items()}
    model_hvp(model, batch, F.cross_entropy, v)
    model_top_eigenvalues(model, batch, F.cross_entropy, k=1, max_iter=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k])
