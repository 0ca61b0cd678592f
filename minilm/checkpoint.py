"""Checkpoints: one folder each (out_dir/last, out_dir/best), swapped in whole.

A folder holds model.safetensors (weights; a tied matrix is one tensor), optimizer.pt, rng.pt and
state.json (resolved config, model config, tokenizer, step, best val loss), written last: a folder
with a state.json is complete. A new checkpoint is written as <name>.tmp, the old one renamed to
<name>.old, the new one renamed into place and the old one deleted. However that sequence is
interrupted, one of <name>, <name>.tmp, <name>.old is complete: readers take the first complete one
of the three (complete_checkpoint), and resume puts it back under its name (recover_checkpoint).
minilm.interop.loading.load_model reads these and Hugging Face models alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from minilm.errors import CheckpointError, error_line
from minilm.files import sibling, strict_json, swap_in, write_atomic
from minilm.model.gpt import GPT, GPTConfig
from minilm.tokenizer import Tokenizer, tokenizer_from_dict

FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_versions(path: Path) -> tuple[Path, Path, Path]:
    """`path` and what a swap leaves beside it: <name>.tmp (newer), <name>.old (older)."""
    return path, sibling(path, ".tmp"), sibling(path, ".old")


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """An empty <name>.tmp to fill (state.json last), swapped in for `path` when the block ends."""
    tmp = sibling(path, ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    swap_in(tmp, path)


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    """state.json, written last and atomically: its presence marks the folder complete."""
    write_atomic(folder / "state.json", strict_json(state, indent=2))


def save_checkpoint(path: str | Path, model: GPT, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any]) -> None:
    """Write a checkpoint folder atomically. `state` must be JSON-serialisable (NaN and
    infinities are stored as null)."""
    with _staged(Path(path)) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        torch.save(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
        torch.save(rng_states(), tmp / "rng.pt")
        _write_state(tmp, dict(state, model_config=asdict(model.config)))


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Copy a checkpoint folder atomically, state.json last."""
    with _staged(Path(dst)) as tmp:
        for file in sorted(Path(src).iterdir(), key=lambda f: f.name == "state.json"):
            shutil.copy2(file, tmp / file.name)  # state.json last


def complete_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint among `path`, `path.tmp` (a newer one not yet swapped in) and
    `path.old` (the one it replaces), in that order; None if none is. Reads only."""
    for candidate in checkpoint_versions(Path(path)):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def recover_checkpoint(path: str | Path) -> Path | None:
    """Put the complete checkpoint of complete_checkpoint(path) back under `path` after an
    interrupted swap; `path`, or None when there is no complete checkpoint. For the run's owner
    (the trainer resuming), never a reader: it renames."""
    path = Path(path)
    found = complete_checkpoint(path)
    if found is None:
        return None
    if found != path:
        shutil.rmtree(path, ignore_errors=True)  # an incomplete folder, if any
        os.replace(found, path)
    for leftover in checkpoint_versions(path)[1:]:
        shutil.rmtree(leftover, ignore_errors=True)
    return path


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint folder and whatever an interrupted swap left beside it."""
    for version in checkpoint_versions(Path(path)):
        shutil.rmtree(version, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run's out_dir (its best, else its last checkpoint), each
    through complete_checkpoint (so an interrupted swap still resolves)."""
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        found = complete_checkpoint(candidate)
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint found at {path} (expected state.json there or in "
                          f"{path}/best or {path}/last, or a Hugging Face config.json)")


def resume_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint fixes, from its config dict (dotted keys): the model (its output
    function, model.logit_softcap, included) and the data (but where it is cached and how many
    processes tokenize it)."""
    fixed = {f"model.{k}": v for k, v in cfg.get("model", {}).items()}
    fixed.update({f"data.{k}": v for k, v in cfg.get("data", {}).items()
                  if k not in ("num_proc", "cache_dir")})
    return fixed


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, in today's layout whatever code wrote it (upgrade_state)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: state.json unreadable "
                              f"({type(e).__name__})") from None
    return upgrade_state(state)


def upgrade_state(state: Any) -> Any:
    """Checkpoints written before the model owned its output function kept the soft-cap beside
    the model: a top-level `logit_softcap` (and the run's `config.loss.softcap`). It becomes the
    model's own `model_config.logit_softcap` (and `config.model.logit_softcap`), so that every
    reader sees one layout."""
    if not isinstance(state, dict) or "logit_softcap" not in state:
        return state
    cap = state.pop("logit_softcap")
    config = state.get("config")
    for model in (state.get("model_config"), config.get("model") if isinstance(config, dict)
                  else None):
        if isinstance(model, dict):
            model.setdefault("logit_softcap", cap)
    return state


def load_weights(path: Path, model: GPT) -> None:
    try:
        weights = load_file(path / "model.safetensors")
        model.load_state_dict(weights)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"corrupt checkpoint {path}: model.safetensors unreadable "
                              f"({error_line(e)})") from None


def load_training_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer state dict and RNG states of a checkpoint."""
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {type(e).__name__}") from None
    return optimizer, rng


def read_model(path: Path) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model, tokenizer and state.json of the complete checkpoint folder `path`."""
    state = read_state(path)
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        tokenizer_description = state["tokenizer"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: bad state.json ({e})") from None
    # outside the try: a tokenizer that can't be loaded here (a tiktoken encoding offline, not
    # cached) is not a corrupt checkpoint, and says what is missing itself
    tokenizer = tokenizer_from_dict(tokenizer_description)
    load_weights(path, model)
    return model, tokenizer, state
