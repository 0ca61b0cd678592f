"""Training end to end: a tiny run, checkpoints, resume equality, DDP with gloo, errors.

Most tests start from one tiny run trained once per session (conftest's `tiny_run`: 8 steps,
evals at 0, 4 and 8), copied into their own out_dir; signals and crashes are raised in-process at a
known step.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from minilm.cli.common import run_cli
from minilm.cli.train import train_main
from minilm.errors import CheckpointError, ConfigError, DataError
from minilm.interop.loading import load_model
from minilm.train import trainer
from minilm.train.config import load_config
from minilm.train.tracking import read_metrics as read_records
from minilm.train.trainer import batch_generator, lr_at, resolve_compile
from minilm.train.trainer import train as train_run

from conftest import ROOT, tiny_overrides


def read_metrics(out_dir):
    """Per-step losses, per-eval val losses and all records of a run's metrics.jsonl."""
    lines = read_records(out_dir)
    steps = {r["step"]: r["loss"] for r in lines if "loss" in r}
    evals = {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}
    return steps, evals, lines


def copy_run(tiny_run, tmp_path, **extra) -> list[str]:
    """The session's run copied to tmp_path/out; the overrides that continue it (its corpus and
    data cache, this out_dir) with `extra`."""
    shutil.copytree(tiny_run.out, tmp_path / "out")
    return tiny_overrides(tmp_path, tiny_run.corpus,
                          **{"data.cache_dir": tiny_run.root / "cache", **extra})


def cli(tmp_path, args: list[str]) -> list[str]:
    """train.py's arguments for the config load_config(None, args) makes: a config file of the
    dataclass defaults (with none, train.py reads its default config, shakespeare_char)."""
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("{}\n")
    return [str(defaults), *args]


def test_tiny_run_logs_and_checkpoints(tiny_run):
    summary, out = tiny_run.summary, tiny_run.out
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


def test_resume_with_changed_model_is_refused(tiny_run, tmp_path):
    cfg = load_config(None, copy_run(tiny_run, tmp_path, **{
        "train.resume": True, "train.max_iters": 10, "model.n_embd": 64}))
    with pytest.raises(ConfigError, match="model.n_embd is 64 but the checkpoint was trained with 32"):
        train_run(cfg)


