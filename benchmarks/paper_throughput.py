"""Paper-scale throughput: what the paper profiles cost on this machine, and whether they fit a 16 GB GPU.

For each paper architecture (VGG-11/16 of width 64, PreResNet-32/110 of width 16, on CIFAR-10's
3x32x32 inputs), with BatchNorm and without:

* training images per second (SGD with momentum, the train() loop, synthetic CIFAR-10-shaped data);
* each registered probe's cost relative to a training step, ``(t_with − t_without) / t_without``
  per step with the probe firing every step, measured interleaved with the plain steps;
* memory: on CUDA the measured peak of a training step and of each Hessian-vector-product probe at
  the paper's batch size (128); elsewhere an estimate (:mod:`bnlab.models.memory`: a training
  step's ``element_size·(4·params + 2·batch·activations)``; an HVP, which keeps the forward graph and
  the first backward's, ``element_size·(6·params + 4·batch·activations)``), against 16 GiB;

then the estimated wall time of each registered paper experiment from those numbers (step counts
read from the paper profiles; the formulas are in :data:`PLANS`; an estimate, not a measurement).

On a CPU it runs at reduced size and says so: batch 16 (not 128), probe costs on VGG-11 only; the
step times are scaled linearly to batch 128 for the estimates.

    python benchmarks/paper_throughput.py [--device auto|cpu|cuda] [--batch N] [--reps N]
                                          [--archs vgg11,...] [--probes name,...] [--no-probes]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from bnlab import data, models, paper
from bnlab.models.memory import estimate
from bnlab.train import make_optimizer, resolve_device, train

ARCHS = {
    "vgg11": ("vgg", {"width": 64, "depth": 11}),
    "vgg16": ("vgg", {"width": 64, "depth": 16}),
    "preresnet32": ("preresnet", {"width": 16, "depth": 32}),
    "preresnet110": ("preresnet", {"width": 16, "depth": 110}),
}
PAPER_BATCH = 128
GPU_BYTES = 16 * 2**30
HVP_PROBES = ("hessian-quad-form", "top-hessian-eigenvalue", "spectrum", "santurkar-curvature")
STEPS_PER_EPOCH = math.ceil(50000 / PAPER_BATCH)


def arch_of(model: str, width: int, depth: int) -> str | None:
    for k, (m, o) in ARCHS.items():
        if m == model and o["width"] == width and o["depth"] == depth:
            return k
    return None


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_seconds(name, norm, tr, dev, batch, reps, probes_fn=None) -> float:
    """Median seconds per training step (after one warm-up step) over ``reps`` runs of 2 steps."""
    times = []
    for r in range(reps + 1):
        model, opts = ARCHS[name]
        net = models.make(model, norm=norm, in_shape=(3, 32, 32), num_classes=10, seed=0, **opts).to(dev)
        opt = make_optimizer(net.parameters(), lr=0.01, momentum=0.9)
        probes = probes_fn(net) if probes_fn else []
        _sync(dev)
        h = train(net, tr, opt, steps=2, batch_size=batch, probes=probes, eval_train=False, device=dev, seed=r)
        _sync(dev)
        if r:  # the first run warms up (allocator, cudnn.benchmark, lazy init)
            times.append(h.seconds / 2)
    return statistics.median(times)


def probe_costs(name, tr, dev, batch, reps, only):
    """``{probe: cost relative to a step}`` for the BN net ``name`` (interleaved with plain steps)."""
    from bnlab.probes.registry import PROBES, make_probe

    x, y = tr.x[:batch].to(dev), tr.y[:batch].to(dev)
    out = {}
    for pname in PROBES:
        if only and pname not in only:
            continue
        try:
            plain, probed = [], []
            for _ in range(reps):
                plain.append(step_seconds(name, "bn", tr, dev, batch, 1))
                probed.append(step_seconds(name, "bn", tr, dev, batch, 1,
                                           probes_fn=lambda net: [make_probe(pname, net, (x, y), F.cross_entropy, every=1)]))
            base = statistics.median(plain)
            out[pname] = (statistics.median(probed) - base) / base
        except Exception as e:  # noqa: BLE001 - a probe that does not apply to this net is reported
            out[pname] = f"n/a ({type(e).__name__}: {str(e)[:60]})"
        print(f"    {pname:<30} {fmt_cost(out[pname])}", flush=True)
    return out


def fmt_cost(c) -> str:
    return c if isinstance(c, str) else f"{c:+.2f} steps"


def memory_rows(dev, archs, only):
    """``(arch, what, bytes, measured)`` rows: a training step and the HVP probes at batch 128."""
    rows = []
    for name in archs:
        model, opts = ARCHS[name]
        if dev.type == "cuda":
            from bnlab.probes.registry import make_probe

            tr = data.load("cifar10-synthetic", split="train", n=2 * PAPER_BATCH).to(dev)
            x, y = tr.x[:PAPER_BATCH], tr.y[:PAPER_BATCH]
            for what in ("train step", *HVP_PROBES):
                if only and what != "train step" and what not in only:
                    continue
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                net = models.make(model, norm="bn", in_shape=(3, 32, 32), num_classes=10, seed=0, **opts).to(dev)
                opt = make_optimizer(net.parameters(), lr=0.01, momentum=0.9)
                try:
                    probes = [] if what == "train step" else [make_probe(what, net, (x, y), F.cross_entropy, every=1)]
                    train(net, tr, opt, steps=1, batch_size=PAPER_BATCH, probes=probes, eval_train=False, device=dev)
                    rows.append((name, what, torch.cuda.max_memory_allocated(dev), True))
                except Exception as e:  # noqa: BLE001
                    rows.append((name, what, f"n/a ({type(e).__name__})", True))
                del net, opt
        else:
            e = estimate(model, in_shape=(3, 32, 32), num_classes=10, norm="bn", batch_size=PAPER_BATCH, **opts)
            rows.append((name, "train step", e.training_bytes, False))
            hvp = e.element_size * (6 * e.parameters + 4 * PAPER_BATCH * e.activations_per_example)
            rows.append((name, "HVP probes (any)", hvp, False))
    return rows


# ------------------------------------------------------------------------------------ estimates


def _plans():
    """``{experiment: fn(cfg, step, probe) -> (seconds, how)}``: the paper runs' main costs, from the
    paper profile's settings. ``step(arch, norm)`` is seconds per training step at batch 128,
    ``probe(name)`` a probe's cost in steps (0 when not measured)."""
    def vgg(c):
        return arch_of(c.model, c.width, c.depth)

    def large_lr(c, step, probe):
        steps = 2 * c.seeds * c.epochs * STEPS_PER_EPOCH  # two learning rates, every seed
        t = sum(step(vgg(c), "bn" if norm == "bn" else "none") for norm in c.norms) * steps
        return t, (f"{len(c.norms)} norms x 2 LRs x {c.seeds} seeds x {c.epochs:g} epochs of {vgg(c)} "
                   "(diverged members stop early: an upper bound)")

    def landscape(c, step, probe):
        arms = c.seeds * (1 + len(c.norms)) + 2
        per = step(vgg(c), "bn") * (1 + probe("landscape") / c.probe_every + probe("top-hessian-eigenvalue") / c.hessian_every)
        return arms * c.steps * per, (f"{arms} arms x {c.steps} steps of {vgg(c)}, landscape probe every {c.probe_every}, "
                                      f"top Hessian eigenvalue every {c.hessian_every}")

    def ics(c, step, probe):
        arms = 3 * c.seeds + 2 * c.ics_seeds + c.stability_seeds * (1 + len(c.lp_norms))
        per = step(vgg(c), "bn") * (1 + probe("ics") / c.ics_every + probe("activation-quantiles") / c.act_every
                                    + probe("train-mode-accuracy") / c.acc_every)
        return arms * c.steps * per, f"~{arms} VGG arms x {c.steps} steps with ICS every {c.ics_every} (+ the DLN, small)"

    def exp_lr(c, step, probe):
        a = step("preresnet32", "bn")
        acc = (len(c.acc_seeds) * 3 + c.acc_standard_seeds) * c.acc_steps * a
        equiv = 10 * c.equiv_steps * a * 8  # ~10 arms in lockstep, float64 (~8x float32 on a GPU)
        return acc + equiv, (f"accuracy arms: ~{len(c.acc_seeds) * 3 + c.acc_standard_seeds} x {c.acc_steps} steps; "
                             f"equivalence: ~10 float64 arms x {c.equiv_steps} steps (float64 taken as 8x float32); overflow run (small) omitted")

    def divergence(c, step, probe):
        members = len(c.lrs) * len(c.seeds)
        t = sum(step("preresnet110", "bn" if n == "bn" else "none") for n in c.norms) * members * c.epochs * STEPS_PER_EPOCH
        return t, (f"{len(c.norms)} norms x {len(c.lrs)} LRs x {len(c.seeds)} seeds x {c.epochs:g} epochs of PreResNet-110 "
                   f"(diverged members stop early: an upper bound)")

    def auto_rate(c, step, probe):
        members = len(c.si_lrs) * len(c.seeds) * len(c.norms)
        s = step(vgg(c) or "vgg16", "bn")
        gd = members * c.gd_steps * s * math.ceil(c.gd_subset / PAPER_BATCH)
        sgd = members * c.sgd_steps * s
        return gd + sgd, (f"{members} members x ({c.gd_steps} GD steps on {c.gd_subset} images + {c.sgd_steps} SGD steps) "
                          f"of VGG-16")

    def activations(c, step, probe):
        s = step("preresnet110", "bn")
        return (len(c.diverge_lrs) + 2) * c.diverge_max_steps * s * (1 + c.s_points), (
            f"{len(c.diverge_lrs)} LRs x {c.diverge_max_steps} steps of PreResNet-110 + the interpolation rerun; "
            "initialization statistics (minutes) omitted")

    def toy(c, step, probe):
        return 60.0, "the 2-D toy: about a minute whatever the device (figures)"

    return {"large-lr": large_lr, "landscape": landscape, "ics": ics, "exp-lr": exp_lr, "divergence": divergence,
            "auto-rate": auto_rate, "activations": activations, "toy": toy}


