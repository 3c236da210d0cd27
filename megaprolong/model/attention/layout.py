"""What attention needs about one packed (THD) micro-batch, computed once per micro-batch on the host.

Under context parallelism every rank holds two zigzag chunks of every document (padded to a multiple of
``2 * cp``, cut into ``2 * cp`` chunks of ``c`` tokens; rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r``, see :mod:`megaprolong.model.context_parallel`). A local query chunk ``j`` of a
document sees that document's keys ``0 .. (j + 1) * c - 1``: a contiguous prefix that ends at the
chunk's own last position. So a rank's attention is one *varlen* call: query segments (the local
chunks) against key segments (each chunk's document prefix, concatenated), with the causal mask aligned
bottom-right (query ``i`` of a segment of ``n`` queries and ``m`` keys sees keys up to ``m - n + i``).
Without context parallelism the segments are simply the documents.

The K/V all-gathered over the CP group arrive rank-major (rank 0's local rows, then rank 1's, ...);
``kv_index`` picks, in one ``index_select``, the rows that form the concatenated prefixes. Keys are
duplicated only where two segments of a document overlap: ``(2 cp + 1) / (2 cp)`` times the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megaprolong.model.context_parallel import LocalPacked, concat_ranges, rank_major_row, zigzag_chunks


@dataclass
class AttentionLayout:
    """This rank's attention as one varlen problem (host arrays and their device copies)."""

    cu_q: np.ndarray  # int64 [S + 1]: query segments in the local rows
    cu_k: np.ndarray  # int64 [S + 1]: key segments in the concatenated keys
    kv_index: torch.Tensor | None  # rows of the gathered K/V that form the concatenated keys (None: CP=1)
    cu_q_device: torch.Tensor  # int32, on the device (GPU kernels take them there)
    cu_k_device: torch.Tensor
    max_q: int
    max_k: int

    @classmethod
    def build(cls, cu_seqlens_padded: np.ndarray, cp: int, rank: int, device: torch.device) -> "AttentionLayout":
        starts, lengths, doc_start = zigzag_chunks(cu_seqlens_padded, cp, rank)
        prefix = starts + lengths - doc_start  # keys seen by each chunk: its document up to its end
        cu_q = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cu_k = np.concatenate([[0], np.cumsum(prefix)]).astype(np.int64)
        kv_index = None
        if cp > 1:
            rows = rank_major_row(cu_seqlens_padded, cp)[concat_ranges(doc_start, prefix)]
            kv_index = torch.from_numpy(rows).to(device)
        as_device = lambda a: torch.from_numpy(a.astype(np.int32)).to(device)  # noqa: E731
        return cls(cu_q=cu_q, cu_k=cu_k, kv_index=kv_index, cu_q_device=as_device(cu_q), cu_k_device=as_device(cu_k),
                   max_q=int(lengths.max(initial=0)), max_k=int(prefix.max(initial=0)))


@dataclass
class PackedBatch(PackedSeqParams):
    """megatron-core's THD parameters plus what our attention computes once per micro-batch instead of
    once per layer: the varlen layout, and RoPE's frequencies at every local token's position (megatron's
    own THD RoPE loops over documents with host syncs, for q and k, in every layer)."""

    layout: AttentionLayout | None = None
    rope_freqs: torch.Tensor | None = None  # [t, 1, 1, rotary dim], fp32: megatron's table at position_ids


def packed_batch(local: LocalPacked, device: torch.device, cp: int, cp_rank: int, rotary=None) -> PackedSeqParams:
    """The THD parameters of a micro-batch. With ``rotary`` (the model's megatron ``RotaryEmbedding``)
    also our layout and the per-token RoPE frequencies (our attention backend); without, megatron-core's
    plain ``PackedSeqParams`` (TransformerEngine's backend, which applies megatron's fused RoPE)."""
    cu = torch.from_numpy(local.cu_seqlens).to(device=device, dtype=torch.int32)
    cu_padded = torch.from_numpy(local.cu_seqlens_padded).to(device=device, dtype=torch.int32)
    # max_seqlen is the largest padded document, never the whole pack: megatron's RoPE would switch to
    # positions over the whole pack if it were equal to it
    common = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                  cu_seqlens_kv_padded=cu_padded, max_seqlen_q=local.max_seqlen, max_seqlen_kv=local.max_seqlen)
    if rotary is None:
        return PackedSeqParams(**common)
    positions = torch.from_numpy(local.position_ids).to(device)
    # [t, 1, 1, d]: rows of the model's one RoPE table (runtime.mcore_fixes.rotary_with_one_table), the
    # table megatron's THD RoPE slices; nothing of the table's size is made per micro-batch
    table = rotary.one_table() if hasattr(rotary, "one_table") else rotary.get_emb(local.max_seqlen)
    freqs = table[positions]
    return PackedBatch(**common, layout=AttentionLayout.build(local.cu_seqlens_padded, cp, cp_rank, device),
                       rope_freqs=freqs)