def test_missing_and_corrupt_checkpoints_are_one_line_errors(tiny_run, corpus_file, tmp_path,
                                                              capsys):
    assert run_cli(train_main, [*tiny_overrides(tmp_path, corpus_file),
                                "--train.resume=true"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_model(tmp_path / "nowhere")
    copy_run(tiny_run, tmp_path)
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


@pytest.mark.slow
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


# ---------------------------------------------------------------- hardening (issue 8)


def strict_json_files(out_dir):
    """Every JSON file of a run, parsed by a strict reader (NaN / Infinity are not JSON)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    files = [out_dir / "summary.json", *out_dir.glob("*/state.json")]
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    return files


def test_resume_with_changed_softcap_is_refused(tiny_run, tmp_path):
    cfg = load_config(None, copy_run(tiny_run, tmp_path, **{
        "train.resume": True, "train.max_iters": 10, "loss.softcap": 30}))
    with pytest.raises(ConfigError, match="model.logit_softcap is 30.0 but the checkpoint was "
                                          "trained with None"):
        train_run(cfg)


def test_diverged_loss_stops_with_one_line_and_strict_json(tiny_run, tmp_path, capsys):
    args = copy_run(tiny_run, tmp_path)  # out/last at step 8
    # a learning rate that overflows the weights: the loss is no longer finite within steps
    code = run_cli(train_main, cli(tmp_path, [*args, "--train.resume=true", "--train.max_iters=100",
                                              "--train.learning_rate=1e30", "--train.min_lr=0"]))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    m = re.fullmatch(r"error: the loss is (nan|inf) at step (\d+), training stopped: the last good "
                     r"checkpoint is (\S+) \(step 8\); lower train.learning_rate .*", err)
    assert m and 8 < int(m.group(2)) < 100 and m.group(3) == str(tmp_path / "out" / "last")
    out = tmp_path / "out"
    assert read_records(out)[-1]["loss"] is None  # the diverged step, recorded as null
    assert {p.parent.name for p in strict_json_files(out)} == {"out", "last", "best"}
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 8  # not overwritten
    load_model(out / "last")


def wait_for_step(proc, out_dir, step: int, timeout: float = 240.0) -> None:
    """Until the run in out_dir has logged `step` (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        path = out_dir / "metrics.jsonl"
        if path.is_file() and any(r.get("step", 0) >= step and "loss" in r
                                  for r in read_records(out_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step}: {proc.poll()} {proc.stderr and proc.stderr.read()}")


# a run long enough to stop in the middle and resume: checkpoints at 4 and 8, evals at 0, 4, 8, 12
STOPPED_RUN = {"train.max_iters": 12, "train.lr_decay_iters": 1000, "train.eval_interval": 4}


@pytest.fixture(scope="module")
def reference(tiny_run):
    """STOPPED_RUN uninterrupted: what a stopped and resumed run must log."""
    out = tiny_run.root / "reference"
    train_run(load_config(None, tiny_overrides(tiny_run.root, tiny_run.corpus, out_dir=out,
                                               **STOPPED_RUN)))
    return read_metrics(out)


def after_step(monkeypatch, step: int, action) -> None:
    """action() in this process (a signal it sends itself, a crash) once the run's step `step`
    has computed, before the loop logs it."""
    real = trainer.train_step

    def train_step(run, at):
        result = real(run, at)
        if at + 1 == step:
            action()
        return result

    monkeypatch.setattr(trainer, "train_step", train_step)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_resumes_exactly(tiny_run, reference, tmp_path, capsys,
                                                            monkeypatch, sig):
    out = tmp_path / "run"
    args = tiny_overrides(tmp_path, tiny_run.corpus, out_dir=out, **STOPPED_RUN)
    after_step(monkeypatch, 3, lambda: signal.raise_signal(sig))  # a real signal, mid-run
    assert run_cli(train_main, cli(tmp_path, args)) == 128 + sig
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # after data preparation's progress bar
    m = re.fullmatch(rf"{sig.name} received: stopped after step (\d+) and saved (\S+); continue "
                     r"with the same command and --train.resume=true", last_line)
    assert m and m.group(2) == str(out / "last"), err
    stopped = int(m.group(1))
    assert stopped == 3  # one process: the step the signal came in
    assert json.loads((out / "last" / "state.json").read_text())["step"] == stopped
    assert max(r["step"] for r in read_records(out)) == stopped
    strict_json_files(out)
    # resumed, the run logs what an uninterrupted one logs, each step once
    monkeypatch.undo()
    train_run(load_config(None, [*args, "--train.resume=true"]))
    steps, evals, lines = read_metrics(out)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 13))
    ref_steps, ref_evals, _ = reference
    assert steps == ref_steps and evals == ref_evals


@pytest.mark.slow
def test_ddp_ranks_stop_together_on_sigterm(corpus_file, tmp_path):
    """A preempted torchrun job: the agent forwards SIGTERM to every worker; all stop after the
    same step, rank 0 saves it and says so, once."""
    out = tmp_path / "run"
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("{}\n")
    args = tiny_overrides(tmp_path, corpus_file, out_dir=out, **{
        "train.max_iters": 100000, "train.lr_decay_iters": 1000, "train.eval_interval": 1000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", str(defaults), *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
        text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stops = [line for line in err.splitlines() if "SIGTERM received" in line]
    assert len(stops) == 1, err[-3000:]
    stopped = int(re.search(r"stopped after step (\d+)", stops[0]).group(1))
    assert json.loads((out / "last" / "state.json").read_text())["step"] == stopped
    assert max(r["step"] for r in read_records(out)) == stopped
    load_model(out / "last")


class Killed(BaseException):
    """The process dying outright: nothing of the run catches it."""


def test_records_after_the_checkpoint_are_not_logged_twice(tiny_run, reference, tmp_path,
                                                           monkeypatch):
    """A run killed outright (SIGKILL, a crash) logged steps after its last checkpoint; resumed,
    it logs them again, and metrics.jsonl holds each once, as an uninterrupted run."""
    out = tmp_path / "run"
    args = tiny_overrides(tmp_path, tiny_run.corpus, out_dir=out, **STOPPED_RUN)

    def kill():
        raise Killed

    after_step(monkeypatch, 11, kill)  # step 11 dies before its record: 10 are logged
    with pytest.raises(Killed):
        train_run(load_config(None, args))
    logged = max(r["step"] for r in read_records(out))
    saved = load_model(out / "last")[2]["step"]
    assert (saved, logged) == (8, 10)
    monkeypatch.undo()
    train_run(load_config(None, [*args, "--train.resume=true"]))
    steps, evals, lines = read_metrics(out)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 13))
    ref_steps, ref_evals, _ = reference
    assert steps == ref_steps and evals == ref_evals


@pytest.mark.slow  # a subprocess training to the end
def test_training_survives_a_closed_stdout(corpus_file, tmp_path):
    """train.py | head: console output is not the run; it goes on to the end, quietly."""
    args = tiny_overrides(tmp_path, corpus_file, **{"train.max_iters": 16})
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()  # head -1
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "Error" not in err and "Traceback" not in err, err
    assert json.loads((tmp_path / "out" / "last" / "state.json").read_text())["step"] == 16
    assert max(r["step"] for r in read_records(tmp_path / "out")) == 16


def test_fresh_run_into_a_used_out_dir_is_refused(tiny_run, tmp_path, capsys):
    args = copy_run(tiny_run, tmp_path, **{"train.max_iters": 4})
    out = tmp_path / "out"
    before = (out / "metrics.jsonl").read_text()
    assert run_cli(train_main, cli(tmp_path, args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert (f"error: out_dir {out} already holds a run (metrics.jsonl, last/, best/): continue it "
            "with --train.resume=true, choose another --out_dir, or replace it with "
            "--train.overwrite=true") == err.strip()
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    shutil.rmtree(out / "best")
    os.replace(out / "last", out / "last.old")  # an interrupted swap still counts
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"already holds a run \(last/\)"):
        train_run(load_config(None, args))
    train_run(load_config(None, [*args, "--train.max_iters=2", "--train.eval_interval=2",
                                 "--train.warmup_iters=1", "--train.overwrite=true"]))
    assert max(r["step"] for r in read_records(out)) == 2  # the new run's records only
    assert not (out / "last.old").exists() and load_model(out / "last")[2]["step"] == 2
    (out / "metrics.jsonl").write_text("")  # a run that failed before its first record
    shutil.rmtree(out / "last")
    shutil.rmtree(out / "best")
    train_run(load_config(None, args))


def test_no_val_split(corpus_file, tmp_path, capfd):
    summary = train_run(load_config(None, tiny_overrides(tmp_path, corpus_file, **{
        "data.val_fraction": 0})))
    assert "data.val_fraction is 0: no val split; evals report the train loss only and best/ " \
           "is not written" in capfd.readouterr().out
    out = tmp_path / "out"
    evals = [r for r in read_records(out) if "train_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert all(set(r) == {"step", "train_loss"} for r in evals)
    assert not (out / "best").exists() and summary["best_val_loss"] is None
    assert load_model(out)[2]["step"] == 8  # out_dir resolves to last
    strict_json_files(out)


def test_a_split_too_short_is_named_before_the_model_is_built(corpus_file, tmp_path,
                                                              monkeypatch):
    def no_model(*args):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "initial_model", no_model)  # where the trainer builds it
    cfg = load_config(None, tiny_overrides(tmp_path, corpus_file, **{
        "data.val_fraction": 0.001, "model.block_size": 64}))
    with pytest.raises(DataError, match=r"the val split of \S+corpus.txt has \d+ tokens, fewer "
                                        r"than model.block_size \+ 1 = 65: lower model.block_size,"
                                        " raise data.val_fraction"):
        train_run(cfg)


# --------------------------------------------------------------- hardening, second pass (issue 17)


def offline_wandb(monkeypatch) -> None:
    """wandb as a user has it: offline, and allowed to print its lines."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)


def run_files(out_dir) -> dict:
    """Every file of a run: its bytes."""
    return {p.relative_to(out_dir): p.read_bytes() for p in sorted(out_dir.rglob("*"))
            if p.is_file()}


def test_resume_with_nothing_left_to_train_is_refused_and_writes_nothing(
        tiny_run, tmp_path, capsys, monkeypatch):
    args = copy_run(tiny_run, tmp_path)  # 8 steps, trained without wandb: out/last is at step 8
    out = tmp_path / "out"
    before = run_files(out)
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {str(p) for p in before}
    capsys.readouterr()
    offline_wandb(monkeypatch)  # a resume that started would start a wandb run in out/wandb
    for max_iters, why in ((4, "past train.max_iters 4"), (8, "already at train.max_iters 8")):
        code = run_cli(train_main, cli(tmp_path, [*args, "--train.resume=true",
                                                  f"--train.max_iters={max_iters}"]))
        stdout, err = capsys.readouterr()
        assert code == 2 and stdout == ""
        assert err == (f"error: {out / 'last'} is at step 8, {why}: nothing to do; raise "
                       "--train.max_iters\n")
        assert run_files(out) == before  # config.yaml, records, summary, checkpoints: byte-equal
        assert not (out / "wandb").exists()  # no wandb run


def test_a_run_shorter_than_its_warmup_warms_up_all_the_way(corpus_file, tmp_path, capsys):
    """nanoGPT's README shortens the shipped run to try it; its warmup (100 steps) then covers
    the whole run, as in nanoGPT and HF's Trainer: one warning line, and the run trains."""
    args = tiny_overrides(tmp_path, corpus_file, **{
        "train.warmup_iters": 100, "train.max_iters": 6, "train.learning_rate": 0.01,
        "train.min_lr": 0.001, "train.eval_interval": 3})
    assert run_cli(train_main, args) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == ["warning: train.warmup_iters (100) >= train.max_iters (6): the whole run is "
                   "warmup, the learning rate rises linearly to 0.000594 and never reaches "
                   "train.learning_rate 0.01"]
    lrs = {r["step"]: r["lr"] for r in read_records(tmp_path / "out") if "lr" in r}
    # nanoGPT's get_lr: learning_rate * (it + 1) / (warmup_iters + 1) while it < warmup_iters;
    # the record of step s holds the lr of the update that made it, iteration s - 1
    assert lrs == {s: pytest.approx(0.01 * s / 101, rel=1e-12) for s in range(1, 7)}


def test_lr_schedule_when_the_run_ends_in_its_warmup():
    for decay in (None, 50, 500):  # lr_decay_iters is never reached, whatever it is
        cfg = load_config(None, ["--train.warmup_iters=100", "--train.max_iters=40",
                                 "--train.learning_rate=3e-3", "--train.min_lr=3e-4",
                                 f"--train.lr_decay_iters={'null' if decay is None else decay}"])
        lrs = [lr_at(s, cfg.train) for s in range(40)]
        assert lrs == pytest.approx([3e-3 * (it + 1) / 101 for it in range(40)], rel=1e-12)


def bad_source(tmp_path, case: str) -> tuple[str, list[str], str]:
    """A data problem of one kind: (data.source, other overrides, the error it must give)."""
    if case == "empty":
        path = tmp_path / "empty.txt"
        path.write_text("")
        return str(path), [], f"data file {path} is empty"
    if case == "too short":
        path = tmp_path / "short.txt"
        path.write_text("Speak, speak. Resolved, resolved.\n")
        return str(path), [], (f"the val split of {path} has 4 tokens, fewer than "
                               "model.block_size + 1 = 17: lower model.block_size, raise "
                               "data.val_fraction, or set it to 0 to train without a val split")
    if case == "not UTF-8":
        path = tmp_path / "latin1.txt"
        path.write_bytes("héllo wörld\n".encode("latin-1") * 50)
        return str(path), [], (f"data file {path} is not UTF-8 text (byte 0xe9 at offset 1: "
                               "invalid continuation byte); convert it, e.g. iconv -f latin1 -t "
                               "utf-8")
    if case == "missing jsonl field":
        path = tmp_path / "docs.jsonl"
        path.write_text('{"body": "Speak, speak."}\n' * 50)
        return str(path), [], (f"{path} has no column 'text' (columns: body); set "
                               "data.text_field")
    assert case == "unknown tokenizer"
    path = tmp_path / "corpus.txt"
    path.write_text("Speak, speak.\n" * 50)
    return str(path), ["--data.tokenizer=foo"], ("unknown tokenizer 'foo' (use 'char' or a "
                                                 "tiktoken encoding: ")


@pytest.mark.parametrize("case", ["empty", "too short", "not UTF-8", "missing jsonl field",
                                  "unknown tokenizer"])
def test_a_data_error_stops_the_run_before_wandb_starts(tmp_path, capsys, monkeypatch, case):
    offline_wandb(monkeypatch)
    source, extra, message = bad_source(tmp_path, case)
    args = [*tiny_overrides(tmp_path, source), *extra]
    assert run_cli(train_main, args) == 2
    stdout, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), err
    assert err.endswith(errors[0] + "\n") and "Traceback" not in err
    assert "wandb" not in stdout + err.lower()
    out = tmp_path / "out"
    assert not (out / "wandb").exists() and not (out / "metrics.jsonl").exists()


def test_checks_come_before_an_overwrite_deletes_the_old_run(tiny_run, tmp_path, capsys):
    """--train.overwrite=true deletes the old run only once the new one has passed its checks."""
    # the session's run was trained without wandb (CI exports WANDB_MODE=offline): wandb's service
    # may append to its own logs after a run has returned, which is not the run's files changing
    args = copy_run(tiny_run, tmp_path, **{"train.max_iters": 4})
    out = tmp_path / "out"
    before = run_files(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run_cli(train_main, cli(tmp_path, [*args, "--train.overwrite=true",
                                              f"--data.source={empty}"])) == 2
    assert capsys.readouterr().err.endswith(f"error: data file {empty} is empty\n")
    assert run_files(out) == before
