"""Train a minilm GPT: python train.py [CONFIG.yaml] [--section.key=value ...]"""
from minilm.cli.train import entry

if __name__ == "__main__":
    entry()
