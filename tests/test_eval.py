"""minilm-eval against references computed here: float64 logits of hand-made windows, a direct
ECE loop and torchmetrics, a grid search for T*, manual sums for scoring completions."""

import json
import math
import os
import string
import subprocess
import sys

import pytest
import torch

from minilm.checkpoint import save_checkpoint
from minilm.cli.common import run_cli
from minilm.cli.eval import main
from minilm.evaluation.calibration import ReliabilityBins, fit_temperature
from minilm.evaluation.corpus import Document, Sink, evaluate
from minilm.evaluation.scoring import encode_pair, score
from minilm.model.gpt import GPT, GPTConfig
from minilm.tokenizer import CharTokenizer, TiktokenTokenizer
from minilm.train.config import load_config
from minilm.train.trainer import train

from browser import chromium
from conftest import CORPUS, ROOT, tiny_overrides

CHARS = CharTokenizer.from_texts([CORPUS + string.ascii_letters + string.digits + "é!&<>"])


# ---------------------------------------------------------------- references


def float64_copy(model):
    m = GPT(model.config).double()
    m.load_state_dict(model.state_dict())
    return m.eval()


def reference_rows(model, seq, stride):
    """float64 logits predicting seq[1:], each from a hand-made window: the first window holds
    inputs 0 .. block_size - 1, each later one ends stride tokens further and holds up to
    block_size inputs; a token is predicted by the first window that reaches it."""
    m, bs = float64_copy(model), model.config.block_size
    rows, done, end = {}, 0, min(bs, len(seq) - 1)
    with torch.no_grad():
        while done < len(seq) - 1:
            start = max(0, end - bs)
            logits = m(torch.tensor([seq[start:end]]))[0]  # inputs start .. end-1
            for k in range(len(logits)):
                if start + k + 1 > done:
                    rows[start + k + 1] = logits[k]
            done, end = end, min(end + stride, len(seq) - 1)
    return torch.stack([rows[i] for i in range(1, len(seq))])  # [len(seq) - 1, V]


def reference_logits(model, docs, eot, stride):
    """float64 logits [tokens, V] and targets [tokens] of every document after the EOT token."""
    logits, targets = [], []
    for d in docs:
        seq = [eot] + d.tokens
        logits.append(reference_rows(model, seq, stride))
        targets.append(torch.tensor(seq[1:]))
    return torch.cat(logits), torch.cat(targets)


def reference_figures(model, docs, eot, stride, temperature=1.0, logits=None):
    """Every figure minilm-eval reports, from float64 logits, with plain loops."""
    z, y = logits if logits is not None else reference_logits(model, docs, eot, stride)
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    nll = -logp.gather(1, y[:, None])[:, 0]
    p = logp.exp()
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    n_bytes = sum(len(d.text.encode()) for d in docs)
    n_words = sum(len(d.text.split()) for d in docs)
    ece, mce = direct_ece(conf, correct)
    return dict(z=z, y=y, tokens=len(y), bytes=n_bytes, words=n_words, nll=nll.mean().item(),
                ppl=math.exp(nll.mean().item()),
                bits_per_byte=nll.sum().item() / n_bytes / math.log(2),
                byte_perplexity=math.exp(nll.sum().item() / n_bytes),
                word_perplexity=math.exp(nll.sum().item() / n_words),
                top1_acc=correct.mean().item(),
                top5_acc=(logp.topk(5, dim=1).indices == y[:, None]).any(1).double().mean().item(),
                entropy=-(p * logp).sum(1).mean().item(), top1_prob=conf.mean().item(),
                ece=ece, mce=mce)


def direct_ece(conf, correct, n_bins=15):
    """The textbook loop: bins (k/15, (k+1)/15], weighted |accuracy - confidence|."""
    ece, mce, n = 0.0, 0.0, len(conf)
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if k else (conf <= hi)
        if inside.any():
            gap = abs(correct[inside].mean().item() - conf[inside].mean().item())
            ece += inside.sum().item() / n * gap
            mce = max(mce, gap)
    return ece, mce


