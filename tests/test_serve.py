"""minilm-serve end to end: a real server (conftest's `server`, a subprocess on a free loopback
port) and the official `openai` package as the client; the numbers are checked against the
model's own logits, computed here."""
import asyncio
import contextlib
import json
import math
import sys
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from minilm.cli.common import run_cli  # noqa: E402
from minilm.cli.serve import main as serve_main  # noqa: E402
from minilm.cli.serve import model_name  # noqa: E402
from minilm.interop.loading import load_model  # noqa: E402
from minilm.sampling.settings import describe, knobs  # noqa: E402
from minilm.serving.protocol import CompletionRequest, DistributionRequest  # noqa: E402

PROMPT = "ROMEO:\nWhat say"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(server):
    """The served checkpoint, loaded here: the reference for every log-probability."""
    model, tokenizer, _ = load_model(server.checkpoint)
    return model, tokenizer


def raw_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the raw logits [len(ids), V]: row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)


EXTRAS = ("top_k", "min_p", "typical_p", "repetition_penalty", "order", "ignore_eos",
          "logprobs_mode", "return_token_ids")  # vLLM's and minilm's fields beyond OpenAI's


def create(client, server, **kwargs):
    extra = dict(kwargs.pop("extra_body", {}))
    extra.update({k: kwargs.pop(k) for k in EXTRAS if k in kwargs})
    return client.completions.create(model=server.name, extra_body=extra or None, **kwargs)


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.name]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16
    assert health["max_tokens_limit"] == 4096  # the default


def test_plain_completion(client, server, local):
    _, tokenizer = local
    r = create(client, server, prompt=PROMPT, max_tokens=12, seed=3, ignore_eos=True,
               extra_body=dict(return_token_ids=True))
    assert r.object == "text_completion" and r.model == server.name and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.index == 0
    token_ids = choice.model_extra["token_ids"]
    assert len(token_ids) == 12 and choice.text == tokenizer.decode(token_ids)
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(PROMPT) + 12


def test_seed_reproducibility_and_n(client, server):
    a = create(client, server, prompt=PROMPT, max_tokens=16, seed=11)
    b = create(client, server, prompt=PROMPT, max_tokens=16, seed=11)
    c = create(client, server, prompt=PROMPT, max_tokens=16, seed=12)
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text
    # n choices: choice i draws with seed + i, so choice 1 of seed 11 is seed 12 alone
    several = create(client, server, prompt=PROMPT, max_tokens=16, seed=11, n=3)
    assert [ch.index for ch in several.choices] == [0, 1, 2]
    assert several.choices[0].text == a.choices[0].text
    assert several.choices[1].text == c.choices[0].text
    assert several.usage.completion_tokens == sum(
        len(ch.text) + (ch.finish_reason == "stop") for ch in several.choices)


