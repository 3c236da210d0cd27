"""Llama-style dense decoders as a megatron-core GPTModel, composed from layer specs (never forked modules).

Llama-3: RMSNorm (pre-norm), SwiGLU MLP, grouped-query attention, RoPE with a configurable base, no biases.
The other families (:mod:`megaprolong.model.families`) are megatron-core's own switches on the same model:
QKV biases (``add_qkv_bias``), per-head QK RMSNorm (``qk_layernorm``, our norm in the spec), a head width
independent of hidden / heads (``kv_channels``), one embedding matrix for input and output
(``share_embeddings_and_output_weights``), and Llama-3.1's RoPE frequency scaling (``rope_scaling``).
The layer spec follows ``model.attention_backend``, never the platform alone: megatron-core's local modules
with our document-masked attention (``torch``, the default everywhere), or TransformerEngine's fused modules
(``te``, opt-in: it has never run on a machine with TE).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules, get_num_layers_to_build

from megaprolong.config import ConfigError
from megaprolong.model.config import ATTENTION_BACKENDS, ModelConfig


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # an empty meta-package, or a build without CUDA, fails in various ways
        return False
    return torch.cuda.is_available()


def attention_backend(model: ModelConfig) -> str:
    """``torch`` or ``te``: ``auto`` is ``torch``; ``te`` only where TransformerEngine imports on a GPU."""
    if model.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={model.attention_backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    if model.attention_backend != "te":
        return "torch"
    if not have_transformer_engine():
        raise ConfigError("model.attention_backend=te needs TransformerEngine on a CUDA machine; it does not import "
                         "here (model.attention_backend=auto runs our torch attention)")
    return "te"


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with megatron's norm constructor signature, usable under sequence parallelism.

    megatron's ``WrappedTorchNorm`` refuses sequence parallelism. The norm itself is per token, so it is
    correct on a sequence shard; its weight's gradient is a partial sum per shard, which megatron's DDP
    all-reduces over the tensor-parallel group when the parameter carries ``sequence_parallel=True``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, device=None, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def transformer_config(model: ModelConfig, **parallel_and_runtime) -> TransformerConfig:
    """megatron-core's TransformerConfig for ``model``; keyword args add the parallel layout, dtype, etc."""
    use_te = attention_backend(model) == "te"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        # fusions that need TE or apex kernels
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        apply_rope_fusion=use_te,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        **parallel_and_runtime,
    )


def layer_spec(model: ModelConfig) -> ModuleSpec:
    """The Llama decoder layer: megatron-core's local modules with our document-masked, context-parallel
    attention and a sequence-parallel-capable RMSNorm; or TE's fused modules (backend ``te``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if attention_backend(model) == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
    from megaprolong.model.attention import DocumentMaskedAttention, SelfAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    attn = spec.submodules.self_attention
    core = ModuleSpec(module=DocumentMaskedAttention, params={"kernel": model.attention_kernel})
    qk_norm = {"q_layernorm": RMSNorm, "k_layernorm": RMSNorm} if model.qk_norm else {}
    attn = ModuleSpec(module=SelfAttention, params=attn.params,
                      submodules=dataclasses.replace(attn.submodules, core_attention=core, **qk_norm))
    submodules = dataclasses.replace(spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm,
                                     self_attention=attn)
    return ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)


def decoder_block_spec(model: ModelConfig, config: TransformerConfig, vp_stage: int | None = None) -> ModuleSpec:
    """The layers of this pipeline stage plus the final norm."""
    layer = layer_spec(model)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    final_norm = RMSNorm
    if attention_backend(model) == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm),
    )


def build_model(
    model: ModelConfig,
    config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> GPTModel:
    """One pipeline stage (or the whole model) of the GPTModel on the current device."""
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(model, config, vp_stage),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_base,
        rope_scaling=model.rope_scaling == "llama3",
        rope_scaling_factor=model.rope_scaling_factor,
        vp_stage=vp_stage,
    )
