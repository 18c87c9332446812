"""The one error type that checkpoint code raises for user-fixable problems."""

from __future__ import annotations

from typing import Iterable

from gm.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used; the message is one line that names the file and the fix."""


def summarize_keys(keys: Iterable[str], first: int = 5) -> str:
    """'N (first: a, b, c, ...)' for an error message."""
    keys = sorted(keys)
    shown = ", ".join(keys[:first])
    more = ", ..." if len(keys) > first else ""
    return f"{len(keys)} (first: {shown}{more})"
