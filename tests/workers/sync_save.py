"""SynchronousSave writes megatron's torch_dist format: what it saves, dist_checkpointing.load reads back
exactly (a weight viewing a larger buffer, bf16 and fp32, a replicated tensor, an object), in files of at
most max_file_bytes; and a CPU tensor reaches the writer without a copy."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megaprolong.training.sync_save import SynchronousSave, exact_storage

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)


def state(fill: bool) -> dict:
    g = torch.Generator().manual_seed(rank)
    buffer = torch.randn(3000, generator=g) if fill else torch.zeros(3000)  # like DDP's contiguous param buffer
    half = torch.randn(64, 16, generator=g).bfloat16() if fill else torch.zeros(64, 16, dtype=torch.bfloat16)
    shared = torch.arange(100.0) if fill else torch.zeros(100)
    return {"w": ShardedTensor.from_rank_offsets("w", buffer[1000:2000].view(10, 100), (0, rank, world)),
            "h": ShardedTensor.from_rank_offsets("h", half, (1, rank, world)),
            "s": ShardedTensor.from_rank_offsets("s", shared, replica_id=rank),
            "o": ShardedObject("o", {"rank": rank} if fill else None, (world,), (rank,), replica_id=0)}


view = state(True)["w"].data
exact = exact_storage(view)
assert exact.data_ptr() == view.data_ptr() and torch.equal(exact, view), "exact_storage must not copy"
assert exact.untyped_storage().nbytes() == view.nbytes < view.untyped_storage().nbytes()
assert exact_storage(view.t()) is not None  # a non-contiguous tensor is passed through as it is

saved = state(True)
dist_checkpointing.save(saved, str(root), sharded_strategy=SynchronousSave(max_file_bytes=2500))
dist.barrier()
files = sorted(root.glob(f"__{rank}_*.distcp"))
assert len(files) >= 2, f"rank {rank}: expected the 4 KB of tensors split into files of <= 2500 B, got {files}"
loaded = dist_checkpointing.load(state(False), str(root))
for key in ("w", "h", "s"):
    assert torch.equal(loaded[key], saved[key].data), key
assert loaded["o"] == {"rank": rank}
print(f"rank {rank} ok: {len(files)} files")
