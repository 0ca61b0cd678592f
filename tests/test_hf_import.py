"""Hugging Face GPT-2 -> minilm: logits, KV-cache decoding and greedy generation against
transformers itself, the config mapping and its refusals, the tokenizer check."""

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from minilm.cli.common import run_cli  # noqa: E402
from minilm.cli.generate import main as generate_main  # noqa: E402
from minilm.errors import CheckpointError  # noqa: E402
from minilm.interop.hf import GELU_TANH, HF_DEFAULTS  # noqa: E402
from minilm.interop.loading import load_model  # noqa: E402
from minilm.model.gpt import KVCache  # noqa: E402

from hf_models import as_openai_gpt2_layout, gpt2_bpe, hf_gpt2  # noqa: E402

SHAPES = {
    # 3 layers x 3 heads x 48 dims, tied (GPT-2's own vocabulary, so generate.py has a tokenizer)
    "tied": dict(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=50257),
    # untied head, another LayerNorm epsilon and the other tanh-GELU spelling
    "untied": dict(n_layer=2, n_head=2, n_embd=32, n_positions=48, vocab_size=50257,
                   tie_word_embeddings=False, layer_norm_epsilon=1e-3,
                   activation_function="gelu_pytorch_tanh"),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, the transformers model); 'openai' is stored as openai-community/gpt2 and
    distilgpt2 are: old config, bare GPT2Model weights with mask buffers, pytorch_model.bin."""
    from transformers import AutoModelForCausalLM

    models = {}
    for i, (name, config) in enumerate(SHAPES.items()):
        folder = tmp_path_factory.mktemp(name)
        models[name] = (folder, hf_gpt2(folder, seed=i, **config))
    folder = tmp_path_factory.mktemp("openai")
    distil = dict(n_layer=2, n_head=4, n_embd=32, n_positions=40)
    hf_gpt2(folder, seed=7, **distil)
    as_openai_gpt2_layout(folder, distil)
    models["openai"] = (folder, AutoModelForCausalLM.from_pretrained(folder).eval())
    return models


@pytest.mark.parametrize("name", ["tied", "untied", "openai"])
def test_logits_equal_transformers(hf_models, name):
    folder, hf = hf_models[name]
    model, tokenizer, state = load_model(folder)
    assert model.config.n_layer == hf.config.n_layer and state["format"] == "huggingface"
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    assert model.config.layer_norm_eps == hf.config.layer_norm_epsilon
    assert tokenizer.to_dict() == gpt2_bpe().to_dict()  # no tokenizer files, GPT-2's vocab size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (3, hf.config.n_positions), generator=g)
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_kv_cache_decoding_equals_transformers_cache(hf_models, name):
    """minilm's KV cache vs HF's past_key_values: a prefill, then one token at a time."""
    folder, hf = hf_models[name]
    model, _, _ = load_model(folder)
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, batch_size=2)
    with torch.no_grad():
        ours = [model.logits(ids[:, :16], kv_cache=cache, last_n=None)]
        out = hf(ids[:, :16], use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        for t in range(16, 24):
            ours.append(model.logits(ids[:, t:t + 1], kv_cache=cache))
            out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            theirs.append(out.logits)
            past = out.past_key_values
        full = model(ids)  # and both equal minilm's own uncached pass
    ours, theirs = torch.cat(ours, 1), torch.cat(theirs, 1)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - full).abs().max().item() <= 1e-4


def test_greedy_generate_cli_equals_transformers_generate(hf_models, capsys):
    folder, hf = hf_models["tied"]
    bpe = gpt2_bpe()
    prompt = "ROMEO: But soft, what light"
    assert run_cli(generate_main, ["--ckpt", str(folder), "--prompt", prompt, "--temperature", "0",
                                   "--max_new_tokens", "30", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["tokens"]
    ids = torch.tensor([bpe.encode(prompt)])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=30, eos_token_id=bpe.eot_token,
                             pad_token_id=bpe.eot_token)[0, ids.shape[1]:].tolist()
    assert ours == theirs and len(ours) >= 1


def test_accepted_activations_are_minilms_gelu():
    """Every HF activation accepted as minilm's F.gelu(approximate='tanh') computes it."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 100_001)
    reference = F.gelu(x.double(), approximate="tanh")
    for name in GELU_TANH:
        assert (ACT2FN[name](x).double() - reference).abs().max().item() <= 1e-6, name
    assert (ACT2FN["gelu"](x).double() - reference).abs().max().item() > 1e-4  # erf GELU: refused


