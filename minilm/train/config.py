"""Run configuration: typed dataclass sections, read from YAML, overridden by --section.key=value.

Every user mistake (unknown key, wrong type, bad choice) becomes one ConfigError line that names
the key and what is allowed; the CLIs print it and exit with code 2.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minilm.device import check_device_name
from minilm.errors import ConfigError, first_line
from minilm.files import check_folder
from minilm.model.gpt import GPTConfig
from minilm.model.loss import IMPLS
from minilm.tokenizer import read_text


def setting(default: Any, help: str) -> Any:
    """A config key: its default and the one-line description that --help and the README show."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# GPTConfig's fields (and descriptions) but vocab_size, which comes from the data.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [(f.name, f.type, field(default=f.default, metadata=f.metadata))
     for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"],
    namespace={"__module__": __name__,
               "gpt_config": lambda self, vocab_size: GPTConfig(vocab_size=vocab_size,
                                                                **dataclasses.asdict(self))})


@dataclass
class DataConfig:
    source: str = setting("shakespeare",
                          "`shakespeare`, a local file/folder, or a hub dataset name")
    tokenizer: str = setting("char", "`char` or a tiktoken encoding (`gpt2`, `r50k_base`, ...)")
    text_field: str = setting("text", "column with the text (json, parquet, hub)")
    name: str | None = setting(None, "hub dataset configuration")
    split: str = setting("train", "hub dataset split")
    val_fraction: float = setting(0.1, "share of documents (or of the text, if one document) for "
                                    "val; 0: no val split")
    num_proc: int = setting(1, "tokenizer processes")
    cache_dir: str = setting("data_cache", "where prepared token files are cached (~ expanded)")

    def __post_init__(self) -> None:
        self.cache_dir = os.path.expanduser(self.cache_dir)


