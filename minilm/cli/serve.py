"""minilm-serve: load a model, start the engine and serve the app with uvicorn.

    minilm-serve --ckpt SRC [--host 127.0.0.1] [--port 8000] [--max_batch 16] [--device auto]
                 [--max_tokens_limit 4096] [--max_waiting 256] [--prefill_chunk 128]
                 [--kv_cache_tokens N | --no_prefix_cache] [--model_name NAME] [--log_level info]

SRC is anything checkpoint.load_model accepts. The model is served under NAME (default: the last
part of SRC, or of its run folder for .../best and .../last).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from minilm.cli.common import ArgumentParser, run_cli
from minilm.device import DEVICE_NAMES, resolve_device

INSTALL_HINT = ("minilm-serve needs FastAPI, uvicorn and prometheus_client: "
                "pip install 'minilm[serve]'")


def build_parser() -> argparse.ArgumentParser:
    from minilm.serving.engine import MAX_WAITING, PREFILL_CHUNK  # (after main's import check)
    from minilm.serving.protocol import MAX_TOKENS_LIMIT

    p = ArgumentParser(prog="minilm-serve", description="Serve a minilm model: an OpenAI-compatible "
                "completions API and the next-token explorer page.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, a run's out_dir, or any "
                   "source load_model accepts")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch", type=int, default=16,
                   help="rows decoded together (continuous batching); more requests wait")
    p.add_argument("--max_tokens_limit", type=int, default=MAX_TOKENS_LIMIT,
                   help="the most tokens a request's max_tokens may ask for per choice (more is "
                        "a 400), so that no request holds a row for ever")
    p.add_argument("--max_waiting", type=int, default=MAX_WAITING,
                   help="requests that may wait for rows of the batch; more are refused with a "
                        "503 (the client may retry)")
    p.add_argument("--prefill_chunk", type=int, default=PREFILL_CHUNK,
                   help="prompt tokens prefilled per step while other rows decode: a long prompt "
                        "delays the running streams by about this many tokens' work per step")
    p.add_argument("--kv_cache_tokens", type=int,
                   help="tokens the prefix cache keeps (keys and values of earlier prompts that "
                        "later ones reuse; least recently used go first); default max_batch x "
                        "the model's context")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="compute every prompt from scratch")
    p.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (as train.device)")
    p.add_argument("--model_name", help="the name clients use (default: from --ckpt)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def model_name(source: str) -> str:
    """The last part of the source path or hub id; a run's folder for .../best and .../last."""
    path = Path(source.rstrip("/\\") or source)
    if path.name in ("best", "last") and path.parent.name:
        return path.parent.name
    return path.name or source


def main(argv: list[str]) -> int | None:
    try:  # before anything slow: without the extra, say so and stop
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    args = build_parser().parse_args(argv)
    from minilm.sampling.prefix_cache import BLOCK_TOKENS

    for name in ("max_batch", "max_tokens_limit", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_waiting < 0:
        raise ValueError(f"--max_waiting must be >= 0, got {args.max_waiting}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < BLOCK_TOKENS:
        raise ValueError(f"--kv_cache_tokens must be at least one block of {BLOCK_TOKENS} "
                         f"tokens, got {args.kv_cache_tokens}")
    if args.no_prefix_cache and args.kv_cache_tokens is not None:
        raise ValueError("--no_prefix_cache and --kv_cache_tokens contradict each other: give one")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")

    from minilm.interop.loading import load_model
    from minilm.serving.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    model, tokenizer, _ = load_model(args.ckpt, resolve_device(args.device, key="--device"))
    name = args.model_name or model_name(args.ckpt)
    app = create_app(model, tokenizer, name, args.max_batch, args.max_tokens_limit,
                     kv_cache_tokens=0 if args.no_prefix_cache else args.kv_cache_tokens,
                     prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting)
    logging.getLogger("minilm.serve").info(
        "serving %s (%s parameters, context %d) at http://%s:%d/ with up to %d rows per batch",
        name, f"{model.param_counts()['total']:,}", model.config.block_size, args.host, args.port,
        args.max_batch)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def entry() -> None:
    """Console script `minilm-serve`."""
    sys.exit(run_cli(main))
