"""python -m minilm.eval: the same as minilm-eval (minilm.cli.eval)."""
from minilm.cli.eval import entry

if __name__ == "__main__":
    entry()
