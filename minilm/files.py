"""Files and folders the way minilm writes them: whole or not at all, strict JSON, and only where a
folder can be.

A file is written under a temporary name in the same folder and renamed into place when complete
(an error on the way removes the temporary file); a folder (a checkpoint, an export) is built as
<name>.tmp and swapped in with renames only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

from minilm.errors import ConfigError


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


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """json.dumps that strict JSON readers accept: NaN and infinities become null."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def swap_in(tmp: Path, path: Path) -> None:
    """Replace folder `path` by the complete folder `tmp` with renames only."""
    old = sibling(path, ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover: `path` is the complete one
        os.replace(path, old)
    # else an earlier swap stopped between its renames: `old` stays until `tmp` is in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def check_folder(key: str, path: str) -> None:
    """A folder to write into: not empty, and neither it nor a parent is a file."""
    if not str(path).strip():
        raise ConfigError(f"{key} is empty: give a folder")
    for p in (Path(path), *Path(path).absolute().parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{key}: {p} is a file, not a folder")
            return