FIGURES = ("tokens", "bytes", "words", "nll", "ppl", "bits_per_byte", "byte_perplexity",
           "word_perplexity", "top1_acc", "top5_acc", "entropy", "top1_prob", "ece", "mce")


def assert_figures(got, ref, keys=FIGURES, rel=2e-5):
    for k in keys:
        assert got[k] == pytest.approx(ref[k], rel=rel, abs=1e-6), k


# ---------------------------------------------------------------- fixtures


def random_model(tokenizer, block_size=16, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=16,
                         block_size=block_size, **kw)).eval()


def save_random(path, tokenizer, **kw):
    """A random-weight checkpoint with no run config (as an imported model): --text only."""
    model = random_model(tokenizer, **kw)
    save_checkpoint(path, model, None, {"tokenizer": tokenizer.to_dict(), "step": 0})
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny char run on a folder of 8 documents, trained in its own folder with relative paths
    (out_dir, cache_dir, source), so that evaluating from elsewhere must find the cache."""
    root = tmp_path_factory.mktemp("run")
    (root / "docs").mkdir()
    speeches = CORPUS.split("\n\n")
    for i in range(8):
        (root / "docs" / f"{i}.txt").write_text("\n\n".join(speeches[i:i + 3 + 2 * i]) + "\n")
    overrides = [a for a in tiny_overrides(root, root / "docs") if not a.startswith(
        ("--out_dir", "--data.cache_dir", "--data.source"))]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train(load_config(None, [*overrides, "--out_dir=out/tiny", "--data.cache_dir=cache",
                                 "--data.source=docs", "--data.val_fraction=0.5",
                                 "--wandb.mode=disabled"]))
    finally:
        os.chdir(cwd)
    return root / "out" / "tiny"


def run_json(capsys, *argv):
    assert run_cli(main, [*map(str, argv), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def val_documents(run_dir):
    from minilm.evaluation.documents import split_documents
    from minilm.interop.loading import load_model
    from minilm.train.data import find_data_cache

    model, tok, state = load_model(run_dir)
    return model, tok, split_documents(find_data_cache(state, run_dir / "best", ""), "val", tok)


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("repeat, stride", [(1, None), (6, None), (6, 5), (6, 16)])
def test_perplexity_and_bits_per_byte_match_float64_windows(tmp_path, capsys, repeat, stride):
    """A text shorter than block_size (one window: full-context scoring) and one ~6x longer."""
    model = save_random(tmp_path / "ckpt", CHARS)
    text = "All:\nSpeak, é!"  # 14 characters, 15 bytes, block_size 16
    (tmp_path / "t.txt").write_text(text * repeat)
    args = ["--ckpt", tmp_path / "ckpt", "--text", tmp_path / "t.txt"]
    got = run_json(capsys, *args, *(["--stride", stride] if stride else []))
    doc = Document("t", text * repeat, CHARS.encode(text * repeat))
    ref = reference_figures(model, [doc], CHARS.eot_token, stride or 8)
    assert_figures(got, ref)
    assert got["tokens"] == 14 * repeat and got["bytes"] == 15 * repeat  # each token once
    assert got["documents"] == 1 and got["stride"] == (stride or 8)
    if repeat == 1:  # one window sees everything: the same as one full forward pass
        full = torch.log_softmax(float64_copy(model)(torch.tensor([[CHARS.eot_token] + doc.tokens[
            :-1]]))[0].detach(), -1).gather(1, torch.tensor(doc.tokens)[:, None])
        assert got["nll"] == pytest.approx(-full.mean().item(), rel=1e-5)


def test_jsonl_documents_are_scored_each_on_its_own(tmp_path, capsys):
    model = save_random(tmp_path / "ckpt", CHARS)
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak."]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i})
                                                for i, t in enumerate(texts)) + "\n\n")
    got = run_json(capsys, "--ckpt", tmp_path / "ckpt", "--text", tmp_path / "d.jsonl",
                   "--batch_size", 3)
    docs = [Document(str(i), t, CHARS.encode(t)) for i, t in enumerate(texts)]
    assert_figures(got, reference_figures(model, docs, CHARS.eot_token, 8))
    assert got["documents"] == 2 and got["data"] == {"files": [str(tmp_path / "d.jsonl")]}


def test_bpe_model_figures_per_byte_and_word(tmp_path, capsys):
    gpt2 = TiktokenTokenizer("gpt2")
    model = save_random(tmp_path / "ckpt", gpt2, block_size=8)
    text = "Résumé: the naïve café — 🙂 costs 3.50€ per cup, they said.\n"
    (tmp_path / "t.txt").write_text(text)
    got = run_json(capsys, "--ckpt", tmp_path / "ckpt", "--text", tmp_path / "t.txt")
    ref = reference_figures(model, [Document("t", text, gpt2.encode(text))], gpt2.eot_token, 4)
    assert_figures(got, ref)
    assert got["bytes"] == len(text.encode()) and got["words"] == 12
    assert got["tokens"] < got["bytes"]  # BPE: fewer tokens than bytes, same bits per byte rule


class Recorder(Sink):
    """Every row it is given (document, position, target, log-prob), the width of the top
    alternatives it asked for, and the results as they stand when it finishes."""
    top_n = 3

    def __init__(self):
        self.rows, self.top_widths, self.results = [], set(), None

    def add(self, chunk, stats):
        self.rows += zip(chunk.seq.tolist(), chunk.positions.tolist(), chunk.targets.tolist(),
                         stats.logprobs.tolist())
        self.top_widths.add(stats.top_ids.shape[1])

    def finish(self, results):
        self.results = dict(results)


def test_one_pass_feeds_every_sink_each_token_once_in_document_order():
    """evaluate(sinks=[...]): a sink sees every scored token once, in document order, with its
    float64 log-probability, then the figures of every sink before it. Batches of 3 windows
    put the fit half's last window and the held-out half's first in one chunk: each half gets
    exactly its own tokens."""
    model, eot = random_model(CHARS), CHARS.eot_token
    texts = ["All:\nSpeak, speak.", "", "First Citizen:\nBefore we proceed any further.", "x"]
    docs = [Document(str(i), t, CHARS.encode(t)) for i, t in enumerate(texts)]
    recorder = Recorder()
    got = evaluate(model, docs, eot, stride=5, batch_size=3, fit_temperature=True,
                   sweep=[2.0], sinks=[recorder])
    assert [r[:3] for r in recorder.rows] == [(i, p, t) for i, d in enumerate(docs)
                                              for p, t in enumerate(d.tokens, 1)]
    z, y = reference_logits(model, [d for d in docs if d.tokens], eot, 5)
    ref = torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0]
    assert [r[3] for r in recorder.rows] == pytest.approx(ref.tolist(), abs=1e-5)
    assert recorder.top_widths == {3}
    assert recorder.results["nll"] == got["nll"] == pytest.approx(-ref.mean().item(), rel=1e-5)
    assert "temperature" in recorder.results and "sweep" in recorder.results
    fit, held = got["temperature"]["fit"], got["temperature"]["heldout"]
    n_fit = len(docs[0].tokens)
    assert (fit["documents"], fit["tokens"]) == (2, n_fit)
    assert (held["documents"], held["tokens"]) == (2, len(ref) - n_fit)
    assert fit["nll_at_1"] == pytest.approx(-ref[:n_fit].mean().item(), rel=1e-5)
    assert held["nll_at_1"] == pytest.approx(-ref[n_fit:].mean().item(), rel=1e-5)


# ---------------------------------------------------------------- calibration


def test_calibration_figures_match_torchmetrics_and_a_direct_loop(tmp_path, capsys):
    from torchmetrics.functional.classification import binary_calibration_error

    model = save_random(tmp_path / "ckpt", CHARS)
    (tmp_path / "t.txt").write_text(CORPUS[:600])
    got = run_json(capsys, "--ckpt", tmp_path / "ckpt", "--text", tmp_path / "t.txt")
    ref = reference_figures(model, [Document("t", CORPUS[:600], CHARS.encode(CORPUS[:600]))],
                            CHARS.eot_token, 8)
    p = torch.softmax(ref["z"], -1)
    conf, correct = p.max(1).values, (p.argmax(1) == ref["y"]).long()
    assert got["ece"] == pytest.approx(binary_calibration_error(conf, correct, 15, "l1").item(),
                                       rel=1e-5)
    assert got["mce"] == pytest.approx(binary_calibration_error(conf, correct, 15, "max").item(),
                                       rel=1e-5)
    assert_figures(got, ref, ("top1_acc", "top5_acc", "entropy", "top1_prob", "ece", "mce"))
    counts = [b["count"] for b in got["reliability"]]
    assert sum(counts) == got["tokens"] and len(counts) == 15


def test_bins_are_open_below_and_closed_above():
    bins = ReliabilityBins(15)
    edges = bins.edges
    conf = torch.stack([edges[1], edges[2], edges[15], (edges[3] + edges[4]) / 2, edges[1] / 2])
    bins.add(conf, torch.tensor([1, 0, 1, 1, 0]))
    assert bins.count.tolist() == [2, 1, 0, 1] + [0] * 10 + [1]  # k/15 falls in bin k - 1
    ece, mce = direct_ece(conf, torch.tensor([1.0, 0, 1, 1, 0]))
    assert bins.ece == pytest.approx(ece) and bins.mce == pytest.approx(mce)


def synthetic_logits(true_t, n=2000, v=40, seed=0):
    """Logits whose targets are drawn from softmax(z / true_t): scaling by true_t is right."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / true_t, -1), 1, generator=g)[:, 0]
    return z, y


