"""The ``core_attention`` of our layer spec: document-masked causal attention on packed (THD) sequences,
exact under context parallelism, in memory linear in the sequence length.

Keys and values are all-gathered over the CP group (the Llama-3 approach: with GQA they are small; the
backward of the gather reduce-scatters their gradients), then the rank's queries (its zigzag share, so
~1/CP of the causal work) attend to their documents' prefixes in one varlen kernel call
(:mod:`megaprolong.model.attention.kernels`). No token sees another document.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.attention import SelfAttention as McoreSelfAttention
from megatron.core.transformer.module import MegatronModule

from megaprolong.model.attention.kernels import expand_kv, select_kernel
from megaprolong.model.attention.layout import AttentionLayout, PackedBatch


class SelfAttention(McoreSelfAttention):
    """megatron-core's self-attention, except that on a :class:`PackedBatch` RoPE is left to the core
    attention, which applies it with the micro-batch's per-token frequencies (the same numbers as
    megatron's THD RoPE, without its per-document loop and host syncs in every layer)."""

    def forward(self, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if isinstance(packed_seq_params, PackedBatch) and packed_seq_params.rope_freqs is not None:
            rotary_pos_emb = None
        return super().forward(*args, rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params, **kwargs)


class DocumentMaskedAttention(MegatronModule):
    """Exact causal attention within each document of a packed sequence (any CP size, GQA)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, kernel: str = "auto"):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = pg_collection.cp
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.kernel_name = kernel

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is None:  # plain [s, b, h, d] causal batch: each row one document
            if self.cp_group.size() > 1:
                raise ValueError("context parallelism needs packed (THD) input with PackedSeqParams")
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
            k, v = expand_kv(k, q.shape[1], dim=1), expand_kv(v, q.shape[1], dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            s, b = query.shape[0], query.shape[1]
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)
        return self._packed(query, key, value, packed_seq_params)

    def _packed(self, q, k, v, params):
        """q [t, h, d], k/v [t, kv, d] (this rank's zigzag share) -> [t, h * d]."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        layout = getattr(params, "layout", None) or getattr(params, "_megaprolong_layout", None)
        if layout is None:  # megatron's plain PackedSeqParams (e.g. a caller of build_model): built in the first
            # layer, from the host copy of cu_seqlens (one transfer), and kept on the params for the others
            cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
            layout = AttentionLayout.build(cu.cpu().numpy(), cp, rank, q.device)
            params._megaprolong_layout = layout
        freqs = getattr(params, "rope_freqs", None)
        if freqs is not None:  # [t, 1, h, d] is megatron's sbhd layout with b = 1: per-token RoPE, no loop
            q, k = (apply_rotary_pos_emb(x.unsqueeze(1), freqs, config=self.config, cp_group=self.cp_group)
                    .squeeze(1) for x in (q, k))
        if cp > 1:
            k, v = (gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.cp_group)
                    .index_select(0, layout.kv_index) for x in (k, v))
        kernel = select_kernel(self.kernel_name, q.device.type, q.dtype)
        return kernel.run(q, k, v, layout, self.scale).reshape(q.shape[0], -1)
