"""generate()/complete() against a plain reference: a full forward over the whole window each step.

The models are tiny and float64, so the cached and recomputed logits agree to ~1e-15 and no argmax
can flip by rounding; the token embedding is scaled up so that the logits are spread (std ~ 2) and
temperature → 0 really is greedy.
"""
import copy

import pytest
import torch

from minilm.model.gpt import GPT, GPTConfig
from minilm.sampling.batch import RunningBatch
from minilm.sampling.generation import complete, generate, next_token_stages, next_token_table
from minilm.sampling.history import History
from minilm.sampling.prefix_cache import PrefixCache
from minilm.sampling.request import Request, greedy
from minilm.sampling.stack import SamplerStack
from minilm.sampling.stages import Temperature
from minilm.tokenizer import CharTokenizer

V = 32
CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"  # 31 characters + end-of-text = V


def tiny_model(block_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=block_size))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(15)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine their sync costs dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


def reference(model: GPT, prompt: list[int], n: int, sampler: SamplerStack | None = None,
              seed: int | None = None) -> list[int]:
    """No cache: each step runs the model over the row's last block_size tokens (nanoGPT's
    idx[:, -block_size:])."""
    block_size = model.config.block_size
    seq = list(prompt)
    history = History(torch.tensor([prompt]), prompt_lens=torch.tensor([len(prompt)]))
    generators = None if seed is None else [torch.Generator().manual_seed(seed)]
    sampler = sampler or greedy()
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([seq[-block_size:]]))[:, -1]  # [1, V]
            token, _ = sampler.sample(logits, history, generator=generators)
            history.append(token)
            seq.append(token.item())
    return seq[len(prompt):]


def tokens_of(results) -> list[list[int]]:
    return [r.tokens for r in results]


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
STACK = dict(temperature=1.5, top_k=12, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.5,
             frequency_penalty=0.3)


def test_kv_cache_matches_recompute_greedy(model):
    (result,) = complete(model, PROMPTS[1], 30)
    assert result.tokens == reference(model, PROMPTS[1], 30)
    assert result.finish_reason == "length"


def test_kv_cache_matches_recompute_sampled(model):
    stack = SamplerStack.from_settings(**STACK)
    (result,) = complete(model, [PROMPTS[1]], 30, sampler=stack, seed=7)
    assert result.tokens == reference(model, PROMPTS[1], 30, stack, seed=7)


@pytest.mark.parametrize("settings", [None, STACK], ids=["greedy", "sampled"])
@pytest.mark.parametrize("use_eos", [False, True], ids=["no_eos", "eos"])
def test_mixed_length_batch_equals_each_prompt_alone(model, settings, use_eos):
    stack = settings and SamplerStack.from_settings(**settings)
    seeds = [11, 12, 13, 14]
    eos_id = None
    if use_eos:  # a token row 0 draws early on, so that rows leave the batch at different steps
        eos_id = complete(model, PROMPTS, 25, sampler=stack, seed=seeds)[0].tokens[3]
    batch = complete(model, PROMPTS, 25, sampler=stack, seed=seeds, eos_id=eos_id, logprobs=2)
    for prompt, seed, got in zip(PROMPTS, seeds, batch):
        (alone,) = complete(model, [prompt], 25, sampler=stack, seed=seed, eos_id=eos_id,
                            logprobs=2)
        assert got.tokens == alone.tokens
        assert got.finish_reason == alone.finish_reason
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs))
        assert [[i for i, _ in top] for top in got.top_logprobs] == \
            [[i for i, _ in top] for top in alone.top_logprobs]
    if use_eos:
        assert batch[0].finish_reason == "stop" and len(batch[0].tokens) <= 4
        assert len({len(r.tokens) for r in batch}) > 1


def test_seed_reproducibility(model):
    stack = SamplerStack.from_settings(temperature=2.0)
    a = tokens_of(complete(model, [PROMPTS[0]] * 3, 20, sampler=stack, seed=[1, 2, 1]))
    b = tokens_of(complete(model, [PROMPTS[0]] * 3, 20, sampler=stack, seed=[1, 2, 1]))
    assert a == b
    assert a[0] == a[2] != a[1]
    same = tokens_of(complete(model, [PROMPTS[0]] * 2, 20, sampler=stack, seed=3))
    assert same[0] == same[1]  # an int seed is every row's seed


def test_greedy_equals_top_k_1_and_temperature_to_zero(model):
    expected = tokens_of(complete(model, PROMPTS, 20))
    for settings in (dict(top_k=1), dict(temperature=0.0), dict(temperature=1e-3)):
        got = complete(model, PROMPTS, 20, sampler=SamplerStack.from_settings(**settings), seed=0)
        assert tokens_of(got) == expected, settings


