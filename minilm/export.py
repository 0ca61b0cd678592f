"""python -m minilm.export: the same as minilm-export (minilm.cli.export)."""
from minilm.cli.export import entry

if __name__ == "__main__":
    entry()
