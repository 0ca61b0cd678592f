"""train.init_from: start training from a pretrained model, as nanoGPT's init_from.

The source (a minilm checkpoint or out_dir, a Hugging Face GPT-2 folder, a hub id) decides the
model's shape and output function (model.*, model.logit_softcap included) and its tokenizer. Those
enter the run's config, so config.yaml and every checkpoint describe the model truthfully. A
model.* key or data.tokenizer that the user set and that contradicts the source is a one-line
ConfigError naming both values; model.dropout is free (it only acts in training), and
model.block_size may be set smaller (the position table is cropped, as nanoGPT's
crop_block_size). The optimizer starts fresh.

When the run resumes (train.resume), the source is the out_dir's own last checkpoint: its config
gives the shape, and the trainer's resume loads its weights and optimizer state as for any run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minilm.checkpoint import resume_settings
from minilm.errors import CheckpointError, ConfigError
from minilm.interop.loading import load_model
from minilm.model.gpt import GPT
from minilm.train.config import Config, ModelConfig, given_keys
from minilm.train.data import PreparedData

# What the source decides: every model key but dropout (the soft-cap included), and the tokenizer.
SHAPE_KEYS = tuple(f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.name != "dropout")


@dataclass
class Source:
    label: str  # for messages: "train.init_from 'gpt2'"
    tokenizer: dict[str, Any]  # the source's Tokenizer.to_dict()
    model: GPT | None  # None when resuming: out_dir/last supplies the weights


def tokenizer_name(description: dict[str, Any]) -> str:
    """data.tokenizer's value for a Tokenizer.to_dict() description."""
    return "char" if description.get("type") == "char" else str(description.get("name"))


def resolve_init_from(cfg: Config, resume_state: dict[str, Any] | None) -> Source | None:
    """Load train.init_from's source and write its model keys and tokenizer into cfg (the user's
    contradicting keys are errors). None for train.init_from: scratch. When the run
    resumes, resume_state (out_dir/last's state.json, read by the trainer) is the source."""
    if cfg.train.init_from == "scratch":
        return None
    if cfg.train.resume:
        ckpt = Path(cfg.out_dir) / "last"
        try:
            fixed = resume_settings(resume_state["config"])
            source = Source(f"the checkpoint {ckpt}", resume_state["tokenizer"], None)
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"corrupt checkpoint {ckpt}: state.json has no run "
                                  "config") from None
        values = {key: fixed[key] for key in SHAPE_KEYS if key in fixed}
    else:
        model, tokenizer, _ = load_model(cfg.train.init_from, "cpu")
        values = {key: getattr(model.config, key.split(".")[1]) for key in SHAPE_KEYS}
        source = Source(f"train.init_from {cfg.train.init_from!r}", tokenizer.to_dict(), model)
    values["data.tokenizer"] = tokenizer_name(source.tokenizer)
    _adopt(cfg, values, source.label)
    return source


def _adopt(cfg: Config, values: dict[str, Any], label: str) -> None:
    """cfg.<section>.<key> = value for each dotted key, unless the user set it: then it must agree
    (a smaller model.block_size is allowed: the positions are cropped)."""
    given = given_keys(cfg)
    for key, value in values.items():
        section, name = key.split(".")
        mine = getattr(getattr(cfg, section), name)
        if key not in given:
            setattr(getattr(cfg, section), name, value)
        elif key == "model.block_size" and mine > value:
            raise ConfigError(f"{key} is {mine!r} but {label} has {value!r} (it has no position "
                              f"embeddings beyond: leave {key} out or set it to at most {value!r})")
        elif mine != value and key != "model.block_size":
            raise ConfigError(f"{key} is {mine!r} but {label} has {value!r} (the source decides "
                              f"it: leave {key} out or set it to {value!r})")


def initial_model(cfg: Config, data: PreparedData, source: Source | None) -> GPT:
    """The model training starts from: new weights (scratch, or a resume, whose weights the trainer
    loads next) or the source's, once the data's tokenizer is checked to be the source's."""
    model = GPT(cfg.model.gpt_config(data.vocab_size))
    if source is None or source.model is None:
        return model
    ours, theirs = data.meta["tokenizer"], source.tokenizer
    if ours != theirs:  # same name (checked by _adopt), so two char vocabularies
        a, b = ours.get("chars", ""), theirs.get("chars", "")
        odd = sorted(set(a) ^ set(b))
        raise ConfigError(f"data.source {cfg.data.source!r} has a char vocabulary of {len(a)} "
                          f"characters but {source.label} has {len(b)}"
                          + (f" ({odd[0]!r} is in only one)" if odd else "")
                          + ": the same ids would mean different characters")
    weights = source.model.state_dict()
    wpe = "transformer.wpe.weight"
    weights[wpe] = weights[wpe][:cfg.model.block_size]  # crop to a smaller block_size
    model.load_state_dict(weights)
    return model
