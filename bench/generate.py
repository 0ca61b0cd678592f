"""Generation speed on CPU: minilm beside HF transformers' GPT2LMHeadModel.generate and beside the
memory-bandwidth floor, for a GPT-2 124M config (12 x 12 x 768, vocab 50257, block 1024, random
weights, the same in both models).

    python bench/generate.py [--threads N] [--reps 3] [--tables 1,2,3,4,5,6]
                             [--recompute_steps 16 | --full_recompute] [--window_steps 5]
                             [--window_only] [--new_stack_only] [--breakdown_steps 10]

Reports (markdown):
1. tokens/s for a 64-token prompt + 128 new tokens, batch 1 and 8, greedy and with a full stack
   (repetition 1.1, T 0.8, top-k 50, top-p 0.95); prefill included, best of --reps runs, minilm and
   HF interleaved so that both see the same machine load. Floor: batch / (weight bytes / copy
   bandwidth), i.e. every weight read once per decode step, nothing else.
2. the stack's cost as a fraction of a decode step (one token through the KV cache at length 128).
3. KV cache vs recompute (a full forward over the whole sequence per token) for 256 new tokens
   after a 512-token prompt, greedy, batch 1. Recompute is timed on --recompute_steps sequence
   lengths spread over the 256 steps (best of a warm-up and one run each) and summed by the
   trapezoid rule (--full_recompute: all 256).
4. past block_size, for this shape (block 1024) and the quick start's char model (block 128): the
   decode step of a RunningBatch whose rows are inside their window (16-token prompts), past it
   (prompts of block_size tokens: each step re-fills the row's window, see generation's
   docstring), or both in one batch; the batches step in turn, best of --window_steps steps each.
   Beside it, what a context shift (crop to block_size // 2, grow back; not exact) would cost per
   token: its re-fill of block_size // 2 - 1 tokens spread over block_size // 2 tokens, plus a
   decode step.
5. a sampling step (sample() + History.append) with today's stack and with the full stack of
   issue 20 (NEW_STACK: every stage on, guidance included, DRY over a 512-token history holding a
   repeated passage), as a share of a decode step; --reps interleaved rounds, medians
   (--new_stack_only: only this table).
6. where a decode step's time goes (RunningBatch.step, batch 1 and 8, greedy, 64-token prompts):
   the forward's matmuls, attention, KV-cache writes and other ops (torch.profiler), its Python
   and dispatch (the rest of its time), and the step outside the forward (sampling, the engine);
   medians of --breakdown_steps steps.

On a 2-core machine shared with other jobs use --threads 1: with two OpenMP threads on busy cores,
each parallel op may wait a whole scheduler slice (~8 ms) for its second thread.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minilm.model.gpt import GPT, GPTConfig, KVCache  # noqa: E402
from minilm.sampling.batch import RunningBatch  # noqa: E402
from minilm.sampling.generation import complete  # noqa: E402
from minilm.sampling.history import History  # noqa: E402
from minilm.sampling.request import Request, greedy  # noqa: E402
from minilm.sampling.settings import SamplerSettings  # noqa: E402
from minilm.sampling.stack import SamplerStack  # noqa: E402
from minilm.tokenizer import TiktokenTokenizer  # noqa: E402

V, N_LAYER, N_HEAD, N_EMBD, BLOCK = 50257, 12, 12, 768, 1024
STACK = dict(repetition_penalty=1.1, temperature=0.8, top_k=50, top_p=0.95)
NEW_STACK = dict(guidance_scale=1.5, repetition_penalty=1.1, dry_multiplier=0.8, temperature=0.8,
                 top_n_sigma=2.0, top_h=0.95, top_k=50, top_p=0.95, min_p=0.02, typical_p=0.98,
                 epsilon_cutoff=3e-4, eta_cutoff=3e-4, xtc_probability=0.5, xtc_threshold=0.1,
                 mirostat=2)


def best_time(fn, reps: int) -> float:
    """Best wall time of `reps` calls after a warm-up: the one least disturbed by other work."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 512 MiB tensor copy (each byte read once and written once)."""
    src = torch.ones(128 * 2**20)  # fp32: 512 MiB
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * src.element_size() / t


