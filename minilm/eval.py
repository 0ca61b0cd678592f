"""Scoring text with a model: the log-probability of every token given the tokens before it.

    seq = [eot] + tokenizer.encode(document)      # the first token is context only, never scored
    for chunk in scored_logits(model, [seq, ...]):  # raw logits (T = 1) of every scored position
        chunk.seq, chunk.positions, chunk.targets, chunk.logits   # [n], [n], [n], [n, V]
    score_tokens(model, [seq], top_n=5)           # per token: log-prob, rank, top alternatives

One scorer serves every consumer (perplexity and calibration here, the server's `echo` with
`logprobs`), so a token's log-probability is the same number wherever it is reported.

Sequences longer than block_size are scored in sliding windows (lm-evaluation-harness's rolling
log-likelihood): the first window predicts tokens 1 .. block_size, each later one advances by
`stride` tokens, predicts only its new tokens and uses the block_size - stride before them as
context. So every token but the first is predicted exactly once, with at least
block_size - stride tokens of context once the first window is passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from minilm.model import GPT

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


@dataclass
class ScoredChunk:
    """Rows of scored positions: sequence index, position of the predicted token in it, the token,
    and the raw logits [n, V] (fp32, T = 1) that predicted it."""
    seq: Tensor
    positions: Tensor
    targets: Tensor
    logits: Tensor


def scored_logits(model: GPT, sequences: Sequence[Sequence[int]], stride: int | None = None,
                  batch_size: int = 8, max_rows: int | None = None) -> Iterator[ScoredChunk]:
    """Raw logits of every scored position of every sequence (see the module docstring), in chunks
    of at most max_rows rows (default: LOGITS_BYTES of fp32 logits), in sequence order.

    Windows of up to batch_size at a time go through one forward pass, right-padded (causal
    attention: padding after a position never changes it); only the scored positions go through
    the head, so memory is bounded by the hidden states, not by positions x V."""
    block_size = model.config.block_size
    stride = stride or max(1, block_size // 2)
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
                                  model.logits_from_hidden(h[sl]).float())


@dataclass
class TokenScores:
    """What the model thought of each token of a sequence but the first (tokens[1:]).

    logprobs: log p(token | the tokens before it) at T = 1; ranks: 1 + how many tokens the model
    found strictly more likely; top: the top_n most likely tokens and their log-probs."""
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


def score_tokens(model: GPT, sequences: Sequence[Sequence[int]], top_n: int = 0,
                 stride: int | None = None, batch_size: int = 8) -> list[TokenScores]:
    """Per sequence, the log-probability, rank and top_n alternatives of every token but the
    first, from scored_logits."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    out = [TokenScores(tokens=list(s[1:])) for s in sequences]
    for chunk in scored_logits(model, sequences, stride, batch_size):
        logp = torch.log_softmax(chunk.logits, dim=-1)  # [n, V]
        target_lp = logp.gather(1, chunk.targets[:, None])  # [n, 1]
        ranks = (logp > target_lp).sum(dim=1) + 1
        top = logp.topk(min(top_n, logp.size(1)), dim=1) if top_n else None
        tops = ([list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
                if top is not None else None)
        for j, (s, lp, rank) in enumerate(zip(chunk.seq.tolist(), target_lp[:, 0].tolist(),
                                              ranks.tolist())):
            out[s].logprobs.append(lp)
            out[s].ranks.append(rank)
            if tops is not None:
                out[s].top.append(tops[j])
    return out
