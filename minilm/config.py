"""Run configuration: typed dataclass sections, read from YAML, overridden by --section.key=value.

Every user mistake (unknown key, wrong type, bad choice) becomes one ConfigError line that names
the key and what is allowed; the CLIs print it and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minilm.loss import IMPLS
from minilm.model import GPTConfig


class ConfigError(ValueError):
    """A user mistake in a config file or an override: one line, naming the key."""


@dataclass
class ModelConfig:
    """GPTConfig's fields but vocab_size, which comes from the data."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    layer_norm_eps: float = 1e-5

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **dataclasses.asdict(self))


@dataclass
class DataConfig:
    source: str = "shakespeare"  # "shakespeare", a local file/folder, or a hub dataset name
    tokenizer: str = "char"  # "char" or a tiktoken encoding name such as "gpt2"
    text_field: str = "text"  # column holding the text in json/parquet/hub data
    name: str | None = None  # hub dataset configuration name
    split: str = "train"  # hub dataset split
    val_fraction: float = 0.1
    num_proc: int = 1  # processes for tokenization (Dataset.map)
    cache_dir: str = "data_cache"  # prepared token files live under here


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum_steps: int = 1
    max_iters: int = 2000
    lr_decay_iters: int | None = None  # cosine decay length; None = max_iters
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: Literal["auto", True, False] = "auto"  # auto: on for CUDA, off elsewhere
    seed: int = 1337
    resume: bool = False
    init_from: str = "scratch"  # scratch | a minilm checkpoint | an HF GPT-2 folder | a hub id


@dataclass
class LossConfig:
    impl: Literal[IMPLS] = "auto"  # type: ignore[valid-type]
    chunk_size: int | None = None  # tokens per chunk; None = from a memory budget
    z_loss: float = 0.0
    softcap: float | None = None


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "offline"  # WANDB_MODE overrides it
    project: str = "minilm"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_checkpoints: bool = False  # upload the final checkpoint as an artifact


@dataclass
class Config:
    out_dir: str = "out"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return value converted to the annotated type, or raise ConfigError naming key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0]) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(map(str, args))
            raise ConfigError(f"{key}: invalid choice {value!r} (allowed: {allowed})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _unknown_key(key: str, name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r} (allowed: {', '.join(allowed)}){hint}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Make dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key, str(name), names)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value or {}, key + ".")
        else:
            kwargs[name] = _check_value(key, value, hint)
    return cls(**kwargs)


def parse_override(arg: str) -> tuple[list[str], Any]:
    """'--train.max_iters=100' -> (['train', 'max_iters'], 100); the value is read as YAML."""
    m = re.fullmatch(r"--([A-Za-z_][\w.]*)=(.*)", arg, flags=re.S)
    if not m:
        raise ConfigError(f"bad argument {arg!r}: expected --section.key=value")
    raw = m.group(2)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return m.group(1).split("."), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def merge_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply --a.b=c overrides onto a nested dict (a copy)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for arg in overrides:
        keys, value = parse_override(arg)
        node = values
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {} if child is None else child
                node[k] = child
            node = child
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
        node[keys[-1]] = value
    return values


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"bias": False}, "train.seed": 1} -> {"model.bias": False, "train.seed": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = Config,
                default_file: bool = False) -> Any:
    """The resolved config: defaults <- YAML file <- command-line overrides, validated.
    default_file: the file is the CLI's default, not the user's choice (see given_keys)."""
    values = load_yaml(path) if path else {}
    given = {} if default_file else values
    values = merge_overrides(values, list(overrides))
    cfg = build(cls, values)
    validate(cfg)
    cfg._given = frozenset(flatten(merge_overrides(given, list(overrides))))  # see given_keys
    return cfg


def given_keys(cfg: Config) -> frozenset[str]:
    """Dotted keys the user set (their YAML file or overrides), as opposed to defaults: train.init_from
    takes the model's shape from its source unless the user set a key. For a Config built in code,
    the keys whose value differs from the default."""
    if hasattr(cfg, "_given"):
        return cfg._given
    defaults = flatten(type(cfg)().to_dict())
    return frozenset(k for k, v in flatten(cfg.to_dict()).items() if defaults.get(k) != v)


def validate(cfg: Config) -> None:
    """Range checks that types alone don't catch."""
    try:
        cfg.model.gpt_config(vocab_size=1)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = cfg.train
    positive = dict(batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                    max_iters=t.max_iters, eval_interval=t.eval_interval,
                    eval_iters=t.eval_iters, log_interval=t.log_interval)
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"train.{name} must be > 0, got {value}")
    if t.warmup_iters < 0:
        raise ConfigError(f"train.warmup_iters must be >= 0, got {t.warmup_iters}")
    if t.learning_rate <= 0 or t.min_lr < 0:
        raise ConfigError(f"train.learning_rate must be > 0 and train.min_lr >= 0, "
                          f"got {t.learning_rate} and {t.min_lr}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device: invalid choice {t.device!r} "
                          "(allowed: auto, cpu, cuda, cuda:N, mps)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.data.num_proc < 1:
        raise ConfigError(f"data.num_proc must be >= 1, got {cfg.data.num_proc}")
    if cfg.loss.chunk_size is not None and cfg.loss.chunk_size <= 0:
        raise ConfigError(f"loss.chunk_size must be > 0, got {cfg.loss.chunk_size}")
    if cfg.loss.z_loss < 0:
        raise ConfigError(f"loss.z_loss must be >= 0, got {cfg.loss.z_loss}")
    if not t.init_from:
        raise ConfigError("train.init_from must be 'scratch', a checkpoint, an HF folder or a hub id")
    if cfg.loss.softcap is not None and cfg.loss.softcap <= 0:
        raise ConfigError(f"loss.softcap must be > 0, got {cfg.loss.softcap}")
