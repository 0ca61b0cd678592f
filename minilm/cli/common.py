"""What every command line shares: parse arguments, call the library, turn a user's mistake into
one line and exit code 2 (run_cli), a config-driven command's --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from minilm.console import detach_closed_stdout
from minilm.errors import ConfigError, TrainingStopped


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run main(argv); a user error (a MinilmError, or any ValueError) prints 'error: ...' and
    returns 2.

    A run stopped on purpose (a signal, a diverged loss) prints its one line and returns its own
    exit code; a closed stdout (`generate.py ... | head`) ends the program quietly with 0, as Unix
    filters do."""
    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except BrokenPipeError:
        detach_closed_stdout()
        return 0
    except ValueError as e:  # MinilmError and the library's own checks (GPTConfig, argparse)
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
    from minilm.train.config import config_help, sections, shipped_configs

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
