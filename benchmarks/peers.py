"""bnlab against its peers, PyHessian and hessian-eigenthings, on one model and batch in one run.

Run: ``.venv/bin/python benchmarks/peers.py [--width W] [--batch B] [--image-size S] [--quick]
[--threads N]`` (the peers come with the ``bench`` extra: ``pip install -e '.[bench]'``).
The default (ResNet-18 at width 16, batch 16, 32x32 inputs, one thread) took 3.6 minutes on the
2-core CPU with other jobs running; ``--width 64`` is torchvision's full ResNet-18 (11.2 M
parameters, ~8x slower per HVP; ``--tasks 0`` times only the HVP there); ``--quick`` shrinks
everything for a smoke run (about a minute).

Model: ``bnlab.models.resnet.resnet18``, torchvision's published layout (conv 7x7/2, max-pool,
four stages of two BasicBlocks, BN after every conv), random inputs and labels, cross-entropy.
The BN running statistics are first warmed on random batches so that eval mode is meaningful.

Modes: PyHessian always puts the model in eval mode (``model.eval()`` in its constructor), so it
is compared in **eval** mode (BN on running statistics); hessian-eigenthings calls the module as it
is, so it is compared in **eval** and in **train** mode (BN on batch statistics, the Hessian of
the training loss; on a copy of the model, since its forward passes update the running
statistics). bnlab measures both without changing the model.

Tables (time: wall seconds; ratio: bnlab's time / the peer's, < 1 means bnlab is faster):

0. One Hessian-vector product: bnlab's ``HessianOperator.matvec`` into a work buffer, as its
   solvers call it (graph of the gradient built once, reused; also shown: the same product as a
   dict, ``bnlab.curvature.hvp``'s form, and as a new flat vector), PyHessian's ``hessian_vector_product`` (the same reuse), hessian-eigenthings'
   ``HessianOperator.matvec`` (forward and backward recomputed at every product, its design);
   medians over interleaved repeats.
1. Top eigenvalue to a relative error of 1e-4: each tool asked for tolerance 1e-4 with its
   own stopping rule: bnlab's Lanczos (residual bound), PyHessian's power iteration (relative
   change), hessian-eigenthings' power iteration (relative change and residual) and its Lanczos
   (a fixed number of steps: given bnlab's count, an equal budget). Error against a long bnlab
   Lanczos reference (residual bound 1e-9 relative, certified by the residual).
2. Trace at an equal HVP budget: mean and spread (standard deviation) over 5 seeds of
   Hutchinson (all three tools) and Hutch++ (bnlab, hessian-eigenthings).
3. Spectral density by stochastic Lanczos quadrature at the same number of runs and steps
   (bnlab.spectrum.spectral_density, PyHessian's ``density``, hessian-eigenthings'
   ``spectral_density``); the distance between densities is the L1 distance ``∫|φ_a − φ_b|``
   of the Gaussian-smoothed densities on one grid with one width σ (bnlab's), next to the
   distance between two bnlab runs with different seeds (the Monte Carlo floor).

Shims (no peer file is edited): PyHessian's ``density`` calls ``torch.eig``, removed in torch 2;
the benchmark installs ``torch.eig`` (real symmetric input, via ``torch.linalg.eigh``, returning
the old ``(values as (n, 2) real/imag, vectors)`` layout) for the duration of that call.
PyHessian's HVPs are counted by wrapping ``pyhessian.hessian.hessian_vector_product``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from _common import cpu_busy_fraction, table  # benchmarks/_common.py (this folder is sys.path[0])
from bnlab.curvature import HessianOperator, _unflatten, hessian_trace, model_loss_closure, top_eigenvalues

TOL = 1e-4


# --------------------------------------------------------------------------------------------
# helpers


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def interleaved(tools: dict, repeats: int):
    """Run every tool ``repeats`` times, taking turns; returns (first results, median times)."""
    results, times = {}, {k: [] for k in tools}
    for rep in range(repeats):
        for k, fn in tools.items():
            out, t = timed(fn)
            results.setdefault(k, out)
            times[k].append(t)
    return results, {k: statistics.median(v) for k, v in times.items()}


def std_interval(dof: int, z: float = 1.6449) -> tuple[float, float]:
    """Factors ``(a, b)``: the 90 % interval of σ from a sample std ``s`` with ``dof`` degrees of
    freedom is ``[a s, b s]`` (chi-square quantiles by the Wilson-Hilferty approximation)."""
    def chi2(zq):
        return dof * (1 - 2 / (9 * dof) + zq * math.sqrt(2 / (9 * dof))) ** 3

    return math.sqrt(dof / chi2(z)), math.sqrt(dof / max(chi2(-z), 1e-12))


def fmt(x: float, digits: int = 6) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def ratio(a: float, b: float) -> str:
    return "n/a" if not b or math.isnan(b) or math.isnan(a) else f"{a / b:.2f}"


class Unavailable(Exception):
    pass


def import_peer(name: str):
    try:
        return __import__(name)
    except Exception as exc:  # ImportError, or a peer failing at import
        raise Unavailable(f"cannot import {name}: {type(exc).__name__}: {exc} "
                          f"(install the peers with: pip install -e '.[bench]')") from exc


@contextmanager
def torch_eig_shim():
    """``torch.eig`` (removed in torch 2) for PyHessian's ``density``: symmetric real input."""
    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)

    def eig(a, eigenvectors=False):
        w, v = torch.linalg.eigh(a)
        vals = torch.stack([w, torch.zeros_like(w)], dim=1)
        return vals, (v if eigenvectors else torch.empty(0))

    torch.eig = eig
    try:
        yield
    finally:
        if had:
            torch.eig = old
        else:
            del torch.eig


