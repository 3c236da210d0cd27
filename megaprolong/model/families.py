"""The dense decoder families we train, each a declaration of how it differs from Llama-3, and the checks
that refuse what we cannot reproduce exactly.

All of them are the same megatron-core GPTModel (:mod:`megaprolong.model.llama`) with switches: a family
says which switches every model of it has, how its HF checkpoints name the extra tensors, and which RoPE
variants it may carry. Per-model features (tied embeddings, head width) are read from each config.json.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # model.family
    model_type: str  # HF config.json model_type
    architecture: str  # the HF class written on export
    qkv_bias: bool = False  # q/k/v projections have biases (every model of the family)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (HF self_attn.q_norm / k_norm)
    rope_types: tuple[str, ...] = ("default",)  # HF rope_type values reproduced exactly
    extra_hf_fields: tuple[tuple[str, object], ...] = ()  # written on export, e.g. sliding window off


FAMILIES = {f.name: f for f in (
    Family("llama", "llama", "LlamaForCausalLM", rope_types=("default", "llama3"),
           extra_hf_fields=(("attention_bias", False), ("mlp_bias", False))),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True,
           extra_hf_fields=(("use_sliding_window", False), ("sliding_window", None))),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", qk_norm=True,
           extra_hf_fields=(("attention_bias", False), ("use_sliding_window", False), ("sliding_window", None))),
)}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}

# megatron-core's Llama-3.1 RoPE scaling takes the factor; these three it fixes (rotary_pos_embedding.py)
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# config.json fields of features we do not train, refused by name when set
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
