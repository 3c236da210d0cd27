"""Memory-bounded LM head + cross-entropy for very long sequences.

At 512K tokens the vocab-parallel logits of one CP rank are tens of GB (64K tokens x 16K vocab shard x 4
bytes = 4 GB even at CP=8, TP=8). This computes the output layer and megatron's vocab-parallel
cross-entropy ``chunk`` local tokens at a time under activation checkpointing, so only one chunk's logits
exist at once (recomputed in backward). It plugs into megatron-core's ``GPTModel.forward(output_processor=)``
hook and returns the same per-token loss ``[b, s]`` as the unchunked path.

Under sequence parallelism each rank holds ``s/tp`` positions and the output layer all-gathers them, so a
chunk of ``k`` local positions yields logits for rank r's positions ``r*s/tp + [c*k, (c+1)*k)``: the labels
are gathered the same way and the losses put back in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _positions(local: int, tp: int, start: int, stop: int) -> torch.Tensor:
    """Global sequence positions of local rows [start, stop) once gathered over ``tp`` SP ranks."""
    return torch.cat([torch.arange(r * local + start, r * local + stop) for r in range(tp)])


def chunked_lm_loss(chunk: int) -> Callable:
    """An ``output_processor`` computing the per-token loss ``chunk`` local positions at a time."""

    def processor(*, hidden_states, output_layer, output_weight, labels, runtime_gather_output,
                  compute_language_model_loss, scale_logits, **_):
        if labels is None:  # inference: logits are wanted, there is nothing to bound
            logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
            return scale_logits(logits).transpose(0, 1).contiguous()
        local = hidden_states.shape[0]
        tp = labels.shape[1] // local  # > 1 only under sequence parallelism
        losses, order = [], []
        for start in range(0, local, chunk):
            stop = min(start + chunk, local)
            where = _positions(local, tp, start, stop).to(labels.device)

            def piece(h, lab=labels[:, where]):
                logits, _ = output_layer(h, weight=output_weight, runtime_gather_output=runtime_gather_output)
                return compute_language_model_loss(lab, scale_logits(logits))

            losses.append(checkpoint(piece, hidden_states[start:stop], use_reentrant=False))
            order.append(where)
        return torch.cat(losses, dim=1)[:, torch.argsort(torch.cat(order))]

    return processor
