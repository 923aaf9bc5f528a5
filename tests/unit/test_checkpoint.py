"""Checkpoints of training runs (bnlab.checkpoint): a run killed with SIGKILL after a checkpoint
resumes where it stopped and ends bit-identical to an uninterrupted run, metrics included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bnlab import checkpoint, data, models, paper
from bnlab.probes.base import Probe
from bnlab.train import make_optimizer, train

# A paper-like training run at smoke size: CIFAR-10-shaped data with the standard augmentation,
# SGD with momentum, a step schedule, periodic evaluations and a probe that keeps state.
CHILD = textwrap.dedent('''
    import sys, time, torch
    from bnlab import data, models, paper
    from bnlab.probes.base import Probe
    from bnlab.train import make_optimizer, train

    class Running(Probe):
        """A probe with state (a running sum of the losses), slowed down by `delay` seconds a step."""
        name = "running"
        def __init__(self, delay):
            super().__init__(1)
            self.delay, self.seen, self.total = delay, 0, 0.0
        def after_step(self, ctx):
            self.seen += 1
            self.total += float(ctx.loss)
            time.sleep(self.delay)
            return {"seen": self.seen, "running": self.total}

    torch.set_num_threads(1)
    mode, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    tr = data.load("cifar10-synthetic", split="train", n=96, augment=True)
    te = data.load("cifar10-synthetic", split="test", n=32)
    net = models.make("convnet", norm="bn", in_shape=(3, 32, 32), num_classes=10, width=4, seed=0)
    opt = make_optimizer(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    recs = []
    ck = None if mode == "plain" else out + "/ck"
    with paper.use(checkpoint_dir=ck, checkpoint_every=3):
        h = train(net, tr, opt, steps=14, batch_size=16, scheduler=sched, probes=[Running(delay)], eval_data=te,
                  eval_every=4, seed=1, log=recs.append, device="cpu")
        # a second train() call in the same run: numbered train-0001
        h2 = train(net, tr, opt, steps=4, batch_size=16, eval_data=te, seed=2, log=recs.append, device="cpu")
    torch.save({"state": net.state_dict(), "opt": opt.state_dict()["state"], "records": recs,
                "evals": h.evals + h2.evals, "steps": h.steps}, out + "/" + mode + ".pt")
''')


def _run(script, mode, out, delay=0.0, **kw):
    return subprocess.Popen([sys.executable, str(script), mode, str(out), str(delay)], **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run SIGKILLed after its first checkpoint then resumed (twice)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    plain = _run(script, "plain", tmp, env=env)
    killed = _run(script, "resumed", tmp, delay=0.4, env=env)
    ck = tmp / "ck" / "train-0000.pt"
    deadline = time.time() + 120
    while not ck.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ck.exists(), "the child wrote no checkpoint"
    killed.send_signal(signal.SIGKILL)
    rc_killed = killed.wait(60)
    at_kill = torch.load(ck, weights_only=False)
    assert plain.wait(120) == 0
    resumed = _run(script, "resumed", tmp, env=env)
    assert resumed.wait(120) == 0
    first = torch.load(tmp / "resumed.pt", weights_only=False)
    again = _run(script, "resumed", tmp, env=env)  # every call finished: returns the stored results
    assert again.wait(120) == 0
    return {"rc_killed": rc_killed, "at_kill": at_kill, "plain": torch.load(tmp / "plain.pt", weights_only=False),
            "resumed": first, "again": torch.load(tmp / "resumed.pt", weights_only=False)}


def test_the_run_was_killed_mid_way(runs):
    assert runs["rc_killed"] == -signal.SIGKILL
    assert not runs["at_kill"]["finished"]
    assert 3 <= runs["at_kill"]["step"] < 14


@pytest.mark.parametrize("which", ["resumed", "again"])
def test_resumed_run_is_bit_identical(runs, which):
    a, b = runs["plain"], runs[which]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["opt"]:
        assert torch.equal(a["opt"][k]["momentum_buffer"], b["opt"][k]["momentum_buffer"])
    assert a["records"] == b["records"]  # every step record (probe state included) and every evaluation, in order
    assert a["evals"] == b["evals"] and a["steps"] == b["steps"] == 14
    running = [r["running/running"] for r in a["records"] if "running/running" in r]
    assert len(running) == 14 and running == sorted(running)  # the probe's state went on across the kill


def _tiny_run(tmp_path, steps=4, every=2, seed=0):
    tr = data.load("synthetic", split="train", n=64, in_shape=(1, 4, 4))
    net = models.make("mlp", norm="bn", in_shape=(1, 4, 4), num_classes=10, width=8, depth=2, seed=0)
    opt = make_optimizer(net.parameters(), lr=0.1, momentum=0.9)
    with paper.use(checkpoint_dir=tmp_path, checkpoint_every=every):
        h = train(net, tr, opt, steps=steps, batch_size=16, seed=seed, device="cpu", eval_train=False)
    return net, h


def test_checkpoint_of_another_call_is_ignored(tmp_path):
    net_a, _ = _tiny_run(tmp_path, steps=4)
    # same file name (first call of a run), but other steps: not this call's checkpoint, trained afresh
    net_b, h_b = _tiny_run(tmp_path, steps=6)
    with paper.use(checkpoint_dir=None):
        net_c, h_c = _tiny_run(tmp_path / "none", steps=6, every=0)
    assert h_b.steps == 6
    for pb, pc in zip(net_b.parameters(), net_c.parameters()):
        assert torch.equal(pb, pc)


def test_damaged_checkpoint_starts_afresh(tmp_path):
    (tmp_path / "train-0000.pt").write_bytes(b"not a checkpoint")
    net, h = _tiny_run(tmp_path)
    net_ref, _ = _tiny_run(tmp_path / "ref")
    assert h.steps == 4
    for a, b in zip(net.parameters(), net_ref.parameters()):
        assert torch.equal(a, b)


def test_no_checkpoints_outside_a_paper_run(tmp_path):
    assert checkpoint.for_train_call() is None
    with paper.use(checkpoint_dir=tmp_path, checkpoint_every=0):
        assert checkpoint.for_train_call() is None


def test_probe_state_skips_live_references():
    class P(Probe):
        def __init__(self, model):
            super().__init__(1)
            self.model, self.params, self.count, self.buf = model, list(model.parameters()), 3, torch.ones(2)
            self.fn = lambda: 1

    net = torch.nn.Linear(2, 2)
    st = checkpoint.probe_state(P(net))
    assert set(st) == {"count", "buf"}  # not the module, its parameters, the schedule or a callable
    assert st["count"] == 3 and torch.equal(st["buf"], torch.ones(2))


def test_files_are_numbered_per_run(tmp_path):
    with paper.use(checkpoint_dir=tmp_path, checkpoint_every=1):
        names = [checkpoint.for_train_call(model=torch.nn.Linear(1, 1), optimizer=None, scheduler=None, monitor=None,
                                           history=None, log=None, steps=1, batch_size=1, seed=0).path.name
                 for _ in range(3)]
    assert names == ["train-0000.pt", "train-0001.pt", "train-0002.pt"]
    with paper.use(checkpoint_dir=tmp_path, checkpoint_every=1):  # a new run counts from 0 again
        assert checkpoint.for_train_call(model=torch.nn.Linear(1, 1), optimizer=None, scheduler=None, monitor=None,
                                         history=None, log=None, steps=1, batch_size=1, seed=0).path == Path(tmp_path) / "train-0000.pt"