def models() -> tuple[GPT, torch.nn.Module]:
    """minilm and HF GPT-2 with the same random weights (HF's Conv1D stores W transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, vocab_size=V,
                                    n_positions=BLOCK)).eval()
    hf.generation_config.eos_token_id = None  # always the full 128 tokens
    hf.generation_config.pad_token_id = 0
    ours = GPT(GPTConfig(vocab_size=V, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
                         block_size=BLOCK)).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in hf.transformer.state_dict().items()
             if not k.endswith(".attn.bias")}
    ours.transformer.load_state_dict(state)
    return ours, hf


def throughput(ours: GPT, hf, reps: int, new: int = 128, prompt_len: int = 64) -> list[dict]:
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(0, V, (batch, prompt_len),
                                generator=torch.Generator().manual_seed(1))
        for mode in ("greedy", "stack"):
            sampler = SamplerStack.from_settings(**STACK) if mode == "stack" else None
            hf_kwargs = dict(do_sample=True, **STACK) if mode == "stack" else dict(do_sample=False)

            def run_ours():
                out = complete(ours, prompts, new, sampler=sampler, seed=list(range(batch)))
                assert all(len(r.tokens) == new for r in out)
                return out

            def run_hf():
                with torch.inference_mode():
                    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                                      max_new_tokens=new, min_new_tokens=new, **hf_kwargs)
                assert out.shape == (batch, prompt_len + new)
                return out

            a, b = run_ours(), run_hf()  # warm-up
            agree = None
            if mode == "greedy":  # same weights: the greedy tokens should agree (up to fp ties)
                pairs = zip(a[0].tokens, b[0, prompt_len:].tolist())
                agree = next((i for i, (x, y) in enumerate(pairs) if x != y), new)
            t_ours, t_hf = [], []
            for _ in range(reps):  # interleaved: both see the same load
                for fn, times in ((run_ours, t_ours), (run_hf, t_hf)):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
            rows.append(dict(batch=batch, mode=mode, ours=batch * new / min(t_ours),
                             hf=batch * new / min(t_hf), agree=agree))
    return rows


def cached_decode(ours: GPT, batch: int, steps: int, seed: int = 2):
    """(ids [batch, 128], decode): decode() runs `steps` decode steps of one token each from the
    KV cache at length 127 (the same steps every call; call it under inference_mode)."""
    ids = torch.randint(0, V, (batch, 128), generator=torch.Generator().manual_seed(seed))
    cache = KVCache(ours.config, batch, max_len=128 + steps)
    with torch.inference_mode():
        ours.logits(ids[:, :-1], cache)
    start = cache.length

    def decode():
        cache.length = start
        for _ in range(steps):
            z = ours.logits(ids[:, -1:], cache)[:, -1]
        return z

    return ids, decode


def stack_overhead(ours: GPT, reps: int, steps: int = 16) -> list[dict]:
    """A decode step (1 token, cache at 128) vs the stack's sample() on its logits."""
    ours.set_decode_layout(True)  # the layout generation decodes with
    rows = []
    for batch in (1, 8):
        ids, decode = cached_decode(ours, batch, steps)
        with torch.inference_mode():
            logits = decode()
            t_step = best_time(decode, reps) / steps
            for mode, sampler in (("greedy", None), ("stack", SamplerStack.from_settings(**STACK))):
                sampler = sampler or greedy()
                history = History(ids, prompt_lens=torch.full((batch,), 64))
                gens = [torch.Generator().manual_seed(i) for i in range(batch)]
                t_stack = best_time(lambda: [sampler.sample(logits, history, generator=gens)
                                             for _ in range(steps)], reps) / steps
                rows.append(dict(batch=batch, mode=mode, step=t_step, stack=t_stack))
    return rows


