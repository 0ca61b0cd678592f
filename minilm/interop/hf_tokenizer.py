"""minilm tokenizers <-> Hugging Face tokenizer files, both directions.

Out: a tiktoken BPE becomes GPT-2's `vocab.json` + `merges.txt` (rebuilt from tiktoken's own ranks:
each token's bytes spelt with GPT-2's byte-to-unicode alphabet, each merge recovered by running
BPE on the token with only lower ranks allowed) and a `tokenizer.json` (HF `tokenizers`) that splits
text with tiktoken's own regex and merges as tiktoken does. A char tokenizer becomes a
`tokenizer.json` with a WordLevel model over single characters. Every export is checked by encoding
a probe text both ways before it is written.

In: a folder whose `tokenizer.json` / `vocab.json` holds GPT-2's vocabulary gets tiktoken's `gpt2`;
a `tokenizer.json` in minilm's char layout gets the char tokenizer back; a folder without tokenizer
files and GPT-2's vocabulary size is taken to use GPT-2's BPE.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from minilm.errors import TokenizerExportError
from minilm.tokenizer import EOT_TEXT, CharTokenizer, TiktokenTokenizer, Tokenizer

GPT2_VOCAB_SIZE = 50257
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # what import reads, in order of preference
PROBE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
         "  def f(x):\n\treturn x  ** 2   # spaces   and\ttabs\r\n\n\n"
         "naïve café, Straße, 東京タワー, 🤖🏳️‍🌈 ok? I'll, you've, it's 'S 1234567 $3.50 "
         "\u00a0\u3000 end  ")


# ---------------------------------------------------------------- tiktoken <-> GPT-2 BPE files


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (vocab.json spells tokens with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _spell(token: bytes) -> str:
    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in token)


def tiktoken_vocab(enc) -> dict[str, int]:
    """vocab.json of a tiktoken encoding: token spelt in GPT-2's alphabet -> id, specials included."""
    vocab = {_spell(token): rank for token, rank in enc._mergeable_ranks.items()}
    vocab.update(enc._special_tokens)
    return vocab


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge rule on one token, using only merges ranked below max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None  # (index, rank) of the lowest-ranked adjacent pair
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def tiktoken_merges(enc) -> list[tuple[str, str]]:
    """merges.txt of a tiktoken encoding, in rank order: the pair each multi-byte token is made of."""
    ranks = enc._mergeable_ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe(ranks, token, rank)
            if len(parts) != 2:
                raise TokenizerExportError(f"tiktoken token {token!r} (id {rank}) is not one merge of "
                                           "two lower-ranked tokens")
            merges.append((_spell(parts[0]), _spell(parts[1])))
    return merges


def _tiktoken_tokenizer(tok: TiktokenTokenizer, vocab: dict[str, int],
                        merges: list[tuple[str, str]]):
    """HF `tokenizers` pipeline equal to tiktoken: its regex split, byte-level alphabet, BPE that
    takes a whole pre-token when it is in the vocabulary (ignore_merges, as tiktoken does)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    enc = tok.enc
    bpe_vocab = {k: v for k, v in vocab.items() if k not in enc._special_tokens}
    hf = Tokenizer(models.BPE(bpe_vocab, merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False)
                           for name, _ in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])])
    return hf


# ---------------------------------------------------------------- char tokenizer <-> tokenizer.json


def char_vocab(chars: str) -> dict[str, int]:
    """The id of every character, then <|endoftext|>: CharTokenizer's numbering."""
    return {**{c: i for i, c in enumerate(chars)}, EOT_TEXT: len(chars)}


