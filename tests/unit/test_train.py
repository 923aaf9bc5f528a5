import math

import pytest
import torch
import torch.nn.functional as F

from bnlab import data, models
from bnlab.monitor import Monitor
from bnlab.probes import GradNorm, LearningRate, Probe, WeightNorm
from bnlab.train import evaluate, make_optimizer, train


def _setup(norm="bn", seed=0, lr=0.05, momentum=0.9, n=256):
    tr = data.load("synthetic", split="train", n=n, in_shape=(1, 8, 8), seed=1)
    net = models.make("convnet", norm=norm, in_shape=(1, 8, 8), num_classes=10, width=4, seed=seed)
    opt = make_optimizer(net.parameters(), lr=lr, momentum=momentum)
    return tr, net, opt


def _state(net):
    return [t.detach().clone() for t in list(net.parameters()) + list(net.buffers())]


def test_same_seed_gives_bit_identical_weights():
    outs = []
    for _ in range(2):
        tr, net, opt = _setup()
        train(net, tr, opt, steps=12, batch_size=32, seed=5, device="cpu")
        outs.append(_state(net))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    tr, net, opt = _setup()
    train(net, tr, opt, steps=12, batch_size=32, seed=6, device="cpu")
    assert not all(torch.equal(a, b) for a, b in zip(outs[0], _state(net)))


def test_log_sinks_receive_every_record(tmp_path):
    """A list, a callable and a run directory (``.append_metrics``) get the same records."""
    from bnlab.runs import RunDir

    tr, net, opt = _setup()
    as_list, called = [], []
    h = train(net, tr, opt, steps=3, batch_size=64, eval_every=2, device="cpu", log=as_list)
    tr, net, opt = _setup()
    train(net, tr, opt, steps=3, batch_size=64, eval_every=2, device="cpu", log=called.append)
    tr, net, opt = _setup()
    run = RunDir.create(tmp_path, "t", {"x": 1})
    train(net, tr, opt, steps=3, batch_size=64, eval_every=2, device="cpu", log=run)
    run.finish()
    assert len(as_list) == len(h.records) + len(h.evals) and [r["step"] for r in called] == [r["step"] for r in as_list]
    assert len((run.path / "metrics.jsonl").read_text().splitlines()) == len(as_list)


