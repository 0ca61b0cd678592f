"""generate.py: sample from a checkpoint; text streams to stdout, or JSON lines with log-probs.

    python generate.py --ckpt out --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8
    python generate.py --ckpt out --prompt "ROMEO:" --json --logprobs 5 --num_samples 3
    python generate.py --ckpt out --prompt "ROMEO:" --top_p 0.9 --show_distribution
    python generate.py --ckpt gpt2 --prompt "The meaning of life is"       # Hugging Face GPT-2

Defaults follow nanoGPT's sample.py (temperature 0.8, top-k 200, seed 1337, prompt "\\n",
500 new tokens) except one sample instead of ten. Sample i uses seed + i, so a sample does not
depend on how many were asked for. A row ends at the tokenizer's end-of-text token (not printed) or
at a --stop string (printed, as HF's stop_strings).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

import torch

from minilm.checkpoint import load_model
from minilm.cli import ArgumentParser
from minilm.device import DEVICE_NAMES, resolve_device
from minilm.generation import Completion, complete, generate, next_token_stages
from minilm.sampling import DEFAULT_ORDER, ORDERS, SamplerStack
from minilm.tokenizer import Tokenizer, read_text

BAN = -100.0  # a --logit_bias of -100 bans the token (OpenAI)
SHOWN = 10  # tokens per stage in --show_distribution
BAR = 40  # characters of a probability-1 bar


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="generate.py", description="Sample text from a minilm checkpoint.")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint folder, a run's out_dir, a Hugging Face GPT-2 folder or a hub "
                        "id such as gpt2 or distilbert/distilgpt2")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    src.add_argument("--prompt_file", help="read the prompt from this file")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--min_p", type=float, default=0.0)
    p.add_argument("--typical_p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--presence_penalty", type=float, default=0.0)
    p.add_argument("--frequency_penalty", type=float, default=0.0)
    p.add_argument("--logit_bias", metavar="JSON",
                   help='e.g. \'{"1234": -100, "ROMEO": 5}\': keys are token ids or single-token '
                        'strings, values in [-100, 100]; -100 bans the token')
    p.add_argument("--order", default="default",
                   help=f"{' | '.join(ORDERS)} | comma-separated stage names from "
                        f"{','.join(DEFAULT_ORDER)}")
    p.add_argument("--seed", type=int, default=1337, help="sample i uses seed + i")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop a sample when it generates this text (repeatable)")
    p.add_argument("--logprobs", type=int, default=0, metavar="N",
                   help="with --json: the N most likely tokens at each position")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per sample: text, tokens, logprobs, processed_logprobs, "
                        "top_logprobs, finish_reason")
    p.add_argument("--show_distribution", action="store_true",
                   help="show the next token's distribution after each stage of the sampler "
                        "(raw, penalties, temperature, top-k, ...) and exit")
    p.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (as train.device)")
    return p


def main(argv: list[str]) -> int | None:
    args = build_parser().parse_args(argv)
    for name, low in (("num_samples", 1), ("max_new_tokens", 0), ("logprobs", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.logprobs and not args.json:
        raise ValueError("--logprobs needs --json (text output has no place for them)")
    prompt = read_prompt(args)
    model, tokenizer, _ = load_model(args.ckpt, resolve_device(args.device, key="--device"))
    ids = tokenizer.encode(prompt)
    order = args.order if args.order in ORDERS else [s.strip() for s in args.order.split(",")]
    sampler = SamplerStack.from_settings(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        logit_bias=parse_logit_bias(args.logit_bias, tokenizer), order=order,
        vocab_size=model.config.vocab_size)
    if args.show_distribution:
        show_distribution(model, tokenizer, ids, sampler)
        return 0
    options = dict(sampler=sampler, eos_id=tokenizer.eot_token, stop=args.stop,
                   decode=tokenizer.decode)
    seeds = [args.seed + i for i in range(args.num_samples)]
    if args.json:  # all samples as one batch
        results = complete(model, [ids] * args.num_samples, args.max_new_tokens, seed=seeds,
                           logprobs=args.logprobs, **options)
        for r in results:
            print(json.dumps(to_json(r, tokenizer)), flush=True)
        return 0
    for i, seed in enumerate(seeds):  # one after another, so that each can stream
        if i:
            print("---------------")
        sys.stdout.write(prompt)
        stream_text(generate(model, [ids], args.max_new_tokens, seed=seed, **options), tokenizer)
    return 0


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        prompt = args.prompt
    else:
        try:
            prompt = read_text(args.prompt_file)
        except OSError as e:
            raise ValueError(f"cannot read --prompt_file {args.prompt_file}: "
                             f"{e.strerror or type(e).__name__}") from None
        except ValueError as e:  # not UTF-8: the file and the first bad byte
            raise ValueError(f"--prompt_file {e}") from None
    if not prompt:
        raise ValueError("empty prompt: give --prompt TEXT or a non-empty --prompt_file")
    return prompt


def parse_logit_bias(text: str | None, tokenizer: Tokenizer) -> dict[int, float]:
    """--logit_bias JSON → {token id: bias}. A key of digits is a token id, any other key a string
    that must encode to one token; -100 becomes -inf (a ban), other values in [-100, 100] add."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--logit_bias is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(raw, dict):
        raise ValueError("--logit_bias must be a JSON object such as '{\"1234\": -100}'")
    bias = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not -100 <= value <= 100:
            raise ValueError(f"--logit_bias value for {key!r} must be a number in [-100, 100], "
                             f"got {value!r}")
        if key.isdigit():
            token = int(key)
        else:
            ids = tokenizer.encode(key)
            if len(ids) != 1:
                raise ValueError(f"--logit_bias key {key!r} is {len(ids)} tokens {ids}, not one; "
                                 "use a single-token string or a token id")
            token = ids[0]
        bias[token] = float("-inf") if value <= BAN else float(value)
    return bias