def _char_tokenizer(tok: CharTokenizer):
    """WordLevel over single characters: a Split on every character, no unknown token (an unknown
    character is an error, as in CharTokenizer), decoding by plain concatenation."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel(char_vocab(tok.chars), unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    return hf


# ---------------------------------------------------------------- export


def write_tokenizer_files(tok: Tokenizer, folder: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (+ vocab.json and merges.txt for a BPE) in folder, so
    that transformers' AutoTokenizer encodes and decodes as `tok`. TokenizerExportError (nothing
    written) when that cannot be made exact."""
    try:
        if isinstance(tok, CharTokenizer):
            hf, extra = _char_tokenizer(tok), {}
            probe = tok.chars
        elif isinstance(tok, TiktokenTokenizer):
            vocab, merges = tiktoken_vocab(tok.enc), tiktoken_merges(tok.enc)
            hf = _tiktoken_tokenizer(tok, vocab, merges)
            extra = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
                     "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)}
            probe = PROBE
        else:
            raise TokenizerExportError(f"tokenizer {tok.to_dict()} has no Hugging Face equivalent")
    except TokenizerExportError:
        raise
    except Exception as e:  # e.g. a split regex the tokenizers library cannot compile
        raise TokenizerExportError(f"tokenizer {_describe(tok)} cannot be built with the tokenizers "
                                   f"library ({type(e).__name__}: {str(e)[:100]})") from None
    ids = tok.encode(probe)
    decoded = hf.decode(ids + [tok.eot_token], skip_special_tokens=False)
    if hf.encode(probe, add_special_tokens=False).ids != ids or \
            decoded != tok.decode(ids + [tok.eot_token]):
        raise TokenizerExportError(f"tokenizer {_describe(tok)} cannot be reproduced exactly by a "
                                   "Hugging Face tokenizer.json (a probe text encodes differently)")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "clean_up_tokenization_spaces": False,
              "add_prefix_space": False}
    if isinstance(tok, TiktokenTokenizer):
        config["unk_token"] = EOT_TEXT  # as GPT-2's own tokenizer_config.json
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    for name, text in extra.items():
        (folder / name).write_text(text, encoding="utf-8")


def _describe(tok: Tokenizer) -> str:
    if isinstance(tok, CharTokenizer):
        return "char"
    return repr(getattr(tok, "name", type(tok).__name__))


# ---------------------------------------------------------------- import


def _folder_vocab(folder: Path) -> tuple[str, dict[str, int], str] | None:
    """(model type, token -> id with added tokens, file name) from the first of TOKENIZER_FILES in
    the folder (the one a hub download fetched); None when it has none."""
    path = next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "vocab.json":  # GPT-2's BPE vocabulary alone: token -> id
            return "BPE", data, path.name
        model = data.get("model") or {}
        vocab = dict(model.get("vocab") or {})
        if isinstance(model.get("vocab"), list):  # Unigram: [[piece, score], ...]
            vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
        return model.get("type", "?"), vocab, path.name
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__})") from None


def _chars_of(vocab: dict[str, int]) -> str | None:
    """The characters of a vocabulary in minilm's char layout (single characters 0..n-1, then
    <|endoftext|>), else None."""
    chars = sorted((k for k in vocab if k != EOT_TEXT), key=vocab.get)
    if any(len(c) != 1 for c in chars):
        return None
    text = "".join(chars)
    return text if vocab == char_vocab(text) else None


def tokenizer_from_folder(folder: Path, vocab_size: int) -> Tokenizer:
    """The minilm tokenizer for a Hugging Face model folder whose model has vocab_size logits;
    ValueError (one line) when minilm has none that encodes exactly as the folder's."""
    found = _folder_vocab(folder)
    if found is None:
        if vocab_size != GPT2_VOCAB_SIZE:
            raise ValueError(f"{folder} has no tokenizer files (tokenizer.json or vocab.json) and "
                             f"its vocab_size {vocab_size} is not GPT-2's {GPT2_VOCAB_SIZE}: minilm "
                             "cannot tell which tokenizer the model uses")
        return TiktokenTokenizer("gpt2")
    kind, vocab, name = found
    chars = _chars_of(vocab) if kind == "WordLevel" else None
    gpt2 = TiktokenTokenizer("gpt2") if kind == "BPE" else None
    if chars is not None:
        tok: Tokenizer = CharTokenizer(chars)
    elif gpt2 is not None and vocab == tiktoken_vocab(gpt2.enc):
        tok = gpt2
    else:
        raise ValueError(f"{folder / name} is a {kind} tokenizer of {len(vocab)} tokens that is "
                         "neither GPT-2's BPE nor a minilm char tokenizer: minilm has no tokenizer "
                         "that encodes as it does")
    if tok.vocab_size != vocab_size:
        raise ValueError(f"{folder}: the model has vocab_size {vocab_size} but its tokenizer "
                         f"({_describe(tok)}) has {tok.vocab_size} tokens")
    return tok
