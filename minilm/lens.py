"""python -m minilm.lens: the same as minilm-lens (minilm.cli.lens)."""
from minilm.cli.lens import entry

if __name__ == "__main__":
    entry()