def grid_argmin(z, y, lo=0.02, hi=5.0):
    """T minimising the float64 NLL on a grid of step 0.01 over [lo, hi], then of step 0.0002
    around the best point (NLL is unimodal in T)."""
    z = z.double()
    z_y = z.gather(1, y[:, None])[:, 0]

    def best(grid):
        nll = [(torch.logsumexp(z / t, 1) - z_y / t).mean().item() for t in grid]
        return grid[min(range(len(grid)), key=nll.__getitem__)]

    coarse = best([lo + 0.01 * k for k in range(int((hi - lo) / 0.01) + 1)])
    return best([coarse - 0.01 + 0.0002 * k for k in range(101)])


@pytest.mark.parametrize("true_t", [0.6, 1.0, 2.5])
def test_temperature_fit_agrees_with_a_fine_grid(true_t):
    z, y = synthetic_logits(true_t)
    chunks = lambda: zip(z.split(700), y.split(700))  # noqa: E731  a fresh pass each call
    fit = fit_temperature(chunks)
    assert fit.temperature == pytest.approx(grid_argmin(z, y), rel=0.01)
    assert fit.temperature == pytest.approx(true_t, rel=0.1)
    assert fit.nll <= fit.nll_at_1 + 1e-12 and not fit.at_bound and fit.passes < 20
    assert fit.tokens == len(y)


