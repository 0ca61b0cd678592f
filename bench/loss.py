"""Benchmark of the training loss: forward + backward of linear_cross_entropy, per impl.

    python bench/loss.py                       # CPU, N=8192 d=768 V=50257 (GPT-2 124M, 8 x 1024)
    python bench/loss.py --device cuda --dtype amp --check

Prints a markdown table: median time of forward + backward, and peak extra memory, i.e. the
high-water mark above what was allocated before the step (inputs and weights), which includes the
gradients the step leaves in .grad (d_hidden, d_weight: the same for every impl). Memory is given
for two cases, each measured over --reps steps: "fresh" (weight.grad is None, as in the first
micro-step of an optimizer step) and ".grad allocated" (weight.grad already holds a gradient, which
counts as input, and the step adds into it: every later micro-step under gradient accumulation);
the time is the median over the steps of both. On CPU each impl runs --rounds times, interleaved
with the others, so that the load of a shared machine falls on all alike; the table also gives the
process CPU time (both threads), which such load inflates less than wall time.

How memory is measured, and why it can be trusted:
- CPU: each impl runs in a fresh subprocess, so no impl inherits another's freed memory. The
  subprocess sets MALLOC_MMAP_THRESHOLD_=65536 before Python starts: glibc then serves every
  block over 64 KiB with its own mmap and unmaps it on free, so the process's resident set (RSS)
  follows the live tensors instead of keeping freed heap. After one warm-up step the peak RSS
  (VmHWM) is reset by writing 5 to /proc/self/clear_refs; peak extra = VmHWM after the timed
  steps − VmRSS before them. Touched pages only: a buffer that is allocated but never written
  costs nothing, as on the real machine.
- CUDA: torch.cuda.max_memory_allocated() − memory_allocated() before the steps (allocator
  counters, exact up to its 512-byte rounding); times from CUDA events.

--check (CUDA or CPU) compares loss and gradients of each impl against a float64 reference at a
smaller size and prints relative errors ||out − ref|| / ||ref||, next to the naive path's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minilm.model.loss import linear_cross_entropy  # noqa: E402

MiB = 2 ** 20


def make_inputs(args, device, n=None, seed=0):
    """hidden ~ N(0, 1) like ln_f's output; weight ~ N(0, 0.02) like GPT-2's init."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = n or args.n
    w_dtype = torch.float32 if args.dtype in ("fp32", "amp") else torch.bfloat16
    h_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    hidden = torch.randn(n, args.d, generator=g).to(device, h_dtype).requires_grad_()
    weight = (torch.randn(args.v, args.d, generator=g) * 0.02).to(device, w_dtype).requires_grad_()
    targets = torch.randint(0, args.v, (n,), generator=g).to(device)
    return hidden, weight, targets


def loss_fn(impl, args, hidden, weight, targets):
    """One forward of `impl` ("triton:2048": with that chunk size): a closure returning the
    scalar loss."""
    impl, _, rows = impl.partition(":")
    chunk_size = int(rows) if rows else args.chunk_size
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda: liger(weight, hidden, targets)
    return lambda: linear_cross_entropy(hidden, weight, targets, impl=impl,
                                        chunk_size=chunk_size)


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "amp")


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_one(impl, args):
    """Time and measure forward + backward of one impl in this process; returns a dict."""
    device = torch.device(args.device)
    hidden, weight, targets = make_inputs(args, device)
    fn = loss_fn(impl, args, hidden, weight, targets)
    if args.compile:
        fn = torch.compile(fn, fullgraph=True)

    def step():
        with autocast(args, device):
            loss = fn()
        loss.backward()

    def clear(keep_weight_grad):
        hidden.grad = None
        if not keep_weight_grad:
            weight.grad = None
        gc.collect()

    step()  # warm-up: compilation, allocator, first-touch of the weights
    clear(keep_weight_grad=False)
    times, cpu_times, peaks = [], [], {}
    for case, keep in (("fresh", False), ("grad_allocated", True)):
        if keep:  # the accumulated gradient is there, and touched, before the measurement
            weight.grad = torch.zeros_like(weight)
        peaks[case] = measure(step, lambda: clear(keep), args.reps, device, times, cpu_times)
    if args.profile and device.type == "cuda":  # where the time goes: GPU time per kernel
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"{impl}:\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                                        max_name_column_width=80),
              file=sys.stderr, flush=True)
    return dict(impl=impl, times=times, cpu_times=cpu_times, peak_mib=peaks["fresh"],
                peak_grad_allocated_mib=peaks["grad_allocated"])


