"""The sampler's stages: logits processors, each a callable ``(logits, history) -> logits`` on
FloatTensor[B, V]; a removed token gets -inf.

The model always hands over raw logits (T = 1); every transformation lives in a processor, and a
``SamplerStack`` (minilm.sampling.stack) applies them in order, then draws. Semantics follow HF
transformers' ``generation/logits_process.py``, the OpenAI API (presence/frequency penalties, logit
bias) and llama.cpp's ``src/llama-sampling.cpp`` (top-nσ, XTC, DRY, Mirostat): the anchor of each
is named in its docstring. Each stage's arguments are checked against its knob in
``SamplerSettings`` (minilm.sampling.settings), so a range is written once.

A stage may also take per-step inputs the stack hands it as keywords (``inputs``: XTC's
``coins``, guidance's ``unconditional_logits``) and update its per-row state after the draw
(``after_draw``: Mirostat's μ).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minilm.errors import SettingError
from minilm.sampling.history import History
from minilm.sampling.settings import SamplerSettings, check_knob, prompt_ids

NEG_INF = float("-inf")
LN2 = math.log(2.0)
MAX_LOGPROBS = 20  # alternatives per token a user may ask for: OpenAI's and vLLM's limit

Processor = Callable[..., Tensor]  # (logits, history, **inputs) -> logits


# ------------------------------------------------------------------------------------------------------
# shared helpers


def _remove(logits: Tensor, remove: Tensor) -> Tensor:
    """Set the logits where ``remove`` is True to -inf: the one way every filter drops tokens
    (torch.where: on CPU about twice as fast as masked_fill over a 50k vocabulary)."""
    return torch.where(remove, NEG_INF, logits)


def _remove_at(logits: Tensor, ids: Tensor, remove: Tensor) -> Tensor:
    """``_remove`` for a mask ``remove`` [B, n] given over the tokens ``ids`` [B, n] (distinct per row)."""
    return _remove(logits, torch.zeros_like(logits, dtype=torch.bool).scatter(-1, ids, remove))


def _wide(logits: Tensor) -> Tensor:
    """Logits in float32 at least (half precision upcast; float64 kept, as HF computes in it)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def softmax_probs(logits: Tensor) -> Tensor:
    """softmax in float32 or wider (torch subtracts the row max first: logits of ±1e4 are safe)."""
    return torch.softmax(_wide(logits), dim=-1)


def _probs64(logits: Tensor) -> Tensor:
    """softmax in float64. The probability thresholds (min-p, epsilon, eta, XTC, Mirostat) read it:
    its one row-wide sum rounds at ~1e-16, so a row gives the same kept set whether it comes whole
    or as its candidates after a top-k (the rest at -inf), where a float32 sum, added in another
    order, could flip a token at the threshold."""
    return torch.softmax(logits.double(), dim=-1)


def _logprobs64(logits: Tensor) -> Tensor:
    """log_softmax in float64 (as _probs64)."""
    return torch.log_softmax(logits.double(), dim=-1)


def _entropy(logp: Tensor) -> Tensor:
    """Natural-log entropy [B, 1] from log-probabilities [B, n]; a removed token (-inf) adds 0."""
    return -torch.where(logp > NEG_INF, logp.exp() * logp, 0.0).sum(dim=-1, keepdim=True)


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


def _not_below_kth(logits: Tensor, k: int = 1) -> Tensor:
    """BoolTensor[B, V]: the logits >= each row's k-th largest (HF's min_tokens_to_keep guard)."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits >= kth


def _require_history(history: History | None, logits: Tensor, who: str,
                     build: bool = True) -> History:
    """The History, checked against ``logits``; ``build``: with the penalties' statistics."""
    if history is None:
        raise ValueError(f"{who} needs the History of the tokens so far")
    if not build:
        if logits.size(0) != history.batch_size:
            raise ValueError(f"logits have batch size {logits.size(0)}, the History "
                             f"{history.batch_size}")
        return history
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


class Stage:
    """What the stack needs of a stage besides being called: its ``name`` (the stage name of the
    settings' orders), the per-step ``inputs`` it takes as keywords, and how to build it from
    SamplerSettings (a one-knob stage: the knob of its own name)."""
    name: str = ""
    inputs: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: SamplerSettings, tokenizer: Any = None,
                      vocab_size: int | None = None) -> Stage:
        return cls(getattr(settings, cls.name))


# ------------------------------------------------------------------------------------------------------
# classifier-free guidance