@dataclass
class TrainConfig:
    batch_size: int = setting(32, "sequences per micro-batch (per process)")
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step")
    max_iters: int = setting(2000, "optimizer steps")
    lr_decay_iters: int | None = setting(None, "cosine length (null: max_iters)")
    learning_rate: float = setting(1e-3, "peak learning rate")
    min_lr: float = setting(1e-4, "final learning rate (<= learning_rate)")
    warmup_iters: int = setting(100, "linear warmup steps (>= max_iters: the whole run is "
                                     "warmup)")
    weight_decay: float = setting(0.1, "AdamW decay, on 2-D weights only")
    beta1: float = setting(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = setting(0.99, "AdamW beta2, in [0, 1)")
    grad_clip: float = setting(1.0, "max global grad norm (0: off)")
    eval_interval: int = setting(250, "steps between evals (and checkpoints)")
    eval_iters: int = setting(20, "batches of each split per eval")
    log_interval: int = setting(10, "steps between log lines")
    device: str = setting("auto",
                          "`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N`, `mps`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "`auto`: bf16 autocast where supported, else fp32")
    compile: Literal["auto", True, False] = setting(
        "auto", "`torch.compile` the model; `auto`: on CUDA (where it pays), off elsewhere")
    parallel: Literal["auto", "ddp", "fsdp"] = setting(
        "auto", "under torchrun: `ddp` (a whole model per rank; `auto`'s choice) or `fsdp` "
                "(FSDP2: weights, gradients and AdamW state sharded over the ranks)")
    fsdp_reshard_after_forward: bool = setting(
        True, "fsdp: free each block's gathered weights after its forward (ZeRO-3); false keeps "
              "them for backward (ZeRO-2: less traffic, more memory)")
    seed: int = setting(1337, "model init and batch order")
    resume: bool = setting(False, "continue from out_dir/last")
    overwrite: bool = setting(False, "start afresh in an out_dir that holds a run, deleting its "
                                  "metrics and checkpoints")
    init_from: str = setting("scratch", "`scratch`, a minilm checkpoint, a Hugging Face GPT-2 "
                                        "folder or a hub id (`gpt2`)")


@dataclass
class LossConfig:
    impl: Literal[IMPLS] = setting(  # type: ignore[valid-type]
        "auto", "`auto` (triton on CUDA, chunked elsewhere), or one implementation")
    chunk_size: int | None = setting(None, "tokens per chunk (null: from a memory budget)")
    z_loss: float = setting(0.0, "PaLM's z-loss coefficient (z · lse²)")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = setting(
        "offline", "wandb mode (the WANDB_MODE variable overrides it)")
    project: str = setting("minilm", "wandb project")
    entity: str | None = setting(None, "wandb entity (user or team)")
    group: str | None = setting(None, "wandb group")
    name: str | None = setting(None, "wandb run name")
    tags: list[str] = setting([], "wandb tags")
    log_checkpoints: bool = setting(False, "upload the final checkpoint as an artifact")


@dataclass
class Config:
    out_dir: str = setting("out", "where metrics and checkpoints go (~ expanded)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        self.out_dir = os.path.expanduser(self.out_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- YAML 1.2


class _Int(int):
    """An int read from YAML, with the text it was written as."""
    def __new__(cls, value: int, text: str):
        self = super().__new__(cls, value)
        self.text = text
        return self


class _Float(float):
    """A float read from YAML, with the text it was written as."""
    def __new__(cls, value: float, text: str):
        self = super().__new__(cls, value)
        self.text = text
        return self


class DuplicateKeyError(ConfigError):
    """A key written twice in one YAML mapping, at `line` (1-based) of the text."""

    def __init__(self, key: Any, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.line = line


UNIQUE_KEYS = "YAML allows each key once in a mapping"


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with the YAML 1.2 core schema for plain scalars, as other YAML 1.2
    parsers and Python read them: `1e-3`, `6e-4` and `.5` are numbers (YAML 1.1, PyYAML's default,
    reads `1e-3` as a string), `010` is ten, and `yes`, `on` or `2024-01-01` stay strings.
    Numbers keep the text they were written as, so a str key (`data.source: 1e3`) gets `1e3`.
    A key written twice in a mapping is an error, as YAML 1.2 says (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Refuse a duplicate key (DuplicateKeyError); the keys a merge (`<<: *base`) brings in
        may still be overridden, as YAML's merge key allows."""
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _TAG + "merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                continue  # SafeLoader refuses an unhashable key itself
            if key in seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


_TAG = "tag:yaml.org,2002:"
YAMLLoader.yaml_implicit_resolvers = {  # drop YAML 1.1's bool/int/float/null/timestamp rules
    first: [(tag, rx) for tag, rx in rules if tag in (_TAG + "merge", _TAG + "yaml")]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _kind, _regex, _first in (
        ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
        ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
        ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
        ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                  r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)", list("-+0123456789."))):
    YAMLLoader.add_implicit_resolver(_TAG + _kind, re.compile(f"^(?:{_regex})$"), _first)


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> _Int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return _Int(int(text[2:] if base != 10 else text, base), text)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> _Float:
    text = loader.construct_scalar(node)
    special = text.lstrip("+-").lower()
    value = {".inf": math.inf, ".nan": math.nan}.get(special)
    if value is None:
        return _Float(float(text), text)
    return _Float(-value if text.startswith("-") else value, text)


YAMLLoader.add_constructor(_TAG + "int", _construct_int)
YAMLLoader.add_constructor(_TAG + "float", _construct_float)


def read_yaml(text: str) -> Any:
    """Parse YAML text with the YAML 1.2 core schema (the one loader for files and overrides)."""
    return yaml.load(text, Loader=YAMLLoader)


def _plain(value: Any) -> Any:
    """A value read from YAML with plain ints and floats (for keys of no fixed type)."""
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- typed sections


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return value converted to the annotated type, or raise ConfigError naming key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0]) if len(inner) == 1 else _plain(value)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(map(str, args))
            raise ConfigError(f"{key}: invalid choice {value!r} (allowed: {allowed})")
        return _plain(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 5e3 is 5000
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_plain(value)!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {float(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return getattr(value, "text", str(value))  # as written: data.source 1e3 stays "1e3"
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_plain(value)!r}")
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args \
            else _plain(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_plain(value)!r}")
        return _plain(value)
    return _plain(value)


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
        value = read_yaml(raw) if raw != "" else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"{arg}: {e} ({UNIQUE_KEYS})") from None
    except yaml.YAMLError:
        value = raw
    return m.group(1).split("."), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = read_yaml(read_text(path)) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"config file {path}: {e} at line {e.line} ({UNIQUE_KEYS})") from None
    except ValueError as e:  # not UTF-8
        raise ConfigError(f"config file {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def shipped_configs() -> Path:
    """The configs that come with minilm: minilm/configs in an installed wheel (package data built
    from the repository's configs/), the repository's configs/ in a checkout or editable install."""
    package = Path(__file__).resolve().parents[1]  # minilm/
    if (package / "configs").is_dir():
        return package / "configs"
    if (package.parent / "pyproject.toml").is_file() and (package.parent / "configs").is_dir():
        return package.parent / "configs"
    raise ConfigError("this minilm installation has no configs (expected minilm/configs); "
                      "reinstall it")


def find_config(name: str | Path) -> Path:
    """A config file: a path that exists, else a shipped config by name (`shakespeare_char`,
    `ablation/tied_vs_untied`, with or without `.yaml`)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    shipped = shipped_configs()
    for candidate in (shipped / name, shipped / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    names = ", ".join(str(p.relative_to(shipped).with_suffix("")) for p in
                      sorted(shipped.rglob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (shipped configs: {names})")


# Old names that files and flags may still use: each is read as the key it names (one value, kept
# under the key; --help and the README list the alias beside the keys).
ALIASES = {"loss.softcap": "model.logit_softcap"}

_ABSENT = object()


def _alias_conflict(where: str, alias: str, value: Any, key: str, other: Any) -> ConfigError:
    return ConfigError(f"{where}: {alias} is {_plain(value)!r} but {key} is {_plain(other)!r} "
                       f"({alias} is the old name of {key}): give one of them")


def _pop(values: dict[str, Any], dotted: str) -> Any:
    """Remove and return values[a][b] for dotted 'a.b' (_ABSENT when it is not there)."""
    *sections, name = dotted.split(".")
    node = values
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    return node.pop(name, _ABSENT) if isinstance(node, dict) else _ABSENT


def rename_aliases(values: dict[str, Any], where: str) -> dict[str, Any]:
    """A file's values with each alias moved to its key. Both given with different values is an
    error naming `where` (null for the alias counts as not given: the default)."""
    for alias, key in ALIASES.items():
        value = _pop(values, alias)
        if value is _ABSENT or value is None:
            continue
        section, name = key.split(".")
        node = values.setdefault(section, {})
        if node is None:
            node = values[section] = {}
        if isinstance(node, dict):
            other = node.setdefault(name, value)
            if other != value:
                raise _alias_conflict(where, alias, value, key, other)
    return values


def merge_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply --a.b=c overrides onto a nested dict (a copy). An alias sets the key it names; an
    alias and its key both given with different values is an error."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    given: dict[str, tuple[str, Any]] = {}  # key -> (the name it was given as, value)
    for arg in overrides:
        keys, value = parse_override(arg)
        dotted = ".".join(keys)
        key = ALIASES.get(dotted, dotted)
        name, earlier = given.get(key, (dotted, value))
        if name != dotted and earlier != value:  # one is the alias, the other its key
            alias = (dotted, value) if dotted in ALIASES else (name, earlier)
            other = (name, earlier) if dotted in ALIASES else (dotted, value)
            raise _alias_conflict("the command line", *alias, *other)
        given[key] = (dotted, value)
        keys = key.split(".")
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
    values = rename_aliases(load_yaml(find_config(path)), f"config file {path}") if path else {}
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
    """Range checks that types alone don't catch: one line naming the key, before any work."""
    try:
        cfg.model.gpt_config(vocab_size=1)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_folder("out_dir", cfg.out_dir)
    check_folder("data.cache_dir", cfg.data.cache_dir)
    if not cfg.data.source.strip():
        raise ConfigError("data.source is empty: give `shakespeare`, a file or folder, or a hub "
                          "dataset name")
    t = cfg.train
    positive = dict(batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                    max_iters=t.max_iters, eval_interval=t.eval_interval,
                    eval_iters=t.eval_iters, log_interval=t.log_interval,
                    learning_rate=t.learning_rate)
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"train.{name} must be > 0, got {value}")
    for name in ("warmup_iters", "min_lr", "weight_decay", "grad_clip"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.min_lr > t.learning_rate:
        raise ConfigError(f"train.min_lr ({t.min_lr}) must be <= train.learning_rate "
                          f"({t.learning_rate})")
    if t.lr_decay_iters is not None and t.lr_decay_iters <= 0:
        raise ConfigError(f"train.lr_decay_iters must be > 0, or null for max_iters, got "
                          f"{t.lr_decay_iters}")
    # warmup_iters >= max_iters is fine: the run warms up all the way (the trainer says so)
    if t.lr_decay_iters is not None and t.lr_decay_iters <= t.warmup_iters < t.max_iters:
        raise ConfigError(f"train.warmup_iters ({t.warmup_iters}) must be < train.lr_decay_iters "
                          f"({t.lr_decay_iters}): after the warmup the learning rate would drop "
                          "to train.min_lr with no decay between")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    try:
        check_device_name(t.device)
    except ValueError as e:
        raise ConfigError(f"train.device: {e}") from None
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
    if not t.fsdp_reshard_after_forward and t.parallel != "fsdp":
        raise ConfigError(f"train.fsdp_reshard_after_forward=false applies to "
                          f"train.parallel=fsdp, not {t.parallel}")
    if t.resume and t.overwrite:
        raise ConfigError("train.resume and train.overwrite exclude each other: continue the run "
                          "in out_dir, or replace it")


# ---------------------------------------------------------------- help, from the dataclasses


class KeyInfo(typing.NamedTuple):
    key: str  # dotted: train.learning_rate
    type: str  # int, float | null, auto | float32 | ...
    default: str  # as YAML: 0.001, null, true
    help: str


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(map(_yaml_value, args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args \
            else origin.__name__
    return getattr(hint, "__name__", str(hint))


def _yaml_value(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value) if value != "" else '""'


def config_keys(cls: type = Config, prefix: str = "") -> list[KeyInfo]:
    """Every key of a config class in declaration order, with its type, default and description
    (from the fields' metadata): the one source of --help and the README's config reference."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        keys.append(KeyInfo(prefix + f.name, _type_name(hints[f.name]), _yaml_value(default),
                            f.metadata.get("help", "")))
    return keys


def sections(cls: type = Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def documented_keys(cls: type = Config) -> list[KeyInfo]:
    """config_keys, and each alias (its key's type and default) after the keys of its section."""
    keys = config_keys(cls)
    for alias, key in ALIASES.items():
        info = next((k for k in keys if k.key == key), None)
        if info is not None:
            section = alias.split(".")[0] + "."
            at = max(i for i, k in enumerate(keys) if k.key.startswith(section)) + 1
            keys.insert(at, info._replace(key=alias, help=f"the old name of {key} (an alias: "
                                                           "give one of the two)"))
    return keys


def config_help(cls: type = Config) -> str:
    """--help's list of keys: `key  type = default  description`, one line each."""
    keys = documented_keys(cls)
    width = max(len(k.key) for k in keys) + 2
    typed = [f"{k.type} = {k.default}" for k in keys]
    twidth = max(len(t) for t in typed if len(t) <= 24)  # longer ones just push their line out
    return "\n".join(f"  {k.key:<{width}}{t:<{twidth}}  {k.help.replace('`', '')}"
                     for k, t in zip(keys, typed))


def config_reference(cls: type = Config) -> str:
    """The README's config reference table (tests check that the README holds this text)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in documented_keys(cls):
        kind = k.type.replace("|", "\\|")  # a bare | would end the table cell
        rows.append(f"| `{k.key}` | {kind} | `{k.default}` | {k.help} |")
    return "\n".join(rows)
