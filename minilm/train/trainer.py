"""The training loop: AdamW, warmup + cosine schedule, AMP, gradient accumulation, eval,
checkpoints, resume and stopping; the processes and the model's wrapping (DDP, FSDP) are
parallel.py's.

A run is a few named steps over a small state (RunState: the step, the best val loss, the step
out_dir/last holds): train_step (micro-batches, accumulation, clipping, the optimizer step),
log_step, eval_and_checkpoint, save_last, and the stop vote (stop_if_asked).

Batches are a pure function of (seed, rank, step, micro-step), so a resumed run, or any rank of a
DDP run, draws exactly the windows an uninterrupted run would have drawn.

A run stops early in two ways, each one line and an exit code (TrainingStopped): SIGINT (Ctrl-C)
or SIGTERM (a preempted job) finish the current step (under DDP the next one: the ranks' vote on
it travels while a step computes), save out_dir/last and exit 130 / 143, ready for
--train.resume=true; a loss that is no longer finite stops the run at once, before any
checkpoint of the diverged weights is written, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
import yaml

from minilm.checkpoint import (
    complete_checkpoint,
    copy_checkpoint,
    load_training_state,
    read_state,
    recover_checkpoint,
    remove_checkpoint,
    resume_settings,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_states,
)
from minilm.errors import CheckpointError, ConfigError, TrainingStopped
from minilm.model.gpt import GPT
from minilm.train.config import Config, TrainConfig, validate
from minilm.train.data import PreparedData, get_batch, prepare
from minilm.train.finetune import initial_model, resolve_init_from
from minilm.train.parallel import (
    Distributed,
    clip_gradients,
    gradient_sync,
    precision,
    setup_distributed,
    wrap_model,
)
from minilm.train.tracking import Timer, Tracker, console_log, make_tracker


class StopSignals:
    """While active, SIGINT and SIGTERM are only noted (`received`), so that the loop can finish
    its step and save. In a single process the handlers in place before are restored at the first
    one, so a second signal does what it always does (KeyboardInterrupt, termination); under
    torchrun every signal is deferred, since Ctrl-C reaches each worker twice (from the terminal
    and forwarded by torchrun), and torchrun kills workers that take too long itself. Main thread
    only: elsewhere Python allows no handlers, and signals keep their usual effect."""

    def __init__(self, once: bool = True):
        self.received: int | None = None
        self.once = once
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self.once:
            self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


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
    """Linear warmup to learning_rate, then cosine decay to min_lr over lr_decay_iters (nanoGPT's
    get_lr). A run that ends within its warmup warms up all the way and never decays."""
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    decay_iters = t.lr_decay_iters or t.max_iters
    if step >= decay_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(decay_iters - t.warmup_iters, 1)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


def warmup_warning(t: TrainConfig) -> str | None:
    """The line that says a run ends within its warmup (train.max_iters=40 on the shipped warmup
    of 100, the usual way to try a config): it trains, warming up all the way as nanoGPT and HF's
    Trainer do, but never at train.learning_rate."""
    if t.warmup_iters < t.max_iters:
        return None
    return (f"train.warmup_iters ({t.warmup_iters}) >= train.max_iters ({t.max_iters}): the whole "
            f"run is warmup, the learning rate rises linearly to {lr_at(t.max_iters - 1, t):.3g} "
            f"and never reaches train.learning_rate {t.learning_rate}")


def batch_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The RNG of one micro-batch: distinct per rank, reproducible after a resume."""
    g = torch.Generator()
    g.manual_seed(hash((seed, rank, step, micro)) & (2**63 - 1))
    return g


def eval_splits(cfg: Config) -> tuple[str, ...]:
    """The splits a run evaluates: no val split when data.val_fraction is 0."""
    return ("train", "val") if cfg.data.val_fraction > 0 else ("train",)