def test_prompt_forms_and_choice_order(client, server, local):
    _, tokenizer = local
    ids = tokenizer.encode(PROMPT)
    by_text = create(client, server, prompt=PROMPT, max_tokens=8, seed=4)
    by_ids = create(client, server, prompt=ids, max_tokens=8, seed=4)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = create(client, server, prompt=[PROMPT, "JULIET:"], max_tokens=8, seed=4, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == by_text.choices[0].text
    juliet = create(client, server, prompt=[tokenizer.encode("JULIET:")], max_tokens=8, seed=5)
    assert both.choices[3].text == juliet.choices[0].text  # prompt 1, choice 1: seed 4 + 1


def test_streamed_chunks_add_up_to_the_whole(client, server):
    whole = create(client, server, prompt=PROMPT, max_tokens=20, seed=7, logprobs=2)
    chunks = list(create(client, server, prompt=PROMPT, max_tokens=20, seed=7, logprobs=2,
                         stream=True, stream_options={"include_usage": True}))
    usage = chunks.pop()
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert len(chunks) == whole.usage.completion_tokens  # one chunk per token
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].logprobs.tokens[0] for c in chunks] == whole.choices[0].logprobs.tokens
    assert [c.choices[0].logprobs.token_logprobs[0] for c in chunks] == \
        whole.choices[0].logprobs.token_logprobs
    assert [c.choices[0].finish_reason for c in chunks][:-1] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(client, server):
    free = create(client, server, prompt=PROMPT, max_tokens=30, temperature=0, ignore_eos=True)
    text = free.choices[0].text
    stop = text[10:12]
    cut = text.index(stop)
    for stream in (False, True):
        r = create(client, server, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "~~"],
                   stream=stream, ignore_eos=True)
        chunks = list(r) if stream else [r]
        assert "".join(c.choices[0].text for c in chunks) == text[:cut]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logit_bias_bans_and_forces(client, server, local):
    _, tokenizer = local
    free = create(client, server, prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
    first = tokenizer.encode(free.choices[0].text[0])[0]
    banned = create(client, server, prompt=PROMPT, max_tokens=10, temperature=0,
                    logit_bias={str(first): -100}, ignore_eos=True)
    assert tokenizer.decode([first]) not in banned.choices[0].text
    x = tokenizer.encode("x")[0]
    only_x = {str(t): -100 for t in range(tokenizer.vocab_size) if t != x}
    forced = create(client, server, prompt=PROMPT, max_tokens=6, seed=1, logit_bias=only_x,
                    logprobs=0)
    assert forced.choices[0].text == "xxxxxx"
    # logprobs are of the raw distribution: the bias does not make x certain there
    assert all(lp < -0.01 for lp in forced.choices[0].logprobs.token_logprobs)


def test_logprobs_are_log_softmax_of_the_raw_logits(client, server, local):
    model, tokenizer = local
    r = create(client, server, prompt=PROMPT, max_tokens=12, seed=5, logprobs=3,
               temperature=0.7, ignore_eos=True,
               extra_body=dict(top_k=10, return_token_ids=True))
    choice = r.choices[0]
    ids = tokenizer.encode(PROMPT) + choice.model_extra["token_ids"]
    ref = raw_logprobs(model, ids)[len(PROMPT) - 1:-1]  # [12, V]: the generated positions
    got = choice.logprobs
    chosen = torch.tensor(choice.model_extra["token_ids"])
    torch.testing.assert_close(torch.tensor(got.token_logprobs, dtype=torch.double),
                               ref.gather(1, chosen[:, None])[:, 0], atol=1e-4, rtol=0)
    for pos, top in enumerate(got.top_logprobs):
        ref_top = ref[pos].topk(3)
        expected = {tokenizer.decode([i]): v for i, v in zip(ref_top.indices.tolist(),
                                                               ref_top.values.tolist())}
        expected.setdefault(got.tokens[pos], got.token_logprobs[pos])  # the chosen one too
        assert top.keys() == expected.keys()
        assert all(abs(top[k] - expected[k]) < 1e-4 for k in top)
    assert got.text_offset == list(range(len(choice.text)))


def test_processed_logprobs(client, server, local):
    """logprobs_mode processed: the distribution the token was drawn from (T 0.7, top-k 5)."""
    model, tokenizer = local
    r = create(client, server, prompt=PROMPT, max_tokens=8, seed=2, logprobs=5, temperature=0.7,
               ignore_eos=True, extra_body=dict(top_k=5, logprobs_mode="processed",
                                                return_token_ids=True))
    choice = r.choices[0]
    ids = tokenizer.encode(PROMPT) + choice.model_extra["token_ids"]
    with torch.no_grad():
        z = model(torch.tensor([ids]))[0, len(PROMPT) - 1:-1].double() / 0.7  # [8, V]
    kth = z.topk(5).values[:, -1:]
    ref = torch.log_softmax(z.masked_fill(z < kth, -math.inf), dim=-1)
    chosen = torch.tensor(choice.model_extra["token_ids"])
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs, dtype=torch.double),
                               ref.gather(1, chosen[:, None])[:, 0], atol=1e-4, rtol=0)
    for top in choice.logprobs.top_logprobs:
        assert len(top) == 5 and math.isclose(sum(math.exp(v) for v in top.values()), 1,
                                              rel_tol=1e-4)


