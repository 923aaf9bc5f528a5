"""One check over the whole probe registry: no probe changes the training it observes.

For every registered probe, the same seeded SGD-with-momentum run (weight decay on) is trained
with and without the probe; weights, BN running statistics, gradients, momentum buffers, losses
and the global RNG state must be bit-identical, and the probe must have recorded numbers (so the
comparison is between a run that measured and one that did not).
"""

import importlib
import pkgutil

import pytest
import torch
import torch.nn.functional as F

import bnlab.probes as probes_pkg
from bnlab import models
from bnlab.data import ArrayData
from bnlab.errors import UserError
from bnlab.probes import PROBES, Probe, make_probe
from bnlab.train import make_optimizer, train


def _data():
    g = torch.Generator().manual_seed(1)
    return ArrayData(torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 5, (96,), generator=g), 5)


def _net(norm):
    return models.make("convnet", norm=norm, in_shape=(1, 8, 8), num_classes=5, width=4, seed=3)


def _run(norm, probe_name=None):
    data = _data()
    net = _net(norm)
    opt = make_optimizer(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    probes = [] if probe_name is None else [make_probe(probe_name, net, data.full_batch(), F.cross_entropy, every=2)]
    torch.manual_seed(0)
    h = train(net, data, opt, steps=5, batch_size=32, probes=probes, device="cpu", seed=0, eval_every=2)
    return net, opt, h, torch.get_rng_state(), probes


# ScaleInvariantStats on a net where find_scale_invariant confirms no group (no norm; noisy BN redraws its
# noise per pass) would record nothing: it is checked on BN only
CASES = [(name, norm) for name in sorted(PROBES) for norm in ("bn", "bn-noisy", "none")
         if not (name == "scale-invariant" and norm != "bn")]


@pytest.mark.parametrize("name, norm", CASES)
def test_training_is_bit_identical_with_and_without_each_probe(name, norm):
    net_a, opt_a, h_a, rng_a, _ = _run(norm)
    net_b, opt_b, h_b, rng_b, probes = _run(norm, name)
    for (k, v), (k2, v2) in zip(net_a.state_dict().items(), net_b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
    assert torch.equal(rng_a, rng_b)
    assert [r["loss"] for r in h_a.records] == [r["loss"] for r in h_b.records]
    assert [e.get("train_acc") for e in h_a.evals] == [e.get("train_acc") for e in h_b.evals]
    assert probes[0].cost == PROBES[name].cost  # the registry states the cost of what it builds
    prefix = probes[0].name + "/"
    measured = [r for r in h_b.records if any(k.startswith(prefix) for k in r)]
    assert measured, f"probe {name} recorded nothing"
    assert not any(k.startswith(prefix) for r in h_a.records for k in r)
    # built by name, a probe keeps nothing per step in memory (its numbers are in the records): memory stays flat
    assert not getattr(probes[0], "history", []), f"probe {name} keeps a history"


def _probe_classes():
    for info in pkgutil.iter_modules(probes_pkg.__path__):
        importlib.import_module(f"bnlab.probes.{info.name}")
    seen, todo = set(), [Probe]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return {c for c in seen if c.__module__.startswith("bnlab.probes") and not c.__name__.startswith("_")}


def test_every_probe_class_is_registered():
    registered = {e.cls for e in PROBES.values()}
    assert _probe_classes() <= registered, sorted(c.__name__ for c in _probe_classes() - registered)
    assert all(e.cost in ("cheap", "standard", "expensive") for e in PROBES.values())


def test_unknown_probe_lists_the_registry():
    with pytest.raises(UserError, match="accepted: .*grad-norm"):
        make_probe("nope", _net("bn"))