@torch.no_grad()
def estimate_loss(model: GPT, data: PreparedData, cfg: Config, device: torch.device,
                  autocast: ContextManager) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches of each split; the same batches every eval."""
    model.eval()
    losses, loss_kwargs = {}, loss_options(cfg)
    for split in eval_splits(cfg):
        tokens = data.tokens(split)
        g = torch.Generator().manual_seed(cfg.train.seed + 1)
        total = torch.zeros((), device=device)
        for _ in range(cfg.train.eval_iters):
            x, y = get_batch(tokens, cfg.train.batch_size, cfg.model.block_size, g, device)
            with autocast:
                total += model(x, y, **loss_kwargs).float()
        losses[split] = (total / cfg.train.eval_iters).item()
    model.train()
    if "val" not in losses:
        return dict(train_loss=losses["train"])
    return dict(train_loss=losses["train"], val_loss=losses["val"],
                val_ppl=math.exp(min(losses["val"], 50.0)))


def loss_options(cfg: Config) -> dict[str, Any]:
    return dict(impl=cfg.loss.impl, chunk_size=cfg.loss.chunk_size, z_loss=cfg.loss.z_loss)


def _check_resumable(cfg: Config, state: dict[str, Any]) -> None:
    saved = resume_settings(state.get("config", {}))
    for key, value in resume_settings(cfg.to_dict()).items():
        old = saved.get(key, value)
        if old != value:
            raise ConfigError(f"cannot resume: {key} is {value!r} but the checkpoint was trained "
                              f"with {old!r}")


RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")
CHECKPOINTS = ("last", "best")


def _holds_run(out_dir: Path) -> list[str]:
    """What of a run out_dir holds: its records and checkpoints (an empty metrics.jsonl, left by
    a run that failed before its first record, is not a run)."""
    found = []
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    found += [f"{name}/" for name in CHECKPOINTS if complete_checkpoint(out_dir / name)]
    return found


def claim_out_dir(cfg: Config, is_main: bool) -> Path | None:
    """Check out_dir against train.resume / train.overwrite before any work; returns the
    checkpoint to resume from (None for a fresh run).

    resume: out_dir/last must hold a complete checkpoint (an interrupted swap is recovered).
    fresh: out_dir must not hold a run (records or checkpoints), unless train.overwrite: then
    clear_out_dir deletes it once the new run has passed its checks. A fresh run never mixes its
    records and checkpoints with another run's."""
    out_dir = Path(cfg.out_dir)
    last = out_dir / "last"
    if cfg.train.resume:
        if (recover_checkpoint(last) if is_main else complete_checkpoint(last)) is None:
            raise ConfigError(f"train.resume: no checkpoint to resume from in {last}")
        return last
    found = _holds_run(out_dir)
    if found and not cfg.train.overwrite:
        raise ConfigError(f"out_dir {out_dir} already holds a run ({', '.join(found)}): continue "
                          "it with --train.resume=true, choose another --out_dir, or replace it "
                          "with --train.overwrite=true")
    return None


def clear_out_dir(out_dir: Path) -> None:
    """Delete the run that train.overwrite replaces: its checkpoints and records."""
    for name in CHECKPOINTS:
        remove_checkpoint(out_dir / name)
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


def resume_step(ckpt: Path, state: dict[str, Any], max_iters: int) -> int:
    """The step a resumed run continues from; refused when it leaves nothing to train, since
    such a run would only rewrite the run's config, records and wandb run."""
    step = state.get("step")
    if not isinstance(step, int):
        raise CheckpointError(f"corrupt checkpoint {ckpt}: state.json has no step")
    if step >= max_iters:
        where = "past" if step > max_iters else "already at"
        raise ConfigError(f"{ckpt} is at step {step}, {where} train.max_iters {max_iters}: "
                          "nothing to do; raise --train.max_iters")
    return step


def _diverged(step: int, loss: float, last: Path, saved_step: int | None,
              show: bool = True) -> TrainingStopped:
    good = (f"the last good checkpoint is {last} (step {saved_step}); lower train.learning_rate "
            "(or raise train.warmup_iters) and continue it with --train.resume=true"
            if saved_step else "no checkpoint was saved before it; lower train.learning_rate "
            "(or raise train.warmup_iters) and start again")
    return TrainingStopped(f"error: the loss is {loss} at step {step}, training stopped: {good}",
                           exit_code=1, show=show)


def _interrupted(signum: int, step: int, last: Path, show: bool = True) -> TrainingStopped:
    name = signal.Signals(signum).name
    return TrainingStopped(f"{name} received: stopped after step {step} and saved {last}; "
                           "continue with the same command and --train.resume=true",
                           exit_code=128 + signum, show=show)



