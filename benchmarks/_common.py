"""Helpers shared by the benchmark scripts (imported as ``_common`` from a script in this folder)."""

from __future__ import annotations

import time


def cpu_busy_fraction(seconds: float = 1.0):
    """Fraction of CPU time not idle over ``seconds`` (Linux /proc/stat), else ``None``."""
    def read():
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:9]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a titled table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
