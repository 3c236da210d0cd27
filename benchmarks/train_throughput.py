"""Training throughput of a Llama on packed long sequences: tokens/s and model TFLOPS per GPU.

Runs the real trainer (megatron-core model, DDP, distributed optimizer, our THD batches) on synthetic
packed samples (documents of random lengths, or ``--mean-doc 0``: one document as long as the sequence).
The attention is the recipe's backend (``model.attention_backend``, default our torch attention; its kernel
is printed). Besides tokens/s and TFLOPS it reports each rank's peak RSS and the CPU time (user + sys) of
the timed steps summed over all ranks. Launch under torchrun; e.g. an H100:

    torchrun --nproc-per-node 1 benchmarks/train_throughput.py --seq 65536 --layers 16 --hidden 2048

and on a CPU, the tiny model per layout:  torchrun --nproc-per-node 2 benchmarks/train_throughput.py --tiny parallel.tp=2
(benchmarks/long_context.py runs the long-sequence scaling table with it).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.distributed as dist

from megaprolong.config import load_config
from megaprolong.data.packing import make_sample
from megaprolong.runtime.device import device
from megaprolong.training.config import Config
from megaprolong.training.flops import train_step_flops
from megaprolong.training.trainer import Trainer


def synthetic_batch(n: int, seq: int, vocab: int, mean_doc: int, rng) -> list:
    samples = []
    for _ in range(n):
        lengths = [] if mean_doc > 0 else [seq]
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
    ap.add_argument("--mean-doc", type=int, default=8192,
                    help="mean document length of the packed samples (0: one document per sequence)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocations, kernels)")
    ap.add_argument("--recompute", default="full")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.cp=2")
    a = ap.parse_args()
    if a.tiny:
        a.seq, a.layers, a.hidden, a.ffn, a.heads, a.groups, a.vocab, a.mean_doc = 512, 4, 128, 352, 4, 2, 512, 100
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    cfg = load_config(Config, None, [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}", f"model.ffn_hidden_size={a.ffn}",
        f"model.num_attention_heads={a.heads}", f"model.num_query_groups={a.groups}", f"model.vocab_size={a.vocab}",
        f"model.max_position_embeddings={a.seq}", f"train.seq_length={a.seq}", "train.micro_batch_size=1",
        f"train.precision={precision}", f"train.recompute={a.recompute}", f"train.steps={a.steps + a.warmup}",
        *a.overrides])
    dp = 1
    trainer = Trainer(cfg)
    dp = trainer.dp_size
    cfg.train.global_batch_size = dp  # one sequence per data-parallel rank per step
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(dp, a.seq, a.vocab, a.mean_doc, rng) for _ in range(a.steps + a.warmup)]
    for b in batches[:a.warmup]:
        trainer.train_step(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, flops = [], 0.0
    cpu_start = time.process_time()
    for b in batches[a.warmup:]:
        start = time.perf_counter()
        trainer.train_step(b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        flops += train_step_flops(cfg.model, [np.diff(s.cu_seqlens) for s in b])
    world = dist.get_world_size()
    # per rank: peak RSS (the process's whole life) and CPU seconds of the timed steps; max / sum over ranks
    # on the process's device: NCCL (the GPU's process group) reduces no CPU tensor
    usage = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, time.process_time() - cpu_start],
                         dtype=torch.float64, device=device())
    peaks, cpu = usage.clone(), usage.clone()
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu)
    step = float(np.median(times))
    tokens = a.seq * dp
    params = sum(p.numel() for p in trainer.model[0].parameters())
    if dist.get_rank() == 0:
        kernel = trainer.attention["attention_kernel"].split(":")[0]
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        layout = f"tp{cfg.parallel.tp} pp{cfg.parallel.pp} cp{cfg.parallel.cp} dp{dp}"
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result = {"device": device_name, "kernel": kernel, "layout": layout, "seq": a.seq, "step_s": step,
                  "tokens_per_s_per_gpu": tokens / step / world,
                  "tflops_per_gpu": flops / len(times) / step / world / 1e12, "cuda_peak_gib": mem,
                  "rss_peak_per_rank_gib": peaks[0].item() / 2**30, "cpu_s_all_ranks": cpu[1].item() / len(times)}
        print(f"\n{'device':<28} {'attention kernel':<16} {'layout':<16} {'params/rank':>12} {'seq':>7} "
              f"{'step s':>8} {'tok/s/GPU':>10} {'TFLOPS/GPU':>10} {'peak GiB':>9} {'RSS/rank GiB':>12} {'CPU s':>8}")
        print(f"{device_name:<28} {kernel:<16} {layout:<16} {params / 1e6:>11.1f}M {a.seq:>7} {step:>8.3f} "
              f"{result['tokens_per_s_per_gpu']:>10,.0f} {result['tflops_per_gpu']:>10.2f} {mem:>9.1f} "
              f"{result['rss_peak_per_rank_gib']:>12.2f} {result['cpu_s_all_ranks']:>8.1f}")
        if a.json:
            print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
