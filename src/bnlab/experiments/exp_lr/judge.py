"""``exp-lr``'s verdicts: a pure function of the summary and the thresholds.

One verdict per claim, in the order of :attr:`ExpLRExperiment.claims`; each carries its CLAIMS.md
row (``ref``): L1 ``directions-agree``, L2 ``buffer-mapping-needed``, L3 ``texp-matches-step-decay``,
L4 ``accuracy-matches`` and ``standard-net-accuracy``, L5 ``rescaling-prevents-overflow``, L6
``other-norms-agree``, L7 ``zero-buffer-schedule-exact``, W1 ``angular-update-equilibrium``.
"""

from __future__ import annotations

import math

import numpy as np

from ...analysis import first_index_over, nanmax
from ..base import Verdict, fmt, seed_spread, verdict
from .config import label, Thresholds

#: The claim ids in order (the judge returns one verdict each).
CLAIM_IDS = ("directions-agree", "buffer-mapping-needed", "texp-matches-step-decay", "accuracy-matches",
             "standard-net-accuracy", "rescaling-prevents-overflow", "other-norms-agree",
             "zero-buffer-schedule-exact", "angular-update-equilibrium")


# ----------------------------------------------------------------------------- the equivalence rule (L1, L3, L6, L7)


def _pair_max(pair: dict, need: int) -> float:
    """The max angle over the first ``need`` steps (index 0 = the initialization)."""
    return nanmax(pair["angle"][: need + 1])


def _equivalence(s: dict, th: Thresholds, claim: str, pairs: list[tuple[str, str, str, float | None]],
                 what: str, extra: list[str] | None = None) -> Verdict:
    """L1's rule on ``pairs`` (``(pair, arm a, arm b, invariance error of the net)``): every pair's max angle over
    the first ``required_equiv_steps`` steps ≤ ``equiv_tol``. Fails if an arm diverged or a pair exceeds the
    tolerance; inconclusive if a pair is missing, fewer steps are run, or a net is not fully scale-invariant."""
    tol, need, inv_tol = th.equiv_tol, th.required_equiv_steps, th.invariance_tol
    eq = s["equivalence"]
    rule = (f"{what}: max angle ≤ {tol:g} rad over the first {need} steps (float64, norm eps ≈ 0); inconclusive if "
            f"fewer steps are run or the net's joint invariance error max|f(3w) − f(w)|/max|f(w)| > {inv_tol:g}; "
            "fails if a run diverges")
    parts, worst, missing, short, not_si, diverged = [], math.nan, [], [], [], []
    for p, a, b, inv in pairs:
        if p not in eq["pairs"]:
            missing.append(p)
            continue
        q = eq["pairs"][p]
        m = _pair_max(q, need)
        worst = m if not math.isfinite(worst) or not (m <= worst) else worst
        first = first_index_over(q["angle"], tol)
        parts.append(f"{p} ({q['what']}): max {fmt(m)} rad over {min(q['steps'], need)} steps"
                     + (f", first over {tol:g} at step {first}" if first is not None else "")
                     + f", max output difference {fmt(q['max_output_diff'])}"
                     + ("" if inv is None else f", invariance error {fmt(inv)}"))
        if q["steps"] < need:
            short.append(f"{p}: {q['steps']} steps")
        if inv is None or not inv <= inv_tol:
            not_si.append(f"{p}: invariance error {fmt(inv)}")
        diverged += [f"{x} at step {eq['diverged'][x]}" for x in (a, b) if x in eq["diverged"]]
    detail = "; ".join(parts + (extra or []))
    if missing:
        return verdict(claim, None, worst, f"pairs not run: {', '.join(missing)}; " + detail, rule)
    if diverged:
        return verdict(claim, False, worst, f"a run diverged ({', '.join(diverged)}); " + detail, rule)
    if not_si:
        return verdict(claim, None, worst, f"net not fully scale-invariant ({', '.join(not_si)}); " + detail, rule)
    if any(not _pair_max(eq["pairs"][p], need) <= tol for p, *_ in pairs):
        return verdict(claim, False, worst, detail, rule)  # already over the tolerance within the steps run
    if short:
        return verdict(claim, None, worst, f"fewer steps than the {need} required ({', '.join(short)}); " + detail, rule)
    return verdict(claim, True, worst, detail, rule)


