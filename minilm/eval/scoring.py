"""Scoring text with a model: the log-probability of every token given the tokens before it, and
what is made of it (perplexity, bits per byte, calibration, scoring completions).

    seq = [eot] + tokenizer.encode(document)      # the first token is context only, never scored
    for chunk in scored_logits(model, [seq, ...]):  # raw logits (T = 1) of every scored position
        chunk.seq, chunk.positions, chunk.targets, chunk.logits   # [n], [n], [n], [n, V]
    score_tokens(model, [seq], top_n=5)           # per token: log-prob, rank, top alternatives
    evaluate(model, [Document(...)], eot)         # ppl, bits per byte, ECE, T* (minilm-eval)
    score(model, tokenizer, context, [choice, ...])  # log p(choice | context) per choice

One scorer serves every consumer (perplexity and calibration here, the server's `echo` with
`logprobs`), so a token's log-probability is the same number wherever it is reported.

Sequences longer than block_size are scored in sliding windows (lm-evaluation-harness's rolling
log-likelihood): the first window predicts tokens 1 .. block_size, each later one advances by
`stride` tokens, predicts only its new tokens and uses the block_size - stride before them as
context. So every token but the first is predicted exactly once, with at least
block_size - stride tokens of context once the first window is passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from minilm.eval.calibration import Tally, TemperatureFit, nll_and_derivatives
from minilm.eval.calibration import fit_temperature as fit_temperature_on
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


@dataclass
class ScoredChunk:
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
class TokenStats:
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


# ---------------------------------------------------------------- corpus evaluation


@dataclass
class Document:
    """One text scored on its own, preceded by the end-of-text token: its tokens (without that
    token) and its text, whose UTF-8 bytes and whitespace-separated words the per-byte and
    per-word figures divide by."""
    name: str
    text: str
    tokens: list[int]


# called with (document index [n], position [n], target [n], stats) for every scored chunk
TokenSink = Callable[[Tensor, Tensor, Tensor, TokenStats], None]
TOP_N = 5  # alternatives per token in the per-token outputs; also top-k accuracy's k


def corpus_figures(nll_sum: float, tokens: int, n_bytes: int, n_words: int) -> dict[str, Any]:
    """Perplexity per token, per byte and per word from one summed NLL (nats): the byte and word
    figures do not depend on the tokenizer, so they compare a char model with a BPE model."""
    nll = nll_sum / tokens
    return dict(tokens=tokens, bytes=n_bytes, words=n_words, nll=nll, ppl=_exp(nll),
                bits_per_byte=nll_sum / n_bytes / math.log(2) if n_bytes else math.nan,
                byte_perplexity=_exp(nll_sum / n_bytes) if n_bytes else math.nan,
                word_perplexity=_exp(nll_sum / n_words) if n_words else math.nan)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def evaluate(model: GPT, documents: Sequence[Document], eot: int, stride: int | None = None,
             batch_size: int = 8, fit_temperature: bool = False, sweep: Sequence[float] = (),
             on_tokens: TokenSink | None = None) -> dict[str, Any]:
    """Perplexity, bits per byte and calibration of `model` on `documents`, from one pass of
    scored_logits (the rolling log-likelihood of each document after the end-of-text token).

    fit_temperature: fit T* on the first half of the documents (Guo et al. 2017) and report NLL
    and ECE at T = 1 and at T* on the second half. The scoring pass measures the fit's first
    step (T = 1) and keeps the first half's hidden states [tokens, d]; each later Newton step
    re-applies the head to them. The second half is scored after the fit, at both temperatures,
    in the same pass that scores it at T = 1.
    sweep: temperatures at which NLL, ECE, entropy and top-1 probability are also measured.
    on_tokens: receives every chunk's per-token statistics (T = 1), in document order."""
    if sum(len(d.tokens) for d in documents) == 0:
        raise ValueError("nothing to score: the text is empty")
    n_fit = len(documents) // 2
    if fit_temperature and (n_fit == 0 or not any(d.tokens for d in documents[:n_fit])):
        raise ValueError(f"fitting a temperature needs at least 2 non-empty documents (one half "
                         f"to fit on, the other to report on), got {len(documents)}")
    parts = [(0, n_fit), (n_fit, len(documents))] if fit_temperature else [(0, len(documents))]
    total = Tally()
    sweeps = {t: Tally() for t in sweep}
    kept: list[tuple[Tensor, Tensor]] = []  # the fit half's (hidden [n, d], targets [n])
    at_1 = (0.0, 0.0, 0.0, 0)  # the fit half's nll_and_derivatives at T = 1, summed by chunk
    fit, held, held_t = None, Tally(), Tally()
    for part, (lo, hi) in enumerate(parts):
        fitting, reporting = fit_temperature and part == 0, fit_temperature and part == 1
        if reporting:
            fit = _fit_on_hidden(model, kept, at_1)
            kept.clear()
        sequences = [[eot] + d.tokens for d in documents[lo:hi]]
        for chunk in scored_logits(model, sequences, stride, batch_size):
            stats = token_stats(chunk.logits, chunk.targets, TOP_N if on_tokens else 0)
            total.add(stats)
            for t, tally in sweeps.items():
                tally.add(stats if t == 1 else token_stats(chunk.logits / t, chunk.targets))
            if fitting:
                kept.append((chunk.hidden, chunk.targets))
                at_1 = tuple(a + b for a, b in zip(at_1, nll_and_derivatives(
                    [(chunk.logits, chunk.targets)], 0.0)))
            if reporting:
                held.add(stats)
                held_t.add(token_stats(chunk.logits / fit.temperature, chunk.targets))
            if on_tokens is not None:
                on_tokens(chunk.seq + lo, chunk.positions, chunk.targets, stats)

    n_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
    n_words = sum(len(d.text.split()) for d in documents)
    results = dict(documents=len(documents), **corpus_figures(total.nll_sum, total.tokens,
                                                              n_bytes, n_words),
                   **total.figures(), reliability=total.bins.table())
    if fit is not None:
        results["temperature"] = dict(
            T=fit.temperature, passes=fit.passes, at_bound=fit.at_bound,
            fit=dict(documents=n_fit, tokens=fit.tokens, nll_at_1=fit.nll_at_1, nll_at_T=fit.nll),
            heldout=dict(documents=len(documents) - n_fit, tokens=held.tokens,
                         nll_at_1=held.nll, nll_at_T=held_t.nll, ece_at_1=held.bins.ece,
                         ece_at_T=held_t.bins.ece, mce_at_1=held.bins.mce,
                         mce_at_T=held_t.bins.mce, reliability_at_1=held.bins.table(),
                         reliability_at_T=held_t.bins.table()))
    if sweeps:
        results["sweep"] = [dict(temperature=t, nll=s.nll, ppl=_exp(s.nll), ece=s.bins.ece,
                                 mce=s.bins.mce, entropy=s.entropy, top1_prob=s.top1_prob)
                            for t, s in sweeps.items()]
    return results


def _fit_on_hidden(model: GPT, kept: list[tuple[Tensor, Tensor]],
                   at_1: tuple[float, float, float, int]) -> TemperatureFit:
    """T* from the kept hidden states, starting from at_1 (the scoring pass's T = 1 step): each
    later pass of the fit re-applies the head chunk by chunk."""
    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        with model.inference():
            for hidden, targets in kept:
                yield model.logits_from_hidden(hidden).float(), targets

    return fit_temperature_on(chunks, at_1=at_1)