def test_temperature_fit_stays_positive_when_the_minimum_is_at_zero():
    z = torch.randn(500, 10, generator=torch.Generator().manual_seed(1))
    fit = fit_temperature(lambda: [(z, z.argmax(1))])  # always right: NLL falls as T -> 0
    assert fit.at_bound and fit.temperature == pytest.approx(0.01) and fit.passes <= 6
    model_free = fit_temperature(lambda: [(z * 0.01, z.argmin(1))])  # always wrong: T -> 100
    assert model_free.at_bound and model_free.temperature == pytest.approx(100)
    assert model_free.passes <= 6  # not the ~25 of bisecting down to the bound


def test_fit_temperature_on_the_val_split(run_dir, capsys, monkeypatch):
    """T* from the first half of the val documents agrees with a grid search on float64 logits;
    the second half's NLL and ECE at T = 1 and T* match the reference; calibration.json is
    written beside the weights; the fit never holds more logits rows than one chunk."""
    import minilm.evaluation.scoring as ev

    model, tok, docs = val_documents(run_dir)
    assert len(docs) == 4
    monkeypatch.setattr(ev, "LOGITS_BYTES", 4 * model.config.vocab_size * 8)  # 8-row chunks
    rows = []
    original = GPT.logits_from_hidden
    monkeypatch.setattr(GPT, "logits_from_hidden",
                        lambda self, h: rows.append(h.shape[0]) or original(self, h))
    got = run_json(capsys, "--ckpt", run_dir, "--fit_temperature")
    assert max(rows) <= 8
    t = got["temperature"]
    fit_ref = reference_figures(model, docs[:2], tok.eot_token, 8)
    assert t["T"] == pytest.approx(grid_argmin(fit_ref["z"], fit_ref["y"]), rel=0.01)
    assert t["fit"]["nll_at_1"] == pytest.approx(fit_ref["nll"], rel=1e-5)
    held = reference_logits(model, docs[2:], tok.eot_token, 8)
    held_1 = reference_figures(model, docs[2:], tok.eot_token, 8, logits=held)
    held_t = reference_figures(model, docs[2:], tok.eot_token, 8, t["T"], logits=held)
    h = t["heldout"]
    assert (h["documents"], h["tokens"]) == (2, held_1["tokens"])
    assert h["nll_at_1"] == pytest.approx(held_1["nll"], rel=1e-5)
    assert h["nll_at_T"] == pytest.approx(held_t["nll"], rel=1e-5)
    assert h["ece_at_1"] == pytest.approx(held_1["ece"], rel=1e-4)
    assert h["ece_at_T"] == pytest.approx(held_t["ece"], rel=1e-4)
    all_docs = (torch.cat([fit_ref["z"], held[0]]), torch.cat([fit_ref["y"], held[1]]))
    assert_figures(got, reference_figures(model, docs, tok.eot_token, 8, logits=all_docs))
    saved = json.loads((run_dir / "best" / "calibration.json").read_text())
    assert saved["temperature"] == t["T"] and saved["heldout"]["ece_at_T"] == h["ece_at_T"]
    assert got["calibration_file"] == str(run_dir / "best" / "calibration.json")
    assert not list((run_dir / "best").glob(".*tmp*"))