def test_eos_and_stop_end_each_row(model):
    free = tokens_of(complete(model, PROMPTS[:2], 30))
    k = 4
    eos = free[0][k]
    k = free[0].index(eos)  # its first occurrence
    results = complete(model, PROMPTS[:2], 30, eos_id=eos)
    assert results[0].tokens == free[0][:k + 1] and results[0].finish_reason == "stop"
    other = free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert results[1].tokens == other

    stop_ids = free[0][5:7]  # a two-token stop sequence
    end = next(i + 2 for i in range(len(free[0]) - 1) if free[0][i:i + 2] == stop_ids)
    (r,) = complete(model, PROMPTS[0], 30, stop=[stop_ids, [V - 1] * 9])
    assert r.tokens == free[0][:end] and r.finish_reason == "stop"

    tokenizer = CharTokenizer(CHARS)
    stop_text = tokenizer.decode(stop_ids)
    end = tokenizer.decode(free[0]).index(stop_text) + len(stop_text)
    (r,) = complete(model, PROMPTS[0], 30, stop=[stop_text], decode=tokenizer.decode)
    assert r.tokens == free[0][:end] and r.finish_reason == "stop"


def test_streaming_steps_drop_finished_rows(model):
    free = tokens_of(complete(model, PROMPTS[:2], 12))
    eos = free[0][2]
    stream = generate(model, PROMPTS[:2], 12, eos_id=eos)
    steps = [next(stream)]
    assert not torch.is_inference_mode_enabled()  # only inside each step, not between them
    steps += list(stream)
    assert steps[0].rows == [0, 1]
    stop_at = free[0].index(eos)
    assert steps[stop_at].finish_reasons[0] == "stop"
    if eos not in free[1][:stop_at + 1]:
        assert all(s.rows == [1] for s in steps[stop_at + 1:])
    assert steps[-1].finish_reasons[-1] in ("stop", "length")


@pytest.mark.parametrize("lengths", [[5], [20], [5, 12, 20]])
def test_sliding_window_matches_recompute_on_the_last_block_size_tokens(lengths):
    model = tiny_model(block_size=16, seed=1)
    prompts = [[(3 * i + 7 * n) % V for i in range(n)] for n in lengths]
    stack = SamplerStack.from_settings(temperature=1.3, repetition_penalty=1.2)
    for sampler in (None, stack):
        results = complete(model, prompts, 40, sampler=sampler, seed=5)
        for prompt, r in zip(prompts, results):
            assert r.tokens == reference(model, prompt, 40, sampler, seed=5)


def window_logprobs(reference: GPT, prompt: list[int], tokens: list[int]) -> list[float]:
    """Each token's log-probability under `reference` run on exactly the block_size tokens before
    it (all of them while there are fewer): nanoGPT's idx[:, -block_size:], no cache."""
    block_size = reference.config.block_size
    seq = prompt + tokens
    with torch.no_grad():
        return [torch.log_softmax(reference(torch.tensor([seq[:i][-block_size:]]))[0, -1],
                                  dim=-1)[seq[i]].item() for i in range(len(prompt), len(seq))]


def past_the_window(prompt: list[int], tokens: list[int], block_size: int) -> int:
    """How many of the tokens were predicted from a context longer than block_size."""
    return sum(len(prompt) + i > block_size for i in range(len(tokens)))


def assert_window_logprobs(model: GPT, prompt: list[int], tokens: list[int],
                           logprobs: list[float]) -> None:
    """The logprobs generation returned are a float64 copy of the model's on the last block_size
    tokens before each token, within 1e-4."""
    reference = copy.deepcopy(model).double()
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.double),
                               torch.tensor(window_logprobs(reference, prompt, tokens),
                                            dtype=torch.double), atol=1e-4, rtol=0)


WINDOW_PROMPTS = [[(5 * i + 3 * n) % V for i in range(n)] for n in (3, 11, 16, 23)]  # block 16


@pytest.mark.parametrize("settings", [None, STACK], ids=["greedy", "sampled_with_penalties"])
def test_logprobs_past_the_window_are_the_models_on_the_last_block_size_tokens(settings):
    """fp32 generation, rows of different prompt lengths (one longer than block_size), 50 tokens
    each: every token past block_size is predicted from exactly the last block_size tokens."""
    model = tiny_model(block_size=16, seed=5, dtype=torch.float32)
    stack = settings and SamplerStack.from_settings(**settings)
    results = complete(model, WINDOW_PROMPTS, 50, sampler=stack, seed=[1, 2, 3, 4])
    for prompt, r in zip(WINDOW_PROMPTS, results):
        assert len(r.tokens) == 50 and past_the_window(prompt, r.tokens, 16) >= 30
        assert_window_logprobs(model, prompt, r.tokens, r.logprobs)


def test_rows_inside_their_window_still_decode_from_the_cache():
    """A batch mixing rows past block_size and rows inside it: a step recomputes the windows of
    the rows past it only; the others feed one token each."""
    model = tiny_model(block_size=16, seed=5, dtype=torch.float32)
    shapes = []
    hook = model.transformer.wte.register_forward_hook(lambda m, args, out: shapes.append(
        tuple(args[0].shape)))
    try:
        list(generate(model, [WINDOW_PROMPTS[0], WINDOW_PROMPTS[3]], 3))
    finally:
        hook.remove()
    # prefill [2, 16] (prompts of 3 and 23 tokens, windows of 3 and 16), then per step the
    # window of the row past block_size (its last 15 tokens, the 16th is fed) and one token a row
    assert shapes == [(2, 16), (1, 15), (2, 1), (1, 15), (2, 1)]


