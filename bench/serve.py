"""minilm-serve under load, on CPU: continuous batching, prefix caching, chunked prefill.

    python bench/serve.py [--cases load,newcomer,prefix,long_prompt,vs_complete]
                          [--models char,gpt2] [--requests 16] [--prompt_tokens 32]
                          [--new_tokens 64] [--threads N] [--reps 2]

For each model shape (random weights, saved as a checkpoint): `char`, the default char model
(configs/shakespeare_char.yaml: 4 x 4 x 128, context 128, 66 tokens) and `gpt2`, GPT-2 124M
(12 x 12 x 768, context 1024, the 50257-token BPE), real servers (python -m minilm.serve, in
subprocesses) and these cases:

load        --max_batch 16 (continuous batching) against --max_batch 1 (one request at a time:
            the others queue); 1, 4 and 16 concurrent clients (closed loop: each sends its next
            request when the last one is done) stream --requests requests of --prompt_tokens
            random prompt tokens and exactly --new_tokens new tokens (ignore_eos), temperature 1
            with a seed each. Aggregate generated tokens/s (all tokens / wall time) and p50 / p95
            time to first token (request sent -> first chunk received), of the best of --reps
            runs; the two servers run side by side (an idle one costs nothing) and take turns.
newcomer    15 long requests decoding (inside the model's context, up to 200 new tokens), one
            more is sent: its time to first token beside its prefill alone (the same request on
            an idle server) and the decode step with 15 rows (the median gap between a long
            stream's chunks).
prefix      the shared-prefix case: a fresh random 800-token prefix per repetition; a request of
            prefix + 16 tokens (cold: nothing cached), then one of prefix + 16 other tokens
            (cached: the prefix's 50 blocks come from the prefix cache); medians of --reps pairs
            of time to first token, and the hit rate of the cached ones (/metrics' hits / queries).
long_prompt 8 streams decode; a 1000-token prompt arrives. The worst and the median gap
            between two chunks of a running stream while it is prefilled, in decode steps (the
            median gap before it arrived);
            --prefill_chunk 64 (the default) against 4096 (the whole prompt in one step), the two
            servers taking turns; medians of --reps.
vs_complete 16 concurrent streams of --prompt_tokens + --new_tokens tokens against in-process
            generation.complete() over the same 16 prompts (one batch: the engine's ceiling);
            aggregate tokens/s, taking turns, medians of --reps.

The clients (httpx, asyncio) share the machine with the server; on a 2-core box they cost a few
percent of one core. On a machine shared with other jobs, read the ratios (the two sides of each
comparison take turns) and give `uptime`'s load beside them.
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


def checkpoint(kind: str, folder: Path) -> tuple[Path, int, int]:
    """A random-weights checkpoint of that shape; its vocabulary size and context."""
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
    return path, config.vocab_size, config.block_size


def start(ckpt: Path, max_batch: int, threads: int, *args: str) -> ServerProcess:
    return ServerProcess(ckpt, "--max_batch", str(max_batch), "--log_level", "warning", *args,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name: value} (every sample has the one model_name label)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if "le" not in s.labels}


async def stream(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int,
                 seed: int, times: list[float] | None = None) -> dict:
    """One streamed request: the arrival time of every chunk (appended to `times` as they come,
    when given)."""
    body = dict(prompt=prompt, max_tokens=new_tokens, stream=True, ignore_eos=True, seed=seed,
                temperature=1.0)
    sent = time.perf_counter()
    times = [] if times is None else times
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


async def decoding(tasks: list[asyncio.Task], times: list[list[float]], chunks: int) -> None:
    """Return once every stream has received `chunks` chunks (well into decoding); a stream that
    failed first raises its error here instead of leaving the wait to spin."""
    while min(map(len, times)) < chunks:
        failed = next((t for t in tasks if t.done() and t.exception() is not None), None)
        if failed is not None:
            raise failed.exception()
        await asyncio.sleep(0.005)


async def newcomer(url: str, prompt_tokens: int, vocab: int, block_size: int, others: int = 15
                   ) -> dict:
    """TTFT of one request sent while `others` long ones decode, beside its prefill alone. The
    long ones stay inside the model's context (a row past block_size re-fills its window for
    every token: another case, see bench/generate.py's table 4)."""
    newcomer_prompt = prompts(1, prompt_tokens, vocab, seed=99)[0]
    long_prompts = prompts(others, prompt_tokens, vocab, seed=98)
    times: list[list[float]] = [[] for _ in long_prompts]
    async with httpx.AsyncClient(timeout=None) as client:
        alone = sorted([(await stream(client, url, newcomer_prompt, 1, seed=0))["ttft"]
                        for _ in range(5)])[2]  # median of 5, idle server
        long_new = min(200, block_size - prompt_tokens)
        tasks = [asyncio.create_task(stream(client, url, p, long_new, seed=i, times=times[i]))
                 for i, p in enumerate(long_prompts)]
        await decoding(tasks, times, 8)
        joined = await stream(client, url, newcomer_prompt, 1, seed=0)
        done = await asyncio.gather(*tasks)
    gaps = sorted(b - a for r in done for a, b in zip(r["times"], r["times"][1:])
                  if a < joined["sent"])  # steps before the newcomer came: 15 rows each
    return dict(alone=alone, joined=joined["ttft"], step=statistics.median(gaps))