def classifier_free_guidance(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """``s · (log_softmax(cond) − log_softmax(uncond)) + log_softmax(uncond)``, as HF's
    ``UnbatchedClassifierFreeGuidanceLogitsProcessor``: s = 1 gives the conditional log-probs,
    s = 0 the unconditional ones, s > 1 pushes away from the unconditional context."""
    cond, uncond = _wide(cond_logits), _wide(uncond_logits)
    # lerp(u, c, s) = u + s·(c − u): one pass; torch's fused log_softmax kernel is faster on CPU
    # than logsumexp alone (0.9 vs 1.3 ms at batch 8 x 50k for the whole, on one thread)
    guided = torch.lerp(torch.log_softmax(uncond, dim=-1), torch.log_softmax(cond, dim=-1), scale)
    return guided.to(cond_logits.dtype)


class ClassifierFreeGuidance(Stage):
    """Classifier-free guidance (Sanchez et al. 2023) as HF's
    ``UnbatchedClassifierFreeGuidanceLogitsProcessor``: ``classifier_free_guidance(logits,
    unconditional_logits, scale)``.

    It must be the first stage (the settings' orders put it there): it reads raw logits, and every
    later stage (penalties, temperature, filters) acts on the guided log-probs, as in HF. A removed
    (-inf) token in cond with s < 0 would become +inf: nothing removes tokens before it.

    The unconditional logits come from the caller, per step (``SamplerStack.sample(...,
    unconditional_logits=...)``): each conditional row b has an unconditional row that the model
    runs beside it (in the same batch, with its own KV cache). Its context is
    ``unconditional_prompt(negative_prompt, prompt)`` then every token row b drew (it is fed the
    conditional row's token, never samples itself); it leaves the batch with row b; its logits
    never go through the stack, and the penalties read row b's History only. The raw log-probs the
    API reports stay the conditional model's. Greedy tokens then equal HF's ``generate(...,
    guidance_scale=s, negative_prompt_ids=...)`` on the same weights.
    """
    name = "guidance"
    inputs = ("unconditional_logits",)

    def __init__(self, scale: float):
        self.scale = check_knob("guidance_scale", scale)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, tokenizer: Any = None,
                      vocab_size: int | None = None) -> ClassifierFreeGuidance:
        return cls(settings.guidance_scale)

    def __call__(self, logits: Tensor, history: History | None = None,
                 unconditional_logits: Tensor | None = None) -> Tensor:
        if unconditional_logits is None:
            raise ValueError("classifier-free guidance needs the unconditional rows' logits "
                             "(sample(..., unconditional_logits=...))")
        if unconditional_logits.shape != logits.shape:
            shape = tuple(unconditional_logits.shape)
            raise ValueError(f"unconditional_logits have shape {shape}, the logits "
                             f"{tuple(logits.shape)}")
        return classifier_free_guidance(logits, unconditional_logits, self.scale)


def unconditional_prompt(negative_prompt: str | Sequence[int] | None, prompt: Sequence[int],
                         encode: Callable[[str], list[int]] | None, vocab_size: int) -> list[int]:
    """The context an unconditional row starts from: the negative prompt's tokens (text or ids,
    checked against the vocabulary), or without one the prompt's last token, as HF's generate
    (GPT-2 has no BOS to run an empty context on)."""
    if negative_prompt is None:
        return [prompt[-1]]
    return prompt_ids(negative_prompt, encode, vocab_size)


# ------------------------------------------------------------------------------------------------------
# bias and penalties


class LogitBias(Stage):
    """``logit[j] += bias[j]`` for each key j; a bias of -inf bans the token (OpenAI's ``logit_bias``).

    Keys are token ids in [0, V): checked here against ``vocab_size`` when given, else at call time
    against the logits' V. Biases are finite numbers or -inf.
    """
    name = "logit_bias"

    def __init__(self, bias: dict[int, float], vocab_size: int | None = None):
        self.bias = check_knob(self.name, bias) or {}
        self._max_id = max(self.bias, default=-1)
        if vocab_size is not None and self._max_id >= vocab_size:
            raise SettingError(self.name, f"logit_bias key {self._max_id} is outside the "
                                          f"vocabulary [0, {vocab_size - 1}]")
        self._ids = torch.tensor(list(self.bias), dtype=torch.long)
        self._values = torch.tensor(list(self.bias.values()), dtype=torch.float32)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, tokenizer: Any = None,
                      vocab_size: int | None = None) -> LogitBias:
        return cls(settings.logit_bias, vocab_size)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        V = logits.size(-1)
        if self._max_id >= V:
            raise ValueError(f"logit_bias key {self._max_id} is outside the vocabulary [0, {V - 1}]")
        if self._ids.device != logits.device:  # move once, not every step
            self._ids, self._values = self._ids.to(logits.device), self._values.to(logits.device)
        out = logits.clone()
        out[:, self._ids] += self._values.to(logits.dtype)
        return out


