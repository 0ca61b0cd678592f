"""The sampler stack: processors applied in order, then an exact draw of one token per row.

    h = History(tokens=ids, prompt_lens=lens)            # ids [B, T] = prompt + generated so far
    stack = SamplerStack.from_settings(settings, tokenizer=tok)  # settings: a SamplerSettings
    tokens, info = stack.sample(logits, h, generator=g)  # tokens [B]; info.logprobs [B], ...
    h.append(tokens)                                     # O(B) update of what the penalties read

``from_settings`` builds the stack from a SamplerSettings (minilm.sampling.settings: the knobs,
their ranges and the stage orders) with the processor of each stage (stages.STAGES).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minilm.errors import SettingError
from minilm.sampling.history import History
from minilm.sampling.settings import SamplerSettings
from minilm.sampling.stages import (
    STAGES,
    XTC,
    EpsilonCutoff,
    EtaCutoff,
    MinP,
    Mirostat,
    Processor,
    Temperature,
    TopH,
    TopK,
    TopP,
    TypicalP,
    softmax_probs,
)

NEG_INF = float("-inf")
LOGPROBS_MODES = ("raw", "processed")

# The processors that read nothing but each row's logit values (not token ids, V or the History),
# so give the same kept set on a row's candidate tokens (kept first, in token order) as on the whole
# row with the rest at -inf: after a TopK or TopH, sample() runs them on its kept tokens only. Top-H
# ranks with topk (the same sorted values either way); the probability thresholds sum the row in
# float64 (stages._probs64), which rounds at ~1e-16 whichever order the tokens come in.
ON_CANDIDATES = (Temperature, TopK, TopP, TypicalP, TopH, MinP, EpsilonCutoff, EtaCutoff, XTC,
                 Mirostat)
# The fewest candidates a row gets (the rest padded with removed tokens): torch's softmax sums a row
# shorter than a SIMD register (8 or 16 floats) in another order than a longer one, so a row's
# probabilities would depend on how many candidates the other rows of the batch need; from 64 on,
# the padding (-inf) changes no bit.
MIN_CANDIDATES = 64


def check_logprobs_mode(mode: str) -> None:
    """A SettingError unless `mode` is one of LOGPROBS_MODES."""
    if mode not in LOGPROBS_MODES:
        raise SettingError("logprobs_mode", f"logprobs_mode must be one of {list(LOGPROBS_MODES)}, "
                                            f"got {mode!r}")


class SampleInfo:
    """The log-probabilities that come with the sampled tokens.

    logprobs:           FloatTensor[B], the token's log-prob under the raw model distribution (T = 1,
                        before any processor): what the OpenAI API returns as ``logprobs``. Computed
                        when first read (a log-sum-exp over the vocabulary nobody may ask for).
    processed_logprobs: FloatTensor[B], its log-prob under the final processed distribution.
    top_ids:            LongTensor[B, N], the N most likely tokens of the raw distribution, or of the
                        processed one with logprobs_mode="processed" (None unless top_logprobs=N > 0).
    top_logprobs:       FloatTensor[B, N], their log-probs under that distribution (-inf for a token
                        the processors removed).
    """

    def __init__(self, logprobs: Tensor | Callable[[], Tensor], processed_logprobs: Tensor,
                 top_ids: Tensor | None = None, top_logprobs: Tensor | None = None):
        self._logprobs = logprobs
        self.processed_logprobs = processed_logprobs
        self.top_ids, self.top_logprobs = top_ids, top_logprobs

    @property
    def logprobs(self) -> Tensor:
        if callable(self._logprobs):
            self._logprobs = self._logprobs()
        return self._logprobs

    def __repr__(self) -> str:
        return (f"SampleInfo(logprobs={self.logprobs}, processed_logprobs={self.processed_logprobs}"
                f", top_ids={self.top_ids}, top_logprobs={self.top_logprobs})")


class SamplerStack:
    """A list of processors applied in order, then an exact draw from softmax(processed logits)."""

    def __init__(self, processors: Sequence[Processor] = ()):
        self.processors = list(processors)

    def __repr__(self) -> str:
        return f"SamplerStack([{', '.join(_stage_name(p) for p in self.processors)}])"

    @classmethod
    def from_settings(cls, settings: SamplerSettings | None = None, /, *, tokenizer: Any = None,
                      vocab_size: int | None = None, **knobs: Any) -> SamplerStack:
        """The stack for these settings: the stages in use (switch knob off its no-op value), in
        the settings' order (``SamplerSettings.pipeline``). Knobs may be given as keywords, alone
        (``from_settings(**{knob: value})``, as the README's examples) or over a SamplerSettings.

        ``tokenizer`` (encode/decode) turns DRY's breaker texts into token sequences;
        ``vocab_size``, if given, lets the logit bias's keys be checked now. A bad setting is a
        SettingError naming it."""
        if settings is None:
            settings = SamplerSettings(**knobs)
        elif knobs:
            settings = dataclasses.replace(settings, **knobs)
        return cls([STAGES[name].from_settings(settings, tokenizer=tokenizer, vocab_size=vocab_size)
                    for name in settings.pipeline()])

    def stages(self, logits: Tensor, history: History | None = None,
               unconditional_logits: Tensor | None = None) -> list[tuple[str, Tensor]]:
        """``[("raw", logits), (name, logits after that stage), ...]``: what each processor does.
        Nothing is drawn and no state changes: XTC shows what it removes when its coin says act,
        Mirostat truncates at each row's current μ."""
        out = [("raw", logits)]
        inputs = dict(unconditional_logits=unconditional_logits)
        for proc in self.processors:
            logits = _call(proc, logits, history, inputs)
            out.append((_stage_name(proc), logits))
        return out

    def apply(self, logits: Tensor, history: History | None = None,
              unconditional_logits: Tensor | None = None) -> Tensor:
        """The processed logits [B, V]: every processor in order (as ``stages``)."""
        return self.stages(logits, history, unconditional_logits)[-1][1]

    def sample(self, logits: Tensor, history: History | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               top_logprobs: int = 0, logprobs_mode: str = "raw",
               unconditional_logits: Tensor | None = None) -> tuple[Tensor, SampleInfo]:
        """Draw one token per row from softmax(apply(logits)): tokens [B] and their ``SampleInfo``.

        ``generator``: None (the History's generators if it has them, else torch's global RNG),
        one torch.Generator for the batch, or a list of B generators, one per row, so that a row's
        tokens depend only on its own seed and logits, whatever else is in the batch.
        ``top_logprobs`` = N > 0 also returns the N most likely tokens of the raw distribution
        (``logprobs_mode="raw"``, what the OpenAI API reports) or of the processed one
        (``"processed"``, vLLM's processed_logprobs). ``unconditional_logits``: classifier-free guidance's (see
        ClassifierFreeGuidance). Stateful stages update the History after the draw (Mirostat).

        A row with no token left (all -inf) or with a NaN/+inf logit raises ValueError on CPU. On
        an accelerator that check would cost a device sync per step: there such a row's token is
        -1 (never a token id) and its log-probs NaN, for the caller, who reads the tokens anyway.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be a FloatTensor[B, V], got shape {tuple(logits.shape)}")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        check_logprobs_mode(logprobs_mode)
        if generator is None and history is not None:
            generator = history.generators
        inputs = dict(unconditional_logits=unconditional_logits)
        if any("coins" in getattr(p, "inputs", ()) for p in self.processors):
            inputs["coins"] = _uniform(logits.size(0), generator, logits.device)  # before the draw
        processed, ids = self._candidates(logits, history, inputs)  # (B, n), ids (B, n) or None
        drawable = torch.isfinite(processed.amax(dim=-1))           # (B,); amax propagates NaN
        if processed.device.type == "cpu" and not drawable.all():   # free on CPU: no sync there
            raise ValueError(f"no token left to sample in batch row(s) "
                             f"{(~drawable).nonzero()[:, 0].tolist()}: every logit was removed "
                             "(-inf), or one is NaN or +inf")
        probs = softmax_probs(processed)                                # (B, n)
        picked = _draw(probs, generator).clamp(max=probs.size(-1) - 1)[:, None]  # (B, 1)
        tokens = (picked if ids is None else ids.gather(-1, picked))[:, 0]       # (B,)
        tokens = torch.where(drawable, tokens, -1)

        info = SampleInfo(_raw_logprobs(logits, tokens), probs.gather(-1, picked)[:, 0].log())
        if top_logprobs and logprobs_mode == "raw":
            raw = logits.float()
            top = raw.topk(min(top_logprobs, raw.size(-1)), dim=-1)
            info.top_ids = top.indices
            info.top_logprobs = top.values - torch.logsumexp(raw, dim=-1, keepdim=True)
        elif top_logprobs:  # the processed distribution over the candidates: the rest is removed
            top = probs.log().topk(min(top_logprobs, probs.size(-1)), dim=-1)
            info.top_ids = top.indices if ids is None else ids.gather(-1, top.indices)
            info.top_logprobs = top.values
        for proc in self.processors:
            if hasattr(proc, "after_draw"):
                proc.after_draw(history, logits, tokens, info.processed_logprobs)
        return tokens, info

    def _candidates(self, logits: Tensor, history: History | None,
                    inputs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor | None]:
        """``apply(logits, history)``, cheaper: (processed [B, V], None), or after a TopK or TopH
        (values, ids) [B, n] of each row's candidate tokens (the processed logits of ``ids``; every
        other token is removed).

        From a TopK(k) or a TopH on (a stage that ``narrows``), the processors of ON_CANDIDATES,
        then sample()'s softmax and draw, work on the tokens it kept (k + ties; Top-H's 100), not on
        all V: on a 50k vocabulary, sorting and scanning the removed tokens was most of a step's
        sampling time. Each token keeps the value apply() gives it, except that which of two
        exactly tied tokens top-p or typical-p ranks first is torch's choice on either path. Any
        other processor gets the full logits [B, V] back.
        """
        V, inputs = logits.size(-1), inputs or {}
        x, ids = logits, None
        for proc in self.processors:
            if ids is not None and type(proc) not in ON_CANDIDATES:
                x, ids = x.new_full((x.size(0), V), NEG_INF).scatter(-1, ids, x), None  # (B, V)
            if ids is None and hasattr(proc, "narrows") and proc.narrows(V):
                x, ids = proc.candidates(x, MIN_CANDIDATES)
            else:
                x = _call(proc, x, history, inputs)
        return x, ids


def _call(proc: Processor, logits: Tensor, history: History | None,
          inputs: dict[str, Any]) -> Tensor:
    """proc(logits, history), with the per-step inputs it asks for (``inputs``) as keywords."""
    wanted = getattr(proc, "inputs", ())
    return proc(logits, history, **{k: inputs.get(k) for k in wanted})


def _stage_name(proc: Processor) -> str:
    return getattr(proc, "name", None) or getattr(proc, "__name__", None) or type(proc).__name__


def _raw_logprobs(logits: Tensor, tokens: Tensor) -> Callable[[], Tensor]:
    """The tokens' log-probs under log_softmax(logits), computed when called."""
    def compute() -> Tensor:
        raw = logits.float()
        picked = raw.gather(-1, tokens.clamp(min=0)[:, None])[:, 0]
        return torch.where(tokens >= 0, picked - torch.logsumexp(raw, dim=-1), torch.nan)
    return compute


def _uniform(n: int, generator: torch.Generator | Sequence[torch.Generator] | None,
             device: torch.device) -> Tensor:
    """One u ~ U[0, 1) per row, float64: from each row's generator when given a list of them."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for a batch of {n} rows")
        return torch.stack([torch.rand((), dtype=torch.float64, device=device, generator=g)
                            for g in generator])
    return torch.rand(n, dtype=torch.float64, device=device, generator=generator)


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
    u = _uniform(B, generator, probs.device)
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
    b = b.clamp(max=n_blocks - 1)  # a row of NaN (no token left, on an accelerator) stays in range
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)), zero)  # mass of blocks < b
    inner_cdf = blocks.gather(1, b[:, :, None].expand(B, 1, block))[:, 0].double().cumsum(dim=-1)
    rest = torch.minimum(target - before, torch.nextafter(inner_cdf[:, -1:], zero))  # < mass of block b
    return (b * block + torch.searchsorted(inner_cdf, rest, right=True))[:, 0]