def test_sweep_and_report(run_dir, tmp_path, capsys):
    model, tok, docs = val_documents(run_dir)
    report = tmp_path / "report"
    got = run_json(capsys, "--ckpt", run_dir, "--sweep_temperature", "0.5,1,2",
                   "--fit_temperature", "--report", report)
    assert [s["temperature"] for s in got["sweep"]] == [0.5, 1.0, 2.0]
    logits = reference_logits(model, docs, tok.eot_token, 8)
    for row in got["sweep"]:
        ref = reference_figures(model, docs, tok.eot_token, 8, row["temperature"], logits)
        assert_figures(row, ref, ("nll", "ece", "mce", "entropy", "top1_prob"))
    entropies = [s["entropy"] for s in got["sweep"]]
    assert entropies == sorted(entropies)  # a higher temperature flattens the distribution
    assert json.loads((report / "results.json").read_text())["sweep"] == got["sweep"]
    md = (report / "report.md").read_text()
    assert "## Temperature scaling" in md and "## Temperature sweep" in md and "| ECE |" in md
    from matplotlib.image import imread

    before_after = imread(report / "reliability.png")
    assert before_after.shape[1] > 1.6 * before_after.shape[0]  # two panels: T = 1 and T*
    assert imread(report / "sweep.png").shape[1] > 1000


def test_default_data_is_the_runs_val_split(run_dir, capsys, tmp_path, monkeypatch):
    """Found from another folder through the checkpoint's relative out_dir and cache_dir."""
    monkeypatch.chdir(tmp_path)
    got = run_json(capsys, "--ckpt", run_dir / "last")
    meta = json.loads(next((run_dir.parent.parent / "cache").glob("*/meta.json")).read_text())
    assert got["data"]["split"] == "val" and got["documents"] == meta["documents"]["val"] == 4
    assert got["tokens"] == meta["tokens"]["val"] - 4  # every token but each document's EOT
    train_split = run_json(capsys, "--ckpt", run_dir / "last", "--split", "train",
                           "--max_tokens", 50)
    assert train_split["tokens"] == 50 and train_split["data"]["split"] == "train"


