"""POST /v1/completions: OpenAI's (legacy) completions API over the engine, as vLLM serves it.

request body → checked settings and prompts (400 naming the field) → one generation.Request per
prompt with its n rows → the engine's continuous batch → choices, whole or streamed (SSE).

Choices where the OpenAI API leaves room (vLLM's choice each time unless said otherwise):
- Choice i of n (i = 0 .. n - 1) draws with seed + i, so a choice does not depend on n; without a
  seed every row gets a random one. With several prompts, prompt p's choices are p·n .. p·n + n - 1.
- A stop string ends the text before it (generate() keeps it); the logprobs still list every
  token drawn. The end-of-text token ends a choice with "stop" and is not in the text.
- `logprobs` reports log-probabilities of the raw model distribution (T = 1); with
  `logprobs_mode: "processed"` of the distribution the sampler drew from. Each top_logprobs entry
  holds the `logprobs` most likely tokens plus the chosen one, keyed by token text; -inf is
  reported as -9999.0. `echo` with `logprobs` scores the prompt with eval.score_tokens (raw
  log-probabilities; the first token's is null); text_offset counts the characters of the tokens
  before each one.
- A prompt longer than the model's context (block_size) is refused (400) when tokens are to be
  generated; prompt + max_tokens may exceed it (the window slides, see generation). With
  max_tokens 0 (scoring only) any length is scored, in the scorer's rolling windows.
- `prompt_logprobs` = N (vLLM's field and shape): per choice, per prompt token, None for the
  first, then {token id: {"logprob", "rank", "decoded_token"}} for the prompt's token and the N
  most likely ones (raw, T = 1). They are read off the final hidden states the prefill kept (for a
  prefix that came from the prefix cache, its stored ones: only the LM head runs). As vLLM, not
  with `stream`, and only for prompts within the model's context.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from minilm.evaluation.scoring import TokenScores, score_hidden, score_tokens
from minilm.sampling.request import Request, RowToken, guided
from minilm.sampling.stages import MAX_LOGPROBS
from minilm.serving.engine import Stream, Timer
from minilm.serving.protocol import SEED_RANGE, APIError, CompletionRequest, bad_request, finite
from minilm.serving.served import Served
from minilm.tokenizer import TextStream

log = logging.getLogger("minilm.serve")


@dataclass
class Plan:
    """A checked completion request: its prompts, and what to run for them."""
    prompts: list[list[int]]
    texts: list[str]  # each prompt as text (echo)
    n: int
    max_tokens: int
    logprobs: int | None
    processed: bool
    stop: list[str]
    prompt_logprobs: int | None
    requests: list[Request]  # one per prompt; [] when max_tokens is 0 and no prompt_logprobs


def plan_completion(body: CompletionRequest, served: Served) -> Plan:
    """Check every field and build the generation Requests; a bad value is a 400 naming it."""
    served.check_model(body.model)
    n = 1 if body.n is None else body.n
    if n < 1:
        raise bad_request(f"n must be >= 1, got {n}", "n")
    sampler = served.sampler(body)
    rows_per_choice = 2 if guided(sampler) else 1  # guidance: each row's unconditional twin
    if n * rows_per_choice > served.engine.max_batch:
        raise bad_request(f"n = {n} is more than the server's --max_batch "
                          f"{served.engine.max_batch}"
                          + (" / 2 (guidance takes two rows per choice)"
                             if rows_per_choice == 2 else ""), "n")
    if body.best_of is not None and body.best_of != n:
        raise bad_request("best_of is not supported (only best_of = n)", "best_of")
    if body.suffix is not None:
        raise bad_request("suffix is not supported", "suffix")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens < 0:
        raise bad_request(f"max_tokens must be >= 0, got {max_tokens}", "max_tokens")
    if max_tokens > served.max_tokens_limit:
        raise bad_request(f"max_tokens must be at most {served.max_tokens_limit} (the server's "
                          f"--max_tokens_limit), got {max_tokens}", "max_tokens")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {body.logprobs}",
                          "logprobs")
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is not None:
        if not 0 <= prompt_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got "
                              f"{prompt_logprobs}", "prompt_logprobs")
        if body.stream:
            raise bad_request("prompt_logprobs is not available with stream (as in vLLM)",
                              "prompt_logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    if body.seed is not None and not (SEED_RANGE[0] <= body.seed and
                                      body.seed + n - 1 <= SEED_RANGE[1]):
        raise bad_request(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - n + 1}], got "
                          f"{body.seed}", "seed")
    prompts, texts = served.read_prompts(body.prompt)
    if max_tokens > 0 or prompt_logprobs is not None:
        too_long = [i for i, p in enumerate(prompts) if len(p) > served.block_size]
        if too_long:
            i = too_long[0]
            raise bad_request(f"prompt{f' {i}' if len(prompts) > 1 else ''} is "
                              f"{len(prompts[i])} tokens, more than the model's context of "
                              f"{served.block_size} tokens", "prompt")
    processed = body.logprobs_mode in ("processed", "processed_logprobs")
    requests = []
    if max_tokens > 0 or prompt_logprobs is not None:
        rows = n if max_tokens > 0 else 1  # prompt_logprobs alone: one row per prompt
        for ids in prompts:
            seed = secrets.randbits(63) if body.seed is None else body.seed
            requests.append(Request(
                served.model, [ids] * rows, max_tokens, sampler=sampler,
                eos_id=None if body.ignore_eos else served.tokenizer.eot_token, stop=stop,
                seed=[seed + i for i in range(rows)], logprobs=body.logprobs or 0,
                decode=served.decode, logprobs_mode="processed" if processed else "raw",
                keep_prompt_states=prompt_logprobs is not None,
                negative_prompt=served.negative_prompt(body, sampler, ids)))
    return Plan(prompts, texts, n, max_tokens, body.logprobs, processed, stop, prompt_logprobs,
                requests)


class Choice:
    """One choice as its tokens arrive: its text (TextStream: stop strings cut, never half a
    character), its logprobs object, its finish reason."""

    def __init__(self, index: int, served: Served, plan: Plan, prompt: int, echo: bool,
                 prompt_scores: TokenScores | None, token_ids: bool):
        self.index, self.served, self.plan = index, served, plan
        self.prompt_ids = plan.prompts[prompt]
        self.echo_text = plan.texts[prompt] if echo else ""
        self.token_ids = token_ids
        self.tokens: list[int] = []
        self.text = ""
        self.stream = TextStream(served.decode, plan.stop)
        self.finish_reason: str | None = None
        self.offset = len(self.echo_text)  # characters before the next token
        self.logprobs = None if plan.logprobs is None else _empty_logprobs()
        if self.logprobs is not None and echo:
            self.logprobs = self._prompt_logprobs(prompt_scores)
        self.prompt_logprobs: list[dict | None] | None = None  # vLLM's field, when asked

    def _prompt_logprobs(self, scores: TokenScores) -> dict[str, list]:
        out = _empty_logprobs()
        offset = 0
        for i, token in enumerate(self.prompt_ids):
            text = self.served.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if i == 0:  # nothing before it to predict it from
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                lp = scores.logprobs[i - 1]
                out["token_logprobs"].append(finite(lp))
                out["top_logprobs"].append(self._top(scores.top[i - 1] if scores.top else [],
                                                     token, lp))
        return out

    def _top(self, top: list[tuple[int, float]], token: int, logprob: float) -> dict[str, float]:
        """The top alternatives and the chosen token, keyed by text (OpenAI's shape)."""
        out = {self.served.token_text(t): finite(lp) for t, lp in top}
        out.setdefault(self.served.token_text(token), finite(logprob))
        return out

    def set_prompt_logprobs(self, scores: TokenScores) -> None:
        """vLLM's prompt_logprobs: None for the first token, then per token {id: logprob, rank,
        decoded_token} for the prompt's own token and the top alternatives (ranks 1 .. N)."""
        def entry(logprob: float, rank: int, token: int) -> dict[str, Any]:
            return dict(logprob=finite(logprob), rank=rank,
                        decoded_token=self.served.token_text(token))

        out: list[dict | None] = [None]
        for i, token in enumerate(scores.tokens):
            position = {str(token): entry(scores.logprobs[i], scores.ranks[i], token)}
            for rank, (t, lp) in enumerate(scores.top[i] if scores.top else [], start=1):
                position.setdefault(str(t), entry(lp, rank, t))
            out.append(position)
        self.prompt_logprobs = out

    def first(self) -> dict[str, Any]:
        """The echo chunk (streaming): the prompt's text and log-probabilities."""
        return self._chunk(self.echo_text, self.logprobs, None, prompt=True)

    def add(self, t: RowToken) -> dict[str, Any]:
        """Take one token; the choice's chunk for it (streaming)."""
        self.tokens.append(t.token)
        self.finish_reason = t.finish_reason
        visible = self.tokens
        if t.finish_reason == "stop" and t.token == self.served.tokenizer.eot_token:
            visible = self.tokens[:-1]
        piece = self.stream.update(visible, final=t.finish_reason is not None)
        self.text += piece
        logprobs = None
        if self.plan.logprobs is not None:
            lp = t.processed_logprob if self.plan.processed else t.logprob
            text = self.served.token_text(t.token)
            logprobs = dict(tokens=[text], token_logprobs=[finite(lp)],
                            top_logprobs=[self._top(t.top, t.token, lp)], text_offset=[self.offset])
            self.offset += len(text)
            for key, values in logprobs.items():
                self.logprobs[key] += values
        return self._chunk(piece, logprobs, t.finish_reason, token=t.token)

    def _chunk(self, text: str, logprobs: dict | None, finish_reason: str | None,
               prompt: bool = False, token: int | None = None) -> dict[str, Any]:
        out = dict(index=self.index, text=text, logprobs=logprobs, finish_reason=finish_reason)
        if self.token_ids:
            if prompt:
                out["prompt_token_ids"], out["token_ids"] = self.prompt_ids, []
            else:
                out["token_ids"] = [token]
        return out

    def whole(self) -> dict[str, Any]:
        """The finished choice (non-streaming)."""
        out = dict(index=self.index, text=self.echo_text + self.text, logprobs=self.logprobs,
                   finish_reason=self.finish_reason or "length")
        if self.token_ids:
            out["prompt_token_ids"], out["token_ids"] = self.prompt_ids, self.tokens
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        return out


def _empty_logprobs() -> dict[str, list]:
    return dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])


