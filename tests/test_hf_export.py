"""minilm -> Hugging Face: transformers loads the export and computes minilm's logits, tensors
round-trip exactly both ways, the tokenizers encode as minilm's, refusals are one line."""

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minilm.cli.common import run_cli  # noqa: E402
from minilm.cli.export import main as export_main  # noqa: E402
from minilm.errors import CheckpointError  # noqa: E402
from minilm.interop.hf import export, gpt_config_from_hf, hf_config  # noqa: E402
from minilm.interop.loading import load_model  # noqa: E402
from minilm.model.gpt import GPT, GPTConfig  # noqa: E402
from minilm.tokenizer import CharTokenizer  # noqa: E402

from conftest import CORPUS, ROOT  # noqa: E402
from hf_models import gpt2_bpe, hf_gpt2, randomize_  # noqa: E402
from saved import save_model  # noqa: E402

CHARS = "\n !&',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzé—"
MIXED = (CORPUS[:400] + "naïve café, Straße, 東京タワー 😀🏳️‍🌈 (e\u0301) ½ ﬁ\r\n"
         + (ROOT / "minilm" / "sampling" / "stages.py").read_text()[:3000] + "\n\n\t  x = [1,2]  \n   ")


def minilm_checkpoint(folder: Path, tokenizer, seed: int = 0, softcap=None, **config) -> GPT:
    torch.manual_seed(seed)
    model = randomize_(GPT(GPTConfig(vocab_size=tokenizer.vocab_size, logit_softcap=softcap,
                                     **config)), seed).eval()
    save_model(folder / "last", model, tokenizer.to_dict())
    return model


def export_cli(*args) -> int:
    return run_cli(export_main, [str(a) for a in args])


@pytest.mark.parametrize("config", [
    dict(n_layer=3, n_head=3, n_embd=48, block_size=24),  # tied, with biases
    dict(n_layer=2, n_head=2, n_embd=32, block_size=16, tie_embeddings=False, bias=False),
    dict(n_layer=1, n_head=4, n_embd=32, block_size=20, layer_norm_eps=1e-3, dropout=0.1),
])
def test_transformers_loads_the_export_with_minilms_logits(tmp_path, config, capsys):
    from transformers import AutoModelForCausalLM

    tok = CharTokenizer(CHARS)
    model = minilm_checkpoint(tmp_path / "run", tok, **config)
    assert export_cli(tmp_path / "run", tmp_path / "hf") == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert not list(tmp_path.glob(".hf*"))  # the temporary folder was renamed away
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    assert hf.generation_config.eos_token_id == tok.eot_token
    ids = torch.randint(0, tok.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_export_import_round_trips_every_tensor(tmp_path, bias):
    tok = CharTokenizer(CHARS)
    model = minilm_checkpoint(tmp_path / "run", tok, n_layer=2, n_head=2, n_embd=32,
                              block_size=16, tie_embeddings=False, bias=bias)
    export(model, tok, tmp_path / "hf")
    back, back_tok, state = load_model(tmp_path / "hf")
    assert back_tok.to_dict() == tok.to_dict()  # the char tokenizer comes back from tokenizer.json
    ours, theirs = model.state_dict(), back.state_dict()
    for name, tensor in theirs.items():
        if name in ours:
            assert torch.equal(tensor, ours[name]), name
        else:  # bias: false exports zero biases
            assert not bias and name.endswith("bias") and not tensor.any(), name
    assert set(ours) <= set(theirs) and (set(ours) == set(theirs)) == bias


def test_import_export_round_trips_transformers_tensors(tmp_path):
    """HF -> minilm -> HF gives back exactly the tensors transformers saved (tied head once)."""
    from safetensors.torch import load_file

    hf_gpt2(tmp_path / "hf", n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=50257)
    model, tok, _ = load_model(tmp_path / "hf")
    export(model, tok, tmp_path / "again")
    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_config_round_trip():
    config = GPTConfig(vocab_size=99, n_layer=3, n_head=3, n_embd=48, block_size=40,
                       tie_embeddings=False, layer_norm_eps=1e-6)
    assert gpt_config_from_hf(hf_config(config, eot=98), "x") == config
    hf = transformers.GPT2Config(**hf_config(config, eot=98))  # every field is a GPT2Config field
    assert (hf.n_positions, hf.tie_word_embeddings, hf.eos_token_id) == (40, False, 98)


def test_gpt2_tokenizer_export_encodes_as_tiktoken(tmp_path):
    from transformers import AutoTokenizer

    bpe = gpt2_bpe()
    model = GPT(GPTConfig(vocab_size=bpe.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32))
    export(model, bpe, tmp_path / "hf")
    # vocab.json and merges.txt rebuilt from tiktoken's ranks are GPT-2's own files
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    originals = {p.read_text(encoding="utf-8")[:8]: p for p in cache.iterdir() if p.is_file()}
    encoder = next(p for head, p in originals.items() if head.startswith("{"))
    merges = next(p for head, p in originals.items() if head.startswith("#version"))
    assert json.loads((tmp_path / "hf" / "vocab.json").read_text()) == json.loads(encoder.read_text())
    assert ((tmp_path / "hf" / "merges.txt").read_text().splitlines()
            == merges.read_text(encoding="utf-8").splitlines()[:50001])
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf(MIXED)["input_ids"] == bpe.encode(MIXED)
    ids = bpe.encode(MIXED)
    assert hf.decode(ids) == bpe.decode(ids) == MIXED
    # <|endoftext|> in text: the special token, as GPT-2's own HF tokenizer does (tiktoken's
    # allowed_special); split_special_tokens gives tiktoken's encode_ordinary, minilm's encode
    text = "The end.<|endoftext|>A new one"
    assert hf(text)["input_ids"] == bpe.enc.encode(text, allowed_special="all")
    assert hf(text, split_special_tokens=True)["input_ids"] == bpe.encode(text)
    assert hf.eos_token_id == bpe.eot_token and hf.model_max_length == 32
    assert load_model(tmp_path / "hf")[1].to_dict() == bpe.to_dict()


def test_char_tokenizer_export_encodes_as_minilm(tmp_path):
    from transformers import AutoTokenizer

    tok = CharTokenizer(CHARS)
    export(GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8, block_size=8)),
           tok, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = CORPUS[:500] + " — é, ?!&'-"
    assert hf(text)["input_ids"] == tok.encode(text)
    ids = tok.encode(text) + [tok.eot_token]
    assert hf.decode(ids) == tok.decode(ids)
    assert hf.eos_token_id == tok.eot_token
    with pytest.raises(Exception, match="Missing"):  # a character minilm does not know: an error
        hf("日本")
    with pytest.raises(ValueError):
        tok.encode("日本")