def new_stack_overhead(ours: GPT, reps: int, steps: int = 16, prompt_len: int = 512) -> list[dict]:
    """A decode step (1 token, cache at 128) vs a step of sampling (sample() then History.append)
    with today's stack (STACK) and with the full stack of issue 20 (NEW_STACK: every stage on,
    classifier-free guidance on a second logits tensor), on a History of `prompt_len` tokens with a
    128-token passage repeated (DRY finds long matches). Interleaved: each rep times the decode
    steps, then each stack's steps; medians over the reps."""
    ours.set_decode_layout(True)
    stacks = {"today's stack": SamplerStack.from_settings(**STACK),
              "full new stack": SamplerStack.from_settings(
                  SamplerSettings(**NEW_STACK), tokenizer=TiktokenTokenizer("gpt2"))}
    rows = []
    for batch in (1, 8):
        g = torch.Generator().manual_seed(6)
        passage = torch.randint(0, V, (batch, 128), generator=g)
        context = torch.cat([torch.randint(0, V, (batch, prompt_len - 256), generator=g), passage,
                             passage], dim=1)
        _, decode = cached_decode(ours, batch, steps)
        with torch.inference_mode():
            logits = decode()
            uncond = logits.roll(1, dims=-1)

            def sampling(stack: SamplerStack) -> float:
                generators = [torch.Generator().manual_seed(i) for i in range(batch)]
                history = History(context, prompt_lens=torch.full((batch,), prompt_len),
                                  generators=generators)
                stack.sample(logits, history, unconditional_logits=uncond)  # fills the caches
                t = time.perf_counter()
                for _ in range(steps):
                    tokens, _ = stack.sample(logits, history, unconditional_logits=uncond)
                    history.append(tokens)
                return (time.perf_counter() - t) / steps

            times: dict[str, list[float]] = {"decode step": [], **{name: [] for name in stacks}}
            for _ in range(reps):
                t = time.perf_counter()
                decode()
                times["decode step"].append((time.perf_counter() - t) / steps)
                for name, stack in stacks.items():
                    times[name].append(sampling(stack))
        step = times.pop("decode step")
        for name, t in times.items():
            rows.append(dict(batch=batch, stack=name, step=statistics.median(step),
                             time=statistics.median(t),
                             share=statistics.median([b / a for a, b in zip(step, t)])))
    return rows


# the forward's top-level ops by category (torch.profiler names); the rest are "other ops"
OP_CATEGORIES = {
    "matmuls": ("aten::linear", "aten::addmm", "aten::mm", "mkldnn::_linear_pointwise"),
    "attention": ("aten::scaled_dot_product_attention",),
    "KV-cache writes": ("aten::copy_", "aten::index_put_"),
}


def step_breakdown(model: GPT, batch: int, steps: int, prompt_len: int = 64) -> dict[str, float]:
    """Where a decode step of RunningBatch (what complete() runs, greedy) spends its time, in
    seconds per step: the model's forward split into its top-level ops by category and the rest of
    it (Python and dispatch), then the step outside the forward (sampling, History, the engine's
    bookkeeping). The forward and the step are timed unprofiled (medians of `steps` steps); the
    forward's split is the median share of each part in `steps` profiled forwards, so the
    profiler's own cost per op lands in the Python line (an upper bound)."""
    prompts = torch.randint(0, V, (batch, prompt_len), generator=torch.Generator().manual_seed(6))
    running = RunningBatch(model, max_rows=batch)
    running.admit(Request(model, prompts, 2 * steps + 2))
    running.step()  # warm-up (and the first multi-row step packs the weights)
    forward_times: list[float] = []
    logits = model.logits

    def timed_logits(*args, **kwargs):  # the forward inside RunningBatch.step
        with torch.profiler.record_function("forward"):
            t = time.perf_counter()
            z = logits(*args, **kwargs)
            forward_times.append(time.perf_counter() - t)
        return z

    model.logits = timed_logits
    try:
        step_times = []
        for _ in range(steps):
            t = time.perf_counter()
            running.step()
            step_times.append(time.perf_counter() - t)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                running.step()
    finally:
        del model.logits
    shares = []  # per profiled forward: the share of its time each part took
    for forward in (e for e in prof.events() if e.name == "forward"):
        ops = dict.fromkeys([*OP_CATEGORIES, "other ops"], 0.0)
        for op in forward.cpu_children:
            name = next((c for c, names in OP_CATEGORIES.items() if op.name in names), "other ops")
            ops[name] += op.cpu_time_total / forward.cpu_time_total
        ops["Python and dispatch"] = 1.0 - sum(ops.values())
        shares.append(ops)
    forward, step = statistics.median(forward_times[:steps]), statistics.median(step_times)
    row = {name: statistics.median(s[name] for s in shares) * forward for name in shares[0]}
    row["sampling and engine"] = step - forward
    row["step"] = step
    return row


