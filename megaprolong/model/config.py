"""The model architecture as a plain dataclass (no megatron import: configs load without it)."""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "torch", "te")
ATTENTION_KERNELS = ("auto", "torch-varlen", "flash-attn", "sdpa", "cpu-blockwise")


@dataclass
class ModelConfig:
    """Architecture of a Llama-3 model (defaults: Llama-3-8B), and which attention implementation runs it."""

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
