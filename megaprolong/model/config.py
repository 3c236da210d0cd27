"""The model architecture as a plain dataclass (no megatron import: configs load without it)."""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "torch", "te")
ATTENTION_KERNELS = ("auto", "torch-varlen", "flash-attn", "sdpa", "cpu-blockwise")


@dataclass
class ModelConfig:
    """Architecture of a Llama-3 model (defaults: Llama-3-8B), and which attention implementation runs it."""

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
    # auto | torch | te. auto = torch: our document-masked attention (model.attention_kernel) in megatron-core's
    # local layer spec. te: TransformerEngine's layer spec and attention (GPU with TE only; UNVERIFIED: it has
    # never run on a machine with TE; only parallel.cp_comm_type=p2p under CP)
    attention_backend: str = "auto"
    # the torch backend's kernel: auto | torch-varlen | flash-attn | sdpa | cpu-blockwise. auto: flash-attn
    # when installed, else torch's varlen flash attention (CUDA, bf16), else SDPA; cpu-blockwise on the CPU
    attention_kernel: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
