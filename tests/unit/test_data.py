import random

import numpy as np
import pytest
import torch

from bnlab import data
from bnlab.errors import UserError


def test_digits_shapes_split_and_standardization():
    tr, te = data.load_pair("digits", seed=0)
    assert tr.x.shape == (1347, 1, 8, 8) and te.x.shape == (450, 1, 8, 8)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert len(tr) + len(te) == 1797
    assert abs(float(tr.x.mean())) < 1e-4 and abs(float(tr.x.std()) - 1) < 1e-3
    # stratified: every class is in both splits in about the same proportion
    ctr, cte = torch.bincount(tr.y, minlength=10), torch.bincount(te.y, minlength=10)
    assert torch.all((ctr.float() / len(tr) - cte.float() / len(te)).abs() < 0.01)


def test_digits_split_is_a_partition_fixed_by_seed():
    from collections import Counter

    from sklearn.datasets import load_digits

    raw = load_digits().data.astype(int)
    tr, te = data.load_pair("digits", seed=3)
    # raw pixels are integers 0..16: undo the (shared, scalar) standardization from the extremes
    lo, hi = float(tr.x.min()), float(tr.x.max())
    rows = lambda d: Counter(map(tuple, np.rint((d.x.reshape(len(d), -1).numpy() - lo) / (hi - lo) * 16).astype(int)))
    assert rows(tr) + rows(te) == Counter(map(tuple, raw))  # every image exactly once
    tr2, _ = data.load_pair("digits", seed=3)
    tr3, _ = data.load_pair("digits", seed=4)
    assert torch.equal(tr.x, tr2.x) and torch.equal(tr.y, tr2.y)
    assert not torch.equal(tr.y, tr3.y)


def test_mnist1d_generated_and_cached_without_touching_global_rngs(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path))
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    tr = data.load("mnist1d", split="train", num_samples=600)
    assert np.array_equal(np.random.get_state()[1], before_np) and random.getstate() == before_py
    assert tr.x.shape == (480, 1, 40) and tr.num_classes == 10
    cached = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(cached) == 1
    te = data.load("mnist1d", split="test", num_samples=600)
    assert te.x.shape == (120, 1, 40)
    # the second load reads the cache: same arrays; a different generator seed gives other data
    again = data.load("mnist1d", split="train", num_samples=600)
    assert torch.equal(tr.x, again.x)
    other = data.load("mnist1d", split="train", num_samples=600, seed=1)
    assert not torch.equal(tr.x, other.x)
    assert len(list((tmp_path / "mnist1d").glob("*.npz"))) == 2


def test_mnist1d_matches_the_package_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path))
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = 300, 7
    ref = make_dataset(args)
    ours = data.load("mnist1d", split="test", num_samples=300, seed=7)
    np.testing.assert_allclose(ours.x[:, 0].numpy(), ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(ours.y.numpy(), ref["y_test"])


def test_synthetic_any_shape_and_seeded():
    a = data.load("synthetic", split="train", in_shape=(3, 5), n=64, num_classes=4, seed=1)
    b = data.load("synthetic", split="train", in_shape=(3, 5), n=64, num_classes=4, seed=1)
    c = data.load("synthetic", split="train", in_shape=(3, 5), n=64, num_classes=4, seed=2)
    assert a.x.shape == (64, 3, 5) and a.y.max() < 4
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert len(torch.unique(a.y)) > 1


def test_batches_cover_each_example_once_and_are_deterministic():
    d = data.load("synthetic", split="train", n=100)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    b1 = list(d.batches(32, generator=g1))
    b2 = list(d.batches(32, generator=g2))
    assert [len(y) for _, y in b1] == [32, 32, 32, 4]
    xs = torch.cat([x for x, _ in b1])
    assert torch.equal(xs.sum(0), d.x.sum(0).to(xs.dtype)) or torch.allclose(xs.sum(0), d.x.sum(0), atol=1e-4)
    assert sorted(map(tuple, xs.reshape(100, -1)[:, :2].tolist())) == sorted(map(tuple, d.x.reshape(100, -1)[:, :2].tolist()))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(b1, b2))
    assert [len(y) for _, y in d.batches(32, drop_last=True, generator=g1)] == [32, 32, 32]
    x_full, y_full = d.full_batch()
    assert x_full.shape[0] == 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="imagenet"), "unknown dataset 'imagenet'; accepted: cifar10, cifar10-synthetic, digits, mnist1d, synthetic"),
    (dict(name="digits", split="val"), "unknown split 'val'; accepted: test, train"),
    (dict(name="digits", bogus=1), "unexpected keyword"),
    (dict(name="synthetic", n=0), "synthetic n must be a finite number > 0"),
])
def test_bad_input_is_a_user_error(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(UserError, match=match):
        data.load(name, **kwargs)


def test_missing_cifar_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--download"):
        data.load("cifar10", split="train", root=tmp_path / "nope")
