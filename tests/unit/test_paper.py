"""The paper data pipeline and the CUDA-only speed settings (bnlab.data, bnlab.paper).

Augmentation values are checked against a per-image numpy reference for the same random draws;
the speed settings' guards are checked on the CPU (nothing applies there, and training on the CPU
is bit-identical with the paper settings on or off)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from bnlab import data, models, paper
from bnlab.train import make_optimizer, train


def reference_crop_flip(x: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int, fill) -> np.ndarray:
    """torchvision's RandomCrop(padding=pad, fill) then RandomHorizontalFlip, image by image, in numpy."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        img = np.stack([np.pad(x[i, c], pad, mode="constant", constant_values=fill[c]) for c in range(x.shape[1])])
        oy, ox = offsets[i]
        crop = img[:, oy:oy + x.shape[2], ox:ox + x.shape[3]]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


@pytest.mark.parametrize("pad", [4, 2])
def test_crop_flip_matches_per_image_reference(pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 3, 32, 32)).astype(np.float32)
    gen = torch.Generator().manual_seed(3)
    offsets, flips = data.draw_crop_flip(9, pad=pad, generator=gen)
    assert offsets.min() >= 0 and offsets.max() <= 2 * pad and flips.any() and not flips.all()
    got = data.crop_flip(torch.from_numpy(x), offsets, flips, pad=pad, fill=data.CIFAR10_BLACK).numpy()
    ref = reference_crop_flip(x, offsets.numpy(), flips.numpy(), pad, data.CIFAR10_BLACK)
    np.testing.assert_array_equal(got, ref)


def test_crop_flip_extremes():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    # offset (pad, pad) and no flip is the identity; offset (0, 0) shifts the image down-right by pad
    same = data.crop_flip(x, torch.tensor([[2, 2], [2, 2]]), torch.tensor([False, True]), pad=2)
    assert torch.equal(same[0], x[0]) and torch.equal(same[1], x[1].flip(-1))
    shifted = data.crop_flip(x, torch.tensor([[0, 0], [4, 4]]), torch.tensor([False, False]), pad=2, fill=(-1.0,))
    assert torch.equal(shifted[0, 0, 2:, 2:], x[0, 0, :2, :2]) and (shifted[0, 0, :2] == -1).all()
    assert torch.equal(shifted[1, 0, :2, :2], x[1, 0, 2:, 2:]) and (shifted[1, 0, 2:] == -1).all()


def test_augmented_batches_are_seeded_and_replayable():
    base = data.load("cifar10-synthetic", split="train", n=40)
    aug = data.AugmentedData(base, fill=data.CIFAR10_BLACK)
    a = list(aug.batches(16, generator=torch.Generator().manual_seed(5)))
    b = list(aug.batches(16, generator=torch.Generator().manual_seed(5)))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    # the documented draws: per batch the permutation's slice, then offsets and flips from the same generator
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(40, generator=gen)
    for k, (x, y) in enumerate(a):
        idx = order[16 * k:16 * (k + 1)]
        off, fl = data.draw_crop_flip(len(idx), generator=gen)
        ref = reference_crop_flip(base.x[idx].numpy(), off.numpy(), fl.numpy(), 4, data.CIFAR10_BLACK)
        np.testing.assert_array_equal(x.numpy(), ref)
        assert torch.equal(y, base.y[idx])
    plain = list(aug.batches(16, shuffle=False))  # evaluation passes see the plain images
    assert torch.equal(plain[0][0], base.x[:16])
    moved = aug.to("cpu")
    assert isinstance(moved, data.AugmentedData) and isinstance(aug.subset(8), data.AugmentedData)