def test_echo_scores_the_prompt(client, server, local):
    """What lm-evaluation-harness's local-completions sends for log-likelihoods."""
    model, tokenizer = local
    prompts = [PROMPT, "JULIET:\nAy me"]
    r = create(client, server, prompt=[tokenizer.encode(p) for p in prompts], max_tokens=0,
               echo=True, logprobs=1, temperature=0)
    assert r.usage.completion_tokens == 0
    for prompt, choice in zip(prompts, r.choices):
        assert choice.text == prompt and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == list(prompt) and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and lp.text_offset == list(range(len(prompt)))
        ids = tokenizer.encode(prompt)
        ref = raw_logprobs(model, ids)  # row i predicts token i + 1
        expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:], dtype=torch.double),
                                   expected, atol=1e-4, rtol=0)
        for i, top in enumerate(lp.top_logprobs[1:]):  # the greedy token, and the actual one
            best = tokenizer.decode([int(ref[i].argmax())])
            assert best in top and prompt[i + 1] in top
    # echo with generation: the prompt's text and log-probabilities, then the new tokens
    r = create(client, server, prompt=PROMPT, max_tokens=4, echo=True, logprobs=0, seed=1,
               ignore_eos=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) == len(PROMPT) + 4
    assert len(lp.tokens) == len(PROMPT) + 4 and lp.token_logprobs[0] is None
    assert lp.text_offset == list(range(len(PROMPT) + 4))


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(temperature=-1), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(n=0), 400, "n"),
    (dict(n=17), 400, "n"),
    (dict(logprobs=21), 400, "logprobs"),
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(max_tokens=4097), 400, "max_tokens"),  # past --max_tokens_limit (default 4096)
    (dict(max_tokens=10**8), 400, "max_tokens"),
    (dict(logit_bias={"9999": -100}), 400, "logit_bias"),
    (dict(logit_bias={"3": 101}), 400, "logit_bias"),
    (dict(presence_penalty=3), 400, "presence_penalty"),
    (dict(stop=[""]), 400, "stop"),
    (dict(prompt="x" * 33), 400, "prompt"),
    (dict(prompt="~"), 400, "prompt"),
    (dict(prompt=[0, 9999]), 400, "prompt"),
    (dict(prompt=[]), 400, "prompt"),
    (dict(extra_body=dict(top_k=-2)), 400, "top_k"),
    (dict(extra_body=dict(min_p=2)), 400, "min_p"),
    (dict(extra_body=dict(repetition_penalty=0)), 400, "repetition_penalty"),
    (dict(extra_body=dict(order="backwards")), 400, "order"),
    (dict(extra_body=dict(logprobs_mode="cooked")), 400, "logprobs_mode"),
    (dict(extra_body=dict(mirostat=1)), 400, "mirostat"),  # Mirostat 1.0: not supported
    (dict(extra_body=dict(dry_base=0.5)), 400, "dry_base"),
    (dict(extra_body=dict(dry_allowed_length=0)), 400, "dry_allowed_length"),
    (dict(extra_body=dict(dry_penalty_last_n=-2)), 400, "dry_penalty_last_n"),
    (dict(extra_body=dict(dry_sequence_breakers=[])), 400, "dry_sequence_breakers"),
    (dict(extra_body=dict(xtc_probability=2)), 400, "xtc_probability"),
    (dict(extra_body=dict(top_h=1.5)), 400, "top_h"),
    (dict(extra_body=dict(eta_cutoff=1)), 400, "eta_cutoff"),
    (dict(extra_body=dict(epsilon_cutoff=-0.1)), 400, "epsilon_cutoff"),
    (dict(extra_body=dict(mirostat_tau=-1)), 400, "mirostat_tau"),
    (dict(extra_body=dict(negative_prompt=[-1])), 400, "negative_prompt"),
    (dict(extra_body=dict(order=["mirostat", "temperature"], mirostat=2, temperature=0.5)), 400,
     "order"),
    (dict(model="gpt-17"), 404, "model"),
])
def test_errors_in_openai_shape(client, server, kwargs, status, param):
    kwargs = dict(dict(model=server.name, prompt="ROMEO:", max_tokens=4), **kwargs)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**kwargs)
    e = info.value
    assert e.status_code == status and e.param == param
    assert set(e.body) == {"message", "type", "param", "code"} and e.body["message"]
    if status == 404:
        assert e.code == "model_not_found"


def test_max_tokens_limit(serve_checkpoint):
    """--max_tokens_limit caps one choice's tokens: up to it a request runs, past it a 400 names
    max_tokens (one request must not hold a row of the batch for ever). In-process, limit 8."""
    from fastapi.testclient import TestClient

    from minilm.serving.app import create_app

    model, tokenizer, _ = load_model(serve_checkpoint)
    with TestClient(create_app(model, tokenizer, "tiny", max_tokens_limit=8)) as http:
        assert http.get("/health").json()["max_tokens_limit"] == 8
        body = dict(prompt=PROMPT, ignore_eos=True, return_token_ids=True)
        r = http.post("/v1/completions", json=dict(body, max_tokens=8))
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 8, r.text
        r = http.post("/v1/completions", json=dict(body, max_tokens=9, stream=True))
        assert r.status_code == 400 and r.json()["error"] == {
            "message": "max_tokens must be at most 8 (the server's --max_tokens_limit), got 9",
            "type": "invalid_request_error", "param": "max_tokens", "code": None}


