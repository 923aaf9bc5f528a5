"""Figures drawn from stored metrics (never from live training), with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "font.size": 9}
NORM_COLORS = {"bn": "#1f77b4", "none": "#d62728", "ln": "#2ca02c", "gn": "#9467bd", "bn-noisy": "#ff7f0e",
               "l1": "#8c564b", "l2": "#e377c2", "linf": "#17becf"}


def color_for(norm: str, fallback_index: int = 0) -> str:
    return NORM_COLORS.get(norm, f"C{fallback_index % 10}")


def smooth(values: Iterable[float], window: int) -> np.ndarray:
    """Moving average that keeps NaN/inf out of the window (for noisy per-step losses)."""
    v = np.asarray(list(values), dtype=float)
    if window <= 1 or len(v) < window:
        return v
    finite = np.where(np.isfinite(v), v, np.nan)
    out = np.array([np.nanmean(finite[max(0, i - window + 1) : i + 1]) if np.isfinite(finite[max(0, i - window + 1) : i + 1]).any() else np.nan for i in range(len(v))])
    return out


def save(fig, path: Path) -> Path:
    """Save and close ``fig`` (tight bounding box)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def learning_curves(arms: list[dict], path: Path, *, title: str = "") -> Path:
    """Training loss against step and test accuracy against step, one line per arm.

    Args:
        arms: dicts with ``label``, ``norm``, ``linestyle``, ``steps``, ``loss`` (per step),
            ``eval_steps``, ``test_acc``, and optionally ``diverged_at`` (a step, or a list of
            steps: one per diverged seed) and a seed band ``loss_lo``/``loss_hi`` and
            ``acc_lo``/``acc_hi`` (fractions) drawn shaded around the lines.
        path: where to save the PNG.
    """
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6))
        for i, a in enumerate(arms):
            c = color_for(a["norm"], i)
            ls = a.get("linestyle", "-")
            window = max(1, len(a["loss"]) // 40)
            ax1.plot(a["steps"], smooth(a["loss"], window), color=c, ls=ls, label=a["label"])
            ax2.plot(a["eval_steps"], np.asarray(a["test_acc"], float) * 100, color=c, ls=ls, marker="o", ms=3, label=a["label"])
            if a.get("loss_lo") is not None:
                ax1.fill_between(a["steps"], smooth(a["loss_lo"], window), smooth(a["loss_hi"], window), color=c, alpha=0.15, lw=0)
            if a.get("acc_lo") is not None:
                ax2.fill_between(a["eval_steps"], 100 * np.asarray(a["acc_lo"], float), 100 * np.asarray(a["acc_hi"], float),
                                 color=c, alpha=0.15, lw=0)
            div = a.get("diverged_at")
            for d in ([] if div is None else div if isinstance(div, (list, tuple)) else [div]):
                ax1.axvline(d, color=c, ls=":", lw=1)
            if div is not None and not isinstance(div, (list, tuple)):
                ax1.annotate("diverged", (div, 0.98), xycoords=("data", "axes fraction"), color=c, fontsize=8, ha="right", va="top", rotation=90)
        ax1.set_yscale("log")
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (moving average)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("test accuracy (%)")
        ax2.set_ylim(0, 100)
        ax2.axhline(10, color="grey", lw=0.8, ls="--")
        ax2.text(0.01, 10.5, "chance", transform=ax2.get_yaxis_transform(), color="grey", fontsize=7)
        ax1.legend(fontsize=7)
        if title:
            fig.suptitle(title)
        return save(fig, path)


def accuracy_vs_lr(ax, series: list[dict], *, chance: float | None = 0.1, xlabel: str = "learning rate",
                   marks: Iterable[tuple[float, str]] = (), title: str = "") -> None:
    """Final test accuracy against the learning rate on ``ax``, one line per series, divergence marked.

    Args:
        ax: a matplotlib axis.
        series: dicts with ``label``, ``lrs``, ``acc`` (fractions; NaN for a diverged run is
            drawn at the bottom), optionally ``diverged`` (booleans per point), ``norm`` (colour),
            ``linestyle``, ``spread`` (± half-width per point, fractions: an error band).
        chance: a dashed line at chance accuracy (``None``: none).
        xlabel: the x-axis label.
        marks: ``(lr, text)`` vertical dotted lines (e.g. the small and the large LR).
        title: the axis title.
    """
    for i, s in enumerate(series):
        c = color_for(s.get("norm", ""), i)
        order = np.argsort(np.asarray(s["lrs"], float))
        lrs = np.asarray(s["lrs"], float)[order]
        acc = 100 * np.asarray(s["acc"], float)[order]
        ax.plot(lrs, np.where(np.isfinite(acc), acc, 2.0), color=c, ls=s.get("linestyle", "-"), marker="o", ms=4,
                label=s["label"])
        if s.get("spread") is not None:
            half = 100 * np.asarray(s["spread"], float)[order]
            ax.fill_between(lrs, acc - half, acc + half, color=c, alpha=0.15, lw=0)
        div = np.asarray(s.get("diverged") or [False] * len(lrs), bool)[order]
        if div.any():
            ax.plot(lrs[div], np.where(np.isfinite(acc[div]), acc[div], 2.0), ls="none", marker="x", ms=9, mew=2, color=c,
                    label=f"{s['label']}: diverged")
    if chance is not None:
        ax.axhline(100 * chance, color="grey", lw=0.8, ls="--")
        ax.text(0.01, 100 * chance + 1, "chance", transform=ax.get_yaxis_transform(), color="grey", fontsize=7)
    for lr, text in marks:
        ax.axvline(lr, color="grey", lw=0.6, ls=":")
        ax.text(lr, 101, text, ha="center", va="bottom", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_ylim(0, 105)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def heatmap(ax, fig, m, x, *, title: str = "", xlabel: str = "", ylabel: str = "layer (0 = first)",
            cmap: str = "viridis", log_floor: float | None = None, colorbar_label: str = "") -> None:
    """A matrix ``m`` (columns: the points ``x``, rows: e.g. layers) as an image with a colour bar.

    Args:
        ax, fig: matplotlib axis and its figure.
        m: array of shape ``(len(x), rows)``; non-finite entries are drawn light grey.
        x: the column coordinates (tick labels, ``%g``).
        log_floor: if given, draw ``log10(max(m, log_floor))`` (and say so on the colour bar).
    """
    import matplotlib as mpl

    cm = mpl.colormaps[cmap].with_extremes(bad="lightgrey")
    mm = np.asarray(m, float).T
    label = colorbar_label
    if log_floor is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            mm = np.log10(np.maximum(mm, log_floor))
        label = label or f"log10 (floored at {log_floor:g})"
    im = ax.imshow(np.ma.masked_invalid(mm), aspect="auto", origin="lower", cmap=cm, interpolation="nearest")
    n = len(x)
    ticks = np.unique(np.linspace(0, n - 1, min(n, 8)).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{x[t]:g}" for t in ticks], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.grid(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(label, fontsize=7)
    cb.ax.tick_params(labelsize=7)
