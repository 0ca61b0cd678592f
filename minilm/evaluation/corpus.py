"""Corpus evaluation (minilm-eval's figures): one pass of the shared scorer over the documents,
every scored chunk handed to sinks that each own one job.

    results = evaluate(model, documents, eot, fit_temperature=True, sweep=[0.5, 1, 2])

    Figures             NLL, perplexity per token / byte / word, accuracy, entropy, ECE, MCE
    TemperatureScaling  T* fitted on the first half of the documents; NLL and ECE at T = 1 and
                        T* on the other half
    Sweep               NLL, ECE, entropy and top-1 probability at other temperatures
    TokenRecords, TokenHtml  the per-token files (minilm.evaluation.tokens; sinks=[...])

Every document is scored on its own, after the end-of-text token (the rolling log-likelihood of
minilm.evaluation.scoring). A sink sees the chunks in document order, each with its statistics at
T = 1 (computed once for all sinks), then adds its figures to the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from torch import Tensor

from minilm.evaluation.calibration import (
    Tally,
    TemperatureFit,
    fit_temperature,
    nll_and_derivatives,
)
from minilm.evaluation.scoring import ScoredChunk, TokenStats, scored_logits, token_stats
from minilm.model.gpt import GPT


@dataclass
class Document:
    """One text scored on its own, preceded by the end-of-text token: its tokens (without that
    token) and its text, whose UTF-8 bytes and whitespace-separated words the per-byte and
    per-word figures divide by."""
    name: str
    text: str
    tokens: list[int]


class Sink:
    """One job of the pass: add() sees every scored chunk (its rows: document index, position,
    target, raw logits, hidden states) in document order, with their statistics at T = 1;
    finish() then adds the job's figures to the results, after the sinks before it (whose
    figures it may read)."""
    top_n = 0  # the top alternatives per token that add() reads from the statistics

    def add(self, chunk: ScoredChunk, stats: TokenStats) -> None:
        raise NotImplementedError

    def finish(self, results: dict[str, Any]) -> None:
        """Adds nothing, unless the sink says otherwise."""


def evaluate(model: GPT, documents: Sequence[Document], eot: int, stride: int | None = None,
             batch_size: int = 8, fit_temperature: bool = False, sweep: Sequence[float] = (),
             sinks: Sequence[Sink] = ()) -> dict[str, Any]:
    """Perplexity, bits per byte and calibration of `model` on `documents` (Figures), with a
    temperature fit (TemperatureScaling) and a temperature sweep (Sweep) when asked for, from
    one pass of scored_logits; `sinks` (e.g. the per-token files) are fed by the same pass,
    after those."""
    if sum(len(d.tokens) for d in documents) == 0:
        raise ValueError("nothing to score: the text is empty")
    jobs: list[Sink] = [Figures(documents)]
    if fit_temperature:
        jobs.append(TemperatureScaling(model, documents))
    if sweep:
        jobs.append(Sweep(sweep))
    return score_documents(model, documents, eot, [*jobs, *sinks], stride, batch_size)


def score_documents(model: GPT, documents: Sequence[Document], eot: int, sinks: Sequence[Sink],
                    stride: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """The pass: every document after the end-of-text token through the scorer, each chunk's
    statistics computed once (with the most top alternatives a sink reads) and handed to every
    sink; then the results, as the sinks finish in order."""
    top_n = max((sink.top_n for sink in sinks), default=0)
    sequences = [[eot] + d.tokens for d in documents]
    for chunk in scored_logits(model, sequences, stride, batch_size):
        stats = token_stats(chunk.logits, chunk.targets, top_n)
        for sink in sinks:
            sink.add(chunk, stats)
    results: dict[str, Any] = {}
    for sink in sinks:
        sink.finish(results)
    return results


# ---------------------------------------------------------------- the sinks


class Figures(Sink):
    """The corpus figures at T = 1: NLL and perplexity per token, byte and word, top-1 / top-5
    accuracy, entropy, top-1 probability, ECE, MCE and the reliability bins."""

    def __init__(self, documents: Sequence[Document]):
        self.documents = documents
        self.tally = Tally()

    def add(self, chunk: ScoredChunk, stats: TokenStats) -> None:
        self.tally.add(stats)

    def finish(self, results: dict[str, Any]) -> None:
        n_bytes = sum(len(d.text.encode("utf-8")) for d in self.documents)
        n_words = sum(len(d.text.split()) for d in self.documents)
        results.update(documents=len(self.documents),
                       **corpus_figures(self.tally.nll_sum, self.tally.tokens, n_bytes, n_words),
                       **self.tally.figures(), reliability=self.tally.bins.table())


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


class TemperatureScaling(Sink):
    """T* fitted on the first half of the documents (Guo et al. 2017); NLL, ECE and MCE at T = 1
    and at T* on the other half.

    From the fit half it keeps the hidden states [tokens, d] (never the [tokens, V] logits) and
    sums the fit's first step (T = 1) from the pass's own logits; each later Newton step turns
    the kept states into logits again through the head. Chunks come in document order, so every
    fit row has arrived when the first held-out row does: the fit runs then, and the held-out
    rows are scored at T = 1 and T* as they arrive, in the same pass."""

    def __init__(self, model: GPT, documents: Sequence[Document]):
        self.model, self.n_fit = model, len(documents) // 2
        self.n_held = len(documents) - self.n_fit
        if not any(d.tokens for d in documents[:self.n_fit]):
            raise ValueError(f"fitting a temperature needs at least 2 non-empty documents (one "
                             f"half to fit on, the other to report on), got {len(documents)}")
        self.kept: list[tuple[Tensor, Tensor]] = []  # the fit half's (hidden [n, d], targets [n])
        self.at_1 = (0.0, 0.0, 0.0, 0)  # the fit half's nll_and_derivatives at T = 1
        self.fit: TemperatureFit | None = None
        self.held, self.held_t = Tally(), Tally()  # the held-out half at T = 1 and at T*

    def add(self, chunk: ScoredChunk, stats: TokenStats) -> None:
        in_fit = chunk.seq < self.n_fit
        if in_fit.any():
            self._keep(chunk.select(in_fit))
        if not in_fit.all():
            self._report(chunk.select(~in_fit), stats.select(~in_fit))

    def _keep(self, chunk: ScoredChunk) -> None:
        self.kept.append((chunk.hidden, chunk.targets))
        step = nll_and_derivatives([(chunk.logits, chunk.targets)], 0.0)
        self.at_1 = tuple(a + b for a, b in zip(self.at_1, step))

    def _report(self, chunk: ScoredChunk, stats: TokenStats) -> None:
        fit = self._fitted()
        self.held.add(stats)
        self.held_t.add(token_stats(chunk.logits / fit.temperature, chunk.targets))

    def _fitted(self) -> TemperatureFit:
        """T* from the kept hidden states, fitted once; the states are dropped after."""
        if self.fit is None:
            self.fit = fit_temperature(self._kept_logits, at_1=self.at_1)
            self.kept.clear()
        return self.fit

    def _kept_logits(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass of the fit: the kept hidden states through the head, chunk by chunk."""
        with self.model.inference():
            for hidden, targets in self.kept:
                yield self.model.logits_from_hidden(hidden).float(), targets

    def finish(self, results: dict[str, Any]) -> None:
        fit = self._fitted()  # not yet fitted when the held-out half has no tokens
        held, held_t = self.held, self.held_t
        results["temperature"] = dict(
            T=fit.temperature, passes=fit.passes, at_bound=fit.at_bound,
            fit=dict(documents=self.n_fit, tokens=fit.tokens, nll_at_1=fit.nll_at_1,
                     nll_at_T=fit.nll),
            heldout=dict(documents=self.n_held, tokens=held.tokens, nll_at_1=held.nll,
                         nll_at_T=held_t.nll, ece_at_1=held.bins.ece, ece_at_T=held_t.bins.ece,
                         mce_at_1=held.bins.mce, mce_at_T=held_t.bins.mce,
                         reliability_at_1=held.bins.table(),
                         reliability_at_T=held_t.bins.table()))


class Sweep(Sink):
    """NLL, perplexity, ECE, MCE, entropy and top-1 probability of all the documents at each
    temperature: what dividing the logits by T does to the model's distribution."""

    def __init__(self, temperatures: Sequence[float]):
        self.tallies = {t: Tally() for t in temperatures}

    def add(self, chunk: ScoredChunk, stats: TokenStats) -> None:
        for t, tally in self.tallies.items():
            tally.add(stats if t == 1 else token_stats(chunk.logits / t, chunk.targets))

    def finish(self, results: dict[str, Any]) -> None:
        results["sweep"] = [dict(temperature=t, nll=s.nll, ppl=_exp(s.nll), ece=s.bins.ece,
                                 mce=s.bins.mce, entropy=s.entropy, top1_prob=s.top1_prob)
                            for t, s in self.tallies.items()]
