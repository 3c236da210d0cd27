"""The varlen causal attention kernels our attention can run, each found by name.

Every kernel computes the same thing: ``q [Tq, h, d]`` against ``k, v [Tk, kv, d]`` (``kv`` divides ``h``),
segment ``i`` being ``q[cu_q[i]:cu_q[i+1]]`` against ``k[cu_k[i]:cu_k[i+1]]`` with the causal mask aligned
bottom-right (see :mod:`megaprolong.model.attention.layout`). None of them builds a mask or score tensor
that grows with queries x keys.

- ``torch-varlen``: ``torch.nn.attention.varlen.varlen_attn``, torch's own flash attention (CUDA, bf16/fp16,
  torch >= 2.10), all segments in one call.
- ``flash-attn``: the flash-attn package's ``flash_attn_varlen_func`` (CUDA, bf16/fp16), when installed and
  asked for by name: it has not run in this project's checks, and before 2.1 it aligned the causal mask
  top-left (wrong for context parallelism's offset chunks), so 2.1 or newer only.
- ``sdpa``: torch SDPA per segment with ``causal_lower_right`` (CUDA: the flash / memory-efficient kernels
  take it without building the mask; on the CPU it would build it, so ``auto`` never picks it there).
- ``cpu-blockwise``: exact blockwise attention on torch's CPU flash kernels
  (:mod:`megaprolong.model.attention.blockwise`), the reference every GPU kernel is checked against.

Whatever is chosen checks itself once per process before training (:func:`self_test`): a tiny problem with
segments whose keys outnumber their queries (context parallelism's offset chunks), forward and gradients,
against SDPA with ``causal_lower_right``; a mismatch refuses to train, with the numbers.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from megaprolong.model.attention.blockwise import blockwise_causal_attention
from megaprolong.model.attention.layout import AttentionLayout
from megaprolong.model.config import ATTENTION_KERNELS as KERNELS


@dataclass(frozen=True)
class Kernel:
    name: str
    detail: str  # what runs, for the start-up line and the metrics file
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionLayout, float], torch.Tensor]


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_available() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # a build without CUDA fails in various ways
        return False
    return True


FLASH_ATTN_MIN = (2, 1)  # before 2.1, causal=True aligned the mask top-left when keys outnumber queries


def flash_attn_too_old() -> str | None:
    """Why the installed flash-attn must not be used (its version), else None."""
    import flash_attn

    version = getattr(flash_attn, "__version__", "0")
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < FLASH_ATTN_MIN:
        return (f"flash-attn {version} is older than 2.1: its causal mask is aligned top-left when a segment has "
                f"more keys than queries, which is wrong for context parallelism's offset chunks; install >= 2.1")
    return None


@functools.cache
def causal_varlen_call(varlen_attn: Callable) -> Callable:
    """Adapt ``varlen_attn``'s signature of the running torch to one causal call ``(q, k, v, cu_q, cu_k,
    max_q, max_k, scale)``:

    - 2.10: ``is_causal=True`` (a keyword; no GQA flag: fewer KV heads are taken as GQA);
    - 2.11: keyword-only ``window_size``; causal is ``(-1, 0)``, and it must be a tuple: the source compares
      ``window_size == (-1, 0)``, so a list silently means full (non-causal) attention;
    - 2.12+: as 2.11 plus ``enable_gqa``, required when there are fewer KV heads than query heads.

    Cached: the signature is read once per process, not in every layer.
    """
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        raise RuntimeError(f"torch.nn.attention.varlen.varlen_attn{inspect.signature(varlen_attn)}: neither "
                           "window_size nor is_causal; this torch version is not supported")
    has_scale, has_gqa = "scale" in params, "enable_gqa" in params

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        kwargs = dict(causal)
        if has_scale:
            kwargs["scale"] = scale
        elif not math.isclose(scale, q.shape[-1] ** -0.5):
            raise RuntimeError("this torch's varlen_attn takes no scale; the model needs a non-default one")
        if has_gqa and k.shape[1] != q.shape[1]:
            kwargs["enable_gqa"] = True
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    return call


def _torch_varlen(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return causal_varlen_call(varlen_attn)(q, k, v, layout.cu_q_device, layout.cu_k_device, layout.max_q,
                                           layout.max_k, scale)


def _flash_attn(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, layout.cu_q_device, layout.cu_k_device, layout.max_q, layout.max_k,
                                  softmax_scale=scale, causal=True)


def expand_kv(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """GQA for SDPA: repeat each KV head for its query heads. (SDPA's enable_gqa would skip this copy but
    sends the GPU to its O(L^2)-memory math kernel; the copy keeps the flash / memory-efficient kernels.)"""
    groups = x.shape[dim]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=dim)


def _sdpa(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    from torch.nn.attention.bias import causal_lower_right

    k, v = expand_kv(k, q.shape[1], dim=1), expand_kv(v, q.shape[1], dim=1)
    out = torch.empty_like(q)
    bounds = zip(layout.cu_q[:-1].tolist(), layout.cu_q[1:].tolist(), layout.cu_k[:-1].tolist(),
                 layout.cu_k[1:].tolist())
    for qs, qe, ks, ke in bounds:
        qc, kc, vc = (x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke]))  # [1, h, n, d]
        n, m = qe - qs, ke - ks
        mask = {"is_causal": True} if n == m else {"attn_mask": causal_lower_right(n, m)}
        out[qs:qe] = F.scaled_dot_product_attention(qc, kc, vc, scale=scale, **mask)[0].transpose(0, 1)
    return out


def _cpu_blockwise(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    return blockwise_causal_attention(q, k, v, layout.cu_q, layout.cu_k, scale)


_RUN = {"torch-varlen": _torch_varlen, "flash-attn": _flash_attn, "sdpa": _sdpa, "cpu-blockwise": _cpu_blockwise}
_DETAIL = {
    "torch-varlen": "torch.nn.attention.varlen.varlen_attn (torch {torch})",
    "flash-attn": "flash_attn.flash_attn_varlen_func",
    "sdpa": "torch SDPA per document chunk, causal_lower_right",
    "cpu-blockwise": "blockwise flash attention on torch's CPU kernels, log-sum-exp merge",
}


@functools.cache
def select_kernel(name: str, device_type: str, dtype: torch.dtype) -> Kernel:
    """The kernel called ``name``; ``auto``: torch's varlen (CUDA, 16-bit), else SDPA (CUDA, fp32); the
    blockwise kernel on the CPU. flash-attn only by name (>= 2.1). A kernel that cannot run here is refused."""
    if name not in KERNELS:
        raise ValueError(f"attention kernel {name!r}: expected one of {', '.join(KERNELS)}")
    half = dtype in (torch.bfloat16, torch.float16)
    cuda = device_type == "cuda"
    if name == "auto":
        if not cuda:
            name = "cpu-blockwise"
        elif half and torch_varlen_available():
            name = "torch-varlen"
        else:
            name = "sdpa"
    why = None
    if name in ("torch-varlen", "flash-attn") and not (cuda and half):
        why = "needs CUDA and bf16/fp16"
    elif name == "torch-varlen" and not torch_varlen_available():
        why = f"needs torch >= 2.10 (this is {torch.__version__})"
    elif name == "flash-attn" and not flash_attn_available():
        why = "the flash-attn package is not installed"
    elif name == "flash-attn" and (old := flash_attn_too_old()):
        why = f"refused: {old}"
    elif name == "cpu-blockwise" and cuda:
        why = "runs on the CPU only"
    if why:
        raise ValueError(f"attention kernel {name!r} {why}")
    return Kernel(name, _DETAIL[name].format(torch=torch.__version__), _RUN[name])


# What bf16/fp16 rounding allows a correct kernel, as the largest error of the output or a q/k/v gradient
# relative to the reference's max |x|. Measured on the CPU at Llama-3-8B's head shapes (32 query heads, 8 KV
# heads, dim 128) on documents of up to 2,900 tokens: SDPA 0.002-0.009, the blockwise kernel up to 0.015 (the
# KV gradients, summed over four query heads and thousands of queries, are the noisiest). A causal mask
# aligned top-left or keys read one position late give errors above 1: 60x the tolerance.
HALF_PRECISION_TOLERANCE = 2e-2
FLOAT32_TOLERANCE = 1e-4


class KernelMismatch(RuntimeError):
    """The chosen kernel does not compute causal varlen attention (found by :func:`self_test`)."""


# A rank's share under CP=2 of uneven documents: segments with 0 and > 0 keys before their queries, one
# of a single query, so that a top-left causal mask or a key offset off by one is visible.
_SELF_TEST_LENGTHS = (37, 4, 101, 1, 18)


def self_test_layout(device: torch.device) -> AttentionLayout:
    from megaprolong.model.context_parallel import padded_lengths

    cu = np.concatenate([[0], np.cumsum(padded_lengths(np.array(_SELF_TEST_LENGTHS), 2))])
    return AttentionLayout.build(cu, 2, 1, device)


def sdpa_lower_right(q, k, v, cu_q, cu_k, scale: float) -> torch.Tensor:
    """The reference: SDPA per segment with ``causal_lower_right`` (query i of n sees keys up to m - n + i)."""
    from torch.nn.attention.bias import causal_lower_right

    out = []
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        qc, kc, vc = (x.transpose(0, 1)[None] for x in (q[qs:qe], expand_kv(k[ks:ke], q.shape[1], 1),
                                                         expand_kv(v[ks:ke], q.shape[1], 1)))
        out.append(F.scaled_dot_product_attention(qc, kc, vc, scale=scale,
                                                  attn_mask=causal_lower_right(qe - qs, ke - ks))[0].transpose(0, 1))
    return torch.cat(out)


def compare_with_reference(run: Callable, layout: AttentionLayout, device: torch.device, dtype: torch.dtype,
                           heads: int, groups: int, dim: int, seed: int = 0) -> dict[str, float]:
    """``run``'s output and q/k/v gradients on random inputs, against :func:`sdpa_lower_right` in float32 on
    the same (``dtype``-rounded) inputs: the largest error of each, relative to the reference's max |x|."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = int(layout.cu_q[-1]), int(layout.cu_k[-1])
    inputs = [torch.randn(t, h, dim, generator=g).to(dtype) for t, h in ((tq, heads), (tk, groups), (tk, groups))]
    grad_out = torch.randn(tq, heads, dim, generator=g)
    scale = dim ** -0.5
    results = []
    for fn, dt in ((run, dtype), (lambda q, k, v, lay, s: sdpa_lower_right(q, k, v, lay.cu_q, lay.cu_k, s), torch.float32)):
        q, k, v = (x.to(device, dt, copy=True).requires_grad_() for x in inputs)  # own leaves: own gradients
        out = fn(q, k, v, layout, scale)
        (out.float() * grad_out.to(device)).sum().backward()
        results.append([t.detach().float().cpu() for t in (out, q.grad, k.grad, v.grad)])
    return {what: ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            for what, got, ref in zip(("out", "dq", "dk", "dv"), *results)}


def self_test(kernel: Kernel, device: torch.device, dtype: torch.dtype, heads: int, groups: int, dim: int) -> float:
    """``kernel`` on a tiny problem shaped like the model's attention (``heads``, ``groups`` KV heads, head
    ``dim``), segments at offsets > 0, against SDPA ``causal_lower_right``: the largest relative error of the
    output and gradients; :class:`KernelMismatch` (with the numbers) when beyond what rounding allows."""
    errors = compare_with_reference(kernel.run, self_test_layout(device), device, dtype, heads, groups, dim)
    tolerance = HALF_PRECISION_TOLERANCE if dtype in (torch.bfloat16, torch.float16) else FLOAT32_TOLERANCE
    worst = max(errors.values())
    if not worst <= tolerance:
        raise KernelMismatch(f"attention kernel {kernel.name} fails its self-test against SDPA causal_lower_right "
                             f"({', '.join(f'{k} {v:.2e}' for k, v in errors.items())} of max |ref|, tolerance "
                             f"{tolerance:.0e}): not training with it; choose another model.attention_kernel")
    return worst
