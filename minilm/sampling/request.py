"""A Request: prompts that decode together with one sampler, and what each step of them drew.

A Request checks its arguments when it is made (ValueError), before any step; a RunningBatch
(batch.py) decodes it, alone (generate(), complete()) or beside others (the server). Choices:
- `sampler=None` is greedy decoding (HF's default, do_sample=False): SamplerStack([Temperature(0)]).
- `seed` is per request: an int gives *every* row a torch.Generator seeded with it, a list gives row
  i seed[i]. A row's tokens then depend only on its prompt and seed, never on the rest of the batch
  (so N samples of one prompt need N seeds, e.g. [s, s + 1, ...]). None uses torch's global RNG.
- The returned tokens include the token that ended a row: the EOS token, or the last token of a stop
  sequence (as HF's generate and its stop_strings; strip them for display if wanted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from minilm.model.gpt import GPT
from minilm.sampling.history import History
from minilm.sampling.stack import SampleInfo, SamplerStack, check_logprobs_mode
from minilm.sampling.stages import Temperature, unconditional_prompt

Prompts = Sequence[Sequence[int]] | Sequence[int] | Tensor
Stop = Sequence[str | Sequence[int]]


def greedy() -> SamplerStack:
    """The sampler used when none is given: temperature 0 keeps only the top logit."""
    return SamplerStack([Temperature(0.0)])


@dataclass
class RowToken:
    """One row's token of a Step, as plain Python values."""
    row: int
    token: int
    logprob: float
    processed_logprob: float
    top: list[tuple[int, float]]  # (token, log-prob) of the top_ids; [] when logprobs=0
    finish_reason: str | None


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

    def row_tokens(self) -> list[RowToken]:
        """The step row by row, in Python values (one host transfer per tensor)."""
        info = self.info
        tops = [[] for _ in self.rows] if info.top_ids is None else \
            [list(zip(i, lp)) for i, lp in zip(info.top_ids.tolist(), info.top_logprobs.tolist())]
        return [RowToken(*values) for values in zip(
            self.rows, self.tokens.tolist(), info.logprobs.tolist(),
            info.processed_logprobs.tolist(), tops, self.finish_reasons)]


