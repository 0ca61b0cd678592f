"""train.py / minilm-train: train (or resume) a run from a config file and --section.key=value."""

from __future__ import annotations

import sys

from minilm.cli.common import config_usage, run_cli, split_config_args, wants_help
from minilm.train.config import Config, load_config
from minilm.train.trainer import train

DEFAULT_CONFIG = "shakespeare_char"  # a shipped config (minilm.train.config.find_config)


def train_main(argv: list[str]) -> None:
    if wants_help(argv):
        print(config_usage("train.py", Config, DEFAULT_CONFIG,
                           "\nCtrl-C or SIGTERM: the run finishes its step, saves out_dir/last "
                           "and exits (130, 143);\n--train.resume=true continues it."))
        return
    path, overrides = split_config_args(argv, DEFAULT_CONFIG)
    train(load_config(path, overrides, default_file=path is DEFAULT_CONFIG))


def entry() -> None:
    """Console script `minilm-train`."""
    sys.exit(run_cli(train_main))
