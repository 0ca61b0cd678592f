"""The served model: the model, its tokenizer, the name clients call it by, and its engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from minilm.errors import SettingError
from minilm.model.gpt import GPT
from minilm.sampling.request import guided
from minilm.sampling.stack import SamplerStack
from minilm.sampling.stages import unconditional_prompt
from minilm.serving.engine import Engine
from minilm.serving.metrics import Metrics
from minilm.serving.protocol import MAX_TOKENS_LIMIT, APIError, bad_request
from minilm.tokenizer import Tokenizer

STACKS = 64  # settings whose SamplerStack the server keeps for reuse


@dataclass
class Served:
    model: GPT
    tokenizer: Tokenizer
    name: str
    engine: Engine
    max_tokens_limit: int = MAX_TOKENS_LIMIT  # a choice's max_tokens beyond it is a 400
    metrics: Metrics | None = None
    _stacks: list[tuple[Any, SamplerStack]] = field(default_factory=list)  # see sampler()

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

    def sampler(self, body) -> SamplerStack:
        """The request body's SamplerStack (a bad setting is a 400 naming it). Requests with equal
        settings get the same stack, and rows that share a stack draw in one call (batched
        sampling: see RunningBatch._regroup). The last STACKS settings are remembered."""
        settings = body.settings(self.tokenizer.encode)
        for i, (known, stack) in enumerate(self._stacks):
            if known == settings:
                self._stacks.append(self._stacks.pop(i))
                return stack
        stack = body.sampler(self.vocab_size, self.tokenizer)
        self._stacks = self._stacks[-(STACKS - 1):] + [(settings, stack)]
        return stack

    def negative_prompt(self, body, sampler: SamplerStack, ids: list[int]) -> list[int] | None:
        """With guidance, the unconditional context of a prompt (the body's negative_prompt, text
        or ids, else the prompt's last token); else None."""
        if not guided(sampler):
            return None
        settings = body.settings(self.tokenizer.encode)
        try:
            return unconditional_prompt(settings.negative_prompt, ids, self.tokenizer.encode,
                                        self.vocab_size)
        except SettingError as e:
            raise bad_request(str(e), e.param) from None

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's decode, skipping ids it has no text for (a vocabulary padded past the
        tokenizer's, as GPT-2's 50257 to 50304)."""
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])

    def token_text(self, token: int) -> str:
        return self.decode([token])