class RepetitionPenalty(Stage):
    """CTRL's repetition penalty (Keskar et al. 2019), as HF's ``RepetitionPenaltyLogitsProcessor``.

    For every distinct token j of prompt + generated: ``logit[j] / θ`` if ``logit[j] > 0``, else
    ``logit[j] · θ``. θ > 0: above 1 discourages repetition, below 1 encourages it, 1 is a no-op.
    """
    name = "repetition_penalty"

    def __init__(self, penalty: float):
        self.penalty = check_knob(self.name, penalty)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        theta = self.penalty
        return _update_seen(logits, history, "RepetitionPenalty",
                            lambda x, _: torch.where(x < 0, x * theta, x / theta))


class PresencePenalty(Stage):
    """OpenAI's presence penalty: ``logit[j] -= a · (count[j] > 0)``, counting generated tokens only.

    a in [-2, 2] (the OpenAI API's range); a > 0 pushes towards tokens not used yet.
    """
    name = "presence_penalty"

    def __init__(self, penalty: float):
        self.penalty = check_knob(self.name, penalty)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        # the seen tokens include the prompt's, of count 0: x - a · 0 = x
        return _update_seen(logits, history, "PresencePenalty",
                            lambda x, count: x - self.penalty * (count > 0).to(x.dtype))


class FrequencyPenalty(Stage):
    """OpenAI's frequency penalty: ``logit[j] -= a · count[j]``, counting generated tokens only.

    a in [-2, 2] (the OpenAI API's range); a > 0 discourages tokens in proportion to their use.
    """
    name = "frequency_penalty"

    def __init__(self, penalty: float):
        self.penalty = check_knob(self.name, penalty)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        return _update_seen(logits, history, "FrequencyPenalty",
                            lambda x, count: x - self.penalty * count.to(x.dtype))


FLOAT_MAX_LOG = 88.7228391  # llama.cpp's ln(FLT_MAX): DRY's exponent is capped at this / ln(base)
MAX_BREAKER_TAIL = 20       # tokens of a multi-token breaker's tail (llama.cpp's cap)


