"""Many processes, one run: PyTorch DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node N -m medsight train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; medsight
then joins the process group (NCCL on GPUs, Gloo on CPU), wraps the model in DDP and shards the
training set with a DistributedSampler. ``train.batch_size`` is per process: the global batch is
batch_size × accum_steps × world size. Only rank 0 writes the run folder. Multi-node runs use torchrun's
usual ``--nnodes``/``--rdzv-*`` flags.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from medsight.utils.device import resolve_device

__all__ = ["DistInfo", "init_distributed", "shutdown", "check_replicas", "broadcast_flag", "ReplicaMismatch"]


class ReplicaMismatch(RuntimeError):
    """The model replicas on different ranks no longer hold the same weights."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str, timeout_s: float = 600.0) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns (info, this process's device).

    ``timeout_s`` bounds every collective: when a rank dies, the others fail with an error after at most
    this long instead of waiting forever (torchrun's agent also stops the remaining workers).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if use_cuda else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision for everyone (early stopping must end every rank at the same epoch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


@torch.no_grad()
def check_replicas(model: nn.Module, device: torch.device) -> None:
    """Raise :class:`ReplicaMismatch` unless every rank holds bit-identical parameters.

    Compares two float64 fingerprints of the flattened parameters (their sum and a position-weighted
    sum) across ranks: cheap enough to run every epoch.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    mine = torch.stack([flat.sum(), (flat * weights).sum()]).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise ReplicaMismatch("model replicas diverged across ranks: "
                              + ", ".join(f"rank {i} {g.tolist()}" for i, g in enumerate(gathered)))
