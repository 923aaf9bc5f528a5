"""ProbeCallback in a real transformers.Trainer on a tiny randomly initialized 2-layer BERT built from a
config (nothing downloaded, synthetic tokens, report_to=[]): training unchanged (bit-identical
weights, dropout included), probe values equal to the Trainer's own measurements, and the values in
the Trainer's log history and in a TensorBoard event file read back with TensorBoard's reader."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from bnlab.integrations.hf import ProbeCallback  # noqa: E402
from bnlab.probes import GradNorm, LearningRate, TrainModeAccuracy, WeightNorm  # noqa: E402
from bnlab.sinks import TensorBoardSink, scalars  # noqa: E402

STEPS, MAX_GRAD_NORM = 10, 0.3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, length=12, vocab=50):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.mask = (torch.rand(n, length, generator=g) > 0.1).long()
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg)


def fit(callbacks, out):
    model = tiny_bert()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-3,
                             max_grad_norm=MAX_GRAD_NORM, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                             seed=0, disable_tqdm=True, dataloader_num_workers=0, eval_strategy="steps", eval_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=16), callbacks=callbacks)
    trainer.train()
    return model, trainer


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    # TrainModeAccuracy replays the step's forward pass (dropout included) on the captured dict batch
    cb = ProbeCallback([GradNorm(), WeightNorm(), LearningRate(), TrainModeAccuracy()], sinks=[TensorBoardSink(root / "tb")])
    with_cb, trainer = fit([cb], root / "with")
    without, _ = fit([], root / "without")
    cb.evals = [r for r in cb.records if r.get("event") == "eval"]
    cb.steps = [r for r in cb.records if r.get("event") is None]
    return root, cb, with_cb, trainer, without


def test_weights_bit_identical_with_and_without_the_callback(fits):
    _, cb, with_cb, trainer, without = fits
    assert trainer.state.global_step == STEPS and len(cb.steps) == STEPS
    for (name, a), b in zip(with_cb.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name


def test_probe_values_match_the_trainers_own(fits):
    """after_backward sees the gradient the optimizer uses (after HF's clipping to MAX_GRAD_NORM), at the
    step's learning rate; after_step sees the new weights."""
    _, cb, with_cb, trainer, _ = fits
    hf = {h["step"]: h for h in trainer.state.log_history if "grad_norm" in h}  # HF's pre-clipping norm
    assert sorted(hf) == list(range(1, STEPS + 1))
    clipped = [hf[t + 1]["grad_norm"] * min(1.0, MAX_GRAD_NORM / (hf[t + 1]["grad_norm"] + 1e-6)) for t in range(STEPS)]
    assert any(hf[t]["grad_norm"] > MAX_GRAD_NORM for t in hf) and any(hf[t]["grad_norm"] < MAX_GRAD_NORM for t in hf)
    np.testing.assert_allclose([r["grad_norm/total"] for r in cb.steps], clipped, rtol=1e-5)
    assert [r["lr/0"] for r in cb.steps] == [hf[t + 1]["learning_rate"] for t in range(STEPS)]
    np.testing.assert_allclose([r["loss"] for r in cb.steps], [hf[t + 1]["loss"] for t in range(STEPS)], rtol=1e-6)
    final = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in with_cb.parameters() if p.requires_grad))
    assert cb.steps[-1]["weight_norm/total"] == pytest.approx(final, rel=1e-6)
    assert len({r["weight_norm/total"] for r in cb.steps}) == STEPS  # w_{t+1} of each step, not a stale copy
    assert all(r["train_mode/acc"] * 8 == round(r["train_mode/acc"] * 8) for r in cb.steps)  # batches of 8


def test_values_in_the_log_history_and_the_tensorboard_file(fits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, cb, _, trainer, _ = fits
    ours = [h for h in trainer.state.log_history if "grad_norm/total" in h]
    assert [h["step"] for h in ours] == list(range(1, STEPS + 1))  # HF counts the completed step
    assert ours == [{**{k: v for k, v in scalars(r).items() if k != "loss"}, "step": r["step"] + 1} for r in cb.steps]

    acc = EventAccumulator(str(root / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    expected = {(k, r["step"]): v for r in cb.records for k, v in scalars(r).items()}  # eval records too
    assert set(tb) == set(expected)
    assert all(tb[k] == float(np.float32(v)) for k, v in expected.items())


def test_evaluations_during_training_reach_the_sinks(fits):
    _, cb, _, trainer, _ = fits
    hf = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in hf] == [5, 10]
    assert [(r["step"], r["eval_loss"]) for r in cb.evals] == [(h["step"], h["eval_loss"]) for h in hf]
