"""What minilm-eval scores: documents from text files, or a split of the data cache a checkpoint
was trained on, each as its text and tokens."""

from __future__ import annotations

import json

import numpy as np

from minilm.evaluation.corpus import Document
from minilm.tokenizer import Tokenizer, read_text
from minilm.train.data import PreparedData


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
