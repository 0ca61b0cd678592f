"""A model saved as a minilm checkpoint with no run behind it (what the tests sample, serve,
export and fine-tune from)."""
from pathlib import Path

from minilm.checkpoint import save_checkpoint
from minilm.model.gpt import GPT


def save_model(path: Path, model: GPT, tokenizer: dict, step: int = 0) -> None:
    """tokenizer: a Tokenizer.to_dict() description."""
    save_checkpoint(path, model, None, dict(config={}, tokenizer=tokenizer, step=step,
                                            best_val_loss=None))
