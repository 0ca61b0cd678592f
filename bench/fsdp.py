"""DDP vs FSDP2 (train.parallel): per-rank peak memory and step time, through train.py's trainer.

Not a test: a benchmark that prints figures.

    python bench/fsdp.py                      # CPU, 2 ranks (gloo), a ~50M-parameter GPT
    python bench/fsdp.py --repeats 3 --malloc default
    python bench/fsdp.py --gpu                # every GPU of this machine: the largest GPT-2 size
                                              # that trains under each, and its tokens/s

CPU: for each setting (ddp; fsdp, i.e. ZeRO-3; fsdp with fsdp_reshard_after_forward=false,
i.e. ZeRO-2), one torchrun launch of --ranks processes trains a model where weights and AdamW
state dominate (vocab 8192, 9 x 640, block 256: 49.7M parameters, fp32; batch 2 x 256 tokens per
rank) for --iters steps through minilm.train.trainer.train() on random token ids, and each rank
reports its peak RSS (VmHWM, the whole process) and its RSS before training (torch and the
interpreter); the step time is the median of the logged steps after the first (which builds
AdamW's state). Settings are interleaved and repeated; the table gives medians over ranks and
repeats. Per rank, DDP holds the whole model, its gradients (twice: DDP's buckets) and AdamW's
two moments: 5 x 4 bytes per parameter; FSDP 1/N of the model, gradients and moments, plus the
blocks it gathers at a time.

glibc keeps freed memory in its heap unless an allocation is above its mmap threshold, which it
raises as it goes: then the gathered blocks FSDP frees stay in the RSS and the peak RSS tells
little (see --malloc default). The default here sets MALLOC_MMAP_THRESHOLD_=131072 for every
setting alike, so that large blocks return to the system when freed, as a CUDA caching
allocator's blocks are reused.

GPU (--gpu): for ddp and fsdp, GPT-2 124M, 355M, 774M, 1.5B and two larger shapes, in order,
each trained for --iters steps (bf16, batch --batch_size x 1024 per rank, random ids of GPT-2's
vocabulary) until one does not fit; prints per size: fits or not, peak memory per rank
(torch.cuda.max_memory_allocated) and tokens/s (all ranks, median after the first steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train_gpu: the random data
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MiB = 2 ** 20
CPU_MODEL = dict(n_layer=9, n_head=10, n_embd=640, block_size=256)
CPU_VOCAB = 8192
SETTINGS = {"ddp": ["--train.parallel=ddp"],
            "fsdp (ZeRO-3)": ["--train.parallel=fsdp"],
            "fsdp (ZeRO-2)": ["--train.parallel=fsdp", "--train.fsdp_reshard_after_forward=false"]}
GPT2_SIZES = {  # name: (n_layer, n_head, n_embd)
    "124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280),
    "1.5B": (48, 25, 1600), "2.7B": (32, 32, 2560), "6.7B": (32, 32, 4096)}


def rss_mib() -> tuple[float, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def random_data(args, vocab: int) -> str:
    """random token ids in the trainer's data cache (train_gpu's); its data.source name. The
    launcher writes them before any rank reads them."""
    from train_gpu import write_random_dataset

    return write_random_dataset(Path(args.workdir) / "data", vocab, tokens=2 ** 22)


def run_config(args, model: dict, vocab: int, extra: list[str], gpu: bool):
    """The trainer's config for one benchmark run (random ids, no evals but the two a run
    makes, no wandb, a fresh out_dir)."""
    from minilm.train.config import load_config

    work = Path(args.workdir)
    source = random_data(args, vocab)
    return load_config(None, [
        f"--out_dir={work / 'run'}", "--train.overwrite=true", f"--data.source={source}",
        "--data.tokenizer=gpt2", f"--data.cache_dir={work / 'data'}",
        *(f"--model.{k}={v}" for k, v in model.items()),
        f"--train.batch_size={args.batch_size}", f"--train.max_iters={args.iters}",
        f"--train.eval_interval={10 * args.iters}", "--train.eval_iters=1",
        "--train.log_interval=1", "--train.warmup_iters=1", "--wandb.mode=disabled",
        f"--train.device={'cuda' if gpu else 'cpu'}",
        f"--train.dtype={'bfloat16' if gpu else 'float32'}", "--train.compile=false", *extra])


def worker(args) -> None:
    """One rank of one setting: train, then print this rank's figures as a RESULT line."""
    import torch

    from minilm.train.tracking import read_metrics
    from minilm.train.trainer import train

    model = json.loads(args.model)
    cfg = run_config(args, model, args.vocab, args.extra, args.gpu)
    rank = int(os.environ.get("RANK", 0))
    before, _ = rss_mib()
    result = dict(setting=args.setting, rank=rank, model=model)
    try:
        train(cfg)
    except torch.OutOfMemoryError:
        print("RESULT " + json.dumps(dict(result, fits=False)), flush=True)
        os._exit(0)  # the other ranks may wait in a collective: torchrun ends them
    _, peak = rss_mib()
    result.update(fits=True, rss_before_mib=before, peak_rss_mib=peak)
    if args.gpu:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MiB
    if rank == 0:
        steps = [r for r in read_metrics(cfg.out_dir) if "ms_per_iter" in r][1:]
        result["ms_per_iter"] = statistics.median(r["ms_per_iter"] for r in steps)
        result["tokens_per_sec"] = statistics.median(r["tokens_per_sec"] for r in steps)
        summary = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
        result["params"] = summary["params_total"]
    print("RESULT " + json.dumps(result), flush=True)


