"""The engine: one thread owns the model and runs the continuous batch; coroutines talk to it.

    engine = Engine(model, max_batch=16); engine.start()
    stream = engine.submit(request)          # a generation.Request; its rows join the batch
    async for step in stream: ...            # per step, the request's tokens (RowToken lists)
    table = await engine.call(fn)            # fn() on the engine thread, between two steps

The thread loops: take what the event loop sent, drop cancelled requests, give waiting ones free
rows (in arrival order, while their rows fit), then one RunningBatch.step(): a chunk of the new
rows' prefill (prefill_chunk tokens while rows decode, all of it otherwise), their first tokens
when it is done, and one decode step of every running row. So a running stream waits at most a
chunk per step for a newcomer, and a newcomer joins the decode step after its prefill.
Prompts reuse what earlier requests computed through the prefix cache (kv_cache_tokens tokens of
it; None switches it off).
Sampling errors end their own request only; an error of the shared forward pass ends every
running request, and the engine goes on with a fresh batch (the prefix cache is kept: its blocks
were complete before). Torch releases the GIL inside its kernels, so the event loop stays
responsive while the thread computes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable

from minilm.model.gpt import GPT
from minilm.sampling.batch import RunningBatch
from minilm.sampling.prefix_cache import PrefixCache
from minilm.sampling.request import Request, RowToken, Step
from minilm.serving.protocol import APIError

log = logging.getLogger("minilm.serve")
PREFILL_CHUNK = 64  # --prefill_chunk's default: see README (Serving) for how it was chosen
MAX_WAITING = 256  # --max_waiting's default


class Stream:
    """What one generation.Request produces, delivered to the event loop: lists of RowToken (one
    per step), then the end; or the exception that ended the request. Iterate it asynchronously;
    `cancel()` (e.g. when the client went away) frees its rows at the engine's next step."""

    def __init__(self, engine: Engine, request: Request, loop: asyncio.AbstractEventLoop):
        self.engine, self.request, self.loop = engine, request, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def _put(self, item: list[RowToken] | Exception | None) -> None:
        """From the engine thread: hand an item to the event loop, with the other streams' items
        of this step (Engine._flush): one wake-up of the event loop per step, not per stream."""
        self.engine._outbox.append((self, item))

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.engine._wake()

    async def __aiter__(self) -> AsyncIterator[list[RowToken]]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class Engine:
    """Owns the model and its RunningBatch (max_batch rows) on a background thread; at most
    max_waiting requests wait for rows (more are refused: 503)."""

    def __init__(self, model: GPT, max_batch: int = 16, kv_cache_tokens: int | None = None,
                 prefill_chunk: int | None = None, max_waiting: int | None = None):
        self.model = model
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        param = next(model.parameters())
        self.prefix_cache = None if kv_cache_tokens is None else \
            PrefixCache(model.config, kv_cache_tokens, device=param.device, dtype=param.dtype)
        self.prefill_chunk = prefill_chunk
        self.batch = self._new_batch()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Stream] = deque()
        self._n_waiting = 0  # submitted, not yet given rows (the event loop adds, the thread takes)
        self._lock = threading.Lock()
        self._streams: dict[Request, Stream] = {}
        self._counted = (0, 0)  # prompt and reused tokens of the batches that failed
        self._outbox: list[tuple[Stream, Any]] = []  # items for the streams, sent once per step
        self._thread = threading.Thread(target=self._loop, name="minilm-engine", daemon=True)
        self._stopping = False

    def _new_batch(self) -> RunningBatch:
        return RunningBatch(self.model, self.max_batch, prefix_cache=self.prefix_cache,
                            prefill_chunk=self.prefill_chunk)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        """What /health and /metrics report (read from the event loop: plain numbers)."""
        batch, cache = self.batch, self.prefix_cache
        return dict(running_rows=len(batch.slots), running_requests=len(batch.requests),
                    waiting_requests=self._n_waiting, max_batch=self.max_batch,
                    kv_cache_usage=batch.used_columns / (batch.max_rows * batch.cache.max_len),
                    prefix_cache_usage=0.0 if cache is None else
                    cache.used_blocks / cache.capacity_blocks,
                    prefix_cache_queries=self._counted[0] + batch.prompt_tokens,
                    prefix_cache_hits=self._counted[1] + batch.reused_tokens)

    def submit(self, requests: list[Request]) -> list[Stream]:
        """Queue requests (from the event loop); each joins the batch when its rows fit. More
        than max_waiting waiting is a 503: the server is busy, the client may retry."""
        for request in requests:
            if request.n_rows > self.max_batch:
                raise ValueError(f"{request.n_rows} rows are more than the batch's "
                                 f"{self.max_batch}")
        with self._lock:
            if self.max_waiting is not None and self._n_waiting + len(requests) > self.max_waiting:
                raise APIError(503, f"the server is busy: {self._n_waiting} requests wait for "
                                    f"rows (--max_waiting {self.max_waiting}); try again later")
            self._n_waiting += len(requests)
        loop = asyncio.get_running_loop()
        streams = [Stream(self, request, loop) for request in requests]
        for stream in streams:
            self._inbox.put(("submit", stream))
        return streams

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the engine thread between two steps (the model is never used by two
        threads at once) and return its result or raise its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", (fn, loop, future)))
        return await future

    def _wake(self) -> None:
        self._inbox.put(("wake", None))

    # ---------------------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        with self.model.inference():
            while not self._stopping:
                self._receive(block=not self.batch.slots and not self._waiting)
                self._drop_cancelled()
                self._admit()
                if self.batch.slots:
                    self._step()
                self._flush()

    def _flush(self) -> None:
        """Send the streams' items of this step to their event loops, one call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Any]]] = {}
        for stream, item in self._outbox:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_hand_over, items)

    def _receive(self, block: bool) -> None:
        """Take every message waiting; with block, wait for the first."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._waiting.append(payload)
            elif kind == "call":
                self._run_call(*payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _run_call(fn: Callable[[], Any], loop: asyncio.AbstractEventLoop,
                  future: asyncio.Future) -> None:
        def settle(method: str, value: Any) -> None:
            if not future.done():
                getattr(future, method)(value)
        try:
            result = fn()
        except Exception as e:  # handed to the caller, who turns it into an HTTP error
            loop.call_soon_threadsafe(settle, "set_exception", e)
        else:
            loop.call_soon_threadsafe(settle, "set_result", result)

    def _drop_cancelled(self) -> None:
        for stream in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(stream)
            self._took(1)
            stream._put(None)
        for request in self.batch.requests:
            stream = self._streams[request]
            if stream.cancelled:
                self.batch.remove(request)
                self._finish(stream, None)

    def _took(self, n: int) -> None:
        with self._lock:
            self._n_waiting -= n

    def _admit(self) -> None:
        """Give waiting requests rows, in arrival order, while their rows fit."""
        while self._waiting and self._waiting[0].request.n_rows <= self.batch.free_rows:
            stream = self._waiting.popleft()
            self._took(1)
            try:
                added = self.batch.add(stream.request)
            except ValueError as e:
                log.warning("request failed at admission: %s", e)
                stream._put(e)
                continue
            if added:
                self._streams[stream.request] = stream
            else:  # nothing to compute
                stream._put(None)

    def _step(self) -> None:
        try:
            results = self.batch.step()
        except Exception as e:  # the shared forward pass: every request in the batch fails
            log.exception("step failed; dropping %d requests", len(self.batch.requests))
            for request in self.batch.requests:
                self._finish(self._streams[request], e)
                if self.prefix_cache is not None:
                    self.prefix_cache.forget(request)
            old = self.batch
            self._counted = (self._counted[0] + old.prompt_tokens,
                             self._counted[1] + old.reused_tokens)
            self.batch = self._new_batch()
            return
        for request, outcome in results:
            stream = self._streams[request]
            if isinstance(outcome, Exception):
                self._finish(stream, outcome)
            else:
                self._deliver(stream, outcome)

    def _deliver(self, stream: Stream, step: Step | None) -> None:
        if step is not None:
            stream._put(step.row_tokens())
        if not stream.request.running:
            self._finish(stream, None)

    def _finish(self, stream: Stream, error: Exception | None) -> None:
        self._streams.pop(stream.request, None)
        stream._put(error)


def _hand_over(items: list[tuple[Stream, Any]]) -> None:
    """On the event loop: each item into its stream's queue."""
    for stream, item in items:
        stream._queue.put_nowait(item)


class Timer:
    """A request's clock for the metrics line: arrival, first token, end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.start) * 1e3

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
