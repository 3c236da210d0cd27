"""The SFT recipe (ProLong's SFT numbers): one dataclass tree, YAML + overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megaprolong.config import ConfigError
from megaprolong.training.config import OptimizerConfig


@dataclass
class SFTDataConfig:
    path: str | None = None  # chat data in the HF `messages` layout: jsonl / parquet / a folder / save_to_disk dir
    mds: str | None = None  # or ProLong's tokenized shards (prolong-ultrachat-64K: input_ids, indices, mask)
    # of a folder holding several splits (HF's SPLIT-00000-of-00003 files, a folder per split, SPLIT.jsonl, a
    # saved DatasetDict), the one to train on; unset: the only one, else train_sft (UltraChat's), else train;
    # several other splits and none named: refused
    split: str | None = None
    messages_key: str = "messages"
    strict: bool = False  # bad conversations: an error naming file:line instead of counted and skipped
    cache_dir: str | None = None  # packed data cache (default: OUTPUT_DIR/.sft_data)
    prepare: str | None = None  # "tiny": write the tiny chat file at data.path if it is missing


@dataclass
class SFTTrainConfig:
    seq_length: int = 65536  # conversations are packed into sequences of this many tokens
    global_batch_tokens: int = 4_194_304  # tokens per optimizer step (4M): a multiple of seq_length
    micro_batch_size: int = 1  # packed sequences per GPU per forward
    steps: int | None = None  # optimizer steps; None: one pass over the data
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 mixed precision on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    # auto: on GPUs megaprolong_varlen (torch's varlen kernel per packed conversation, no mask), on the CPU sdpa
    # (a dense per-conversation mask: fine at CPU lengths); flash_attention_2 (flash-attn >= 2.1) only by name
    attn_implementation: Literal["auto", "flash_attention_2", "megaprolong_varlen", "sdpa", "eager"] = "auto"
    fsdp: bool = True  # FSDP2 full sharding on GPUs (on CPU, transformers runs plain DDP over gloo)
    save_steps: int = 0  # intermediate HF checkpoints every N steps (0: only the final model)


@dataclass
class SFTLoggingConfig:
    metrics_file: str | None = None  # JSONL, one object per step (default: OUTPUT_DIR/metrics.jsonl)
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard], [wandb]
    wandb_project: str | None = None


@dataclass
class SFTConfig:
    model: str | None = None  # HF model folder (megaprolong-convert mcore-to-hf output)
    tokenizer: str | None = None  # default: the model folder
    # auto: from the model's config.json: chatml for Qwen3, qwen2.5 (ChatML + its default system prompt) for
    # Qwen2/2.5, llama3.1 for a Llama with Llama-3 RoPE scaling (3.1/3.2/3.3), else llama3
    chat_format: Literal["auto", "llama3", "llama3.1", "qwen2.5", "chatml"] = "auto"
    output_dir: str | None = None  # the fine-tuned HF model goes here
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    # the training recipes' optimizer section, with ProLong's SFT numbers: LR 2e-5 cosine to 2e-6, 5% warmup
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5, warmup_fraction=0.05))
    logging: SFTLoggingConfig = field(default_factory=SFTLoggingConfig)


PATH_KEYS = ["model", "tokenizer", "output_dir", "data.path", "data.mds", "data.cache_dir", "logging.metrics_file"]


def gradient_accumulation(cfg: SFTConfig, world_size: int) -> int:
    """Micro-batches per rank per step so that a step sees ``global_batch_tokens``; errors name the keys."""
    t = cfg.train
    problems = []
    if not cfg.model:
        problems.append("model (an HF model folder) is required")
    if not cfg.output_dir:
        problems.append("output_dir is required")
    if bool(cfg.data.path) == bool(cfg.data.mds):
        problems.append("set exactly one of data.path (chat data) and data.mds (ProLong's tokenized shards)")
    if t.global_batch_tokens % t.seq_length:
        problems.append(f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                        f"train.seq_length={t.seq_length}")
    sequences = t.global_batch_tokens // t.seq_length
    if sequences % (t.micro_batch_size * world_size):
        problems.append(f"train.global_batch_tokens/train.seq_length = {sequences} sequences per step is not "
                        f"divisible by train.micro_batch_size*world size = {t.micro_batch_size}*{world_size}")
    if not 0 <= cfg.optimizer.warmup_fraction < 1:
        problems.append(f"optimizer.warmup_fraction={cfg.optimizer.warmup_fraction} must be in [0, 1)")
    if cfg.data.prepare not in (None, "tiny"):
        problems.append(f"data.prepare={cfg.data.prepare!r}: only 'tiny' is known")
    if problems:
        raise ConfigError("invalid SFT config: " + "; ".join(problems))
    return sequences // (t.micro_batch_size * world_size)
