"""Stochastic Lanczos quadrature (bnlab.spectrum) against matrices with a known spectrum.

References are independent of bnlab: ``numpy.linalg.eigh`` of the matrix, the Gaussian-smoothed
exact density written out here, the exact projection of the gradient on the top eigenvectors.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab import models
from bnlab.curvature import HessianOperator, model_loss_closure
from bnlab.dataset_curvature import DatasetHessianOperator
from bnlab.errors import UserError
from bnlab.probes.spectrum import SpectrumProbe, population_statistics
from bnlab.spectrum import spectral_density

N = 400
OUTLIERS = [(3.0, 3), (6.0, 1), (9.0, 2), (14.0, 1)]  # (eigenvalue, multiplicity)


def _matrix(spectrum, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(spectrum), len(spectrum))))
    return (q * np.asarray(spectrum)) @ q.T


def _spectrum():
    out = [v for v, r in OUTLIERS for _ in range(r)]
    return np.r_[np.linspace(0.0, 1.0, N - len(out)), out]


class _Op:
    """A bare operator: only the protocol spectral_density asks for."""

    def __init__(self, a):
        self.a = torch.as_tensor(a)
        self.numel = self.a.shape[0]

    def matvec(self, v):
        return self.a @ v

    def flat_params(self):
        return torch.zeros(self.numel, dtype=self.a.dtype)


@pytest.fixture(scope="module")
def bulk_and_outliers():
    a = _matrix(_spectrum())
    return a, spectral_density(_Op(a), n_runs=120, n_steps=20, seed=1, top_k=4)


@pytest.mark.parametrize("value, mult", OUTLIERS)
def test_mass_at_each_outlier_is_its_multiplicity_over_n(bulk_and_outliers, value, mult):
    # The mass at an isolated eigenvalue of multiplicity r is a mean over k runs of ‖P v‖² ≈ χ²_r/n (Rademacher v in a
    # random basis): mean r/n, relative sd √(2/(r k)) = 0.129/√r for k = 120. Tolerance: 4 sd.
    _, sd = bulk_and_outliers
    k = sd.nodes.shape[0]
    count = N * sd.mass_between(value - 0.5, value + 0.5)
    assert abs(count / mult - 1) <= 4 * math.sqrt(2 / (mult * k)), (value, count)


def test_outlier_summary_matches_the_known_spectrum(bulk_and_outliers):
    _, sd = bulk_and_outliers
    k = sd.nodes.shape[0]
    assert sd.top_eigenvalues[0] == pytest.approx(14.0, rel=1e-8)
    assert sd.bulk_edge == pytest.approx(1.0, abs=0.01)  # the bulk is [0, 1]
    assert sd.top_to_edge == pytest.approx(14.0, rel=0.01)
    assert abs(sd.n_outliers - 7) <= 4 * 7 * math.sqrt(2 / (7 * k))  # 7 eigenvalues above the bulk
    assert sd.ratio_spread < 0.01
    assert sd.n_hvp == 120 * 20  # no gradient: no extra run


def test_smoothed_density_matches_the_smoothed_exact_density_in_l1():
    a = _matrix(_spectrum())
    ev = np.linalg.eigvalsh(a)
    grid = np.linspace(-2, 16, 1801)
    sig = 0.25

    def smoothed(eigs):
        return (np.exp(-0.5 * ((grid[:, None] - eigs[None]) / sig) ** 2) / (sig * math.sqrt(2 * math.pi))).mean(1)

    exact = smoothed(ev)
    sd = spectral_density(_Op(a), n_runs=80, n_steps=20, sigma=sig, grid=grid, seed=0)
    l1 = np.trapezoid(np.abs(sd.density - exact), grid)
    # SLQ is unbiased; the L1 error is sampling noise, ≈ 0.075/√k for this matrix (over seeds: 0.012-0.021 at k = 20,
    # 0.003-0.004 at k = 320), so ≈ 0.008 at k = 80: tolerance 0.03. Shifting the bulk by 0.1 costs 0.19.
    assert l1 < 0.03
    assert np.trapezoid(np.abs(smoothed(ev + 0.1) - exact), grid) > 0.15
    assert np.trapezoid(sd.density, grid) == pytest.approx(1.0, abs=1e-12)


def test_gradient_share_in_the_top_eigenspace_matches_the_exact_projection():
    n = 200
    spec = np.r_[np.linspace(0.0, 1.0, n - 4), [4.0, 6.0, 9.0, 14.0]]
    a = torch.tensor(_matrix(spec, seed=2))
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    f = lambda p: 0.5 * p["w"] @ a @ p["w"] - b @ p["w"]
    g = (a @ w - b).numpy()
    lam, u = np.linalg.eigh(a.numpy())
    for k in (1, 3, 4):
        exact = float(np.sum((u[:, -k:].T @ g) ** 2) / (g @ g))
        sd = spectral_density(f, {"w": w}, n_runs=4, n_steps=30, top_k=k, seed=0)
        assert sd.gradient_share == pytest.approx(exact, abs=1e-6), k
        np.testing.assert_allclose(sd.top_eigenvalues, lam[::-1][:k], rtol=1e-8)
    assert sd.gradient_share_outliers == pytest.approx(float(np.sum((u[:, -4:].T @ g) ** 2) / (g @ g)), abs=1e-6)
    assert sd.grad_norm == pytest.approx(float(np.linalg.norm(g)), rel=1e-10)
    assert sd.n_hvp == 4 * 30 + 30
    # an explicit gradient (dict) replaces the operator's
    e = torch.zeros(n, dtype=torch.float64)
    e += torch.tensor(u[:, -1])
    sd = spectral_density(f, {"w": w}, n_runs=2, n_steps=30, top_k=1, gradient={"w": e})
    assert sd.gradient_share == pytest.approx(1.0, abs=1e-8)


def test_gradient_share_needs_more_ritz_values_than_k():
    a = torch.tensor(_matrix(np.r_[np.linspace(0, 1, 20), [5.0, 7.0]], seed=6))
    g = torch.ones(22, dtype=torch.float64)
    few = spectral_density(_Op(a), n_runs=2, n_steps=3, top_k=3, gradient=g)  # 3 Ritz values cannot isolate 3 of 22
    assert math.isnan(few.gradient_share)
    whole = spectral_density(_Op(a), n_runs=2, n_steps=22, top_k=22, gradient=g)  # the top-22 space is everything
    assert whole.gradient_share == 1.0


def test_reproducible_by_seed_and_the_global_rng_is_untouched():
    a = _matrix(_spectrum()[::4], seed=3)
    state = torch.get_rng_state()
    one = spectral_density(_Op(a), n_runs=3, n_steps=10, seed=7)
    two = spectral_density(_Op(a), n_runs=3, n_steps=10, seed=7)
    other = spectral_density(_Op(a), n_runs=3, n_steps=10, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(one.nodes, two.nodes)
    np.testing.assert_array_equal(one.density, two.density)
    assert not np.array_equal(one.nodes, other.nodes)


def test_default_sigma_grid_and_log_floor():
    a = _matrix(_spectrum(), seed=4)
    sd = spectral_density(_Op(a), n_runs=2, n_steps=15)
    lo, hi = np.nanmin(sd.nodes), np.nanmax(sd.nodes)
    assert sd.sigma == pytest.approx(math.sqrt(1e-5 * (hi - lo)))  # Ghorbani et al. / PyHessian
    assert np.diff(sd.grid).max() <= sd.sigma / 4 + 1e-15
    assert sd.grid[0] < lo - 5 * sd.sigma and sd.grid[-1] > hi + 5 * sd.sigma
    assert sd.grid_mass == pytest.approx(1.0, abs=1e-6) and np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0)
    logd = sd.log10_density()
    assert np.isfinite(logd).all() and logd.min() == pytest.approx(math.log10(1e-7 * sd.density.max()))


def test_a_run_ends_at_an_invariant_subspace_with_an_exact_quadrature():
    a = np.diag([1.0, 2.0, 2.0, 5.0])  # Rademacher starts see at most 3 distinct eigenvalues
    sd = spectral_density(_Op(a), n_runs=2, n_steps=10, top_k=2)
    assert sd.nodes.shape == (2, 4)
    for th, tau in zip(sd.nodes, sd.weights):
        ok = np.isfinite(th)
        np.testing.assert_allclose(th[ok], [1.0, 2.0, 5.0], atol=1e-10)
        np.testing.assert_allclose(tau[ok], [0.25, 0.5, 0.25], atol=1e-10)  # (vᵀu)² of a normalized ±1 vector


def test_operator_and_closure_give_the_same_density_on_a_network():
    net = models.make("mlp", norm="bn", in_shape=(1, 4, 4), num_classes=3, width=6, depth=1, seed=0)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 1, 4, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    f, params = model_loss_closure(net, batch, F.cross_entropy)
    kw = dict(n_runs=2, n_steps=12, seed=3, top_k=2)
    a = spectral_density(f, params, **kw)
    b = spectral_density(HessianOperator(f, params), **kw)
    c = spectral_density(DatasetHessianOperator(net, [batch], F.cross_entropy), **kw)
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.nodes, c.nodes, rtol=1e-4, atol=1e-5)
    assert a.gradient_share == pytest.approx(c.gradient_share, abs=1e-4)


def test_probe_records_the_outline_of_the_density_and_eval_mode_uses_population_statistics():
    net = models.make("mlp", norm="bn", in_shape=(1, 4, 4), num_classes=3, width=6, depth=1, seed=0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 4, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pop = population_statistics(net, batches)
    bn = [m for m in pop.modules() if isinstance(m, torch.nn.BatchNorm1d)][0]
    feats = [pop.features[:2](x).detach() for x, _ in batches]  # flatten, linear: the BN's input
    np.testing.assert_allclose(bn.running_mean, torch.stack([h.mean(0) for h in feats]).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, torch.stack([h.var(0) for h in feats]).mean(0), rtol=1e-5, atol=1e-6)
    assert not pop.training and net.training
    probe = SpectrumProbe(every=1, batches=batches, n_runs=2, n_steps=10, top_k=2, keep=True)
    rec = probe.outline(probe.measure(net, batches))
    op = DatasetHessianOperator(net, batches, F.cross_entropy)
    ref = spectral_density(op, n_runs=2, n_steps=10, top_k=2)
    assert rec["top"] == pytest.approx(float(ref.top_eigenvalues[0]), rel=1e-5)
    assert rec["grad_share"] == pytest.approx(ref.gradient_share, abs=1e-5)
    ev = SpectrumProbe(every=1, batches=batches, eval_mode=True, n_runs=2, n_steps=10, top_k=2)
    ref_eval = spectral_density(DatasetHessianOperator(pop, batches, F.cross_entropy), n_runs=2, n_steps=10, top_k=2)
    assert ev.outline(ev.measure(net, batches))["top"] == pytest.approx(float(ref_eval.top_eigenvalues[0]), rel=1e-5)
    assert abs(ref_eval.top_eigenvalues[0] - ref.top_eigenvalues[0]) > 1e-3  # eval mode is another Hessian
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the model is untouched


@pytest.mark.parametrize("kwargs, msg", [
    (dict(n_runs=0), "n_runs must be an integer >= 1"),
    (dict(n_steps=2.5), "n_steps must be an integer >= 1"),
    (dict(sigma=-1.0), "sigma must be a finite number > 0"),
    (dict(grid=[1.0, 0.5]), "grid must be an increasing array"),
    (dict(bulk_count=0.0), "bulk_count must be"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_bad_settings_are_user_errors(kwargs, msg):
    with pytest.raises(UserError, match=msg):
        spectral_density(_Op(np.eye(3)), **kwargs)


def test_neither_operator_nor_closure_with_params_is_a_user_error():
    with pytest.raises(UserError, match="loss closure f\\(params\\) with params, or an operator"):
        spectral_density(lambda p: p["w"].sum())
    with pytest.raises(UserError, match="not both"):
        spectral_density(_Op(np.eye(3)), {"w": torch.zeros(3)})


def test_lanczos_quadrature_accepts_tensors_that_require_grad():
    """The in-place Krylov updates run on detached copies: a matvec (or start vector) that carries
    autograd history is fine, and gives the same nodes as without it."""
    from bnlab.spectrum import lanczos_quadrature

    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = B + B.T
    v0 = torch.ones(6, dtype=torch.float64)
    plain = lanczos_quadrature(lambda v: A @ v, v0, 4)
    Ag = A.clone().requires_grad_()
    tracked = lanczos_quadrature(lambda v: Ag @ v, v0.clone().requires_grad_(), 4)
    np.testing.assert_array_equal(plain[0], tracked[0])
    np.testing.assert_array_equal(plain[1], tracked[1])