def test_logprobs_are_raw_log_softmax_at_chosen_tokens(model):
    stack = SamplerStack.from_settings(temperature=1.7, top_k=8)
    results = complete(model, PROMPTS, 15, sampler=stack, seed=[1, 2, 3, 4], logprobs=3)
    for prompt, r in zip(PROMPTS, results):
        seq = torch.tensor([prompt + r.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1].float(), dim=-1)  # [n, V]
        chosen = torch.tensor(r.tokens)
        torch.testing.assert_close(torch.tensor(r.logprobs), logp.gather(1, chosen[:, None])[:, 0])
        top = logp.topk(3, dim=-1)
        assert [[i for i, _ in t] for t in r.top_logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[lp for _, lp in t] for t in r.top_logprobs]),
                                   top.values)
        assert all(p <= 0 for p in r.processed_logprobs)
    (g,) = complete(model, PROMPTS[0], 5)
    assert g.processed_logprobs == [0.0] * 5  # greedy: the processed distribution is one token


def test_next_token_stages(model):
    stack = SamplerStack.from_settings(temperature=0.5, top_k=3)
    stages = next_token_stages(model, PROMPTS[:2], stack)
    assert [name for name, _ in stages] == ["raw", "temperature", "top_k"]
    with torch.no_grad():
        raw = model(torch.tensor([PROMPTS[1]]))[0, -1]
    torch.testing.assert_close(stages[0][1][1], raw)
    assert ((stages[-1][1] > float("-inf")).sum(-1) == 3).all()


def dropout_model() -> GPT:
    """A fresh GPT(cfg) with heavy dropout: in train mode, as a constructor or a training loop
    leaves it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=64,
                          dropout=0.5)).double()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(15)
    return model


def test_generation_runs_in_eval_mode_and_restores_the_callers_mode():
    model = dropout_model()
    assert model.training
    evaluated = copy.deepcopy(model).eval()
    stack = SamplerStack.from_settings(temperature=1.3, top_k=10)
    got = complete(model, PROMPTS, 15, sampler=stack, seed=[1, 2, 3, 4], logprobs=2)
    want = complete(evaluated, PROMPTS, 15, sampler=stack, seed=[1, 2, 3, 4], logprobs=2)
    assert tokens_of(got) == tokens_of(want)  # no dropout: the model's own distribution
    assert [r.logprobs for r in got] == [r.logprobs for r in want]
    assert all(m.training for m in model.modules())  # left as it was found
    stages, eval_stages = (next_token_stages(m, PROMPTS[:2], stack) for m in (model, evaluated))
    for (name, z), (_, z_eval) in zip(stages, eval_stages):
        assert torch.equal(z, z_eval) and not z.requires_grad, name
    assert all(m.training for m in model.modules())

    stream = generate(model, PROMPTS, 15, sampler=stack, seed=[1, 2, 3, 4])
    first = next(stream)
    assert first.tokens.tolist() == [r.tokens[0] for r in want]
    assert torch.is_grad_enabled()  # autograd is off inside each step, not in the caller's code
    stream.close()  # a generator closed early restores the mode too
    assert all(m.training for m in model.modules())
    assert tokens_of(complete(evaluated, PROMPTS, 15, sampler=stack, seed=[1, 2, 3, 4])) == \
        tokens_of(want) and not evaluated.training  # an eval model stays in eval


def layout(model: GPT) -> list[bool]:
    return [p.is_contiguous() for p in model.parameters()]


def test_generation_picks_the_decode_layout_and_training_puts_it_back():
    model = tiny_model()
    values = [p.detach().clone() for p in model.parameters()]
    assert all(layout(model))
    (r,) = complete(model, PROMPTS[1], 30)
    assert r.tokens == reference(model, PROMPTS[1], 30)  # same tokens, faster layout
    assert model.decode_layout and not model.transformer.h[0].attn.c_attn.weight.is_contiguous()
    assert not model.transformer.wte.weight.is_contiguous()  # the tied head: one matrix
    assert all(torch.equal(a, b) for a, b in zip(values, model.parameters()))
    assert model.set_decode_layout(True) is model  # idempotent

    # a notebook: train, generate, train again. Training never runs on the decode layout, and
    # it trains exactly as a model that never generated.
    twin = copy.deepcopy(model).set_decode_layout(False)
    x = torch.tensor([PROMPTS[1][:-1]])
    y = torch.tensor([PROMPTS[1][1:]])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin)]
    for step in range(3):
        for m, opt in zip((model, twin), optimizers):
            m.train()
            m(x, y).backward()
            assert all(layout(m)) and all(p.grad.is_contiguous() for p in m.parameters())
            opt.step()
            opt.zero_grad()
        complete(model, PROMPTS[0], 4)  # between steps: back to the decode layout
        assert model.decode_layout and model.training
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    state = optimizers[0].state[model.transformer.h[0].mlp.c_fc.weight]
    assert state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous()


def test_tensor_prompts_and_zero_tokens(model):
    assert tokens_of(complete(model, torch.tensor(PROMPTS[0]), 6)) == \
        tokens_of(complete(model, torch.tensor([PROMPTS[0]]), 6))
    assert list(generate(model, PROMPTS, 0)) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=[[1], []]), "prompt 1 is empty"),
    (dict(prompt_ids=[[1, V]]), "outside the vocabulary"),
    (dict(seed=[1, 2]), "2 seeds for 1 prompts"),
    (dict(stop=["ab"]), "need a decode function"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop=[5, 6]), "token-id lists"),
    (dict(eos_id=V), "eos_id"),
])
def test_bad_arguments_raise_value_error(model, kwargs, message):
    args = dict(prompt_ids=[[1, 2]], max_new_tokens=3, sampler=SamplerStack()) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, **args)


def run_batch(batch, plan):
    """Drive a RunningBatch: plan maps a step number to the Requests admitted before it.
    Returns every request's RowTokens per row (by the Steps it produced) once all are done."""
    tokens = {}

    def record(request, step):
        for t in step.row_tokens():
            tokens.setdefault(id(request), {}).setdefault(t.row, []).append(t)

    step_no = 0
    while batch.slots or any(k >= step_no for k in plan):
        for request in plan.get(step_no, []):
            record(request, batch.admit(request))
        for request, step in batch.step():
            assert not isinstance(step, Exception), step
            record(request, step)
        step_no += 1
    return tokens


