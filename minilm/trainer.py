"""The training loop: AdamW, warmup + cosine schedule, AMP, gradient accumulation, DDP, eval,
checkpoints and resume.

Batches are a pure function of (seed, rank, step, micro-step), so a resumed run, or any rank of a
DDP run, draws exactly the windows an uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from minilm.checkpoint import (copy_checkpoint, load_training_state, load_weights, read_state,
                               save_checkpoint, set_rng_states)
from minilm.config import Config, ConfigError, TrainConfig
from minilm.data import PreparedData, get_batch, prepare
from minilm.device import resolve_device
from minilm.finetune import initial_model, resolve_init_from
from minilm.model import GPT
from minilm.tracking import Timer, Tracker, make_tracker


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """This process's rank and device; under torchrun, join the process group (nccl on CUDA,
    gloo otherwise)."""
    env = os.environ
    d = Distributed(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                    int(env.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name, d.local_rank)
    if "RANK" in env and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 autocast on GPUs that support it, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """auto: torch.compile on CUDA (where it pays, as nanoGPT does), eager elsewhere."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def configure_optimizer(model: torch.nn.Module, t: TrainConfig,
                        device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matrices, embeddings) only, not biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=t.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2),
                             fused=device.type == "cuda")


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr over lr_decay_iters."""
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    decay_iters = t.lr_decay_iters or t.max_iters
    if step >= decay_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(decay_iters - t.warmup_iters, 1)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


def batch_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The RNG of one micro-batch: distinct per rank, reproducible after a resume."""
    g = torch.Generator()
    g.manual_seed(hash((seed, rank, step, micro)) & (2**63 - 1))
    return g


@torch.no_grad()
def evaluate(model: GPT, data: PreparedData, cfg: Config, device: torch.device,
             autocast) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches of each split; the same batches every eval."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        tokens = data.tokens(split)
        g = torch.Generator().manual_seed(cfg.train.seed + 1)
        total = torch.zeros((), device=device)
        for _ in range(cfg.train.eval_iters):
            x, y = get_batch(tokens, cfg.train.batch_size, cfg.model.block_size, g, device)
            with autocast:
                total += model(x, y, **loss_options(cfg)).float()
        losses[split] = (total / cfg.train.eval_iters).item()
    model.train()
    return dict(train_loss=losses["train"], val_loss=losses["val"],
                val_ppl=math.exp(min(losses["val"], 50.0)))


def loss_options(cfg: Config) -> dict[str, Any]:
    return dict(impl=cfg.loss.impl, chunk_size=cfg.loss.chunk_size, z_loss=cfg.loss.z_loss)


