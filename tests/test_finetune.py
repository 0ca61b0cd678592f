"""train.init_from: fine-tuning starts from the source's weights (the first logged loss is the
source's loss on that batch, computed by transformers), the shape and tokenizer come from the
source, contradictions are one line, resume keeps its meaning."""

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from minilm.cli.common import run_cli  # noqa: E402
from minilm.cli.train import train_main
from minilm.interop.loading import load_model  # noqa: E402
from minilm.model.gpt import GPT, GPTConfig  # noqa: E402
from minilm.tokenizer import CharTokenizer  # noqa: E402
from minilm.train.config import load_config  # noqa: E402
from minilm.train.tracking import read_metrics  # noqa: E402
from minilm.train.trainer import train  # noqa: E402

from conftest import CORPUS, first_step_loss, tiny_overrides  # noqa: E402
from hf_models import gpt2_bpe, hf_gpt2  # noqa: E402
from saved import save_model  # noqa: E402

SOURCE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2-tiny")
    return folder, hf_gpt2(folder, seed=3, **SOURCE)


def step_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def test_init_from_hf_folder_starts_from_its_loss_and_learns(hf_source, corpus_file, tmp_path):
    gpt2_bpe()
    folder, hf = hf_source
    # tiny_overrides sets n_layer/n_head/n_embd (equal to the source's) and block_size 16 (< 32:
    # the position table is cropped); data.tokenizer is left out, so it becomes the source's gpt2
    overrides = tiny_overrides(tmp_path, corpus_file, **{
        "train.init_from": folder, "train.grad_accum_steps": 2, "train.warmup_iters": 0,
        "train.learning_rate": 3e-3, "train.max_iters": 8})
    cfg = load_config(None, overrides)
    train(cfg)
    steps = step_losses(tmp_path / "out")

    # the same two micro-batches of step 0, through transformers' model
    assert steps[1] == pytest.approx(first_step_loss(cfg, lambda x: hf(x).logits), rel=1e-5)
    assert steps[8] < steps[1] - 0.5

    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["model"]["block_size"] == 16 and saved["data"]["tokenizer"] == "gpt2"
    model, tokenizer, state = load_model(tmp_path / "out" / "last")
    assert (model.config.n_layer, model.config.block_size, tokenizer.name) == (2, 16, "gpt2")

    # resume keeps its meaning: this out_dir continues, its shape comes from its own checkpoint
    train(load_config(None, overrides + ["--train.resume=true", "--train.max_iters=10"]))
    assert sorted(step_losses(tmp_path / "out")) == list(range(1, 11))


@pytest.mark.parametrize("override, message", [
    ("--model.n_layer=3", "model.n_layer is 3 but train.init_from '{src}' has 2 (the source decides "
                          "it: leave model.n_layer out or set it to 2)"),
    ("--model.block_size=64", "model.block_size is 64 but train.init_from '{src}' has 32 (it has "
                              "no position embeddings beyond: leave model.block_size out or set it "
                              "to at most 32)"),
    ("--data.tokenizer=char", "data.tokenizer is 'char' but train.init_from '{src}' has 'gpt2' (the "
                              "source decides it: leave data.tokenizer out or set it to 'gpt2')"),
    ("--loss.softcap=10", "model.logit_softcap is 10.0 but train.init_from '{src}' has None (the "
                          "source decides it: leave model.logit_softcap out or set it to None)"),
])
def test_contradicting_the_source_is_one_line(hf_source, corpus_file, tmp_path, capsys, override,
                                              message):
    folder, _ = hf_source
    args = [f"--train.init_from={folder}", f"--out_dir={tmp_path / 'out'}",
            f"--data.source={corpus_file}", f"--data.cache_dir={tmp_path / 'cache'}", override]
    assert run_cli(train_main, args) == 2  # the default config file's keys are not the user's
    assert capsys.readouterr().err == f"error: {message.format(src=folder)}\n"


def char_source(folder, chars: str, softcap=None) -> GPT:
    tok = CharTokenizer(chars)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                          block_size=16, logit_softcap=softcap))
    save_model(folder / "last", model, tok.to_dict())
    return model


def test_init_from_a_minilm_char_checkpoint(corpus_file, tmp_path, capsys, monkeypatch):
    """Its shape, char vocabulary and soft-cap carry over; other characters are refused."""
    source = char_source(tmp_path / "src", CharTokenizer.from_texts([CORPUS]).chars, softcap=20.0)
    overrides = tiny_overrides(tmp_path, corpus_file, **{"train.init_from": tmp_path / "src",
                                                         "train.max_iters": 2,
                                                         "train.warmup_iters": 1})
    overrides = [o for o in overrides if not o.startswith("--model.")]
    cfg = load_config(None, overrides)
    train(cfg)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.logit_softcap) == (1, 16, 20.0)
    expected = first_step_loss(cfg, lambda x: source.eval().logits(x, last_n=None))  # soft-capped
    assert step_losses(tmp_path / "out")[1] == pytest.approx(expected, rel=1e-5)

    char_source(tmp_path / "other", "\n !,.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    # checked before the run writes anything: no wandb run starts (issue 17.6)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [f"--train.init_from={tmp_path / 'other'}", f"--out_dir={tmp_path / 'out2'}",
            f"--data.source={corpus_file}", f"--data.cache_dir={tmp_path / 'cache'}",
            "--train.device=cpu"]
    assert run_cli(train_main, args) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the tokenizing progress bar
    assert err.startswith(f"error: data.source '{corpus_file}' has a char vocabulary of 34 "
                          f"characters but train.init_from '{tmp_path / 'other'}' has 59 (")
    assert err.endswith("is in only one): the same ids would mean different characters")
    assert not (tmp_path / "out2").exists()  # no records, no wandb run
