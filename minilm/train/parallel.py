"""Where a run is distributed, all in one place: the processes (torchrun's ranks and their process
group), the numbers they agree on, and the model as the training step calls it.

train.parallel picks how the ranks share the work:
- one process (no torchrun): the model trains as it is;
- ddp (auto's choice under torchrun): every rank holds the whole model, its gradients and its
  AdamW state; DDP averages the gradients (nccl on CUDA, gloo otherwise);
- fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) shards weights, gradients and AdamW state
  across the ranks: each block is one group (gathered for its forward and backward, resharded
  after, or kept to backward with fsdp_reshard_after_forward=false), the token embedding and the
  LM head one group (a tied head is the embedding's Parameter: one group may hold it), the rest
  the root's. The fused loss runs inside the root's forward, where the head matrix is whole.
  Checkpoints are sharded (DCP, see checkpoint.save_sharded_checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn as nn

from minilm.device import resolve_device
from minilm.errors import ConfigError
from minilm.model.gpt import GPT

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # a gloo group for the CPU flags all ranks agree on (None: the default)
    strategy: str = "none"  # none (one process), ddp or fsdp
    owns_group: bool = False  # setup_distributed started the process group (close ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP: every rank holds a shard of the model, so every rank evaluates and saves."""
        return self.strategy == "fsdp"

    def sum(self, value: float) -> float:
        """The sum of a number over all ranks, on the CPU: every rank decides on the same figure
        at the same step without syncing the GPU."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.control)
        return t.item()

    def max_later(self, read: Callable[[], float]) -> Callable[[], float]:
        """The max of read() over all ranks, on the CPU, sent now and waited for when the function
        returned is called: the collective travels while this rank works on, so a per-step vote
        costs no rank a wait. One process: read() itself, read when called."""
        if self.world_size == 1:
            return read
        t = torch.tensor([float(read())], dtype=torch.float64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control, async_op=True)

        def result() -> float:
            work.wait()
            return t.item()
        return result

    def barrier(self) -> None:
        """Every rank waits here for the others (one process: nothing to wait for)."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if setup_distributed started it (one a caller started, to run
        several trainings in one launch, stays theirs)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_name: str, parallel: str = "auto") -> tuple[Distributed, torch.device]:
    """This process's rank, device and strategy (train.parallel); under torchrun, join the process
    group (nccl on CUDA, gloo otherwise). train.parallel=ddp or fsdp without torchrun, or fsdp
    where FSDP2 cannot run, is one ConfigError line."""
    env = os.environ
    d = Distributed(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                    int(env.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name, d.local_rank, key="train.device")
    d.strategy = _strategy(parallel, "RANK" in env, d.world_size, device)
    if d.strategy != "none" and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        d.owns_group = True
    if d.world_size > 1 and dist.get_backend() != "gloo":
        d.control = dist.new_group(backend="gloo")
    return d, device


def _strategy(parallel: str, launched: bool, world_size: int, device: torch.device) -> str:
    """train.parallel resolved: auto is ddp under torchrun with several ranks, none otherwise."""
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if not launched:
        raise ConfigError(f"train.parallel={parallel} runs under torchrun (torchrun "
                          f"--nproc_per_node=N train.py ...); in one process leave train.parallel "
                          "at auto")
    if parallel == "fsdp":
        _fsdp_api()
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"train.parallel=fsdp runs on CUDA or CPU ranks, not "
                              f"train.device={device.type}")
    return parallel


def _fsdp_api() -> tuple[Callable, type]:
    """FSDP2's fully_shard and MixedPrecisionPolicy (public since torch 2.6)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise ConfigError(f"train.parallel=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, "
                          f"torch >= 2.6); this is torch {torch.__version__}") from None
    return fully_shard, MixedPrecisionPolicy


def wrap_model(model: GPT, d: Distributed, device: torch.device, compile: bool,
               dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True
               ) -> nn.Module:
    """What the training step calls: the model in the usual weight layout (one a notebook sampled
    from may come in the decode layout), on `device`, compiled when asked, and sharded (fsdp) or
    in DDP. Under fsdp the model itself is sharded in place, so `model` and the result are one
    module; otherwise evals and checkpoints keep using `model` itself."""
    model.set_decode_layout(False)
    if d.sharded:
        return shard_model(model, d, device, compile, dtype, reshard_after_forward)
    model.to(device)
    forward: nn.Module = torch.compile(model) if compile else model
    if d.strategy == "ddp":
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    return forward


def shard_model(model: GPT, d: Distributed, device: torch.device, compile: bool,
                dtype: torch.dtype, reshard_after_forward: bool) -> GPT:
    """FSDP2 over all ranks (a 1-D mesh of `device`'s type): each block, then the token embedding
    with the LM head, then the root; fully_shard moves each rank's shards to the device, so the
    whole model never sits on it. Under bf16/fp16 the MixedPrecisionPolicy computes in that
    dtype and reduces gradients in fp32 (the sharded weights stay fp32). compile: each block's
    forward, so FSDP's hooks around it stay eager and the parameter names unchanged."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    options: dict[str, Any] = dict(mesh=init_device_mesh(device.type, (d.world_size,)),
                                   reshard_after_forward=reshard_after_forward)
    if dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile:
            block.forward = torch.compile(block.forward)
        fully_shard(block, **options)
    fully_shard([model.transformer.wte, model.lm_head], **options)
    fully_shard(model, **options)
    return model


def precision(d: Distributed, device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Where the forward computes in bf16/fp16: autocast, except under FSDP, whose
    MixedPrecisionPolicy already casts the weights it gathers."""
    if dtype == torch.float32 or d.sharded:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def gradient_sync(forward: nn.Module, d: Distributed, is_last: bool) -> ContextManager:
    """Gradient accumulation: the ranks reduce their gradients on the step's last micro-batch
    only (DDP's no_sync on the others; FSDP keeps them unsharded until then)."""
    if d.sharded:
        forward.set_requires_gradient_sync(is_last)
    elif d.strategy == "ddp" and not is_last:
        return forward.no_sync()
    return contextlib.nullcontext()


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over all of the model's gradients (max_norm 0: measured, not clipped);
    the norm as a plain tensor (FSDP's is a DTensor over the ranks' shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