def _directions(s: dict, th: Thresholds) -> Verdict:
    eq, tol = s["equivalence"], th.equiv_tol
    ex = eq["pairs"]["exact"]
    extra = []
    per_t = ex["max_angle_per_param"]
    if len(per_t) <= 6:
        extra.append("per tensor max " + ", ".join(f"{k} {fmt(v)}" for k, v in per_t.items()))
    else:
        worst_t = max(per_t, key=lambda k: per_t[k] if math.isfinite(per_t[k]) else math.inf)
        extra.append(f"per tensor max up to {fmt(per_t[worst_t])} ({worst_t}, {len(per_t)} tensors)")
    if "float32" in eq["pairs"]:
        f32 = eq["pairs"]["float32"]
        extra.append(f"same pair in float32 (round-off, amplified by the dynamics): first step over {tol:g} rad = "
                     f"{first_index_over(f32['angle'], tol)}, max {fmt(f32['max_angle'])} over {f32['steps']} steps")
    for p, what in (("bn_eps", "with BN's eps 1e-5 (float64)"), ("standard", "standard net, WD vs ExpLR on all params")):
        if p in eq["pairs"]:
            q = eq["pairs"][p]
            extra.append(f"{what}: first over {tol:g} at step {first_index_over(q['angle'], tol)}, "
                         f"max {fmt(q['max_angle'])} over {q['steps']} steps")
    if "max_eval_mode_output_diff" in ex:
        extra.append(f"eval mode (BN running stats) output difference up to {fmt(ex['max_eval_mode_output_diff'])}")
    head = f"lr {s['lr']}, momentum {s['momentum']}, WD {s['weight_decay']}, BN eps {s['exact_bn_eps']:g}"
    return _equivalence(s, th, "directions-agree", [("exact", "wd", "exp", s.get("joint_invariance_error"))],
                        "WD vs ExpLR (mapped buffer) on the fully scale-invariant BN net", [head] + extra)


def _texp(s: dict, th: Thresholds) -> Verdict:
    return _equivalence(s, th, "texp-matches-step-decay", [("texp", "sd", "texp", s.get("joint_invariance_error"))],
                        "step decay + WD vs TEXP on the fully scale-invariant BN net",
                        ["LR " + ", ".join(f"{fmt(lr)} from step {t}" for t, lr in s["equivalence"].get("decay_phases", []))])


def _other_norms(s: dict, th: Thresholds) -> Verdict:
    norms = s["equivalence"].get("other_norms", [])
    inv = s.get("norm_invariance_error", {})
    pairs = [(f"norm_{n}", f"{n}_wd", f"{n}_exp", inv.get(n)) for n in norms]
    what = "WD vs ExpLR on the fully scale-invariant " + "/".join(n.upper() for n in norms) + " nets (each)"
    if not pairs:
        return verdict("other-norms-agree", None, None, "no other norm layer was run (other_norms is empty)",
                       f"{what}: max angle ≤ {th.equiv_tol:g} rad over the first {th.required_equiv_steps} steps")
    return _equivalence(s, th, "other-norms-agree", pairs, what)


def _zero_buffer(s: dict, th: Thresholds) -> Verdict:
    inv = s.get("joint_invariance_error")
    extra = []
    ab = s["equivalence"]["pairs"].get("ablation")
    if ab is not None:
        extra.append(f"for contrast, ExpLR from the same zero buffers without the c_t schedule: max {fmt(ab['max_angle'])} "
                     f"rad over {ab['steps']} steps")
    return _equivalence(s, th, "zero-buffer-schedule-exact",
                        [("zero_buffer", "wd", "zb_exp", inv), ("zero_buffer_sd", "sd", "zb_texp", inv)],
                        "WD vs exact ExpLR and step decay + WD vs exact TEXP (η̃_t = η_t/(c_t c_{t+1}), PyTorch's "
                        "lazily created zero buffers) on the fully scale-invariant BN net", extra)


# ----------------------------------------------------------------------------- L2


