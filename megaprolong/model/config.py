"""The model architecture as a plain dataclass (no megatron import: configs load without it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ATTENTION_BACKENDS = ("auto", "torch", "te")
ATTENTION_KERNELS = ("auto", "torch-varlen", "flash-attn", "sdpa", "cpu-blockwise")


@dataclass
class ModelConfig:
    """Architecture of a dense decoder (defaults: Llama-3-8B), and which attention implementation runs it.
    The family features (:mod:`megaprolong.model.families`) are flags of the one megatron-core GPTModel."""

    num_layers: int = 32  # transformer layers
    hidden_size: int = 4096  # model width
    ffn_hidden_size: int = 14336  # SwiGLU MLP width
    num_attention_heads: int = 32  # query heads
    num_query_groups: int = 8  # key/value heads (grouped-query attention)
    vocab_size: int = 128256  # tokenizer vocabulary (rows of the embedding and LM head before padding)
    rope_base: float = 500000.0  # RoPE theta; ProLong raises it per stage (8e6 at 64K, 1.28e8 at 512K)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_position_embeddings: int = 8192  # recorded in exported configs; RoPE itself has no length limit
    init_std: float = 0.02  # std of the random initialization (a run that loads a checkpoint ignores it)
    family: str = "llama"  # llama | qwen2 | qwen3: the HF architecture exported (megaprolong.model.families)
    # per-head width; None: hidden_size / num_attention_heads (set where they differ: Qwen3-0.6B, 128 vs 1024/16)
    kv_channels: int | None = None
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2 / Qwen2.5)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    tie_embeddings: bool = False  # one matrix for the input embedding and the output layer (Llama-3.2 1B/3B, small Qwen)
    # RoPE policy: none = plain RoPE at rope_base (ProLong's choice: replace a base model's scaling by a larger
    # base); llama3 = keep Llama-3.1's frequency scaling (factor below; low/high frequency factors 1 and 4
    # over an original context of 8192, the only values megatron-core computes)
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0  # Llama-3.1 / 3.3: 8; Llama-3.2: 32
    # Embedding and output rows are padded to a multiple of this (tensor parallelism splits the vocabulary):
    # the padded logits are masked out of the softmax, and the padded rows are stripped on export to HF.
    vocab_multiple: int = 1
    # auto | torch | te. auto = torch: our document-masked attention (model.attention_kernel) in megatron-core's
    # local layer spec. te: TransformerEngine's layer spec and attention (GPU with TE only; UNVERIFIED: it has
    # never run on a machine with TE; only parallel.cp_comm_type=p2p under CP)
    attention_backend: str = "auto"
    # the torch backend's kernel: auto | torch-varlen | flash-attn | sdpa | cpu-blockwise. auto: flash-attn
    # when installed, else torch's varlen flash attention (CUDA, bf16), else SDPA; cpu-blockwise on the CPU
    attention_kernel: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
