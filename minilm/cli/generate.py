"""generate.py: sample from a checkpoint; text streams to stdout, or JSON lines with log-probs.

    python generate.py --ckpt out --prompt "ROMEO:" --max_new_tokens 200
    python generate.py --ckpt out --prompt "ROMEO:" --json --logprobs 5 --num_samples 3
    python generate.py --ckpt out --prompt "ROMEO:" --show_distribution
    python generate.py --ckpt gpt2 --prompt "The meaning of life is"       # Hugging Face GPT-2

The sampler flags are SamplerSettings' knobs, one flag each, generated from its fields (their help,
ranges and defaults live there; see --help and the README's Sampling section). Defaults follow
nanoGPT's sample.py (for two knobs: their cli_default; seed 1337, prompt "\\n",
500 new tokens) except one sample instead of ten. Sample i uses seed + i, so a sample does not
depend on how many were asked for. A row ends at the tokenizer's end-of-text token (not printed) or
at a --stop string (printed, as HF's stop_strings).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from minilm.cli.common import ArgumentParser, run_cli
from minilm.device import DEVICE_NAMES, resolve_device
from minilm.interop.loading import load_model
from minilm.sampling.generation import NextTokenTable, complete, generate, next_token_table
from minilm.sampling.request import Completion, guided
from minilm.sampling.settings import ORDERS, Knob, SamplerSettings, knobs, settings_from_user
from minilm.sampling.stack import SamplerStack
from minilm.sampling.stages import MAX_LOGPROBS, STAGES, unconditional_prompt
from minilm.tokenizer import TextStream, Tokenizer, read_text

SHOWN = 10  # tokens in --show_distribution's table
BAR = 20  # characters of a probability-1 bar


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
    p.add_argument("--seed", type=int, default=1337, help="sample i uses seed + i")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop a sample when it generates this text (repeatable)")
    p.add_argument("--logprobs", type=int, default=0, metavar="N",
                   help=f"with --json: the N most likely tokens at each position (at most "
                        f"{MAX_LOGPROBS}, as the API)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per sample: text, tokens, logprobs, processed_logprobs, "
                        "top_logprobs, finish_reason")
    p.add_argument("--show_distribution", action="store_true",
                   help="show the next token's distribution after each stage of the sampler "
                        "(raw, then each stage in use) and exit")
    p.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (as train.device)")
    add_sampler_flags(p)
    return p


def json_texts(text: str) -> list[str]:
    """A flag's JSON list of strings (argparse type)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): "
                                         f"{text!r}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a JSON list of strings such as '[\"\\n\", "
                                         f"\":\"]', got {text!r}")
    return value


def order_names(text: str) -> str | list[str]:
    """--order: a preset name, or comma-separated stage names (argparse type)."""
    return text if text in ORDERS else [name.strip() for name in text.split(",")]


# How a sampler flag's text becomes a knob's value, per kind of knob; a token_bias stays text here
# (its keys may be texts, which need the tokenizer: sampler_settings parses it).
FLAG_TYPES = {"number": float, "integer": int, "choice": int, "token_bias": str,
              "texts": json_texts, "order": order_names, "prompt": str}
