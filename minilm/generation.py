"""Autoregressive generation: prefill the prompts once, then one token per step from the KV cache.

    prompt ids → model (raw logits, T = 1) → SamplerStack (processors, draw) → token → model ...

    for step in generate(model, [[1, 2, 3], [4, 5]], 50, sampler=stack, eos_id=0, seed=1337):
        step.rows, step.tokens, step.info.logprobs   # the rows still running and what each drew
    results = complete(model, prompts, 50, ...)      # the same, collected: a Completion per prompt

Whatever the caller did to the model before, generation runs it in eval mode (no dropout) and
without autograd, and leaves its mode as it found it (a generator when it finishes or is closed);
on CPU it switches the model to the weight layout that decodes fastest there
(GPT.set_decode_layout) itself.

Choices where there were several:
- `sampler=None` is greedy decoding (HF's default, do_sample=False): SamplerStack([Temperature(0)]).
- Prompts of different lengths are left-padded; a key-padding mask hides the padding and each row's
  position ids count its real tokens only, so a row computes what it would compute alone.
- `seed` is per request: an int gives *every* row a torch.Generator seeded with it, a list gives row
  i seed[i]. A row's tokens then depend only on its prompt and seed, never on the rest of the batch
  (so N samples of one prompt need N seeds, e.g. [s, s + 1, ...]). None uses torch's global RNG.
- The returned tokens include the token that ended a row: the EOS token, or the last token of a stop
  sequence (as HF's generate and its stop_strings; strip them for display if wanted).
- Past block_size the window slides as llama.cpp's context shift does: when a row's context would
  exceed block_size, it is cropped to its last block_size // 2 tokens and the cache is re-filled, so
  re-prefills are rare (one per block_size // 2 tokens). The penalties still see the whole history.
- A row that finishes leaves the batch: its KV cache, history and generator are dropped, so later
  steps cost what the remaining rows cost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from minilm.model import GPT, KVCache
from minilm.sampling import History, SampleInfo, SamplerStack, Temperature

Prompts = Sequence[Sequence[int]] | Sequence[int] | Tensor
Stop = Sequence[str | Sequence[int]]


def prepare_for_decoding(model: GPT) -> GPT:
    """The decode weight layout (GPT.set_decode_layout). Generation switches it on itself; this
    remains for callers that want the copy done ahead of the first generation."""
    return model.set_decode_layout(True)


def greedy() -> SamplerStack:
    """The sampler used when none is given: temperature 0 keeps only the top logit."""
    return SamplerStack([Temperature(0.0)])


@dataclass
class Step:
    """One decoding step: the token each running row drew.

    rows:           index (into the prompts) of each running row; the entries below follow it
    tokens:         LongTensor[n], the drawn tokens
    info:           their log-probabilities (SampleInfo: logprobs, processed_logprobs [n]; top_ids,
                    top_logprobs [n, N] when logprobs=N > 0)
    finish_reasons: per row None (still running), "stop" (EOS or stop sequence) or "length"
    """
    rows: list[int]
    tokens: Tensor
    info: SampleInfo
    finish_reasons: list[str | None]


@dataclass
class Completion:
    """What one prompt produced (complete's result); logprobs per token as in SampleInfo."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    processed_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # [] if logprobs=0
    finish_reason: str = "length"


def generate(model: GPT, prompt_ids: Prompts, max_new_tokens: int,
             sampler: SamplerStack | None = None, eos_id: int | None = None,
             stop: Stop | None = None, seed: int | Sequence[int] | None = None, logprobs: int = 0,
             decode: Callable[[list[int]], str] | None = None) -> Iterator[Step]:
    """Stream the generation of up to `max_new_tokens` tokens per prompt, one Step per token.

    prompt_ids: a list of token-id lists (lengths may differ), one list of ids, or a LongTensor [T]
    or [B, T]. A row stops at `eos_id`, at a `stop` sequence (token-id lists, or strings, which
    need `decode` (a tokenizer's decode) and match anywhere in the row's decoded new text), or after
    max_new_tokens. logprobs = N > 0 also returns the N most likely raw tokens at each step.
    The arguments are checked here, before the first step.
    """
    vocab_size = model.config.vocab_size
    prompts = prompt_lists(prompt_ids, vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if logprobs < 0:
        raise ValueError(f"logprobs must be >= 0, got {logprobs}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size - 1}]")
    stopper = _StopMatcher(stop or (), decode)
    if sampler is None:
        sampler, seed = greedy(), None  # nothing to draw: no generators needed
    device = next(model.parameters()).device
    generators = _generators(seed, len(prompts), device)
    return _steps(model, prompts, max_new_tokens, sampler, eos_id, stopper, generators, logprobs)


def complete(model: GPT, prompt_ids: Prompts, max_new_tokens: int, **kwargs) -> list[Completion]:
    """Run generate() to the end and collect each prompt's tokens, log-probs and finish reason."""
    results = [Completion() for _ in prompt_lists(prompt_ids, model.config.vocab_size)]
    # closing: the model's mode is restored at once, even when an exception ends the loop
    with contextlib.closing(generate(model, prompt_ids, max_new_tokens, **kwargs)) as steps:
        for step in steps:
            info = step.info
            tops = [[] for _ in step.rows] if info.top_ids is None else \
                [list(zip(i, lp)) for i, lp in zip(info.top_ids.tolist(),
                                                    info.top_logprobs.tolist())]
            for row, token, lp, plp, top, reason in zip(
                    step.rows, step.tokens.tolist(), info.logprobs.tolist(),
                    info.processed_logprobs.tolist(), tops, step.finish_reasons):
                r = results[row]
                r.tokens.append(token)
                r.logprobs.append(lp)
                r.processed_logprobs.append(plp)
                r.top_logprobs.append(top)
                r.finish_reason = reason or r.finish_reason
    return results


def next_token_stages(model: GPT, prompt_ids: Prompts, sampler: SamplerStack
                      ) -> list[tuple[str, Tensor]]:
    """The logits [B, V] of each prompt's next token after each stage of `sampler`, starting with
    ("raw", logits): what each setting does to the model's distribution (generate.py's
    --show_distribution)."""
    batch = _Batch(model, prompt_lists(prompt_ids, model.config.vocab_size), 1, None)
    with model.evaluating():
        logits = batch.prefill()
    with torch.inference_mode():
        return sampler.stages(logits, batch.history)


def prompt_lists(prompt_ids: Prompts, vocab_size: int) -> list[list[int]]:
    """Prompts as a list of non-empty token-id lists, each id checked against the vocabulary."""
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() not in (1, 2):
            raise ValueError(f"prompt_ids must be a tensor [T] or [B, T], got "
                             f"{tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    prompts = [list(prompt_ids)] if prompt_ids and isinstance(prompt_ids[0], int) else \
        [list(p) for p in prompt_ids]
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to start "
                             "from (e.g. the end-of-text token)")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary "
                             f"[0, {vocab_size - 1}]")
    return prompts


def _generators(seed: int | Sequence[int] | None, batch_size: int, device: torch.device
                ) -> list[torch.Generator] | None:
    """One torch.Generator per row (see the module docstring), or None for torch's global RNG."""
    if seed is None:
        return None
    seeds = [seed] * batch_size if isinstance(seed, int) else list(seed)
    if len(seeds) != batch_size:
        raise ValueError(f"got {len(seeds)} seeds for {batch_size} prompts")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


class _StopMatcher:
    """Whether a row's generated tokens end in a stop sequence (token ids) or now contain a stop
    string. A string is looked for in the decoded tail of the row only: any occurrence that does not
    involve the newest token was already there one step earlier, when the row would have stopped."""

    def __init__(self, stop: Stop, decode: Callable[[list[int]], str] | None):
        if isinstance(stop, str):
            stop = [stop]
        if any(isinstance(s, int) for s in stop):
            raise ValueError("stop must be a list of strings and/or token-id lists, e.g. [[13]]")
        self.strings = [s for s in stop if isinstance(s, str)]
        self.sequences = [list(s) for s in stop if not isinstance(s, str)]
        if any(not s for s in self.strings + self.sequences):
            raise ValueError("stop sequences must not be empty")
        if self.strings and decode is None:
            raise ValueError("stop strings need a decode function (e.g. tokenizer.decode)")
        self.decode = decode
        # a token decodes to >= 1 character; a character may take up to 4 byte-level tokens
        self.tail = 4 * max((len(s) for s in self.strings), default=0)

    def __call__(self, generated: list[int]) -> bool:
        if any(generated[-len(s):] == s for s in self.sequences):
            return True
        if self.strings:
            text = self.decode(generated[-self.tail:])
            return any(s in text for s in self.strings)
        return False


def _steps(model: GPT, prompts: list[list[int]], max_new_tokens: int, sampler: SamplerStack,
           eos_id: int | None, stopper: _StopMatcher, generators: list[torch.Generator] | None,
           logprobs: int) -> Iterator[Step]:
    """generate()'s loop: draw, report, drop the rows that finished, feed the rest. The model is
    in eval mode from the first step until the generator finishes or is closed; autograd is off
    inside each step only (the _Batch methods), never across a yield into the caller's code."""
    if max_new_tokens == 0:
        return
    if max_new_tokens > 1 and next(model.parameters()).device.type == "cpu":
        model.set_decode_layout(True)  # on CUDA it gains nothing (fp32, batch 32: 18% slower)
    batch = _Batch(model, prompts, max_new_tokens, generators)
    generated: list[list[int]] = [[] for _ in prompts]
    with model.evaluating():
        logits = batch.prefill()  # [B, V]
        while True:
            tokens, info = batch.sample(logits, sampler, logprobs)
            reasons: list[str | None] = []
            for row, token in zip(batch.rows, tokens.tolist()):
                out = generated[row]
                out.append(token)
                reasons.append("stop" if token == eos_id or stopper(out) else
                               "length" if len(out) == max_new_tokens else None)
            yield Step(list(batch.rows), tokens, info, reasons)
            running = [i for i, r in enumerate(reasons) if r is None]
            if not running:
                return
            if len(running) < len(reasons):
                batch.select(running)
                tokens = tokens[running]
            logits = batch.forward(tokens)


class _Batch:
    """The running rows of a generation: their KV cache, token history and per-row positions.

    Row b's context window is its real tokens from index ctx_start[b] on, left-padded to the
    longest row. Without padding the model's own positions and causal attention apply (the fast
    path); with it, key_padding [B, max_len] (True = real token) and next_pos [B] are kept.
    """

    def __init__(self, model: GPT, prompts: list[list[int]], max_new_tokens: int,
                 generators: list[torch.Generator] | None):
        self.model = model
        self.block_size = model.config.block_size
        self.keep = max(1, self.block_size // 2)  # tokens a row keeps when its window slides
        self.rows = list(range(len(prompts)))
        self.generators = generators
        param = next(model.parameters())
        tokens, mask = _left_pad([torch.tensor(p, device=param.device) for p in prompts])
        lens = torch.tensor([len(p) for p in prompts], device=param.device)
        self.history = History(tokens, prompt_lens=lens, attention_mask=mask)
        self.ctx_start = (lens - self.block_size).clamp(min=0)  # [B]
        # prefill + (max_new_tokens - 1) steps; the window slides only when this exceeds block_size
        first = int((lens - self.ctx_start).max())
        max_len = min(self.block_size, first + max_new_tokens - 1)
        self.cache = KVCache(model.config, len(prompts), max_len, param.device, param.dtype)
        self.key_padding: Tensor | None = None
        self.next_pos: Tensor | None = None

    @torch.inference_mode()
    def prefill(self) -> Tensor:
        """(Re)fill the cache with every row's context window; the next-token logits [B, V]."""
        h = self.history
        real = [h.tokens[b] if h.attention_mask is None else h.tokens[b][h.attention_mask[b]]
                for b in range(h.batch_size)]
        idx, mask = _left_pad([r[s:] for r, s in zip(real, self.ctx_start.tolist())])  # [B, L]
        self.cache.reset()
        if mask is None:
            self.key_padding = self.next_pos = None
            return self.model.logits(idx, self.cache)[:, -1]
        L = idx.size(1)
        self.key_padding = torch.ones(idx.size(0), self.cache.max_len, dtype=torch.bool,
                                      device=idx.device)
        self.key_padding[:, :L] = mask
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # [B, L] real tokens from 0
        self.next_pos = positions[:, -1:] + 1  # [B, 1]
        return self.model.logits(idx, self.cache, positions, self.key_padding[:, :L])[:, -1]

    @torch.inference_mode()
    def sample(self, logits: Tensor, sampler: SamplerStack, logprobs: int
               ) -> tuple[Tensor, SampleInfo]:
        tokens, info = sampler.sample(logits, self.history, generator=self.generators,
                                      top_logprobs=logprobs)
        self.history.append(tokens)
        return tokens, info

    @torch.inference_mode()
    def forward(self, tokens: Tensor) -> Tensor:
        """Feed the tokens just drawn [B]; the next-token logits [B, V]."""
        if self.cache.length == self.cache.max_len:  # full: only possible at block_size
            return self._slide()
        if self.key_padding is None:
            return self.model.logits(tokens[:, None], self.cache)[:, -1]
        S = self.cache.length + 1
        logits = self.model.logits(tokens[:, None], self.cache, self.next_pos,
                                   self.key_padding[:, :S])[:, -1]
        self.next_pos += 1
        return logits

    def _slide(self) -> Tensor:
        """Crop each row whose window would pass block_size to its last `keep` tokens, then
        re-prefill."""
        h = self.history
        n_real = h.attention_mask.sum(1) if h.attention_mask is not None else \
            torch.full_like(self.ctx_start, h.tokens.size(1))  # [B], the token just drawn included
        too_long = n_real - self.ctx_start > self.block_size
        self.ctx_start = torch.where(too_long, n_real - self.keep, self.ctx_start)
        return self.prefill()

    @torch.inference_mode()
    def select(self, keep: list[int]) -> None:
        """Keep only these rows (indices into the current batch)."""
        idx = torch.tensor(keep, device=self.ctx_start.device)
        self.cache.select(idx)
        self.history = self.history.select(idx)
        self.ctx_start = self.ctx_start[idx]
        if self.key_padding is not None:
            self.key_padding, self.next_pos = self.key_padding[idx], self.next_pos[idx]
        self.rows = [self.rows[i] for i in keep]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in keep]


def _left_pad(seqs: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Token rows of different lengths → ids [B, L] left-padded with 0, and the mask [B, L] of
    real tokens (None when no row needed padding)."""
    L = max(len(s) for s in seqs)
    idx = seqs[0].new_zeros(len(seqs), L)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool, device=idx.device)
    for b, s in enumerate(seqs):
        idx[b, L - len(s):] = s
        mask[b, L - len(s):] = True
    return idx, None if bool(mask.all()) else mask
