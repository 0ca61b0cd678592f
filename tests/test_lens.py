"""The logit lens (minilm.sampling.lens, minilm-lens, POST /v1/lens) against independent
references: HF transformers' hidden states through HF's own ln_f and lm_head, and a float64
forward of the embeddings written out here."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minilm.cli.common import run_cli
from minilm.cli.lens import main as lens_main
from minilm.errors import SettingError
from minilm.interop.loading import load_model
from minilm.model.gpt import GPT, GPTConfig
from minilm.sampling.lens import (
    SWEEP_TEMPERATURES,
    logit_lens,
    next_token_logits,
    temperature_sweep,
)

from hf_models import gpt2_bpe, hf_gpt2

HF_CONFIG = dict(vocab_size=50257, n_layer=3, n_head=2, n_embd=32, n_positions=16)
PROMPT = "ROMEO:\nWhat say"


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random-weight GPT2LMHeadModel saved by transformers, and minilm's load_model of it."""
    gpt2_bpe()  # the folder's tokenizer is GPT-2's BPE: skip, saying why, when it is not cached
    folder = tmp_path_factory.mktemp("hf_lens")
    hf = hf_gpt2(folder, seed=3, **HF_CONFIG)
    model, tokenizer, _ = load_model(folder)
    return hf, model, tokenizer


def hf_lens_logprobs(hf, ids: list[int], position: int) -> torch.Tensor:
    """HF's reading [n_layer + 1, V] (float64 log-probs): hidden_states[i] through HF's ln_f and
    lm_head; the last hidden state already has ln_f applied."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        states = [h[0, position] for h in out.hidden_states]
        logits = [hf.lm_head(hf.transformer.ln_f(h)) for h in states[:-1]]
        logits.append(hf.lm_head(states[-1]))
    assert torch.allclose(logits[-1], out.logits[0, position], atol=1e-5)  # HF agrees with itself
    return torch.log_softmax(torch.stack(logits).double(), dim=-1)


@pytest.mark.slow  # imports transformers
@pytest.mark.parametrize("position", [-1, 0, 3])
def test_every_layer_equals_hf_hidden_states_through_ln_f_and_the_head(hf_pair, position):
    hf, model, tokenizer = hf_pair
    ids = tokenizer.encode("The quick brown fox jumps")
    top_n = 50
    lens = logit_lens(model, ids, position, top_n)
    reference = hf_lens_logprobs(hf, ids, position)
    assert len(lens.layers) == HF_CONFIG["n_layer"] + 1
    assert [layer.name for layer in lens.layers] == ["embeddings", "block 1", "block 2", "block 3"]
    choice = int(reference[-1].argmax())
    assert lens.choice == choice
    for layer, logp in zip(lens.layers, reference):
        top = logp.topk(top_n)
        assert [t for t, _ in layer.top] == top.indices.tolist()
        assert [lp for _, lp in layer.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert layer.entropy == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)
        assert layer.rank == 1 + int((logp > logp[choice]).sum())
        assert layer.choice_logprob == pytest.approx(float(logp[choice]), abs=1e-4)
    assert lens.layers[-1].rank == 1
    assert any(layer.rank > 1 for layer in lens.layers[:-1])  # random weights: the lens differs


def test_the_last_layer_is_the_models_own_distribution_softcap_included():
    torch.manual_seed(0)
    # a tight cap: a lens that skipped it would differ everywhere
    model = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=8,
                          logit_softcap=0.5)).eval()
    ids = [3, 1, 4, 1, 5, 9]
    lens = logit_lens(model, ids, top_n=40)
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), dim=-1)
    assert dict(lens.layers[-1].top) == pytest.approx(dict(enumerate(own.tolist())), abs=1e-6)

    # the embeddings' reading, in float64 by hand: LayerNorm, the tied head, the cap
    t = model.transformer
    x = (t.wte.weight[ids[-1]] + t.wpe.weight[len(ids) - 1]).double()
    h = F.layer_norm(x, (16,), t.ln_f.weight.double(), t.ln_f.bias.double(), 1e-5)
    z = 0.5 * torch.tanh(t.wte.weight.double() @ h / 0.5)
    expected = torch.log_softmax(z, dim=-1)
    assert dict(lens.layers[0].top) == pytest.approx(dict(enumerate(expected.tolist())), abs=1e-5)


def test_a_position_past_block_size_reads_the_window_generation_reads():
    """As generation: the token after position p is predicted from the block_size tokens ending
    at p."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=30, n_layer=2, n_head=2, n_embd=16, block_size=6)).eval()
    ids = [(7 * i) % 30 for i in range(15)]
    lens = logit_lens(model, ids, position=11, top_n=30)
    assert (lens.position, lens.start) == (11, 6)
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([ids[6:12]]))[0, -1].double(), dim=-1)
    assert dict(lens.layers[-1].top) == pytest.approx(dict(enumerate(own.tolist())), abs=1e-6)
    assert logit_lens(model, ids[6:12], top_n=30).layers == lens.layers


