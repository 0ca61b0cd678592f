"""Shared test setup: offline hubs, the shared tiktoken cache, tiny configs and corpora."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_cache = ROOT.parent / "shared" / "tiktoken-cache"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
if "PYTEST_XDIST_WORKER" in os.environ:  # -n 2 on 2 cores: one thread per worker, or they fight
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
sys.path.insert(0, str(ROOT))

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
          "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to "
          "famish?\n\nAll:\nResolved. resolved.\n\n") * 40


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def tiny_overrides(tmp_path: Path, source: Path, **extra) -> list[str]:
    """Overrides for a tiny, fast char-level run on `source`."""
    values = {
        "out_dir": tmp_path / "out", "data.source": source, "data.cache_dir": tmp_path / "cache",
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16,
        "train.batch_size": 4, "train.max_iters": 8, "train.eval_interval": 4,
        "train.eval_iters": 2, "train.log_interval": 1, "train.warmup_iters": 2,
        "train.device": "cpu",
    }
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny run (tiny_overrides: 8 steps, evals at 0, 4, 8), trained once per test session
    (per xdist worker); tests that change a run work on a copy (test_train's copy_run)."""
    from types import SimpleNamespace

    from minilm.train.config import load_config
    from minilm.train.trainer import train

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")  # (CI exports offline) its files stay the run's
        summary = train(load_config(None, tiny_overrides(root, corpus)))
    return SimpleNamespace(root=root, corpus=corpus, out=root / "out", summary=summary)


def first_step_loss(cfg, forward) -> float:
    """The loss a run of `cfg` logs at step 1, recomputed outside the trainer: the mean of
    F.cross_entropy over the step's micro-batches (the trainer's own batch draw), `forward`
    giving the logits (dropout off)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from minilm.train.data import get_batch, prepare
    from minilm.train.trainer import batch_generator

    tokens = prepare(**dataclasses.asdict(cfg.data), log=lambda *_: None).tokens("train")
    losses = []
    for micro in range(cfg.train.grad_accum_steps):
        generator = batch_generator(cfg.train.seed, 0, 0, micro)
        x, y = get_batch(tokens, cfg.train.batch_size, cfg.model.block_size, generator, "cpu")
        with torch.no_grad():
            losses.append(F.cross_entropy(forward(x).flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------------
# minilm-serve, started once per test session on a free loopback port (test_serve, test_explorer)

SERVE_CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> Path:
    """A tiny char model with random weights; the token embedding is scaled up so that the
    logits are spread (std ~ 2): greedy choices are clear and sampled texts differ by seed."""
    import torch

    from minilm.model.gpt import GPT, GPTConfig
    from minilm.tokenizer import CharTokenizer

    from saved import save_model

    tokenizer = CharTokenizer(SERVE_CHARS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          block_size=32))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    out = tmp_path_factory.mktemp("serve") / "tiny_char"
    save_model(out / "best", model, tokenizer.to_dict())
    return out


@pytest.fixture(scope="session")
def server(serve_checkpoint, tmp_path_factory):
    """minilm-serve in a subprocess (python -m minilm.serve): its URL and log file."""
    from types import SimpleNamespace

    from server_process import ServerProcess

    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    with open(log_path, "w") as log:
        try:
            server = ServerProcess(serve_checkpoint, "--max_batch", "16", env=env, log=log)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{log_path.read_text()}") from None
    yield SimpleNamespace(url=server.url, log=log_path, checkpoint=serve_checkpoint,
                          name="tiny_char")
    server.close()
