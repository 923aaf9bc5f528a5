"""``large-lr``: BatchNorm lets the same net train at a learning rate where the plain net fails.

The same convnet, with and without BatchNorm, trained with SGD + momentum at a small and at a
large learning rate on the same data and seed. This is the simplest face of the claims of
Santurkar et al. (2018) ("BN tolerates larger LRs, e.g. 0.5 where the plain net fails") and
Bjorck et al. (2018) ("BN is what allows large learning rates without divergence").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import data as data_mod
from .. import models
from ..plotting import learning_curves
from ..runs import RunDir
from ..train import make_optimizer, train
from .base import Claim, Context, Experiment, fmt, register_experiment, verdict
from .common import SGDConfig


@dataclass(frozen=True)
class Config(SGDConfig):
    """What ``large-lr`` trains (hashed: names the run)."""

    norms: tuple[str, ...] = ("bn", "none")
    """The normalizations compared; ``bn`` and ``none`` are the ones judged."""
    small_lr: float = 0.02
    """The small learning rate, where both nets should train."""
    large_lr: float = 0.5
    """The large learning rate, where only BN should train."""
    epochs: float = 10.0
    """Passes over the training set per run."""


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``large-lr``'s decision rules."""

    bn_min_acc: float = 0.9
    """A net "trains" when its final test accuracy reaches this (10 classes: chance is 10%)."""
    plain_max_acc: float = 0.5
    """The plain net "fails" at the large LR when it diverges or ends at or below this accuracy."""
    small_lr_slack: float = 0.1
    """At the small LR both nets must reach ``bn_min_acc - small_lr_slack``."""


@register_experiment
class LargeLR(Experiment):
    name = "large-lr"
    title = "Large learning rates: BatchNorm trains where the plain net fails"
    source = "Santurkar et al. 2018; Bjorck et al. 2018"
    description = (
        "The same convnet with and without BatchNorm, SGD with momentum, at a small and at a large "
        "learning rate. Learning curves of all four runs; test accuracy at the end."
    )
    claims = (
        Claim("bn-trains-at-large-lr", "With BatchNorm the net trains at the large learning rate.", "Santurkar et al. 2018",
              "final test accuracy of the BN net at large_lr", "holds if >= bn_min_acc"),
        Claim("plain-fails-at-large-lr", "Without normalization the same net fails at that learning rate.", "Bjorck et al. 2018",
              "final test accuracy of the plain net at large_lr (diverged counts as failed)", "holds if diverged or <= plain_max_acc"),
        Claim("both-train-at-small-lr", "At a small learning rate both nets train.", "Bjorck et al. 2018",
              "final test accuracy of both nets at small_lr", "holds if both >= bn_min_acc - small_lr_slack"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(width=4, epochs=2.0),
        "quick": Config(),
        "paper": Config(data="cifar10", model="vgg", width=64, depth=11, small_lr=0.01, epochs=30.0),
    }
    thresholds = {"paper": Thresholds(bn_min_acc=0.8)}

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
        final: dict = {}
        for lr_name in ("small_lr", "large_lr"):
            lr = getattr(cfg, lr_name)
            for norm in cfg.norms:
                arm = f"{norm}@{lr_name}"
                net = models.make(cfg.model, norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                                  width=cfg.width, depth=cfg.depth, seed=cfg.seed)
                opt = make_optimizer(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                h = train(net, tr, opt, epochs=cfg.epochs, batch_size=cfg.batch_size, eval_data=te, device=ctx.device,
                          seed=cfg.seed, log=lambda r, arm=arm: run.append_metrics({"arm": arm, **r}),
                          progress=ctx.bar(f"{self.name} {arm}"))
                final[arm] = {**h.summary(), "norm": norm, "lr": lr}
        return {"arms": final, "small_lr": cfg.small_lr, "large_lr": cfg.large_lr, "norms": list(cfg.norms)}

    def judge(self, summary: dict, th: Thresholds) -> list:
        arms = summary["arms"]
        big_bn, big_plain = arms.get("bn@large_lr"), arms.get("none@large_lr")
        out = []
        if big_bn is not None:
            acc = big_bn["test_acc"]
            out.append(verdict("bn-trains-at-large-lr", (not big_bn["diverged"]) and acc >= th.bn_min_acc, acc,
                               f"BN net at lr {fmt(summary['large_lr'])}: test accuracy {acc:.1%}",
                               f"not diverged and test accuracy ≥ {th.bn_min_acc:.0%}"))
        if big_plain is not None:
            acc = big_plain["test_acc"]
            failed = big_plain["diverged"] or not (acc > th.plain_max_acc)
            how = f"diverged at step {big_plain['diverged_at']}" if big_plain["diverged"] else f"test accuracy {acc:.1%}"
            out.append(verdict("plain-fails-at-large-lr", failed, acc, f"plain net at lr {fmt(summary['large_lr'])}: {how}",
                               f"diverged or test accuracy ≤ {th.plain_max_acc:.0%}"))
        small = [arms[f"{n}@small_lr"] for n in summary["norms"] if f"{n}@small_lr" in arms]
        if small:
            accs = [s["test_acc"] for s in small]
            floor = th.bn_min_acc - th.small_lr_slack
            ok = all(math.isfinite(a) and a >= floor for a in accs)
            out.append(verdict("both-train-at-small-lr", ok, min(accs),
                               f"at lr {fmt(summary['small_lr'])}: " + ", ".join(f"{s['norm']} {s['test_acc']:.1%}" for s in small),
                               f"every net's test accuracy ≥ {floor:.0%}"))
        return out

    def figures(self, run: RunDir):
        cfg = run.read_json("config.json")["config"]
        recs = run.metrics()
        arms = []
        for lr_name, ls in (("small_lr", "--"), ("large_lr", "-")):
            for norm in cfg["norms"]:
                arm = f"{norm}@{lr_name}"
                steps = [r for r in recs if r.get("arm") == arm and r.get("event") != "eval" and "loss" in r]
                evals = [r for r in recs if r.get("arm") == arm and r.get("event") == "eval"]
                div = next((r["step"] for r in steps if r.get("diverged")), None)
                arms.append({
                    "label": f"{'BN' if norm == 'bn' else norm}, lr {cfg[lr_name]}", "norm": norm, "linestyle": ls,
                    "steps": [r["step"] for r in steps], "loss": [r["loss"] for r in steps],
                    "eval_steps": [r["step"] for r in evals], "test_acc": [r.get("test_acc", float("nan")) for r in evals],
                    "diverged_at": div,
                })
        title = f"{cfg['model']} on {cfg['data']}, SGD momentum {cfg['momentum']}"
        return [learning_curves(arms, run.figure_path("learning_curves.png"), title=title)]
