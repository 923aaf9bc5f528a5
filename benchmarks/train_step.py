"""Milliseconds per training step of the digits convnet, with and without BatchNorm.

Run:  .venv/bin/python benchmarks/train_step.py [--threads 1]

Prints, measured in one run: ms/step of ``bnlab.train`` (with no probes, and with the cheap
probes), of a bare hand-written PyTorch loop doing the same work (the naive floor), and the
ratios: BN over no norm, and bnlab's loop over the bare loop.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from bnlab import data, models
from bnlab.probes import GradNorm, LearningRate, WeightNorm
from bnlab.train import make_optimizer, train

STEPS, REPEATS, BATCH = 60, 5, 128


def bare_loop(norm: str, tr) -> float:
    net = models.make("convnet", norm=norm, in_shape=tr.in_shape, num_classes=10, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    batches = []
    while len(batches) < STEPS:
        batches += list(tr.batches(BATCH, generator=gen))
    t0 = time.perf_counter()
    for x, y in batches[:STEPS]:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / STEPS * 1e3


def bnlab_loop(norm: str, tr, probes=()) -> float:
    net = models.make("convnet", norm=norm, in_shape=tr.in_shape, num_classes=10, seed=0)
    opt = make_optimizer(net.parameters(), lr=0.05, momentum=0.9)
    h = train(net, tr, opt, steps=STEPS, batch_size=BATCH, device="cpu", eval_every=10**9, eval_train=False, probes=probes)
    return h.seconds / STEPS * 1e3


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="ms per training step, BN vs no norm, bnlab's loop vs a bare loop")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tr = data.load("digits", split="train")
    torch.manual_seed(0)
    bare_loop("bn", tr)  # warm-up
    cases = {}
    for norm in ("bn", "none"):
        cases[(norm, "bare")] = lambda norm=norm: bare_loop(norm, tr)
        cases[(norm, "bnlab")] = lambda norm=norm: bnlab_loop(norm, tr)
        cases[(norm, "bnlab+cheap probes")] = lambda norm=norm: bnlab_loop(norm, tr, [GradNorm(), WeightNorm(), LearningRate()])
    times: dict = {k: [] for k in cases}
    for _ in range(REPEATS):  # round-robin, so that drifts in machine load hit every case alike
        for k, fn in cases.items():
            times[k].append(fn())
    rows = {k: statistics.median(v) for k, v in times.items()}
    print(f"convnet on digits, batch {BATCH}, {STEPS} steps x {REPEATS} repeats (median), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'loop':<22}{'BN ms/step':>12}{'none ms/step':>14}{'BN / none':>11}")
    for label in ("bare", "bnlab", "bnlab+cheap probes"):
        b, n = rows[("bn", label)], rows[("none", label)]
        print(f"{label:<22}{b:>12.2f}{n:>14.2f}{b / n:>11.2f}")
    for norm in ("bn", "none"):
        print(f"bnlab loop / bare loop ({norm}): {rows[(norm, 'bnlab')] / rows[(norm, 'bare')]:.2f}x;  with cheap probes: "
              f"{rows[(norm, 'bnlab+cheap probes')] / rows[(norm, 'bare')]:.2f}x")


if __name__ == "__main__":
    main()
