"""Training speed, MFU and memory of GPT-2 124M on one GPU, per loss and compile setting.

Not a test: a benchmark that prints figures.

    python bench/train_gpu.py                          # V = 50257 and 200019, batch 16 x 1024
    python bench/train_gpu.py --vocab 50257 --no-max-batch --peak-tflops 989
    python bench/train_gpu.py --vocab 50257 --runs fused:on,naive:on --results r.jsonl  # in parts

A compiled setting with its largest-batch search takes about two minutes on an H100 (two
compiles: the trainer's, and the dynamic-batch one of the search), so all eight settings take
longer than one 10-minute job: run them in parts into one --results file.

For loss in {naive, fused} x compile in {off, on} and each vocabulary size, one process per
setting trains configs/gpt2_124m.yaml's model (12 x 768, block 1024, tied head, bf16 autocast,
batch 16 x grad_accum 4 as shipped) through minilm.trainer.train(), the code a user runs, and
prints:
- tokens/s: the median of the trainer's own logged figures after --warmup steps;
- MFU: tokens/s x FLOPs per token over the GPU's dense bf16 peak (--peak-tflops; 989 for an
  H100 SXM), FLOPs per token counted as nanoGPT does: 6·N + 12·L·H·Q·T, N the parameters
  without the position embedding (the tied head's matmul is the 6·V·d inside 6·N);
- peak memory: torch.cuda.max_memory_allocated over the training steps (the evals at step 0 and
  at the end are left out: they run the uncompiled model under no_grad);
- the largest batch (sequences of 1024 tokens) whose training step fits: two training steps per
  probe (the second has the optimizer state) on one model compiled once with a dynamic batch
  dimension, searched from an affine memory model, then bisected.
"fused" is loss.impl=auto (the Triton kernel on CUDA); compile on is train.compile=true, what
the default train.compile=auto means on CUDA: fused with compile on is the default setting.

Data: random token ids written as a prepared dataset (train.bin, val.bin, meta.json) in the
trainer's own cache layout, so train() reads them through the same memmap and batch code as a
real corpus. Speed does not depend on which ids the tokens are, and this needs neither datasets,
a tokenizer file nor a network (o200k_base's 200019 tokens need only the vocabulary size).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minilm.model.gpt import GPT  # noqa: E402
from minilm.train.config import Config, load_config  # noqa: E402
from minilm.train.data import cache_folder, token_dtype  # noqa: E402
from minilm.train.tracking import Tracker, read_metrics  # noqa: E402
from minilm.train.trainer import (
    configure_optimizer,
    loss_options,
    resolve_compile,
    resolve_dtype,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
GiB = 2 ** 30
TOKENIZERS = {50257: "gpt2", 200019: "o200k_base"}  # names recorded in meta.json, never loaded


def write_random_dataset(cache_dir: Path, vocab: int, tokens: int = 2 ** 22) -> str:
    """A prepared dataset of uniform random ids in data.prepare()'s cache layout; returns the
    data.source name that prepare() resolves to it."""
    source = f"bench-random-{vocab}"
    tokenizer = TOKENIZERS.get(vocab, "gpt2")
    out = cache_folder(source, tokenizer, "text", None, "train", 0.1, cache_dir)
    if (out / "meta.json").exists():
        return source
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    dtype = token_dtype(vocab)
    counts = {}
    for split, n in (("train", tokens), ("val", tokens // 16)):
        rng.integers(0, vocab, n, dtype=np.int64).astype(dtype).tofile(out / f"{split}.bin")
        counts[split] = n
    meta = dict(source=source, tokenizer={"type": "tiktoken", "name": tokenizer},
                vocab_size=vocab, dtype=dtype.name, tokens=counts, documents=dict(train=1, val=1))
    (out / "meta.json").write_text(json.dumps(meta))
    return source


def bench_config(args, vocab: int, loss: str, compile_: bool, cache_dir: Path) -> Config:
    source = write_random_dataset(cache_dir, vocab)
    return load_config(ROOT / "configs/gpt2_124m.yaml", [
        f"--data.source={source}", f"--data.tokenizer={TOKENIZERS.get(vocab, 'gpt2')}",
        f"--data.cache_dir={cache_dir}", "--data.name=null", "--data.val_fraction=0.1",
        f"--train.batch_size={args.batch_size}", f"--train.grad_accum_steps={args.grad_accum}",
        f"--train.max_iters={args.iters}", f"--train.eval_interval={args.iters}",
        "--train.eval_iters=1", f"--train.log_interval={args.log_interval}",
        f"--loss.impl={'naive' if loss == 'naive' else 'auto'}",
        f"--train.compile={str(compile_).lower()}", "--wandb.mode=disabled",
        f"--out_dir={cache_dir.parent / f'run-{vocab}-{loss}-{int(compile_)}'}",
        *(f"--{kv}" for kv in args.set)])


def flops_per_token(cfg: Config, vocab: int) -> float:
    """nanoGPT's estimate: 6·N + 12·L·H·Q·T, N without the position embedding."""
    with torch.device("meta"):
        model = GPT(cfg.model.gpt_config(vocab))
    m = cfg.model
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * m.n_layer * m.n_head * (m.n_embd // m.n_head) * m.block_size


class PeakMemoryTracker(Tracker):
    """The trainer's tracker, plus the peak memory of the training steps: the peak counter is
    reset after the step-0 eval and read at each logged step (before the final eval)."""

    peak = 0

    def log_eval(self, step, **metrics):
        super().log_eval(step, **metrics)
        if step == 0 and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def log_step(self, step, *a, **kw):
        super().log_step(step, *a, **kw)
        if torch.cuda.is_available():
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())


