"""Turning logits into tokens: a pluggable stack of logits processors, then an exact draw.

A processor is any callable ``(logits, history) -> logits`` on FloatTensor[B, V]; a removed token gets
-inf. The model always hands over raw logits (T = 1); every transformation lives in a processor, and a
``SamplerStack`` applies them in order, then draws. Semantics follow HF transformers'
``generation/logits_process.py`` (the anchors named below), the OpenAI API (presence/frequency
penalties, logit bias, logprobs) and llama.cpp (its sampler order).

    h = History(tokens=ids, prompt_lens=lens)            # ids [B, T] = prompt + generated so far
    stack = SamplerStack.from_settings(repetition_penalty=1.1, temperature=0.8, top_k=50, top_p=0.95)
    tokens, info = stack.sample(logits, h, generator=g)  # tokens [B]; info.logprobs [B], ...
    h.append(tokens)                                     # O(B) update of what the penalties read
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minilm.errors import SettingError

NEG_INF = float("-inf")
BAN = -100.0  # a logit bias of -100 (or less) bans the token, as in the OpenAI API
MAX_LOGPROBS = 20  # alternatives per token a user may ask for: OpenAI's and vLLM's limit
ID_KEY, TEXT_KEY = "id:", "text:"  # explicit logit_bias keys: "id:5" token id 5, "text:5" the text


# ------------------------------------------------------------------------------------------------------
# History: what the penalties read, kept up to date incrementally


class History:
    """The tokens of each row so far, and the per-token statistics the penalties read.

    ``tokens`` [B, T] holds prompt + generated tokens. With an ``attention_mask`` [B, T] (True/1 = real
    token; e.g. the left padding of a batch of prompts) the masked positions are ignored. Of each row's
    real tokens the first ``prompt_lens[b]`` are the prompt, the rest were generated.

    Built once for a vocabulary of V tokens (``vocab_size``, else the first logits a penalty sees):
      ``counts``   LongTensor[B, V]: times each token was generated, prompt excluded (OpenAI's count)
      ``seen``     BoolTensor[B, V]: whether a token occurs in prompt + generated (HF's repetition set)
      ``seen_ids`` (rows, ids), two LongTensor[S]: the S (row, token) pairs where ``seen`` is True
    ``append`` updates all three in O(B), so a penalty touches the seen tokens only, not a scan of the
    history nor of the vocabulary. Token ids outside [0, V) are not counted (HF drops ids beyond the
    logits' vocabulary too).
    """

    def __init__(self, tokens: Tensor, prompt_lens: Tensor, vocab_size: int | None = None,
                 attention_mask: Tensor | None = None):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be a LongTensor[B, T], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long, device=tokens.device)
        if prompt_lens.shape != (B,):
            raise ValueError(f"prompt_lens must have shape ({B},), got {tuple(prompt_lens.shape)}")
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise ValueError(f"attention_mask must have the shape of tokens {(B, T)}, "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(device=tokens.device, dtype=torch.bool)
        n_real = torch.full_like(prompt_lens, T) if attention_mask is None else attention_mask.sum(1)
        if B and ((prompt_lens < 0) | (prompt_lens > n_real)).any():
            raise ValueError("prompt_lens must be in [0, the number of real tokens of the row]")
        self.tokens = tokens
        self.prompt_lens = prompt_lens
        self.attention_mask = attention_mask
        self.vocab_size: int | None = None
        self._counts: Tensor | None = None  # (B, V + 1): column V is a sink for ignored positions
        self._seen: Tensor | None = None    # (B, V + 1)
        self._seen_ids: tuple[Tensor, Tensor] | None = None  # (S,), (S,)
        if vocab_size is not None:
            self.build(vocab_size)

    @property
    def batch_size(self) -> int:
        return self.tokens.size(0)

    def build(self, vocab_size: int) -> History:
        """Compute ``counts`` and ``seen`` from ``tokens`` for a vocabulary of ``vocab_size`` (once)."""
        if self.vocab_size is not None:
            if vocab_size != self.vocab_size:
                raise ValueError(f"History was built for vocab_size {self.vocab_size}, not {vocab_size}")
            return self
        V, tokens, B = vocab_size, self.tokens, self.batch_size
        real = self.attention_mask
        if real is None:
            real = torch.ones_like(tokens, dtype=torch.bool)
        rank = real.long().cumsum(1)                              # (B, T) 1-based rank among real tokens
        generated = real & (rank > self.prompt_lens[:, None])     # (B, T)
        self._counts = torch.zeros(B, V + 1, dtype=torch.long, device=tokens.device)
        self._counts.scatter_add_(1, _ids_or_sink(tokens, generated, V), torch.ones_like(tokens))
        self._seen = torch.zeros(B, V + 1, dtype=torch.bool, device=tokens.device)
        self._seen.scatter_(1, _ids_or_sink(tokens, real, V), True)
        self._seen_ids = self._seen[:, :V].nonzero(as_tuple=True)
        self.vocab_size = V
        return self

    def for_logits(self, logits: Tensor) -> History:
        """Check that ``logits`` [B, V] fit this history; build the statistics on first use."""
        if logits.size(0) != self.batch_size:
            raise ValueError(f"logits have batch size {logits.size(0)}, the History {self.batch_size}")
        return self.build(logits.size(-1))

    @property
    def counts(self) -> Tensor:
        """LongTensor[B, V]: how often each token was generated."""
        return self._built(self._counts)

    @property
    def seen(self) -> Tensor:
        """BoolTensor[B, V]: whether each token occurs in prompt + generated."""
        return self._built(self._seen)

    @property
    def seen_ids(self) -> tuple[Tensor, Tensor]:
        """(rows, ids), LongTensor[S] each: every (row, token) pair where ``seen`` is True, in no
        particular order; ``logits[rows, ids]`` are the logits of the seen tokens."""
        self._built(self._seen)
        return self._seen_ids

    def append(self, new_tokens: Tensor) -> None:
        """Append one generated token per row (LongTensor[B]); update the statistics in O(B)."""
        if new_tokens.shape != (self.batch_size,):
            raise ValueError(f"new_tokens must have shape ({self.batch_size},), "
                             f"got {tuple(new_tokens.shape)}")
        new = new_tokens.to(self.tokens.device, torch.long)[:, None]     # (B, 1)
        self.tokens = torch.cat([self.tokens, new], dim=1)
        if self.attention_mask is not None:
            real = torch.ones_like(new, dtype=torch.bool)
            self.attention_mask = torch.cat([self.attention_mask, real], dim=1)
        if self.vocab_size is not None:
            idx = _ids_or_sink(new, torch.ones_like(new, dtype=torch.bool), self.vocab_size)  # (B, 1)
            fresh = (~self._seen.gather(1, idx) & (idx < self.vocab_size))[:, 0].nonzero()[:, 0]
            self._counts.scatter_add_(1, idx, torch.ones_like(idx))
            self._seen.scatter_(1, idx, True)
            rows, ids = self._seen_ids  # add the rows whose token is seen for the first time
            self._seen_ids = torch.cat([rows, fresh]), torch.cat([ids, idx[fresh, 0]])

    def select(self, rows: Tensor | Sequence[int]) -> History:
        """A History of only these rows (indices into this batch, in the order given): the same as
        one built from scratch from their tokens, without recounting."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        mask = None if self.attention_mask is None else self.attention_mask[idx]
        out = History(self.tokens[idx], self.prompt_lens[idx], attention_mask=mask)
        if self.vocab_size is not None:
            out.vocab_size, out._counts, out._seen = self.vocab_size, self._counts[idx], self._seen[idx]
            out._seen_ids = out._seen[:, :-1].nonzero(as_tuple=True)
        return out

    @staticmethod
    def _built(stat: Tensor | None) -> Tensor:
        if stat is None:
            raise RuntimeError("History statistics are not built yet: pass vocab_size or call build(V)")
        return stat[:, :-1]


def _ids_or_sink(tokens: Tensor, keep: Tensor, V: int) -> Tensor:
    """The token ids where ``keep`` and in [0, V); the sink column V elsewhere."""
    return torch.where(keep & (tokens >= 0) & (tokens < V), tokens, V)


Processor = Callable[[Tensor, "History | None"], Tensor]


# ------------------------------------------------------------------------------------------------------
# shared helpers


def _remove(logits: Tensor, remove: Tensor) -> Tensor:
    """Set the logits where ``remove`` is True to -inf: the one way every filter drops tokens."""
    return logits.masked_fill(remove, NEG_INF)


def _remove_at(logits: Tensor, ids: Tensor, remove: Tensor) -> Tensor:
    """``_remove`` for a mask ``remove`` [B, n] given over the tokens ``ids`` [B, n] (distinct per row)."""
    return _remove(logits, torch.zeros_like(logits, dtype=torch.bool).scatter(-1, ids, remove))


def _probs(logits: Tensor) -> Tensor:
    """softmax in float32 (torch subtracts the row max first, so logits of ±1e4 are safe)."""
    return torch.softmax(logits.float(), dim=-1)


def _sorted_kept(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's kept (> -inf) logits, largest first: (values, ids) [B, n], n = the most kept in a row.

    Rows keeping fewer are padded with removed tokens (-inf). After an earlier filter (top-k 50) this
    sorts n entries instead of V: a full sort of a 50k vocabulary costs more than the rest of a CPU
    sampling step. Costs one host sync, for n.
    """
    n = int((logits > NEG_INF).sum(dim=-1).amax())
    if n >= logits.size(-1):
        return torch.sort(logits, dim=-1, descending=True)
    return torch.topk(logits, max(n, 1), dim=-1)


def _require_history(history: History | None, logits: Tensor, who: str) -> History:
    if history is None:
        raise ValueError(f"{who} needs the History of the tokens so far")
    return history.for_logits(logits)


def _update_seen(logits: Tensor, history: History | None, who: str,
                 update: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A copy of ``logits`` where each seen token's logit x (prompt + generated) is ``update(x, count)``,
    count being how often it was generated; the others are left as they are.

    Computed over the S seen (row, token) pairs only, S <= the tokens so far: a dense op over the B·V
    logits costs ~5x more on CPU than this copy and the indexing.
    """
    h = _require_history(history, logits, who)
    rows, ids = h.seen_ids                                   # (S,), (S,)
    out = logits.clone()
    out[rows, ids] = update(logits[rows, ids], h.counts[rows, ids])
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_bias(x: object) -> bool:
    """A finite number or -inf."""
    return isinstance(x, numbers.Real) and not math.isnan(x) and x != math.inf


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the parameter and its allowed range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise SettingError(name, f"{name} must be in {interval}, got {value!r}")
    return v


# ------------------------------------------------------------------------------------------------------
# processors: bias and penalties


class LogitBias:
    """``logit[j] += bias[j]`` for each key j; a bias of -inf bans the token (OpenAI's ``logit_bias``).

    Keys are token ids in [0, V): checked here against ``vocab_size`` when given, else at call time
    against the logits' V. Biases are finite numbers or -inf.
    """
    name = "logit_bias"

    def __init__(self, bias: dict[int, float], vocab_size: int | None = None):
        top = "vocab_size - 1" if vocab_size is None else vocab_size - 1
        for key, value in bias.items():
            if not _is_int(key):
                raise SettingError(self.name, f"logit_bias keys must be integer token ids, got {key!r}")
            if key < 0 or (vocab_size is not None and key >= vocab_size):
                raise SettingError(self.name, f"logit_bias key {key} is outside the vocabulary [0, {top}]")
            if not _is_bias(value):
                raise SettingError(self.name, f"logit_bias value for token {key} must be finite or -inf, "
                                              f"got {value!r}")
        self.bias = {int(k): float(v) for k, v in bias.items()}
        self._max_id = max(self.bias, default=-1)
        self._ids = torch.tensor(list(self.bias), dtype=torch.long)
        self._values = torch.tensor(list(self.bias.values()), dtype=torch.float32)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        V = logits.size(-1)
        if self._max_id >= V:
            raise ValueError(f"logit_bias key {self._max_id} is outside the vocabulary [0, {V - 1}]")
        if self._ids.device != logits.device:  # move once, not every step
            self._ids, self._values = self._ids.to(logits.device), self._values.to(logits.device)
        out = logits.clone()
        out[:, self._ids] += self._values.to(logits.dtype)
        return out


class RepetitionPenalty:
    """CTRL's repetition penalty (Keskar et al. 2019), as HF's ``RepetitionPenaltyLogitsProcessor``.

    For every distinct token j of prompt + generated: ``logit[j] / θ`` if ``logit[j] > 0``, else
    ``logit[j] · θ``. θ > 0: above 1 discourages repetition, below 1 encourages it, 1 is a no-op.
    """
    name = "repetition_penalty"

    def __init__(self, penalty: float):
        self.penalty = _check_range("repetition_penalty", penalty, 0.0, math.inf, lo_open=True,
                                    hi_open=True)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        theta = self.penalty
        return _update_seen(logits, history, "RepetitionPenalty",
                            lambda x, _: torch.where(x < 0, x * theta, x / theta))


class PresencePenalty:
    """OpenAI's presence penalty: ``logit[j] -= a · (count[j] > 0)``, counting generated tokens only.

    a in [-2, 2] (the OpenAI API's range); a > 0 pushes towards tokens not used yet.
    """
    name = "presence_penalty"

    def __init__(self, penalty: float):
        self.penalty = _check_range("presence_penalty", penalty, -2.0, 2.0)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        # the seen tokens include the prompt's, of count 0: x - a · 0 = x
        return _update_seen(logits, history, "PresencePenalty",
                            lambda x, count: x - self.penalty * (count > 0).to(x.dtype))


class FrequencyPenalty:
    """OpenAI's frequency penalty: ``logit[j] -= a · count[j]``, counting generated tokens only.

    a in [-2, 2] (the OpenAI API's range); a > 0 discourages tokens in proportion to their use.
    """
    name = "frequency_penalty"

    def __init__(self, penalty: float):
        self.penalty = _check_range("frequency_penalty", penalty, -2.0, 2.0)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        return _update_seen(logits, history, "FrequencyPenalty",
                            lambda x, count: x - self.penalty * count.to(x.dtype))


# ------------------------------------------------------------------------------------------------------
# processors: temperature and filters


class Temperature:
    """``logits / t``, as HF's ``TemperatureLogitsWarper``; t = 0 keeps only the highest logit.

    t >= 0. At t = 0 the first argmax of each row keeps its logit and every other token is removed, so
    the draw is greedy. Small t stays finite: logits of ±1e4 at t = 1e-4 are ±1e8 in float32.
    """
    name = "temperature"

    def __init__(self, temperature: float):
        self.temperature = _check_range("temperature", temperature, 0.0, math.inf, hi_open=True)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.temperature > 0:
            return logits / self.temperature
        top = logits.argmax(dim=-1, keepdim=True)  # (B, 1): the first maximum on ties
        return torch.full_like(logits, NEG_INF).scatter(-1, top, logits.gather(-1, top))


class TopK:
    """Keep the logits >= the k-th largest, ties at the boundary kept, as HF's ``TopKLogitsWarper``.

    k >= 0; k = 0 or k >= V keeps every token.
    """
    name = "top_k"

    def __init__(self, k: int):
        if not _is_int(k) or k < 0:
            raise SettingError(self.name, f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        self.k = int(k)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.k == 0 or self.k >= logits.size(-1):
            return logits
        kth = torch.topk(logits, self.k, dim=-1).values[..., -1:]  # (B, 1)
        return _remove(logits, logits < kth)

    def candidates(self, logits: Tensor, width: int = 0) -> tuple[Tensor, Tensor]:
        """``self(logits)`` [B, V] in short, for 0 < k < V: (values, ids) [B, n], each row's kept tokens
        first, in token order, then removed ones (at -inf). n = max(k + 1, width), at most V, unless a
        row keeps more (ties at the k-th value, or too few finite logits): then the most a row keeps.
        """
        V = logits.size(-1)
        top = torch.topk(logits, min(max(self.k + 1, width), V), dim=-1)  # (B, n), largest first
        kth = top.values[:, self.k - 1:self.k]                            # (B, 1)
        if top.values.size(-1) < V and not (top.values[:, -1:] < kth).all():  # a row keeps n or more
            top = torch.topk(logits, int((~(logits < kth)).sum(dim=-1).amax()), dim=-1)
        remove = top.values < kth                                        # as in __call__
        order = torch.where(remove, top.indices + V, top.indices).argsort(dim=-1)  # kept first, by id
        return _remove(top.values, remove).gather(-1, order), top.indices.gather(-1, order)


class TopP:
    """Nucleus sampling (Holtzman et al. 2019), as HF's ``TopPLogitsWarper``.

    Keep the smallest set of most likely tokens whose probability reaches p: remove token j when the
    tokens ranked above it already reach p, ``Σ_{i ranked above j} prob[i] >= p``. So the token that
    crosses p is kept, and the most likely token always is. p in (0, 1]; p = 1 keeps every token.
    (HF's form of the same rule: remove where the ascending cumulative probability is <= 1 - p.)
    Tokens of equal probability are ranked in the order torch's sort gives, as in HF.
    """
    name = "top_p"

    def __init__(self, p: float):
        self.p = _check_range("top_p", p, 0.0, 1.0, lo_open=True)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.p == 1.0:
            return logits
        values, ids = _sorted_kept(logits)                  # (B, n), most likely first
        probs = _probs(values)
        mass_above = probs.cumsum(dim=-1) - probs           # (B, n)
        return _remove_at(logits, ids, mass_above >= self.p)


class MinP:
    """Min-p sampling (Nguyen et al. 2024), as HF's ``MinPLogitsWarper``.

    Remove the tokens with ``prob[j] < p · max_i prob[i]``. p in [0, 1]; p = 0 keeps every token, p = 1
    only the most likely one(s). The most likely token is never removed.
    """
    name = "min_p"

    def __init__(self, p: float):
        self.p = _check_range("min_p", p, 0.0, 1.0)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.p == 0.0:
            return logits
        probs = _probs(logits)
        return _remove(logits, probs < self.p * probs.amax(dim=-1, keepdim=True))


class TypicalP:
    """Locally typical sampling (Meister et al. 2022), as HF's ``TypicalLogitsWarper``.

    With the entropy ``H = -Σ prob · log prob``, rank tokens by ``|-log prob[j] - H|``, smallest first,
    and keep the shortest prefix whose probability reaches p, with any token tied with its last one;
    the first token of this ranking is always kept. p in (0, 1]; p = 1 keeps every token.
    """
    name = "typical_p"

    def __init__(self, p: float):
        self.p = _check_range("typical_p", p, 0.0, 1.0, lo_open=True)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.p == 1.0:
            return logits
        values, ids = _sorted_kept(logits)                              # (B, n): the kept tokens
        logp = torch.log_softmax(values.float(), dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)     # padding: -inf · 0 = nan
        dist, order = (-logp - entropy).abs().sort(dim=-1)               # (B, n), most typical first
        mass = logp.exp().gather(-1, order).cumsum(dim=-1)
        last = (mass < self.p).sum(dim=-1, keepdim=True).clamp_(max=dist.size(-1) - 1)  # (B, 1)
        remove = dist > dist.gather(-1, last)
        remove[..., 0] = False
        return _remove_at(logits, ids.gather(-1, order), remove)


# ------------------------------------------------------------------------------------------------------
# the stack and the draw


@dataclass
class SampleInfo:
    """The log-probabilities that come with the sampled tokens.

    logprobs:           FloatTensor[B], the token's log-prob under the raw model distribution (T = 1,
                        before any processor): what the OpenAI API returns as ``logprobs``.
    processed_logprobs: FloatTensor[B], its log-prob under the final processed distribution.
    top_ids:            LongTensor[B, N], the N most likely tokens of the raw distribution, or of the
                        processed one with logprobs_mode="processed" (None unless top_logprobs=N > 0).
    top_logprobs:       FloatTensor[B, N], their log-probs under that distribution (-inf for a token
                        the processors removed).
    """
    logprobs: Tensor
    processed_logprobs: Tensor
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


# from_settings' stages: name -> (processor, the setting's no-op value), in the default order, which is
# HF's generate and vLLM's: bias, penalties, temperature, then the filters.
STAGES: dict[str, tuple[type, object]] = {
    "logit_bias": (LogitBias, None), "repetition_penalty": (RepetitionPenalty, 1.0),
    "presence_penalty": (PresencePenalty, 0.0), "frequency_penalty": (FrequencyPenalty, 0.0),
    "temperature": (Temperature, 1.0), "top_k": (TopK, 0), "top_p": (TopP, 1.0), "min_p": (MinP, 0.0),
    "typical_p": (TypicalP, 1.0),
}
DEFAULT_ORDER = tuple(STAGES)
# llama.cpp's default chain (common/common.h: penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p,
# xtc, temperature; its penalties sampler applies repetition, then frequency and presence), after the
# logit bias, which common_sampler_init puts before the chain.
LLAMA_CPP_ORDER = ("logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "top_k", "typical_p", "top_p", "min_p", "temperature")
ORDERS = {"default": DEFAULT_ORDER, "llama.cpp": LLAMA_CPP_ORDER}
LOGPROBS_MODES = ("raw", "processed")


def check_logprobs_mode(mode: str) -> None:
    """A SettingError unless `mode` is one of LOGPROBS_MODES."""
    if mode not in LOGPROBS_MODES:
        raise SettingError("logprobs_mode", f"logprobs_mode must be one of {list(LOGPROBS_MODES)}, "
                                            f"got {mode!r}")

# The processors that read nothing but each row's logit values (not token ids, V or the History), so
# give the same values on a row's candidate tokens as on the whole row with the rest at -inf: after a
# TopK, sample() runs them on its kept tokens only. Not MinP: its softmax over the whole row rounds
# differently from one over the candidates, which could flip a token at the boundary.
ON_CANDIDATES = (Temperature, TopK, TopP, TypicalP)
# The fewest candidates a row gets (the rest padded with removed tokens): torch's softmax sums a row
# shorter than a SIMD register (8 or 16 floats) in another order than a longer one, so a row's
# probabilities would depend on how many candidates the other rows of the batch need; from 64 on,
# the padding (-inf) changes no bit.
MIN_CANDIDATES = 64


class SamplerStack:
    """A list of processors applied in order, then an exact draw from softmax(processed logits)."""

    def __init__(self, processors: Sequence[Processor] = ()):
        self.processors = list(processors)

    def __repr__(self) -> str:
        return f"SamplerStack([{', '.join(_stage_name(p) for p in self.processors)}])"

    @classmethod
    def from_settings(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0, typical_p: float = 1.0, repetition_penalty: float = 1.0,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                      logit_bias: dict[int, float] | None = None, order: str | Sequence[str] = "default",
                      vocab_size: int | None = None) -> SamplerStack:
        """The stack for these settings, leaving out the ones at their no-op value.

        ``order``: "default" (logit bias → repetition → presence → frequency → temperature → top-k →
        top-p → min-p → typical, as HF and vLLM), "llama.cpp" (bias → penalties → top-k → typical →
        top-p → min-p → temperature), or a list of stage names (the keys of STAGES) that names every
        setting in use. ``vocab_size``, if given, lets logit_bias keys be checked now.
        """
        settings = dict(logit_bias=logit_bias or None, repetition_penalty=repetition_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p)
        used = [name for name, (_, no_op) in STAGES.items() if settings[name] != no_op]
        names = _resolve_order(order, used)
        return cls([LogitBias(logit_bias, vocab_size) if name == "logit_bias" else
                     STAGES[name][0](settings[name]) for name in names if name in used])

    def stages(self, logits: Tensor, history: History | None = None) -> list[tuple[str, Tensor]]:
        """``[("raw", logits), (name, logits after that stage), ...]``: what each processor does."""
        out = [("raw", logits)]
        for proc in self.processors:
            logits = proc(logits, history)
            out.append((_stage_name(proc), logits))
        return out

    def apply(self, logits: Tensor, history: History | None = None) -> Tensor:
        """The processed logits [B, V]: every processor in order."""
        return self.stages(logits, history)[-1][1]

    def sample(self, logits: Tensor, history: History | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               top_logprobs: int = 0, logprobs_mode: str = "raw") -> tuple[Tensor, SampleInfo]:
        """Draw one token per row from softmax(apply(logits)): tokens [B] and their ``SampleInfo``.

        ``generator``: None (torch's global RNG), one torch.Generator for the batch, or a list of B
        generators, one per row, so that a row's tokens depend only on its own seed and logits,
        whatever else is in the batch. ``top_logprobs`` = N > 0 also returns the N most likely tokens
        of the raw distribution (``logprobs_mode="raw"``, what the OpenAI API reports) or of the
        processed one (``"processed"``, vLLM's processed_logprobs). A row with no token left (all
        -inf) or with a NaN/+inf logit raises ValueError.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be a FloatTensor[B, V], got shape {tuple(logits.shape)}")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        check_logprobs_mode(logprobs_mode)
        processed, ids = self._candidates(logits, history)      # (B, n), ids (B, n) or None if n = V
        bad = ~torch.isfinite(processed.amax(dim=-1))           # (B,); amax propagates NaN
        if bad.any():
            raise ValueError(f"no token left to sample in batch row(s) {bad.nonzero()[:, 0].tolist()}: "
                             "every logit was removed (-inf), or one is NaN or +inf")
        probs = _probs(processed)                               # (B, n)
        picked = _draw(probs, generator)[:, None]               # (B, 1), a column of processed
        tokens = (picked if ids is None else ids.gather(-1, picked))[:, 0]  # (B,)

        raw = logits.float()
        raw_lse = torch.logsumexp(raw, dim=-1, keepdim=True)    # (B, 1): log_softmax(raw) = raw - lse
        info = SampleInfo(logprobs=(raw.gather(-1, tokens[:, None]) - raw_lse)[:, 0],
                          processed_logprobs=probs.gather(-1, picked)[:, 0].log())
        if top_logprobs and logprobs_mode == "raw":
            top = raw.topk(min(top_logprobs, raw.size(-1)), dim=-1)
            info.top_ids, info.top_logprobs = top.indices, top.values - raw_lse
        elif top_logprobs:  # the processed distribution over the candidates: the rest is removed
            top = probs.log().topk(min(top_logprobs, probs.size(-1)), dim=-1)
            info.top_ids = top.indices if ids is None else ids.gather(-1, top.indices)
            info.top_logprobs = top.values
        return tokens, info

    def _candidates(self, logits: Tensor, history: History | None) -> tuple[Tensor, Tensor | None]:
        """``apply(logits, history)``, cheaper: (processed [B, V], None), or after a TopK (values, ids)
        [B, n] of each row's candidate tokens (the processed logits of ``ids``; every other token is
        removed).

        From a TopK(k) on, the processors of ON_CANDIDATES, then sample()'s softmax and draw, work on
        the k (+ ties) tokens it kept, not on all V: on a 50k vocabulary, sorting and scanning the
        removed tokens was most of a step's sampling time. Each token keeps the value apply() gives it,
        except that which of two exactly tied tokens top-p or typical-p ranks first is torch's choice
        on either path. Any other processor gets the full logits [B, V] back.
        """
        V = logits.size(-1)
        x, ids = logits, None
        for proc in self.processors:
            if ids is not None and type(proc) not in ON_CANDIDATES:
                x, ids = x.new_full((x.size(0), V), NEG_INF).scatter(-1, ids, x), None  # (B, V)
            if ids is None and type(proc) is TopK and 0 < proc.k < V:
                x, ids = proc.candidates(x, MIN_CANDIDATES)
            else:
                x = proc(x, history)
        return x, ids


def user_logit_bias(bias: Mapping[str, object], encode: Callable[[str], list[int]] | None = None,
                    name: str = "logit_bias") -> dict[int, float]:
    """A user's logit bias (a JSON object: the CLI's --logit_bias, the API's ``logit_bias``) as
    {token id: bias} for ``from_settings``. Keys (_bias_token): ``"5"`` or ``"id:5"`` is token id 5
    (digits are OpenAI's form); ``"text:5"`` is the text "5", which must ``encode`` to one token (the
    only way to name a digit's token); any other key is a text too. Values are numbers in
    [-100, 100], added to the logit; -100 bans the token (-inf), as in the OpenAI API. Two keys
    naming one token are refused rather than one silently winning. Errors name the setting as
    ``name``."""
    out: dict[int, float] = {}
    keys: dict[int, object] = {}  # token -> the key that named it
    for key, value in bias.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not -100 <= value <= 100:
            raise SettingError("logit_bias", f"{name} value for {key!r} must be a number in "
                                             f"[-100, 100], got {value!r}")
        token = _bias_token(key, encode, name)
        if token in keys:
            raise SettingError("logit_bias", f"{name} keys {keys[token]!r} and {key!r} are the same "
                                             f"token {token}")
        keys[token] = key
        out[token] = NEG_INF if value <= BAN else float(value)
    return out


def _bias_token(key: object, encode: Callable[[str], list[int]] | None, name: str) -> int:
    """The token a logit_bias key names: ``id:N`` or ASCII digits: id N; ``text:T`` or any other
    string: the one token T encodes to."""
    if not isinstance(key, str):
        raise SettingError("logit_bias", f"{name} keys must be token ids (strings of digits), got "
                                         f"{key!r}")
    if key.startswith(ID_KEY):
        digits = key[len(ID_KEY):]
        if not _is_digits(digits):
            raise SettingError("logit_bias", f"{name} key {key!r}: a token id after {ID_KEY} must "
                                             "be digits")
        return int(digits)
    if _is_digits(key):
        return int(key)
    if encode is None:
        raise SettingError("logit_bias", f"{name} key {key!r}: no tokenizer to encode it; give a "
                                         f'token id ("5" or "{ID_KEY}5")')
    try:
        ids = encode(key.removeprefix(TEXT_KEY))
    except ValueError as e:
        raise SettingError("logit_bias", f"{name} key {key!r}: {e}") from None
    if len(ids) != 1:
        raise SettingError("logit_bias", f"{name} key {key!r} is {len(ids)} tokens {ids}, not one; "
                                         f'use a single-token text or a token id ("{ID_KEY}5")')
    return ids[0]


def _is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit alone takes "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def _resolve_order(order: str | Sequence[str], used: list[str]) -> Sequence[str]:
    """The stage names of ``order`` (a preset name or a list), checked against the stages in use."""
    if isinstance(order, str):
        if order not in ORDERS:
            raise SettingError("order", f"order must be one of {list(ORDERS)} or a list of stage names, "
                                        f"got {order!r}")
        return ORDERS[order]
    names = list(order)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise SettingError("order", f"unknown stage name(s) {unknown} in order; allowed: {list(STAGES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SettingError("order", f"stage name(s) {repeated} appear more than once in order")
    missing = [n for n in used if n not in names]
    if missing:
        raise SettingError("order", f"order leaves out the stage(s) in use {missing}")
    return names


def _stage_name(proc: Processor) -> str:
    return getattr(proc, "name", None) or getattr(proc, "__name__", None) or type(proc).__name__


def _draw(probs: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None,
          block: int = 1024) -> Tensor:
    """Exact draw from ``probs`` [B, V] by inverting the CDF: the first j with ``cdf[j] > u · cdf[-1]``.

    One u ~ U[0, 1) per row; the CDF is summed in float64, so each token is drawn with its float32
    probability up to ~1e-16. A token of probability 0 (removed) never raises the CDF, so is never
    drawn, and a row with one token left is greedy. For V > ``block`` the CDF is built in two levels,
    sums of blocks of ``block`` tokens and then a cumulative sum inside the one block holding the
    target: a sequential cumsum over a 50k vocabulary costs more on CPU than all the rest of the draw.
    With a list of B generators each row draws its u from its own: a row's tokens depend on its seed
    and its logits only, not on the rest of the batch.
    """
    B, V = probs.shape
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B} rows")
        u = torch.stack([torch.rand((), dtype=torch.float64, device=probs.device, generator=g)
                         for g in generator])
    else:
        u = torch.rand(B, dtype=torch.float64, device=probs.device, generator=generator)
    if V <= block:  # one block: its CDF directly
        cdf = probs.double().cumsum(dim=-1)                                  # (B, V)
        total = cdf[:, -1:]                                                  # (B, 1), ~1
        target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True)[:, 0]
    n_blocks = -(-V // block)
    blocks = F.pad(probs, (0, n_blocks * block - V)).view(B, n_blocks, block)
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)       # (B, n_blocks)
    total = block_cdf[:, -1:]                                                # (B, 1), ~1
    zero = torch.zeros_like(total)
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, zero))  # (B, 1), < total
    b = torch.searchsorted(block_cdf, target, right=True)                    # (B, 1), a block of mass > 0
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)), zero)  # mass of blocks < b
    inner_cdf = blocks.gather(1, b[:, :, None].expand(B, 1, block))[:, 0].double().cumsum(dim=-1)
    rest = torch.minimum(target - before, torch.nextafter(inner_cdf[:, -1:], zero))  # < mass of block b
    return (b * block + torch.searchsorted(inner_cdf, rest, right=True))[:, 0]
