"""The LM head + cross-entropy when megatron's default is not enough: memory-bounded for very long
sequences, and exact with a padded vocabulary.

At 512K tokens the vocab-parallel logits of one CP rank are tens of GB (64K tokens x 16K vocab shard x 4
bytes = 4 GB even at CP=8, TP=8). This computes the output layer and megatron's vocab-parallel
cross-entropy ``chunk`` local tokens at a time under activation checkpointing, so only one chunk's logits
exist at once (recomputed in backward). It plugs into megatron-core's ``GPTModel.forward(output_processor=)``
hook and returns the same per-token loss ``[b, s]`` as the unchunked path.

Under sequence parallelism each rank holds ``s/tp`` positions and the output layer all-gathers them, so a
chunk of ``k`` local positions yields logits for rank r's positions ``r*s/tp + [c*k, (c+1)*k)``: the labels
are gathered the same way and the losses put back in place.

With a vocabulary padded for tensor parallelism (``ModelConfig.vocab_multiple``), the logits of the padded
ids are set to -inf before the softmax, so the loss is the unpadded model's (megatron would include them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _positions(local: int, tp: int, start: int, stop: int) -> torch.Tensor:
    """Global sequence positions of local rows [start, stop) once gathered over ``tp`` SP ranks."""
    return torch.cat([torch.arange(r * local + start, r * local + stop) for r in range(tp)])


def _mask_padded_vocab(logits: torch.Tensor, vocab: int, padded: int) -> torch.Tensor:
    """-inf on the columns of padded ids (this rank's vocabulary shard, or all of it when gathered)."""
    if vocab == padded:
        return logits
    from megatron.core import parallel_state as ps

    start = 0 if logits.shape[-1] == padded else ps.get_tensor_model_parallel_rank() * logits.shape[-1]
    ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab, float("-inf"))


def lm_head_loss(chunk: int, vocab: int, padded_vocab: int) -> Callable:
    """An ``output_processor`` computing the per-token loss ``chunk`` local positions at a time (0: all at
    once), the logits of ids ``>= vocab`` (vocabulary padding up to ``padded_vocab``) masked out."""

    def processor(*, hidden_states, output_layer, output_weight, labels, runtime_gather_output,
                  compute_language_model_loss, scale_logits, **_):
        def logits_of(h):
            logits, _ = output_layer(h, weight=output_weight, runtime_gather_output=runtime_gather_output)
            return _mask_padded_vocab(scale_logits(logits), vocab, padded_vocab)

        if labels is None:  # inference: logits are wanted, there is nothing to bound
            return logits_of(hidden_states).transpose(0, 1).contiguous()
        if not chunk:
            return compute_language_model_loss(labels, logits_of(hidden_states))
        local = hidden_states.shape[0]
        tp = labels.shape[1] // local  # > 1 only under sequence parallelism
        losses, order = [], []
        for start in range(0, local, chunk):
            stop = min(start + chunk, local)
            where = _positions(local, tp, start, stop).to(labels.device)

            def piece(h, lab=labels[:, where]):
                return compute_language_model_loss(lab, logits_of(h))

            losses.append(checkpoint(piece, hidden_states[start:stop], use_reentrant=False))
            order.append(where)
        return torch.cat(losses, dim=1)[:, torch.argsort(torch.cat(order))]

    return processor