def measure_training(cfg: Config, warmup: int) -> dict:
    # out_dir is the bench's scratch: a run of an earlier bench there would make train() refuse
    # a fresh one, and --train.overwrite would delete the metrics.jsonl this tracker already holds
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    tracker = PeakMemoryTracker(cfg.out_dir, cfg.train.max_iters)
    train(cfg, tracker=tracker)
    logs = [r for r in read_metrics(cfg.out_dir) if "tokens_per_sec" in r]
    tps = [r["tokens_per_sec"] for r in logs if r["step"] > warmup]
    return dict(tokens_per_sec=statistics.median(tps), peak_gib=tracker.peak / GiB,
                final_loss=logs[-1]["loss"])


def training_step(cfg: Config, vocab: int, dynamic_batch: bool = False):
    """The trainer's step on a fresh model, for probes and profiles: forward under autocast with
    the loss summed, backward, gradient clipping, AdamW. Returns step(batch) -> None, which draws
    random [batch, block] tokens. Compiled when the setting says so; dynamic_batch compiles once
    for every batch size instead of once per size."""
    device = torch.device("cuda")
    model = GPT(cfg.model.gpt_config(vocab)).to(device)
    optimizer = configure_optimizer(model, cfg.train, device)
    forward = torch.compile(model) if resolve_compile(cfg.train.compile, device) else model
    autocast = torch.autocast("cuda", dtype=resolve_dtype(cfg.train.dtype, device))

    def step(batch: int) -> None:
        x, y = torch.randint(vocab, (2, batch, cfg.model.block_size), device=device)
        if dynamic_batch:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(y, 0)
        with autocast:
            loss = forward(x, y, reduction="sum", **loss_options(cfg)) / x.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def largest_batch(cfg: Config, vocab: int, start: int) -> int:
    """The largest batch whose training step runs on this process's GPU: two steps per probe
    (the second has the optimizer state), one compile for all probes (dynamic batch).
    Peak memory is close to affine in the batch: after two fits the next probe comes from that
    line (at 97% of the GPU's memory, and at least 6% above the largest fit); once a batch
    fails, bisection."""
    step, optimizer = training_step(cfg, vocab, dynamic_batch=True)
    capacity = torch.cuda.mem_get_info()[1]

    def fits(batch: int) -> int | None:
        """Peak bytes of two training steps at this batch, or None when they run out of memory."""
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            step(batch)
            step(batch)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return None

    peaks, fail, batch = {}, None, start
    while True:
        peak = fits(batch)
        print(f"  batch {batch}: {'out of memory' if peak is None else f'{peak / GiB:.1f} GiB'}",
              file=sys.stderr, flush=True)
        if peak is None:
            fail = batch if fail is None else min(fail, batch)
        else:
            peaks[batch] = peak
        ok = max(peaks, default=0)
        if fail is not None:
            if fail - ok <= 1:
                return ok
            batch = (ok + fail) // 2
        elif len(peaks) >= 2:
            (b1, p1), (b2, p2) = sorted(peaks.items())[-2:]
            line = b2 + int((0.97 * capacity - p2) * (b2 - b1) / max(p2 - p1, 1))
            batch = max(line, ok + max(1, ok // 16))
        else:
            batch = 3 * ok


def profile(cfg: Config, vocab: int, batch: int, steps: int = 10) -> dict:
    """Time `steps` bare training steps (CUDA events), then print torch.profiler's table of
    three more, by GPU time: where a step's time goes."""
    step, _ = training_step(cfg, vocab)
    for _ in range(3):
        step(batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step(batch)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(batch)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40,
                                      max_name_column_width=70)
    print(table, flush=True)
    return dict(step_ms=1e3 * seconds, step_tokens_per_sec=batch * cfg.model.block_size / seconds)


def worker(args) -> None:
    vocab, loss, compile_ = args.worker.split(":")
    vocab, compile_ = int(vocab), compile_ == "on"
    cache_dir = Path(args.workdir) / "data"
    cfg = bench_config(args, vocab, loss, compile_, cache_dir)
    result = dict(vocab=vocab, loss=loss, compile=compile_)
    if args.profile:
        result.update(profile(cfg, vocab, args.batch_size))
        print("RESULT " + json.dumps(result), flush=True)
        return
    result.update(measure_training(cfg, args.warmup))
    if args.max_batch:
        torch._dynamo.reset()
        gc.collect()
        result["max_batch"] = largest_batch(cfg, vocab, args.batch_size)
    result["flops_per_token"] = flops_per_token(cfg, vocab)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="50257,200019", help="comma-separated vocabulary sizes")
    p.add_argument("--runs", default="naive:off,naive:on,fused:off,fused:on",
                   help="loss:compile pairs, loss in naive|fused, compile in off|on")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--grad_accum", type=int, default=4, help="micro-batches per step (config: 4)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="logged steps up to this are left out")
    p.add_argument("--log_interval", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                   help="skip the largest-batch search")
    p.add_argument("--profile", action="store_true",
                   help="instead: time bare training steps and print torch.profiler's table")
    p.add_argument("--workdir", default="/tmp/minilm_bench_train")
    p.add_argument("--results", help="JSON-lines file: results are appended to it and the table "
                                     "covers all of it (to run the settings in several parts)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides, e.g. model.n_layer=2")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    results = Path(args.results) if args.results else None
    rows = [json.loads(s) for s in results.read_text().splitlines()] if (
        results and results.exists()) else []
    for vocab in map(int, args.vocab.split(",")):
        for run in args.runs.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{vocab}:{run}",
                   *sys.argv[1:]]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            print(out.stdout, file=sys.stderr, end="", flush=True)  # the training logs
            line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
            if out.returncode or not line:
                rows.append(dict(vocab=vocab, run=run, error=f"exit {out.returncode}"))
                continue
            rows.append(json.loads(line[-1][len("RESULT "):]))
            if results:  # each setting as it finishes: a run cut short keeps what it measured
                with results.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    if args.profile:
        for r in rows:
            print(json.dumps(r))
        return
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    peak = args.peak_tflops * 1e12
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\n{device}, torch {torch.__version__}; GPT-2 124M (configs/gpt2_124m.yaml), batch "
          f"{args.batch_size} x 1024 tokens x grad_accum {args.grad_accum}, bf16 autocast; "
          f"MFU against {args.peak_tflops:g} TFLOP/s dense bf16; tokens/s: median of the logged "
          f"steps after step {args.warmup} of {args.iters}\n")
    print("| V | loss | compile | tokens/s | MFU | peak memory | vs naive + compile | "
          "largest batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['vocab']} | {r['run']} | error: {r['error']} |")
            continue
        ref = next((q for q in rows if q.get("vocab") == r["vocab"] and q.get("loss") == "naive"
                    and q.get("compile") and "error" not in q), None)
        default = " (default)" if r["loss"] == "fused" and r["compile"] else ""
        mfu = r["tokens_per_sec"] * r["flops_per_token"] / peak
        ratio = f"{r['peak_gib'] / ref['peak_gib']:.2f}x" if ref else "-"
        print(f"| {r['vocab']} | {r['loss']}{default} | {'on' if r['compile'] else 'off'} | "
              f"{r['tokens_per_sec']:,.0f} | {100 * mfu:.1f}% | {r['peak_gib']:.2f} GiB | "
              f"{ratio} | {r.get('max_batch', '-')} |")
    for vocab in sorted({r["vocab"] for r in rows if "error" not in r}):
        ok = [r for r in rows if r["vocab"] == vocab and "error" not in r]
        best = max(ok, key=lambda r: r["tokens_per_sec"])
        default = next((r for r in ok if r["loss"] == "fused" and r["compile"]), None)
        if default:
            share = default["tokens_per_sec"] / best["tokens_per_sec"]
            fastest = f"{best['loss']}, compile {'on' if best['compile'] else 'off'}"
            print(f"\nV={vocab}: defaults at {share:.3f} of the fastest ({fastest})")


if __name__ == "__main__":
    main()