def test_requests_joining_a_running_batch_decode_as_alone():
    """Continuous batching: requests admitted while others decode (different prompts, lengths,
    samplers, seeds; one past block_size, so its window slides) each produce exactly the tokens
    they produce alone, and rows leave as they finish."""
    model = tiny_model(block_size=16, seed=2)
    stack = SamplerStack.from_settings(**STACK)
    hot = SamplerStack.from_settings(temperature=1.8, min_p=0.05)
    specs = [  # (admitted before step, prompts, max_new_tokens, sampler, seeds)
        (0, [PROMPTS[0], PROMPTS[1]], 30, stack, [1, 2]),
        (3, [PROMPTS[2]], 12, hot, [3]),
        (4, [[(5 * i) % V for i in range(20)]], 25, None, None),  # longer than block_size
        (9, [PROMPTS[3], PROMPTS[0], PROMPTS[1]], 6, stack, [4, 5, 6]),
    ]
    requests = {}
    for at, prompts, n, sampler, seeds in specs:
        requests.setdefault(at, []).append(
            Request(model, prompts, n, sampler=sampler, seed=seeds, eos_id=None))
    batch = RunningBatch(model, max_rows=8)
    got = run_batch(batch, requests)
    assert not batch.slots and batch.free_rows == 8
    for (at, prompts, n, sampler, seeds), request in zip(specs, [r for k in sorted(requests)
                                                                 for r in requests[k]]):
        alone = tokens_of(complete(model, prompts, n, sampler=sampler, seed=seeds))
        assert [[t.token for t in got[id(request)][row]] for row in range(len(prompts))] == alone
        assert request.generated == alone


def test_logprobs_past_the_window_in_a_running_batch():
    """Continuous batching: rows cross block_size while others join and leave (one joins with a
    prompt longer than block_size); every row's logprobs are the model's on its last block_size
    tokens."""
    model = tiny_model(block_size=16, seed=6, dtype=torch.float32)
    stack = SamplerStack.from_settings(**STACK)
    plan = {  # step: the requests admitted before it. The first one's rows (prompts of 3 and
        # 7 tokens) draw their first token past block_size at steps 13 and 9
        0: [Request(model, [PROMPTS[0], PROMPTS[1]], 45, sampler=stack, seed=[1, 2])],
        6: [Request(model, [PROMPTS[2], PROMPTS[3]], 9, sampler=stack, seed=[3, 4])],  # leaves
        # after step 13, where slots 0, 1 and 4 (not adjacent) are past block_size
        11: [Request(model, [WINDOW_PROMPTS[3]], 32)],  # 23 tokens: past block_size from the start
        14: [Request(model, [PROMPTS[1]], 4, sampler=stack, seed=[5])],
    }
    got = run_batch(RunningBatch(model, max_rows=5), plan)
    past = []
    for request in [r for step in plan.values() for r in step]:
        for row, prompt in enumerate(request.prompts):
            row_tokens = got[id(request)][row]
            tokens = [t.token for t in row_tokens]
            assert tokens == request.generated[row]
            assert_window_logprobs(model, prompt, tokens, [t.logprob for t in row_tokens])
            past.append(past_the_window(prompt, tokens, 16))
    assert past == [31, 35, 0, 0, 32, 0]


def test_removed_and_failing_requests_leave_the_others_alone():
    model = tiny_model(block_size=32, seed=3)
    stack = SamplerStack.from_settings(temperature=1.2, top_k=10)
    calls = []

    def fail_on_third_call(logits, history=None):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom")
        return logits

    keeper = Request(model, [PROMPTS[1]], 20, sampler=stack, seed=[7])
    leaver = Request(model, [PROMPTS[0], PROMPTS[2]], 20, sampler=stack, seed=[8, 9])
    failer = Request(model, [PROMPTS[3]], 20, sampler=SamplerStack([fail_on_third_call]),
                     seed=[1])
    batch = RunningBatch(model, max_rows=4)
    for request in (leaver, keeper, failer):
        batch.admit(request)
    outcomes = batch.step()
    assert [r for r, _ in outcomes] == [leaver, keeper, failer]
    batch.remove(leaver)  # its caller went away: its two slots are free at once
    assert leaver.cancelled and batch.free_rows == 2 and batch.requests == [keeper, failer]
    (_, error), = [o for o in batch.step() if o[0] is failer]
    assert isinstance(error, ValueError) and failer.error is error
    assert batch.requests == [keeper]
    while batch.slots:
        batch.step()
    assert keeper.generated == tokens_of(complete(model, [PROMPTS[1]], 20, sampler=stack, seed=7))
    with pytest.raises(ValueError, match="no token left"):  # fails at its first draw: not admitted
        batch.admit(Request(model, [PROMPTS[0]], 5, sampler=SamplerStack.from_settings(
            logit_bias={t: float("-inf") for t in range(V)}), seed=[0]))
    assert not batch.slots


