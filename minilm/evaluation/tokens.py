"""Per-token views of an evaluation, written as the scorer streams its chunks (document order):

    --tokens FILE.jsonl   one JSON object per scored token: its text, log-probability, rank,
                          entropy and the top-5 alternatives
    --html FILE.html      the text, each token coloured by its probability (GLTR's idea:
                          Gehrmann et al. 2019), the alternatives on hover; one self-contained
                          file (inline CSS and script, a Content-Security-Policy that forbids
                          every network request)

Both are sinks of minilm.evaluation.corpus.evaluate(sinks=[...]): each chunk's rows are (document
index, position, target) with their statistics at T = 1; position p is token p - 1 of the
document.
"""

from __future__ import annotations

import functools
import html
import json
import math
from typing import Any, Sequence, TextIO

from minilm.evaluation.corpus import Document, Sink
from minilm.evaluation.scoring import ScoredChunk, TokenStats
from minilm.tokenizer import Tokenizer

TOP_N = 5  # alternatives per token in the per-token outputs


def _rows(chunk: ScoredChunk, stats: TokenStats):
    """The chunk as per-token tuples of Python values."""
    return zip(chunk.seq.tolist(), chunk.positions.tolist(), chunk.targets.tolist(),
               stats.logprobs.tolist(), stats.ranks.tolist(), stats.entropy.tolist(),
               stats.top_ids.tolist(), stats.top_logprobs.tolist())


class TokenRecords(Sink):
    """--tokens: {"doc", "index", "token", "text", "logprob", "rank", "entropy",
    "top": [{"token", "text", "logprob"}, ...]} per line; index counts the document's tokens
    from 0, text is the token decoded alone."""
    top_n = TOP_N

    def __init__(self, out: TextIO, tokenizer: Tokenizer):
        self.out = out
        self.text = functools.lru_cache(maxsize=None)(lambda t: tokenizer.decode([t]))

    def add(self, chunk: ScoredChunk, stats: TokenStats) -> None:
        for doc, pos, tok, lp, rank, ent, top_ids, top_lps in _rows(chunk, stats):
            self.out.write(json.dumps(dict(
                doc=doc, index=pos - 1, token=tok, text=self.text(tok), logprob=lp, rank=rank,
                entropy=ent, top=[dict(token=i, text=self.text(i), logprob=v)
                                  for i, v in zip(top_ids, top_lps)])) + "\n")


def token_pieces(tokenizer: Tokenizer, tokens: Sequence[int]) -> list[str]:
    """The text of each token, such that "".join(pieces) == tokenizer.decode(tokens): a character
    that a byte-level BPE splits over several tokens (each alone decodes to U+FFFD) is given
    whole to the first of them, the others get ""."""
    pieces: list[str] = []
    i = 0
    while i < len(tokens):
        for k in range(1, 5):  # a UTF-8 character is at most 4 bytes, so at most 4 tokens
            text = tokenizer.decode(tokens[i:i + k])
            if "\ufffd" not in text or i + k >= len(tokens):
                break
        else:  # no whole character within 4 tokens: the text itself holds U+FFFD
            k, text = 1, tokenizer.decode(tokens[i:i + 1])
        pieces += [text] + [""] * (k - 1)
        i += k
    return pieces


# (lowest probability, css class, colour, legend): GLTR's green / yellow / red / purple
LEVELS = [(0.5, "p0", "#b7ebb0", "p ≥ 50%"), (0.1, "p1", "#fbf0a0", "10–50%"),
          (0.01, "p2", "#f8bba6", "1–10%"), (0.0, "p3", "#dcc0f7", "< 1%")]

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em;
       display: flex; flex-direction: column; }
#summary { order: -1; } /* written last (it needs the results), shown first */
pre { white-space: pre-wrap; word-wrap: break-word; font: 14px/1.6 ui-monospace, monospace; }
pre span { border-radius: 2px; }
%s
#tip { position: absolute; background: #fff; border: 1px solid #999; padding: 6px 8px;
       box-shadow: 0 2px 8px rgba(0,0,0,.25); font: 13px ui-monospace, monospace; z-index: 1; }
