"""Training throughput and peak memory of GPT-2 124M on one GPU, per loss impl (not a test).

python bench/train_gpu.py [--iters 40] [--batch_size 16]: trains configs/gpt2_124m.yaml's model on
the embedded Shakespeare (GPT-2 BPE, block 1024) for a few steps with each loss impl, and prints
tokens/s (median of the logged steps after warm-up) and peak GPU memory.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from minilm.config import load_config
from minilm.trainer import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--runs", default="naive:0,triton:0,chunked:0,naive:1,triton:1")
    args = p.parse_args()
    rows = []
    for run in args.runs.split(","):
        impl, compile_ = run.split(":")
        out = Path(f"/tmp/minilm_bench_{impl}_{compile_}")
        cfg = load_config("configs/gpt2_124m.yaml", [
            "--data.source=shakespeare", "--data.name=null", "--data.val_fraction=0.1",
            "--data.num_proc=1", f"--train.batch_size={args.batch_size}",
            "--train.grad_accum_steps=1", f"--train.max_iters={args.iters}",
            f"--train.eval_interval={args.iters}", "--train.eval_iters=2",
            "--train.log_interval=5", "--train.warmup_iters=10", f"--loss.impl={impl}",
            f"--train.compile={compile_ == '1'}", "--wandb.mode=disabled", f"--out_dir={out}"])
        torch.cuda.reset_peak_memory_stats()
        train(cfg)
        logs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        tps = [r["tokens_per_sec"] for r in logs if "tokens_per_sec" in r and r["step"] > 10]
        final = [r["loss"] for r in logs if "loss" in r][-1]
        rows.append((impl, compile_ == "1", statistics.median(tps),
                     torch.cuda.max_memory_allocated() / 2**30, final))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch "
          f"{args.batch_size} x 1024 tokens, bf16 autocast\n")
    print("| loss impl | compile | tokens/s | peak GPU memory | loss at step", args.iters, "|")
    print("|---|---|---|---|---|")
    for impl, c, tps, mem, loss in rows:
        print(f"| {impl} | {c} | {tps:,.0f} | {mem:.2f} GiB | {loss:.3f} |")


if __name__ == "__main__":
    main()
