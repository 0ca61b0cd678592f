"""Data preparation from every kind of source, caching, atomic writes and batches."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minilm.errors import DataError
from minilm.files import atomic_path
from minilm.hub import looks_like_hub_id
from minilm.train.data import (
    FILE_SUFFIXES,
    get_batch,
    load_documents,
    markdown_play_to_text,
    prepare,
    shakespeare_plays,
    token_dtype,
)

DOCS = [f"Document number {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 3)
        for i in range(10)]


def _check_prepared(data, docs, tokenizer="char"):
    tok = data.tokenizer
    train, val = data.tokens("train"), data.tokens("val")
    assert len(train) == data.meta["tokens"]["train"] and len(val) == data.meta["tokens"]["val"]
    # every document appears whole, ended by <|endoftext|>, in exactly one split
    texts = (tok.decode(train.tolist()) + tok.decode(val.tolist())).split("<|endoftext|>")
    assert sorted(t for t in texts if t) == sorted(docs)
    assert data.meta["documents"]["val"] == 1 and data.meta["documents"]["train"] == len(docs) - 1


def test_local_txt_folder_one_document_per_file(tmp_path):
    src = tmp_path / "txt"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"{i}.txt").write_text(d)
    data = prepare(str(src), "char", cache_dir=tmp_path / "cache", log=lambda *_: None)
    _check_prepared(data, DOCS)
    assert data.meta["dtype"] == "uint16"


def test_local_jsonl_with_text_field_and_gpt2(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS)))
    data = prepare(str(path), "gpt2", text_field="body", cache_dir=tmp_path / "c",
                   log=lambda *_: None)
    _check_prepared(data, DOCS)
    assert data.vocab_size == 50257


def test_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS}), path)
    _check_prepared(prepare(str(path), "char", cache_dir=tmp_path / "c", log=lambda *_: None), DOCS)


def test_single_document_splits_by_position(corpus_file, tmp_path):
    data = prepare(str(corpus_file), "char", val_fraction=0.25, cache_dir=tmp_path / "c",
                   log=lambda *_: None)
    n = data.meta["tokens"]
    assert abs(n["val"] / (n["train"] + n["val"]) - 0.25) < 0.01


def test_second_prepare_reuses_the_cache(corpus_file, tmp_path):
    logs = []
    first = prepare(str(corpus_file), "char", cache_dir=tmp_path / "c", log=logs.append)
    mtime = (first.dir / "train.bin").stat().st_mtime_ns
    second = prepare(str(corpus_file), "char", cache_dir=tmp_path / "c", log=logs.append)
    assert second.dir == first.dir and len(logs) == 1
    assert (second.dir / "train.bin").stat().st_mtime_ns == mtime
    other = prepare(str(corpus_file), "char", val_fraction=0.2, cache_dir=tmp_path / "c",
                    log=logs.append)
    assert other.dir != first.dir and len(logs) == 2


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "train.bin"

    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_embedded_shakespeare_corpus():
    plays = shakespeare_plays()
    assert len(plays) >= 36
    text = "\n".join(plays)
    assert "ROMEO:\n" in text and "HAMLET:\n" in text
    assert "To be, or not to be" in text
    for markup in ("**", "_Enter", "\\[", "# "):
        assert markup not in text


def test_markdown_conversion_layout():
    md = ("# A Play\n\n## ACT I\n\n_Enter ROMEO_\n\n**ROMEO**  \nBut, soft! what light  \n"
          "_\\[Aside]_  \nthrough yonder window breaks?\n\n_Exit_\n")
    assert markdown_play_to_text(md) == "ROMEO:\nBut, soft! what light\nthrough yonder window breaks?\n"


def test_empty_and_missing_sources_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_documents(str(empty))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        load_documents(str(tmp_path / "folder"))
    with pytest.raises(DataError, match="'no/such-dataset-xyz'"):
        load_documents("no/such-dataset-xyz")


def test_missing_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match="no column 'text'.*body"):
        load_documents(str(path))


def test_token_dtype():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(100277) == np.uint32


def test_batches_are_shifted_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)
    with pytest.raises(DataError, match="block_size"):
        get_batch(tokens[:10], 2, 16, torch.Generator())


# ---------------------------------------------------------------- hardening (issue 8)


@pytest.mark.parametrize("rows, kind", [
    ([{"text": i} for i in range(5)], "int64"),
    ([{"text": ["a", "b"]} for _ in range(5)], "List"),
    ([{"text": "abc"}, {"text": 5}], "Json"),
])
def test_a_text_column_that_is_not_text(tmp_path, rows, kind):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"d.jsonl: column 'text' holds {kind}\S* values, not "
                                        "text; set data.text_field to a column of strings"):
        load_documents(str(path))


def test_parquet_ints_are_not_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(DataError, match="column 'text' holds int64 values, not text"):
        load_documents(str(path))


@pytest.mark.parametrize("name, content", [
    ("latin1.txt", "héllo wörld\n".encode("latin-1") * 50),
    ("latin1.jsonl", b'{"text": "fine"}\n{"text": "h\xe9llo"}\n'),
])
def test_a_data_file_that_is_not_utf8(tmp_path, name, content):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / f"a{Path(name).suffix}").write_bytes(
        b'{"text": "fine"}\n' if name.endswith("jsonl") else b"fine\n")
    (folder / name).write_bytes(content)
    offset = content.index(b"\xe9")
    with pytest.raises(DataError, match=rf"data file \S+/{name} is not UTF-8 text \(byte 0xe9 at "
                                        rf"offset {offset}: invalid continuation byte\)"):
        load_documents(str(folder))


def test_no_val_split_and_short_splits_named(corpus_file, tmp_path):
    data = prepare(str(corpus_file), "char", val_fraction=0.0, cache_dir=tmp_path / "c",
                   log=lambda *_: None)
    assert len(data.tokens("val")) == 0 and data.meta["tokens"]["val"] == 0
    assert len(data.tokens("train")) == data.meta["tokens"]["train"]
    data.check_windows(("train",), 64)
    with pytest.raises(DataError, match=r"the val split of \S+ has 0 tokens, fewer than "
                                        r"model.block_size \+ 1 = 65"):
        data.check_windows(("train", "val"), 64)
    n = data.meta["tokens"]["train"]
    with pytest.raises(DataError, match=rf"the train split of \S+ has {n} tokens, fewer than "
                                        rf"model.block_size \+ 1 = {n + 1}: lower "
                                        "model.block_size, or add data"):
        data.check_windows(("train",), n)


@pytest.mark.parametrize("source", ["data/corpus.txt", "./corpus", "../corpus", "~/nope/x",
                                    "corpus.jsonl", "a/b/c", "/abs/path"])
def test_a_missing_local_path_is_no_such_file(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="^no such file or folder: "):
        load_documents(source)


@pytest.mark.parametrize("source, local", [
    ("HuggingFaceFW/fineweb-edu", False), ("wikitext", False), ("roneneldan/TinyStories", False),
    ("mlfoundations/dclm-baseline-1.0", False), ("corpus.txt", True), ("data/x.parquet", True),
    ("./wikitext", True), ("~/x", True), ("a/b/c", True), ("/data", True),
])
def test_what_looks_local(source, local):
    assert looks_like_hub_id(source, FILE_SUFFIXES) == (not local)


@pytest.mark.slow  # a subprocess, online mode
def test_hub_failure_is_one_line_and_fast(tmp_path):
    """Online mode (no HF_*_OFFLINE) with the hub out of reach, or answering that there is no
    such dataset: one line at once, not minutes of retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")  # unreachable, whatever the network
    code = ("import sys; from minilm.cli.common import run_cli; from minilm.train.data import load_documents; "
            "sys.exit(run_cli(lambda argv: load_documents('someone/no-such-dataset-minilm')))")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "'someone/no-such-dataset-minilm'" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 60  # datasets' own retries take 25 s and more
