"""minilm-eval (python -m minilm.eval): perplexity, bits per byte, calibration and temperature
scaling of a checkpoint on its own val split or on text files; scoring completions.

    minilm-eval --ckpt out/shakespeare_char                      # the run's val split
    minilm-eval --ckpt out/run --text a.txt b.jsonl --json       # files: one document each / per line
    minilm-eval --ckpt out/run --fit_temperature --sweep_temperature --report out/run/eval
    minilm-eval --ckpt out/run --text a.txt --tokens a.jsonl --html a.html
    minilm-eval --ckpt out/run --context "ROMEO:" --choices " Good" " Bad" --json

Every figure comes from minilm.eval.evaluate (one pass of the shared scorer); this module finds
the documents, checks the arguments, and writes what was asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from minilm.atomic import open_atomic, write_atomic
from minilm.checkpoint import CheckpointError, load_model, resolve_checkpoint
from minilm.cli import ArgumentParser
from minilm.data import PreparedData, cache_folder, cached_data
from minilm.device import DEVICE_NAMES, resolve_device
from minilm.eval import Document, default_stride, evaluate, score
from minilm.eval_report import log_wandb, summary_text, write_report
from minilm.eval_tokens import TokenHtml, TokenRecords
from minilm.tokenizer import Tokenizer, read_text

DEFAULT_SWEEP = "0.5,0.8,1,1.2,1.5"
CALIBRATION_FILE = "calibration.json"


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


# ---------------------------------------------------------------- documents


def read_text_files(paths: list[str]) -> list[tuple[str, str]]:
    """(name, text) of every document in the files: a file is one document, a .jsonl file one
    per line ('text' field; empty texts skipped). One line naming the file for anything wrong."""
    docs = []
    for path in paths:
        try:
            text = read_text(path)
        except OSError as e:
            raise ValueError(f"cannot read --text {path}: {e.strerror or type(e).__name__}") from None
        found = 0
        if path.endswith(".jsonl"):
            for n, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--text {path}, line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"--text {path}, line {n}: expected an object with a string "
                                     "field 'text'")
                if record["text"]:
                    docs.append((f"{path}:{n}", record["text"]))
                    found += 1
        elif text:
            docs.append((path, text))
            found = 1
        if not found:
            raise ValueError(f"--text {path} is empty: no text to evaluate")
    return docs


def encode_documents(texts: list[tuple[str, str]], tokenizer: Tokenizer) -> list[Document]:
    docs = []
    for name, text in texts:
        try:
            docs.append(Document(name, text, tokenizer.encode(text)))
        except ValueError as e:
            raise ValueError(f"--text {name}: {e}") from None
    return docs


def find_data_cache(state: dict[str, Any], ckpt_dir: Path | None, ckpt: str) -> PreparedData:
    """The prepared data the checkpoint was trained on: the folder prepare() would use for the
    state's data config, looked up from the current folder and, for a relative out_dir, from the
    folder training ran in. Never re-tokenizes: a missing cache is an error."""
    data = (state.get("config") or {}).get("data")
    if not data:
        raise ValueError(f"{ckpt} has no data cache (its state names no training data, e.g. a "
                         "Hugging Face model): evaluate it on --text FILE")
    roots = [Path.cwd()]
    out_dir = (state.get("config") or {}).get("out_dir")
    if ckpt_dir is not None and out_dir and not Path(out_dir).is_absolute():
        run_dir, parts = ckpt_dir.resolve().parent, Path(out_dir).parts
        if run_dir.parts[-len(parts):] == parts:  # training ran in the folder above out_dir
            roots.append(Path(*run_dir.parts[:-len(parts)]))
    tried = []
    for root in roots:
        source = data["source"]
        if source != "shakespeare" and (root / source).exists():
            source = str(root / source)  # the same files give the same key from anywhere
        settings = (source, data["tokenizer"], data.get("text_field", "text"), data.get("name"),
                    data.get("split", "train"), data["val_fraction"],
                    root / Path(data.get("cache_dir", "data_cache")).expanduser())
        found = cached_data(*settings)
        if found is not None:
            return found
        tried.append(str(cache_folder(*settings)))
    raise ValueError(f"the data cache {ckpt} was trained on is missing (looked for "
                     f"{' and '.join(dict.fromkeys(tried))}; data.source {data['source']!r}): "
                     "prepare it again with the same data settings, or evaluate on --text FILE")


def split_documents(data: PreparedData, split: str, tokenizer: Tokenizer,
                    max_tokens: int | None = None) -> list[Document]:
    """A split's documents: its .bin is every document followed by the end-of-text token."""
    if data.meta["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"the data cache {data.dir} was made with another tokenizer "
                         f"({data.meta['tokenizer'].get('type')}) than the checkpoint's")
    n = data.meta["tokens"][split]
    if n == 0:
        raise ValueError(f"the {split} split of {data.dir} is empty (data.val_fraction = 0?)")
    tokens = data.tokens(split)[:n]
    ends = np.flatnonzero(tokens == tokenizer.eot_token).tolist() + [n]
    docs, start, total = [], 0, 0
    for end in ends:
        ids = tokens[start:end].tolist()
        start = end + 1
        if ids:
            docs.append(Document(f"{split} document {len(docs)}", tokenizer.decode(ids), ids))
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return docs


