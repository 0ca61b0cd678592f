"""minilm: a from-scratch mini GPT for experimenting with logits, softmax, temperature and sampling."""

__version__ = "0.1.0"