def train(cfg: Config, tracker: Tracker | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by cfg; returns the run summary. Raises
    TrainingStopped when a signal or a diverged loss ends the run early.

    Everything that can be checked is checked before the run writes anything (see start_run):
    a run that cannot start leaves out_dir as it was, and no wandb run."""
    validate(cfg)
    ranks, device = setup_distributed(cfg.train.device, cfg.train.parallel)
    try:
        start = start_run(cfg, ranks, device,
                          tracker.info if tracker is not None else console_log(ranks.is_main))
        if cfg.train.overwrite and ranks.is_main:
            clear_out_dir(Path(cfg.out_dir))
        tracker = tracker or make_tracker(cfg, enabled=ranks.is_main,
                                          resume_step=start.state.step if start.resumed else None)
        try:
            return _train(Run(cfg, tracker, ranks, device, start), start.state)
        except BaseException as e:
            # a stop, a crash: the run is closed (wandb marks it failed), so that none stays open
            # in this process for the next wandb.init to continue
            tracker.close(exit_code=getattr(e, "exit_code", 1))
            raise
    finally:
        ranks.close()


@dataclass
class RunState:
    """What changes as a run goes: the steps done, the best val loss so far and the step that
    out_dir/last holds (None before the first save)."""
    step: int = 0
    best_val: float = math.inf
    saved_step: int | None = None


@dataclass
class Start:
    """What a run starts from, checked and loaded before anything of the run is written."""
    data: PreparedData
    model: GPT
    forward: nn.Module  # what the training step calls: the model compiled and/or in DDP
    optimizer: torch.optim.AdamW
    state: RunState
    resumed: bool = False  # from out_dir/last


def start_run(cfg: Config, ranks: Distributed, device: torch.device,
              log: Callable[[str], None]) -> Start:
    """Every check a run can make before it writes anything, in the order of their cost: out_dir
    (resume, overwrite), the checkpoint resumed from, train.init_from, the data (preparation,
    tokenizer, split lengths), a char vocabulary against the source's; then the model, its
    wrapping and the optimizer, loaded from the checkpoint when resuming."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt = claim_out_dir(cfg, ranks.is_main)
    # read once, by every rank, from the complete version (rank 0 may still be renaming it back)
    state = read_state(complete_checkpoint(ckpt)) if ckpt is not None else None
    step = resume_step(ckpt, state, cfg.train.max_iters) if ckpt is not None else 0
    source = resolve_init_from(cfg, state)  # the source's shape and tokenizer enter cfg
    if ckpt is not None:
        _check_resumable(cfg, state)
    warning = warmup_warning(cfg.train)
    if warning and ranks.is_main:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    data = _prepare_data(cfg, ranks, log)

    # every rank builds the same model (FSDP shards it as it is, without DDP's broadcast of rank
    # 0's), then draws its own dropout masks
    torch.manual_seed(cfg.train.seed)
    model = initial_model(cfg, data, source)
    if ranks.world_size > 1:
        torch.manual_seed(cfg.train.seed + ranks.rank)
    if source is not None and source.model is not None:
        log(f"initialised from {source.label}")
    t = cfg.train
    forward = wrap_model(model, ranks, device, resolve_compile(t.compile, device),
                         resolve_dtype(t.dtype, device), t.fsdp_reshard_after_forward)
    optimizer = configure_optimizer(model, t, device)  # on the wrapped (FSDP: sharded) weights
    if ckpt is None:
        return Start(data, model, forward, optimizer, RunState())
    rng = load_training_state(ckpt, state, model, optimizer)
    if rng is not None:
        set_rng_states(rng)
    else:  # a rank the checkpoint has no RNG states for: a stream of its own
        torch.manual_seed(cfg.train.seed + ranks.rank + 7919 * step)
    log(f"resuming from {ckpt} at step {step}")
    best_val = state.get("best_val_loss")
    return Start(data, model, forward, optimizer,
                 RunState(step, math.inf if best_val is None else best_val, saved_step=step),
                 resumed=True)


def _prepare_data(cfg: Config, ranks: Distributed, log: Callable[[str], None]) -> PreparedData:
    """The run's tokens, each split checked to hold a window. Rank 0 prepares, the others wait
    and then read the cached files."""
    data_args = dataclasses.asdict(cfg.data)
    if ranks.is_main:
        data = prepare(**data_args, log=log)
    ranks.barrier()
    if not ranks.is_main:
        data = prepare(**data_args, log=lambda *_: None)
    splits = eval_splits(cfg)
    data.check_windows(splits, cfg.model.block_size)
    if "val" not in splits:
        log("data.val_fraction is 0: no val split; evals report the train loss only and best/ "
            "is not written")
    return data


class Run:
    """What the steps of a run share, fixed once it starts: the config, the tracker, the ranks,
    the data, the model (evals and checkpoints read it), what a training step calls (`forward`),
    the optimizer, and the precision (autocast, the fp16 grad scaler)."""

    def __init__(self, cfg: Config, tracker: Tracker, ranks: Distributed, device: torch.device,
                 start: Start):
        self.cfg, self.tracker, self.ranks, self.device = cfg, tracker, ranks, device
        self.data, self.model, self.forward = start.data, start.model, start.forward
        self.optimizer, self.resumed = start.optimizer, start.resumed
        self.dtype = resolve_dtype(cfg.train.dtype, device)
        self.autocast = precision(ranks, device, self.dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.out_dir = Path(cfg.out_dir)
        self.last = self.out_dir / "last"
        self.train_tokens = start.data.tokens("train")
        self.loss_options = loss_options(cfg)
        t = cfg.train
        self.tokens_per_micro = t.batch_size * cfg.model.block_size
        self.tokens_per_step = self.tokens_per_micro * t.grad_accum_steps * ranks.world_size

    def is_eval_step(self, step: int) -> bool:
        return step % self.cfg.train.eval_interval == 0 or step == self.cfg.train.max_iters

    def is_log_step(self, step: int) -> bool:
        return self.is_eval_step(step) or step % self.cfg.train.log_interval == 0 or step == 1


def _train(run: Run, state: RunState) -> dict[str, Any]:
    """train()'s work, from the run's first record to the last checkpoint."""
    describe_run(run)
    stop = StopSignals(once=run.ranks.world_size == 1)
    try:
        with stop:
            if not run.resumed:
                eval_and_checkpoint(run, state)  # step 0: the loss before training
            timer = Timer()
            timer.restart(state.step)
            run.forward.train()
            while state.step < run.cfg.train.max_iters:
                # every rank's signal, voted on while the step computes: all ranks stop after the
                # same step (under torchrun the one after the signal, one process this one)
                stop_vote = run.ranks.max_later(lambda: stop.received or 0)
                step_loss, grad_norm, lr = train_step(run, state.step)
                state.step += 1
                if run.is_log_step(state.step):
                    log_step(run, state, step_loss, grad_norm, lr, timer)
                if run.is_eval_step(state.step):
                    eval_and_checkpoint(run, state)
                    timer.restart(state.step)
                stop_if_asked(run, state, int(stop_vote()))
    except TrainingStopped:
        _set_summary(run, state, stopped_at_step=state.step)
        raise
    _set_summary(run, state)
    run.tracker.close(final_checkpoint=run.last if run.ranks.is_main else None)
    run.ranks.barrier()
    return dict(run.tracker.summary, step=state.step, out_dir=str(run.out_dir))


def describe_run(run: Run) -> None:
    """The run's first records: the model line, config.yaml, the parameter counts."""
    counts = run.model.param_counts()
    compiled = resolve_compile(run.cfg.train.compile, run.device)
    run.tracker.info(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts}), "
                     f"device {run.device}, dtype {str(run.dtype).removeprefix('torch.')}"
                     + (", compiled" if compiled else "")
                     + (f", {run.ranks.world_size} processes ({run.ranks.strategy})"
                        if run.ranks.world_size > 1 else ""))
    if run.ranks.is_main:
        (run.out_dir / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(),
                                                                sort_keys=False))
    run.tracker.set_summary(params_total=counts["total"], params_embedding=counts["embedding"],
                            params_head=counts["head"],
                            params_non_embedding=counts["non_embedding"])


