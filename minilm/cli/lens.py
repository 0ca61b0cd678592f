"""minilm-lens: the logit lens of a checkpoint at one position of a prompt (minilm.sampling.lens).

    python -m minilm.lens --ckpt out/shakespeare_char --prompt "ROMEO:"          # or: minilm-lens
    python -m minilm.lens --ckpt gpt2 --prompt "The Eiffel Tower is in the city of" --top 5
    python -m minilm.lens --ckpt gpt2 --prompt "one two three" --position 1 --json

A table of the layers (embeddings, then each block) by their most likely next tokens, with each
layer's entropy and the rank there of the model's final choice; --json prints one object instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from minilm.cli.common import ArgumentParser, run_cli
from minilm.device import DEVICE_NAMES, resolve_device
from minilm.interop.loading import load_model
from minilm.sampling.lens import LogitLens, logit_lens
from minilm.tokenizer import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="minilm-lens", description="The logit lens: the next-token "
                       "distribution read off after the embeddings and after every block.")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint folder, a run's out_dir, a Hugging Face GPT-2 folder or hub id")
    p.add_argument("--prompt", required=True, help="the text to read")
    p.add_argument("--position", type=int, default=-1,
                   help="the token whose next-token distribution is read (0-based; negative "
                        "counts from the end; default -1, the last)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="tokens shown per layer")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: the position, the model's choice and per layer its "
                        "entropy, the choice's rank and the top tokens with log-probs")
    p.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (as train.device)")
    return p


def main(argv: list[str]) -> int | None:
    args = build_parser().parse_args(argv)
    if args.top < 1:  # before loading a model that may be large
        raise ValueError(f"--top must be >= 1, got {args.top}")
    if not args.prompt:
        raise ValueError("--prompt is empty: the lens reads at least one token")
    model, tokenizer, _ = load_model(args.ckpt, resolve_device(args.device, key="--device"))
    lens = logit_lens(model, tokenizer.encode(args.prompt), args.position, args.top)
    if args.json:
        print(json.dumps(lens.to_dict(lambda t: tokenizer.decode([t]))))
    else:
        print(render_lens(lens, tokenizer))
    return 0


def render_lens(lens: LogitLens, tokenizer: Tokenizer) -> str:
    """The table: one line per layer, its entropy, the final choice's rank and the top tokens."""
    def shown(token: int) -> str:
        return repr(tokenizer.decode([token]))

    final = lens.layers[-1]
    width = max(len(layer.name) for layer in lens.layers)
    lines = [f"position {lens.position} of {len(lens.prompt_ids)} "
             f"({shown(lens.prompt_ids[lens.position])}); the model's choice: "
             f"{shown(lens.choice)}, p = {math.exp(final.choice_logprob):.3f}", "",
             f"{'layer':<{width}}  {'entropy':>7}  {'rank':>6}  top tokens (probability)"]
    for layer in lens.layers:
        cells = "  ".join(f"{shown(t)} {math.exp(lp):.3f}" for t, lp in layer.top)
        lines.append(f"{layer.name:<{width}}  {layer.entropy:>7.3f}  {layer.rank:>6}  {cells}")
    return "\n".join(lines)


def entry() -> None:
    """Console script `minilm-lens`."""
    sys.exit(run_cli(main))
