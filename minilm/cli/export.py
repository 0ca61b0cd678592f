"""Export a model as a Hugging Face GPT-2 folder: transformers, vLLM, lm-evaluation-harness and the
hub load it with no minilm code.

    python -m minilm.export out/shakespeare_char hf/shakespeare_char      # or: minilm-export ...
    python -m minilm.export out/run hf/run --force --push_to_hub you/minilm-run

CKPT is anything load_model reads (a minilm checkpoint or out_dir, an HF folder, a hub id). DEST is
written atomically; an existing non-empty DEST is refused unless --force, and one that is, holds or
lies inside a checkpoint folder of the source is refused even with it
(minilm.interop.hf.check_destination).
"""

from __future__ import annotations

import sys
from pathlib import Path

from minilm.cli.common import ArgumentParser, run_cli
from minilm.interop.hf import check_destination, export, push_to_hub
from minilm.interop.loading import load_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m minilm.export",
                description="Write a minilm model as a Hugging Face GPT-2 folder "
                            "(config.json, model.safetensors, generation_config.json, tokenizer).")
    p.add_argument("ckpt", help="checkpoint folder, a run's out_dir, an HF folder or hub id")
    p.add_argument("dest", help="folder to write (not a checkpoint of CKPT's run, nor inside one)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    p.add_argument("--push_to_hub", metavar="REPO",
                   help="then upload DEST to this hub model repo (created if needed; needs a login)")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: a private repo")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dest = Path(args.dest)
    check_destination(dest, args.force, args.ckpt)  # before loading a model that might be large
    model, tokenizer, _ = load_model(args.ckpt, "cpu")
    for warning in export(model, tokenizer, dest, force=args.force):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {dest}: GPT2LMHeadModel, {model.param_counts()['total'] / 1e6:.2f}M parameters")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(dest, args.push_to_hub, private=args.private)}")
    return 0


def entry() -> None:
    """Console script `minilm-export`."""
    sys.exit(run_cli(main))
