"""minilm.sampling: each processor against HF transformers' and the OpenAI formula; History; the draw."""
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from minilm.errors import SettingError
from minilm.sampling.history import History
from minilm.sampling.settings import ORDERS, SamplerSettings, describe, knobs, user_logit_bias
from minilm.sampling.stack import SamplerStack, _draw
from minilm.sampling.stages import (
    DRY,
    STAGES,
    XTC,
    EpsilonCutoff,
    EtaCutoff,
    FrequencyPenalty,
    LogitBias,
    MinP,
    Mirostat,
    PresencePenalty,
    RepetitionPenalty,
    Temperature,
    TopH,
    TopK,
    TopNSigma,
    TopP,
    TypicalP,
    breaker_sequences,
    classifier_free_guidance,
    unconditional_prompt,
)
from minilm.tokenizer import CharTokenizer

from hf_models import gpt2_bpe

INF = float("inf")


def rand_logits(B=4, V=300, seed=0, scale=3.0, n_removed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale
    if n_removed:  # as if an earlier filter had removed some tokens
        idx = torch.rand(B, V, generator=g).argsort(dim=-1)[:, :n_removed]
        logits.scatter_(1, idx, -INF)
    return logits


def rand_history(B=4, T=12, V=300, seed=1, prompt_len=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V // 10, (B, T), generator=g)  # a small id range: plenty of repeats
    return ids, History(ids, torch.full((B,), prompt_len))


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def kept(logits):
    """The ids of the tokens not removed (over all rows)."""
    return (logits > -INF).nonzero()[:, -1].tolist()


# ------------------------------------------------------------------------------------------------
# each processor against HF's, on random logits with and without already-removed tokens

HF_PAIRS = [
    *[pytest.param(Temperature(t), TemperatureLogitsWarper(t), id=f"temperature={t}") for t in (0.3, 1.7)],
    *[pytest.param(TopK(k), TopKLogitsWarper(k), id=f"top_k={k}") for k in (1, 5, 50)],
    *[pytest.param(TopP(p), TopPLogitsWarper(p), id=f"top_p={p}") for p in (0.05, 0.5, 0.9, 0.99)],
    *[pytest.param(MinP(p), MinPLogitsWarper(p), id=f"min_p={p}") for p in (0.0, 0.05, 0.3, 1.0)],
    *[pytest.param(TypicalP(p), TypicalLogitsWarper(p), id=f"typical_p={p}") for p in (0.05, 0.5, 0.9, 0.99)],
    *[pytest.param(RepetitionPenalty(t), RepetitionPenaltyLogitsProcessor(t), id=f"repetition={t}")
      for t in (0.7, 1.3, 2.0)],
]


@pytest.mark.parametrize("ours,hf", HF_PAIRS)
@pytest.mark.parametrize("n_removed", [0, 100])
def test_processor_matches_hf(ours, hf, n_removed):
    for seed in range(3):
        logits = rand_logits(seed=seed, n_removed=n_removed)
        ids, h = rand_history(seed=seed + 10)
        torch.testing.assert_close(ours(logits, h), hf(ids, logits.clone()), rtol=0, atol=0)


def test_stack_matches_hf_list():
    logits = rand_logits(B=6, V=1000, seed=3)
    ids, h = rand_history(B=6, V=1000, seed=4)
    ours = SamplerStack.from_settings(repetition_penalty=1.2, temperature=0.8, top_k=60, top_p=0.9,
                                      min_p=0.02, typical_p=0.95)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8),
                              TopKLogitsWarper(60), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02),
                              TypicalLogitsWarper(0.95)])
    torch.testing.assert_close(ours.apply(logits, h), hf(ids, logits.clone()), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# hand-made boundary cases

def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    assert kept(TopK(2)(logits)) == [0, 1, 2, 3]
    assert torch.equal(TopK(2)(logits), TopKLogitsWarper(2)(None, logits))
    for k in (0, 5, 9):  # 0 and k >= V keep all
        assert torch.equal(TopK(k)(logits), logits)


def test_top_p_exactly_hitting_p():
    logits = torch.zeros(1, 4)  # probabilities exactly 1/4: cumulative 0.25, 0.5, 0.75, 1
    for p, n in [(0.25, 1), (0.5, 2), (0.75, 3), (0.5000001, 3), (1.0, 4)]:
        assert len(kept(TopP(p)(logits))) == n, p
        if p < 1:  # which of the tied tokens survive is up to the sort, in HF as here
            assert len(kept(TopPLogitsWarper(p)(None, logits.clone()))) == n
    peaked = torch.tensor([[5.0, 0.0, -1.0]])     # probabilities 0.9909, 0.0067, 0.0025
    assert kept(TopP(0.5)(peaked)) == [0]         # the top token alone reaches p
    assert kept(TopP(1e-9)(peaked)) == [0]        # at least one token is always kept
    assert kept(TopP(0.995)(peaked)) == [0, 1]    # token 1 crosses p: kept


def test_min_p_boundary():
    logits = torch.tensor([[0.0, 0.0, -1.0, -INF, -5.0]])
    assert kept(MinP(1.0)(logits)) == [0, 1]                      # ties with the top survive p = 1
    assert kept(MinP(0.0)(logits)) == [0, 1, 2, 4]
    assert kept(MinP(math.exp(-1) * 0.999)(logits)) == [0, 1, 2]  # token 2 has e^-1 of the top
    assert kept(MinP(math.exp(-1) * 1.001)(logits)) == [0, 1]
    for p in (0.0, 0.3, math.exp(-1) * 0.999, 1.0):
        assert torch.equal(MinP(p)(logits), MinPLogitsWarper(p)(None, logits.clone()))


def test_typical_boundary():
    uniform = torch.zeros(2, 8)  # every token exactly typical: all tied, all kept
    assert len(kept(TypicalP(0.1)(uniform))) == 16
    peaked = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).log()  # H = 0.94; |-log p - H| = 0.58, 1.36 (x3)
    assert kept(TypicalP(0.5)(peaked)) == [0]            # the top token is the most typical, reaches p
    assert kept(TypicalP(0.8)(peaked)) == [0, 1, 2, 3]   # one more is needed, and its ties come along
    bimodal = torch.tensor([[0.45, 0.45, 0.05, 0.05]]).log()
    for p in (0.3, 0.5, 0.9, 0.95):
        for x in (peaked, bimodal, uniform):
            assert torch.equal(TypicalP(p)(x), TypicalLogitsWarper(p)(None, x.clone()))
    assert torch.equal(TypicalP(1.0)(peaked), peaked)


def test_temperature_zero_keeps_the_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [-INF, -1.0, -INF, -2.0]])
    out = Temperature(0)(logits)
    assert kept(out[:1]) == [1] and out[0, 1] == 3.0
    assert kept(out[1:]) == [1]


def test_repetition_penalty_sign_rule_and_padding():
    logits = torch.tensor([[2.0, -2.0, 0.0, 4.0, -1.0]])
    h = History(torch.tensor([[4, 0, 1, 0, 2]]), torch.tensor([3]),
                attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))  # token 4 is left padding: not seen
    assert RepetitionPenalty(2.0)(logits, h).tolist() == [[1.0, -4.0, 0.0, 4.0, -1.0]]
    assert RepetitionPenalty(0.5)(logits, h).tolist() == [[4.0, -1.0, 0.0, 4.0, -1.0]]


def test_logit_bias_adds_and_bans():
    logits = torch.zeros(2, 5)
    out = LogitBias({1: 2.5, 3: -INF})(logits)
    assert out.tolist() == [[0.0, 2.5, 0.0, -INF, 0.0]] * 2
    assert torch.equal(logits, torch.zeros(2, 5))  # the input is left alone


DIGITS_AND_LETTERS = CharTokenizer("abc0123456789")  # "5" is token 8, token 5 is "2"


@pytest.mark.parametrize("bias, expected", [
    ({"5": 2}, {5: 2.0}),  # digits: a token id, as OpenAI's API
    ({"id:5": 2}, {5: 2.0}),
    ({"text:5": 2}, {8: 2.0}),  # the character "5", which a bare "5" cannot name
    ({"b": -100}, {1: -INF}),  # any other key: a text; -100 bans
    ({"text:c": 1.5, "id:0": -3, "12": 0.5}, {2: 1.5, 0: -3.0, 12: 0.5}),
])
def test_user_logit_bias_keys(bias, expected):
    assert DIGITS_AND_LETTERS.encode("5") == [8] and DIGITS_AND_LETTERS.decode([5]) == "2"
    assert user_logit_bias(bias, DIGITS_AND_LETTERS.encode) == expected


