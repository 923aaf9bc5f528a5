"""``large-lr``: BatchNorm lets the same net train at a learning rate where the plain net fails.

The same convnet, with and without BatchNorm, trained with SGD + momentum at a small and at a
large learning rate on the same data and seed. This is the simplest face of the claims of
Santurkar et al. (2018) ("BN tolerates larger LRs, e.g. 0.5 where the plain net fails") and
Bjorck et al. (2018) ("BN is what allows large learning rates without divergence").
"""

from __future__ import annotations

import math

import torch

from .. import data as data_mod
from .. import models
from ..plotting import learning_curves
from ..runs import RunDir
from ..train import make_optimizer, train
from . import Claim, Experiment, Result, judge, register_experiment

_BASE = dict(
    data="digits", model="convnet", width=16, depth=1, norms=["bn", "none"], small_lr=0.02, large_lr=0.5,
    momentum=0.9, weight_decay=0.0, batch_size=128, epochs=10.0, seed=0, bn_min_acc=0.9, plain_max_acc=0.5,
)


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
              "final test accuracy of the BN net at large_lr", "holds if >= bn_min_acc (default 90%)"),
        Claim("plain-fails-at-large-lr", "Without normalization the same net fails at that learning rate.", "Bjorck et al. 2018",
              "final test accuracy of the plain net at large_lr (diverged counts as failed)", "holds if diverged or <= plain_max_acc (default 50%)"),
        Claim("both-train-at-small-lr", "At a small learning rate both nets train.", "Bjorck et al. 2018",
              "final test accuracy of both nets at small_lr", "holds if both >= bn_min_acc - 10 points"),
    )
    profiles = {
        "tiny": {**_BASE, "width": 4, "epochs": 2.0},
        "quick": dict(_BASE),
        "paper": {**_BASE, "data": "cifar10", "model": "vgg", "width": 64, "depth": 11, "small_lr": 0.01, "epochs": 30.0, "bn_min_acc": 0.8},
    }

    def run(self, cfg: dict, run: RunDir, *, device: str = "auto", progress: bool = True) -> Result:
        tr, te = data_mod.load_pair(cfg["data"], seed=cfg["seed"])
        final: dict = {}
        for lr_name in ("small_lr", "large_lr"):
            for norm in cfg["norms"]:
                arm = f"{norm}@{lr_name}"
                net = models.make(cfg["model"], norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes,
                                  width=cfg["width"], depth=cfg["depth"], seed=cfg["seed"])
                opt = make_optimizer(net.parameters(), lr=cfg[lr_name], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
                h = train(net, tr, opt, epochs=cfg["epochs"], batch_size=cfg["batch_size"], eval_data=te, device=device,
                          seed=cfg["seed"], log=lambda r, arm=arm: run.write({"arm": arm, **r}),
                          progress=f"{self.name} {arm}" if progress else False)
                final[arm] = {**h.summary(), "norm": norm, "lr": cfg[lr_name]}
        big_bn, big_plain = final.get(f"bn@large_lr"), final.get(f"none@large_lr")
        verdicts = []
        if big_bn is not None:
            acc = big_bn["test_acc"]
            verdicts.append(judge("bn-trains-at-large-lr", (not big_bn["diverged"]) and acc >= cfg["bn_min_acc"], acc,
                                  f"BN net at lr {cfg['large_lr']}: test accuracy {acc:.1%} (threshold {cfg['bn_min_acc']:.0%})"))
        if big_plain is not None:
            acc = big_plain["test_acc"]
            failed = big_plain["diverged"] or not (acc > cfg["plain_max_acc"])
            how = f"diverged at step {big_plain['diverged_at']}" if big_plain["diverged"] else f"test accuracy {acc:.1%}"
            verdicts.append(judge("plain-fails-at-large-lr", failed, acc, f"plain net at lr {cfg['large_lr']}: {how} (threshold {cfg['plain_max_acc']:.0%})"))
        small = [final[f"{n}@small_lr"] for n in cfg["norms"] if f"{n}@small_lr" in final]
        if small:
            accs = [s["test_acc"] for s in small]
            ok = all(math.isfinite(a) and a >= cfg["bn_min_acc"] - 0.1 for a in accs)
            verdicts.append(judge("both-train-at-small-lr", ok, min(accs),
                                  "at lr {}: ".format(cfg["small_lr"]) + ", ".join(f"{s['norm']} {s['test_acc']:.1%}" for s in small)))
        return Result(summary={"arms": final}, verdicts=verdicts)

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