def test_defaults_are_gpt2configs():
    """Fields a config.json leaves out take GPT2Config's defaults."""
    defaults = transformers.GPT2Config().to_dict()
    assert {k: defaults[k] for k in HF_DEFAULTS} == HF_DEFAULTS


def test_reorder_and_upcast_attn_is_the_same_function(tmp_path):
    """Accepted because it computes the same attention: here against HF's eager implementation,
    the only one that reads the flag."""
    from transformers import AutoModelForCausalLM

    hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257,
            reorder_and_upcast_attn=True)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model, _, _ = load_model(tmp_path)
    ids = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("field, value, message", [
    ("activation_function", "relu", "activation_function='relu' cannot be represented exactly"),
    ("activation_function", "gelu", "activation_function='gelu' cannot be represented exactly"),
    ("n_inner", 100, "n_inner=100 cannot be represented exactly by minilm (minilm's MLP is 4 * "
                     "n_embd wide)"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True cannot"),
    ("scale_attn_weights", False, "scale_attn_weights=False cannot"),
    ("add_cross_attention", True, "add_cross_attention=True cannot"),
])
def test_unrepresentable_config_is_refused(tmp_path, field, value, message):
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257).to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert message in str(e.value) and str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config_class", ["LlamaConfig", "BertConfig"])
def test_non_gpt2_folder_is_refused_by_the_cli(tmp_path, capsys, config_class):
    getattr(transformers, config_class)(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                        intermediate_size=32).save_pretrained(tmp_path)
    assert run_cli(generate_main, ["--ckpt", str(tmp_path)]) == 2
    kind = "llama" if config_class == "LlamaConfig" else "bert"
    assert capsys.readouterr().err == (f"error: {tmp_path} is not a GPT-2 model (model_type "
                                       f"'{kind}'); minilm reads GPT-2 checkpoints only\n")


def test_tokenizer_files_are_checked(tmp_path, hf_models):
    """A vocab.json other than GPT-2's is refused; no tokenizer files and a vocabulary other than
    GPT-2's size cannot be guessed; GPT-2's own vocab.json is accepted."""
    bpe = gpt2_bpe()
    folder = tmp_path / "model"
    hf_gpt2(folder, n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50257)
    from minilm.interop.hf_tokenizer import tiktoken_vocab

    vocab = tiktoken_vocab(bpe.enc)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    assert load_model(folder)[1].to_dict() == bpe.to_dict()
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"vocab.json is a BPE tokenizer of 50257 tokens that "
                                              r"is neither GPT-2's BPE nor a minilm char tokenizer"):
        load_model(folder)
    small = tmp_path / "small"
    hf_gpt2(small, n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=300)
    with pytest.raises(CheckpointError, match=r"has no tokenizer files .* vocab_size 300 is not "
                                              r"GPT-2's 50257"):
        load_model(small)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50257)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "h.1.mlp.c_fc.bias" not in k},
              tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="the weights lack 'transformer.h.1.mlp.c_fc.bias'"):
        load_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.h.1"):
        load_model(tmp_path)


def test_local_looking_missing_path_is_not_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for source in ["./gpt2", "out/run1", "~/nowhere-minilm", "model.safetensors"]:
        with pytest.raises(CheckpointError, match="no such file or folder"):
            load_model(source)