def visible_tokens(tokens: list[int], tokenizer: Tokenizer) -> list[int]:
    """The tokens shown as text: all but a final end-of-text token."""
    return tokens[:-1] if tokens and tokens[-1] == tokenizer.eot_token else tokens


def to_json(r: Completion, tokenizer: Tokenizer) -> dict:
    return {
        "text": tokenizer.decode(visible_tokens(r.tokens, tokenizer)),
        "tokens": r.tokens,
        "logprobs": r.logprobs,
        "processed_logprobs": r.processed_logprobs,
        "top_logprobs": [[[i, tokenizer.decode([i]), lp] for i, lp in top]
                         for top in r.top_logprobs],
        "finish_reason": r.finish_reason,
    }


def stream_text(steps, tokenizer: Tokenizer, out: TextIO = sys.stdout) -> None:
    """Write one row's text as its tokens arrive. The whole text is decoded each time and the new
    part written, holding back trailing U+FFFD: with byte-level BPE a character can span tokens,
    and its first bytes alone decode to the replacement character."""
    tokens: list[int] = []
    written = 0
    for step in steps:
        tokens.append(step.tokens.item())
        text = tokenizer.decode(visible_tokens(tokens, tokenizer))
        if step.finish_reasons[0] is None:
            text = text.rstrip("\ufffd")
        out.write(text[written:])
        out.flush()
        written = max(written, len(text))
    out.write("\n")
    out.flush()


def show_distribution(model, tokenizer: Tokenizer, ids: list[int], sampler: SamplerStack,
                      out: TextIO = sys.stdout) -> None:
    """The SHOWN most likely next tokens, with probability bars, after each stage of the stack."""
    V = model.config.vocab_size
    for name, logits in next_token_stages(model, [ids], sampler):
        z = logits[0].float()  # [V]
        probs = torch.softmax(z, dim=-1)
        kept = int((z > float("-inf")).sum())
        title = "raw model distribution" if name == "raw" else f"after {name}"
        print(f"{title} ({kept} of {V} tokens kept)", file=out)
        top = probs.topk(min(SHOWN, kept))
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {i:>6} {tokenizer.decode([i])!r:<14} {p:6.3f} {'█' * round(p * BAR)}",
                  file=out)
