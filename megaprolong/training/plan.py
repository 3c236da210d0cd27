"""Layout planning: does a recipe fit a cluster, how fast might it run, which layout to pick.

Rough by design, every number explained in the printout. Per GPU, with megatron-core's distributed
optimizer and bf16: weights 2 B/param and fp32 gradients 4 B/param on each model-parallel shard, fp32
master + Adam moments 12 B/param sharded over DP x CP; activations of the local tokens
``S / CP`` (``/ TP`` under sequence parallelism) per layer: with full recomputation only each layer's
input (2 B x h) is kept, plus one layer's working set (~34 B x h per token, attention by flash kernels,
Korthikanti et al. 2022); fp32 logits of the local tokens over the local vocabulary (x2 for their
gradient), or of one chunk of them with ``train.loss_chunk_tokens``. Step time = model FLOPs (attention per
document, assumed full-length documents: an upper bound) / (GPUs x peak x MFU), the MFU calibrated on
ProLong's reported 2.65K tokens/s/GPU for Llama-3-8B at 64K on H100s, with a pipeline-bubble factor
(1 + (PP - 1) / micro-batches).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from megaprolong.config import ConfigError
from megaprolong.model.config import ModelConfig
from megaprolong.training.config import Config, validate
from megaprolong.training.flops import forward_flops

H100_BF16_PEAK = 989e12
PROLONG_STAGE1_TOKENS_PER_GPU = 2650.0  # ProLong's report: 2.2K H100-hours for stage 1's 20B tokens


@dataclass
class Estimate:
    tp: int
    pp: int
    cp: int
    dp: int
    memory_gib: dict
    step_s: float
    tokens_per_s_per_gpu: float

    @property
    def total_gib(self) -> float:
        return sum(self.memory_gib.values())


def calibrated_mfu() -> float:
    """The MFU at which the FLOPs model gives ProLong's measured stage-1 throughput (8B, 64K, H100)."""
    per_token = 3 * forward_flops(ModelConfig(), np.array([65536])) / 65536
    return PROLONG_STAGE1_TOKENS_PER_GPU * per_token / H100_BF16_PEAK


def _layer_params(m: ModelConfig) -> float:
    """Parameters of one decoder layer."""
    h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * m.ffn_hidden_size + 2 * h
    return layer + (q + 2 * kv if m.qkv_bias else 0) + (2 * m.head_dim if m.qk_norm else 0)


def params_per_rank(m: ModelConfig, tp: int, pp: int) -> float:
    """Parameters on the fullest rank: the first pipeline stage, its layers and the embedding; without
    pipelining it holds the LM head (a second vocabulary matrix, unless tied) and the final norm too."""
    vocab_matrices = 1 if pp > 1 or m.tie_embeddings else 2
    return (_layer_params(m) * m.num_layers / pp + vocab_matrices * m.padded_vocab_size * m.hidden_size
            + (m.hidden_size if pp == 1 else 0)) / tp


def estimate(cfg: Config, gpus: int, tp: int, pp: int, cp: int, mfu: float) -> Estimate:
    m, t = cfg.model, cfg.train
    dp = gpus // (tp * pp * cp)
    per_rank = params_per_rank(m, tp, pp)
    tokens = t.seq_length / cp / (tp if cfg.parallel.sequence_parallel else 1)
    layers_here = m.num_layers / pp
    if t.recompute == "full":
        acts = layers_here * tokens * m.hidden_size * 2 + tokens * m.hidden_size * 34
    else:
        acts = layers_here * tokens * m.hidden_size * 34
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    acts *= min(pp, micro)  # 1F1B keeps up to PP micro-batches in flight on the first stage
    logit_tokens = t.seq_length / cp
    if t.loss_chunk_tokens:  # one chunk of local positions (gathered over TP under SP) at a time
        logit_tokens = min(logit_tokens, t.loss_chunk_tokens * (tp if cfg.parallel.sequence_parallel else 1))
    logits = 2 * 4 * logit_tokens * m.vocab_size / tp
    memory = {"weights": 2 * per_rank, "grads": 4 * per_rank, "optimizer": 12 * per_rank / (dp * cp),
              "activations": acts, "logits": logits, "overhead": 3 * 2**30}
    memory = {k: v / 2**30 for k, v in memory.items()}
    flops = 3 * forward_flops(m, np.array([t.seq_length])) * t.global_batch_size
    bubble = 1 + (pp - 1) / max(micro, 1)
    step = flops / (gpus * H100_BF16_PEAK * mfu) * bubble
    return Estimate(tp, pp, cp, dp, memory, step, t.global_batch_size * t.seq_length / step / gpus)


def fits(total_gib: float, gpu_mem_gib: float) -> bool:
    """Whether an estimate fits a GPU: 8% kept free for the allocator's fragmentation and NCCL's buffers."""
    return total_gib <= 0.92 * gpu_mem_gib


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_mem_gib: float) -> tuple[Estimate, list[Estimate]]:
    """(estimate of the recipe's own layout, feasible layouts fastest first) on ``nodes x gpus_per_node``."""
    gpus = nodes * gpus_per_node
    mfu = calibrated_mfu()
    validate(cfg, gpus)
    own = estimate(cfg, gpus, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, mfu)
    options = []
    powers = [2 ** i for i in range(0, 8)]
    for tp, pp, cp in itertools.product([p for p in powers if p <= gpus_per_node], powers, powers):
        trial = Config(**{**vars(cfg)})
        trial.parallel = type(cfg.parallel)(**{**vars(cfg.parallel), "tp": tp, "pp": pp, "cp": cp,
                                               "sequence_parallel": tp > 1, "vpp": None})
        try:
            validate(trial, gpus)
        except ConfigError:
            continue
        e = estimate(trial, gpus, tp, pp, cp, mfu)
        if fits(e.total_gib, gpu_mem_gib):
            options.append(e)
    options.sort(key=lambda e: (e.step_s, e.tp * e.pp * e.cp))
    return own, options


def describe(cfg: Config, nodes: int, gpus_per_node: int, gpu_mem_gib: float) -> str:
    own, options = plan(cfg, nodes, gpus_per_node, gpu_mem_gib)
    lines = [f"{nodes} nodes x {gpus_per_node} GPUs ({gpu_mem_gib:g} GiB), sequence {cfg.train.seq_length:,}, "
             f"global batch {cfg.train.global_batch_size}, recompute {cfg.train.recompute}; "
             f"assumed MFU {calibrated_mfu():.1%} (calibrated on ProLong's 2.65K tok/s/GPU, 8B at 64K, H100)"]

    def row(e: Estimate, label: str) -> str:
        verdict = "fits" if fits(e.total_gib, gpu_mem_gib) else "DOES NOT FIT"
        parts = ", ".join(f"{k} {v:.1f}" for k, v in e.memory_gib.items())
        return (f"{label}: TP{e.tp} PP{e.pp} CP{e.cp} DP{e.dp}: {e.total_gib:.1f} GiB/GPU ({parts}) {verdict}; "
                f"~{e.step_s:.1f} s/step, ~{e.tokens_per_s_per_gpu:,.0f} tokens/s/GPU")

    lines.append(row(own, "recipe layout"))
    if options:
        lines.append(row(options[0], "suggested (fastest that fits; ties go to the least model parallelism, "
                                     "i.e. the least communication)"))
    else:
        lines.append("no layout fits: more GPUs, or more recomputation")
    return "\n".join(lines)