# ---------------------------------------------------------------- scoring completions


def test_score_matches_a_manual_sum():
    model = random_model(CHARS)
    context, choices = "First Citizen:\nBefore we", [" proceed", " speak", "x", " a"]
    got = score(model, CHARS, context, choices)
    m = float64_copy(model)
    sums = []
    for c, s in zip(choices, got):
        ctx, cont = CHARS.encode("First Citizen:\nBefore we"), CHARS.encode(c)
        seq = (ctx + cont)[-17:]  # block_size 16 + 1: as much context as fits
        logp = torch.log_softmax(m(torch.tensor([seq[:-1]]))[0].detach(), -1)
        rows = logp[-len(cont):]
        manual = rows.gather(1, torch.tensor(cont)[:, None])[:, 0]
        assert s.tokens == cont
        assert s.logprobs == pytest.approx(manual.tolist(), abs=1e-5)
        assert s.logprob == pytest.approx(manual.sum().item(), abs=1e-5)
        assert s.logprob_per_char == pytest.approx(manual.sum().item() / len(c), abs=1e-5)
        assert s.is_greedy == bool((rows.argmax(1) == torch.tensor(cont)).all())
        sums.append(manual.sum().item())
    probs = torch.softmax(torch.tensor(sums), 0).tolist()
    assert [s.prob for s in got] == pytest.approx(probs, abs=1e-5)
    greedy = CHARS.decode([int(m(torch.tensor([CHARS.encode(context)[-16:]]))[0, -1].argmax())])
    assert score(model, CHARS, context, [greedy])[0].is_greedy


def test_choice_tokenisation_as_lm_evaluation_harness():
    gpt2 = TiktokenTokenizer("gpt2")
    enc = gpt2.encode
    # a trailing space of the context moves to the continuation
    assert encode_pair(gpt2, "Paris is the capital of ", "France") == (
        enc("Paris is the capital of"), enc(" France"))
    assert encode_pair(gpt2, "Question:\n", "Yes") == (enc("Question:"), enc("\nYes"))
    # encoded together, split at the context's length: a merge across the boundary stays
    whole, ctx = enc("The cats"), enc("The cat")
    assert encode_pair(gpt2, "The cat", "s") == (ctx, whole[len(ctx):])
    # an empty (or all-space) context is the end-of-text token
    assert encode_pair(gpt2, "", "Hello") == ([gpt2.eot_token], enc("Hello"))
    assert encode_pair(gpt2, "  ", "Hello") == ([gpt2.eot_token], enc("  Hello"))
    assert encode_pair(CHARS, "ab ", "c") == (CHARS.encode("ab"), CHARS.encode(" c"))
    model = random_model(gpt2)
    empty = score(model, gpt2, "", ["Hello"])[0]
    ref = torch.log_softmax(float64_copy(model)(torch.tensor([[gpt2.eot_token]]))[0, -1]
                            .detach(), -1)[enc("Hello")[0]]
    assert empty.logprobs[0] == pytest.approx(ref.item(), abs=1e-5)


def test_choices_cli(tmp_path, capsys):
    save_random(tmp_path / "ckpt", CHARS)
    got = run_json(capsys, "--ckpt", tmp_path / "ckpt", "--context", "All:\nSpeak",
                   "--choices", ", speak.", "!", "x")
    assert got["context"] == "All:\nSpeak" and len(got["choices"]) == 3
    first = got["choices"][0]
    assert set(first) == {"continuation", "tokens", "token_texts", "logprobs", "logprob",
                          "is_greedy", "logprob_per_char", "prob"}
    assert "".join(first["token_texts"]) == ", speak."
    assert sum(c["prob"] for c in got["choices"]) == pytest.approx(1)
    assert run_cli(main, ["--ckpt", str(tmp_path / "ckpt"), "--choices", "a", "b"]) == 0
    assert "logprob" in capsys.readouterr().out


# ---------------------------------------------------------------- per-token outputs