@pytest.mark.parametrize("bias, message", [
    ({"id:x": 1}, "logit_bias key 'id:x': a token id after id: must be digits"),
    ({"id:": 1}, "logit_bias key 'id:': a token id after id: must be digits"),
    ({"text:ab": 1}, "logit_bias key 'text:ab' is 2 tokens [0, 1], not one"),
    ({"text:": 1}, "logit_bias key 'text:' is 0 tokens [], not one"),
    ({"text:~": 1}, "logit_bias key 'text:~': "),
    ({"²": 1}, "logit_bias key '²': "),  # not an id (int() refuses it): a text, unknown here
    ({"8": 1, "text:5": 2}, "logit_bias keys '8' and 'text:5' are the same token 8"),
    ({"b": 1, "id:1": 2}, "logit_bias keys 'b' and 'id:1' are the same token 1"),
])
def test_user_logit_bias_refusals_name_the_key(bias, message):
    with pytest.raises(SettingError, match="^" + re.escape(message)) as info:
        user_logit_bias(bias, DIGITS_AND_LETTERS.encode)
    assert info.value.param == "logit_bias"


def test_user_logit_bias_text_keys_need_a_tokenizer():
    assert user_logit_bias({"id:5": 1, "7": 2}) == {5: 1.0, 7: 2.0}
    with pytest.raises(SettingError, match="'text:5': no tokenizer to encode it"):
        user_logit_bias({"text:5": 1})


# ------------------------------------------------------------------------------------------------
# presence / frequency against the OpenAI formula, computed independently in float64

def test_presence_frequency_match_openai_formula():
    B, V = 3, 50
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, V, generator=g) * 4
    pad = [2, 0, 4]
    prompt_lens = [4, 6, 2]
    rows = [[0] * p + torch.randint(0, 20, (10 - p,), generator=g).tolist() for p in pad]
    mask = torch.tensor([[0] * p + [1] * (10 - p) for p in pad])
    h = History(torch.tensor(rows), torch.tensor(prompt_lens), attention_mask=mask)
    for presence, frequency in [(0.5, 0.0), (0.0, 1.5), (-2.0, 2.0), (1.1, -0.3)]:
        out = FrequencyPenalty(frequency)(PresencePenalty(presence)(logits, h), h)
        want = logits.double().clone()
        for b in range(B):
            generated = rows[b][pad[b] + prompt_lens[b]:]
            for j in set(generated):
                count = generated.count(j)
                want[b, j] -= count * frequency + (count > 0) * presence
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# History: incremental updates equal a recomputation from scratch

def test_history_incremental_equals_from_scratch():
    B, V, steps = 3, 40, 12
    g = torch.Generator().manual_seed(7)
    pad = torch.tensor([3, 0, 1])
    lens = 6 - pad
    prompt = torch.randint(0, V, (B, 6), generator=g)
    mask = torch.arange(6)[None, :] >= pad[:, None]
    h = History(prompt, lens, vocab_size=V, attention_mask=mask)
    lazy = History(prompt, lens, attention_mask=mask)  # built only after the appends
    for _ in range(steps):
        new = torch.randint(0, V, (B,), generator=g)
        h.append(new)
        lazy.append(new)
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=torch.bool)], 1)
    fresh = History(h.tokens, lens, vocab_size=V, attention_mask=full_mask)
    lazy.build(V)
    logits = torch.randn(B, V, generator=g)
    for other in (fresh, lazy):
        assert torch.equal(h.counts, other.counts) and torch.equal(h.seen, other.seen)
        assert seen_pairs(h) == seen_pairs(other)
        for penalty in (RepetitionPenalty(1.3), PresencePenalty(0.7), FrequencyPenalty(-0.4)):
            assert torch.equal(penalty(logits, h), penalty(logits, other))
    for b in range(B):  # against a plain count
        real = h.tokens[b][int(pad[b]):].tolist()
        generated = real[int(lens[b]):]
        assert h.counts[b].tolist() == [generated.count(j) for j in range(V)]
        assert h.seen[b].tolist() == [j in real for j in range(V)]
    assert h.counts.sum() == B * steps


def seen_pairs(h):
    """History.seen_ids as a sorted list of (row, token), checked against ``seen``."""
    pairs = sorted(zip(*(t.tolist() for t in h.seen_ids)))
    assert pairs == sorted(map(tuple, h.seen.nonzero().tolist()))
    return pairs


def test_history_select_equals_from_scratch():
    B, V, steps = 4, 40, 5
    g = torch.Generator().manual_seed(12)
    pad = torch.tensor([2, 0, 3, 1])
    lens = 6 - pad - torch.tensor([0, 2, 0, 1])
    prompt = torch.randint(0, V, (B, 6), generator=g)
    mask = torch.arange(6)[None, :] >= pad[:, None]
    h = History(prompt, lens, vocab_size=V, attention_mask=mask)
    for _ in range(steps):
        h.append(torch.randint(0, V, (B,), generator=g))
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=torch.bool)], 1)
    for rows in ([2, 0], torch.tensor([3]), [0, 1, 2, 3]):
        idx = torch.as_tensor(rows)
        picked = h.select(rows)
        fresh = History(h.tokens[idx], lens[idx], vocab_size=V, attention_mask=full_mask[idx])
        for _ in range(2):  # equal now, and after both append the same tokens
            for name in ("tokens", "attention_mask", "prompt_lens", "counts", "seen"):
                assert torch.equal(getattr(picked, name), getattr(fresh, name)), name
            assert seen_pairs(picked) == seen_pairs(fresh)
            new = torch.randint(0, V, (len(idx),), generator=g)
            picked.append(new)
            fresh.append(new)
    lazy = History(prompt, lens).select([1, 3])  # not built yet: built for its rows on first use
    assert lazy.vocab_size is None and torch.equal(lazy.tokens, prompt[[1, 3]])
    assert torch.equal(lazy.build(V).counts, History(prompt[[1, 3]], lens[[1, 3]], vocab_size=V).counts)


# ------------------------------------------------------------------------------------------------
# the draw

def test_greedy_equals_top_k_1_equals_small_temperature():
    logits = rand_logits(B=16, V=500, seed=11)
    top = logits.argmax(-1)
    logits[torch.arange(16), top] += 0.05  # a clear gap: at T = 1e-4 the runner-up has odds e^-500
    g = torch.Generator().manual_seed(0)
    for stack in (SamplerStack.from_settings(temperature=0), SamplerStack([TopK(1)]),
                  SamplerStack([Temperature(1e-4)]), SamplerStack.from_settings(temperature=0.7, top_k=1)):
        tokens, info = stack.sample(logits, generator=g)
        assert torch.equal(tokens, top)
    tokens, info = SamplerStack([Temperature(0)]).sample(logits)
    assert torch.equal(info.processed_logprobs, torch.zeros(16))


CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def assert_chi_square(tokens, probs):
    """Draws ``tokens`` follow ``probs`` [V] (p-value > 0.001); no token of probability 0 is drawn."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0
    k = probs > 0
    expected = len(tokens) * probs[k].double()
    stat = float(((counts[k] - expected) ** 2 / expected).sum())
    df = int(k.sum()) - 1
    try:
        from scipy.stats import chi2
        critical = float(chi2.ppf(0.999, df))
    except ImportError:
        critical = CHI2_999[df]
    assert stat < critical, (stat, counts[k], expected)


@pytest.mark.parametrize("per_row", [False, True])
def test_draws_follow_the_processed_distribution(per_row):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, -6.0]])
    stack = SamplerStack.from_settings(temperature=0.7, top_k=6, top_p=0.97)
    probs = torch.softmax(stack.apply(logits), -1)[0]
    n = 4000 if per_row else 40000
    generator = gens(*range(1000, 1000 + n)) if per_row else torch.Generator().manual_seed(0)
    tokens, _ = stack.sample(logits.expand(n, -1), generator=generator)
    assert_chi_square(tokens, probs)


@pytest.mark.parametrize("block", [3, 1024])
def test_draw_is_exact_across_cdf_blocks(block):
    # the CDF is built in blocks: removed tokens straddle blocks, fill whole blocks and the last one
    V = 11 if block == 3 else 3000
    kept_ids = [0, 2, 6, 7, 8] if block == 3 else [5, 1023, 1024, 2047, 2900]
    logits = torch.full((1, V), -INF)
    logits[0, kept_ids] = torch.tensor([0.5, -1.0, 1.0, 0.0, -0.3])
    probs = torch.softmax(logits, -1)
    n = 20000 if block == 3 else 2000
    tokens = torch.cat([_draw(probs.expand(n, -1), g, block) for g in gens(0, 1)])
    assert_chi_square(tokens, probs[0])
    one = torch.zeros(1, V)
    one[0, kept_ids[2]] = 1.0  # a single token left, in a middle block
    assert _draw(one.expand(50, -1), None, block).eq(kept_ids[2]).all()


def ban_even(logits, history):
    return logits.masked_fill(torch.arange(logits.size(-1)) % 2 == 0, -INF)


@pytest.mark.parametrize("procs", [
    [TopK(20), TopP(0.9)], [Temperature(0.7), TopK(20), TopP(0.8), TypicalP(0.9)],
    [TopK(20), Temperature(0)], [TopK(30), MinP(0.05), TopP(0.9)], [TopK(20), ban_even, TopK(5)],
    [TopK(25), TopK(10), Temperature(1.5)], [TopK(499)], [TopK(500), TopP(0.5)],
], ids=lambda procs: "-".join(getattr(p, "name", "custom") for p in procs))
def test_sample_candidates_equal_apply(procs):
    # sample() runs what follows a TopK on the tokens it kept only: the same processed logits
    stack = SamplerStack(procs)
    logits = rand_logits(B=6, V=500, seed=6, n_removed=100)
    logits[2, 5:] = -INF          # fewer than k tokens left
    logits[3] = logits[3].round()  # a few values, each shared by many tokens: ties at the k-th value
    if any(type(p) in (TopP, TypicalP) for p in procs):  # which of two tied tokens these rank first
        logits[3] = rand_logits(B=1, V=500, seed=7)[0]     # is torch's choice on either path
    values, ids = stack._candidates(logits, None)
    if ids is not None:
        values = torch.full_like(logits, -INF).scatter(-1, ids, values)
    assert torch.equal(values, stack.apply(logits))


def test_sample_draws_what_a_draw_from_apply_draws():
    logits = rand_logits(B=64, V=2000, seed=5)
    stack = SamplerStack.from_settings(temperature=0.8, top_k=50, top_p=0.95)
    tokens, info = stack.sample(logits, generator=gens(*range(64)))
    processed = stack.apply(logits)
    assert torch.equal(tokens, _draw(torch.softmax(processed, -1), gens(*range(64))))
    torch.testing.assert_close(info.processed_logprobs,
                               torch.log_softmax(processed, -1).gather(-1, tokens[:, None])[:, 0])


def test_seed_reproducible_per_row_after_top_k_whatever_the_batch():
    # after a top-k the draw works on each row's candidates, padded to the most that a row of the
    # batch keeps: a row must draw the same tokens, with the same log-probs, whatever that number is
    V, n = 300, 100
    stack = SamplerStack.from_settings(temperature=0.9, top_k=10, top_p=0.9)
    row = (rand_logits(B=1, V=V, seed=3) + 7).expand(n, -1)
    ties = torch.zeros(1, V)
    ties[0, :80] = 1.0  # 80 tokens tied: top-10 keeps them all
    few = torch.full((1, V), -INF)
    few[0, :3] = 0.0    # fewer than k tokens left: top-10 keeps all V
    alone, info = stack.sample(row, generator=gens(*range(n)))
    for other in (ties, few):
        tokens, mixed = stack.sample(torch.cat([other, row]), generator=gens(0, *range(n)))
        assert torch.equal(tokens[1:], alone)
        assert torch.equal(mixed.processed_logprobs[1:], info.processed_logprobs)


def test_seed_reproducible_per_row_whatever_the_batch():
    V = 64
    stack = SamplerStack.from_settings(repetition_penalty=1.3, presence_penalty=0.5, temperature=0.9,
                                       top_p=0.95)
    base = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2

    def run(prompts, seeds, steps=10):
        h = History(torch.tensor(prompts), torch.full((len(prompts),), 3))
        generators = gens(*seeds)
        noise = torch.Generator().manual_seed(99)
        out = []
        for _ in range(steps):  # logits depend on each row's last token, as a model's would
            logits = base + torch.roll(base, 7) * h.tokens[:, -1:].float() / V
            tokens, _ = stack.sample(logits + torch.randn(1, V, generator=noise), h, generator=generators)
            h.append(tokens)
            out.append(tokens)
        return torch.stack(out, 1)

    alone = run([[5, 6, 7]], [42])
    mixed = run([[1, 2, 3], [5, 6, 7], [9, 9, 9]], [7, 42, 8])
    assert torch.equal(alone[0], mixed[1])
    # one generator for a batch of one draws the same stream as a list of one
    logits, h = rand_logits(B=1, seed=2), History(torch.tensor([[1]]), torch.tensor([1]))
    a, _ = stack.sample(logits, h, generator=torch.Generator().manual_seed(3))
    b, _ = stack.sample(logits, h, generator=gens(3))
    assert torch.equal(a, b)


def test_a_row_with_no_token_left_raises():
    logits = rand_logits(B=3, V=10)
    with pytest.raises(ValueError, match="no token left"):
        SamplerStack([LogitBias({j: -INF for j in range(10)})]).sample(logits)
    bad = logits.clone()
    bad[1] = -INF
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        SamplerStack([TopK(3), TopP(0.5)]).sample(bad)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SamplerStack().sample(bad, generator=gens(0, 1, 2))


def test_numerically_stable_at_extremes():
    g = torch.Generator().manual_seed(4)
    B, V = 4, 200
    signs = torch.randint(0, 2, (B, V), generator=g) * 2 - 1
    logits = signs * 1e4 + torch.randn(B, V, generator=g)
    logits[3] = -INF
    logits[3, 17] = 5.0  # a single finite logit
    ids, h = rand_history(B=B, V=V)
    stack = SamplerStack.from_settings(repetition_penalty=1.3, frequency_penalty=2, temperature=1e-4,
                                       top_k=150, top_p=0.9, min_p=0.1, typical_p=0.9)
    for name, x in stack.stages(logits, h):
        assert not torch.isnan(x).any(), name
    for generator in (g, gens(0, 1, 2, 3), None):
        tokens, info = stack.sample(logits, h, generator=generator, top_logprobs=3)
        assert tokens[3] == 17 and info.processed_logprobs[3] == 0
        for t in (info.logprobs, info.processed_logprobs, info.top_logprobs):
            assert not torch.isnan(t).any()
    for T in (1e-4, 1e-2):
        out = Temperature(T)(torch.tensor([[1e4, -1e4, 0.0]]))
        assert torch.isfinite(out).all() and torch.isfinite(torch.log_softmax(out, -1)).all()


def test_logprobs_info():
    logits = rand_logits(B=5, V=100, seed=8)
    ids, h = rand_history(B=5, V=100)
    stack = SamplerStack.from_settings(repetition_penalty=1.2, temperature=0.5, top_k=20)
    tokens, info = stack.sample(logits, h, generator=torch.Generator().manual_seed(0), top_logprobs=4)
    rows = torch.arange(5)
    processed = stack.apply(logits, h)
    torch.testing.assert_close(info.logprobs, torch.log_softmax(logits, -1)[rows, tokens])
    torch.testing.assert_close(info.processed_logprobs, torch.log_softmax(processed, -1)[rows, tokens])
    top = torch.log_softmax(logits, -1).topk(4)
    assert torch.equal(info.top_ids, top.indices)
    torch.testing.assert_close(info.top_logprobs, top.values)
    _, info = stack.sample(logits, h)
    assert info.top_ids is None and info.top_logprobs is None


def test_works_under_inference_mode():
    with torch.inference_mode():
        logits = rand_logits()
        ids, h = rand_history()
        stack = SamplerStack.from_settings(repetition_penalty=1.1, frequency_penalty=0.2, temperature=0.8,
                                           top_k=50, top_p=0.95, logit_bias={3: -INF})
        for _ in range(3):
            tokens, _ = stack.sample(logits, h, generator=gens(0, 1, 2, 3))
            h.append(tokens)
            assert (tokens != 3).all()


# ------------------------------------------------------------------------------------------------
# from_settings, order, stages

def names(stack):
    return [p.name for p in stack.processors]


def test_from_settings_skips_no_ops_and_orders():
    assert SamplerStack.from_settings().processors == []
    all_on = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.9, repetition_penalty=1.1,
                  presence_penalty=0.1, frequency_penalty=0.1, logit_bias={0: 1.0})
    assert names(SamplerStack.from_settings(**all_on)) == [
        "logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "temperature", "top_k", "top_p", "min_p", "typical_p"]
    assert names(SamplerStack.from_settings(**all_on, order="llama.cpp")) == [
        "logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "top_k", "typical_p", "top_p", "min_p", "temperature"]
    custom = SamplerStack.from_settings(temperature=0.5, top_k=3, order=["top_k", "min_p", "temperature"])
    assert names(custom) == ["top_k", "temperature"]
    logits = rand_logits(B=2, V=30)
    stages = custom.stages(logits)
    assert [n for n, _ in stages] == ["raw", "top_k", "temperature"]
    assert stages[0][1] is logits and torch.equal(stages[-1][1], custom.apply(logits))


def test_a_custom_processor_is_a_plain_callable():
    stack = SamplerStack([ban_even, Temperature(0.5)])
    tokens, _ = stack.sample(rand_logits(B=50, V=20), generator=torch.Generator().manual_seed(0))
    assert (tokens % 2 == 1).all()
    assert [n for n, _ in stack.stages(rand_logits())][1] == "ban_even"


# ------------------------------------------------------------------------------------------------
# every ValueError

def tokens_2x4():
    return torch.zeros(2, 4, dtype=torch.long)


@pytest.mark.parametrize("make,match", [
    (lambda: Temperature(-0.1), r"temperature must be in \[0"),
    (lambda: Temperature(float("nan")), "temperature"),
    (lambda: Temperature(INF), "temperature"),
    (lambda: TopK(-2), r"top_k must be an integer >= -1 \(0 or less = off\), got -2"),
    (lambda: TopK(2.5), "top_k"),
    (lambda: TopP(0.0), r"top_p must be in \(0"),
    (lambda: TopP(1.01), "top_p"),
    (lambda: MinP(-0.01), r"min_p must be in \[0"),
    (lambda: MinP(1.5), "min_p"),
    (lambda: TypicalP(0.0), r"typical_p must be in \(0"),
    (lambda: TypicalP(2.0), "typical_p"),
    (lambda: RepetitionPenalty(0.0), r"repetition_penalty must be in \(0"),
    (lambda: RepetitionPenalty(-1.0), "repetition_penalty"),
    (lambda: PresencePenalty(2.5), r"presence_penalty must be in \[-2"),
    (lambda: FrequencyPenalty(-2.01), r"frequency_penalty must be in \[-2"),
    (lambda: LogitBias({-1: 1.0}), "outside the vocabulary"),
    (lambda: LogitBias({10: 1.0}, vocab_size=10), r"outside the vocabulary \[0, 9\]"),
    (lambda: LogitBias({10: 1.0})(torch.zeros(1, 10)), r"outside the vocabulary \[0, 9\]"),
    (lambda: LogitBias({"a": 1.0}), "integer token ids"),
    (lambda: LogitBias({1: float("nan")}), "finite or -inf"),
    (lambda: LogitBias({1: INF}), "finite or -inf"),
    (lambda: LogitBias({1: "x"}), "finite or -inf"),
    (lambda: SamplerStack.from_settings(top_p=1.5), "top_p"),
    (lambda: SamplerStack.from_settings(temperature=-1), "temperature"),
    (lambda: SamplerStack.from_settings(logit_bias={99: 1.0}, vocab_size=50), "outside the vocabulary"),
    (lambda: SamplerStack.from_settings(order="hf"), "order must be one of"),
    (lambda: SamplerStack.from_settings(order=["top_k", "temp"]), r"allowed: \['guidance', 'logit_bias'"),
    (lambda: SamplerStack.from_settings(order=["top_k", "top_k"]), "more than once"),
    (lambda: SamplerStack.from_settings(top_p=0.9, order=["top_k"]), r"leaves out .*top_p"),
    (lambda: SamplerStack().sample(torch.zeros(2, 5), generator=gens(0)), "1 generators"),
    (lambda: SamplerStack().sample(torch.zeros(2, 5), top_logprobs=-1), "top_logprobs"),
    (lambda: SamplerStack().sample(torch.zeros(5)), r"FloatTensor\[B, V\]"),
    (lambda: RepetitionPenalty(1.2)(torch.zeros(2, 5), None), "needs the History"),
    (lambda: RepetitionPenalty(1.2)(torch.zeros(3, 5), History(tokens_2x4(), torch.tensor([1, 1]))),
     "batch size"),
    (lambda: History(tokens_2x4(), torch.tensor([1, 5])), "prompt_lens"),
    (lambda: History(tokens_2x4(), torch.tensor([1])), "prompt_lens"),
    (lambda: History(tokens_2x4(), torch.tensor([1, 1]), vocab_size=8).build(9), "vocab_size"),
])
def test_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------
# SamplerSettings: the one source of the knobs

def bad_values(k):
    """Values knob ``k`` must refuse, from its kind and range."""
    if k.kind in ("number", "integer"):
        out = [float("nan"), INF, -INF, True, "1", None]
        out += [k.lo - 1] if k.lo > -INF else []
        out += [k.hi + 1] if k.hi < INF else []
        out += [k.lo] if k.lo_open else []
        out += [k.hi] if k.hi_open and k.hi < INF else []
        out += [k.default + 0.5] if k.kind == "integer" else []
        return out
    return {"choice": [1, 3, 2.0, True, "2"],
            "token_bias": [{"a": 1.0}, {1: float("nan")}, {1: INF}, {-1: 1.0}, {True: 1.0}, [1]],
            "texts": [[], [""], "abc", ["x" * 41], [1], None],
            "order": ["hf", ["top_k", "top_k"], ["nope"], [1], None],
            "prompt": ["", [], [-1], [1.5], 5]}[k.kind]


@pytest.mark.parametrize("k", knobs(), ids=lambda k: k.name)
def test_settings_refuse_bad_values_naming_the_knob(k):
    for value in bad_values(k):
        with pytest.raises(SettingError) as info:
            SamplerSettings(**{k.name: value})
        assert info.value.param == k.name, (value, info.value)
        assert k.name in str(info.value) and "\n" not in str(info.value)


def test_settings_defaults_are_no_ops_and_normalised():
    s = SamplerSettings()
    assert s.stages_in_use() == [] and s.pipeline() == []
    assert SamplerStack.from_settings(s).processors == []
    for k in knobs():  # the dataclass default is the knob's, and its stage is off there
        assert getattr(s, k.name) == k.default
        assert not (k.switch and k.is_on(k.default)), k.name
    t = SamplerSettings(top_k=-1, top_n_sigma=-1.0, temperature=1, order=["temperature", "top_k"],
                        dry_sequence_breakers=["\n"], negative_prompt=[3, 4])
    assert t.stages_in_use() == []  # vLLM's top_k -1 and llama.cpp's top_n_sigma -1 are off
    assert isinstance(t.temperature, float) and t.order == ("temperature", "top_k")
    assert t.dry_sequence_breakers == ("\n",) and t.negative_prompt == (3, 4)
    assert t == SamplerSettings(top_k=-1, top_n_sigma=-1.0, order=("temperature", "top_k"),
                                dry_sequence_breakers=("\n",), negative_prompt=(3, 4))


def test_every_stage_has_a_processor_and_a_place_in_each_order():
    stages = {k.stage for k in knobs() if k.stage is not None}
    assert set(STAGES) == stages == set(ORDERS["default"]) == set(ORDERS["llama.cpp"])
    for name, proc in STAGES.items():
        assert proc.name == name
    for order in ORDERS.values():
        assert order[0] == "guidance" and order[-1] == "mirostat"
    assert ORDERS["llama.cpp"][-2] == "temperature"  # llama.cpp: temperature last of the filters
    for k in knobs():  # each multi-knob stage has exactly one switch
        assert sum(j.switch for j in knobs() if j.stage == k.stage) == (k.stage is not None)


def test_stage_switches_and_parameters():
    on = dict(guidance_scale=1.5, logit_bias={1: 2.0}, repetition_penalty=1.1, presence_penalty=0.1,
              frequency_penalty=0.1, dry_multiplier=0.8, temperature=0.7, top_n_sigma=1.0, top_h=0.5,
              top_k=40, top_p=0.9, min_p=0.05, typical_p=0.9, epsilon_cutoff=3e-4,
              eta_cutoff=3e-4, xtc_probability=0.5, mirostat=2)
    assert SamplerSettings(**on).pipeline() == list(ORDERS["default"])
    # parameters alone turn nothing on (llama.cpp clients always send tau, eta, base, threshold)
    params = dict(dry_base=3.0, dry_allowed_length=4, dry_penalty_last_n=64, mirostat_tau=4.0,
                  mirostat_eta=0.2, xtc_threshold=0.2, negative_prompt="x")
    assert SamplerSettings(**params).pipeline() == []
    # llama.cpp's order with Mirostat: its own chain, logit bias → temperature → mirostat
    llama = SamplerSettings(**on, order="llama.cpp")
    assert llama.pipeline() == ["guidance", "logit_bias", "temperature", "mirostat"]
    assert SamplerSettings(**dict(on, mirostat=0), order="llama.cpp").pipeline() == \
        [n for n in ORDERS["llama.cpp"] if n != "mirostat"]


@pytest.mark.parametrize("order, message", [
    (["temperature", "guidance", "mirostat"], "guidance must come first in order"),
    (["guidance", "mirostat", "temperature"], "mirostat must come last in order"),
    (["guidance", "temperature"], r"leaves out the stage\(s\) in use \['mirostat'\]"),
])
def test_custom_orders_keep_guidance_first_and_mirostat_last(order, message):
    with pytest.raises(SettingError, match=message) as info:
        SamplerSettings(guidance_scale=2.0, temperature=0.5, mirostat=2, order=order)
    assert info.value.param == "order"
    fine = SamplerSettings(temperature=0.5, mirostat=2, order=["top_k", "temperature", "mirostat"])
    assert fine.pipeline() == ["temperature", "mirostat"]


def test_from_settings_keywords_and_dataclass_agree():
    s = SamplerSettings(repetition_penalty=1.2, temperature=0.8, top_k=60, order="llama.cpp")
    a, b = SamplerStack.from_settings(s), SamplerStack.from_settings(**dataclasses.asdict(s))
    c = SamplerStack.from_settings(SamplerSettings(temperature=0.8), repetition_penalty=1.2,
                                   top_k=60, order="llama.cpp")
    assert repr(a) == repr(b) == repr(c) == "SamplerStack([repetition_penalty, top_k, temperature])"
    logits = rand_logits(B=3, V=100)
    ids, h = rand_history(B=3, V=100)
    assert torch.equal(a.apply(logits, h), c.apply(logits, h))


def test_describe_is_json_and_matches_the_dataclass():
    d = json.loads(json.dumps(describe(), allow_nan=False))  # no inf/nan: null instead
    by_name = {k["name"]: k for k in d["knobs"]}
    assert list(by_name) == [f.name for f in dataclasses.fields(SamplerSettings)]
    assert d["orders"] == {name: list(o) for name, o in ORDERS.items()}
    s = SamplerSettings()
    for name, k in by_name.items():
        default = getattr(s, name)
        assert k["default"] == (list(default) if isinstance(default, tuple) else default)
        assert k["help"] and k["type"] in ("number", "integer", "choice", "token_bias", "texts",
                                           "order", "prompt")
    assert by_name["temperature"]["cli_default"] == 0.8 and by_name["top_k"]["cli_default"] == 200
    assert by_name["top_p"]["range"] == {"min": 0.0, "max": 1.0, "min_open": True, "max_open": False}
    assert by_name["temperature"]["range"]["max"] is None
    assert by_name["top_k"]["off"] == {"at_most": 0}
    assert by_name["dry_base"]["stage"] == "dry" and not by_name["dry_base"]["switch"]
    assert by_name["mirostat"]["choices"] == [0, 2]
    for k in d["knobs"]:  # a slider's span lies inside the knob's range
        if k["ui"] and k["range"]:
            lo, hi = k["range"]["min"], k["range"]["max"]
            assert (lo is None or k["ui"]["min"] >= lo) and (hi is None or k["ui"]["max"] <= hi)


# ------------------------------------------------------------------------------------------------
# History: per-row state and generators, select and cat

def test_seen_ids_catch_up_with_appends_read_or_not():
    B, V = 3, 30
    g = torch.Generator().manual_seed(3)
    h = History(torch.randint(0, V, (B, 4), generator=g), torch.full((B,), 2), vocab_size=V)
    for step in range(9):
        if step % 3 == 0:  # read now and then: the appends since are folded in
            seen_pairs(h)
        new = torch.randint(0, V, (B,), generator=g)
        new[0] = h.tokens[0, -1]  # a token the row has already seen
        h.append(new)
    assert seen_pairs(h) == sorted(map(tuple, History(h.tokens, h.prompt_lens, vocab_size=V)
                                       .seen.nonzero().tolist()))


def history_with_state(B, T, V, seed, prompt_len=2, key="k"):
    g = torch.Generator().manual_seed(seed)
    h = History(torch.randint(0, V, (B, T), generator=g), torch.full((B,), prompt_len),
                generators=gens(*range(seed, seed + B)))
    h.state[key] = torch.arange(B, dtype=torch.float64) + 10 * seed
    return h


def test_history_state_and_generators_follow_select():
    h = history_with_state(4, 5, 20, seed=1)
    h.build(20)
    picked = h.select([3, 1])
    assert picked.state["k"].tolist() == [13.0, 11.0]
    assert picked.generators == [h.generators[3], h.generators[1]]
    assert picked.select(torch.tensor([1])).generators == [h.generators[1]]


def test_history_cat_equals_the_rows_built_together():
    V = 20
    a = history_with_state(2, 5, V, seed=1)
    b = History(torch.randint(0, V, (3, 3), generator=torch.Generator().manual_seed(2)),
                torch.tensor([1, 2, 3]), generators=gens(7, 8, 9),
                attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1]]))
    b.state["other"] = torch.ones(3, 2)
    a.build(V)
    a.append(torch.tensor([4, 5]))  # built and appended: counts carry generated tokens
    both = History.cat([a, b])
    mask = torch.tensor([[1] * 6] * 2 + [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]],
                        dtype=torch.bool)
    assert torch.equal(both.attention_mask, mask)
    assert torch.equal(both.tokens[:2], a.tokens) and torch.equal(both.tokens[2:, 3:], b.tokens)
    fresh = History(both.tokens, torch.tensor([2, 2, 1, 2, 3]), vocab_size=V, attention_mask=mask)
    fresh_counts = fresh.counts.clone()
    fresh_counts[:2] = a.counts  # a's generated tokens: its prompt was 2 of 5, then 1 appended
    assert torch.equal(both.counts, fresh_counts) and torch.equal(both.seen, fresh.seen)
    assert both.generators == a.generators + b.generators
    assert both.state["k"][:2].tolist() == [10.0, 11.0] and both.state["k"][2:].isnan().all()
    assert both.state["other"][:2].isnan().all() and (both.state["other"][2:] == 1).all()
    back = both.select([2, 3, 4])  # each request's rows back, state included
    assert torch.equal(back.state["other"], b.state["other"]) and back.generators == b.generators
    with pytest.raises(ValueError, match="generators"):
        History.cat([a, History(torch.zeros(1, 2, dtype=torch.long), torch.tensor([1]))])


def test_sample_uses_the_history_generators():
    logits = rand_logits(B=3, V=50, seed=4)
    stack = SamplerStack.from_settings(temperature=0.9)
    h = History(torch.zeros(3, 1, dtype=torch.long), torch.ones(3), generators=gens(1, 2, 3))
    a, _ = stack.sample(logits, h)
    b, _ = stack.sample(logits, generator=gens(1, 2, 3))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# issue 20's stages, each against HF's warper or a float64 formula written here from the papers
# and llama.cpp's source (independent of minilm.sampling)

def ref_softmax(x):
    """float64 probabilities over the kept (finite) entries of a 1-D array; 0 elsewhere."""
    x = np.asarray(x, dtype=np.float64)
    e = np.where(np.isfinite(x), np.exp(x - x[np.isfinite(x)].max()), 0.0)
    return e / e.sum()


def ref_top_n_sigma(x, n):
    """Tang et al. 2024 / llama.cpp: remove x < max - n·σ, σ the population std of the finite x."""
    x = np.array(x, dtype=np.float64)
    f = x[np.isfinite(x)]
    if n <= 0 or f.size <= 1:
        return x
    x[x < f.max() - n * math.sqrt(((f - f.mean()) ** 2).mean())] = -INF
    return x


def ref_xtc(x, threshold, probability, coin):
    """llama.cpp's XTC: if coin < probability, of the tokens with p >= threshold (at least two)
    remove all but the least likely (of equally least likely ones, the highest id stays)."""
    x = np.array(x, dtype=np.float64)
    p = ref_softmax(x)
    if coin >= probability or threshold > 0.5:
        return x
    above = [i for i in np.argsort(-x, kind="stable") if p[i] > 0 and p[i] >= threshold]
    if len(above) < 2:
        return x
    low = min(x[above])
    stays = max(i for i in above if x[i] == low)
    x[[i for i in above if i != stays]] = -INF
    return x


def ref_dry(x, context, multiplier, base, allowed, last_n, breakers):
    """DRY as llama.cpp defines it (llama_sampler_dry_apply), by brute force over the window."""
    x = np.array(x, dtype=np.float64)
    W = list(context)[-last_n:] if last_n > 0 else list(context)
    N = len(W)
    if multiplier == 0 or last_n == 0 or N <= allowed:
        return x
    rep_limit = N
    for h in range(N - 1, -1, -1):  # the most recent complete breaker, its longest tail
        tails = [len(b) - 1 for b in breakers if W[h:h + len(b)] == list(b)]
        if tails:
            rep_limit = N - 1 - h - max(tails)
            break
    if rep_limit < allowed:
        return x
    longest = {}
    for e in range(N - 1):
        n = 0
        while n <= e and W[e - n] == W[N - 1 - n]:
            n += 1
        n = min(n, rep_limit)
        if n >= allowed:
            longest[W[e + 1]] = max(longest.get(W[e + 1], 0), n)
    singles = {b[0] for b in breakers if len(b) == 1}
    cap = int(88.7228391 / math.log(base)) if base > 1.000001 else None
    for t, n in longest.items():
        if t not in singles:
            x[t] -= multiplier * base ** (n - allowed if cap is None else min(n - allowed, cap))
    return x


def as_row(x, dtype=torch.float64):
    return torch.tensor(np.asarray(x), dtype=dtype)[None]


def same_kept_values(ours, ref):
    """Equal kept sets, equal values (float64) on them."""
    ours = ours[0].double().numpy() if torch.is_tensor(ours) else ours
    assert (np.isfinite(ours) == np.isfinite(ref)).all()
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=0, atol=1e-12)


HF_NEW = [
    *[pytest.param(EpsilonCutoff(e), EpsilonLogitsWarper(e), id=f"epsilon={e}")
      for e in (3e-4, 0.01, 0.2, 0.9)],
    *[pytest.param(EtaCutoff(e), EtaLogitsWarper(e), id=f"eta={e}") for e in (3e-4, 2e-3, 0.05, 0.5)],
    *[pytest.param(TopH(t), TopHLogitsWarper(t), id=f"top_h={t}") for t in (0.1, 0.4, 0.7, 0.95, 1.0)],
]


@pytest.mark.parametrize("ours,hf", HF_NEW)
@pytest.mark.parametrize("n_removed", [0, 100, 250])
def test_new_processor_matches_hf(ours, hf, n_removed):
    for seed in range(3):
        for scale in (0.5, 3.0):
            logits = rand_logits(seed=seed, n_removed=n_removed, scale=scale)
            torch.testing.assert_close(ours(logits), hf(None, logits.clone()), rtol=0, atol=0)


def test_epsilon_eta_top_h_boundaries():
    quarter = torch.tensor([[0.5, 0.25, 0.25, 0.0]]).log()   # p 1/2, 1/4, 1/4, 0
    p = ref_softmax(quarter[0].numpy())[1]
    assert kept(EpsilonCutoff(p * (1 - 1e-9))(quarter)) == [0, 1, 2]  # p < ε removes
    assert kept(EpsilonCutoff(p * (1 + 1e-9))(quarter)) == [0]
    uniform = torch.zeros(2, 10)                              # all tied with the top: all stay
    assert len(kept(EpsilonCutoff(0.5)(uniform))) == len(kept(EtaCutoff(0.5)(uniform))) == 20
    peaked = torch.tensor([[4.0, 1.0, 0.5, -2.0, -INF]], dtype=torch.float64)
    p = ref_softmax(peaked[0].numpy())
    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    for eps in (1e-3, 0.02, 0.1, 0.6):
        eta = min(eps, math.sqrt(eps) * math.exp(-entropy))
        assert kept(EtaCutoff(eps)(peaked)) == [i for i in range(5) if p[i] >= eta or i == 0], eps
        for proc, warper in ((EtaCutoff(eps), EtaLogitsWarper(eps)),
                             (EpsilonCutoff(eps), EpsilonLogitsWarper(eps))):
            assert torch.equal(proc(peaked), warper(None, peaked.clone()))
    wide = rand_logits(B=2, V=300, seed=9)
    assert max((TopH(1.0)(wide) > -INF).sum(-1).tolist()) <= 100   # τ = 1 still caps at 100
    few = torch.full((1, 300), -INF)
    few[0, [3, 70, 200]] = torch.tensor([1.0, 2.0, 0.5])
    assert set(kept(TopH(1.0)(few))) <= {3, 70, 200} and 70 in kept(TopH(0.01)(few))
    one = torch.full((1, 300), -INF)
    one[0, 5] = 0.0
    for proc in (TopH(0.5), EpsilonCutoff(0.5), EtaCutoff(0.5), TopNSigma(1.0), XTC(0.0, 1.0)):
        assert kept(proc(one)) == [5], proc.name


def random_rows(seed, V, removed, n=60):
    """(i, float64 row): three spreads; every other row with `removed` tokens already at -inf."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = rng.normal(0, [0.5, 2.0, 5.0][i % 3], size=V)
        if i % 2:
            x[rng.choice(V, removed, replace=False)] = -INF
        yield i, x


