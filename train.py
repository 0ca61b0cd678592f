"""Train a minilm GPT: python train.py [CONFIG.yaml] [--section.key=value ...]"""
import sys

from minilm.cli import run_cli, train_main

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