class Counted:
    """A hessian-eigenthings operator wrapper that counts products."""

    def __init__(self, op):
        from hessian_eigenthings import LambdaOperator

        self.n = 0
        self.inner = op

        def mv(v):
            self.n += 1
            return op.matvec(v)

        self.op = LambdaOperator(mv, op.size, device=op.device, dtype=op.dtype)


# --------------------------------------------------------------------------------------------
# tools


def bnlab_operator(model, batch):
    f, params = model_loss_closure(model, batch, F.cross_entropy)
    return HessianOperator(f, params, method="reverse")


PH_HVPS = [0]  # PyHessian's HVPs, counted by the wrapper below


def pyhessian_hessian(model, batch, counter: list):
    """A PyHessian ``hessian`` on a copy of ``model`` (it calls ``backward`` on the model and
    puts it in eval mode); its HVPs from now on are counted in ``counter[0]``."""
    pyhessian = import_peer("pyhessian")
    ph = _ph_module()
    if not getattr(ph, "_bnlab_counted", False):
        inner = ph.hessian_vector_product

        def counted(gradsH, params, v):
            PH_HVPS[0] += 1
            return inner(gradsH, params, v)

        ph.hessian_vector_product = counted
        ph._bnlab_counted = True
    H = pyhessian.hessian(copy.deepcopy(model), F.cross_entropy, data=batch, cuda=False)
    PH_HVPS[0] = 0
    counter[:] = [PH_HVPS]
    return H


def _ph_module():
    """The module ``pyhessian.hessian`` (the package's ``hessian`` attribute is the class)."""
    import sys

    import_peer("pyhessian")
    return sys.modules["pyhessian.hessian"]


def eigenthings_operator(model, batch):
    he = import_peer("hessian_eigenthings")
    return he.HessianOperator(copy.deepcopy(model), [batch], he.supervised_loss(F.cross_entropy),
                              full_dataset=True)


