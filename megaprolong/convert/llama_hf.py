"""HF Llama <-> megatron-core GPTModel tensors (the full, layout-free names of :mod:`megaprolong.model.state`).

- ``q/k/v_proj`` are fused per KV group as ``[q_1 .. q_{heads/groups}, k, v] x groups`` (REFERENCE.md s.5);
- ``gate_proj``/``up_proj`` become ``linear_fc1 = [gate; up]``;
- input / post-attention norms become the layers' ``input_layernorm`` / ``pre_mlp_layernorm`` (local spec;
  in TE specs they are fused into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, which
  megatron's sharded state dict maps for us when checkpoints are loaded);
- embeddings are untied (Llama-3): a tied HF model is refused.
Conversion is tensor by tensor: one HF tensor set (a layer's q, k, v) is in flight at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from megaprolong.model.config import ModelConfig


class ConversionError(ValueError):
    pass


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig from an HF Llama config.json; unsupported fields are refused, never dropped."""
    arch = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ConversionError(f"unsupported architecture {arch or config.get('model_type')!r}: only Llama")
    if config.get("tie_word_embeddings"):
        raise ConversionError("tie_word_embeddings=true is not supported (Llama-3 has untied embeddings)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConversionError("attention_bias / mlp_bias are not supported (Llama has no biases)")
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ConversionError(f"rope_scaling {scaling!r} (e.g. Llama-3.1's 'llama3') is not supported: the model "
                              "would silently differ. Convert a checkpoint without RoPE scaling (Llama-3-8B-Instruct)")
    theta = config.get("rope_theta", params.get("rope_theta"))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(f"head_dim {head_dim} x heads {heads} != hidden_size {hidden}: not supported")
    return ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads", heads),
        vocab_size=config["vocab_size"], rope_base=float(theta if theta is not None else 10000.0),
        norm_eps=config.get("rms_norm_eps", 1e-5), max_position_embeddings=config.get("max_position_embeddings", 8192))


def hf_config(model: ModelConfig, max_position_embeddings: int, torch_dtype: str = "bfloat16") -> dict:
    """An HF LlamaForCausalLM config.json for ``model`` (RoPE base and context length of the trained stage)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": model.head_dim, "vocab_size": model.vocab_size,
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_base,
        "rope_parameters": {"rope_theta": model.rope_base, "rope_type": "default"},
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": model.init_std,
        "torch_dtype": torch_dtype, "dtype": torch_dtype, "use_cache": True,
    }


def _fuse_qkv(q, k, v, m: ModelConfig) -> torch.Tensor:
    d, groups = m.head_dim, m.num_query_groups
    per = m.num_attention_heads // groups
    q = q.reshape(groups, per * d, -1)
    k = k.reshape(groups, d, -1)
    v = v.reshape(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def _split_qkv(qkv, m: ModelConfig):
    d, groups = m.head_dim, m.num_query_groups
    per = m.num_attention_heads // groups
    x = qkv.reshape(groups, (per + 2) * d, -1)
    q, k, v = x.split([per * d, d, d], dim=1)
    h = qkv.shape[-1]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to ``rows`` (the padded vocabulary: never looked up, masked out of the loss)."""
    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _strip_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else t[:rows].clone()  # a copy: safetensors refuses views of a larger tensor


def hf_to_megatron(get, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) pairs; ``get(hf_name)`` returns one HF tensor (read lazily)."""
    yield "embedding.word_embeddings.weight", _pad_rows(get("model.embed_tokens.weight"), m.padded_vocab_size)
    for i in range(m.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield mc + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        yield mc + "self_attention.linear_qkv.weight", _fuse_qkv(get(hf + "self_attn.q_proj.weight"),
                                                                 get(hf + "self_attn.k_proj.weight"),
                                                                 get(hf + "self_attn.v_proj.weight"), m)
        yield mc + "self_attention.linear_proj.weight", get(hf + "self_attn.o_proj.weight")
        yield mc + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        yield mc + "mlp.linear_fc1.weight", torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
        yield mc + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    yield "output_layer.weight", _pad_rows(get("lm_head.weight"), m.padded_vocab_size)


def megatron_to_hf(get, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs; ``get(megatron_name)`` returns one full megatron tensor."""
    yield "model.embed_tokens.weight", _strip_rows(get("embedding.word_embeddings.weight"), m.vocab_size)
    for i in range(m.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield hf + "input_layernorm.weight", get(mc + "input_layernorm.weight")
        q, k, v = _split_qkv(get(mc + "self_attention.linear_qkv.weight"), m)
        yield hf + "self_attn.q_proj.weight", q
        yield hf + "self_attn.k_proj.weight", k
        yield hf + "self_attn.v_proj.weight", v
        yield hf + "self_attn.o_proj.weight", get(mc + "self_attention.linear_proj.weight")
        yield hf + "post_attention_layernorm.weight", get(mc + "pre_mlp_layernorm.weight")
        gate, up = get(mc + "mlp.linear_fc1.weight").chunk(2, dim=0)
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", get(mc + "mlp.linear_fc2.weight")
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    yield "lm_head.weight", _strip_rows(get("output_layer.weight"), m.vocab_size)


class HFCheckpoint:
    """Lazy tensor access to an HF checkpoint: sharded safetensors (with index), one file, or torch .bin."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise ConversionError(f"{self.path}: no config.json (not an HF model directory)")
        self.config = json.loads((self.path / "config.json").read_text())
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.files = {name: self.path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.path / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.files = {name: self.path / "model.safetensors" for name in f.keys()}
        elif (self.path / "pytorch_model.bin").exists():
            self._bin = torch.load(self.path / "pytorch_model.bin", map_location="cpu", weights_only=True)
            self.files = {name: None for name in self._bin}
        else:
            raise ConversionError(f"{self.path}: no model.safetensors(.index.json) or pytorch_model.bin")
        for f in set(self.files.values()) - {None}:
            if not f.exists():
                raise ConversionError(f"{self.path}: shard {f.name} listed in the index is missing")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ConversionError(f"{self.path}: tensor {name} is missing")
        f = self.files[name]
        if f is None:
            return self._bin[name]
        from safetensors import safe_open

        with safe_open(f, "pt") as handle:
            return handle.get_tensor(name)
