"""bnlab's probes on a plain PyTorch training loop (no bnlab.train).

Run:  python examples/custom_loop.py [--steps 50]

The Monitor hooks the optimizer's step: inside ``with monitor.step(batch)`` the probes read the
gradient just before ``optimizer.step()`` and the new weights just after it. The probes never
change the training: the weights are bit-identical with and without them.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.data import load
from bnlab.monitor import Monitor
from bnlab.probes import GradNorm, LearningRate, WeightNorm


def main(steps: int = 50, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    train = load("digits", split="train")
    model = nn.Sequential(  # any model of your own
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records: list[dict] = []
    monitor = Monitor(model, optimizer, probes=[GradNorm(), WeightNorm(every=10), LearningRate()], log=records)

    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for x, y in train.batches(64, generator=gen):
            with monitor.step((x, y)) as s:
                optimizer.zero_grad()
                s.loss = F.cross_entropy(model(x), y)
                s.loss.backward()
                optimizer.step()
            step += 1
            if step == steps:
                break
    for r in records[:: max(1, steps // 5)]:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    return records


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    main(ap.parse_args().steps)
