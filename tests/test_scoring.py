"""The shared scorer (minilm.evaluation.scored_logits / score_tokens) against float64 references."""

import pytest
import torch

from minilm.evaluation.scoring import rolling_windows, score_tokens, scored_logits
from minilm.model.gpt import GPT, GPTConfig


def tiny_model(block_size=16, vocab_size=23, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16,
                         block_size=block_size, dropout=dropout))


def reference_logprobs(model, seq):
    """float64 log_softmax of one full forward pass: log p(seq[i] | seq[:i]) for i >= 1."""
    m = GPT(model.config).double()
    m.load_state_dict(model.state_dict())
    m.eval()
    with torch.no_grad():
        logits = m(torch.tensor([seq[:-1]]))[0]  # [T - 1, V]
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]


def window_reference(model, seq, stride):
    """A hand-written loop: token i's log-prob from a window of up to block_size inputs ending at
    i - 1, the windows advancing by stride after the first."""
    bs = model.config.block_size
    out = {}
    end = min(bs, len(seq) - 1)
    starts_done = 0
    while starts_done < len(seq) - 1:
        start = max(0, end - bs)
        lp = reference_logprobs(model, seq[start:end + 1])  # predicts seq[start+1 .. end]
        for k, i in enumerate(range(start + 1, end + 1)):
            if i > starts_done:
                out[i] = lp[k].item()
        starts_done = end
        end = min(end + stride, len(seq) - 1)
    return [out[i] for i in range(1, len(seq))]


def test_windows_predict_each_token_once():
    for n in (1, 2, 5, 16, 17, 40, 100):
        for stride in (1, 3, 8, 16):
            ws = rolling_windows(n, 16, stride)
            predicted = [p + 1 for w in ws for p in range(w.end - w.n_scored, w.end)]
            assert predicted == list(range(1, n))
            assert all(w.end - w.start <= 16 for w in ws)
            assert all(w.end - w.start >= min(16, w.end) for w in ws)  # full context when it can
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(10, 16, 0)
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(10, 16, 17)


def test_short_sequence_equals_full_forward_float64():
    model = tiny_model()
    seq = torch.randint(0, 23, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    scores = score_tokens(model, [seq], top_n=3)[0]
    ref = reference_logprobs(model, seq)
    assert scores.tokens == seq[1:]
    torch.testing.assert_close(torch.tensor(scores.logprobs, dtype=torch.float64), ref,
                               atol=1e-5, rtol=0)
    for lp, rank, top in zip(scores.logprobs, scores.ranks, scores.top):
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
        assert (rank == 1) == (lp >= top[0][1] - 1e-6)


@pytest.mark.parametrize("stride", [1, 5, 8, 16])
def test_long_sequence_windows_match_manual_loop(stride):
    model = tiny_model()
    seq = torch.randint(0, 23, (53,), generator=torch.Generator().manual_seed(2)).tolist()
    got = score_tokens(model, [seq], stride=stride, batch_size=3)[0].logprobs
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(window_reference(model, seq, stride),
                                            dtype=torch.float64), atol=1e-5, rtol=0)


def test_batches_and_chunks_do_not_change_results():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 23, (n,), generator=g).tolist() for n in (1, 2, 9, 30, 16, 17)]
    alone = [score_tokens(model, [s])[0].logprobs for s in seqs]
    together = [r.logprobs for r in score_tokens(model, seqs, batch_size=4)]
    for a, b in zip(alone, together):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    rows = [c.logits.shape[0] for c in scored_logits(model, seqs, max_rows=5)]
    assert max(rows) <= 5 and sum(rows) == sum(len(s) - 1 for s in seqs)


def test_training_mode_model_is_scored_without_dropout_and_left_training():
    model = tiny_model(dropout=0.5)
    model.train()
    seq = list(range(10))
    a = score_tokens(model, [seq])[0].logprobs
    b = score_tokens(model, [seq])[0].logprobs
    assert a == b and model.training
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64),
                               reference_logprobs(model, seq), atol=1e-5, rtol=0)