class DRY(Stage):
    """DRY, "don't repeat yourself", as llama.cpp's ``llama_sampler_dry`` (from koboldcpp; p-e-w's
    design, also text-generation-webui's): a token that would extend a repeat gets its logit
    lowered by ``multiplier · base^(L − allowed_length)``, L the length of the repeat.

    Over the window W of the row's last ``penalty_last_n`` real tokens (-1: its whole History,
    prompt included, as llama-server replays the prompt into its sampler; 0: none), N = |W|:
      - the repeat may not reach back past the most recent sequence breaker: rep_limit = the tokens
        after the last complete breaker sequence in W (N if none);
      - for each end position e < N - 1, L(e) = min(rep_limit, the longest n with W[e-n+1..e] ==
        W[N-n..N-1]) (the window's suffix also ends at e; overlap allowed);
      - token t gets L_t = the largest L(e) >= allowed_length over the e with W[e+1] == t, and is
        penalised unless it is a one-token breaker; nothing if N <= allowed_length or rep_limit is
        shorter than it. The exponent is capped at int(88.7228391 / ln base) as in llama.cpp.
    ``breakers`` are token sequences (``breaker_sequences`` turns the settings' texts into them as
    llama.cpp does). The match lengths are kept in ``history.cache`` and extended by one vector op
    per appended token (the recurrence M'[e] = M[e-1] + 1 where W[e] == the new token, else 0),
    instead of llama.cpp's Z-algorithm over the window at every step.
    """
    name = "dry"
    CACHE = "dry_matches"

    def __init__(self, multiplier: float, base: float = 1.75, allowed_length: int = 2,
                 penalty_last_n: int = -1, breakers: Sequence[Sequence[int]] = ()):
        self.multiplier = check_knob("dry_multiplier", multiplier)
        self.base = check_knob("dry_base", base)
        self.allowed_length = check_knob("dry_allowed_length", allowed_length)
        self.penalty_last_n = check_knob("dry_penalty_last_n", penalty_last_n)
        sequences = [tuple(int(t) for t in b) for b in breakers]
        if any(not b or min(b) < 0 for b in sequences):
            raise ValueError("DRY breakers must be non-empty sequences of token ids")
        self.single = sorted({b[0] for b in sequences if len(b) == 1})
        self.multi = sorted({b for b in sequences if len(b) > 1})
        self.max_exponent = (int(FLOAT_MAX_LOG / math.log(self.base)) if self.base > 1.000001
                             else None)
        self._single_tables: dict[tuple[int, torch.device], Tensor] = {}
        self._penalty_tables: dict[tuple, Tensor] = {}  # the last one only

    @classmethod
    def from_settings(cls, settings: SamplerSettings, tokenizer: Any = None,
                      vocab_size: int | None = None) -> DRY:
        if tokenizer is None:
            raise SettingError("dry_sequence_breakers", "DRY's sequence breakers are texts: the "
                               "stack needs the tokenizer (from_settings(..., tokenizer=...))")
        return cls(settings.dry_multiplier, settings.dry_base, settings.dry_allowed_length,
                   settings.dry_penalty_last_n,
                   breaker_sequences(settings.dry_sequence_breakers, tokenizer))

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        h = _require_history(history, logits, "DRY", build=False)
        if self.multiplier == 0 or self.penalty_last_n == 0 or h.tokens.size(1) < 2:
            return logits
        V, a = logits.size(-1), self.allowed_length
        if h.attention_mask is None:
            H, n = h.tokens, torch.full_like(h.prompt_lens, h.tokens.size(1))
        else:
            H, n = torch.where(h.attention_mask, h.tokens, -1), h.attention_mask.sum(dim=1)
        T = H.size(1)                                            # H: (B, T), padding -1 (no match)
        if self.penalty_last_n > 0:
            n = n.clamp(max=self.penalty_last_n)                 # (B,) the window's length
        start = (T - n)[:, None]                                 # (B, 1) its first column
        pos = torch.arange(T, device=H.device)
        tails = self._breaker_tails(H, V)                        # (B, T)
        head = torch.where((tails >= 0) & (pos >= start), pos, -1).amax(dim=1, keepdim=True)
        after = T - 1 - head - tails.gather(1, head.clamp(min=0))
        rep_limit = torch.where(head >= 0, after, n[:, None])    # (B, 1) tokens after the breaker
        # a row with a window of at most a tokens, or a repeat limit under a, gets nothing
        start = torch.where((rep_limit >= a) & (n[:, None] > a), start, T)
        e = pos[:-1]                                             # end positions
        length = torch.minimum(torch.minimum(self._matches(h, H), e - start + 1), rep_limit)
        nxt = H[:, 1:]                                           # the token after each end
        ok = (e >= start) & (length >= a) & (nxt < V)
        if self.single:                                          # one-token breakers go unpenalised
            ok &= ~self._single_table(V, H.device)[nxt.clamp(max=V)]  # padding -1: the last
        exponent = (length - a).clamp(min=0)
        if self.max_exponent is not None:
            exponent = exponent.clamp(max=self.max_exponent)
        penalty = self._penalties(T, logits)[exponent]           # multiplier · base^exponent
        # x - (the largest penalty of t) = min over t's repeats of x - penalty: the penalty grows
        # with L, so t's longest repeat sets it; positions that are not ok leave x as it is
        at = torch.where(ok, nxt, 0)
        lowered = torch.where(ok, logits.gather(1, at) - penalty, math.inf)
        return logits.scatter_reduce(1, at, lowered, "amin")

    def _penalties(self, T: int, logits: Tensor) -> Tensor:
        """multiplier · base^i for every exponent i a history of T tokens can reach (up to the cap,
        else the next power of two >= T), in the logits' dtype and device; made once per size."""
        size = self.max_exponent + 1 if self.max_exponent is not None else 1 << (T - 1).bit_length()
        key = (size, logits.dtype, logits.device)
        if key not in self._penalty_tables:
            powers = self.multiplier * self.base ** torch.arange(size, dtype=torch.float64)
            self._penalty_tables = {key: powers.to(logits.device, logits.dtype)}
        return self._penalty_tables[key]

    def _matches(self, h: History, H: Tensor) -> Tensor:
        """(B, T - 1): for each end position e, the longest common suffix of H[..e] and H (its
        cache in h, brought up to date with the tokens appended since)."""
        M = h.cache.get(self.CACHE)
        if M is None or M.size(1) >= H.size(1):
            M = H.new_zeros(H.size(0), 0)                    # covers the first column
        for i in range(M.size(1) + 1, H.size(1)):            # fold in column i
            M = torch.where(H[:, :i] == H[:, i:i + 1], F.pad(M, (1, 0)) + 1, 0)
        h.cache[self.CACHE] = M
        return M

    def _breaker_tails(self, H: Tensor, V: int) -> Tensor:
        """(B, T): at each position where a complete breaker sequence starts, its longest tail's
        length (0 for a one-token breaker); -1 elsewhere."""
        T = H.size(1)
        tails = torch.full_like(H, -1)
        if self.single:
            is_single = self._single_table(V, H.device)
            tails = torch.where(is_single[torch.where((H >= 0) & (H < V), H, V)], 0, tails)
        for seq in self.multi:
            k = len(seq) - 1
            if k >= T:
                continue
            hit = H[:, :T - k] == seq[0]
            for j, token in enumerate(seq[1:], 1):
                hit &= H[:, j:T - k + j] == token
            tails[:, :T - k] = torch.where(hit, tails[:, :T - k].clamp(min=k), tails[:, :T - k])
        return tails

    def _single_table(self, V: int, device: torch.device) -> Tensor:
        """BoolTensor[V + 1]: whether each token is a one-token breaker (the last entry, for
        padding and ids outside the vocabulary, is not); made once per V and device."""
        table = self._single_tables.get((V, device))
        if table is None:
            table = torch.zeros(V + 1, dtype=torch.bool, device=device)
            table[[t for t in self.single if t < V]] = True
            self._single_tables[(V, device)] = table
        return table