async def shared_prefix(url: str, vocab: int, rep: int, prefix_tokens: int = 800,
                        suffix_tokens: int = 16) -> dict:
    """TTFT of prefix + suffix on a server that has never seen the prefix, then of prefix + another
    suffix; the hit rate of the second."""
    prefix = prompts(1, prefix_tokens, vocab, seed=1000 + rep)[0]
    a, b = prompts(2, suffix_tokens, vocab, seed=2000 + rep)
    async with httpx.AsyncClient(timeout=None) as client:
        cold = (await stream(client, url, prefix + a, 1, seed=0))["ttft"]
        before = metrics(url)
        cached = (await stream(client, url, prefix + b, 1, seed=0))["ttft"]
    after = metrics(url)
    hits = after["minilm:prefix_cache_hits_total"] - before["minilm:prefix_cache_hits_total"]
    queries = after["minilm:prefix_cache_queries_total"] - \
        before["minilm:prefix_cache_queries_total"]
    return dict(cold=cold, cached=cached, hit_rate=hits / queries)


async def long_prompt(url: str, vocab: int, rep: int, streams: int = 8, prompt_tokens: int = 1000
                      ) -> dict:
    """`streams` rows decode; a prompt of `prompt_tokens` arrives: the running streams' worst gap
    while it is prefilled (sent -> its first token) over their median gap before, and its TTFT."""
    running = prompts(streams, 32, vocab, seed=3000 + rep)
    long = prompts(1, prompt_tokens, vocab, seed=4000 + rep)[0]
    times: list[list[float]] = [[] for _ in running]
    async with httpx.AsyncClient(timeout=None) as client:
        tasks = [asyncio.create_task(stream(client, url, p, 1000, seed=i, times=times[i]))
                 for i, p in enumerate(running)]
        await decoding(tasks, times, 6)  # gaps to take the median of
        joined = await stream(client, url, long, 1, seed=0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return dict(ttft=joined["ttft"], sent=joined["sent"], first=joined["times"][0], times=times)


def gap_ratios(times: list[list[float]], sent: float, first: float) -> tuple[float, float]:
    """The worst and the median gap between two chunks of the running streams that end while the
    long prompt is being prefilled, over the median gap of their chunks before it arrived."""
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b < sent]
    during = [b - a for t in times for a, b in zip(t, t[1:]) if sent < b <= first + 1e-3]
    step = statistics.median(before)
    return max(during) / step, statistics.median(during) / step


async def streams_vs_complete(url: str, requests: list[list[int]], new_tokens: int) -> float:
    """Aggregate tokens/s of one streamed request per prompt, all sent at once."""
    async with httpx.AsyncClient(timeout=None) as client:
        start = time.perf_counter()
        await asyncio.gather(*(stream(client, url, p, new_tokens, seed=i)
                               for i, p in enumerate(requests)))
        return len(requests) * new_tokens / (time.perf_counter() - start)


def complete_tokens_per_s(ckpt: Path, requests: list[list[int]], new_tokens: int) -> float:
    """generation.complete() over the same prompts in this process (T = 1, a seed per row)."""
    from minilm.interop.loading import load_model
    from minilm.sampling.generation import complete
    from minilm.sampling.stack import SamplerStack

    model, _, _ = load_model(ckpt)
    stack = SamplerStack.from_settings(temperature=1.0)
    start = time.perf_counter()
    complete(model, requests, new_tokens, sampler=stack, seed=list(range(len(requests))))
    return len(requests) * new_tokens / (time.perf_counter() - start)


def run_load(ckpt: Path, vocab: int, block: int, args: argparse.Namespace, cases: set[str]
             ) -> None:
    """The load and newcomer cases (see the module docstring)."""
    requests = prompts(args.requests, args.prompt_tokens, vocab)
    print("| server | clients | aggregate tokens/s | vs one at a time | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|---|")
    servers = {mb: start(ckpt, mb, args.threads) for mb in (1, 16)}
    try:
        for server in servers.values():
            asyncio.run(load(server.url, 1, requests[:2], 8))  # warm-up
        rows = {}
        for clients in (1, 4, 16) if "load" in cases else ():
            for _ in range(args.reps):  # interleaved: both see the same machine load
                for mb, server in servers.items():
                    r = asyncio.run(load(server.url, clients, requests, args.new_tokens))
                    best = rows.get((mb, clients))
                    if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                        rows[mb, clients] = r
            for mb in (1, 16):
                r = rows[mb, clients]
                name = "continuous batching (16 rows)" if mb == 16 else "one request at a time"
                print(f"| {name} | {clients} | {r['tokens_per_s']:.1f} | "
                      f"{r['tokens_per_s'] / rows[1, clients]['tokens_per_s']:.2f}x | "
                      f"{r['p50'] * 1e3:.0f} ms | {r['p95'] * 1e3:.0f} ms |", flush=True)
        if "newcomer" in cases:
            n = asyncio.run(newcomer(servers[16].url, args.prompt_tokens, vocab, block))
    finally:
        for server in servers.values():
            server.close()
    if "load" in cases:
        print(f"\n16 clients with continuous batching: "
              f"{rows[16, 16]['tokens_per_s'] / rows[1, 1]['tokens_per_s']:.2f}x the aggregate "
              f"tokens/s of sequential serving (1 client, one request at a time)")
    if "newcomer" in cases:
        print(f"newcomer while 15 rows decode: time to first token {n['joined'] * 1e3:.0f} ms; "
              f"alone (its prefill) {n['alone'] * 1e3:.0f} ms; a decode step of 15 rows "
              f"{n['step'] * 1e3:.0f} ms: +{(n['joined'] - n['alone']) / n['step']:.1f} "
              f"decode steps\n")


