"""Sample from a trained minilm checkpoint: python generate.py --ckpt OUT_DIR --prompt TEXT ..."""
from minilm.cli.generate import entry

if __name__ == "__main__":
    entry()
