"""ProbeCallback in a real lightning.Trainer fit on CPU: training unchanged (bit-identical weights),
probe values equal to a plain PyTorch loop's, and the same values in the Trainer's logger and in a
TensorBoard event file read back with TensorBoard's reader."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from bnlab.integrations.lightning import ProbeCallback  # noqa: E402
from bnlab.probes import GradNorm, LearningRate, WeightNorm  # noqa: E402
from bnlab.sinks import JsonlSink, TensorBoardSink, scalars  # noqa: E402

STEPS, BATCH = 30, 32
g = torch.Generator().manual_seed(1)
X, Y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


def make_opt(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return make_opt(self.parameters())


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH, shuffle=False)


def fit(callbacks, root):
    torch.manual_seed(123)  # dropout draws from the global RNG
    module = Module()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=CSVLogger(root), callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, default_root_dir=root)
    trainer.fit(module, loader())
    return module, trainer


def reference_loop():
    """The same training as a plain PyTorch loop, measuring ‖∇L(w_t)‖ after backward and ‖w_{t+1}‖ after the step."""
    torch.manual_seed(123)
    net = make_net()
    opt = make_opt(net.parameters())
    net.train()
    grad_norms, weight_norms, losses = [], [], []
    while len(grad_norms) < STEPS:
        for x, y in loader():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            grad_norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in net.parameters())))
            opt.step()
            weight_norms.append(math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in net.parameters())))
            losses.append(float(loss.detach()))
            if len(grad_norms) == STEPS:
                break
    return net, grad_norms, weight_norms, losses


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    cb = ProbeCallback([GradNorm(), WeightNorm(), LearningRate()],
                       sinks=[TensorBoardSink(root / "tb"), JsonlSink(root / "metrics.jsonl")])
    with_cb, trainer = fit([cb], root / "with")
    without, _ = fit([], root / "without")
    return root, cb, with_cb, trainer, without


def test_weights_bit_identical_with_and_without_the_callback(fits):
    _, cb, with_cb, trainer, without = fits
    assert trainer.global_step == STEPS and len(cb.records) == STEPS
    for (name, a), b in zip(with_cb.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name


def test_probe_values_are_those_of_a_plain_loop(fits):
    """after_backward sees ∇L(w_t) (before the step), after_step sees w_{t+1}: same as measured by hand."""
    _, cb, with_cb, _, _ = fits
    net, grad_norms, weight_norms, losses = reference_loop()
    for a, b in zip(net.state_dict().values(), with_cb.net.state_dict().values()):
        assert torch.equal(a, b)  # Lightning ran exactly this loop
    assert [r["step"] for r in cb.records] == list(range(STEPS))
    np.testing.assert_allclose([r["grad_norm/total"] for r in cb.records], grad_norms, rtol=1e-6)
    np.testing.assert_allclose([r["weight_norm/total"] for r in cb.records], weight_norms, rtol=1e-6)
    assert [r["loss"] for r in cb.records] == losses
    assert all(r["lr/0"] == 0.1 for r in cb.records)


def test_values_in_the_trainer_logger_and_the_tensorboard_file(fits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, cb, _, trainer, _ = fits
    with open(trainer.logger.experiment.metrics_file_path, newline="") as f:
        rows = list(csv.DictReader(f))
    logged = {(k, int(r["step"])): float(v) for r in rows for k, v in r.items() if v not in ("", None) and "/" in k}
    expected = {(k, r["step"]): v for r in cb.records for k, v in scalars(r).items() if k != "loss"}
    assert set(logged) == set(expected)
    assert all(logged[k] == float(np.float32(v)) for k, v in expected.items())  # self.log stores float32 tensors

    acc = EventAccumulator(str(root / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    expected_all = {(k, r["step"]): v for r in cb.records for k, v in scalars(r).items()}
    assert set(tb) == set(expected_all)
    assert all(tb[k] == float(np.float32(v)) for k, v in expected_all.items())
    import json

    lines = [json.loads(s) for s in (root / "metrics.jsonl").read_text().splitlines()]
    assert lines == cb.records


def test_gradient_accumulation_sees_the_summed_gradient(tmp_path):
    """With accumulate_grad_batches=2 a record per optimizer step, its gradient the sum over both micro-batches."""
    cb = ProbeCallback([GradNorm()])
    torch.manual_seed(123)
    module = Module()
    module.net[3].p = 0.0  # no dropout: the reference below draws nothing
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, callbacks=[cb], accumulate_grad_batches=2,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, loader())
    torch.manual_seed(0)
    net = make_net()
    net[3].p = 0.0
    opt = make_opt(net.parameters())
    batches = list(loader())
    expected = []
    for t in range(3):
        opt.zero_grad()
        for x, y in batches[2 * t:2 * t + 2]:
            (F.cross_entropy(net(x), y) / 2).backward()  # Lightning scales the loss by 1/accumulate
        expected.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in net.parameters())))
        opt.step()
    assert [r["step"] for r in cb.records] == [0, 1, 2]
    np.testing.assert_allclose([r["grad_norm/total"] for r in cb.records], expected, rtol=1e-6)