def test_processed_top_logprobs_are_of_the_processed_distribution(model):
    stack = SamplerStack.from_settings(temperature=0.8, top_k=5)
    (r,) = complete(model, [PROMPTS[1]], 6, sampler=stack, seed=3, logprobs=5,
                    logprobs_mode="processed")
    seq = torch.tensor([PROMPTS[1] + r.tokens])
    with torch.no_grad():
        z = model(seq)[0, len(PROMPTS[1]) - 1:-1] / 0.8  # [6, V]
    kth = z.topk(5).values[:, -1:]
    logp = torch.log_softmax(z.masked_fill(z < kth, float("-inf")), dim=-1)
    for pos, top in enumerate(r.top_logprobs):
        ref = logp[pos].topk(5)
        assert [i for i, _ in top] == ref.indices.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in top], dtype=torch.double),
                                   ref.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(r.processed_logprobs, dtype=torch.double),
                               logp.gather(1, torch.tensor(r.tokens)[:, None])[:, 0],
                               atol=1e-5, rtol=0)


def test_next_token_table_against_float64_softmax(model):
    stack = SamplerStack.from_settings(logit_bias={7: float("-inf")}, temperature=0.6, top_p=0.8)
    table = next_token_table(model, PROMPTS[1], stack, top_n=6, include=[7, 3])
    assert table.stages == ["raw", "logit_bias", "temperature", "top_p"]
    with torch.no_grad():
        raw = model(torch.tensor([PROMPTS[1]]))[0, -1].double()
    biased = raw.clone()
    biased[7] = float("-inf")
    hot = biased / 0.6
    p = torch.softmax(hot, -1)
    order = p.argsort(descending=True)
    mass_above = p[order].cumsum(0) - p[order]
    nucleus = hot.clone()
    nucleus[order[mass_above >= 0.8]] = float("-inf")
    stages = [raw, biased, hot, nucleus]
    probs = [torch.softmax(z, -1) for z in stages]
    assert table.n_kept == [int((z > float("-inf")).sum()) for z in stages]
    for h, q in zip(table.entropy, probs):
        assert abs(h - float(-(q[q > 0] * q[q > 0].log()).sum())) < 1e-9
    kept = table.n_kept[-1]
    final_rank = sorted(range(V), key=lambda t: (-float(probs[-1][t]), -float(raw[t])))
    assert table.tokens[:6] == final_rank[:6]  # kept first (by final probability), then by raw
    assert table.tokens[6:] == [t for t in (7, 3) if t not in final_rank[:6]]
    for i, t in enumerate(table.tokens):
        assert abs(table.logits[i] - float(raw[t])) < 1e-9
        assert table.probs[i] == pytest.approx([float(q[t]) for q in probs], abs=1e-9)
        assert table.kept[i] == [bool(z[t] > float("-inf")) for z in stages]
    assert sum(k[-1] for k in table.kept[:6]) == min(6, kept)


def test_admitting_several_requests_with_one_prefill():
    """admit_many: one prefill for a burst; a request whose first draw fails is left out and the
    rows of the ones after it move down; each admitted one decodes as alone."""
    model = tiny_model(block_size=32, seed=4)
    stack = SamplerStack.from_settings(temperature=1.3, top_k=12)
    ban_all = SamplerStack.from_settings(logit_bias={t: float("-inf") for t in range(V)})
    a = Request(model, [PROMPTS[1], PROMPTS[2]], 15, sampler=stack, seed=[1, 2])
    bad = Request(model, [PROMPTS[0]], 15, sampler=ban_all, seed=[3])
    none = Request(model, [PROMPTS[0]], 0)
    c = Request(model, [PROMPTS[3]], 9, sampler=stack, seed=[4])
    batch = RunningBatch(model, max_rows=4)
    outcomes = batch.admit_many([a, bad, none, c])
    assert outcomes[2] is None and isinstance(outcomes[1], ValueError) and bad.error is outcomes[1]
    assert [s.request for s in batch.slots] == [a, a, c]
    while batch.slots:
        batch.step()
    assert a.generated == tokens_of(complete(model, [PROMPTS[1], PROMPTS[2]], 15, sampler=stack,
                                             seed=[1, 2]))
    assert c.generated == tokens_of(complete(model, [PROMPTS[3]], 9, sampler=stack, seed=4))


# ------------------------------------------------------------------------------------------------
# reuse: rows sharing a prefix, the prefix cache, chunked filling


def run_to_end(batch, request) -> list[list]:
    """add() the request and step the batch until it is done: its RowTokens per row."""
    rows = [[] for _ in request.prompts]
    assert batch.add(request)
    while request in batch.requests:
        for r, step in batch.step():
            assert not isinstance(step, Exception), step
            if r is request and step is not None:
                for t in step.row_tokens():
                    rows[t.row].append(t)
    return rows


