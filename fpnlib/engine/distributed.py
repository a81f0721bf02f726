"""Data-parallel training across processes (Sec. 5.1: "synchronized SGD training on 8 GPUs").

``torchrun --nproc_per_node N …`` starts N processes and tells each its place through environment
variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_from_env` turns them into a process group: NCCL when the processes have GPUs, gloo
otherwise, so the same command also runs on a laptop CPU. Everything else here is a one-line
helper the trainer and the command line use; with a single process they all answer as if the
world had one member, so code written with them runs unchanged without ``torchrun``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Returns ``True`` when this process is one of several (a group exists afterwards), ``False``
    for a plain single-process run (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``). Calling it twice is
    harmless. ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"`` (CPU).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    """Whether this process trains together with others (an initialised group of size > 1)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's index in the group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes training together (1 without a group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``): which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (a no-op for a single process)."""
    if is_distributed():
        dist.barrier()


def mean_over_processes(values: dict[str, float], device: str | torch.device = "cpu") -> dict[str, float]:
    """The average of each value over the processes (the values themselves for one process).
    ``device``: where the collective runs (NCCL needs the process's GPU, gloo the CPU).

    Used for the logged losses: each process computes its losses on its part of the global
    batch, and their mean is the loss of the whole batch when every part has the same
    normaliser (see ``train``)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # sum
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def shutdown() -> None:
    """Leave the process group (at the end of a ``torchrun`` command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