PLANS = _plans()


def generic_plan(c, step, probe):
    """An experiment without a formula: every ``*steps*`` setting once, on its model if measured."""
    a = arch_of(getattr(c, "model", ""), getattr(c, "width", 0), getattr(c, "depth", 0))
    if a is None:
        return None, f"no formula, and its model ({getattr(c, 'model', '?')}) is not one of the measured architectures"
    n = sum(v for k, v in vars(c).items() if "steps" in k and isinstance(v, int))
    return n * step(a, "bn"), f"no formula: the sum of its step settings ({n}) once, on {a} (a lower bound)"


def flops_per_step(name: str, norm: str, batch: int = PAPER_BATCH) -> float:
    """Floating-point operations of one training step (forward + backward, cross-entropy), counted by
    ``torch.utils.flop_counter`` on the meta device (no compute, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, opts = ARCHS[name]
    with torch.device("meta"):
        net = models.make(model, norm=norm, in_shape=(3, 32, 32), num_classes=10, **opts)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(net(x), y).backward()
    return float(fc.get_total_flops())


def human(seconds) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv=None) -> int:
    """Parse the arguments and measure inside a paper run's settings (the CUDA speed-ups of
    :func:`bnlab.paper.speed_plan` apply as in ``--profile paper``; on a CPU there are none)."""
    bf16 = "--bf16" in (sys.argv[1:] if argv is None else argv)
    with paper.use(speed=True, bf16=bf16, compile=False):  # the 2-step timing runs are too short to compile
        return _main(argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 128 on CUDA, 16 on a CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 5 on CUDA, 2 on a CPU)")
    ap.add_argument("--archs", default=None, help="comma-separated subset of " + ",".join(ARCHS))
    ap.add_argument("--probes", default=None, help="comma-separated subset of the registered probes")
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="CUDA: bf16 autocast for the plain training steps, as --bf16 does")
    ap.add_argument("--gpu-tflops", type=float, default=10.0,
                    help="sustained TFLOPS assumed for the GPU estimate column (default 10: an assumption, roughly a "
                         "current data-center GPU in float32/TF32 on these small CIFAR nets)")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    batch = args.batch or (PAPER_BATCH if cuda else 16)
    reps = args.reps or (5 if cuda else 2)
    archs = [a.strip() for a in args.archs.split(",")] if args.archs else list(ARCHS)
    only = {p.strip() for p in args.probes.split(",")} if args.probes else None
    reduced = batch != PAPER_BATCH
    print(f"device: {dev}{' (' + torch.cuda.get_device_name(dev) + ')' if cuda else ''}; torch {torch.__version__}; "
          f"batch {batch}{'  [REDUCED SIZE: the paper batch is 128; step times are scaled linearly to 128 below]' if reduced else ''}")
    tr = data.load("cifar10-synthetic", split="train", n=max(4 * batch, 256))

    print("\ntraining throughput (SGD + momentum, train() loop, CIFAR-10-shaped data):")
    step128: dict[tuple[str, str], float] = {}
    for a in archs:
        for norm in ("bn", "none"):
            s = step_seconds(a, norm, tr, dev, batch, reps)
            step128[(a, norm)] = s * PAPER_BATCH / batch
            print(f"  {a:<13} {norm:<5} {batch / s:9.1f} images/s   {s * 1000:8.1f} ms/step at batch {batch}", flush=True)

    costs: dict[str, object] = {}
    if not args.no_probes:
        probe_archs = archs if cuda else [archs[0]]
        for a in probe_archs:
            print(f"\nprobe cost relative to a training step ({a}, BN, batch {batch}, probe every step):")
            c = probe_costs(a, tr, dev, batch, max(1, reps // 2), only)
            for k, v in c.items():
                if not isinstance(v, str):
                    costs.setdefault(k, v)

    print(f"\nmemory at batch {PAPER_BATCH} ({'measured peak, CUDA' if cuda else 'ESTIMATED (no CUDA here)'}), limit 16 GiB:")
    for a, what, b, measured in memory_rows(dev, archs, only):
        if isinstance(b, str):
            print(f"  {a:<13} {what:<24} {b}")
        else:
            print(f"  {a:<13} {what:<24} {b / 2**30:7.2f} GiB  {'fits' if b <= GPU_BYTES else 'DOES NOT FIT'} 16 GiB")

    from bnlab.experiments import EXPERIMENTS

    def step(a, norm):
        if (a, norm) in step128:
            return step128[(a, norm)]
        if (a, "bn") in step128:
            return step128[(a, "bn")]
        return statistics.mean(step128.values())  # an architecture not measured in this run: the mean

    def probe(name):
        c = costs.get(name)
        return c if isinstance(c, float) and c > 0 else 0.0

    flops = {(a, n): flops_per_step(a, n) for a in ARCHS for n in ("bn", "none")}
    print(f"\nflops of one training step at batch {PAPER_BATCH} (counted): "
          + ", ".join(f"{a} {flops[(a, 'bn')] / 1e9:.0f} GFLOP" for a in ARCHS))

    def gpu_step(a, norm):
        return flops.get((a, norm), flops.get((a, "bn"), statistics.mean(flops.values()))) / (args.gpu_tflops * 1e12)

    print(f"\nESTIMATED wall time of each paper experiment (not measurements): 'here' from the step times measured "
          f"above on {dev}; 'GPU' from the counted flops at an ASSUMED sustained {args.gpu_tflops:g} TFLOPS, probe costs "
          f"as measured here:")
    print(f"  {'experiment':<12} {'here':>9} {'GPU':>9}   what is counted")
    for name in sorted(EXPERIMENTS):
        cfg = EXPERIMENTS[name].profiles["paper"]
        plan = PLANS.get(name, generic_plan)
        try:
            seconds, how = plan(cfg, step, probe)
            gpu, _ = plan(cfg, gpu_step, probe)
        except Exception as e:  # noqa: BLE001 - a profile the formula does not fit
            seconds, gpu, how = None, None, f"no estimate ({type(e).__name__}: {e})"
        print(f"  {name:<12} {human(seconds):>9} {human(gpu):>9}   {how}")
    if reduced:
        print("\nnote: reduced size (batch 16 on a CPU): throughput and probe costs at batch 16; the estimates scale "
              "the step time linearly to batch 128 and are rough")
    return 0


if __name__ == "__main__":
    sys.exit(main())
