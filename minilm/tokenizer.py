"""Tokenizers behind one interface: characters (vocabulary from the corpus) or any tiktoken BPE.

Both end documents with an end-of-text token and describe themselves as a small dict, stored in
the data's meta.json and in every checkpoint, so a model always comes with its tokenizer.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

EOT_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eot_token: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One id per character seen in the corpus (sorted), plus <|endoftext|> as the last id."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_token = len(chars)
        self.vocab_size = len(chars) + 1

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char tokenizer's "
                             f"vocabulary of {len(self.chars)} characters") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] if i < self.eot_token else EOT_TEXT for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}


class TiktokenTokenizer:
    """A tiktoken encoding by name ("gpt2", "r50k_base", "cl100k_base", ...)."""

    def __init__(self, name: str = "gpt2"):
        import tiktoken

        if name not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tokenizer {name!r} (use 'char' or a tiktoken encoding: "
                             f"{', '.join(tiktoken.list_encoding_names())})")
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # not cached, and the download failed (offline)
            cache = os.environ.get("TIKTOKEN_CACHE_DIR")
            where = f"TIKTOKEN_CACHE_DIR={cache} does not hold it" if cache else \
                "TIKTOKEN_CACHE_DIR is not set"
            raise ValueError(f"tiktoken encoding {name!r} is not available: it is not in the local "
                             f"cache ({where}) and downloading it failed ({type(e).__name__}); "
                             "connect to the internet once, or point TIKTOKEN_CACHE_DIR at a "
                             "cache that holds it") from None
        self.name = name
        self.eot_token = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "tiktoken", "name": self.name}


class TextStream:
    """The text of a growing token list, handed out piece by piece as tokens arrive (streaming).

    Each update decodes the tokens since the last clean boundary (a prefix whose text ends in a
    whole character: decoding is additive there) and returns what is new since the last update, so
    a long stream costs O(n), not a decode of the whole list per token. Until the final update it
    holds back a trailing U+FFFD (with byte-level BPE a character can span tokens, and
    its first bytes alone decode to the replacement character) and a tail that could be the start
    of a `stop` string. The text ends before the first stop string; `stopped` then says so. So the
    pieces always add up to the text a non-streamed call returns.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.longest = max(map(len, self.stop), default=0)
        self.emitted = 0  # characters handed out so far
        self.stopped = False
        self.settled_tokens = 0  # decode(tokens[:settled_tokens]) == settled_text, a whole text
        self.settled_text = ""

    def update(self, tokens: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        tail = self.decode(tokens[self.settled_tokens:])
        text = self.settled_text + tail
        if not tail.endswith("\ufffd"):  # no character cut in two: the next decode starts here
            self.settled_tokens, self.settled_text = len(tokens), text
        start = max(0, self.emitted - self.longest)  # earlier text held no stop string
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            text, final, self.stopped = text[:min(found)], True, True
        if not final:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self._stop_start(text)]
        new = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return new

    def _stop_start(self, text: str) -> int:
        """The length of the longest tail of `text` that a stop string starts with."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its to_dict() description (meta.json, checkpoints)."""
    if d.get("type") == "char":
        return CharTokenizer(d["chars"])
    if d.get("type") == "tiktoken":
        return TiktokenTokenizer(d["name"])
    raise ValueError(f"unknown tokenizer description {d!r}")


def utf8_problem(path: str | Path, chunk: int = 1 << 20) -> str | None:
    """Where `path` stops being UTF-8 ("byte 0xe9 at offset 12: invalid continuation byte"),
    or None when it is UTF-8 throughout. Reads in chunks: files may be large."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = offset - (len(e.object) - len(data)) + e.start  # e.object: held + data
                return f"byte 0x{e.object[e.start]:02x} at offset {at}: {e.reason}"
            if not data:
                return None
            offset += len(data)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's text; a file in another encoding is a ValueError naming the file and the
    first byte that is not UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text ({utf8_problem(path)})") from None
