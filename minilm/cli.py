"""Command-line edges: parse arguments, call the package, turn user mistakes into one line + exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.yaml"


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run main(argv); a user error (ValueError and its kin) prints 'error: ...' and returns 2."""
    from minilm.checkpoint import CheckpointError
    from minilm.config import ConfigError
    from minilm.data import DataError

    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def split_config_args(argv: list[str], default: Path | None) -> tuple[Path | None, list[str]]:
    """[CONFIG.yaml] [--section.key=value ...] -> (config path, overrides)."""
    from minilm.config import ConfigError

    path, overrides = default, []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            overrides.append(arg)
        elif i == 0:
            path = Path(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --section.key=value")
    return path, overrides


TRAIN_USAGE = """usage: train.py [CONFIG.yaml] [--section.key=value ...]
With no config: configs/shakespeare_char.yaml. Sections: out_dir, model, data, train, loss
(README.md lists every key), e.g. --train.max_iters=500 --model.tie_embeddings=false"""


def train_main(argv: list[str]) -> None:
    from minilm.config import load_config
    from minilm.trainer import train

    if argv[:1] in (["-h"], ["--help"]):
        print(TRAIN_USAGE)
        return
    default = DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    path, overrides = split_config_args(argv, default)
    train(load_config(path, overrides, default_file=path is default))


def train_entry() -> None:
    """Console script `minilm-train`."""
    sys.exit(run_cli(train_main))


def generate_entry() -> None:
    """Console script `minilm-generate`."""
    from minilm.generate_cli import main

    sys.exit(run_cli(main))


def export_entry() -> None:
    """Console script `minilm-export`."""
    from minilm.export import main

    sys.exit(run_cli(main))


def serve_entry() -> None:
    """Console script `minilm-serve`."""
    from minilm.serve.cli import main

    sys.exit(run_cli(main))