def print_step_breakdown(model: GPT, steps: int) -> None:
    """Table 6: where a decode step's time goes, batch 1 and 8."""
    rows = {batch: step_breakdown(model, batch, steps) for batch in (1, 8)}
    print("\n| decode step (64-token prompts, greedy) | batch 1 ms | share | batch 8 ms | share |")
    print("|---|---|---|---|---|")
    for name in rows[1]:
        cells = " | ".join(f"{r[name] * 1e3:.1f} | {r[name] / r['step']:.0%}"
                           for r in rows.values())
        print(f"| {name} | {cells} |")


def kv_vs_recompute(ours: GPT, samples: int | None, reps: int, prompt_len: int = 512,
                    new: int = 256) -> tuple[float, float, int]:
    """Seconds for `new` greedy tokens through the KV cache, and by recomputing every step."""
    prompt = torch.randint(0, V, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    t_kv = best_time(lambda: complete(ours, prompt, new), reps)
    (out,) = complete(ours, prompt, new)
    seq = torch.cat([prompt[0], torch.tensor(out.tokens)])[None]  # [1, 768]
    lengths = list(range(prompt_len, prompt_len + new))  # the recompute forward of each step
    if samples and samples < new:
        lengths = [lengths[round(i * (new - 1) / (samples - 1))] for i in range(samples)]
    with torch.inference_mode():
        times = [best_time(lambda: ours.logits(seq[:, :n]).argmax(-1), 1) for n in lengths]
    if len(times) == new:
        return t_kv, sum(times), new
    # trapezoid over the sampled lengths, scaled to all `new` steps
    pairs = zip(times, times[1:], lengths, lengths[1:])
    t_re = sum((a + b) / 2 * (m - n) for a, b, n, m in pairs) / (lengths[-1] - lengths[0]) * new
    return t_kv, t_re, len(times)


def window_steps(model: GPT, steps: int) -> list[dict]:
    """Seconds per decode step of a RunningBatch: rows inside their window, rows past block_size
    (every step re-fills their window), and a batch of both. The batches step in turn, so that
    all of them see the same machine load."""
    cases = [("1 inside", 1, 0), ("1 past block_size", 0, 1), ("8 inside", 8, 0),
             ("7 inside + 1 past block_size", 7, 1)]
    vocab_size, block_size = model.config.vocab_size, model.config.block_size
    g = torch.Generator().manual_seed(4)
    batches = []
    for _, inside, past in cases:
        prompts = [torch.randint(0, vocab_size, (16,), generator=g).tolist()
                   for _ in range(inside)] + \
            [torch.randint(0, vocab_size, (block_size,), generator=g).tolist() for _ in range(past)]
        batch = RunningBatch(model, max_rows=len(prompts))
        batch.admit(Request(model, prompts, steps + 1))
        batches.append(batch)
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(steps):
        for batch, case_times in zip(batches, times):
            t = time.perf_counter()
            batch.step()
            case_times.append(time.perf_counter() - t)
    return [dict(case=case, rows=inside + past, step=min(t))
            for (case, inside, past), t in zip(cases, times)]


def context_shift_refill(model: GPT, reps: int) -> float:
    """Seconds to re-fill one row's cache with block_size // 2 - 1 tokens (a context shift's
    re-fill, once per block_size // 2 tokens)."""
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, config.block_size // 2 - 1),
                        generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        return best_time(lambda: model.hidden_states(ids, KVCache(config, 1)), reps)


def char_model() -> GPT:
    """The quick start's shape (configs/shakespeare_char.yaml: 4 x 4 x 128, block 128, 65 chars)."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=128,
                         bias=False)).eval()


def print_past_block_size(models: dict[str, GPT], args: argparse.Namespace) -> None:
    """Table 4: decode steps with rows past block_size, and a context shift's cost beside them."""
    print("\n| model | rows | decode step ms | tok/s | step / all inside |")
    print("|---|---|---|---|---|")
    shifts = {}
    for name, model in models.items():
        steps = window_steps(model, args.window_steps)
        inside = {r["rows"]: r["step"] for r in steps if "past" not in r["case"]}
        for r in steps:
            print(f"| {name} | {r['case']} | {r['step'] * 1e3:.1f} | {r['rows'] / r['step']:.3g} |"
                  f" {r['step'] / inside[r['rows']]:.1f}x |")
        half = model.config.block_size // 2
        shifts[name] = context_shift_refill(model, args.reps) / half + inside[1]
    print("\nA context shift (crop to block_size // 2, grow back; not exact) would cost per token "
          "past block_size at batch 1, its re-fill spread over block_size // 2 tokens plus a decode"
          " step: " + ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in shifts.items()) + ".")


