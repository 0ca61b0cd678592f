"""Checkpoints: one folder each (out_dir/last, out_dir/best), swapped in whole.

A folder holds model.safetensors (weights; a tied matrix is one tensor), optimizer.pt, rng.pt and
state.json (resolved config, model config, tokenizer, step, best val loss). It is written as
<name>.tmp and renamed into place, so a crash never leaves a half checkpoint under a real name.
load_model also reads Hugging Face GPT-2 folders and hub ids (through minilm.hf).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minilm.model import GPT, GPTConfig
from minilm.tokenizer import Tokenizer, tokenizer_from_dict

FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint: one line naming the path."""


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace folder `path` by `tmp` with renames only."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: str | Path, model: GPT, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any]) -> None:
    """Write a checkpoint folder atomically. `state` must be JSON-serialisable."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    torch.save(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
    torch.save(rng_states(), tmp / "rng.pt")
    state = dict(state, model_config=asdict(model.config), logit_softcap=model.logit_softcap)
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    _swap_in(tmp, path)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _swap_in(tmp, dst)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run's out_dir (its best, else its last checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        if (candidate / "state.json").is_file():
            return candidate
    raise CheckpointError(f"no checkpoint found at {path} (expected state.json there or in "
                          f"{path}/best or {path}/last, or a Hugging Face config.json)")


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: state.json unreadable "
                              f"({type(e).__name__})") from None


def load_weights(path: Path, model: GPT) -> None:
    try:
        weights = load_file(path / "model.safetensors")
        model.load_state_dict(weights)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"corrupt checkpoint {path}: model.safetensors unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def load_training_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer state dict and RNG states of a checkpoint."""
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {type(e).__name__}") from None
    return optimizer, rng


def looks_like_hub_id(source: str) -> bool:
    """'gpt2' or 'owner/name', and not a path: no leading . / ~, no file suffix, no local first
    folder (so a mistyped out/run is reported as a missing path, not looked up on the hub)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source):
        return False
    if Path(source).suffix in (".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml", ".ckpt"):
        return False
    return "/" not in source or not Path(source.split("/")[0]).is_dir()


def load_model(source: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and state, for generation, evaluation or fine-tuning.

    source: a minilm checkpoint folder or a run's out_dir; a Hugging Face GPT-2 folder (config.json
    + model.safetensors or pytorch_model.bin); or a hub id ('gpt2', 'openai-community/gpt2-medium').
    state: a minilm checkpoint's state.json (config, tokenizer, step, ...); for Hugging Face models
    {source, format: 'huggingface', path, hf_config, model_config, tokenizer, logit_softcap}.
    """
    from minilm import hf  # hf imports CheckpointError from here

    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and looks_like_hub_id(source):
            model, tokenizer, state = hf.load_hub_model(source)
            return model.to(device), tokenizer, state
        raise CheckpointError(f"no checkpoint found at {path}: no such file or folder")
    if hf.is_hf_folder(path) and not (path / "state.json").is_file():
        model, tokenizer, state = hf.load_folder(path)
        return model.to(device), tokenizer, state
    path = resolve_checkpoint(path)
    state = read_state(path)
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        tokenizer = tokenizer_from_dict(state["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: bad state.json ({e})") from None
    load_weights(path, model)
    model.logit_softcap = state.get("logit_softcap")
    return model.to(device).eval(), tokenizer, state
