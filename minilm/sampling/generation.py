"""Autoregressive generation: prefill the prompts once, then one token per step from the KV cache.

    prompt ids → model (raw logits, T = 1) → SamplerStack (processors, draw) → token → model ...

    for step in generate(model, [[1, 2, 3], [4, 5]], 50, sampler=stack, eos_id=0, seed=1337):
        step.rows, step.tokens, step.info.logprobs   # the rows still running and what each drew
    results = complete(model, prompts, 50, ...)      # the same, collected: a Completion per prompt

Continuous batching (the server): a RunningBatch decodes the rows of any number of Requests
together. A Request joins between two steps (`admit`: its own prefill, then its first tokens) and
decodes with the others from the next step on; each row leaves when it finishes. generate() is one
Request alone in a batch of its size.

    batch = RunningBatch(model, max_rows=16)
    first = batch.admit(Request(model, prompts, 50, sampler=stack, seed=[1, 2]))
    while batch.requests:
        for request, step in batch.step(): ...       # a Step, or the exception that ended it

Whatever the caller did to the model before, generation runs it in eval mode (no dropout) and
without autograd, and leaves its mode as it found it: each prefill and step switches the mode for
its own forward, never across a yield into the caller's code. On CPU it switches the model to the
weight layout that decodes fastest there (GPT.set_decode_layout) itself.

Choices where there were several:
- `sampler=None` is greedy decoding (HF's default, do_sample=False): SamplerStack([Temperature(0)]).
- The KV cache is laid out per slot (vLLM's idea without the paging): the row in slot s holds its
  window's keys and values at columns [0, length[s]), right-padded, and a decode step writes each
  row's new token at its own column with its own position. So a row computes what it would compute
  alone, and a newcomer is prefilled straight into a free slot, whatever the others' lengths.
- `seed` is per request: an int gives *every* row a torch.Generator seeded with it, a list gives row
  i seed[i]. A row's tokens then depend only on its prompt and seed, never on the rest of the batch
  (so N samples of one prompt need N seeds, e.g. [s, s + 1, ...]). None uses torch's global RNG.
- The returned tokens include the token that ended a row: the EOS token, or the last token of a stop
  sequence (as HF's generate and its stop_strings; strip them for display if wanted).
- Past block_size the window slides by one token per token, as nanoGPT's idx[:, -block_size:]:
  every token is predicted from exactly the last block_size tokens, so its logprobs are the
  model's on that window. Positions are learned and absolute (wpe), so a window that moves gives
  every token a new position and every cached key and value changes; a rolling cache that drops
  the oldest column would be exact only with relative positions and one layer (past the first
  layer a kept token's keys and values depend on the dropped one). So a row past block_size
  re-fills its slot with its last block_size - 1 tokens before each step (a forward over the
  window per token, as nanoGPT pays for every token), while the rows still inside their window
  decode from the cache in the same step. Cropping to the last block_size // 2 tokens and growing
  back (a context shift) would re-fill once per block_size // 2 tokens, but predicts from half to
  all of the window, so its logprobs are not the model's. The penalties see the whole history.
- A row that finishes leaves the batch: the rows after it move down a slot, and its history and
  generator are dropped, so later steps cost what the remaining rows cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from minilm.model.gpt import GPT, KVCache
from minilm.sampling.history import History
from minilm.sampling.stack import SampleInfo, SamplerStack, check_logprobs_mode
from minilm.sampling.stages import Temperature

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

    It holds what each row generated, the History of its running rows (what the penalties read)
    and their generators; a RunningBatch decodes it. `error` is the exception that ended it early
    (a row with no token left to sample), `cancelled` says that its caller went away.
    """

    def __init__(self, model: GPT, prompt_ids: Prompts, max_new_tokens: int,
                 sampler: SamplerStack | None = None, eos_id: int | None = None,
                 stop: Stop | None = None, seed: int | Sequence[int] | None = None,
                 logprobs: int = 0, decode: Callable[[list[int]], str] | None = None,
                 logprobs_mode: str = "raw"):
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
        self.device = next(model.parameters()).device
        self.generators = _generators(seed, len(self.prompts), self.device)
        self.max_new_tokens, self.sampler, self.eos_id = max_new_tokens, sampler, eos_id
        self.logprobs, self.logprobs_mode = logprobs, logprobs_mode
        self.generated: list[list[int]] = [[] for _ in self.prompts]
        self.running: list[int] = []  # rows in the batch, in slot order
        self.history: History | None = None
        self.error: Exception | None = None
        self.cancelled = False

    def __repr__(self) -> str:
        return f"Request({len(self.prompts)} rows, {len(self.running)} running)"

    def _start(self) -> None:
        """Join a batch: every row runs; the History holds the whole prompts (left-padded)."""
        self.history = _prompt_history(self.prompts, self.device)
        self.running = list(range(len(self.prompts)))

    def _sample(self, logits: Tensor) -> Step:
        """Draw each running row's next token from its logits [n, V]; record it; drop the rows
        that finished (EOS, stop sequence, max_new_tokens)."""
        tokens, info = self.sampler.sample(logits, self.history, generator=self.generators,
                                           top_logprobs=self.logprobs,
                                           logprobs_mode=self.logprobs_mode)
        self.history.append(tokens)
        reasons: list[str | None] = []
        for row, token in zip(self.running, tokens.tolist()):
            out = self.generated[row]
            out.append(token)
            reasons.append("stop" if token == self.eos_id or self.stopper(out) else
                           "length" if len(out) == self.max_new_tokens else None)
        step = Step(list(self.running), tokens, info, reasons)
        keep = [i for i, r in enumerate(reasons) if r is None]
        if len(keep) < len(reasons):
            self._keep(keep)
        return step

    def _keep(self, keep: list[int]) -> None:
        """Keep only these running rows (indices into `running`)."""
        self.history = self.history.select(keep) if keep else None
        self.running = [self.running[i] for i in keep]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in keep]

    def _context(self, row: int) -> list[int]:
        return self.prompts[row] + self.generated[row]


