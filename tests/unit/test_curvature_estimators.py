"""The error-bounded Lanczos stop and the trace estimators (Hutchinson, Hutch++) of
bnlab.curvature, against numpy.linalg.eigvalsh and exact traces of matrices with known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.curvature import (
    HessianOperator,
    hessian_trace,
    hvp,
    model_hessian_trace,
    model_loss_closure,
    power_iteration,
    quadratic_form,
    top_eigenvalues,
)
from bnlab.errors import UserError

DT = torch.float64


def _with_spectrum(eigs, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=DT))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=DT)) @ q.T


class MatOp:
    """A dense symmetric matrix with the CurvatureOperator interface (cheap, exact)."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.numel = A.shape[0]
        self.keys = ["w"]
        self.params = {"w": torch.zeros(self.numel, dtype=A.dtype)}
        self.n_hvp = 0

    def matvec(self, vec):
        self.n_hvp += 1
        return self.A @ vec

    def __call__(self, v):
        return {"w": self.matvec(v["w"])}

    def flat_params(self):
        return self.params["w"]


def _quad(A):
    return (lambda p: 0.5 * p["w"] @ A @ p["w"]), {"w": torch.zeros(A.shape[0], dtype=A.dtype)}


SPECTRA = {
    # a gap: fast convergence
    "gap": np.concatenate([[10.0, 6.0, 5.5], np.linspace(-2, 3, 197)]),
    # a cluster at the top, tighter than the tolerance, above a close bulk
    "clustered": np.concatenate([10.0 * (1 - np.array([0.0, 2e-5, 4e-5])), np.linspace(0, 9.5, 197)]),
    # a slowly decaying spectrum with no gap to speak of
    "decay": 1.0 / np.arange(1, 201) ** 0.5,
    # indefinite, the largest magnitude is negative
    "indefinite": np.concatenate([[-8.0, 7.0, -5.0], np.linspace(-3, 2.5, 197)]),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
@pytest.mark.parametrize("k", [1, 3])
def test_residual_stop_bounds_the_error(name, tol, k):
    eigs = SPECTRA[name]
    A = _with_spectrum(eigs, seed=len(name))
    exact = np.linalg.eigvalsh(A.numpy())  # ascending
    which = "magnitude" if name == "indefinite" else "largest"
    wanted = exact[::-1][:k] if which == "largest" else exact[np.argsort(-np.abs(exact))][:k]
    lam, info = top_eigenvalues(MatOp(A), k=k, tol=tol, max_iter=200, which=which, seed=1)
    theta = lam.numpy()
    assert info.converged and info.tol == tol
    assert info.n_hvp == info.n_iter and len(info.history) == info.n_iter
    r = np.asarray(info.residual_norms)
    # the stopping rule held
    assert np.all(r <= tol * np.abs(theta) + 1e-15)
    # the guaranteed bound: some eigenvalue lies within the residual of each Ritz value
    dist = np.abs(exact[None, :] - theta[:, None]).min(axis=1)
    assert np.all(dist <= r * (1 + 1e-6) + 1e-12)
    # and the i-th Ritz value is within tol of the i-th wanted eigenvalue -- except inside a
    # cluster tighter than the residual resolves from one start vector: a member can be missed
    # (no Krylov method can tell), and the k-th Ritz value then converges to the next eigenvalue
    # (the guarantee above still holds: it is within tol of *an* eigenvalue)
    match = np.abs(theta - wanted) <= tol * np.abs(theta) + 1e-12
    if name == "clustered" and k == 3 and tol == 1e-3:
        assert match[0] and not match.all()  # the documented limitation, seen here
    else:
        assert match.all()
    assert np.all(np.asarray(info.error_estimates) <= r + 1e-300)
    if name == "gap":  # well separated: the Kato-Temple estimate holds and is much tighter
        err = np.abs(theta - wanted)
        assert np.all(err <= np.asarray(info.error_estimates) * (1 + 1e-6) + 1e-13)


def test_residual_stop_is_stricter_than_the_old_progress_rule():
    # the top eigenvalue at the edge of a dense continuum: consecutive Ritz values change little
    # long before they are accurate. Some iterate meets the old rule (relative change < tol)
    # while its error is still > tol (20x here); the residual rule does not stop there.
    eigs = np.concatenate([[1.0], 1 - np.geomspace(1e-3, 1, 399)])
    A = _with_spectrum(eigs, seed=9)
    top = 1.0
    tol = 1e-4
    lam, info = top_eigenvalues(MatOp(A), k=1, tol=tol, max_iter=400, seed=1)
    assert info.converged
    h = np.array([row[0] for row in info.history])
    changes = np.abs(np.diff(h)) / np.abs(h[1:])
    errors = np.abs(h[1:] - top) / top
    premature = np.flatnonzero((changes < tol) & (errors > tol))
    assert premature.size > 0  # the old rule would have stopped short here
    assert abs(lam.item() - top) <= tol * abs(lam.item())


def test_a_repeated_eigenvalue_is_still_found_after_the_restart():
    eigs = np.concatenate([[5.0, 5.0, 3.0], np.linspace(-1, 1, 37)])
    A = _with_spectrum(eigs, seed=5)
    lam, info = top_eigenvalues(MatOp(A), k=3, tol=1e-8, max_iter=40)
    np.testing.assert_allclose(lam.numpy(), [5.0, 5.0, 3.0], rtol=1e-7)


def test_the_operator_form_equals_the_closure_form():
    A = _with_spectrum(np.linspace(-1, 4, 30), seed=3)
    f, w = _quad(A)
    a, ia = top_eigenvalues(f, w, k=2, tol=1e-8)
    op = HessianOperator(f, w)
    b, ib = top_eigenvalues(op, k=2, tol=1e-8)
    assert torch.equal(a, b) and ia.n_hvp == ib.n_hvp
    c, ic = top_eigenvalues(op, k=2, tol=1e-8)  # n_hvp counts this call only
    assert torch.equal(a, c) and ic.n_hvp == ia.n_hvp and op.n_hvp == 2 * ia.n_hvp
    v = {"w": torch.arange(30, dtype=DT)}
    torch.testing.assert_close(hvp(op, v=v)["w"], A @ v["w"])
    torch.testing.assert_close(quadratic_form(op, v=v), v["w"] @ A @ v["w"] / (v["w"] @ v["w"]))
    p, pinfo = power_iteration(MatOp(_with_spectrum([4.0, 1.0, -0.5, 0.2], seed=1)), tol=1e-12, max_iter=500)
    assert p.item() == pytest.approx(4.0, rel=1e-9) and pinfo.converged
    with pytest.raises(UserError, match="keyword"):
        top_eigenvalues(op, w)
    with pytest.raises(UserError, match="operator"):
        hessian_trace(op, n_samples=3, method="forward")
    with pytest.raises(UserError, match="params"):
        top_eigenvalues(f)


# ------------------------------------------------------------------------------------------
# trace


def test_unknown_estimator_lists_the_accepted_ones():
    A = _with_spectrum([1.0, 2.0, 3.0], seed=0)
    with pytest.raises(UserError, match=r"accepted: hutchinson, hutch\+\+"):
        hessian_trace(MatOp(A), n_samples=3, estimator="hutch+++")


@pytest.mark.parametrize("seed", range(5))
def test_hutchpp_is_exact_when_the_rank_fits_the_sketch(seed):
    # rank 6 <= n_s = 18 // 3: the sketch spans range(H), the residual part is 0
    eigs = np.concatenate([[9.0, -4.0, 3.0, 2.5, 1.0, 0.3], np.zeros(114)])
    A = _with_spectrum(eigs, seed=11)
    est, se, n = hessian_trace(MatOp(A), n_samples=18, seed=seed, estimator="hutch++")
    assert n == 18
    assert est == pytest.approx(float(eigs.sum()), abs=1e-10)
    assert se == pytest.approx(0.0, abs=1e-10)


def test_hutchpp_is_exact_in_a_tiny_dimension_too():
    # a Gaussian sketch spans the range of H almost surely (a Rademacher 3x3 sketch is often
    # singular, which would leave a random residual part)
    A = _with_spectrum([1.0, 5.0, -2.0], seed=0)
    for seed in range(20):
        est, _, _ = hessian_trace(MatOp(A), n_samples=9, seed=seed, estimator="hutch++")
        assert est == pytest.approx(4.0, abs=1e-12)


def test_hutchpp_counts_its_hvps_exactly():
    A = _with_spectrum(np.linspace(1, 2, 50), seed=2)
    for n in (1, 2, 3, 10, 31):
        op = MatOp(A)
        _, _, used = hessian_trace(op, n_samples=n, estimator="hutch++")
        assert used == n and op.n_hvp == n


# matrices with known traces: an indefinite one and one with a decaying spectrum
TRACE_SPECTRA = {
    "indefinite": np.linspace(-3, 5, 80),
    "decaying": 10.0 / np.arange(1, 81) ** 1.5,
}


@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("name", sorted(TRACE_SPECTRA))
def test_estimators_are_unbiased(estimator, name):
    eigs = TRACE_SPECTRA[name]
    A = _with_spectrum(eigs, seed=13)
    n_seeds = 400
    est = np.array([hessian_trace(MatOp(A), n_samples=12, seed=s, estimator=estimator).estimate
                    for s in range(n_seeds)])
    half_width = 4.0 * est.std(ddof=1) / math.sqrt(n_seeds)  # a 4-sigma interval of the mean
    assert abs(est.mean() - eigs.sum()) <= half_width
    assert est.std() > 0  # a real estimate, not an exact trace


def test_hutchpp_has_a_smaller_spread_on_a_decaying_spectrum():
    A = _with_spectrum(TRACE_SPECTRA["decaying"], seed=13)
    spread = {}
    for estimator in ("hutchinson", "hutch++"):
        est = [hessian_trace(MatOp(A), n_samples=30, seed=s, estimator=estimator).estimate for s in range(200)]
        spread[estimator] = float(np.std(est))
    assert spread["hutch++"] < 0.3 * spread["hutchinson"], spread


def test_hutchpp_is_exact_on_a_model_when_the_budget_covers_the_space():
    # a BN MLP in float64: n_samples = 3 · numel sketches the whole space; the trace equals the
    # trace of the dense Hessian (torch.autograd.functional.hessian) of the same batch loss.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(10, 3, dtype=DT), torch.randint(0, 2, (10,)))
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    keys = list(params)
    sizes = [params[k].numel() for k in keys]
    flat = torch.cat([params[k].reshape(-1) for k in keys])

    def g(vec):
        parts = torch.split(vec, sizes)
        return f({k: t.view_as(params[k]) for k, t in zip(keys, parts)})

    H = torch.autograd.functional.hessian(g, flat)
    n = flat.numel()
    est, _, _ = model_hessian_trace(model, batch, F.cross_entropy, 3 * n, estimator="hutch++", seed=4)
    assert est == pytest.approx(float(H.trace()), rel=1e-9, abs=1e-10)
    lam, info = top_eigenvalues(f, params, k=2, tol=1e-7, max_iter=n)
    ref = np.linalg.eigvalsh(H.numpy())[::-1][:2]
    assert np.all(np.abs(lam.numpy() - ref) <= 1e-7 * np.abs(lam.numpy()) + 1e-12)


# --------------------------------------------------------------------------------------------
# matvec(vec, out=buf): the solvers' products go into one buffer, with the same results


def _small_bn_net():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g))
    return model, batch


