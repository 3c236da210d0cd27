"""Device selection and process-group start-up, in one place.

On a GPU machine: NCCL and ``cuda:LOCAL_RANK``. Without CUDA: gloo, the CPU, and megatron-core's CUDA
assumptions patched by :mod:`megaprolong.runtime.cpu_compat`. Everything else in megaprolong asks
:func:`device` instead of naming a device.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from megaprolong.runtime import cpu_compat


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from the launcher's environment (torchrun or srun), or as a 1-rank world.

    Long context-parallel steps can keep a collective waiting for minutes: the timeout is configurable.
    """
    if not has_cuda():
        cpu_compat.apply()
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError("MASTER_PORT is not set: launch with torchrun, or srun with MASTER_ADDR/PORT exported")
        os.environ["MASTER_PORT"] = str(_free_port())
    if has_cuda():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        torch.cuda.set_device(local_rank)
    init_process_group_per_attempt("nccl" if has_cuda() else "gloo", rank, world,
                                   datetime.timedelta(minutes=timeout_minutes))


def init_process_group_per_attempt(backend: str, rank: int, world: int, timeout: datetime.timedelta) -> None:
    """``init_process_group`` from the launcher's environment, its store keys private to this attempt:
    torchrun's c10d rendezvous store outlives a restart of the workers, and without a prefix the restarted
    ranks read the dead ranks' addresses (gloo: "connectFullMesh failed ... Connection refused")."""
    store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"megaprolong/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def peak_memory_bytes() -> int:
    """This process's peak memory so far: CUDA's max allocated on a GPU, else the peak resident set."""
    if has_cuda():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def set_collective_timeout(minutes: float) -> None:
    """The timeout of every process group this process belongs to (the default one and megatron's), from
    now on: a collective waiting longer fails (NCCL dumps its flight record first when asked to)."""
    timeout = datetime.timedelta(minutes=minutes)
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.12
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not None and not dist.distributed_c10d._rank_not_in_group(group):
            set_timeout(timeout, group)


@contextlib.contextmanager
def local_rank_zero_first():
    """Run the body on each node's local rank 0 first, then on the node's other ranks (e.g. building an
    on-disk cache once per node, then reading it). Every rank of the world must enter it."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        dist.barrier()
    yield
    if first:
        dist.barrier()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