@dataclass
class Completion:
    """What one prompt produced (complete's result); logprobs per token as in SampleInfo."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    processed_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # [] if logprobs=0
    finish_reason: str = "length"


class Request:
    """Prompts that decode together with one sampler: a generate() call, or one prompt of a server
    request with its n choices. The arguments are checked here (ValueError), before any step.

    It holds what each row generated, the History of its running rows (what the penalties read;
    it carries their generators and sampler state); a RunningBatch decodes it. With classifier-free
    guidance (a sampler with a guidance stage) each row r has an unconditional twin, row n + r of
    the batch: its context is `negative[r]` (the negative prompt; by default the prompt's last
    token, as HF's generate) and then the tokens row r drew. `error` is the exception that ended it
    early (a row with no token left to sample), `cancelled` says that its caller went away.
    """

    def __init__(self, model: GPT, prompt_ids: Prompts, max_new_tokens: int,
                 sampler: SamplerStack | None = None, eos_id: int | None = None,
                 stop: Stop | None = None, seed: int | Sequence[int] | None = None,
                 logprobs: int = 0, decode: Callable[[list[int]], str] | None = None,
                 logprobs_mode: str = "raw", keep_prompt_states: bool = False,
                 negative_prompt: Prompts | None = None):
        vocab_size = model.config.vocab_size
        self.prompts = prompt_lists(prompt_ids, vocab_size)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {logprobs}")
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size - 1}]")
        check_logprobs_mode(logprobs_mode)
        self.stopper = _StopMatcher(stop or (), decode)
        if sampler is None:
            sampler, seed = greedy(), None  # nothing to draw: no generators needed
        self.negative = unconditional_rows(sampler, negative_prompt, self.prompts, vocab_size)
        self.device = next(model.parameters()).device
        self.generators = _generators(seed, len(self.prompts), self.device)
        self.max_new_tokens, self.sampler, self.eos_id = max_new_tokens, sampler, eos_id
        self.logprobs, self.logprobs_mode = logprobs, logprobs_mode
        self.generated: list[list[int]] = [[] for _ in self.prompts]
        self.running: list[int] = []  # rows in the batch, in slot order
        self.history: History | None = None  # None while a sampling group holds it
        self.keep_prompt_states = keep_prompt_states
        self.prompt_states: list[Tensor] | None = None  # per row [prompt window, d], if kept
        self.error: Exception | None = None
        self.cancelled = False

    def __repr__(self) -> str:
        return f"Request({len(self.prompts)} rows, {len(self.running)} running)"

    @property
    def n_rows(self) -> int:
        """The rows it takes in a batch: one per prompt, and with guidance each one's twin."""
        return len(self.prompts) * (1 if self.negative is None else 2)

    def _windows(self, block_size: int) -> list[list[int]]:
        """What its rows prefill: each prompt's last block_size tokens, then the twins'."""
        return [c[-block_size:] for c in self.prompts + (self.negative or [])]

    def _base(self, row: int) -> int:
        """The prompt a row of the batch belongs to (a twin's is its conditional row's)."""
        return row % len(self.prompts)

    def _context(self, row: int) -> list[int]:
        """The tokens a row of the batch has seen so far."""
        r = self._base(row)
        return (self.prompts if row == r else self.negative)[r] + self.generated[r]

    def _join(self) -> None:
        """Its rows have slots in a batch: every row runs (fills, then decodes)."""
        self.running = list(range(len(self.prompts)))

    def _start(self) -> None:
        """Before the first draw: the History holds the whole prompts (left-padded) and the rows'
        generators."""
        self.history = prompt_history([self.prompts[r] for r in self.running], self.device,
                                       self.generators)

    def _sample(self, logits: Tensor, unconditional: Tensor | None = None) -> Step:
        """Draw each running row's next token from its logits [n, V] (and its twin's, with
        guidance); record it; drop the rows that finished."""
        tokens, info = self.sampler.sample(logits, self.history, top_logprobs=self.logprobs,
                                           logprobs_mode=self.logprobs_mode,
                                           unconditional_logits=unconditional)
        self.history.append(tokens)
        step, keep = self._record(tokens, tokens.tolist(), info)
        self._keep(keep)
        return step

    def _record(self, tokens: Tensor, drawn: list[int], info: SampleInfo
                ) -> tuple[Step, list[int]]:
        """Append each running row's token (`drawn`: `tokens` as a list) to what it generated:
        the Step, and which rows go on (indices into `running`); finished: EOS, a stop sequence,
        max_new_tokens."""
        if min(drawn) < 0:  # an accelerator's sampler marks a row it could not draw for
            bad = [i for i, t in enumerate(drawn) if t < 0]
            raise ValueError(f"no token left to sample in row(s) {bad}: every logit was removed "
                             "(-inf), or one is NaN or +inf")
        reasons: list[str | None] = []
        for row, token in zip(self.running, drawn):
            out = self.generated[row]
            out.append(token)
            reasons.append("stop" if token == self.eos_id or self.stopper(out) else
                           "length" if len(out) == self.max_new_tokens else None)
        step = Step(list(self.running), tokens, info, reasons)
        return step, [i for i, r in enumerate(reasons) if r is None]

    def _keep(self, keep: list[int]) -> None:
        """Keep only these running rows (indices into `running`)."""
        if len(keep) == len(self.running):
            return
        if self.history is not None:
            self.history = self.history.select(keep) if keep else None
        self.running = [self.running[i] for i in keep]


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


def prompt_history(prompts: list[list[int]], device: torch.device,
                    generators: list[torch.Generator] | None = None) -> History:
    """The History of prompts before any token is drawn (left-padded: what the penalties read)."""
    tokens, mask = _left_pad([torch.tensor(p, device=device) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts], device=device)
    return History(tokens, prompt_lens=lens, attention_mask=mask, generators=generators)


def guided(sampler: SamplerStack) -> bool:
    """Whether the stack has classifier-free guidance: a stage that reads the unconditional
    rows' logits."""
    return any("unconditional_logits" in getattr(p, "inputs", ()) for p in sampler.processors)


def unconditional_rows(sampler: SamplerStack, negative_prompt: Prompts | None,
                        prompts: list[list[int]], vocab_size: int) -> list[list[int]] | None:
    """Each row's unconditional context when the sampler guides (else None): the negative prompt
    (one for every row, or one per row), by default the prompt's last token (unconditional_prompt,
    HF's rule)."""
    if not guided(sampler):
        if negative_prompt is not None:
            raise ValueError("negative_prompt is classifier-free guidance's unconditional context: "
                             "it needs a sampler with guidance (guidance_scale other than 1)")
        return None
    if negative_prompt is None:
        return [unconditional_prompt(None, p, None, vocab_size) for p in prompts]
    rows = prompt_lists(negative_prompt, vocab_size)
    if len(rows) == 1:
        return rows * len(prompts)
    if len(rows) != len(prompts):
        raise ValueError(f"got {len(rows)} negative prompts for {len(prompts)} prompts")
    return rows


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