def test_export_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    tok = CharTokenizer(CHARS)
    small = dict(n_layer=1, n_head=1, n_embd=8, block_size=8)
    minilm_checkpoint(tmp_path / "bias", tok, lm_head_bias=True, **small)
    minilm_checkpoint(tmp_path / "capped", tok, softcap=30.0, **small)
    for run, message in [("bias", "model.lm_head_bias=true: GPT-2's LM head has no bias"),
                         ("capped", "model.logit_softcap=30.0: the model soft-caps its logits")]:
        assert export_cli(tmp_path / run, tmp_path / f"hf-{run}") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
        assert not (tmp_path / f"hf-{run}").exists()
    assert not list(tmp_path.glob(".hf-*"))


def test_existing_destination_needs_force(tmp_path, capsys):
    tok = CharTokenizer(CHARS)
    minilm_checkpoint(tmp_path / "run", tok, n_layer=1, n_head=1, n_embd=8, block_size=8)
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert export_cli(tmp_path / "run", dest) == 2
    assert "exists and is not empty (use --force to replace it)" in capsys.readouterr().err
    assert (dest / "notes.txt").read_text() == "mine"
    assert export_cli(tmp_path / "run", dest, "--force") == 0
    assert not (dest / "notes.txt").exists() and (dest / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary left over
    a_file = tmp_path / "hf" / "model.safetensors"
    for path in (a_file, a_file / "sub"):  # a file at DEST or above it: one line, not a traceback
        assert export_cli(tmp_path / "run", path, "--force") == 2
        assert capsys.readouterr().err == f"error: dest: {a_file} is a file, not a folder\n"


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


@pytest.fixture
def run_with_two_checkpoints(tmp_path) -> Path:
    """out_dir with best/ and last/ (CKPT = the out_dir resolves to best/), and links to both."""
    tok = CharTokenizer(CHARS)
    small = dict(n_layer=1, n_head=1, n_embd=8, block_size=8)
    minilm_checkpoint(tmp_path / "run", tok, **small)  # run/last
    save_model(tmp_path / "run" / "best", minilm_checkpoint(tmp_path / "other", tok, **small),
               tok.to_dict(), step=7)
    (tmp_path / "run_link").symlink_to(tmp_path / "run")
    (tmp_path / "best_link").symlink_to(tmp_path / "run" / "best")
    return tmp_path / "run"


@pytest.mark.parametrize("ckpt, dest, relation, folder", [
    ("run", "run/best", "is", "run/best"),  # the checkpoint CKPT resolves to
    ("run", "run", "holds", "run/best"),  # the run itself
    ("run", ".", "holds", "run/best"),  # a folder above the run
    ("run/last", "run/last/sub", "is inside", "run/last"),  # inside the checkpoint
    ("run", "run/best/hf", "is inside", "run/best"),
    ("run", "run/last", "is", "run/last"),  # the run's other checkpoint
    ("run", "run/best.tmp", "is", "run/best.tmp"),  # where the next save of best/ is staged
    ("run/last", "run/last.old", "is", "run/last.old"),  # what a save renames last/ to
    ("run", "run/hf/../best", "is", "run/best"),  # `..` resolved
    ("run", "run_link/best", "is", "run/best"),  # through a link to the run
    ("run", "best_link", "is", "run/best"),  # a link to the checkpoint
    ("run_link", "run/best", "is", "run/best"),  # CKPT through a link
])
def test_a_destination_overlapping_the_runs_checkpoints_is_refused(
        run_with_two_checkpoints, ckpt, dest, relation, folder, capsys):
    """--force replaces DEST: were DEST a checkpoint of the run (or hold one) the export would
    delete it; inside one, the next save of that checkpoint would delete the export."""
    root = run_with_two_checkpoints.parent
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert export_cli(root / ckpt, root / dest, "--force") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root / dest} {relation} {root.resolve() / folder}, a "
                          "checkpoint of the model being exported") and err.count("\n") == 1
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    for name in ("best", "last"):
        assert all((run_with_two_checkpoints / name / f).is_file() for f in CHECKPOINT_FILES)