def measure(step, clear, reps, device, times, cpu_times):
    """Run `step` reps times (clear() after each), appending to times and cpu_times; returns the
    peak memory above what was allocated before the first step, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            clear()
        return (torch.cuda.max_memory_allocated() - base) / MiB
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_kib("VmRSS")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        clear()
    return (rss_kib("VmHWM") - base) / 1024


def run_in_subprocess(impl, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--device", args.device,
           "--dtype", args.dtype, "--n", str(args.n), "--d", str(args.d), "--v", str(args.v),
           "--reps", str(args.reps)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.compile:
        cmd += ["--compile"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return dict(impl=impl, error=(out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def available(impl, args):
    impl = impl.partition(":")[0]
    if impl == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return False
        return args.device == "cuda"
    if impl == "triton":
        return args.device == "cuda"
    if impl == "torch":
        return hasattr(torch.nn.functional, "linear_cross_entropy")
    return True


def bench(args):
    """Each impl `rounds` times, interleaved (a shared machine's load then hits all alike)."""
    impls = [i for i in args.impls.split(",") if available(i, args)]
    runs = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:
            r = run_in_subprocess(impl, args) if args.device == "cpu" else run_one(impl, args)
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs[impl].append(r)
            if args.device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    rows = []
    for impl, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append(dict(impl=impl, error=rs[0]["error"]))
            continue
        rows.append(dict(impl=impl, time_s=statistics.median(t for r in ok for t in r["times"]),
                         cpu_s=statistics.median(t for r in ok for t in r["cpu_times"] or [0]),
                         peak_mib=max(r["peak_mib"] for r in ok),
                         peak_grad_allocated_mib=max(r["peak_grad_allocated_mib"] for r in ok)))
    naive = next((r for r in rows if r["impl"] == "naive" and "error" not in r), None)

    def ratio(row: dict, key: str) -> str:
        return f"{row[key] / naive[key]:.3g}x" if naive else ""

    cpu = args.device == "cpu"
    dev = f"CPU, {torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name()
    print(f"\nN={args.n} d={args.d} V={args.v} dtype={args.dtype}, {dev}, "
          f"torch {torch.__version__}; time: median of {args.rounds} x {2 * args.reps} steps (both "
          f"cases); memory: max; chunk_size={args.chunk_size or 'auto'}"
          f"{', compiled' if args.compile else ''}\n")
    print("| impl | fwd+bwd time | vs naive |" + (" CPU time | vs naive |" if cpu else "")
          + " peak extra memory, fresh | vs naive | peak extra memory, .grad allocated | vs naive |")
    print("|---|---|---|" + ("---|---|" if cpu else "") + "---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | error: {r['error']} |")
            continue
        t = f"{r['time_s']:.2f} s" if cpu else f"{r['time_s'] * 1e3:.2f} ms"
        line = f"| {r['impl']} | {t} | {ratio(r, 'time_s')} |"
        if cpu:
            line += f" {r['cpu_s']:.2f} s | {ratio(r, 'cpu_s')} |"
        print(line + f" {r['peak_mib']:.0f} MiB | {ratio(r, 'peak_mib')} |"
              f" {r['peak_grad_allocated_mib']:.0f} MiB | {ratio(r, 'peak_grad_allocated_mib')} |")


def check(args):
    """Relative errors vs a float64 reference, with ignored tokens, z_loss, softcap and a bias."""
    device = torch.device(args.device)
    n = min(args.n, 2048)
    print(f"\nrelative error vs float64, N={n} d={args.d} V={args.v} dtype={args.dtype}\n")
    print("| impl | options | loss | d_hidden | d_weight | d_bias |")
    print("|---|---|---|---|---|---|")
    for opts in (dict(), dict(z_loss=1e-4, softcap=30.0)):
        hidden, weight, targets = make_inputs(args, device, n=n, seed=1)
        targets[::5] = -100
        bias = (torch.randn(args.v, device=device) * 0.1).to(weight.dtype).requires_grad_()
        inputs = (hidden, weight, bias)
        ref = [x.detach().double().requires_grad_() for x in inputs]
        loss = linear_cross_entropy(ref[0], ref[1], targets, bias=ref[2], impl="naive", **opts)
        loss.backward()
        want = [loss.detach()] + [x.grad for x in ref]
        for impl in [i for i in args.impls.split(",")
                     if available(i, args) and ":" not in i and i != "liger"]:
            if impl == "torch" and opts:
                continue
            for x in inputs:
                x.grad = None
            with autocast(args, device):
                loss = linear_cross_entropy(hidden, weight, targets, bias=bias, impl=impl,
                                            chunk_size=args.chunk_size, **opts)
            loss.backward()
            got = [loss.detach()] + [x.grad for x in inputs]
            errs = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
            print(f"| {impl} | {opts or '-'} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "amp"],
                   help="fp32; bf16 (hidden and weight); amp (fp32 weight, bf16 hidden, autocast). "
                        "Default: fp32 on CPU, amp on CUDA")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--v", type=int, default=50257)
    p.add_argument("--reps", type=int, default=None,
                   help="timed steps per run, after one warm-up (default 1 CPU, 20 CUDA)")
    p.add_argument("--rounds", type=int, default=None,
                   help="runs of each impl, interleaved (default 3 CPU, 1 CUDA)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--impls", default=None,
                   help="comma-separated, impl:rows sets a chunk size "
                        "(default naive,chunked,torch; on CUDA also triton,liger)")
    p.add_argument("--check", action="store_true", help="also print errors vs float64")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: also print each impl's GPU time per kernel (stderr)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile(fullgraph=True) the loss call (naive: Inductor fuses it; "
                        "the fused impls run their op as in eager)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "amp")
    args.reps = args.reps or (1 if args.device == "cpu" else 20)
    args.rounds = args.rounds or (3 if args.device == "cpu" else 1)
    args.impls = args.impls or ("naive,chunked,torch" if args.device == "cpu"
                                else "naive,chunked,torch,triton,liger")
    if args.worker:
        print(json.dumps(run_one(args.worker, args)))
        return
    if args.check:
        check(args)
    bench(args)


if __name__ == "__main__":
    main()
