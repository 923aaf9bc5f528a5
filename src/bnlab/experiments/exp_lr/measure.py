"""``exp-lr``'s measurement: parts A (equivalence), B (accuracy) and C (float32 overflow).

No verdict here: :func:`measure` returns the summary that :mod:`.judge` decides from.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ... import data as data_mod
from ... import models
from ...analysis import nanmax
from ...functional import stateless_call
from ...lockstep import AngularUpdateTracker, Arm, PairTracker, lockstep
from ...numpy_bn import TinyBNNet
from ...runs import RunDir
from ...schedules import TEXP, ExactExpLR, ExpLR, step_decay_lr, wd_equivalent_alpha
from ...train import evaluate
from ..base import Context
from .config import ANGULAR_ARMS, B_ARMS, B_PAIRS, MAIN_PAIRS, SERIES_FILE, Config, a_arms, a_pairs, decay_phases

_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The steps at which part A's angles are quoted in the summary.
_ANGLE_AT = (1, 10, 100, 300, 1000)


# ----------------------------------------------------------------------------- building arms


def _set_norm_eps(model: nn.Module, eps: float) -> None:
    """Set the ``eps`` of every normalization layer (BatchNorm, GroupNorm, LayerNorm) of ``model``."""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            m.eps = float(eps)


def _make_arm(name: str, cfg: Config, tr, *, net: str, schedule: str, dtype, eps, width: int, seed: int,
              steps: int, device) -> Arm:
    """An arm of ``cfg.model`` (``net``: ``si`` fully scale-invariant BN net, ``si_<norm>`` the same with
    another norm layer, ``std`` standard BN net) trained with ``schedule``: ``wd`` (constant LR + WD),
    ``sd`` (step decay + WD), ``exp`` (ExpLR), ``texp`` (TEXP), ``exp_nopreset`` (ExpLR with its
    momentum-buffer preset removed), ``zb_exp``/``zb_texp`` (:class:`ExactExpLR` from PyTorch's lazily
    created buffers, constant LR / step decay) or ``w1`` (constant LR + WD with ``cfg.w1_weight_decay``)."""
    standard = net == "std"
    norm = net[3:] if net.startswith("si_") else "bn"
    model = models.make(cfg.model, norm=norm, in_shape=tr.in_shape, num_classes=tr.num_classes, affine=standard,
                        freeze_last=not standard, seed=seed, width=width, depth=cfg.depth)
    if eps is not None:
        _set_norm_eps(model, eps)
    model.to(device=device, dtype=dtype)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    lr, wd, mom = float(cfg.lr), float(cfg.weight_decay), float(cfg.momentum)
    sched, lr_fn = None, None
    phases = decay_phases(cfg.lr, cfg.decay_at, cfg.decay_factor, steps)
    if schedule in ("wd", "sd", "w1"):
        opt = torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=float(cfg.w1_weight_decay) if schedule == "w1" else wd)
        if schedule == "sd":
            lr_fn = lambda t, phases=phases: step_decay_lr(t, lr_phases=phases)  # noqa: E731
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=mom)
        kw = dict(weight_decay=wd, momentum=mom, renormalize=not standard, renorm_bound=float(cfg.renorm_bound))
        if schedule == "texp":
            sched = TEXP(opt, lr_phases=phases, **kw)
        elif schedule == "zb_exp":
            sched = ExactExpLR(opt, lr=lr, **kw)
        elif schedule == "zb_texp":
            sched = ExactExpLR(opt, lr_phases=phases, **kw)
        else:
            sched = ExpLR(opt, lr=lr, **kw)
        if schedule == "exp_nopreset":
            # Ablation: ExpLR has no switch for the buffer mapping; remove the preset it stored, so
            # the first step starts from PyTorch's default (no buffer: buf = g_0).
            for p in params:
                opt.state[p].pop("momentum_buffer", None)
    return Arm(name, model, named, opt, sched, lr_fn, dtype, steps)


def _si_names(named: dict) -> list[str]:
    """The conv/linear weights that feed a BN layer (all matrices except the classifier)."""
    return [n for n, p in named.items() if p.dim() > 1 and not n.startswith("classifier")]


def _joint_invariance_error(arm: Arm, x: torch.Tensor, scale: float = 3.0) -> float:
    """``max |f(c w) - f(w)| / max |f(w)|`` with all trained tensors scaled by ``c`` (train mode, float64)."""
    params = {n: p.detach().to(torch.float64) for n, p in arm.model.named_parameters()}
    buffers = {n: b.to(torch.float64) if b.is_floating_point() else b for n, b in arm.model.named_buffers()}
    scaled = {n: p * scale if n in arm.params else p for n, p in params.items()}
    x = x.to(torch.float64)
    was_training = arm.model.training
    arm.model.train()
    try:
        with torch.no_grad():
            out = stateless_call(arm.model, x, params=params, buffers=buffers)
            out_c = stateless_call(arm.model, x, params=scaled, buffers=buffers)
    finally:
        arm.model.train(was_training)
    return float((out_c - out).abs().max() / out.abs().max())


def _eval_hook(arms: dict[str, Arm], tracker: PairTracker, *, every: int, eval_sets: dict, eval_pairs: bool,
               eval_train: bool, log: Callable, group: str, finals: dict, eval_diffs: dict) -> Callable[[int], None]:
    """A :func:`lockstep` hook: every ``every`` steps (and at an arm's last step) evaluate the live
    arms in eval mode (test set; training set too with ``eval_train``) and log the records; with
    ``eval_pairs`` also the pairs' eval-mode output differences on the fixed batch. The record of
    an arm's last step goes to ``finals[arm]``, the differences to ``eval_diffs[pair]``."""

    def hook(t: int) -> None:
        if t == 0 or not every:
            return
        for name, arm in arms.items():
            if not arm.alive(t) or not (t % every == 0 or t == arm.steps):
                continue
            tr_d, te_d = eval_sets[arm.dtype]
            rec = {"group": group, "arm": name, "event": "eval", "step": t}
            if eval_train:
                m_tr = evaluate(arm.model, tr_d)
                rec.update(train_loss=m_tr["loss"], train_acc=m_tr["acc"])
            m_te = evaluate(arm.model, te_d)
            rec.update(test_loss=m_te["loss"], test_acc=m_te["acc"])
            log(rec)
            if t == arm.steps:
                finals[name] = rec
        if eval_pairs and t % every == 0:
            for pname, (a, b, _) in tracker.pairs.items():
                if not (arms[a].alive(t) and arms[b].alive(t)):
                    continue
                diff = tracker.output_diff(a, b, eval_mode=True)
                eval_diffs.setdefault(pname, []).append(diff)
                log({"group": group, "pair": pname, "event": "eval_outdiff", "step": t, "eval_output_diff": diff})

    return hook


def _run_group(arms: dict[str, Arm], pairs: dict[str, tuple], data, *, steps: int, batch_size: int, seed: int,
               fixed_x: torch.Tensor, eval_every: int, eval_sets: dict, eval_pairs: bool, eval_train: bool,
               log: Callable, group: str, progress, angular=()) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Step ``arms`` in lockstep, comparing ``pairs`` (``{pair: (arm a, arm b, output_every)}``).

    Returns ``(series, finals, eval_diffs)``: ``series`` keyed ``{group}.arm.{arm}.{key}`` (with
    ``diverged_at``, -1 if not) and ``{group}.pair.{pair}.{key}`` (``angle``, ``outdiff``, ``per``,
    ``names``, + ``conv`` for a standard net: its conv/linear weights jointly) and, for the arms in
    ``angular``, ``{group}.angular.{arm}.update``/``names`` (:class:`AngularUpdateTracker`), ``finals`` the last
    evaluation record of every arm that reached it, ``eval_diffs`` the eval-mode output
    differences per pair.
    """
    subsets = {p: {"conv": _si_names(arms[a].params)} for p, (a, _, _) in pairs.items()
               if any(n.startswith("classifier") for n in arms[a].params)}
    tracker = PairTracker(arms, pairs, steps=steps, fixed_x=fixed_x, subsets=subsets)
    finals: dict = {}
    eval_diffs: dict = {}
    hook = _eval_hook(arms, tracker, every=eval_every, eval_sets=eval_sets, eval_pairs=eval_pairs,
                      eval_train=eval_train, log=log, group=group, finals=finals, eval_diffs=eval_diffs)
    hooks = [tracker, hook]
    ang = AngularUpdateTracker(arms, [a for a in angular if a in arms], steps=steps)
    if ang.names:
        hooks.append(ang)
    lockstep(arms, data, steps=steps, batch_size=batch_size, seed=seed, hooks=hooks, progress=progress)
    out: dict[str, np.ndarray] = {}
    for name, arm in arms.items():
        for k, v in arm.series.items():
            out[f"{group}.arm.{name}.{k}"] = v
        out[f"{group}.arm.{name}.diverged_at"] = np.array(-1 if arm.diverged_at is None else arm.diverged_at)
    for pname, d in tracker.series.items():
        for k, v in d.items():
            out[f"{group}.pair.{pname}.{k}"] = v
    for aname, d in ang.series.items():
        for k, v in d.items():
            out[f"{group}.angular.{aname}.{k}"] = v
    return out, finals, eval_diffs


# ----------------------------------------------------------------------------- part C: overflow


def _overflow_runs(cfg: Config, log: Callable, progress) -> tuple[dict, dict]:
    """Part C: ExpLR in float32 with and without power-of-two renormalization, in lockstep."""
    steps, every = int(cfg.overflow_steps), max(1, int(cfg.overflow_log_every))
    lr, wd, mom = float(cfg.lr), float(cfg.overflow_weight_decay), float(cfg.momentum)
    net = TinyBNNet(int(cfg.seed))
    runs = {}
    for name, renorm in (("renorm", True), ("plain", False)):
        w = nn.Parameter(torch.from_numpy(net.W0.copy()))
        w.grad = torch.zeros_like(w)
        opt = torch.optim.SGD([w], lr=lr, momentum=mom, foreach=False)
        sched = ExpLR(opt, lr=lr, weight_decay=wd, momentum=mom, renormalize=renorm, renorm_bound=float(cfg.renorm_bound))
        # numpy views share the tensors' memory; SGD and the renormalization update them in place
        runs[name] = {"w": w, "wn": w.detach().numpy(), "gn": w.grad.numpy(), "opt": opt, "sched": sched,
                      "alive": True, "nonfinite_at": None, "how": None, "lr_over_at": None, "loss": math.nan,
                      "forward_over_at": None}
    n_log = steps // every + 1
    ser = {f"C.{name}.{k}": np.full(n_log, np.nan) for name in runs for k in ("log2_norm", "log2_scale", "log2_opt_lr", "loss")}
    ser["C.step"] = np.arange(n_log) * every
    mismatches, compared, first_mismatch = 0, 0, None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress, unit="step", leave=False, dynamic_ncols=True, miniters=1000)

    def record(i: int) -> None:
        for name, r in runs.items():
            if not r["alive"]:
                continue
            norm = float(np.linalg.norm(r["wn"].astype(np.float64)))
            ser[f"C.{name}.log2_norm"][i] = math.log2(norm) if norm > 0 else -math.inf
            ser[f"C.{name}.log2_scale"][i] = r["sched"].log2_scale
            ser[f"C.{name}.log2_opt_lr"][i] = math.log2(r["opt"].param_groups[0]["lr"])
            ser[f"C.{name}.loss"][i] = r["loss"]

    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        record(0)
        for t in range(steps):
            for name, r in runs.items():
                if not r["alive"]:
                    continue
                lr_t = r["opt"].param_groups[0]["lr"]
                if r["lr_over_at"] is None and not lr_t <= _FLOAT32_MAX:
                    r["lr_over_at"] = t
                r["loss"], finite = net.loss_grad(r["wn"], r["gn"])
                if not finite and r["forward_over_at"] is None:
                    r["forward_over_at"] = t
                    log({"event": "forward_overflow", "run": name, "step": t, "loss": r["loss"],
                         "reason": f"BN variance, loss or gradient not finite in float32 at step {t}"})
                try:
                    r["opt"].step()
                except RuntimeError as e:  # PyTorch refuses an LR beyond float32's range for float32 weights
                    if "overflow" not in str(e):
                        raise
                    r["alive"], r["nonfinite_at"], r["how"] = False, t, "lr"
                    log({"event": "overflow", "run": name, "step": t, "loss": r["loss"], "lr": lr_t, "kind": "lr",
                         "reason": f"SGD refuses LR {lr_t:.3g} (beyond float32) at step {t}: {e}"})
                    continue
                r["sched"].step()
                if not np.isfinite(r["wn"]).all():
                    r["alive"], r["nonfinite_at"], r["how"] = False, t, "weights"
                    log({"event": "overflow", "run": name, "step": t, "loss": r["loss"], "lr": lr_t, "kind": "weights",
                         "reason": f"non-finite weights after step {t}"})
            if runs["plain"]["alive"]:
                compared += 1
                k = runs["renorm"]["sched"].log2_scale
                if not np.array_equal(np.ldexp(runs["renorm"]["wn"], k), runs["plain"]["wn"]):
                    mismatches += 1
                    first_mismatch = t if first_mismatch is None else first_mismatch
            if (t + 1) % every == 0:
                record((t + 1) // every)
            if bar is not None and (t + 1) % 1000 == 0:
                bar.update(1000)
    if bar is not None:
        bar.close()
    rn, pl = runs["renorm"], runs["plain"]
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    summary = {
        "steps": steps, "weight_decay": wd, "alpha": alpha, "seconds": round(time.perf_counter() - t0, 2),
        "renorm": {"finite_steps": steps if rn["nonfinite_at"] is None else rn["nonfinite_at"],
                   "nonfinite_at": rn["nonfinite_at"], "renormalizations": rn["sched"].renormalizations,
                   "log2_scale": rn["sched"].log2_scale, "lr_over_float32_at": rn["lr_over_at"],
                   "final_log2_unrescaled_lr": math.log2(lr) - (2 * steps + 1) * math.log2(alpha),
                   "final_loss": rn["loss"], "forward_overflow_at": rn["forward_over_at"]},
        "plain": {"nonfinite_at": pl["nonfinite_at"], "how": pl["how"], "lr_over_float32_at": pl["lr_over_at"],
                  "forward_overflow_at": pl["forward_over_at"],
                  "overflow_at": min([v for v in (pl["nonfinite_at"], pl["forward_over_at"]) if v is not None], default=None),
                  "final_loss_before": pl["loss"]},
        "bit_identical_steps": compared - mismatches, "compared_steps": compared, "mismatched_steps": mismatches,
        "first_mismatch_step": first_mismatch,
    }
    return ser, summary


# ----------------------------------------------------------------------------- measure


def measure(cfg: Config, run: RunDir, ctx: Context, name: str = "exp-lr") -> dict:
    """Parts A, B and C; series into ``series.npz``, evaluations and events into the metrics; the summary.

    The summary carries what the judge reads: per part A pair the angle series (``angle``, one
    entry per step, index 0 the initialization) besides its maxima; part B's final test accuracies
    per arm and seed with their statistics; part C's overflow steps; and the hyperparameters
    quoted in the verdicts (``lr``, ``momentum``, ``weight_decay``, ``exact_bn_eps``).
    """
    dev = torch.device(ctx.device)
    lr, wd, mom = float(cfg.lr), float(cfg.weight_decay), float(cfg.momentum)
    alpha = wd_equivalent_alpha(lr=lr, weight_decay=wd, momentum=mom)
    tr, te = data_mod.load_pair(cfg.data, seed=cfg.seed)
    tr, te = tr.to(dev), te.to(dev)
    fixed_x = te.x[: cfg.output_batch]
    log = run.append_metrics

    series: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {"alpha": alpha, "lr_growth_per_step": alpha ** -2,
                               "norm_time_scale_steps": 1.0 / (1.0 - alpha),
                               "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                               "exact_bn_eps": cfg.exact_bn_eps}
    timing = {}

    # ---------------- part A: equivalence in lockstep
    t0 = time.perf_counter()
    T = cfg.equiv_steps
    side = min(int(cfg.side_steps), T)
    all_arms, all_pairs = a_arms(cfg.other_norms), a_pairs(cfg.other_norms)
    main_pairs = MAIN_PAIRS + tuple(f"norm_{n}" for n in cfg.other_norms)
    pairs_a = {p: (a, b, int(cfg.output_every) if p in main_pairs else int(cfg.side_output_every))
               for p, (a, b, _) in all_pairs.items() if p in main_pairs or side > 0}
    arms_a = {}
    for n in [*dict.fromkeys(x for a, b, _ in pairs_a.values() for x in (a, b)), "w1"]:
        net, sch, dtype, eps = all_arms[n]
        main = n == "w1" or any(n in (a, b) for p, (a, b, _) in pairs_a.items() if p in main_pairs)
        arms_a[n] = _make_arm(n, cfg, tr, net=net, schedule=sch, dtype=dtype,
                              eps=cfg.exact_bn_eps if eps == "exact" else None, width=cfg.width,
                              seed=cfg.seed, steps=T if main else side, device=dev)
    summary["joint_invariance_error"] = _joint_invariance_error(arms_a["wd"], fixed_x)
    summary["norm_invariance_error"] = {n: _joint_invariance_error(arms_a[f"{n}_wd"], fixed_x) for n in cfg.other_norms}
    if "std_wd" in arms_a:
        summary["standard_net_invariance_error"] = _joint_invariance_error(arms_a["std_wd"], fixed_x)
    eval_sets_a = {dt: (None, te.to(dtype=dt)) for dt in (torch.float64, torch.float32)}  # test set only
    ser_a, finals_a, eod = _run_group(arms_a, pairs_a, tr, steps=T, batch_size=cfg.equiv_batch_size, seed=cfg.seed,
                                      fixed_x=fixed_x, eval_every=cfg.equiv_eval_every, eval_sets=eval_sets_a,
                                      eval_pairs=True, eval_train=False, log=log, group="A",
                                      progress=ctx.bar(f"{name} A (equivalence)"), angular=ANGULAR_ARMS)
    series.update(ser_a)
    timing["A_equivalence"] = round(time.perf_counter() - t0, 2)
    summary["equivalence"] = eq = {"steps": T, "side_steps": side, "other_norms": list(cfg.other_norms),
                                   "decay_phases": [list(x) for x in decay_phases(cfg.lr, cfg.decay_at, cfg.decay_factor, T)],
                                   "pairs": {}}
    for p in pairs_a:
        n_p = min(arms_a[pairs_a[p][0]].steps, arms_a[pairs_a[p][1]].steps)
        ang, od = series[f"A.pair.{p}.angle"][: n_p + 1], series[f"A.pair.{p}.outdiff"][: n_p + 1]
        per = series[f"A.pair.{p}.per"]
        names = [str(s) for s in series[f"A.pair.{p}.names"]]
        eq["pairs"][p] = {
            "what": all_pairs[p][2], "steps": n_p, "angle": [float(v) for v in ang],
            "max_angle": nanmax(ang), "final_angle": float(ang[-1]),
            "angle_at": {str(s): float(ang[s]) for s in _ANGLE_AT if s <= n_p},
            "max_angle_per_param": {n: nanmax(per[i]) for i, n in enumerate(names)},
            "max_output_diff": nanmax(od),
        }
        if f"A.pair.{p}.conv" in series:
            conv = series[f"A.pair.{p}.conv"][: n_p + 1]
            eq["pairs"][p]["max_angle_conv_weights"] = nanmax(conv)
            eq["pairs"][p]["final_angle_conv_weights"] = float(conv[-1])
    for p, v in eod.items():
        eq["pairs"][p]["max_eval_mode_output_diff"] = nanmax(v)
    eq["final_eval"] = {n: {"step": r["step"], "test_acc": r["test_acc"], "test_loss": r["test_loss"]}
                        for n, r in finals_a.items()}
    eq["diverged"] = {n: a.diverged_at for n, a in arms_a.items() if a.diverged_at is not None}
    eq["final_norms"] = {n: float(series[f"A.arm.{n}.norm"][a.steps]) for n, a in arms_a.items()}
    eq["renormalizations"] = {n: a.scheduler.renormalizations for n, a in arms_a.items() if a.scheduler is not None}
    summary["angular_update"] = {
        n: {"lr": lr, "momentum": mom, "weight_decay": float(cfg.w1_weight_decay) if n == "w1" else wd,
            "steps": arms_a[n].steps, "diverged_at": arms_a[n].diverged_at,
            "update": {str(k): [float(v) for v in series[f"A.angular.{n}.update"][i]]
                       for i, k in enumerate(series[f"A.angular.{n}.names"])}}
        for n in ANGULAR_ARMS if f"A.angular.{n}.update" in series}
    del arms_a

    # ---------------- part B: accuracy over seeds
    t0 = time.perf_counter()
    TB = cfg.acc_steps
    acc: dict[str, dict] = {}
    angles_b: dict[str, dict] = {}
    for i_seed, sd in enumerate(cfg.acc_seeds):
        names_b = [n for n in B_ARMS if i_seed < int(cfg.acc_standard_seeds) or not n.startswith("std")]
        arms_b = {n: _make_arm(n, cfg, tr, net=B_ARMS[n][0], schedule=B_ARMS[n][1], dtype=torch.float32, eps=None,
                               width=cfg.acc_width, seed=sd, steps=TB, device=dev) for n in names_b}
        pairs_b = {p: (*v, 0) for p, v in B_PAIRS.items() if v[0] in arms_b and v[1] in arms_b}
        g = f"B{sd}"
        ser_b, finals_b, _ = _run_group(arms_b, pairs_b, tr, steps=TB, batch_size=cfg.acc_batch_size, seed=sd,
                                        fixed_x=fixed_x, eval_every=cfg.acc_eval_every,
                                        eval_sets={torch.float32: (tr, te)}, eval_pairs=False, eval_train=True,
                                        log=log, group=g, progress=ctx.bar(f"{name} B seed {sd} (accuracy)"))
        series.update(ser_b)
        for n, a in arms_b.items():
            acc.setdefault(n, {})[str(sd)] = {"diverged_at": a.diverged_at}
            if n in finals_b:
                acc[n][str(sd)].update(test_acc=finals_b[n]["test_acc"], train_acc=finals_b[n]["train_acc"])
        for p in pairs_b:
            angles_b.setdefault(p, {})[str(sd)] = {"max": nanmax(series[f"{g}.pair.{p}.angle"]),
                                                   "final": float(series[f"{g}.pair.{p}.angle"][-1])}
        del arms_b
    timing["B_accuracy"] = round(time.perf_counter() - t0, 2)
    summary["accuracy"] = accs = {"steps": TB, "seeds": list(cfg.acc_seeds), "arms": acc, "float32_angles": angles_b}
    stats = {}
    for n, per_seed in acc.items():
        vals = [v.get("test_acc", math.nan) for v in per_seed.values()]
        if not vals:
            continue
        vals = [math.nan if v is None else float(v) for v in vals]
        stats[n] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                    "spread": float(np.max(vals) - np.min(vals))}
    accs["test_acc_stats"] = stats

    # ---------------- part C: overflow
    t0 = time.perf_counter()
    ser_c, ovf = _overflow_runs(cfg, log, ctx.bar(f"{name} C (float32 overflow)"))
    series.update(ser_c)
    timing["C_overflow"] = round(time.perf_counter() - t0, 2)
    summary["overflow"] = ovf
    summary["seconds"] = timing
    run.save_arrays(SERIES_FILE, **series)
    log({"event": "done", "seconds": timing})
    return summary
