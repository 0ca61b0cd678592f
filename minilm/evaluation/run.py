"""evaluate_checkpoint: load a checkpoint, find its documents, score them in one pass and write
what was asked for (per-token files, calibration.json): what minilm-eval and the ablation run."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from minilm.checkpoint import resolve_checkpoint
from minilm.device import resolve_device
from minilm.errors import CheckpointError
from minilm.evaluation.corpus import Document, Sink, evaluate
from minilm.evaluation.documents import encode_documents, read_text_files, split_documents, truncate
from minilm.evaluation.scoring import default_stride
from minilm.evaluation.tokens import TokenHtml, TokenRecords
from minilm.files import open_atomic, write_atomic
from minilm.interop.loading import load_model
from minilm.tokenizer import Tokenizer
from minilm.train.data import find_data_cache

CALIBRATION_FILE = "calibration.json"


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
    them in one pass whose sinks also write the per-token files, and after a temperature fit
    write calibration.json into the checkpoint folder; returns the results with what was
    evaluated, how and how fast."""
    ckpt = str(ckpt)
    raw_texts = read_text_files(texts) if texts else None  # bad files fail before the model loads
    model, tokenizer, state = load_model(ckpt, resolve_device(device, key="--device"))
    stride = checked_stride(stride, model.config.block_size)
    ckpt_dir = checkpoint_dir(ckpt)
    if raw_texts is not None:
        documents, source = encode_documents(raw_texts, tokenizer), dict(files=texts)
    else:
        data = find_data_cache(state, ckpt_dir, ckpt)
        documents = split_documents(data, split, tokenizer, max_tokens)
        source = dict(split=split, cache=str(data.dir))
    if max_tokens is not None:
        documents = first_tokens(documents, max_tokens, tokenizer, fit_temperature)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as files:  # per-token files appear whole or not at all
        sinks = token_files(files, tokenizer, documents, tokens_file, html_file,
                            title=f"minilm-eval: {ckpt}")
        results = evaluate(model, documents, tokenizer.eot_token, stride, batch_size,
                           fit_temperature, sweep or [], sinks)
        seconds = time.perf_counter() - t0
    header = dict(checkpoint=ckpt, step=state.get("step"), data=source, stride=stride,
                  batch_size=batch_size, device=str(next(model.parameters()).device))
    results = dict(header, **results, seconds=seconds, tokens_per_sec=results["tokens"] / seconds)
    if fit_temperature:  # the folder whose weights were evaluated, not a later best/ or last/
        results["calibration_file"] = (str(write_calibration(results, ckpt_dir))
                                       if ckpt_dir is not None else None)
    return results


def checked_stride(stride: int | None, block_size: int) -> int:
    """The sliding-window stride: at most block_size, block_size // 2 when none is given."""
    if stride is not None and stride > block_size:
        raise ValueError(f"--stride must be <= block_size = {block_size}, got {stride}")
    return default_stride(block_size) if stride is None else stride


def first_tokens(documents: list[Document], max_tokens: int, tokenizer: Tokenizer,
                 fit_temperature: bool) -> list[Document]:
    """--max_tokens: the documents cut to their first max_tokens tokens, still two or more when
    a temperature is to be fitted (one half to fit on, the other to report on)."""
    documents = truncate(documents, max_tokens, tokenizer)
    if fit_temperature and len(documents) < 2:
        raise ValueError(f"fitting a temperature needs at least 2 documents, and the first "
                         f"--max_tokens {max_tokens} tokens are all in the first one: "
                         "raise --max_tokens")
    return documents


def token_files(files: contextlib.ExitStack, tokenizer: Tokenizer, documents: list[Document],
                tokens_file: str | None, html_file: str | None, title: str) -> list[Sink]:
    """The sinks of --tokens and --html, each writing a file that `files` commits on success."""
    sinks: list[Sink] = []
    if tokens_file:
        sinks.append(TokenRecords(files.enter_context(open_atomic(tokens_file)), tokenizer))
    if html_file:
        sinks.append(TokenHtml(files.enter_context(open_atomic(html_file)), tokenizer, documents,
                               title))
    return sinks


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
