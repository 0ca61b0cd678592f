import pytest

from minilm.tokenizer import EOT_TEXT, CharTokenizer, TiktokenTokenizer, tokenizer_from_dict


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
