"""Data-parallel training with PyTorch's own engine: torchrun starts the processes, DDP
averages the gradients. NCCL on GPUs, gloo on CPU.

Every rank draws the same global batch (same seed, same order, same crops) and keeps its
own contiguous shard, so a run on N processes follows the single-process recipe: the same
global batch, the same learning-rate schedule, the same gradient up to float summation
order. Metrics are summed across ranks; only rank 0 writes files.
"""

from __future__ import annotations

import os
import shlex
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
        raise UserError(
            f"--batch-size {batch_size} is the global batch and must divide evenly over {world_size} processes"
        )


def launch(config_file: Path, nproc: int) -> None:
    """Train the job in `config_file` (written by `train.worker.write_job`) on `nproc` local
    processes through torchrun: `torchrun --standalone --nproc-per-node N -m
    localitylab.train.worker FILE`. Every rank reads the same configuration as data. For
    several machines, call torchrun yourself with its rendezvous options.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    arguments = ["--standalone", f"--nproc-per-node={nproc}", "--module", "localitylab.train.worker", str(config_file)]
    # Workers print their own one-line errors; the launcher only says how many failed.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(get_args_parser().parse_args(arguments))
    except ChildFailedError as failed:
        codes = sorted({f.exitcode for f in failed.failures.values()})
        raise UserError(
            f"{len(failed.failures)} of {nproc} training processes failed (exit {', '.join(map(str, codes))}); "
            f"their messages are above. Re-run: torchrun {shlex.join(arguments[:2])} -m localitylab.train.worker "
            f"{shlex.quote(str(config_file))}"
        ) from None


def launch_nodes(config_file: Path, nnodes: int, nproc: int) -> None:
    """Train the job in `config_file` on `nnodes` nodes of the SLURM allocation this runs in,
    `nproc` processes each: srun starts one torchrun per node (one per task where the
    allocation has fewer nodes than that, e.g. several tasks on one node), and they meet at a
    c10d rendezvous on the allocation's first node. `config_file` must be on a file system
    every node sees."""
    import shutil
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if job is None or shutil.which("srun") is None:
        raise UserError(f"nnodes {nnodes} trains across the nodes of a SLURM allocation: run it inside one (sbatch "
                        f"or salloc asking for {nnodes} nodes or tasks), where srun starts torchrun on each",
                        setting="nnodes")
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")],
                           capture_output=True, text=True).stdout.split() or ["localhost"]
    endpoint = f"{nodes[0]}:{29400 + int(job) % 1000}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id=localitylab-{job}",
                "--module", "localitylab.train.worker", str(config_file)]
    placement = ["--nodes", str(nnodes), "--ntasks-per-node=1"] if len(nodes) >= nnodes else []
    srun = ["srun", f"--ntasks={nnodes}", *placement, "--kill-on-bad-exit=1", "--unbuffered"]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", os.environ.get(
        "SLURM_CPUS_PER_TASK", "1"))}
    code = subprocess.run(srun + torchrun, env=environment).returncode
    if code != 0:
        raise UserError(f"training on {nnodes} nodes failed (srun exit {code}); the ranks' messages are above. "
                        f"Re-run: {shlex.join(srun + torchrun)}")


def is_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def print_main(text: str) -> None:
    """Print once, from rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stdout)