# --------------------------------------------------------------------------------------------
# the benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="channels of layer1 (64: torchvision's ResNet-18)")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--image-size", type=int, default=32, help="input height = width")
    parser.add_argument("--trace-budget", type=int, default=24, help="HVPs per trace estimate")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of each trace estimator")
    parser.add_argument("--runs", type=int, default=3, help="spectral density: Lanczos runs")
    parser.add_argument("--steps", type=int, default=24, help="spectral density: Lanczos steps per run")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the per-HVP timing")
    parser.add_argument("--task-repeats", type=int, default=3, help="repeats of the top-eigenvalue task")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: stable ratios on a shared CPU)")
    parser.add_argument("--tasks", default="0,1,2,3", help="which tables to run, e.g. 0,1 (0: one HVP)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: width 8, batch 8, small budgets")
    args = parser.parse_args()
    if args.quick:
        args.width, args.batch, args.trace_budget, args.seeds = 8, 8, 12, 3
        args.runs, args.steps, args.repeats, args.task_repeats = 2, 12, 3, 1
    torch.set_num_threads(args.threads)

    from bnlab.models.resnet import resnet18

    torch.manual_seed(0)
    model = resnet18(in_shape=(3, args.image_size, args.image_size), num_classes=10, width=args.width)
    with torch.no_grad():  # warm the running statistics so that eval mode is meaningful
        model.train()
        for _ in range(8):
            model(torch.randn(32, 3, args.image_size, args.image_size))
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    batch = (x, y)
    n_params = sum(p.numel() for p in model.parameters())
    models = {"eval": copy.deepcopy(model).eval(), "train": copy.deepcopy(model).train()}

    versions = {"torch": torch.__version__}
    peers_ok = {}
    for name, mod in (("PyHessian", "pyhessian"), ("hessian-eigenthings", "hessian_eigenthings")):
        try:
            m = import_peer(mod)
            peers_ok[name] = None
            versions[name] = getattr(m, "__version__", None) or _dist_version(name)
        except Unavailable as exc:
            peers_ok[name] = str(exc)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"model: ResNet-18 (torchvision layout), width {args.width}, {n_params:,} parameters; "
          f"batch {tuple(x.shape)}; {torch.get_num_threads()} thread(s)")
    for name, why in peers_ok.items():
        if why:
            print(f"{name}: not run: {why}")
    busy = cpu_busy_fraction()
    if busy is not None:
        print(f"CPU busy before the run (other processes): {busy:.0%}")
    has_ph = peers_ok["PyHessian"] is None
    has_he = peers_ok["hessian-eigenthings"] is None
    he = import_peer("hessian_eigenthings") if has_he else None

    tasks = {t.strip() for t in args.tasks.split(",")}
    unknown = tasks - {"0", "1", "2", "3"}
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; accepted: 0, 1, 2, 3")
    if "0" in tasks:
        per_hvp(args, model, models, batch, has_ph, has_he)
    if "1" in tasks:
        top_eigenvalue_task(args, model, models, batch, has_ph, has_he, he)
    if "2" in tasks:
        trace_task(args, model, models, batch, has_ph, has_he, he)
    if "3" in tasks:
        density_task(args, model, models, batch, has_ph, has_he, he, n_params)
    busy = cpu_busy_fraction()
    if busy is not None:
        print(f"\nCPU busy after the run: {busy:.0%}")


def per_hvp(args, model, models, batch, has_ph, has_he):
    fns = {}
    ops = {mode: bnlab_operator(models[mode], batch) for mode in models}
    vec = torch.randn(ops["eval"].numel)
    bufs = {mode: torch.empty_like(vec) for mode in models}
    for mode in ("eval", "train"):  # the solvers' path: every product into one work buffer
        fns[f"bnlab {mode}"] = (lambda op=ops[mode], buf=bufs[mode]: op.matvec(vec, out=buf))
    v_dict = _unflatten(vec, ops["eval"].params, ops["eval"].keys)
    # the same product as a dict (bnlab.curvature.hvp), and as a new flat vector (matvec without out)
    extra = {"bnlab, as a dict (hvp) eval": lambda: ops["eval"](v_dict),
             "bnlab, a new flat vector eval": lambda: ops["eval"].matvec(vec)}
    fns.update(extra)
    if has_ph:
        cnt = [0]
        H = pyhessian_hessian(model, batch, cnt)
        v_list = [t.view_as(p) for t, p in zip(torch.split(vec, [p.numel() for p in H.params]), H.params)]
        ph = _ph_module()
        fns["PyHessian eval"] = lambda: ph.hessian_vector_product(H.gradsH, H.params, v_list)
    if has_he:
        he_ops = {mode: eigenthings_operator(models[mode], batch) for mode in models}
        for mode in ("eval", "train"):
            fns[f"eigenthings {mode}"] = (lambda op=he_ops[mode]: op.matvec(vec))
    # correctness first: the same product from every tool (same mode)
    ref = {mode: ops[mode].matvec(vec) for mode in models}
    check = []
    for name, fn in fns.items():
        mode = name.split()[-1]
        out = fn()
        out = list(out.values()) if isinstance(out, dict) else out
        out = torch.cat([t.reshape(-1) for t in out]) if isinstance(out, (list, tuple)) else out
        check.append(f"{name}: {float((out - ref[mode]).norm() / ref[mode].norm()):.1e}")
    print("HVP relative difference to bnlab's (same mode): " + "; ".join(check))
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            _, t = timed(fn)
            times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in fns:
        mode = k.split()[-1]
        rows.append([k, f"{med[k] * 1e3:.1f} ms", "" if k.startswith("bnlab") else ratio(med[f"bnlab {mode}"], med[k])])
    table(f"0. one Hessian-vector product (median of {args.repeats}, interleaved; bnlab: matvec into the "
          f"solvers' work buffer)", ["tool / mode", "time", "bnlab/peer"], rows)