def truncate(documents: list[Document], max_tokens: int, tokenizer: Tokenizer) -> list[Document]:
    """The first max_tokens tokens: whole documents, then a prefix of the next one."""
    out, left = [], max_tokens
    for d in documents:
        if left <= 0:
            break
        if len(d.tokens) > left:
            d = Document(d.name, tokenizer.decode(d.tokens[:left]), d.tokens[:left])
        out.append(d)
        left -= len(d.tokens)
    return out


# ---------------------------------------------------------------- running


def checkpoint_dir(ckpt: str) -> Path | None:
    """The local checkpoint folder, where calibration.json goes (None for a hub id)."""
    try:
        return resolve_checkpoint(ckpt)
    except CheckpointError:
        return Path(ckpt) if Path(ckpt).is_dir() else None


def evaluate_checkpoint(ckpt: str | Path, split: str = "val", texts: list[str] | None = None,
                        device: str = "auto", stride: int | None = None, batch_size: int = 8,
                        max_tokens: int | None = None, fit_temperature: bool = False,
                        sweep: list[float] | None = None, tokens_file: str | None = None,
                        html_file: str | None = None) -> dict[str, Any]:
    """Load a checkpoint, find its documents (texts, else the split of its data cache), evaluate
    them, write the per-token files and, after a temperature fit, calibration.json into the
    checkpoint folder; returns the results with what was evaluated, how and how fast."""
    ckpt = str(ckpt)
    raw_texts = read_text_files(texts) if texts else None  # bad files fail before the model loads
    model, tokenizer, state = load_model(ckpt, resolve_device(device, key="--device"))
    block_size = model.config.block_size
    if stride is not None and stride > block_size:
        raise ValueError(f"--stride must be <= block_size = {block_size}, got {stride}")
    stride = default_stride(block_size) if stride is None else stride
    ckpt_dir = checkpoint_dir(ckpt)
    if raw_texts is not None:
        documents, source = encode_documents(raw_texts, tokenizer), dict(files=texts)
    else:
        data = find_data_cache(state, ckpt_dir, ckpt)
        documents = split_documents(data, split, tokenizer, max_tokens)
        source = dict(split=split, cache=str(data.dir))
    if max_tokens is not None:
        documents = truncate(documents, max_tokens, tokenizer)
        if fit_temperature and len(documents) < 2:
            raise ValueError(f"fitting a temperature needs at least 2 documents, and the first "
                             f"--max_tokens {max_tokens} tokens are all in the first one: "
                             "raise --max_tokens")
    device_name = str(next(model.parameters()).device)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as outputs:  # per-token files appear whole or not at all
        sinks: list = []
        if tokens_file:
            sinks.append(TokenRecords(outputs.enter_context(open_atomic(tokens_file)), tokenizer))
        if html_file:
            html = TokenHtml(outputs.enter_context(open_atomic(html_file)), tokenizer,
                             documents, title=f"minilm-eval: {ckpt}")
            sinks.append(html)

        def on_tokens(*chunk) -> None:
            for sink in sinks:
                sink(*chunk)

        results = evaluate(model, documents, tokenizer.eot_token, stride, batch_size,
                           fit_temperature, sweep or [], on_tokens if sinks else None)
        seconds = time.perf_counter() - t0
        if html_file:
            html.close(results)
    header = dict(checkpoint=ckpt, step=state.get("step"), data=source, stride=stride,
                  batch_size=batch_size, device=device_name)
    results = dict(header, **results, seconds=seconds, tokens_per_sec=results["tokens"] / seconds)
    if fit_temperature:  # the folder whose weights were evaluated, not a later best/ or last/
        results["calibration_file"] = (str(write_calibration(results, ckpt_dir))
                                       if ckpt_dir is not None else None)
    return results


def write_calibration(results: dict[str, Any], ckpt_dir: Path) -> Path:
    """calibration.json in the checkpoint folder: T* and what it was fitted and checked on. A
    new checkpoint save replaces the whole folder, so a stale T* never outlives its weights."""
    t = results["temperature"]
    path = ckpt_dir / CALIBRATION_FILE
    write_atomic(path, json.dumps(dict(
        temperature=t["T"], step=results["step"], data=results["data"], fit=t["fit"],
        heldout={k: v for k, v in t["heldout"].items() if not k.startswith("reliability")},
        method="temperature scaling (Guo et al. 2017): T* minimises NLL on the first half of "
               "the documents; heldout: the second half"), indent=2) + "\n")
    return path


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
