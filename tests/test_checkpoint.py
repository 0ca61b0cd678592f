"""Checkpoint swaps interrupted at every point: a complete checkpoint is always found, resume puts
it back in place, and the next save works."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from minilm import checkpoint
from minilm.checkpoint import (
    complete_checkpoint,
    copy_checkpoint,
    read_state,
    recover_checkpoint,
    resume_settings,
)
from minilm.interop.loading import load_model
from minilm.model.gpt import GPT, GPTConfig
from minilm.tokenizer import CharTokenizer

from saved import save_model

TOKENIZER = CharTokenizer("abcdefgh")


class Crash(Exception):
    """The process dying at this point."""


def model_for(step: int) -> GPT:
    torch.manual_seed(step)
    return GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, n_layer=1, n_head=1, n_embd=8,
                         block_size=8))


def save(path, step: int) -> None:
    save_model(path, model_for(step), TOKENIZER.to_dict(), step)


def check_loads(path, steps: set[int]) -> int:
    """The checkpoint found from `path` is complete and is one of `steps`: its weights are that
    step's model."""
    model, _, state = load_model(path)
    assert state["step"] in steps
    for a, b in zip(model.state_dict().values(), model_for(state["step"]).state_dict().values()):
        assert torch.equal(a, b)
    return state["step"]


def operations(monkeypatch, crash_at: int | None, partial: bool) -> list[str]:
    """Record the renames and deletions checkpoint.py makes; the one numbered crash_at raises
    Crash instead (a deletion first deletes one file when `partial`: killed midway)."""
    done: list[str] = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def op(name, real):
        def run(path, *args, **kwargs):
            if len(done) == crash_at:
                if partial and name == "rmtree" and os.path.isdir(path):
                    files = sorted(os.listdir(path))  # the weights first: state.json stays
                    if files:
                        os.remove(os.path.join(path, files[0]))
                raise Crash(f"{name} {path}")
            temp = re.sub(r"^\.(.*\.tmp)\d+$", r"\1", os.path.basename(path))  # .x.tmp<pid>
            done.append(f"{name} {temp}")
            return real(path, *args, **kwargs)
        return run

    monkeypatch.setattr(checkpoint.os, "replace", op("replace", real_replace))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", op("rmtree", real_rmtree))
    return done


def test_a_save_is_these_steps(tmp_path, monkeypatch):
    save(tmp_path / "last", 1)
    ops = operations(monkeypatch, None, False)
    save(tmp_path / "last", 2)
    assert ops == ["rmtree last.tmp", "replace state.json.tmp", "rmtree last.old",
                   "replace last", "replace last.tmp", "rmtree last.old"]


@pytest.mark.parametrize("partial", [False, True], ids=["before", "midway"])
@pytest.mark.parametrize("crash_at", range(6))
@pytest.mark.parametrize("then", ["recover", "save again"])
def test_interrupted_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch, crash_at, partial,
                                                        then):
    last = tmp_path / "last"
    save(last, 1)
    save(last, 1)  # a second save leaves nothing behind but last/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    operations(monkeypatch, crash_at, partial)
    with pytest.raises(Crash):
        save(last, 2)
    monkeypatch.undo()
    found = check_loads(tmp_path, {1, 2})  # readers: a run's out_dir
    assert check_loads(last, {found}) == found  # and the checkpoint's own name
    if then == "recover":  # what resume does
        assert recover_checkpoint(last) == last
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
        assert read_state(last)["step"] == found
    save(last, 3)  # the run goes on
    assert check_loads(tmp_path, {3}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_copy_interrupted_midway_is_not_taken_for_complete(tmp_path, monkeypatch):
    save(tmp_path / "last", 1)
    copy_checkpoint(tmp_path / "last", tmp_path / "best")
    save(tmp_path / "last", 2)
    copied = []
    real_copy = shutil.copy2

    def copy2(src, dst, *args, **kwargs):
        if len(copied) == 2:
            raise Crash("copy")
        copied.append(os.path.basename(src))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "copy2", copy2)
    with pytest.raises(Crash):
        copy_checkpoint(tmp_path / "last", tmp_path / "best")
    assert "state.json" not in copied  # copied last
    assert complete_checkpoint(tmp_path / "best") == tmp_path / "best"
    assert read_state(tmp_path / "best")["step"] == 1


def test_nothing_complete_is_nothing(tmp_path):
    (tmp_path / "last.tmp").mkdir()
    (tmp_path / "last.tmp" / "model.safetensors").write_bytes(b"half")
    assert complete_checkpoint(tmp_path / "last") is None
    assert recover_checkpoint(tmp_path / "last") is None


# ---------------------------------------------------------------- the soft-cap is the model's


LEGACY = Path(__file__).parent / "data" / "legacy_checkpoints"


def greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """n argmax tokens, each from a full forward over the sequence so far."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("name, cap", [("tied_softcap", 5.0), ("untied", None)])
def test_checkpoints_written_before_the_model_owned_its_softcap_still_load(name, cap):
    """state.json of the code before: a top-level logit_softcap and config.loss.softcap; read
    today, the cap is the model's config, and logits and greedy tokens are the ones that code
    computed (expected.json, written by it)."""
    folder = LEGACY / name
    assert "logit_softcap" in json.loads((folder / "state.json").read_text())
    expected = json.loads((folder / "expected.json").read_text())
    model, tokenizer, state = load_model(folder)
    assert model.config.logit_softcap == cap and "logit_softcap" not in state
    assert state["model_config"]["logit_softcap"] == cap
    assert resume_settings(state["config"])["model.logit_softcap"] == cap
    ids = tokenizer.encode(expected["prompt"])
    with torch.no_grad():
        logits = model.logits(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits"]), atol=1e-5, rtol=0)
    assert greedy(model, ids, len(expected["greedy_tokens"])) == expected["greedy_tokens"]
    if cap is not None:  # the cap acts: every logit within (-cap, cap), and it is not a no-op
        assert logits.abs().max() < cap
        uncapped = model.lm_head(model.hidden_states(torch.tensor([ids]))[0, -1]).detach()
        assert not torch.allclose(uncapped, logits, atol=1e-3)


def test_a_new_checkpoint_keeps_the_softcap_in_the_model_config(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, n_layer=1, n_head=1, n_embd=8,
                          block_size=8, logit_softcap=3.0))
    save_model(tmp_path / "last", model, TOKENIZER.to_dict())
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    assert state["model_config"]["logit_softcap"] == 3.0 and "logit_softcap" not in state
    loaded, _, _ = load_model(tmp_path / "last")
    x = torch.randint(TOKENIZER.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
