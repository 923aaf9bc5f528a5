"""Dataset-level curvature (bnlab.dataset_curvature): in one process against a dense Hessian of
the example-weighted mean loss, and over 2 torch.distributed processes (gloo, CPU) against the
one-process values."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bnlab.curvature import (
    HessianOperator,
    hessian_trace,
    hvp,
    model_loss_closure,
    quadratic_form,
    top_eigenvalues,
)
from bnlab.dataset_curvature import (
    DatasetHessianOperator,
    dataset_hessian_trace,
    dataset_hvp,
    dataset_quadratic_form,
    dataset_top_eigenvalues,
    shard,
)
from bnlab.errors import UserError

DT = torch.float64
SIZES = (6, 9, 4, 7)  # unequal batch sizes: the weighting is by examples


def _model(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(5)] if bn else []
    return nn.Sequential(nn.Linear(3, 5), *mid, nn.Tanh(), nn.Linear(5, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)) for n in SIZES]


def _flat_closure(model, batches):
    """The example-weighted mean loss over the batches as a function of one flat vector."""
    fs = [model_loss_closure(model, b, F.cross_entropy)[0] for b in batches]
    _, params = model_loss_closure(model, batches[0], F.cross_entropy)
    keys = list(params)
    sizes = [params[k].numel() for k in keys]
    N = sum(len(b[1]) for b in batches)

    def g(vec):
        p = {k: t.view_as(params[k]) for k, t in zip(keys, torch.split(vec, sizes))}
        return sum(len(b[1]) / N * f(p) for f, b in zip(fs, batches))

    return g, torch.cat([params[k].reshape(-1) for k in keys]), params


@pytest.mark.parametrize("retain_graphs", [False, True])
def test_dataset_operator_equals_the_dense_hessian_of_the_mean_loss(retain_graphs):
    model = _model()
    batches = _batches()
    state = copy.deepcopy(model.state_dict())
    g, flat, params = _flat_closure(model, batches)
    H = torch.autograd.functional.hessian(g, flat)
    grad = torch.autograd.functional.jacobian(g, flat)
    op = DatasetHessianOperator(model, batches, F.cross_entropy, retain_graphs=retain_graphs)
    assert op.numel == flat.numel() and op.n_examples == sum(SIZES) and op.n_batches == 4
    v = torch.linspace(-1, 1, flat.numel(), dtype=DT)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)  # again (cached graphs)
    buf = torch.full_like(v, float("nan"))  # stale contents must not leak into the sum
    assert op.matvec(v, out=buf) is buf
    torch.testing.assert_close(buf, H @ v, rtol=1e-10, atol=1e-12)
    assert op.n_hvp == 3 and op.n_batch_hvp == 12
    torch.testing.assert_close(op.loss, g(flat).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([op.grad[k].reshape(-1) for k in op.keys]), grad)
    for k, t in model.state_dict().items():  # the model is untouched (BN running stats too)
        assert torch.equal(t, state[k]), k
    if not retain_graphs:
        return  # the solvers below use nothing but matvec, loss and grad, checked above
    # the solvers on the operator
    ref = np.linalg.eigvalsh(H.numpy())
    lam, info = top_eigenvalues(op, k=2, tol=1e-8, max_iter=flat.numel())
    assert info.converged
    np.testing.assert_allclose(lam.numpy(), ref[::-1][:2], rtol=1e-7)
    est, _, _ = hessian_trace(op, n_samples=3 * flat.numel(), estimator="hutch++")
    assert est == pytest.approx(float(H.trace()), rel=1e-9)
    q = quadratic_form(op)
    assert q.item() == pytest.approx(float(grad @ H @ grad / (grad @ grad)), rel=1e-9)
    # and bnlab.spectrum's density: a full-length Lanczos run sees the exact top eigenvalue
    from bnlab.spectrum import spectral_density

    sd = spectral_density(op, n_runs=1, n_steps=flat.numel(), top_k=2)
    np.testing.assert_allclose(sd.top_eigenvalues[:1], ref[::-1][:1], rtol=1e-8)


def test_without_bn_the_dataset_hessian_is_the_hessian_of_the_pooled_batch():
    # no batch-dependent layer: the example-weighted mean over batches = the loss of one big batch
    model = _model(bn=False)
    batches = _batches()
    pooled = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    f, params = model_loss_closure(model, pooled, F.cross_entropy)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    ref = hvp(f, params, v)
    out = dataset_hvp(model, batches, F.cross_entropy, v)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-10, atol=1e-12)
    # a plain average of the per-batch HVPs would be wrong with unequal sizes ...
    plain = {k: sum(hvp(*model_loss_closure(model, b, F.cross_entropy), v)[k] for b in batches) / 4 for k in v}
    assert not torch.allclose(plain["0.weight"], ref["0.weight"], rtol=1e-3)
    # ... and is what equal batch_weights give
    eq = dataset_hvp(model, batches, F.cross_entropy, v, batch_weights=[1.0] * 4)
    for k in ref:
        torch.testing.assert_close(eq[k], plain[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(UserError, match="batch_weights"):
        DatasetHessianOperator(model, batches, F.cross_entropy, batch_weights=[1.0, 2.0])


def test_model_level_wrappers_and_errors():
    model = _model()
    batches = _batches()
    op = DatasetHessianOperator(model, batches, F.cross_entropy)
    a, _ = dataset_top_eigenvalues(model, batches, F.cross_entropy, k=1, tol=1e-6, seed=2, retain_graphs=True)
    b, _ = top_eigenvalues(op, k=1, tol=1e-6, seed=2)
    torch.testing.assert_close(a, b)
    t1 = dataset_hessian_trace(model, batches, F.cross_entropy, 9, seed=1, estimator="hutch++")
    t2 = hessian_trace(op, n_samples=9, seed=1, estimator="hutch++")
    assert t1.estimate == pytest.approx(t2.estimate, rel=1e-12)
    torch.testing.assert_close(dataset_quadratic_form(model, batches, F.cross_entropy), quadratic_form(op))
    with pytest.raises(UserError, match="no examples"):
        DatasetHessianOperator(model, [], F.cross_entropy)
    with pytest.raises(UserError, match="init_process_group"):
        DatasetHessianOperator(model, batches, F.cross_entropy, distributed=True)
    assert shard(list(range(7)), 1, 3) == [1, 4]
    with pytest.raises(UserError):
        shard([1, 2], 2, 2)


def test_a_batch_level_operator_is_the_one_batch_dataset_operator():
    model = _model()
    batch = _batches()[1]
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    v = torch.randn(sum(p.numel() for p in params.values()), dtype=DT)
    torch.testing.assert_close(HessianOperator(f, params).matvec(v),
                               DatasetHessianOperator(model, [batch], F.cross_entropy).matvec(v))


# ------------------------------------------------------------------------------------------
# two processes, gloo


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        mine = shard(_batches(), rank, world)  # rank 0: sizes 6, 4; rank 1: 9, 7
        op = DatasetHessianOperator(model, mine, F.cross_entropy, retain_graphs=True)
        v = torch.linspace(-1, 1, op.numel, dtype=DT)
        res = {"hv": op.matvec(v), "n_examples": op.n_examples, "loss": op.loss,
               "grad": torch.cat([op.grad[k].reshape(-1) for k in op.keys])}
        lam, info = top_eigenvalues(op, k=2, tol=1e-8, seed=3)
        res.update(lam=lam, n_iter=info.n_iter)
        res["trace"] = hessian_trace(op, n_samples=12, seed=4).estimate
        res["trace_pp"] = hessian_trace(op, n_samples=12, seed=4, estimator="hutch++").estimate
        res["quad"] = quadratic_form(op)
        # the parameter check: a rank with different weights is an error on every rank
        other = _model()
        if rank == 1:
            with torch.no_grad():
                other[0].weight[0, 0] += 1e-3
        try:
            DatasetHessianOperator(other, mine, F.cross_entropy)
            res["mismatch_error"] = False
        except UserError:
            res["mismatch_error"] = True
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # every rank holds the same values, bit for bit (the solvers ran the same iterations)
    for key in ("hv", "lam", "loss", "grad", "quad"):
        assert torch.equal(r0[key], r1[key]), key
    assert r0["trace"] == r1["trace"] and r0["trace_pp"] == r1["trace_pp"] and r0["n_iter"] == r1["n_iter"]
    assert r0["mismatch_error"] and r1["mismatch_error"]
    # and equal the one-process values over all the batches
    model = _model()
    op = DatasetHessianOperator(model, _batches(), F.cross_entropy, retain_graphs=True)
    assert r0["n_examples"] == op.n_examples == sum(SIZES)
    v = torch.linspace(-1, 1, op.numel, dtype=DT)
    torch.testing.assert_close(r0["hv"], op.matvec(v), rtol=1e-12, atol=1e-14)  # round-off
    torch.testing.assert_close(r0["loss"], op.loss, rtol=1e-13, atol=0)
    lam, _ = top_eigenvalues(op, k=2, tol=1e-8, seed=3)
    np.testing.assert_allclose(r0["lam"].numpy(), lam.numpy(), rtol=1e-8)  # solver tolerance
    assert r0["trace"] == pytest.approx(hessian_trace(op, n_samples=12, seed=4).estimate, rel=1e-10)
    assert r0["trace_pp"] == pytest.approx(
        hessian_trace(op, n_samples=12, seed=4, estimator="hutch++").estimate, rel=1e-8)
    assert r0["quad"].item() == pytest.approx(quadratic_form(op).item(), rel=1e-10)
