"""The public API at the top (`from minilm import ...`): what the README's notebook example uses."""

import torch

import minilm


def test_the_readme_example_runs_on_a_saved_model(tmp_path):
    from saved import save_model

    tok = minilm.CharTokenizer("\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    torch.manual_seed(0)
    model = minilm.GPT(minilm.GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                        block_size=16))
    save_model(tmp_path / "run" / "best", model, tok.to_dict())

    model, tokenizer, _ = minilm.load_model(tmp_path / "run")
    stack = minilm.SamplerStack.from_settings(minilm.SamplerSettings(temperature=0.8, top_k=5))
    prompt = tokenizer.encode("ROMEO:")
    out = minilm.complete(model, [prompt], 20, sampler=stack, seed=1)
    again = minilm.complete(model, [prompt], 20, sampler=stack, seed=1)
    assert len(out[0].tokens) == 20 and out[0].tokens == again[0].tokens  # a seed reproduces
    # the raw log-probs are the model's own (T = 1) on the window
    ids = prompt + out[0].tokens[:-1]
    with torch.no_grad():
        logits = model(torch.tensor([ids[-16:]]))[0, -1].double()
    assert abs(out[0].logprobs[-1] - torch.log_softmax(logits, -1)[out[0].tokens[-1]].item()) < 1e-4
    lens = minilm.logit_lens(model, prompt)
    assert len(lens.layers) == model.config.n_layer + 1


def test_every_public_name_is_there():
    for name in minilm.__all__:
        assert getattr(minilm, name) is not None, name
    assert issubclass(minilm.MinilmError, ValueError)
