import pytest

from minilm.tokenizer import (
    EOT_TEXT,
    CharTokenizer,
    TextStream,
    TiktokenTokenizer,
    tokenizer_from_dict,
)


def test_char_round_trip_and_eot():
    tok = CharTokenizer.from_texts(["hello world", "HELLO!"])
    text = "hello HELLO world!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set("hello worldHELLO!")) + 1
    assert tok.eot_token == tok.vocab_size - 1
    assert tok.decode([tok.eot_token]) == EOT_TEXT
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode(text) == tok.encode(text)


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_texts(["abc"])
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")


def test_gpt2_round_trip():
    tok = TiktokenTokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert tok.decode(tok.encode(text)) == text
    assert tokenizer_from_dict(tok.to_dict()).encode(text) == tok.encode(text)


def test_unknown_tiktoken_name():
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        TiktokenTokenizer("nope")


def test_text_stream_holds_back_what_may_start_a_stop_string():
    tok = CharTokenizer("abcdefghijrt ")
    stream = TextStream(tok.decode, stop=["ccd", "jj"])
    text = "ab ccb ccd after"
    ids = tok.encode(text)
    pieces = [stream.update(ids[:i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == "ab ccb " and stream.stopped
    assert pieces[3] == "" and pieces[4] == ""  # "c", "cc": perhaps the start of "ccd"
    assert pieces[5] == "ccb"  # not a stop after all: handed out at once
    rest = TextStream(tok.decode, stop=["jj"])
    assert rest.update(tok.encode("abj")) == "ab" and rest.update(tok.encode("abj"), True) == "j"


def test_text_stream_pieces_add_up_to_the_decode_and_decode_only_the_new_tokens():
    """Byte-level BPE splits a character across tokens: the pieces still add up to one decode of
    the whole list, and each update decodes only the tokens since the last whole character."""
    from hf_models import gpt2_bpe

    tok = gpt2_bpe()
    text = "naïve café — 日本語の文章 🎉🎉 and plain ASCII words " * 20
    ids = tok.encode(text)
    decoded_lengths = []

    def decode(tokens):
        decoded_lengths.append(len(tokens))
        return tok.decode(tokens)

    stream = TextStream(decode)
    pieces = [stream.update(ids[:i + 1], final=i == len(ids) - 1) for i in range(len(ids))]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert max(decoded_lengths) <= 4  # a character spans at most 4 byte-tokens
