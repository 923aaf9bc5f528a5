"""bnlab.probes.scale.ScaleInvariantStats: values, the norm identity, and that it never changes training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnlab.errors import UserError
from bnlab.monitor import Monitor
from bnlab.probes.base import StepContext
from bnlab.probes.scale import ScaleInvariantStats
from bnlab.scale import ScaleInvariantGroup, find_scale_invariant

QUANTITIES_BACKWARD = ("weight_norm", "grad_norm", "effective_lr", "cos_wg", "normalized_grad_norm")
QUANTITIES_STEP = ("angular_update", "norm_identity_rel_residual")


class Net(nn.Module):
    """conv1 -> bn1 -> ReLU -> conv2 -> bn2 -> ReLU -> pool -> dropout -> fc.

    conv1.weight and conv2.weight are scale-invariant (per channel); nothing else is, given
    β ≠ 0 (with β = 0, relu(c γ x̂) = c relu(γ x̂) would make bn1's γ invariant too).
    """

    def __init__(self, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4, eps=eps)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(6, 3)
        for bn in (self.bn1, self.bn2):
            nn.init.normal_(bn.bias, std=0.3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


def batches(n_steps: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(n_steps)
    ]


def make(dtype=torch.float32, eps: float = 1e-5, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    return Net(eps=eps, dropout=dropout).to(dtype)


def train(model, optimizer, data, probes=()):
    """A plain loop driven through the Monitor; returns the records."""
    records: list = []
    monitor = Monitor(model, optimizer, probes=probes, log=records)
    for x, y in data:
        with monitor.step((x, y)) as s:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            s.loss = loss
            optimizer.step()
    return records


def scale_keys(record):
    return {k for k in record if k.startswith("scale/")}


# ----------------------------------------------------------------------------- the norm identity


def _identity_run(momentum: float = 0.0, weight_decay: float = 0.0, n_steps: int = 5):
    # BN's eps breaks ⟨g, w⟩ = 0 at the ~eps/Var level, which shows in the residual; the identity
    # is for eps -> 0, so the float64 net uses eps = 1e-12 (far below Var, above round-off of 0/0).
    model = make(torch.float64, eps=1e-12)
    data = batches(n_steps, torch.float64)
    groups = find_scale_invariant(model, data[0], F.cross_entropy)
    assert [g.param_name for g in groups] == ["conv1.weight", "conv2.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=momentum, weight_decay=weight_decay)
    records = train(model, opt, data, [ScaleInvariantStats(groups)])
    names = [g.name for g in groups] + ["all"]
    return records, names


def test_norm_identity_holds_for_plain_sgd():
    """‖w_{t+1}‖² = ‖w_t‖² + η²‖g_t‖² for plain SGD on a scale-invariant group (relative residual ≤ 1e-6)."""
    records, names = _identity_run()
    for r in records:
        for n in names:
            assert abs(r[f"scale/{n}/norm_identity_rel_residual"]) <= 1e-6, (r["step"], n)
            assert abs(r[f"scale/{n}/cos_wg"]) <= 1e-6
            assert r[f"scale/{n}/angular_update"] > 1e-4  # the weights did move
    # the norms grow (Pythagoras), step after step
    for n in names:
        norms = [r[f"scale/{n}/weight_norm"] for r in records]
        assert all(b > a for a, b in zip(norms, norms[1:]))


def test_norm_identity_fails_with_momentum_and_weight_decay():
    plain, names = _identity_run()
    worst_plain = max(abs(r[f"scale/{n}/norm_identity_rel_residual"]) for r in plain for n in names)
    momentum, _ = _identity_run(momentum=0.9)
    # step 0 is a plain SGD step (the buffer starts as g_0), later steps are not
    assert abs(momentum[0]["scale/all/norm_identity_rel_residual"]) <= 1e-6
    for r in momentum[1:]:
        for n in names:
            res = abs(r[f"scale/{n}/norm_identity_rel_residual"])
            assert res > 1e-4 and res > 1e6 * worst_plain, (r["step"], n, res)
    decay, _ = _identity_run(weight_decay=0.05)
    for r in decay:
        assert abs(r["scale/all/norm_identity_rel_residual"]) > 1e-3


# ----------------------------------------------------------------------------- values


def test_values_match_independent_computation():
    model = make()
    data = batches(3)
    groups = find_scale_invariant(model, data[0], F.cross_entropy)
    # different LRs per invariant group: "all/effective_lr" is then undefined and left out
    lrs = {"conv1.weight": 0.2, "conv2.weight": 0.7}
    opt = torch.optim.SGD(
        [{"params": [model.conv1.weight], "lr": lrs["conv1.weight"]}, {"params": [model.conv2.weight], "lr": lrs["conv2.weight"]},
         {"params": [p for n, p in model.named_parameters() if n not in lrs], "lr": 0.05}],
        lr=0.1,
    )
    probe = ScaleInvariantStats(groups)
    for step, (x, y) in enumerate(data):
        ctx = StepContext(step=step, model=model, optimizer=opt, batch=(x, y))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {g.param_name: (g.param.detach().double().clone(), g.param.grad.double().clone()) for g in groups}
        out = probe.after_backward(ctx)
        opt.step()
        out.update(probe.after_step(ctx))
        res_sum = w2_sum = 0.0
        for g in groups:
            w, grad = before[g.param_name]
            w1 = g.param.detach().double()
            lr = lrs[g.param_name]
            key = lambda q: out[f"{g.name}/{q}"]  # noqa: E731
            assert key("weight_norm") == pytest.approx(float(w.norm()), rel=1e-9)
            assert key("grad_norm") == pytest.approx(float(grad.norm()), rel=1e-9)
            assert key("effective_lr") == pytest.approx(lr / float(w.norm()) ** 2, rel=1e-9)
            cos = float(torch.dot(w.flatten(), grad.flatten()) / (w.norm() * grad.norm()))
            assert key("cos_wg") == pytest.approx(cos, rel=1e-6, abs=1e-12)
            assert key("normalized_grad_norm") == pytest.approx(float(w.norm() * grad.norm()), rel=1e-9)
            acos = math.acos(float(torch.dot(w.flatten(), w1.flatten()) / (w.norm() * w1.norm())))
            assert key("angular_update") == pytest.approx(acos, rel=1e-6)
            residual = float(w1.norm() ** 2 - w.norm() ** 2 - lr**2 * grad.norm() ** 2)
            assert key("norm_identity_rel_residual") == pytest.approx(residual / float(w.norm() ** 2), rel=1e-6, abs=1e-12)
            res_sum, w2_sum = res_sum + residual, w2_sum + float(w.norm() ** 2)
        w_all = torch.cat([before[g.param_name][0].flatten() for g in groups])
        g_all = torch.cat([before[g.param_name][1].flatten() for g in groups])
        w1_all = torch.cat([g.param.detach().double().flatten() for g in groups])
        assert out["all/weight_norm"] == pytest.approx(float(w_all.norm()), rel=1e-9)
        assert out["all/grad_norm"] == pytest.approx(float(g_all.norm()), rel=1e-9)
        assert out["all/normalized_grad_norm"] == pytest.approx(
            math.sqrt(sum(float(before[n][0].norm() * before[n][1].norm()) ** 2 for n in before)), rel=1e-9
        )
        acos_all = math.acos(float(torch.dot(w_all, w1_all) / (w_all.norm() * w1_all.norm())))
        assert out["all/angular_update"] == pytest.approx(acos_all, rel=1e-6)
        assert out["all/norm_identity_rel_residual"] == pytest.approx(res_sum / w2_sum, rel=1e-6, abs=1e-12)
        assert "all/effective_lr" not in out


def test_keys_and_shared_lr():
    model = make()
    data = batches(2)
    groups = find_scale_invariant(model, data[0], F.cross_entropy)
    records = train(model, torch.optim.SGD(model.parameters(), lr=0.1), data, [ScaleInvariantStats(groups)])
    expected = {f"scale/{n}/{q}" for n in [g.name for g in groups] + ["all"] for q in QUANTITIES_BACKWARD + QUANTITIES_STEP}
    for r in records:
        assert scale_keys(r) == expected
        assert all(isinstance(r[k], float) for k in expected)
        assert r["scale/all/effective_lr"] == pytest.approx(0.1 / r["scale/all/weight_norm"] ** 2, rel=1e-12)


def test_schedule_and_no_optimizer():
    model = make()
    data = batches(4)
    groups = find_scale_invariant(model, data[0], F.cross_entropy)
    records = train(model, torch.optim.SGD(model.parameters(), lr=0.1), data, [ScaleInvariantStats(groups, every=2)])
    assert [bool(scale_keys(r)) for r in records] == [True, False, True, False]

    # without an optimizer the LR is unknown: the LR-dependent keys are left out
    records = []
    monitor = Monitor(model, None, probes=[ScaleInvariantStats(groups)], log=records)
    for x, y in data[:2]:
        monitor.before_step((x, y))
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.after_backward(loss)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        monitor.after_step()
    for r in records:
        assert not any(k.endswith(("effective_lr", "norm_identity_rel_residual")) for k in r)
        assert r["scale/all/angular_update"] > 0


def test_probe_interface_and_bad_input():
    model = make()
    probe = ScaleInvariantStats({"w": model.conv1.weight})
    assert probe.cost == "cheap" and probe.name == "scale"
    assert ScaleInvariantStats([], name="si").name == "si"
    g = ScaleInvariantGroup(name="conv1.weight", param=model.conv1.weight, per_channel=False, max_violation=0.0)
    with pytest.raises(UserError):
        ScaleInvariantStats([g, g])
    with pytest.raises(UserError):
        ScaleInvariantStats({"all": model.conv1.weight})
    with pytest.raises(UserError):
        ScaleInvariantStats([model.conv1.weight])
    # no groups: records nothing, breaks nothing
    records = train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2), [ScaleInvariantStats([])])
    assert all(not scale_keys(r) for r in records)


# ----------------------------------------------------------------------------- never changes training


def _run_for_identity(with_probe: bool):
    model = make(dropout=0.3, seed=1)
    data = batches(4, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(123)  # dropout masks come from the global RNG
    if with_probe:
        groups = find_scale_invariant(model, data[0], F.cross_entropy)
        assert groups
        records = train(model, opt, data, [ScaleInvariantStats(groups)])
        assert all(scale_keys(r) for r in records)
    else:
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, opt


def test_probe_does_not_change_training():
    """Same seed with and without detection + probe: bit-identical params, buffers, grads, momentum."""
    model_a, opt_a = _run_for_identity(with_probe=False)
    rng_a = torch.get_rng_state()
    model_b, opt_b = _run_for_identity(with_probe=True)
    assert torch.equal(rng_a, torch.get_rng_state())  # dropout drew the same masks
    for (na, a), (nb, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb and torch.equal(a, b), na
        assert torch.equal(a.grad, b.grad), na
        assert torch.equal(opt_a.state[a]["momentum_buffer"], opt_b.state[b]["momentum_buffer"]), na
    for (na, a), (nb, b) in zip(model_a.named_buffers(), model_b.named_buffers()):
        assert na == nb and torch.equal(a, b), na


def _probed_steps(model, opt, data, groups, between=None):
    """One SGD step per batch with ScaleInvariantStats called by hand; yields (record, w_t per
    group). ``between`` runs after the probe's after_backward and before the step."""
    probe = ScaleInvariantStats(groups)
    for step, (x, y) in enumerate(data):
        ctx = StepContext(step=step, model=model, optimizer=opt, batch=(x, y))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        w0 = [g.param.detach().clone() for g in groups]
        out = probe.after_backward(ctx)
        if between is not None:
            between()
        opt.step()
        out.update(probe.after_step(ctx))
        yield out, w0


class _CopySGD(torch.optim.SGD):
    """The same updates as torch.optim.SGD; a subclass, so ScaleInvariantStats takes its copy path."""


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum,dampening,weight_decay", [
    (0.9, 0.0, 0.0), (0.9, 0.3, 5e-3), (0.5, 0.0, 1e-2), (0.0, 0.0, 0.0), (0.0, 0.0, 1e-2),
])
def test_sgd_update_path_equals_copy_path(foreach, momentum, dampening, weight_decay):
    """For torch.optim.SGD the angle comes from η²‖buf_{t+1}‖² (or η²‖g_t‖²) without a copy of w_t:
    equal, in float64 and from the first step on, to the copy path (a subclass of SGD) and to acos."""
    from bnlab.probes.scale import _sgd_modes

    data = batches(4, dtype=torch.float64, seed=3)
    outs = []
    for cls in (torch.optim.SGD, _CopySGD):
        model = make(dtype=torch.float64, seed=5)
        groups = find_scale_invariant(model, data[0], F.cross_entropy)
        opt = cls([{"params": [model.conv1.weight], "lr": 0.3},
                   {"params": [p for n, p in model.named_parameters() if n != "conv1.weight"], "lr": 0.1}],
                  lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay, foreach=foreach)
        modes = _sgd_modes(opt, [g.param for g in groups])
        expect = "copy" if cls is _CopySGD else "buf" if momentum else "grad"
        assert modes == [expect] * len(groups)
        rec = []
        for out, w0 in _probed_steps(model, opt, data, groups):
            for g, w in zip(groups, w0):
                w1 = g.param.detach()
                acos = math.acos(float(torch.dot(w.flatten(), w1.flatten()) / (w.norm() * w1.norm())))
                assert out[f"{g.name}/angular_update"] == pytest.approx(acos, rel=1e-6)
            rec.append(out)
        outs.append(rec)
    for a, b in zip(*outs):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-10, abs=1e-15), k


