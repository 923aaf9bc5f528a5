"""What each probe costs, as a multiple of a bare training step, on ResNet-18 (torchvision's layout).

Run:  .venv/bin/python benchmarks/probe_overhead.py [--device cpu|cuda] [--quick] [--rounds N]

The setting is a user's own loop with :class:`bnlab.monitor.Monitor` (``with monitor.step(batch)``)
on :func:`bnlab.models.resnet.resnet18` (11.2 M parameters for 10 classes), batch 32 of 3x32x32
images, SGD with momentum 0.9 and weight decay 5e-4, ``torch.set_num_threads(1)`` on CPU. In one
run it measures

* a bare step (``zero_grad``, forward, cross-entropy, backward, ``opt.step()``) — the unit;
* the same step inside ``Monitor.step`` with no probe, with each registered probe alone (every
  step), with all ``cheap`` probes together and with the cheap core of each cost preset
  (:data:`bnlab.probes.registry.PRESETS`);
* ``bnlab.train``'s own loop against a bare loop over the same batches.

**Robust to machine load.** All cases share one model and optimizer (the weights drift a little:
irrelevant for timing). Each round runs, in turn for every case, a bare slot then the case's slot
(``--slot`` steps each), so that every case is compared with bare steps taken a moment before and
after it; a case's ratio in a round is its mean step time over the mean of the two neighbouring
bare slots, and the table prints the median over the rounds. On CPU the clock is the process's
CPU time (``time.process_time``: time other processes take from the shared cores does not count;
single-threaded torch runs forward and backward on this thread) and the wall-clock ratio is
printed beside it; on CUDA the clock is the wall clock after ``torch.cuda.synchronize()``.

**Classes.** ``declared`` is the probe's ``cost``; ``measured`` is ``cheap`` when the ratio is at
most 1.10, ``standard`` up to 1 + 12 (a few extra forward/backward passes), else ``expensive``.
For ``standard`` and ``expensive`` probes ``steps/call`` = ratio − 1 is the extra cost of one call
in training steps: a probe run every ``n`` steps adds about ``steps/call / n`` to each step. A
preset's total is its directly measured every-step core plus Σ steps/call / interval of its
scheduled probes (from this run's per-call numbers).

**The floor.** Rows under "the floor" are not bnlab probes: each only *reads*, once, the data a
probe needs (:class:`Floor`: ``torch._foreach_norm`` in float32, one multi-tensor call per event),
measured in the same interleaved rounds. No implementation of a probe can cost less than its floor
on this machine: e.g. with SGD and momentum the step leaves ``w_{t+1}``, ``buf_{t+1}`` and ``g``, and
``ScaleInvariantStats`` needs a sum over each (``‖buf‖²`` for the update, ``‖g‖²`` for the gradient norm;
neither follows from the others), so three reads of the weights' size are its floor whatever the
method.

Targets (issue 17, this machine, CPU): each cheap probe ≤ 1.05x, all cheap probes together ≤
1.10x, ``bnlab.train``'s loop ≤ 1.03x a bare loop.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bnlab.data import ArrayData
from bnlab.models import make
from bnlab.monitor import Monitor
from bnlab.probes import PROBES, Probe, make_probe
from bnlab.train import train

try:  # the presets (added with this benchmark); the script still runs without them
    from bnlab.probes.registry import PRESETS, make_preset
except ImportError:  # pragma: no cover
    PRESETS, make_preset = {}, None


@dataclass
class Case:
    name: str
    declared: str
    probes: list
    slot: int = 1
    rounds: int = 1
    cpu: list = field(default_factory=list)
    wall: list = field(default_factory=list)
    monitor: Optional[Monitor] = None


def measured_class(ratio: float) -> str:
    if ratio <= 1.10:
        return "cheap"
    if ratio <= 13.0:
        return "standard"
    return "expensive"


class Bench:
    def __init__(self, device: str, width: int, batch: int, seed: int = 0):
        self.dev = torch.device(device)
        self.model = make("resnet18", in_shape=(3, 32, 32), num_classes=10, width=width, seed=seed).to(self.dev)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(8 * batch, 3, 32, 32, generator=g).to(self.dev)
        self.y = torch.randint(0, 10, (8 * batch,), generator=g).to(self.dev)
        self.batches = [(self.x[i:i + batch], self.y[i:i + batch]) for i in range(0, 8 * batch, batch)]
        self.k = 0

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def next_batch(self):
        self.k = (self.k + 1) % len(self.batches)
        return self.batches[self.k]

    def bare_step(self) -> None:
        x, y = self.next_batch()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()

    def monitored_step(self, monitor: Monitor) -> None:
        x, y = self.next_batch()
        with monitor.step((x, y)) as s:
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            s.loss = loss
            self.opt.step()

    def timed(self, fn: Callable[[], None], n: int) -> tuple[float, float]:
        """(cpu seconds, wall seconds) per step of ``n`` calls of ``fn``."""
        self.sync()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n


def _memoize_scale_detection() -> None:
    """Set-up only: several probe factories run find_scale_invariant on the same model and batch."""
    import bnlab.scale as scale

    if getattr(scale.find_scale_invariant, "_memo", False):
        return
    orig, memo = scale.find_scale_invariant, {}

    def cached(model, batch, *a, **k):
        key = (id(model), id(batch))
        if key not in memo:
            memo[key] = orig(model, batch, *a, **k)
        return memo[key]

    cached._memo = True
    scale.find_scale_invariant = cached


class Floor(Probe):
    """Not a probe of bnlab: the physical floor of one. It only *reads* the data a probe needs, once,
    with the fastest one-pass reduction PyTorch has (``torch._foreach_norm``, float32, one multi-tensor
    call per event), and records one number. ``reads`` names what it reads:

    * ``"w"``, ``"g"`` at ``after_backward``: the weights ``w_t`` and the gradients ``g_t``;
    * ``"w'"``, ``"buf"`` at ``after_step``: the new weights ``w_{t+1}`` and SGD's momentum buffers;
    * ``"g'"`` at ``after_step``: the gradients again (as the step used them);
    * ``"act"``: the outputs of ActivationStats' default layers, in forward hooks during the training
      pass (one read of each output while it is fresh in the cache).
    """

    name = "floor"
    cost = "cheap"

    def __init__(self, reads: tuple, model):
        super().__init__(1)
        self.reads = reads
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.acc: list = []
        self.handles: list = []
        self.layers = []
        if "act" in reads:
            from bnlab.probes.activations import select_layers

            self.layers = [m for _, m in select_layers(model, None)]

    def before_step(self, ctx) -> None:
        # hooks only for this probe's own steps (the model is shared with the bare steps and other cases),
        # registered and removed every step as ActivationStats does
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            with torch.no_grad():
                self.acc.append(torch.linalg.vector_norm(output.detach()))

    def _unhook(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _read(self, names: tuple) -> None:
        ts = []
        for n in names:
            if n in self.reads:
                if n == "w" or n == "w'":
                    ts += [p.detach() for p in self.params]
                elif n == "g" or n == "g'":
                    ts += [p.grad for p in self.params if p.grad is not None]
                elif n == "buf":
                    st = self.opt.state
                    ts += [st[p]["momentum_buffer"] for p in self.params if p in st and "momentum_buffer" in st[p]]
        if ts:
            self.acc += torch._foreach_norm(ts)

    def after_backward(self, ctx) -> None:
        self._unhook()
        self.opt = ctx.optimizer
        self._read(("w", "g"))

    def after_step(self, ctx) -> dict:
        self._read(("w'", "buf", "g'"))
        acc, self.acc = self.acc, []
        return {"x": float(torch.stack(acc).sum())} if acc else {}


#: floor cases: (case name, what it reads, the probe case it bounds)
FLOORS = [
    ("floor: read g_t", ("g",), "grad-norm"),
    ("floor: read w_t, g_t", ("w", "g"), "intrinsic-grad-norm"),
    ("floor: read w_{t+1}, buf_{t+1}, g", ("w'", "buf", "g'"), "scale-invariant (any method, SGD+momentum)"),
    ("floor: read w_t, g_t, w_{t+1}, buf_{t+1}", ("w", "g", "w'", "buf"), "scale-invariant (as computed)"),
    ("floor: read activations", ("act",), "activation-stats"),
    ("floor: activations + w_t, g_t, w_{t+1}, buf", ("act", "w", "g", "w'", "buf"), "all cheap"),
]


def build_cases(b: Bench, quick: bool, only=None) -> list[Case]:
    _memoize_scale_detection()
    batch = b.batches[0]
    want = (lambda name: True) if not only else (lambda name: name in only)
    rounds_cheap, rounds_std = (3, 1) if quick else (args_rounds, max(3, args_rounds // 4))
    slot = 1 if quick else args_slot
    cases = [Case("monitor, no probe", "cheap", [], slot, rounds_cheap)]
    for name in sorted(PROBES):
        if not want(name):
            continue
        try:
            probe = make_probe(name, b.model, batch, F.cross_entropy, every=1)
        except Exception as e:  # noqa: BLE001  (reported in the table, not measured)
            BUILD_FAILED[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            continue
        cheap = probe.cost == "cheap"
        cases.append(Case(name, probe.cost, [probe], slot if cheap else 1, rounds_cheap if cheap else rounds_std))
    cheap_names = sorted(n for n, e in PROBES.items() if e.cost == "cheap")
    cases.append(Case("grad-norm + weight-norm + lr", "cheap",
                      [make_probe(n, b.model, batch, F.cross_entropy) for n in ("grad-norm", "weight-norm", "lr")], slot, rounds_cheap))
    cases.append(Case("the same + scale-invariant", "cheap",
                      [make_probe(n, b.model, batch, F.cross_entropy) for n in ("grad-norm", "weight-norm", "lr", "scale-invariant")],
                      slot, rounds_cheap))
    cases.append(Case(f"all cheap ({len(cheap_names)})", "cheap",
                      [make_probe(n, b.model, batch, F.cross_entropy) for n in cheap_names], slot, rounds_cheap))
    for fname, reads, _ in FLOORS:
        if want(fname):
            cases.append(Case(fname, "floor", [Floor(reads, b.model)], slot, rounds_cheap))
    cases = [c for c in cases if want(c.name)]
    for pname in PRESETS:
        if not want(f"preset {pname}: every-step core"):
            continue
        probes = make_preset(pname, b.model, batch, F.cross_entropy)
        core = [p for p in probes if p.cost == "cheap" and all(p.active(t) for t in range(12))]
        cases.append(Case(f"preset {pname}: every-step core", "cheap", core, slot, rounds_cheap))
    for c in cases:
        c.monitor = Monitor(b.model, b.opt, c.probes, log=None, loss_fn=F.cross_entropy)
    return cases


def run_cases(b: Bench, cases: list[Case], progress) -> None:
    """Rounds of [bare, case] pairs; a case's sample is its time over the mean of its neighbouring bare slots."""
    max_rounds = max(c.rounds for c in cases)
    for r in range(max_rounds):
        todo = [c for c in cases if r < c.rounds]
        prev = b.timed(b.bare_step, todo[0].slot)
        for c in todo:
            t = b.timed(lambda c=c: b.monitored_step(c.monitor), c.slot)
            nxt = b.timed(b.bare_step, c.slot)
            c.cpu.append(t[0] / ((prev[0] + nxt[0]) / 2))
            c.wall.append(t[1] / ((prev[1] + nxt[1]) / 2))
            prev = nxt
        progress(f"round {r + 1}/{max_rounds}")


