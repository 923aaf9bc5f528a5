"""Settings and steps shared by several experiments.

``NetConfig`` and ``SGDConfig`` are bases of experiments' ``Config`` dataclasses (the data, the
network every arm starts from, SGD's settings); an experiment changes a default by declaring the
field again. :func:`make_net` and :func:`train_arm` build and train one arm of an experiment that
compares normalizations on the same initialization and batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from .. import models
from ..data import ArrayData
from ..runs import RunDir
from ..train import make_optimizer, train
from .base import Context


@dataclass(frozen=True)
class NetConfig:
    """The data and the network every arm starts from."""

    data: str = "digits"
    """Dataset (``bnlab list``)."""
    model: str = "convnet"
    """Model (``bnlab list``)."""
    width: int = 16
    """Model width."""
    depth: int = 1
    """Model depth."""
    seed: int = 0
    """Seed of the split, the initialization and the batch order (the same for every arm)."""


@dataclass(frozen=True)
class ResNetConfig(NetConfig):
    """:class:`NetConfig` for Bjorck et al.'s deep residual nets: a pre-activation ResNet on MNIST-1D."""

    data: str = "mnist1d"
    """Dataset (``bnlab list``)."""
    model: str = "preresnet"
    """Model (``bnlab list``): a residual net, as Bjorck et al.'s ResNet-110."""
    depth: int = 26
    """Model depth (weight layers)."""


@dataclass(frozen=True)
class SGDConfig(NetConfig):
    """:class:`NetConfig` and the settings of SGD shared by every arm."""

    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay."""
    batch_size: int = 128
    """Examples per step."""


def arm_records(recs: list[dict], arm: str) -> list[dict]:
    """The per-step records of ``arm`` (no eval or bookkeeping events)."""
    return [r for r in recs if r.get("arm") == arm and "event" not in r]


def make_net(cfg: Any, norm: str, data: ArrayData, *, seed: Optional[int] = None) -> nn.Module:
    """The experiment's model with normalization ``norm``, shaped for ``data``.

    ``cfg`` is any ``Config`` with ``model``, ``width``, ``depth`` and ``seed`` (``landscape``'s and
    ``ics``'s): every arm of one seed starts from the same initialization. ``seed`` overrides
    ``cfg.seed`` (an experiment that repeats its arms over several seeds).
    """
    return models.make(cfg.model, norm=norm, in_shape=data.in_shape, num_classes=data.num_classes,
                       width=cfg.width, depth=cfg.depth, seed=cfg.seed if seed is None else seed)


def train_arm(cfg: Any, run: RunDir, ctx: Context, label: str, arm: str, net: nn.Module, lr: float,
              tr: ArrayData, te: ArrayData, probes: Sequence = (), info: Optional[dict] = None, *,
              seed: Optional[int] = None, eval_every: Optional[int] = None, eval_train: bool = True) -> dict:
    """Train one arm of a Santurkar et al. experiment and record it in ``run``.

    SGD at ``lr`` with ``cfg.momentum`` and ``cfg.weight_decay``, ``cfg.steps`` steps of
    ``cfg.batch_size`` examples of ``tr`` in the order of ``cfg.seed`` (or ``seed``), evaluated on
    ``te`` (and ``tr`` with ``eval_train``) once per epoch (or every ``eval_every`` steps) and at
    the end, with ``probes``. Every record goes to the run's metrics tagged ``"arm": arm``,
    followed by an ``arm_end`` event with the arm's summary.

    Args:
        cfg: a ``Config`` with those fields (``landscape``'s and ``ics``'s).
        run: the run directory.
        ctx: the run's context (device, progress bars).
        label: the progress bar's prefix (the experiment's name).
        arm: the arm's name in the records.
        net: the model (:func:`make_net`).
        lr: the learning rate.
        tr, te: training and test data.
        probes: the probes of the run.
        info: stored with the arm's summary (e.g. ``{"norm": norm}``).
        seed: the batch order's seed, overriding ``cfg.seed``.
        eval_every: steps between evaluations (default: one epoch).
        eval_train: evaluate on the training set too.

    Returns:
        :meth:`bnlab.train.History.summary` followed by ``info``.
    """
    opt = make_optimizer(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    h = train(net, tr, opt, steps=cfg.steps, batch_size=cfg.batch_size, eval_data=te, eval_every=eval_every,
              eval_train=eval_train, device=ctx.device, seed=cfg.seed if seed is None else seed, probes=list(probes),
              log=lambda r: run.append_metrics({"arm": arm, **r}), progress=ctx.bar(f"{label} {arm}"))
    final = {**h.summary(), **(info or {})}
    run.append_metrics({"event": "arm_end", "arm": arm, **final})
    return final
