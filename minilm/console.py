"""The console's rules: a warning is one line on stderr, and a closed stdout (`... | head`) ends
output quietly instead of raising again."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from minilm.errors import error_line


def detach_closed_stdout() -> None:
    """After a write to stdout failed with a broken pipe (`... | head` has exited): point stdout,
    and stderr if it is the same pipe (`2>&1 | head`), at /dev/null, so that later writes and the
    interpreter's final flush succeed silently instead of raising again."""
    try:
        stdout_fd = sys.stdout.fileno()
        same = os.path.sameopenfile(stdout_fd, sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stdout_fd)
    if same:
        os.dup2(devnull, sys.stderr.fileno())
    os.close(devnull)


def warn(message: str, error: BaseException) -> None:
    """One line on stderr, however long the error's message."""
    print(f"warning: {message} ({error_line(error)})", file=sys.stderr, flush=True)


def write_console(stream: TextIO, text: str) -> bool:
    """Write text to a console stream; False when its reader has gone (stdout piped into `head`,
    which has exited): stdout is then detached, so that later writes succeed quietly."""
    try:
        stream.write(text)
        stream.flush()
        return True
    except BrokenPipeError:
        if stream in (sys.stdout, sys.__stdout__):
            detach_closed_stdout()
        return False
