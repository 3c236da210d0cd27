"""megatron-core distributed checkpoints written and read a few tensors at a time.

Conversion must not hold the model in memory (an 8B model is 32 GB in fp32; CPU nodes often have 64 GiB). The
model itself is built on the meta device: its sharded state dict gives every tensor's checkpoint key, global
shape and offset (layers stacked, SwiGLU's ``[gate; up]`` split by megatron's own factory) without memory.

- Writing: megatron-core's own ``dist_checkpointing.save`` with its torch_dist format, through the
  synchronous writer of :mod:`megaprolong.training.sync_save` (which resolves each tensor as it writes it),
  with one difference: :class:`_ProducingPlanner` computes each tensor then (``produce``), from the HF
  tensors it is made of, and it is freed after being written.
- Reading: ``dist_checkpointing.load`` of a sub-dict (one layer's tensors), which reads just those chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from megaprolong.training.sync_save import ExactStoragePlanner, SynchronousSave, exact_storage

# (checkpoint key, global offset) -> (model tensor name, and where the chunk lies in it: size, stride, offset)
_Chunks = dict[tuple[str, tuple[int, ...]], tuple[str, torch.Size, tuple[int, ...], int]]


def _sharded_tensors(value) -> Iterable[ShardedTensor]:
    values = nested_values(value) if isinstance(value, (dict, list)) else [value]
    return (v for v in values if isinstance(v, ShardedTensor))


def save_produced(model: torch.nn.Module, produce: Callable[[str], torch.Tensor], checkpoint_dir: Path) -> None:
    """Save ``model`` (on the meta device) as a megatron-core distributed checkpoint whose tensor ``name``
    is ``produce(name)``, called once per tensor while it is written."""
    state = model.sharded_state_dict()
    apply_factories(state)  # the chunks as saved (e.g. gate and up of linear_fc1), views of the meta tensors
    chunks: _Chunks = {}
    for name, value in state.items():
        for sh in _sharded_tensors(value):
            chunks[sh.key, tuple(sh.global_offset)] = (name, sh.data.shape, sh.data.stride(),
                                                       sh.data.storage_offset())
    dist_checkpointing.save(state, str(checkpoint_dir), sharded_strategy=_ProducingSave(chunks, produce))


class _ProducingSave(SynchronousSave):
    """The synchronous torch_dist save with tensors produced on demand."""

    def __init__(self, chunks: _Chunks, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self.chunks, self.produce = chunks, produce

    def planner(self) -> MCoreSavePlanner:
        return _ProducingPlanner(self.chunks, self.produce, **self.planner_settings())


class _ProducingPlanner(ExactStoragePlanner):
    def __init__(self, chunks: _Chunks, produce: Callable[[str], torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        self.chunks, self.produce = chunks, produce
        self._last: tuple[str, torch.Tensor] | None = None  # linear_fc1's two chunks are written one after the other

    def resolve_data(self, write_item):
        placeholder = super().resolve_data(write_item)  # a meta tensor: the model is on the meta device
        if write_item.type == WriteItemType.BYTE_IO:
            return placeholder
        name, size, stride, offset = self.chunks[write_item.index.fqn, tuple(write_item.index.offset)]
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous tensor before producing the next
            self._last = (name, self.produce(name).to(placeholder.dtype).contiguous())
        tensor = self._last[1]
        if tensor.shape != size:
            tensor = tensor.as_strided(size, stride, offset)
        return exact_storage(tensor.view(placeholder.shape))  # megatron's layout: a leading axis of 1 for the layer stack


class TensorReader:
    """Tensors of a saved model by name, read from the checkpoint a group (a layer) at a time."""

    def __init__(self, model: torch.nn.Module, checkpoint_dir: Path):
        """``model`` on the meta device, in the dtype to read into (loading casts the saved tensors)."""
        self.state = {k: v for k, v in model.sharded_state_dict().items()
                      if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
        self.checkpoint_dir = checkpoint_dir
        self._group: tuple[str, dict[str, torch.Tensor]] | None = None

    def nbytes(self, name: str) -> int:
        return self.state[name].data.nbytes

    @staticmethod
    def _group_of(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:3]) if name.startswith("decoder.layers.") else name

    def get(self, name: str) -> torch.Tensor:
        group = self._group_of(name)
        if self._group is None or self._group[0] != group:
            self._group = None  # free the previous group first
            tensors = {k: torch.empty_like(v.data, device="cpu") for k, v in self.state.items()
                       if self._group_of(k) == group}
            wanted = {k: dataclasses.replace(self.state[k], data=t) for k, t in tensors.items()}
            apply_factories(wanted)  # the chunks as saved, views of ``tensors``: loading fills them
            dict_list_map_inplace(lambda x: _unstacked(x) if isinstance(x, ShardedTensor) else x, wanted)
            # a subset on purpose: the integrity check would ask for every chunk of the stacked layer tensors
            dist_checkpointing.load(wanted, str(self.checkpoint_dir), validate_access_integrity=False)
            self._group = (group, tensors)
        return self._group[1][name]


def _unstacked(sh: ShardedTensor) -> ShardedTensor:
    """The same chunk with megatron's prepended axes (the layer stack) made explicit: megatron then reads it
    through DCP's chunk API, which loads any subset; its older path wants all of a rank's chunks at once."""
    shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return dataclasses.replace(sh, data=sh.data.view(shape), local_shape=shape, prepend_axis_num=0)
