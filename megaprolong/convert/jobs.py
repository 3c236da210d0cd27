"""``megaprolong-convert hf-to-mcore`` and ``mcore-to-hf``.

Both run as one process: megatron-core distributed checkpoints are layout-free (sharded tensors reshard
on load), so a checkpoint written from one rank loads under any TP/PP/CP layout, and one saved under any
layout loads here. Outputs are written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from megaprolong.convert.hf import ConversionError, HFCheckpoint, conversion_rules, hf_config, model_config_from_hf
from megaprolong.model.config import ModelConfig
from megaprolong.runtime.files import whole_folder

SHARD_BYTES = 1 << 30  # HF shard size: also the most that mcore-to-hf holds of the output
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def _single_rank_model(m: ModelConfig, dtype: torch.dtype = torch.float32, meta: bool = False):
    """A 1-rank megatron-core GPTModel in ``dtype``, process groups started if needed. ``meta``: on the meta
    device (no memory; its sharded state dict describes the checkpoint's tensors)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megaprolong.model.llama import build_model, transformer_config
    from megaprolong.runtime.device import device, init_distributed

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    # the local layer spec whatever training would pick: its parameter names are the conversion rules'
    m = dataclasses.replace(m, attention_backend="torch", attention_kernel="auto")
    if meta:
        with torch.device("meta"):
            return build_model(m, transformer_config(m, params_dtype=dtype, pipeline_dtype=dtype,
                                                     use_cpu_initialization=True, perform_initialization=False))
    model = build_model(m, transformer_config(m, params_dtype=dtype, pipeline_dtype=dtype))
    return model.to(device()).eval()


def _checked_out(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} exists (use --force to replace it)")
    return out


def hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, rope_base: float | None = None,
                force: bool = False, vocab_multiple: int | None = None) -> Path:
    """An HF checkpoint (Llama-3.x, Qwen2.5, Qwen3) -> ``OUT/step_00000000`` (weights only), loadable as a
    stage start (checkpoint.load=OUT). The vocabulary is padded to a multiple of ``vocab_multiple``
    (default: 128 when ``tp`` does not divide it, as Megatron-LM pads, else no padding)."""
    from megaprolong.convert.streaming import save_produced

    hf = HFCheckpoint(hf_dir)
    m = model_config_from_hf(hf.config)
    if rope_base is not None:
        m.rope_base = float(rope_base)
    m.vocab_multiple = vocab_multiple or (1 if m.vocab_size % tp == 0 else 128)
    _check_layout(m, tp, pp)
    out_path = _checked_out(out, force)
    with whole_folder(out_path, replace=force) as tmp:
        # the checkpoint's own dtype: exact, and a bf16 8B model is 16 GB, not 32
        dtype = getattr(torch, hf.config.get("torch_dtype") or hf.config.get("dtype") or "float32")
        model = _single_rank_model(m, dtype, meta=True)
        rules = {r.megatron: r for r in conversion_rules(m)}
        _check_shapes(model, rules, hf.meta)
        step_dir = tmp / "step_00000000"
        step_dir.mkdir()
        bar = tqdm(total=len(rules), desc="hf-to-mcore", unit=" tensors", file=sys.stderr, mininterval=1.0)

        def produce(name: str) -> torch.Tensor:  # from the HF tensors (memory-mapped) when written, then freed
            bar.update()
            return rules[name].to_megatron(*map(hf.get, rules[name].hf))

        save_produced(model, produce, step_dir)
        bar.close()
        meta = {"step": 0, "weights_only": True, "rope_base": m.rope_base, "source": str(hf_dir),
                "config": {"model": asdict(m)}, "layout": None}
        (step_dir / "megaprolong.json").write_text(json.dumps(meta, indent=2))
    return out_path / "step_00000000"


def _check_shapes(model: torch.nn.Module, rules: dict, hf_meta) -> None:
    """Every megatron parameter has a rule, and the HF tensors' shapes (headers only) give its shape."""
    params = dict(model.named_parameters())
    if set(params) != set(rules):
        raise ConversionError(f"megatron parameters without a conversion rule: {sorted(set(params) - set(rules))[:5]}"
                              f"; rules without a parameter: {sorted(set(rules) - set(params))[:5]}")
    for name, rule in rules.items():
        try:
            shape = tuple(rule.to_megatron(*map(hf_meta, rule.hf)).shape)
        except RuntimeError as e:  # e.g. q/k/v that cannot be grouped by the config's heads
            raise ConversionError(f"shape mismatch for {name}: HF tensors {rule.hf} do not fit the config: {e}")
        if shape != tuple(params[name].shape):
            raise ConversionError(f"shape mismatch for {name}: HF gives {shape}, "
                                  f"the config implies {tuple(params[name].shape)}")


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


