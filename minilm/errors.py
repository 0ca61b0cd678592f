"""The errors a user can cause, and how one is said: a MinilmError is one line naming the bad
value; a CLI prints it as `error: ...` and exits 2 (minilm.cli.common.run_cli), the server answers
400 with it. Every module raises these (never prints), so the same mistake reads the same wherever
it is made.
"""

from __future__ import annotations


class MinilmError(ValueError):
    """A user mistake, said in one line. A ValueError, so that callers catching ValueError (and
    argparse-style checks) keep working."""


class ConfigError(MinilmError):
    """A user mistake in a config file or an override: one line, naming the key."""


class DataError(MinilmError):
    """A data source that cannot be read: one line naming it."""


class CheckpointError(MinilmError):
    """A missing or unreadable checkpoint: one line naming the path."""


class TokenizerExportError(MinilmError):
    """A tokenizer that HF tokenizer files cannot reproduce exactly (the model is exported alone)."""


class SettingError(MinilmError):
    """A bad sampler setting; ``param`` names it (``temperature``, ``logit_bias``, ``order``...), so
    that a CLI can say which flag and a server which request field was wrong."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class TrainingStopped(Exception):
    """A run stopped before max_iters on purpose: its message is the one line to show (shown by
    rank 0 only: `show`), exit_code the process's exit code (130 SIGINT, 143 SIGTERM, 1 a
    diverged loss)."""

    def __init__(self, message: str, exit_code: int, show: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.show = show


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of the error's message, at most `limit` characters ('' for none)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


def error_line(error: BaseException, limit: int = 160) -> str:
    """'TypeName: first line of the message': one line for an exception caught at a boundary (a
    library's error inside a user-facing one), since the rest is a library's multi-line report."""
    return f"{type(error).__name__}: {first_line(error, limit)}"
