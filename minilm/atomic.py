"""Files that appear whole or not at all: written under a temporary name in the same folder and
renamed into place when complete; an error on the way removes the temporary file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write (by any means: np.memmap, safetensors), renamed to
    `path` when the block ends without an error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_atomic(path: str | Path, binary: bool = False) -> Iterator[IO]:
    """A file for writing (UTF-8 text, or bytes), renamed to `path` when the block ends without
    an error."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            yield f


def write_atomic(path: str | Path, text: str) -> None:
    with open_atomic(path) as f:
        f.write(text)