def test_hooks_are_removed_after_the_lens():
    model = GPT(GPTConfig(vocab_size=20, n_layer=2, n_head=2, n_embd=8, block_size=8))
    logit_lens(model, [1, 2, 3])
    modules = [model.transformer.drop, *model.transformer.h]
    assert all(not m._forward_hooks for m in modules)
    assert model.training  # the caller's mode is left as it was


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(position=5), "position", "position must be in [-5, 4] for a prompt of 5 tokens, got 5"),
    (dict(position=-6), "position", "position must be in [-5, 4] for a prompt of 5 tokens, got -6"),
    (dict(top_n=0), "top_n", "top_n must be a positive integer, got 0"),
])
def test_bad_arguments_name_the_setting(kwargs, param, message):
    model = GPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, n_embd=8, block_size=8))
    with pytest.raises(SettingError) as e:
        logit_lens(model, [1, 2, 3, 4, 5], **kwargs)
    assert (e.value.param, str(e.value)) == (param, message)
    with pytest.raises(SettingError, match="the prompt is empty"):
        logit_lens(model, [])


def test_temperature_sweep_is_softmax_of_z_over_t_in_float64():
    z = [2.0, 1.0, 0.5, -1.0, -3.0]
    entropy, top_prob = temperature_sweep(torch.tensor(z), [0.1, 0.7, 1.0, 2.0])
    for T, h, p in zip([0.1, 0.7, 1.0, 2.0], entropy, top_prob):
        weights = [math.exp((x - max(z)) / T) for x in z]
        probs = [w / sum(weights) for w in weights]
        assert h == pytest.approx(-sum(q * math.log(q) for q in probs), abs=1e-12)
        assert p == pytest.approx(max(probs), abs=1e-12)
    assert SWEEP_TEMPERATURES[0] == 0.1 and SWEEP_TEMPERATURES[-1] == 2.0
    assert len(SWEEP_TEMPERATURES) == 39
    for bad in ([], [0.0], [1.0, -1.0], [float("nan")], [True]):
        with pytest.raises(SettingError, match="temperatures must be a non-empty list"):
            temperature_sweep(torch.tensor(z), bad)


def test_next_token_logits_is_the_lens_last_layer():
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=25, n_layer=2, n_head=2, n_embd=16, block_size=5)).eval()
    ids = [1, 7, 3, 9, 4, 2, 8]
    for position in (0, 3, -1):
        logp = torch.log_softmax(next_token_logits(model, ids, position).double(), dim=-1)
        lens = logit_lens(model, ids, position, top_n=25)
        assert dict(lens.layers[-1].top) == pytest.approx(dict(enumerate(logp.tolist())),
                                                          abs=1e-6)


# ------------------------------------------------------------------------------------------------
# minilm-lens


@pytest.fixture(scope="module")
def char_model(serve_checkpoint):
    model, tokenizer, _ = load_model(serve_checkpoint)
    return model, tokenizer


