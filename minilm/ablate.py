"""python -m minilm.ablate: the same as the ablation runner (minilm.cli.ablate)."""
from minilm.cli.ablate import entry

if __name__ == "__main__":
    entry()