def print_throughput(ours: GPT, hf, args: argparse.Namespace) -> None:
    """Table 1: tokens/s beside HF and the memory-bandwidth floor."""
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    floor_step = weight_bytes / bw
    print(f"torch {torch.__version__}, {args.threads} threads; weights {weight_bytes / 1e6:.0f} MB;"
          f" copy bandwidth {bw / 1e9:.1f} GB/s -> floor {floor_step * 1e3:.1f} ms/decode step\n")
    print("| batch | sampler | minilm tok/s | HF tok/s | minilm / HF | floor tok/s | minilm / floor"
          " | greedy agrees with HF |")
    print("|---|---|---|---|---|---|---|---|")
    for r in throughput(ours, hf, args.reps):
        floor = r["batch"] / floor_step
        agree = "" if r["agree"] is None else f"{r['agree']}/128 tokens"
        print(f"| {r['batch']} | {r['mode']} | {r['ours']:.1f} | {r['hf']:.1f} | "
              f"{r['ours'] / r['hf']:.2f}x | {floor:.1f} | {r['ours'] / floor:.0%} | {agree} |")


def print_stack_overhead(ours: GPT, args: argparse.Namespace) -> None:
    """Table 2: the stack's sample() beside a decode step."""
    print("\n| batch | sampler | decode step ms | sample() ms | share of a step |")
    print("|---|---|---|---|---|")
    for r in stack_overhead(ours, args.reps):
        print(f"| {r['batch']} | {r['mode']} | {r['step'] * 1e3:.1f} | {r['stack'] * 1e3:.2f} | "
              f"{r['stack'] / r['step']:.1%} |")


def print_kv_vs_recompute(ours: GPT, args: argparse.Namespace) -> None:
    """Table 3: the KV cache against a full forward per token."""
    samples = None if args.full_recompute else args.recompute_steps
    t_kv, t_re, n = kv_vs_recompute(ours, samples, args.reps)
    how = "all 256 steps timed" if n == 256 else f"{n} of 256 steps timed, trapezoid-summed"
    print("\n| 512-token prompt + 256 new, batch 1, greedy | seconds | tok/s |")
    print("|---|---|---|")
    print(f"| KV cache (minilm generate) | {t_kv:.1f} | {256 / t_kv:.1f} |")
    print(f"| recompute, full forward per token ({how}) | {t_re:.1f} | {256 / t_re:.2f} |")
    print(f"| KV cache speed-up | {t_re / t_kv:.1f}x | |")

def print_new_stack(ours: GPT, args: argparse.Namespace) -> None:
    """Table 5: sampling with today's stack and with the full stack of issue 20, beside a decode
    step (medians of --reps interleaved rounds)."""
    print("\n| batch | sampler | decode step ms | sample + append ms | share of a step |")
    print("|---|---|---|---|---|")
    for r in new_stack_overhead(ours, args.reps):
        print(f"| {r['batch']} | {r['stack']} | {r['step'] * 1e3:.1f} | {r['time'] * 1e3:.2f} | "
              f"{r['share']:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tables", default="1,2,3,4,5,6", help="which tables, e.g. 1,6")
    p.add_argument("--recompute_steps", type=int, default=16)
    p.add_argument("--full_recompute", action="store_true")
    p.add_argument("--window_steps", type=int, default=5)
    p.add_argument("--window_only", action="store_true", help="only table 4 (--tables 4)")
    p.add_argument("--new_stack_only", action="store_true", help="only table 5 (--tables 5)")
    p.add_argument("--breakdown_steps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tables = ({4} if args.window_only else {5} if args.new_stack_only
              else {int(t) for t in args.tables.split(",")})

    ours, hf = models()
    if 1 in tables:
        print_throughput(ours, hf, args)
    if 2 in tables:
        print_stack_overhead(ours, args)
    if 3 in tables:
        print_kv_vs_recompute(ours, args)
    if 4 in tables:
        print_past_block_size({"124M": ours, "char": char_model()}, args)
    if 5 in tables:
        print_new_stack(ours, args)
    if 6 in tables:
        print_step_breakdown(ours, args.breakdown_steps)


if __name__ == "__main__":
    main()