def assert_as_cold(model, prompts, rows, n, **kwargs):
    """Each row's tokens and logprobs are those of its prompt alone in a fresh batch."""
    for prompt, got in zip(prompts, rows):
        (alone,) = complete(model, [prompt], n, logprobs=2, **kwargs)
        assert [t.token for t in got] == alone.tokens
        torch.testing.assert_close(torch.tensor([t.logprob for t in got]),
                                   torch.tensor(alone.logprobs), atol=1e-4, rtol=0)


CONTEXT = [(7 * i + 3) % V for i in range(40)]


def test_rows_sharing_a_context_compute_it_once():
    """complete() over prompts that share a context: the first row computes it, the others wait
    for it and copy it (keys, values), computing only their own tokens; identical windows copy
    everything. Results are the cold ones."""
    model = tiny_model(block_size=64, seed=7, dtype=torch.float32)
    prompts = [CONTEXT + [i, i + 1] for i in range(3)] + [CONTEXT[:20], CONTEXT + [0, 1]]
    batch = RunningBatch(model, max_rows=5)
    rows = run_to_end(batch, Request(model, prompts, 6, logprobs=2))
    assert batch.prompt_tokens == 4 * 42 + 20
    # rows 1, 2 copy the 40 shared tokens; row 3 its first 19 (its last one is computed: its
    # logits are its first draw); row 4 is row 0's window: all 42, logits included
    assert batch.reused_tokens == 2 * 40 + 19 + 42
    assert_as_cold(model, prompts, rows, 6)


def test_the_prefix_cache_across_requests_and_its_lru():
    """A later request reuses the full blocks an earlier one computed (its keys and values are
    copied into its slot); results equal a cold run's. When the pool is full the least recently
    used leaf block goes."""
    model = tiny_model(block_size=64, seed=8, dtype=torch.float32)
    cache = PrefixCache(model.config, capacity_tokens=64, block_tokens=8)  # 8 blocks
    batch = RunningBatch(model, max_rows=2, prefix_cache=cache)
    a = CONTEXT[:30]
    run_to_end(batch, Request(model, [a], 3))
    assert cache.used_blocks == 3 and batch.reused_tokens == 0  # 30 tokens: 3 full blocks
    longer = a + [5, 6]
    rows = run_to_end(batch, Request(model, [longer], 5, logprobs=2))
    assert batch.reused_tokens == 24 and cache.used_blocks == 4  # its 4th block is new
    assert_as_cold(model, [longer], rows, 5)
    other = [(3 * i + 1) % V for i in range(40)]  # 5 blocks: 4 free, one must go
    run_to_end(batch, Request(model, [other], 2))
    assert cache.used_blocks == 8
    reused = batch.reused_tokens
    run_to_end(batch, Request(model, [longer], 1))
    assert batch.reused_tokens - reused == 24  # the leaf block of `longer` went, its parents not


def test_a_cancelled_request_frees_its_unshared_blocks():
    model = tiny_model(block_size=64, seed=8, dtype=torch.float32)
    cache = PrefixCache(model.config, capacity_tokens=256, block_tokens=8)
    batch = RunningBatch(model, max_rows=2, prefix_cache=cache)
    mine = Request(model, [CONTEXT[:33]], 50)
    batch.admit(mine)
    assert cache.used_blocks == 4
    batch.remove(mine)
    assert cache.used_blocks == 0 and not batch.slots
    first, reader = Request(model, [CONTEXT[:33]], 50), Request(model, [CONTEXT[:17]], 50)
    batch.admit(first)
    batch.admit(reader)  # reads first's first two blocks
    batch.remove(first)
    assert cache.used_blocks == 2  # the two it shares stay
    batch.remove(reader)
    assert cache.used_blocks == 2  # a reader inserted nothing of its own


def test_prompt_states_from_the_cache_are_the_models():
    """keep_prompt_states: the final hidden states of the prompt's positions, the same whether
    computed or read off the prefix cache (what the server's prompt_logprobs scores)."""
    model = tiny_model(block_size=64, seed=9, dtype=torch.float32)
    batch = RunningBatch(model, max_rows=2, prefix_cache=PrefixCache(model.config, 128, 8))
    prompt = CONTEXT[:35]
    with torch.no_grad():
        expected = model.hidden_states(torch.tensor([prompt]))[0]
    for reused in (0, 32):
        request = Request(model, [prompt], 0, keep_prompt_states=True)
        run_to_end(batch, request)
        assert batch.reused_tokens == reused
        torch.testing.assert_close(request.prompt_states[0], expected, atol=1e-5, rtol=0)


def test_a_long_prompt_fills_in_chunks_between_decode_steps():
    """prefill_chunk: a 40-token prompt arriving while a row decodes is filled 4 columns per
    step; the running row draws a token every step meanwhile, and both produce their cold
    tokens."""
    model = tiny_model(block_size=64, seed=10, dtype=torch.float32)
    batch = RunningBatch(model, max_rows=2, prefill_chunk=4)
    running = Request(model, [PROMPTS[1]], 30, logprobs=2)
    newcomer = Request(model, [CONTEXT], 5, logprobs=2)
    got = {id(running): [[]], id(newcomer): [[]]}
    steps_with = []  # per step: which requests drew
    batch.add(running)
    for step_no in range(40):
        if step_no == 2:
            batch.add(newcomer)
        outcomes = batch.step()
        steps_with.append([r for r, _ in outcomes])
        for r, step in outcomes:
            got[id(r)][0] += step.row_tokens()
        if not batch.slots:
            break
    first = next(i for i, s in enumerate(steps_with) if newcomer in s)
    assert first == 2 + 40 // 4 - 1  # 10 chunks of 4 columns, the last one with its first draw
    assert all(running in s for s in steps_with[:first + 1])
    assert_as_cold(model, [PROMPTS[1]], got[id(running)], 30)
    assert_as_cold(model, [CONTEXT], got[id(newcomer)], 5)


