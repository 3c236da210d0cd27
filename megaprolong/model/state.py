"""Full (unsharded) tensors of a model distributed over tensor and pipeline parallel ranks.

The same names and shapes whatever the layout, so a 1-rank model and a TP2xPP2 model can be compared
tensor by tensor, and full weights can be loaded into any layout:

- names are megatron-core's GPTModel names with global layer numbers (``decoder.layers.{i}.…``);
- tensor-parallel shards are joined along their ``partition_dim``; ``linear_fc1`` (SwiGLU) holds
  ``[gate_r; up_r]`` on each TP rank, so its shards are regrouped into ``[gate; up]``;
- the fused QKV weight is per query group ``[q.., k, v]``, and TP ranks hold whole groups, so plain
  concatenation already gives the 1-rank layout;
- with tied embeddings under pipeline parallelism the last stage holds a copy of the embedding as
  ``output_layer.weight`` (megatron keeps the two equal: their gradients are summed over the embedding
  group): it goes by the embedding's name, as on one rank, where there is no output weight at all.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # DDP, Float16Module
        chunk = chunk.module
    return chunk


def _global_names(chunk: torch.nn.Module):
    """(global name, parameter) for one model chunk; layer indices made global."""
    model = unwrap_model(chunk)
    offset = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
        yield ("embedding.word_embeddings.weight" if tied and name == "output_layer.weight" else name), param


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def _join_tp(name: str, param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return shard
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    if _is_gated_fc1(name):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat(gates + ups, dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def gather_full(model_chunks: list[torch.nn.Module], grads: bool = False) -> dict[str, torch.Tensor]:
    """All full parameters (or their gradients, ``main_grad`` under megatron DDP), on every rank, fp32 CPU.

    Collective: every rank of the world must call it. Gradients are only meaningful after the
    data-parallel reduction (and, with a distributed optimizer, only after an all-reduce, not a
    reduce-scatter).
    """
    local = {}
    for chunk in model_chunks:
        for name, param in _global_names(chunk):
            value = param
            if grads:
                value = getattr(param, "main_grad", None)
                if value is None:
                    value = param.grad if param.grad is not None else torch.zeros_like(param)
            local[name] = _join_tp(name, param, value.detach()).float().cpu()
    # One copy per pipeline stage is enough: tensor and data parallel peers hold the same full tensors.
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local if keep else {})
    full = {}
    for part in everything:
        full.update(part)
    return full


def load_full(model_chunks: list[torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (as :func:`gather_full` returns them) into this rank's shards, in place."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for chunk in model_chunks:
        for name, param in _global_names(chunk):
            if name not in state:
                raise KeyError(f"full state has no tensor {name}")
            full = state[name]
            if tp > 1 and getattr(param, "tensor_model_parallel", False):
                if _is_gated_fc1(name):
                    gate, up = full.chunk(2, dim=0)
                    full = torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
                else:
                    full = full.chunk(tp, dim=param.partition_dim)[rank]
            if full.shape != param.shape:
                raise ValueError(f"{name}: full tensor gives shard {tuple(full.shape)}, parameter is {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(full)
