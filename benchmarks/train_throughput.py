"""Training throughput of a Llama on packed long sequences: tokens/s and model TFLOPS per GPU.

Runs the real trainer (megatron-core model, DDP, distributed optimizer, our THD batches) on synthetic
packed samples (documents of random lengths). On a GPU with TransformerEngine the layer spec is TE's
(its fused attention with PackedSeqParams); without TE it is ours (DocumentMaskedAttention: flash-attn
varlen when installed, else PyTorch SDPA per document chunk). Launch under torchrun; e.g. an H100:

    torchrun --nproc-per-node 1 benchmarks/train_throughput.py --seq 65536 --layers 16 --hidden 2048

and on a CPU, the tiny model per layout:  torchrun --nproc-per-node 2 benchmarks/train_throughput.py --tiny parallel.tp=2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist

from megaprolong.config import load_config
from megaprolong.data.packing import make_sample
from megaprolong.model.llama import have_transformer_engine
from megaprolong.training.config import Config
from megaprolong.training.flops import train_step_flops
from megaprolong.training.trainer import Trainer


def synthetic_batch(n: int, seq: int, vocab: int, mean_doc: int, rng) -> list:
    samples = []
    for _ in range(n):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(min(seq - sum(lengths), max(1, rng.exponential(mean_doc)))))
        docs = [rng.integers(0, vocab, size=k) for k in lengths]
        samples.append(make_sample([(i, 0, k) for i, k in enumerate(lengths)], lambda d, a, b: docs[d][a:b]))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU model (examples/tiny_stage1.yaml sizes)")
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--mean-doc", type=int, default=8192, help="mean document length of the packed samples")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--recompute", default="full")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.cp=2")
    a = ap.parse_args()
    if a.tiny:
        a.seq, a.layers, a.hidden, a.ffn, a.heads, a.groups, a.vocab, a.mean_doc = 512, 4, 128, 352, 4, 2, 512, 100
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    cfg = load_config(Config, None, [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}", f"model.ffn_hidden_size={a.ffn}",
        f"model.num_attention_heads={a.heads}", f"model.num_query_groups={a.groups}", f"model.vocab_size={a.vocab}",
        f"model.max_position_embeddings={a.seq}", f"train.seq_length={a.seq}", "train.micro_batch_size=1",
        f"train.precision={precision}", f"train.recompute={a.recompute}", f"train.steps={a.steps + 1}",
        *a.overrides])
    dp = 1
    trainer = Trainer(cfg)
    dp = trainer.dp_size
    cfg.train.global_batch_size = dp  # one sequence per data-parallel rank per step
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(dp, a.seq, a.vocab, a.mean_doc, rng) for _ in range(a.steps + 1)]
    trainer.train_step(batches[0])  # warm-up (allocations, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, flops = [], 0.0
    for b in batches[1:]:
        start = time.perf_counter()
        trainer.train_step(b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        flops += train_step_flops(cfg.model, [np.diff(s.cu_seqlens) for s in b])
    world = dist.get_world_size()
    step = float(np.median(times))
    tokens = a.seq * dp
    params = sum(p.numel() for p in trainer.model[0].parameters())
    if dist.get_rank() == 0:
        backend = "TransformerEngine" if have_transformer_engine() else "megaprolong DocumentMaskedAttention"
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        layout = f"tp{cfg.parallel.tp} pp{cfg.parallel.pp} cp{cfg.parallel.cp} dp{dp}"
        print(f"\n{'device':<28} {'attention':<36} {'layout':<16} {'params/rank':>12} {'seq':>7} "
              f"{'step s':>8} {'tok/s/GPU':>10} {'TFLOPS/GPU':>10} {'peak GiB':>9}")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"{device:<28} {backend:<36} {layout:<16} {params / 1e6:>11.1f}M {a.seq:>7} {step:>8.3f} "
              f"{tokens / step / world:>10,.0f} {flops / len(times) / step / world / 1e12:>10.2f} {mem:>9.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
