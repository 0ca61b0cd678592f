"""The engine: one thread owns the model and runs the continuous batch; coroutines talk to it.

    engine = Engine(model, max_batch=16); engine.start()
    stream = engine.submit(request)          # a generation.Request; its rows join the batch
    async for step in stream: ...            # per step, the request's tokens (RowToken lists)
    table = await engine.call(fn)            # fn() on the engine thread, between two steps

The thread loops: take what the event loop sent, drop cancelled requests, admit waiting ones while
their rows fit (one prefill for those that came together, then their first tokens), then one
decode step of every running row. So a newcomer waits at most one step before its prefill and
joins the next step after it.
Sampling errors end their own request only; an error of the shared forward pass ends every
running request, and the engine goes on with a fresh batch. Torch releases the GIL inside its
kernels, so the event loop stays responsive while the thread computes.
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
from minilm.sampling.generation import Request, RowToken, RunningBatch, Step

log = logging.getLogger("minilm.serve")


class Stream:
    """What one generation.Request produces, delivered to the event loop: lists of RowToken (one
    per step), then the end; or the exception that ended the request. Iterate it asynchronously;
    `cancel()` (e.g. when the client went away) frees its rows at the engine's next step."""

    def __init__(self, engine: Engine, request: Request, loop: asyncio.AbstractEventLoop):
        self.engine, self.request, self.loop = engine, request, loop
        self.rows = len(request.prompts)
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def _put(self, item: list[RowToken] | Exception | None) -> None:
        """From the engine thread: hand an item to the event loop."""
        self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

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
    """Owns the model and its RunningBatch (max_batch rows) on a background thread."""

    def __init__(self, model: GPT, max_batch: int = 16):
        self.model = model
        self.max_batch = max_batch
        self.batch = RunningBatch(model, max_batch)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Stream] = deque()
        self._streams: dict[Request, Stream] = {}
        self._thread = threading.Thread(target=self._loop, name="minilm-engine", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=10)

    def stats(self) -> dict[str, int]:
        return dict(running_rows=len(self.batch.slots), waiting_requests=len(self._waiting),
                    max_batch=self.max_batch)

    def submit(self, request: Request) -> Stream:
        """Queue a request (from the event loop); it joins the batch when its rows fit."""
        if len(request.prompts) > self.max_batch:
            raise ValueError(f"{len(request.prompts)} rows are more than the batch's "
                             f"{self.max_batch}")
        stream = Stream(self, request, asyncio.get_running_loop())
        self._inbox.put(("submit", stream))
        return stream

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
            stream._put(None)
        for request in self.batch.requests:
            stream = self._streams[request]
            if stream.cancelled:
                self.batch.remove(request)
                self._finish(stream, None)

    def _admit(self) -> None:
        while self._waiting and self._admit_group():
            pass

    def _admit_group(self) -> bool:
        """Admit waiting requests in arrival order while their rows fit, with one prefill for
        all (unless right-padding them to the longest prompt would more than double its work).
        Whether any was admitted."""
        group: list[Stream] = []
        rows = tokens = longest = 0
        for stream in self._waiting:
            prompts = stream.request.prompts
            window = min(max(map(len, prompts)), self.batch.block_size)
            new_rows, new_longest = rows + len(prompts), max(longest, window)
            new_tokens = tokens + sum(min(len(p), self.batch.block_size) for p in prompts)
            if new_rows > self.batch.free_rows or (group and new_rows * new_longest > 2 * new_tokens):
                break
            group.append(stream)
            rows, tokens, longest = new_rows, new_tokens, new_longest
        if not group:
            return False
        for _ in group:
            self._waiting.popleft()
        try:
            outcomes = self.batch.admit_many([s.request for s in group])
        except Exception as e:  # the prefill itself: these requests fail, the batch goes on
            log.exception("prefill failed for %d requests", len(group))
            outcomes = [e] * len(group)
        for stream, outcome in zip(group, outcomes):
            if isinstance(outcome, Exception):
                log.warning("request failed at admission: %s", outcome)
                stream._put(outcome)
            else:
                self._streams[stream.request] = stream
                self._deliver(stream, outcome)
        return True

    def _step(self) -> None:
        try:
            results = self.batch.step()
        except Exception as e:  # the shared forward pass: every running request fails
            log.exception("decode step failed; dropping %d running requests",
                          len(self.batch.requests))
            for request in self.batch.requests:
                self._finish(self._streams[request], e)
            self.batch = RunningBatch(self.model, self.max_batch)
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
