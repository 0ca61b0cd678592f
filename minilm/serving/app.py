"""The FastAPI app: the OpenAI-compatible routes, the explorer page and the readings it shows.

    GET  /                        the explorer page (static/: HTML, JS, CSS; no CDN, no build step)
    GET  /health                  {"status": "ok", running rows, waiting requests, the limits}
    GET  /metrics                 Prometheus' text format, vLLM's names under minilm: (metrics.py)
    GET  /v1/models               the served model
    POST /v1/completions          OpenAI's completions (completions.py), streamed or whole
    POST /v1/distribution         the next-token table through the sampler's stages
    GET  /v1/sampler_settings     every sampler knob (type, default, range, help, stage, slider
                                  span) and the stage orders: what the page builds its controls from
    POST /v1/lens                 the logit lens at one position: each layer's next-token reading
    POST /v1/temperature_sweep    entropy and top probability of one position's softmax(z / T)
    POST /v1/score                each token's log-prob, rank and entropy (what GLTR colours by)

Every error is in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad
field (named in `param`), 404 for an unknown model or path, 503 when more requests wait than
--max_waiting allows, 500 for a failure of the server.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from minilm.errors import SettingError
from minilm.evaluation.scoring import score_tokens
from minilm.model.gpt import GPT
from minilm.sampling.generation import next_token_table
from minilm.sampling.lens import (
    SWEEP_TEMPERATURES,
    logit_lens,
    next_token_logits,
    temperature_sweep,
)
from minilm.sampling.settings import describe
from minilm.serving import completions
from minilm.serving.engine import MAX_WAITING, PREFILL_CHUNK, Engine
from minilm.serving.metrics import Metrics
from minilm.serving.protocol import (
    MAX_TOKENS_LIMIT,
    MAX_TOP_N,
    APIError,
    CompletionRequest,
    DistributionRequest,
    Float,
    Int,
    _Body,
    bad_request,
    validation_error,
)
from minilm.serving.served import Served
from minilm.tokenizer import Tokenizer

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("minilm.serve")


class LensRequest(_Body):
    """POST /v1/lens: one prompt, the position to read (-1: the last token) and the tokens shown
    per layer."""
    model: str | None = None
    prompt: str | list[Int]
    position: Int | None = -1
    top_n: Int | None = 10


class SweepRequest(_Body):
    """POST /v1/temperature_sweep: one prompt, the position to read and the temperatures."""
    model: str | None = None
    prompt: str | list[Int]
    position: Int | None = -1
    temperatures: list[Float] | None = None  # default SWEEP_TEMPERATURES, 0.1 to 2


class ScoreRequest(_Body):
    """POST /v1/score: one text (or token ids) whose every token but the first is scored."""
    model: str | None = None
    prompt: str | list[Int]


MAX_SWEEP = 200  # temperatures one sweep may ask for


def create_app(model: GPT, tokenizer: Tokenizer, name: str, max_batch: int = 16,
               max_tokens_limit: int = MAX_TOKENS_LIMIT, kv_cache_tokens: int | None = None,
               prefill_chunk: int | None = PREFILL_CHUNK, max_waiting: int | None = MAX_WAITING
               ) -> FastAPI:
    """The app serving `model` as `name`; its engine thread runs while the app does.
    kv_cache_tokens: the prefix cache's size (None: max_batch * block_size; 0: no prefix cache);
    prefill_chunk: prefill tokens per step while rows decode (None: no limit); max_waiting:
    requests that may wait for rows (more are a 503; None: no limit)."""
    if kv_cache_tokens is None:
        kv_cache_tokens = max_batch * model.config.block_size
    engine = Engine(model, max_batch, kv_cache_tokens or None, prefill_chunk, max_waiting)
    served = Served(model, tokenizer, name, engine, max_tokens_limit,
                    Metrics(engine.stats, name))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="minilm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        error = validation_error(list(e.errors()))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{e.detail}: {request.method} {request.url.path}"
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(APIError(e.status_code, message, code=code).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = APIError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return dict(status="ok", model=served.name, **served.engine.stats(),
                    max_tokens_limit=served.max_tokens_limit)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = served.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return dict(object="list", data=[dict(
            id=served.name, object="model", created=0, owned_by="minilm",
            max_model_len=served.block_size, vocab_size=served.vocab_size)])

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        if body.stream:
            return StreamingResponse(await completions.stream(body, served),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await completions.complete(body, served, request.is_disconnected)

    @app.post("/v1/distribution")
    async def distribution(body: DistributionRequest) -> dict[str, Any]:
        return await next_token_distribution(body, served)

    @app.get("/v1/sampler_settings")
    async def sampler_settings() -> dict[str, Any]:
        return describe()

    @app.post("/v1/lens")
    async def lens(body: LensRequest) -> dict[str, Any]:
        return await logit_lens_readings(body, served)

    @app.post("/v1/temperature_sweep")
    async def sweep(body: SweepRequest) -> dict[str, Any]:
        return await temperature_sweep_readings(body, served)

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> dict[str, Any]:
        return await token_scores(body, served)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def next_token_distribution(body: DistributionRequest, served: Served) -> dict[str, Any]:
    """The next-token table (generation.next_token_table, as generate.py --show_distribution)."""
    served.check_model(body.model)
    top_n = checked_top_n(body.top_n, 20)
    (ids,), (text,) = served.read_prompts(body.prompt)
    sampler = served.sampler(body)
    negative = served.negative_prompt(body, sampler, ids)
    include = sorted(body.bias(served.tokenizer.encode))
    table = await served.engine.call(
        lambda: next_token_table(served.model, ids, sampler, top_n, include, negative))
    return dict(
        object="distribution", model=served.name, prompt=text, prompt_token_ids=ids,
        vocab_size=table.vocab_size,
        stages=[dict(name=s, kept=k, entropy=h)
                for s, k, h in zip(table.stages, table.n_kept, table.entropy)],
        tokens=[dict(id=t, text=served.token_text(t), logit=z, probs=p, kept=k)
                for t, z, p, k in zip(table.tokens, table.logits, table.probs, table.kept)])


async def logit_lens_readings(body: LensRequest, served: Served) -> dict[str, Any]:
    """The logit lens (sampling.lens.logit_lens, as minilm-lens --json) of the served model."""
    served.check_model(body.model)
    top_n = checked_top_n(body.top_n, 10)
    (ids,), (text,) = served.read_prompts(body.prompt)
    position = -1 if body.position is None else body.position
    lens = await on_engine(served, lambda: logit_lens(served.model, ids, position, top_n))
    return dict(object="lens", model=served.name, prompt=text,
                **lens.to_dict(served.token_text))


async def temperature_sweep_readings(body: SweepRequest, served: Served) -> dict[str, Any]:
    """Entropy and top probability of softmax(z / T) at one position (sampling.lens)."""
    served.check_model(body.model)
    (ids,), (text,) = served.read_prompts(body.prompt)
    position = -1 if body.position is None else body.position
    temperatures = list(SWEEP_TEMPERATURES if body.temperatures is None else body.temperatures)
    if len(temperatures) > MAX_SWEEP:
        raise bad_request(f"temperatures: at most {MAX_SWEEP}, got {len(temperatures)}",
                          "temperatures")

    def sweep() -> tuple[Any, ...]:
        logits = next_token_logits(served.model, ids, position)
        return int(logits.argmax()), *temperature_sweep(logits, temperatures)

    top, entropy, top_prob = await on_engine(served, sweep)
    return dict(object="temperature_sweep", model=served.name, prompt=text,
                prompt_token_ids=ids, position=position % len(ids),
                top_token=dict(id=top, token=served.token_text(top)),
                temperatures=temperatures, entropy=entropy, top_prob=top_prob)


async def token_scores(body: ScoreRequest, served: Served) -> dict[str, Any]:
    """Every token but the first, scored with the window generation reads (each token predicted
    from at most block_size tokens before it: eval's rolling windows with stride 1)."""
    served.check_model(body.model)
    (ids,), (text,) = served.read_prompts(body.prompt)
    longest = served.block_size + served.max_tokens_limit  # what a generation can reach
    if len(ids) > longest:
        raise bad_request(f"prompt is {len(ids)} tokens; at most {longest} (block_size + "
                          "--max_tokens_limit) are scored", "prompt")
    (scores,) = await on_engine(served, lambda: score_tokens(served.model, [ids], stride=1))
    return dict(object="score", model=served.name, prompt=text, prompt_token_ids=ids,
                tokens=[dict(id=t, token=served.token_text(t), logprob=lp, rank=r, entropy=h)
                        for t, lp, r, h in zip(scores.tokens, scores.logprobs, scores.ranks,
                                               scores.entropy)])


async def on_engine(served: Served, fn: Callable[[], Any]) -> Any:
    """fn() on the engine thread (which owns the model); a SettingError is a 400 naming it."""
    try:
        return await served.engine.call(fn)
    except SettingError as e:
        raise bad_request(str(e), e.param) from None


def checked_top_n(top_n: int | None, default: int) -> int:
    """A request's top_n (None: `default`); outside [1, MAX_TOP_N] it is a 400 naming it."""
    top_n = default if top_n is None else top_n
    if not 1 <= top_n <= MAX_TOP_N:
        raise bad_request(f"top_n must be in [1, {MAX_TOP_N}], got {top_n}", "top_n")
    return top_n
