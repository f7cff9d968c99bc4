"""Data-parallel training with PyTorch's own engine: torchrun starts the processes, DDP
averages the gradients. NCCL on GPUs, gloo on CPU.

Every rank draws the same global batch (same seed, same order, same crops) and keeps its
own contiguous shard, so a run on N processes follows the single-process recipe: the same
global batch, the same learning-rate schedule, the same gradient up to float summation
order. Metrics are summed across ranks; only rank 0 writes files. The command line starts the
ranks (cli/worker.py); each trains `localitylab.train.job.run_job`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from localitylab.errors import UserError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (the batch divides evenly)."""
        if not self.enabled:
            return tensor
        size = len(tensor) // self.world_size
        return tensor[self.rank * size:(self.rank + 1) * size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place, and returned); the identity on one process."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_all(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: self.sum(value) for key, value in tensors.items()}

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: ranks must agree to stop together."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device: torch.device) -> Distributed:
    """Join the process group torchrun describes in the environment; one process without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def check_batch_divides(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise UserError(f"batch_size {batch_size} is the global batch and must divide evenly over {world_size} "
                        "processes", setting="batch_size")


def is_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def print_main(text: str) -> None:
    """Print once, from rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stdout)
