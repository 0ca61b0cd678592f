"""Is a source a Hugging Face hub id or a local path? One rule for datasets (data.source) and models
(--ckpt, train.init_from), so that a mistyped path is "no such file", never a hub lookup."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Collection


def looks_like_hub_id(source: str, file_suffixes: Collection[str]) -> bool:
    """'name' or 'owner/name' (a Hugging Face hub id), not a path: no leading . / ~, at most one
    separator, no file suffix (corpus.txt; a model's .safetensors), and no first folder that
    exists here (a mistyped data/corpus or out/run is a missing path, not a hub id)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source):
        return False
    if Path(source).suffix.lower() in file_suffixes:
        return False
    return "/" not in source or not Path(source.split("/")[0]).is_dir()