def _buffer_mapping(s: dict, th: Thresholds) -> Verdict:
    level, tol = th.material_angle, th.equiv_tol
    pairs = s["equivalence"]["pairs"]
    rule = (f"the max angle of WD vs ExpLR without the buffer preset ≥ {level:g} rad over the steps run, while WD vs "
            f"ExpLR with it stays ≤ {tol:g} rad over the same steps; inconclusive if the mapped pair does not agree")
    ab = pairs.get("ablation")
    if ab is None:
        return verdict("buffer-mapping-needed", None, None, "the ablation pair was not run (side_steps = 0)", rule)
    n = ab["steps"]
    mab = nanmax(ab["angle"][: n + 1])
    m = nanmax(pairs["exact"]["angle"][: n + 1])
    ratio = mab / m if m and m > 0 else math.inf
    detail = (f"ExpLR with the preset buffer popped right after construction (PyTorch's zero buffer): max angle "
              f"{fmt(mab)} rad over {n} steps (first over {level:g} at step {first_index_over(ab['angle'], level)}; "
              f"after 1 step {fmt(ab['angle_at'].get('1'))}, 10 steps {fmt(ab['angle_at'].get('10'))}), {fmt(ratio)}x "
              f"the mapped run's {fmt(m)}; max output difference {fmt(ab['max_output_diff'])}")
    if not m <= tol:
        return verdict("buffer-mapping-needed", None, mab, f"the mapped pair itself does not agree ({fmt(m)} rad > "
                       f"{tol:g}): the difference cannot be put on the mapping; " + detail, rule)
    return verdict("buffer-mapping-needed", bool(mab >= level), mab, detail, rule)


# ----------------------------------------------------------------------------- L4


def _per_seed(acc: dict, arm: str) -> list[float]:
    return [math.nan if v.get("test_acc") is None else float(v["test_acc"]) for v in acc["arms"].get(arm, {}).values()]


def _acc_compare(s: dict, th: Thresholds, claim: str, comparisons: list[tuple[str, str]], tol: float,
                 what: str) -> Verdict:
    """``|mean(new) − mean(base)| ≤ tol`` for every ``(base, new)``; ≥ ``min_seeds`` seeds; baselines trained."""
    acc = s["accuracy"]
    rule = (f"{what}: |mean final test accuracy difference| ≤ {tol:.2%} for each pair over ≥ {th.min_seeds} seeds "
            f"(fixed tolerance); inconclusive if fewer seeds or a baseline's mean < {th.trained_acc:.0%} (did not train); "
            "fails if a compared run diverges")
    parts, spreads, worst = [], [], math.nan
    short, untrained, diverged, missing, undefined = [], [], [], [], []
    for base, new in comparisons:
        vb, vn = _per_seed(acc, base), _per_seed(acc, new)
        if not vb or not vn:
            missing.append(f"{base}/{new}")
            continue
        n = min(len(vb), len(vn))
        mb, mn = float(np.mean(vb)), float(np.mean(vn))
        d = abs(mn - mb)
        if not math.isfinite(d):
            undefined.append(f"{base}/{new}")
        elif not math.isfinite(worst) or d > worst:
            worst = d
        parts.append(f"{label(base)} {mb:.2%} vs {label(new)} {mn:.2%}: diff {d:.2%} over {n} seeds (per seed "
                     + "/".join(f"{x:.1%}" for x in vb) + " vs " + "/".join(f"{x:.1%}" for x in vn) + ")")
        spreads += [f"{label(base)}: {seed_spread(vb, unit='%', scale=100)}",
                    f"{label(new)}: {seed_spread(vn, unit='%', scale=100)}"]
        if n < th.min_seeds:
            short.append(f"{base}/{new}: {n}")
        if not mb >= th.trained_acc:
            untrained.append(f"{label(base)} {mb:.1%}")
        for arm in (base, new):
            div = [k for k, v in acc["arms"][arm].items() if v.get("diverged_at") is not None]
            if div:
                diverged.append(f"{label(arm)} (seeds {', '.join(div)})")
    detail = f"final test accuracy after {acc['steps']} steps (float32, eval mode): " + "; ".join(parts)
    spread = "; ".join(spreads)
    if missing:
        return verdict(claim, None, worst, f"arms not run: {', '.join(missing)}; " + detail, rule, spread)
    if diverged:
        return verdict(claim, False, worst, f"diverged: {', '.join(diverged)}; " + detail, rule, spread)
    if short:
        return verdict(claim, None, worst, f"fewer than {th.min_seeds} seeds ({', '.join(short)}); " + detail, rule, spread)
    if untrained:
        return verdict(claim, None, worst, f"baseline did not train ({', '.join(untrained)}); " + detail, rule, spread)
    if undefined or not math.isfinite(worst):
        return verdict(claim, None, worst, f"accuracies missing ({', '.join(undefined)}); " + detail, rule, spread)
    return verdict(claim, bool(worst <= tol), worst, detail, rule, spread)


