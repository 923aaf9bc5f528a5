"""Errors a user can cause. The CLI turns them into one line and exit status 2."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for (unknown name, bad value, missing or corrupt file).

    The message is one line that says what is wrong and what is accepted. The CLI prints it as
    ``bnlab: error: <message>`` and exits with status 2, without a traceback.
    """


def unknown_name(kind: str, name: str, accepted) -> UserError:
    """The error for a name that is not in a registry, listing the accepted names."""
    names = ", ".join(sorted(accepted))
    return UserError(f"unknown {kind} {name!r}; accepted: {names}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Raise :class:`UserError` unless ``value`` is finite and > 0 (or >= 0 with ``allow_zero``)."""
    import math

    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{name} must be a finite number {bound}, got {value!r}")


def check_seed(seed) -> None:
    """Seeds are integers in [0, 2**32 - 1] (what numpy and scikit-learn accept)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32 - 1], got {seed!r}")


def check_run_name(name: str) -> None:
    """A run name is one path component: no '/', no '\\', not '.' or '..', not empty."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"run name must be a single directory name (no '/', '\\' or '..'), got {name!r}")
