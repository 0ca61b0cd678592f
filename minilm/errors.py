"""One line for an exception caught at a boundary (a library's error inside a user-facing one):
its type and the first line of its message, since the rest is a library's multi-line report."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of the error's message, at most `limit` characters ('' for none)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


def error_line(error: BaseException, limit: int = 160) -> str:
    """'TypeName: first line of the message'."""
    return f"{type(error).__name__}: {first_line(error, limit)}"
