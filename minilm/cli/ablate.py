"""python -m minilm.ablate CONFIG [--section.key=value ...]: every arm x seed of an ablation
config trained, evaluated and reported (minilm.experiments.ablation)."""

from __future__ import annotations

import sys

from minilm.cli.common import config_usage, run_cli, split_config_args, wants_help
from minilm.errors import ConfigError
from minilm.experiments.ablation import AblationConfig, ablate
from minilm.train.config import load_config


def main(argv: list[str]) -> None:
    if wants_help(argv):
        print(config_usage("python -m minilm.ablate", AblationConfig, None,
                           "\nCONFIG is a training config plus an `ablation` section.",
                           folder="ablation"))
        return
    path, overrides = split_config_args(argv, default=None)
    if path is None:
        raise ConfigError("missing CONFIG.yaml (python -m minilm.ablate --help)")
    ablate(load_config(path, overrides, cls=AblationConfig))


def entry() -> None:
    """python -m minilm.ablate."""
    sys.exit(run_cli(main))