@pytest.mark.parametrize("body, param", [
    ({"prompt": "A", "temperature": "hot"}, "temperature"),
    ({"prompt": "A", "n": True}, "n"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "A", "stop": 3}, "stop"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "A", "seed": 2**70}, "seed"),
    ({"prompt": "A", "negative_prompt": 5}, "negative_prompt"),
    ({"prompt": "A", "dry_sequence_breakers": "\n"}, "dry_sequence_breakers"),
    ({"prompt": "A", "mirostat": 2.5}, "mirostat"),
    ({"prompt": "A", "xtc_probability": True}, "xtc_probability"),
    ({"prompt": "A", "guidance_scale": "strong"}, "guidance_scale"),
])
def test_bad_types_are_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_path_and_bad_json(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_a_request_that_cannot_be_sampled_fails_alone(client, server, local):
    """Banning every token leaves nothing to draw: that request is a 400, the server and a
    request running beside it go on."""
    _, tokenizer = local
    alone = create(client, server, prompt=PROMPT, max_tokens=40, seed=9, ignore_eos=True)
    result = {}

    def long_one():
        chunks = list(create(client, server, prompt=PROMPT, max_tokens=40, seed=9, stream=True,
                             ignore_eos=True))
        result["text"] = "".join(c.choices[0].text for c in chunks)

    thread = threading.Thread(target=long_one)
    thread.start()
    ban_all = {str(t): -100 for t in range(tokenizer.vocab_size)}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="no token left"):
            r = create(client, server, prompt=PROMPT, max_tokens=5, logit_bias=ban_all,
                       stream=stream)
            list(r) if stream else None
    thread.join(60)
    assert result["text"] == alone.choices[0].text


async def _stream_text(aclient, server, **kwargs) -> tuple[str, list[float]]:
    """The streamed text and the arrival time of each chunk."""
    text, times = [], []
    extra = {k: kwargs.pop(k) for k in EXTRAS if k in kwargs}
    async for chunk in await aclient.completions.create(model=server.name, stream=True,
                                                        extra_body=extra, **kwargs):
        times.append(time.perf_counter())
        text.append(chunk.choices[0].text)
    return "".join(text), times


def test_concurrent_streams_return_what_they_return_alone(client, server):
    """Continuous batching: 8 streamed requests with different seeds and lengths decode
    together (their chunks interleave) and each returns exactly its text alone."""
    specs = [dict(prompt=PROMPT[:5 + i], seed=100 + i, max_tokens=6 + 7 * i,
                  top_k=20, ignore_eos=True) for i in range(8)]
    alone = [create(client, server, **s).choices[0].text for s in specs]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none",
                                     max_retries=0, timeout=60)
        return await asyncio.gather(*(_stream_text(aclient, server, **s) for s in specs))

    results = asyncio.run(together())
    assert [text for text, _ in results] == alone
    # they ran side by side: the longest one was streaming while each other one started
    times = [t for _, t in results]
    longest = times[-1]
    assert sum(longest[0] < t[0] < longest[-1] or t[0] <= longest[0] < t[-1]
               for t in times[:-1]) >= 4


def test_a_short_request_finishes_before_a_long_one(client, server):
    """Sent while a long request decodes, a short one joins the running batch and is done
    first: it never waits for the long one to finish."""
    done = {}
    started = threading.Event()

    def run(name, max_tokens):
        for i, _ in enumerate(create(client, server, prompt=PROMPT, max_tokens=max_tokens,
                                     seed=1, stream=True, ignore_eos=True)):
            if i == 2:
                started.set()
        done[name] = time.perf_counter()

    long_thread = threading.Thread(target=run, args=("long", 400))
    long_thread.start()
    assert started.wait(60)
    run("short", 5)
    assert "long" not in done  # the long one is still decoding
    long_thread.join(120)
    assert done["short"] < done["long"]