def top_eigenvalue_task(args, model, models, batch, has_ph, has_he, he):
    TR = args.task_repeats
    rows = []
    for mode in ("eval", "train"):
        (lam_ref, info_ref), t_ref = timed(
            lambda: top_eigenvalues(bnlab_operator(models[mode], batch), k=1, tol=1e-9, max_iter=400))
        ref_val = float(lam_ref[0])
        ref_bound = info_ref.residual_norms[0] / abs(ref_val)
        rows.append([f"reference ({mode}, bnlab Lanczos tol 1e-9)", fmt(ref_val, 10), f"{ref_bound:.0e} (bound)",
                     str(info_ref.n_hvp), f"{t_ref:.1f}", "", ""])
        lam, info = top_eigenvalues(bnlab_operator(models[mode], batch), k=1, tol=TOL, max_iter=400)
        n_b = info.n_hvp
        tools = {}

        def run_bn():
            lam, info = top_eigenvalues(bnlab_operator(models[mode], batch), k=1, tol=TOL, max_iter=400)
            return float(lam[0]), info.n_hvp

        tools["bnlab Lanczos"] = run_bn
        if has_ph and mode == "eval":
            def run_ph():
                cnt = [0]
                H = pyhessian_hessian(model, batch, cnt)
                torch.manual_seed(0)
                vals, _ = H.eigenvalues(maxIter=1000, tol=TOL, top_n=1)
                return vals[0], cnt[0][0]

            tools["PyHessian power"] = run_ph
        if has_he:
            def run_he_power():
                c = Counted(eigenthings_operator(models[mode], batch))
                res = he.power_iteration_one(c.op, max_iter=200, tol=TOL, seed=0)
                return res[0], c.n

            def run_he_lanczos():
                c = Counted(eigenthings_operator(models[mode], batch))
                res = he.lanczos(c.op, k=1, max_iter=n_b, tol=TOL, which="LA", seed=0)
                return float(res.eigenvalues[0]), c.n

            tools["eigenthings power (largest |λ|)"] = run_he_power
            tools[f"eigenthings Lanczos, {n_b} steps"] = run_he_lanczos
        out, med = interleaved(tools, TR)
        t_b = med["bnlab Lanczos"]
        first = next((i + 1 for i, h in enumerate(info.history) if abs(h[0] - ref_val) <= TOL * abs(ref_val)), None)
        for name, (val, n_hvp) in out.items():
            err = abs(val - ref_val) / abs(ref_val)
            rows.append([f"{name} ({mode})", fmt(val, 8), f"{err:.1e}", str(n_hvp), f"{med[name]:.2f}",
                         f"{med[name] / n_hvp * 1e3:.0f}", "" if name.startswith("bnlab") else ratio(t_b, med[name])])
            if name.startswith("bnlab"):
                rows.append([f"  (bnlab's iterate first within {TOL:g}: HVP {first}; certified relative bound "
                             f"at the stop {info.residual_norms[0] / abs(float(lam[0])):.1e})", "", "", "", "", "", ""])
    table(f"1. top eigenvalue, each tool asked for tol {TOL:g} (error: relative, against the reference; "
          f"time: median of {TR}, interleaved)",
          ["tool (mode)", "value", "error", "HVPs", "time s", "ms/HVP", "bnlab/peer"], rows)


def trace_task(args, model, models, batch, has_ph, has_he, he):
    B, S = args.trace_budget, args.seeds
    rows = []
    for mode in ("eval", "train"):
        tools = {}
        for est in ("hutchinson", "hutch++"):
            tools[f"bnlab {est}"] = (lambda s, est=est: hessian_trace(
                bnlab_operator(models[mode], batch), n_samples=B, seed=s, estimator=est).estimate)
        if has_ph and mode == "eval":
            def ph_est(s):
                H = pyhessian_hessian(model, batch, [0])
                torch.manual_seed(s)
                return float(np.mean(H.trace(maxIter=B, tol=0.0)))

            tools["PyHessian hutchinson"] = ph_est
        if has_he:
            for est in ("hutchinson", "hutch++"):
                tools[f"eigenthings {est}"] = (lambda s, est=est: he.trace(
                    eigenthings_operator(models[mode], batch), num_matvecs=B, method=est, seed=s).estimate)
        vals = {k: [] for k in tools}
        times = {k: [] for k in tools}
        for s in range(S):  # interleaved: each seed of every estimator in turn
            for k, fn in tools.items():
                v, t = timed(lambda: fn(s))
                vals[k].append(v)
                times[k].append(t)
        for k in tools:
            bn = "bnlab " + k.split()[-1]
            t = statistics.median(times[k])
            rows.append([f"{k} ({mode})", fmt(float(np.mean(vals[k])), 6), fmt(float(np.std(vals[k], ddof=1)), 3),
                         f"{t:.2f}", "" if k.startswith("bnlab") else ratio(statistics.median(times[bn]), t)])
    table(f"2. trace, {B} HVPs per estimate, mean and spread (std) over {S} seeds "
          f"(time: median per estimate, seeds interleaved)",
          ["estimator (mode)", "mean", "spread", "time s", "bnlab/peer"], rows)
    if S > 1:
        lo, hi = std_interval(S - 1)
        print(f"(a spread s from {S} seeds is itself uncertain: the 90 % interval of the true standard "
              f"deviation is [{lo:.2f}·s, {hi:.2f}·s]; rows with equal values drew the same random vectors)")


