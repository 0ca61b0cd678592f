"""The shared scorer: the log-probability of every token given the tokens before it.

    seq = [eot] + tokenizer.encode(document)      # the first token is context only, never scored
    for chunk in scored_logits(model, [seq, ...]):  # raw logits (T = 1) of every scored position
        chunk.seq, chunk.positions, chunk.targets, chunk.logits   # [n], [n], [n], [n, V]
        stats = token_stats(chunk.logits, chunk.targets)          # log-prob, rank, entropy, ...
    score_tokens(model, [seq], top_n=5)           # per token: log-prob, rank, top alternatives
    score(model, tokenizer, context, [choice, ...])  # log p(choice | context) per choice

One scorer serves every consumer (minilm.evaluation.corpus's perplexity and calibration, the
server's `echo` with `logprobs`, scoring completions), so a token's log-probability is the same
number wherever it is reported.

Sequences longer than block_size are scored in sliding windows (lm-evaluation-harness's rolling
log-likelihood): the first window predicts tokens 1 .. block_size, each later one advances by
`stride` tokens, predicts only its new tokens and uses the block_size - stride before them as
context. So every token but the first is predicted exactly once, with at least
block_size - stride tokens of context once the first window is passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from minilm.model.gpt import GPT
from minilm.sampling.generation import prompt_states
from minilm.tokenizer import Tokenizer

# Logits rows per chunk handed to consumers: [rows, V] fp32 stays near 64 MiB whatever V is.
LOGITS_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Window:
    """Input positions [start, end) of one sequence; the last n_scored of them predict new tokens
    (position p predicts the token at p + 1)."""
    seq: int
    start: int
    end: int
    n_scored: int


def default_stride(block_size: int) -> int:
    """The stride when none is given: half a window, so every token past the first window is
    predicted with at least block_size / 2 tokens of context."""
    return max(1, block_size // 2)


def rolling_windows(n_tokens: int, block_size: int, stride: int, seq: int = 0) -> list[Window]:
    """The windows that predict tokens 1 .. n_tokens - 1 of a sequence, each exactly once."""
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size = {block_size}], got {stride}")
    last = n_tokens - 1  # the last input position that predicts something
    windows, done = [], 0  # done: inputs [0, done) have predicted their next token
    while done < last:
        end = min(block_size if done == 0 else done + stride, last)
        windows.append(Window(seq, max(0, end - block_size), end, end - done))
        done = end
    return windows


R = TypeVar("R", bound="Rows")


class Rows:
    """A dataclass of tensors that hold one row per scored token (their first dimension)."""

    def select(self: R, rows: Tensor) -> R:
        """The rows where the bool mask `rows` is true; self itself when that is all of them, so
        a consumer that splits chunks copies nothing in the common case."""
        if rows.all():
            return self
        tensors = (getattr(self, f.name) for f in fields(self))
        return type(self)(*(t[rows.to(t.device)] for t in tensors))


@dataclass
class ScoredChunk(Rows):
    """Rows of scored positions: sequence index, position of the predicted token in it, the token,
    the raw logits [n, V] (fp32, T = 1) that predicted it, and the final hidden states [n, d] they
    came from (model.logits_from_hidden(hidden) == logits): [n, d] is what a consumer can afford to
    keep when it must look at the logits again (the temperature fit), never [n, V]."""
    seq: Tensor
    positions: Tensor
    targets: Tensor
    logits: Tensor
    hidden: Tensor


def scored_logits(model: GPT, sequences: Sequence[Sequence[int]], stride: int | None = None,
                  batch_size: int = 8, max_rows: int | None = None) -> Iterator[ScoredChunk]:
    """Raw logits of every scored position of every sequence (see the module docstring), in chunks
    of at most max_rows rows (default: LOGITS_BYTES of fp32 logits), in sequence order.

    Windows of up to batch_size at a time go through one forward pass, right-padded (causal
    attention: padding after a position never changes it); only the scored positions go through
    the head, so memory is bounded by the hidden states, not by positions x V."""
    block_size = model.config.block_size
    stride = default_stride(block_size) if stride is None else stride
    windows = [w for i, s in enumerate(sequences) for w in rolling_windows(len(s), block_size,
                                                                           stride, i)]
    V = model.config.vocab_size
    max_rows = max_rows or max(1, LOGITS_BYTES // (4 * V))
    device = next(model.parameters()).device
    with model.inference():
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            width = max(w.end - w.start for w in batch)
            idx = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded
            rows, seq, pos, tgt = [], [], [], []  # the scored rows of the flattened [B * T]
            for i, w in enumerate(batch):
                tokens = torch.as_tensor(sequences[w.seq][w.start:w.end + 1], dtype=torch.long)
                idx[i, :w.end - w.start] = tokens[:-1]
                first = w.end - w.n_scored  # first input position that scores
                rows.append(torch.arange(first - w.start, w.end - w.start) + i * width)
                pos.append(torch.arange(first + 1, w.end + 1))
                tgt.append(tokens[first - w.start + 1:])
                seq.append(torch.full((w.n_scored,), w.seq))
            h = model.hidden_states(idx.to(device))  # [B, T, d]
            h = h.reshape(-1, h.size(-1))[torch.cat(rows).to(device)]  # [R, d]
            seq_t, pos_t, tgt_t = torch.cat(seq), torch.cat(pos), torch.cat(tgt).to(device)
            for r in range(0, h.size(0), max_rows):
                sl = slice(r, r + max_rows)
                yield ScoredChunk(seq_t[sl], pos_t[sl], tgt_t[sl],
                                  model.logits_from_hidden(h[sl]).float(), h[sl])


@dataclass
class TokenStats(Rows):
    """What a logits chunk [n, V] says about its n targets; every figure of minilm-eval (NLL,
    accuracy, entropy, calibration, the per-token outputs) is made of these."""
    logprobs: Tensor  # [n] log p(target)
    ranks: Tensor  # [n] 1 + how many tokens are strictly more likely than the target
    greedy: Tensor  # [n] bool: the argmax is the target (ECE's "correct")
    confidence: Tensor  # [n] the largest probability (ECE's "confidence")
    entropy: Tensor  # [n] nats
    top_logprobs: Tensor  # [n, top_n] the top_n largest log-probs, descending
    top_ids: Tensor  # [n, top_n] their token ids


def token_stats(logits: Tensor, targets: Tensor, top_n: int = 0) -> TokenStats:
    """Per-row statistics of logits [n, V] (already divided by a temperature, if any) against
    targets [n]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    target_lp = logp.gather(1, targets[:, None])  # [n, 1]
    best_lp, best = logp.max(dim=1)
    top = logp.topk(min(top_n, logp.size(1)), dim=1)
    return TokenStats(logprobs=target_lp[:, 0], ranks=(logp > target_lp).sum(dim=1) + 1,
                      greedy=best == targets, confidence=best_lp.exp(),
                      entropy=torch.special.entr(logp.exp()).sum(dim=1),
                      top_logprobs=top.values, top_ids=top.indices)