def test_sgd_path_skipped_and_foreign_writes():
    """A parameter SGD did not move has angle 0; one written twice between the events gives nan."""
    model = make(dtype=torch.float64)
    data = batches(1, dtype=torch.float64)
    groups = find_scale_invariant(model, data[0], F.cross_entropy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = ScaleInvariantStats(groups)
    x, y = data[0]
    ctx = StepContext(step=0, model=model, optimizer=opt, batch=(x, y))
    F.cross_entropy(model(x), y).backward()
    first, second = groups[0], groups[1]
    probe.after_backward(ctx)
    first.param.grad = None  # SGD skips it
    opt.step()
    with torch.no_grad():
        second.param.mul_(1.0)  # a second in-place write after the optimizer's
    out = probe.after_step(ctx)
    assert out[f"{first.name}/angular_update"] == 0.0
    assert math.isnan(out[f"{second.name}/angular_update"])


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.0, 1e-2), (0.9, 1e-2)])
def test_gradient_clipped_after_after_backward_gives_the_true_angle(momentum, weight_decay):
    """after_backward may be called before the user clips the gradient (its documented place is
    between backward and the step): the angle and the update are those of the step as it ran."""
    model = make(dtype=torch.float64, seed=2)
    data = batches(2, dtype=torch.float64, seed=4)
    groups = find_scale_invariant(model, data[0], F.cross_entropy)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=momentum, weight_decay=weight_decay)
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # noqa: E731  (after the probe read g)
    for step, (out, w0) in enumerate(_probed_steps(model, opt, data, groups, between=clip)):
        for g, w in zip(groups, w0):
            w1 = g.param.detach()
            true = math.acos(min(1.0, float(torch.dot(w.flatten(), w1.flatten()) / (w.norm() * w1.norm()))))
            assert out[f"{g.name}/angular_update"] == pytest.approx(true, rel=1e-6, abs=1e-12), (step, g.name)