def density_task(args, model, models, batch, has_ph, has_he, he, n_params):
    from bnlab.spectrum import gaussian_density, spectral_density

    R, M = args.runs, args.steps
    rows = []
    for mode in ("eval", "train"):
        zero = torch.zeros(n_params)  # no extra run from the gradient: equal HVP counts
        tools = {}

        def bn_run(r):
            sd = spectral_density(bnlab_operator(models[mode], batch), n_runs=1, n_steps=M, seed=r, gradient=zero)
            return sd.nodes[0], sd.weights[0], sd.n_hvp, sd.sigma

        tools["bnlab"] = bn_run
        if has_ph and mode == "eval":
            def ph_run(r):
                cnt = [0]
                H = pyhessian_hessian(model, batch, cnt)
                torch.manual_seed(r)
                with torch_eig_shim():
                    nodes, weights = H.density(iter=M, n_v=1)
                return np.asarray(nodes[0]), np.asarray(weights[0]), cnt[0][0], None

            tools["PyHessian"] = ph_run
        if has_he:
            def he_run(r):
                c = Counted(eigenthings_operator(models[mode], batch))
                res = he.spectral_density(c.op, num_runs=1, lanczos_steps=M, seed=r)
                return res.raw_eigenvalues[0].double().numpy(), res.raw_weights[0].double().numpy(), c.n, None

            tools["eigenthings"] = he_run
        got = {k: [] for k in tools}
        times = {k: [] for k in tools}
        for r in range(R):  # interleaved: each run of every tool in turn (run r: seed r)
            for k, fn in tools.items():
                v, t = timed(lambda: fn(r))
                got[k].append(v)
                times[k].append(t)
        other = [bn_run(R + r) for r in range(R)]  # bnlab with other seeds: the Monte Carlo floor
        sigma = got["bnlab"][0][3]
        allnodes = np.concatenate([np.asarray(g[0], dtype=float) for k in got for g in got[k]])
        allnodes = allnodes[np.isfinite(allnodes)]
        lo, hi = float(allnodes.min()) - 5 * sigma, float(allnodes.max()) + 5 * sigma
        grid = np.linspace(lo, hi, int(min(200_000, max(1_000, (hi - lo) / (sigma / 4)))))

        def dens(runs):
            nodes = np.stack([np.asarray(g[0], dtype=float) for g in runs])
            weights = np.stack([np.asarray(g[1], dtype=float) for g in runs])
            d = gaussian_density(grid, nodes, weights, sigma)
            return d / max(float(np.trapezoid(d, grid)), 1e-300)

        base = dens(got["bnlab"])

        def dist(runs):
            return f"{float(np.trapezoid(np.abs(dens(runs) - base), grid)):.3f}"

        def top(runs):
            return fmt(float(max(np.nanmax(np.asarray(g[0], dtype=float)) for g in runs)), 6)

        t_b = sum(times["bnlab"])
        for k in tools:
            rows.append([f"{k} ({mode})", f"{sum(times[k]):.1f}", str(sum(g[2] for g in got[k])), top(got[k]),
                         "0" if k == "bnlab" else dist(got[k]), "" if k == "bnlab" else ratio(t_b, sum(times[k]))])
            if k == "bnlab":
                rows.append([f"bnlab, other seeds ({mode})", "", "", top(other), dist(other), ""])
    table(f"3. spectral density, {R} runs x {M} steps, runs interleaved (L1 distance to bnlab's density, "
          f"same grid and σ)", ["tool (mode)", "time s", "HVPs", "top node", "L1 distance", "bnlab/peer"], rows)


def _dist_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
