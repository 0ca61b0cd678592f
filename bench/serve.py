"""minilm-serve under load, on CPU: continuous batching against one-request-at-a-time serving.

    python bench/serve.py [--models char,gpt2] [--requests 16] [--prompt_tokens 32]
                          [--new_tokens 64] [--threads N]

For each model shape (random weights, saved as a checkpoint): `char`, the default char model
(configs/shakespeare_char.yaml: 4 x 4 x 128, context 128, 66 tokens) and `gpt2`, GPT-2 124M
(12 x 12 x 768, context 1024, the 50257-token BPE), two real servers are started (python -m
minilm.serve, in subprocesses): with --max_batch 16 (continuous batching) and with
--max_batch 1 (one request at a time: the others queue). Against each, 1, 4 and 16 concurrent
clients (closed loop: each sends its next request when the last one is done) stream --requests
requests of --prompt_tokens random prompt tokens and exactly --new_tokens new tokens
(ignore_eos), temperature 1 with a seed each. Reported: aggregate generated tokens/s (all tokens
/ wall time) and p50 / p95 time to first token (request sent → first chunk received), of the
best of --reps runs; the two servers run side by side (an idle one costs nothing) and take
turns, so that both see the same machine load.

Then the newcomer: 15 long requests decoding, one more is sent; its time to first token beside
its prefill alone (the TTFT of the same request on an idle server) and the decode step time with
15 rows running (the median gap between a long stream's chunks).

The clients (httpx, asyncio) share the machine with the server; on a 2-core box they cost a few
percent of one core.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' server launcher
from minilm.checkpoint import save_checkpoint  # noqa: E402
from minilm.model.gpt import GPT, GPTConfig  # noqa: E402
from minilm.tokenizer import CharTokenizer, TiktokenTokenizer  # noqa: E402

from server_process import ServerProcess  # noqa: E402

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def checkpoint(kind: str, folder: Path) -> tuple[Path, int]:
    """A random-weights checkpoint of that shape; its vocabulary size."""
    if kind == "char":
        tokenizer = CharTokenizer(SHAKESPEARE_CHARS)  # 65 characters + end-of-text
        config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_embd=128,
                           block_size=128, bias=False)
    else:
        tokenizer = TiktokenTokenizer("gpt2")
        config = GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    torch.manual_seed(0)
    path = folder / kind
    save_checkpoint(path, GPT(config), None, dict(config={}, tokenizer=tokenizer.to_dict(),
                                                  step=0, best_val_loss=None))
    return path, config.vocab_size


def start(ckpt: Path, max_batch: int, threads: int) -> ServerProcess:
    return ServerProcess(ckpt, "--max_batch", str(max_batch), "--log_level", "warning",
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


async def stream(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int,
                 seed: int) -> dict:
    """One streamed request: the arrival time of every chunk."""
    body = dict(prompt=prompt, max_tokens=new_tokens, stream=True, ignore_eos=True, seed=seed,
                temperature=1.0)
    sent = time.perf_counter()
    times = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if "error" in json.loads(line[6:]):
                    raise RuntimeError(line)
                times.append(time.perf_counter())
    assert len(times) == new_tokens, (len(times), new_tokens)
    return dict(sent=sent, times=times, ttft=times[0] - sent)


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (n, length), generator=g).tolist()  # no end-of-text


async def load(url: str, clients: int, requests: list[list[int]], new_tokens: int) -> dict:
    """`clients` closed-loop clients share the requests; aggregate tokens/s and TTFTs."""
    todo = list(enumerate(requests))
    results = []

    async def client_loop(client):
        while todo:
            i, prompt = todo.pop(0)
            results.append(await stream(client, url, prompt, new_tokens, seed=i))

    async with httpx.AsyncClient(timeout=None) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    return dict(tokens_per_s=len(results) * new_tokens / wall, wall=wall,
                p50=percentile(ttfts, 50), p95=percentile(ttfts, 95))


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def newcomer(url: str, prompt_tokens: int, vocab: int, others: int = 15) -> dict:
    """TTFT of one request sent while `others` long ones decode, beside its prefill alone."""
    newcomer_prompt = prompts(1, prompt_tokens, vocab, seed=99)[0]
    long_prompts = prompts(others, prompt_tokens, vocab, seed=98)
    async with httpx.AsyncClient(timeout=None) as client:
        alone = sorted([(await stream(client, url, newcomer_prompt, 1, seed=0))["ttft"]
                        for _ in range(5)])[2]  # median of 5, idle server
        long_new = 200
        tasks = [asyncio.create_task(stream(client, url, p, long_new, seed=i))
                 for i, p in enumerate(long_prompts)]
        await asyncio.sleep(0.5)
        while (await client.get(f"{url}/health")).json()["running_rows"] < others:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # well into decoding
        joined = await stream(client, url, newcomer_prompt, 1, seed=0)
        done = await asyncio.gather(*tasks)
    gaps = sorted(b - a for r in done for a, b in zip(r["times"], r["times"][1:])
                  if a < joined["sent"])  # steps before the newcomer came: 15 rows each
    return dict(alone=alone, joined=joined["ttft"], step=statistics.median(gaps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="char,gpt2")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=2, help="runs of each setting; the best is shown")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores; "
          f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.new_tokens} new "
          f"tokens) per row\n")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            ckpt, vocab = checkpoint(kind, Path(tmp))
            requests = prompts(args.requests, args.prompt_tokens, vocab)
            print(f"### {kind}\n")
            print("| server | clients | aggregate tokens/s | vs one at a time | TTFT p50 | TTFT p95 |")
            print("|---|---|---|---|---|---|")
            servers = {mb: start(ckpt, mb, args.threads) for mb in (1, 16)}
            try:
                for server in servers.values():
                    asyncio.run(load(server.url, 1, requests[:2], 8))  # warm-up
                rows = {}
                for clients in (1, 4, 16):
                    for _ in range(args.reps):  # interleaved: both see the same machine load
                        for mb, server in servers.items():
                            r = asyncio.run(load(server.url, clients, requests, args.new_tokens))
                            best = rows.get((mb, clients))
                            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                                rows[mb, clients] = r
                    for mb in (1, 16):
                        r = rows[mb, clients]
                        name = "continuous batching (16 rows)" if mb == 16 else \
                            "one request at a time"
                        print(f"| {name} | {clients} | {r['tokens_per_s']:.1f} | "
                              f"{r['tokens_per_s'] / rows[1, clients]['tokens_per_s']:.2f}x | "
                              f"{r['p50'] * 1e3:.0f} ms | {r['p95'] * 1e3:.0f} ms |", flush=True)
                n = asyncio.run(newcomer(servers[16].url, args.prompt_tokens, vocab))
            finally:
                for server in servers.values():
                    server.close()
            sequential = rows[1, 1]["tokens_per_s"]
            print(f"\n16 clients with continuous batching: "
                  f"{rows[16, 16]['tokens_per_s'] / sequential:.2f}x the aggregate tokens/s of "
                  f"sequential serving (1 client, one request at a time)")
            print(f"newcomer while 15 rows decode: time to first token {n['joined'] * 1e3:.0f} ms;"
                  f" alone (its prefill) {n['alone'] * 1e3:.0f} ms; a decode step of 15 rows "
                  f"{n['step'] * 1e3:.0f} ms: +{(n['joined'] - n['alone']) / n['step']:.1f} "
                  f"decode steps\n")


if __name__ == "__main__":
    main()
