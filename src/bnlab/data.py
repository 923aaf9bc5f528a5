"""Datasets held in memory, with a fast batch iterator and a full-batch mode.

``load(name, split=..., ...)`` returns an :class:`ArrayData` of standardized float32 inputs of
shape ``(N, C, *spatial)`` and int64 labels:

=============  ==================  ================================================================
name           shape               source
=============  ==================  ================================================================
``digits``     (N, 1, 8, 8)        scikit-learn's 8x8 digits (1797 images, shipped with sklearn);
                                   stratified train/test split fixed by ``seed``.
``mnist1d``    (N, 1, 40)          generated procedurally by the ``mnist1d`` package (never its
                                   download path); cached under the user cache dir.
``cifar10``    (N, 3, 32, 32)      the official "python version" files in a local directory; read
                                   with a loader that cannot execute code; ``download=True`` fetches.
``synthetic``  (N, *in_shape)      a seeded random teacher network labels Gaussian inputs; for tests.
``cifar10-     (N, 3, 32, 32)      a stand-in with CIFAR-10's shape, uint8 format and normalization
synthetic``                        (:func:`synthetic_cifar10_images`); smoke runs and benchmarks.
=============  ==================  ================================================================

The paper pipeline (:mod:`bnlab.paper`): ``cifar10``'s training split with ``augment=True`` is an
:class:`AugmentedData`, the whole set one tensor on the device, each shuffled batch randomly
cropped (4-pixel padding) and flipped by :func:`crop_flip`, batched tensor indexing with draws from
the batch order's generator; a smoke run's ``cifar10`` is a few hundred images (the real ones when
present, else the synthetic stand-in).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ._io import atomic_write_bytes
from ._paths import cache_dir
from .errors import UserError, check_positive, check_seed, unknown_name

SPLITS = ("train", "test")


@dataclass
class ArrayData:
    """A labelled dataset in memory.

    Attributes:
        x: inputs, float tensor ``(N, C, *spatial)``.
        y: labels, int64 tensor ``(N,)``.
        num_classes: number of classes.
        name: dataset name; ``split``: ``"train"`` or ``"test"``.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = "data"
    split: str = "train"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 8, 8)``."""
        return tuple(self.x.shape[1:])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ArrayData":
        """A copy on ``device`` with inputs cast to ``dtype`` (labels stay int64)."""
        return ArrayData(self.x.to(device=device, dtype=dtype), self.y.to(device), self.num_classes, self.name, self.split)

    def subset(self, n: int) -> "ArrayData":
        """The first ``n`` examples."""
        return ArrayData(self.x[:n], self.y[:n], self.num_classes, self.name, self.split)

    def full_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set as one batch, for full-batch gradient descent."""
        return self.x, self.y

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x, y)`` minibatches by indexing the in-memory tensors (no workers).

        Args:
            batch_size: examples per batch; ``batch_size >= len(self)`` gives one full batch.
            shuffle: draw a fresh permutation from ``generator`` (deterministic for a seeded one).
            drop_last: drop a final batch smaller than ``batch_size``.
        """
        n = len(self)
        check_positive("batch size", batch_size)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.x.device)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size and start > 0:
                return
            if shuffle:
                idx = order[start:stop]
                yield self.x[idx], self.y[idx]
            else:
                yield self.x[start:stop], self.y[start:stop]

    def stream(self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False,
               full_batch: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(x, y)`` minibatches: epoch after epoch of :meth:`batches` (shuffled with
        ``generator``), or the whole set every time with ``full_batch``. The one batch stream of
        :func:`bnlab.train.train`, :func:`bnlab.sweep.sweep` and the lockstep trainer."""
        while True:
            if full_batch:
                yield self.full_batch()
            else:
                yield from self.batches(batch_size, shuffle=True, generator=generator, drop_last=drop_last)

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        if drop_last and n >= batch_size:
            return n // batch_size
        return -(-n // batch_size)


class FixedBatches(ArrayData):
    """A training set cut once into fixed batches; each epoch visits them in a fresh random order.

    SGD over it is an unbiased sampler of the finite-sum objective ``L(θ) = Σ_k |B_k|/N · L_{B_k}(θ)``
    over the one partition ``B_1, …, B_K`` (with BatchNorm each ``L_{B_k}`` is computed with the
    statistics of its own batch, and is scale-invariant in the weights feeding BN): the setting of
    the SGD theorem of Arora, Li, Lyu (2019), and a function whose gradient :meth:`fixed` lets one
    evaluate exactly. With ordinary reshuffling every epoch makes new batches, so BN's batch
    statistics make SGD minimize an expectation over random partitions, which no fixed set of
    batches evaluates.

    :meth:`batches` with this set's ``batch_size`` yields the partition's batches (shuffled with
    ``generator``, or in partition order); with any other batch size (an evaluation pass) it yields
    the plain set in order, like :class:`ArrayData`.

    Args:
        data: the training set.
        batch_size: examples per batch (the last batch may be smaller).
        seed: seeds the one partition.
        order: the permutation of ``range(len(data))`` that defines the partition (default: drawn
            from ``seed``); consecutive runs of ``batch_size`` indices form the batches.

    Example:
        >>> tr = load("synthetic", n=50, in_shape=(1, 4, 4))
        >>> fb = FixedBatches(tr, 16, seed=1)
        >>> [len(y) for _, y in fb.fixed()], fb.steps_per_epoch(16)
        ([16, 16, 16, 2], 4)
    """

    def __init__(self, data: ArrayData, batch_size: int, seed: int = 0, *, order: torch.Tensor | None = None):
        super().__init__(data.x, data.y, data.num_classes, data.name, data.split)
        check_positive("batch size", batch_size)
        n = len(data)
        self.order = order if order is not None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.batch_size = int(batch_size)
        self.slices = [self.order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FixedBatches":
        """A copy on ``device`` (inputs cast to ``dtype``) with the same partition."""
        moved = ArrayData(self.x, self.y, self.num_classes, self.name, self.split).to(device, dtype)
        return FixedBatches(moved, self.batch_size, order=self.order.to(moved.x.device))

    def fixed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches ``(x_k, y_k)`` of the partition, in partition order."""
        return [(self.x[i], self.y[i]) for i in self.slices]

    def batches(self, batch_size: int, *, shuffle: bool = True, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: the partition's batches in a random order (``shuffle``, from ``generator``)
        or in partition order; for another ``batch_size``, the plain set in order (``drop_last``
        is ignored: the partition is fixed)."""
        if batch_size != self.batch_size:  # evaluation passes use their own batch size: plain order
            yield from super().batches(batch_size, shuffle=False)
            return
        ks = torch.randperm(len(self.slices), generator=generator).tolist() if shuffle else range(len(self.slices))
        for k in ks:
            i = self.slices[k]
            yield self.x[i], self.y[i]

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self.slices) if batch_size == self.batch_size else super().steps_per_epoch(batch_size, drop_last)


# ------------------------------------------------------------------------------------ datasets
DATASETS: dict[str, Callable[..., ArrayData]] = {}


def register_dataset(name: str):
    """Decorator adding a loader ``fn(split, root, seed, **options) -> ArrayData`` to the registry."""

    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def load(name: str, *, split: str = "train", root=None, seed: int = 0, **options) -> ArrayData:
    """Load a dataset split into memory.

    Args:
        name: one of ``bnlab.data.DATASETS`` (``digits``, ``mnist1d``, ``cifar10``, ``synthetic``).
        split: ``"train"`` or ``"test"``.
        root: directory for datasets read from disk (cifar10); ``None`` uses the default data dir.
        seed: fixes the train/test split (digits) or the generator (mnist1d, synthetic).
        **options: loader-specific, e.g. ``download=True`` (cifar10), ``num_samples`` (mnist1d),
            ``n``, ``in_shape``, ``num_classes`` (synthetic).

    Returns:
        ArrayData with standardized float32 inputs.

    Raises:
        UserError: unknown name or split, bad option, missing or corrupt data.

    Example:
        >>> train = load("digits", split="train")
        >>> train.x.shape
        torch.Size([1347, 1, 8, 8])
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    check_seed(seed)
    try:
        return DATASETS[name](split=split, root=root, seed=seed, **options)
    except TypeError as e:  # an option the loader does not take
        if "unexpected keyword" in str(e):
            raise UserError(f"dataset {name!r}: {e}".replace("\n", " ")) from None
        raise


def load_pair(name: str, **kwargs) -> tuple[ArrayData, ArrayData]:
    """``(train, test)`` of one dataset with the same options."""
    kwargs.pop("split", None)
    return load(name, split="train", **kwargs), load(name, split="test", **kwargs)


def _to_data(x: np.ndarray, y: np.ndarray, num_classes: int, name: str, split: str) -> ArrayData:
    return ArrayData(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64)), num_classes, name, split)


@register_dataset("digits")
def _load_digits(*, split: str, root=None, seed: int = 0, test_fraction: float = 0.25) -> ArrayData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    ds = load_digits()
    x = ds.data.reshape(-1, 1, 8, 8).astype(np.float64)
    y = ds.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    mean, std = x_tr.mean(), x_tr.std()  # one scalar: many border pixels are constant
    x_sel, y_sel = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return _to_data((x_sel - mean) / std, y_sel, 10, "digits", split)


def _mnist1d_arrays(gen_args: dict) -> dict[str, np.ndarray]:
    """Generate (or read from the cache) MNIST-1D with the package's procedural generator."""
    key = hashlib.sha256(json.dumps(gen_args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "mnist1d" / f"mnist1d-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:
            pass  # a damaged cache entry is regenerated
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for k, v in gen_args.items():
        setattr(args, k, v)
    # make_dataset seeds numpy's and python's global RNGs: leave the caller's state untouched.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # a read-only cache is not an error
    return arrays


@register_dataset("mnist1d")
def _load_mnist1d(*, split: str, root=None, seed: int = 0, num_samples: int = 5000, train_split: float = 0.8, shuffle_seq: bool = False) -> ArrayData:
    check_positive("mnist1d num_samples", num_samples)
    if not 0.0 < train_split < 1.0:
        raise UserError(f"mnist1d: train_split must be in (0, 1), got {train_split!r}")
    arrays = _mnist1d_arrays({"num_samples": int(num_samples), "train_split": float(train_split), "seed": int(seed), "shuffle_seq": bool(shuffle_seq)})
    x, y = (arrays["x"], arrays["y"]) if split == "train" else (arrays["x_test"], arrays["y_test"])
    return _to_data(x[:, None, :], y, 10, "mnist1d", split)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_BLACK = tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
"""A black pixel (0) after CIFAR-10's normalization, per channel: what a 4-pixel pad adds."""


def normalize_cifar10(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(N, 3, 32, 32)`` to float32 ``(x / 255 - mean_c) / std_c`` (CIFAR-10's statistics)."""
    x = images.astype(np.float32) / 255.0
    return (x - np.array(CIFAR10_MEAN, np.float32)[:, None, None]) / np.array(CIFAR10_STD, np.float32)[:, None, None]


def synthetic_cifar10_images(split: str = "train", n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for CIFAR-10 with its shape and format: uint8 images ``(n, 3, 32, 32)`` and labels 0..9.

    Each class has a random smooth colour pattern (a 4x4 grid of colours, upsampled); an image is
    its class's pattern shifted by up to 4 pixels, mixed with uniform pixel noise, rounded to
    uint8. Learnable, but nothing like natural images: for smoke runs and benchmarks only.
    ``n`` defaults to CIFAR-10's split size (50000 train, 10000 test); the two splits are disjoint
    draws of one seeded generator.
    """
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    n = (50000 if split == "train" else 10000) if n is None else int(n)
    check_positive("synthetic cifar10 n", n)
    rng = np.random.default_rng([seed, 0])
    templates = np.kron(rng.uniform(0, 255, (10, 3, 4, 4)), np.ones((1, 1, 8, 8)))  # (10, 3, 32, 32)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    labels = rng.integers(0, 10, n)
    shifts = rng.integers(-4, 5, (n, 2))
    noise = rng.uniform(0, 255, (n, 3, 32, 32))
    images = np.empty((n, 3, 32, 32), np.uint8)
    for k in range(10):  # per class, not per image
        idx = np.nonzero(labels == k)[0]
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                sel = idx[(shifts[idx, 0] == dy) & (shifts[idx, 1] == dx)]
                if sel.size:
                    shifted = np.roll(templates[k], (dy, dx), axis=(1, 2))
                    images[sel] = np.rint(0.6 * shifted + 0.4 * noise[sel]).astype(np.uint8)
    return images, labels.astype(np.int64)


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, *, pad: int = 4, fill=None) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a batch, as tensor operations (no per-image Python).

    Image ``i`` is padded by ``pad`` pixels of ``fill`` (per channel; default 0) on every side, the
    ``H x W`` window at row ``offsets[i, 0]``, column ``offsets[i, 1]`` (each in ``0..2 pad``) is cut
    out, and its columns are reversed when ``flips[i]``:
    ``out[i, c, r, k] = padded[i, c, offsets[i,0] + r, offsets[i,1] + (W-1-k if flips[i] else k)]``.

    Args:
        x: ``(B, C, H, W)`` images.
        offsets: ``(B, 2)`` integer crop offsets.
        flips: ``(B,)`` booleans.
        pad: the padding width.
        fill: ``C`` pad values (e.g. :data:`CIFAR10_BLACK` for normalized CIFAR-10), or ``None`` for 0.
    """
    b, c, h, w = x.shape
    padded = x.new_zeros((b, c, h + 2 * pad, w + 2 * pad))
    if fill is not None:
        padded += torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    offsets = offsets.to(x.device)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips.to(x.device).view(b, 1), cols.flip(1), cols)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def draw_crop_flip(b: int, *, pad: int = 4, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of :func:`crop_flip` for ``b`` images: offsets uniform in ``0..2 pad`` (rows,
    then columns), then flips with probability 1/2, from ``generator`` (on the CPU: the same draws
    on every device)."""
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    flips = torch.randint(0, 2, (b,), generator=generator).bool()
    return offsets, flips


class AugmentedData(ArrayData):
    """A training set whose shuffled batches are augmented: the standard CIFAR-10 augmentation.

    The whole set stays a tensor on its device (``.to(device)``); each batch that
    :meth:`batches` draws with ``shuffle=True`` gets a random crop with ``pad``-pixel padding and a
    random horizontal flip (:func:`crop_flip`), with draws from the batch order's ``generator``
    (so a seeded run is reproducible, and replaying the stream replays the augmentation).
    Unshuffled passes (evaluation) see the plain images.

    Args:
        data: the training set.
        pad: the padding width (4: the standard augmentation).
        fill: the pad value per channel in the data's units (normalized black for CIFAR-10).
    """

    def __init__(self, data: ArrayData, *, pad: int = 4, fill=None):
        super().__init__(data.x, data.y, data.num_classes, data.name, data.split)
        self.pad = int(pad)
        self.fill = tuple(fill) if fill is not None else None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "AugmentedData":
        return AugmentedData(ArrayData.to(self, device, dtype), pad=self.pad, fill=self.fill)

    def subset(self, n: int) -> "AugmentedData":
        return AugmentedData(ArrayData.subset(self, n), pad=self.pad, fill=self.fill)

    def batches(self, batch_size: int, *, shuffle: bool = True, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in super().batches(batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last):
            if shuffle:
                offsets, flips = draw_crop_flip(x.shape[0], pad=self.pad, generator=generator)
                x = crop_flip(x, offsets, flips, pad=self.pad, fill=self.fill)
            yield x, y


def _cifar10_data(images: np.ndarray, labels: np.ndarray, split: str, name: str, augment: bool) -> ArrayData:
    data = _to_data(normalize_cifar10(images), labels, 10, name, split)
    return AugmentedData(data, pad=4, fill=CIFAR10_BLACK) if augment and split == "train" else data


@register_dataset("cifar10")
def _load_cifar10(*, split: str, root=None, seed: int = 0, download: bool = False, augment: bool | None = None) -> ArrayData:
    """CIFAR-10 from ``root`` (default: the paper settings' root, else the data dir).

    In a smoke run (:mod:`bnlab.paper`) the first ``SMOKE_TRAIN``/``SMOKE_TEST`` images of the
    real set when it is in ``root``, else :func:`synthetic_cifar10_images` (named
    ``cifar10-synthetic``). ``augment`` (default: the paper settings'): the training split is an
    :class:`AugmentedData`.
    """
    from . import paper
    from ._cifar import load_cifar10

    settings = paper.current()
    where = paper.cifar10_root(root)
    augment = settings.augment if augment is None else bool(augment)
    if settings.smoke:
        n = paper.SMOKE_TRAIN if split == "train" else paper.SMOKE_TEST
        if paper.cifar10_present(where):
            images, labels = load_cifar10(where, split)
            return _cifar10_data(images[:n], labels[:n], split, "cifar10", augment)
        images, labels = synthetic_cifar10_images(split, n, seed=0)
        return _cifar10_data(images, labels, split, "cifar10-synthetic", augment)
    images, labels = load_cifar10(where, split, download=download or settings.download)
    return _cifar10_data(images, labels, split, "cifar10", augment)


@register_dataset("cifar10-synthetic")
def _load_synthetic_cifar10(*, split: str, root=None, seed: int = 0, n: int | None = None, augment: bool = False) -> ArrayData:
    """:func:`synthetic_cifar10_images` normalized like CIFAR-10 (50000/10000 images by default)."""
    images, labels = synthetic_cifar10_images(split, n, seed=seed)
    return _cifar10_data(images, labels, split, "cifar10-synthetic", augment)


@register_dataset("synthetic")
def _load_synthetic(
    *, split: str, root=None, seed: int = 0, n: int = 512, n_test: int | None = None, in_shape=(1, 8, 8), num_classes: int = 10, hidden: int = 32
) -> ArrayData:
    """Gaussian inputs labelled by a random two-layer tanh teacher: ``y = argmax(tanh(x W1) W2)``."""
    check_positive("synthetic n", n)
    if num_classes < 2:
        raise UserError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    in_shape = tuple(int(s) for s in in_shape)
    if not in_shape or any(s < 1 for s in in_shape):
        raise UserError(f"synthetic: in_shape must be positive sizes like (1, 8, 8), got {in_shape}")
    n_test = n // 4 if n_test is None else n_test
    rng = np.random.default_rng(seed)
    d = int(np.prod(in_shape))
    w1 = rng.standard_normal((d, hidden)) / np.sqrt(d)
    w2 = rng.standard_normal((hidden, num_classes))
    x = rng.standard_normal((n + n_test, d))
    y = np.argmax(np.tanh(x @ w1 * 2.0) @ w2, axis=1)
    sl = slice(0, n) if split == "train" else slice(n, n + n_test)
    return _to_data(x[sl].reshape(-1, *in_shape), y[sl], num_classes, "synthetic", split)
