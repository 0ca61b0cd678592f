"""Bandwidth of the fused loss's Triton step kernel alone, per launch config (not a test).

    python bench/ce_kernel.py [--rows 2048] [--v 50257,200019]

Runs minilm.kernels.cross_entropy.ce_step_ (loss and gradient in place) on one [rows, V] bf16
chunk of random logits in a buffer whose rows are padded to a multiple of 64, as the chunk loop
lays it out, for BLOCK x num_warps, and prints the median time (triton.testing.do_bench, L2
flushed between runs) and the bandwidth counting the least the step must move: one read and one
write of the chunk. A device-to-device copy of the same bytes is the ceiling.
"""

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minilm.model.kernels.cross_entropy import ce_step_  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--v", default="50257,200019")
    p.add_argument("--blocks", default="2048,4096,8192,16384")
    p.add_argument("--warps", default="4,8,16,32")
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, {args.rows} rows\n")
    print("| V | BLOCK | warps | time | GB/s (1 read + 1 write) |")
    print("|---|---|---|---|---|")
    for V in map(int, args.v.split(",")):
        Vp = -(-V // 64) * 64
        buf = torch.randn(args.rows, Vp, device="cuda", generator=g).to(torch.bfloat16)
        z = buf[:, :V]
        targets = torch.randint(0, V, (args.rows,), device="cuda", generator=g)
        scale = torch.full((args.rows,), 1 / args.rows, device="cuda")
        loss = torch.empty(args.rows, device="cuda")
        nbytes = 2 * z.numel() * z.element_size()
        copy_dst = torch.empty_like(buf)
        t = triton.testing.do_bench(lambda: copy_dst.copy_(buf), return_mode="median")
        print(f"| {V} | copy | - | {t * 1e3:.0f} us | {nbytes / t / 1e6:.0f} |")
        for block in map(int, args.blocks.split(",")):
            for warps in map(int, args.warps.split(",")):
                def run():
                    ce_step_(z, targets, scale, loss, -100, 0.0, None, True, block, warps)
                try:
                    t = triton.testing.do_bench(run, return_mode="median")
                except Exception as e:  # a config the compiler refuses (registers, shared memory)
                    print(f"| {V} | {block} | {warps} | {type(e).__name__} | |")
                    continue
                print(f"| {V} | {block} | {warps} | {t * 1e3:.0f} us | {nbytes / t / 1e6:.0f} |")


if __name__ == "__main__":
    main()
