"""Checkpoints: one folder each (out_dir/last, out_dir/best), swapped in whole.

A folder holds model.safetensors (weights; a tied matrix is one tensor), optimizer.pt, rng.pt and
state.json (resolved config, model config, tokenizer, step, best val loss), written last: a folder
with a state.json is complete. A new checkpoint is written as <name>.tmp, the old one renamed to
<name>.old, the new one renamed into place and the old one deleted. However that sequence is
interrupted, one of <name>, <name>.tmp, <name>.old is complete: readers take the first complete one
of the three (complete_checkpoint), and resume puts it back under its name (recover_checkpoint).
minilm.interop.loading.load_model reads these and Hugging Face models alike.

A sharded checkpoint (an FSDP run's) holds, instead of the first three files, what
torch.distributed.checkpoint (DCP) writes: every rank's shards of the weights and of the AdamW
state (`__<rank>_0.distcp`) with their `.metadata`, and each rank's RNG states
(`rng_<rank>.pt`); state.json says `"sharded": true` and the world size. The same swap makes it
atomic. Any number of processes reads it back, each taking the shards it needs (DCP reshards):
resume at the same or another world size, and one process filling a whole model (read_model).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
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


def save_sharded_checkpoint(path: str | Path, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every rank calls this (DCP's save is collective): its shards of the weights and of the
    optimizer state, and its RNG states, go into <name>.tmp; once all are written, rank 0 writes
    state.json (sharded, world size) and swaps the folder in; no rank returns before that."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path, rank = Path(path), dist.get_rank()
    tmp = sibling(path, ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=tmp)
    torch.save(rng_states(), tmp / f"rng_{rank}.pt")
    dist.barrier()  # every rank's files are in tmp
    if rank == 0:
        _write_state(tmp, dict(state, model_config=asdict(model.config), sharded=True,
                               world_size=dist.get_world_size()))
        swap_in(tmp, path)
    dist.barrier()  # nobody reads `path` before it is in place


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


def load_weights(path: Path, model: GPT, sharded: bool = False) -> None:
    """The checkpoint's weights into a whole model, in this process alone (a sharded checkpoint:
    DCP gathers every rank's shards into the model's own tensors)."""
    try:
        if sharded:
            weights = {"model": model.state_dict()}
            _dcp_load(weights, path, alone=True)  # only the model's keys
            model.load_state_dict(weights["model"])
        else:
            model.load_state_dict(load_file(path / "model.safetensors"))
    except Exception as e:  # safetensors and DCP raise their own error types for bad files
        what = ".metadata and shards" if sharded else "model.safetensors"
        raise CheckpointError(f"corrupt checkpoint {path}: {what} unreadable "
                              f"({error_line(e)})") from None


def load_training_state(path: Path, state: dict[str, Any], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """A checkpoint's weights and optimizer state into the run's model and optimizer, whatever
    the checkpoint's format and the model's wrapping (one process, DDP, FSDP) and however many
    ranks wrote it. Every rank calls this. Returns the RNG states this rank saved (rank 0 of any
    checkpoint; each rank of a sharded one at the same world size), None where there are none."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    try:
        if state.get("sharded"):
            _load_sharded_training_state(path, model, optimizer)
            rng = path / f"rng_{rank}.pt"
            mine = rank == 0 or state.get("world_size") == world_size
            return torch.load(rng, weights_only=False) if mine and rng.is_file() else None
        weights = load_file(path / "model.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        _load_plain_training_state(model, optimizer, weights, optimizer_state)
        return torch.load(path / "rng.pt", weights_only=False) if rank == 0 else None
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {error_line(e)}") from None


def _load_sharded_training_state(path: Path, model: torch.nn.Module,
                                 optimizer: torch.optim.Optimizer) -> None:
    """DCP into the model's and optimizer's own layout (this world size's shards, or whole
    tensors), as torchtitan resumes."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optimizer_state}
    _dcp_load(loaded, path, alone=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"])


def _dcp_load(state_dict: dict[str, Any], path: Path, alone: bool) -> None:
    """dcp.load into state_dict's own tensors; alone: in this process only, no collective (then
    without DCP's warning that it assumes so)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state_dict, checkpoint_id=path, no_dist=alone)


def _load_plain_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                               weights: dict[str, torch.Tensor],
                               optimizer_state: dict[str, Any]) -> None:
    """model.safetensors and optimizer.pt (the optimizer's own state_dict, keyed by parameter
    index) into a plain model, or, through DCP's state-dict API, into an FSDP one (each rank
    keeps its shards of the whole tensors)."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {fqns[i]: s for i, s in optimizer_state["state"].items()},
               "param_groups": [dict(g, params=[fqns[i] for i in g["params"]])
                                for g in optimizer_state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))


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
    load_weights(path, model, sharded=bool(state.get("sharded")))
    return model, tokenizer, state
