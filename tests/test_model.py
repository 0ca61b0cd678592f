"""The GPT: causality, the tied/untied head, parameter counts, init loss, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from minilm.model.gpt import GPT, GPTConfig, KVCache

V = 67


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=32, **kw)).eval()


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    x = torch.randint(0, V, (2, 20))
    y = x.clone()
    y[:, 11:] = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :11], b[:, :11], atol=1e-6)
    assert not torch.allclose(a[:, 11:], b[:, 11:], atol=1e-3)


def test_tied_head_is_the_embedding_parameter():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.matrix is model.transformer.wte.weight
    names = list(model.state_dict())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    # a gradient through the head lands in the embedding matrix
    model(torch.randint(0, V, (1, 8)), torch.randint(0, V, (1, 8))).backward()
    assert model.transformer.wte.weight.grad is not None


def test_untied_head_is_a_separate_matrix():
    model = tiny(tie_embeddings=False)
    assert model.lm_head.matrix is not model.transformer.wte.weight
    assert model.lm_head.matrix.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert "lm_head.weight" in model.state_dict()


@pytest.mark.parametrize("tie,head_bias,bias", [(True, False, True), (False, False, True),
                                                 (True, True, False), (False, True, False)])
def test_param_counts_match_the_formula(tie, head_bias, bias):
    L, d, T = 2, 32, 32
    model = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=2, n_embd=d, block_size=T, bias=bias,
                          tie_embeddings=tie, lm_head_bias=head_bias))
    b = 1 if bias else 0
    ln = d + b * d
    block = 2 * ln + (d * 3 * d + b * 3 * d) + (d * d + b * d) + (d * 4 * d + b * 4 * d) + (4 * d * d + b * d)
    embedding = V * d + T * d
    head = (0 if tie else V * d) + (V if head_bias else 0)
    counts = model.param_counts()
    assert counts["embedding"] == embedding
    assert counts["head"] == head
    assert counts["non_embedding"] == L * block + ln
    assert counts["total"] == embedding + head + L * block + ln == sum(
        p.numel() for p in model.parameters())


def test_config_validates_itself():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


@pytest.mark.parametrize("tie", [True, False])
def test_loss_at_init_is_about_ln_vocab(tie):
    model = GPT(GPTConfig(vocab_size=1000, n_layer=2, n_head=2, n_embd=64, block_size=32,
                          tie_embeddings=tie))
    x = torch.randint(0, 1000, (8, 32))
    with torch.no_grad():
        loss = model(x, torch.randint(0, 1000, (8, 32))).item()
    assert abs(loss - math.log(1000)) < 0.05


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.randint(0, V, (4, 16))
    y = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


@pytest.mark.parametrize("tie", [True, False])
def test_kv_cache_decode_equals_full_forward(tie):
    model = tiny(tie_embeddings=tie, lm_head_bias=True)
    x = torch.randint(0, V, (3, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, batch_size=3)
        steps = [model.logits(x[:, :10], cache, last_n=None)]
        for t in range(10, 24):
            steps.append(model.logits(x[:, t:t + 1], cache))
    assert cache.length == 24
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_left_padding_with_key_padding_equals_unpadded():
    model = tiny()
    prompt = torch.randint(0, V, (1, 7))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model.logits(prompt)
        out = model.logits(padded, KVCache(model.config, 1), positions=positions, key_padding=mask)
    assert torch.allclose(out, ref, atol=1e-5)


def test_per_row_cache_lengths_equal_each_row_alone():
    """Rows of different lengths in one cache (continuous batching): each row's next logits are
    those of a full forward over its own tokens."""
    model = tiny()
    lens = [3, 11, 7]
    x = torch.randint(0, V, (3, 14))
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=3, max_len=16)
        for b, n in enumerate(lens):  # each row prefilled into its own slot
            model.hidden_states(x[b:b + 1, :n], cache.rows(b, b + 1))
        cache.set_lengths(lens)
        for step in range(2):  # two decode steps of one token per row, at per-row positions
            tokens = x[torch.arange(3), cache.lengths]
            out = model.logits(tokens[:, None], cache)[:, -1]
            for b in range(3):
                n = lens[b] + step + 1
                torch.testing.assert_close(out[b], model(x[b:b + 1, :n])[0, -1], atol=1e-5,
                                           rtol=0)
    assert cache.lengths.tolist() == [n + 2 for n in lens]
    with pytest.raises(ValueError, match="one token per row"):
        model.logits(x[:, :2], cache)


def test_sequence_longer_than_block_size_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


# ---------------------------------------------------------------- the model's output function


def test_softcap_is_part_of_the_model_config_and_of_both_outputs():
    """config.logit_softcap caps the logits (cap · tanh(z / cap)) and the loss alike; float64
    references from the model's own hidden states and head matrix."""
    cap = 0.5  # small, so that the cap acts on every logit
    model = tiny(tie_embeddings=False, lm_head_bias=True, logit_softcap=cap)
    assert not hasattr(model, "logit_softcap")  # the model's config holds it, nowhere else
    x, y = torch.randint(0, V, (2, 12)), torch.randint(0, V, (2, 12))
    with torch.no_grad():
        h = model.hidden_states(x).double()
        z = F.linear(h, model.lm_head.weight.double(), model.lm_head.bias.double())
        want = cap * torch.tanh(z / cap)
        torch.testing.assert_close(model(x).double(), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.logits(x)[:, -1].double(), want[:, -1], atol=1e-6, rtol=0)
        loss = F.cross_entropy(want.flatten(0, 1), y.flatten())
        torch.testing.assert_close(model(x, y).double(), loss, atol=1e-6, rtol=0)
        assert not torch.allclose(z, want, atol=1e-2)  # the cap is not a no-op here


@pytest.mark.parametrize("cap", [0.0, -1.0])
def test_softcap_must_be_positive(cap):
    with pytest.raises(ValueError, match=rf"model.logit_softcap must be > 0 \(or null: off\), "
                                         rf"got {cap}"):
        GPTConfig(logit_softcap=cap)


# ---------------------------------------------------------------- the decode layout's switches


def contiguous(model) -> list[bool]:
    return [p.is_contiguous() for p in model.parameters()]


def test_the_decode_layout_switches_only_where_asked():
    """Generation switches it on (set_decode_layout); a forward never switches it, whatever the
    grad mode; evaluating() (each generation step) keeps it; train() is where a notebook's
    training starts, and puts the usual layout back. Values never change."""
    model = tiny().train()
    values = [p.detach().clone() for p in model.parameters()]
    model.set_decode_layout(True)
    assert not model.transformer.h[0].attn.c_attn.weight.is_contiguous()
    x, y = torch.randint(0, V, (1, 8)), torch.randint(0, V, (1, 8))
    model(x, y).backward()  # explicit: a forward with grad leaves the layout alone
    assert model.decode_layout
    with model.evaluating():
        assert not model.training
    assert model.training and model.decode_layout  # the caller's mode, the decode layout kept
    model.eval()
    assert model.decode_layout
    assert model.train() is model and not model.decode_layout and all(contiguous(model))
    assert all(torch.equal(a, b) for a, b in zip(values, model.parameters()))
