"""Several training runs in one torchrun launch, for tests/test_fsdp.py: torch, its imports and
the process group start once per rank for all of them (a run leaves a process group it did not
start as it found it). The argument is a JSON list of runs, each a list of train.py's arguments,
each run as train.py's main (run_cli). Exits with the first run's code that is not 0."""

import json
import sys

import torch.distributed as dist

from minilm.cli.common import run_cli
from minilm.cli.train import train_main

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for argv in json.loads(sys.argv[1]):
        code = run_cli(train_main, argv)
        if code:
            sys.exit(code)
    dist.destroy_process_group()