def test_an_export_into_the_run_folder_is_allowed(run_with_two_checkpoints):
    """run/hf is neither a checkpoint nor inside one: the export goes there and the run's
    checkpoints stay what load_model reads."""
    run = run_with_two_checkpoints
    assert export_cli(run, run / "hf", "--force") == 0
    assert (run / "hf" / "config.json").is_file()
    _, _, state = load_model(run)
    assert state["step"] == 7 and all((run / "best" / f).is_file() for f in CHECKPOINT_FILES)


def test_a_destination_inside_the_hugging_face_folder_being_exported_is_refused(tmp_path, capsys):
    hf_gpt2(tmp_path / "hf", n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50257)
    files = sorted((tmp_path / "hf").iterdir())
    capsys.readouterr()  # transformers' progress bar
    for dest, where in [(tmp_path / "hf", "is"), (tmp_path / "hf" / "again", "is inside")]:
        assert export_cli(tmp_path / "hf", dest, "--force") == 2
        assert capsys.readouterr().err.startswith(f"error: {dest} {where} {tmp_path / 'hf'}")
    assert sorted((tmp_path / "hf").iterdir()) == files


@pytest.mark.skipif(not Path("/proc/self").is_dir() or not Path("/sys/kernel").is_dir(),
                    reason="needs Linux's /proc and /sys")
@pytest.mark.parametrize("dest", ["/proc/nope", "/proc/nope/deeper", "/sys/nope"])
def test_a_destination_that_cannot_be_created_is_one_line(tmp_path, dest, capsys):
    """A virtual file system that takes no new folder (/proc), or refuses it (/sys)."""
    tok = CharTokenizer(CHARS)
    minilm_checkpoint(tmp_path / "run", tok, n_layer=1, n_head=1, n_embd=8, block_size=8)
    assert export_cli(tmp_path / "run", dest) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {dest}: ") and err.count("\n") == 1, err
    assert not Path(dest).exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A write that fails half way (a full disk): one line, and neither the temporary folder nor
    the parents made for DEST stay."""
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    tok = CharTokenizer(CHARS)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8, block_size=8))
    (tmp_path / "exports").mkdir()
    with pytest.raises(CheckpointError) as info:
        export(model, tok, tmp_path / "exports" / "new" / "deeper" / "hf")
    assert str(info.value) == (f"cannot write {tmp_path / 'exports' / 'new' / 'deeper' / 'hf'}: "
                               "No space left on device")
    assert list((tmp_path / "exports").iterdir()) == []


def test_push_to_hub_failure_is_one_line_and_keeps_the_export(tmp_path, capsys):
    """Offline (HF_HUB_OFFLINE=1, as in these tests) the real huggingface_hub calls fail."""
    tok = CharTokenizer(CHARS)
    minilm_checkpoint(tmp_path / "run", tok, n_layer=1, n_head=1, n_embd=8, block_size=8)
    assert export_cli(tmp_path / "run", tmp_path / "hf", "--push_to_hub", "someone/minilm") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not push {tmp_path / 'hf'} to the Hugging Face hub repo "
                          "'someone/minilm'") and err.count("\n") == 1
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_unexportable_tokenizer_exports_the_model_alone(tmp_path):
    class Bytes:  # a tokenizer with no Hugging Face counterpart
        vocab_size, eot_token = 257, 256

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode(errors="replace")

        def to_dict(self):
            return {"type": "bytes"}

    model = GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=1, n_embd=8, block_size=8))
    warnings = export(model, Bytes(), tmp_path / "hf")
    assert warnings == ["tokenizer {'type': 'bytes'} has no Hugging Face equivalent; exported the "
                        "model alone"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    with pytest.raises(CheckpointError, match="has no tokenizer files"):
        load_model(tmp_path / "hf")  # and minilm will not guess one back