def test_a_window_refill_is_chunked_too():
    """A row past block_size re-fills its window in prefill_chunk pieces while the other rows
    draw every step; its tokens and logprobs stay the model's on its last block_size tokens."""
    model = tiny_model(block_size=16, seed=11, dtype=torch.float32)
    batch = RunningBatch(model, max_rows=3, prefill_chunk=5)
    past = Request(model, [WINDOW_PROMPTS[2]], 6)  # 16 tokens: every token needs a re-fill
    short = Request(model, [PROMPTS[0]], 12)
    batch.admit(past)
    batch.admit(short)
    drew = []
    while batch.slots:
        drew.append({id(r) for r, _ in batch.step()})
    assert all(id(short) in d for d in drew[:11])  # never held up by the re-fills
    assert sum(id(past) in d for d in drew[:11]) < 5  # 15 columns per re-fill: 3 steps a token
    alone = complete(model, [WINDOW_PROMPTS[2]], 6, logprobs=0)[0]
    assert past.generated[0] == alone.tokens
    assert short.generated[0] == complete(model, [PROMPTS[0]], 12)[0].tokens


def test_score_shares_the_context_between_choices(monkeypatch):
    """eval's score (and minilm-eval --choices): the choices' log-probabilities are the model's
    (a float64 forward of each whole sequence), and the context is computed once, not once per
    choice."""
    from minilm.evaluation.scoring import score

    model = tiny_model(block_size=64, seed=12, dtype=torch.float32)
    tokenizer = CharTokenizer(CHARS)
    context = "the quick brown fox jumps over the dog,"
    choices = [" it sleeps.", " it runs away!", " what?", " the dog barks at it."]
    reference = copy.deepcopy(model).double()
    computed = []
    hidden_states = model.hidden_states

    def counting(idx, *args, **kwargs):
        computed.append(idx.numel())
        return hidden_states(idx, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", counting)
    scores = score(model, tokenizer, context, choices)
    for c, s in zip(choices, scores):
        ids = tokenizer.encode(context + c)
        with torch.no_grad():
            logp = torch.log_softmax(reference(torch.tensor([ids]))[0], dim=-1)
        n = len(tokenizer.encode(c))
        expected = [float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids))]
        assert s.logprobs == pytest.approx(expected, abs=1e-4)
    # the context (39 tokens) once with the first choice, then the other choices' tokens
    # (right-padded in one forward), instead of 4 x 39 + their own
    assert sum(computed) <= len(context) + len(choices) * max(map(len, choices)) < 4 * 39