class Completion:
    """One completion request on its way: its choices, streams and clock."""

    def __init__(self, body: CompletionRequest, served: Served):
        self.timer = Timer()
        self.served, self.body = served, body
        self.plan = plan_completion(body, served)
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.streams: list[Stream] = []
        self.choices: list[Choice] = []
        self.cancelled = False

    async def start(self) -> None:
        """Score the prompts if echo asks for their logprobs, then submit the requests."""
        plan, body, served = self.plan, self.body, self.served
        scores: list[TokenScores | None] = [None] * len(plan.prompts)
        if body.echo and plan.logprobs is not None:
            scores = await served.engine.call(
                lambda: score_tokens(served.model, plan.prompts, top_n=plan.logprobs))
        self.choices = [Choice(p * plan.n + i, served, plan, p, bool(body.echo), scores[p],
                               bool(body.return_token_ids))
                        for p in range(len(plan.prompts)) for i in range(plan.n)]
        self.streams = served.engine.submit(plan.requests)

    async def score_prompts(self) -> None:
        """prompt_logprobs: each prompt's scores from the hidden states its prefill kept (the
        head runs on the engine thread); every choice of a prompt shares them."""
        plan, served = self.plan, self.served
        if plan.prompt_logprobs is None or self.cancelled:
            return
        scores = await served.engine.call(lambda: [
            score_hidden(served.model, r.prompt_states[0], ids, top_n=plan.prompt_logprobs)
            for r, ids in zip(plan.requests, plan.prompts)])
        for c in self.choices:
            c.set_prompt_logprobs(scores[c.index // plan.n])

    async def events(self) -> AsyncIterator[tuple[int, list[RowToken]]]:
        """(prompt, the tokens of one step) from all the streams, in arrival order."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, stream: Stream) -> None:
            try:
                async for rows in stream:
                    await merged.put((p, rows))
                await merged.put((p, None))
            except Exception as e:
                await merged.put((p, e))

        tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(self.streams)]
        try:
            for _ in range(len(tasks)):
                while True:
                    p, item = await merged.get()
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        raise item
                    yield p, item
        finally:
            for task in tasks:
                task.cancel()

    def take(self, p: int, rows: list[RowToken]) -> list[dict[str, Any]]:
        """Record one step of prompt p; the choices' chunks."""
        self.timer.token()
        return [self.choices[p * self.plan.n + t.row].add(t) for t in rows]

    def cancel(self, client_gone: bool = False) -> None:
        """Free the rows still running (a no-op for finished streams)."""
        self.cancelled = self.cancelled or client_gone
        for stream in self.streams:
            stream.cancel()

    def usage(self) -> dict[str, int]:
        prompt = sum(map(len, self.plan.prompts))
        completion = sum(len(c.tokens) for c in self.choices)
        return dict(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion)

    def envelope(self, choices: list[dict[str, Any]], usage: dict | None = None
                 ) -> dict[str, Any]:
        return dict(id=self.id, object="text_completion", created=self.created,
                    model=self.served.name, choices=choices, usage=usage,
                    system_fingerprint=None)

    def response(self) -> dict[str, Any]:
        return self.envelope([c.whole() for c in self.choices], self.usage())

    def log_metrics(self, error: Exception | None = None) -> None:
        """The metrics line of this request in the server log; its figures in /metrics."""
        usage, elapsed = self.usage(), self.timer.elapsed()
        ttft = self.timer.ttft_ms()
        decode_time = elapsed - (self.timer.first - self.timer.start) if ttft is not None else 0
        rate = (usage["completion_tokens"] - len(self.choices)) / decode_time \
            if decode_time > 0 and usage["completion_tokens"] > len(self.choices) else 0.0
        if self.served.metrics is not None:
            self.served.metrics.record(usage["prompt_tokens"], usage["completion_tokens"],
                                       None if ttft is None else ttft / 1e3, elapsed)
        status = "cancelled (client gone)" if self.cancelled else \
            f"failed: {error}" if error else \
            "finish " + ",".join(sorted({c.finish_reason or "length" for c in self.choices}))
        log.info("%s: %d prompt tokens, %d generated tokens in %d choices, time to first token "
                 "%s, %.3f s, %.1f tokens/s after the first, %s", self.id,
                 usage["prompt_tokens"], usage["completion_tokens"], len(self.choices),
                 "-" if ttft is None else f"{ttft:.1f} ms", elapsed, rate, status)


async def complete(body: CompletionRequest, served: Served, disconnected) -> dict[str, Any]:
    """A whole (non-streamed) completion. `disconnected()` is polled: a client that went away
    cancels the request."""
    completion = Completion(body, served)
    await completion.start()

    async def collect() -> None:
        async for p, rows in completion.events():
            completion.take(p, rows)

    async def watch() -> None:
        while not await disconnected():
            await asyncio.sleep(0.2)

    collecting, watching = asyncio.create_task(collect()), asyncio.create_task(watch())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():  # the client left
            completion.cancel(client_gone=True)
            collecting.cancel()
            completion.log_metrics()
            return completion.response()
        error = collecting.exception()
        if error is not None:
            completion.log_metrics(error)
            raise _as_api_error(error)
        await completion.score_prompts()
        completion.log_metrics()
        return completion.response()
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()


async def stream(body: CompletionRequest, served: Served) -> AsyncIterator[str]:
    """A streamed completion: returns once the first tokens are there (so that a request the
    sampler cannot serve is still a plain 400), then SSE chunks, one per token and choice."""
    completion = Completion(body, served)
    await completion.start()
    events = completion.events()
    first = None
    if completion.streams:
        try:
            first = await events.__anext__()
        except Exception as e:
            completion.log_metrics(e)
            raise _as_api_error(e) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def sse() -> AsyncIterator[str]:
        error = None
        try:
            if body.echo:
                yield _sse(completion.envelope([c.first() for c in completion.choices]))
            if first is not None:
                for chunk in completion.take(*first):
                    yield _sse(completion.envelope([chunk]))
            async for p, rows in events:
                for chunk in completion.take(p, rows):
                    yield _sse(completion.envelope([chunk]))
            if not completion.streams:  # max_tokens 0: nothing generated
                for c in completion.choices:
                    yield _sse(completion.envelope([dict(index=c.index, text="", logprobs=None,
                                                         finish_reason="length")]))
            if include_usage:
                yield _sse(completion.envelope([], completion.usage()))
        except asyncio.CancelledError:  # the client went away
            completion.cancel(client_gone=True)
            raise
        except Exception as e:
            error = e
            yield _sse(_as_api_error(e).body())
        finally:
            await events.aclose()
            completion.cancel()
            completion.log_metrics(error)
        yield "data: [DONE]\n\n"

    return sse()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):  # what the request asked could not be served (sampling)
        return bad_request(str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}")
