"""Tiny Hugging Face GPT-2 models with random weights, saved as transformers saves them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, biases and LayerNorms included (fresh inits leave those at 0 and 1,
    which would hide a bias or a LayerNorm mapped wrongly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if ("ln" in name and name.endswith("weight")) else 0.0
            p.copy_(mean + 0.1 * torch.randn(p.shape, generator=g))
    return model


def hf_gpt2(folder: Path, seed: int = 0, **config):
    """GPT2LMHeadModel(GPT2Config(**config)) with random weights, saved to folder; returns it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = randomize_(GPT2LMHeadModel(GPT2Config(**config)), seed).eval()
    model.save_pretrained(folder)
    return model


def as_openai_gpt2_layout(folder: Path, config: dict) -> None:
    """Rewrite a saved GPT2LMHeadModel folder the way openai-community/gpt2 and distilgpt2 are
    stored: an old config.json (n_ctx, labels, task params; most fields left to their defaults),
    a pytorch_model.bin of the bare GPT2Model (no `transformer.` prefix, no lm_head) carrying the
    causal-mask buffers h.N.attn.bias / h.N.attn.masked_bias."""
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    n = config["n_positions"]
    bare = {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}
    for i in range(config["n_layer"]):
        bare[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        bare[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(bare, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    old = {"_num_labels": 1, "activation_function": "gelu_new",
           "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
           "embd_pdrop": 0.1, "eos_token_id": 50256, "id2label": {"0": "LABEL_0"},
           "initializer_range": 0.02, "label2id": {"LABEL_0": 0}, "layer_norm_epsilon": 1e-05,
           "model_type": "gpt2", "n_ctx": n, "resid_pdrop": 0.1, "summary_activation": None,
           "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
           "summary_type": "cls_index", "summary_use_proj": True,
           "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
           "vocab_size": 50257, **config}
    (folder / "config.json").write_text(json.dumps(old))


def gpt2_bpe():
    """tiktoken's gpt2 encoding (the offline cache), or skip."""
    from minilm.tokenizer import TiktokenTokenizer

    try:
        return TiktokenTokenizer("gpt2")
    except ValueError:
        pytest.skip("gpt2 BPE not available offline (set TIKTOKEN_CACHE_DIR)")
