"""Cost of the landscape probe and of the curvature measurements, measured in one run.

Run: ``.venv/bin/python benchmarks/landscape.py [--threads N]`` (about a minute on an idle
2-core CPU; ``--threads`` sets ``torch.set_num_threads``, default: torch's default).

Model: conv3x3(3→16) - BN - ReLU - conv3x3(16→32) - BN - ReLU - avgpool 2 - linear(512→10),
random 8x8 inputs, batch 128, float32, train mode, torch's default thread count.

Prints three tables:

1. The landscape probe at k = 8 step sizes (vectorized with ``vmap`` and as a loop) against one
   training step (forward + backward + SGD step) and against its lower limit, k forward and
   backward passes: ``probe / (k · fwd_bwd)``, target ≤ 1.2. "in training" means the probe gets
   the step's gradient and loss (as at the ``after_backward`` event, k evaluations);
   "standalone" computes them (k + 1 evaluations).
2. A Hessian-vector product against one gradient computation (module forward + backward),
   target ≤ 2.5: a standalone HVP (both methods) and the amortized cost of one more HVP at the
   same point (what Lanczos and Hutchinson pay per iteration), in time and in FLOPs (the
   arithmetic: an exact HVP of this CNN, by either method, needs 2.97x the convolution and matmul
   FLOPs of its gradient, above the 2.5x target; see bnlab.curvature's docstring).
3. HVPs and wall time to the top Hessian eigenvalue with 1e-3 relative accuracy, Lanczos
   against power iteration, on the same model and batch: at the stopping rule (relative change
   < 1e-3) and at the first iterate whose actual error, against a converged Lanczos reference,
   is < 1e-3.

Timings are medians over repeats, interleaved so that background load hits all variants alike
(table 2 also gives the ratio of the fastest runs, the least disturbed by it);
the CPU use of other processes is printed before and after: on a busy machine, multi-threaded
runs of many small operators slow down by 10x and more, use ``--threads 1`` there.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import cpu_busy_fraction, table  # benchmarks/_common.py (this folder is sys.path[0])
from bnlab.curvature import (
    HessianOperator,
    hvp,
    loss_and_grad,
    model_loss_closure,
    power_iteration,
    top_eigenvalues,
)
from bnlab.landscape import probe_model_along_gradient

K = 8
TOL = 1e-3


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def interleaved_times(fns: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall times of each function over ``repeats`` rounds, the functions taking turns in each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each function, the functions taking turns in each round."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, repeats, warmup).items()}


def count_flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (convolutions and matmuls), by
    ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def ms(t: float) -> str:
    return f"{t * 1e3:.2f} ms"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_model().train()
    x = torch.randn(128, 3, 8, 8)
    y = torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, batch {tuple(x.shape)}")
    busy = cpu_busy_fraction()
    if busy is not None:
        print(f"CPU busy before the run (other processes): {busy:.0%}")
        if busy > 0.2:
            print("warning: the machine is busy; with several threads per process, timings of "
                  "many small operators degrade badly (try --threads 1 for stable ratios)")

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def train_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    # The HVP and eigenvalue rows use one closure of the model at its initial weights.
    f, params = model_loss_closure(model, (x, y), F.cross_entropy)
    loss, grad = loss_and_grad(f, params)
    steps = torch.linspace(0.05, 0.4, K)  # up to 4x the LR 0.1 (REFERENCES.md section 2)
    v = {n: torch.randn_like(p) for n, p in params.items()}
    op = HessianOperator(f, params, method="reverse")
    op(v)

    def probe(**kw):
        # the model wrapper, as a probe would call it (builds the closure, restores the RNG)
        return probe_model_along_gradient(model, (x, y), F.cross_entropy, steps, **kw)

    fns = {
        "fwd_bwd": fwd_bwd,
        "train_step": train_step,
        "closure_grad": lambda: loss_and_grad(f, params),
        "probe_vmap_train": lambda: probe(grad=grad, loss=loss, vectorize=True),
        "probe_loop_train": lambda: probe(grad=grad, loss=loss, vectorize=False),
        "probe_vmap_alone": lambda: probe(vectorize=True),
        "probe_loop_alone": lambda: probe(vectorize=False),
        "probe_auto_train": lambda: probe(grad=grad, loss=loss),
        "hvp_reverse": lambda: hvp(f, params, v, method="reverse"),
        "hvp_forward": lambda: hvp(f, params, v, method="forward"),
        "hvp_amortized": lambda: op(v),
    }
    times = interleaved_times(fns, repeats=25)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}  # the least disturbed run of each
    fb = med["fwd_bwd"]
    auto_vec = probe(grad=grad, loss=loss).vectorized

    def row(label, key, *extra):
        return [label, ms(med[key]), f"{med[key] / fb:.2f}", *extra]

    rows = [
        row("forward + backward (module)", "fwd_bwd", "-"),
        row("training step (fwd + bwd + SGD)", "train_step", "-"),
        row("gradient of the closure", "closure_grad", "-"),
    ]
    for label, key in [
        ("probe k=8, vmap, in training", "probe_vmap_train"),
        ("probe k=8, loop, in training", "probe_loop_train"),
        (f"probe k=8, auto (={'vmap' if auto_vec else 'loop'}), in training", "probe_auto_train"),
        ("probe k=8, vmap, standalone", "probe_vmap_alone"),
        ("probe k=8, loop, standalone", "probe_loop_alone"),
    ]:
        rows.append(row(label, key, f"{med[key] / (K * fb):.2f}"))
    table(
        f"1. Landscape probe, k = {K} (target: probe / (k * fwd_bwd) <= 1.2)",
        ["what", "median", "/ fwd_bwd", "/ (k fwd_bwd)"],
        rows,
    )
    for label, key in [("vmap", "probe_vmap_train"), ("loop", "probe_loop_train")]:
        print(f"   {label}: probe = {med[key] / med['train_step']:.2f} training steps")

    flops = {key: count_flops(fns[key]) for key in ("fwd_bwd", "hvp_reverse", "hvp_forward", "hvp_amortized")}
    rows = [
        row(label, key, f"{best[key] / best['fwd_bwd']:.2f}", f"{flops[key] / 1e6:.0f} M", f"{flops[key] / flops['fwd_bwd']:.2f}")
        for label, key in [
            ("gradient (module fwd + bwd)", "fwd_bwd"),
            ("HVP, double backward (default)", "hvp_reverse"),
            ("HVP, forward-over-reverse (torch.func)", "hvp_forward"),
            ("one more HVP at the same point (graph reused)", "hvp_amortized"),
        ]
    ]
    table(
        "2. Hessian-vector product (target: HVP / gradient <= 2.5)",
        ["what", "median", "/ gradient", "best / best", "FLOPs", "FLOPs / gradient's"],
        rows,
    )
    print("   The FLOP ratio is the arithmetic an exact HVP needs (torch.utils.flop_counter: convolutions\n"
          "   and matmuls): the tangent of every product of two parameter-dependent factors doubles it\n"
          f"   (3x for a conv layer, 2x for the first one, whose input is data); time ratio / FLOP ratio = "
          f"{med['hvp_reverse'] / fb / (flops['hvp_reverse'] / flops['fwd_bwd']):.2f}.")

    # 3. Lanczos vs power iteration.
    ref, ref_info = top_eigenvalues(f, params, k=1, tol=1e-12, max_iter=300)
    if ref_info.residual_norms[0] > 1e-4 * abs(ref[0].item()):
        print("warning: the reference eigenvalue's residual is large:", ref_info.residual_norms)
    lam_ref = ref[0].item()

    def first_accurate(history):
        for i, h in enumerate(history):
            if abs(h[0] - lam_ref) / abs(lam_ref) < TOL:
                return i + 1
        return None

    runs = {}
    for name, solve, max_long in [
        ("Lanczos", lambda **kw: top_eigenvalues(f, params, k=1, **kw), 100),
        ("power iteration", lambda **kw: power_iteration(f, params, **kw), 400),
    ]:
        # the stopping rule (relative change < 1e-3) ...
        lam, info = solve(tol=TOL, max_iter=1000)
        t_stop = interleaved_medians({"s": lambda: solve(tol=TOL, max_iter=1000)}, 3, 0)["s"]
        # ... and the first iterate that is actually within 1e-3 of the reference (same seed,
        # so a longer run repeats the same iterates), timed by a run cut there.
        _, long_info = solve(tol=1e-15, max_iter=max_long)
        n_acc = first_accurate(long_info.history)
        t_acc = math.nan
        if n_acc is not None:
            t_acc = interleaved_medians({"a": lambda: solve(tol=1e-15, max_iter=n_acc)}, 3, 0)["a"]
        runs[name] = (lam.reshape(-1)[0].item(), info, n_acc, t_stop, t_acc)
    rows = []
    for name, (lam, info, n_acc, t_stop, t_acc) in runs.items():
        err = abs(lam - lam_ref) / abs(lam_ref)
        rows.append([
            name,
            str(info.n_hvp),
            f"{t_stop:.2f} s",
            f"{err:.1e}",
            f"> {400 if name.startswith('power') else 100}" if n_acc is None else str(n_acc),
            "-" if n_acc is None else f"{t_acc:.2f} s",
        ])
    table(
        f"3. Top Hessian eigenvalue to {TOL:g} relative accuracy "
        f"(reference {lam_ref:.6g} from Lanczos, {ref_info.n_hvp} HVPs)",
        ["method", "HVPs at stop", "time at stop", "error at stop", "HVPs to 1e-3", "time to 1e-3"],
        rows,
    )
    lz, pw = runs["Lanczos"], runs["power iteration"]
    if lz[2] and pw[2]:
        print(f"   Lanczos needs {pw[2] / lz[2]:.1f}x fewer HVPs than power iteration for 1e-3.")
    busy = cpu_busy_fraction()
    if busy is not None:
        print(f"\nCPU busy after the run (other processes): {busy:.0%}")


if __name__ == "__main__":
    main()