def _check_resumable(cfg: Config, state: dict[str, Any]) -> None:
    saved = state.get("config", {})
    for section in ("model", "data"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            old = saved.get(section, {}).get(key, value)
            if old != value and key not in ("num_proc", "cache_dir"):
                raise ConfigError(f"cannot resume: {section}.{key} is {value!r} but the "
                                  f"checkpoint was trained with {old!r}")


def train(cfg: Config, tracker: Tracker | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by cfg; returns the run summary."""
    ddp, device = setup_distributed(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    out_dir = Path(cfg.out_dir)

    ckpt = out_dir / "last"
    if cfg.train.resume and not (ckpt / "state.json").is_file():
        raise ConfigError(f"train.resume: no checkpoint to resume from in {ckpt}")
    source = resolve_init_from(cfg)  # train.init_from: the source's shape and tokenizer enter cfg
    tracker = tracker or make_tracker(cfg, enabled=ddp.is_main)

    # Data: rank 0 prepares, the others wait and then read the cached files.
    data_args = dataclasses.asdict(cfg.data)
    if ddp.is_main:
        data = prepare(**data_args, log=tracker.info)
    if ddp.world_size > 1:
        dist.barrier()
    if not ddp.is_main:
        data = prepare(**data_args, log=lambda *_: None)

    torch.manual_seed(cfg.train.seed + ddp.rank)
    model = initial_model(cfg, data, source)
    if source is not None and source.model is not None:
        tracker.info(f"initialised from {source.label}")
    del source  # the source's own copy of the weights
    model.to(device)
    optimizer = configure_optimizer(model, cfg.train, device)
    step, best_val = 0, float("inf")
    if cfg.train.resume:
        state = read_state(ckpt)
        _check_resumable(cfg, state)
        load_weights(ckpt, model)
        opt_state, rng = load_training_state(ckpt)
        optimizer.load_state_dict(opt_state)
        step, best_val = state["step"], state["best_val_loss"]
        if ddp.is_main:
            set_rng_states(rng)
        else:
            torch.manual_seed(cfg.train.seed + ddp.rank + 7919 * step)
        tracker.info(f"resuming from {ckpt} at step {step}")

    counts = model.param_counts()
    compile_model = resolve_compile(cfg.train.compile, device)
    tracker.info(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts}), "
                 f"device {device}, dtype {str(dtype).removeprefix('torch.')}"
                 + (", compiled" if compile_model else "")
                 + (f", {ddp.world_size} processes" if ddp.world_size > 1 else ""))
    if ddp.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    raw_model = model
    if compile_model:
        model = torch.compile(model)
    if ddp.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    t = cfg.train
    tokens_per_micro = t.batch_size * cfg.model.block_size
    tokens_per_step = tokens_per_micro * t.grad_accum_steps * ddp.world_size
    train_tokens = data.tokens("train")
    state_base = dict(config=cfg.to_dict(), tokenizer=data.meta["tokenizer"])
    tracker.set_summary(params_total=counts["total"], params_embedding=counts["embedding"],
                        params_head=counts["head"], params_non_embedding=counts["non_embedding"])

    def eval_and_checkpoint(step: int) -> None:
        nonlocal best_val
        metrics = evaluate(raw_model, data, cfg, device, autocast)
        tracker.log_eval(step, **metrics)
        if step == 0:
            return
        is_best = metrics["val_loss"] < best_val
        best_val = min(best_val, metrics["val_loss"])
        save_checkpoint(out_dir / "last", raw_model, optimizer,
                        dict(state_base, step=step, best_val_loss=best_val, **metrics))
        if is_best:
            copy_checkpoint(out_dir / "last", out_dir / "best")

    if step == 0 and ddp.is_main:
        eval_and_checkpoint(0)
    timer = Timer()
    timer.restart(step)
    model.train()
    while step < t.max_iters:
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(t.grad_accum_steps):
            x, y = get_batch(train_tokens, t.batch_size, cfg.model.block_size,
                             batch_generator(t.seed, ddp.rank, step, micro), device)
            last = micro == t.grad_accum_steps - 1
            sync = model.no_sync() if (ddp.world_size > 1 and not last) else contextlib.nullcontext()
            with sync:
                with autocast:
                    # "sum" over the micro-batch, one divisor for the whole step: the step's loss
                    # is the mean over all its tokens, however they are split into micro-batches.
                    loss = model(x, y, reduction="sum", **loss_options(cfg)) / (
                        tokens_per_micro * t.grad_accum_steps)
                scaler.scale(loss).backward()
            step_loss += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   t.grad_clip if t.grad_clip > 0 else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if ddp.is_main and (step % t.log_interval == 0 or step == 1 or step == t.max_iters):
            sec = timer.seconds_per_step(step)  # .item() below syncs, so the time is honest
            tracker.log_step(step, loss=step_loss.item(), lr=lr,
                             tokens_per_sec=tokens_per_step / sec, ms_per_iter=1000 * sec,
                             grad_norm=grad_norm.item())
            timer.restart(step)
        if ddp.is_main and (step % t.eval_interval == 0 or step == t.max_iters):
            eval_and_checkpoint(step)
            timer.restart(step)

    tracker.set_summary(best_val_loss=best_val, tokens_seen=step * tokens_per_step)
    tracker.close(final_checkpoint=out_dir / "last" if ddp.is_main else None)
    if ddp.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return dict(tracker.summary, step=step, out_dir=str(out_dir))