def test_top_n_sigma_matches_the_formula():
    for _, x in random_rows(0, 200, removed=70):
        for n in (-1.0, 0.0, 0.5, 1.0, 2.5):
            same_kept_values(TopNSigma(n)(as_row(x)), ref_top_n_sigma(x, n))
    # llama.cpp's test vectors (tests/test-sampling.cpp): probabilities .1 .2 .3 .4
    base = as_row(np.log([0.1, 0.2, 0.3, 0.4]))
    assert kept(TopNSigma(1.0)(base)) == [2, 3] and kept(TopNSigma(3.0)(base)) == [0, 1, 2, 3]
    # the same tokens after any temperature (max and σ scale alike)
    x = rand_logits(B=4, V=500, seed=3).double()
    for t in (0.3, 0.7, 2.0):
        assert torch.equal(TopNSigma(1.5)(x) > -INF, TopNSigma(1.5)(x / t) > -INF)


def test_xtc_matches_the_formula():
    for i, x in random_rows(1, 40, removed=10):
        if i % 5 == 0:
            x[:6] = x[0]  # a tie among the tokens above the threshold
        for threshold in (0.0, 0.02, 0.1, 0.3, 0.6):
            for coin in (0.05, 0.5, 0.95):
                ours = XTC(threshold, 0.5)(as_row(x), coins=torch.tensor([coin], dtype=torch.float64))
                same_kept_values(ours, ref_xtc(x, threshold, 0.5, coin))
    # llama.cpp's vectors: probabilities .4 .3 .2 .1, probability .99 (the coin says act)
    x = as_row(np.log([0.4, 0.3, 0.2, 0.1]))
    act = torch.zeros(1, dtype=torch.float64)
    for threshold, expected in ((0.09, [3]), (0.19, [2, 3]), (0.29, [1, 2, 3]), (0.39, [0, 1, 2, 3])):
        assert kept(XTC(threshold, 0.99)(x, coins=act)) == expected
    assert kept(XTC(0.09, 0.5)(x, coins=torch.tensor([0.5], dtype=torch.float64))) == [0, 1, 2, 3]
    assert kept(XTC(0.09, 1.0)(x)) == [3]  # no coin (the stages view): as when it acts


