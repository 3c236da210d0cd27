"""The training recipe: one dataclass tree, loaded from YAML with ``key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megaprolong.config import ConfigError
from megaprolong.model.config import ATTENTION_BACKENDS, ATTENTION_KERNELS, ModelConfig
from megaprolong.model.families import FAMILIES
from megaprolong.runtime.watchdog import WatchdogConfig


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved schedule)
    cp: int = 1  # context parallel
    sequence_parallel: bool = False  # shard norms/dropout activations over the TP group (needs tp >= 2)
    # TransformerEngine's CP exchange (model.attention_backend=te only; unset there means p2p, the ring, its
    # only packed-sequence path under CP). The torch backend always all-gathers K/V over the CP group and
    # refuses the key, which it would ignore
    cp_comm_type: str | None = None
    distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    # overlap the gradient reduce-scatter / all-reduce with the backward pass (bucket by bucket; exact: the
    # same sums, started earlier)
    overlap_grad_reduce: bool = True
    # with the distributed optimizer: overlap the parameter all-gather after each update with the next
    # forward (DDP's forward pre-hooks wait for each bucket; exact: the same values, gathered later)
    overlap_param_gather: bool = True

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)


@dataclass
class TrainConfig:
    steps: int = 5000  # optimizer steps of this stage (the LR schedule spans them)
    seed: int = 1234  # seeds initialization and the data order
    seq_length: int = 65536  # tokens per packed sequence
    global_batch_size: int = 64  # sequences per optimizer step
    micro_batch_size: int = 1  # sequences per forward/backward (flattened into one packed sequence)
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16: bf16 weights and compute, fp32 master weights and grads
    recompute: Literal["none", "full", "selective"] = "full"  # activation recomputation: full (every layer), selective (attention), none
    loss_chunk_tokens: int = 0  # > 0: LM head + cross-entropy this many local tokens at a time (bounds logits memory)
    # steps in a row whose loss or gradients are not finite that are skipped (no update; their batch is
    # consumed) before the run stops naming the step and domains; 0: stop at the first
    skip_nonfinite_steps: int = 0
    dist_timeout_minutes: int = 30  # collective timeout during start-up and the first steps (long CP all-gathers at 512K need minutes)
    # once steps are steady (after watchdog.warmup_steps) the collective timeout drops to this; 0 keeps
    # dist_timeout_minutes. The step watchdog usually ends a hang first, with every thread's stack printed
    steady_timeout_minutes: int = 15
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)


@dataclass
class OptimizerConfig:
    """AdamW + linear warmup + cosine decay, ProLong's numbers (peak 1e-5, 10% warmup, cosine to 10%)."""

    lr: float = 1e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    warmup_fraction: float = 0.1  # linear warmup from 0 over this fraction of the steps
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay
    clip_grad: float = 1.0  # clip the global grad norm to this


@dataclass
class DataConfig:
    mix: str | None = None  # a mix YAML (domains, weights, packing), see examples/mixes/
    root: str | None = None  # where the mix's relative prefixes live (default: the mix file's folder)
    prefix: str | None = None  # or a single indexed dataset (PREFIX.bin / PREFIX.idx) of short documents
    cache_dir: str | None = None  # packed-index cache (default: PREFIX's folder/.megaprolong_cache)
    prepare: str | None = None  # "tiny": build the tiny recipes' corpus and datasets in data.root if missing


@dataclass
class CheckpointConfig:
    dir: str | None = None  # where step_N/ checkpoints go (and are resumed from)
    interval: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGUSR1)
    resume: str = "auto"  # "auto": continue from the newest complete checkpoint in dir; "none"; or a path
    load: str | None = None  # start this stage from a checkpoint (or the newest in a dir): weights + optimizer, fresh schedule
    keep: int | None = None  # keep only the newest N intact checkpoints (damaged ones are never deleted)
    # a stop request (preemption, time limit) skips its checkpoint when one was published this many steps
    # ago or fewer (0: only when this very step was just saved)
    stop_save_skip_steps: int = 0
    async_save: bool = False  # write checkpoints in a background process while training continues
    # optimizer state. auto: periodic and preemption saves dp_reshardable (each rank writes its own shard, no
    # communication; resumes under the same TP/PP, any DP), the stage's last save fully_reshardable (loads
    # under any TP/PP/CP/DP: the next stage's layout). fully_reshardable gathers a TP x PP shard's whole
    # optimizer state onto every data-parallel rank at each save (~12 GB per rank for 8B at TP=8)
    optimizer_format: Literal["auto", "fully_reshardable", "dp_reshardable"] = "auto"


@dataclass
class EvalConfig:
    """Held-out loss during training: the exact token-averaged loss, per domain, on fixed sequences."""

    interval: int = 0  # every N steps (and after the last); 0: never
    data: str | None = None  # a mix YAML of held-out indexed datasets (domains as in data.mix; weights unused), or one PREFIX
    root: str | None = None  # where eval.data's relative prefixes live (default: the mix file's folder)
    sequences: int = 4  # held-out sequences per domain: the first ones packed (the same at every evaluation)


@dataclass
class RunConfig:
    # one folder for the whole run: ckpt/ (checkpoint.dir), metrics.jsonl (logging.metrics_file), tb/
    # (logging.tensorboard_dir, written when tensorboard is installed), config.yaml (the resolved config,
    # written at start) and logs/; a key set explicitly overrides its part
    dir: str | None = None