#tip table { border-collapse: collapse; } #tip td { padding: 1px 6px; }
#tip tr.actual { font-weight: bold; background: #eef; }
.bar { display: inline-block; height: 9px; background: #69c; }
.legend span { padding: 1px 8px; margin-right: 4px; }
""" % "\n".join(f".{cls} {{ background: {colour}; }}" for _, cls, colour, _ in LEVELS)

SCRIPT = """
const tip = document.getElementById("tip");
const pct = (lp) => (100 * Math.exp(lp)).toFixed(2) + "%";
document.addEventListener("mouseover", (event) => {
  const span = event.target.closest ? event.target.closest("span[data-s]") : null;
  if (!span) { tip.hidden = true; return; }
  const [id, lp, rank, entropy, top] = JSON.parse(span.dataset.s);
  const head = document.createElement("div");
  head.textContent = `${JSON.stringify(span.textContent)}  p ${pct(lp)}  rank ${rank}  ` +
                     `entropy ${entropy.toFixed(2)} nats`;
  const table = document.createElement("table");
  for (const [altId, text, altLp] of top) {
    const row = table.insertRow();
    if (altId === id) row.className = "actual";
    row.insertCell().textContent = JSON.stringify(text);
    row.insertCell().textContent = pct(altLp);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(80 * Math.exp(altLp)) + "px";
    row.insertCell().append(bar);
  }
  tip.replaceChildren(head, table);
  const box = span.getBoundingClientRect();
  tip.style.left = `${box.left + window.scrollX}px`;
  tip.style.top = `${box.bottom + window.scrollY + 4}px`;
  tip.hidden = false;
});
"""


def level(logprob: float) -> str:
    p = math.exp(logprob)
    return next(cls for low, cls, _, _ in LEVELS if p >= low)


class TokenHtml(Sink):
    """--html: written as the chunks arrive, one <section> per document; finish(results) adds
    the summary (of the figures before it), the legend and the hover script."""
    top_n = TOP_N

    def __init__(self, out: TextIO, tokenizer: Tokenizer, documents: Sequence[Document],
                 title: str):
        self.out, self.tokenizer, self.documents, self.title = out, tokenizer, documents, title
        self.text = functools.lru_cache(maxsize=None)(lambda t: tokenizer.decode([t]))
        self.doc, self.pieces = -1, []
        out.write(f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
                  "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
                  "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n"
                  f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n")

    def _start(self, doc: int) -> None:
        if self.doc >= 0:
            self.out.write("</pre></section>\n")
        self.doc = doc
        self.pieces = token_pieces(self.tokenizer, self.documents[doc].tokens)
        self.out.write(f"<section><h2>{html.escape(self.documents[doc].name)}</h2><pre>")

    def add(self, chunk: ScoredChunk, stats: TokenStats) -> None:
        for doc, pos, tok, lp, rank, ent, top_ids, top_lps in _rows(chunk, stats):
            if doc != self.doc:
                self._start(doc)
            data = [tok, round(lp, 5), rank, round(ent, 4),
                    [[i, self.text(i), round(v, 5)] for i, v in zip(top_ids, top_lps)]]
            self.out.write(f'<span class="{level(lp)}" data-s="{html.escape(json.dumps(data))}">'
                           f"{html.escape(self.pieces[pos - 1])}</span>")

    def finish(self, results: dict[str, Any]) -> None:
        if self.doc >= 0:
            self.out.write("</pre></section>\n")
        legend = "".join(f'<span class="{cls}">{html.escape(label)}</span>'
                         for _, cls, _, label in LEVELS)
        figures = (f"{results['tokens']:,} tokens, {results['bytes']:,} bytes: "
                   f"NLL {results['nll']:.4f} nats/token, perplexity {results['ppl']:.3f}, "
                   f"{results['bits_per_byte']:.4f} bits per byte, top-1 accuracy "
                   f"{results['top1_acc']:.3f}, ECE {results['ece']:.4f}")
        n = len(self.documents)
        self.out.write(f'<div id="summary"><h1>{html.escape(self.title)}</h1>'
                       f"<p>{n} document{'s' if n != 1 else ''}, {html.escape(figures)}</p>"
                       f"<p class=\"legend\">probability of each "
                       f"token given the text before it: {legend} (hover a token for the "
                       f"model's top alternatives)</p></div>\n"
                       f'<div id="tip" hidden></div>\n<script>{SCRIPT}</script>\n</body></html>\n')
