"""``exp-lr``'s figures, drawn from the run directory alone (config, series, metrics, verdicts)."""

from __future__ import annotations

import math

import numpy as np

from ...plotting import STYLE, save, smooth
from ...runs import RunDir
from ...schedules import wd_equivalent_alpha
from .config import B_ARMS, LABELS, SERIES_FILE, a_pairs, decay_phases

FLOAT32_MAX = float(np.finfo(np.float32).max)

_COLORS = {
    "wd": "#1f77b4", "exp": "#ff7f0e", "exp_nopreset": "#7f7f7f", "sd": "#2ca02c", "texp": "#d62728",
    "std_wd": "#17becf", "std_exp": "#e377c2",
    "exact": "#ff7f0e", "ablation": "#7f7f7f", "float32": "#9467bd", "bn_eps": "#8c564b", "standard": "#e377c2",
    "conv": "#bcbd22", "zero_buffer": "#000000", "zero_buffer_sd": "#2ca02c", "norm_gn": "#1f77b4", "norm_ln": "#17becf",
}
_EXTRA_COLORS = ("#bcbd22", "#8c564b", "#9467bd", "#7f7f7f")


def figures(run: RunDir) -> list:
    """The seven figures of an ``exp-lr`` run; the tolerance lines and windows are the ones the verdicts applied."""
    cfg = run.read_json("config.json")["config"]
    S = run.load_arrays(SERIES_FILE)
    recs = run.metrics()
    from ..runner import applied_thresholds
    from . import ExpLRExperiment

    th = applied_thresholds(ExpLRExperiment(), run)
    equiv_tol, window = th.equiv_tol, th.w1_window
    return [
        _fig_angular(cfg, S, run.figure_path("angular_update.png"), window),
        _fig_learning_curves(cfg, S, recs, run.figure_path("learning_curves.png")),
        _fig_angles(cfg, S, recs, run.figure_path("angle_between_runs.png"), equiv_tol),
        _fig_norms(cfg, S, run.figure_path("weight_norm.png")),
        _fig_lrs(cfg, S, run.figure_path("lr_schedules.png")),
        _fig_standard(cfg, S, recs, run.figure_path("standard_net.png")),
        _fig_overflow(cfg, S, recs, run.figure_path("float32_overflow.png")),
    ]


def _phases(cfg: dict, steps: int) -> list:
    return decay_phases(cfg["lr"], cfg["decay_at"], cfg["decay_factor"], steps)


_FLOOR = 1e-18