@dataclass
class LoggingConfig:
    metrics_file: str | None = None  # JSONL, one object per step
    tensorboard_dir: str | None = None  # written when tensorboard is installed
    wandb_project: str | None = None  # logged when wandb is installed
    wandb_run_name: str | None = None  # the W&B run name (default: W&B picks one)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def apply_run_dir(cfg: Config) -> None:
    """Fill the paths ``run.dir`` provides and no key sets: checkpoints, metrics, TensorBoard."""
    if not cfg.run.dir:
        return
    root = Path(cfg.run.dir)
    cfg.checkpoint.dir = cfg.checkpoint.dir or str(root / "ckpt")
    cfg.logging.metrics_file = cfg.logging.metrics_file or str(root / "metrics.jsonl")
    if cfg.logging.tensorboard_dir is None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is not None:  # the default only where it can be written
            cfg.logging.tensorboard_dir = str(root / "tb")


def validate(cfg: Config, world_size: int) -> None:
    """Check the layout before any process group starts; the message names the offending keys."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    problems = []
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.cp", p.cp)):
        if value < 1:
            problems.append(f"{key}={value} must be >= 1")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        problems.append(f"world size {world_size} is not divisible by parallel.tp*parallel.pp*parallel.cp = {model_parallel}")
    if m.num_attention_heads % p.tp:
        problems.append(f"model.num_attention_heads={m.num_attention_heads} not divisible by parallel.tp={p.tp}")
    if m.num_query_groups % p.tp:
        problems.append(f"model.num_query_groups={m.num_query_groups} not divisible by parallel.tp={p.tp}")
    if m.num_attention_heads % m.num_query_groups:
        problems.append(f"model.num_attention_heads={m.num_attention_heads} not divisible by model.num_query_groups={m.num_query_groups}")
    if m.padded_vocab_size % p.tp:
        problems.append(f"model.vocab_size={m.vocab_size} (padded to a multiple of model.vocab_multiple="
                        f"{m.vocab_multiple}: {m.padded_vocab_size}) not divisible by parallel.tp={p.tp}; "
                        f"set model.vocab_multiple (e.g. 128), or convert with --vocab-multiple")
    if m.ffn_hidden_size % p.tp:
        problems.append(f"model.ffn_hidden_size={m.ffn_hidden_size} not divisible by parallel.tp={p.tp}")
    if m.family not in FAMILIES:
        problems.append(f"model.family={m.family!r}: expected one of {', '.join(FAMILIES)}")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        problems.append(f"model.num_layers={m.num_layers} not divisible by parallel.pp*parallel.vpp={stages}")
    if p.vpp is not None and p.pp < 2:
        problems.append("parallel.vpp needs parallel.pp >= 2")
    if p.sequence_parallel and p.tp < 2:
        problems.append("parallel.sequence_parallel needs parallel.tp >= 2")
    seq_multiple = (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.sequence_parallel else 1)
    if t.seq_length % seq_multiple:
        problems.append(f"train.seq_length={t.seq_length} not divisible by {seq_multiple} "
                        f"(2*parallel.cp*parallel.tp with context/sequence parallelism)")
    dp = p.dp(world_size) if not world_size % model_parallel else 1
    if t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(f"train.global_batch_size={t.global_batch_size} not divisible by "
                        f"train.micro_batch_size*data-parallel size = {t.micro_batch_size}*{dp}")
    if not 0 <= cfg.optimizer.warmup_fraction < 1:
        problems.append(f"optimizer.warmup_fraction={cfg.optimizer.warmup_fraction} must be in [0, 1)")
    elif t.steps >= 1 and round(cfg.optimizer.warmup_fraction * t.steps) >= t.steps:
        problems.append(f"optimizer.warmup_fraction={cfg.optimizer.warmup_fraction} leaves no decay steps of "
                        f"train.steps={t.steps} (warmup must end before the last step)")
    if t.steps < 1:
        problems.append(f"train.steps={t.steps} must be >= 1")
    if m.attention_backend not in ATTENTION_BACKENDS:
        problems.append(f"model.attention_backend={m.attention_backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    if m.attention_kernel not in ATTENTION_KERNELS:
        problems.append(f"model.attention_kernel={m.attention_kernel!r}: expected one of {', '.join(ATTENTION_KERNELS)}")
    if m.attention_backend != "te" and p.cp_comm_type is not None:
        problems.append(f"parallel.cp_comm_type={p.cp_comm_type!r}: TransformerEngine's CP exchange, which the torch "
                        f"attention backend does not use (it all-gathers K/V over the CP group): remove the key")
    if m.attention_backend == "te" and p.cp > 1 and p.cp_comm_type not in (None, "p2p"):
        problems.append(f"parallel.cp_comm_type={p.cp_comm_type!r} with model.attention_backend=te: TransformerEngine "
                        f"supports packed (THD) sequences under context parallelism only with p2p (its a2a and "
                        f"all_gather THD paths are refused or untested in TE itself); set parallel.cp_comm_type=p2p")
    if cfg.eval.interval < 0 or (cfg.eval.interval and not cfg.eval.data):
        problems.append(f"eval.interval={cfg.eval.interval} needs eval.data (held-out indexed datasets)")
    if t.skip_nonfinite_steps < 0:
        problems.append(f"train.skip_nonfinite_steps={t.skip_nonfinite_steps} must be >= 0")
    if t.loss_chunk_tokens < 0:
        problems.append(f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (0: no chunking)")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