def test_synthetic_cifar10_has_cifar_shape_format_and_normalization():
    imgs, labels = data.synthetic_cifar10_images("train", 64, seed=0)
    assert imgs.shape == (64, 3, 32, 32) and imgs.dtype == np.uint8 and labels.dtype == np.int64
    assert set(np.unique(labels)) <= set(range(10)) and len(np.unique(labels)) > 5
    again, _ = data.synthetic_cifar10_images("train", 64, seed=0)
    test, _ = data.synthetic_cifar10_images("test", 64, seed=0)
    assert np.array_equal(imgs, again) and not np.array_equal(imgs, test)
    d = data.load("cifar10-synthetic", split="train", n=64)
    mean, std = np.array(data.CIFAR10_MEAN), np.array(data.CIFAR10_STD)
    expect = (imgs.astype(np.float64) / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(d.x.numpy(), expect, rtol=0, atol=1e-5)
    black = data.normalize_cifar10(np.zeros((1, 3, 32, 32), np.uint8))[0, :, 0, 0]
    np.testing.assert_allclose(black, data.CIFAR10_BLACK, rtol=1e-6)


def test_cifar10_in_smoke_mode_is_synthetic_without_root(tmp_path):
    with paper.use(smoke=True, root=str(tmp_path)):
        tr = data.load("cifar10", split="train")
        te = data.load("cifar10", split="test")
    assert tr.name == te.name == "cifar10-synthetic"
    assert len(tr) == paper.SMOKE_TRAIN and len(te) == paper.SMOKE_TEST and tr.in_shape == (3, 32, 32)
    with paper.use(augment=True, smoke=True, root=str(tmp_path)):
        assert isinstance(data.load("cifar10", split="train"), data.AugmentedData)
        assert not isinstance(data.load("cifar10", split="test"), data.AugmentedData)


def test_cifar10_in_smoke_mode_reads_the_real_set_when_present(tmp_path):
    from tests.unit.test_cifar import write_official_dir

    written = write_official_dir(tmp_path / "cifar-10-batches-py")
    with paper.use(smoke=True, root=str(tmp_path)):
        te = data.load("cifar10", split="test")
    assert te.name == "cifar10"
    imgs, labels = written["test_batch"]
    n = min(len(labels), paper.SMOKE_TEST)
    np.testing.assert_array_equal(te.y.numpy(), np.asarray(labels[:n]))
    np.testing.assert_allclose(te.x.numpy(), data.normalize_cifar10(imgs.reshape(-1, 3, 32, 32)[:n]), atol=0)


def test_paper_profile_without_cifar_is_one_line(tmp_path):
    from bnlab.errors import UserError

    with pytest.raises(UserError) as e:
        paper.require_cifar10(tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "--download" in msg and "cifar-10-python.tar.gz" in msg


# ------------------------------------------------------------------------------------ speed guards


def test_speed_plan_is_empty_on_cpu():
    s = paper.Settings(speed=True, bf16=True, compile=True)
    assert paper.speed_plan("cpu", plain=True, settings=s) == paper.SpeedPlan()
    assert paper.speed_plan(torch.device("cpu"), plain=False, settings=s) == paper.SpeedPlan()


def test_speed_plan_on_cuda_follows_the_rules():
    cuda = torch.device("cuda")  # a device object needs no GPU
    plain = paper.speed_plan(cuda, plain=True, settings=paper.Settings(speed=True, bf16=True, compile=True))
    assert plain == paper.SpeedPlan(channels_last=True, cudnn_benchmark=True, bf16=True, compile=True)
    probed = paper.speed_plan(cuda, plain=False, settings=paper.Settings(speed=True, bf16=True, compile=True))
    assert probed == paper.SpeedPlan(channels_last=False, cudnn_benchmark=True, bf16=False, compile=False)  # probes: float32, eager
    short = paper.speed_plan(cuda, plain=True, settings=paper.Settings(speed=True, compile=True), steps=paper.COMPILE_MIN_STEPS - 1)
    assert short.channels_last and not short.compile  # compiling does not pay on a short run
    off = paper.speed_plan(cuda, plain=True, settings=paper.Settings(speed=True, bf16=False, compile=False))
    assert not off.bf16 and not off.compile
    flat = paper.speed_plan(cuda, plain=True, settings=paper.Settings(speed=True), spatial=False)
    assert not flat.channels_last
    outside = paper.speed_plan(cuda, plain=True, settings=paper.Settings(bf16=True))  # not a paper run: nothing
    assert outside == paper.SpeedPlan()


def test_apply_speed_with_the_cpu_plan_changes_nothing():
    net = torch.nn.Conv2d(3, 4, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fwd, autocast = paper.apply_speed(net, paper.SpeedPlan())
    assert fwd is net and isinstance(autocast(), contextlib.nullcontext)
    assert net.weight.is_contiguous() and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 8, 8)
    assert paper.to_channels_last(x, paper.SpeedPlan()) is x
    y = paper.to_channels_last(x, paper.SpeedPlan(channels_last=True))
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    net.to(memory_format=torch.channels_last)
    paper.restore_layout(net, paper.SpeedPlan(channels_last=True))
    assert net.weight.is_contiguous() and torch.equal(net.weight, before["weight"])


def test_cpu_training_is_unchanged_by_the_paper_settings():
    tr = data.load("cifar10-synthetic", split="train", n=48)

    def run(ctx):
        net = models.make("convnet", norm="bn", in_shape=(3, 32, 32), num_classes=10, width=4, seed=0)
        opt = make_optimizer(net.parameters(), lr=0.1, momentum=0.9)
        with ctx:
            train(net, tr, opt, steps=3, batch_size=16, device="cpu", eval_train=False)
        return net

    a = run(contextlib.nullcontext())
    b = run(paper.use(speed=True, bf16=True, compile=True))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------------ smoke caps


def test_smoke_caps_steps_and_evaluations():
    tr = data.load("synthetic", split="train", n=200, in_shape=(1, 4, 4))
    net = models.make("mlp", norm="bn", in_shape=(1, 4, 4), num_classes=10, width=8, depth=2, seed=0)
    with paper.use(smoke=True):
        h = train(net, tr, make_optimizer(net.parameters(), lr=0.1), steps=50, batch_size=16, device="cpu")
        assert paper.cap_steps(50) == paper.SMOKE_STEPS and paper.eval_cap(1000) == paper.SMOKE_EVAL
    assert h.steps == paper.SMOKE_STEPS
    assert paper.cap_steps(50) == 50 and paper.eval_cap(1000) == 1000


def test_smoke_config_applies_an_experiments_cuts_after_the_rules():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class C:
        lrs: tuple = (1e-3, 1e-2, 1e-1)
        seeds: tuple = (0, 1, 2)
        steps: int = 1000
        width: int = 64

    paper_cfg, tiny_cfg = C(), C(seeds=(0, 1), steps=10, width=4)
    plain = paper.smoke_config(paper_cfg, tiny_cfg)
    assert plain == C(lrs=(1e-3, 1e-2, 1e-1), seeds=(0, 1), steps=paper.SMOKE_STEPS, width=64)
    cut = paper.smoke_config(paper_cfg, tiny_cfg, {"lrs": lambda v: (v[0], v[-1]), "seeds": lambda v: v[:1]})
    assert cut == dataclasses.replace(plain, lrs=(1e-3, 1e-1), seeds=(0,))  # the rest as the rules give it
    from bnlab.experiments.runner import resolve

    s, _ = resolve("auto-rate", "paper", smoke=True)  # auto-rate's cuts reach the run's Config
    assert s.seeds == (0,) and s.si_lrs == (1e-2, 1e4) and s.identity_lrs == (1e-2,) and s.model == "vgg" and s.depth == 16
    assert resolve("auto-rate", "paper")[0].si_lrs == (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # no cut without --smoke
