"""Shared test setup: offline hubs, the shared tiktoken cache, tiny configs and corpora."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_cache = ROOT.parent / "shared" / "tiktoken-cache"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
sys.path.insert(0, str(ROOT))

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
          "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to "
          "famish?\n\nAll:\nResolved. resolved.\n\n") * 40


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def tiny_overrides(tmp_path: Path, source: Path, **extra) -> list[str]:
    """Overrides for a tiny, fast char-level run on `source`."""
    values = {
        "out_dir": tmp_path / "out", "data.source": source, "data.cache_dir": tmp_path / "cache",
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16,
        "train.batch_size": 4, "train.max_iters": 8, "train.eval_interval": 4,
        "train.eval_iters": 2, "train.log_interval": 1, "train.warmup_iters": 2,
        "train.device": "cpu",
    }
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]
