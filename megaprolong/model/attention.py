"""Document-masked causal attention for packed (THD) sequences, correct under context parallelism.

megatron-core's local ``DotProductAttention`` supports neither packed sequences nor context parallelism,
and TransformerEngine (which does) exists only on GPUs. This module is the ``core_attention`` of our
local layer spec: exact, and used on CPU and on GPUs without TE.

Under context parallelism every rank holds two zigzag chunks of every document
(:mod:`megaprolong.model.context_parallel`). Keys and values are all-gathered over the CP group (the
Llama-3 approach: K/V are small with GQA) and put back in global order; each local query chunk then
attends to its document's keys up to its own position. No token sees another document, and no
sequence-by-sequence mask is ever built: masks are per document chunk.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megaprolong.model.context_parallel import partition_index

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # optional (the gpu extra); CPU runs never have it
    flash_attn_varlen_func = None


def _chunks(cu_padded: np.ndarray, cp: int, rank: int):
    """For each local query chunk: (local row start, global start, document start, length)."""
    out, row = [], 0
    for s, e in zip(cu_padded[:-1].tolist(), cu_padded[1:].tolist()):
        if cp == 1:
            out.append((row, s, s, e - s))
            row += e - s
            continue
        c = (e - s) // (2 * cp)
        for k in (rank, 2 * cp - 1 - rank):
            out.append((row, s + k * c, s, c))
            row += c
    return out


def _expand_kv(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """GQA: repeat each KV head for its query heads. (SDPA's enable_gqa would skip this copy but sends
    the GPU to its O(L^2)-memory math kernel; the copy keeps the flash / memory-efficient kernels.)"""
    groups = x.shape[dim]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=dim)


class DocumentMaskedAttention(MegatronModule):
    """Exact causal attention within each document of a packed sequence (any CP size, GQA)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = pg_collection.cp
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is None:  # plain [s, b, h, d] causal batch: each row one document
            if self.cp_group.size() > 1:
                raise ValueError("context parallelism needs packed (THD) input with PackedSeqParams")
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
            k, v = _expand_kv(k, q.shape[1], dim=1), _expand_kv(v, q.shape[1], dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            s, b = query.shape[0], query.shape[1]
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)
        return self._packed(query, key, value, packed_seq_params)

    def _packed(self, q, k, v, params):
        """q [t, h, d], k/v [t, kv, d] (this rank's zigzag share) -> [t, h * d]."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        cu_padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_np = cu_padded.cpu().numpy()
        if cp > 1:  # all-gather K/V (backward: reduce-scatter), then restore global order
            k_all = gather_from_sequence_parallel_region(k, tensor_parallel_output_grad=True, group=self.cp_group)
            v_all = gather_from_sequence_parallel_region(v, tensor_parallel_output_grad=True, group=self.cp_group)
            where = np.concatenate([partition_index(cu_np, cp, r) for r in range(cp)])
            order = torch.from_numpy(np.argsort(where, kind="stable")).to(k.device)
            k, v = k_all.index_select(0, order), v_all.index_select(0, order)
        chunks = _chunks(cu_np, cp, rank)
        if flash_attn_varlen_func is not None and q.is_cuda:
            return self._flash(q, k, v, chunks)
        k, v = _expand_kv(k, q.shape[1], dim=1), _expand_kv(v, q.shape[1], dim=1)
        out = torch.empty_like(q)
        for row, start, doc_start, n in chunks:
            # [1, h, n, d]: the fused (flash / memory-efficient) SDPA kernels take 4-D inputs only
            qc = q[row:row + n].transpose(0, 1)[None]
            kc = k[doc_start:start + n].transpose(0, 1)[None]  # the document's keys up to this chunk's end
            vc = v[doc_start:start + n].transpose(0, 1)[None]
            offset = start - doc_start
            if offset == 0:
                o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=self.scale)
            else:  # queries at offset+i see keys 0..offset+i
                mask = torch.arange(offset + n, device=q.device)[None, :] <= (
                    offset + torch.arange(n, device=q.device))[:, None]
                o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=self.scale)
            out[row:row + n] = o[0].transpose(0, 1)
        return out.reshape(out.shape[0], -1)

    def _flash(self, q, k, v, chunks):
        """flash-attn varlen over the same chunks; causal masks align bottom-right (query i of a chunk of
        n sees keys up to prefix_len - n + i), which is exactly 'up to my own position'."""
        dev = q.device
        prefixes = [(start - doc_start + n, doc_start) for _, start, doc_start, n in chunks]
        k_cat = torch.cat([k[d:d + p] for p, d in prefixes])
        v_cat = torch.cat([v[d:d + p] for p, d in prefixes])
        cu_q = torch.tensor(np.concatenate([[0], np.cumsum([n for *_, n in chunks])]), dtype=torch.int32, device=dev)
        cu_k = torch.tensor(np.concatenate([[0], np.cumsum([p for p, _ in prefixes])]), dtype=torch.int32, device=dev)
        out = flash_attn_varlen_func(q, k_cat, v_cat, cu_q, cu_k, max(n for *_, n in chunks),
                                     max(p for p, _ in prefixes), softmax_scale=self.scale, causal=True)
        return out.reshape(out.shape[0], -1)