def test_a_client_that_disconnects_frees_its_row(server):
    """Its rows leave the batch, and the prefix-cache blocks its prompt added (no other request
    read them) are freed."""
    longest = httpx.get(f"{server.url}/health").json()["max_tokens_limit"]
    before = scrape(server)
    prompt = "QUEEN:\nNo more of this, I pray; go thy ways."[-32:]  # 2 blocks of 16, not shared
    body = dict(prompt=prompt, max_tokens=longest, stream=True, ignore_eos=True)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        chunks, lines = [], r.iter_lines()  # kept: a dropped iterator closes the connection
        for line in lines:
            if line.startswith("data:"):
                chunks.append(json.loads(line[5:]))
            if len(chunks) == 3:
                break
        assert httpx.get(f"{server.url}/health").json()["running_rows"] >= 1
        during = scrape(server)
        assert during["minilm:num_requests_running"] == 1
        assert during["minilm:prefix_cache_usage_perc"] > before["minilm:prefix_cache_usage_perc"]
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/health").json()["running_rows"]:
        assert time.monotonic() < deadline, "the row was never freed"
        time.sleep(0.05)
    after = scrape(server)
    assert after["minilm:prefix_cache_usage_perc"] == before["minilm:prefix_cache_usage_perc"]
    assert after["minilm:num_requests_running"] == 0
    deadline = time.monotonic() + 10
    while "cancelled (client gone)" not in server.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_metrics_line_per_request(client, server):
    r = create(client, server, prompt=PROMPT, max_tokens=5, seed=1, ignore_eos=True)
    deadline = time.monotonic() + 10
    while r.id not in server.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    line = next(line for line in server.log.read_text().splitlines() if r.id in line)
    assert f"{len(PROMPT)} prompt tokens, 5 generated tokens in 1 choices" in line
    assert "time to first token" in line and "tokens/s" in line


def test_distribution_endpoint_matches_the_model(server, local):
    model, tokenizer = local
    body = dict(prompt=PROMPT, temperature=0.5, top_k=3, logit_bias={"12": 3}, top_n=5)
    r = httpx.post(f"{server.url}/v1/distribution", json=body)
    assert r.status_code == 200, r.text
    table = r.json()
    assert [s["name"] for s in table["stages"]] == ["raw", "logit_bias", "temperature", "top_k"]
    assert [s["kept"] for s in table["stages"]] == [tokenizer.vocab_size] * 3 + [3]
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        raw = model(torch.tensor([ids]))[0, -1].double()
    biased = raw.clone()
    biased[12] += 3
    stages = [raw, biased, biased / 0.5]
    kth = stages[-1].topk(3).values[-1]
    stages.append(stages[-1].masked_fill(stages[-1] < kth, -math.inf))
    probs = [torch.softmax(z, dim=-1) for z in stages]
    for stage, p in zip(table["stages"], probs):
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        assert abs(stage["entropy"] - entropy) < 1e-4
    top3 = stages[-1].topk(3).indices.tolist()
    assert [t["id"] for t in table["tokens"][:3]] == top3  # the kept ones first
    assert len(table["tokens"]) == 5 + (12 not in [t["id"] for t in table["tokens"][:5]])
    for t in table["tokens"]:
        assert t["text"] == tokenizer.decode([t["id"]])
        assert abs(t["logit"] - raw[t["id"]]) < 1e-4
        for s, p in enumerate(probs):
            assert abs(t["probs"][s] - p[t["id"]]) < 1e-5
            assert t["kept"][s] == bool(p[t["id"]] > 0)
    bad = httpx.post(f"{server.url}/v1/distribution", json=dict(prompt=PROMPT, top_p=2))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"


def test_logit_bias_explicit_keys(server, local):
    """"id:12" is token 12 as "12" is; "text:x" the token of the text x, as "x" is."""
    _, tokenizer = local
    x = tokenizer.encode("x")[0]
    tables = [httpx.post(f"{server.url}/v1/distribution",
                         json=dict(prompt=PROMPT, logit_bias=bias, top_n=5)).json()
              for bias in ({"text:x": -100, "id:12": 3}, {str(x): -100, "12": 3})]
    assert tables[0] == tables[1] and "error" not in tables[0]
    shown = {t["id"]: t for t in tables[0]["tokens"]}
    assert shown[x]["kept"] == [True, False] and 12 in shown


def test_sampler_settings_endpoint_describes_every_knob(server):
    """GET /v1/sampler_settings: what the page builds its controls from, and the request fields
    are the same knobs (one field each, derived from SamplerSettings)."""
    r = httpx.get(f"{server.url}/v1/sampler_settings")
    assert r.status_code == 200 and r.json() == json.loads(json.dumps(describe()))
    names = [k.name for k in knobs()]
    assert [k["name"] for k in r.json()["knobs"]] == names
    for request in (CompletionRequest, DistributionRequest):
        assert set(names) <= set(request.model_fields)
    assert r.json()["orders"]["llama.cpp"][-2:] == ["temperature", "mirostat"]


