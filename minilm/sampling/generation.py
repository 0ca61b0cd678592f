"""Autoregressive generation: prefill the prompts once, then one token per step from the KV cache.

    prompt ids → model (raw logits, T = 1) → SamplerStack (processors, draw) → token → model ...

    for step in generate(model, [[1, 2, 3], [4, 5]], 50, sampler=stack, eos_id=0, seed=1337):
        step.rows, step.tokens, step.info.logprobs   # the rows still running and what each drew
    results = complete(model, prompts, 50, ...)      # the same, collected: a Completion per prompt

generate() is one Request (request.py: the arguments, seeds, stop sequences) alone in a
RunningBatch (batch.py: the KV cache's slots, prefill, the window past block_size) of its size;
the server runs many Requests in one batch.

Whatever the caller did to the model before, generation runs it in eval mode (no dropout) and
without autograd, and leaves its mode as it found it: each prefill and step switches the mode for
its own forward, never across a yield into the caller's code. On CPU it switches the model to the
weight layout that decodes fastest there (GPT.set_decode_layout) itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from minilm.model.gpt import GPT, KVCache
from minilm.sampling.batch import RunningBatch
from minilm.sampling.prefix_cache import BLOCK_TOKENS, PrefixCache
from minilm.sampling.request import (
    Completion,
    Prompts,
    Request,
    Step,
    Stop,
    prompt_history,
    prompt_lists,
    unconditional_rows,
)
from minilm.sampling.stack import SamplerStack


def generate(model: GPT, prompt_ids: Prompts, max_new_tokens: int,
             sampler: SamplerStack | None = None, eos_id: int | None = None,
             stop: Stop | None = None, seed: int | Sequence[int] | None = None, logprobs: int = 0,
             decode: Callable[[list[int]], str] | None = None, logprobs_mode: str = "raw",
             negative_prompt: Prompts | None = None) -> Iterator[Step]:
    """Stream the generation of up to `max_new_tokens` tokens per prompt, one Step per token.

    prompt_ids: a list of token-id lists (lengths may differ), one list of ids, or a LongTensor [T]
    or [B, T]. A row stops at `eos_id`, at a `stop` sequence (token-id lists, or strings, which
    need `decode` (a tokenizer's decode) and match anywhere in the row's decoded new text), or after
    max_new_tokens. logprobs = N > 0 also returns the N most likely tokens at each step, of the raw
    distribution or of the processed one (logprobs_mode="processed"). With classifier-free
    guidance in the sampler, `negative_prompt` is the unconditional context (see Request).
    The arguments are checked here, before the first step.
    """
    request = Request(model, prompt_ids, max_new_tokens, sampler=sampler, eos_id=eos_id,
                      stop=stop, seed=seed, logprobs=logprobs, decode=decode,
                      logprobs_mode=logprobs_mode, negative_prompt=negative_prompt)
    return _run_alone(model, request)


def _run_alone(model: GPT, request: Request) -> Iterator[Step]:
    """generate()'s loop: the request alone in a batch sized for it."""
    if request.max_new_tokens == 0:
        return
    longest = max(map(len, request._windows(model.config.block_size)))
    batch = RunningBatch(model, request.n_rows,
                         min(model.config.block_size, longest + request.max_new_tokens - 1),
                         decode_layout=request.max_new_tokens > 1)  # not worth a copy for 1 token
    yield batch.admit(request)
    while batch.slots:
        for _, step in batch.step():
            if isinstance(step, Exception):
                raise step
            yield step


def complete(model: GPT, prompt_ids: Prompts, max_new_tokens: int, **kwargs) -> list[Completion]:
    """Run generate() to the end and collect each prompt's tokens, log-probs and finish reason."""
    request = Request(model, prompt_ids, max_new_tokens, **kwargs)
    results = [Completion() for _ in request.prompts]
    for step in _run_alone(model, request):
        for t in step.row_tokens():
            r = results[t.row]
            r.tokens.append(t.token)
            r.logprobs.append(t.logprob)
            r.processed_logprobs.append(t.processed_logprob)
            r.top_logprobs.append(t.top)
            r.finish_reason = t.finish_reason or r.finish_reason
    return results


def prompt_states(model: GPT, prompt_ids: Prompts, batch_size: int = 8) -> list[Tensor]:
    """The final hidden states [len, d] of every position of each prompt (each at most
    block_size tokens), computed the way generation prefills: prompts sharing a prefix compute it
    once (within a batch of `batch_size` rows by copying it from the row that computes it, across
    batches through a prefix cache the size of the longest prompt). What eval's `score` runs on:
    the choices of one context share it."""
    prompts = prompt_lists(prompt_ids, model.config.vocab_size)
    longest = max(map(len, prompts))
    if longest > model.config.block_size:
        raise ValueError(f"a prompt of {longest} tokens is longer than the model's context of "
                         f"{model.config.block_size}")
    param = next(model.parameters())
    cache = PrefixCache(model.config, max(longest, BLOCK_TOKENS), device=param.device,
                        dtype=param.dtype)
    batch = RunningBatch(model, min(batch_size, len(prompts)), longest, decode_layout=False,
                         prefix_cache=cache)
    states = []
    for start in range(0, len(prompts), batch.max_rows):
        request = Request(model, prompts[start:start + batch.max_rows], 0,
                          keep_prompt_states=True)
        batch.admit(request)
        states += request.prompt_states
    return states


def next_token_stages(model: GPT, prompt_ids: Prompts, sampler: SamplerStack,
                      negative_prompt: Prompts | None = None) -> list[tuple[str, Tensor]]:
    """The logits [B, V] of each prompt's next token after each stage of `sampler`, starting with
    ("raw", logits): what each setting does to the model's distribution (generate.py's
    --show_distribution). With guidance the unconditional context is `negative_prompt` (see
    Request)."""
    prompts = prompt_lists(prompt_ids, model.config.vocab_size)
    negative = unconditional_rows(sampler, negative_prompt, prompts, model.config.vocab_size)
    with model.inference():
        logits = _prefill(model, [p[-model.config.block_size:] for p in prompts])
        unconditional = None if negative is None else \
            _prefill(model, [p[-model.config.block_size:] for p in negative])
        return sampler.stages(logits, prompt_history(prompts, logits.device),
                              unconditional_logits=unconditional)


@dataclass
class NextTokenTable:
    """One prompt's next-token distribution after each stage of a sampler stack: what generate.py
    --show_distribution prints and the server's /v1/distribution returns.

    stages:  "raw" (the model, T = 1), then each processor's name, in the order they apply
    n_kept:  how many tokens each stage leaves (of vocab_size)
    entropy: of each stage's distribution, in nats
    tokens:  the tokens shown (see next_token_table), and per token:
    logits:  its raw logit
    probs:   probs[i][s], its probability after stage s (probs[i][0]: at T = 1)
    kept:    kept[i][s], whether it is still in the running after stage s
    """
    stages: list[str]
    n_kept: list[int]
    entropy: list[float]
    vocab_size: int
    tokens: list[int]
    logits: list[float]
    probs: list[list[float]]
    kept: list[list[bool]]


def next_token_table(model: GPT, prompt_ids: Sequence[int], sampler: SamplerStack,
                     top_n: int = 20, include: Sequence[int] = (),
                     negative_prompt: Sequence[int] | None = None) -> NextTokenTable:
    """The table of one prompt's next token through the stages of `sampler`. Shown: the top_n
    tokens of the last stage, most likely first (tokens it removed after the kept ones, by raw
    logit), then any token of `include` (e.g. the logit-biased ones) not among them."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    stages = next_token_stages(model, [list(prompt_ids)], sampler, negative_prompt)
    z = torch.stack([logits[0] for _, logits in stages]).double()  # [S, V]
    kept = z > -math.inf
    logp = torch.log_softmax(z, dim=-1).nan_to_num(nan=-math.inf)  # a stage keeping none: all -inf
    probs = logp.exp()
    entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(probs)).sum(dim=-1)
    order = torch.argsort(z[0], descending=True, stable=True)  # raw logit, then the last stage
    order = order[torch.argsort(probs[-1][order], descending=True, stable=True)]
    shown = order[:top_n].tolist()
    shown += [int(t) for t in dict.fromkeys(include) if int(t) not in shown]
    idx = torch.tensor(shown, dtype=torch.long)
    return NextTokenTable(
        stages=[name for name, _ in stages], n_kept=kept.sum(dim=-1).tolist(),
        entropy=entropy.tolist(), vocab_size=z.size(-1), tokens=shown,
        logits=z[0, idx].tolist(), probs=probs[:, idx].t().tolist(), kept=kept[:, idx].t().tolist())


def _prefill(model: GPT, windows: list[list[int]], cache: KVCache | None = None) -> Tensor:
    """Run the windows (right-padded into one batch: causal attention never lets a position see
    the padding after it) and return each one's next-token logits [B, V]. With a cache (of B rows),
    row b's keys and values land in its columns [0, len(windows[b]))."""
    device = next(model.parameters()).device
    lens = torch.tensor([len(w) for w in windows], device=device)
    idx = torch.zeros(len(windows), int(lens.max()), dtype=torch.long, device=device)  # [B, L]
    for b, w in enumerate(windows):
        idx[b, :len(w)] = torch.tensor(w, device=device)
    h = model.hidden_states(idx, cache)  # [B, L, d]
    h = h[torch.arange(len(windows), device=device), lens - 1]  # [B, d]: each row's last token
    return model.logits_from_hidden(h)