def test_cli_json_is_the_lens(serve_checkpoint, char_model, capsys):
    model, tokenizer = char_model
    argv = ["--ckpt", str(serve_checkpoint), "--prompt", PROMPT, "--position", "-3", "--top", "4",
            "--json", "--device", "cpu"]
    assert run_cli(lens_main, argv) == 0
    answer = json.loads(capsys.readouterr().out)
    ids = tokenizer.encode(PROMPT)
    assert answer["prompt_token_ids"] == ids and answer["position"] == len(ids) - 3
    assert answer["token"] == dict(id=ids[-3], token=tokenizer.decode([ids[-3]]))
    assert len(answer["layers"]) == model.config.n_layer + 1
    assert [layer["layer"] for layer in answer["layers"]] == [0, 1, 2]
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([ids]))[0, -3].double(), dim=-1)
    last = answer["layers"][-1]
    assert [t["id"] for t in last["top"]] == own.topk(4).indices.tolist()
    assert [t["logprob"] for t in last["top"]] == pytest.approx(own.topk(4).values.tolist(),
                                                                abs=1e-5)
    assert answer["choice"]["id"] == last["top"][0]["id"] and last["rank"] == 1
    for layer in answer["layers"]:
        assert len(layer["top"]) == 4
        assert all(t["token"] == tokenizer.decode([t["id"]]) for t in layer["top"])


