"""Document-masked causal attention for packed (THD) sequences: exact under context parallelism, memory
linear in the sequence length, on kernels from torch itself.

- :mod:`.layout`: a micro-batch's attention as one varlen problem, built once per micro-batch on the host.
- :mod:`.kernels`: the varlen kernels, found by name (torch's varlen flash attention on GPUs, the
  flash-attn package when installed, SDPA as the fallback, blockwise flash attention on the CPU).
- :mod:`.blockwise`: the exact CPU kernel (log-sum-exp merge, custom autograd), the reference.
- :mod:`.core`: the megatron-core modules of our layer spec.
"""

from megaprolong.model.attention.core import DocumentMaskedAttention, SelfAttention
from megaprolong.model.attention.kernels import KERNELS, select_kernel
from megaprolong.model.attention.layout import AttentionLayout, PackedBatch, packed_batch

__all__ = ["AttentionLayout", "DocumentMaskedAttention", "KERNELS", "PackedBatch", "SelfAttention", "packed_batch",
           "select_kernel"]