class NoOut:
    """The same operator without ``out=`` in its matvec (an operator written before it existed)."""

    def __init__(self, op):
        self.op, self.numel, self.keys, self.params = op, op.numel, op.keys, op.params

    @property
    def n_hvp(self):
        return self.op.n_hvp

    @property
    def grad(self):
        return self.op.grad

    def matvec(self, vec):
        return self.op.matvec(vec)

    def __call__(self, v):
        return self.op(v)

    def flat_params(self):
        return self.op.flat_params()


def test_matvec_out_writes_the_product_into_the_buffer():
    model, batch = _small_bn_net()
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    op = HessianOperator(f, params, method="reverse")
    keys, sizes = list(params), [p.numel() for p in params.values()]

    def flat_f(vec):
        return f({k: t.view_as(params[k]) for k, t in zip(keys, torch.split(vec, sizes))})

    flat = torch.cat([params[k].reshape(-1) for k in keys])
    H = torch.autograd.functional.hessian(flat_f, flat)  # the dense Hessian: an independent reference
    v = torch.linspace(-1, 1, op.numel, dtype=DT)
    buf = torch.full_like(v, float("nan"))
    assert op.matvec(v, out=buf) is buf
    torch.testing.assert_close(buf, H @ v, rtol=1e-10, atol=1e-12)
    assert torch.equal(buf, op.matvec(v))  # the same product as without a buffer