def test_xtc_coin_comes_from_the_row_generator_before_the_draw():
    """Per row: its generator gives the coin, then the draw's u; seeds reproduce both."""
    logits = torch.tensor([[2.0, 1.9, 1.8, 0.0, -1.0]]).expand(200, -1)
    stack = SamplerStack([XTC(0.1, 0.5)])
    tokens, _ = stack.sample(logits, generator=gens(*range(200)))
    replay = gens(*range(200))
    coins = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in replay])
    acted = XTC(0.1, 0.5)(logits, coins=coins)
    assert torch.equal(tokens, _draw(torch.softmax(acted, -1), replay))
    assert 60 < int((coins < 0.5).sum()) < 140 and (tokens[coins < 0.5] >= 2).all()


def test_xtc_draws_follow_the_mixture():
    logits = torch.tensor([[1.5, 1.2, 0.9, 0.2, -0.5, -1.0]])
    n = 6000
    tokens, _ = SamplerStack([XTC(0.15, 0.4)]).sample(logits.expand(n, -1),
                                                      generator=gens(*range(n)))
    acted = torch.softmax(XTC(0.15, 0.4)(logits), -1)[0].double()
    assert_chi_square(tokens, 0.4 * acted + 0.6 * torch.softmax(logits, -1)[0].double())


