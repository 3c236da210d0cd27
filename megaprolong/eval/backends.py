"""Inference backends: transformers (CPU or GPU) and vLLM (when installed). Greedy decoding only."""

from __future__ import annotations

from typing import Any

import numpy as np


class TransformersBackend:
    """An HF model in bf16 on GPU (fp32 on CPU); flash-attn when installed, else sdpa."""

    name = "transformers"

    def __init__(self, model_dir: str, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        attn = "sdpa"
        if self.device == "cuda":
            try:
                import flash_attn  # noqa: F401

                attn = "flash_attention_2"
            except ImportError:
                pass
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                          attn_implementation=attn).to(self.device).eval()
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        import torch

        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def token_nll(self, ids: list[int], chunk: int = 4096) -> np.ndarray:
        """Negative log-likelihood of tokens 1..n-1 given their prefix, computed ``chunk`` tokens at a time
        over a growing KV cache, so only one chunk's logits exist at once (128K+ fits)."""
        import torch
        from transformers import DynamicCache

        tokens = torch.tensor([ids], device=self.device)
        cache, out = DynamicCache(), []
        cache_keyword = _cache_keyword(self.model)
        with torch.no_grad():
            for start in range(0, len(ids) - 1, chunk):
                piece = tokens[:, start:min(start + chunk, len(ids) - 1)]
                logits = self.model(piece, use_cache=True, **{cache_keyword: cache}).logits.float()
                if cache.get_seq_length() != start + piece.shape[1]:  # an ignored cache: chunks without context
                    raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} tokens after "
                                       f"{start + piece.shape[1]}: {type(self.model).__name__}.forward did not use "
                                       f"it (keyword {cache_keyword!r}); the chunked perplexity would be wrong")
                target = tokens[:, start + 1:start + 1 + piece.shape[1]]
                out.append(torch.nn.functional.cross_entropy(logits[0], target[0], reduction="none").cpu())
        return torch.cat(out).numpy()


def _cache_keyword(model) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` since transformers 5.24 (which still
    accepts ``past_key_values`` with a warning); ``past_key_values`` before, where ``cache=`` lands in the
    catch-all keyword arguments, unused."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class VLLMBackend:
    """vLLM with tensor parallelism (``--tp``); prompt log-probabilities give the perplexity."""

    name = "vllm"

    def __init__(self, model_dir: str, tensor_parallel: int = 1, max_length: int | None = None):
        from vllm import LLM
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.llm = LLM(model=model_dir, tensor_parallel_size=tensor_parallel, max_model_len=max_length,
                       enable_prefix_caching=False)
        self.max_length = max_length

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        from vllm import SamplingParams, TokensPrompt

        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = self.llm.generate(TokensPrompt(prompt_token_ids=ids),
                                SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
        return out[0].outputs[0].text

    def token_nll(self, ids: list[int], chunk: int = 0) -> np.ndarray:
        from vllm import SamplingParams, TokensPrompt

        out = self.llm.generate(TokensPrompt(prompt_token_ids=ids),
                                SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        return np.array([-lp[t].logprob for t, lp in zip(ids[1:], out.prompt_logprobs[1:])])


def load_backend(name: str, model_dir: str, tensor_parallel: int = 1, max_length: int | None = None) -> Any:
    if name == "transformers":
        return TransformersBackend(model_dir)
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise SystemExit("megaprolong-eval: --backend vllm needs vLLM installed (pip install vllm)") from None
        return VLLMBackend(model_dir, tensor_parallel, max_length)
    raise ValueError(f"unknown backend {name!r}: transformers or vllm")