def _accuracy(s: dict, th: Thresholds) -> Verdict:
    return _acc_compare(s, th, "accuracy-matches", [("wd", "exp"), ("sd", "texp")], th.acc_tol,
                        "fully scale-invariant BN net: ExpLR vs WD and TEXP vs step decay")


def _standard_accuracy(s: dict, th: Thresholds) -> Verdict:
    return _acc_compare(s, th, "standard-net-accuracy", [("std_wd", "std_exp")], th.std_acc_tol,
                        "standard net (affine BN, trained classifier): ExpLR vs WD on all parameters")


# ----------------------------------------------------------------------------- L5


def _overflow(s: dict, th: Thresholds) -> Verdict:
    need = th.required_overflow_steps
    ov = s["overflow"]
    rn, pl = ov["renorm"], ov["plain"]
    rn_bad = rn["nonfinite_at"] is not None or rn["forward_overflow_at"] is not None
    plain_parts = []
    if pl["forward_overflow_at"] is not None:
        plain_parts.append(f"the BN variance (~‖w‖²) overflows float32 at step {pl['forward_overflow_at']} "
                           "(a non-finite forward pass)")
    if pl["lr_over_float32_at"] is not None:
        plain_parts.append(f"the LR exceeds float32's largest value at step {pl['lr_over_float32_at']}")
    if pl["nonfinite_at"] is not None:
        plain_parts.append(f"weights non-finite after step {pl['nonfinite_at']}" if pl["how"] == "weights" else
                           f"PyTorch's SGD refuses the float32 update at step {pl['nonfinite_at']} (LR out of range)")
    mism = (f"; while the plain run was alive, the renormalized weights x 2^k equalled its weights bit for bit at "
            f"{ov['bit_identical_steps']} of {ov['compared_steps']} steps"
            + (f" (first difference at step {ov['first_mismatch_step']})" if ov["first_mismatch_step"] is not None else ""))
    detail = (f"bnlab's own feature (not a claim of the paper). float32, tiny BN net, lr {s['lr']}, momentum "
              f"{s['momentum']}, WD-equivalent λ {ov['weight_decay']} (LR x{ov['alpha'] ** -2:.4g} per step): with "
              "renormalization "
              + (f"finite for all {ov['steps']} steps" if not rn_bad else
                 f"NOT finite: forward overflow at {rn['forward_overflow_at']}, weights at {rn['nonfinite_at']}")
              + f" ({rn['renormalizations']} rescalings, weights held at 2^-{rn['log2_scale']} of the un-rescaled run, "
              f"whose LR would be 2^{rn['final_log2_unrescaled_lr']:.0f}); without: "
              + ("; ".join(plain_parts) if plain_parts else "no overflow") + mism)
    rule = (f"the renormalized run finite for ≥ {need} steps and the plain run overflows; inconclusive if fewer "
            "steps are run or the plain run does not overflow")
    value = pl["overflow_at"]
    if rn_bad:
        return verdict("rescaling-prevents-overflow", False, value, detail, rule)
    if ov["steps"] < need:
        return verdict("rescaling-prevents-overflow", None, value,
                       f"only {ov['steps']} steps run (the claim needs {need}); " + detail, rule)
    if pl["overflow_at"] is None:
        return verdict("rescaling-prevents-overflow", None, value, "the plain run did not overflow either; " + detail, rule)
    return verdict("rescaling-prevents-overflow", True, value, detail, rule)


# ----------------------------------------------------------------------------- W1


def _rms(v) -> float:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.sqrt(np.mean(v**2))) if v.size else math.nan


