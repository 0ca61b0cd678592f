"""train.parallel=fsdp (FSDP2) on CPU with gloo: its losses equal DDP's step by step, its sharded
checkpoints (DCP) resume exactly at the same world size and at another one, every one-process
reader takes them, and a SIGTERM stops it as it stops any run.

The multi-process runs share few launches: one torchrun launch trains DDP and FSDP, tied and
untied (tests/fsdp_runs.py runs several train.py mains per launch), two ranks started directly
(as a batch scheduler starts them) are stopped by SIGTERM, and one more launch resumes what the
others left.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from minilm.checkpoint import load_training_state, read_state
from minilm.cli.common import run_cli
from minilm.cli.export import main as export_main
from minilm.cli.generate import main as generate_main
from minilm.cli.train import train_main
from minilm.errors import ConfigError
from minilm.interop.loading import load_model
from minilm.model.gpt import GPT, GPTConfig
from minilm.train import parallel
from minilm.train.config import load_config
from minilm.train.tracking import read_metrics
from minilm.train.trainer import configure_optimizer

from conftest import CORPUS, ROOT, first_step_loss, tiny_overrides

STEPS = 8  # each run: checkpoints (and evals) at steps 4 and 8
RUN = {"train.max_iters": STEPS, "train.lr_decay_iters": 1000, "model.dropout": 0.1,
       "train.grad_accum_steps": 2, "train.grad_clip": 0.5}
UNTIED = {"model.tie_embeddings": False, "model.lm_head_bias": True}
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def evals(out_dir) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(out_dir) if "val_loss" in r}


def train_args(root, out: str, **extra) -> list[str]:
    """train.py's arguments for a tiny run in root/out (the dataclass defaults as its config file,
    the corpus and data cache shared by all runs of the module)."""
    defaults = root / "defaults.yaml"
    defaults.write_text("{}\n")
    return [str(defaults), *tiny_overrides(root, root / "corpus.txt", out_dir=root / out,
                                           **{**RUN, **extra})]


def torchrun(runs: list[list[str]], timeout: float = 900) -> None:
    """The runs one after another in one torchrun launch of two ranks (tests/fsdp_runs.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "fsdp_runs.py"), json.dumps(runs)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    (root / "corpus.txt").write_text(CORPUS)
    return root


@pytest.fixture(scope="module")
def trained(root):
    """DDP and FSDP, tied and untied, the same runs otherwise: one launch."""
    fsdp = {"train.parallel": "fsdp"}
    torchrun([train_args(root, "ddp_tied"), train_args(root, "fsdp_tied", **fsdp),
              train_args(root, "ddp_untied", **UNTIED),
              train_args(root, "fsdp_untied", **UNTIED, **fsdp)])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("head", ["tied", "untied"])
def test_fsdp_losses_equal_ddp_step_by_step(trained, head):
    """fp32, dropout 0.1, two micro-batches a step, clipping on: each step's loss, gradient
    norm and each eval within 1e-5 of DDP's (gloo's AVG regressed silently in some versions)."""
    ddp, fsdp = trained / f"ddp_{head}", trained / f"fsdp_{head}"
    assert sorted(losses(fsdp)) == list(range(1, STEPS + 1))
    assert losses(fsdp) == pytest.approx(losses(ddp), abs=1e-5, rel=0)
    norms = [{r["step"]: r["grad_norm"] for r in read_metrics(d) if "loss" in r}
             for d in (ddp, fsdp)]
    assert norms[1] == pytest.approx(norms[0], abs=1e-5, rel=0)
    assert any(n > 0.5 for n in norms[0].values())  # clipping acted
    assert sorted(evals(fsdp)) == [0, 4, 8] and evals(fsdp) == pytest.approx(evals(ddp), abs=1e-5)


@pytest.mark.slow
def test_a_sharded_checkpoint_is_dcp_with_its_world_size(trained):
    for name in ("last", "best"):
        folder = trained / "fsdp_tied" / name
        assert {p.name for p in folder.iterdir()} == {
            ".metadata", "__0_0.distcp", "__1_0.distcp", "rng_0.pt", "rng_1.pt", "state.json"}
        state = json.loads((folder / "state.json").read_text())
        assert state["sharded"] is True and state["world_size"] == 2
    assert json.loads((trained / "fsdp_tied" / "last" / "state.json").read_text())["step"] == 8


