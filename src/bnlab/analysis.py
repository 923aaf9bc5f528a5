"""Numbers from measured series: the small analysis functions that experiments' judges share.

Pure numpy on plain arrays (no torch, no I/O), so that ``judge`` functions stay pure and cheap.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np



def first_index_over(values: Sequence[float], tol: float) -> Optional[int]:
    """The first index ``i`` with ``values[i] > tol`` (NaN counts as over), or ``None``.

    Example:
        >>> first_index_over([0.0, 1e-9, 3e-6, 0.0], 1e-6)
        2
        >>> first_index_over([0.0, float("nan")], 1.0)
        1
    """
    v = np.asarray(values, dtype=float)
    idx = np.flatnonzero(~(v <= tol))
    return int(idx[0]) if idx.size else None


def geometric_mean(values: Sequence[float]) -> float:
    """``exp(mean(log v))`` over the values that are not NaN (undefined, ignored); any ``inf``
    makes it ``inf``; NaN when nothing is left. Values are floored at 1e-300 (a zero gives a
    very small mean, not ``-inf``).

    Example:
        >>> geometric_mean([1.0, 4.0, float("nan")])
        2.0
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan
    if np.any(np.isinf(v)):
        return math.inf
    return float(np.exp(np.mean(np.log(np.maximum(v, 1e-300)))))


def nanmax(values: Sequence[float]) -> float:
    """The largest value ignoring NaN; NaN when no value is finite.

    Example:
        >>> nanmax([1.0, float("nan"), 3.0])
        3.0
    """
    v = np.asarray(values, dtype=float)
    return float(np.nanmax(v)) if np.isfinite(v).any() else math.nan


# ----------------------------------------------------------------------------- Bjorck et al. (divergence, activations)


def first_exceeding(x: Sequence[float], values: Sequence[float], level: float = 1.0) -> float:
    """The first ``x[i]`` at which ``values[i]`` exceeds ``level`` (a non-finite value counts as
    exceeding); NaN if none does.

    Example:
        >>> first_exceeding([1e-3, 1e-2, 1e-1], [0.9, 1.5, 2.0])
        0.01
        >>> first_exceeding([1e-3, 1e-2, 1e-1], [0.9, float("nan"), 0.5])
        0.01
        >>> first_exceeding([1e-3, 1e-2], [0.9, 1.0])
        nan
    """
    v = np.asarray(values, dtype=float)
    bad = ~np.isfinite(v) | (v > level)
    idx = np.flatnonzero(bad)
    return float(np.asarray(x, dtype=float)[idx[0]]) if idx.size else math.nan


def median_curve(rows) -> np.ndarray:
    """Median over the rows (e.g. batches) of a ``[rows, points]`` array, with every non-finite
    value counted as ``+inf`` (a diverged point).

    Example:
        >>> median_curve([[0.9, float("nan")], [0.8, 5.0], [0.7, float("nan")]]).tolist()
        [0.8, inf]
    """
    r = np.asarray(rows, dtype=float)
    r = np.where(np.isfinite(r), r, np.inf)
    return np.median(r, axis=0)


def fit_growth(values: Sequence[float], first: int = 1, last_excluded: int = 1) -> dict:
    """Least-squares line of ``log10(values)`` against index over ``values[first:-last_excluded]``
    (e.g. a moment per layer, the first and the last layer left out).

    Returns:
        ``slope`` (log10 per index), ``intercept``, ``factor`` = 10^slope (growth per index),
        ``total`` = factor^(n - 1) over the ``n`` fitted indices, ``n``, ``first`` and ``last``
        (the fitted index range); ``slope``/``factor``/``total`` NaN (and ``n`` the number of
        usable values) if fewer than 2 values are finite and positive.

    Example:
        >>> f = fit_growth([100.0, 1.0, 2.0, 4.0, 1e-3])
        >>> round(f["factor"], 6), round(f["total"], 6), (f["first"], f["last"])
        (2.0, 4.0, (1, 3))
    """
    v = np.asarray(values, dtype=float)
    idx = np.arange(len(v))
    sel = slice(first, len(v) - last_excluded if last_excluded else None)
    x, y = idx[sel], v[sel]
    ok = np.isfinite(y) & (y > 0)
    if ok.sum() < 2:
        return {"slope": math.nan, "factor": math.nan, "total": math.nan, "n": int(ok.sum())}
    slope, icept = np.polyfit(x[ok], np.log10(y[ok]), 1)
    n = len(y)
    return {"slope": float(slope), "intercept": float(icept), "factor": float(10**slope), "total": float(10 ** (slope * (n - 1))),
            "n": int(n), "first": int(x[0]), "last": int(x[-1])}