def test_full_batch_step_is_gradient_descent():
    tr, net, opt = _setup(norm="none", lr=0.1, momentum=0.0, n=64)
    ref = models.make("convnet", norm="none", in_shape=(1, 8, 8), num_classes=10, width=4, seed=0)
    loss = F.cross_entropy(ref(tr.x), tr.y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(ref.parameters(), grads)]
    h = train(net, tr, opt, steps=1, full_batch=True, device="cpu", eval_train=False)
    assert h.steps == 1 and h.records[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_huge_lr_is_marked_diverged_without_raising():
    tr, net, opt = _setup(norm="none", lr=1e12, momentum=0.0)
    h = train(net, tr, opt, steps=50, batch_size=64, device="cpu")
    assert h.diverged and h.diverged_at is not None and h.diverged_at < 50
    assert h.steps <= h.diverged_at + 1
    assert "non-finite" in h.reason
    s = h.summary()
    assert s["diverged"] is True and s["diverged_at"] == h.diverged_at
    assert math.isnan(s["train_loss"])


def test_epochs_and_evaluation_counts():
    tr, net, opt = _setup()
    te = data.load("synthetic", split="test", n=256, in_shape=(1, 8, 8), seed=1)
    h = train(net, tr, opt, epochs=2, batch_size=100, eval_data=te, device="cpu")
    assert h.steps == 6  # ceil(256/100) = 3 steps per epoch
    assert [e["step"] for e in h.evals] == [3, 6]
    m = evaluate(net, te)
    assert h.final["test_acc"] == pytest.approx(m["acc"]) and h.final["test_loss"] == pytest.approx(m["loss"], rel=1e-5)
    with torch.no_grad():
        net.eval()
        manual = float((net(te.x).argmax(1) == te.y).float().mean())
    assert m["acc"] == pytest.approx(manual)


class _Meddler(Probe):
    """A careless 'standard' probe: runs forward passes in train mode (moving BN running stats),
    draws random numbers, zeroes grads and flips the mode. The monitor's guard must undo it all."""

    name = "meddler"
    cost = "standard"

    def after_backward(self, ctx):
        ctx.model.train()
        ctx.model(torch.randn(8, 1, 8, 8))  # updates BN running stats, consumes RNG
        for p in ctx.model.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        ctx.model.eval()
        return {"x": 1.0}


def test_probes_do_not_change_training():
    tr, net, opt = _setup()
    train(net, tr, opt, steps=10, batch_size=32, seed=2, device="cpu")
    ref = _state(net)
    tr, net, opt = _setup()
    h = train(net, tr, opt, steps=10, batch_size=32, seed=2, device="cpu", probes=[GradNorm(), WeightNorm(every=3), LearningRate(), _Meddler()])
    assert all(torch.equal(a, b) for a, b in zip(ref, _state(net)))
    assert all("grad_norm/total" in r and "meddler/x" in r for r in h.records)
    assert [r["step"] for r in h.records if "weight_norm/total" in r] == [0, 3, 6, 9]


def test_probe_values_match_a_manual_computation():
    tr, net, opt = _setup(momentum=0.0)
    records = []
    mon = Monitor(net, opt, [GradNorm(), WeightNorm(), LearningRate()], log=records)
    x, y = tr.x[:32], tr.y[:32]
    with mon.step((x, y)) as s:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        s.loss = loss
        g = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))
        opt.step()
    w = torch.sqrt(sum((p.detach() ** 2).sum() for p in net.parameters()))
    (r,) = records
    assert r["step"] == 0 and r["loss"] == pytest.approx(float(loss.detach()))
    assert r["grad_norm/total"] == pytest.approx(float(g), rel=1e-5)
    assert r["weight_norm/total"] == pytest.approx(float(w), rel=1e-5)
    assert r["lr/0"] == pytest.approx(0.05)


def test_monitor_context_manager_equals_explicit_calls():
    def run(use_ctx):
        tr, net, opt = _setup()
        recs = []
        mon = Monitor(net, opt, [GradNorm(), WeightNorm()], log=recs)
        for x, y in list(tr.batches(64, shuffle=False))[:3]:
            if use_ctx:
                with mon.step((x, y)) as s:
                    opt.zero_grad()
                    s.loss = F.cross_entropy(net(x), y)
                    s.loss.backward()
                    opt.step()
            else:
                mon.before_step((x, y))
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                mon.after_backward(loss)
                opt.step()
                mon.after_step()
        return recs

    assert run(True) == run(False)


def test_monitor_step_without_optimizer_step_is_an_error():
    tr, net, opt = _setup()
    mon = Monitor(net, opt, [GradNorm()])
    with pytest.raises(RuntimeError, match="did not call optimizer.step"):
        with mon.step():
            pass


def test_bad_training_arguments():
    from bnlab.errors import UserError

    tr, net, opt = _setup()
    with pytest.raises(UserError, match="batch size must be a finite number > 0"):
        train(net, tr, opt, steps=1, batch_size=0)
    with pytest.raises(UserError, match="epochs must be a finite number >= 0"):
        train(net, tr, opt, epochs=-1)
    with pytest.raises(UserError, match="learning rate must be a finite number > 0"):
        make_optimizer(net.parameters(), lr=-1)
    with pytest.raises(UserError, match="momentum must be in"):
        make_optimizer(net.parameters(), lr=0.1, momentum=1.5)


def test_convnet_bn_trains_to_96_percent_on_digits():
    tr, te = data.load_pair("digits")
    net = models.make("convnet", norm="bn", in_shape=tr.in_shape, num_classes=10, seed=0)
    opt = make_optimizer(net.parameters(), lr=0.1, momentum=0.9)
    h = train(net, tr, opt, epochs=10, eval_data=te, device="cpu")
    assert not h.diverged and h.final["test_acc"] >= 0.96
