"""Workarounds for megatron-core behaviours that hurt long runs, in one place, each with the version it
was found in (remove one when the pinned megatron-core no longer needs it)."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys
from multiprocessing.managers import SyncManager

_managers: list[SyncManager] = []  # kept alive: a collected manager shuts its process down


def _die_with_parent() -> None:
    """In a child process: receive SIGKILL when the parent dies, however it dies (Linux prctl)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def checkpoint_results_queue_dies_with_worker() -> None:
    """megatron-core 0.19.2: ``dist_checkpointing.strategies.filesystem_async.get_write_results_queue``
    starts a ``spawn`` multiprocessing Manager on the first save, a server process that re-imports the
    training entry point (~0.6 GB) and outlives its worker when the worker is killed (SIGKILL, an OOM, a
    GPU error), orphaned, holding memory (and on GPUs a CUDA context). Give megatron that queue from a
    Manager whose process dies with the worker."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    _managers.append(manager)
    filesystem_async._results_queue = manager.Queue()


def async_writer_hashes_what_it_writes() -> None:
    """megatron-core 0.19.2: the background checkpoint writer (``FileSystemWriterAsync.
    write_preloaded_data``) opens its files with the builtin ``open`` and offers no hook for the stream.
    Give that module an ``open`` that, for binary writes, returns our digesting stream, so that asynchronous
    saves are recorded with full-content digests computed while writing, as synchronous ones are."""
    import builtins

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megaprolong.training.manifest import HashingStream

    rank = dist.get_rank() if dist.is_initialized() else None

    def open_hashed(file, mode="r", *args, **kwargs):
        if mode == "wb" and not args and not kwargs:
            return HashingStream(file, rank)
        return builtins.open(file, mode, *args, **kwargs)

    filesystem_async.open = open_hashed


def rotary_with_one_table(rotary, max_len: int) -> None:
    """megatron-core 0.19.2: ``RotaryEmbedding.forward`` is an ``lru_cache(maxsize=32)`` keyed by the length
    asked for. Packed batches ask for their largest padded document, a new length almost every micro-batch,
    so up to 32 tables stay alive (at 512K and head dim 128, 256 MiB each, on the GPU). Give the model one
    table, at the stage's maximum length, computed once (``rotary.one_table()``): packed requests get a view
    of its first rows (the same numbers: RoPE's table at position p does not depend on the length)."""
    table: dict = {}

    def one_table():
        if "emb" not in table:
            table["emb"] = rotary.get_emb(max_len)
        return table["emb"]

    cached = rotary.forward

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        if packed_seq and offset == 0 and max_seq_len <= max_len:
            return one_table()[:max_seq_len]
        return cached(max_seq_len, offset, packed_seq, cp_group)

    rotary.forward = forward
    rotary.one_table = one_table
