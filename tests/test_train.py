"""Training end to end: a tiny run, checkpoints, resume equality, DDP with gloo, errors."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, tiny_overrides
from minilm.checkpoint import CheckpointError, load_model
from minilm.config import ConfigError, load_config
from minilm.tracking import read_metrics as read_records
from minilm.trainer import batch_generator, lr_at, resolve_compile
from minilm.trainer import train as train_run


def read_metrics(out_dir):
    """Per-step losses, per-eval val losses and all records of a run's metrics.jsonl."""
    lines = read_records(out_dir)
    steps = {r["step"]: r["loss"] for r in lines if "loss" in r}
    evals = {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}
    return steps, evals, lines


def test_tiny_run_logs_and_checkpoints(corpus_file, tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, corpus_file))
    summary = train_run(cfg)
    out = tmp_path / "out"
    steps, evals, lines = read_metrics(out)
    assert sorted(steps) == list(range(1, 9)) and sorted(evals) == [0, 4, 8]
    step_record = next(r for r in lines if r.get("step") == 3 and "loss" in r)
    assert {"step", "loss", "lr", "tokens_per_sec", "ms_per_iter"} <= set(step_record)
    eval_record = next(r for r in lines if r.get("step") == 8 and "val_loss" in r)
    assert eval_record["val_ppl"] == pytest.approx(2.718281828 ** eval_record["val_loss"])
    assert steps[8] < steps[1]
    assert summary["best_val_loss"] == min(evals[4], evals[8])
    for name in ("last", "best"):
        assert {p.name for p in (out / name).iterdir()} == {
            "model.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    with safe_open(out / "last" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    model, tok, state = load_model(out)
    assert state["step"] in (4, 8) and model.config.vocab_size == tok.vocab_size


def test_resumed_run_logs_the_same_losses(corpus_file, tmp_path):
    common = {"train.lr_decay_iters": 8, "model.dropout": 0.1, "train.grad_accum_steps": 2}
    ref_dir, split_dir = tmp_path / "ref", tmp_path / "split"
    train_run(load_config(None, tiny_overrides(tmp_path, corpus_file, out_dir=ref_dir, **common)))
    train_run(load_config(None, tiny_overrides(tmp_path, corpus_file, out_dir=split_dir,
                                               **{"train.max_iters": 4}, **common)))
    train_run(load_config(None, tiny_overrides(tmp_path, corpus_file, out_dir=split_dir,
                                               **{"train.resume": True}, **common)))
    ref_steps, ref_evals, _ = read_metrics(ref_dir)
    steps, evals, _ = read_metrics(split_dir)
    assert sorted(steps) == list(range(1, 9))
    assert steps == ref_steps  # bit-identical, not merely close
    assert evals == ref_evals


def test_resume_with_changed_model_is_refused(corpus_file, tmp_path):
    train_run(load_config(None, tiny_overrides(tmp_path, corpus_file, **{"train.max_iters": 4})))
    cfg = load_config(None, tiny_overrides(tmp_path, corpus_file, **{"train.resume": True,
                                                                     "model.n_embd": 64}))
    with pytest.raises(ConfigError, match="model.n_embd is 64 but the checkpoint was trained with 32"):
        train_run(cfg)


def test_missing_and_corrupt_checkpoints_are_one_line_errors(corpus_file, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *tiny_overrides(tmp_path, corpus_file),
                           "--train.resume=true"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no checkpoint to resume from" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_model(tmp_path / "nowhere")
    train_run(load_config(None, tiny_overrides(tmp_path, corpus_file, **{"train.max_iters": 4})))
    weights = tmp_path / "out" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*model.safetensors"):
        load_model(tmp_path / "out" / "last")


def test_compile_auto_is_on_for_cuda_only():
    assert load_config(None, []).train.compile == "auto"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_compile("auto", cuda) and not resolve_compile("auto", cpu)
    assert resolve_compile(True, cpu) and not resolve_compile(False, cuda)
    assert load_config(None, ["--train.compile=false"]).train.compile is False


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = load_config(None, ["--train.warmup_iters=10", "--train.max_iters=110",
                             "--train.learning_rate=1.0", "--train.min_lr=0.1"])
    lrs = [lr_at(s, cfg.train) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_batches_differ_by_rank_and_repeat_by_step():
    def draw(rank, step):
        return torch.randint(10**9, (4,), generator=batch_generator(1, rank, step, 0)).tolist()

    assert draw(0, 5) != draw(1, 5) and draw(0, 5) != draw(0, 6)
    assert draw(0, 5) == draw(0, 5)


def test_ddp_two_gloo_processes(corpus_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", *tiny_overrides(tmp_path, corpus_file, **{"train.grad_accum_steps": 2})],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 processes" in proc.stdout
    steps, evals, lines = read_metrics(tmp_path / "out")
    # only rank 0 writes: one record per step
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9))
    assert sorted(evals) == [0, 4, 8] and steps[8] < steps[1]
    # 2 ranks x 2 micro-steps x 4 x 16 tokens per step
    r = next(r for r in lines if r.get("step") == 2 and "loss" in r)
    assert r["tokens_per_sec"] * r["ms_per_iter"] / 1000 == pytest.approx(256)
    load_model(tmp_path / "out")