@pytest.mark.parametrize("bad, what", [
    (lambda v: torch.empty(v.numel() + 1, dtype=DT), "contiguous vector of"),
    (lambda v: torch.empty(v.numel(), dtype=torch.float32), "dtype and device"),
    (lambda v: torch.empty(2 * v.numel(), dtype=DT)[::2], "contiguous vector of"),
    (lambda v: v, "must not overlap vec"),
])
def test_matvec_out_refuses_a_bad_buffer(bad, what):
    model, batch = _small_bn_net()
    op = HessianOperator(*model_loss_closure(model, batch, F.cross_entropy))
    v = torch.ones(op.numel, dtype=DT)
    with pytest.raises(UserError, match=what):
        op.matvec(v, out=bad(v))


def test_the_solvers_give_identical_results_with_and_without_out():
    """The buffer is reused for every product: a solver that kept a reference to it would drift.
    Bit-identical results against an operator without ``out=`` show that none does."""
    from bnlab.spectrum import spectral_density

    model, batch = _small_bn_net()
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    op = HessianOperator(f, params, method="reverse")
    lam_a, info_a = top_eigenvalues(op, k=3, tol=1e-10, max_iter=op.numel, return_eigenvectors=True)
    lam_b, info_b = top_eigenvalues(NoOut(op), k=3, tol=1e-10, max_iter=op.numel, return_eigenvectors=True)
    assert torch.equal(lam_a, lam_b) and info_a.n_hvp == info_b.n_hvp
    for va, vb in zip(info_a.eigenvectors, info_b.eigenvectors):
        assert all(torch.equal(va[k], vb[k]) for k in va)
    p_a, _ = power_iteration(op, tol=1e-9, max_iter=200)
    p_b, _ = power_iteration(NoOut(op), tol=1e-9, max_iter=200)
    assert torch.equal(p_a, p_b)
    for est in ("hutchinson", "hutch++"):
        assert hessian_trace(op, n_samples=12, estimator=est) == hessian_trace(NoOut(op), n_samples=12, estimator=est)
    sa = spectral_density(op, n_runs=2, n_steps=8, top_k=3)
    sb = spectral_density(NoOut(op), n_runs=2, n_steps=8, top_k=3)
    np.testing.assert_array_equal(sa.nodes, sb.nodes)
    np.testing.assert_array_equal(sa.density, sb.density)
    assert sa.gradient_share == sb.gradient_share and np.isfinite(sa.gradient_share)
    # and the values are right: the dense Hessian's top eigenvalues
    keys, sizes = list(params), [p.numel() for p in params.values()]
    H = torch.autograd.functional.hessian(
        lambda vec: f({k: t.view_as(params[k]) for k, t in zip(keys, torch.split(vec, sizes))}),
        torch.cat([params[k].reshape(-1) for k in keys]))
    ref = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:3]
    np.testing.assert_allclose(lam_a.numpy(), ref, rtol=1e-8)
