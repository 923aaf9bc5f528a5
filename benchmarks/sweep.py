"""Throughput of a vectorized 16-LR sweep against 16 sequential runs, digits convnet.

Run:  .venv/bin/python benchmarks/sweep.py [--steps 40] [--repeats 3] [--widths 4 8 16] [--threads 1 0]

For each width and each torch thread setting (``1``, and ``0`` = torch's default), measured in
one run with the cases interleaved round-robin over repeats (machine-load drifts hit every case
alike) and reported as medians:

* ``sweep``: ``bnlab.sweep.sweep(..., vectorize=True)``: the 16 members in one vmapped loop;
* ``sequential``: the same call with ``vectorize=False``: 16 ``bnlab.train.train`` runs with
  ``torch.optim.SGD``, one after the other (what one would do without the sweep);

as member-steps per second (16 x steps / wall time of the whole call, model construction
included, no evaluation) and the ratio sweep / sequential.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from bnlab import data, models
from bnlab.sweep import sweep

M, BATCH = 16, 128


def run(tr, width: int, steps: int, vectorize: bool) -> float:
    fn = partial(models.make, "convnet", norm="bn", in_shape=tr.in_shape, num_classes=tr.num_classes, width=width)
    lrs = torch.logspace(-3, -0.5, M).tolist()  # 1e-3 .. 0.32: none diverges in a few dozen steps
    res = sweep(fn, tr, lrs=lrs, steps=steps, batch_size=BATCH, momentum=0.9, weight_decay=5e-4,
                eval_train=False, device="cpu", vectorize=vectorize)
    assert res.vectorized == vectorize and not bool(res.diverged.any())
    return res.member_steps_per_second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch threads; 0 = torch's default")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    tr = data.load("digits", split="train")
    cases = [(th or default_threads, w, v) for th in args.threads for w in args.widths for v in (True, False)]
    rates: dict = {c: [] for c in cases}
    torch.set_num_threads(1)
    run(tr, args.widths[0], 3, True)  # warm-up (imports, allocator)
    for _ in range(args.repeats):  # round-robin over the cases
        for c in cases:
            torch.set_num_threads(c[0])
            rates[c].append(run(tr, c[1], args.steps, c[2]))
    torch.set_num_threads(default_threads)
    print(f"digits convnet (BN), {M} LRs, batch {BATCH}, {args.steps} steps, SGD momentum 0.9, "
          f"median of {args.repeats} interleaved repeats; torch {torch.__version__}, default threads {default_threads}")
    print(f"{'threads':>7} {'width':>5} {'sweep m-steps/s':>16} {'sequential m-steps/s':>21} {'ratio':>6}")
    for th in args.threads:
        th = th or default_threads
        for w in args.widths:
            v, s = statistics.median(rates[(th, w, True)]), statistics.median(rates[(th, w, False)])
            print(f"{th:>7} {w:>5} {v:>16.1f} {s:>21.1f} {v / s:>6.2f}x")


if __name__ == "__main__":
    main()
