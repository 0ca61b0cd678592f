"""minilm-serve: an OpenAI-compatible completions server with continuous batching, and the
explorer page (GET /) that shows the next-token distribution through the sampler's stages.

    minilm-serve --ckpt out/shakespeare_char [--host 127.0.0.1] [--port 8000] [--max_batch 16]

engine.py       the thread that owns the model and runs generation.RunningBatch
protocol.py     request bodies (pydantic) and OpenAI's error shape
completions.py  /v1/completions: prompts → requests → choices, whole or streamed (SSE)
app.py          the FastAPI app: routes, error handlers, /v1/distribution, the static page
served.py       the model, tokenizer and engine a server holds; metrics.py: /metrics
The command (its flags, uvicorn) is minilm/cli/serve.py.
FastAPI and uvicorn are an extra: pip install 'minilm[serve]'.
"""
