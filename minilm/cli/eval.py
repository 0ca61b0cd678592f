"""minilm-eval (python -m minilm.eval): perplexity, bits per byte, calibration and temperature
scaling of a checkpoint on its own val split or on text files; scoring completions.

    minilm-eval --ckpt out/shakespeare_char                      # the run's val split
    minilm-eval --ckpt out/run --text a.txt b.jsonl --json       # files: one document each / per line
    minilm-eval --ckpt out/run --fit_temperature --sweep_temperature --report out/run/eval
    minilm-eval --ckpt out/run --text a.txt --tokens a.jsonl --html a.html
    minilm-eval --ckpt out/run --context "ROMEO:" --choices " Good" " Bad" --json

Every figure comes from minilm.evaluation.corpus.evaluate (one pass of the shared scorer); this
module checks the arguments, runs evaluate_checkpoint and shows what was asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from minilm.cli.common import ArgumentParser, run_cli
from minilm.device import DEVICE_NAMES, resolve_device
from minilm.evaluation.report import log_wandb, summary_text, write_report
from minilm.evaluation.run import CALIBRATION_FILE, evaluate_checkpoint
from minilm.evaluation.scoring import score
from minilm.interop.loading import load_model

DEFAULT_SWEEP = "0.5,0.8,1,1.2,1.5"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="minilm-eval", description="Perplexity, bits per byte, calibration "
                       "and temperature scaling of a minilm checkpoint; scoring completions.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, or a run's out_dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", metavar="FILE",
                     help="evaluate these files: each a document, or .jsonl with a 'text' field, "
                          "one document per line (default: the run's val split)")
    src.add_argument("--split", choices=("val", "train"),
                     help="a split of the data cache the checkpoint was trained on (default: val)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: block_size // 2)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max_tokens", type=int, help="score only the first N tokens")
    p.add_argument("--fit_temperature", action="store_true",
                   help="fit T* on the first half of the documents, report on the second, and "
                        f"write {CALIBRATION_FILE} into the checkpoint folder")
    p.add_argument("--sweep_temperature", nargs="?", const=DEFAULT_SWEEP, metavar="T,T,...",
                   help=f"NLL, ECE, entropy and top-1 probability at each T (default "
                        f"{DEFAULT_SWEEP}); the plot goes to --report")
    p.add_argument("--report", metavar="DIR",
                   help="write results.json, report.md, reliability.png (and sweep.png) here")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--tokens", metavar="FILE.jsonl",
                   help="per scored token: text, log-prob, rank, entropy, top-5 alternatives")
    p.add_argument("--html", metavar="FILE.html",
                   help="the text coloured by each token's probability, alternatives on hover")
    p.add_argument("--wandb", action="store_true",
                   help="log the figures and plots to a wandb run (offline unless WANDB_MODE)")
    p.add_argument("--context", help="with --choices: the text the choices continue")
    p.add_argument("--choices", nargs="+", metavar="TEXT",
                   help="score each continuation of --context (default context: empty)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (as train.device)")
    return p


CORPUS_ONLY = ("text", "split", "stride", "max_tokens", "fit_temperature", "sweep_temperature",
               "report", "tokens", "html", "wandb")


def check_args(args: argparse.Namespace) -> list[float]:
    """Everything that can be checked before loading the model; returns the sweep temperatures."""
    if args.context is not None and args.choices is None:
        raise ValueError("--context needs --choices (the continuations to score)")
    if args.choices is not None:
        given = [name for name in CORPUS_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise ValueError(f"--{given[0]} does not apply to --choices (scoring completions)")
    if args.stride is not None and args.stride <= 0:
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    for name in ("batch_size", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name in ("tokens", "html"):
        path = getattr(args, name)
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"--{name} {path}: folder {Path(path).parent} does not exist")
    return parse_temperatures(args.sweep_temperature) if args.sweep_temperature else []


def parse_temperatures(text: str) -> list[float]:
    """'0.5,1,2' -> [0.5, 1.0, 2.0]: positive, finite, distinct."""
    temps = []
    for part in text.split(","):
        try:
            t = float(part)
        except ValueError:
            raise ValueError(f"--sweep_temperature: {part.strip()!r} is not a number "
                             f"(expected e.g. {DEFAULT_SWEEP})") from None
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"--sweep_temperature: temperatures must be > 0, got {part.strip()}")
        if t not in temps:
            temps.append(t)
    return temps


def main(argv: list[str]) -> int | None:
    args = build_parser().parse_args(argv)
    sweep = check_args(args)
    if args.choices is not None:
        return choices_main(args)
    results = evaluate_checkpoint(
        args.ckpt, split=args.split or "val", texts=args.text, device=args.device,
        stride=args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens,
        fit_temperature=args.fit_temperature, sweep=sweep, tokens_file=args.tokens,
        html_file=args.html)
    plots = write_report(results, Path(args.report)) if args.report else None
    if args.wandb:
        log_wandb(results, Path(args.report) if args.report else None, plots)
    print(json.dumps(results) if args.json else summary_text(results), flush=True)
    return 0


def choices_main(args: argparse.Namespace) -> int:
    model, tokenizer, _ = load_model(args.ckpt, resolve_device(args.device, key="--device"))
    context = args.context or ""
    scores = score(model, tokenizer, context, args.choices, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(dict(context=context, choices=[
            dict(asdict(s), token_texts=[tokenizer.decode([t]) for t in s.tokens])
            for s in scores])))
        return 0
    print(f"context: {context!r}")
    print(f"  {'logprob':>9} {'per char':>9} {'prob':>7} {'greedy':>6} {'tokens':>6}  choice")
    for s in scores:
        print(f"  {s.logprob:9.4f} {s.logprob_per_char:9.4f} {s.prob:7.4f} "
              f"{'yes' if s.is_greedy else 'no':>6} {len(s.tokens):6d}  {s.continuation!r}")
    return 0


def entry() -> None:
    """Console script `minilm-eval`."""
    sys.exit(run_cli(main))