def test_tokens_jsonl_and_html(tmp_path, capsys):
    gpt2 = TiktokenTokenizer("gpt2")
    model = save_random(tmp_path / "ckpt", gpt2, block_size=8)
    texts = ["Hello <world> & \"friends\" 🙂 café\n", "second document"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    got = run_json(capsys, "--ckpt", tmp_path / "ckpt", "--text", tmp_path / "d.jsonl",
                   "--tokens", tmp_path / "t.jsonl", "--html", tmp_path / "t.html")
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(records) == got["tokens"]
    docs = [Document(str(i), t, gpt2.encode(t)) for i, t in enumerate(texts)]
    z = torch.cat([reference_rows(model, [gpt2.eot_token] + d.tokens, 4) for d in docs])
    logp = torch.log_softmax(z, -1)
    for r, row, (doc, index) in zip(records, logp, [(i, k) for i, d in enumerate(docs)
                                                    for k in range(len(d.tokens))]):
        assert (r["doc"], r["index"]) == (doc, index) and r["token"] == docs[doc].tokens[index]
        assert r["text"] == gpt2.decode([r["token"]])
        assert r["logprob"] == pytest.approx(row[r["token"]].item(), abs=1e-5)
        assert r["rank"] == 1 + int((row > row[r["token"]]).sum())
        assert r["entropy"] == pytest.approx(-(row.exp() * row).sum().item(), abs=1e-5)
        assert [a["token"] for a in r["top"]] == row.topk(5).indices.tolist()

    from html.parser import HTMLParser

    class Spans(HTMLParser):
        def __init__(self):
            super().__init__()
            self.texts, self.data, self.inside, self.refs = [], [], False, []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.refs += [v for k, v in attrs.items() if k in ("src", "href")]
            if tag == "span" and "data-s" in attrs:
                self.inside = True
                self.texts.append("")
                self.data.append(json.loads(attrs["data-s"]))

        def handle_endtag(self, tag):
            self.inside = False

        def handle_data(self, data):
            if self.inside:
                self.texts[-1] += data

    page = Spans()
    page.feed((tmp_path / "t.html").read_text())
    assert "".join(page.texts) == "".join(texts)  # the emoji's byte tokens give it back whole
    assert len(page.data) == got["tokens"] and not page.refs  # nothing loaded from outside
    assert [d[1] for d in page.data] == pytest.approx([r["logprob"] for r in records], abs=1e-4)


@pytest.mark.slow  # Chromium
def test_token_page_hover_in_chromium(tmp_path, capsys):
    """Open the page in Chromium with every network request refused; hover a token: the
    tooltip lists its alternatives."""
    save_random(tmp_path / "ckpt", CHARS)
    (tmp_path / "t.txt").write_text("All:\nSpeak, speak.")
    run_json(capsys, "--ckpt", tmp_path / "ckpt", "--text", tmp_path / "t.txt", "--html",
             tmp_path / "t.html")
    path, requests = tmp_path / "t.html", []
    with chromium() as browser:
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        assert page.locator("#tip").is_hidden()
        span = page.locator("span[data-s]").nth(2)
        span.hover()
        tip = page.locator("#tip")
        assert tip.is_visible()
        rows = tip.locator("tr")
        assert rows.count() == 5 and "%" in rows.nth(0).inner_text()
        assert "rank" in tip.inner_text()
    assert requests == [path.as_uri()]


# ---------------------------------------------------------------- wandb, entry point, errors


@pytest.mark.slow  # wandb's import and its service process: ~6 s of CPU
def test_wandb_offline_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    save_random(tmp_path / "ckpt", CHARS)
    (tmp_path / "t.txt").write_text(CORPUS[:200])
    got = run_json(capsys, "--ckpt", tmp_path / "ckpt", "--text", tmp_path / "t.txt",
                   "--wandb", "--report", tmp_path / "r", "--sweep_temperature")
    from test_tracking import read_wandb_run

    run, history, summary, _ = read_wandb_run(tmp_path / "r")
    assert "eval" in run.tags
    assert summary["eval/nll"] == pytest.approx(got["nll"])
    logged = history[0]  # nested keys flattened: "eval/reliability/_type"
    assert logged["eval/reliability/_type"] == logged["eval/sweep/_type"] == "image-file"
    assert logged["eval/sweep_table/_type"] == "table-file"
    assert logged["eval/sweep_table/nrows"] == len(got["sweep"])
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*/files/media/images/eval/"
                                               "reliability_*.png"))