def run_prefix(ckpt: Path, vocab: int, args: argparse.Namespace, prefix_tokens: int) -> None:
    server = start(ckpt, 16, args.threads)
    try:
        asyncio.run(shared_prefix(server.url, vocab, rep=-1, prefix_tokens=64))  # warm-up
        runs = [asyncio.run(shared_prefix(server.url, vocab, rep, prefix_tokens))
                for rep in range(args.reps)]
    finally:
        server.close()
    cold = statistics.median(r["cold"] for r in runs)
    cached = statistics.median(r["cached"] for r in runs)
    print(f"shared {prefix_tokens}-token prefix (+ 16 own tokens): time to first token cold {cold * 1e3:.0f} "
          f"ms, cached {cached * 1e3:.0f} ms: {cold / cached:.1f}x faster; hit rate of the "
          f"cached requests {statistics.median(r['hit_rate'] for r in runs):.1%} (medians of "
          f"{len(runs)})\n", flush=True)


def run_long_prompt(ckpt: Path, vocab: int, args: argparse.Namespace, prompt_tokens: int
                    ) -> None:
    servers = {chunk: start(ckpt, 16, args.threads, "--prefill_chunk", str(chunk))
               for chunk in (64, 4096)}
    results: dict[int, list[dict]] = {chunk: [] for chunk in servers}
    try:
        for rep in range(args.reps):
            for chunk, server in servers.items():
                results[chunk].append(asyncio.run(long_prompt(server.url, vocab, rep,
                                                              prompt_tokens=prompt_tokens)))
    finally:
        for server in servers.values():
            server.close()
    print(f"| --prefill_chunk | running streams' worst gap | their median gap | "
          f"{prompt_tokens}-token prompt TTFT |")
    print("|---|---|---|---|")
    for chunk, runs in results.items():
        ratios = [gap_ratios(r["times"], r["sent"], r["first"]) for r in runs]
        worst, median = (statistics.median(x) for x in zip(*ratios))
        ttft = statistics.median(r["ttft"] for r in runs)
        print(f"| {chunk} | {worst:.1f} decode steps | {median:.1f} decode steps | {ttft:.1f} s |",
              flush=True)
    print()


def run_vs_complete(ckpt: Path, vocab: int, args: argparse.Namespace) -> None:
    requests = prompts(16, args.prompt_tokens, vocab, seed=5000)
    server = start(ckpt, 16, args.threads)
    rates = {"server": [], "complete": []}
    try:
        asyncio.run(streams_vs_complete(server.url, requests[:2], 4))  # warm-up
        for _ in range(args.reps):
            rates["complete"].append(complete_tokens_per_s(ckpt, requests, args.new_tokens))
            rates["server"].append(asyncio.run(streams_vs_complete(server.url, requests,
                                                                   args.new_tokens)))
    finally:
        server.close()
    ours, ceiling = (statistics.median(rates[k]) for k in ("server", "complete"))
    print(f"16 concurrent streams: {ours:.1f} tokens/s; in-process complete() over the same 16 "
          f"prompts: {ceiling:.1f} tokens/s: {ours / ceiling:.2f}x (medians of {args.reps})\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="load,newcomer,prefix,long_prompt,vs_complete")
    p.add_argument("--models", default="char,gpt2")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=2, help="runs of each setting")
    args = p.parse_args()
    cases = set(args.cases.split(","))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, load "
          f"average {os.getloadavg()[0]:.1f}; {args.requests} requests x ({args.prompt_tokens} "
          f"prompt + {args.new_tokens} new tokens) per row\n")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            ckpt, vocab, block = checkpoint(kind, Path(tmp))
            print(f"### {kind}\n")
            if cases & {"load", "newcomer"}:
                run_load(ckpt, vocab, block, args, cases)
            if "prefix" in cases:
                run_prefix(ckpt, vocab, args, min(800, block - 32))
            if "long_prompt" in cases:
                run_long_prompt(ckpt, vocab, args, min(1000, block - 32))
            if "vs_complete" in cases:
                run_vs_complete(ckpt, vocab, args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
