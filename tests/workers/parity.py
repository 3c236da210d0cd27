"""Train a tiny Llama for 3 steps under a parallel layout and save what must match the 1-rank run.

Usage (under torchrun): parity.py OUT.pt INIT.pt [data=short|long] [key=value ...]
If INIT.pt does not exist (the 1-rank reference), this run's initial weights are saved there; otherwise
they are loaded from it, so every layout starts from the same weights. ``data=long`` (sequences of >= 4K
tokens): per step, one sequence that is a single document and others of many uneven documents up to 40%
of the sequence, so that context-parallel query chunks sit deep inside long documents.
Saved: losses and grad norms of each step, full gradients of step 1, full parameters after step 3, and the
held-out loss (``Trainer.evaluate``, overall and per domain) of 4 more sequences after step 3; the 1-rank run
also computes that loss independently (cross-entropy of the model's logits, by hand).
"""

import dataclasses
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed.param_and_grad_buffer import shard_buffer

from megaprolong.config import load_config
from megaprolong.data.packing import make_sample, pack_documents
from megaprolong.model.state import gather_full, load_full
from megaprolong.training.config import Config
from megaprolong.training.trainer import Trainer

TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=256", "train.seq_length=32", "train.global_batch_size=8",
        "train.micro_batch_size=1", "train.steps=3", "train.precision=fp32", "train.recompute=none",
        "optimizer.lr=1e-2", "optimizer.warmup_fraction=0.0",
        "optimizer.clip_grad=0.5",  # below the grad norms (~1): clipping acts on every step
        # eps well above the gradient noise of a different summation order, so that Adam updates
        # (~lr * g / (|g| + eps)) compare tightly across layouts
        "optimizer.eps=1e-3"]


def batches(n_steps: int, gbs: int, seq: int):
    rng = np.random.default_rng(0)
    # uneven documents: mostly short (many shorter than 2*CP, so >= 5 per 32-token sequence), some long
    # enough to span sequences
    lengths = np.where(rng.random(300) < 0.8, rng.integers(1, 10, size=300), rng.integers(20, 60, size=300))
    docs = [rng.integers(0, 256, size=n) for n in lengths]
    index = pack_documents(np.array([len(d) for d in docs]), np.arange(len(docs)), seq)
    samples = [make_sample(index.segments(i), lambda d, a, b: docs[d][a:b]) for i in range(len(index))]
    steps = [samples[i * gbs:(i + 1) * gbs] for i in range(n_steps)]
    assert max(len(s.cu_seqlens) - 1 for b in steps for s in b) >= 5
    return steps


def long_batches(n_steps: int, gbs: int, seq: int):
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(n_steps):
        batch = [make_sample([(0, 0, seq)], lambda d, a, b: rng.integers(0, 256, size=b - a))]
        while len(batch) < gbs:
            lengths = []
            while sum(lengths) < seq:
                lengths.append(int(min(seq - sum(lengths), rng.integers(1, int(0.4 * seq)))))
            batch.append(make_sample([(i, 0, n) for i, n in enumerate(lengths)],
                                     lambda d, a, b: rng.integers(0, 256, size=b - a)))
        steps.append(batch)
    return steps


def all_gather_grad_shards(model_chunks) -> None:
    """After a reduce-scatter each data-parallel rank holds only its shard of the reduced gradients;
    gather the shards back into every bucket (as the distributed optimizer does for parameters)."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    for chunk in model_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            for bucket in buffer.buckets:
                shards = shard_buffer(bucket.grad_data, dist.get_world_size(group))
                dist.all_gather_into_tensor(bucket.grad_data, shards[dist.get_rank(group)].clone(), group=group)


def loss_by_hand(trainer, samples, num_domains: int):
    """The token-averaged loss of ``samples``, overall and per domain, from the 1-rank model's logits: the
    cross-entropy of each target token, masked, summed in float64."""
    import torch.nn.functional as F

    from megaprolong.model.context_parallel import split_for_context_parallel
    from megaprolong.model.state import unwrap_model

    rotary = unwrap_model(trainer.model[0]).rotary_pos_emb
    sums, counts = np.zeros(num_domains), np.zeros(num_domains)
    with torch.no_grad():
        for s in samples:
            batch = trainer._device_batch(split_for_context_parallel(s, 1, 0, 1), rotary)
            logits = trainer.model[0](batch["tokens"], batch["position_ids"], attention_mask=None,
                                      packed_seq_params=batch["packed_seq_params"]).reshape(-1, 256).double()
            # .cpu(): the GPU run of the device check computes this too
            token_loss = F.cross_entropy(logits, batch["labels"].reshape(-1), reduction="none").cpu().numpy()
            mask, dom = batch["loss_mask"].reshape(-1).cpu().numpy() > 0, batch["domains"].reshape(-1).cpu().numpy()
            for d in range(num_domains):
                sums[d] += token_loss[mask & (dom == d)].sum()
                counts[d] += (mask & (dom == d)).sum()
    return float(sums.sum() / counts.sum()), int(counts.sum()), [float(x) for x in sums / counts]


def main(out: str, init: str, overrides: list[str]) -> None:
    data = "short"
    if overrides and overrides[0].startswith("data="):
        data, overrides = overrides[0].removeprefix("data="), overrides[1:]
    cfg = load_config(Config, None, TINY + overrides)
    trainer = Trainer(cfg)
    if os.path.exists(init):
        load_full(trainer.model, torch.load(init))
    else:
        state = gather_full(trainer.model)
        if dist.get_rank() == 0:
            torch.save(state, init)
    result = {"loss": [], "grad_norm": []}
    make_batches = {"short": batches, "long": long_batches}[data]
    for step, batch in enumerate(make_batches(cfg.train.steps, cfg.train.global_batch_size, cfg.train.seq_length)):
        reports = trainer.forward_backward(batch)
        if step == 0:
            if cfg.parallel.distributed_optimizer:
                all_gather_grad_shards(trainer.model)
            result["grads"] = gather_full(trainer.model, grads=True)
        grad_norm, _ = trainer.optimizer_step()
        loss, _, _ = trainer.global_loss(reports)
        result["loss"].append(loss)
        result["grad_norm"].append(grad_norm)
    trainer.sync_params()  # overlapped parameter gathers: the last update reaches every rank's weights
    result["params"] = gather_full(trainer.model)
    heldout = [dataclasses.replace(s, domains=np.full_like(s.domains, i % 2)) for i, s in enumerate(
        make_batches(cfg.train.steps + 1, cfg.train.global_batch_size, cfg.train.seq_length)[-1][:4])]
    result["heldout"] = trainer.evaluate(heldout, num_domains=2)
    if dist.get_world_size() == 1:
        result["heldout_by_hand"] = loss_by_hand(trainer, heldout, num_domains=2)
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