def train_step(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step: the micro-batches' gradients accumulated (the ranks average them on
    the last one), clipped, AdamW at the step's learning rate. Returns the step's loss and the
    gradient norm (tensors: reading them syncs the device) and the learning rate."""
    t, ranks = run.cfg.train, run.ranks
    lr = lr_at(step, t)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=run.device)
    for micro in range(t.grad_accum_steps):
        x, y = get_batch(run.train_tokens, t.batch_size, run.cfg.model.block_size,
                         batch_generator(t.seed, ranks.rank, step, micro), run.device)
        with gradient_sync(run.forward, ranks, is_last=micro == t.grad_accum_steps - 1):
            with run.autocast:
                # "sum" over the micro-batch, one divisor for the whole step: the step's loss is
                # the mean over all its tokens, however they are split into micro-batches.
                loss = run.forward(x, y, reduction="sum", **run.loss_options) / (
                    run.tokens_per_micro * t.grad_accum_steps)
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_gradients(run.model, t.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, lr


def log_step(run: Run, state: RunState, step_loss: torch.Tensor, grad_norm: torch.Tensor,
             lr: float, timer: Timer) -> None:
    """The step's record (rank 0), and the divergence check: every rank checks the same
    all-rank mean loss, so all stop together."""
    sec = timer.seconds_per_step(state.step)  # .item() below syncs: an honest time
    loss = run.ranks.sum(step_loss.item()) / run.ranks.world_size
    if run.ranks.is_main:
        run.tracker.log_step(state.step, loss=loss, lr=lr,
                             tokens_per_sec=run.tokens_per_step / sec, ms_per_iter=1000 * sec,
                             grad_norm=grad_norm.item())
    if not math.isfinite(loss):
        raise _diverged(state.step, loss, run.last, state.saved_step, run.ranks.is_main)
    timer.restart(state.step)


def eval_and_checkpoint(run: Run, state: RunState) -> None:
    """The eval losses, then (past step 0) out_dir/last and, on a new best val loss,
    out_dir/best; never a checkpoint of diverged weights. Rank 0 alone, but every rank under
    FSDP (each holds a shard: the forward and the save are collective, the figures the same)."""
    if not (run.ranks.is_main or run.ranks.sharded):
        return
    metrics = estimate_loss(run.model, run.data, run.cfg, run.device, run.autocast)
    run.tracker.log_eval(state.step, **metrics)
    bad = next((v for v in metrics.values() if not math.isfinite(v)), None)
    if bad is not None:
        raise _diverged(state.step, bad, run.last, state.saved_step)
    if state.step == 0:
        return
    val = metrics.get("val_loss", math.inf)
    is_best = val < state.best_val
    state.best_val = min(state.best_val, val)
    save_last(run, state, **metrics)
    if is_best and run.ranks.is_main:
        copy_checkpoint(run.last, run.out_dir / "best")


def save_last(run: Run, state: RunState, **metrics: float) -> None:
    """out_dir/last at this step, with the run's config, tokenizer and figures: rank 0 writes it,
    or under FSDP every rank its shards (a sharded checkpoint)."""
    if not (run.ranks.is_main or run.ranks.sharded):
        return
    run_state = dict(config=run.cfg.to_dict(), tokenizer=run.data.meta["tokenizer"],
                     step=state.step, best_val_loss=state.best_val, **metrics)
    save = save_sharded_checkpoint if run.ranks.sharded else save_checkpoint
    save(run.last, run.model, run.optimizer, run_state)
    state.saved_step = state.step


def stop_if_asked(run: Run, state: RunState, signum: int) -> None:
    """After a step: when the ranks' vote says a signal came (and steps remain), save
    out_dir/last unless it holds this step already, and stop (TrainingStopped)."""
    if not signum or state.step >= run.cfg.train.max_iters:
        return
    if state.saved_step != state.step:
        save_last(run, state)
    run.ranks.barrier()  # no rank exits while rank 0 still writes
    raise _interrupted(signum, state.step, run.last, run.ranks.is_main)


def _set_summary(run: Run, state: RunState, **extra: int) -> None:
    run.tracker.set_summary(best_val_loss=state.best_val if state.best_val < math.inf else None,
                            tokens_seen=state.step * run.tokens_per_step, **extra)