def saved_dtype(step: Path) -> str:
    """The dtype the checkpoint's weights were saved in (its embedding's, from the checkpoint metadata)."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    tensors = load_tensors_metadata(str(step))
    embedding = tensors.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ConversionError(f"{step}: no embedding.word_embeddings.weight in the checkpoint")
    return str(embedding.dtype).removeprefix("torch.")


def mcore_to_hf(ckpt: str, out: str, tokenizer: str | None = None, dtype: str | None = None,
                force: bool = False, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """A megaprolong checkpoint (any layout) -> HF safetensors + config (+ tokenizer) in ``out``, in
    ``dtype`` (default: the dtype the checkpoint was saved in)."""
    from megaprolong.convert.streaming import TensorReader

    step = resolve_checkpoint(ckpt)
    dtype = dtype or saved_dtype(step)
    meta = json.loads((step / "megaprolong.json").read_text())
    m = ModelConfig(**meta["config"]["model"])
    m.rope_base = float(meta["rope_base"])
    max_len = meta["config"].get("train", {}).get("seq_length", m.max_position_embeddings)
    out_path = _checked_out(out, force)
    with whole_folder(out_path, replace=force) as tmp:
        # read a layer at a time; loading casts the saved tensors to the output dtype
        reader = TensorReader(_single_rank_model(m, getattr(torch, dtype), meta=True), step)
        shards = _SafetensorsShards(tmp, max_shard_bytes)
        for rule in tqdm(conversion_rules(m), desc="mcore-to-hf", unit=" tensors", file=sys.stderr, mininterval=1.0):
            shards.make_room(reader.nbytes(rule.megatron))  # write out what is held before reading more
            for name, tensor in zip(rule.hf, rule.to_hf(reader.get(rule.megatron)), strict=True):
                shards.add(name, tensor)
        shards.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config(m, max_len, dtype), indent=2))
        generation = {"do_sample": False}
        if tokenizer:
            _copy_tokenizer(Path(tokenizer), tmp, generation)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_path


class _SafetensorsShards:
    """HF's sharded safetensors layout (``model-0000i-of-0000n.safetensors`` + index), each shard written
    once ``max_bytes`` of tensors are collected: only one shard's tensors are held."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.files: list[tuple[Path, list[str]]] = []
        self.held = self.total = 0  # bytes in the shard being filled, bytes in all

    def make_room(self, nbytes: int) -> None:
        if self.tensors and self.held + nbytes > self.max_bytes:
            self._flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a slice of a fused tensor: safetensors wants it on its own
        self.make_room(tensor.nbytes)
        self.tensors[name] = tensor
        self.held += tensor.nbytes
        self.total += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.tensors, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.tensors)))
        self.tensors, self.held = {}, 0

    def finish(self) -> None:
        if self.tensors:
            self._flush()
        index = {}
        for i, (path, names) in enumerate(self.files):
            fname = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.folder / fname)
            index.update({name: fname for name in names})
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": index}, indent=2))


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
    """Logits of the HF model (transformers) and of the converted megatron model on the same tokens, in fp32,
    one model in memory at a time (an 8B model: 32 GB)."""
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM

    step = resolve_checkpoint(ckpt)
    meta = json.loads((step / "megaprolong.json").read_text())
    m = ModelConfig(**meta["config"]["model"])
    ids = torch.randint(0, m.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        ref = hf(input_ids=ids, use_cache=False).logits[0].float()
        del hf
        model = _single_rank_model(m)
        dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step))  # into the parameters
        dev = next(model.parameters()).device
        got = model(ids.to(dev), torch.arange(tokens, device=dev)[None], attention_mask=None)[0].float().cpu()
    got = got[:, :m.vocab_size]  # padded ids are not in the HF model
    diff = (got - ref).abs().max().item()
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"max_abs_logit_diff": diff, "greedy_agreement": agree, "ok": diff <= tolerance and agree == 1.0}
