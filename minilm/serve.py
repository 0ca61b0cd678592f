"""python -m minilm.serve: the same as minilm-serve (minilm.cli.serve)."""
from minilm.cli.serve import entry

if __name__ == "__main__":
    entry()