def repetitive_context(rng, V, length):
    motif = list(rng.integers(0, V, size=rng.integers(2, 9)))
    ctx = []
    while len(ctx) < length:
        ctx += motif[:rng.integers(1, len(motif) + 1)] + [int(rng.integers(V))]
    return ctx[:length]


def test_dry_matches_the_definition():
    rng = np.random.default_rng(2)
    V = 16
    for i in range(300):
        ctx = repetitive_context(rng, V, int(rng.integers(2, 150)))
        breakers = [[int(t)] for t in rng.choice(V, size=rng.integers(0, 3), replace=False)]
        if i % 3 == 0:
            breakers.append([int(t) for t in rng.integers(0, V, size=int(rng.integers(2, 4)))])
        m, base = float(rng.choice([0.8, 2.0])), float(rng.choice([1.75, 1.01, 1.0000005]))
        allowed, last_n = int(rng.integers(1, 4)), int(rng.choice([-1, 7, 50]))
        x = rng.normal(0, 2, size=V)
        ours = DRY(m, base, allowed, last_n, breakers)(as_row(x), History(torch.tensor([ctx]),
                                                                         torch.tensor([1])))
        same_kept_values(ours, ref_dry(x, ctx, m, base, allowed, last_n, breakers))


def test_dry_planted_repeats():
    # llama.cpp's own comment example: a b c c b c y a b c -> c extends "a b" (3), y "b c" (2),
    # b "c" (1); with allowed length 1 and base 2 the penalties are 2^2, 2^1, 2^0
    a, b, c, y = 0, 1, 2, 3
    h = History(torch.tensor([[a, b, c, c, b, c, y, a, b, c]]), torch.tensor([1]))
    out = DRY(1.0, 2.0, 1, -1)(torch.zeros(1, 5, dtype=torch.float64), h)
    assert out[0].tolist() == [0.0, -1.0, -4.0, -2.0, 0.0]
    # a 70-token passage repeated: L = 69 before its last token, the exponent 67 is capped at
    # int(88.7228391 / ln 4) = 63 (88.7228391 is a hair below 64 ln 4)
    passage = list(range(10, 80))
    h = History(torch.tensor([passage + [5] + passage[:-1]]), torch.tensor([1]))
    out = DRY(0.5, 4.0, 2, -1)(torch.zeros(1, 100, dtype=torch.float64), h)
    assert out[0, 79] == -0.5 * 4.0 ** 63 and (out[0, :79] == 0).all()
    # a breaker in the repeat limits it to the tokens after the breaker
    h = History(torch.tensor([[1, 2, 3, 4, 9, 1, 2, 3]]), torch.tensor([1]))
    free = DRY(1.0, 2.0, 2, -1)(torch.zeros(1, 10, dtype=torch.float64), h)
    broken = DRY(1.0, 2.0, 2, -1, breakers=[[2]])(torch.zeros(1, 10, dtype=torch.float64), h)
    assert free[0, 4] == -2.0 and broken[0, 4] == 0  # "1 2 3" (L 3) vs only "3" after the 2


