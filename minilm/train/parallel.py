"""Where a run is distributed, all in one place: the processes (torchrun's ranks and their process
group), the numbers they agree on, and the model as the training step calls it (compiled,
wrapped in DDP).

In one process there is no process group and the model trains as it is; under torchrun every
rank holds a whole copy of the model and DDP averages the gradients (nccl on CUDA, gloo
otherwise).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn as nn

from minilm.device import resolve_device
from minilm.model.gpt import GPT


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # a gloo group for the CPU flags all ranks agree on (None: the default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        """Leave the process group that setup_distributed joined."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """This process's rank and device; under torchrun, join the process group (nccl on CUDA,
    gloo otherwise)."""
    env = os.environ
    d = Distributed(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                    int(env.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name, d.local_rank, key="train.device")
    if "RANK" in env and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if d.world_size > 1 and dist.get_backend() != "gloo":
        d.control = dist.new_group(backend="gloo")
    return d, device


def wrap_model(model: GPT, d: Distributed, device: torch.device, compile: bool) -> nn.Module:
    """What the training step calls: the model (on `device`, in the usual weight layout: a model
    a notebook sampled from may come in the decode layout), compiled when asked, in DDP when
    there are several ranks. Evals and checkpoints keep using `model` itself."""
    model.set_decode_layout(False)
    forward: nn.Module = torch.compile(model) if compile else model
    if d.world_size > 1:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    return forward


def gradient_sync(forward: nn.Module, d: Distributed, is_last: bool) -> ContextManager:
    """Gradient accumulation: the ranks average their gradients on the step's last micro-batch
    only (DDP's no_sync on the others)."""
    if d.world_size > 1 and not is_last:
        return forward.no_sync()
    return contextlib.nullcontext()