def test_cli_table(serve_checkpoint, char_model, capsys):
    model, tokenizer = char_model
    assert run_cli(lens_main, ["--ckpt", str(serve_checkpoint), "--prompt", PROMPT, "--top", "3",
                               "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lens = logit_lens(model, tokenizer.encode(PROMPT), top_n=3)
    choice = tokenizer.decode([lens.choice])
    assert lines[0].startswith(f"position {len(PROMPT) - 1} of {len(PROMPT)} ('y'); "
                               f"the model's choice: {choice!r}, p = ")
    assert lines[2].split() == ["layer", "entropy", "rank", "top", "tokens", "(probability)"]
    rows = lines[3:]
    assert [r.split()[0] for r in rows] == ["embeddings", "block", "block"]
    for row, layer in zip(rows, lens.layers):
        t, lp = layer.top[0]
        assert f"{layer.entropy:.3f}" in row and f" {layer.rank} " in row
        assert f"{tokenizer.decode([t])!r} {math.exp(lp):.3f}" in row


@pytest.mark.parametrize("args, message", [
    (["--position", "40"], "position must be in [-15, 14] for a prompt of 15 tokens, got 40"),
    (["--position", "x"], "argument --position: invalid int value: 'x'"),
    (["--top", "0"], "--top must be >= 1, got 0"),
    (["--prompt", ""], "--prompt is empty: the lens reads at least one token"),
    (["--prompt", "é"], None),  # a character the char tokenizer does not know: its own line
])
def test_cli_bad_input_is_one_line_and_exit_2(serve_checkpoint, capsys, args, message):
    argv = ["--ckpt", str(serve_checkpoint), "--prompt", PROMPT, "--device", "cpu", *args]
    assert run_cli(lens_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    if message:
        assert err == f"error: {message}\n"
    else:
        assert "'é'" in err


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert run_cli(lens_main, ["--ckpt", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    assert capsys.readouterr().err == f"error: no checkpoint found at {tmp_path / 'nope'}: no " \
                                      "such file or folder\n"


@pytest.mark.slow  # a Python that imports torch
def test_python_m_minilm_lens(serve_checkpoint):
    """The entry point, once in a subprocess."""
    out = subprocess.run([sys.executable, "-m", "minilm.lens", "--ckpt", str(serve_checkpoint),
                          "--prompt", PROMPT, "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["layers"]) == 3


# ------------------------------------------------------------------------------------------------
# POST /v1/lens


@pytest.fixture(scope="module")
def http(char_model):
    from fastapi.testclient import TestClient

    from minilm.serving.app import create_app

    model, tokenizer = char_model
    with TestClient(create_app(model, tokenizer, "tiny")) as client:
        yield client


def test_endpoint_is_the_lens(http, char_model):
    model, tokenizer = char_model
    r = http.post("/v1/lens", json=dict(prompt=PROMPT, position=4, top_n=5))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["object"], answer["model"], answer["prompt"]) == ("lens", "tiny", PROMPT)
    lens = logit_lens(model, tokenizer.encode(PROMPT), 4, 5)
    expected = json.loads(json.dumps(lens.to_dict(lambda t: tokenizer.decode([t]))))
    assert {k: answer[k] for k in expected} == expected
    by_ids = http.post("/v1/lens", json=dict(prompt=tokenizer.encode(PROMPT[:5]))).json()
    assert by_ids["position"] == 4  # the default: the last token
    for layer, shorter in zip(by_ids["layers"], answer["layers"]):
        assert len(layer["top"]) == 10 and layer["top"][:5] == shorter["top"]  # top_n 10


@pytest.mark.parametrize("body, status, param", [
    (dict(prompt="abc", position=3), 400, "position"),
    (dict(prompt="abc", position=-4), 400, "position"),
    (dict(prompt="abc", position="last"), 400, "position"),
    (dict(prompt="abc", position=True), 400, "position"),
    (dict(prompt="abc", top_n=0), 400, "top_n"),
    (dict(prompt="abc", top_n=101), 400, "top_n"),
    (dict(prompt=""), 400, "prompt"),
    (dict(prompt=[999]), 400, "prompt"),
    (dict(position=0), 400, "prompt"),
    (dict(prompt="abc", model="other"), 404, "model"),
])
def test_endpoint_errors_in_openai_shape(http, body, status, param):
    r = http.post("/v1/lens", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------------
# POST /v1/temperature_sweep and POST /v1/score (the page's sweep chart and rank colours)


def test_sweep_endpoint(http, char_model):
    model, tokenizer = char_model
    answer = http.post("/v1/temperature_sweep", json=dict(prompt=PROMPT, position=5)).json()
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        z = model(torch.tensor([ids]))[0, 5].double()
    assert answer["temperatures"] == list(SWEEP_TEMPERATURES) and answer["position"] == 5
    assert answer["top_token"]["id"] == int(z.argmax())
    for T, h, p in zip(answer["temperatures"], answer["entropy"], answer["top_prob"]):
        probs = torch.softmax(z / T, dim=-1)
        assert h == pytest.approx(float(-(probs * probs.log()).sum()), abs=1e-5)
        assert p == pytest.approx(float(probs.max()), abs=1e-6)
    chosen = http.post("/v1/temperature_sweep", json=dict(prompt=PROMPT, temperatures=[0.5]))
    assert chosen.json()["temperatures"] == [0.5] and len(chosen.json()["entropy"]) == 1


@pytest.mark.parametrize("body, param", [
    (dict(prompt="abc", temperatures=[0]), "temperatures"),
    (dict(prompt="abc", temperatures=[]), "temperatures"),
    (dict(prompt="abc", temperatures=[1.0] * 201), "temperatures"),
    (dict(prompt="abc", temperatures="hot"), "temperatures"),
    (dict(prompt="abc", position=9), "position"),
])
def test_sweep_endpoint_errors(http, body, param):
    r = http.post("/v1/temperature_sweep", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_score_endpoint_ranks_each_token_with_generations_window(http, char_model):
    """Past block_size each token is read from the block_size tokens before it, as generated."""
    model, tokenizer = char_model
    text = "ROMEO:\nWhat say you, my lord? Speak, speak, I pray thee now."
    ids = tokenizer.encode(text)
    block = model.config.block_size
    assert len(ids) > block + 5
    answer = http.post("/v1/score", json=dict(prompt=text)).json()
    assert [t["id"] for t in answer["tokens"]] == ids[1:]
    for i, t in enumerate(answer["tokens"], start=1):
        with torch.no_grad():
            z = model(torch.tensor([ids[max(0, i - block):i]]))[0, -1].double()
        logp = torch.log_softmax(z, dim=-1)
        assert t["token"] == tokenizer.decode([ids[i]])
        assert t["logprob"] == pytest.approx(float(logp[ids[i]]), abs=1e-4)
        assert t["rank"] == 1 + int((logp > logp[ids[i]]).sum())
        assert t["entropy"] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)
    assert len({t["rank"] for t in answer["tokens"]}) > 3  # random weights: ranks spread


def test_score_endpoint_errors(http, char_model):
    r = http.post("/v1/score", json=dict(prompt=""))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/score", json=dict(prompt="a" * (32 + 4096 + 1)))
    assert r.status_code == 400 and r.json()["error"] == dict(
        message="prompt is 4129 tokens; at most 4128 (block_size + --max_tokens_limit) are scored",
        type="invalid_request_error", param="prompt", code=None)