FLAG_FORMS = {
    "token_bias": ("JSON", 'a JSON object, e.g. \'{"1234": -100, "ROMEO": 5, "text:7": 2}\': a key '
                           'is a token id ("1234" or "id:1234") or a text of one token ("ROMEO"; '
                           '"text:7" for a text of digits, which alone would be an id); values in '
                           '[-100, 100]; -100 bans the token'),
    "texts": ("JSON", "a JSON list of strings"),
    "order": ("ORDER", f"a list as comma-separated names from {','.join(STAGES)}"),
    "prompt": ("TEXT", "a text"),
}


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SamplerSettings knob: its help, its form and its default (the knob's
    cli_default where nanoGPT's differs from the no-op value)."""
    group = p.add_argument_group("sampler", "one flag per knob of minilm.sampling.SamplerSettings; "
                                            "every stage is off at its default unless said")
    for k in knobs():
        default = k.default if k.cli_default is None else k.cli_default
        metavar, form = FLAG_FORMS.get(k.kind, (None, None))
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        group.add_argument(f"--{k.name}", type=FLAG_TYPES[k.kind], default=default,
                           metavar=metavar, help=f"{k.help}{'; ' + form if form else ''} "
                                                 f"(default: {shown})")


def sampler_settings(args: argparse.Namespace, encode=None) -> SamplerSettings:
    """The settings the flags give. Without ``encode`` (before the tokenizer is loaded) only the
    JSON of a token_bias knob is read (its keys may be texts): every other value is checked before
    the model loads."""
    values: dict[str, Any] = {}
    for k in knobs():
        value = getattr(args, k.name)
        if k.kind == "token_bias":
            value = parse_json_object(value, k)
            if encode is None:
                continue
        values[k.name] = value
    return settings_from_user(values, encode, prefix="--")


def parse_json_object(text: str | None, k: Knob) -> dict | None:
    """A flag's JSON object (a logit bias: settings.user_logit_bias reads its keys)."""
    if not text:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--{k.name} is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--{k.name} must be a JSON object such as '{{\"1234\": -100}}'")
    return raw


def main(argv: list[str]) -> int | None:
    args = build_parser().parse_args(argv)
    for name, low in (("num_samples", 1), ("max_new_tokens", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.logprobs <= MAX_LOGPROBS:  # as the API: not the whole vocabulary per token
        raise ValueError(f"--logprobs must be in [0, {MAX_LOGPROBS}], got {args.logprobs}")
    if args.logprobs and not args.json:
        raise ValueError("--logprobs needs --json (text output has no place for them)")
    prompt = read_prompt(args)
    sampler_settings(args)  # a bad value is said before the model loads
    model, tokenizer, _ = load_model(args.ckpt, resolve_device(args.device, key="--device"))
    ids = tokenizer.encode(prompt)
    settings = sampler_settings(args, tokenizer.encode)
    sampler = SamplerStack.from_settings(settings, tokenizer=tokenizer,
                                         vocab_size=model.config.vocab_size)
    negative = unconditional_prompt(settings.negative_prompt, ids, tokenizer.encode,
                                    model.config.vocab_size) if guided(sampler) else None
    if args.show_distribution:
        show_distribution(model, tokenizer, ids, sampler, include=settings.named_tokens(),
                          negative_prompt=negative)
        return 0
    options = dict(sampler=sampler, eos_id=tokenizer.eot_token, stop=args.stop,
                   decode=tokenizer.decode, negative_prompt=negative)
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


def stream_text(steps, tokenizer: Tokenizer, out: TextIO | None = None) -> None:
    """Write one row's text as its tokens arrive (TextStream: never half a character) to ``out``
    (default: sys.stdout as it is at the call)."""
    out = out or sys.stdout
    tokens: list[int] = []
    text = TextStream(tokenizer.decode)
    for step in steps:
        tokens.append(step.tokens.item())
        out.write(text.update(visible_tokens(tokens, tokenizer), step.finish_reasons[0] is not None))
        out.flush()
    out.write("\n")
    out.flush()


def show_distribution(model, tokenizer: Tokenizer, ids: list[int], sampler: SamplerStack,
                      include: list[int] = (), out: TextIO | None = None,
                      negative_prompt: list[int] | None = None) -> None:
    """Print the next-token table: per stage how many tokens it keeps and its entropy, then the
    SHOWN most likely tokens (and the logit-biased ones) with their probability after each stage
    ("-" once removed) and a bar of the last one."""
    print(render_table(next_token_table(model, ids, sampler, SHOWN, include, negative_prompt),
                       tokenizer),
          file=out or sys.stdout)


def render_table(table: NextTokenTable, tokenizer: Tokenizer) -> str:
    names = ["raw (T = 1)" if s == "raw" else s for s in table.stages]
    width = max(12, *map(len, names))
    lines = [f"{'stage':<{width}}  {'kept':>13}  entropy"]
    for name, kept, h in zip(names, table.n_kept, table.entropy):
        lines.append(f"{name:<{width}}  {f'{kept} of {table.vocab_size}':>13}  {h:.3f} nats")
    cols = [max(6, len(s)) for s in names]
    lines.append("")
    lines.append(f"{'id':>6}  {'token':<14}{'logit':>8}  " +
                 "  ".join(f"{s:>{w}}" for s, w in zip(names, cols)))
    for token, logit, probs, kept in zip(table.tokens, table.logits, table.probs, table.kept):
        cells = "  ".join(f"{p:>{w}.3f}" if k else f"{'-':>{w}}"
                          for p, k, w in zip(probs, kept, cols))
        bar = "█" * round(probs[-1] * BAR) if kept[-1] else ""
        lines.append(f"{token:>6}  {tokenizer.decode([token])!r:<14}{logit:>8.3f}  {cells}  {bar}")
    return "\n".join(lines)


def entry() -> None:
    """Console script `minilm-generate`."""
    sys.exit(run_cli(main))
