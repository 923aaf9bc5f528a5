"""bnlab.adapters: one way to call a model on a batch and get its loss, for (x, y) tuples and
Hugging Face style dict batches / dict outputs; the curvature closure's fixed randomness and its
attention backend. References: a direct call of the model, torch.func.functional_call, autograd,
finite differences of gradients."""

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.adapters import (
    batch_size,
    batch_to,
    compute_loss,
    default_loss_fn,
    forward,
    labels_of,
    logits_of,
    math_attention,
    model_loss,
    split_batch,
)
from bnlab.curvature import model_hvp, model_loss_closure, model_quadratic_form, model_top_eigenvalues
from bnlab.errors import UserError
from bnlab.landscape import probe_model_along_gradient, relative_loss
from bnlab.monitor import Monitor
from bnlab.probes import GradNorm, HessianQuadForm, TopHessianEigenvalue


class KwNet(nn.Module):
    """Takes keyword inputs and returns a dict with logits and (given labels) the loss: the shape of
    a Hugging Face model, without transformers."""

    def __init__(self, d=5, k=3, p_drop=0.0):
        super().__init__()
        self.a = nn.Linear(d, 7)
        self.drop = nn.Dropout(p_drop)
        self.b = nn.Linear(7, k)

    def forward(self, inputs, mask=None, labels=None):
        h = self.drop(torch.tanh(self.a(inputs)))
        if mask is not None:
            h = h * mask[:, None]
        logits = self.b(h)
        out = OrderedDict(logits=logits)
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _data(n=12, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


@dataclass
class _Out:
    logits: torch.Tensor
    loss: torch.Tensor = None


def test_split_batch_and_labels():
    x, y = _data()
    assert split_batch((x, y)) == ((x,), {})
    assert split_batch([x, y])[0][0] is x
    args, kwargs = split_batch((x, x, y))
    assert len(args) == 2 and kwargs == {}
    assert split_batch(x) == ((x,), {})
    args, kwargs = split_batch({"inputs": x, "labels": y})
    assert args == () and set(kwargs) == {"inputs", "labels"}
    assert labels_of((x, y)) is y and labels_of({"inputs": x, "labels": y}) is y
    assert labels_of({"inputs": x, "label": y}) is y
    with pytest.raises(ValueError, match="no labels"):
        labels_of({"inputs": x})
    with pytest.raises(TypeError):
        split_batch(3)


def test_forward_and_loss_match_direct_calls():
    torch.manual_seed(0)
    net = KwNet()
    x, y = _data()
    mask = torch.ones(len(x))
    batch = {"inputs": x, "mask": mask, "labels": y}
    out = forward(net, batch)
    direct = net(x, mask=mask, labels=y)
    assert torch.equal(logits_of(out), direct["logits"])
    assert torch.equal(compute_loss(out, batch), direct["loss"])  # the model's own loss
    assert torch.equal(compute_loss(out, batch, F.cross_entropy), F.cross_entropy(direct["logits"], y))
    params = {n: p.detach() * 2 for n, p in net.named_parameters()}
    ref = torch.func.functional_call(net, params, (), {"inputs": x, "mask": mask, "labels": y})
    assert torch.equal(model_loss(net, batch, None, params), ref["loss"])
    # a plain (x, y) batch with a tensor-valued model
    lin = nn.Linear(5, 3)
    assert torch.equal(model_loss(lin, (x, y), F.cross_entropy), F.cross_entropy(lin(x), y))
    with pytest.raises(UserError, match="no loss"):
        compute_loss(lin(x), (x, y))


def test_logits_of_each_output_kind():
    z = torch.randn(4, 3)
    assert logits_of(z) is z
    assert logits_of({"logits": z, "loss": z.sum()}) is z
    assert logits_of(_Out(z)) is z
    assert logits_of((z, "hidden")) is z
    with pytest.raises(ValueError):
        logits_of({"hidden": z})


def test_batch_size_batch_to_default_loss_fn():
    x, y = _data(n=9)
    assert batch_size((x, y)) == 9 and batch_size({"input_ids": torch.zeros(4, 6, dtype=torch.long)}) == 4
    assert batch_size({"pixel": x}) == 9
    moved = batch_to({"inputs": x, "labels": y}, "meta")
    assert moved["inputs"].device.type == "meta" and moved["labels"].device.type == "meta"
    moved = batch_to((x, y), "meta")
    assert isinstance(moved, tuple) and moved[0].device.type == "meta"
    assert default_loss_fn((x, y)) is F.cross_entropy
    assert default_loss_fn({"inputs": x}) is None
    assert default_loss_fn({"inputs": x}, F.mse_loss) is F.mse_loss


def test_math_attention_restores_the_users_backend_choice():
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    torch.backends.cuda.enable_math_sdp(False)  # an unusual user setting
    try:
        with math_attention():
            assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() == before[0]
    finally:
        torch.backends.cuda.enable_math_sdp(before[1])


def test_curvature_on_dict_batch_equals_tuple_batch():
    torch.manual_seed(1)
    net = KwNet()
    x, y = _data()
    tuple_net = _TupleView(net)
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    v_t = {"net." + n: t for n, t in v.items()}
    hv_d = model_hvp(net, {"inputs": x, "labels": y}, None, v)
    hv_t = model_hvp(tuple_net, (x, y), F.cross_entropy, v_t)
    for n in v:
        torch.testing.assert_close(hv_d[n], hv_t["net." + n], rtol=1e-6, atol=1e-7)
    q_d = model_quadratic_form(net, {"inputs": x, "labels": y})
    q_t = model_quadratic_form(tuple_net, (x, y), F.cross_entropy)
    torch.testing.assert_close(q_d, q_t)
    lam_d, _ = model_top_eigenvalues(net, {"inputs": x, "labels": y}, k=1, seed=0)
    lam_t, _ = model_top_eigenvalues(tuple_net, (x, y), F.cross_entropy, k=1, seed=0)
    torch.testing.assert_close(lam_d, lam_t, rtol=1e-5, atol=1e-7)
    scan_d = probe_model_along_gradient(net, {"inputs": x, "labels": y}, None, [0.1, 0.5], vectorize=False)
    scan_t = probe_model_along_gradient(tuple_net, (x, y), F.cross_entropy, [0.1, 0.5], vectorize=False)
    torch.testing.assert_close(scan_d.losses, scan_t.losses)
    rel_d = relative_loss(net, {"inputs": x, "labels": y}, None, [0.01, 0.3], vectorize=False)
    torch.testing.assert_close(rel_d, relative_loss(tuple_net, (x, y), F.cross_entropy, [0.01, 0.3], vectorize=False))
    # by hand: one plain gradient step of size 0.3 on the model's own loss
    loss0 = net(x, labels=y)["loss"]
    grads = torch.autograd.grad(loss0, list(net.parameters()))
    moved = {n: p.detach() - 0.3 * g for (n, p), g in zip(net.named_parameters(), grads)}
    by_hand = torch.func.functional_call(net, moved, (x,), {"labels": y})["loss"] / loss0
    torch.testing.assert_close(rel_d[1], by_hand.detach().double(), rtol=1e-5, atol=1e-7)


class _TupleView(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["logits"]


def test_dropout_masks_are_fixed_per_closure_and_the_hvp_is_their_hessian():
    torch.manual_seed(2)
    net = KwNet(p_drop=0.5).train()
    x, y = _data(n=16)
    batch = {"inputs": x, "labels": y}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    f, params = model_loss_closure(net, batch)
    l1, l2 = f(params), f(params)
    assert torch.equal(l1, l2)  # the same masks at every evaluation
    assert torch.equal(torch.get_rng_state(), state)  # and f does not advance the global RNG
    with torch.no_grad():
        l_eval = net.eval()(x, labels=y)["loss"]
    net.train()
    assert not torch.allclose(l1, l_eval)  # dropout is active: the masks matter

    v = {n: torch.randn_like(p, dtype=torch.float64) for n, p in net.named_parameters()}
    net64 = net.double()
    batch64 = {"inputs": x.double(), "labels": y}
    torch.set_rng_state(state)
    hv = model_hvp(net64, batch64, None, v)
    assert torch.equal(torch.get_rng_state(), state)  # the wrapper restores the RNG
    torch.set_rng_state(state)
    hv_again = model_hvp(net64, batch64, None, v)
    for n in v:
        assert torch.equal(hv[n], hv_again[n])

    # independent reference: central differences of plain autograd gradients, each pass drawing
    # its masks from the same RNG state
    def grad_at(eps):
        with torch.no_grad():
            for n, p in net64.named_parameters():
                p.add_(eps * v[n])
        torch.set_rng_state(state)
        loss = net64(x.double(), labels=y)["loss"]
        gs = torch.autograd.grad(loss, list(net64.parameters()))
        with torch.no_grad():
            for n, p in net64.named_parameters():
                p.sub_(eps * v[n])
        return dict(zip([n for n, _ in net64.named_parameters()], gs))

    eps = 1e-5
    gp, gm = grad_at(eps), grad_at(-eps)
    for n in v:
        torch.testing.assert_close(hv[n], (gp[n] - gm[n]) / (2 * eps), rtol=1e-5, atol=1e-7)
    # forward-over-reverse (torch.func) sees the same masks
    torch.set_rng_state(state)
    hv_fwd = model_hvp(net64, batch64, None, v, method="forward")
    for n in v:
        torch.testing.assert_close(hv_fwd[n], hv[n], rtol=1e-10, atol=1e-12)
    # a different RNG state draws other masks, and another Hessian
    torch.manual_seed(124)
    hv_other = model_hvp(net64, batch64, None, v)
    assert not torch.allclose(hv_other["a.weight"], hv["a.weight"])


def test_monitor_runs_curvature_probes_on_dict_batches_without_changing_training():
    def run(with_probes):
        torch.manual_seed(3)
        net = KwNet(p_drop=0.2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        probes = [GradNorm(), HessianQuadForm(every=1), TopHessianEigenvalue(every=1, max_iter=5)] if with_probes else []
        records = []
        mon = Monitor(net, opt, probes, log=records)
        for i in range(3):
            x, y = _data(seed=10 + i)
            batch = {"inputs": x, "labels": y}
            with mon.step(batch) as s:
                opt.zero_grad()
                loss = net(**batch)["loss"]
                loss.backward()
                s.loss = loss
                opt.step()
        return net, records

    net_a, _ = run(False)
    net_b, rec = run(True)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)
    assert all("hess_quad/gHg" in r and "hess_top/lambda_max" in r for r in rec)


def test_landscape_probe_replays_the_training_steps_dropout_masks():
    """Through Monitor, LandscapeProbe starts every probe point from the RNG state taken at
    before_step, so dropout draws the training pass's masks: grad_diff equals the gradient
    differences of the loss with those masks, computed here with plain autograd from the same
    state replayed, and is O(s) at a small step. Without the replay (the state at the probe) the
    masks differ and the difference at that step is O(1)."""
    import copy

    from bnlab.probes import LandscapeProbe

    torch.manual_seed(5)
    net = KwNet(p_drop=0.5).train()
    x, y = _data(n=16)
    steps = [1e-3, 0.05]
    probe = LandscapeProbe(every=1, step_sizes=steps)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(net, opt, [probe], log=None, loss_fn=F.cross_entropy)
    torch.manual_seed(77)
    mon.before_step((x, y))
    state = torch.get_rng_state()  # what the training forward starts from
    opt.zero_grad()
    loss = F.cross_entropy(net(x)["logits"], y)
    loss.backward()
    net_t = copy.deepcopy(net)  # w_t and g
    g = {n: p.grad.clone() for n, p in net.named_parameters()}
    mon.after_backward(loss)
    opt.step()
    rec = mon.after_step()

    def grad_diff(s):  # ‖g - ∇L(w_t - s g)‖ with the training pass's masks
        ref = copy.deepcopy(net_t)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.sub_(s * g[n])
        torch.set_rng_state(state)
        gs = torch.autograd.grad(F.cross_entropy(ref(x)["logits"], y), [p for _, p in ref.named_parameters()])
        return float(torch.sqrt(sum(((g[n] - gi) ** 2).sum() for (n, _), gi in zip(ref.named_parameters(), gs))))

    diffs = [grad_diff(s) for s in steps]
    assert rec["landscape/grad_diff_min"] == pytest.approx(min(diffs), rel=1e-5)
    assert rec["landscape/grad_diff_max"] == pytest.approx(max(diffs), rel=1e-5)
    gnorm = float(torch.sqrt(sum((t ** 2).sum() for t in g.values())))
    assert rec["landscape/grad_diff_min"] < 0.01 * gnorm  # O(s): the masks match
    # without the replay: another draw of masks, an O(1) difference at the same small step
    torch.manual_seed(78)
    other = probe_model_along_gradient(net_t, (x, y), F.cross_entropy, steps[:1],
                                       grad=g, loss=loss.detach())
    assert other.grad_band[0] > 20 * rec["landscape/grad_diff_min"]


def test_hessian_probes_use_the_training_steps_dropout_masks():
    """HessianQuadForm and TopHessianEigenvalue evaluate the loss from StepContext.rng too: their
    values equal the model_* functions given the RNG state taken before the training forward pass,
    and differ from another draw of masks."""
    import copy

    from bnlab.curvature import model_quadratic_form, model_top_eigenvalues

    torch.manual_seed(6)
    net = KwNet(p_drop=0.5).train()
    x, y = _data(n=16)
    probes = [HessianQuadForm(every=1), TopHessianEigenvalue(every=1, max_iter=30, tol=1e-10)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(net, opt, probes, log=None, loss_fn=F.cross_entropy)
    torch.manual_seed(11)
    mon.before_step((x, y))
    state = torch.get_rng_state()
    opt.zero_grad()
    loss = F.cross_entropy(net(x)["logits"], y)
    loss.backward()
    net_t = copy.deepcopy(net)
    mon.after_backward(loss)
    opt.step()
    rec = mon.after_step()
    rng = (state, [])
    q = float(model_quadratic_form(net_t, (x, y), F.cross_entropy, rng=rng))
    lam, _ = model_top_eigenvalues(net_t, (x, y), F.cross_entropy, k=1, rng=rng, max_iter=30, tol=1e-10)
    assert rec["hess_quad/gHg"] == pytest.approx(q, rel=1e-6)
    assert rec["hess_top/lambda_max"] == pytest.approx(float(lam[0]), rel=1e-6)
    torch.manual_seed(12)
    other = float(model_quadratic_form(net_t, (x, y), F.cross_entropy))
    assert abs(other - q) > 1e-3 * abs(q)  # another draw of masks gives another value
