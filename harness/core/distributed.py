"""The one module that knows about launch environments: plain python, torchrun, and SLURM/submitit.

Important: the device of a process is its LOCAL rank. The public DiT code uses the global rank as the
device id, which crashes on a second node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun variables, else SLURM task variables, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world size {world})")
    return rank, world, local


def _from_env() -> tuple[int, int, int]:
    """launch_env(), with the rendezvous variables exported first inside a multi-task SLURM job."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit  # submitit knows the job's first node and a free port for MASTER_ADDR/PORT

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return launch_env()


def cuda_available() -> bool:
    """Returns whether torch sees a CUDA device here (what device=auto picks)."""
    return torch.cuda.is_available()


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device (allowed: auto, cpu, cuda)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init(device: str = "auto") -> DistEnv:
    """Join the process group when there is more than one process; gloo on the CPU, nccl on GPUs."""
    rank, world_size, local_rank = _from_env()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_main_process() -> bool:
    """True on rank 0 (or outside distributed runs); safe to call before init()."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return launch_env()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True when it is True on any rank: one small all-reduce, a host sync (call it sparingly)."""
    if not dist.is_initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
