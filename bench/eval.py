"""minilm-eval's speed and memory: tokens/s of minilm.evaluation.evaluate (what the CLI runs: every
token scored once in sliding windows, NLL, accuracy, entropy, ECE) and its peak memory, for the
default char model (configs/shakespeare_char.yaml: 4 x 4 x 128, block 128, 77 characters) and the
GPT-2 124M shape (12 x 12 x 768, block 1024, vocab 50257).

    python bench/eval.py [--device cpu|cuda] [--threads 2] [--reps 2]
    python bench/eval.py --one gpt2 --batch_size 8 [--fit]     # one case, in this process

Random weights and random token ids (speed does not depend on either), in documents of
4 x block_size tokens, so most tokens are scored in the steady state of the windows (each window
block_size long, scoring its last block_size / 2 tokens). Every case runs in a fresh process so
that its peak memory is its own: peak RSS on CPU, torch's peak allocation on CUDA; "eval's own"
is the peak minus what the process held before the evaluation (model, tokens, torch itself).
tokens/s is the best of --reps timed runs after a warm-up run.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minilm.evaluation.corpus import Document, evaluate  # noqa: E402
from minilm.model.gpt import GPT, GPTConfig  # noqa: E402

SHAPES = {
    "char": dict(vocab_size=77, n_layer=4, n_head=4, n_embd=128, block_size=128, bias=False),
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
}
TOKENS = {"char": 131072, "gpt2": 8192}  # per timed run, for each device
TOKENS_CUDA = {"char": 1048576, "gpt2": 262144}
CASES = [("char", 1, False), ("char", 8, False), ("char", 32, False), ("char", 32, True),
         ("gpt2", 1, False), ("gpt2", 8, False), ("gpt2", 8, True)]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024


def documents(shape: dict, n_tokens: int) -> list[Document]:
    g = torch.Generator().manual_seed(0)
    length = 4 * shape["block_size"]
    docs = []
    for i in range(0, n_tokens, length):
        n = min(length, n_tokens - i)
        docs.append(Document(f"doc {len(docs)}", "x" * n,
                             torch.randint(0, shape["vocab_size"] - 1, (n,), generator=g).tolist()))
    return docs


def one_case(name: str, batch_size: int, fit: bool, device: str, reps: int) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape)).to(device).eval()
    n_tokens = (TOKENS_CUDA if device.startswith("cuda") else TOKENS)[name]
    docs, eot = documents(shape, n_tokens), shape["vocab_size"] - 1
    run = lambda d: evaluate(model, d, eot, batch_size=batch_size, fit_temperature=fit)  # noqa
    run(docs[:max(2, len(docs) // 8)])  # warm-up
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        results = run(docs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    passes = results["temperature"]["passes"] if fit else 0
    return dict(model=name, batch_size=batch_size, fit=fit, passes=passes, tokens=results["tokens"],
                tokens_per_sec=results["tokens"] / min(times), peak_bytes=peak,
                eval_bytes=peak - base, weights_bytes=sum(p.numel() * 4 for p in
                                                          model.parameters()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--one", choices=SHAPES, help="run one case here and print it as JSON")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--fit", action="store_true", help="with --fit_temperature")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_case(args.one, args.batch_size, args.fit, args.device, args.reps)))
        return
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU, {args.threads} threads")
    memory = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"minilm-eval on {where}, torch {torch.__version__}\n")
    print(f"| model | batch (windows) | --fit_temperature | tokens | tokens/s | {memory} | "
          "eval's own |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, batch_size, fit in CASES:
        cmd = [sys.executable, __file__, "--one", name, "--batch_size", str(batch_size),
               "--device", args.device, "--threads", str(args.threads), "--reps", str(args.reps)]
        out = subprocess.run(cmd + (["--fit"] if fit else []), capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | {batch_size} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout)
        fitted = f"yes ({r['passes']} passes)" if fit else "no"
        print(f"| {name} | {batch_size} | {fitted} | {r['tokens']:,} | "
              f"{r['tokens_per_sec']:,.0f} | {r['peak_bytes'] / 2**20:,.0f} MiB | "
              f"{r['eval_bytes'] / 2**20:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
