"""Exact varlen causal attention on the CPU in memory linear in length: torch's CPU flash kernels, merged
by log-sum-exp.

Semantics are those of a varlen flash-attention call (``torch.nn.attention.varlen.varlen_attn`` with
``window_size=(-1, 0)``, or flash-attn's ``causal=True``): segment ``i`` has the queries
``q[cu_q[i]:cu_q[i+1]]`` (``n`` of them) and the keys ``k[cu_k[i]:cu_k[i+1]]`` (``m >= n``), and the causal
mask aligns bottom-right: query ``j`` sees keys ``0 .. m - n + j``. Under context parallelism a rank's
query chunk sits at an offset ``m - n`` inside its document and sees the document up to its own position.

Each segment is two kernel calls on torch's own CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, which tiles internally: no score tensor larger
than its tiles exists):

- the *prefix* keys ``0 .. m - n - 1``, seen by every query of the segment: no mask;
- the *diagonal* keys ``m - n .. m - 1``: an ``n x n`` square, ordinary (top-left) causal.

Both return their output ``o_p`` and log-sum-exp ``l_p`` per query row. The softmax over all keys is
their merge::

    l = log(exp(l_1) + exp(l_2))                 (the log-sum-exp over both key sets)
    o = exp(l_1 - l) * o_1 + exp(l_2 - l) * o_2  (each part re-weighted by its share of the mass)

Backward (as in ring attention): the gradient of each part is the kernel's own backward called with the
*merged* ``o`` and ``l``. It recomputes ``P = exp(q k^T * scale - l)``, the part's slice of the final
softmax, and ``D = rowsum(dO * o)``, the same for every part; so the per-part ``dq`` add up to the full
``dq`` and each part's ``dk``/``dv`` is exact for its keys.
"""

from __future__ import annotations

import numpy as np
import torch

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[t, heads, d] -> the kernel's [1, heads, t, d] (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _segments(cu_q: np.ndarray, cu_k: np.ndarray):
    """(query start, query end, prefix key start, diagonal key start, key end) per non-empty segment."""
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        if qe > qs:
            yield qs, qe, ks, ke - (qe - qs), ke


def _merge(o1, l1, o2, l2):
    """Two partial softmax attentions over disjoint key sets -> the attention over their union."""
    lse = torch.logaddexp(l1, l2)
    w1, w2 = torch.exp(l1 - lse).unsqueeze(-1), torch.exp(l2 - lse).unsqueeze(-1)
    return (w1 * o1.float() + w2 * o2.float()).to(o1.dtype), lse


class BlockwiseCausalAttention(torch.autograd.Function):
    """q [Tq, h, d], k/v [Tk, kv, d] (GQA: kv divides h), host cu_q/cu_k -> [Tq, h, d]."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q: np.ndarray, cu_k: np.ndarray, scale: float):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)  # [h, Tq]
        for qs, qe, ks, kd, ke in _segments(cu_q, cu_k):
            qb = _heads_first(q[qs:qe])
            o, l = _forward(qb, _heads_first(k[kd:ke]), _heads_first(v[kd:ke]), 0.0, True, scale=scale)
            if kd > ks:
                o_p, l_p = _forward(qb, _heads_first(k[ks:kd]), _heads_first(v[ks:kd]), 0.0, False, scale=scale)
                o, l = _merge(o, l, o_p, l_p)
            out[qs:qe] = o[0].transpose(0, 1)
            lse[:, qs:qe] = l[0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cu, ctx.scale = (cu_q, cu_k), scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for qs, qe, ks, kd, ke in _segments(*ctx.cu):
            args = (_heads_first(grad_out[qs:qe]), _heads_first(q[qs:qe]))
            final = (_heads_first(out[qs:qe]), lse[:, qs:qe].unsqueeze(0))
            parts = [(kd, ke, True)] + ([(ks, kd, False)] if kd > ks else [])
            for a, b, causal in parts:
                gq, gk, gv = _backward(*args, _heads_first(k[a:b]), _heads_first(v[a:b]), *final, 0.0, causal,
                                       scale=ctx.scale)
                dq[qs:qe] += gq[0].transpose(0, 1)
                dk[a:b] += gk[0].transpose(0, 1)
                dv[a:b] += gv[0].transpose(0, 1)
        return dq, dk, dv, None, None, None


def blockwise_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: np.ndarray,
                               cu_k: np.ndarray, scale: float) -> torch.Tensor:
    """Bottom-right causal varlen attention on the CPU (see the module docstring)."""
    return BlockwiseCausalAttention.apply(q, k, v, np.asarray(cu_q), np.asarray(cu_k), scale)