def breaker_sequences(texts: Sequence[str], tokenizer: Any) -> list[tuple[int, ...]]:
    """DRY's sequence-breaker texts as token sequences, as llama.cpp's
    ``get_overlapping_token_sequences``: for each text s and each token t of text w,
      - s occurs in w: (t,) is a one-token breaker;
      - else, for each proper prefix s[:i] that w ends with: (t, *encode(s[i:])[:20]).
    So one-character breakers ("\\n", ":", ...) give every token containing them (204 tokens on
    GPT-2 for the four defaults). Cached per tokenizer and texts."""
    return list(_breaker_sequences(tuple(texts), tokenizer))


@lru_cache(maxsize=16)
def _breaker_sequences(texts: tuple[str, ...], tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    out: dict[tuple[int, ...], None] = {}
    for s in texts:
        for t, w in enumerate(_token_texts(tokenizer)):
            if s in w:
                out[(t,)] = None
                continue
            for i in range(1, min(len(s), len(w) + 1)):
                if w.endswith(s[:i]):
                    out[(t, *tokenizer.encode(s[i:])[:MAX_BREAKER_TAIL])] = None
    return tuple(out)


@lru_cache(maxsize=4)
def _token_texts(tokenizer: Any) -> tuple[str, ...]:
    """Every token's text (once per tokenizer: 50k decodes for GPT-2)."""
    return tuple(tokenizer.decode([t]) for t in range(tokenizer.vocab_size))


# ------------------------------------------------------------------------------------------------------
# temperature and filters


class Temperature(Stage):
    """``logits / t``, as HF's ``TemperatureLogitsWarper``; t = 0 keeps only the highest logit.

    t >= 0. At t = 0 the first argmax of each row keeps its logit and every other token is removed, so
    the draw is greedy. Small t stays finite: logits of ±1e4 at t = 1e-4 are ±1e8 in float32.
    """
    name = "temperature"

    def __init__(self, temperature: float):
        self.temperature = check_knob(self.name, temperature)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.temperature > 0:
            return logits / self.temperature
        top = logits.argmax(dim=-1, keepdim=True)  # (B, 1): the first maximum on ties
        return torch.full_like(logits, NEG_INF).scatter(-1, top, logits.gather(-1, top))


class TopNSigma(Stage):
    """Top-nσ (Tang et al. 2024, arXiv 2411.07641), as llama.cpp's ``top_n_sigma``: keep the tokens
    whose logit is at least ``max − n·σ``, σ the population standard deviation of the row's kept
    (finite) logits. n <= 0, or a row with one token left: no-op. Removing the same tokens after
    any temperature > 0 (max and σ scale alike), but not after an earlier filter (σ changes)."""
    name = "top_n_sigma"

    def __init__(self, n: float):
        self.n = check_knob(self.name, n)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.n <= 0:
            return logits
        x = _wide(logits)
        # one token left: σ = 0 and the cut is that token; none left: the cut is nan, removes none
        return _remove(logits, x < x.amax(dim=-1, keepdim=True) - self.n * _finite_std(x))


def _finite_std(x: Tensor) -> Tensor:
    """[B, 1]: the population standard deviation of each row's finite (kept) values."""
    if x.device.type == "cpu":  # the sync below is free here
        mean = x.sum(dim=-1, keepdim=True) / x.size(-1)
        if bool(torch.isfinite(mean).all()):  # nothing removed: no mask, and the norm is one pass
            return torch.linalg.vector_norm(x - mean, dim=-1, keepdim=True) / x.size(-1) ** 0.5
    count = (x > NEG_INF).sum(dim=-1, keepdim=True)
    mean = x.nan_to_num(neginf=0.0).sum(dim=-1, keepdim=True) / count  # removed tokens: 0
    deviation = (x - mean).nan_to_num(neginf=0.0)
    return (deviation.square().sum(dim=-1, keepdim=True) / count).sqrt()


class TopH(Stage):
    """Top-H (arXiv 2509.02510), as HF's ``TopHLogitsWarper`` computes it: of the 100 most likely
    tokens (a hard cap), with q their renormalised softmax, keep the longest prefix whose running
    sum of −q·ln q stays <= τ·H(q); the most likely token always. τ in (0, 1]; 0 = off. τ = 1 is
    not a no-op: it caps the row at 100 tokens (and rounding may drop the last)."""
    name = "top_h"
    TOP_N = 100

    def __init__(self, tau: float):
        self.tau = check_knob(self.name, tau)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.tau == 0:
            return logits
        values, ids = self._kept_top(logits)
        return torch.full_like(logits, NEG_INF).scatter(-1, ids, values)

    def narrows(self, V: int) -> bool:
        """Whether it leaves at most TOP_N of V tokens (then ``candidates`` is worth it)."""
        return self.tau > 0 and V > self.TOP_N

    def candidates(self, logits: Tensor, width: int = 0) -> tuple[Tensor, Tensor]:
        """``self(logits)`` [B, V] in short: (values, ids) [B, TOP_N], each row's kept tokens first,
        in token order, then removed ones (-inf), as TopK.candidates; the stages after it run on
        these (sample()), not on all V."""
        values, ids = self._kept_top(logits)
        return _kept_first(values, ids, logits.size(-1))

    def _kept_top(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The top TOP_N (values, ids) [B, n], largest first, the ones Top-H removes at -inf."""
        x = _wide(logits)
        values, ids = torch.topk(x, min(self.TOP_N, x.size(-1)), dim=-1)   # (B, n), sorted
        normed = values - values.logsumexp(dim=-1, keepdim=True)           # as torch's Categorical
        q = torch.softmax(normed, dim=-1)
        tau = -(normed.clamp(min=torch.finfo(x.dtype).min) * q).sum(dim=-1, keepdim=True) * self.tau
        keep = torch.cumsum(-q * torch.log(q), dim=-1) <= tau              # 0·log 0 = nan: False
        keep[:, 0] = True
        return torch.where(keep, logits.gather(-1, ids), NEG_INF), ids


def _kept_first(values: Tensor, ids: Tensor, V: int) -> tuple[Tensor, Tensor]:
    """(values, ids) [B, n] reordered: the kept (> -inf) first, in token order, then the removed."""
    order = torch.where(values > NEG_INF, ids, ids + V).argsort(dim=-1)
    return values.gather(-1, order), ids.gather(-1, order)


class TopK(Stage):
    """Keep the logits >= the k-th largest, ties at the boundary kept, as HF's ``TopKLogitsWarper``.

    k >= -1; k <= 0 (vLLM's -1 too) or k >= V keeps every token.
    """
    name = "top_k"

    def __init__(self, k: int):
        self.k = check_knob(self.name, k)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.k <= 0 or self.k >= logits.size(-1):
            return logits
        kth = torch.topk(logits, self.k, dim=-1).values[..., -1:]  # (B, 1)
        return _remove(logits, logits < kth)

    def narrows(self, V: int) -> bool:
        """Whether it leaves fewer than V tokens (then ``candidates`` is worth it)."""
        return 0 < self.k < V

    def candidates(self, logits: Tensor, width: int = 0) -> tuple[Tensor, Tensor]:
        """``self(logits)`` [B, V] in short, for 0 < k < V: (values, ids) [B, n], each row's kept tokens
        first, in token order, then removed ones (at -inf). n = max(k + 1, width), at most V, unless a
        row keeps more (ties at the k-th value): then the most a row keeps. A row with fewer than k
        tokens left keeps those (its k-th value is -inf, and a removed token stays removed).
        """
        V = logits.size(-1)
        top = torch.topk(logits, min(max(self.k + 1, width), V), dim=-1)  # (B, n), largest first
        kth = top.values[:, self.k - 1:self.k]                            # (B, 1)
        last = top.values[:, -1:]
        if top.values.size(-1) < V and ((last >= kth) & (last > NEG_INF)).any():  # a row keeps n+
            n_kept = ((logits >= kth) & (logits > NEG_INF)).sum(dim=-1).amax()
            top = torch.topk(logits, max(int(n_kept), width), dim=-1)
        remove = (top.values < kth) | (top.values == NEG_INF)            # as __call__ gives
        return _kept_first(_remove(top.values, remove), top.indices, V)


class TopP(Stage):
    """Nucleus sampling (Holtzman et al. 2019), as HF's ``TopPLogitsWarper``.

    Keep the smallest set of most likely tokens whose probability reaches p: remove token j when the
    tokens ranked above it already reach p, ``Σ_{i ranked above j} prob[i] >= p``. So the token that
    crosses p is kept, and the most likely token always is. p in (0, 1]; p = 1 keeps every token.
    (HF's form of the same rule: remove where the ascending cumulative probability is <= 1 - p.)
    Tokens of equal probability are ranked in the order torch's sort gives, as in HF.
    """
    name = "top_p"

    def __init__(self, p: float):
        self.p = check_knob(self.name, p)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.p == 1.0:
            return logits
        values, ids = _sorted_kept(logits)                  # (B, n), most likely first
        probs = softmax_probs(values)
        mass_above = probs.cumsum(dim=-1) - probs           # (B, n)
        return _remove_at(logits, ids, mass_above >= self.p)


class MinP(Stage):
    """Min-p sampling (Nguyen et al. 2024), as HF's ``MinPLogitsWarper``.

    Remove the tokens with ``prob[j] < p · max_i prob[i]``. p in [0, 1]; p = 0 keeps every token, p = 1
    only the most likely one(s). The most likely token is never removed. (Probabilities in float64,
    _probs64; HF's are float32: they differ only for a token within float32 rounding of the cut.)
    """
    name = "min_p"

    def __init__(self, p: float):
        self.p = check_knob(self.name, p)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.p == 0.0:
            return logits
        probs = _probs64(logits)
        return _remove(logits, probs < self.p * probs.amax(dim=-1, keepdim=True))


class TypicalP(Stage):
    """Locally typical sampling (Meister et al. 2022), as HF's ``TypicalLogitsWarper``.

    With the entropy ``H = -Σ prob · log prob``, rank tokens by ``|-log prob[j] - H|``, smallest first,
    and keep the shortest prefix whose probability reaches p, with any token tied with its last one;
    the first token of this ranking is always kept. p in (0, 1]; p = 1 keeps every token.
    """
    name = "typical_p"

    def __init__(self, p: float):
        self.p = check_knob(self.name, p)

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


class EpsilonCutoff(Stage):
    """Epsilon sampling (Hewitt et al. 2022), as HF's ``EpsilonLogitsWarper`` with
    min_tokens_to_keep 1: remove the tokens of probability < ε, except those tied with the top
    logit. ε in [0, 1); 0 = off."""
    name = "epsilon_cutoff"

    def __init__(self, epsilon: float):
        self.epsilon = check_knob(self.name, epsilon)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.epsilon == 0:
            return logits
        probs = _probs64(logits)
        return _remove(logits, (probs < self.epsilon) & ~_not_below_kth(logits))


class EtaCutoff(Stage):
    """Eta sampling (Hewitt et al. 2022), as HF's ``EtaLogitsWarper`` with min_tokens_to_keep 1:
    η = min(ε, √ε · e^−H), H the natural-log entropy of the row's distribution; remove the tokens
    of probability < η, except those tied with the top logit. ε in [0, 1); 0 = off."""
    name = "eta_cutoff"

    def __init__(self, epsilon: float):
        self.epsilon = check_knob(self.name, epsilon)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        if self.epsilon == 0:
            return logits
        eta = (math.sqrt(self.epsilon) * torch.exp(-_entropy(_logprobs64(logits))))
        eta = eta.clamp(max=self.epsilon)
        return _remove(logits, (_probs64(logits) < eta) & ~_not_below_kth(logits))


class XTC(Stage):
    """XTC, "exclude top choices", as llama.cpp's ``xtc`` (p-e-w's design): with probability
    ``probability`` per row and step, remove every token of probability >= ``threshold`` except
    the least likely of them, when there are at least two (so the most likely token is no longer
    certain to win; threshold > 0.5 can never find two). Probabilities are those of the logits it
    receives (llama.cpp: after the filters, before temperature).

    The coin: ``coins`` [B], one uniform u in [0, 1) per row, drawn by the stack from the row's
    generator before the token's draw (so a seed reproduces both); it acts iff u < probability.
    Without coins (``SamplerStack.stages``, --show_distribution) it shows what it removes when it
    acts. Of several equally least likely tokens, the one of highest id stays."""
    name = "xtc"
    inputs = ("coins",)

    def __init__(self, threshold: float, probability: float):
        self.threshold = check_knob("xtc_threshold", threshold)
        self.probability = check_knob("xtc_probability", probability)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, tokenizer: Any = None,
                      vocab_size: int | None = None) -> XTC:
        return cls(settings.xtc_threshold, settings.xtc_probability)

    def __call__(self, logits: Tensor, history: History | None = None,
                 coins: Tensor | None = None) -> Tensor:
        if self.probability == 0 or self.threshold > 0.5:
            return logits
        above = (_probs64(logits) >= self.threshold) & (logits > NEG_INF)
        act = above.sum(dim=-1, keepdim=True) >= 2
        if coins is not None:
            act &= (coins.to(logits.device) < self.probability)[:, None]
        lowest = torch.where(above, logits, math.inf).amin(dim=-1, keepdim=True)
        ids = torch.arange(logits.size(-1), device=logits.device)
        stays = torch.where(above & (logits == lowest), ids, -1).amax(dim=-1, keepdim=True)
        return _remove(logits, act & above & (ids != stays))


class Mirostat(Stage):
    """Mirostat 2.0 (Basu et al. 2021), as llama.cpp's ``mirostat_v2``: keep the tokens whose
    surprise −log2 p is at most the row's μ (the most likely one if none); after the draw,
    μ ← μ − η·(−log2 q(token) − τ), q the truncated, renormalised distribution the token was
    drawn from (llama.cpp's and text-generation-webui's choice; the paper's code uses p).

    μ starts at 2τ for each row and lives in ``history.state["mirostat_mu"]`` (float64 [B]; NaN
    for a row that has not drawn yet), so batched rows and rows that join or leave keep their own.
    It must be the last stage (the settings' orders put it there): q is then the distribution of
    the draw, whose log-prob ``after_draw`` reads. Showing the stage (``stages``) changes no μ.
    """
    name = "mirostat"
    STATE = "mirostat_mu"

    def __init__(self, tau: float, eta: float):
        self.tau = check_knob("mirostat_tau", tau)
        self.eta = check_knob("mirostat_eta", eta)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, tokenizer: Any = None,
                      vocab_size: int | None = None) -> Mirostat:
        return cls(settings.mirostat_tau, settings.mirostat_eta)

    def mu(self, history: History | None, logits: Tensor) -> Tensor:
        """Each row's μ (float64 [B]): its state, or 2τ where it has none yet."""
        h = _require_history(history, logits, "Mirostat", build=False)
        mu = h.state.get(self.STATE)
        if mu is None:
            return torch.full((h.batch_size,), 2 * self.tau, dtype=torch.float64,
                              device=logits.device)
        return torch.where(torch.isnan(mu), 2 * self.tau, mu)

    def __call__(self, logits: Tensor, history: History | None = None) -> Tensor:
        logp = _logprobs64(logits)
        keep = (-logp / LN2 <= self.mu(history, logits)[:, None]) & (logp > NEG_INF)
        keep.scatter_(-1, logits.argmax(dim=-1, keepdim=True), True)  # the first argmax: surprise
        return _remove(logits, ~keep)                                 # lowest, kept if none is

    def after_draw(self, history: History, logits: Tensor, tokens: Tensor,
                   processed_logprobs: Tensor) -> None:
        """μ ← μ − η·(surprise of the drawn token in bits − τ)."""
        surprise = -processed_logprobs.double() / LN2
        history.state[self.STATE] = self.mu(history, logits) - self.eta * (surprise - self.tau)


# stage name (the settings' orders) -> its processor
STAGES: dict[str, type[Stage]] = {p.name: p for p in (
    ClassifierFreeGuidance, LogitBias, RepetitionPenalty, PresencePenalty, FrequencyPenalty, DRY,
    Temperature, TopNSigma, TopH, TopK, TopP, MinP, TypicalP, EpsilonCutoff, EtaCutoff, XTC,
    Mirostat)}
