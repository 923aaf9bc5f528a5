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
    """Raise :class:`UserError` unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{name} must be {bound}, got {value!r}")