def train_vs_bare(b: Bench, rounds: int, k: int) -> tuple[list, list, float]:
    """``bnlab.train`` for k+1 steps (k iteration intervals read from its records) against k bare steps."""
    data = ArrayData(b.x, b.y, 10)
    ratios_cpu, ratios_wall, bare_ms = [], [], []
    for r in range(rounds):
        stamps = []

        def log(rec):
            if rec.get("event") != "eval":
                b.sync()
                stamps.append((time.process_time(), time.perf_counter()))

        before = b.timed(b.bare_step, k)
        train(b.model, data, b.opt, steps=k + 1, batch_size=len(b.batches[0][1]), device=b.dev, eval_every=10**9,
              eval_train=False, log=log, seed=r)
        after = b.timed(b.bare_step, k)
        cpu = (stamps[-1][0] - stamps[0][0]) / k
        wall = (stamps[-1][1] - stamps[0][1]) / k
        ratios_cpu.append(cpu / ((before[0] + after[0]) / 2))
        ratios_wall.append(wall / ((before[1] + after[1]) / 2))
        bare_ms.append((before[1] + after[1]) / 2 * 1e3)
    return ratios_cpu, ratios_wall, statistics.median(bare_ms)


def main(argv=None) -> int:
    global args_rounds, args_slot
    ap = argparse.ArgumentParser(description="probe cost as a multiple of a bare training step (ResNet-18, batch 32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--quick", action="store_true", help="a small check: width 16, batch 8, few rounds")
    ap.add_argument("--rounds", type=int, default=15, help="rounds for cheap probes (non-cheap: a quarter, at least 3)")
    ap.add_argument("--slot", type=int, default=2, help="steps per slot for cheap probes")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    ap.add_argument("--only", default=None, help="';'-separated case names to run (default all)")
    ap.add_argument("--no-train", action="store_true", help="skip bnlab.train's loop against a bare loop")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {a.device}: CUDA is not available here; accepted: cpu", file=sys.stderr)
        return 2
    args_rounds, args_slot = a.rounds, a.slot
    torch.set_num_threads(a.threads)
    width, batch = (16, 8) if a.quick else (64, 32)
    b = Bench(a.device, width, batch)
    for _ in range(2 if a.quick else 4):  # warm-up
        b.bare_step()
    cases = build_cases(b, a.quick, set(a.only.split(";")) if a.only else None)
    failed = dict(BUILD_FAILED)
    for c in cases:  # one warm-up step each (first-call allocations, hooks); a probe that fails is reported
        try:
            b.monitored_step(c.monitor)
        except Exception as e:  # noqa: BLE001  (reported in the table, not measured)
            failed[c.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            b.opt.zero_grad(set_to_none=True)
    cases = [c for c in cases if c.name not in failed]
    t0 = time.perf_counter()
    run_cases(b, cases, lambda s: print(f"  {s}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True))
    if a.no_train:
        tr_cpu = tr_wall = [float("nan")]
        bare_ms = statistics.median([b.timed(b.bare_step, 1)[1] * 1e3 for _ in range(3)])
    else:
        tr_cpu, tr_wall, bare_ms = train_vs_bare(b, 3 if a.quick else max(5, a.rounds // 2), 2 if a.quick else 4)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    nparams = sum(p.numel() for p in b.model.parameters())
    primary = "cpu" if b.dev.type == "cpu" else "wall"
    print(f"\nResNet-18 (torchvision layout, width {width}, {nparams:,} parameters), batch {batch} of 3x32x32, "
          f"device {b.dev}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    print(f"bare step: {bare_ms:.1f} ms wall (median); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"ratio = median over rounds of case / neighbouring bare slots ({primary} time{'; wall beside' if primary == 'cpu' else ''})")
    hdr = f"{'case':<40}{'declared':>10}{'x bare':>9}{'(wall)':>8}{'measured':>10}{'steps/call':>12}{'rounds':>8}"
    print(hdr)
    print("-" * len(hdr))
    per_call = {}
    for c in cases:
        rc = statistics.median(c.cpu if primary == "cpu" else c.wall)
        rw = statistics.median(c.wall)
        extra = rc - 1.0
        per_call[c.name] = extra
        if c.declared == "floor":
            continue
        spc = f"{extra:>12.2f}" if c.declared != "cheap" else f"{'':>12}"
        print(f"{c.name:<40}{c.declared:>10}{rc:>9.3f}{rw:>8.3f}{measured_class(rc):>10}{spc}{len(c.cpu):>8}")
    for name, err in failed.items():
        print(f"{name:<40}{'':>10}  FAILED on this model: {err}")
    rc, rw = statistics.median(tr_cpu if primary == "cpu" else tr_wall), statistics.median(tr_wall)
    print(f"{'bnlab.train loop vs bare loop':<40}{'':>10}{rc:>9.3f}{rw:>8.3f}{'':>10}{'':>12}{len(tr_cpu):>8}")
    floors = [c for c in cases if c.declared == "floor"]
    if floors:
        print("\nthe floor: only reading, once, the data a probe needs (torch._foreach_norm, float32; not a bnlab probe)")
        for c in floors:
            bound = next(bd for fn, _, bd in FLOORS if fn == c.name)
            print(f"  {c.name:<44}{statistics.median(c.cpu if primary == 'cpu' else c.wall):>7.3f}x   bounds {bound}")
    if PRESETS:
        print("\npresets: every-step core (measured) + scheduled probes (Σ steps/call / interval, from this run)")
        for pname, preset in PRESETS.items():
            core = statistics.median(next(c for c in cases if c.name == f"preset {pname}: every-step core").cpu) \
                if any(c.name == f"preset {pname}: every-step core" for c in cases) else float("nan")
            sched = [(n, every) for n, every in preset.probes if every > 1]
            known = sum(per_call[n] / every for n, every in sched if n in per_call)
            unknown = [n for n, _ in sched if n not in per_call]
            note = f"  (not measured: {', '.join(unknown)})" if unknown else ""
            print(f"  {pname:<10} core {core:.3f}x + scheduled {known:.3f} = {core + known:.2f}x a bare step{note}")
    return 0


args_rounds, args_slot = 15, 2
BUILD_FAILED: dict = {}

if __name__ == "__main__":
    sys.exit(main())