def _floor(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return np.where(v > _FLOOR, v, np.where(np.isnan(v), np.nan, _FLOOR))


def _evals(recs: list[dict], group: str, arm: str, key: str) -> tuple[list, list]:
    rs = [r for r in recs if r.get("event") == "eval" and r.get("group") == group and r.get("arm") == arm]
    return [r["step"] for r in rs], [r.get(key, math.nan) for r in rs]


def _b_groups(cfg: dict, S: dict) -> list[str]:
    return [f"B{sd}" for sd in cfg["acc_seeds"] if f"B{sd}.arm.wd.loss" in S]


def _fig_learning_curves(cfg, S, recs, path):
    import matplotlib.pyplot as plt

    groups = _b_groups(cfg, S)
    arms = [a for a in B_ARMS if f"{groups[0]}.arm.{a}.loss" in S] if groups else []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for a in arms:
            c, ls = _COLORS[a], ("--" if a.startswith("std") else "-")
            loss = S[f"{groups[0]}.arm.{a}.loss"]
            axes[0].plot(np.arange(len(loss)), smooth(loss, max(1, len(loss) // 40)), color=c, ls=ls, label=LABELS[a])
            for ax, key in ((axes[1], "train_acc"), (axes[2], "test_acc")):
                curves = [_evals(recs, g, a, key) for g in groups]
                curves = [cv for cv in curves if cv[0]]
                if not curves:
                    continue
                n = min(len(cv[0]) for cv in curves)
                steps = np.asarray(curves[0][0][:n])
                vals = np.array([np.asarray(cv[1][:n], float) for cv in curves]) * 100
                ax.plot(steps, vals.mean(0), color=c, ls=ls, marker="o", ms=2.5, label=LABELS[a])
                if len(curves) > 1:
                    ax.fill_between(steps, vals.min(0), vals.max(0), color=c, alpha=0.15, lw=0)
        for t0, _ in _phases(cfg, cfg["acc_steps"])[1:]:
            for ax in axes:
                ax.axvline(t0, color="#2ca02c", lw=0.7, ls=":")
        axes[0].set_yscale("log")
        axes[0].set_ylabel(f"training loss (seed {cfg['acc_seeds'][0]}, moving average)")
        axes[1].set_ylabel("train accuracy (%)")
        axes[2].set_ylabel("test accuracy (%)")
        lo = 100 * min([min(_evals(recs, g, a, "test_acc")[1] or [1]) for g in groups for a in arms] or [0.5])
        for ax in axes[1:]:
            ax.set_ylim(max(0, min(lo, 90) - 5), 100.5)
        for ax in axes:
            ax.set_xlabel("step")
        axes[2].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{cfg['model']} (width {cfg['acc_width']}) on {cfg['data']}, float32: lr {cfg['lr']}, momentum "
                     f"{cfg['momentum']}, WD {cfg['weight_decay']} (accuracy: mean over {len(groups)} seeds, band = "
                     f"min..max; dotted: step-decay boundaries)", fontsize=9)
        return save(fig, path)


def _fig_angles(cfg, S, recs, path, equiv_tol: float):
    import matplotlib.pyplot as plt

    T = cfg["equiv_steps"]
    x = np.arange(T + 1)
    all_pairs = a_pairs(cfg.get("other_norms", ()))
    pairs = [p for p in all_pairs if f"A.pair.{p}.angle" in S]
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.0))
        for p in pairs:
            c = _COLORS["texp"] if p == "texp" else _COLORS.get(p, _EXTRA_COLORS[pairs.index(p) % len(_EXTRA_COLORS)])
            lw = 1.8 if p == "exact" else 1.1
            ax1.plot(x, _floor(S[f"A.pair.{p}.angle"]), color=c, lw=lw, label=all_pairs[p][2])
            if p == "exact":
                for i, n in enumerate(S[f"A.pair.{p}.names"]):
                    ax1.plot(x, _floor(S[f"A.pair.{p}.per"][i]), color=c, lw=0.5, alpha=0.5,
                             label="  same, per tensor" if i == 0 else None)
            od = S[f"A.pair.{p}.outdiff"]
            ok = np.isfinite(od)
            ax2.plot(x[ok], _floor(od[ok]), color=c, lw=lw, label=all_pairs[p][2])
            ev = [(r["step"], r["eval_output_diff"]) for r in recs
                  if r.get("event") == "eval_outdiff" and r.get("group") == "A" and r.get("pair") == p]
            if ev and p in ("exact", "texp"):
                ax2.plot(*zip(*[(s, max(v, _FLOOR)) for s, v in ev]), color=c, ls="none", marker="s", ms=4, mfc="none",
                         label=("WD vs ExpLR" if p == "exact" else "step decay vs TEXP") + ": eval mode (running stats)")
        for ax in (ax1, ax2):
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylim(_FLOOR / 3, 10)
        ax1.axhline(equiv_tol, color="k", lw=0.8, ls="--")
        ax1.text(0.01, equiv_tol * 1.6, f"tolerance {equiv_tol:g} rad", transform=ax1.get_yaxis_transform(), fontsize=7)
        if cfg["decay_at"]:
            for t0, _ in _phases(cfg, T)[1:]:
                ax1.axvline(t0, color=_COLORS["sd"], lw=0.6, ls=":")
        ax1.set_ylabel(f"angle between the runs' weights (rad; 0 drawn at {_FLOOR:g})")
        ax2.set_ylabel(f"max |logit difference| on {cfg['output_batch']} fixed inputs (train-mode BN)")
        handles, labels = ax1.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        extra = [(h, l) for h, l in zip(h2, l2) if l not in labels]
        fig.legend(handles + [h for h, _ in extra], labels + [l for _, l in extra], fontsize=7, ncol=4,
                   loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False)
        fig.suptitle(f"Same init, same batches, stepped side by side ({cfg['model']} width {cfg['width']} on {cfg['data']}, "
                     f"lr {cfg['lr']}, momentum {cfg['momentum']}, WD {cfg['weight_decay']})", fontsize=9)
        return save(fig, path)


def _fig_norms(cfg, S, path):
    import matplotlib.pyplot as plt

    T = cfg["equiv_steps"]
    x = np.arange(T + 1)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 4))
        for a in ("wd", "exp", "sd", "texp"):
            if f"A.arm.{a}.norm" in S:
                ax.plot(x, S[f"A.arm.{a}.norm"], color=_COLORS[a], label=LABELS[a] + (" (un-rescaled)" if a in ("exp", "texp") else ""))
        for a in ("exp", "texp"):
            key = f"A.arm.{a}.stored_norm"
            if key in S and not np.allclose(S[key], S[f"A.arm.{a}.norm"], equal_nan=True):
                ax.plot(x, S[key], color=_COLORS[a], ls=":", label=LABELS[a] + " as stored (renormalized)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("‖w‖ of the trained weights (jointly)")
        ax.legend(fontsize=7)
        alpha = wd_equivalent_alpha(lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=cfg["momentum"])
        ax.set_title(f"Weight norm (float64): bounded under WD; without WD it is α^-t (α = {alpha:.5f}) times the WD run's",
                     fontsize=9)
        return save(fig, path)


def _fig_lrs(cfg, S, path):
    import matplotlib.pyplot as plt

    T = cfg["equiv_steps"]
    x = np.arange(T)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 4))
        for a in ("wd", "exp", "sd", "texp"):
            if f"A.arm.{a}.lr" in S:
                ax.plot(x, S[f"A.arm.{a}.lr"], color=_COLORS[a], lw=1.6 if a in ("exp", "texp") else 1.2, label=LABELS[a])
        for a in ("exp", "texp"):
            key = f"A.arm.{a}.opt_lr"
            if key in S and not np.allclose(S[key], S[f"A.arm.{a}.lr"], equal_nan=True):
                ax.plot(x, S[key], color=_COLORS[a], ls=":", label=LABELS[a] + " as used (renormalized)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.legend(fontsize=7)
        ax.set_title("LR schedules: ExpLR η̃_t = η α^(-2t-1); TEXP tapers it at the step-decay boundaries", fontsize=9)
        return save(fig, path)


def _fig_standard(cfg, S, recs, path):
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        if "A.pair.standard.angle" in S:
            T = cfg["equiv_steps"]
            x = np.arange(T + 1)
            names = [str(n) for n in S["A.pair.standard.names"]]
            per = S["A.pair.standard.per"]
            bn = {n for n in names if not n.startswith("classifier") and _is_bn_name(n, names)}
            kinds = {"conv/linear weights (each)": ("#bcbd22", lambda n: not n.startswith("classifier") and n not in bn),
                     "BN γ/β (each)": ("#8c564b", lambda n: n in bn),
                     "classifier weight/bias": ("#9467bd", lambda n: n.startswith("classifier"))}
            for label, (c, sel) in kinds.items():
                first = True
                for i, n in enumerate(names):
                    if sel(n):
                        ax1.plot(x, _floor(per[i]), color=c, lw=0.6, alpha=0.6, label=label if first else None)
                        first = False
            ax1.plot(x, _floor(S["A.pair.standard.angle"]), color=_COLORS["standard"], lw=1.8, label="all trained params jointly")
            ax1.plot(x, _floor(S["A.pair.standard.conv"]), color="#bcbd22", lw=1.8, label="conv/linear weights jointly")
            ax1.plot(x, _floor(S["A.pair.exact.angle"]), color=_COLORS["exact"], lw=1.2, ls="--", label="fully scale-invariant net (eps 0)")
            ax1.plot(x, _floor(S["A.pair.bn_eps.angle"]), color=_COLORS["bn_eps"], lw=1.2, ls="--", label="fully scale-invariant net, BN eps 1e-5")
            ax1.set_yscale("log")
            ax1.set_ylim(_FLOOR / 3, 10)
            ax1.set_xlim(0, min(T, max(1, int(cfg["side_steps"]))))
            ax1.set_xlabel("step")
            ax1.set_ylabel("angle WD run vs ExpLR run (rad)")
            ax1.legend(fontsize=6.5)
            ax1.set_title("float64, same init and batches", fontsize=9)
        else:
            ax1.text(0.5, 0.5, "standard-net pair not run (side_steps=0)", ha="center", transform=ax1.transAxes)
        groups = _b_groups(cfg, S)
        for a in ("wd", "exp", "std_wd", "std_exp"):
            for j, g in enumerate(groups):
                st, v = _evals(recs, g, a, "test_acc")
                if st:
                    ax2.plot(st, np.asarray(v, float) * 100, color=_COLORS[a], ls="--" if a.startswith("std") else "-",
                             lw=1.0, alpha=0.8, label=LABELS[a] if j == 0 else None)
        ax2.set_xlabel("step")
        ax2.set_ylabel("test accuracy (%)")
        vals = [v for g in groups for a in ("wd", "exp", "std_wd", "std_exp") for v in _evals(recs, g, a, "test_acc")[1]]
        lo = 100 * min(vals) if vals else 50
        ax2.set_ylim(max(0, min(lo, 90) - 5), 100.5)
        ax2.legend(fontsize=7, loc="lower right")
        n_std = sum(1 for g in groups if _evals(recs, g, "std_wd", "test_acc")[0])
        ax2.set_title(f"test accuracy, float32, one line per seed ({len(groups)} seeds; standard net: {n_std})", fontsize=9)
        fig.suptitle("Standard net (BN with trainable γ/β, trainable classifier): WD on all parameters vs ExpLR on all "
                     "parameters (no renormalization)", fontsize=9)
        return save(fig, path)


def _is_bn_name(name: str, names: list[str]) -> bool:
    """Whether ``name`` is a BN γ/β: in bnlab's models a BN layer has ``.weight`` and ``.bias``, while
    a conv/linear layer before a BN has no bias (the stored per-tensor angles keep no shapes)."""
    stem = name.rsplit(".", 1)[0]
    return f"{stem}.bias" in names


def _fig_overflow(cfg, S, recs, path):
    import matplotlib.pyplot as plt

    x = S["C.step"]
    ovf = {r["run"]: r for r in recs if r.get("event") == "overflow"}
    fwd = {r["run"]: r for r in recs if r.get("event") == "forward_overflow"}
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        k = S["C.renorm.log2_scale"]
        ax1.plot(x, S["C.plain.log2_norm"], color="#d62728", lw=1.6, label="no renormalization")
        ax1.plot(x, S["C.renorm.log2_norm"] + k, color="#1f77b4", lw=1.2, ls="--", label="renormalized: un-rescaled ‖w̃‖ = 2^k ‖w‖")
        ax1.plot(x, S["C.renorm.log2_norm"], color="#1f77b4", lw=1.6, label="renormalized: ‖w‖ as stored")
        ax2.plot(x, S["C.plain.log2_opt_lr"], color="#d62728", lw=1.6, label="no renormalization")
        ax2.plot(x, S["C.renorm.log2_opt_lr"] + 2 * k, color="#1f77b4", lw=1.2, ls="--", label="renormalized: un-rescaled η̃ = 4^k · LR")
        ax2.plot(x, S["C.renorm.log2_opt_lr"], color="#1f77b4", lw=1.6, label="renormalized: LR as used")
        fmax = math.log2(FLOAT32_MAX)
        for ax in (ax1, ax2):
            ax.axhline(fmax, color="k", lw=0.8, ls="--")
            ax.text(0.01, fmax + 4, "float32 max (2^128)", transform=ax.get_yaxis_transform(), fontsize=7)
            notes = []
            if "plain" in fwd:
                notes.append(f"step {fwd['plain']['step']}: BN variance overflows")
            if "plain" in ovf:
                notes.append(f"step {ovf['plain']['step']}: " + ("weights non-finite" if ovf["plain"].get("kind") == "weights"
                                                                 else "LR beyond float32, SGD refuses"))
                ax.axvline(ovf["plain"]["step"], color="#d62728", lw=0.8, ls=":")
            if notes:
                ax.text(0.03, 0.5, "plain run:\n" + "\n".join(notes), color="#d62728", fontsize=7, transform=ax.transAxes)
            ax.set_xlabel("step")
            ax.legend(fontsize=7, loc="upper left")
        ax1.set_ylabel("log2 ‖w‖ (trained weights)")
        ax2.set_ylabel("log2 learning rate")
        alpha = wd_equivalent_alpha(lr=cfg["lr"], weight_decay=cfg["overflow_weight_decay"], momentum=cfg["momentum"])
        fig.suptitle(f"ExpLR in float32 on a tiny BN net: lr {cfg['lr']}, momentum {cfg['momentum']}, λ "
                     f"{cfg['overflow_weight_decay']} (LR ×{alpha ** -2:.4f} per step), renorm bound {cfg['renorm_bound']:g}",
                     fontsize=9)
        return save(fig, path)


def _fig_angular(cfg, S, path, window: float):
    """W1: the angular update per step of each trained tensor (moving average) against √(2ηλ/(1+γ))."""
    import matplotlib.pyplot as plt

    arms = [a for a in ("w1", "wd") if f"A.angular.{a}.update" in S]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, max(1, len(arms)), figsize=(6 * max(1, len(arms)), 4), squeeze=False)
        for ax, a in zip(axes[0], arms):
            lam = cfg["w1_weight_decay"] if a == "w1" else cfg["weight_decay"]
            pred = math.sqrt(2 * cfg["lr"] * lam / (1 + cfg["momentum"]))
            upd = S[f"A.angular.{a}.update"]
            names = [str(n) for n in S[f"A.angular.{a}.names"]]
            T = upd.shape[1] - 1
            x = np.arange(T + 1)
            for i, n in enumerate(names):
                v = upd[i]
                ok = np.isfinite(v)
                rms = np.sqrt(smooth(v**2, max(1, T // 40)))
                ax.plot(x[ok], v[ok], lw=0.4, alpha=0.25, color=f"C{i}")
                ax.plot(x[ok], rms[ok], lw=1.4, color=f"C{i}", label=f"{n} (moving RMS)")
            ax.axhline(pred, color="k", lw=1.0, ls="--", label=f"√(2ηλ/(1+γ)) = {pred:.3g}")
            start = max(1, T + 1 - int(round(window * T)))
            ax.axvspan(start, T, color="#cccccc", alpha=0.3, lw=0, label=f"window (last {window:.0%})")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("angular update ∠(w_t, w_t+1) (rad)")
            ax.set_title(f"{LABELS[a]}: λ {lam}, lr {cfg['lr']}, momentum {cfg['momentum']}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("Spherical motion equilibrium (Wan et al. 2020), float64, fully scale-invariant BN net", fontsize=9)
        return save(fig, path)