def layer_growth(s0: Sequence[float], s1: Sequence[float]) -> np.ndarray:
    """``s1 / s0`` per layer: ``inf`` if ``s1`` is not finite or a dead layer (``s0 = 0``) comes
    alive, NaN (undefined, to be ignored) for a layer that is dead at both ends.

    Example:
        >>> layer_growth([1.0, 0.0, 0.0, 2.0], [3.0, 0.0, 1.0, float("inf")]).tolist()
        [3.0, nan, inf, inf]
    """
    s0, s1 = np.asarray(s0, float), np.asarray(s1, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = s1 / s0
    g = np.where(~np.isfinite(s1) | ((s0 == 0) & (s1 > 0)), np.inf, g)
    return np.where((s0 == 0) & (s1 == 0), np.nan, g)


def deep_vs_shallow(std_s) -> dict:
    """How much more the deep layers grow than the shallow ones between the first and the last row
    of a ``[S, L]`` matrix (e.g. channel std per layer along an update ``w + sΔw``).

    Growth ``std[-1] / std[0]`` per *inner* layer (all but the first and the last;
    :func:`layer_growth`), and its geometric means (:func:`geometric_mean`) over the shallowest
    and the deepest thirds of the inner layers (at least one layer each).

    Returns:
        ``growth_per_layer`` (list), ``shallow``, ``deep`` and ``ratio`` = deep / shallow:
        ``inf`` when only the deep growth is unbounded, NaN when either mean is undefined or both
        are unbounded.

    Example:
        >>> d = deep_vs_shallow([[1.0] * 8, [1, 2, 2, 3, 5, 40, 40, 1]])
        >>> d["shallow"], d["deep"], d["ratio"]
        (2.0, 40.0, 20.0)
    """
    std_s = np.asarray(std_s, dtype=float)
    g = layer_growth(std_s[0], std_s[-1])[1:-1]
    k = max(1, len(g) // 3)
    shallow, deep = geometric_mean(g[:k]), geometric_mean(g[-k:])
    if math.isnan(shallow) or math.isnan(deep) or (math.isinf(deep) and math.isinf(shallow)):
        ratio = math.nan
    elif math.isinf(deep):
        ratio = math.inf
    else:
        ratio = deep / shallow
    return {"growth_per_layer": g.tolist(), "shallow": shallow, "deep": deep, "ratio": ratio}


def diverging_updates(rels: Sequence[tuple[int, float]], diverged: bool) -> tuple[Optional[int], Optional[int]]:
    """``(t_first, t_div)`` from per-step relative losses ``[(step, L_B(w_{t+1}) / L_B(w_t)), ...]``.

    ``t_first``: the first update that increased its batch loss (relative loss > 1 or not finite).
    ``t_div``: for a run that diverged, the first update of the final streak of loss-increasing
    updates (the start of the divergence); otherwise ``t_first``. ``None`` when there is none.

    Example:
        >>> diverging_updates([(0, 4.0), (1, 0.2), (2, 199.0), (3, float("nan"))], diverged=True)
        (0, 2)
    """
    bad = [(t, not (r <= 1.0)) for t, r in rels]
    t_first = next((t for t, b in bad if b), None)
    if not diverged:
        return t_first, t_first
    t_div = None
    for t, b in reversed(bad):
        if not b:
            break
        t_div = t
    return t_first, (t_div if t_div is not None else t_first)


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key`` over the records that have it (and where it is not ``None``).

    Args:
        records: metrics records, each with a ``"step"``.
        key: the metric.

    Returns:
        The steps (as stored: ints) and the values as float arrays; both empty if no record has ``key``.

    Example:
        >>> s, v = series([{"step": 0, "a": 1.0}, {"step": 1}, {"step": 2, "a": 3}], "a")
        >>> s.tolist(), v.tolist()
        ([0, 2], [1.0, 3.0])
    """
    pairs = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if not pairs:
        return np.zeros(0, int), np.zeros(0)
    s, v = zip(*pairs)
    return np.asarray(s), np.asarray(v, dtype=float)


def window_ratio(steps_a: Sequence[float], a: Sequence[float], steps_b: Sequence[float], b: Sequence[float],
                 lo: float, hi: float) -> tuple[float, float, float, int]:
    """Median of the per-step ratio ``a / b`` over the steps both series have in ``[lo, hi)``.

    Only the steps where both values are finite and ``b > 0`` count.

    Args:
        steps_a, a: the first series (steps and values).
        steps_b, b: the second series.
        lo, hi: the window of steps, ``lo`` included, ``hi`` excluded.

    Returns:
        ``(median of a/b, median of a, median of b, number of steps used)``; three NaNs and 0 when
        no step counts.

    Example:
        >>> s = np.arange(0, 100, 10)
        >>> window_ratio(s, np.full(10, 6.0), s, np.full(10, 2.0), 0, 30)
        (3.0, 6.0, 2.0, 3)
    """
    steps_a, steps_b = np.asarray(steps_a), np.asarray(steps_b)
    common = sorted(set(steps_a.tolist()) & set(steps_b.tolist()))
    ia = {s: i for i, s in enumerate(steps_a.tolist())}
    ib = {s: i for i, s in enumerate(steps_b.tolist())}
    sel = [s for s in common if lo <= s < hi]
    va = np.array([a[ia[s]] for s in sel], float)
    vb = np.array([b[ib[s]] for s in sel], float)
    ok = np.isfinite(va) & np.isfinite(vb) & (vb > 0)
    if not ok.any():
        return math.nan, math.nan, math.nan, 0
    return float(np.median(va[ok] / vb[ok])), float(np.median(va[ok])), float(np.median(vb[ok])), int(ok.sum())


def distribution_moves(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """How far one channel's distribution moves between consecutive measurements, in units of its spread.

    ``|Δ mean| / s + |Δ log std|`` for each pair of consecutive measurements, with ``s`` the
    median of ``std`` over the series (``std`` floored at 1e-12 inside the log).

    Args:
        mean: the channel's mean at each measurement.
        std: its standard deviation at the same measurements.

    Returns:
        ``len(mean) - 1`` values; empty when there are fewer than two measurements or ``s`` is not
        positive.

    Example:
        >>> distribution_moves([0.0, 1.0, 1.0], [2.0, 2.0, 2.0]).tolist()
        [0.5, 0.0]
    """
    m, s = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    if len(m) < 2:
        return np.zeros(0)
    sc = float(np.median(s))
    if not sc > 0:
        return np.zeros(0)
    return np.abs(np.diff(m)) / sc + np.abs(np.diff(np.log(np.maximum(s, 1e-12))))


def instability(means: Sequence[Sequence[float]], stds: Sequence[Sequence[float]]) -> float:
    """Median over channels and consecutive measurements of :func:`distribution_moves`.

    Args:
        means: per channel, its mean at each measurement.
        stds: per channel, its standard deviation at the same measurements.

    Returns:
        The median of all channels' moves pooled; NaN when no channel has any.

    Example:
        >>> instability([[0.0, 1.0, 1.0], [5.0]], [[2.0, 2.0, 2.0], [1.0]])
        0.25
    """
    vals = [d for d in (distribution_moves(m, s) for m, s in zip(means, stds)) if len(d)]
    if not vals:
        return math.nan
    return float(np.median(np.concatenate(vals)))


def tail_mean(steps: Sequence[float], values: Sequence[float], start: float) -> float:
    """Mean of the values at steps ``>= start``; the last value if there is none; NaN if empty.

    Example:
        >>> tail_mean([0, 5, 10], [0.2, 0.4, 0.6], 5)
        0.5
        >>> tail_mean([0, 5], [0.2, 0.4], 50)
        0.4
    """
    s, a = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    sel = s >= start
    return float(np.mean(a[sel])) if sel.any() else (float(a[-1]) if len(a) else math.nan)


def decades_span(lrs: Sequence[float], ok: Sequence[bool]) -> tuple[float, Optional[float], Optional[float]]:
    """The widest run of consecutive grid points (sorted by value) that are ``ok``, in decades.

    Args:
        lrs: the grid (positive values, e.g. learning rates), in any order.
        ok: one flag per grid point.

    Returns:
        ``(decades, lo, hi)``: ``log10(hi / lo)`` of the widest band ``[lo, hi]`` of consecutive
        ``ok`` points (a single point spans 0 decades; the first band wins a tie), or
        ``(0.0, None, None)`` when no point is ``ok``.

    Example:
        >>> decades_span([1e-2, 1e-1, 1, 10, 100], [True, False, True, True, True])
        (2.0, 1, 100)
        >>> decades_span([1, 10], [False, False])
        (0.0, None, None)
    """
    order = sorted(range(len(lrs)), key=lambda i: lrs[i])
    best: tuple[float, Optional[float], Optional[float]] = (0.0, None, None)
    cur_start = None
    for k, i in enumerate(order):
        if ok[i]:
            if cur_start is None:
                cur_start = k
            lo, hi = lrs[order[cur_start]], lrs[i]
            span = math.log10(hi / lo)
            if best[1] is None or span > best[0]:
                best = (span, lo, hi)
        else:
            cur_start = None
    return best


def running_min_curve(steps: Sequence[int], values: Sequence[Optional[float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(T, m_T)``: ``T = t + 1`` for each measured step ``t`` (sorted) and ``m_T = min`` of the
    values measured at steps ``t' <= t``, i.e. ``min_{t < T}`` of the series.

    Non-finite and ``None`` values are skipped (a diverged step has no gradient).

    Example:
        >>> T, m = running_min_curve([0, 1, 2, 3, 4], [5.0, 7.0, 2.0, float("nan"), 3.0])
        >>> T.tolist(), m.tolist()
        ([1.0, 2.0, 3.0, 5.0], [5.0, 5.0, 2.0, 2.0])
    """
    pairs = sorted((s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v))
    if not pairs:
        return np.array([]), np.array([])
    t = np.array([p[0] + 1 for p in pairs], float)
    m = np.minimum.accumulate(np.array([p[1] for p in pairs], float))
    return t, m


def fit_rate(T: Sequence[float], m: Sequence[float], decades: float, n_points: int = 30) -> dict:
    """Least-squares slope of ``log10 m_T`` against ``log10 T`` over the last ``decades`` decades.

    ``m_T`` (a step function of ``T``, e.g. from :func:`running_min_curve`) is sampled at
    ``n_points`` log-spaced ``T`` in ``[max(T_0, T_end / 10**decades), T_end]``, each sample
    taking the last measured ``T`` at or below the grid point, so that late steps do not outweigh
    early ones.

    Args:
        T: increasing measured ``T`` values.
        m: the curve at those ``T``.
        decades: the window, in decades of ``T`` back from the last.
        n_points: grid points of the sampling.

    Returns:
        ``slope``, ``intercept`` (log10 units), ``r2``, ``t_lo``, ``t_hi``; ``slope = nan`` when
        fewer than 3 distinct samples or any sampled ``m_T <= 0`` (then ``t_lo``/``t_hi`` give the
        window asked for; all NaN when ``T`` has fewer than 3 points).

    Example:
        >>> T = np.arange(1, 2001, dtype=float)
        >>> round(fit_rate(T, 3.0 / T, decades=1.0)["slope"], 6)
        -1.0
    """
    T = np.asarray(T, float)
    m = np.asarray(m, float)
    nan = {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "t_lo": math.nan, "t_hi": math.nan}
    if len(T) < 3:
        return nan
    t_hi = float(T[-1])
    t_lo = max(float(T[0]), t_hi / 10**decades)
    grid = np.unique(np.round(np.logspace(math.log10(t_lo), math.log10(t_hi), n_points)))
    idx = np.searchsorted(T, grid, side="right") - 1  # the curve at the last measured T <= grid point
    idx = np.unique(idx[idx >= 0])
    x, y = T[idx], m[idx]
    if len(x) < 3 or np.any(y <= 0):
        return {**nan, "t_lo": t_lo, "t_hi": t_hi}
    lx, ly = np.log10(x), np.log10(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    ss = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss if ss > 0 else math.nan
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "t_lo": float(x[0]), "t_hi": float(x[-1])}
