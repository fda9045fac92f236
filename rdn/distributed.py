"""Where this training process runs: its torchrun rank, its device, its share of the cores.

``rdn-train`` runs as one process, or as one rank of a ``torchrun`` job that trains with
DistributedDataParallel; everything that depends on which (the device, the threads, the
process group, the check that all ranks end with the same weights) is here.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rdn.model import batchnorm_frozen

DDP_TIMEOUT_MIN = 60  # minutes a collective may wait (NCCL's default 10 would cut validation)


class DeviceError(ValueError):
    """The requested device is not available here (a usage error)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    env = os.environ
    return Dist(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def init_process_group(ctx: Dist, device: str) -> None:
    """Join the torchrun job: NCCL on GPUs, gloo on CPUs; rank 0 may validate a while."""
    if not ctx.enabled:
        return
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=DDP_TIMEOUT_MIN))


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(requested: str, ctx: Dist) -> torch.device:
    """The device for ``--device`` (auto, cpu or cuda); a rank takes its local GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: CUDA is not available here; use --device cpu or auto")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_rank(ctx: Dist) -> int:
    """Cores / world size, so ranks do not oversubscribe the CPU.

    A single process honours an explicit OMP_NUM_THREADS; under torchrun, which sets it to 1
    for every rank, the cores are shared out instead.
    """
    if ctx.world_size == 1 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, cpu_count() // ctx.world_size)


def state_sha256(model: nn.Module) -> str:
    """Hash of the weights, to check that DDP ranks hold identical models.

    Buffers count once BatchNorm is frozen; before that each rank's running statistics have
    legitimately absorbed its own last batch (DDP broadcasts rank 0's before every forward).
    """
    tensors = model.state_dict() if batchnorm_frozen(model) else dict(model.named_parameters())
    h = hashlib.sha256()
    for name, tensor in tensors.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def same_weights_on_all_ranks(model: nn.Module, ctx: Dist) -> tuple[bool, list[str | None]]:
    """(whether every rank's weights hash alike, the hashes by rank)."""
    if not ctx.enabled:
        return True, [state_sha256(model)]
    hashes: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(hashes, state_sha256(model))
    return len(set(hashes)) == 1, hashes
