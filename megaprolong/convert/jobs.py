"""``megaprolong-convert hf-to-mcore`` and ``mcore-to-hf``.

Both run as one process: megatron-core distributed checkpoints are layout-free (sharded tensors reshard
on load), so a checkpoint written from one rank loads under any TP/PP/CP layout, and one saved under any
layout loads here. Outputs are written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from megaprolong.convert.llama_hf import (ConversionError, HFCheckpoint, hf_config, hf_to_megatron,
                                          megatron_to_hf, model_config_from_hf)
from megaprolong.model.config import ModelConfig

SHARD_BYTES = 2 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def _single_rank_model(m: ModelConfig, dtype: torch.dtype = torch.float32):
    """A 1-rank megatron-core Llama in ``dtype``, process groups started if needed."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megaprolong.model.llama import build_model, transformer_config
    from megaprolong.runtime.device import device, init_distributed

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(m, transformer_config(m, params_dtype=dtype, pipeline_dtype=dtype))
    return model.to(device()).eval()


def _prepare_out(out: str | Path, force: bool) -> tuple[Path, Path]:
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} exists (use --force to replace it)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return out, tmp


def _finish(tmp: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, rope_base: float | None = None,
                force: bool = False, vocab_multiple: int | None = None) -> Path:
    """HF Llama -> ``OUT/step_00000000`` (weights only), loadable as a stage start (checkpoint.load=OUT).
    The vocabulary is padded to a multiple of ``vocab_multiple`` (default: 128 when ``tp`` does not divide
    it, as Megatron-LM pads, else no padding)."""
    from megatron.core import dist_checkpointing

    hf = HFCheckpoint(hf_dir)
    m = model_config_from_hf(hf.config)
    if rope_base is not None:
        m.rope_base = float(rope_base)
    m.vocab_multiple = vocab_multiple or (1 if m.vocab_size % tp == 0 else 128)
    _check_layout(m, tp, pp)
    out_path, tmp = _prepare_out(out, force)
    try:
        # the checkpoint's own dtype: exact, and a bf16 8B model is 16 GB, not 32
        dtype = getattr(torch, hf.config.get("torch_dtype") or hf.config.get("dtype") or "float32")
        model = _single_rank_model(m, dtype)
        params = dict(model.named_parameters())
        seen = set()
        with torch.no_grad():
            for name, tensor in hf_to_megatron(hf.get, m):
                if name not in params:
                    raise ConversionError(f"no megatron parameter {name}")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ConversionError(f"shape mismatch for {name}: HF gives {tuple(tensor.shape)}, "
                                          f"the config implies {tuple(params[name].shape)}")
                params[name].copy_(tensor)
                seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise ConversionError(f"megatron parameters not filled from the HF checkpoint: {missing[:5]}")
        step_dir = tmp / "step_00000000"
        step_dir.mkdir()
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(step_dir))
        meta = {"step": 0, "weights_only": True, "rope_base": m.rope_base, "source": str(hf_dir),
                "config": {"model": asdict(m)}, "layout": None}
        (step_dir / "megaprolong.json").write_text(json.dumps(meta, indent=2))
        _finish(tmp, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path / "step_00000000"


def _check_layout(m: ModelConfig, tp: int, pp: int) -> None:
    problems = []
    if m.num_attention_heads % tp or m.num_query_groups % tp:
        problems.append(f"heads {m.num_attention_heads} / KV groups {m.num_query_groups} not divisible by tp={tp}")
    if m.num_layers % pp:
        problems.append(f"layers {m.num_layers} not divisible by pp={pp}")
    if m.padded_vocab_size % tp:
        problems.append(f"vocab {m.vocab_size} padded to {m.padded_vocab_size} not divisible by tp={tp} "
                        f"(choose --vocab-multiple)")
    if problems:
        raise ConversionError("the checkpoint cannot be trained with this layout: " + "; ".join(problems))


def resolve_checkpoint(path: str | Path) -> Path:
    """A step_N folder, or the newest complete one inside a run's checkpoint folder."""
    from megaprolong.training.checkpoint import complete_checkpoints

    path = Path(path)
    if (path / "megaprolong.json").exists():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ConversionError(f"{path}: no complete megaprolong checkpoint")
    return found[-1]


def mcore_to_hf(ckpt: str, out: str, tokenizer: str | None = None, dtype: str = "bfloat16",
                force: bool = False) -> Path:
    """A megaprolong checkpoint (any layout) -> HF safetensors + config (+ tokenizer) in ``out``."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    step = resolve_checkpoint(ckpt)
    meta = json.loads((step / "megaprolong.json").read_text())
    m = ModelConfig(**meta["config"]["model"])
    m.rope_base = float(meta["rope_base"])
    max_len = meta["config"].get("train", {}).get("seq_length", m.max_position_embeddings)
    out_path, tmp = _prepare_out(out, force)
    try:
        model = _single_rank_model(m, getattr(torch, dtype))  # loading casts the saved shards to it
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step))["model"]
        model.load_state_dict(state, strict=False)
        params = dict(model.named_parameters())
        torch_dtype = getattr(torch, dtype)
        shards, current, size, index = [], {}, 0, {}
        for name, tensor in megatron_to_hf(lambda n: params[n].detach(), m):
            t = tensor.to(torch_dtype).contiguous().cpu()
            if current and size + t.numel() * t.element_size() > SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[name] = t
            size += t.numel() * t.element_size()
        shards.append(current)
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            index.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config(m, max_len, dtype), indent=2))
        generation = {"do_sample": False}
        if tokenizer:
            _copy_tokenizer(Path(tokenizer), tmp, generation)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        _finish(tmp, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def _copy_tokenizer(src: Path, dst: Path, generation: dict) -> None:
    if not src.is_dir():
        raise ConversionError(f"--tokenizer {src}: not a tokenizer directory")
    copied = [f for f in TOKENIZER_FILES if (src / f).exists()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise ConversionError(f"--tokenizer {src}: no tokenizer.json or tokenizer.model")
    for f in copied:
        shutil.copy2(src / f, dst / f)
    from tokenizers import Tokenizer

    if (src / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        for key, names in (("bos_token_id", ("<|begin_of_text|>", "<s>")),
                           ("eos_token_id", ("<|eot_id|>", "<|end_of_text|>", "</s>"))):
            ids = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
            if ids:
                generation[key] = ids[0]


def verify(hf_dir: str, ckpt: str, tokens: int = 64, tolerance: float = 1e-3, seed: int = 0) -> dict:
    """Logits of the HF model (transformers) and of the converted megatron model on the same tokens."""
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM

    step = resolve_checkpoint(ckpt)
    meta = json.loads((step / "megaprolong.json").read_text())
    m = ModelConfig(**meta["config"]["model"])
    model = _single_rank_model(m)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step))["model"],
                          strict=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, m.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits[0].float()
        dev = next(model.parameters()).device
        got = model(ids.to(dev), torch.arange(tokens, device=dev)[None], attention_mask=None)[0].float().cpu()
    got = got[:, :m.vocab_size]  # padded ids are not in the HF model
    diff = (got - ref).abs().max().item()
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"max_abs_logit_diff": diff, "greedy_agreement": agree, "ok": diff <= tolerance and agree == 1.0}