@dataclass
class TokenScores:
    """What the model thought of each token of a sequence but the first (tokens[1:]).

    logprobs: log p(token | the tokens before it) at T = 1; ranks: 1 + how many tokens the model
    found strictly more likely; top: the top_n most likely tokens and their log-probs;
    greedy: the token is the argmax; entropy: of the predicted distribution, in nats."""
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)


def score_tokens(model: GPT, sequences: Sequence[Sequence[int]], top_n: int = 0,
                 stride: int | None = None, batch_size: int = 8) -> list[TokenScores]:
    """Per sequence, the log-probability, rank, top_n alternatives, greedy flag and entropy of
    every token but the first, from scored_logits."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    out = [TokenScores(tokens=list(s[1:])) for s in sequences]
    for chunk in scored_logits(model, sequences, stride, batch_size):
        _record(out, chunk.seq.tolist(), token_stats(chunk.logits, chunk.targets, top_n), top_n)
    return out


def score_hidden(model: GPT, hidden: Tensor, tokens: Sequence[int], top_n: int = 0
                 ) -> TokenScores:
    """score_tokens for one sequence whose final hidden states [len(tokens), d] are at hand (a
    prefill's, or the prefix cache's: the server's prompt_logprobs): only the head runs, in chunks
    of LOGITS_BYTES."""
    out = TokenScores(tokens=list(tokens[1:]))
    targets = torch.tensor(out.tokens, dtype=torch.long, device=hidden.device)
    hidden = hidden[:len(targets)]  # the last position predicts what follows the sequence
    rows = max(1, LOGITS_BYTES // (4 * model.config.vocab_size))
    with model.inference():
        for r in range(0, len(targets), rows):
            logits = model.logits_from_hidden(hidden[r:r + rows]).float()
            stats = token_stats(logits, targets[r:r + rows], top_n)
            _record([out], [0] * len(logits), stats, top_n)
    return out


def _record(out: list[TokenScores], seq: list[int], stats: TokenStats, top_n: int) -> None:
    """Append each row's statistics to its sequence's TokenScores."""
    tops = [list(zip(i, v)) for i, v in zip(stats.top_ids.tolist(), stats.top_logprobs.tolist())]
    for s, lp, rank, top, greedy, ent in zip(seq, stats.logprobs.tolist(), stats.ranks.tolist(),
                                             tops, stats.greedy.tolist(), stats.entropy.tolist()):
        out[s].logprobs.append(lp)
        out[s].ranks.append(rank)
        if top_n:
            out[s].top.append(top)
        out[s].greedy.append(greedy)
        out[s].entropy.append(ent)


# ---------------------------------------------------------------- scoring completions


@dataclass
class ChoiceScore:
    """One continuation of a context: its tokens and their log-probabilities given the context,
    their sum, whether greedy decoding would produce it, the sum per character of the
    continuation (lm-evaluation-harness's acc_norm), and the softmax of the sums over the
    choices."""
    continuation: str
    tokens: list[int]
    logprobs: list[float]
    logprob: float
    is_greedy: bool
    logprob_per_char: float
    prob: float


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness makes them: trailing whitespace of
    the context moves to the continuation, the two are encoded together and split at the
    context's own length (so a merge across the boundary stays as the tokenizer makes it); an
    empty context is the end-of-text token."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [tokenizer.eot_token], tokenizer.encode(continuation)
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def score(model: GPT, tokenizer: Tokenizer, context: str, continuations: Sequence[str],
          batch_size: int = 8) -> list[ChoiceScore]:
    """How likely each continuation is after the context (a multiple-choice classifier from a
    language model). The sequence is cut from the left to block_size + 1 tokens when the
    continuation fits, so it is predicted with as much context as the model can see; then the
    choices share the context's computation (generation.prompt_states)."""
    if not continuations:
        raise ValueError("no continuations to score: give at least one choice")
    block_size = model.config.block_size
    pairs, sequences = [], []
    for c in continuations:
        ctx, cont = encode_pair(tokenizer, context, c)
        if not cont:
            raise ValueError(f"choice {c!r} is empty: it encodes to no tokens")
        seq = ctx + cont
        sequences.append(seq[-(block_size + 1):] if len(cont) <= block_size else seq)
        pairs.append(cont)
    if max(map(len, sequences)) <= block_size + 1:  # one window each: the context is shared
        states = prompt_states(model, [s[:-1] for s in sequences], batch_size)
        scored = [score_hidden(model, h, s) for h, s in zip(states, sequences)]
    else:
        scored = score_tokens(model, sequences, batch_size=batch_size)
    sums = torch.tensor([math.fsum(s.logprobs[-len(cont):]) for s, cont in zip(scored, pairs)],
                        dtype=torch.float64)
    probs = torch.softmax(sums, dim=0).tolist()
    return [ChoiceScore(continuation=c, tokens=cont, logprobs=s.logprobs[-len(cont):],
                        logprob=total, is_greedy=all(s.greedy[-len(cont):]),
                        logprob_per_char=total / len(c) if c else total, prob=p)
            for c, cont, s, total, p in zip(continuations, pairs, scored, sums.tolist(), probs)]
