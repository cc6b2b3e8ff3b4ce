"""One process or many under `torchrun`: the process group, the device, and reductions.

`torchrun` (or a Kubeflow PyTorchJob / TrainJob) sets RANK, WORLD_SIZE and LOCAL_RANK; without
them this is a single process and every helper degrades to a no-op, so the training loop has one
code path. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws progress bars, writes outputs and talks to MLflow."""
        return self.rank == 0


def init(timeout_s: float = 1800.0) -> Context:
    """Join the process group described by the torchrun environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    return Context(rank, world_size, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, and return it (unchanged in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each named scalar over all ranks (one collective for the whole dict)."""
    if not values:
        return {}
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    all_reduce_sum(t)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world for k, v in zip(names, t.tolist())}


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (e.g. the checkpoint chosen for resuming)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
