"""Our varlen causal attention as a transformers attention implementation, for packed SFT without flash-attn.

transformers' sdpa path masks packed conversations with a dense ``[L, L]`` mask built from the position ids
(at 64K a 4 GiB boolean per forward, more as a float bias); flash-attn's path needs the flash-attn package.
``attn_implementation="megaprolong_varlen"`` runs the same kernels as training's document-masked attention
(:mod:`megaprolong.model.attention.kernels`: torch's ``varlen_attn`` on a GPU, the exact blockwise kernel on
the CPU) on the conversations of a packed row, found where the position ids restart at 0, and builds no mask:
the mask function registered with it is transformers' own flash-attention one, which returns ``None`` when
nothing is padded.

A call whose queries are not its keys (generation with a KV cache) goes to transformers' sdpa function.

The layout of a packed row (its conversations' boundaries, host arrays and their device copies) is built
once per micro-batch, before the layers run, by a forward pre-hook on the model (:func:`prepare_per_batch`):
the layers (and their recomputation under gradient checkpointing) take it as it is, with no host transfer.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from megaprolong.model.attention.kernels import select_kernel
from megaprolong.model.attention.layout import AttentionLayout

NAME = "megaprolong_varlen"


def segments(position_ids: torch.Tensor) -> np.ndarray:
    """cu_seqlens of the flattened rows: a conversation starts at every position 0 and at every row start."""
    pos = position_ids.detach().cpu().numpy()
    starts = pos == 0
    starts[:, 0] = True
    flat = np.flatnonzero(starts.reshape(-1))
    return np.concatenate([flat, [pos.size]]).astype(np.int64)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query [B, h, L, d]``, ``key/value [B, kv, L, d]``; returns
    ``[B, L, h, d]``. The rows' conversations are one varlen problem (``B * L`` tokens)."""
    batch, heads, length, dim = query.shape
    if key.shape[2] != length:  # decoding against a cache: no packing, transformers' own sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        raise ValueError(f"{NAME}: packed rows have no padding, but an attention mask was given (pad-free "
                         "collation, or attn_implementation='sdpa' for padded batches)")
    if dropout:
        raise ValueError(f"{NAME}: attention dropout is not supported")
    layout = _prepared_layout(position_ids, batch * length)
    if layout is None:  # not prepared for this micro-batch (a model without the pre-hook): build it here
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, length)
        layout = AttentionLayout.build(segments(position_ids), cp=1, rank=0, device=query.device)
    kernel = select_kernel("auto", query.device.type, query.dtype)
    flat = lambda x: x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)  # noqa: E731  [B*L, h, d]
    out = kernel.run(flat(query), flat(key), flat(value), layout, dim ** -0.5 if scaling is None else scaling)
    return out.reshape(batch, length, heads, dim), None


_PREPARED: dict = {}  # the current micro-batch: its position ids (weakly) and its layout


def _prepared_layout(position_ids: torch.Tensor | None, tokens: int) -> AttentionLayout | None:
    """The layout the pre-hook built for this very micro-batch (the same position-ids tensor), else None."""
    ref, layout = _PREPARED.get("positions"), _PREPARED.get("layout")
    if position_ids is None or ref is None or ref() is not position_ids or int(layout.cu_q[-1]) != tokens:
        return None
    return layout


def prepare_per_batch(model: torch.nn.Module) -> None:
    """Build each micro-batch's layout once, from the position ids given to ``model``, before its layers run."""
    def hook(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[-1] > 0:
            device = next(module.parameters()).device
            _PREPARED["layout"] = AttentionLayout.build(segments(positions), cp=1, rank=0, device=device)
            _PREPARED["positions"] = weakref.ref(positions)
    model.register_forward_pre_hook(hook, with_kwargs=True)


def register() -> str:
    """Register :data:`NAME` with transformers (attention and mask functions); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
