"""python -m minilm.serve: the same as minilm-serve."""
import sys

from minilm.cli import run_cli
from minilm.serve.cli import main

sys.exit(run_cli(main))
