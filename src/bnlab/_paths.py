"""Where bnlab keeps caches and downloaded data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache dir: ``$BNLAB_CACHE``, else ``$XDG_CACHE_HOME/bnlab``, else ``~/.cache/bnlab``."""
    if os.environ.get("BNLAB_CACHE"):
        return Path(os.environ["BNLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnlab"


def data_dir() -> Path:
    """Default root for datasets read from disk (``$BNLAB_DATA``, else ``cache_dir()/data``)."""
    if os.environ.get("BNLAB_DATA"):
        return Path(os.environ["BNLAB_DATA"]).expanduser()
    return cache_dir() / "data"