def test_new_stages_through_the_api(client, server):
    """Every new stage through the request body: the distribution shows each, in order; and a
    choice of n = 2 (Mirostat's μ, XTC's coin, DRY's matches per row, batched with the other)
    equals the same seed asked alone."""
    body = dict(prompt=PROMPT, dry_multiplier=0.8, top_n_sigma=1.5, top_h=0.9,
                epsilon_cutoff=0.001, eta_cutoff=0.001, xtc_probability=1, xtc_threshold=0.05,
                mirostat=2, mirostat_tau=3, temperature=0.9, top_n=5)
    r = httpx.post(f"{server.url}/v1/distribution", json=body)
    assert r.status_code == 200, r.text
    assert [s["name"] for s in r.json()["stages"]] == [
        "raw", "dry", "temperature", "top_n_sigma", "top_h", "epsilon_cutoff", "eta_cutoff", "xtc",
        "mirostat"]
    extra = {k: v for k, v in body.items() if k not in ("prompt", "temperature", "top_n")}
    extra["xtc_probability"] = 0.5
    both = create(client, server, prompt=PROMPT, max_tokens=12, n=2, seed=4, temperature=0.9,
                  ignore_eos=True, extra_body=extra)
    for i in range(2):
        alone = create(client, server, prompt=PROMPT, max_tokens=12, seed=4 + i, temperature=0.9,
                       ignore_eos=True, extra_body=extra)
        assert both.choices[i].text == alone.choices[0].text


def test_model_name():
    assert model_name("out/shakespeare_char") == "shakespeare_char"
    assert model_name("out/shakespeare_char/best/") == "shakespeare_char"
    assert model_name("openai-community/gpt2") == "gpt2"


def test_without_fastapi_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert run_cli(serve_main, ["--ckpt", "x"]) == 2
    assert capsys.readouterr().err == \
        "error: minilm-serve needs FastAPI, uvicorn and prometheus_client: pip install " \
        "'minilm[serve]'\n"


