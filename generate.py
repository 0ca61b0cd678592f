"""Sample from a trained minilm checkpoint: python generate.py --ckpt OUT_DIR --prompt TEXT ..."""
import sys

from minilm.cli import run_cli
from minilm.generate_cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
