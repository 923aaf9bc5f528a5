"""Figures drawn from stored metrics (never from live training), with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "font.size": 9}
NORM_COLORS = {"bn": "#1f77b4", "none": "#d62728", "ln": "#2ca02c", "gn": "#9467bd", "bn-noisy": "#ff7f0e"}


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
            ``eval_steps``, ``test_acc``, and optionally ``diverged_at``.
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
            if a.get("diverged_at") is not None:
                ax1.axvline(a["diverged_at"], color=c, ls=":", lw=1)
                ax1.annotate("diverged", (a["diverged_at"], 0.98), xycoords=("data", "axes fraction"), color=c, fontsize=8, ha="right", va="top", rotation=90)
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