class RunningBatch:
    """The rows decoding together, from any number of Requests: continuous batching.

    The KV cache has `max_rows` slots of `max_len` columns (default block_size). Running rows fill
    slots [0, n) in the order they were admitted, a Request's rows side by side; slot s holds the
    keys and values of its row's context window at columns [0, lengths[s]), and `last[s]` is the
    token it drew last, which the next step feeds.
    """

    def __init__(self, model: GPT, max_rows: int, max_len: int | None = None,
                 decode_layout: bool = True):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        param = next(model.parameters())
        if decode_layout and param.device.type == "cpu":  # on CUDA it gains nothing (fp32, batch
            model.set_decode_layout(True)                 # 32: 18% slower)
        self.model = model
        self.block_size = model.config.block_size
        self.cache = KVCache(model.config, max_rows, max_len or self.block_size, param.device,
                             param.dtype)
        self.slots: list[tuple[Request, int]] = []  # (request, row) of each running slot
        self.lengths: list[int] = []  # columns each slot holds
        self.last = torch.zeros(0, dtype=torch.long, device=param.device)  # [n]

    @property
    def max_rows(self) -> int:
        return self.cache.k.size(1)

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.slots)

    @property
    def requests(self) -> list[Request]:
        """The Requests with rows in the batch, in slot order."""
        return list(dict.fromkeys(request for request, _ in self.slots))

    def admit(self, request: Request) -> Step | None:
        """Prefill the request's prompts into free slots and draw their first tokens: its first
        Step. Its unfinished rows decode with the others from the next step() on. Returns None
        when it asks for no token, and raises what sampling raised (the batch is left as it was).
        """
        (outcome,) = self.admit_many([request])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @torch.inference_mode()
    def admit_many(self, requests: Sequence[Request]) -> list[Step | Exception | None]:
        """admit() for several requests with one prefill (a burst of arrivals costs one forward,
        not one each): per request its first Step, None when it asks for no token, or the
        exception its first draw raised (then it is not in the batch; the others are)."""
        todo = [r for r in requests if r.max_new_tokens]
        windows = [p[-self.block_size:] for r in todo for p in r.prompts]
        n = len(windows)
        if n > self.free_rows:
            raise ValueError(f"{n} rows do not fit in the {self.free_rows} free rows of the batch")
        if not windows:
            return [None] * len(requests)
        if max(map(len, windows)) > self.cache.max_len:
            raise ValueError(f"a prompt of {max(map(len, windows))} tokens does not fit in the "
                             f"cache's {self.cache.max_len} columns")
        first = len(self.slots)
        with self.model.evaluating():
            logits = _prefill(self.model, windows, self.cache.rows(first, first + n))  # [n, V]
        outcomes: dict[int, Step | Exception] = {}
        start = 0  # the request's rows in logits; its slots follow the requests admitted before
        for request in todo:
            end = start + len(request.prompts)
            try:
                request._start()
                step = request._sample(logits[start:end])
            except (ValueError, RuntimeError) as e:
                request.error = e
                request._keep([])
                outcomes[id(request)] = e
            else:
                outcomes[id(request)] = step
                slot = len(self.slots)
                if slot != first + start:  # a request before it failed: move its rows down
                    width = max(map(len, windows[start:end]))
                    for t in (self.cache.k, self.cache.v):  # [n_layer, rows, n_head, cols, hd]
                        t[:, slot:slot + end - start, :, :width] = \
                            t[:, first + start:first + end, :, :width].clone()
                self.slots += [(request, row) for row in range(end - start)]
                self.lengths += [len(w) for w in windows[start:end]]
                self.last = torch.cat([self.last, step.tokens])
            start = end
        self._compact()
        return [outcomes.get(id(r)) for r in requests]

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, Step | Exception]]:
        """Feed every running row the token it drew last and draw its next one: per Request in
        the batch, its Step, or the exception that ended it (its rows are gone then, the others
        go on). Rows that finish leave the batch."""
        if not self.slots:
            return []
        with self.model.evaluating():
            self._slide_full_windows()
            cache = self.cache.rows(0, len(self.slots))
            cache.set_lengths(self.lengths)
            logits = self.model.logits(self.last[:, None], cache)[:, -1]  # [n, V]
        self.lengths = [length + 1 for length in self.lengths]
        out: list[tuple[Request, Step | Exception]] = []
        tokens = []
        start = 0
        for request in self.requests:  # a request's rows are side by side: slots [start, end)
            end = start + len(request.running)
            try:
                step = request._sample(logits[start:end])
                tokens.append(step.tokens)
                out.append((request, step))
            except (ValueError, RuntimeError) as e:  # this request's draw; the batch is fine
                request.error = e
                request._keep([])
                tokens.append(self.last[start:end])
                out.append((request, e))
            start = end
        self.last = torch.cat(tokens)
        self._compact()
        return out

    def remove(self, request: Request) -> None:
        """Drop a request's rows now (its caller went away); their slots are free at once."""
        request.cancelled = True
        request._keep([])
        self._compact()

    def _compact(self) -> None:
        """Drop the slots whose row no longer runs; move the rows after them down, in order."""
        keep = [s for s, (request, row) in enumerate(self.slots) if row in request.running]
        if len(keep) == len(self.slots):
            return
        moved = next((i for i, s in enumerate(keep) if s != i), len(keep))  # first slot to move
        if moved < len(keep):
            src = torch.tensor(keep[moved:], device=self.last.device)
            width = max(self.lengths[s] for s in keep[moved:])
            for t in (self.cache.k, self.cache.v):  # [n_layer, rows, n_head, columns, head_dim]
                t[:, moved:len(keep), :, :width] = t[:, src, :, :width]
        self.slots = [self.slots[s] for s in keep]
        self.lengths = [self.lengths[s] for s in keep]
        self.last = self.last[torch.tensor(keep, dtype=torch.long, device=self.last.device)]

    def _slide_full_windows(self) -> None:
        """Move every full window (block_size columns) on by one token, before the step feeds
        its newest token: re-fill the slot with the block_size - 1 tokens before that one.

        Positions are learned and absolute (wpe), so when a window moves every token's position
        changes, and with it every cached key and value: nothing can be kept. One forward per run
        of adjacent full slots; the other rows are not touched and decode from their cache."""
        full = [s for s, length in enumerate(self.lengths) if length == self.block_size]
        for start, stop in _runs(full):
            windows = [self._window(s) for s in range(start, stop)]
            if self.block_size > 1:
                self.model.hidden_states(torch.tensor(windows, device=self.last.device),
                                         self.cache.rows(start, stop))
            self.lengths[start:stop] = [self.block_size - 1] * (stop - start)

    def _window(self, s: int) -> list[int]:
        """The block_size - 1 tokens of slot s's row before the one it drew last."""
        request, row = self.slots[s]
        return request._context(row)[-self.block_size:-1]


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slot indices as runs [start, stop) of adjacent ones: [1, 2, 5] -> [(1, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


def generate(model: GPT, prompt_ids: Prompts, max_new_tokens: int,
             sampler: SamplerStack | None = None, eos_id: int | None = None,
             stop: Stop | None = None, seed: int | Sequence[int] | None = None, logprobs: int = 0,
             decode: Callable[[list[int]], str] | None = None,
             logprobs_mode: str = "raw") -> Iterator[Step]:
    """Stream the generation of up to `max_new_tokens` tokens per prompt, one Step per token.

    prompt_ids: a list of token-id lists (lengths may differ), one list of ids, or a LongTensor [T]
    or [B, T]. A row stops at `eos_id`, at a `stop` sequence (token-id lists, or strings, which
    need `decode` (a tokenizer's decode) and match anywhere in the row's decoded new text), or after
    max_new_tokens. logprobs = N > 0 also returns the N most likely tokens at each step, of the raw
    distribution or of the processed one (logprobs_mode="processed").
    The arguments are checked here, before the first step.
    """
    request = Request(model, prompt_ids, max_new_tokens, sampler=sampler, eos_id=eos_id,
                      stop=stop, seed=seed, logprobs=logprobs, decode=decode,
                      logprobs_mode=logprobs_mode)
    return _run_alone(model, request)


def _run_alone(model: GPT, request: Request) -> Iterator[Step]:
    """generate()'s loop: the request alone in a batch sized for it."""
    if request.max_new_tokens == 0:
        return
    windows = [min(len(p), model.config.block_size) for p in request.prompts]
    batch = RunningBatch(model, len(request.prompts),
                         min(model.config.block_size, max(windows) + request.max_new_tokens - 1),
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


def next_token_stages(model: GPT, prompt_ids: Prompts, sampler: SamplerStack
                      ) -> list[tuple[str, Tensor]]:
    """The logits [B, V] of each prompt's next token after each stage of `sampler`, starting with
    ("raw", logits): what each setting does to the model's distribution (generate.py's
    --show_distribution)."""
    prompts = prompt_lists(prompt_ids, model.config.vocab_size)
    with model.inference():
        logits = _prefill(model, [p[-model.config.block_size:] for p in prompts])
        return sampler.stages(logits, _prompt_history(prompts, logits.device))


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
                     top_n: int = 20, include: Sequence[int] = ()) -> NextTokenTable:
    """The table of one prompt's next token through the stages of `sampler`. Shown: the top_n
    tokens of the last stage, most likely first (tokens it removed after the kept ones, by raw
    logit), then any token of `include` (e.g. the logit-biased ones) not among them."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    stages = next_token_stages(model, [list(prompt_ids)], sampler)
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


def _prompt_history(prompts: list[list[int]], device: torch.device) -> History:
    """The History of prompts before any token is drawn (left-padded: what the penalties read)."""
    tokens, mask = _left_pad([torch.tensor(p, device=device) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts], device=device)
    return History(tokens, prompt_lens=lens, attention_mask=mask)


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
