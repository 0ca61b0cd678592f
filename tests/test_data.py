"""Data preparation from every kind of source, caching, atomic writes and batches."""

import json

import numpy as np
import pytest
import torch

from minilm.data import (DataError, _atomic_write_bytes, get_batch, load_documents,
                         markdown_play_to_text, prepare, shakespeare_plays, token_dtype)

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

    def write(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic_write_bytes(target, write)
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