def dcp_state(folder) -> dict:
    """A sharded checkpoint's whole state, read by DCP's own converter (dcp_to_torch_save)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / f"{folder.name}.pt"
    dcp_to_torch_save(folder, target)
    return torch.load(target, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["tied", "untied"])
def test_one_process_reads_the_whole_state_of_a_sharded_checkpoint(trained, head):
    """load_model (generate, eval, serve, export, init_from) and the trainer's resume in one
    process, against DCP's own converter: the weights, AdamW's moments and steps, bit for bit."""
    folder = trained / f"fsdp_{head}" / "last"
    want = dcp_state(folder)
    model, _, state = load_model(folder)
    assert state["step"] == 8
    assert model.state_dict().keys() == want["model"].keys()
    assert all(torch.equal(v, want["model"][k]) for k, v in model.state_dict().items())

    fresh = GPT(GPTConfig(**state["model_config"]))
    optimizer = configure_optimizer(fresh, load_config(None, []).train, torch.device("cpu"))
    rng = load_training_state(folder, state, fresh, optimizer)
    assert torch.equal(rng["torch"], torch.load(folder / "rng_0.pt", weights_only=False)["torch"])
    assert all(torch.equal(v, want["model"][k]) for k, v in fresh.state_dict().items())
    names = {id(p): n for n, p in fresh.named_parameters()}
    assert len(optimizer.state) == len(names)
    for p, moments in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[key], want["optim"]["state"][names[id(p)]][key])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_step(procs, out_dir, step: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if (out_dir / "metrics.jsonl").is_file() and step in losses(out_dir):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step}: {[p.poll() for p in procs]}")


@pytest.fixture(scope="module")
def stopped(trained):
    """fsdp_tied's run, long, its two ranks started directly (as a batch scheduler starts them)
    and sent SIGTERM after step 2, as a preempted job's are."""
    out = trained / "sigterm"
    args = train_args(trained, "sigterm", **{"train.parallel": "fsdp", "train.max_iters": 1000})
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        wait_for_step(procs, out, 2)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return SimpleNamespace(out=out, args=args, codes=[p.returncode for p in procs], errs=errs,
                           saved=read_state(out / "last"))  # before `resumed` continues it


@pytest.fixture(scope="module")
def one_rank(trained):
    """fsdp_tied's 2-rank checkpoint (step 8) continued in one process to step 10."""
    shutil.copytree(trained / "fsdp_tied", trained / "one_rank")
    args = train_args(trained, "one_rank", **{"train.max_iters": 10, "train.resume": True})
    assert run_cli(train_main, args) == 0
    return trained / "one_rank"


@pytest.fixture(scope="module")
def resumed(trained, stopped, one_rank):
    """One launch: the stopped run resumed to STEPS; one_rank's plain checkpoint (step 10)
    resumed on two ranks to 12 by DDP and by FSDP."""
    for name in ("two_ranks_ddp", "two_ranks_fsdp"):
        shutil.copytree(one_rank, trained / name)
    more = {"train.max_iters": 12, "train.resume": True}
    torchrun([[*stopped.args, "--train.resume=true", f"--train.max_iters={STEPS}"],
              train_args(trained, "two_ranks_ddp", **more),
              train_args(trained, "two_ranks_fsdp", **more, **{"train.parallel": "fsdp"})])
    return trained


@pytest.mark.slow
def test_sigterm_under_fsdp_exits_143_and_resumes_exactly(trained, stopped, resumed):
    assert stopped.codes == [143, 143], stopped.errs
    lines = [ln for err in stopped.errs for ln in err.splitlines() if "SIGTERM received" in ln]
    assert len(lines) == 1, stopped.errs  # rank 0 says it, once
    m = re.fullmatch(r"SIGTERM received: stopped after step (\d+) and saved (\S+); continue with "
                     r"the same command and --train.resume=true", lines[0])
    assert m and m.group(2) == str(stopped.out / "last")
    step = int(m.group(1))
    assert 2 <= step < STEPS and stopped.saved["step"] == step and stopped.saved["sharded"]
    # resumed on two ranks, the run logs exactly what the uninterrupted fsdp_tied logged
    assert losses(stopped.out) == losses(trained / "fsdp_tied")  # bit for bit, dropout on
    assert evals(stopped.out)[STEPS] == evals(trained / "fsdp_tied")[STEPS]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank(trained, one_rank):
    """The state it loads is checked above (one process reads the whole state); here the run
    goes on from it, logging each step once, and writes plain checkpoints."""
    assert sorted(losses(one_rank)) == list(range(1, 11))
    assert losses(one_rank)[8] == losses(trained / "fsdp_tied")[8]  # the records it continued
    state = read_state(one_rank / "last")
    assert state["step"] == 10 and "sharded" not in state  # one process writes a plain one
    assert (one_rank / "last" / "model.safetensors").is_file()


