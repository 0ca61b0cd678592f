"""Continuous batching: a RunningBatch decodes the rows of any number of Requests together.

A Request joins between two steps (`add`: its rows get slots and prefill over the next steps, a
chunk per step, reusing what the batch and the prefix cache already computed; `admit`: all of its
prefill at once, then its first tokens) and decodes with the others from the next step on; each row
leaves when it finishes. generate() is one Request alone in a batch of its size.

    batch = RunningBatch(model, max_rows=16, prefix_cache=PrefixCache(...), prefill_chunk=64)
    batch.add(Request(model, prompts, 50, sampler=stack, seed=[1, 2]))
    while batch.requests:
        for request, step in batch.step(): ...       # a Step, or the exception that ended it

Choices where there were several:
- The KV cache is laid out per slot (vLLM's idea without the paging): the row in slot s holds its
  window's keys and values at columns [0, length[s]), right-padded, and a decode step writes each
  row's new token at its own column with its own position. So a row computes what it would compute
  alone, and a newcomer is prefilled straight into a free slot, whatever the others' lengths.
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
  With a prefill_chunk the re-fill is chunked like a prefill (RunningBatch._refill_full_windows).
- A row that finishes leaves the batch: the rows after it move down a slot, and its history and
  generator are dropped, so later steps cost what the remaining rows cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from minilm.model.gpt import GPT, KVCache
from minilm.sampling.history import History
from minilm.sampling.prefix_cache import BLOCK_TOKENS, PrefixCache
from minilm.sampling.request import Request, Step
from minilm.sampling.stack import SampleInfo


class RunningBatch:
    """The rows decoding together, from any number of Requests: continuous batching.

    The KV cache has `max_rows` slots of `max_len` columns (default block_size). Rows fill slots
    [0, n) in the order they were added, a Request's rows side by side; slot s holds the keys and
    values of its row's context window at columns [0, slot.length).

    A row first *fills* its slot with its window (prefill), in chunks, before it decodes:
    - its first columns come from whoever already has them: the prefix cache (other requests'
      blocks, see prefix_cache), or a row of the batch that computes the same first tokens (it
      waits for that row and copies them: n samples of one prompt, or many prompts sharing a
      context, compute the shared part once);
    - the rest is computed `prefill_chunk` tokens per step while other rows decode (None: all at
      once), so a long prompt delays a running stream by a chunk per step, not by its whole prefill;
    - when a request's rows have all filled it draws its first tokens from the logits of their
      last positions, and decodes with the others from the next step on.
    A row past block_size re-fills its window the same way, chunk by chunk, while its request waits
    (see _refill_full_windows). Requests start in the order they were added, so rows still filling
    always come after the decoding ones (and the decode step's forward, which covers slots [0, last
    decoding one], never writes past a filling row's window).
    """

    def __init__(self, model: GPT, max_rows: int, max_len: int | None = None,
                 decode_layout: bool = True, prefix_cache: PrefixCache | None = None,
                 prefill_chunk: int | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        param = next(model.parameters())
        if decode_layout and param.device.type == "cpu":  # on CUDA it gains nothing (fp32, batch
            model.set_decode_layout(True)                 # 32: 18% slower)
        self.model = model
        self.block_size = model.config.block_size
        self.cache = KVCache(model.config, max_rows, max_len or self.block_size, param.device,
                             param.dtype)
        self.prefix_cache = prefix_cache
        self.prefill_chunk = prefill_chunk
        self.slots: list[_Slot] = []
        self._groups: list[_Group] = []  # see _regroup
        self.last = torch.zeros(max_rows, dtype=torch.long, device=param.device)  # fed next step
        self.prompt_tokens = 0  # tokens of the windows of new rows (vLLM's prefix_cache_queries)
        self.reused_tokens = 0  # of them, copied instead of computed (prefix_cache_hits)

    @property
    def max_rows(self) -> int:
        return self.cache.k.size(1)

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.slots)

    @property
    def requests(self) -> list[Request]:
        """The Requests with rows in the batch, in slot order."""
        return list(dict.fromkeys(slot.request for slot in self.slots))

    @property
    def used_columns(self) -> int:
        """Cache columns the rows hold (of max_rows * max_len)."""
        return sum(slot.length for slot in self.slots)

    def add(self, request: Request) -> bool:
        """Give the request's rows free slots; they fill over the next steps and its first Step
        comes out of the step() that finishes them. False for a request with nothing to do (no
        token asked for, no prompt states wanted)."""
        if not (request.max_new_tokens or request.keep_prompt_states):
            return False
        windows = request._windows(self.block_size)
        if len(windows) > self.free_rows:
            raise ValueError(f"{len(windows)} rows do not fit in the {self.free_rows} free rows "
                             f"of the batch")
        if max(map(len, windows)) > self.cache.max_len:
            raise ValueError(f"a prompt of {max(map(len, windows))} tokens does not fit in the "
                             f"cache's {self.cache.max_len} columns")
        request._join()
        for row, window in enumerate(windows):
            slot = _Slot(request, row, fill=_Fill(window, new=True))
            self.slots.append(slot)
            self.prompt_tokens += len(window)
            self._seek(slot, first=True)
        return True

    def admit(self, request: Request) -> Step | None:
        """add() and fill at once: the request's first Step (None when it asks for no token).
        Raises what its first draw raised (then it is not in the batch)."""
        (outcome,) = self.admit_many([request])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @torch.inference_mode()
    def admit_many(self, requests: Sequence[Request]) -> list[Step | Exception | None]:
        """admit() for several requests, filled together (a burst of arrivals shares each
        forward): per request its first Step, None when it asks for no token, or the exception
        its first draw raised (then it is not in the batch; the others are)."""
        n = sum(r.n_rows for r in requests if r.max_new_tokens or r.keep_prompt_states)
        if n > self.free_rows:
            raise ValueError(f"{n} rows do not fit in the {self.free_rows} free rows of the batch")
        added = [self.add(r) for r in requests]
        with self.model.evaluating():
            outcomes = dict((id(r), o) for r, o in self._fill(budget=None))
        self._compact()
        return [outcomes.get(id(r)) if a else None for r, a in zip(requests, added)]

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, Step | Exception | None]]:
        """One step: fill (prefill_chunk tokens of it while rows decode, else all of it), then
        feed every decoding row the token it drew last and draw its next one. Per Request that
        drew: its Step, or the exception that ended it (its rows are gone then, the others go
        on); None for a request that wanted its prompt states only and has them. Rows that finish
        leave the batch."""
        with self.model.evaluating():
            self._refill_full_windows()
            decoding = any(s.fill is None for s in self.slots)
            out = self._fill(self.prefill_chunk if decoding else None)
            started = {id(request) for request, _ in out}
            out += self._decode(started)
        self._compact()
        return out

    def remove(self, request: Request) -> None:
        """Drop a request's rows now (its caller went away); their slots are free at once, and the
        prefix-cache blocks it added that no other request has read are freed."""
        request.cancelled = True
        request._keep([])
        self._compact()

    # --------------------------------------------------------------------- filling the slots

    def _seek(self, slot: _Slot, first: bool = False) -> None:
        """Start (or go on with) a new row's fill from the longest prefix of its window that
        someone has: the prefix cache (only when it starts), or a row of the batch that is still
        computing a longer one (then it waits for that row, see _settle). The last token is always
        computed, unless a row computes the very same window: its logits are the first draw."""
        fill, limit = slot.fill, len(slot.fill.tokens) - 1
        if first and self.prefix_cache is not None:
            blocks = self.prefix_cache.lookup(fill.tokens, limit, reader=slot.request)
            if blocks:
                fill.hidden.append(self.prefix_cache.read(blocks, self.cache, self._index(slot)))
                slot.length = len(blocks) * self.prefix_cache.block_tokens
                self.reused_tokens += slot.length
        gain = self.prefix_cache.block_tokens if self.prefix_cache is not None else BLOCK_TOKENS
        best, best_len = None, slot.length + gain - 1
        for other in self.slots:  # rows filling before this one
            if other is slot:
                break
            if other.fill is None or not other.fill.new or other.fill.wait is not None or \
                    other.filled:
                continue
            n = _common_prefix(other.fill.tokens, fill.tokens)
            if n == len(fill.tokens) == len(other.fill.tokens):
                best = other
                break
            if min(n, limit) > best_len:
                best, best_len = other, min(n, limit)
        fill.wait = best

    def _fill(self, budget: int | None) -> list[tuple[Request, Step | Exception | None]]:
        """Compute chunks of the rows' windows, in slot order, while `budget` tokens (rows x
        columns) last; the requests whose rows are all filled then start (their first Step)."""
        out: list[tuple[Request, Step | Exception | None]] = []
        while budget is None or budget > 0:
            run = self._next_run()
            if run is None:
                break
            width = self._chunk_width(run, budget)
            self._compute(run, width)
            if budget is not None:
                budget -= (run[1] - run[0]) * width
            out += self._settle()
        return out

    def _next_run(self) -> tuple[int, int] | None:
        """The first run of adjacent slots that have columns to compute from the same column."""
        start = next((i for i, s in enumerate(self.slots) if s.computing), None)
        if start is None:
            return None
        stop = start + 1
        while stop < len(self.slots) and self.slots[stop].computing and \
                self.slots[stop].length == self.slots[start].length:
            stop += 1
        return start, stop

    def _chunk_width(self, run: tuple[int, int], budget: int | None) -> int:
        """Columns to compute for every row of the run: within the budget, and narrow enough that
        right-padding the shorter rows at most doubles the work (as one prefill of a burst)."""
        rows = self.slots[run[0]:run[1]]
        remaining = [len(s.fill.tokens) - s.length for s in rows]
        width = max(remaining)
        if budget is not None:
            width = min(width, max(1, budget // len(rows)))
        while width > 1 and len(rows) * width > 2 * sum(min(r, width) for r in remaining):
            width = (width + 1) // 2
        return width

    def _compute(self, run: tuple[int, int], width: int) -> None:
        """One forward over the next `width` columns of the run's windows (right-padded: causal
        attention never lets a position see the padding after it); keeps what a new row needs:
        the hidden states, and the logits of its last position."""
        rows = self.slots[run[0]:run[1]]
        start = rows[0].length
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        for i, slot in enumerate(rows):
            chunk = slot.fill.tokens[start:start + width]
            idx[i, :len(chunk)] = torch.tensor(chunk)
        view = self.cache.rows(*run)
        view.length = start
        h = self.model.hidden_states(idx.to(self.last.device), view)  # [rows, width, d]
        ends = []  # (row, position) of the windows that end in this chunk
        for i, slot in enumerate(rows):
            n = min(len(slot.fill.tokens) - start, width)
            slot.length = start + n
            if slot.fill.new:
                slot.fill.hidden.append(h[i, :n])
                if slot.length == len(slot.fill.tokens):
                    ends.append((i, n - 1))
        if ends:
            i, pos = (torch.tensor(x, device=h.device) for x in zip(*ends))
            for (row, _), logits in zip(ends, self.model.logits_from_hidden(h[i, pos])):
                rows[row].fill.logits = logits

    def _settle(self) -> list[tuple[Request, Step | Exception | None]]:
        """After a chunk: rows whose window is complete hand it on (to the prefix cache, to the
        rows waiting for it); then the requests whose rows have all filled start, in order."""
        for slot in list(self.slots):
            fill = slot.fill
            if not slot.filled or not fill.new or fill.settled:
                continue
            fill.settled = True
            if self.prefix_cache is not None:
                self.prefix_cache.insert(fill.tokens, self.cache, self._index(slot),
                                         fill.states(), owner=slot.request)
            for waiter in [s for s in self.slots if s.fill is not None and s.fill.wait is slot]:
                self._copy_from(slot, waiter)
        return self._start_ready()

    def _copy_from(self, source: _Slot, waiter: _Slot) -> None:
        """Give `waiter` what `source` computed of its window: the whole of it (keys, values,
        hidden states and last logits) if the windows are the same, else their common prefix but
        the waiter's last token; then it seeks on (maybe waiting for another row)."""
        fill, theirs = waiter.fill, source.fill
        n = _common_prefix(theirs.tokens, fill.tokens)
        same = n == len(fill.tokens) == len(theirs.tokens)
        n = n if same else min(n, len(fill.tokens) - 1)
        if n > waiter.length:
            src, dst = self._index(source), self._index(waiter)
            for t in (self.cache.k, self.cache.v):  # [n_layer, rows, n_head, columns, head_dim]
                t[:, dst, :, waiter.length:n] = t[:, src, :, waiter.length:n]
            fill.hidden.append(theirs.states()[waiter.length:n])
            self.reused_tokens += n - waiter.length
            waiter.length = n
        fill.wait = None
        if same:
            fill.logits = theirs.logits
        else:
            self._seek(waiter)

    def _start_ready(self) -> list[tuple[Request, Step | Exception | None]]:
        """Start the requests whose rows have all filled, in slot order, stopping at the first
        one still filling; resume the ones whose windows were re-filled."""
        out: list[tuple[Request, Step | Exception | None]] = []
        for request in self.requests:
            filling = [s for s in self._slots_of(request) if s.fill is not None]
            if not filling:
                continue
            new = filling[0].fill.new
            if not all(s.filled for s in filling):
                if new:
                    break  # the requests after it wait: see the class docstring
                continue
            if not new:  # a re-fill: it decodes again from this step on
                for slot in self._slots_of(request):
                    slot.fill = None
                continue
            out.append((request, self._first_draw(request)))
        return out

    def _first_draw(self, request: Request) -> Step | Exception | None:
        """The request's rows have filled: keep their prompt states if wanted, draw their first
        tokens (None when it asks for none)."""
        slots = self._slots_of(request)
        cond = slots[:len(request.running)]  # then the unconditional twins, with guidance
        if request.keep_prompt_states:
            request.prompt_states = [s.fill.states() for s in cond]
        logits = torch.stack([s.fill.logits for s in slots])
        for slot in slots:
            slot.fill = None
        if not request.max_new_tokens:
            request._keep([])
            return None
        request._start()
        return self._draw(request, logits[:len(cond)], logits[len(cond):] if request.negative
                          else None, self._positions()[request])

    def _draw(self, request: Request, logits: Tensor, unconditional: Tensor | None,
              slots: list[int]) -> Step | Exception:
        """A request draws alone: its Step (its slots feed the tokens next step), or the
        exception its draw raised (its rows are gone then; the batch is fine)."""
        try:
            step = request._sample(logits, unconditional)
        except (ValueError, RuntimeError) as e:
            request.error = e
            request._keep([])
            return e
        self._feed(step.tokens, slots)
        return step

    def _feed(self, tokens: Tensor, slots: list[int]) -> None:
        """The tokens [n] the rows drew go to their slots, and to their twins' (which follow, in
        the same order) with guidance."""
        idx = torch.tensor(slots, device=self.last.device)
        self.last[idx] = tokens.repeat(len(slots) // len(tokens))

    def _positions(self) -> dict[Request, list[int]]:
        """Each request's slot indices, in slot order (its rows', then its twins')."""
        out: dict[Request, list[int]] = {}
        for i, slot in enumerate(self.slots):
            out.setdefault(slot.request, []).append(i)
        return out

    # ------------------------------------------------------------------------------ decoding

    def _decode(self, skip: set[int]) -> list[tuple[Request, Step | Exception | None]]:
        """Feed every decoding row (of the requests not in `skip`: they drew their first token in
        this step) the token it drew last; each request draws from its rows' logits."""
        decoding = [i for i, s in enumerate(self.slots)
                    if s.fill is None and id(s.request) not in skip]
        if not decoding:
            return []
        n = decoding[-1] + 1  # slots [0, n); a filling one among them writes past its columns
        cache = self.cache.rows(0, n)
        cache.set_lengths([s.length for s in self.slots[:n]])
        logits = self.model.logits(self.last[:n, None], cache)[:, -1]  # [n, V]
        for i in decoding:
            self.slots[i].length += 1
        positions = self._positions()
        out: list[tuple[Request, Step | Exception | None]] = []
        for group in self._regroup(list(dict.fromkeys(self.slots[i].request for i in decoding))):
            if isinstance(group, Request):
                slots = positions[group]
                half = len(group.running)
                out.append((group, self._draw(group, _rows(logits, slots[:half]),
                                              _rows(logits, slots[half:]) if group.negative
                                              else None, slots)))
            else:
                out += self._draw_group(group, logits, positions)
        return out

    def _regroup(self, requests: list[Request]) -> list[Request | _Group]:
        """The decoding requests as they draw this step: requests that share their SamplerStack
        (and logprobs options) draw in one call, as a _Group; a group lives on while its requests
        and their rows stay the same, so its History is appended to, not rebuilt, each step."""
        buckets: dict[tuple, list[Request]] = {}
        for request in requests:
            key = (id(request.sampler), request.logprobs, request.logprobs_mode)
            buckets.setdefault(key, []).append(request)
        kept = [g for g in self._groups if any(g.same(b) for b in buckets.values())]
        for group in self._groups:
            if group not in kept:
                group.dissolve()
        out: list[Request | _Group] = []
        for bucket in buckets.values():
            group = next((g for g in kept if g.same(bucket)), None)
            out.append(group or (_Group.of(bucket) if len(bucket) > 1 else bucket[0]))
        self._groups = [g for g in out if isinstance(g, _Group)]
        return out

    def _draw_group(self, group: _Group, logits: Tensor, positions: dict[Request, list[int]]
                    ) -> list[tuple[Request, Step | Exception]]:
        """One draw for the rows of the group's requests; each request gets its Step. If the draw
        fails, each request draws alone, so that only the one that cannot draw fails."""
        first = group.requests[0]
        slots = [positions[r] for r in group.requests]
        cond = [i for r, s in zip(group.requests, slots) for i in s[:len(r.running)]]
        twins = [i for r, s in zip(group.requests, slots) for i in s[len(r.running):]]
        try:
            tokens, info = first.sampler.sample(
                _rows(logits, cond), group.history, top_logprobs=first.logprobs,
                logprobs_mode=first.logprobs_mode,
                unconditional_logits=_rows(logits, twins) if twins else None)
        except (ValueError, RuntimeError):
            group.dissolve()
            self._groups.remove(group)
            return [(r, self._draw(r, _rows(logits, s[:len(r.running)]),
                                   _rows(logits, s[len(r.running):]) if r.negative else None, s))
                    for r, s in zip(group.requests, slots)]
        group.history.append(tokens)
        self._feed(tokens, cond + twins)
        drawn = tokens.tolist()  # the one host transfer of the group's tokens
        out, keep, start = [], [], 0
        for request in group.requests:
            n = len(request.running)
            try:
                step, going_on = request._record(tokens[start:start + n], drawn[start:start + n],
                                                 _info_rows(info, start, start + n))
            except ValueError as e:  # a row the sampler could not draw for (an accelerator's)
                request.error, going_on = e, []
                out.append((request, e))
            else:
                out.append((request, step))
            request._keep(going_on)
            keep += [start + i for i in going_on]
            start += n
        group.drop_rows_but(keep)
        return out

    def _refill_full_windows(self) -> None:
        """Every row whose window is full (block_size columns) moves it on by one token before
        its next token: its slot re-fills with the block_size - 1 tokens before the one it drew
        last, which the next decode step feeds; its request waits meanwhile.

        Positions are learned and absolute (wpe), so when a window moves every token's position
        changes, and with it every cached key and value: nothing can be kept. The re-fill is
        computed in chunks like a prefill, so that it holds up the other rows by a chunk per
        step, not by a forward over a whole window per token."""
        for slot in self.slots:
            if slot.fill is None and slot.length == self.block_size:
                context = slot.request._context(slot.row)
                slot.fill, slot.length = _Fill(context[-self.block_size:-1], new=False), 0

    # ----------------------------------------------------------------------------- the slots

    def _slots_of(self, request: Request) -> list[_Slot]:
        return [s for s in self.slots if s.request is request]

    def _index(self, slot: _Slot) -> int:
        return next(i for i, s in enumerate(self.slots) if s is slot)

    def _compact(self) -> None:
        """Drop the slots whose row no longer runs; move the rows after them down, in order. The
        rows that waited for a dropped one seek anew; a request that leaves hands its prefix-cache
        blocks on (or frees the unshared ones, if its caller went away)."""
        keep = [i for i, s in enumerate(self.slots) if s.request._base(s.row) in s.request.running]
        if len(keep) == len(self.slots):
            return
        kept = set(keep)
        gone = [s for i, s in enumerate(self.slots) if i not in kept]
        moved = next((i for i, s in enumerate(keep) if s != i), len(keep))  # first slot to move
        if moved < len(keep):
            src = torch.tensor(keep[moved:], device=self.last.device)
            width = max(self.slots[s].length for s in keep[moved:])
            for t in (self.cache.k, self.cache.v):  # [n_layer, rows, n_head, columns, head_dim]
                t[:, moved:len(keep), :, :width] = t[:, src, :, :width]
            self.last[moved:len(keep)] = self.last[src]
        self.slots = [self.slots[i] for i in keep]
        for slot in self.slots:
            if slot.fill is not None and slot.fill.wait in gone:
                slot.fill.wait = None
                self._seek(slot)
        if self.prefix_cache is not None:
            for request in dict.fromkeys(s.request for s in gone):
                if request.running:
                    continue
                if request.cancelled:
                    self.prefix_cache.release(request)
                else:
                    self.prefix_cache.forget(request)


@dataclass(eq=False)
class _Fill:
    """What a slot still writes before its row decodes: its window `tokens`, at columns [0, n).

    new:    a new row: its fill ends with the logits of its last position (its first draw) and
            keeps the hidden states of its positions (the prefix cache's, the prompt's scores);
            else a re-fill (the window moved past block_size), which ends one token short: the
            next decode step feeds that one
    wait:   the slot of the batch computing a longer prefix of `tokens` (see RunningBatch._seek)
    """
    tokens: list[int]
    new: bool
    wait: _Slot | None = None
    hidden: list[Tensor] = field(default_factory=list)  # [n_i, d] pieces of columns [0, length)
    logits: Tensor | None = None
    settled: bool = False

    def states(self) -> Tensor:
        """The hidden states of the columns filled so far [length, d], as one tensor."""
        if len(self.hidden) != 1:
            self.hidden = [torch.cat(self.hidden)]
        return self.hidden[0]


@dataclass(eq=False)
class _Slot:
    """A row of the batch: its request, its row there, the cache columns it holds, its fill."""
    request: Request
    row: int
    length: int = 0
    fill: _Fill | None = None

    @property
    def filled(self) -> bool:
        """Whether its fill is complete (a new row's: with the logits of its last position)."""
        fill = self.fill
        return fill is not None and (fill.logits is not None if fill.new else
                                     self.length == len(fill.tokens))

    @property
    def computing(self) -> bool:
        """Whether it has columns of its window to compute now (not waiting for another row)."""
        return self.fill is not None and self.fill.wait is None and \
            self.length < len(self.fill.tokens)


@dataclass(eq=False)
class _Group:
    """Requests that draw in one call of the SamplerStack they share (equal settings): the
    History of their running rows as one (History.cat of theirs, which they hand over), kept while
    the same requests run the same number of rows; `dissolve` hands each its rows back."""
    requests: list[Request]
    sizes: list[int]  # running rows of each request, as in `history`
    history: History | None

    @classmethod
    def of(cls, requests: list[Request]) -> _Group:
        history = History.cat([r.history for r in requests])
        for request in requests:
            request.history = None
        return cls(requests, [len(r.running) for r in requests], history)

    def same(self, requests: list[Request]) -> bool:
        return self.requests == requests and \
            self.sizes == [len(r.running) for r in requests]

    def dissolve(self) -> None:
        """Each request still running takes its rows' History back."""
        start = 0
        for request, n in zip(self.requests, self.sizes):
            if request.running:
                request.history = self.history.select(range(start, start + n))
            start += n

    def drop_rows_but(self, keep: list[int]) -> None:
        """After a draw: keep only these rows (of the History, in order) of rows that go on."""
        if len(keep) < sum(self.sizes):
            self.history = self.history.select(keep) if keep else None
            self.sizes = [len(r.running) for r in self.requests]


def _rows(logits: Tensor, slots: list[int]) -> Tensor:
    """logits[slots]: a view when the slots are adjacent (the usual case), else a copy."""
    if slots and slots[-1] - slots[0] == len(slots) - 1:
        return logits[slots[0]:slots[-1] + 1]
    return logits[torch.tensor(slots, device=logits.device)]


def _info_rows(info: SampleInfo, start: int, stop: int) -> SampleInfo:
    """Rows [start, stop) of a SampleInfo, the raw log-probs still computed only when read."""
    def part(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[start:stop]

    return SampleInfo(lambda: info.logprobs[start:stop], info.processed_logprobs[start:stop],
                      part(info.top_ids), part(info.top_logprobs))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