def launch(args, setting: str, model: dict, vocab: int, extra: list[str], ranks: int,
           env: dict) -> list[dict]:
    """One torchrun launch of one setting; every rank's RESULT."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", os.path.abspath(__file__), "--worker",
           "--setting", setting, "--model", json.dumps(model), "--vocab", str(vocab),
           "--batch_size", str(args.batch_size), "--iters", str(args.iters),
           "--workdir", args.workdir, *(["--gpu"] if args.gpu else []),
           *(f"--extra={e}" for e in extra)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         timeout=args.timeout)
    rows = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines()
            if line.startswith("RESULT ")]
    if not rows:
        print(out.stderr[-3000:], file=sys.stderr)
        rows = [dict(setting=setting, model=model, fits=False, error=f"exit {out.returncode}")]
    return rows


def cpu_table(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled")
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    random_data(args, CPU_VOCAB)
    rows = []
    for repeat in range(args.repeats):
        for setting, extra in SETTINGS.items():
            print(f"repeat {repeat + 1}/{args.repeats}: {setting}", file=sys.stderr, flush=True)
            rows += launch(args, setting, CPU_MODEL, CPU_VOCAB, extra, args.ranks, env)
    ddp = None
    print(f"\n{args.ranks} ranks (gloo, CPU), {args.threads} thread(s) each, fp32, "
          f"malloc {args.malloc}; batch {args.batch_size} x {CPU_MODEL['block_size']} tokens per "
          f"rank; {args.repeats} launch(es) per setting, medians\n")
    print("| setting | parameters | peak RSS per rank | above the RSS before training | "
          "vs DDP | step time | vs DDP |")
    print("|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting and r.get("fits")]
        if not mine:
            print(f"| {setting} | failed |")
            continue
        peak = statistics.median(r["peak_rss_mib"] for r in mine)
        above = statistics.median(r["peak_rss_mib"] - r["rss_before_mib"] for r in mine)
        ms = statistics.median(r["ms_per_iter"] for r in mine if "ms_per_iter" in r)
        params = next(r["params"] for r in mine if r.get("params"))
        ddp = ddp or (peak, above, ms)
        print(f"| {setting} | {params / 1e6:.1f}M | {peak:,.0f} MiB | {above:,.0f} MiB | "
              f"{above / ddp[1]:.2f}x | {ms / 1000:.2f} s | {ms / ddp[2]:.2f}x |")


def gpu_table(args) -> None:
    import torch

    ranks = args.ranks or torch.cuda.device_count()
    env = dict(os.environ, WANDB_MODE="disabled")
    random_data(args, 50257)
    print(f"\n{torch.cuda.get_device_name()} x {ranks}, torch {torch.__version__}; bf16, batch "
          f"{args.batch_size} x 1024 tokens per rank, {args.iters} steps\n")
    print("| setting | GPT-2 size | parameters | fits | peak memory per rank | tokens/s |")
    print("|---|---|---|---|---|---|")
    for setting in ("ddp", "fsdp (ZeRO-3)"):
        for name, (n_layer, n_head, n_embd) in GPT2_SIZES.items():
            model = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024)
            rows = launch(args, setting, model, 50257, SETTINGS[setting], ranks, env)
            fits = all(r.get("fits") for r in rows)
            main = next((r for r in rows if r.get("rank") == 0 and r.get("fits")), {})
            peak = max((r.get("peak_gpu_mib", 0) for r in rows), default=0)
            print(f"| {setting} | {name} | {main.get('params', 0) / 1e6:,.0f}M | "
                  f"{'yes' if fits else 'no'} | {peak / 1024:.1f} GiB | "
                  f"{main.get('tokens_per_sec', 0):,.0f} |", flush=True)
            if not fits:
                break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the GPU table instead of the CPU one")
    p.add_argument("--ranks", type=int, default=None,
                   help="processes (CPU: default 2; GPU: default every GPU)")
    p.add_argument("--repeats", type=int, default=2, help="CPU: launches per setting")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads per rank")
    p.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                   help="fixed: MALLOC_MMAP_THRESHOLD_=131072 (freed blocks leave the RSS)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="sequences per rank (CPU: 2 x 256 tokens; GPU: 8 x 1024)")
    p.add_argument("--iters", type=int, default=None, help="steps (CPU: 3; GPU: 8)")
    p.add_argument("--workdir", default="/tmp/minilm_bench_fsdp")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch_size = args.batch_size or (8 if args.gpu else 2)
    args.iters = args.iters or (8 if args.gpu else 3)
    if args.worker:
        return worker(args)
    if args.gpu:
        return gpu_table(args)
    args.ranks = args.ranks or 2
    cpu_table(args)


if __name__ == "__main__":
    main()