@pytest.mark.slow  # a Python that imports torch
def test_python_m_entry_point(tmp_path):
    """The one subprocess of this file: python -m minilm.eval runs minilm-eval (its error lines
    are checked in-process below)."""
    save_random(tmp_path / "ckpt", CHARS)
    (tmp_path / "t.txt").write_text("All:\nSpeak.")
    ok = subprocess.run([sys.executable, "-m", "minilm.eval", "--ckpt", str(tmp_path / "ckpt"),
                         "--text", str(tmp_path / "t.txt"), "--json"], capture_output=True,
                        text=True, cwd=ROOT)
    assert ok.returncode == 0 and json.loads(ok.stdout)["tokens"] == 11, ok.stderr


@pytest.fixture
def bad_inputs(tmp_path):
    save_random(tmp_path / "ckpt", CHARS)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    (tmp_path / "ok.txt").write_text("All:\nSpeak.")
    (tmp_path / "unknown.txt").write_text("ab\u4e2d")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--text", "{d}/empty.txt"], "--text {d}/empty.txt is empty"),
    (["--text", "{d}/missing.txt"], "cannot read --text {d}/missing.txt: No such file"),
    (["--text", "{d}/latin1.txt"], "{d}/latin1.txt is not UTF-8"),
    (["--text", "{d}/bad.jsonl"], "--text {d}/bad.jsonl, line 2: expected an object with a "
                                  "string field 'text'"),
    (["--text", "{d}/unknown.txt"], "character '中' is not in the char tokenizer's vocabulary"),
    (["--choices"], "argument --choices: expected at least one argument"),
    (["--context", "All:"], "--context needs --choices"),
    (["--choices", ""], "choice '' is empty"),
    (["--choices", "a", "--fit_temperature"], "--fit_temperature does not apply to --choices"),
    (["--text", "{d}/ok.txt", "--stride", "0"], "--stride must be >= 1, got 0"),
    (["--text", "{d}/ok.txt", "--stride", "17"], "--stride must be <= block_size = 16, got 17"),
    (["--text", "{d}/ok.txt", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--text", "{d}/ok.txt", "--sweep_temperature", "0,1"], "temperatures must be > 0, got 0"),
    (["--text", "{d}/ok.txt", "--sweep_temperature", "1,hot"], "'hot' is not a number"),
    (["--text", "{d}/ok.txt", "--fit_temperature"], "needs at least 2 non-empty documents"),
    (["--text", "{d}/ok.txt", "--tokens", "{d}/no/t.jsonl"], "folder {d}/no does not exist"),
    (["--split", "val"], "{d}/ckpt has no data cache"),
    ([], "{d}/ckpt has no data cache"),
    (["--text", "{d}/ok.txt", "--device", "nonsense"], "--device: invalid choice 'nonsense'"),
])
def test_bad_input_is_one_line(bad_inputs, capsys, args, message):
    d = bad_inputs
    argv = ["--ckpt", f"{d}/ckpt", *[a.format(d=d) for a in args],
            "--report", f"{d}/report", "--html", f"{d}/t.html"]
    if "--choices" in args or "--context" in args:
        argv = argv[:-4]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message.format(d=d) in err, err
    assert not (d / "report").exists() and not list(d.glob("*.html")) and not list(d.glob(".*"))


def test_missing_data_cache_is_one_line(run_dir, tmp_path, capsys):
    import shutil

    shutil.copytree(run_dir / "last", tmp_path / "moved")  # far from its run: no cache found
    assert run_cli(main, ["--ckpt", str(tmp_path / "moved")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "data cache" in err and "is missing" in err


def test_max_tokens_inside_one_document_cannot_fit_a_temperature(run_dir, capsys):
    assert run_cli(main, ["--ckpt", str(run_dir), "--fit_temperature", "--max_tokens", "10"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "raise --max_tokens" in err