# ------------------------------------------------------------------------------------------------
# classifier-free guidance: the unconditional rows run in the batch


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random GPT2LMHeadModel (weights at 3x hf_models' scale, so that greedy paths vary) saved
    as transformers saves it, and the same model read back by load_model."""
    from minilm.interop.loading import load_model

    from hf_models import hf_gpt2

    folder = tmp_path_factory.mktemp("cfg_gpt2")
    hf = hf_gpt2(folder, seed=3, vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                 n_head=2)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3)
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None  # compare full lengths
    hf.generation_config.pad_token_id = 0
    model, _, _ = load_model(folder)
    return hf, model


CFG_PROMPT = [464, 3290, 318, 257, 922]


@pytest.mark.slow  # transformers' import and a saved model: ~7 s for the first case
@pytest.mark.parametrize("prompts, negative, scale", [
    ([CFG_PROMPT], [[40, 588, 340]], 1.5),
    ([CFG_PROMPT], None, 1.5),  # no negative prompt: HF's default, the prompt's last token
    ([CFG_PROMPT], [[40, 588, 340]], 3.0),
    ([CFG_PROMPT], [[40, 588, 340]], 0.0),  # 0: the negative prompt acts as the prompt
    ([CFG_PROMPT], None, -0.5),
    ([CFG_PROMPT, [17, 2, 9000, 13, 11]], [[40, 588, 340], [1, 2, 3]], 2.0),
])
def test_guidance_greedy_tokens_equal_hf_generate(hf_and_ours, prompts, negative, scale):
    """classifier-free guidance's greedy tokens are HF generate's (guidance_scale,
    negative_prompt_ids) on the same weights: the unconditional rows run beside the conditional
    ones, fed the tokens those draw."""
    hf, model = hf_and_ours
    kwargs = dict(guidance_scale=scale, do_sample=False, max_new_tokens=16)
    if negative is not None:
        kwargs["negative_prompt_ids"] = torch.tensor(negative)
    ids = torch.tensor(prompts)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, 5:].tolist()
        plain = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=16)[:, 5:].tolist()
    stack = SamplerStack.from_settings(guidance_scale=scale, temperature=0.0)
    got = complete(model, prompts, 16, sampler=stack, negative_prompt=negative)
    assert [r.tokens for r in got] == expected
    if scale != 0:
        assert expected != plain  # guidance changed something: the test can see a wrong branch


# ------------------------------------------------------------------------------------------------
# batched sampling: requests that share a SamplerStack draw in one call


def count_calls(stack: SamplerStack) -> list[int]:
    """Wrap the stack's sample(): the number of rows of each call."""
    calls = []
    sample = stack.sample

    def counting(logits, *args, **kwargs):
        calls.append(logits.size(0))
        return sample(logits, *args, **kwargs)

    stack.sample = counting
    return calls


@pytest.mark.parametrize("settings", [STACK, dict(temperature=1.2, mirostat=2, mirostat_tau=3.0)],
                         ids=["penalties", "mirostat"])
def test_requests_sharing_a_stack_draw_in_one_call_as_alone(settings):
    """Rows of several requests that share a SamplerStack draw in one call per step (their
    Histories joined); per-row state (penalty counts, Mirostat's mu, seeds) stays each row's, so
    every request's tokens are its tokens alone, while requests join and rows leave."""
    model = tiny_model(block_size=64, seed=13)
    stack = SamplerStack.from_settings(**settings)
    calls = count_calls(stack)
    plan = {0: [Request(model, [PROMPTS[0], PROMPTS[1]], 14, sampler=stack, seed=[1, 2]),
                Request(model, [PROMPTS[2]], 6, sampler=stack, seed=[3])],
            3: [Request(model, [PROMPTS[3]], 12, sampler=stack, seed=[4], logprobs=0)]}
    got = run_batch(RunningBatch(model, max_rows=4), plan)
    assert max(calls) == 4  # the three requests' four rows in one call
    assert len(calls) < sum(r.max_new_tokens for step in plan.values() for r in step)
    for request in [r for step in plan.values() for r in step]:
        seeds = [g.initial_seed() for g in request.generators]
        alone = complete(model, request.prompts, request.max_new_tokens,
                         sampler=SamplerStack.from_settings(**settings), seed=seeds, logprobs=0)
        assert request.generated == tokens_of(alone)
        for row, result in enumerate(alone):
            torch.testing.assert_close(torch.tensor([t.logprob for t in got[id(request)][row]]),
                                       torch.tensor(result.logprobs))


def test_a_request_that_cannot_draw_fails_alone_in_its_group():
    """One draw for a group fails (a row with no token left): each request then draws alone, and
    only the one that cannot draw fails."""
    model = tiny_model(block_size=64, seed=14)

    def ban_all_in_five_token_prompts_late(logits, history=None):
        """Every token removed, from their third token on, in the rows of 5-token prompts."""
        generated = history.real().sum(1) - history.prompt_lens
        doomed = (history.prompt_lens == 5) & (generated >= 2)
        return logits.masked_fill(doomed[:, None], float("-inf"))

    stack = SamplerStack([ban_all_in_five_token_prompts_late, Temperature(0.9)])
    calls = count_calls(stack)
    keeper = Request(model, [PROMPTS[1]], 8, sampler=stack, seed=[1])
    doomed = Request(model, [PROMPTS[3]], 8, sampler=stack, seed=[2])
    batch = RunningBatch(model, max_rows=2)
    batch.admit(keeper)
    batch.admit(doomed)
    errors = {}
    while batch.slots:
        for request, outcome in batch.step():
            if isinstance(outcome, Exception):
                errors[id(request)] = outcome
    assert calls[2] == 2  # they drew together until then
    assert list(errors) == [id(doomed)] and "no token left" in str(errors[id(doomed)])
    assert len(doomed.generated[0]) == 2
    assert keeper.generated[0] == complete(model, [PROMPTS[1]], 8, sampler=stack, seed=1)[0].tokens


def test_generate_cli_passes_the_negative_prompt(serve_checkpoint, capsys):
    """generate.py --guidance_scale with --negative_prompt runs its unconditional rows on that
    prompt (as complete(..., negative_prompt=...)), and --show_distribution guides with it too."""
    import json

    from minilm.cli.common import run_cli
    from minilm.cli.generate import main
    from minilm.interop.loading import load_model

    model, tokenizer, _ = load_model(serve_checkpoint)
    prompt = "ROMEO:\nWhat say"
    stack = SamplerStack.from_settings(temperature=0.0, guidance_scale=-1.5)
    expected = {neg: complete(model, [tokenizer.encode(prompt)], 8, sampler=stack,
                              eos_id=tokenizer.eot_token,
                              negative_prompt=tokenizer.encode(neg))[0].tokens
                for neg in ("JULIET:", "x")}
    assert expected["JULIET:"] != expected["x"]
    for neg, tokens in expected.items():
        args = ["--ckpt", str(serve_checkpoint), "--prompt", prompt, "--max_new_tokens", "8",
                "--temperature", "0", "--guidance_scale", "-1.5", "--negative_prompt", neg,
                "--json"]
        assert run_cli(main, args) == 0
        assert json.loads(capsys.readouterr().out)["tokens"] == tokens
        assert run_cli(main, args[:-1]) == 0  # text mode streams through generate()
        shown = [t for t in tokens if t != tokenizer.eot_token]
        assert capsys.readouterr().out.startswith(prompt + tokenizer.decode(shown))
