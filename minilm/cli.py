"""Command-line edges: parse arguments, call the package, turn user mistakes into one line + exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

DEFAULT_CONFIG = "shakespeare_char"  # a shipped config (minilm.config.find_config)


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run main(argv); a user error (ValueError and its kin) prints 'error: ...' and returns 2.

    A run stopped on purpose (a signal, a diverged loss) prints its one line and returns its own
    exit code; a closed stdout (`generate.py ... | head`) ends the program quietly with 0, as Unix
    filters do."""
    from minilm.checkpoint import CheckpointError
    from minilm.config import ConfigError
    from minilm.data import DataError
    from minilm.tracking import detach_closed_stdout
    from minilm.trainer import TrainingStopped

    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except BrokenPipeError:
        detach_closed_stdout()
        return 0
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if e.show:
            print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a ValueError: run_cli prints it on one line and exits 2."""

    def error(self, message: str):
        raise ValueError(message)


def wants_help(argv: list[str]) -> bool:
    """-h or --help anywhere on the command line."""
    return any(arg in ("-h", "--help") for arg in argv)


def split_config_args(argv: list[str], default: str | Path | None
                      ) -> tuple[str | Path | None, list[str]]:
    """[CONFIG] [--section.key=value ...] -> (config file or shipped config name, overrides)."""
    from minilm.config import ConfigError

    path, overrides = default, []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            overrides.append(arg)
        elif i == 0:
            path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --section.key=value")
    return path, overrides


def config_usage(command: str, cls: type, default: str | None, extra: str = "",
                 folder: str = "") -> str:
    """--help for a config-driven command: usage, the shipped configs (those in `folder`), then
    every key with its type, default and description, from the config dataclasses."""
    from minilm.config import config_help, sections, shipped_configs

    root = shipped_configs()
    shipped = ", ".join(str(p.relative_to(root).with_suffix(""))
                        for p in sorted((root / folder).glob("*.yaml")))
    config = "CONFIG" if default is None else "[CONFIG]"
    return "\n".join([
        f"usage: {command} {config} [--section.key=value ...]",
        f"CONFIG: a YAML file, or a shipped config by name ({shipped})"
        + (f"; default {default}." if default else "."),
        f"Sections: {', '.join(sections(cls))}. Values are read as YAML 1.2 (3e-4, true, null,",
        "[a, b]), e.g. --train.max_iters=500 --model.tie_embeddings=false." + extra,
        "", "keys (type = default):", config_help(cls)])


def train_main(argv: list[str]) -> None:
    from minilm.config import Config, load_config
    from minilm.trainer import train

    if wants_help(argv):
        print(config_usage("train.py", Config, DEFAULT_CONFIG,
                           "\nCtrl-C or SIGTERM: the run finishes its step, saves out_dir/last "
                           "and exits (130, 143);\n--train.resume=true continues it."))
        return
    path, overrides = split_config_args(argv, DEFAULT_CONFIG)
    train(load_config(path, overrides, default_file=path is DEFAULT_CONFIG))


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


def eval_entry() -> None:
    """Console script `minilm-eval`."""
    from minilm.eval_cli import main

    sys.exit(run_cli(main))


def serve_entry() -> None:
    """Console script `minilm-serve`."""
    from minilm.serve.cli import main

    sys.exit(run_cli(main))