def angular_equilibrium(arm: dict, window: float) -> dict:
    """The W1 numbers of one tracked arm: the prediction ``√(2ηλ/(1+γ))`` and, per tensor, the RMS angular
    update over the last ``window`` fraction of the run and over its two halves (``first``, ``second``),
    their relative change ``settle`` (``|second − first| / rms``) and ``rel_error`` (``|rms − pred| / pred``)."""
    pred = math.sqrt(2 * arm["lr"] * arm["weight_decay"] / (1 + arm["momentum"]))
    out = {"predicted": pred, "tensors": {}}
    for name, upd in arm["update"].items():
        u = np.asarray(upd, dtype=float)
        n = int(arm["steps"]) if arm.get("steps") is not None else len(u) - 1
        start = max(1, n + 1 - int(round(window * n)))
        win = u[start: n + 1]
        half = len(win) // 2
        rms, first, second = _rms(win), _rms(win[:half]), _rms(win[half:])
        out["tensors"][name] = {"rms": rms, "first": first, "second": second, "mean": float(np.nanmean(win)) if win.size else math.nan,
                                "settle": abs(second - first) / rms if rms > 0 else math.nan,
                                "rel_error": abs(rms - pred) / pred, "window": [start, n]}
    return out


def _angular(s: dict, th: Thresholds) -> Verdict:
    rule = (f"every scale-invariant tensor's RMS angular update ∠(w_t, w_t+1) over the last {th.w1_window:.0%} of the "
            f"run within {th.w1_rel_tol:.0%} of √(2ηλ/(1+γ)); inconclusive if not settled (the RMS over the window's "
            f"two halves differs by > {th.w1_settle_tol:.0%} for a tensor) or the run diverged")
    arms = s.get("angular_update", {})
    if "w1" not in arms:
        return verdict("angular-update-equilibrium", None, None, "the W1 arm was not run", rule)
    w1 = arms["w1"]
    r = angular_equilibrium(w1, th.w1_window)
    ts = r["tensors"]
    worst = max((t["rel_error"] for t in ts.values()), default=math.nan)
    rows = [f"{k} {fmt(t['rms'])} ({t['rms'] / r['predicted']:.3f}x, halves {fmt(t['first'])}/{fmt(t['second'])})"
            for k, t in ts.items()]
    detail = (f"constant LR {w1['lr']}, momentum {w1['momentum']}, WD {w1['weight_decay']}, float64, fully "
              f"scale-invariant BN net, steps {ts[next(iter(ts))]['window'][0] if ts else '?'}–{w1['steps']}: predicted "
              f"{fmt(r['predicted'])} rad/step; measured RMS " + ", ".join(rows))
    other = arms.get("wd")
    if other is not None:
        ro = angular_equilibrium(other, th.w1_window)
        worst_settle = max((t["settle"] for t in ro["tensors"].values()), default=math.nan)
        detail += (f"; the main WD arm (λ {other['weight_decay']}, not judged): RMS "
                   + ", ".join(f"{t['rms'] / ro['predicted']:.2f}x" for t in ro["tensors"].values())
                   + f" of its prediction {fmt(ro['predicted'])}, halves differ by up to {worst_settle:.0%}"
                   + (" (not settled)" if not worst_settle <= th.w1_settle_tol else ""))
    if w1.get("diverged_at") is not None:
        return verdict("angular-update-equilibrium", None, worst, f"the run diverged at step {w1['diverged_at']}; " + detail, rule)
    unsettled = [k for k, t in ts.items() if not t["settle"] <= th.w1_settle_tol]
    if not ts or unsettled:
        return verdict("angular-update-equilibrium", None, worst,
                       "not settled (" + ", ".join(f"{k}: halves differ by {ts[k]['settle']:.0%}" for k in unsettled)
                       + "); " + detail, rule)
    return verdict("angular-update-equilibrium", bool(worst <= th.w1_rel_tol), worst, detail, rule)


def judge(summary: dict, th: Thresholds) -> list[Verdict]:
    """The verdicts of ``exp-lr`` (one per :data:`CLAIM_IDS`) from its summary (as stored in ``summary.json``)."""
    return [_directions(summary, th), _buffer_mapping(summary, th), _texp(summary, th), _accuracy(summary, th),
            _standard_accuracy(summary, th), _overflow(summary, th), _other_norms(summary, th),
            _zero_buffer(summary, th), _angular(summary, th)]