def test_dry_state_follows_appends_padding_and_select():
    """The match lengths kept in History.cache, extended per appended token, equal the definition
    at every step, with left-padded rows and after rows leave."""
    rng = np.random.default_rng(3)
    V, steps = 12, 40
    prompts = [repetitive_context(rng, V, n) for n in (9, 3, 6)]
    T = max(map(len, prompts))
    tokens = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.bool)
    h = History(tokens, torch.tensor([len(p) for p in prompts]), attention_mask=mask)
    dry = DRY(0.8, 1.75, 2, 30, breakers=[[7], [3, 4]])
    rows, contexts = [0, 1, 2], [list(p) for p in prompts]
    for step in range(steps):
        x = rng.normal(0, 2, size=(len(rows), V))
        ours = dry(torch.tensor(x), h)
        for r, ctx in enumerate(contexts):
            same_kept_values(ours[r:r + 1], ref_dry(x[r], ctx, 0.8, 1.75, 2, 30, [[7], [3, 4]]))
        new = [ctx[-2] if rng.random() < 0.7 and len(ctx) > 1 else int(rng.integers(V))
               for ctx in contexts]
        h.append(torch.tensor(new))
        for ctx, t in zip(contexts, new):
            ctx.append(t)
        if step == steps // 2:  # the middle row leaves the batch
            h, rows, contexts = h.select([0, 2]), [0, 2], [contexts[0], contexts[2]]
    assert DRY.CACHE in h.cache


def test_dry_breaker_texts_become_token_sequences():
    tok = CharTokenizer("\nab:c")
    ids = {ch: tok.encode(ch)[0] for ch in "\nab:c"}
    # "\n" and ":" are in one token each; "ab" is in none, but "a" ends with its prefix "a"
    got = breaker_sequences(["\n", ":", "ab"], tok)
    assert sorted(got) == sorted([(ids["\n"],), (ids[":"],), (ids["a"], ids["b"])])
    s = SamplerSettings(dry_multiplier=0.8, dry_sequence_breakers=["\n", "ab"])
    dry = SamplerStack.from_settings(s, tokenizer=tok).processors[0]
    assert dry.single == [ids["\n"]] and dry.multi == [(ids["a"], ids["b"])]
    with pytest.raises(SettingError, match="needs the tokenizer") as info:
        SamplerStack.from_settings(s)
    assert info.value.param == "dry_sequence_breakers"


def test_dry_default_breakers_on_gpt2():
    """The four defaults ("\\n", ":", '"', "*") are the tokens containing them: 204 on GPT-2."""
    bpe = gpt2_bpe()
    got = breaker_sequences(SamplerSettings().dry_sequence_breakers, bpe)
    expected = [t for t in range(bpe.vocab_size)
                if any(ch in bpe.decode([t]) for ch in ("\n", ":", '"', "*"))]
    assert sorted(got) == [(t,) for t in expected] and len(expected) == 204


def mirostat_history(B, tau=None, mu=None):
    h = History(torch.zeros(B, 1, dtype=torch.long), torch.ones(B))
    if mu is not None:
        h.state[Mirostat.STATE] = torch.tensor(mu, dtype=torch.float64)
    return h


def test_mirostat_first_step_matches_the_formula():
    """μ starts at 2τ: keep the tokens of surprise −log2 p <= 2τ; after the draw μ = 2τ −
    η(−log2 q(token) − τ), q the truncated distribution renormalised (llama.cpp's mirostat v2)."""
    tau, eta = 1.5, 0.1
    x = np.array([2.0, 1.6, 0.4, 0.1, -0.3, -1.0, -INF, -3.0])
    p = ref_softmax(x)
    truncated = np.where((p > 0) & (-np.log2(np.where(p > 0, p, 1)) <= 2 * tau), x, -INF)
    q = ref_softmax(truncated)
    B = 500
    h = mirostat_history(B)
    stack = SamplerStack([Mirostat(tau, eta)])
    logits = as_row(x, torch.float32).expand(B, -1)
    shown = stack.stages(logits, h)[-1][1]
    assert Mirostat.STATE not in h.state and (shown[0] > -INF).tolist() == list(truncated > -INF)
    tokens, _ = stack.sample(logits, h, generator=gens(*range(B)))
    expected = 2 * tau - eta * (-np.log2(q[tokens.numpy()]) - tau)
    np.testing.assert_allclose(h.state[Mirostat.STATE].numpy(), expected, rtol=0, atol=1e-6)
    assert_chi_square(tokens, torch.tensor(q))
    # no token of surprise <= μ: the most likely one alone
    none = mirostat_history(1, mu=[-1.0])
    assert kept(Mirostat(tau, eta)(as_row(x), none)) == [0]


