"""load_model: one reader for every model a user can name: a minilm checkpoint (a folder or a run's
out_dir), a Hugging Face GPT-2 folder, or a hub id. Both formats lie below it, so neither knows the
other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from minilm.checkpoint import complete_checkpoint, read_model, resolve_checkpoint
from minilm.errors import CheckpointError
from minilm.hub import looks_like_hub_id
from minilm.interop import hf
from minilm.model.gpt import GPT
from minilm.tokenizer import Tokenizer

MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml", ".ckpt")


def load_model(source: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and state, for generation, evaluation or fine-tuning.

    source: a minilm checkpoint folder or a run's out_dir; a Hugging Face GPT-2 folder (config.json
    + model.safetensors or pytorch_model.bin); or a hub id ('gpt2', 'openai-community/gpt2-medium').
    state: a minilm checkpoint's state.json (config, tokenizer, step, ...); for Hugging Face models
    {source, format: 'huggingface', path, hf_config, model_config, tokenizer}.
    """
    path = Path(source).expanduser()
    if not path.exists() and complete_checkpoint(path) is None:  # (an interrupted swap: found)
        if not (isinstance(source, str) and looks_like_hub_id(source, MODEL_FILE_SUFFIXES)):
            raise CheckpointError(f"no checkpoint found at {path}: no such file or folder")
        model, tokenizer, state = hf.load_hub_model(source)
    elif hf.is_hf_folder(path) and not (path / "state.json").is_file():
        model, tokenizer, state = hf.load_folder(path)
    else:
        model, tokenizer, state = read_model(resolve_checkpoint(path))
    return model.to(device).eval(), tokenizer, state
