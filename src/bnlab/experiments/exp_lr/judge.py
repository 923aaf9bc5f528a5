"""``exp-lr``'s verdicts: a pure function of the summary and the thresholds."""

from __future__ import annotations

import math

from ...analysis import first_index_over, nanmax
from ..base import Verdict, fmt, verdict
from .config import LABELS, Thresholds


def _directions(s: dict, th: Thresholds) -> Verdict:
    tol, need = th.equiv_tol, th.required_equiv_steps
    eq = s["equivalence"]
    T = eq["steps"]
    ex = eq["pairs"]["exact"]
    m = nanmax(ex["angle"][: need + 1])
    first = first_index_over(ex["angle"], tol)
    extra = [f"max output difference on the fixed batch {fmt(ex['max_output_diff'])}"]
    per_t = ex["max_angle_per_param"]
    if len(per_t) <= 6:
        extra.append("per tensor max " + ", ".join(f"{k} {fmt(v)}" for k, v in per_t.items()))
    else:
        worst_t = max(per_t, key=lambda k: per_t[k] if math.isfinite(per_t[k]) else math.inf)
        extra.append(f"per tensor max up to {fmt(per_t[worst_t])} ({worst_t}, {len(per_t)} tensors)")
    if "texp" in eq["pairs"]:
        extra.append(f"TEXP vs step decay: max angle {fmt(eq['pairs']['texp']['max_angle'])}")
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
    head = (f"float64, BN eps {s['exact_bn_eps']:g}, lr {s['lr']}, momentum {s['momentum']}, "
            f"WD {s['weight_decay']}: max angle {fmt(m)} rad over {min(T, need)} steps"
            + (f" (first over {tol:g} at step {first})" if first is not None else "")
            + f"; over all {T} steps {fmt(ex['max_angle'])}")
    detail = head + "; " + "; ".join(extra)
    rule = (f"max angle ≤ {tol:g} rad over the first {need} steps; inconclusive if fewer steps are run; "
            "fails if the WD or ExpLR run diverges")
    if "wd" in eq["diverged"] or "exp" in eq["diverged"]:
        return verdict("directions-agree", False, m, detail + f"; a run diverged: {eq['diverged']}", rule)
    if T < need:
        return verdict("directions-agree", None, m, f"only {T} steps run (the claim needs {need}); " + detail, rule)
    return verdict("directions-agree", bool(m <= tol), m, detail, rule)


def _buffer_mapping(s: dict, th: Thresholds) -> Verdict:
    tol, need = th.equiv_tol, th.required_equiv_steps
    pairs = s["equivalence"]["pairs"]
    m = nanmax(pairs["exact"]["angle"][: need + 1])
    ab = pairs["ablation"]
    mab = nanmax(ab["angle"][: need + 1])
    ratio = mab / m if m and m > 0 else math.inf
    detail = (f"ExpLR with the preset buffer popped right after construction (emulates no mapping): max angle "
              f"{fmt(mab)} rad (first over {tol:g} at step {first_index_over(ab['angle'], tol)}; after 1 step "
              f"{fmt(ab['angle_at'].get('1'))}, 10 steps {fmt(ab['angle_at'].get('10'))}), {fmt(ratio)}x the mapped "
              f"run's; max output difference {fmt(ab['max_output_diff'])}")
    return verdict("buffer-mapping-needed", bool(mab > tol), mab, detail,
                   f"max angle of WD vs ExpLR without the buffer preset > {tol:g} rad over the first {need} steps")


def _accuracy(s: dict, th: Thresholds) -> Verdict | None:
    accuracy = s["accuracy"]
    st = accuracy["test_acc_stats"]
    if not all(k in st for k in ("wd", "exp", "sd", "texp")):
        return None
    noise = max(st["wd"]["spread"], st["sd"]["spread"])
    tol_acc = max(float(th.acc_tol), noise)
    d_exp = abs(st["exp"]["mean"] - st["wd"]["mean"])
    d_texp = abs(st["texp"]["mean"] - st["sd"]["mean"])
    worst = max(d_exp, d_texp)
    div = {n: [k for k, v in per.items() if v.get("diverged_at") is not None]
           for n, per in accuracy["arms"].items() if n in ("wd", "exp", "sd", "texp")}
    div = {n: v for n, v in div.items() if v}
    detail = (f"mean final test accuracy over {len(accuracy['seeds'])} seeds ({accuracy['steps']} steps, float32): "
              f"WD {st['wd']['mean']:.2%} vs ExpLR {st['exp']['mean']:.2%} (diff {d_exp:.2%}); "
              f"step decay {st['sd']['mean']:.2%} vs TEXP {st['texp']['mean']:.2%} (diff {d_texp:.2%}); "
              f"tolerance {tol_acc:.2%} = max(acc_tol {th.acc_tol:.0%}, seed range of the baselines {noise:.2%})")
    per_seed = "; ".join(
        f"{LABELS[n]} " + "/".join(f"{v.get('test_acc', math.nan):.1%}" for v in accuracy["arms"][n].values())
        for n in ("wd", "exp", "sd", "texp"))
    detail += f"; per seed: {per_seed}"
    if "std_wd" in st and "std_exp" in st:
        detail += f"; standard net (not judged): WD {st['std_wd']['mean']:.2%} vs ExpLR {st['std_exp']['mean']:.2%}"
    rule = (f"|ExpLR − WD| and |TEXP − step decay| in mean final test accuracy ≤ max({th.acc_tol:.2%}, seed range of "
            f"the baselines = {noise:.2%}) = {tol_acc:.2%}; fails if a run diverges")
    if div:
        return verdict("accuracy-matches", False, worst, detail + f"; diverged: {div}", rule)
    if not all(math.isfinite(v) for v in (d_exp, d_texp)):
        return verdict("accuracy-matches", None, worst, detail + "; accuracies missing", rule)
    return verdict("accuracy-matches", bool(worst <= tol_acc), worst, detail, rule)


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
    detail = (f"float32, tiny BN net, lr {s['lr']}, momentum {s['momentum']}, WD-equivalent λ {ov['weight_decay']} "
              f"(LR x{ov['alpha'] ** -2:.4g} per step): with renormalization "
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


def judge(summary: dict, th: Thresholds) -> list[Verdict]:
    """The four verdicts of ``exp-lr`` from its summary (as stored in ``summary.json``) and ``th``."""
    out = [_directions(summary, th), _buffer_mapping(summary, th)]
    acc = _accuracy(summary, th)
    if acc is not None:
        out.append(acc)
    out.append(_overflow(summary, th))
    return out
