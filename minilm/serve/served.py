"""The served model: the model, its tokenizer, the name clients call it by, and its engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from minilm.model.gpt import GPT
from minilm.serve.engine import Engine
from minilm.serve.metrics import Metrics
from minilm.serve.protocol import MAX_TOKENS_LIMIT, APIError, bad_request
from minilm.tokenizer import Tokenizer


@dataclass
class Served:
    model: GPT
    tokenizer: Tokenizer
    name: str
    engine: Engine
    max_tokens_limit: int = MAX_TOKENS_LIMIT  # a choice's max_tokens beyond it is a 400
    metrics: Metrics | None = None

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def check_model(self, name: str | None) -> None:
        """An absent model name means the served one; another name is a 404."""
        if name is not None and name != self.name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves "
                                f"`{self.name}`).", "model", "model_not_found")

    def read_prompts(self, prompt: str | Sequence) -> tuple[list[list[int]], list[str]]:
        """The API's prompt forms (a string, strings, token ids, token-id lists) as token-id
        lists, and each prompt as text; a bad one is a 400 naming `prompt`."""
        if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        ids, texts = [], []
        for i, p in enumerate(prompt):
            which = f"prompt {i}" if len(prompt) > 1 else "prompt"
            if isinstance(p, str):
                try:
                    p_ids = self.tokenizer.encode(p)
                except ValueError as e:
                    raise bad_request(f"{which}: {e}", "prompt") from None
                text = p
            else:
                p_ids = list(p)
                bad = [t for t in p_ids if not 0 <= t < min(self.vocab_size,
                                                              self.tokenizer.vocab_size)]
                if bad:
                    raise bad_request(f"{which} has token id {bad[0]}, outside the vocabulary "
                                      f"[0, {min(self.vocab_size, self.tokenizer.vocab_size) - 1}]",
                                      "prompt")
                text = self.decode(p_ids)
            if not p_ids:
                raise bad_request(f"{which} is empty: there must be at least one token to start "
                                  "from", "prompt")
            ids.append(p_ids)
            texts.append(text)
        return ids, texts

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's decode, skipping ids it has no text for (a vocabulary padded past the
        tokenizer's, as GPT-2's 50257 to 50304)."""
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])

    def token_text(self, token: int) -> str:
        return self.decode([token])
