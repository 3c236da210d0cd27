"""A whole ProLong run as one YAML file: the base model, the data per domain, the training stages, SFT,
evaluation, and the cluster. The pipeline owns one root folder:

    ROOT/raw/          the tiny pipeline's generated corpus, tokenizer and chats (prepare: tiny)
    ROOT/data/SET/     one indexed dataset per domain of each data set (PREFIX.bin/.idx/.json)
    ROOT/ckpt/base/    the base HF model converted to megatron-core
    ROOT/ckpt/STAGE/   each training stage's run folder (checkpoints, metrics.jsonl, tb/, config.yaml, logs/)
    ROOT/hf/           the last stage's final checkpoint as an HF model
    ROOT/sft/          SFT (checkpoints/, model/)
    ROOT/eval/         evaluation (long/, short/, report/)
    ROOT/logs/         the jobs' logs;  ROOT/pipeline.json: the jobs submitted for each step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megaprolong.config import ConfigError, load_config


@dataclass
class DomainInputs:
    input: list[str]  # raw files (jsonl, .gz, .zst, parquet; globs) or ProLong's MDS folders
    group_by: str | None = None  # e.g. repo: a code repository's files become one document
    min_tokens: int = 0  # drop shorter documents (the long domains: 65536)
    add_eos: bool = False  # an end-of-text token after every document
    domain: str | None = None  # MDS inputs: keep only this domain's samples


@dataclass
class DataSetConfig:
    mix: str  # the mix YAML the stages train on (its prefixes are this set's domain names)
    domains: dict[str, DomainInputs] = field(default_factory=dict)  # prefix -> what it is made from


@dataclass
class StageConfig:
    name: str  # the stage's folder: ROOT/ckpt/NAME
    recipe: str  # a training recipe YAML (examples/prolong_64k.yaml, ...)
    data: str  # the data set it trains on (a key of data)
    mix: str | None = None  # its mix YAML (default: the data set's)
    nodes: int = 1  # Slurm nodes (and megaprolong-plan's fit)
    overrides: list[str] = field(default_factory=list)  # key=value for the recipe


@dataclass
class SFTStepConfig:
    recipe: str  # the SFT recipe YAML (examples/sft_ultrachat.yaml)
    data: str | None = None  # chat data: jsonl / parquet / a folder (one split of it) / save_to_disk
    mds: str | None = None  # or ProLong's tokenized shards
    nodes: int = 1
    overrides: list[str] = field(default_factory=list)


@dataclass
class EvalStepConfig:
    suites: list[str] = field(default_factory=lambda: ["long", "short"])  # long, short, helmet
    tasks: list[str] | None = None  # the long suite's tasks (default: megaprolong-eval's)
    lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536, 131072])
    ppl_data: str | None = None  # "SET/PREFIX" (a dataset of the pipeline) or a PREFIX path: adds task ppl
    args: list[str] = field(default_factory=list)  # more flags for the long suite (--samples 20, ...)
    short_tasks: list[str] | None = None  # lm_eval tasks (default: ProLong's five)
    short_args: list[str] = field(default_factory=list)  # --data-dir DIR, --include-path DIR, --limit N, ...
    report_lengths: list[int] = field(default_factory=lambda: [32768, 65536, 131072])
    base_results: str | None = None  # a base model's evaluation folder: the report's differences
    helmet_dir: str | None = None  # the suite helmet: a HELMET checkout with its data
    helmet_python: str | None = None  # and its environment's interpreter
    helmet_args: list[str] = field(default_factory=list)  # more flags for the adapter


@dataclass
class ClusterConfig:
    gpus_per_node: int = 8  # processes per node (GPUs)
    gpu_mem_gib: float = 80.0  # for megaprolong-plan's fit of each stage
    sbatch: list[str] = field(default_factory=list)  # more sbatch options: --partition=..., --account=...
    python: str | None = None  # the environment's python (default: the one running the pipeline)
    container: str | None = None  # pyxis image for the jobs
    local_processes: int = 2  # run --local: processes per training / SFT launch
    node_check: bool = True  # the per-node check before each torchrun


@dataclass
class PipelineConfig:
    root: str  # the folder the pipeline owns (see the module's docstring); --root overrides it
    base_model: str | None = None  # HF model folder the first stage starts from (None: the recipe's init)
    tokenizer: str | None = None  # the tokenizer the data is made with (default: base_model)
    prepare: str | None = None  # "tiny": generate the tiny corpus, tokenizer and chats into ROOT/raw first
    data: dict[str, DataSetConfig] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
    sft: SFTStepConfig | None = None
    eval: EvalStepConfig | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


TINY_RAW = "raw"  # ROOT/raw: the tiny corpus (books/code/web.jsonl), tokenizer/, chats.jsonl


def load_pipeline(path: str | Path, root: str | None = None) -> PipelineConfig:
    """The pipeline YAML; relative paths in it are relative to its folder; ``root`` overrides its root.
    ``{raw}`` in a path is the tiny pipeline's ROOT/raw."""
    path = Path(path)
    cfg = load_config(PipelineConfig, path)
    base = path.resolve().parent
    cfg.root = str(Path(root).resolve() if root else (base / cfg.root).resolve())
    raw = str(Path(cfg.root) / TINY_RAW)

    def resolve(p: str | None) -> str | None:
        if p is None:
            return None
        p = p.replace("{raw}", raw)
        return p if Path(p).is_absolute() else str((base / p).resolve())

    cfg.base_model, cfg.tokenizer = resolve(cfg.base_model), resolve(cfg.tokenizer) or resolve(cfg.base_model)
    if cfg.prepare == "tiny" and cfg.tokenizer is None:
        cfg.tokenizer = str(Path(raw) / "tokenizer")
    for data in cfg.data.values():
        data.mix = resolve(data.mix)
        for inputs in data.domains.values():
            inputs.input = [resolve(p) for p in inputs.input]
    for stage in cfg.stages:
        stage.recipe, stage.mix = resolve(stage.recipe), resolve(stage.mix)
    if cfg.sft:
        cfg.sft.recipe, cfg.sft.data, cfg.sft.mds = resolve(cfg.sft.recipe), resolve(cfg.sft.data), resolve(cfg.sft.mds)
    if cfg.eval:
        cfg.eval.base_results = resolve(cfg.eval.base_results)
        cfg.eval.helmet_dir, cfg.eval.helmet_python = resolve(cfg.eval.helmet_dir), resolve(cfg.eval.helmet_python)
    if cfg.eval and cfg.eval.ppl_data and "/" in cfg.eval.ppl_data and cfg.eval.ppl_data.split("/")[0] not in cfg.data:
        cfg.eval.ppl_data = resolve(cfg.eval.ppl_data)
    if cfg.prepare not in (None, "tiny"):
        raise ConfigError(f"{path}: prepare={cfg.prepare!r}: only 'tiny' is known")
    return cfg