def test_mirostat_state_survives_rows_leaving():
    """A row's μ (and tokens) are its own: rows 0 and 2 of a batch whose row 1 leaves draw what
    they draw alone."""
    V = 40
    base = torch.randn(V, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    stack = SamplerStack.from_settings(temperature=0.9, mirostat=2, mirostat_tau=3.0)

    def logits_of(h):  # logits depend on each row's last token, as a model's would
        return (base + torch.roll(base, 3) * h.tokens[:, -1:].double() / V).float()

    def run(seeds, leave_at=None, steps=12):
        h = History(torch.tensor([[s % V] for s in seeds]), torch.ones(len(seeds)),
                    generators=gens(*seeds))
        out = [[] for _ in seeds]
        alive = list(range(len(seeds)))
        for step in range(steps):
            if step == leave_at:
                h, alive = h.select([0, 2]), [alive[0], alive[2]]
            tokens, _ = stack.sample(logits_of(h), h)
            h.append(tokens)
            for r, t in zip(alive, tokens.tolist()):
                out[r].append(t)
        return out, h.state[Mirostat.STATE]

    batch, mu = run([11, 12, 13], leave_at=5)
    for r, seed in ((0, 11), (2, 13)):
        alone, mu_alone = run([seed])
        assert batch[r] == alone[0]
        assert mu[[0, 2].index(r)] == mu_alone[0]


def test_classifier_free_guidance_matches_hf_and_the_formula():
    from transformers.generation.logits_process import (
        UnbatchedClassifierFreeGuidanceLogitsProcessor,
    )

    g = torch.Generator().manual_seed(6)
    cond = torch.randn(3, 50, generator=g, dtype=torch.float64) * 3
    uncond = torch.randn(3, 50, generator=g, dtype=torch.float64) * 3

    class Stub(dict):  # HF's processor runs the model on the unconditional context: return uncond
        def __init__(self):
            super().__init__(logits=uncond[:, None])
            self.logits = uncond[:, None]

    for scale in (1.5, 3.0, 0.0, -0.5):
        hf = UnbatchedClassifierFreeGuidanceLogitsProcessor(scale, lambda ids, **kw: Stub())
        ours = classifier_free_guidance(cond, uncond, scale)
        torch.testing.assert_close(ours, hf(torch.zeros(3, 2, dtype=torch.long), cond.clone()),
                                   rtol=0, atol=1e-12)
        c, u = cond.numpy(), uncond.numpy()
        lc = c - np.log(np.exp(c).sum(-1, keepdims=True))
        lu = u - np.log(np.exp(u).sum(-1, keepdims=True))
        np.testing.assert_allclose(ours.numpy(), scale * (lc - lu) + lu, rtol=0, atol=1e-12)


def test_guidance_runs_first_and_keeps_raw_logprobs_conditional():
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(2, 30, generator=g) * 2, torch.randn(2, 30, generator=g) * 2
    stack = SamplerStack.from_settings(guidance_scale=2.0, temperature=0.5, top_k=5)
    assert [p.name for p in stack.processors] == ["guidance", "temperature", "top_k"]
    guided = classifier_free_guidance(cond, uncond, 2.0)
    assert torch.equal(stack.apply(cond, unconditional_logits=uncond), TopK(5)(guided / 0.5))
    tokens, info = stack.sample(cond, unconditional_logits=uncond, generator=gens(1, 2))
    torch.testing.assert_close(info.logprobs, torch.log_softmax(cond, -1).gather(
        -1, tokens[:, None])[:, 0])
    with pytest.raises(ValueError, match="unconditional rows' logits"):
        stack.sample(cond)
    assert unconditional_prompt(None, [5, 6, 7], None, 10) == [7]  # HF's default: the last token
    assert unconditional_prompt("ab", [5], CharTokenizer("abc").encode, 4) == [0, 1]
    assert unconditional_prompt((2, 3), [5], None, 4) == [2, 3]
    with pytest.raises(SettingError, match=r"negative_prompt must be token ids in \[0, 3\]"):
        unconditional_prompt((2, 9), [5], None, 4)


NEW_ON_CANDIDATES = [
    [TopK(30), MinP(0.05), EpsilonCutoff(0.004), EtaCutoff(0.004)],
    [TopK(40), TopH(0.7), XTC(0.03, 1.0), Temperature(0.8)],
    [Temperature(0.7), TopK(60), TopP(0.9), TopH(0.95), XTC(0.02, 1.0), Mirostat(2.0, 0.1)],
    [TopK(20), Mirostat(0.5, 0.1)],
    [Temperature(0.8), TopH(0.9), TopK(40), MinP(0.05), XTC(0.05, 1.0)],  # top-H narrows first
    [TopH(0.5), EtaCutoff(0.01), Mirostat(2.0, 0.1)],
]


@pytest.mark.parametrize("procs", NEW_ON_CANDIDATES,
                         ids=lambda procs: "-".join(p.name for p in procs))
def test_new_stages_on_candidates_equal_apply(procs):
    stack = SamplerStack(procs)
    logits = rand_logits(B=6, V=500, seed=8, n_removed=100)
    logits[2, 5:] = -INF  # fewer than k tokens left
    h = mirostat_history(6, mu=[4.0, 1.0, 0.0, 9.0, -2.0, 3.0])
    values, ids = stack._candidates(logits, h, {"coins": torch.zeros(6, dtype=torch.float64)})
    assert ids is not None  # the stages after the TopK ran on its candidates
    values = torch.full_like(logits, -INF).scatter(-1, ids, values)
    assert torch.equal(values, stack.apply(logits, h))


def test_showing_the_stages_draws_nothing_and_changes_no_state():
    stack = SamplerStack.from_settings(xtc_probability=0.5, mirostat=2, mirostat_tau=2.0)
    generators = gens(0, 1)
    h = History(torch.zeros(2, 1, dtype=torch.long), torch.ones(2), generators=generators)
    before = [g.get_state() for g in generators]
    stack.stages(rand_logits(B=2, V=40), h)
    assert all(torch.equal(a, g.get_state()) for a, g in zip(before, generators))
    assert h.state == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device sync shows on CUDA only")
def test_sampling_queues_without_syncing_the_device():
    """No penalty read, no sort (top-k/p, typical): sample() and History.append only queue work
    (torch's sync debug mode raises on any sync); a row with no token left then gets -1."""
    dev, B, V = "cuda", 4, 2000
    logits = rand_logits(B=B, V=V).to(dev)
    uncond = logits.roll(1, -1)
    h = History(torch.randint(0, V, (B, 40)).to(dev), torch.full((B,), 20), vocab_size=V,
                generators=[torch.Generator(device=dev).manual_seed(i) for i in range(B)])
    stack = SamplerStack.from_settings(
        guidance_scale=1.5, dry_multiplier=0.8, temperature=0.8, top_n_sigma=2.0, top_h=0.95,
        min_p=0.02, epsilon_cutoff=3e-4, eta_cutoff=3e-4, xtc_probability=0.5, mirostat=2,
        tokenizer=CharTokenizer("ab\n:"))
    greedy = SamplerStack([Temperature(0)])
    empty = logits.clone()
    empty[1] = -INF
    for check in (False, True):  # a warm-up (caches, tables), then the same under the check
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            tokens, info = stack.sample(logits, h, unconditional_logits=uncond)
            h.append(tokens)
            left, left_info = greedy.sample(empty)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert (tokens >= 0).all() and left.tolist()[1] == -1 and left_info.processed_logprobs[1].isnan()
    assert torch.equal(h.counts.sum(-1).cpu(), torch.full((B,), 22))  # 20 of 40, 2 appended


def test_top_k_candidates_of_a_row_with_fewer_tokens_left_are_few():
    """A row with fewer than k tokens left (after top-H or top-nσ, say) keeps those: the candidates
    stay MIN_CANDIDATES wide, not the whole vocabulary (a sort of all V on every step)."""
    logits = rand_logits(B=3, V=5000, seed=2)
    logits[1, 10:] = -INF  # 10 tokens left, k = 50
    values, ids = TopK(50).candidates(logits, 64)
    assert values.shape == (3, 64)
    assert sorted(ids[1][values[1] > -INF].tolist()) == list(range(10))
    full = torch.full_like(logits, -INF).scatter(-1, ids, values)
    assert torch.equal(full, TopK(50)(logits))
