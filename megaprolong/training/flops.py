"""Model FLOPs of a training step on packed sequences, attention counted per document.

With document masking, a sequence of documents of lengths L_i costs sum(L_i^2) in attention, not S^2:
crediting the full S^2 would overstate long-context throughput several-fold. Counted as model FLOPs
(forward + backward = 3 x forward, activation recomputation not counted), matmuls only.
"""

from __future__ import annotations

import numpy as np

from megaprolong.model.config import ModelConfig


def forward_flops(model: ModelConfig, doc_lengths: np.ndarray) -> float:
    """Forward FLOPs of one packed sequence whose documents have ``doc_lengths`` tokens."""
    lengths = np.asarray(doc_lengths, dtype=np.float64)
    tokens = lengths.sum()
    h, d = model.hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d  # q is h unless kv_channels is set
    per_token_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 3 * h * model.ffn_hidden_size  # qkv, proj, SwiGLU
    # causal attention inside each document: QK^T and AV over L(L+1)/2 pairs, all heads
    attention_layer = 2 * 2 * model.num_attention_heads * d * float(np.sum(lengths * (lengths + 1) / 2))
    logits = 2 * h * model.vocab_size * tokens
    return model.num_layers * (per_token_layer * tokens + attention_layer) + logits


def train_step_flops(model: ModelConfig, samples_doc_lengths: list[np.ndarray]) -> float:
    return 3.0 * sum(forward_flops(model, lengths) for lengths in samples_doc_lengths)


# Dense bf16 tensor-core peaks (TFLOPS per GPU, no sparsity), from the vendors' data sheets: what MFU is
# measured against. Matched on torch.cuda.get_device_name(); a GPU not listed gets no MFU.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "B200": 2250.0, "B100": 1750.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.1, "A10G": 70.0}


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """The GPU's dense peak for the run's precision, when known (bf16 only: fp32 runs get no MFU)."""
    if not device_name or precision != "bf16":
        return None
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):  # GH200 before H200
        if key in device_name:
            return BF16_PEAK_TFLOPS[key]
    return None