@pytest.mark.slow
def test_init_from_a_sharded_checkpoint_starts_from_its_weights(trained):
    """The first step's loss is the sharded checkpoint's model's on the run's first
    micro-batches (dropout off)."""
    source = trained / "fsdp_tied" / "last"
    args = train_args(trained, "init_check", **{"train.init_from": str(source),
                                                 "model.dropout": 0.0, "train.max_iters": 1,
                                                 "train.eval_interval": 1})
    assert run_cli(train_main, args) == 0
    cfg = load_config(args[0], args[1:])
    model = load_model(source)[0]
    assert losses(trained / "init_check")[1] == pytest.approx(first_step_loss(cfg, model), abs=1e-5)


@pytest.mark.slow
def test_a_one_rank_checkpoint_resumes_on_two_ranks(resumed):
    """one_rank's plain checkpoint into FSDP's shards: the same steps as DDP's resume of it."""
    ddp, fsdp = losses(resumed / "two_ranks_ddp"), losses(resumed / "two_ranks_fsdp")
    assert sorted(fsdp) == list(range(1, 13))
    assert fsdp == pytest.approx(ddp, abs=1e-5, rel=0)
    assert read_state(resumed / "two_ranks_fsdp" / "last")["world_size"] == 2


@pytest.mark.slow
def test_generate_and_export_from_a_sharded_checkpoint(trained, tmp_path, capsys):
    """generate.py takes the run's folder as it takes any; the export loads in transformers and
    computes the logits of the checkpoint's weights (read by DCP's converter)."""
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    folder = trained / "fsdp_untied"
    want = dcp_state(folder / "best")
    reference = GPT(GPTConfig(**read_state(folder / "best")["model_config"]))
    reference.load_state_dict(want["model"])
    tokenizer = load_model(folder)[1]
    ids = tokenizer.encode("All:")
    greedy = list(ids)
    with torch.no_grad():
        for _ in range(8):
            greedy.append(int(reference.eval().logits(torch.tensor([greedy]))[0, -1].argmax()))
    assert run_cli(generate_main, ["--ckpt", str(folder), "--prompt", "All:",
                                   "--temperature", "0", "--max_new_tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == greedy[len(ids):]

    tied = trained / "fsdp_tied"  # tied, no head bias: GPT-2 can hold it
    assert run_cli(export_main, [str(tied), str(tmp_path / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    model = GPT(GPTConfig(**read_state(tied / "best")["model_config"]))
    model.load_state_dict(dcp_state(tied / "best")["model"])
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- one-line errors (fast)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_parallel_without_torchrun_is_one_line(corpus_file, tmp_path, capsys, strategy):
    args = tiny_overrides(tmp_path, corpus_file, **{"train.parallel": strategy})
    assert run_cli(train_main, args) == 2
    assert capsys.readouterr().err == (
        f"error: train.parallel={strategy} runs under torchrun (torchrun --nproc_per_node=N "
        "train.py ...); in one process leave train.parallel at auto\n")
    assert not (tmp_path / "out").exists()


def test_fsdp_on_a_torch_without_fully_shard_is_one_line(corpus_file, tmp_path, capsys,
                                                        monkeypatch):
    """torch < 2.6 has no public torch.distributed.fsdp.fully_shard: said before the process
    group starts (under torchrun: RANK set)."""
    import torch.distributed.fsdp as fsdp

    monkeypatch.delattr(fsdp, "fully_shard")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_cli(train_main, tiny_overrides(tmp_path, corpus_file,
                                              **{"train.parallel": "fsdp"})) == 2
    assert capsys.readouterr().err == (
        "error: train.parallel=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= "
        f"2.6); this is torch {torch.__version__}\n")
    assert not torch.distributed.is_initialized()


def test_fsdp_settings_without_fsdp_are_one_line():
    with pytest.raises(ConfigError, match=r"^train.fsdp_reshard_after_forward=false applies to "
                                          r"train.parallel=fsdp, not auto$"):
        load_config(None, ["--train.fsdp_reshard_after_forward=false"])
    assert load_config(None, ["--train.parallel=fsdp", "--train.fsdp_reshard_after_forward=false"]
                       ).train.fsdp_reshard_after_forward is False


def test_auto_is_ddp_under_torchrun_and_none_in_one_process():
    cpu = torch.device("cpu")
    assert parallel._strategy("auto", False, 1, cpu) == "none"
    assert parallel._strategy("auto", True, 1, cpu) == "none"
    assert parallel._strategy("auto", True, 2, cpu) == "ddp"
    assert parallel._strategy("fsdp", True, 1, cpu) == "fsdp"  # one rank: FSDP all the same
