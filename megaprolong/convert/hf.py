"""HF checkpoints (Llama, Qwen2, Qwen3) <-> megatron-core GPTModel tensors (the full, layout-free names of
:mod:`megaprolong.model.state`).

- ``q/k/v_proj`` (and their biases, Qwen2) are fused per KV group as ``[q_1 .. q_{heads/groups}, k, v] x groups``
  (megatron's fused QKV layout);
- Qwen3's per-head ``q_norm`` / ``k_norm`` are megatron's ``q_layernorm`` / ``k_layernorm``;
- ``gate_proj``/``up_proj`` become ``linear_fc1 = [gate; up]``;
- input / post-attention norms become the layers' ``input_layernorm`` / ``pre_mlp_layernorm`` (local spec;
  in TE specs they are fused into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, which
  megatron's sharded state dict maps for us when checkpoints are loaded);
- tied embeddings (one HF tensor, ``model.embed_tokens``) are megatron's shared embedding and output weight:
  no ``output_layer`` / ``lm_head`` tensor on either side.
:func:`conversion_rules` lists every tensor once, with the conversion both ways, so the two directions cannot
drift apart; the jobs apply one rule (one tensor set, e.g. a layer's q, k, v) at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from megaprolong.model.config import ModelConfig
from megaprolong.model.families import BY_MODEL_TYPE, FAMILIES, LLAMA3_FIXED, MOE_FIELDS


class ConversionError(ValueError):
    pass


def _rope(config: dict) -> tuple[float | None, dict | None]:
    """(theta, the scaling dict or None) from either spelling: ``rope_theta`` + ``rope_scaling`` (configs on
    the Hub) or ``rope_parameters`` (transformers 5)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    if (scaling.get("rope_type") or scaling.get("type") or "default") == "default":
        scaling = None
    return config.get("rope_theta", params.get("rope_theta")), scaling


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig from an HF config.json; what we cannot reproduce exactly is refused, naming the field."""
    family = BY_MODEL_TYPE.get(config.get("model_type"))
    if family is None:
        arch = config.get("architectures") or config.get("model_type")
        raise ConversionError(f"model_type={config.get('model_type')!r} ({arch}): not supported; supported: "
                              f"{', '.join(sorted(BY_MODEL_TYPE))} (dense decoders)")
    for name in MOE_FIELDS:
        if config.get(name):
            raise ConversionError(f"{name}={config[name]}: mixture-of-experts models are not supported")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        raise ConversionError("use_sliding_window / layer_types: sliding-window attention is not supported")
    for name in ("attention_bias", "mlp_bias"):
        if config.get(name):
            raise ConversionError(f"{name}=true: biases on the output / MLP projections are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={config['hidden_act']!r}: only SwiGLU (silu) is supported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"partial_rotary_factor={config['partial_rotary_factor']}: only full RoPE is supported")
    theta, scaling = _rope(config)
    rope = {}
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in family.rope_types:
            raise ConversionError(f"rope_scaling.rope_type={kind!r}: not supported for {family.name} "
                                  f"(supported: {', '.join(family.rope_types)})")
        differs = {k: scaling.get(k) for k, v in LLAMA3_FIXED.items() if float(scaling.get(k, v)) != float(v)}
        if differs:
            raise ConversionError(f"rope_scaling {differs}: megatron-core computes Llama-3 RoPE scaling only with "
                                  f"{LLAMA3_FIXED}; training it would give a different model")
        rope = {"rope_scaling": "llama3", "rope_scaling_factor": float(scaling["factor"])}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"], rope_base=float(theta if theta is not None else 10000.0),
        norm_eps=config.get("rms_norm_eps", 1e-5), max_position_embeddings=config.get("max_position_embeddings", 8192),
        family=family.name, kv_channels=head_dim if head_dim * heads != hidden else None,
        qkv_bias=family.qkv_bias, qk_norm=family.qk_norm, tie_embeddings=bool(config.get("tie_word_embeddings")),
        **rope)


def hf_config(model: ModelConfig, max_position_embeddings: int, torch_dtype: str = "bfloat16") -> dict:
    """An HF config.json of ``model``'s family (RoPE base, scaling and context length of the trained stage)."""
    family = FAMILIES[model.family]
    rope = {"rope_theta": model.rope_base, "rope_type": "default"}
    if model.rope_scaling == "llama3":
        rope = {"rope_theta": model.rope_base, "rope_type": "llama3", "factor": model.rope_scaling_factor,
                **LLAMA3_FIXED}
    return {
        "architectures": [family.architecture], "model_type": family.model_type, "hidden_act": "silu",
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": model.head_dim, "vocab_size": model.vocab_size,
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_base, "rope_parameters": rope,
        **({"rope_scaling": rope} if model.rope_scaling != "none" else {}),
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": model.tie_embeddings,
        **dict(family.extra_hf_fields), "initializer_range": model.init_std,
        "torch_dtype": torch_dtype, "dtype": torch_dtype, "use_cache": True,
    }


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    d, groups = m.head_dim, m.num_query_groups
    per = m.num_attention_heads // groups
    q = q.reshape(groups, per * d, -1)
    k = k.reshape(groups, d, -1)
    v = v.reshape(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def _split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, ...]:
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
    return t if t.shape[0] == rows else t[:rows]


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensors it is made of, with the conversion both ways."""
    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[..., torch.Tensor] = lambda t: t  # HF tensors -> the megatron tensor
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = lambda t: (t,)  # the inverse


def _fuse_qkv_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    return _fuse_qkv(q[:, None], k[:, None], v[:, None], m)[:, 0]


def _split_qkv_bias(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, ...]:
    return tuple(t[:, 0] for t in _split_qkv(qkv[:, None], m))


def conversion_rules(m: ModelConfig) -> list[Rule]:
    """Every tensor of the model, in model order (embedding, layers, final norm, output layer)."""
    vocab = [partial(_pad_rows, rows=m.padded_vocab_size), lambda t: (_strip_rows(t, m.vocab_size),)]
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), *vocab)]
    for i in range(m.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = tuple(f"{hf}self_attn.{x}_proj.weight" for x in "qkv")
        rules += [
            Rule(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",)),
            Rule(mc + "self_attention.linear_qkv.weight", attn, partial(_fuse_qkv, m=m), partial(_split_qkv, m=m)),
            *([Rule(mc + "self_attention.linear_qkv.bias", tuple(f"{hf}self_attn.{x}_proj.bias" for x in "qkv"),
                    partial(_fuse_qkv_bias, m=m), partial(_split_qkv_bias, m=m))] if m.qkv_bias else []),
            *([Rule(mc + f"self_attention.{x}_layernorm.weight", (f"{hf}self_attn.{x}_norm.weight",)) for x in "qk"]
              if m.qk_norm else []),
            Rule(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",)),
            Rule(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)),
            Rule(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                 lambda gate, up: torch.cat([gate, up]), lambda t: t.chunk(2)),
            Rule(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",)),
        ]
    rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not m.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), *vocab))
    return rules


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
            # memory-mapped: tensors are read from the file when used, not all at once
            self._bin = torch.load(self.path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
            self.files = {name: None for name in self._bin}
        else:
            raise ConversionError(f"{self.path}: no model.safetensors(.index.json) or pytorch_model.bin")
        for f in set(self.files.values()) - {None}:
            if not f.exists():
                raise ConversionError(f"{self.path}: shard {f.name} listed in the index is missing")

    def _file(self, name: str) -> Path | None:
        if name not in self.files:
            raise ConversionError(f"{self.path}: tensor {name} is missing")
        return self.files[name]

    def get(self, name: str) -> torch.Tensor:
        f = self._file(name)
        if f is None:
            return self._bin[name]
        from safetensors import safe_open

        with safe_open(f, "pt") as handle:
            return handle.get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype of ``name``, read from the file's header only."""
        f = self._file(name)
        if f is None:
            return self._bin[name].to("meta")
        from safetensors import safe_open

        with safe_open(f, "pt") as handle:
            info = handle.get_slice(name)
            if info.get_dtype() not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{f}: {name} has dtype {info.get_dtype()}; supported: "
                                      f"{', '.join(_SAFETENSORS_DTYPES)}")
            return torch.empty(info.get_shape(), dtype=_SAFETENSORS_DTYPES[info.get_dtype()], device="meta")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
