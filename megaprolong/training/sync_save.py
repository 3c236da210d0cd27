"""megatron-core's torch_dist checkpoint format written by torch DCP's synchronous writer, in bounded memory.

megatron-core's own synchronous save runs its background-save path in the foreground: it first stages a
copy of every tensor the rank writes (so that training could go on while a worker writes them), which adds
the rank's whole checkpoint shard to its peak memory. torch DCP's ``FileSystemWriter`` resolves each tensor
as it writes it, but it keeps every tensor of a file referenced until the file is closed, and a tensor that
views a larger storage (a weight in DDP's contiguous buffer, a distributed-optimizer shard) is first
cloned, because ``torch.save`` of a view writes its whole storage. So here:

- a CPU tensor is handed to the writer as a zero-copy tensor whose storage is exactly its own bytes (no
  clone at all; a GPU tensor's host copy is already exactly its size);
- a rank writes files of at most ``max_file_bytes`` each, one after the other, so at most one file's host
  copies (GPU) are held at a time;
- every file is written through a :class:`~megaprolong.training.manifest.HashingStream`, so its digest is
  known when it is closed, without reading it back.

The files and metadata are megatron's (its planner), and ``dist_checkpointing.load`` reads them as any
torch_dist checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import queue
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                               _replace_state_dict_keys_with_sharded_keys,
                                                               mcore_to_pyt_state_dict)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType

from megaprolong.training.manifest import SIDECAR, HashingStream

MAX_FILE_BYTES = 1 << 30


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (CPU, contiguous) as a tensor sharing its memory whose storage holds exactly its bytes."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return tensor
    as_bytes = tensor.detach().reshape(-1).view(torch.uint8).numpy()  # numpy has no bfloat16: go through bytes
    return torch.from_numpy(as_bytes).view(tensor.dtype).view(tensor.shape)


class ExactStoragePlanner(MCoreSavePlanner):
    """megatron's save planner, resolving each tensor to :func:`exact_storage` of it."""

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        return data if write_item.type == WriteItemType.BYTE_IO else exact_storage(data)


class HashingFileSystem(FileSystem):
    """DCP's local file system, with every file opened for writing digested as it is written."""

    def __init__(self, rank: int | None):
        super().__init__()
        self.rank = rank

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with HashingStream(path, self.rank) as stream:
            yield stream

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        sidecar = Path(f"{path}{SIDECAR}")
        if sidecar.exists():  # the digest follows its file (DCP writes .metadata.tmp, then renames it)
            os.replace(sidecar, f"{new_path}{SIDECAR}")


class _BoundedFilesWriter(FileSystemWriter):
    """DCP's one-thread file writer, writing a rank's items into files of at most ``max_file_bytes``."""

    def __init__(self, path: str, max_file_bytes: int):
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self.max_file_bytes = max_file_bytes
        self.fs = HashingFileSystem(dist.get_rank() if dist.is_initialized() else None)

    def write_data(self, plan, planner):
        files, current, size = [], [], 0
        for item in plan.items:  # in plan order; BYTE_IO items (small objects) count as empty
            nbytes = 0 if item.tensor_data is None else (
                item.tensor_data.size.numel() * torch._utils._element_size(item.tensor_data.properties.dtype))
            if current and size + nbytes > self.max_file_bytes:
                files.append(current)
                current, size = [], 0
            current.append(item)
            size += nbytes
        files.append(current)
        file_queue: queue.Queue = queue.Queue()
        for i, items in enumerate(files):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            file_queue.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, file_queue)


class SynchronousSave(TorchDistSaveShardedStrategy):
    """Pass as ``dist_checkpointing.save(..., sharded_strategy=SynchronousSave())``."""

    def __init__(self, max_file_bytes: int = MAX_FILE_BYTES):
        super().__init__()
        self.max_file_bytes = max_file_bytes

    def planner_settings(self) -> dict:
        """megatron's torch_dist planner settings (as its own save uses them)."""
        return dict(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False,
                    flatten_sharded_tensors=False)

    def planner(self) -> MCoreSavePlanner:
        """The save planner; a subclass may resolve tensors differently (``resolve_data``)."""
        return ExactStoragePlanner(**self.planner_settings())

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        dcp_save(mcore_to_pyt_state_dict(state, False), planner=self.planner(),
                 storage_writer=_BoundedFilesWriter(str(checkpoint_dir), self.max_file_bytes))
