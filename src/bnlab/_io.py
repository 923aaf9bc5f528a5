"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any):
    """JSON fallback for numpy/torch scalars and arrays and Paths."""
    # numpy / torch scalars and arrays, Paths: make them JSON-friendly.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomic write of a text file (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """JSON with NaN/Infinity allowed (divergence is data) and numpy/torch values converted."""
    return json.dumps(obj, indent=2, sort_keys=True, default=to_jsonable, allow_nan=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomic write of ``obj`` as pretty JSON."""
    atomic_write_text(path, dumps_json(obj) + "\n")
