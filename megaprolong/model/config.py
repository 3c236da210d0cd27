"""The model architecture as a plain dataclass (no megatron import: configs load without it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Architecture of a Llama-3 model; defaults are Llama-3-8B (REFERENCE.md section 1)."""

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    num_attention_heads: int = 32
    num_query_groups: int = 8
    vocab_size: int = 128256
    rope_base: float = 500000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    init_std: float = 0.02
    # Embedding and output rows are padded to a multiple of this (tensor parallelism splits the vocabulary):
    # the padded logits are masked out of the softmax, and the padded rows are stripped on export to HF.
    vocab_multiple: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