@pytest.mark.parametrize("args, message", [
    (["--max_batch", "0"], "error: --max_batch must be >= 1, got 0"),
    (["--port", "70000"], "error: --port must be in [0, 65535]"),
    (["--max_tokens_limit", "0"], "error: --max_tokens_limit must be >= 1, got 0"),
    (["--prefill_chunk", "0"], "error: --prefill_chunk must be >= 1, got 0"),
    (["--max_waiting", "-1"], "error: --max_waiting must be >= 0, got -1"),
    (["--kv_cache_tokens", "8"], "error: --kv_cache_tokens must be at least one block of 16 "
                                 "tokens, got 8"),
    (["--kv_cache_tokens", "64", "--no_prefix_cache"], "error: --no_prefix_cache and "
                                                       "--kv_cache_tokens contradict"),
    (["--device", "tpu9"], "error: --device: invalid choice 'tpu9'"),
    ([], "error: no checkpoint found"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    assert run_cli(serve_main, ["--ckpt", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1


@pytest.mark.slow
def test_serves_a_hugging_face_gpt2_folder(tmp_path):
    """Any source load_model reads: a transformers GPT-2 folder, served in-process (the app with
    its engine thread); greedy tokens equal transformers' own generate."""
    from fastapi.testclient import TestClient

    from minilm.serving.app import create_app

    from hf_models import gpt2_bpe, hf_gpt2

    bpe = gpt2_bpe()
    hf = hf_gpt2(tmp_path, vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model, tokenizer, _ = load_model(tmp_path)
    prompt = bpe.encode("The meaning of life is")
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
    with TestClient(create_app(model, tokenizer, "tiny-gpt2")) as http:
        r = http.post("/v1/completions", json=dict(prompt="The meaning of life is", max_tokens=8,
                                                   temperature=0, return_token_ids=True))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if bpe.eot_token in expected:  # the model stops at end-of-text
            expected = expected[:expected.index(bpe.eot_token) + 1]
        assert choice["token_ids"] == expected
        assert choice["text"] == bpe.decode([t for t in expected if t != bpe.eot_token])
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-gpt2"


# ------------------------------------------------------------------------------------------------
# /metrics, the prefix cache, prompt_logprobs, --max_waiting


def scrape(server_or_url) -> dict[str, float]:
    """/metrics through prometheus_client's own parser: {sample name: value} (labels dropped;
    every sample of this server has the one model_name label; histogram buckets keep `le`)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = getattr(server_or_url, "url", server_or_url)
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            name = sample.name + (f"[{sample.labels['le']}]" if "le" in sample.labels else "")
            out[name] = sample.value
    return out


def test_metrics_count_what_requests_did(client, server):
    before = scrape(server)
    r = create(client, server, prompt=PROMPT, max_tokens=7, seed=1, ignore_eos=True)
    chunks = list(create(client, server, prompt="JULIET:", max_tokens=3, seed=2,
                         ignore_eos=True, stream=True))
    after = scrape(server)

    def delta(name):
        return after[name] - before.get(name, 0.0)

    assert delta("minilm:prompt_tokens_total") == len(PROMPT) + len("JULIET:")
    assert delta("minilm:generation_tokens_total") == r.usage.completion_tokens + len(chunks)
    for histogram in ("minilm:time_to_first_token_seconds", "minilm:e2e_request_latency_seconds"):
        assert delta(histogram + "_count") == 2 and delta(histogram + "_sum") > 0
        assert delta(histogram + "_bucket[+Inf]") == 2
    assert after["minilm:time_to_first_token_seconds_sum"] <= \
        after["minilm:e2e_request_latency_seconds_sum"]
    assert after["minilm:num_requests_running"] == after["minilm:num_requests_waiting"] == 0
    assert after["minilm:kv_cache_usage_perc"] == 0
    assert delta("minilm:prefix_cache_queries_total") == len(PROMPT) + len("JULIET:")
    r = httpx.get(f"{server.url}/metrics")
    assert f'minilm:num_requests_running{{model_name="{server.name}"}}' in r.text


SHARED = "KING RICHARD:\nNow is the winter of our discontent"  # 48 characters


def test_prefix_cache_reuse_gives_the_cold_results(client, server, local):
    """A prompt whose first block (16 characters) an earlier request computed reuses it: the
    hits counter says so, and the logprobs are still the model's own (1e-4)."""
    model, tokenizer = local
    first, second = SHARED[:24], SHARED[:18] + " winter"
    for prompt, hits in ((first, 0), (first, 16), (second, 16)):
        before = scrape(server)["minilm:prefix_cache_hits_total"]
        r = create(client, server, prompt=prompt, max_tokens=6, logprobs=0, temperature=0,
                   ignore_eos=True, return_token_ids=True)
        assert scrape(server)["minilm:prefix_cache_hits_total"] - before == hits
        ids = tokenizer.encode(prompt) + r.choices[0].model_extra["token_ids"]
        ref = raw_logprobs(model, ids)[len(prompt) - 1:-1]
        chosen = torch.tensor(r.choices[0].model_extra["token_ids"])
        torch.testing.assert_close(torch.tensor(r.choices[0].logprobs.token_logprobs,
                                                dtype=torch.double),
                                   ref.gather(1, chosen[:, None])[:, 0], atol=1e-4, rtol=0)
        assert chosen.tolist() == ref.argmax(-1).tolist()  # greedy


def test_prompt_logprobs(client, server, local):
    """vLLM's prompt_logprobs: per choice, None for the first token, then the prompt token and
    the top N by id, each with its raw logprob, rank and text; the same from the prefix cache."""
    model, tokenizer = local
    prompt = SHARED[:30]
    ids = tokenizer.encode(prompt)
    ref = raw_logprobs(model, ids)  # row i predicts token i + 1
    for max_tokens in (0, 2, 0):  # the second and third read the prompt's blocks from the cache
        r = create(client, server, prompt=prompt, max_tokens=max_tokens, n=2, seed=1,
                   extra_body=dict(prompt_logprobs=3))
        assert [c.model_extra["prompt_logprobs"] for c in r.choices][0] == \
            r.choices[1].model_extra["prompt_logprobs"]
        got = r.choices[0].model_extra["prompt_logprobs"]
        assert len(got) == len(ids) and got[0] is None
        for i, position in enumerate(got[1:]):
            top = ref[i].topk(3).indices.tolist()
            assert list(position) == [str(ids[i + 1])] + [str(t) for t in top if t != ids[i + 1]]
            for key, entry in position.items():
                t = int(key)
                assert abs(entry["logprob"] - ref[i, t]) < 1e-4
                assert entry["rank"] == 1 + int((ref[i] > ref[i, t]).sum())
                assert entry["decoded_token"] == tokenizer.decode([t])
    plain = create(client, server, prompt=prompt, max_tokens=2)
    assert "prompt_logprobs" not in plain.choices[0].model_extra


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_logprobs=21), "prompt_logprobs must be in [0, 20]"),
    (dict(prompt_logprobs=1, stream=True), "not available with stream"),
])
def test_bad_prompt_logprobs(server, kwargs, message):
    r = httpx.post(f"{server.url}/v1/completions", json=dict(prompt=PROMPT, **kwargs))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert message in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions",
                   json=dict(prompt="x" * 33, max_tokens=0, prompt_logprobs=1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn in a thread, on a free loopback port: its URL."""
    import uvicorn

    from server_process import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def one_thread():
    """An in-process server computes in this process: one thread, as the test server's
    OMP_NUM_THREADS=1 (on a busy 2-core machine two threads of a tiny model spin for nothing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_max_waiting_and_no_prefix_cache(serve_checkpoint, one_thread):
    """--max_waiting 1 with one row: a request that finds one waiting is refused with a 503 in
    OpenAI's shape (the others go on); without a prefix cache nothing is reused."""
    from minilm.serving.app import create_app

    model, tokenizer, _ = load_model(serve_checkpoint)
    app = create_app(model, tokenizer, "tiny", max_batch=1, max_waiting=1, kv_cache_tokens=0)
    with serving(app) as url:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        async def scenario():
            running = asyncio.create_task(aclient.completions.create(
                model="tiny", prompt=SHARED[:30], max_tokens=150, extra_body=dict(
                    ignore_eos=True)))
            while scrape(url)["minilm:num_requests_running"] < 1:
                await asyncio.sleep(0.02)
            waiting = asyncio.create_task(aclient.completions.create(
                model="tiny", prompt=SHARED[:30], max_tokens=2))
            while scrape(url)["minilm:num_requests_waiting"] < 1:
                await asyncio.sleep(0.02)
            with pytest.raises(openai.APIStatusError) as info:
                await aclient.completions.create(model="tiny", prompt="A", max_tokens=1)
            return info.value, await running, await waiting

        refused, running, waiting = asyncio.run(scenario())
        assert refused.status_code == 503 and set(refused.body) == {"message", "type", "param",
                                                                    "code"}
        assert refused.body["type"] == "server_error" and "--max_waiting 1" in refused.message
        assert running.usage.completion_tokens == 150 and waiting.usage.completion_tokens >= 1
        metrics = scrape(url)
        assert metrics["minilm:prefix_cache_hits_total"] == 0
        assert metrics["minilm:prefix_cache_queries_total"] == 60


def test_guidance_through_the_api(client, server, local):
    """guidance_scale and negative_prompt in the request body: the unconditional rows run in the
    server's batch; greedy tokens equal in-process generation's, and /v1/distribution's guidance
    stage is s·(log_softmax(cond) − log_softmax(uncond)) + log_softmax(uncond) of the model's
    own two forwards (float64)."""
    from minilm.sampling.generation import complete
    from minilm.sampling.stack import SamplerStack

    model, tokenizer = local
    guidance = dict(guidance_scale=-1.5, negative_prompt="JULIET:")
    r = create(client, server, prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True,
               return_token_ids=True, extra_body=guidance)
    stack = SamplerStack.from_settings(temperature=0.0, guidance_scale=-1.5)
    (alone,) = complete(model, [tokenizer.encode(PROMPT)], 10, sampler=stack,
                        negative_prompt=tokenizer.encode("JULIET:"))
    assert r.choices[0].model_extra["token_ids"] == alone.tokens
    plain = create(client, server, prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True,
                   return_token_ids=True)
    assert plain.choices[0].model_extra["token_ids"] != alone.tokens  # guidance did something

    table = httpx.post(f"{server.url}/v1/distribution",
                       json=dict(prompt=PROMPT, top_n=5, **guidance)).json()
    assert [s["name"] for s in table["stages"]] == ["raw", "guidance"]
    cond = raw_logprobs(model, tokenizer.encode(PROMPT))[-1]
    uncond = raw_logprobs(model, tokenizer.encode("JULIET:"))[-1]
    guided = torch.softmax(-1.5 * (cond - uncond) + uncond, dim=-1)
    for t in table["tokens"]:
        assert abs(t["probs"][1] - guided[t["id"]]) < 1e-5
    # two rows per choice: n = 9 needs 18 rows of the 16
    with pytest.raises(openai.BadRequestError) as info:
        create(client, server, prompt=PROMPT, max_tokens=2, n=9, extra_body=guidance)
    assert info.value.param == "n" and "guidance" in info.value.message
